// Drives the softphone page in headless Chromium (Debian's, through playwright-core; no browser
// download). Prints a JSON report; every WebSocket frame the page received is included so the
// test can check that no secret reached the browser. Screenshots go to $SHOTS (if set).
//
//   node drive.js outbound URL TOKEN NUMBER SECONDS   log in, call NUMBER, talk, hang up
//   node drive.js inbound  URL TOKEN SECONDS          log in, answer the first incoming call
//   node drive.js refused  URL TOKEN                  log in must fail: report the shown error
//   node drive.js reload   URL TOKEN NUMBER           call NUMBER, reload the page mid-call, talk on
//   node drive.js demo     URL -                      the built-in demo: Try the demo, call 600 (echo),
//                                                     601 (tone), 602 (calls back): report what was heard
//   node drive.js early    URL TOKEN NUMBER           call NUMBER, whose far end sends early media
//                                                     (183) for a while: report the page's audio then
//   node drive.js transfer URL TOKEN NUMBER TARGET    call NUMBER, transfer it to TARGET (blind)
//   node drive.js urltoken URL TOKEN                  open URL?lang=x&autoconnect=1&token=TOKEN, report
//                                                     the address once logged in, reload, log in again
//   node drive.js backend  URL TOKEN SECONDS          log in and wait: the CRM backend places a call
//                                                     through the page (click-to-call); talk, report
//                                                     how it ended (the backend ends it)
//   node drive.js autoanswer URL TOKEN SECONDS        log in; an incoming call asking for auto-answer
//                                                     must be answered with no click and no banner
const { chromium } = require('playwright-core');
const fs = require('fs'), os = require('os'), path = require('path');

const stats = page => page.evaluate(async () => {
  const call = [...window.callgatePhone.calls.values()][0];
  const out = {};
  (await call.pc.getStats()).forEach(s => {
    if (s.type === 'inbound-rtp' && s.kind === 'audio') { out.packetsReceived = s.packetsReceived; out.totalAudioEnergy = s.totalAudioEnergy; }
    if (s.type === 'outbound-rtp' && s.kind === 'audio') { out.packetsSent = s.packetsSent; }
    // From callgate's RTCP reports on the page's stream.
    if (s.type === 'remote-inbound-rtp' && s.kind === 'audio') out.remoteInbound = { packetsLost: s.packetsLost, jitter: s.jitter, fractionLost: s.fractionLost };
  });
  // The page plays the call's audio: its <audio> element holds the call's stream and runs.
  const audio = document.getElementById('remote');
  out.playing = !!audio && audio.srcObject === call.remoteStream && !audio.paused;
  return out;
});

