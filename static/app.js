// cyber-inference admin UI: small vanilla JS for the live parts of the server-rendered pages.
// The session JWT lives only in an HttpOnly cookie: this script never sees or stores it. Every
// state-changing request is a same-origin fetch, so the browser sends this site's Origin.
'use strict';

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

/** Calls the admin API; resolves to the JSON body, rejects with an Error carrying status and body. */
async function api(method, path, body) {
  const opts = { method, credentials: 'same-origin', headers: {} };
  if (body !== undefined) {
    opts.headers['Content-Type'] = 'application/json';
    opts.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path, opts);
  } catch (e) {
    throw new Error(`network error: ${e.message}`);
  }
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = null; }
  if (res.status === 401 && location.pathname !== '/login') {
    location.href = '/login?next=' + encodeURIComponent(location.pathname + location.search);
  }
  if (!res.ok) {
    const msg = (data && data.error && (data.error.message || data.error)) || text || res.statusText;
    const err = new Error(`${res.status}: ${msg}`);
    err.status = res.status;
    err.data = data;
    throw err;
  }
  return data;
}

function flash(msg, bad = false) {
  const f = $('#flash');
  if (!f) return;
  f.textContent = msg;
  f.classList.toggle('bad', bad);
}

function fmtBytes(b) {
  if (b >= 1e9) return (b / 1e9).toFixed(2) + ' GB';
  if (b >= 1e6) return (b / 1e6).toFixed(1) + ' MB';
  return (b / 1e3).toFixed(0) + ' kB';
}

function fmtDuration(s) {
  s = Math.max(0, Math.floor(s));
  const d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60, x = s % 60;
  if (d) return `${d}d ${h}h`;
  if (h) return `${h}h ${m}m`;
  if (m) return `${m}m ${x}s`;
  return `${x}s`;
}

/** Shows `errors` ({field: message}) beside the fields of `form`; clears the others. */
function fieldErrors(form, errors) {
  for (const el of $$('[data-error-for]', form)) {
    el.textContent = (errors && errors[el.dataset.errorFor]) || '';
    const input = form.querySelector(`[name="${el.dataset.errorFor}"]`);
    if (input) input.setAttribute('aria-invalid', errors && errors[el.dataset.errorFor] ? 'true' : 'false');
  }
}

// ------------------------------------------------------------------ login / logout
function initLogin() {
  const form = $('#login-form');
  if (!form) return;
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const err = $('#login-error');
    err.textContent = '';
    const username = form.username.value.trim(), password = form.password.value;
    if (!username || !password) { err.textContent = 'Enter a username and a password.'; return; }
    try {
      await api('POST', '/admin/api/login', { username, password });
      location.href = form.dataset.next || '/';
    } catch (e) {
      err.textContent = e.status === 401 ? 'Wrong username or password.' : e.message;
      form.password.select();
    }
  });
}

function initLogout() {
  const b = $('#logout');
  if (!b) return;
  b.addEventListener('click', async () => {
    try { await api('POST', '/admin/api/logout'); } catch (e) { /* the cookie may already be gone */ }
    location.href = '/login';
  });
}

// ------------------------------------------------------------------ model actions (models, dashboard, detail)
async function modelAction(action, name, button) {
  const paths = { load: 'load', unload: 'unload', pin: 'pin', unpin: 'unpin' };
  const doing = { load: 'Loading', unload: 'Unloading', pin: 'Pinning', unpin: 'Unpinning', delete: 'Deleting' };
  if (button) button.disabled = true;
  if (action !== 'delete') flash(`${doing[action] || action} ${name}…`);
  try {
    if (action === 'delete') {
      const dlg = $('#confirm-delete');
      $('#confirm-name').textContent = name;
      const answer = await new Promise((resolve) => {
        dlg.addEventListener('close', () => resolve(dlg.returnValue), { once: true });
        dlg.showModal();
      });
      if (answer !== 'delete') { flash('delete cancelled'); return; }
      flash(`${doing.delete} ${name}…`);
      await api('DELETE', `/admin/api/models/${encodeURIComponent(name)}`);
      flash(`deleted ${name}`);
      setTimeout(() => location.reload(), 300);
      return;
    }
    const r = await api('POST', `/admin/api/models/${encodeURIComponent(name)}/${paths[action]}`);
    const state = r && r.state ? r.state : '';
    flash(`${name}: ${action} done${state ? ', now ' + state : ''}`);
    if (state) setState(name, state);
    if (action === 'pin' || action === 'unpin') setTimeout(() => location.reload(), 300);
  } catch (e) {
    flash(`${action} ${name} failed: ${e.message}`, true);
  } finally {
    if (button) button.disabled = false;
    syncButtons();
  }
}

const RUNNING = ['loading', 'ready', 'draining'];
function setState(model, state) {
  for (const el of $$('[data-state-of]')) {
    if (el.dataset.stateOf === model) {
      el.textContent = state;
      el.className = `state state-${state}`;
    }
  }
  syncButtons();
}

