// callgate browser SDK: log an agent in with a loginByToken token and make / take calls.
// ES module, no build step. Protocol: docs/API.md. Types for TypeScript: /callgate.d.ts.
//
//   import { Callgate } from '/callgate.js';
//   const phone = await Callgate.connect('wss://callgate.example/ws', token);
//   phone.on('registration', r => ...);
//   phone.on('incoming', call => call.answer());
//   const call = await phone.call('1002');
//   call.on('state', s => ...); call.hold(); call.dtmf('1'); call.hangup();

/** Minimal event emitter. */
class Emitter {
  constructor() { this._h = new Map(); }
  /** @param {string} ev @param {(arg: any) => void} fn */
  on(ev, fn) { (this._h.get(ev) || this._h.set(ev, []).get(ev)).push(fn); return this; }
  _emit(ev, arg) { for (const fn of this._h.get(ev) || []) { try { fn(arg); } catch (e) { console.error(e); } } }
}

/** A callgate error: `code` is stable (docs/API.md), `message` is for people. */
export class CallgateError extends Error {
  constructor(code, message) { super(message); this.code = code; }
}

/** Waits until ICE gathering is complete, so the offer carries its candidates. */
function gathered(pc) {
  if (pc.iceGatheringState === 'complete') return Promise.resolve();
  return new Promise(resolve => {
    const done = () => { if (pc.iceGatheringState === 'complete') { pc.removeEventListener('icegatheringstatechange', done); resolve(); } };
    pc.addEventListener('icegatheringstatechange', done);
    setTimeout(resolve, 3000); // whatever we have after 3 s
  });
}

/**
 * One call. Events: `state` ({state, sip, endReason}), `media` (the far end's audio track
 * arrived in `remoteStream`), `transfer` (a transfer this page asked
 * for), `referred` (the far end transfers this call: {state, to, sip}; on `succeeded` the call
 * goes on with the new party and `peer` changes), `dtmf`.
 */
export class Call extends Emitter {
  constructor(phone, callId, direction, peer) {
    super();
    this.phone = phone; this.id = callId; this.direction = direction; this.peer = peer;
    this.state = direction === 'inbound' ? 'ringing' : 'trying';
    this.pc = null;
    /** The far end's audio, ready for an <audio> element. */
    this.remoteStream = new MediaStream();
  }
  _closeMedia() {
    if (!this.pc) return;
    this.pc.getSenders().forEach(s => { if (s.track) s.track.stop(); });
    this.pc.close();
    this.pc = null;
  }
  async _media() {
    this._closeMedia();
    this.remoteStream.getTracks().forEach(t => this.remoteStream.removeTrack(t));
    const pc = new RTCPeerConnection({ bundlePolicy: 'max-bundle' });
    pc.ontrack = e => {
      (e.streams[0] ? e.streams[0].getTracks() : [e.track]).forEach(t => this.remoteStream.addTrack(t));
      // A script's addTrack fires no `addtrack` on the stream: say it, so that a media element
      // given the stream before its tracks came can load it again.
      this._emit('media', this.remoteStream);
    };
    const mic = await this.phone._microphone();
    // A track of its own per call, so muting one call leaves the others alone.
    mic.getAudioTracks().forEach(t => pc.addTrack(t.clone(), mic));
    await pc.setLocalDescription(await pc.createOffer());
    await gathered(pc);
    this.pc = pc;
    if (this.muted) this.mute(true);
    return pc.localDescription.sdp;
  }
  /** Answers an incoming call. */
  async answer() {
    const sdp = await this._media();
    const r = await this.phone._request({ type: 'answer', callId: this.id, sdp });
    await this.pc.setRemoteDescription({ type: 'answer', sdp: r.sdp });
  }
  /** Rejects an incoming call (486 Busy Here unless another code is given). */
  reject(code) { return this.phone._request({ type: 'reject', callId: this.id, ...(code ? { code } : {}) }); }
  hangup() { return this.phone._request({ type: 'hangup', callId: this.id }); }
  hold() { return this.phone._request({ type: 'hold', callId: this.id }); }
  /**
   * Mutes (or unmutes) this page's microphone for the call: the far end hears silence, the call
   * and its media stay up. Local only: callgate and the far end are not told.
   * @param {boolean} on
   */
  mute(on = true) {
    this.muted = on;
    if (this.pc) this.pc.getSenders().forEach(s => { if (s.track) s.track.enabled = !on; });
  }
  unhold() { return this.phone._request({ type: 'unhold', callId: this.id }); }
  /** @param {string} digits 0-9 * # A-D */
  dtmf(digits) { return this.phone._request({ type: 'dtmf', callId: this.id, digits }); }
  /** Blind transfer to `to`. */
  transfer(to) { return this.phone._request({ type: 'transfer', callId: this.id, to }); }
  /**
   * Consultation: holds this call and calls `to`. Then `completeTransfer(consult)` (attended
   * transfer), or hang the consultation up and `unhold()` this call.
   * @returns {Promise<Call>}
   */
  consult(to) { return this.phone._place({ type: 'consult', callId: this.id, to }); }
  /** Attended transfer: this call's far end takes over `consult`. */
  completeTransfer(consult) { return this.phone._request({ type: 'completeTransfer', callId: this.id, consultId: consult.id }); }
  _event(ev) {
    if (ev.type === 'call') {
      this.state = ev.state;
      if (ev.peer) this.peer = ev.peer;
      if (ev.state === 'ended') this._closeMedia();
      this._emit('state', ev);
    } else if (ev.type === 'transfer') { this._emit('transfer', ev); }
    else if (ev.type === 'referred') { this._emit('referred', ev); }
    else if (ev.type === 'dtmf') { this._emit('dtmf', ev.digit); }
  }
}

