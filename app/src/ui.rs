//! The page's state: what it shows (signals) and its link to the training
//! worker (messages in, messages out).

use std::rc::Rc;

use burnbooth_app::browser::{download, number_field, object_field, object_url, opfs, picked_files, PickedFile};
use burnbooth_app::protocol::{decode, encode, FromWorker, ToWorker};
use burnbooth_app::run::RunState;
use burnbooth_app::workspace;
use leptos::prelude::*;
use leptos::task::spawn_local;
use trainer_core::data::source::MemorySource;
use trainer_core::plan::describe;
use wasm_bindgen::closure::Closure;
use wasm_bindgen::JsCast;
use web_sys::{HtmlInputElement, MessageEvent, Worker};

/// What the page shows about the run; the worker's messages update it.
#[derive(Clone, Copy)]
pub struct RunView {
    pub state: RwSignal<RunState>,
    pub phase: RwSignal<String>,
    pub done: RwSignal<u64>,
    pub total: RwSignal<u64>,
    /// (step, loss) of every step.
    pub losses: RwSignal<Vec<(u64, f32)>>,
    pub stats: RwSignal<String>,
    /// (caption, object URL) of each validation image.
    pub gallery: RwSignal<Vec<(String, String)>>,
    /// Files of the run that can be downloaded.
    pub outputs: RwSignal<Vec<String>>,
    pub log: RwSignal<Vec<String>>,
    pub error: RwSignal<Option<String>>,
    pub saved: RwSignal<String>,
    /// (compiled, created) compute pipelines of the worker's WebGPU device
    /// (worker-boot.js): the first step's compilation, made visible.
    pub kernels: RwSignal<(u32, u32)>,
}

impl RunView {
    pub fn new() -> Self {
        Self {
            state: RwSignal::new(RunState::Idle),
            phase: RwSignal::new(String::new()),
            done: RwSignal::new(0),
            total: RwSignal::new(0),
            losses: RwSignal::new(Vec::new()),
            stats: RwSignal::new(String::new()),
            gallery: RwSignal::new(Vec::new()),
            outputs: RwSignal::new(Vec::new()),
            log: RwSignal::new(Vec::new()),
            error: RwSignal::new(None),
            saved: RwSignal::new(String::new()),
            kernels: RwSignal::new((0, 0)),
        }
    }
}

thread_local! {
    static WORKER: std::cell::OnceCell<Worker> = const { std::cell::OnceCell::new() };
    /// A folder the user granted, and the files still to be written there.
    pub static SAVING: std::cell::RefCell<Option<(web_sys::FileSystemDirectoryHandle, std::collections::BTreeSet<String>)>> = const { std::cell::RefCell::new(None) };
}

/// Sends a message (and file contents) to the training worker.
pub fn send(message: &ToWorker, bytes: Vec<Vec<u8>>) {
    let (value, transfer) = encode(message, bytes);
    WORKER.with(|w| match w.get() {
        Some(worker) => {
            let _ = worker.post_message_with_transfer(&value, &transfer);
        }
        None => web_sys::console::error_1(&"the training worker is not running".into()),
    });
}

/// Starts the worker and routes its messages to the page's signals.
pub fn start_worker(ui: Ui) -> Result<(), String> {
    let options = web_sys::WorkerOptions::new();
    options.set_type(web_sys::WorkerType::Classic);
    // The page's query (`?no-subgroups-shim`) reaches the worker's boot script.
    let search = burnbooth_app::browser::window().location().search().unwrap_or_default();
    let worker = Worker::new_with_options(&format!("./worker-boot.js{search}"), &options).map_err(burnbooth_app::browser::js_error)?;
    let on_message = Closure::<dyn FnMut(MessageEvent)>::new(move |event: MessageEvent| {
        // Sent by worker-boot.js, outside the protocol: the wasm may be stuck.
        if let Some(reason) = js_sys::Reflect::get(&event.data(), &"burnboothGpuLost".into()).ok().and_then(|r| r.as_string()) {
            return ui.gpu_lost(&reason);
        }
        if let Some(download) = object_field(&event.data(), "burnboothDownload") {
            return ui.trainer_download(&download);
        }
        if let Some(kernels) = object_field(&event.data(), "burnboothKernels") {
            let count = |key: &str| number_field(&kernels, key).unwrap_or(0.0) as u32;
            return ui.run.kernels.set((count("compiled"), count("created")));
        }
        match decode::<FromWorker>(&event.data()) {
            Ok((message, bytes)) => ui.receive(message, bytes),
            Err(e) => ui.run.error.set(Some(e)),
        }
    });
    worker.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
    on_message.forget();
    let on_error = Closure::<dyn FnMut(web_sys::ErrorEvent)>::new(move |event: web_sys::ErrorEvent| {
        ui.run.error.set(Some(format!(
            "The training worker stopped: {}. Checkpoints saved so far are kept in this browser; reload the page to continue from the last one.",
            event.message()
        )));
        ui.run.state.set(RunState::Idle);
    });
    worker.set_onerror(Some(on_error.as_ref().unchecked_ref()));
    on_error.forget();
    WORKER.with(|w| {
        let _ = w.set(worker);
    });
    Ok(())
}