/** Enables Load only for a stopped (or failed) model and Unload only for a running one. */
function syncButtons() {
  for (const el of $$('[data-state-of]')) {
    const running = RUNNING.includes(el.textContent.trim());
    for (const b of $$('button[data-action="load"], button[data-action="unload"]')) {
      if (b.dataset.model !== el.dataset.stateOf) continue;
      b.disabled = b.dataset.action === 'load' ? running : !running;
    }
  }
}

function initModelButtons() {
  document.addEventListener('click', (ev) => {
    const b = ev.target.closest('button[data-action]');
    if (!b) return;
    modelAction(b.dataset.action, b.dataset.model, b);
  });
  const rescan = $('#rescan');
  if (rescan) rescan.addEventListener('click', async () => {
    try {
      const r = await api('POST', '/admin/api/models/scan');
      flash(`scan: ${(r.models || []).length} models, ${(r.skipped || []).length} skipped`);
      setTimeout(() => location.reload(), 500);
    } catch (e) { flash(`rescan failed: ${e.message}`, true); }
  });
}

// ------------------------------------------------------------------ events (WebSocket)
function connectEvents(onEvent) {
  const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
  let ws, retry = 1000;
  const open = () => {
    ws = new WebSocket(`${proto}//${location.host}/admin/api/events`);
    ws.onmessage = (m) => { try { onEvent(JSON.parse(m.data)); } catch (e) { console.error(e); } };
    ws.onopen = () => { retry = 1000; };
    ws.onclose = () => { setTimeout(open, retry); retry = Math.min(retry * 2, 15000); };
  };
  open();
}

// ------------------------------------------------------------------ dashboard
function initDashboard() {
  if (!$('#chart-cpu')) return;
  const WINDOW_S = 15 * 60;
  const series = { t: [], cpu: [], ram: [], swap: [] };
  const gpuSeries = new Map(); // GPU index -> {t, util, mem, now, plot}
  let count = 0;
  const opts = (label, color) => ({
    width: 300, height: 170,
    scales: { y: { range: [0, 100] } },
    // Local clock time on the x axis (HH:MM, or HH:MM:SS when ticks are under a minute apart).
    axes: [{ stroke: '#a9b6c3', grid: { stroke: '#2c3845' }, space: 80,
      values: (u, splits, ax, space, incr) => splits.map((t) => new Date(t * 1000).toLocaleTimeString([], incr < 60
        ? { hour: '2-digit', minute: '2-digit', second: '2-digit', hour12: false }
        : { hour: '2-digit', minute: '2-digit', hour12: false })) }, { stroke: '#a9b6c3', grid: { stroke: '#2c3845' }, values: (u, v) => v.map((x) => x + '%') }],
    series: [{}, { label, stroke: color, fill: color + '33', width: 2 }],
    legend: { show: false },
  });
  const fit = (plot, el) => {
    // The plot fills its figure; the figure's width comes from the grid, not from the plot.
    const w = Math.max(200, Math.floor(el.getBoundingClientRect().width));
    if (Math.abs(plot.width - w) > 1) plot.setSize({ width: w, height: 170 });
  };
  const mk = (id, label, color) => {
    const el = $(id);
    const plot = new uPlot({ ...opts(label, color), width: Math.max(200, el.clientWidth) }, [[], []], el);
    if (window.ResizeObserver) new ResizeObserver(() => fit(plot, el)).observe(el);
    return plot;
  };
  const plots = {
    cpu: mk('#chart-cpu', 'CPU %', '#58a6ff'),
    ram: mk('#chart-ram', 'RAM %', '#56d364'),
    swap: mk('#chart-swap', 'Swap %', '#e3b341'),
  };
  const pct = (a, b) => (b > 0 ? (100 * a) / b : 0);
  const add = (s) => {
    const t = s.at / 1000;
    if (series.t.length && t <= series.t[series.t.length - 1]) return;
    series.t.push(t);
    series.cpu.push(s.cpu_percent);
    series.ram.push(pct(s.memory_used_bytes, s.memory_total_bytes));
    series.swap.push(pct(s.swap_used_bytes, s.swap_total_bytes));
    while (series.t.length && series.t[0] < t - WINDOW_S) {
      series.t.shift(); series.cpu.shift(); series.ram.shift(); series.swap.shift();
    }
    count += 1;
    $('#cpu-now').textContent = `${s.cpu_percent.toFixed(0)}%`;
    $('#ram-now').textContent = `${fmtBytes(s.memory_used_bytes)} of ${fmtBytes(s.memory_total_bytes)}`;
    $('#swap-now').textContent = s.swap_total_bytes ? `${fmtBytes(s.swap_used_bytes)} of ${fmtBytes(s.swap_total_bytes)}` : 'no swap';
    $('#last-sample').textContent = new Date(s.at).toLocaleTimeString();
    $('#sample-count').textContent = String(count);
    (s.gpus || []).forEach((g, i) => addGpu(g, i, t));
    $('#gpu-none').hidden = gpuSeries.size > 0;
  };
  // One chart per GPU (by index: several cards may share a name): utilization and memory used, in %.
  const addGpu = (g, i, t) => {
    let e = gpuSeries.get(i);
    if (!e) {
      const fig = document.createElement('figure');
      fig.className = 'chart';
      const cap = document.createElement('figcaption');
      const title = document.createElement('span');
      title.textContent = `GPU ${i}: ${g.name} `;
      const now = document.createElement('span');
      now.className = 'now';
      cap.append(title, now);
      const div = document.createElement('div');
      div.setAttribute('role', 'img');
      div.setAttribute('aria-label', `GPU ${i} (${g.name}) utilization and memory chart`);
      fig.append(cap, div);
      $('#gpu-charts').append(fig);
      const o = opts('util %', '#ff7b72');
      o.series.push({ label: 'memory %', stroke: '#d2a8ff', width: 2 });
      e = { t: [], util: [], mem: [], now, plot: new uPlot({ ...o, width: Math.max(200, div.clientWidth) }, [[], [], []], div) };
      if (window.ResizeObserver) { const p = e.plot; new ResizeObserver(() => fit(p, div)).observe(div); }
      gpuSeries.set(i, e);
    }
    e.t.push(t);
    e.util.push(g.utilization_percent ?? null);
    e.mem.push(g.memory_total_bytes ? pct(g.memory_used_bytes || 0, g.memory_total_bytes) : null);
    while (e.t.length && e.t[0] < t - WINDOW_S) { e.t.shift(); e.util.shift(); e.mem.shift(); }
    const parts = [];
    if (g.utilization_percent != null) parts.push(`${g.utilization_percent}%`);
    if (g.memory_total_bytes) parts.push(`${fmtBytes(g.memory_used_bytes || 0)} of ${fmtBytes(g.memory_total_bytes)}`);
    if (g.temperature_c != null) parts.push(`${g.temperature_c} °C`);
    if (g.power_watts != null) parts.push(`${Math.round(g.power_watts)} W`);
    e.now.textContent = parts.join(' · ');
  };
  const redraw = () => {
    plots.cpu.setData([series.t, series.cpu]);
    plots.ram.setData([series.t, series.ram]);
    plots.swap.setData([series.t, series.swap]);
    for (const e of gpuSeries.values()) e.plot.setData([e.t, e.util, e.mem]);
  };
  api('GET', '/admin/api/resources/history')
    .then((r) => { for (const s of r.samples || []) add(s); redraw(); })
    .catch((e) => { $('#res-error').textContent = `cannot load resource history: ${e.message}`; });
  const refreshLoaded = async () => {
    try {
      // The catalogue rows carry each model's own idle timeout next to its worker.
      const r = await api('GET', '/admin/api/models');
      const global = Number($('#loaded').dataset.idleTimeout || 0);
      renderLoaded((r.models || []).filter((m) => m.worker).map((m) => ({
        ...m.worker,
        idle_timeout_s: m.model.idle_timeout ?? global,
      })));
    } catch (e) { flash(`cannot refresh workers: ${e.message}`, true); }
  };
  connectEvents((ev) => {
    if (ev.type === 'resources') { add(ev); redraw(); refreshLoaded(); }
    else if (ev.type === 'model_state') refreshLoaded();
  });
}

