//! The page's panels, in the order a user goes through them.

use std::rc::Rc;

use burnbooth_app::browser::{download, opfs, picked_files, PickedFile};
use burnbooth_app::model::needed_files;
use burnbooth_app::protocol::ToWorker;
use burnbooth_app::run::{RunState, LORA_NAME};
use burnbooth_app::workspace::{self, env_get, env_set};
use leptos::prelude::*;
use leptos::task::spawn_local;
use trainer_core::data::source::MemorySource;
use web_sys::{DragEvent, HtmlInputElement};

use crate::chart;
use crate::ui::{input_files, send, Ui, SAVING};

#[component]
pub fn ModelPanel(ui: Ui) -> impl IntoView {
    // Reads the picked files the worker needs and hands them over.
    let send_model = move |name: String, single_file: bool, files: Vec<PickedFile>| {
        ui.busy.set(Some("reading the model…".into()));
        spawn_local(async move {
            let mut paths = Vec::new();
            let mut contents = Vec::new();
            for file in files {
                match file.bytes().await {
                    Ok(bytes) => {
                        paths.push(file.path.clone());
                        contents.push(bytes);
                    }
                    Err(e) => {
                        ui.busy.set(None);
                        ui.model_fit.set(Some(Err(e)));
                        return;
                    }
                }
            }
            ui.busy.set(Some("checking the model…".into()));
            send(&ToWorker::Model { name, single_file, paths }, contents);
        });
    };
    let on_folder = move |ev: leptos::ev::Event| {
        let files = input_files(&ev);
        let input: HtmlInputElement = event_target(&ev);
        let name = input
            .files()
            .and_then(|l| l.item(0))
            .and_then(|f| js_sys::Reflect::get(&f, &"webkitRelativePath".into()).ok()?.as_string())
            .and_then(|p| p.split('/').next().map(str::to_string))
            .unwrap_or_else(|| "model".into());
        match needed_files(&name, &files) {
            Ok(needed) => send_model(name, false, needed),
            Err(e) => ui.model_fit.set(Some(Err(e))),
        }
    };
    let on_file = move |ev: leptos::ev::Event| {
        let files = input_files(&ev);
        match files.into_iter().next() {
            Some(file) if file.path.ends_with(".safetensors") => send_model(file.path.clone(), true, vec![file]),
            Some(file) => {
                ui.model_fit.set(Some(Err(format!("{}: pick a .safetensors checkpoint (pickled .ckpt files are not loaded, for safety)", file.path))))
            }
            None => {}
        }
    };
    view! {
        <section class="card">
            <h2><span class="num">"1"</span>" Model"</h2>
            <p class="hint">"A diffusers folder (with unet/, vae/, text_encoder/) or one single-file .safetensors checkpoint. SD 1.x and 2.x."</p>
            <div class="row">
                <label class="button">"Pick a diffusers folder"<input id="model-folder" type="file" prop:webkitdirectory=true multiple on:change=on_folder /></label>
                <label class="button secondary">"Pick a .safetensors file"<input id="model-file" type="file" accept=".safetensors" on:change=on_file /></label>
            </div>
            <p id="model-info">{move || ui.model.get()}</p>
            {move || ui.model_fit.get().map(|fit| match fit {
                Ok(text) => view! { <p id="model-fit" class="ok">{text}</p> }.into_any(),
                Err(text) => view! { <p id="model-fit" class="bad">{text}</p> }.into_any(),
            })}
            <p class="hint">{move || ui.busy.get().unwrap_or_default()}</p>
        </section>
    }
}

/// The Dreambooth guide's recommended settings (examples/dreambooth/), a
/// starting point for a new config.
const EXAMPLE_CONFIG: &str = include_str!("../../examples/dreambooth/config.env");
const EXAMPLE_DATALOADER: &str = include_str!("../../examples/dreambooth/multidatabackend-dreambooth.json");

/// The quick-settings form: common keys of an env-file training config.
const QUICK_KEYS: [(&str, &str); 8] = [
    ("MAX_NUM_STEPS", "Steps"),
    ("LEARNING_RATE", "Learning rate"),
    ("LORA_RANK", "LoRA rank"),
    ("TRAIN_BATCH_SIZE", "Batch size"),
    ("VALIDATION_PROMPT", "Validation prompt"),
    ("VALIDATION_STEPS", "Validate every"),
    ("CHECKPOINTING_STEPS", "Checkpoint every"),
    ("TRAINING_SEED", "Seed"),
];

