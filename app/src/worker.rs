//! The training worker: holds the model, the datasets and the run, and
//! answers the page's [`ToWorker`] messages. Started by `worker-boot.js`.

use std::collections::BTreeMap;
use std::rc::Rc;

use burn::tensor::Device;
use trainer_core::data::source::MemorySource;
use trainer_core::train::storage::Storage;
use wasm_bindgen::closure::Closure;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::spawn_local;
use web_sys::{DedicatedWorkerGlobalScope, MessageEvent};

use crate::browser::opfs;
use crate::gpu;
use crate::model::{mib, PickedModel};
use crate::protocol::{decode, encode, FromWorker, ToWorker};
use crate::run::{self, set_state, state, RunState, RunView};
use crate::workspace::{self, storage, Compute, ImportedConfigs};

/// Sends a message (and file contents) to the page.
pub fn post(message: &FromWorker, bytes: Vec<Vec<u8>>) {
    let (value, transfer) = encode(message, bytes);
    let scope: DedicatedWorkerGlobalScope = js_sys::global().unchecked_into();
    if let Err(e) = scope.post_message_with_transfer(&value, &transfer) {
        web_sys::console::error_2(&"posting to the page failed".into(), &e);
    }
}

pub fn start() {
    let scope: DedicatedWorkerGlobalScope = js_sys::global().unchecked_into();
    let handler = Closure::<dyn FnMut(MessageEvent)>::new(|event: MessageEvent| match decode::<ToWorker>(&event.data()) {
        Ok((message, bytes)) => handle(message, bytes),
        Err(e) => post(&FromWorker::Error(e), Vec::new()),
    });
    scope.set_onmessage(Some(handler.as_ref().unchecked_ref()));
    handler.forget();
    post(&FromWorker::Ready, Vec::new());
}