// What runs a model, as the server renders it (WorkerBackend::summary): "vulkan · ADAPTER · 30/30 layers
// + output", "cpu" (with the reason -ngl was not honoured), or "–" while the worker loads.
function backendSummary(b) {
  if (!b) return '–';
  if (!b.name || b.name === 'cpu') return b.fallback_reason ? `${b.name || 'cpu'} (${b.fallback_reason})` : (b.name || 'cpu');
  return `${b.name} · ${b.adapter || 'unnamed adapter'} · ${b.offloaded_layers}/${b.n_layer} layers${b.output_offloaded ? ' + output' : ''}`;
}

function renderLoaded(workers) {
  const tbody = $('#loaded tbody');
  if (!tbody) return;
  const live = workers.filter((w) => ['loading', 'ready', 'draining'].includes(w.state));
  tbody.textContent = '';
  for (const w of live) {
    const tr = document.createElement('tr');
    tr.dataset.model = w.model;
    const cell = (text, label) => { const td = document.createElement('td'); td.textContent = text; if (label) td.dataset.label = label; tr.append(td); return td; };
    const a = document.createElement('a');
    a.href = `/models/${encodeURIComponent(w.model)}`;
    a.textContent = w.model;
    cell('', 'Model').append(a);
    const st = document.createElement('span');
    st.className = `state state-${w.state}`;
    st.textContent = w.state;
    cell('', 'State').append(st);
    cell(backendSummary(w.backend), 'Backend').className = 'backend';
    cell(w.port ?? '', 'Port');
    cell(w.rss_bytes ? fmtBytes(w.rss_bytes) : '–', 'RSS').className = 'num';
    cell(String(w.inflight), 'In flight');
    const timeout = Number(w.idle_timeout_s ?? $('#loaded').dataset.idleTimeout ?? 0);
    cell(w.pinned ? 'never (pinned)' : w.inflight > 0 ? 'busy' : timeout === 0 ? 'never' : fmtDuration(timeout - w.idle_s), 'Idle unload in');
    const b = document.createElement('button');
    b.type = 'button';
    b.className = 'secondary';
    b.dataset.action = 'unload';
    b.dataset.model = w.model;
    b.textContent = 'Unload';
    cell('').append(b);
    tr.lastElementChild.className = 'actions';
    tbody.append(tr);
  }
  $('#loaded-empty').hidden = live.length > 0;
  $('#loaded-wrap').hidden = live.length === 0;
}

