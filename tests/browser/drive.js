// Drives the softphone page in headless Chromium (Debian's, through playwright-core; no browser
// download): log in with a token, call a number, hold the call for a few seconds, read getStats,
// hang up. Prints a JSON report; every WebSocket frame the page received is included so the test
// can check that no secret reached the browser. Screenshots go to $SHOTS (if set).
// Usage: node drive.js URL TOKEN NUMBER SECONDS
const { chromium } = require('playwright-core');
const fs = require('fs'), os = require('os'), path = require('path');

(async () => {
  const [url, token, number, seconds] = process.argv.slice(2);
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'callgate-chromium-'));
  const ctx = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--headless=new', '--no-sandbox', '--disable-gpu', '--use-fake-device-for-media-stream',
      '--use-fake-ui-for-media-stream', '--disable-background-networking', '--disable-component-update',
      '--disable-sync', '--no-first-run', '--no-default-browser-check', '--allow-loopback-in-peer-connection',
      '--disable-features=WebRtcHideLocalIpsWithMdns', '--autoplay-policy=no-user-gesture-required'],
  });
  const report = { frames: [], console: [] };
  try {
    const page = ctx.pages()[0] || await ctx.newPage();
    page.on('console', m => report.console.push(m.text()));
    page.on('websocket', ws => ws.on('framereceived', f => report.frames.push(String(f.payload))));
    const shot = async name => { if (process.env.SHOTS) await page.screenshot({ path: path.join(process.env.SHOTS, name + '.png') }); };
    await page.goto(url);
    await shot('1-idle');
    await page.fill('#token', token);
    await page.click('#connect');
    await page.waitForFunction(() => window.callgatePhone && window.callgatePhone.registration.state === 'registered', null, { timeout: 10000 });
    report.registered = true;
    report.agent = await page.textContent('#agent');
    await page.fill('#number', number);
    await page.click('#dial');
    await page.waitForFunction(() => [...window.callgatePhone.calls.values()].some(c => c.state === 'established'), null, { timeout: 15000 });
    await page.waitForTimeout(Number(seconds) * 1000);
    await shot('2-in-call');
    report.stats = await page.evaluate(async () => {
      const call = [...window.callgatePhone.calls.values()][0];
      const out = {};
      (await call.pc.getStats()).forEach(s => {
        if (s.type === 'inbound-rtp' && s.kind === 'audio') { out.packetsReceived = s.packetsReceived; out.audioLevel = s.audioLevel; }
        if (s.type === 'outbound-rtp' && s.kind === 'audio') { out.packetsSent = s.packetsSent; }
        if (s.type === 'candidate-pair' && s.state === 'succeeded') { out.pair = true; }
      });
      return out;
    });
    await page.click('.call button.bad');
    await page.waitForFunction(() => window.callgatePhone.calls.size === 0, null, { timeout: 10000 });
    report.ended = true;
    await shot('3-after-call');
  } catch (e) {
    report.error = String(e);
  } finally {
    await ctx.close();
    fs.rmSync(profile, { recursive: true, force: true });
  }
  console.log(JSON.stringify(report));
})();