#[component]
pub fn ConfigPanel(ui: Ui) -> impl IntoView {
    let import = move |ev: leptos::ev::Event| {
        let files = input_files(&ev);
        spawn_local(async move {
            let mut texts = Vec::new();
            for file in files {
                match file.bytes().await.map(|b| String::from_utf8_lossy(&b).into_owned()) {
                    Ok(text) => texts.push((file.path.clone(), text)),
                    Err(e) => ui.config_error.set(Some(e)),
                }
            }
            let workspace::SortedConfigs { training, dataloader, side } = workspace::sort_config_files(texts, &ui.training_text.get_untracked());
            if let Some((name, text)) = training {
                ui.training_name.set(name);
                ui.training_text.set(text);
            }
            if let Some((name, text)) = dataloader {
                ui.dataloader_name.set(name);
                ui.dataloader_text.set(text);
            }
            ui.side_files.update(|files| files.extend(side));
            ui.configs_changed();
        });
    };
    let is_env = move || !(ui.training_name.get().ends_with(".json") || ui.training_name.get().ends_with(".toml"));
    view! {
        <section class="card">
            <h2><span class="num">"2"</span>" Configs"</h2>
            <p class="hint">"The same files the native runner reads: a SimpleTuner training config (config.env, config.json or config.toml) and its dataloader config (multidatabackend.json). Import both at once, edit here, export."</p>
            <div class="row">
                <label class="button">"Import configs"<input id="config-files" type="file" multiple accept=".env,.sh,.json,.toml" on:change=import /></label>
                <button class="secondary" on:click=move |_| {
                    ui.training_name.set("config.env".into());
                    ui.training_text.set(EXAMPLE_CONFIG.into());
                    ui.dataloader_name.set("multidatabackend-dreambooth.json".into());
                    ui.dataloader_text.set(EXAMPLE_DATALOADER.into());
                    ui.configs_changed();
                }>"Start from the guide's settings"</button>
            </div>
            <Show when=is_env>
                <div class="quick">
                    {QUICK_KEYS
                        .iter()
                        .map(|&(key, label)| {
                            view! {
                                <label>
                                    <span>{label}</span>
                                    <input
                                        data-key=key
                                        prop:value=move || env_get(&ui.training_text.get(), key).unwrap_or_default()
                                        on:change=move |ev| {
                                            let value = event_target_value(&ev);
                                            ui.training_text.update(|t| *t = env_set(t, key, &value));
                                            ui.configs_changed();
                                        }
                                    />
                                </label>
                            }
                        })
                        .collect_view()}
                </div>
            </Show>
            <div class="editors">
                <div>
                    <div class="row">
                        <input class="name" prop:value=move || ui.training_name.get() on:change=move |ev| { ui.training_name.set(event_target_value(&ev)); ui.configs_changed(); } />
                        <button class="small" on:click=move |_| { let _ = download(&ui.training_name.get(), ui.training_text.get().as_bytes(), "text/plain"); }>"Export"</button>
                    </div>
                    <textarea id="training-config" spellcheck="false" prop:value=move || ui.training_text.get()
                        on:change=move |ev| { ui.training_text.set(event_target_value(&ev)); ui.configs_changed(); }></textarea>
                </div>
                <div>
                    <div class="row">
                        <input class="name" prop:value=move || ui.dataloader_name.get() on:change=move |ev| { ui.dataloader_name.set(event_target_value(&ev)); ui.configs_changed(); } />
                        <button class="small" on:click=move |_| { let _ = download(&ui.dataloader_name.get(), ui.dataloader_text.get().as_bytes(), "application/json"); }>"Export"</button>
                    </div>
                    <textarea id="dataloader-config" spellcheck="false" prop:value=move || ui.dataloader_text.get()
                        on:change=move |ev| { ui.dataloader_text.set(event_target_value(&ev)); ui.configs_changed(); }></textarea>
                </div>
            </div>
            <Show when=move || !ui.side_files.get().is_empty()>
                <p id="side-files" class="hint">"Also imported, as the training config names them: "{move || ui.side_files.get().keys().cloned().collect::<Vec<_>>().join(", ")}</p>
            </Show>
            <p id="config-error" class="bad">{move || ui.config_error.get().unwrap_or_default()}</p>
        </section>
    }
}