// ------------------------------------------------------------------ Hugging Face downloads (models page)
// Routes of the hub's admin API: GET /admin/api/models/repo-files?repo_id=&revision=,
// POST /admin/api/models/download {repo_id, filename?, revision?} → 202 {id}, GET /admin/api/downloads,
// DELETE /admin/api/downloads/{id}, and `download*` events on /admin/api/events. A build without them
// answers axum's bare 404 (no JSON body): then the form is replaced by a plain notice.
const FINISHED = ['done', 'completed', 'complete', 'finished', 'failed', 'error', 'cancelled', 'canceled'];

/** A download record in one shape whatever names the API uses for its fields. */
function normDownload(d) {
  const p = d.progress && typeof d.progress === 'object' ? d.progress : {};
  const pick = (...ks) => { for (const k of ks) { if (d[k] !== undefined && d[k] !== null) return d[k]; if (p[k] !== undefined && p[k] !== null) return p[k]; } return undefined; };
  const num = (v) => (v === undefined || v === null || Number.isNaN(Number(v)) ? undefined : Number(v));
  const err = pick('error', 'reason', 'message');
  return {
    id: String(pick('id', 'download_id')),
    repo: pick('repo_id', 'repo') || '',
    file: pick('filename', 'file') || '',
    state: pick('state', 'status', 'phase') === undefined ? undefined : String(pick('state', 'status', 'phase')).toLowerCase(),
    bytes: num(pick('bytes', 'downloaded', 'downloaded_bytes', 'bytes_done')),
    total: num(pick('total', 'total_bytes', 'total_size', 'size')),
    rate: num(pick('rate', 'bytes_per_sec', 'rate_bytes_per_sec')),
    error: err && typeof err === 'object' ? (err.message || JSON.stringify(err)) : err,
    model: typeof d.model === 'string' ? d.model : undefined,
  };
}

