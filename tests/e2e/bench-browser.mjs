// Times the page's training against the native runner's on the README's
// tiny run, side by side in one process, as ratios. A benchmark, not a
// test (DEVELOPERS.md, "Headless Chromium").
//
//   bash scripts/build-web.sh /tmp/dist
//   DIST=/tmp/dist NATIVE_RUNNER=$CARGO_TARGET_DIR/debug/native-runner \
//     COMPUTE=webgpu STEPS=4 ROUNDS=2 node tests/e2e/bench-browser.mjs
//
// COMPUTE=webgpu (default): the page on WebGPU (headless Chromium's
// SwiftShader) against `train --device cpu-gpu` on the same SwiftShader
// Vulkan driver (VK_ICD_FILENAMES, the one Debian's chromium package ships).
// COMPUTE=cpu: the page's CPU fallback (no WebGPU; "Use the CPU instead")
// against `train --device cpu`. DIST: the built app (served uncompressed);
// NATIVE_RUNNER (optional): the native binary; STEPS: steps per run (at
// least 2: the steady pace leaves out the first step, which compiles
// kernels on a GPU); ROUNDS: native-then-browser pairs, interleaved so
// that both sides see the same machine.
import { chromium } from 'playwright-core';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const examples = path.join(repo, 'examples/dreambooth');
const model = path.join(repo, 'trainer-core/tests/fixtures/models/sd1/diffusers');
const dist = process.env.DIST;
if (!dist) throw new Error('DIST is not set (bash scripts/build-web.sh <folder>)');
const compute = process.env.COMPUTE || 'webgpu';
if (!['webgpu', 'cpu'].includes(compute)) throw new Error(`COMPUTE is webgpu or cpu, not ${compute}`);
const steps = Number(process.env.STEPS || '4');
if (!(steps >= 2)) throw new Error('STEPS must be at least 2');
const rounds = Number(process.env.ROUNDS || '1');
const swiftshader = '/usr/lib/chromium/vk_swiftshader_icd.json';

// Both hosts log through trainer-core's run loop (train/run.rs): "first step
// took F s" and "trained N steps in T s"; the steady pace is (T - F) / (N - 1).
function pace(log) {
  const first = Number(/first step took ([\d.]+) s/.exec(log)?.[1]);
  const trained = /trained (\d+) steps in ([\d.]+) s/.exec(log);
  if (!trained || Number.isNaN(first)) throw new Error(`no step timings in the log:\n${log}`);
  const [n, total] = [Number(trained[1]), Number(trained[2])];
  return { first, steady: (total - first) / (n - 1) };
}

function runNative() {
  const output = fs.mkdtempSync(path.join(os.tmpdir(), 'burnbooth-bench-'));
  const device = compute === 'webgpu' ? 'cpu-gpu' : 'cpu';
  const args = ['train', '--config', path.join(examples, 'tiny.env'), '--device', device, '--max-steps', String(steps), '--output-dir', output];
  const env = compute === 'webgpu' ? { ...process.env, VK_ICD_FILENAMES: swiftshader } : process.env;
  const run = spawnSync(process.env.NATIVE_RUNNER, args, { cwd: repo, encoding: 'utf8', env });
  fs.rmSync(output, { recursive: true, force: true });
  // The runner reports on stderr.
  if (run.status !== 0) throw new Error(`the native runner failed:\n${run.stderr}`);
  return pace(run.stdout + run.stderr);
}

const types = { '.html': 'text/html', '.js': 'text/javascript', '.wasm': 'application/wasm', '.css': 'text/css', '.json': 'application/json' };
const server = http
  .createServer((request, response) => {
    const name = decodeURIComponent(request.url.split('?')[0]);
    const file = path.join(dist, name === '/' ? 'index.html' : name);
    if (!file.startsWith(dist) || !fs.existsSync(file)) return response.writeHead(404).end();
    response.writeHead(200, { 'content-type': types[path.extname(file)] || 'application/octet-stream' }).end(fs.readFileSync(file));
  })
  .listen(0);

async function runBrowser() {
  // Without --enable-unsafe-webgpu headless Chromium offers no adapter. A
  // fresh profile each round: no shader cache carried between rounds.
  const args = ['--no-sandbox', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-dev-shm-usage'];
  if (compute === 'webgpu') args.push('--enable-unsafe-webgpu');
  const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || '/usr/bin/chromium', headless: true, args });
  try {
    const page = await browser.newPage();
    await page.goto(`http://localhost:${server.address().port}/`);
    if (compute === 'cpu') {
      await page.waitForSelector('#gpu-status.bad', { timeout: 120_000 });
      await page.click('text=Use the CPU instead');
    }
    await page.waitForSelector('#gpu-status.ok', { timeout: 120_000 });
    const adapter = await page.locator('#gpu-status').textContent();
    await page.setInputFiles('#model-folder', model);
    await page.waitForFunction(() => (document.querySelector('#model-info')?.textContent || '').includes('Stable Diffusion 1'), null, { timeout: 60_000 });
    await page.setInputFiles('#config-files', ['tiny.env', 'multidatabackend-tiny.json'].map((name) => path.join(examples, name)));
    await page.waitForSelector('.dataset', { timeout: 30_000 });
    const dataloader = JSON.parse(fs.readFileSync(path.join(examples, 'multidatabackend-tiny.json'), 'utf8'));
    for (const id of await page.locator('.dataset').evaluateAll((nodes) => nodes.map((n) => n.dataset.dataset))) {
      const folder = dataloader.find((d) => d.id === id).instance_data_dir;
      await page.setInputFiles(`.dataset[data-dataset="${id}"] input[type=file]`, path.join(examples, folder));
      await page.waitForFunction((id) => document.querySelector(`.dataset[data-dataset="${id}"] .count`)?.textContent.includes('picked'), id, { timeout: 30_000 });
    }
    await page.fill('input[data-key="MAX_NUM_STEPS"]', String(steps));
    await page.locator('input[data-key="MAX_NUM_STEPS"]').dispatchEvent('change');
    // Train without Plan: no preparation, so the first step compiles as the native one does.
    await page.click('#train');
    await page.waitForFunction(() => document.querySelector('#phase')?.textContent === 'finished' || document.querySelector('#error')?.textContent, null, { timeout: 1_800_000 });
    const error = await page.locator('#error').textContent().catch(() => '');
    if (error) throw new Error(`the page: ${error}`);
    return { adapter, ...pace(await page.locator('#log').textContent()) };
  } finally {
    await browser.close();
  }
}

const seconds = (x) => `${x.toFixed(2)} s`;
try {
  for (let round = 1; round <= rounds; round++) {
    const native = process.env.NATIVE_RUNNER ? runNative() : null;
    const browser = await runBrowser();
    let line = `round ${round} (${compute}, ${steps} steps): browser steady ${seconds(browser.steady)}, first ${seconds(browser.first)} [${browser.adapter}]`;
    if (native) {
      line += `; native steady ${seconds(native.steady)}, first ${seconds(native.first)}`;
      line += `; browser/native steady ${(browser.steady / native.steady).toFixed(2)}x`;
    }
    console.log(line);
  }
} finally {
  server.close();
}