/// One dataset of the dataloader config, as the datasets panel shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetRow {
    pub id: String,
    pub folder: String,
    pub regularisation: bool,
    /// The image dataset whose loss masks this folder holds.
    pub mask_of: Option<String>,
    /// Held out for the validation loss (`dataset_type: eval`).
    pub eval: bool,
    pub picked: usize,
}

/// The page's display state.
#[derive(Clone, Copy)]
pub struct Ui {
    pub gpu: RwSignal<String>,
    pub gpu_ok: RwSignal<Option<bool>>,
    pub model: RwSignal<String>,
    pub model_fit: RwSignal<Option<Result<String, String>>>,
    pub training_name: RwSignal<String>,
    pub training_text: RwSignal<String>,
    pub dataloader_name: RwSignal<String>,
    pub dataloader_text: RwSignal<String>,
    /// Other imported files the training config names (file name -> text).
    pub side_files: RwSignal<std::collections::BTreeMap<String, String>>,
    pub datasets: RwSignal<Vec<DatasetRow>>,
    pub config_error: RwSignal<Option<String>>,
    pub plan_text: RwSignal<String>,
    pub plan_json: RwSignal<String>,
    pub run: RunView,
    pub sample_url: RwSignal<Option<String>>,
    pub busy: RwSignal<Option<String>>,
    pub self_test: RwSignal<Option<Result<String, String>>>,
    pub tokens: RwSignal<Vec<trainer_core::tools::TokenReport>>,
    pub regularisation: RwSignal<Option<RegularisationSet>>,
}

/// A regularisation set the worker made, waiting to be added to the config.
#[derive(Debug, Clone, PartialEq)]
pub struct RegularisationSet {
    pub entry: String,
    pub folder: String,
    /// (file name, PNG, object URL)
    pub images: Vec<(String, Vec<u8>, String)>,
}

impl Ui {
    pub fn new() -> Self {
        Self {
            gpu: RwSignal::new("checking for WebGPU…".into()),
            gpu_ok: RwSignal::new(None),
            model: RwSignal::new(String::new()),
            model_fit: RwSignal::new(None),
            training_name: RwSignal::new("config.env".into()),
            training_text: RwSignal::new(String::new()),
            dataloader_name: RwSignal::new("multidatabackend.json".into()),
            dataloader_text: RwSignal::new(String::new()),
            side_files: RwSignal::new(Default::default()),
            datasets: RwSignal::new(Vec::new()),
            config_error: RwSignal::new(None),
            plan_text: RwSignal::new(String::new()),
            plan_json: RwSignal::new(String::new()),
            run: RunView::new(),
            sample_url: RwSignal::new(None),
            busy: RwSignal::new(None),
            self_test: RwSignal::new(None),
            tokens: RwSignal::new(Vec::new()),
            regularisation: RwSignal::new(None),
        }
    }
}

impl Ui {
    /// Adds the set's entry to the dataloader config and hands its images
    /// to the plan (and the worker) as that dataset's files.
    pub fn add_regularisation_set(&self, set: &RegularisationSet) -> Result<(), String> {
        let entry: serde_json::Value = serde_json::from_str(&set.entry).map_err(|e| e.to_string())?;
        let id = entry["id"].as_str().unwrap_or("regularisation-data").to_string();
        let text = self.dataloader_text.get_untracked();
        let mut datasets: Vec<serde_json::Value> = if text.trim().is_empty() {
            Vec::new()
        } else {
            serde_json::from_str(&text).map_err(|e| format!("{}: not a JSON array: {e}", self.dataloader_name.get_untracked()))?
        };
        datasets.retain(|d| d["id"].as_str() != Some(id.as_str()));
        let at = datasets.iter().position(|d| d["dataset_type"] == "text_embeds").unwrap_or(datasets.len());
        datasets.insert(at, entry);
        self.dataloader_text.set(serde_json::to_string_pretty(&datasets).expect("serialises"));
        let mut source = MemorySource::new(format!("generated class images in {}", set.folder));
        for (name, png, _) in &set.images {
            source.insert(name.clone(), png.clone());
        }
        let (paths, contents): (Vec<String>, Vec<Vec<u8>>) = set.images.iter().map(|(n, b, _)| (n.clone(), b.clone())).unzip();
        send(&ToWorker::Dataset { id: id.clone(), paths }, contents);
        workspace::with(|w| w.sources.insert(id, Rc::new(source)));
        self.configs_changed();
        Ok(())
    }
}