function initHub() {
  const form = $('#hf-form');
  if (!form) return;
  const status = $('#hf-status'), errEl = $('#hf-error'), filesBox = $('#hf-files');
  const downloads = new Map();
  let pollTimer = null;
  const missingRoute = (e) => e.status === 404 && !e.data;
  const unavailable = () => {
    $('#hf-unavailable').hidden = false;
    form.hidden = true;
    filesBox.hidden = true;
    for (const el of [$('#dl-h'), $('#downloads-wrap'), $('#downloads-empty')]) el.hidden = true;
  };

  // Rows are built once per download and updated in place, so a Cancel button under the pointer is
  // never replaced between press and release while progress events arrive.
  const rows = new Map();
  const render = () => {
    const tbody = $('#downloads tbody');
    for (const d of downloads.values()) {
      let r = rows.get(d.id);
      if (!r) {
        const tr = document.createElement('tr');
        tr.dataset.download = d.id;
        const td = (label) => { const c = document.createElement('td'); if (label) c.dataset.label = label; tr.append(c); return c; };
        r = { tr, name: td('Model'), prog: td('Progress'), rate: td('Rate'), st: td('State'), act: td() };
        r.act.className = 'actions';
        r.bar = document.createElement('progress');
        r.txt = document.createElement('span');
        r.txt.className = 'small';
        r.prog.append(r.bar, r.txt);
        tbody.append(tr);
        rows.set(d.id, r);
      }
      r.tr.dataset.state = d.state;
      r.name.textContent = d.file ? `${d.repo} / ${d.file}` : d.repo;
      r.bar.max = d.total || 1;
      r.bar.value = Math.min(d.bytes, d.total || 1);
      r.bar.setAttribute('aria-label', `download of ${d.file || d.repo}`);
      r.txt.textContent = d.total ? ` ${fmtBytes(d.bytes)} of ${fmtBytes(d.total)} (${(100 * d.bytes / d.total).toFixed(1)}%)` : ` ${fmtBytes(d.bytes)}`;
      r.rate.textContent = FINISHED.includes(d.state) || !d.rate ? '–' : `${fmtBytes(d.rate)}/s`;
      const st = r.st;
      st.textContent = d.state;
      st.className = `state state-${['failed', 'error'].includes(d.state) ? 'failed' : ['done', 'completed', 'complete', 'finished'].includes(d.state) ? 'ready' : d.state === 'cancelled' ? 'stopped' : 'loading'}`;
      if (d.model && ['done', 'completed'].includes(d.state)) {
        const a = document.createElement('a');
        a.href = `/models/${encodeURIComponent(d.model)}`;
        a.textContent = d.model;
        st.append(' → ', a);
      }
      if (d.error) {
        const e = document.createElement('div');
        e.className = 'error small';
        e.textContent = d.error;
        st.append(e);
      }
      const button = r.act.querySelector('button');
      if (FINISHED.includes(d.state)) {
        if (button) button.remove();
      } else if (!button) {
        const b = document.createElement('button');
        b.type = 'button';
        b.className = 'danger';
        b.textContent = 'Cancel';
        b.setAttribute('aria-label', `Cancel download of ${d.file || d.repo}`);
        b.addEventListener('click', () => cancel(d.id, b));
        r.act.append(b);
      }
    }
    $('#downloads-wrap').hidden = downloads.size === 0;
    $('#downloads-empty').hidden = downloads.size > 0;
  };

  const update = (raw) => {
    const d = normDownload(raw);
    if (d.id === 'undefined') return;
    const before = downloads.get(d.id);
    const given = Object.fromEntries(Object.entries(d).filter(([, v]) => v !== undefined && v !== ''));
    const merged = { state: 'queued', bytes: 0, total: 0, rate: 0, repo: '', file: '', ...before, ...given };
    downloads.set(d.id, merged);
    if (before && !FINISHED.includes(before.state) && ['done', 'completed', 'complete', 'finished'].includes(merged.state)) {
      flash(`downloaded ${merged.file || merged.repo}${merged.model ? ` as ${merged.model}` : ''}; reload the page to see it in the catalogue`);
    }
    if (before && !FINISHED.includes(before.state) && ['failed', 'error'].includes(merged.state)) {
      flash(`download of ${merged.file || merged.repo} failed${merged.error ? ': ' + merged.error : ''}`, true);
    }
  };

  const refresh = async () => {
    try {
      const r = await api('GET', '/admin/api/downloads');
      const list = Array.isArray(r) ? r : (r && r.downloads) || [];
      for (const d of list) update(d);
      render();
    } catch (e) {
      if (missingRoute(e)) { unavailable(); return false; }
      status.textContent = `cannot refresh downloads: ${e.message}`;
    }
    return true;
  };
  const schedule = () => {
    clearTimeout(pollTimer);
    if ([...downloads.values()].some((d) => !FINISHED.includes(d.state))) pollTimer = setTimeout(async () => { await refresh(); schedule(); }, 1500);
  };

  const cancel = async (id, b) => {
    b.disabled = true;
    try {
      const r = await api('DELETE', `/admin/api/downloads/${encodeURIComponent(id)}`);
      // The answer holds the download as it ended: cancelled, or done when it finished first.
      if (r && r.download) update(r.download);
      else { const d = downloads.get(id); if (d) d.state = 'cancelled'; }
      render();
    } catch (e) {
      flash(`cancel failed: ${e.message}`, true);
      b.disabled = false;
    }
  };

  const start = async (repo, revision, filename, b) => {
    b.disabled = true;
    errEl.textContent = '';
    try {
      const body = { repo_id: repo, filename };
      if (revision) body.revision = revision;
      const r = await api('POST', '/admin/api/models/download', body);
      const rec = (r && (r.download || r)) || {};
      update({ repo_id: repo, filename, state: 'queued', ...rec, id: rec.id ?? rec.download_id ?? (r && r.id) });
      render();
      status.textContent = `download of ${filename} started`;
      schedule();
    } catch (e) {
      if (missingRoute(e)) { unavailable(); return; }
      errEl.textContent = `Cannot start the download: ${e.message}`;
    } finally {
      b.disabled = false;
    }
  };

  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    errEl.textContent = '';
    const repo = form.repo_id.value.trim(), revision = form.revision.value.trim();
    if (!/^[A-Za-z0-9][\w.-]*\/[\w.-]+$/.test(repo)) {
      errEl.textContent = 'Enter a repository id as owner/name, for example bartowski/SmolLM2-135M-Instruct-GGUF.';
      form.repo_id.setAttribute('aria-invalid', 'true');
      form.repo_id.focus();
      return;
    }
    form.repo_id.setAttribute('aria-invalid', 'false');
    const listBtn = $('#hf-list');
    listBtn.disabled = true;
    status.textContent = `listing ${repo}…`;
    filesBox.hidden = true;
    try {
      const q = new URLSearchParams({ repo_id: repo });
      if (revision) q.set('revision', revision);
      const r = await api('GET', `/admin/api/models/repo-files?${q}`);
      const files = Array.isArray(r) ? r : (r && (r.files || r.models)) || [];
      const tbody = $('#hf-files tbody');
      tbody.textContent = '';
      $('#hf-files-repo').textContent = repo;
      for (const f of files) {
        const tr = document.createElement('tr');
        const name = f.filename || f.rfilename || '';
        tr.dataset.file = name;
        const td = (t, label) => { const c = document.createElement('td'); c.textContent = t; if (label) c.dataset.label = label; tr.append(c); return c; };
        const parts = Array.isArray(f.files) && f.files.length > 1 ? ` (${f.files.length} parts)` : '';
        const c = td(name + parts, 'File');
        const badge = (t) => c.append(' ', Object.assign(document.createElement('span'), { className: 'badge', textContent: t }));
        if (f.recommended) badge('recommended');
        if (f.is_projector) badge('projector');
        if (f.present) badge('already in the models folder');
        td(f.quantization || '?', 'Quantization');
        td(fmtBytes(Number(f.total_size ?? f.size ?? 0)), 'Size').className = 'num';
        const act = td('');
        const missing = Array.isArray(f.missing_parts) && f.missing_parts.length;
        if (missing) act.textContent = `parts ${f.missing_parts.join(', ')} missing from the repo`;
        else {
          const b = document.createElement('button');
          b.type = 'button';
          b.textContent = 'Download';
          b.setAttribute('aria-label', `Download ${name}`);
          b.addEventListener('click', () => start(repo, revision, name, b));
          act.append(b);
        }
        tbody.append(tr);
      }
      filesBox.hidden = files.length === 0;
      status.textContent = files.length ? `${files.length} GGUF file${files.length === 1 ? '' : 's'}` : '';
      if (!files.length) errEl.textContent = `${repo} has no GGUF files.`;
    } catch (e) {
      status.textContent = '';
      if (missingRoute(e)) unavailable();
      else errEl.textContent = `Cannot list ${repo}: ${e.message}`;
    } finally {
      listBtn.disabled = false;
    }
  });

  refresh().then((ok) => { if (ok) schedule(); });
  return (ev) => {
    if (typeof ev.type === 'string' && ev.type.startsWith('download')) {
      update(ev.download || ev);
      render();
      schedule();
    }
  };
}

