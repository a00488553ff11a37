// Drives the admin UI of a running `cyber-inference serve` in Debian's headless Chromium, as a user
// would: log in, watch the dashboard charts update, load the model, chat with a streamed reply, change a
// model setting, read the worker's log, unload, log out. Saves a screenshot of each page.
//
// Env: BASE_URL, PASSWORD, MODEL (catalogue name), SHOT_DIR, CHROMIUM (default /usr/bin/chromium);
// HF_REPO and HF_FILE (a repo and a file of it that the supervisor's HF_ENDPOINT serves), HF_CANCEL_REPO
// (a repo with one GGUF, to start and cancel).
// Exits non-zero with the failed step on stderr.
import { chromium } from 'playwright-core';
import { mkdirSync } from 'node:fs';

const base = process.env.BASE_URL;
const password = process.env.PASSWORD;
const model = process.env.MODEL;
const shots = process.env.SHOT_DIR;
const hfRepo = process.env.HF_REPO;
const hfFile = process.env.HF_FILE;
const hfCancelRepo = process.env.HF_CANCEL_REPO;
if (!base || !password || !model || !shots) {
  console.error('BASE_URL, PASSWORD, MODEL and SHOT_DIR must be set');
  process.exit(2);
}
mkdirSync(shots, { recursive: true });
console.log(`screenshots: ${shots}`);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--disable-dev-shm-usage'],
});
const ctx = await browser.newContext({ viewport: { width: 1280, height: 900 } });
const page = await ctx.newPage();
const consoleErrors = [];
page.on('console', (m) => { if (m.type() === 'error') consoleErrors.push(m.text()); });
const pageErrors = [];
page.on('pageerror', (e) => pageErrors.push(String(e)));

let n = 0;
async function shot(name, p = page) {
  n += 1;
  const file = `${shots}/${String(n).padStart(2, '0')}-${name}.png`;
  await p.screenshot({ path: file, fullPage: true });
  console.log(`saved ${file}`);
}
async function step(name, fn) {
  const t0 = Date.now();
  try {
    await fn();
    console.log(`ok   ${name} (${Date.now() - t0} ms)`);
  } catch (e) {
    console.error(`FAIL ${name}: ${e.stack || e}`);
    try { await shot(`failed-${name.replace(/\W+/g, '-')}`); } catch { /* ignore */ }
    await browser.close();
    process.exit(1);
  }
}
// SKIP_WORKER=1 (manual runs only, never set by tests/ui_browser.rs) skips the steps that need a worker.
const skipWorker = process.env.SKIP_WORKER === '1';
async function workerStep(name, fn) {
  if (skipWorker) { console.log(`skip ${name} (SKIP_WORKER=1)`); return; }
  await step(name, fn);
}
function expect(cond, msg) { if (!cond) throw new Error(msg); }

const modelPath = `/models/${encodeURIComponent(model)}`;
let apiKey = '';  // created on the settings page, used by an outside client once keys are required

await step('unauthenticated page redirects to login with next', async () => {
  await page.goto(`${base}${modelPath}`);
  await page.waitForURL(/\/login\?next=/);
  expect(page.url().includes(`next=${encodeURIComponent(modelPath).replace(/%2F/g, '/')}`) || page.url().includes('next='), `url ${page.url()}`);
  await shot('login');
});

await step('wrong password shows an error', async () => {
  await page.fill('#password', 'not-the-password');
  await page.click('button[type=submit]');
  await page.waitForSelector('#login-error:has-text("Wrong username or password")');
});

await step('log in and land on the page asked for', async () => {
  await page.fill('#password', password);
  await page.click('button[type=submit]');
  await page.waitForURL(`${base}${modelPath}`);
  const cookies = await ctx.cookies();
  const c = cookies.find((k) => k.name === 'ci_session');
  expect(c && c.httpOnly && c.sameSite === 'Strict', `cookie flags ${JSON.stringify(c)}`);
  const visible = await page.evaluate(() => document.cookie);
  expect(!visible.includes('ci_session'), 'session cookie visible to JS');
  const html = await page.content();
  expect(!html.includes(c.value), 'page embeds the JWT');
});

await step('dashboard charts update', async () => {
  await page.goto(`${base}/`);
  await page.waitForSelector('#chart-cpu canvas');
  const first = Number(await page.textContent('#sample-count'));
  await page.waitForFunction((f) => Number(document.querySelector('#sample-count').textContent) > f, first, { timeout: 15000 });
  const ram = await page.textContent('#ram-now');
  expect(/of/.test(ram), `ram label ${ram}`);
  await shot('dashboard');
});