(async () => {
  const [mode, url, token, ...rest] = process.argv.slice(2);
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'callgate-chromium-'));
  const ctx = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--headless=new', '--no-sandbox', '--disable-gpu', '--use-fake-device-for-media-stream',
      '--use-fake-ui-for-media-stream', '--disable-background-networking', '--disable-component-update',
      '--disable-sync', '--no-first-run', '--no-default-browser-check', '--allow-loopback-in-peer-connection',
      '--disable-features=WebRtcHideLocalIpsWithMdns', '--autoplay-policy=no-user-gesture-required',
      // A known microphone signal (a WAV file) instead of Chromium's beeps, when the test gives one.
      ...(process.env.FAKE_AUDIO ? [`--use-file-for-fake-audio-capture=${process.env.FAKE_AUDIO}`] : [])],
  });
  const report = { frames: [], console: [] };
  try {
    const page = ctx.pages()[0] || await ctx.newPage();
    // A slow machine (SLOW_ANSWER_MS): the browser takes that long to apply callgate's SDP
    // answer, so a far end that answers at once has the call established before the SDK's
    // `call()` resolves; the page must still play the call's audio.
    if (process.env.SLOW_ANSWER_MS) await page.addInitScript(ms => {
      const apply = RTCPeerConnection.prototype.setRemoteDescription;
      RTCPeerConnection.prototype.setRemoteDescription = async function (...a) {
        await new Promise(r => setTimeout(r, ms));
        return apply.apply(this, a);
      };
    }, Number(process.env.SLOW_ANSWER_MS));
    page.on('console', m => report.console.push(m.text()));
    page.on('websocket', ws => ws.on('framereceived', f => report.frames.push(String(f.payload))));
    const shot = async name => { if (process.env.SHOTS) await page.screenshot({ path: path.join(process.env.SHOTS, name + '.png') }); };
    if (mode === 'urltoken') {
      // As a CRM that opens the page with the token in its address.
      await page.goto(`${url}?lang=x&autoconnect=1&token=${encodeURIComponent(token)}#dialer`);
    } else if (mode === 'demo') {
      // As a new user of the built-in configuration: no token, the page's demo button.
      await page.goto(url);
      await page.click('#try-demo');
    } else {
      await page.goto(url);
      await shot(`${mode}-1-idle`);
      await page.fill('#token', token);
      await page.click('#connect');
    }
    if (mode === 'refused') {
      await page.waitForFunction(() => document.getElementById('error').textContent.length > 0, null, { timeout: 10000 });
      report.error_visible = await page.isVisible('#error');
      report.error_shown = await page.textContent('#error');
      await shot(`${mode}-2-error`);
    } else {
    await page.waitForFunction(() => window.callgatePhone && window.callgatePhone.registration.state === 'registered', null, { timeout: 10000 });
    report.registered = true;
    report.agent = await page.textContent('#agent');
    const state = want => page.waitForFunction(w => [...window.callgatePhone.calls.values()].some(c => c.state === w), want, { timeout: 15000 });
    if (mode === 'outbound') {
      const [number, seconds] = rest;
      await page.fill('#number', number);
      await page.click('#dial');
      await state('established');
      await page.waitForTimeout(Number(seconds) * 1000);
      await shot(`${mode}-2-in-call`);
      report.stats = await stats(page);
      await page.click('.call button.bad');
    } else if (mode === 'demo') {
      // The demo PBX's numbers: 600 echoes the microphone, 601 plays 440 Hz (each checked by
      // the dominant frequency of what the page plays), 602 declines and calls the page back.
      report.numbers = await page.textContent('#demo-numbers');
      await shot(`${mode}-1-registered`);
      const dominant = () => page.evaluate(async () => {
        const call = [...window.callgatePhone.calls.values()][0];
        const ctx = new AudioContext();
        const an = ctx.createAnalyser(); an.fftSize = 8192;
        ctx.createMediaStreamSource(call.remoteStream).connect(an);
        await new Promise(r => setTimeout(r, 1500));
        const bins = new Float32Array(an.frequencyBinCount); an.getFloatFrequencyData(bins);
        let best = 1; for (let i = 2; i < bins.length; i++) if (bins[i] > bins[best]) best = i;
        const out = { hz: Math.round(best * ctx.sampleRate / an.fftSize), db: Math.round(bins[best]) };
        await ctx.close();
        return out;
      });
      const callAndListen = async number => {
        await page.fill('#number', number);
        await page.click('#dial');
        await state('established');
        await page.waitForTimeout(1000);
        const heard = await dominant();
        heard.stats = await stats(page);
        await page.click('.call button.bad');
        await page.waitForFunction(() => window.callgatePhone.calls.size === 0, null, { timeout: 15000 });
        return heard;
      };
      report.echo = await callAndListen('600');
      report.tone = await callAndListen('601');
      await page.fill('#number', '602');
      await page.click('#dial');
      await page.waitForSelector('#banner.show', { timeout: 15000 });
      report.callback_from = await page.textContent('#banner-who');
      await shot(`${mode}-2-call-back-ringing`);
      await page.click('#accept');
      await state('established');
      await page.waitForTimeout(1500);
      report.stats = await stats(page);
      await page.click('.call button.bad');
    } else if (mode === 'early') {
      // Early media: while the far end's 183 lasts, the page plays its audio (ringback, an
      // announcement) before the call is answered.
      const [number] = rest;
      await page.fill('#number', number);
      await page.click('#dial');
      await state('early');
      await page.waitForTimeout(2000);
      report.early_state = await page.evaluate(() => [...window.callgatePhone.calls.values()][0].state);
      report.stats = await stats(page);
      await state('established');
      await page.click('.call button.bad');
    } else if (mode === 'transfer') {
      // Blind transfer with the page's Transfer button (it prompts for the target).
      const [number, target] = rest;
      await page.fill('#number', number);
      await page.click('#dial');
      await state('established');
      await page.evaluate(() => {
        window.seen = { transfer: [], end_reason: null };
        const call = [...window.callgatePhone.calls.values()][0];
        call.on('transfer', ev => window.seen.transfer.push(ev.state));
        call.on('state', ev => { if (ev.state === 'ended') window.seen.end_reason = ev.endReason; });
      });
      await page.waitForTimeout(300);
      page.once('dialog', d => d.accept(target));
      await page.click('.call button:has-text("Transfer")');
      await page.waitForFunction(() => window.seen.end_reason !== null, null, { timeout: 15000 });
      Object.assign(report, await page.evaluate(() => window.seen));
      await shot(`${mode}-2-transferred`);
    } else if (mode === 'reload') {
      // A reload mid-call: the page resumes its session; the same call goes on with new media.
      const [number] = rest;
      await page.fill('#number', number);
      await page.click('#dial');
      await state('established');
      await page.waitForTimeout(1500);
      report.before = await stats(page);
      const first = () => page.evaluate(() => [...window.callgatePhone.calls.keys()][0]);
      const callId = await first();
      await page.reload();
      await page.waitForFunction(() => window.callgatePhone && [...window.callgatePhone.calls.values()].some(c => c.pc), null, { timeout: 15000 });
      report.same_call = (await first()) === callId;
      report.state_after = await page.evaluate(() => [...window.callgatePhone.calls.values()][0].state);
      await page.waitForTimeout(2000);
      await shot(`${mode}-2-resumed`);
      report.stats = await stats(page);
      await page.click('.call button.bad');
    } else if (mode === 'urltoken') {
      report.href = await page.evaluate(() => location.href);
      // Without the token in its address, a reload still finds its session (resume).
      await page.reload();
      await page.waitForFunction(() => window.callgatePhone && window.callgatePhone.registration.state === 'registered', null, { timeout: 10000 });
      report.registered_after_reload = true;
      report.href_after_reload = await page.evaluate(() => location.href);
      // The entry before the page's own is the blank tab it was opened in, not one with the token.
      await page.goBack();
      report.href_before = page.url();
      await page.goForward();
      await page.waitForFunction(() => window.callgatePhone && window.callgatePhone.registration.state === 'registered', null, { timeout: 10000 });
    } else if (mode === 'backend' || mode === 'autoanswer') {
      const [seconds] = rest;
      await page.evaluate(() => {
        window.seen = { outgoing: null, end_reason: null, banner: false, auto: null };
        const phone = window.callgatePhone;
        const follow = call => call.on('state', ev => {
          if (ev.state === 'ended') window.seen.end_reason = ev.endReason;
          if (document.getElementById('banner').classList.contains('show')) window.seen.banner = true;
        });
        phone.on('outgoing', call => { window.seen.outgoing = call.id; follow(call); });
        phone.on('incoming', call => { window.seen.auto = call.autoAnswer; follow(call); });
      });
      await state('established');
      await page.waitForTimeout(Number(seconds) * 1000);
      await shot(`${mode}-2-in-call`);
      report.stats = await stats(page);
      await page.waitForFunction(() => window.seen.end_reason !== null, null, { timeout: 20000 });
      Object.assign(report, await page.evaluate(() => window.seen));
      report.calls_shown = await page.evaluate(() => document.querySelectorAll('.call').length);
    } else if (mode === 'features') {
      // Hold, resume and DTMF with the page's own buttons; first the state selector.
      const [number] = rest;
      await page.waitForFunction(() => window.callgatePhone.state !== null, null, { timeout: 5000 });
      report.state_options = await page.evaluate(() => [...document.querySelectorAll('#state option')].filter(o => !o.hidden).map(o => o.value));
      await page.selectOption('#state', 'paused');
      await page.waitForFunction(() => window.callgatePhone.state.state === 'paused' && document.getElementById('dial').disabled, null, { timeout: 5000 });
      report.paused_call_off = true;
      await shot(`${mode}-1-paused`);
      await page.selectOption('#state', 'available');
      await page.waitForFunction(() => window.callgatePhone.state.state === 'available' && !document.getElementById('dial').disabled, null, { timeout: 5000 });
      report.available_call_on = true;
      await page.fill('#number', number);
      await page.click('#dial');
      await state('established');
      await page.waitForTimeout(300);
      await page.click('.call button:has-text("Hold")');
      await state('held');
      await shot(`${mode}-2-held`);
      report.held = true;
      await page.click('.call button:has-text("Resume")');
      await state('established');
      report.resumed = true;
      // Mute: the call's own microphone track goes silent; Unmute brings it back.
      await page.click('.call button:has-text("Mute")');
      const micOn = () => page.evaluate(() => [...window.callgatePhone.calls.values()][0].pc.getSenders().some(s => s.track && s.track.enabled));
      report.muted = (await page.isVisible('.call button:has-text("Unmute")')) && !(await micOn());
      await page.click('.call button:has-text("Unmute")');
      report.unmuted = await micOn();
      await page.waitForTimeout(300);
      await page.click('#pad button:has-text("1")');
      await page.click('#pad button:has-text("#")');
      await page.waitForTimeout(500);
      await page.click('.call button.bad');
    } else {
      const [seconds] = rest;
      await page.waitForSelector('#banner.show', { timeout: 15000 });
      report.caller = await page.textContent('#banner-who');
      report.banner_data = await page.textContent('#banner-data');
      await shot(`${mode}-2-ringing`);
      await page.click('#accept');
      await page.waitForFunction(() => [...window.callgatePhone.calls.values()].some(c => c.state === 'established'), null, { timeout: 15000 });
      await page.waitForTimeout(Number(seconds) * 1000);
      await shot(`${mode}-3-in-call`);
      report.stats = await stats(page);
    }
    await page.waitForFunction(() => window.callgatePhone.calls.size === 0, null, { timeout: 15000 });
    report.ended = true;
    }
  } catch (e) {
    report.error = String(e);
  } finally {
    await ctx.close();
    fs.rmSync(profile, { recursive: true, force: true });
  }
  console.log(JSON.stringify(report));
})();