impl Ui {
    pub fn receive(&self, message: FromWorker, bytes: Vec<Vec<u8>>) {
        let run = self.run;
        match message {
            FromWorker::Ready => {
                send(&ToWorker::Device { cpu: false }, Vec::new());
                send(&ToWorker::Restore, Vec::new());
            }
            FromWorker::Device { ok, text } => {
                self.gpu.set(text);
                self.gpu_ok.set(Some(ok));
            }
            FromWorker::Saved(text) => run.saved.set(text),
            FromWorker::Model { info, fit } => {
                self.busy.set(None);
                match info {
                    Ok(info) => {
                        self.model.set(info);
                        self.model_fit.set(fit);
                    }
                    Err(e) => {
                        self.model.set(String::new());
                        self.model_fit.set(Some(Err(e)));
                    }
                }
            }
            FromWorker::Progress { phase, done, total } => {
                run.phase.set(phase);
                run.done.set(done);
                run.total.set(total);
            }
            FromWorker::Step { step, loss, stats } => {
                run.losses.update(|l| l.push((step, loss)));
                run.stats.set(stats);
            }
            FromWorker::Losses(losses) => run.losses.set(losses),
            FromWorker::Note(line) => run.log.update(|l| l.push(line)),
            FromWorker::Validation { caption } => {
                if let Some(url) = bytes.first().and_then(|png| object_url(png, "image/png").ok()) {
                    run.gallery.update(|g| g.push((caption, url)));
                }
            }
            FromWorker::Outputs(files) => run.outputs.set(files),
            FromWorker::Ended { phase, error } => {
                run.phase.set(phase);
                if let Some(e) = error {
                    run.log.update(|l| l.push(format!("error: {e}")));
                    run.error.set(Some(e));
                }
                run.state.set(RunState::Idle);
            }
            FromWorker::Sample => {
                if let Some(url) = bytes.first().and_then(|png| object_url(png, "image/png").ok()) {
                    self.sample_url.set(Some(url));
                }
                run.phase.set("sample ready".into());
            }
            FromWorker::File { path } => {
                let folder = SAVING.with(|s| {
                    let mut saving = s.borrow_mut();
                    let (folder, pending) = saving.as_mut()?;
                    pending.remove(&path).then(|| folder.clone())
                });
                if let (Some(folder), Some(data)) = (folder, bytes.first().cloned()) {
                    spawn_local(async move {
                        match opfs::write_in(folder, &path, &data).await {
                            Ok(()) => run.log.update(|l| l.push(format!("saved {path} to the chosen folder"))),
                            Err(e) => run.error.set(Some(e)),
                        }
                    });
                    return;
                }
                let name = path.rsplit('/').next().unwrap_or(&path).to_string();
                // Checkpoint files share names: prefix the checkpoint folder.
                let name = match path.rsplit('/').nth(1) {
                    Some(folder) if folder.starts_with("checkpoint-") => format!("{folder}-{name}"),
                    _ => name,
                };
                if let Some(data) = bytes.first() {
                    let _ = download(&name, data, "application/octet-stream");
                }
            }
            FromWorker::SelfTest(result) => self.self_test.set(Some(result)),
            FromWorker::Tokens(reports) => {
                self.tokens.set(reports);
                run.phase.set("tokens ranked".into());
            }
            FromWorker::RegularisationSet { entry, folder, paths } => {
                let images = paths
                    .into_iter()
                    .zip(bytes)
                    .map(|(name, png)| {
                        let url = object_url(&png, "image/png").unwrap_or_default();
                        (name, png, url)
                    })
                    .collect();
                self.regularisation.set(Some(RegularisationSet { entry, folder, images }));
                run.phase.set("class images ready".into());
            }
            FromWorker::Error(e) => {
                self.busy.set(None);
                run.error.set(Some(e));
            }
        }
    }

