// Drives the Burnbooth app in Debian's headless Chromium on WebGPU, as a
// user would: pick the model folder, import the configs, pick each
// dataset's folder, plan, train, wait for the chart and a validation image,
// download the LoRA, reload and check that the run was saved in OPFS.
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

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: [
    '--enable-unsafe-webgpu', '--no-sandbox', '--disable-background-networking', '--disable-component-update',
    '--disable-sync', '--no-first-run', '--disable-dev-shm-usage',
  ],
});
const context = await browser.newContext({ acceptDownloads: true, viewport: { width: 1280, height: 900 } });
const page = await context.newPage();
const consoleLines = [];
page.on('console', (m) => consoleLines.push(`${m.type()}: ${m.text()}`));
page.on('pageerror', (e) => consoleLines.push(`pageerror: ${e.message}`));
let shot = 0;
const screenshot = async (name) => {
  shot += 1;
  await page.screenshot({ path: path.join(outDir, `${String(shot).padStart(2, '0')}-${name}.png`), fullPage: true });
};
const fail = async (message) => {
  say(`FAILED: ${message}`);
  await screenshot('failure').catch(() => {});
  fs.writeFileSync(path.join(outDir, 'console.txt'), consoleLines.join('\n'));
  await browser.close();
  process.exit(1);
};
const errorText = async () => (await page.locator('#error').textContent({ timeout: 900_000 })) || '';

try {
  await page.goto(url);
  await page.waitForSelector('#gpu-status.ok, #gpu-status.bad', { timeout: 120_000 });
  const gpu = await page.locator('#gpu-status').textContent();
  say(`GPU: ${gpu}`);
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
  await page.setInputFiles('#model-folder', modelDir);
  await page.waitForFunction(() => (document.querySelector('#model-info')?.textContent || '').includes('Stable Diffusion 1'), null, { timeout: 60_000 });
  await page.waitForSelector('#model-fit', { timeout: 60_000 });
  const fit = await page.locator('#model-fit').textContent();
  say(`model: ${await page.locator('#model-info').textContent()} / ${fit}`);
  if (!(await page.locator('#model-fit.ok').count())) await fail(`model refused: ${fit}`);

  await page.setInputFiles('#config-files', configs);
  await page.waitForSelector('.dataset', { timeout: 30_000 });
  const datasets = await page.locator('.dataset').evaluateAll((nodes) => nodes.map((n) => n.dataset.dataset));
  const dataloader = JSON.parse(fs.readFileSync(configs.find((c) => c.endsWith('.json')), 'utf8'));
  for (const id of datasets) {
    const entry = dataloader.find((d) => d.id === id);
    await page.setInputFiles(`.dataset[data-dataset="${id}"] input[type=file]`, path.join(workDir, entry.instance_data_dir));
    await page.waitForFunction((id) => document.querySelector(`.dataset[data-dataset="${id}"] .count`)?.textContent.includes('picked'), id, { timeout: 30_000 });
  }
  say(`datasets picked: ${datasets.join(', ')}`);
  await screenshot('configs-and-photos');

  await page.click('#plan');
  await page.waitForFunction(() => document.querySelector('#plan-json')?.textContent.length > 0 || document.querySelector('#error')?.textContent.length > 0, null, { timeout: 60_000 });
  if (await errorText()) await fail(`plan: ${await errorText()}`);
  fs.writeFileSync(path.join(outDir, 'plan.json'), await page.locator('#plan-json').textContent());
  fs.writeFileSync(path.join(outDir, 'plan.txt'), await page.locator('#plan-text').textContent());
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
  await page.setInputFiles('#model-folder', modelDir);
  await page.waitForSelector('#model-fit.ok', { timeout: 60_000 });
  await page.setInputFiles('#config-files', configs);
  await page.waitForSelector('.dataset', { timeout: 30_000 });
  for (const id of datasets) {
    const entry = dataloader.find((d) => d.id === id);
    await page.setInputFiles(`.dataset[data-dataset="${id}"] input[type=file]`, path.join(workDir, entry.instance_data_dir));
    await page.waitForFunction((id) => document.querySelector(`.dataset[data-dataset="${id}"] .count`)?.textContent.includes('picked'), id, { timeout: 30_000 });
  }
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
  // Stop saves a checkpoint; Train continues from it to the end.
  await page.click('#stop');
  const stopped = await waitPhase('stopping', (phase) => phase.startsWith('stopped'));
  say(`paused at step ${pausedAt} (still: ${pausedStill}); ${stopped}`);
  await page.click('#train');
  await waitPhase('training after stop', (phase) => phase === 'finished');
  const resumeLog = await page.locator('#log').textContent();
  const resumedLosses = JSON.parse(await page.locator('#loss-chart').getAttribute('data-losses'));
  say(`resumed: ${resumeLog.split('\n').filter((l) => l.startsWith('resumed') || l.startsWith('caches')).join(' / ')}`);
  await screenshot('resumed');

  // Another run in the same tab: import its configs, pick the folders again,
  // train to the end; returns the paths the outputs panel offers.
  const otherRun = async (files, exportEnd, what) => {
    const started = Date.now();
    await page.setInputFiles('#config-files', files);
    await page.waitForSelector('.dataset', { timeout: 30_000 });
    for (const id of datasets) {
      const entry = dataloader.find((d) => d.id === id);
      await page.setInputFiles(`.dataset[data-dataset="${id}"] input[type=file]`, path.join(workDir, entry.instance_data_dir));
      await page.waitForFunction((id) => document.querySelector(`.dataset[data-dataset="${id}"] .count`)?.textContent.includes('picked'), id, { timeout: 30_000 });
    }
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

  fs.writeFileSync(path.join(outDir, 'result.json'), JSON.stringify({ sdxlModel, fullOutputs, galleryCaptions, lockRefusal, pausedAt, pausedStill, stopped, resumeLog, resumedLosses, tokens, regPlan, trainSeconds, chartPoints, losses, galleryImages, longestFrameGapMs: longestGap, saved, stats, gpu, selfTestWithShim: withShim, selfTestWithoutShim: withoutShim }, null, 2));
  fs.writeFileSync(path.join(outDir, 'console.txt'), consoleLines.join('\n'));
  await browser.close();
  say('done');
} catch (e) {
  await fail(e.stack || String(e));
}
