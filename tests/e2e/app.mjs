// Drives the Burnbooth app in Debian's headless Chromium on WebGPU, as a
// user would: pick the model folder, import the configs, pick each
// dataset's folder, plan, train, wait for the chart and a validation image,
// download the LoRA, reload and check that the run was saved in OPFS.
// Storage faults are injected into the training worker's OPFS writes
// (installFaults): a tab closed mid-write, twice, and a full storage; at the
// end the GPU device is destroyed mid-run.
//
// Run by native-runner/tests/browser.rs, which serves the built app and
// checks what this writes to OUT_DIR against the native runner.
//   APP_URL   the served app
//   MODEL_DIR the diffusers folder to pick
//   SDXL_MODEL_DIR (optional) an SDXL folder to pick first, to check the page's summary
//   WORK_DIR  holds the configs (CONFIGS, comma-separated names) and the dataset folders
//   OUT_DIR   where plan.json, the LoRA, log.txt and screenshots go
//   TRAIN_TIMEOUT_S how long training may take
import { chromium } from 'playwright-core';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const url = env('APP_URL');
const modelDir = env('MODEL_DIR');
const workDir = env('WORK_DIR');
const outDir = env('OUT_DIR');
const configs = env('CONFIGS').split(',').map((name) => path.join(workDir, name));
const trainTimeout = Number(process.env.TRAIN_TIMEOUT_S || 1200) * 1000;

const started = Date.now();
const say = (line) => console.log(`[${((Date.now() - started) / 1000).toFixed(1)} s] ${line}`);

// An on-disk profile, as users have: an incognito-like context (playwright's
// newContext) keeps OPFS in the memory of Chromium's storage service, and
// twice in about twenty runs here every file saved before some moment of
// a run was gone at the next visit while everything written after it was
// there, as if that service had restarted empty (DEVELOPERS.md).
const profileDir = fs.mkdtempSync(path.join(os.tmpdir(), 'burnbooth-profile-'));
const context = await chromium.launchPersistentContext(profileDir, {
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: [
    '--enable-unsafe-webgpu', '--no-sandbox', '--disable-background-networking', '--disable-component-update',
    '--disable-sync', '--no-first-run', '--disable-dev-shm-usage',
  ],
  acceptDownloads: true,
  viewport: { width: 1280, height: 900 },
});
const closeBrowser = async () => {
  await context.close();
  fs.rmSync(profileDir, { recursive: true, force: true });
};
const consoleLines = [];
// A tab of the app; the storage tests close the tab and open another (the
// browser's storage stays, as for a user who closes and comes back).
const openPage = async () => {
  const opened = await context.newPage();
  // Every text the status pill shows (the trainer's download progress first).
  await opened.addInitScript(() => {
    window.burnboothPillTexts = [];
    new MutationObserver(() => {
      const text = document.getElementById('gpu-status')?.textContent;
      if (text && window.burnboothPillTexts.at(-1) !== text) window.burnboothPillTexts.push(text);
    }).observe(document, { subtree: true, childList: true, characterData: true });
  });
  opened.on('console', (m) => consoleLines.push(`${m.type()}: ${m.text()}`));
  opened.on('pageerror', (e) => consoleLines.push(`pageerror: ${e.message}`));
  return opened;
};
let page = await openPage();
let shot = 0;
const screenshot = async (name) => {
  shot += 1;
  await page.screenshot({ path: path.join(outDir, `${String(shot).padStart(2, '0')}-${name}.png`), fullPage: true });
};
const fail = async (message) => {
  say(`FAILED: ${message}`);
  await screenshot('failure').catch(() => {});
  fs.writeFileSync(path.join(outDir, 'console.txt'), consoleLines.join('\n'));
  await closeBrowser();
  process.exit(1);
};
const errorText = async () => (await page.locator('#error').textContent({ timeout: 900_000 })) || '';