// ------------------------------------------------------------------ live model states (models, model detail)
function initModelEvents(extra) {
  if (!$('[data-state-of]') && !extra) return;
  connectEvents((ev) => {
    if (ev.type === 'model_state') {
      setState(ev.model, ev.to);
      if (ev.to === 'failed' && ev.reason) flash(`${ev.model} failed: ${ev.reason}`, true);
    } else if (extra) extra(ev);
  });
}

// ------------------------------------------------------------------ logs
const LEVELS = ['TRACE', 'DEBUG', 'INFO', 'WARN', 'ERROR'];
function levelOf(line) {
  const m = /\b(TRACE|DEBUG|INFO|WARN|ERROR)\b/.exec(line);
  return m ? m[1] : '';
}

function initLogs() {
  const src = $('#log-source');
  if (src) src.addEventListener('change', () => src.form.requestSubmit());
  const pre = $('#log');
  if (!pre) return;
  const source = pre.dataset.source;
  const url = source === 'supervisor'
    ? '/admin/api/logs/follow?tail=500'
    : `/admin/api/models/${encodeURIComponent(source)}/logs/follow?tail=500`;
  let paused = false;
  const held = [];
  const level = $('#log-level'), auto = $('#log-autoscroll'), pause = $('#log-pause'), status = $('#log-status');
  const visible = (lv) => {
    const want = level.value;
    if (!want) return true;
    return lv !== '' && LEVELS.indexOf(lv) >= LEVELS.indexOf(want);
  };
  const append = (l) => {
    const span = document.createElement('span');
    const lv = levelOf(l.line);
    span.className = `line l-${lv || 'NONE'}`;
    span.dataset.level = lv;
    span.textContent = `${new Date(l.at).toLocaleTimeString()} [${l.stream}] ${l.line}\n`;
    span.hidden = !visible(lv);
    pre.append(span);
    while (pre.childElementCount > 2000) pre.firstElementChild.remove();
    $('#log-empty').hidden = true;
    if (auto.checked) pre.scrollTop = pre.scrollHeight;
  };
  level.addEventListener('change', () => {
    for (const s of $$('span.line', pre)) s.hidden = !visible(s.dataset.level);
  });
  pause.addEventListener('click', () => {
    paused = !paused;
    pause.setAttribute('aria-pressed', String(paused));
    pause.textContent = paused ? 'Resume' : 'Pause';
    status.textContent = paused ? 'paused' : '';
    if (!paused) { for (const l of held.splice(0)) append(l); }
  });
  $('#log-clear').addEventListener('click', () => { pre.textContent = ''; });
  const es = new EventSource(url);
  es.addEventListener('log', (m) => {
    const l = JSON.parse(m.data);
    if (paused) { held.push(l); status.textContent = `paused (${held.length} new)`; } else append(l);
  });
  es.onopen = () => { if (!paused) status.textContent = 'live'; };
  es.onerror = () => { status.textContent = 'disconnected; retrying…'; };
}

// ------------------------------------------------------------------ model settings
function initModelSettings() {
  const form = $('#model-settings');
  if (!form) return;
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const body = {};
    for (const input of $$('input[name], textarea[name], select[name]', form)) {
      body[input.name] = input.type === 'checkbox' ? input.checked : input.value.trim();
    }
    const status = $('#settings-status');
    status.textContent = 'saving…';
    status.classList.remove('error');
    try {
      const r = await api('POST', `/ui/api/models/${encodeURIComponent(form.dataset.model)}/settings`, body);
      fieldErrors(form, null);
      status.textContent = r.note || 'saved';
    } catch (e) {
      status.classList.add('error');
      if (e.status === 422 && e.data && e.data.errors) {
        fieldErrors(form, e.data.errors);
        status.textContent = 'not saved: fix the fields marked';
      } else status.textContent = `not saved: ${e.message}`;
    }
  });
}