fn handle(message: ToWorker, bytes: Vec<Vec<u8>>) {
    match message {
        ToWorker::Restore => spawn_local(async {
            if let Err(e) = RunView.restore().await {
                post(&FromWorker::Saved(format!("Nothing restored from this browser's storage: {e}")), Vec::new());
            }
        }),
        ToWorker::Device { cpu: true } => {
            workspace::with(|w| w.compute = Some(Compute::Cpu(Device::flex())));
            post(&FromWorker::Device { ok: true, text: "CPU (wasm) backend: slow, for trying things out".into() }, Vec::new());
        }
        ToWorker::Device { cpu: false } => spawn_local(async {
            match gpu::init().await {
                Ok((device, adapter)) => {
                    let text = format!(
                        "WebGPU: {} ({}), largest buffer {}, shader-f16 {}",
                        adapter.name,
                        adapter.backend,
                        mib(adapter.max_tensor_bytes()),
                        if adapter.shader_f16 { "yes" } else { "no (f32 weights)" }
                    );
                    workspace::with(|w| w.compute = Some(Compute::WebGpu(device, adapter)));
                    post(&FromWorker::Device { ok: true, text }, Vec::new());
                }
                Err(text) => post(&FromWorker::Device { ok: false, text }, Vec::new()),
            }
        }),
        ToWorker::Model { name, single_file, paths } => {
            let model = if single_file {
                PickedModel::single_file(name, bytes.into_iter().next().unwrap_or_default())
            } else {
                Ok(PickedModel::Folder { name, files: paths.into_iter().zip(bytes).collect::<BTreeMap<_, _>>() })
            };
            let (info, fit) = match model.and_then(|m| m.summary().map(|s| (m, s)).map_err(|e| e.to_string())) {
                Ok((model, summary)) => {
                    let fit = workspace::with(|w| match &w.compute {
                        Some(Compute::WebGpu(_, adapter)) => summary.fit(adapter),
                        _ => Ok("on the CPU backend".to_string()),
                    });
                    workspace::with(|w| {
                        w.model = Some(Rc::new(model));
                        w.session = None;
                    });
                    (Ok(summary.describe()), Some(fit))
                }
                Err(e) => (Err(e), None),
            };
            post(&FromWorker::Model { info, fit }, Vec::new());
        }
        ToWorker::Dataset { id, paths } => {
            let mut source = MemorySource::new(format!("picked files of '{id}'"));
            for (path, data) in paths.into_iter().zip(bytes) {
                source.insert(path, data);
            }
            workspace::with(|w| w.sources.insert(id, Rc::new(source)));
        }
        ToWorker::Prepare { training, dataloader, side_files } => {
            // Only on a GPU, where the first step is mostly kernel
            // compilation, and only while nothing else runs.
            let on_gpu = workspace::with(|w| matches!(w.compute, Some(Compute::WebGpu(..))));
            if !on_gpu || state() != RunState::Idle || run::preparing() {
                return;
            }
            workspace::set_imported_configs(ImportedConfigs { training, dataloader, side_files });
            spawn_local(async {
                if let Err(e) = run::prepare(RunView).await {
                    post(&FromWorker::Note(format!("preparing before Train failed (Train will say why): {e}")), Vec::new());
                }
            });
        }
        ToWorker::Train { training, dataloader, side_files } => {
            if state() != RunState::Idle {
                post(&FromWorker::Error("a run is already going".into()), Vec::new());
                return;
            }
            workspace::set_imported_configs(ImportedConfigs { training, dataloader, side_files });
            set_state(RunState::Running);
            spawn_local(async {
                let ended = match run::train(RunView).await {
                    Ok(phase) => FromWorker::Ended { phase, error: None },
                    Err(e) => FromWorker::Ended { phase: "stopped by an error; the last checkpoint is kept".into(), error: Some(e) },
                };
                set_state(RunState::Idle);
                post(&ended, Vec::new());
            });
        }
        ToWorker::Pause if state() == RunState::Running => set_state(RunState::Paused),
        ToWorker::Resume if state() == RunState::Paused => set_state(RunState::Running),
        ToWorker::Stop if matches!(state(), RunState::Running | RunState::Paused) => set_state(RunState::Stopping),
        ToWorker::Pause | ToWorker::Resume | ToWorker::Stop => {}
        ToWorker::Sample { prompt, steps, seed, size, with_lora } => spawn_local(async move {
            if state() != RunState::Idle {
                post(&FromWorker::Error("sampling waits until training has stopped".into()), Vec::new());
                return;
            }
            match run::sample(RunView, run::request(prompt, steps, seed, size), with_lora).await {
                Ok(png) => post(&FromWorker::Sample, vec![png]),
                Err(e) => post(&FromWorker::Error(e), Vec::new()),
            }
        }),
        ToWorker::Read { path } => match storage().read(&path) {
            Ok(Some(data)) => post(&FromWorker::File { path }, vec![data]),
            _ => post(&FromWorker::Error(format!("{path} is not in this browser's storage")), Vec::new()),
        },
        ToWorker::FindToken { count, max_chars, class, check } => spawn_local(async move {
            match find_token(count, max_chars, class, check).await {
                Ok(reports) => post(&FromWorker::Tokens(reports), Vec::new()),
                Err(e) => post(&FromWorker::Error(e), Vec::new()),
            }
        }),
        ToWorker::MakeReg { prompt, count, steps, seed, size } => spawn_local(async move {
            if state() != RunState::Idle {
                post(&FromWorker::Error("generating waits until training has stopped".into()), Vec::new());
                return;
            }
            if let Err(e) = make_reg(prompt, count, steps, seed, size).await {
                post(&FromWorker::Error(e), Vec::new());
            }
        }),
        ToWorker::SelfTest => spawn_local(async {
            post(&FromWorker::SelfTest(self_test().await), Vec::new());
        }),
        ToWorker::ClearSaved => spawn_local(async {
            let text = match opfs::clear().await {
                Ok(()) => "Saved data cleared; reload the page to start fresh".to_string(),
                Err(e) => format!("Could not clear the saved data: {e}"),
            };
            post(&FromWorker::Saved(text), Vec::new());
        }),
    }
}