#[component]
pub fn DatasetsPanel(ui: Ui) -> impl IntoView {
    let add_files = move |id: String, files: Vec<PickedFile>| {
        spawn_local(async move {
            let mut source = MemorySource::new(format!("picked files of '{id}'"));
            for file in files {
                match file.bytes().await {
                    Ok(bytes) => source.insert(file.path.clone(), bytes),
                    Err(e) => ui.run.error.set(Some(e)),
                }
            }
            // The page plans with the files; the worker trains with its own copy.
            let (paths, contents): (Vec<String>, Vec<Vec<u8>>) = source.files.iter().map(|(p, b)| (p.clone(), b.clone())).unzip();
            send(&ToWorker::Dataset { id: id.clone(), paths }, contents);
            workspace::with(|w| w.sources.insert(id, Rc::new(source)));
            ui.configs_changed();
        });
    };
    view! {
        <section class="card">
            <h2><span class="num">"3"</span>" Photos"</h2>
            <p class="hint">"For each image dataset of the dataloader config, pick its folder or drop its images on it. Captions in .txt files next to the images are used as configured; a mask folder holds one mask per image, with the image's name (dark = ignored by the loss)."</p>
            <div class="datasets">
                {move || ui.datasets.get().into_iter().map(|row| {
                    let id = row.id.clone();
                    let id_drop = row.id.clone();
                    view! {
                        <div class="dataset" data-dataset=row.id.clone()
                            on:dragover=move |ev: DragEvent| ev.prevent_default()
                            on:drop=move |ev: DragEvent| {
                                ev.prevent_default();
                                let files = picked_files(ev.data_transfer().and_then(|d| d.files()));
                                add_files(id_drop.clone(), files);
                            }>
                            <div class="title">{row.id.clone()}{row.regularisation.then_some(" · class images")}{row.eval.then_some(" · held out for the validation loss")}{row.mask_of.clone().map(|of| format!(" · loss masks for '{of}'"))}</div>
                            <div class="hint">"folder: "{row.folder.clone()}</div>
                            <label class="button small">"Pick folder"<input type="file" prop:webkitdirectory=true multiple
                                on:change=move |ev| add_files(id.clone(), input_files(&ev)) /></label>
                            <div class="count">{if row.picked > 0 { format!("{} file(s) picked", row.picked) } else { "drop images here".to_string() }}</div>
                        </div>
                    }
                }).collect_view()}
            </div>
        </section>
    }
}

#[component]
pub fn PlanPanel(ui: Ui) -> impl IntoView {
    view! {
        <section class="card">
            <h2><span class="num">"4"</span>" Plan"</h2>
            <button id="plan" on:click=move |_| { ui.make_plan(); ui.prepare(); }>"Plan"</button>
            <pre id="plan-text" class:hidden=move || ui.plan_text.get().is_empty()>{move || ui.plan_text.get()}</pre>
            <details class:hidden=move || ui.plan_json.get().is_empty()>
                <summary>"As JSON (native-runner plan --json)"</summary>
                <pre id="plan-json">{move || ui.plan_json.get()}</pre>
            </details>
        </section>
    }
}