// ------------------------------------------------------------------ settings page
function initSettings() {
  const form = $('#settings-form');
  if (!form) return;
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const body = {};
    for (const input of $$('input[name]', form)) {
      const v = input.dataset.kind === 'bool' ? String(input.checked) : input.value.trim();
      if (v !== input.dataset.initial) body[input.name] = v === '' ? null : v;
    }
    const status = $('#settings-status');
    if (!Object.keys(body).length) { status.textContent = 'nothing changed'; return; }
    fieldErrors(form, null);
    status.textContent = 'saving…';
    // The API is all-or-nothing and names the first bad setting: try each alone to mark every bad field.
    const errors = {};
    for (const [k, v] of Object.entries(body)) {
      try { await api('PUT', '/admin/api/settings', { [k]: v }); } catch (e) { errors[k] = e.message.replace(/^\d+: /, ''); }
    }
    fieldErrors(form, errors);
    const bad = Object.keys(errors).length;
    status.textContent = bad ? `${Object.keys(body).length - bad} saved, ${bad} refused` : 'saved';
    status.classList.toggle('error', bad > 0);
    if (!bad) setTimeout(() => location.reload(), 600);
  });
  const keyForm = $('#key-form');
  keyForm.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const name = keyForm.name.value.trim();
    $('#key-error').textContent = '';
    if (!name) { $('#key-error').textContent = 'Give the key a name.'; return; }
    try {
      const r = await api('POST', '/admin/api/keys', { name });
      $('#key-value').textContent = r.key;
      $('#key-created').hidden = false;
      keyForm.name.value = '';
      const k = r.api_key || {};
      const tr = document.createElement('tr');
      tr.dataset.key = k.id;
      const cell = (label, text) => { const td = document.createElement('td'); td.dataset.label = label; td.textContent = text; tr.append(td); return td; };
      cell('Name', k.name || name);
      const code = document.createElement('code');
      code.textContent = `${k.prefix || ''}…`;
      cell('Prefix', '').append(code);
      cell('Created (UTC)', k.created_at ? new Date(k.created_at).toISOString().slice(0, 19).replace('T', ' ') : '').className = 'num';
      cell('Last used', 'never');
      const b = document.createElement('button');
      b.type = 'button';
      b.className = 'danger';
      b.dataset.revoke = k.id;
      b.textContent = 'Revoke';
      b.setAttribute('aria-label', `Revoke key ${k.name || name}`);
      cell('Status', 'active ').append(b);
      $('#keys tbody').append(tr);
      $('#keys-wrap').hidden = false;
      $('#keys-empty').hidden = true;
    } catch (e) { $('#key-error').textContent = e.message; }
  });
  document.addEventListener('click', async (ev) => {
    const b = ev.target.closest('button[data-revoke]');
    if (!b) return;
    if (!confirm('Revoke this API key? Clients using it will be refused.')) return;
    try {
      await api('DELETE', `/admin/api/keys/${b.dataset.revoke}`);
      b.parentElement.textContent = 'revoked';
    } catch (e) { flash(`revoke failed: ${e.message}`, true); }
  });
  const pw = $('#password-form');
  pw.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const status = $('#password-status');
    try {
      const r = await api('POST', '/ui/api/password', { current: pw.current.value, new: pw.new.value });
      fieldErrors(pw, null);
      status.textContent = r.note || 'changed';
      pw.reset();
    } catch (e) {
      if (e.status === 422 && e.data && e.data.errors) { fieldErrors(pw, e.data.errors); status.textContent = 'not changed'; }
      else status.textContent = `not changed: ${e.message}`;
    }
  });
}