// Runs in the training worker: wraps the OPFS calls so that each writable
// stream knows its file's path, and lets `self.burnboothFaults.rule` make the
// writes to matching paths (after `after` of them went through) hang, as if
// the tab closed mid-write, or fail with the browser's QuotaExceededError.
const installFaults = () => {
  if (self.burnboothFaults) return;
  self.burnboothFaults = { rule: null, passed: 0, hit: null };
  const paths = new WeakMap();
  const pathOf = (handle) => paths.get(handle) || '';
  for (const method of ['getDirectoryHandle', 'getFileHandle']) {
    const original = FileSystemDirectoryHandle.prototype[method];
    FileSystemDirectoryHandle.prototype[method] = async function (name, options) {
      const handle = await original.call(this, name, options);
      paths.set(handle, `${pathOf(this)}/${name}`);
      return handle;
    };
  }
  const createWritable = FileSystemFileHandle.prototype.createWritable;
  FileSystemFileHandle.prototype.createWritable = async function (options) {
    const stream = await createWritable.call(this, options);
    paths.set(stream, pathOf(this));
    return stream;
  };
  const write = FileSystemWritableFileStream.prototype.write;
  FileSystemWritableFileStream.prototype.write = function (data) {
    const faults = self.burnboothFaults;
    const path = pathOf(this);
    if (faults.rule && !faults.hit && path.includes(faults.rule.match)) {
      if (faults.passed < (faults.rule.after || 0)) {
        faults.passed += 1;
      } else {
        faults.hit = path;
        if (faults.rule.mode === 'hang') return new Promise(() => {});
        return Promise.reject(new DOMException('injected by the browser test', 'QuotaExceededError'));
      }
    }
    return write.call(this, data);
  };
};
const trainingWorker = async () => {
  for (let i = 0; i < 1200; i++) {
    const worker = page.workers().find((w) => w.url().includes('worker-boot'));
    if (worker) return worker;
    await page.waitForTimeout(100);
  }
  throw new Error('the training worker did not start');
};
// Sets (or with null clears) the fault rule: { match, after, mode: 'hang' | 'quota' }.
const setFault = async (rule) => {
  const worker = await trainingWorker();
  await worker.evaluate(installFaults);
  await worker.evaluate((rule) => Object.assign(self.burnboothFaults, { rule, passed: 0, hit: null }), rule);
};
// Waits until the fault rule struck; returns the path of the write it stopped.
const faultHit = async (what) => {
  const worker = await trainingWorker();
  for (let i = 0; i < 1800; i++) {
    const hit = await worker.evaluate(() => self.burnboothFaults.hit);
    if (hit) return hit;
    if (await errorText()) await fail(`${what}: ${await errorText()}`);
    await page.waitForTimeout(1000);
  }
  await fail(`${what}: the injected fault never struck`);
};
// Every file in the browser's storage (OPFS), read from the page: path,
// size, and for safetensors files whether the header's tensors fill it exactly.
const listStorage = () => page.evaluate(async () => {
  const files = [];
  const walk = async (dir, prefix) => {
    for await (const [name, handle] of dir.entries()) {
      const path = `${prefix}/${name}`;
      if (handle.kind === 'directory') {
        await walk(handle, path);
        continue;
      }
      const bytes = await (await handle.getFile()).arrayBuffer();
      let whole = null;
      if (name.endsWith('.safetensors')) {
        try {
          const length = Number(new DataView(bytes).getBigUint64(0, true));
          const header = JSON.parse(new TextDecoder().decode(bytes.slice(8, 8 + length)));
          const end = Math.max(0, ...Object.entries(header).filter(([k]) => k !== '__metadata__').map(([, t]) => t.data_offsets[1]));
          whole = 8 + length + end === bytes.byteLength;
        } catch {
          whole = false;
        }
      }
      files.push({ path, size: bytes.byteLength, whole });
    }
  };
  await walk(await navigator.storage.getDirectory(), '');
  return files;
});
// Closes the tab and opens the app in a new one, which loads the saved files.
const reopen = async () => {
  await page.close();
  page = await openPage();
  await page.goto(url);
  await page.waitForFunction(() => document.querySelector('footer')?.textContent.startsWith('Saved in this browser'), null, { timeout: 60_000 });
  await page.waitForSelector('#gpu-status.ok', { timeout: 120_000 });
  return page.locator('footer').textContent();
};

