//! The WebGPU device: what the browser offers and burn's device on it.

use burn::tensor::Device;
use js_sys::Reflect;
use wasm_bindgen::{JsCast, JsValue};

use crate::browser::navigator;

/// What the adapter can do, as shown to the user.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterSummary {
    pub name: String,
    pub backend: String,
    /// The device was created with the adapter's own limits (WebGPU's
    /// defaults cap buffers at 128/256 MiB), so these are what tensors get.
    pub max_buffer_bytes: u64,
    pub max_binding_bytes: u64,
    pub shader_f16: bool,
}

impl AdapterSummary {
    /// The largest single tensor this device can hold.
    pub fn max_tensor_bytes(&self) -> u64 {
        self.max_buffer_bytes.min(self.max_binding_bytes)
    }
}

/// Whether the browser exposes WebGPU at all.
pub fn has_webgpu() -> bool {
    Reflect::get(&navigator(), &JsValue::from_str("gpu")).map(|gpu| !gpu.is_undefined() && !gpu.is_null()).unwrap_or(false)
}

/// Kernel launches recorded before the queue is submitted (cubecl's default
/// is 32). In the browser each submit is a call into the GPU process
/// (DEVELOPERS.md, "Headless Chromium").
const BATCHED_LAUNCHES: usize = 256;

/// Creates burn's WebGPU device. cubecl requests the adapter's own limits
/// and features for it.
pub async fn init() -> Result<(Device, AdapterSummary), String> {
    if !has_webgpu() {
        return Err(NO_WEBGPU.to_string());
    }
    let (device, setup) = Device::wgpu_options()
        .tasks_max(BATCHED_LAUNCHES)
        .init_with_setup_async()
        .await
        .map_err(|e| format!("WebGPU is present but no usable adapter was found ({e}). Check that hardware acceleration is on in the browser's settings, or update the graphics driver."))?;
    let info = setup.adapter.get_info();
    let limits = setup.device.limits();
    // In the browser wgpu leaves the adapter's name empty; ask WebGPU itself.
    let name = if info.name.is_empty() { browser_adapter_name().await.unwrap_or_else(|| "WebGPU adapter".into()) } else { info.name.clone() };
    let summary = AdapterSummary {
        name,
        backend: format!("{:?}", setup.backend),
        max_buffer_bytes: limits.max_buffer_size,
        max_binding_bytes: limits.max_storage_buffer_binding_size,
        shader_f16: setup.device.features().contains(burn::tensor::wgpu::wgpu::Features::SHADER_F16),
    };
    Ok((device, summary))
}

/// "vendor architecture (description)" from `GPUAdapter.info`.
async fn browser_adapter_name() -> Option<String> {
    let gpu = Reflect::get(&navigator(), &JsValue::from_str("gpu")).ok()?;
    let request: js_sys::Function = Reflect::get(&gpu, &JsValue::from_str("requestAdapter")).ok()?.dyn_into().ok()?;
    let promise: js_sys::Promise = request.call0(&gpu).ok()?.dyn_into().ok()?;
    let adapter = wasm_bindgen_futures::JsFuture::from(promise).await.ok()?;
    let info = Reflect::get(&adapter, &JsValue::from_str("info")).ok()?;
    let field = |name: &str| Reflect::get(&info, &JsValue::from_str(name)).ok().and_then(|v| v.as_string()).unwrap_or_default();
    let name = [field("vendor"), field("architecture"), field("description")].into_iter().filter(|s| !s.is_empty()).collect::<Vec<_>>().join(" ");
    (!name.is_empty()).then_some(name)
}

pub const NO_WEBGPU: &str = "This browser does not offer WebGPU. Burnbooth trains on your GPU through WebGPU: use a recent Chrome or Edge (version 113 or newer) on Windows, macOS, ChromeOS or Android, or Chrome on Linux with chrome://flags/#enable-unsafe-webgpu turned on. Firefox and Safari do not enable WebGPU for this yet. You can still train on the CPU below, slowly.";

/// Compute pipelines (one per distinct kernel) this worker's WebGPU device
/// has created so far, as worker-boot.js counts them; None off WebGPU.
/// Once a step has finished on the GPU, all of its pipelines are compiled.
pub fn kernels_created() -> Option<u32> {
    let kernels = crate::browser::object_field(&js_sys::global(), "burnboothKernels")?;
    crate::browser::number_field(&kernels, "created").map(|n| n as u32)
}
