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
importScripts('./burnbooth-worker.js');
wasm_bindgen('./burnbooth-worker_bg.wasm');