await step('GPU charts (resource history with two GPUs, answered by the test)', async () => {
  // This machine may have no GPU: the test answers the history request with two cards of one name.
  const gp = await ctx.newPage();
  await gp.route('**/admin/api/resources/history*', async (route) => {
    const real = await (await route.fetch()).json();
    const now = Date.now();
    const samples = (real.samples || []).slice(-3);
    if (!samples.length) throw new Error('no resource samples yet');
    samples.forEach((s, k) => {
      s.at = now - (samples.length - k) * 2000;
      s.gpus = [0, 1].map((i) => ({ name: 'Test GPU', utilization_percent: 10 * (i + 1) + k, memory_used_bytes: (i + 1) * 4e9, memory_total_bytes: 80e9, temperature_c: 40 + i, power_watts: 100.4 }));
    });
    await route.fulfill({ json: { ...real, samples } });
  });
  await gp.goto(`${base}/`);
  await gp.waitForSelector('#gpu-charts figure:nth-child(2) canvas');
  const caps = await gp.locator('#gpu-charts figcaption').allTextContents();
  expect(caps.length === 2 && /GPU 0: Test GPU/.test(caps[0]) && /GPU 1: Test GPU/.test(caps[1]), `captions ${JSON.stringify(caps)}`);
  expect(/2\d%.*8\.00 GB of 80\.00 GB.*41 °C.*100 W/.test(caps[1].replace(/\s+/g, ' ')), `caption ${caps[1]}`);
  expect(await gp.isHidden('#gpu-none'), '"No GPU detected" shown beside GPU charts');
  await shot('dashboard-gpus', gp);
  await gp.close();
});

await workerStep('load the model from the models page', async () => {
  await page.goto(`${base}/models`);
  await shot('models');
  const row = page.locator(`tr[data-model="${model}"]`);
  expect(await row.locator('button[data-action="unload"]').isDisabled(), 'Unload enabled for a stopped model');
  await row.locator('button[data-action="load"]').click();
  await page.waitForSelector(`tr[data-model="${model}"] [data-state-of]:has-text("ready")`, { timeout: 120000 });
  await page.waitForSelector(`tr[data-model="${model}"] button[data-action="load"]:disabled`);
  await page.waitForSelector('#flash:has-text("now ready")');
  await shot('models-loaded');
});

await workerStep('dashboard lists the loaded model', async () => {
  await page.goto(`${base}/`);
  await page.waitForSelector(`#loaded tr[data-model="${model}"]`, { timeout: 10000 });
  await shot('dashboard-loaded');
});

await workerStep('chat playground streams a reply', async () => {
  await page.goto(`${base}/chat?model=${encodeURIComponent(model)}`);
  await page.fill('#chat-temperature', '0');
  await page.fill('#chat-max-tokens', '48');
  await page.fill('#chat-input', 'Name three colours of the rainbow.');
  await page.click('#chat-send');
  // Streaming: the reply grows while data-streaming is still true.
  await page.waitForFunction(() => {
    const m = document.querySelector('.msg.assistant');
    return m && m.dataset.streaming === 'true' && m.querySelector('.text').textContent.length > 0;
  }, null, { timeout: 120000 });
  await page.waitForSelector('.msg.assistant[data-streaming="false"]', { timeout: 120000 });
  const reply = await page.textContent('.msg.assistant .text');
  const stats = await page.textContent('#chat-stats');
  const err = await page.textContent('#chat-error');
  expect(!err, `chat error: ${err}`);
  expect(reply.trim().length > 0, 'empty reply');
  expect(/tokens\/s/.test(stats) && /usage/.test(stats), `stats: ${stats}`);
  console.log(`reply: ${JSON.stringify(reply)}; ${stats}`);
  await shot('chat');
});

await step('change a model setting and see it saved', async () => {
  await page.goto(`${base}${modelPath}`);
  await page.fill('#f-ctx_size', 'many');
  await page.click('#model-settings button[type=submit]');
  await page.waitForSelector('[data-error-for="ctx_size"]:has-text("not a whole number")');
  await shot('model-settings-error');
  await page.fill('#f-ctx_size', '1024');
  await page.fill('#f-temperature', '0.4');
  await page.click('#model-settings button[type=submit]');
  await page.waitForSelector('#settings-status:has-text("saved")');
  await page.reload();
  expect(await page.inputValue('#f-ctx_size') === '1024', 'ctx_size not kept');
  expect(await page.inputValue('#f-temperature') === '0.4', 'temperature not kept');
});

