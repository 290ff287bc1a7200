//! Messages between the page and the training worker. Training runs in a
//! dedicated Web Worker so that the page repaints and answers clicks while
//! the GPU works (compiling kernels blocks the thread that asks for them).
//! A message is `{ json, bytes }`: the message as JSON plus file contents,
//! whose buffers are transferred rather than copied.

use js_sys::{Array, Object, Reflect, Uint8Array};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use wasm_bindgen::{JsCast, JsValue};

/// The page asks the worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ToWorker {
    /// Reads what OPFS holds from earlier visits.
    Restore,
    /// Creates the compute device (`cpu` for burn's CPU backend).
    Device {
        cpu: bool,
    },
    /// A model's files (bytes in the same order as `paths`). `single_file`:
    /// one `.safetensors` checkpoint, else a diffusers folder.
    Model {
        name: String,
        single_file: bool,
        paths: Vec<String>,
    },
    /// A dataset's picked files.
    Dataset {
        id: String,
        paths: Vec<String>,
    },
    /// Gets a run with these configs ready before Train: fills the caches
    /// and runs one discarded training step, so that the GPU kernels are
    /// compiled while the user still reads the plan (run::prepare).
    Prepare {
        training: (String, String),
        dataloader: (String, String),
        side_files: std::collections::BTreeMap<String, String>,
    },
    /// Trains (or resumes) with these configs: (file name, text).
    Train {
        training: (String, String),
        dataloader: (String, String),
        /// The files the training config names, by file name (lycoris_config...).
        side_files: std::collections::BTreeMap<String, String>,
    },
    Pause,
    Resume,
    Stop,
    Sample {
        prompt: String,
        steps: usize,
        seed: u64,
        size: usize,
        with_lora: bool,
    },
    /// A stored file, for download.
    Read {
        path: String,
    },
    /// Multiplies matrices on the device and compares with the CPU.
    SelfTest,
    /// The rare-token finder: search (`check` empty) or score the given texts.
    FindToken {
        count: usize,
        max_chars: usize,
        class: Option<String>,
        check: Vec<String>,
    },
    /// Generates a regularisation set with the base model.
    MakeReg {
        prompt: String,
        count: usize,
        steps: usize,
        seed: u64,
        size: usize,
    },
    ClearSaved,
}

/// The worker tells the page.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum FromWorker {
    Ready,
    Device {
        ok: bool,
        text: String,
    },
    Saved(String),
    /// The model's description and whether the adapter can hold it.
    Model {
        info: Result<String, String>,
        fit: Option<Result<String, String>>,
    },
    Progress {
        phase: String,
        done: u64,
        total: u64,
    },
    Step {
        step: u64,
        loss: f32,
        stats: String,
    },
    /// The losses so far (after resuming).
    Losses(Vec<(u64, f32)>),
    Note(String),
    /// A validation PNG (in `bytes`).
    Validation {
        caption: String,
    },
    Outputs(Vec<String>),
    /// The run ended (finished, stopped or failed: then `error`).
    Ended {
        phase: String,
        error: Option<String>,
    },
    /// A sampled PNG (in `bytes`).
    Sample,
    File {
        path: String,
    },
    SelfTest(Result<String, String>),
    Tokens(Vec<trainer_core::tools::TokenReport>),
    /// A regularisation set: its dataloader entry and images (in `bytes`).
    RegularisationSet {
        entry: String,
        folder: String,
        paths: Vec<String>,
    },
    Error(String),
}

/// Builds the message object and the list of buffers to transfer.
pub fn encode<T: Serialize>(message: &T, bytes: Vec<Vec<u8>>) -> (JsValue, Array) {
    let object = Object::new();
    let json = serde_json::to_string(message).expect("messages serialise");
    let _ = Reflect::set(&object, &"json".into(), &JsValue::from_str(&json));
    let list = Array::new();
    let transfer = Array::new();
    for b in bytes {
        let array = Uint8Array::from(b.as_slice());
        transfer.push(&array.buffer());
        list.push(&array);
    }
    let _ = Reflect::set(&object, &"bytes".into(), &list);
    (object.into(), transfer)
}

pub fn decode<T: DeserializeOwned>(data: &JsValue) -> Result<(T, Vec<Vec<u8>>), String> {
    let json = Reflect::get(data, &"json".into()).ok().and_then(|j| j.as_string()).ok_or("a message without json")?;
    let message = serde_json::from_str(&json).map_err(|e| format!("bad message {json}: {e}"))?;
    let mut bytes = Vec::new();
    if let Ok(list) = Reflect::get(data, &"bytes".into()) {
        if let Some(list) = list.dyn_ref::<Array>() {
            for item in list.iter() {
                bytes.push(item.unchecked_into::<Uint8Array>().to_vec());
            }
        }
    }
    Ok((message, bytes))
}