const sessionKey = url => 'callgate.session:' + url;

/**
 * A logged-in agent. Events: `registration`, `incoming` (a Call), `missed` ({callId, from}: the
 * caller gave up before the answer), `reconnecting` (the connection
 * dropped; calls stay up at callgate while the SDK resumes the session), `reconnected`, `close`
 * (the session is over).
 */
export class Callgate extends Emitter {
  /**
   * Opens the WebSocket and logs in.
   * @param {string} url e.g. `wss://callgate.example/ws`
   * @param {string} token `APP:HEX` minted by the CRM backend
   * @returns {Promise<Callgate>}
   */
  static async connect(url, token) {
    const phone = new Callgate(url);
    await phone._open();
    const connected = phone._awaitConnected();
    await phone._request({ type: 'connect', token });
    await connected; // `connected` (with the agent) follows the reply
    sessionStorage.setItem(sessionKey(url), phone.sessionId);
    return phone;
  }
  /**
   * Takes this tab's session back after a page reload, within callgate's `http.resume_secs`:
   * the registration and the calls (in `phone.calls`), their audio negotiated afresh. Rejects
   * with code `unknown_session` when there is nothing to resume: call `connect` then.
   * @param {string} url
   * @returns {Promise<Callgate>}
   */
  static async resume(url) {
    const id = sessionStorage.getItem(sessionKey(url));
    if (!id) throw new CallgateError('unknown_session', 'no session to resume in this tab');
    const phone = new Callgate(url);
    await phone._open();
    try { await phone._resume(id); } catch (e) { phone._closing = true; phone.ws.close(); throw e; }
    return phone;
  }
  _awaitConnected() { return new Promise(resolve => { this._onConnected = resolve; }); }
  async _resume(id) {
    const connected = this._awaitConnected();
    try {
      await this._request({ type: 'resume', sessionId: id });
    } catch (e) {
      if (e.code === 'unknown_session') sessionStorage.removeItem(sessionKey(this.url));
      throw e;
    }
    await connected;
    await this._request({ type: 'ping' }); // the session's calls are reported before this reply
    for (const call of [...this.calls.values()]) {
      if (call.direction === 'inbound' && call.state === 'ringing') continue;
      const sdp = await call._media();
      const r = await this._request({ type: 'media', callId: call.id, sdp });
      await call.pc.setRemoteDescription({ type: 'answer', sdp: r.sdp });
    }
  }
  async _reconnect() {
    this._reconnecting = true;
    this._emit('reconnecting');
    for (let i = 0; i < 8 && !this._closing; i++) {
      await new Promise(r => setTimeout(r, Math.min(500 * 2 ** i, 4000)));
      try {
        await this._open();
        await this._resume(this.sessionId);
        this._reconnecting = false;
        this._emit('reconnected');
        return;
      } catch (e) {
        if (e.code === 'unknown_session') break;
      }
    }
    this._reconnecting = false;
    this._emit('close');
  }
  constructor(url) {
    super();
    this.url = url; this._id = 0; this._pending = new Map(); this.calls = new Map(); this._mic = null;
    this.registration = { state: 'idle' }; this.states = []; this.state = null;
  }
  _open() {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(this.url);
      this.ws = ws;
      ws.onopen = () => { this._keepalive(); resolve(); };
      ws.onerror = () => reject(new CallgateError('connection_failed', 'cannot reach callgate'));
      ws.onclose = ev => {
        if (ws !== this.ws) return;
        clearInterval(this._alive);
        // 4000: logged out; 4001: another tab or connection took the session over (taking it
        // back would only start a tug of war).
        if (ev.code === 4000 || ev.code === 4001) this._closing = true;
        for (const [, p] of this._pending) p.reject(new CallgateError('connection_closed', 'connection to callgate closed'));
        this._pending.clear();
        if (this._reconnecting) return; // the retry loop goes on
        // A dropped connection: callgate keeps the session for a while; take it back.
        if (!this._closing && this.sessionId) this._reconnect(); else this._emit('close');
      };
      ws.onmessage = m => this._message(JSON.parse(m.data));
    });
  }
  // An application ping every 15 s; no reply within 10 s means the connection is dead (e.g. the
  // network changed) even if the browser has not noticed: close it, which starts a resume.
  _keepalive() {
    clearInterval(this._alive);
    this._alive = setInterval(() => {
      if (this.ws.readyState !== WebSocket.OPEN) return;
      const dead = setTimeout(() => this.ws.close(), 10000);
      this._request({ type: 'ping' }).then(() => clearTimeout(dead), () => clearTimeout(dead));
    }, 15000);
  }
  _request(msg) {
    const id = ++this._id;
    return new Promise((resolve, reject) => {
      this._pending.set(id, { resolve, reject });
      this.ws.send(JSON.stringify({ ...msg, id }));
    });
  }
  _message(m) {
    if (m.type === 'reply') {
      const p = this._pending.get(m.id);
      if (!p) return;
      this._pending.delete(m.id);
      m.ok ? p.resolve(m) : p.reject(new CallgateError(m.error.code, m.error.message));
    } else if (m.type === 'connected') {
      this.agent = m.agent; this.sessionId = m.sessionId; this.apiToken = m.apiToken;
      this.states = m.states || [];
      if (this._onConnected) this._onConnected();
    } else if (m.type === 'agentState') {
      this.state = m; this._emit('state', m);
    } else if (m.type === 'registration') {
      this.registration = m; this._emit('registration', m);
    } else if (m.type === 'missed') {
      this._emit('missed', m);
    } else if (m.type === 'incoming') {
      if (this.calls.has(m.callId)) return; // repeated on resume
      const call = new Call(this, m.callId, 'inbound', m.from);
      call.displayName = m.displayName;
      call.data = m.data || {};
      // The caller asked for auto-answer (a dialler's answer-after=0) and the app allows it.
      call.autoAnswer = !!m.autoAnswer;
      this.calls.set(m.callId, call);
      this._emit('incoming', call);
      if (call.autoAnswer) call.answer().catch(e => this._emit('error', e));
    } else if (m.type === 'dial') {
      // Click-to-call from the CRM backend: placed as the page's own call would be.
      const req = { type: 'call', to: m.to, requestId: m.requestId, ...(m.headers ? { headers: m.headers } : {}) };
      this._place(req).then(call => this._emit('outgoing', call), e => this._emit('error', e));
    } else if (m.type === 'call' && !this.calls.has(m.callId) && m.state !== 'ended') {
      // A call of a resumed session.
      const call = new Call(this, m.callId, m.direction, m.peer);
      call.state = m.state;
      this.calls.set(m.callId, call);
    } else if (m.callId && this.calls.has(m.callId)) {
      const call = this.calls.get(m.callId);
      call._event(m);
      if (m.type === 'call' && m.state === 'ended') this.calls.delete(m.callId);
    }
  }
  async _microphone() {
    if (!this._mic) this._mic = await navigator.mediaDevices.getUserMedia({ audio: true });
    return this._mic;
  }
  /**
   * Calls `to` (extension, number or SIP URI).
   * @returns {Promise<Call>}
   */
  call(to, headers) { return this._place(headers ? { type: 'call', to, headers } : { type: 'call', to }); }
  /** Asks for agent state `id` (one of `states`); during a call it is entered when the call ends. */
  setState(id) { return this._request({ type: 'setState', state: id }); }
  async _place(req) {
    const call = new Call(this, null, 'outbound', req.to);
    const sdp = await call._media();
    const r = await this._request({ ...req, sdp });
    call.id = r.callId;
    this.calls.set(r.callId, call);
    await call.pc.setRemoteDescription({ type: 'answer', sdp: r.sdp });
    return call;
  }
  /** Logs out: the session and its calls end now (a mere page close leaves them to resume). */
  async close() {
    this._closing = true;
    clearInterval(this._alive);
    sessionStorage.removeItem(sessionKey(this.url));
    try { await this._request({ type: 'logout' }); } catch (e) { /* already gone */ }
    this.ws.close();
    if (this._mic) this._mic.getTracks().forEach(t => t.stop());
  }
}

// For pages without modules (and for tests driving the page).
if (typeof window !== 'undefined') window.Callgate = Callgate;
