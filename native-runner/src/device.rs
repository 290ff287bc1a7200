//! Where the native runner computes, and the model files it loads there.
//!
//! `--device auto` (the default) takes the fastest device present: a real
//! GPU through wgpu when the machine has one, otherwise burn's CPU backend.
//! A software Vulkan adapter (lavapipe, SwiftShader) is never picked
//! automatically: there a training step is 5-8x slower than on the CPU
//! backend, because every kernel is interpreted on the CPU one dispatch at a
//! time (DEVELOPERS.md, "Choosing the device").

use std::path::Path;

use burn::tensor::{DType, Device, DeviceKind};
use trainer_core::models::safetensors_file::SafetensorsFile;
use trainer_core::models::{read_folder_configs, DiskFolder, StableDiffusion, WeightDtypes};
use trainer_core::{Error, Result};

/// The `--device` values, as the CLI documents them.
pub const DEVICE_HELP: &str = "auto (a GPU when there is one, else the CPU backend), gpu (wgpu on the best adapter), \
cpu-gpu (wgpu on a CPU Vulkan adapter such as lavapipe) or cpu (burn's CPU backend)";

/// Which kind of backend a device runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// burn's CPU backend (burn-flex).
    Cpu,
    /// cubecl on wgpu (a GPU, or a CPU Vulkan adapter).
    Wgpu,
}

/// A device picked for a run, with what to tell the user about it.
pub struct Picked {
    pub device: Device,
    pub backend: Backend,
    /// One line: what was picked and why.
    pub reason: String,
}

impl Picked {
    /// Whether frozen weights are stored in f16: on wgpu when the adapter
    /// has f16 (memory is the GPU's limit); on the CPU backend weights stay
    /// f32 (every use would pay a cast, and system memory is larger).
    pub fn stores_f16(&self) -> bool {
        self.backend == Backend::Wgpu && self.device.supports_dtype(DType::F16)
    }

    /// bf16 arithmetic is offered on the CPU backend only.
    pub fn has_bf16(&self) -> bool {
        self.backend == Backend::Cpu && self.device.supports_dtype(DType::BF16)
    }

    /// Storage dtypes for inference (sample and the tools).
    pub fn inference_dtypes(&self) -> WeightDtypes {
        if self.stores_f16() {
            WeightDtypes::all(DType::F16)
        } else {
            WeightDtypes::default()
        }
    }
}

/// A GPU adapter wgpu sees on this machine.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub name: String,
    pub api: String,
    /// A real GPU (discrete, integrated or virtual), not a CPU rasteriser.
    pub is_gpu: bool,
}

/// The adapters of the native graphics APIs (Vulkan, Metal, DX12). OpenGL is
/// not asked: its probe goes through EGL, which on a headless Linux machine
/// prints warnings (XDG_RUNTIME_DIR) and finds nothing Vulkan does not.
pub fn adapters() -> Vec<Adapter> {
    use burn::tensor::wgpu::wgpu;
    let backends = wgpu::Backends::VULKAN | wgpu::Backends::METAL | wgpu::Backends::DX12;
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor { backends, ..wgpu::InstanceDescriptor::new_without_display_handle() });
    trainer_core::block_on(instance.enumerate_adapters(backends))
        .iter()
        .map(|adapter| {
            let info = adapter.get_info();
            Adapter { name: info.name.clone(), api: format!("{:?}", info.backend), is_gpu: info.device_type != wgpu::DeviceType::Cpu }
        })
        .collect()
}

/// The wgpu device for `kind`, on Vulkan where Vulkan has the adapter asked
/// for (so cubecl does not go on to probe OpenGL), else wherever cubecl
/// settles. A runtime is initialised once per process; later calls reuse it.
fn wgpu_device(kind: DeviceKind, found: &[Adapter]) -> Device {
    static INITIALISED: std::sync::Mutex<Vec<(bool, Device)>> = std::sync::Mutex::new(Vec::new());
    let wanted_gpu = !matches!(kind, DeviceKind::Cpu);
    let mut initialised = INITIALISED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((_, device)) = initialised.iter().find(|(gpu, _)| *gpu == wanted_gpu) {
        return device.clone();
    }
    let on_vulkan = found.iter().any(|a| a.api == "Vulkan" && a.is_gpu == wanted_gpu);
    let pinned =
        on_vulkan.then(|| Device::wgpu_options().graphics_api(burn::tensor::wgpu::WgpuBackend::Vulkan).device_kind(kind.clone()).init().ok()).flatten();
    let device = pinned.unwrap_or_else(|| Device::wgpu(kind));
    initialised.push((wanted_gpu, device.clone()));
    device
}

/// The device for a `--device` value.
pub fn pick(name: &str) -> Result<Picked> {
    let unknown = || Error::Config { source_name: "--device".into(), problems: vec![format!("unknown device '{name}': use {DEVICE_HELP}")] };
    let cpu = |reason: String| Picked { device: Device::flex(), backend: Backend::Cpu, reason };
    Ok(match name {
        "cpu" => cpu("device: burn's CPU backend (--device cpu)".into()),
        "gpu" | "cpu-gpu" | "lavapipe" | "auto" => {
            let found = adapters();
            let gpu = found.iter().find(|a| a.is_gpu);
            match (name, gpu) {
                ("auto", Some(gpu)) => Picked {
                    device: wgpu_device(DeviceKind::DefaultDevice, &found),
                    backend: Backend::Wgpu,
                    reason: format!("device: {} through wgpu ({}), the GPU found (--device auto)", gpu.name, gpu.api),
                },
                ("auto", None) => {
                    let software: Vec<&str> = found.iter().map(|a| a.name.as_str()).collect();
                    let seen = if software.is_empty() { "no GPU adapter".to_string() } else { format!("only the software adapter {}", software.join(", ")) };
                    cpu(format!(
                        "device: burn's CPU backend: wgpu found {seen}, where the CPU backend is faster (--device auto; --device cpu-gpu to use it anyway)"
                    ))
                }
                ("gpu", _) => Picked {
                    device: wgpu_device(DeviceKind::DefaultDevice, &found),
                    backend: Backend::Wgpu,
                    reason: match gpu {
                        Some(gpu) => format!("device: {} through wgpu ({}) (--device gpu)", gpu.name, gpu.api),
                        None => {
                            "device: wgpu's default adapter (--device gpu); no GPU was found, so this is a software adapter, slower than --device cpu".into()
                        }
                    },
                },
                _ => Picked {
                    device: wgpu_device(DeviceKind::Cpu, &found),
                    backend: Backend::Wgpu,
                    reason: "device: wgpu on a CPU Vulkan adapter (--device cpu-gpu)".into(),
                },
            }
        }
        _ => return Err(unknown()),
    })
}

/// A diffusers folder or a single-file checkpoint (with the component
/// configs of `config_from`, a diffusers folder, when given).
pub fn load_model(model: &str, config_from: Option<&str>, device: &Device, dtypes: WeightDtypes) -> Result<StableDiffusion> {
    let path = Path::new(model);
    if path.is_dir() {
        return StableDiffusion::from_folder_with(&DiskFolder { root: path.to_path_buf() }, device, dtypes);
    }
    if !path.exists() {
        return Err(Error::Io { path: model.to_string(), message: "no such file or folder".into() });
    }
    let file = SafetensorsFile::open(model)?;
    let configs = match config_from {
        Some(folder) => Some(read_folder_configs(&DiskFolder { root: folder.into() })?),
        None => None,
    };
    StableDiffusion::from_single_file_with(&file, configs, device, dtypes)
}