try {
  await page.goto(url);
  await page.waitForSelector('#gpu-status.ok, #gpu-status.bad', { timeout: 120_000 });
  const gpu = await page.locator('#gpu-status').textContent();
  say(`GPU: ${gpu}`);
  const pillTexts = await page.evaluate(() => window.burnboothPillTexts);
  say(`status pill: ${pillTexts.join(' / ')}`);
  fs.writeFileSync(path.join(outDir, 'gpu.txt'), gpu);
  if (!(await page.locator('#gpu-status.ok').count())) await fail(`no WebGPU: ${gpu}`);
  await screenshot('start');

  // An SDXL folder first: the page names the family and says whether the adapter can hold it.
  let sdxlModel = null;
  if (process.env.SDXL_MODEL_DIR) {
    await page.setInputFiles('#model-folder', process.env.SDXL_MODEL_DIR);
    await page.waitForFunction(() => (document.querySelector('#model-info')?.textContent || '').includes('Stable Diffusion XL'), null, { timeout: 60_000 });
    sdxlModel = `${await page.locator('#model-info').textContent()} / ${await page.locator('#model-fit').textContent()}`;
    say(`SDXL model: ${sdxlModel}`);
  }
  // The model folder, then configs and each dataset's folder, as a user picks them.
  const pickModel = async () => {
    await page.setInputFiles('#model-folder', modelDir);
    await page.waitForFunction(() => (document.querySelector('#model-info')?.textContent || '').includes('Stable Diffusion 1'), null, { timeout: 60_000 });
    await page.waitForSelector('#model-fit', { timeout: 60_000 });
    const fit = await page.locator('#model-fit').textContent();
    if (!(await page.locator('#model-fit.ok').count())) await fail(`model refused: ${fit}`);
    return `${await page.locator('#model-info').textContent()} / ${fit}`;
  };
  const dataloader = JSON.parse(fs.readFileSync(configs.find((c) => c.endsWith('.json')), 'utf8'));
  const pickConfigs = async (files) => {
    await page.setInputFiles('#config-files', files);
    await page.waitForSelector('.dataset', { timeout: 30_000 });
    const ids = await page.locator('.dataset').evaluateAll((nodes) => nodes.map((n) => n.dataset.dataset));
    for (const id of ids) {
      const entry = dataloader.find((d) => d.id === id);
      await page.setInputFiles(`.dataset[data-dataset="${id}"] input[type=file]`, path.join(workDir, entry.instance_data_dir));
      await page.waitForFunction((id) => document.querySelector(`.dataset[data-dataset="${id}"] .count`)?.textContent.includes('picked'), id, { timeout: 30_000 });
    }
    return ids;
  };
  say(`model: ${await pickModel()}`);
  const datasets = await pickConfigs(configs);
  say(`datasets picked: ${datasets.join(', ')}`);
  await screenshot('configs-and-photos');

  // A tab closed while the first save (the caches) is under way: the
  // fifth cache file's write never finishes. The next visit must find
  // only whole cache entries, and the run recomputes the rest.
  await setFault({ match: '/cache/', after: 4, mode: 'hang' });
  await page.click('#train');
  const cacheHit = await faultHit('the first run, until its fifth cache write');
  const beforeClose = await listStorage();
  const interruptedLog = await page.locator('#log').textContent();
  await reopen();
  const afterReopen = await listStorage();
  const interruptedCaching = {
    hit: cacheHit,
    log: interruptedLog,
    partialBefore: beforeClose.filter((f) => f.path.endsWith('.partial')).map((f) => f.path),
    partialAfter: afterReopen.filter((f) => f.path.endsWith('.partial')).map((f) => f.path),
    cacheEntries: afterReopen.filter((f) => f.path.includes('/cache/')),
  };
  say(`tab closed while writing ${cacheHit}; the next visit found ${interruptedCaching.cacheEntries.length} cache entries`);
  await pickModel();
  await pickConfigs(configs);

  // What the page says about compiling kernels during Plan's preparation.
  await page.evaluate(() => {
    window.burnboothKernelTexts = [];
    const kernels = document.querySelector('#kernels');
    new MutationObserver(() => {
      const text = kernels.textContent;
      if (text && window.burnboothKernelTexts.at(-1) !== text) window.burnboothKernelTexts.push(text);
    }).observe(kernels, { childList: true, characterData: true, subtree: true });
  });
  await page.click('#plan');
  await page.waitForFunction(() => document.querySelector('#plan-json')?.textContent.length > 0 || document.querySelector('#error')?.textContent.length > 0, null, { timeout: 60_000 });
  if (await errorText()) await fail(`plan: ${await errorText()}`);
  fs.writeFileSync(path.join(outDir, 'plan.json'), await page.locator('#plan-json').textContent());
  fs.writeFileSync(path.join(outDir, 'plan.txt'), await page.locator('#plan-text').textContent());
  // Plan has the worker fill the caches and compile the run's kernels with
  // a discarded step (app/src/run.rs, prepare), as while a user reads the
  // plan: Train's first step is then a steady one.
  const prepareStarted = Date.now();
  await page.waitForFunction(() => /GPU kernels ready|preparing before Train failed/.test(document.querySelector('#log')?.textContent || ''), null, { timeout: trainTimeout });
  const prepareSeconds = (Date.now() - prepareStarted) / 1000;
  const kernelTexts = await page.evaluate(() => window.burnboothKernelTexts);
  say(`prepared after the plan in ${prepareSeconds.toFixed(1)} s; the page said ${kernelTexts.length} kernel counts, the last "${kernelTexts.at(-1)}"`);
  await screenshot('plan');

  // Training: record how responsive the page stays (a frame counter).
  await page.evaluate(() => {
    window.burnboothFrames = [];
    const tick = (t) => { window.burnboothFrames.push(t); requestAnimationFrame(tick); };
    requestAnimationFrame(tick);
  });
  const trainStarted = Date.now();
  await page.click('#train');
  let midShot = false;
  for (;;) {
    await page.waitForTimeout(2000);
    const phase = (await page.locator('#phase').textContent({ timeout: 900_000 })) || '';
    if (await errorText()) await fail(`training: ${await errorText()}`);
    if (!midShot && Number(await page.locator('#loss-chart').getAttribute('data-points')) > 0) {
      midShot = true;
      await screenshot('training');
    }
    if (phase === 'finished') break;
    if (Date.now() - trainStarted > trainTimeout) await fail(`training did not finish in ${trainTimeout / 1000} s (phase: ${phase})`);
  }
  const trainSeconds = (Date.now() - trainStarted) / 1000;
  const frames = await page.evaluate(() => window.burnboothFrames);
  let longestGap = 0;
  for (let i = 1; i < frames.length; i++) longestGap = Math.max(longestGap, frames[i] - frames[i - 1]);
  const log = await page.locator('#log').textContent();
  fs.writeFileSync(path.join(outDir, 'log.txt'), log);
  const chartPoints = Number(await page.locator('#loss-chart').getAttribute('data-points'));
  const losses = JSON.parse(await page.locator('#loss-chart').getAttribute('data-losses'));
  const galleryImages = await page.locator('#gallery img').count();
  const galleryCaptions = await page.locator('#gallery figcaption').allTextContents();
  const stats = await page.locator('#stats').textContent();
  say(`trained in ${trainSeconds.toFixed(1)} s; ${stats}; longest frame gap ${longestGap.toFixed(0)} ms`);
  await screenshot('trained');

  const download = page.waitForEvent('download', { timeout: 30_000 });
  await page.click('#outputs button.primary');
  const lora = await download;
  await lora.saveAs(path.join(outDir, 'lora.safetensors'));
  say(`downloaded ${lora.suggestedFilename()}`);

  // The tools panel: the rare-token finder and a regularisation set that
  // goes into the dataloader config and the plan.
  const setField = async (selector, value) => {
    await page.fill(selector, value);
    await page.locator(selector).dispatchEvent('change');
  };
  await setField('#token-check', 'sks, zwxrobot');
  await page.click('#find-token');
  await page.waitForFunction(() => document.querySelectorAll('#tokens tr').length >= 3 || document.querySelector('#error')?.textContent, null, { timeout: 300_000 });
  if (await errorText()) await fail(`find-token: ${await errorText()}`);
  const tokens = await page.locator('#tokens').innerText();
  say(`tokens:\n${tokens}`);
  await setField('#sample-steps', '2');
  await setField('#reg-count', '2');
  await page.click('#make-reg');
  await page.waitForFunction(() => document.querySelector('#reg-entry') || document.querySelector('#error')?.textContent, null, { timeout: 600_000 });
  if (await errorText()) await fail(`make-reg: ${await errorText()}`);
  await page.click('#reg-add');
  await page.click('#plan');
  await page.waitForFunction(() => document.querySelector('#plan-text')?.textContent.includes('regularisation-data'), null, { timeout: 60_000 });
  const regPlan = await page.locator('#plan-text').textContent();
  await screenshot('tools');

  // A new visit finds the run in the browser's storage.
  await page.reload();
  await page.waitForFunction(() => document.querySelector('footer')?.textContent.startsWith('Saved in this browser'), null, { timeout: 60_000 });
  const saved = await page.locator('footer').textContent();
  say(saved);
  await screenshot('reloaded');

  // Coming back: pick the same files, ask for one more step in the form,
  // and training continues from the saved checkpoint without re-encoding.
  await page.waitForSelector('#gpu-status.ok', { timeout: 120_000 });
  await pickModel();
  await pickConfigs(configs);
  await page.fill('input[data-key="MAX_NUM_STEPS"]', '6');
  await page.locator('input[data-key="MAX_NUM_STEPS"]').dispatchEvent('change');
  const resumeStarted = Date.now();
  const phaseNow = async () => (await page.locator('#phase').textContent({ timeout: 900_000 })) || '';
  const points = async () => Number(await page.locator('#loss-chart').getAttribute('data-points'));
  // Waits until `done(phase)`; fails on an error or after the training timeout.
  const waitPhase = async (what, done) => {
    for (;;) {
      await page.waitForTimeout(1000);
      if (await errorText()) await fail(`${what}: ${await errorText()}`);
      const phase = await phaseNow();
      if (await done(phase)) return phase;
      if (Date.now() - resumeStarted > trainTimeout) await fail(`${what}: timed out (phase: ${phase})`);
    }
  };
  // One run per output folder across tabs: while another tab holds the
  // folder's Web Lock (app/src/run.rs, output_lock_name), Train is refused.
  const outputDir = fs.readFileSync(configs.find((c) => c.endsWith('.env')), 'utf8').match(/^OUTPUT_DIR=(.*)$/m)[1];
  await page.evaluate((name) => new Promise((held) => {
    navigator.locks.request(name, () => { held(); return new Promise((release) => { window.burnboothRelease = release; }); });
  }), `burnbooth-output:${outputDir}`);
  await page.click('#train');
  await page.waitForFunction(() => (document.querySelector('#error')?.textContent || '').includes('another tab'), null, { timeout: 120_000 });
  const lockRefusal = await errorText();
  say(`while another tab holds ${outputDir}: ${lockRefusal}`);
  await page.evaluate(() => window.burnboothRelease());
  await page.click('#train');
  // Pause once step 4 is on the chart: the step under way finishes, then nothing moves.
  await waitPhase('resumed training', async () => (await points()) >= 4);
  await page.click('#pause');
  await waitPhase('pausing', (phase) => phase === 'paused');
  const pausedAt = await points();
  await page.waitForTimeout(5000);
  const pausedStill = (await points()) === pausedAt && (await phaseNow()) === 'paused';
  await screenshot('paused');
  // Stop saves a checkpoint, but the storage is full: the run stops with
  // a message, what was saved stays, and the checkpoint is kept in the tab.
  await setFault({ match: '/checkpoints/', mode: 'quota' });
  await page.click('#stop');
  await page.waitForFunction(() => document.querySelector('#error')?.textContent, null, { timeout: 600_000 });
  const quotaError = await errorText();
  const quotaHit = await faultHit('stopping with a full storage');
  const afterQuota = (await listStorage()).filter((f) => f.path.includes('/checkpoints/')).map((f) => f.path);
  say(`paused at step ${pausedAt} (still: ${pausedStill}); the storage full at ${quotaHit}: ${quotaError}`);
  await screenshot('storage-full');
  // With space again, Train continues from that checkpoint and saves it.
  // Then the tab closes while the last checkpoint's state.json is written:
  // the next visit finds the checkpoints before it whole, and not that one.
  await setFault({ match: 'checkpoint-00000006/state.json', mode: 'hang' });
  await page.click('#train');
  await waitPhase('training after stop', async () => (await points()) >= 6);
  const lastHit = await faultHit('the last checkpoint of the resumed run');
  const resumeLog = await page.locator('#log').textContent();
  const resumedLosses = JSON.parse(await page.locator('#loss-chart').getAttribute('data-losses'));
  say(`resumed: ${resumeLog.split('\n').filter((l) => l.startsWith('resumed') || l.startsWith('caches')).join(' / ')}`);
  await screenshot('resumed');
  const lastSaved = await reopen();
  const afterLast = await listStorage();
  const checkpointFiles = afterLast.filter((f) => f.path.includes('/output/browser/checkpoints/'));
  say(`tab closed while writing ${lastHit}; the next visit: ${lastSaved}`);
  await pickModel();

  // Another run in the same tab: import its configs, pick the folders again,
  // train to the end; returns the paths the outputs panel offers.
  const otherRun = async (files, exportEnd, what) => {
    const started = Date.now();
    await pickConfigs(files);
    await page.click('#train');
    await page.waitForFunction(
      (end) => [...document.querySelectorAll('#outputs button.link')].some((b) => (b.dataset.path || '').endsWith(end)) || document.querySelector('#error')?.textContent,
      exportEnd,
      { timeout: trainTimeout },
    );
    if (await errorText()) await fail(`${what}: ${await errorText()}`);
    await page.waitForFunction(() => document.querySelector('#phase')?.textContent === 'finished', null, { timeout: 120_000 });
    const outputs = await page.locator('#outputs button.link').evaluateAll((buttons) => buttons.map((b) => b.dataset.path));
    say(`${what} in ${((Date.now() - started) / 1000).toFixed(1)} s: ${outputs.join(', ')}`);
    await screenshot(what.replace(/ /g, '-'));
    return outputs;
  };
  // A full fine-tune in the tab ends with its exports, as the native runner's does.
  const fullOutputs = await otherRun([path.join(workDir, env('FULL_CONFIG')), configs.find((c) => c.endsWith('.json'))], '/burnbooth-model.safetensors', 'full fine-tune');
  // The options example's LyCORIS adapters (its lycoris_config.json imported
  // with the configs) and Prodigy, for one step; its LoRA is downloaded.
  const optionsFiles = env('OPTIONS_CONFIGS').split(',').map((name) => path.join(workDir, name));
  await otherRun(optionsFiles, 'browser-options/burnbooth-lora.safetensors', 'options run');
  // As written (a JSON round trip here would turn 1.0 into 1).
  fs.writeFileSync(path.join(outDir, 'options-plan.json'), await page.locator('#plan-json').textContent());
  const optionsDownload = page.waitForEvent('download', { timeout: 30_000 });
  await page.click('#outputs button.primary');
  await (await optionsDownload).saveAs(path.join(outDir, 'options-lora.safetensors'));

  // The GPU self-test, with the subgroups workaround and without it.
  const selfTest = async (p) => {
    await p.waitForSelector('#gpu-status.ok, #gpu-status.bad', { timeout: 120_000 });
    await p.click('#self-test');
    await p.waitForFunction(() => document.querySelector('#self-test-result') || document.querySelector('#error')?.textContent, null, { timeout: 600_000 });
    const result = await p.locator('#self-test-result').count() ? await p.locator('#self-test-result').textContent() : null;
    return { ok: result !== null && (await p.locator('#self-test-result.ok').count()) > 0, text: result || (await p.locator('#error').textContent()) };
  };
  const withShim = await selfTest(page);
  say(`self-test with the subgroups workaround: ${JSON.stringify(withShim)}`);
  const bare = await context.newPage();
  bare.on('console', (m) => consoleLines.push(`no-shim ${m.type()}: ${m.text()}`));
  await bare.goto(url + '?no-subgroups-shim');
  const withoutShim = await selfTest(bare);
  say(`self-test without it: ${JSON.stringify(withoutShim)}`);
  await bare.close();

  // The GPU lost during a run (the worker's device destroyed, as a driver
  // reset would lose it): the page says so at once and ends the worker,
  // and the next visit still has the options run's checkpoint.
  await page.fill('input[data-key="MAX_NUM_STEPS"]', '2');
  await page.locator('input[data-key="MAX_NUM_STEPS"]').dispatchEvent('change');
  await page.click('#train');
  await page.waitForFunction(() => (document.querySelector('#log')?.textContent || '').includes('resumed from output/browser-options'), null, { timeout: 600_000 });
  await (await trainingWorker()).evaluate(() => self.burnboothGpuDevice.destroy());
  await page.waitForFunction(() => (document.querySelector('#error')?.textContent || '').includes('GPU was lost'), null, { timeout: 60_000 });
  const gpuLost = {
    error: await errorText(),
    pill: await page.locator('#gpu-status').textContent(),
    trainEnabled: await page.locator('#train').isEnabled(),
    workers: page.workers().length,
  };
  await screenshot('gpu-lost');
  gpuLost.saved = await reopen();
  say(`GPU lost: ${JSON.stringify(gpuLost)}`);

  fs.writeFileSync(path.join(outDir, 'result.json'), JSON.stringify({ pillTexts, sdxlModel, fullOutputs, galleryCaptions, lockRefusal, pausedAt, pausedStill, interruptedCaching, quotaError, quotaHit, afterQuota, lastHit, lastSaved, checkpointFiles, resumeLog, resumedLosses, tokens, regPlan, prepareSeconds, kernelTexts, trainSeconds, chartPoints, losses, galleryImages, longestFrameGapMs: longestGap, saved, stats, gpu, selfTestWithShim: withShim, selfTestWithoutShim: withoutShim, gpuLost }, null, 2));
  fs.writeFileSync(path.join(outDir, 'console.txt'), consoleLines.join('\n'));
  await closeBrowser();
  say('done');
} catch (e) {
  await fail(e.stack || String(e));
}