/// A 96x80 by 80x72 matrix product on the device (cubecl's matmul kernels,
/// the ones that need `subgroups`), against the same product on the host.
async fn self_test() -> Result<String, String> {
    let compute = workspace::with(|w| w.compute.clone()).ok_or("no compute device yet")?;
    let (m, k, n) = (96, 80, 72);
    let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 8.0).collect();
    let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32 - 5.0) / 8.0).collect();
    let device = compute.device();
    let product = burn::tensor::Tensor::<2>::from_data(burn::tensor::TensorData::new(a.clone(), [m, k]), device)
        .matmul(burn::tensor::Tensor::<2>::from_data(burn::tensor::TensorData::new(b.clone(), [k, n]), device));
    let started = crate::browser::now_ms();
    let values = trainer_core::train::tensor_file::HostTensor::from_tensor(product).await.map_err(|e| e.to_string())?.values;
    let mut worst = 0.0f32;
    for i in 0..m {
        for j in 0..n {
            let expected: f32 = (0..k).map(|x| a[i * k + x] * b[x * n + j]).sum();
            worst = worst.max((values[i * n + j] - expected).abs());
        }
    }
    if worst > 1e-3 {
        return Err(format!("the device's matrix product is wrong (largest error {worst})"));
    }
    // Everything so far (a whole run in the browser test) entered wasm from
    // JavaScript many times; the constructors must still have run once.
    let runs = crate::static_constructor_runs();
    if runs != 1 {
        return Err(format!("the module's static constructors ran {runs} times instead of once: every call into wasm runs them again (DEVELOPERS.md)"));
    }
    Ok(format!("matrix product correct (largest error {worst:.1e}) in {:.0} ms", crate::browser::now_ms() - started))
}

async fn find_token(count: usize, max_chars: usize, class: Option<String>, check: Vec<String>) -> Result<Vec<trainer_core::tools::TokenReport>, String> {
    let (model, device) = workspace::load_model(None)?;
    let class = class.as_deref().filter(|c| !c.trim().is_empty());
    let mut on_progress = |done: usize, total: usize| RunView.progress("scoring tokens", done as u64, total as u64);
    let reports = if check.is_empty() {
        trainer_core::tools::find_tokens(&model, count, 3, max_chars.max(3), class, &device, &mut on_progress).await
    } else {
        trainer_core::tools::score(&model, &check, class, &device, &mut on_progress).await
    };
    reports.map_err(|e| e.to_string())
}

async fn make_reg(prompt: String, count: usize, steps: usize, seed: u64, size: usize) -> Result<(), String> {
    use trainer_core::tools::RegularisationSet;
    let (model, device) = workspace::load_model(None)?;
    let slug: String = prompt.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    let folder = format!("regularisation/{}", slug.trim_matches('-'));
    let set = RegularisationSet { request: run::request(prompt, steps, seed, size), count, folder: folder.clone() };
    model.latent_shape(size, size).map_err(|e| e.to_string())?;
    let made = trainer_core::tools::make_regularisation_set(&model, &set, storage(), &device, &mut |done, total, _| {
        RunView.progress("class images", done as u64, total as u64)
    })
    .await
    .map_err(|e| e.to_string())?;
    opfs::sync(storage()).await?;
    post(&FromWorker::Note(format!("{made} class image(s) generated in {folder}, {} already there", count - made)), Vec::new());
    let mut paths = Vec::new();
    let mut images = Vec::new();
    for index in 0..count {
        let name = RegularisationSet::image_name(index);
        let data = storage().read(&format!("{folder}/{name}")).map_err(|e| e.to_string())?.ok_or("a generated image vanished")?;
        paths.push(name);
        images.push(data);
    }
    let entry = serde_json::to_string_pretty(&set.dataloader_entry()).expect("serialises");
    post(&FromWorker::RegularisationSet { entry, folder, paths }, images);
    Ok(())
}
