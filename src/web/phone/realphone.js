// bandsync on real phones (served as /phone.js, after the page's own script):
//  * the secure page: the plain HTTP page offers the HTTPS one, with its certificate's
//    fingerprint and the one-time "accept this certificate" step in plain words;
//  * the screen stays on: the screen wake lock (secure pages), taken again on the next
//    tap when the browser drops it, else a tiny muted looping video;
//  * sound on phones: the iOS silent-switch workaround (a silent looping <audio>
//    started in the same tap that starts the click);
//  * per-phone latency calibration: a slider and a tap-along test; the offset (ms,
//    kept in localStorage) makes the flash and the click come that much earlier;
//  * talkback: push-to-talk between the room's phones over WebRTC (peer to peer on the
//    LAN; the box only relays the signalling, see src/web/gateway/talkback.rs).
(function () {
  'use strict';
  const B = window.bandsync;
  if (!B) return;
  const $ = (id) => document.getElementById(id);
  const el = (tag, attrs, text) => {
    const e = document.createElement(tag);
    for (const k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  };

  // ---- the panel ----------------------------------------------------------------------
  const style = el('style');
  style.textContent = `
  #rp { padding: 10px 14px 18px; display: grid; gap: 10px; font-size: 15px; }
  #rp .card { background: rgba(127,127,127,.12); border-radius: 10px; padding: 10px 12px; }
  #rp h3 { margin: 0 0 6px; font-size: 15px; }
  #rp button { font-size: 15px; padding: 8px 12px; border-radius: 8px; }
  #rp .row { display: flex; gap: 8px; align-items: center; flex-wrap: wrap; }
  #rp .fp { font-family: monospace; font-size: 11px; word-break: break-all; }
  #rp #talkbtn { width: 100%; padding: 22px; font-size: 20px; touch-action: none; user-select: none; -webkit-user-select: none; }
  #rp #talkbtn.on { background: #c0392b; color: #fff; }
  #rp input[type=range] { flex: 1; min-width: 160px; }
  #rp .muted { opacity: .7; font-size: 13px; }`;
  document.head.appendChild(style);
  const panel = el('section', { id: 'rp' });
  panel.innerHTML = `
  <div class="card" id="securecard" hidden>
    <h3>Keep the screen on, talk to the band</h3>
    <p id="securetext"></p>
    <p class="row"><a id="securelink" href="#">open the secure page</a></p>
    <p class="fp" id="securefp"></p>
  </div>
  <div class="card">
    <h3>Your phone's delay</h3>
    <div class="row"><input id="offset" type="range" min="-200" max="500" step="1" aria-label="offset in ms"><span id="offsetshow"></span></div>
    <div class="row"><button id="tapstart" type="button">Tap along test</button><button id="tap" type="button" hidden>Tap with the box's click</button><span id="tapmsg" class="muted"></span></div>
  </div>
  <div class="card">
    <h3>Talkback</h3>
    <div class="row" id="talkjoinrow"><button id="talkjoin" type="button">Join talkback</button><span id="talkmsg" class="muted"></span></div>
    <div id="talkui" hidden>
      <div class="row"><label for="talkto">Talk to</label><select id="talkto"><option value="">everyone</option></select><button id="talkleave" type="button">Leave</button></div>
      <p><button id="talkbtn" type="button">Hold to talk</button></p>
      <p id="talkpeers" class="muted"></p>
    </div>
  </div>
  <p id="wakemsg" class="muted"></p>`;
  const anchor = $('controls');
  (anchor && anchor.parentNode ? anchor.parentNode : document.body).insertBefore(panel, anchor ? anchor.nextSibling : null);

  // ---- the secure page -------------------------------------------------------------------
  const H = { info: null };
  fetch('/https.json', { cache: 'no-store' }).then((r) => r.json()).then((j) => {
    H.info = j;
    if (location.protocol !== 'http:' || !j || !j.port) return;
    const url = 'https://' + location.hostname + ':' + j.port + '/';
    $('securecard').hidden = false;
    $('securelink').href = url;
    $('securelink').textContent = url;
    $('securetext').textContent = 'This plain page cannot keep your screen on or use the microphone. ' +
      'Open the secure page once: your phone will warn that the connection is "not private", because the box made its own certificate (there is no Internet here). ' +
      'Check that the fingerprint below matches what `bandsync status` shows, then tap "Advanced" / "Show details" and "Proceed" / "visit this website". You only do this once per phone.';
    $('securefp').textContent = 'SHA-256 ' + j.sha256;
  }).catch(() => {});

  // ---- the screen stays on ---------------------------------------------------------------
  const W = { sentinel: null, answer: null, fallback: null, video: null };
  async function keepAwake() {
    if ('wakeLock' in navigator && window.isSecureContext) {
      if (W.sentinel) return;
      try {
        W.sentinel = await navigator.wakeLock.request('screen');
        W.answer = 'granted';
        W.sentinel.addEventListener('release', () => { W.sentinel = null; W.answer = 'released'; paintWake(); });
      } catch (e) {
        W.answer = (e && e.name ? e.name + ': ' : '') + (e && e.message ? e.message : String(e));
      }
    } else {
      W.answer = window.isSecureContext ? 'no wake lock in this browser' : 'not a secure page';
      videoFallback();
    }
    paintWake();
  }
  // A muted, looping video of a canvas keeps many phones' screens on where there is no
  // wake lock (plain HTTP, older iOS).
  function videoFallback() {
    if (W.video) { W.video.play().catch(() => {}); return; }
    try {
      const c = el('canvas', { width: '2', height: '2' });
      const g = c.getContext('2d');
      let k = 0;
      const paint = () => { g.fillStyle = (k++ & 1) ? '#000' : '#010101'; g.fillRect(0, 0, 2, 2); };
      paint();
      setInterval(paint, 1000);
      if (!c.captureStream) return;
      const v = el('video', { playsinline: '', muted: '', loop: '', 'aria-hidden': 'true' });
      v.muted = true; v.loop = true; v.playsInline = true;
      v.style.cssText = 'position:fixed;width:1px;height:1px;opacity:0.01;pointer-events:none;bottom:0;left:0';
      v.srcObject = c.captureStream(1);
      document.body.appendChild(v);
      W.video = v;
      v.play().then(() => { W.fallback = 'video'; paintWake(); }).catch((e) => { W.fallback = 'video refused: ' + e.name; paintWake(); });
    } catch (e) { W.fallback = 'none: ' + e; }
  }
  function paintWake() {
    const t = W.sentinel ? 'Screen stays on (wake lock).' :
      W.fallback === 'video' ? 'Screen kept on by a silent video (plain page).' :
      W.answer ? 'Screen may sleep: ' + W.answer + '.' : '';
    $('wakemsg').textContent = t;
  }
  // taken on a tap (browsers want a gesture), and again on the next tap after a drop
  document.addEventListener('pointerdown', () => { if (!W.sentinel) keepAwake(); }, true);
  document.addEventListener('visibilitychange', () => {
    if (document.visibilityState === 'visible' && W.answer === 'released') keepAwake();
  });

  // ---- sound on phones: the iOS silent switch --------------------------------------------
  // iOS plays WebAudio on the ringer channel (muted by the silent switch) unless an
  // HTML media element plays: a silent looping <audio>, started in the same tap.
  const snd = { el: null };
  function silentWav() {
    const n = 4800, b = new ArrayBuffer(44 + n * 2), d = new DataView(b);
    const w = (o, s) => { for (let i = 0; i < s.length; i++) d.setUint8(o + i, s.charCodeAt(i)); };
    w(0, 'RIFF'); d.setUint32(4, 36 + n * 2, true); w(8, 'WAVE'); w(12, 'fmt ');
    d.setUint32(16, 16, true); d.setUint16(20, 1, true); d.setUint16(22, 1, true);
    d.setUint32(24, 48000, true); d.setUint32(28, 96000, true); d.setUint16(32, 2, true);
    d.setUint16(34, 16, true); w(36, 'data'); d.setUint32(40, n * 2, true);
    return URL.createObjectURL(new Blob([b], { type: 'audio/wav' }));
  }
  const soundBtn = $('sound');
  if (soundBtn) soundBtn.addEventListener('click', () => {
    if (!snd.el) {
      snd.el = el('audio', { loop: '', playsinline: '' });
      snd.el.loop = true;
      snd.el.src = silentWav();
      document.body.appendChild(snd.el);
    }
    snd.el.play().catch(() => {});
  });

  // ---- latency calibration ------------------------------------------------------------------
  // offset_ms: how late this phone is, as its musician hears and sees it. The flash and
  // the click come that much earlier; predictedBeats' local_ms move by exactly it.
  const CAL_KEY = 'bandsync.offset_ms';
  const C = { ms: clampOffset(parseFloat(localStorage.getItem(CAL_KEY) || '0')), taps: null };
  function clampOffset(x) { return Number.isFinite(x) ? Math.max(-200, Math.min(500, Math.round(x))) : 0; }
  function setOffset(ms) {
    C.ms = clampOffset(ms);
    try { localStorage.setItem(CAL_KEY, String(C.ms)); } catch (e) {}
    $('offset').value = String(C.ms);
    $('offsetshow').textContent = 'your offset: ' + (C.ms >= 0 ? '+' : '') + C.ms + ' ms' + (C.ms > 120 ? ' (Bluetooth?)' : '');
  }
  window.bandsyncCal = { leadUs: () => C.ms * 1000, offsetMs: () => C.ms };
  $('offset').addEventListener('input', (e) => setOffset(parseFloat(e.target.value)));
  setOffset(C.ms);
  // tap − nearest beat, on the room's grid (the page's own prediction, without offset)
  function tapError(sessionUs) {
    const m = B._math;
    if (!m || !B.segments().length) return null;
    const n = m.firstBeatAtOrAfter(sessionUs);
    const a = m.beatTime(n), b = m.beatTime(n - 1);
    const near = Math.abs(a - sessionUs) < Math.abs(b - sessionUs) ? a : b;
    return (sessionUs - near) / 1000;
  }
  function median(v) { const s = v.slice().sort((x, y) => x - y); const k = s.length >> 1; return s.length & 1 ? s[k] : (s[k - 1] + s[k]) / 2; }
  const TAPS = 12;
  $('tapstart').addEventListener('click', () => {
    const p = B.predictedBeats(2);
    if (!p.playing) { $('tapmsg').textContent = 'Start the click first (the box must be playing).'; return; }
    C.taps = [];
    $('tap').hidden = false;
    $('tapmsg').textContent = 'Tap the big button with the box\'s click, ' + TAPS + ' times.';
  });
  $('tap').addEventListener('pointerdown', (e) => {
    if (!C.taps) return;
    e.preventDefault();
    const now = B.sessionNowUs();
    if (now === null) return;
    const t = now - (performance.now() - e.timeStamp) * 1000;
    const err = tapError(t);
    if (err === null) return;
    C.taps.push(err);
    $('tapmsg').textContent = C.taps.length + ' / ' + TAPS;
    if (C.taps.length >= TAPS) {
      const prop = median(C.taps);
      C.taps = null;
      $('tap').hidden = true;
      setOffset(prop);
      $('tapmsg').textContent = 'Proposed and set: ' + Math.round(prop) + ' ms (move the slider to adjust).';
    }
  });

  // ---- talkback ---------------------------------------------------------------------------------
  // Every member calls every other (full mesh, at most 16); the lower id makes the offer.
  // The microphone is taken once, on joining; holding the button puts its track on the
  // chosen calls (replaceTrack: no renegotiation), releasing takes it off (nothing sent).
  const T = {
    me: null, peers: [], pcs: new Map(), mic: null, talking: false, to: '',
    joined: false, wanted: false, name: '', lastPress: null, firstAudioAt: null,
    onlyCandidates: null, // tests: a RegExp the signalled candidates must match
    log: [],
  };
  function tlog(s) { T.log.push(Math.round(performance.now()) + ' ' + s); if (T.log.length > 200) T.log.shift(); }
  // Signalling is paced under the box's cap (20 a second, burst 30): at most 10 a
  // second after a burst of 20; the rest waits in order.
  const Q = { q: [], tokens: 20, at: performance.now(), timer: 0 };
  function sendRtc(m) {
    if (Q.q.length >= 400) return;
    Q.q.push(m);
    drainRtc();
  }
  function drainRtc() {
    const now = performance.now();
    Q.tokens = Math.min(20, Q.tokens + (now - Q.at) * 0.01);
    Q.at = now;
    while (Q.q.length && Q.tokens >= 1) { Q.tokens -= 1; B.send(Q.q.shift()); }
    if (Q.q.length && !Q.timer) Q.timer = setTimeout(() => { Q.timer = 0; drainRtc(); }, 100);
  }
  // the page's own socket: talkback messages come through the page's WebSocket, which
  // this file reads by wrapping the socket's message handler (see hookSocket)
  function onRtc(m) {
    switch (m.type) {
      case 'rtc_peers': onPeers(m); break;
      case 'rtc_offer': onOffer(m); break;
      case 'rtc_answer': onAnswer(m); break;
      case 'rtc_ice': onIce(m); break;
      case 'rtc_leave': hangUp(m.from, 'left'); break;
      case 'error':
        if (m.request && String(m.request).startsWith('rtc_')) {
          $('talkmsg').textContent = m.reason || m.code;
          if (m.request === 'rtc_join') {
            T.wanted = false; T.joined = false; paintTalk();
            // the page asks for the PIN (its own dialog); join once it is given
            if (m.code === 'pin_required' || m.code === 'bad_pin') T.afterPin = true;
          }
        }
        break;
    }
  }
  function onPeers(m) {
    T.me = m.you || T.me;
    T.joined = true;
    T.peers = (m.peers || []).filter((p) => p.id !== T.me);
    for (const id of Array.from(T.pcs.keys())) if (!T.peers.some((p) => p.id === id)) hangUp(id, 'gone');
    for (const p of T.peers) if (!T.pcs.has(p.id) && T.me < p.id) call(p.id);
    paintTalk();
  }
  // The caller adds the audio transceiver; the answerer uses the one the offer made.
  function useSender(e, id, tr) {
    tr.direction = 'sendrecv';
    e.sender = tr.sender;
    if (T.talking && (T.to === '' || T.to === id) && T.mic) e.sender.replaceTrack(T.mic.getAudioTracks()[0]);
  }
  function newPc(id, caller) {
    const pc = new RTCPeerConnection({ iceServers: [] }); // host candidates only: the LAN
    const e = { pc, sender: null, pending: [], remote: false, connectedAt: null };
    T.pcs.set(id, e);
    if (caller) useSender(e, id, pc.addTransceiver('audio', { direction: 'sendrecv' }));
    pc.onicecandidate = (ev) => {
      if (!ev.candidate) return;
      if (T.onlyCandidates && !T.onlyCandidates.test(ev.candidate.candidate)) return;
      sendRtc({ type: 'rtc_ice', to: id, candidate: ev.candidate.toJSON() });
    };
    pc.ontrack = (ev) => {
      const a = el('audio', { autoplay: '' });
      a.autoplay = true;
      a.srcObject = ev.streams[0] || new MediaStream([ev.track]);
      a.dataset.peer = id;
      document.body.appendChild(a);
      e.audio = a;
      a.play().catch(() => {});
    };
    pc.onconnectionstatechange = () => {
      tlog(id + ' ' + pc.connectionState);
      if (pc.connectionState === 'connected' && !e.connectedAt) e.connectedAt = performance.now();
      if (pc.connectionState === 'failed' || pc.connectionState === 'closed') hangUp(id, pc.connectionState);
      paintTalk();
    };
    return e;
  }
  async function call(id) {
    const e = newPc(id, true);
    try {
      const o = await e.pc.createOffer();
      await e.pc.setLocalDescription(o);
      sendRtc({ type: 'rtc_offer', to: id, sdp: e.pc.localDescription.sdp });
      tlog('offer to ' + id);
    } catch (err) { tlog('offer failed ' + err); hangUp(id, 'offer failed'); }
  }
  async function onOffer(m) {
    if (!T.joined) return;
    if (T.pcs.has(m.from)) hangUp(m.from, 'renegotiated', true);
    const e = newPc(m.from, false);
    try {
      await e.pc.setRemoteDescription({ type: 'offer', sdp: m.sdp });
      e.remote = true;
      const tr = e.pc.getTransceivers().find((t) => t.receiver.track && t.receiver.track.kind === 'audio');
      if (!tr) throw new Error('the offer has no audio');
      useSender(e, m.from, tr);
      for (const c of e.pending.splice(0)) await e.pc.addIceCandidate(c).catch(() => {});
      const a = await e.pc.createAnswer();
      await e.pc.setLocalDescription(a);
      sendRtc({ type: 'rtc_answer', to: m.from, sdp: e.pc.localDescription.sdp });
    } catch (err) { tlog('answer failed ' + err); hangUp(m.from, 'answer failed'); }
  }
  async function onAnswer(m) {
    const e = T.pcs.get(m.from);
    if (!e) return;
    try {
      await e.pc.setRemoteDescription({ type: 'answer', sdp: m.sdp });
      e.remote = true;
      for (const c of e.pending.splice(0)) await e.pc.addIceCandidate(c).catch(() => {});
    } catch (err) { tlog('bad answer ' + err); }
  }
  function onIce(m) {
    const e = T.pcs.get(m.from);
    if (!e || !m.candidate) return;
    if (!e.remote) { e.pending.push(m.candidate); return; }
    e.pc.addIceCandidate(m.candidate).catch(() => {});
  }
  function hangUp(id, why, quiet) {
    const e = T.pcs.get(id);
    if (!e) return;
    T.pcs.delete(id);
    try { e.pc.close(); } catch (x) {}
    if (e.audio) e.audio.remove();
    tlog('hung up ' + id + ' (' + why + ')');
    if (!quiet) paintTalk();
  }
  async function join() {
    T.wanted = true;
    T.name = T.name || localStorage.getItem('bandsync.name') || ('phone ' + Math.floor(Math.random() * 90 + 10));
    if (!T.mic) {
      try {
        T.mic = await navigator.mediaDevices.getUserMedia({ audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true } });
      } catch (e) {
        $('talkmsg').textContent = window.isSecureContext ? 'No microphone: ' + e.name : 'The microphone needs the secure page (see above).';
        T.wanted = false;
        return false;
      }
    }
    const m = { type: 'rtc_join', name: T.name };
    const pin = sessionStorage.getItem('bandsync.pin');
    if (pin) m.pin = pin;
    sendRtc(m);
    return true;
  }
  function leave() {
    T.wanted = false;
    sendRtc({ type: 'rtc_leave' });
    endAll('left');
  }
  function endAll(why) {
    for (const id of Array.from(T.pcs.keys())) hangUp(id, why, true);
    T.joined = false; T.me = null; T.peers = [];
    release();
    paintTalk();
  }
  function press() {
    if (!T.mic || T.talking) return;
    T.talking = true;
    T.lastPress = performance.timeOrigin + performance.now();
    const track = T.mic.getAudioTracks()[0];
    for (const [id, e] of T.pcs) if (e.sender && (T.to === '' || T.to === id)) e.sender.replaceTrack(track);
    $('talkbtn').classList.add('on');
    $('talkbtn').textContent = T.to ? 'Talking to ' + nameOf(T.to) : 'Talking to everyone';
  }
  function release() {
    if (!T.talking) return;
    T.talking = false;
    for (const e of T.pcs.values()) if (e.sender) e.sender.replaceTrack(null);
    $('talkbtn').classList.remove('on');
    $('talkbtn').textContent = 'Hold to talk';
  }
  function nameOf(id) { const p = T.peers.find((x) => x.id === id); return p ? p.name : id; }
  function paintTalk() {
    $('talkui').hidden = !T.joined;
    $('talkjoin').hidden = T.joined;
    const sel = $('talkto');
    const want = [''].concat(T.peers.map((p) => p.id)).join('|');
    if (sel.dataset.ids !== want) {
      sel.innerHTML = '<option value="">everyone</option>';
      for (const p of T.peers) sel.appendChild(el('option', { value: p.id }, p.name));
      sel.dataset.ids = want;
      if (!T.peers.some((p) => p.id === T.to)) T.to = '';
      sel.value = T.to;
    }
    const up = Array.from(T.pcs.values()).filter((e) => e.pc.connectionState === 'connected').length;
    $('talkpeers').textContent = T.joined ? (T.peers.length ? T.peers.map((p) => p.name).join(', ') + ' — ' + up + ' connected' : 'nobody else yet') : '';
    if (T.joined) $('talkmsg').textContent = '';
  }
  $('talkjoin').addEventListener('click', () => { join(); });
  const pinForm = $('pinform');
  if (pinForm) pinForm.addEventListener('submit', () => { if (T.afterPin) { T.afterPin = false; setTimeout(join, 0); } });
  $('talkleave').addEventListener('click', leave);
  $('talkto').addEventListener('change', (e) => { T.to = e.target.value; if (T.talking) { release(); } });
  const tb = $('talkbtn');
  tb.addEventListener('pointerdown', (e) => { e.preventDefault(); try { tb.setPointerCapture(e.pointerId); } catch (x) {} press(); });
  for (const ev of ['pointerup', 'pointercancel', 'lostpointercapture']) tb.addEventListener(ev, release);
  window.addEventListener('pagehide', () => { if (T.joined) sendRtc({ type: 'rtc_leave' }); });

  // Read the page's WebSocket: wrap WebSocket so every socket the page opens reports
  // talkback messages here too, and rejoin after a reconnect.
  (function hookSocket() {
    const Orig = window.WebSocket;
    const seen = new WeakSet();
    function watch(ws) {
      if (seen.has(ws)) return;
      seen.add(ws);
      ws.addEventListener('message', (ev) => {
        if (typeof ev.data !== 'string' || ev.data.indexOf('"rtc_') < 0 && ev.data.indexOf('"error"') < 0) return;
        let m; try { m = JSON.parse(ev.data); } catch (e) { return; }
        if (m && (String(m.type).startsWith('rtc_') || m.type === 'error')) onRtc(m);
      });
      ws.addEventListener('close', () => { if (T.joined) endAll('the box connection closed'); });
      ws.addEventListener('open', () => { if (T.wanted && !T.joined) setTimeout(join, 200); });
    }
    const cur = B._socket && B._socket();
    if (cur) watch(cur);
    window.WebSocket = function (url, protocols) {
      const ws = protocols === undefined ? new Orig(url) : new Orig(url, protocols);
      watch(ws);
      return ws;
    };
    window.WebSocket.prototype = Orig.prototype;
    for (const k of ['CONNECTING', 'OPEN', 'CLOSING', 'CLOSED']) window.WebSocket[k] = Orig[k];
  })();

  // ---- for tests and tools ------------------------------------------------------------------
  window.bandsyncPhone = {
    wake: () => ({ has_wake_lock: 'wakeLock' in navigator, secure: window.isSecureContext, held: !!W.sentinel, answer: W.answer, fallback: W.fallback }),
    keepAwake: () => keepAwake().then(() => window.bandsyncPhone.wake()),
    dropWake: () => (W.sentinel ? W.sentinel.release().then(() => window.bandsyncPhone.wake()) : Promise.resolve(window.bandsyncPhone.wake())),
    https: () => H.info,
    offsetMs: () => C.ms,
    setOffset: (ms) => { setOffset(ms); return C.ms; },
    tapError,
    talk: {
      join: (name, pin) => { if (name) T.name = String(name); if (pin) sessionStorage.setItem('bandsync.pin', String(pin)); return join(); },
      leave,
      press: (to) => { T.to = to || ''; press(); return T.lastPress; },
      release,
      only: (re) => { T.onlyCandidates = re ? new RegExp(re) : null; },
      state: () => ({ me: T.me, joined: T.joined, talking: T.talking, peers: T.peers.slice(),
        calls: Array.from(T.pcs.entries()).map(([id, e]) => ({ id, state: e.pc.connectionState })), log: T.log.slice(-20) }),
      // inbound audio per call: bytes, packets, level
      stats: async () => {
        const out = [];
        for (const [id, e] of T.pcs) {
          const r = { id, bytes: 0, packets: 0, level: 0, energy: 0, sent: 0, track: e.sender && e.sender.track ? e.sender.track.readyState : null, state: e.pc.connectionState };
          const s = await e.pc.getStats();
          s.forEach((x) => {
            if (x.type === 'inbound-rtp' && (x.kind === 'audio' || x.mediaType === 'audio')) {
              r.bytes += x.bytesReceived || 0; r.packets += x.packetsReceived || 0;
              r.level = Math.max(r.level, x.audioLevel || 0); r.energy += x.totalAudioEnergy || 0;
            }
            if (x.type === 'outbound-rtp' && (x.kind === 'audio' || x.mediaType === 'audio')) r.sent += x.bytesSent || 0;
          });
          out.push(r);
        }
        return out;
      },
    },
  };
  if (window.isSecureContext) paintWake();
})();