// ------------------------------------------------------------------ chat
function initChat() {
  const form = $('#chat-form');
  if (!form) return;
  const want = new URLSearchParams(location.search).get('model');
  if (want) for (const o of form.model.options) if (o.value === want) o.selected = true;
  let history = [];
  let controller = null;
  const log = $('#chat-log'), stats = $('#chat-stats'), errEl = $('#chat-error');
  const bubble = (role, text) => {
    const d = document.createElement('div');
    d.className = `msg ${role}`;
    const who = document.createElement('span');
    who.className = 'who';
    who.textContent = role === 'user' ? 'you' : 'assistant';
    const body = document.createElement('span');
    body.className = 'text';
    body.textContent = text;
    d.append(who, body);
    log.append(d);
    return body;
  };
  $('#chat-reset').addEventListener('click', () => { history = []; log.textContent = ''; stats.textContent = ''; errEl.textContent = ''; });
  $('#chat-stop').addEventListener('click', () => { if (controller) controller.abort(); });
  form.message.addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && !ev.shiftKey) { ev.preventDefault(); form.requestSubmit(); }
  });
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    errEl.textContent = '';
    const text = form.message.value.trim();
    if (!text) { errEl.textContent = 'Type a message first.'; return; }
    const temperature = Number(form.temperature.value), maxTokens = Number(form.max_tokens.value);
    if (!(temperature >= 0 && temperature <= 5)) { errEl.textContent = 'Temperature must be between 0 and 5.'; return; }
    if (!(Number.isInteger(maxTokens) && maxTokens >= 1)) { errEl.textContent = 'Max tokens must be a whole number of at least 1.'; return; }
    // No API key even when require_api_key is on: /v1/* takes the admin session cookie from this
    // server's own pages (the browser's Origin proves it), so a logged-in admin chats as is.
    const headers = { 'Content-Type': 'application/json' };
    const messages = [];
    if (form.system.value.trim()) messages.push({ role: 'system', content: form.system.value.trim() });
    history.push({ role: 'user', content: text });
    messages.push(...history);
    const mine = bubble('user', text);
    form.message.value = '';
    const out = bubble('assistant', '');
    out.parentElement.dataset.streaming = 'true';
    controller = new AbortController();
    $('#chat-send').disabled = true;
    $('#chat-stop').disabled = false;
    stats.textContent = 'waiting for the model (it loads on first use)…';
    const t0 = performance.now();
    let tFirst = null, chunks = 0, usage = null, reply = '', finish = null;
    try {
      const res = await fetch('/v1/chat/completions', {
        method: 'POST',
        credentials: 'same-origin',
        headers,
        body: JSON.stringify({
          model: form.model.value, messages, temperature, max_tokens: maxTokens,
          stream: true, stream_options: { include_usage: true },
        }),
        signal: controller.signal,
      });
      if (res.status === 401) {
        // The session expired or was logged out elsewhere; the conversation stays on the page.
        const err = new Error('401: your admin session has expired; log in again');
        err.status = 401;
        throw err;
      }
      if (!res.ok) {
        const t = await res.text();
        let msg = t;
        try { const j = JSON.parse(t); msg = (j.error && j.error.message) || t; } catch { /* text */ }
        throw new Error(`${res.status}: ${msg}`);
      }
      const reader = res.body.getReader();
      const dec = new TextDecoder();
      let buf = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        let i;
        while ((i = buf.indexOf('\n')) >= 0) {
          const line = buf.slice(0, i).trim();
          buf = buf.slice(i + 1);
          if (!line.startsWith('data:')) continue;
          const data = line.slice(5).trim();
          if (data === '[DONE]') continue;
          const j = JSON.parse(data);
          if (j.error) throw new Error(j.error.message || JSON.stringify(j.error));
          if (j.usage) usage = j.usage;
          if (j.choices && j.choices[0] && j.choices[0].finish_reason) finish = j.choices[0].finish_reason;
          const delta = j.choices && j.choices[0] && j.choices[0].delta;
          if (delta && delta.content) {
            if (tFirst === null) tFirst = performance.now();
            chunks += 1;
            reply += delta.content;
            out.textContent = reply;
            const secs = (performance.now() - tFirst) / 1000;
            stats.textContent = `${chunks} tokens${secs > 0 ? `, ${(chunks / secs).toFixed(1)} tokens/s` : ''}`;
          }
        }
      }
      history.push({ role: 'assistant', content: reply });
      const genS = tFirst === null ? 0 : (performance.now() - tFirst) / 1000;
      const n = usage ? usage.completion_tokens : chunks;
      const parts = [`${n} tokens`];
      if (genS > 0) parts.push(`${(n / genS).toFixed(1)} tokens/s`);
      if (tFirst !== null) parts.push(`first token after ${((tFirst - t0) / 1000).toFixed(2)} s`);
      if (usage) parts.push(`usage: prompt ${usage.prompt_tokens}, completion ${usage.completion_tokens}, total ${usage.total_tokens}`);
      if (finish === 'length') parts.push('stopped at max tokens');
      stats.textContent = parts.join(' · ');
    } catch (e) {
      if (reply) {
        // Stopped or broken mid-reply: keep what came, as the model's turn.
        history.push({ role: 'assistant', content: reply });
        errEl.textContent = e.name === 'AbortError' ? 'Stopped.' : `The reply broke off: ${e.message}`;
      } else {
        // Nothing came back: take the turn out and give the message back for another try.
        history.pop();
        mine.parentElement.remove();
        out.parentElement.remove();
        if (!form.message.value) form.message.value = text;
        errEl.textContent = e.name === 'AbortError' ? 'Stopped before the model answered.' : `Chat failed: ${e.message}`;
        if (e.status === 401) {
          const a = document.createElement('a');
          a.href = '/login?next=' + encodeURIComponent(location.pathname + location.search);
          a.textContent = 'Log in';
          errEl.append(' ', a);
        }
        stats.textContent = '';
      }
    } finally {
      out.parentElement.dataset.streaming = 'false';
      controller = null;
      $('#chat-send').disabled = false;
      $('#chat-stop').disabled = true;
    }
  });
}

document.addEventListener('DOMContentLoaded', () => {
  initLogin();
  initLogout();
  initModelButtons();
  initDashboard();
  initLogs();
  initModelSettings();
  initSettings();
  initChat();
  const hubEvents = initHub();
  if (!$('#chart-cpu')) initModelEvents(hubEvents);
});