await step("see the worker's logs", async () => {
  await page.waitForSelector('#log span.line', { timeout: 15000 });  // the worker's stderr (with SKIP_WORKER: of a failed start)
  const lines = await page.locator('#log span.line').count();
  expect(lines > 0, 'no worker log lines');
  await page.click('#log-pause');
  expect(await page.getAttribute('#log-pause', 'aria-pressed') === 'true', 'pause not pressed');
  await page.click('#log-pause');
  await page.selectOption('#log-level', 'ERROR');
  await page.selectOption('#log-level', '');
  await shot('model-detail');
  await page.goto(`${base}/logs`);
  await page.waitForSelector('#log span.line', { timeout: 15000 });
  await shot('logs');
  // Picking a worker as the source shows its lines (the select switches on change).
  await page.selectOption('#log-source', model);
  await page.waitForURL(/\/logs\?model=/);
  await page.waitForSelector('#log span.line', { timeout: 15000 });
  expect((await page.getAttribute('#log', 'data-source')) === model, 'log source not switched');
});

await step('settings page shows sources and keys', async () => {
  await page.goto(`${base}/settings`);
  await page.waitForSelector('text=model_idle_timeout');
  await page.fill('#s-max_memory_percent', '150');
  await page.click('#settings-form button[type=submit]');
  await page.waitForSelector('[data-error-for="max_memory_percent"]:not(:empty)');
  await page.fill('#key-name', 'browser-test');
  await page.click('#key-form button[type=submit]');
  await page.waitForSelector('#key-created:not([hidden])');
  const key = await page.textContent('#key-value');
  expect(key.startsWith('ci-'), `key ${key}`);
  apiKey = key;
  await page.waitForSelector('#keys tr:has-text("browser-test") button[data-revoke]');
  expect(await page.isHidden('#keys-empty'), 'the "no API keys" note is still shown beside a key');
  await page.reload();
  await page.waitForSelector('#keys tr:has-text("browser-test")');
  expect(!(await page.content()).includes(key), 'the key is shown again after a reload');
  await shot('settings');
});

await workerStep('chat with the admin session when require_api_key is on', async () => {
  const setRequire = async (on) => {
    await page.goto(`${base}/settings`);
    await page.setChecked('#s-require_api_key', on);
    await page.click('#settings-form button[type=submit]');
    await page.waitForSelector('#settings-status:text-is("saved")');
  };
  await setRequire(true);
  // Keys are required, yet an outside client without one is refused while the logged-in page is not.
  const outside = await fetch(`${base}/v1/models`);
  expect(outside.status === 401, `/v1/models without a key answered ${outside.status}`);
  const withKey = await fetch(`${base}/v1/models`, { headers: { Authorization: `Bearer ${apiKey}` } });
  expect(withKey.status === 200, `/v1/models with the key answered ${withKey.status}`);
  await page.goto(`${base}/chat?model=${encodeURIComponent(model)}`);
  expect((await page.$('#chat-api-key')) === null, 'the playground still asks for an API key');
  await page.waitForSelector('#chat-key-note', { state: 'visible' });
  await page.fill('#chat-temperature', '0');
  await page.fill('#chat-max-tokens', '8');
  await page.fill('#chat-input', 'Say hi.');
  await page.click('#chat-send');
  await page.waitForSelector('.msg.assistant[data-streaming="false"] .text:not(:empty)', { timeout: 120000 });
  expect(!(await page.textContent('#chat-error')), `chat error: ${await page.textContent('#chat-error')}`);
  await shot('chat-require-api-key');
  await setRequire(false);
});

await workerStep('unload the model', async () => {
  await page.goto(`${base}/models`);
  await page.locator(`tr[data-model="${model}"] button[data-action="unload"]`).click();
  await page.waitForSelector(`tr[data-model="${model}"] [data-state-of]:has-text("stopped")`, { timeout: 60000 });
});

