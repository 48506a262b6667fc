// Starling operator's dashboard. Vanilla JavaScript, no library: it polls the control
// plane's dashboard API (GET api/broadcasts every second, api/broadcasts/ID/audience
// every 10 s), keeps a bounded client-side series per broadcast, and draws SVG charts.
//
// Credential: the admin key or an admin JWT, sent as `Authorization: Bearer ...`. It is
// taken from the URL fragment (#key=..., removed from the address bar at once) or the
// sign-in form, and kept in sessionStorage (this tab only).
//
// Errors (window errors, unhandled rejections, console.error, CSP violations) are
// recorded in <pre id="errors" data-count="N">, which the headless-browser test reads.
'use strict';

(function () {
  const POLL_MS = 1000;
  const AUDIENCE_EVERY_MS = 10000;
  const AUDIENCE_SPAN_MS = 3600 * 1000;
  const MAX_SAMPLES = 600; // 10 minutes at one poll a second
  const LIVE_SPAN_MS = 5 * 60 * 1000;
  const KEY_STORE = 'starling.dashboard.key';
  const SVG_NS = 'http://www.w3.org/2000/svg';

  // ------------------------------------------------------------------ error capture
  const errorsEl = document.getElementById('errors');
  function recordError(msg) {
    if (!errorsEl) return;
    errorsEl.hidden = false;
    errorsEl.textContent += msg + '\n';
    errorsEl.dataset.count = String(Number(errorsEl.dataset.count || '0') + 1);
  }
  window.addEventListener('error', (e) => {
    if (e instanceof ErrorEvent) {
      recordError('error: ' + e.message + (e.filename ? ' (' + e.filename + ':' + e.lineno + ')' : ''));
    } else {
      const t = e.target;
      recordError('failed to load ' + ((t && (t.src || t.href)) || 'a resource'));
    }
  }, true);
  window.addEventListener('unhandledrejection', (e) => {
    recordError('unhandled rejection: ' + String(e.reason && e.reason.stack ? e.reason.stack : e.reason));
  });
  document.addEventListener('securitypolicyviolation', (e) => {
    recordError('CSP violation: ' + e.violatedDirective + ' ' + e.blockedURI);
  });
  const consoleError = console.error.bind(console);
  console.error = function (...args) {
    recordError('console.error: ' + args.map(String).join(' '));
    consoleError(...args);
  };

  // ------------------------------------------------------------------ state
  const $ = (id) => document.getElementById(id);
  const state = {
    key: null,
    selected: null,
    showStopped: false,
    timer: null,
    polls: 0,
    broadcasts: [],
    nowMs: 0,
    samples: new Map(), // id -> [{t, ...figures}]
    audience: new Map(), // id -> {at, step_s, points}
    audienceBusy: false,
  };

  class AuthError extends Error {}
  // The control plane could not be reached or answered an error (not a bug of the page).
  class HttpError extends Error {}

  // ------------------------------------------------------------------ credential
  function readFragment() {
    const h = location.hash.replace(/^#/, '');
    if (!h) return;
    const keep = [];
    for (const part of h.split('&')) {
      const i = part.indexOf('=');
      const k = i < 0 ? part : part.slice(0, i);
      let v = i < 0 ? '' : part.slice(i + 1);
      try { v = decodeURIComponent(v); } catch (_) { /* keep it raw */ }
      if (k === 'key') {
        if (v.trim()) sessionStorage.setItem(KEY_STORE, v.trim());
      } else {
        if (k === 'b' && v) state.selected = v;
        keep.push(part);
      }
    }
    history.replaceState(null, '', location.pathname + location.search +
      (keep.length ? '#' + keep.join('&') : ''));
  }

  function showLogin(message) {
    state.key = null;
    sessionStorage.removeItem(KEY_STORE);
    clearTimeout(state.timer);
    $('main').hidden = true;
    $('logout').hidden = true;
    $('login').hidden = false;
    $('login-error').textContent = message || '';
    setStatus('auth', message ? 'not signed in' : 'sign in');
    $('key').focus();
  }

  function signIn(key) {
    state.key = key;
    $('login').hidden = true;
    $('main').hidden = false;
    $('logout').hidden = false;
    clearTimeout(state.timer);
    poll();
  }

  // ------------------------------------------------------------------ API
  async function api(path) {
    let r;
    try {
      r = await fetch(path, {
        headers: { Authorization: 'Bearer ' + state.key },
        cache: 'no-store',
      });
    } catch (e) {
      throw new HttpError(String(e.message || e));
    }
    let body = null;
    try { body = await r.json(); } catch (_) { body = null; }
    if (r.status === 401 || r.status === 403) {
      throw new AuthError((body && body.error) || ('HTTP ' + r.status));
    }
    if (!r.ok) throw new HttpError((body && body.error) || ('HTTP ' + r.status));
    return body;
  }

  async function poll() {
    try {
      const q = state.showStopped ? '?include_stopped=1' : '';
      const data = await api('api/broadcasts' + q);
      state.polls += 1;
      accept(data);
      render();
      setStatus('ok', 'live · ' + state.broadcasts.length + ' broadcast' +
        (state.broadcasts.length === 1 ? '' : 's'));
      const a = state.selected && state.audience.get(state.selected);
      if (state.selected && (!a || state.nowMs - a.at >= AUDIENCE_EVERY_MS)) {
        await pollAudience(state.selected);
      }
      document.body.dataset.ready = '1';
    } catch (e) {
      if (e instanceof AuthError) {
        showLogin('Refused: ' + e.message);
        return;
      }
      if (e instanceof HttpError) {
        setStatus('error', 'control plane: ' + e.message);
      } else {
        recordError('poll: ' + (e && e.stack ? e.stack : String(e)));
        setStatus('error', 'page error: ' + e);
      }
    }
    state.timer = setTimeout(poll, POLL_MS);
  }

  async function pollAudience(id) {
    if (state.audienceBusy) return;
    state.audienceBusy = true;
    try {
      // The last hour, or since the broadcast was created.
      const b = state.broadcasts.find((x) => x.id === id);
      const since = Math.max(state.nowMs - AUDIENCE_SPAN_MS, b ? b.created_at_unix_ms : 0);
      const from = Math.floor(since / 60000) * 60000;
      const data = await api('api/broadcasts/' + encodeURIComponent(id) +
        '/audience?step_s=60&from_ms=' + Math.max(from, 1));
      state.audience.set(id, { at: state.nowMs, step_s: data.step_s, points: data.points });
      renderDetail();
    } catch (e) {
      if (!(e instanceof HttpError)) throw e;
      state.audience.set(id, { at: state.nowMs, step_s: 60, points: [], error: e.message });
    } finally {
      state.audienceBusy = false;
    }
  }

  function accept(data) {
    state.nowMs = data.now_unix_ms;
    state.broadcasts = data.broadcasts;
    const t = Date.now();
    const ids = new Set();
    for (const b of data.broadcasts) {
      ids.add(b.id);
      let s = state.samples.get(b.id);
      if (!s) { s = []; state.samples.set(b.id, s); }
      s.push({
        t,
        peers: b.peers,
        viewers_now: b.viewers_now,
        peer_share: b.peer_share,
        peer_share_last_minute: b.peer_share_last_minute,
        booster_kbps: b.booster_kbps,
        fluid_bound_kbps: b.fluid_bound_kbps,
        stream_kbps: b.stream_kbps,
        max_depth: b.max_depth,
      });
      if (s.length > MAX_SAMPLES) s.splice(0, s.length - MAX_SAMPLES);
    }
    for (const id of [...state.samples.keys()]) {
      if (!ids.has(id)) { state.samples.delete(id); state.audience.delete(id); }
    }
    if (!state.selected || !ids.has(state.selected)) {
      const live = data.broadcasts.find((b) => b.state === 'live');
      state.selected = live ? live.id : (data.broadcasts[0] ? data.broadcasts[0].id : null);
    }
  }

  // ------------------------------------------------------------------ formatting
  const pct = (x) => (x * 100).toFixed(1) + ' %';
  const int = (x) => Math.round(x).toLocaleString('en-US');
  function kbps(x) {
    if (x >= 10000) return (x / 1000).toFixed(1) + ' Mbit/s';
    return int(x) + ' kbit/s';
  }
  function mb(x) { return x >= 1e9 ? (x / 1e9).toFixed(2) + ' GB' : (x / 1e6).toFixed(1) + ' MB'; }
  function ms(x) { return x >= 10000 ? (x / 1000).toFixed(1) + ' s' : int(x) + ' ms'; }
  function clock(t, seconds) {
    const d = new Date(t);
    const p = (n) => String(n).padStart(2, '0');
    return p(d.getHours()) + ':' + p(d.getMinutes()) + (seconds ? ':' + p(d.getSeconds()) : '');
  }

  function setStatus(kind, text) {
    const s = $('status');
    s.dataset.state = kind;
    s.dataset.polls = String(state.polls);
    s.textContent = text;
    if (kind === 'ok') $('updated').textContent = 'updated ' + clock(Date.now(), true);
  }

  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  // ------------------------------------------------------------------ table
  function render() {
    const rows = $('broadcast-rows');
    rows.replaceChildren();
    $('no-broadcasts').hidden = state.broadcasts.length > 0;
    for (const b of state.broadcasts) {
      const tr = el('tr', { 'data-id': b.id });
      if (b.id === state.selected) tr.className = 'selected';
      const name = el('td', { 'data-field': 'name' }, b.name || '(unnamed)');
      name.appendChild(el('span', { class: 'sub' }, b.id));
      tr.appendChild(name);
      tr.appendChild(el('td', { 'data-field': 'state', class: 'state-' + b.state }, b.state));
      tr.appendChild(el('td', {
        'data-field': 'source_health',
        class: 'health-' + b.source_health,
        title: b.source_error || '',
      }, b.source_health));
      tr.appendChild(el('td', { 'data-field': 'peers' }, int(b.peers)));
      tr.appendChild(el('td', { 'data-field': 'viewers_now' }, int(b.viewers_now)));
      tr.appendChild(el('td', { 'data-field': 'peer_share' }, pct(b.peer_share)));
      tr.appendChild(el('td', { 'data-field': 'booster_kbps' }, kbps(b.booster_kbps)));
      tr.appendChild(el('td', { 'data-field': 'fluid_bound_kbps' }, kbps(b.fluid_bound_kbps)));
      tr.appendChild(el('td', { 'data-field': 'max_depth' }, int(b.max_depth)));
      tr.addEventListener('click', () => select(b.id));
      rows.appendChild(tr);
    }
    renderDetail();
  }

  function select(id) {
    state.selected = id;
    history.replaceState(null, '', location.pathname + location.search + '#b=' + encodeURIComponent(id));
    render();
    if (!state.audience.has(id)) {
      pollAudience(id).catch((e) => {
        if (e instanceof AuthError) showLogin('Refused: ' + e.message);
        else recordError('audience: ' + (e && e.stack ? e.stack : String(e)));
      });
    }
  }

  // ------------------------------------------------------------------ detail
  function figure(dl, field, label, value, title) {
    const d = el('div', { title: title || '' });
    d.appendChild(el('dt', {}, label));
    d.appendChild(el('dd', { 'data-field': field }, value));
    dl.appendChild(d);
  }

  function renderDetail() {
    const b = state.broadcasts.find((x) => x.id === state.selected);
    $('detail').hidden = !b;
    if (!b) return;
    $('detail').dataset.id = b.id;
    $('detail-name').textContent = b.name || '(unnamed)';
    $('detail-id').textContent = b.id;
    const dl = $('figures');
    dl.replaceChildren();
    const ratio = b.fluid_bound_kbps > 0 ? (b.booster_kbps / b.fluid_bound_kbps).toFixed(2) + ' x' : '-';
    figure(dl, 'peers', 'peers', int(b.peers), 'SDK sessions in the peer grid');
    figure(dl, 'viewers_now', 'data-plane viewers', int(b.viewers_now), 'connections the data plane reports');
    figure(dl, 'peer_share', 'peer share', pct(b.peer_share), 'bytes from peers / all bytes delivered, since the start');
    figure(dl, 'peer_share_last_minute', 'peer share, last minute', pct(b.peer_share_last_minute), 'from viewer reports');
    figure(dl, 'booster_kbps', 'server egress', kbps(b.booster_kbps), 'booster slots x stream rate / K');
    figure(dl, 'fluid_bound_kbps', 'fluid bound', kbps(b.fluid_bound_kbps), 'max(r, n r - total peer upload)');
    figure(dl, 'egress_over_bound', 'egress / bound', ratio, '1.00 x is the least any schedule could send');
    figure(dl, 'stream_kbps', 'stream rate', kbps(b.stream_kbps), 'as measured by the ingesting node');
    figure(dl, 'max_depth', 'tree depth', int(b.max_depth), 'hops from the data plane');
    figure(dl, 'slots', 'slots: demand / peer supply / booster',
      int(b.demand_slots) + ' / ' + int(b.peer_supply_slots) + ' / ' + int(b.booster_slots),
      'substream subscriptions: needed (peers x K), offered by peers, fed by the data plane');
    figure(dl, 'source_health', 'source', b.source_health + (b.source_error ? ': ' + b.source_error : ''), b.content_type);
    figure(dl, 'substreams', 'substreams K / chunk', b.substreams + ' / ' + b.chunk_duration_ms + ' ms', 'last chunk ' + b.last_seq);

    const s = state.samples.get(b.id) || [];
    const pts = (k) => s.map((x) => [x.t, x[k]]);
    const last = s.length ? s[s.length - 1].t : Date.now();
    const first = s.length ? s[0].t : last;
    // The window grows with the series, from 30 s to 5 minutes.
    const live = {
      xSpan: Math.min(LIVE_SPAN_MS, Math.max(30000, last - first)),
      xMax: last,
      xFmt: (t) => clock(t, true),
    };
    drawChart($('chart-viewers'), Object.assign({}, live, {
      fmt: int,
      series: [
        { key: 'peers', name: 'peers', points: pts('peers') },
        { key: 'viewers_now', name: 'data-plane viewers', points: pts('viewers_now'), dashed: true },
      ],
    }));
    drawChart($('chart-peer-share'), Object.assign({}, live, {
      fmt: pct, yMax: 1, fixedMax: true,
      series: [
        { key: 'peer_share', name: 'since start', points: pts('peer_share') },
        { key: 'peer_share_last_minute', name: 'last minute', points: pts('peer_share_last_minute'), dashed: true },
      ],
    }));
    drawChart($('chart-egress'), Object.assign({}, live, {
      fmt: kbps,
      note: 'egress / bound ' + ratio,
      series: [
        { key: 'booster_kbps', name: 'server egress', points: pts('booster_kbps') },
        { key: 'fluid_bound_kbps', name: 'fluid bound', points: pts('fluid_bound_kbps'), dashed: true },
        { key: 'stream_kbps', name: 'stream rate', points: pts('stream_kbps'), dashed: true },
      ],
    }));
    drawChart($('chart-depth'), Object.assign({}, live, {
      fmt: int, integer: true, yMax: 2, stepped: true,
      series: [{ key: 'max_depth', name: 'deepest tree', points: pts('max_depth') }],
    }));

    const a = state.audience.get(b.id);
    const ap = a ? a.points : [];
    const step = a ? a.step_s : 60;
    const at = (k, f) => ap.map((p) => [p.start_unix_ms, f ? f(p) : p[k]]);
    const aMax = Math.max(state.nowMs, ap.length ? ap[ap.length - 1].start_unix_ms : 0);
    const aMin = ap.length ? ap[0].start_unix_ms : aMax;
    const perMin = {
      xFmt: (t) => clock(t, false),
      xMax: aMax,
      // From the first minute shown (at most an hour ago), at least 5 minutes wide.
      xSpan: Math.min(AUDIENCE_SPAN_MS, Math.max(5 * 60000, aMax - aMin)),
      empty: a && a.error ? 'error: ' + a.error : 'no viewer report yet',
    };
    drawChart($('chart-audience-viewers'), Object.assign({}, perMin, {
      fmt: (x) => x.toFixed(1),
      series: [
        { key: 'concurrent_viewers', name: 'average', points: at('concurrent_viewers') },
        { key: 'peak_viewers', name: 'peak', points: at('peak_viewers'), dashed: true },
      ],
    }));
    drawChart($('chart-audience-egress'), Object.assign({}, perMin, {
      fmt: mb,
      note: 'peer share ' + (ap.length ? pct(ap[ap.length - 1].peer_share) : '-') + ' in the last ' +
        (step === 60 ? 'minute' : step + ' s'),
      series: [
        { key: 'server_bytes', name: 'from the data plane', points: at('server_egress_bytes') },
        { key: 'peer_bytes', name: 'from peers', points: at('peer_bytes') },
      ],
    }));
    drawChart($('chart-startup'), Object.assign({}, perMin, {
      fmt: ms,
      series: [
        { key: 'startup_p50_ms', name: 'p50', points: at('startup_p50_ms').filter((p) => p[1] > 0) },
        { key: 'startup_p95_ms', name: 'p95', points: at('startup_p95_ms').filter((p) => p[1] > 0), dashed: true },
      ],
    }));
    drawChart($('chart-rebuffer'), Object.assign({}, perMin, {
      fmt: (x) => (x * 100).toFixed(2) + ' %', yMax: 0.01,
      series: [{ key: 'rebuffer_ratio', name: 'stall / watch time', points: at('rebuffer_ratio') }],
    }));
  }

  // ------------------------------------------------------------------ charts
  function svg(tag, attrs, parent) {
    const e = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    if (parent) parent.appendChild(e);
    return e;
  }

  // A "nice" tick step for a range (1, 2 or 5 times a power of ten).
  function niceStep(range, ticks, integer) {
    const raw = range / Math.max(1, ticks);
    const p = Math.pow(10, Math.floor(Math.log10(raw)));
    const m = raw / p;
    let step = (m <= 1 ? 1 : m <= 2 ? 2 : m <= 5 ? 5 : 10) * p;
    if (integer) step = Math.max(1, Math.round(step));
    return step;
  }

  // Draws `opts.series` (each {key, name, points: [[x, y]], dashed}) into `fig`:
  // a line per series, y from 0, x over the last `xSpan` before `xMax`.
  function drawChart(fig, opts) {
    const W = 600, H = 190, L = 64, R = 12, T = 10, B = 22;
    for (const old of fig.querySelectorAll('svg, .legend')) old.remove();
    const root = svg('svg', { viewBox: '0 0 ' + W + ' ' + H, role: 'img' }, fig);
    const all = opts.series.flatMap((s) => s.points).filter((p) => Number.isFinite(p[1]));
    const xMax = opts.xMax;
    const xMin = xMax - opts.xSpan;
    let yMax = Math.max(opts.yMax || 0, ...all.map((p) => p[1]));
    if (!opts.fixedMax) yMax = yMax * 1.1;
    if (!(yMax > 0)) yMax = 1;
    const step = niceStep(yMax, 4, opts.integer);
    yMax = Math.ceil(yMax / step - 1e-9) * step;
    const x = (v) => L + (W - L - R) * Math.min(1, Math.max(0, (v - xMin) / (xMax - xMin)));
    const y = (v) => T + (H - T - B) * (1 - v / yMax);

    const grid = svg('g', { class: 'grid' }, root);
    const axis = svg('g', { class: 'axis' }, root);
    for (let v = 0; v <= yMax + step / 2; v += step) {
      svg('line', { x1: L, x2: W - R, y1: y(v), y2: y(v) }, grid);
      const t = svg('text', { x: L - 6, y: y(v) + 3, 'text-anchor': 'end' }, axis);
      t.textContent = opts.fmt(v);
    }
    for (const [i, f] of [[0, 0], [1, 0.5], [2, 1]]) {
      const t = svg('text', {
        x: L + (W - L - R) * f, y: H - 6,
        'text-anchor': i === 0 ? 'start' : i === 1 ? 'middle' : 'end',
      }, axis);
      t.textContent = opts.xFmt(xMin + (xMax - xMin) * f);
    }

    const legend = el('div', { class: 'legend' });
    opts.series.forEach((s, i) => {
      const pts = s.points.filter((p) => Number.isFinite(p[1]) && p[0] >= xMin);
      const g = svg('g', {
        class: 'series s' + i + (s.dashed ? ' dashed' : ''),
        'data-series': s.key,
        'data-points': pts.length,
        'data-last': pts.length ? pts[pts.length - 1][1] : '',
      }, root);
      let coords = [];
      pts.forEach((p, j) => {
        if (opts.stepped && j > 0) coords.push(x(p[0]).toFixed(1) + ',' + y(pts[j - 1][1]).toFixed(1));
        coords.push(x(p[0]).toFixed(1) + ',' + y(p[1]).toFixed(1));
      });
      if (pts.length === 1) {
        svg('circle', { cx: x(pts[0][0]), cy: y(pts[0][1]), r: 3 }, g);
      } else if (pts.length > 1) {
        svg('polyline', { points: coords.join(' ') }, g);
      }
      const item = el('span', {});
      item.appendChild(el('span', { class: 'swatch s' + i }));
      item.appendChild(document.createTextNode(s.name + ' '));
      item.appendChild(el('b', {}, pts.length ? opts.fmt(pts[pts.length - 1][1]) : '-'));
      legend.appendChild(item);
    });
    if (opts.note) legend.appendChild(el('span', {}, opts.note));
    if (all.length === 0) {
      const t = svg('text', { class: 'empty', x: (L + W - R) / 2, y: (T + H - B) / 2, 'text-anchor': 'middle' }, root);
      t.textContent = opts.empty || 'no data yet';
    }
    fig.appendChild(legend);
  }

  // ------------------------------------------------------------------ start
  $('login-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const k = $('key').value.trim();
    if (!k) return;
    sessionStorage.setItem(KEY_STORE, k);
    $('key').value = '';
    signIn(k);
  });
  $('logout').addEventListener('click', () => showLogin(''));
  $('show-stopped').addEventListener('change', (e) => {
    state.showStopped = e.target.checked;
    clearTimeout(state.timer);
    if (state.key) poll();
  });

  readFragment();
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) signIn(key); else showLogin('');
})();
