// Times the page's CPU fallback (a browser without WebGPU: "Use the CPU
// instead") on the README's tiny run, next to the native runner's CPU
// backend on the same configs. A benchmark, not a test: it prints the
// step times each side reports.
//
//   bash scripts/build-web.sh /tmp/dist
//   DIST=/tmp/dist NATIVE_RUNNER=$CARGO_TARGET_DIR/debug/native-runner STEPS=3 \
//     node tests/e2e/bench-cpu-fallback.mjs
//
// DIST: the built app (served uncompressed); NATIVE_RUNNER (optional): the
// native binary to run `train --device cpu` with; STEPS: steps per side.
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
const steps = process.env.STEPS || '3';
const timings = (log) => log.split('\n').filter((l) => /step.* took|trained \d+ steps|caches ready/.test(l));

if (process.env.NATIVE_RUNNER) {
  const output = fs.mkdtempSync(path.join(os.tmpdir(), 'burnbooth-bench-'));
  const args = ['train', '--config', path.join(examples, 'tiny.env'), '--device', 'cpu', '--max-steps', steps, '--output-dir', output];
  // The runner reports on stderr.
  const run = spawnSync(process.env.NATIVE_RUNNER, args, { cwd: repo, encoding: 'utf8' });
  if (run.status !== 0) throw new Error(`the native runner failed:\n${run.stderr}`);
  const log = run.stdout + run.stderr;
  console.log(`native (${args.join(' ')}):\n  ${timings(log).join('\n  ')}`);
  fs.rmSync(output, { recursive: true, force: true });
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
// Without --enable-unsafe-webgpu headless Chromium offers no adapter.
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-dev-shm-usage'],
});
try {
  const page = await browser.newPage();
  await page.goto(`http://localhost:${server.address().port}/`);
  await page.waitForSelector('#gpu-status.bad', { timeout: 120_000 });
  await page.click('text=Use the CPU instead');
  await page.waitForSelector('#gpu-status.ok', { timeout: 120_000 });
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
  await page.fill('input[data-key="MAX_NUM_STEPS"]', steps);
  await page.locator('input[data-key="MAX_NUM_STEPS"]').dispatchEvent('change');
  await page.click('#train');
  await page.waitForFunction(() => document.querySelector('#phase')?.textContent === 'finished' || document.querySelector('#error')?.textContent, null, { timeout: 1_800_000 });
  const error = await page.locator('#error').textContent().catch(() => '');
  if (error) throw new Error(`the page: ${error}`);
  const log = await page.locator('#log').textContent();
  console.log(`browser, CPU fallback (${await page.locator('#gpu-status').textContent()}):\n  ${timings(log).join('\n  ')}`);
} finally {
  await browser.close();
  server.close();
}