await step('download from Hugging Face', async () => {
  await page.goto(`${base}/models`);
  expect(hfRepo && hfFile, 'HF_REPO and HF_FILE must be set');
  await page.fill('#hf-repo', 'not a repo id');
  await page.click('#hf-list');
  await page.waitForSelector('#hf-error:has-text("owner/name")');
  await page.fill('#hf-repo', 'test/no-such-repo');
  await page.click('#hf-list');
  await page.waitForSelector('#hf-error:has-text("Cannot list test/no-such-repo")');
  await page.fill('#hf-repo', hfRepo);
  await page.click('#hf-list');
  const row = `#hf-files tr[data-file="${hfFile}"]`;
  await page.waitForSelector(row);
  const cells = await page.locator(`${row} td`).allTextContents();
  expect(/Q4_1/i.test(cells[1]) && /\d+(\.\d+)? MB/.test(cells[2]), `file row ${JSON.stringify(cells)}`);
  await page.click(`${row} button`);
  await page.waitForSelector('#downloads tr[data-download]');
  // Live progress: a bar strictly between empty and full while bytes flow.
  await page.waitForFunction(() => [...document.querySelectorAll('#downloads progress')].some((p) => p.value > 1 && p.value < p.max), null, { timeout: 60000 });
  await shot('models-downloading');
  await page.waitForSelector('#downloads tr[data-state="done"], #downloads tr[data-state="completed"], #downloads tr[data-state="failed"], #downloads tr[data-state="error"]', { timeout: 120000 });
  const st = await page.getAttribute('#downloads tr[data-download]', 'data-state');
  expect(st === 'done' || st === 'completed', `download ended ${st}: ${await page.textContent('#downloads')}`);
  await page.reload();
  await page.waitForSelector('#catalogue tr[data-model*="Q4_1"]');
  await shot('models-downloaded');

  // A second download, cancelled while its bytes flow: it ends "cancelled" and never reaches the catalogue.
  expect(hfCancelRepo, 'HF_CANCEL_REPO must be set');
  await page.fill('#hf-repo', hfCancelRepo);
  await page.click('#hf-list');
  await page.waitForSelector('#hf-files tbody tr button');
  await page.click('#hf-files tbody tr button');
  const active = '#downloads tr[data-download][data-state="downloading"]';
  await page.waitForFunction((sel) => [...document.querySelectorAll(`${sel} progress`)].some((p) => p.value > 1 && p.value < p.max), active, { timeout: 60000 });
  await page.click(`${active} button`);
  await page.waitForSelector('#downloads tr[data-state="cancelled"]', { timeout: 30000 });
  await page.reload();
  await page.waitForSelector('#downloads tr[data-state="cancelled"]');
  expect(await page.locator('#catalogue tr[data-model*="MiniLM"]').count() === 0, 'a cancelled download reached the catalogue');
});

await step('phone layout', async () => {
  const phone = await ctx.newPage();
  await phone.setViewportSize({ width: 390, height: 844 });
  for (const [name, path] of [['dashboard', '/'], ['models', '/models'], ['model-detail', modelPath], ['chat', '/chat'], ['logs', '/logs'], ['settings', '/settings']]) {
    await phone.goto(`${base}${path}`);
    await phone.waitForTimeout(400);
    if (path === '/') await phone.waitForSelector('#chart-cpu canvas');
    const overflow = await phone.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    expect(overflow <= 1, `${path} scrolls sideways by ${overflow}px on a phone`);
    await shot(`phone-${name}`, phone);
  }
  await phone.close();
});

await step('delete a model, with confirmation', async () => {
  await page.goto(`${base}/models`);
  const del = `tr[data-model="${model}"] button[data-action="delete"]`;
  await page.click(del);
  await page.waitForSelector('#confirm-delete[open]');
  expect((await page.textContent('#confirm-name')) === model, 'dialog names another model');
  await page.click('#confirm-delete button[value="cancel"]');
  await page.waitForSelector('#flash:has-text("delete cancelled")');
  expect(await page.locator(`tr[data-model="${model}"]`).count() === 1, 'cancelled delete removed the row');
  await page.click(del);
  await page.waitForSelector('#confirm-delete[open]');
  await shot('models-confirm-delete');
  await page.click('#confirm-yes');
  await page.waitForFunction((m) => !document.querySelector(`tr[data-model="${m}"]`), model, { timeout: 10000 });
  const left = await page.locator('#catalogue tbody tr').count();
  if (left === 0) await page.waitForSelector('p.empty:has-text("No models yet")');
  await page.goto(`${base}${modelPath}`);
  await page.waitForSelector('text=No model named');
});

await step('log out and be sent back to login', async () => {
  await page.click('#logout');
  await page.waitForURL(/\/login/);
  await page.goto(`${base}/settings`);
  await page.waitForURL(/\/login\?next=\/settings/);
});

if (consoleErrors.length) console.log(`console messages (failed requests are expected while a model loads): ${consoleErrors.join(' | ')}`);
if (pageErrors.length) {
  console.error(`FAIL uncaught script errors: ${pageErrors.join(' | ')}`);
  await browser.close();
  process.exit(1);
}
await browser.close();
console.log('all browser steps passed');