    /// Re-reads the configs after an edit: lists the datasets and clears a stale plan.
    pub fn configs_changed(&self) {
        workspace::with(|w| {
            w.training = Some((self.training_name.get_untracked(), self.training_text.get_untracked())).filter(|(_, t)| !t.trim().is_empty());
            w.dataloader = Some((self.dataloader_name.get_untracked(), self.dataloader_text.get_untracked())).filter(|(_, t)| !t.trim().is_empty());
            w.side_files = self.side_files.get_untracked();
        });
        self.plan_text.set(String::new());
        self.plan_json.set(String::new());
        match workspace::load_configs() {
            Ok((_, dataloader)) => {
                self.config_error.set(None);
                let picked = workspace::with(|w| w.sources.iter().map(|(id, s)| (id.clone(), s.files.len())).collect::<std::collections::BTreeMap<_, _>>());
                let mut rows = Vec::new();
                for d in &dataloader.datasets {
                    let picked_of = |id: &str| picked.get(id).copied().unwrap_or(0);
                    rows.push(DatasetRow {
                        id: d.id.clone(),
                        folder: d.instance_data_dir.clone(),
                        regularisation: d.is_regularisation_data,
                        mask_of: None,
                        eval: d.is_eval,
                        picked: picked_of(&d.id),
                    });
                    // A mask folder is picked like a dataset's, under the mask dataset's id.
                    if let Some(mask) = &d.mask {
                        rows.push(DatasetRow {
                            id: mask.id.clone(),
                            folder: mask.instance_data_dir.clone(),
                            regularisation: false,
                            mask_of: Some(d.id.clone()),
                            eval: false,
                            picked: picked_of(&mask.id),
                        });
                    }
                }
                self.datasets.set(rows);
            }
            Err(e) => {
                // Before both files are there, say what is missing without alarm.
                let waiting = self.training_text.get_untracked().trim().is_empty() || self.dataloader_text.get_untracked().trim().is_empty();
                self.config_error.set(Some(if waiting { format!("waiting for configs: {e}") } else { e.to_string() }));
                self.datasets.set(Vec::new());
            }
        }
    }

    /// Progress of the trainer's wasm download (worker-boot.js), in the
    /// status pill until the worker reports the GPU.
    fn trainer_download(&self, download: &wasm_bindgen::JsValue) {
        let number = |key: &str| number_field(download, key).unwrap_or(0.0) / 1e6;
        let (loaded, total) = (number("loaded"), number("total"));
        let done = js_sys::Reflect::get(download, &"done".into()).map(|d| d.is_truthy()).unwrap_or(false);
        self.gpu.set(match (done, total > 0.0) {
            (true, _) => format!("downloaded the trainer ({loaded:.1} MB); checking for WebGPU…"),
            (false, true) => format!("downloading the trainer: {loaded:.1} of {total:.1} MB"),
            (false, false) => format!("downloading the trainer: {loaded:.1} MB"),
        });
    }

    /// The worker's GPU device was lost: that worker can do nothing more
    /// (a run in it may wait forever on a readback), so end it; what was
    /// saved stays in OPFS for the next visit to resume from.
    pub fn gpu_lost(&self, reason: &str) {
        WORKER.with(|w| w.get().map(Worker::terminate));
        self.gpu.set(format!("GPU lost ({reason}): reload the page"));
        // Neither ok nor "no WebGPU" (whose CPU offer needs the worker).
        self.gpu_ok.set(None);
        self.run.state.set(RunState::Idle);
        self.run.phase.set("stopped: the GPU was lost".into());
        self.run.error.set(Some(format!(
            "The GPU was lost ({reason}), so training stopped. This happens when the graphics driver restarts or the browser reclaims the GPU. Checkpoints saved so far are kept in this browser: reload the page, pick the same files and press Train to continue from the last one."
        )));
    }

    /// After the Plan button showed a plan: the worker fills the caches
    /// and compiles the run's GPU kernels while the user reads it
    /// (`run::prepare`), so that Train's first step is a steady one.
    pub fn prepare(&self) {
        if self.plan_json.get_untracked().is_empty() || self.gpu_ok.get_untracked() != Some(true) || self.run.state.get_untracked() != RunState::Idle {
            return;
        }
        if let Some(workspace::ImportedConfigs { training, dataloader, side_files }) = workspace::imported_configs() {
            send(&ToWorker::Prepare { training, dataloader, side_files }, Vec::new());
        }
    }

    pub fn make_plan(&self) {
        let result = workspace::load_configs().and_then(|(training, dataloader)| workspace::plan_run(&training, &dataloader));
        match result {
            Ok((plan, _, _)) => {
                self.plan_text.set(describe(&plan));
                self.plan_json.set(serde_json::to_string_pretty(&plan).expect("plan serialises"));
                self.run.error.set(None);
            }
            Err(e) => {
                self.plan_text.set(String::new());
                self.plan_json.set(String::new());
                self.run.error.set(Some(e.to_string()));
            }
        }
    }
}

pub fn input_files(ev: &leptos::ev::Event) -> Vec<PickedFile> {
    let input: HtmlInputElement = event_target(ev);
    picked_files(input.files())
}