#[component]
pub fn TrainPanel(ui: Ui) -> impl IntoView {
    let run = ui.run;
    let start = move |_| {
        if run.state.get_untracked() != RunState::Idle {
            return;
        }
        // Plan first on the page: configuration errors show here, named as natively.
        ui.make_plan();
        if run.error.get_untracked().is_some() {
            return;
        }
        let Some(workspace::ImportedConfigs { training, dataloader, side_files }) = workspace::imported_configs() else {
            return;
        };
        run.state.set(RunState::Running);
        run.gallery.set(Vec::new());
        run.losses.set(Vec::new());
        run.phase.set("starting".into());
        // Only the page may ask for persistent storage; asked before the
        // worker starts, so that what it reports is what the browser granted.
        spawn_local(async move {
            opfs::ask_persistence().await;
            send(&ToWorker::Train { training, dataloader, side_files }, Vec::new());
        });
    };
    let fetch = move |path: String| send(&ToWorker::Read { path }, Vec::new());
    view! {
        <section class="card">
            <h2><span class="num">"5"</span>" Train"</h2>
            <div class="row">
                <button id="train" on:click=start disabled=move || run.state.get() != RunState::Idle>"Train"</button>
                <button id="pause" class="secondary" disabled=move || !matches!(run.state.get(), RunState::Running | RunState::Paused)
                    on:click=move |_| {
                        let paused = run.state.get_untracked() == RunState::Paused;
                        send(if paused { &ToWorker::Resume } else { &ToWorker::Pause }, Vec::new());
                        run.state.set(if paused { RunState::Running } else { RunState::Paused });
                    }>
                    {move || if run.state.get() == RunState::Paused { "Resume" } else { "Pause" }}
                </button>
                <button id="stop" class="secondary" disabled=move || !matches!(run.state.get(), RunState::Running | RunState::Paused)
                    on:click=move |_| {
                        send(&ToWorker::Stop, Vec::new());
                        run.state.set(RunState::Stopping);
                    }>"Stop"</button>
                <button class="secondary small" disabled=move || run.state.get() != RunState::Idle
                    on:click=move |_| send(&ToWorker::ClearSaved, Vec::new())>"Clear saved data"</button>
            </div>
            <div class="progress">
                <progress max=move || run.total.get().max(1) as f64 value=move || run.done.get() as f64></progress>
                <span id="phase">{move || run.phase.get()}</span>
                <span id="kernels">{move || match run.kernels.get() {
                    (compiled, created) if compiled < created => format!("compiling GPU kernels {compiled}/{created}"),
                    _ => String::new(),
                }}</span>
            </div>
            <div id="stats" class="stats">{move || run.stats.get()}</div>
            <chart::LossChart losses=run.losses />
            <div id="gallery" class="gallery">
                {move || run.gallery.get().into_iter().map(|(caption, url)| view! {
                    <figure><img src=url alt=caption.clone() /><figcaption>{caption.clone()}</figcaption></figure>
                }).collect_view()}
            </div>
            <div id="outputs" class="outputs" class:hidden=move || run.outputs.get().is_empty()>
                <h3>"Downloads"</h3>
                <button class="secondary small" on:click=move |_| spawn_local(async move {
                    match opfs::pick_folder().await {
                        Ok(folder) => {
                            let files = run.outputs.get_untracked();
                            SAVING.with(|s| *s.borrow_mut() = Some((folder, files.iter().cloned().collect())));
                            for path in files {
                                send(&ToWorker::Read { path }, Vec::new());
                            }
                        }
                        Err(e) => run.error.set(Some(e)),
                    }
                })>"Save all to a folder…"</button>
                {move || run.outputs.get().into_iter().map(|path| {
                    let label = path.clone();
                    let is_lora = path.ends_with(&format!("{LORA_NAME}.safetensors"));
                    view! { <button class="link" class:primary=is_lora data-path=path.clone() on:click=move |_| fetch(path.clone())>{label}</button> }
                }).collect_view()}
            </div>
            <details>
                <summary>"Log"</summary>
                <pre id="log">{move || run.log.get().join("\n")}</pre>
            </details>
        </section>
    }
}

