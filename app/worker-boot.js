// Starts the training worker (burnbooth-worker, built by Trunk as a
// no-modules wasm-bindgen worker).
//
// wgpu's WebGPU backend does not pass the adapter's `subgroups` feature on
// when it creates the device, yet cubecl's matmul kernels say
// `enable subgroups;`: Chrome then rejects them and loses the device. Ask
// for the feature ourselves whenever the adapter has it. `?no-subgroups-shim`
// on the page's address turns this off (the browser test checks that the
// workaround is still needed; see DEVELOPERS.md).
if (typeof GPUAdapter !== 'undefined' && !new URLSearchParams(self.location.search).has('no-subgroups-shim')) {
  const requestDevice = GPUAdapter.prototype.requestDevice;
  GPUAdapter.prototype.requestDevice = function (descriptor) {
    descriptor = Object.assign({}, descriptor || {});
    const features = new Set(descriptor.requiredFeatures || []);
    if (this.features.has('subgroups')) features.add('subgroups');
    descriptor.requiredFeatures = [...features];
    return requestDevice.call(this, descriptor);
  };
}
importScripts('./burnbooth-worker.js');
wasm_bindgen('./burnbooth-worker_bg.wasm');
