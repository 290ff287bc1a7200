// Starts the training worker (burnbooth-worker, built by Trunk as a
// no-modules wasm-bindgen worker).
//
// wgpu's WebGPU backend does not pass the adapter's `subgroups` feature on
// when it creates the device, yet cubecl's matmul kernels say
// `enable subgroups;`: Chrome then rejects them and loses the device. Ask
// for the feature ourselves whenever the adapter has it. `?no-subgroups-shim`
// on the page's address turns this off (the browser test checks that the
// workaround is still needed; see DEVELOPERS.md).
//
// A lost GPU (a driver reset, the browser reclaiming it) would leave a run
// waiting on a readback that never comes: the page hears of it here, ends
// this worker and says what to do. The worker's device stays reachable as
// `self.burnboothGpuDevice` (the browser test destroys it).
if (typeof GPUAdapter !== 'undefined') {
  const shim = !new URLSearchParams(self.location.search).has('no-subgroups-shim');
  const requestDevice = GPUAdapter.prototype.requestDevice;
  GPUAdapter.prototype.requestDevice = async function (descriptor) {
    descriptor = Object.assign({}, descriptor || {});
    if (shim) {
      const features = new Set(descriptor.requiredFeatures || []);
      if (this.features.has('subgroups')) features.add('subgroups');
      descriptor.requiredFeatures = [...features];
    }
    const device = await requestDevice.call(this, descriptor);
    self.burnboothGpuDevice = device;
    device.lost.then((info) => self.postMessage({ burnboothGpuLost: `${info.reason || 'unknown'}: ${info.message || 'no details'}` }));
    return device;
  };
}
// Compiling pipelines is most of a first step on WebGPU and happens in the
// GPU process, out of the worker's sight: count them for the page
// ("compiling GPU kernels 37/120", {burnboothKernels}, outside the message
// protocol, since the worker's wasm is busy or waiting meanwhile). A pop of
// an error scope answers only once the GPU process has handled the commands
// before it, the pipeline's compilation included; an 'out-of-memory' scope
// catches nothing a pipeline can raise, so its errors still reach wgpu. The
// run reads the totals from `self.burnboothKernels` (app/src/gpu.rs).
if (typeof GPUDevice !== 'undefined') {
  const kernels = { created: 0, compiled: 0 };
  self.burnboothKernels = kernels;
  const report = () => self.postMessage({ burnboothKernels: { created: kernels.created, compiled: kernels.compiled } });
  const createComputePipeline = GPUDevice.prototype.createComputePipeline;
  GPUDevice.prototype.createComputePipeline = function (descriptor) {
    kernels.created += 1;
    this.pushErrorScope('out-of-memory');
    const pipeline = createComputePipeline.call(this, descriptor);
    this.popErrorScope().then(() => {
      kernels.compiled += 1;
      report();
    }, () => {});
    report();
    return pipeline;
  };
}
importScripts('./burnbooth-worker.js');

// The trainer's wasm is most of what the page downloads: the page shows
// its progress ({burnboothDownload}, outside the message protocol, which
// needs the wasm). The counted stream still compiles while it downloads.
// Behind Content-Encoding, Content-Length is the compressed size while the
// stream yields decoded bytes: the decoded size then comes from
// trainer-size.json, which scripts/build-web.sh writes (a dev build has none).
(async () => {
  const [response, size] = await Promise.all([
    fetch('./burnbooth-worker_bg.wasm'),
    fetch('./trainer-size.json').then((r) => (r.ok ? r.json() : {})).catch(() => ({})),
  ]);
  if (!response.ok) throw new Error(`burnbooth-worker_bg.wasm: HTTP ${response.status}`);
  const encoded = response.headers.get('Content-Encoding');
  const total = (encoded ? 0 : Number(response.headers.get('Content-Length'))) || Number(size.bytes) || 0;
  let loaded = 0;
  let reported = 0;
  const report = (done) => self.postMessage({ burnboothDownload: { loaded, total, done } });
  const counted = response.body.pipeThrough(new TransformStream({
    transform(chunk, controller) {
      loaded += chunk.byteLength;
      if (loaded - reported >= 1 << 20 || reported === 0) {
        reported = loaded;
        report(false);
      }
      controller.enqueue(chunk);
    },
    flush() {
      report(true);
    },
  }));
  await wasm_bindgen({ module_or_path: new Response(counted, { headers: { 'Content-Type': 'application/wasm' } }) });
})().catch((error) => {
  // Thrown outside the promise, it reaches the page's worker.onerror.
  setTimeout(() => { throw error; });
});