#[component]
pub fn ToolsPanel(ui: Ui) -> impl IntoView {
    let prompt = RwSignal::new(String::from("a photograph of zwxrobot"));
    let steps = RwSignal::new(String::from("10"));
    let seed = RwSignal::new(String::from("42"));
    let size = RwSignal::new(String::from("64"));
    let with_lora = RwSignal::new(true);
    let token_count = RwSignal::new(String::from("20"));
    let max_chars = RwSignal::new(String::from("5"));
    let class = RwSignal::new(String::new());
    let check = RwSignal::new(String::new());
    let reg_prompt = RwSignal::new(String::from("a picture of a toy"));
    let reg_count = RwSignal::new(String::from("4"));
    let find_tokens = move |_| {
        ui.run.phase.set("scoring tokens…".into());
        let text = check.get_untracked();
        send(
            &ToWorker::FindToken {
                count: token_count.get_untracked().parse().unwrap_or(20),
                max_chars: max_chars.get_untracked().parse().unwrap_or(5),
                class: Some(class.get_untracked()).filter(|c| !c.trim().is_empty()),
                check: text.split(',').map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect(),
            },
            Vec::new(),
        );
    };
    let make_reg = move |_| {
        ui.run.phase.set("generating class images…".into());
        send(
            &ToWorker::MakeReg {
                prompt: reg_prompt.get_untracked(),
                count: reg_count.get_untracked().parse().unwrap_or(4),
                steps: steps.get_untracked().parse().unwrap_or(20),
                seed: seed.get_untracked().parse().unwrap_or(0),
                size: size.get_untracked().parse().unwrap_or(512),
            },
            Vec::new(),
        );
    };
    let generate = move |_| {
        ui.run.phase.set("sampling…".into());
        send(
            &ToWorker::Sample {
                prompt: prompt.get_untracked(),
                steps: steps.get_untracked().parse().unwrap_or(20),
                seed: seed.get_untracked().parse().unwrap_or(42),
                size: size.get_untracked().parse().unwrap_or(512),
                with_lora: with_lora.get_untracked(),
            },
            Vec::new(),
        );
    };
    view! {
        <section class="card">
            <h2><span class="num">"6"</span>" Tools"</h2>
            <p class="hint">"Sample with the base model, or with the LoRA trained on this page; check that the GPU computes correctly."</p>
            <div class="quick">
                <label class="wide"><span>"Prompt"</span><input id="sample-prompt" prop:value=move || prompt.get() on:change=move |ev| prompt.set(event_target_value(&ev)) /></label>
                <label><span>"Steps"</span><input id="sample-steps" prop:value=move || steps.get() on:change=move |ev| steps.set(event_target_value(&ev)) /></label>
                <label><span>"Seed"</span><input id="sample-seed" prop:value=move || seed.get() on:change=move |ev| seed.set(event_target_value(&ev)) /></label>
                <label><span>"Size"</span><input id="sample-size" prop:value=move || size.get() on:change=move |ev| size.set(event_target_value(&ev)) /></label>
                <label class="check"><input type="checkbox" prop:checked=move || with_lora.get() on:change=move |ev| with_lora.set(event_target_checked(&ev)) /><span>"with the trained LoRA"</span></label>
            </div>
            <div class="row">
                <button id="sample" on:click=generate>"Generate"</button>
                <button id="self-test" class="secondary" on:click=move |_| { ui.self_test.set(None); send(&ToWorker::SelfTest, Vec::new()) }>"Check the GPU"</button>
                {move || ui.self_test.get().map(|result| match result {
                    Ok(text) => view! { <span id="self-test-result" class="ok">{text}</span> }.into_any(),
                    Err(text) => view! { <span id="self-test-result" class="bad">{text}</span> }.into_any(),
                })}
            </div>
            {move || ui.sample_url.get().map(|url| view! { <img id="sample-image" class="sample" src=url /> })}

            <h3>"Rare-token finder"</h3>
            <p class="hint">"Ranks words the model's tokenizer keeps as one token by how little the text encoder knows about them (a weak prior is what a new subject needs). Or check any instance prompt or name."</p>
            <div class="quick">
                <label><span>"Candidates"</span><input prop:value=move || token_count.get() on:change=move |ev| token_count.set(event_target_value(&ev)) /></label>
                <label><span>"Max letters"</span><input prop:value=move || max_chars.get() on:change=move |ev| max_chars.set(event_target_value(&ev)) /></label>
                <label><span>"Class (optional)"</span><input prop:value=move || class.get() on:change=move |ev| class.set(event_target_value(&ev)) /></label>
                <label><span>"Check text (optional)"</span><input id="token-check" prop:value=move || check.get() on:change=move |ev| check.set(event_target_value(&ev)) /></label>
            </div>
            <button id="find-token" class="secondary" on:click=find_tokens>{move || if check.get().trim().is_empty() { "Find tokens" } else { "Check" }}</button>
            <table id="tokens" class="tokens" class:hidden=move || ui.tokens.get().is_empty()>
                <tr><th>"text"</th><th>"token id(s)"</th><th>"pieces"</th><th>"prior"</th><th>"warning"</th></tr>
                {move || ui.tokens.get().into_iter().map(|t| view! {
                    <tr>
                        <td class="mono">{t.text.clone()}</td>
                        <td class="mono">{t.ids.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")}</td>
                        <td class="mono">{t.pieces.join(" | ")}</td>
                        <td class="mono">{format!("{:.6}", t.prior)}</td>
                        <td class="bad">{t.warning.clone().unwrap_or_default()}</td>
                    </tr>
                }).collect_view()}
            </table>

            <h3>"Regularisation set"</h3>
            <p class="hint">"Class images made by the model you are training (image i uses seed + i). Uses the steps, seed and size above."</p>
            <div class="quick">
                <label class="wide"><span>"Class prompt"</span><input id="reg-prompt" prop:value=move || reg_prompt.get() on:change=move |ev| reg_prompt.set(event_target_value(&ev)) /></label>
                <label><span>"Images"</span><input id="reg-count" prop:value=move || reg_count.get() on:change=move |ev| reg_count.set(event_target_value(&ev)) /></label>
            </div>
            <button id="make-reg" class="secondary" on:click=make_reg>"Generate class images"</button>
            {move || ui.regularisation.get().map(|set| {
                let for_add = set.clone();
                view! {
                    <div class="gallery">
                        {set.images.iter().map(|(name, _, url)| view! { <figure><img src=url.clone() alt=name.clone() /><figcaption>{name.clone()}</figcaption></figure> }).collect_view()}
                    </div>
                    <pre id="reg-entry">{set.entry.clone()}</pre>
                    <button id="reg-add" on:click=move |_| if let Err(e) = ui.add_regularisation_set(&for_add) { ui.run.error.set(Some(e)) }>"Add to the dataloader config"</button>
                }
            })}
        </section>
    }
}
