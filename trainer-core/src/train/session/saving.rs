//! What a run leaves in its output folder: metrics and the loss plot, run
//! checkpoints (and resuming from them), the run record, and the exports.

use std::collections::BTreeMap;

use super::{trained_text_encoders, update_text_encoders, Session, StepReport, TEXT_ENCODER_2_PREFIX, TEXT_ENCODER_PREFIX};
use crate::config::training::ModelType;
use crate::error::{Error, Result};
use crate::train::checkpoint::{self, Checkpoint, RunState};
use crate::train::metrics::{self, StepMetrics};
use crate::train::run_record::{self, OutputUse, RunRecord};
use crate::train::storage::join;
use crate::train::tensor_file::HostTensor;
use crate::train::{ema, export, full_export};

impl Session<'_> {
    pub fn checkpoint_due(&self) -> bool {
        let every = self.config.checkpoint_step_interval;
        every > 0 && self.step.is_multiple_of(every)
    }

    /// Records a step in `metrics.jsonl` and redraws `loss.png`.
    pub fn record(&mut self, report: &StepReport, seconds: f64) -> Result<()> {
        let entry = StepMetrics {
            step: report.step,
            epoch: report.epoch,
            loss: report.loss,
            lr: report.lr,
            grad_norm: report.grad_norm,
            time: seconds,
            eval_loss: report.eval_loss,
            prodigy_d: report.prodigy_d,
        };
        self.storage.append(&self.output_path("metrics.jsonl"), (serde_json::to_string(&entry).expect("serialises") + "\n").as_bytes())?;
        self.metrics.push(entry);
        Ok(())
    }

    pub fn write_loss_plot(&self) -> Result<String> {
        let path = self.output_path("loss.png");
        self.storage.write(&path, &metrics::png_bytes(&metrics::loss_plot(&self.metrics, 640, 360)))?;
        Ok(path)
    }

    /// Saves a checkpoint (atomically) and prunes old ones.
    pub async fn save_checkpoint(&self) -> Result<String> {
        let checkpoint = Checkpoint {
            path: String::new(),
            state: RunState {
                format: checkpoint::CHECKPOINT_FORMAT,
                step: self.step,
                epoch: self.epoch,
                sampler: self.main.sampler.state().clone(),
                prior_sampler: self.prior.as_ref().map(|p| p.sampler.state().clone()),
                model_type: format!("{:?}", self.config.model_type),
                lora_rank: (self.config.model_type == ModelType::Lora).then_some(self.config.lora_rank),
                optimizer: self.optimizer.rule.name().to_string(),
                optimizer_scalars: self.optimizer.scalars(),
            },
            trainable: {
                let mut tensors = self.trainable_tensors().await?;
                if let Some(ema) = &self.ema {
                    tensors.extend(ema.state().await?);
                }
                tensors
            },
            optimizer: self.optimizer.state().await?,
        };
        checkpoint::save(self.storage, &self.config.output_dir, &checkpoint, self.config.checkpoints_total_limit, self.checkpoint_hook.as_ref())
    }

    /// The trainable tensors by module path; the text encoders' start with
    /// `text_encoder.` and `text_encoder_2.`.
    async fn trainable_tensors(&self) -> Result<BTreeMap<String, HostTensor>> {
        let mut all = checkpoint::trainable_tensors(&self.model.unet).await?;
        for (prefix, encoder) in trained_text_encoders(self.config.train_text_encoder, &self.model) {
            for (name, tensor) in checkpoint::trainable_tensors(encoder).await? {
                all.insert(format!("{prefix}{name}"), tensor);
            }
        }
        Ok(all)
    }

    /// What this run trains, how and on what, for the output folder's record.
    pub fn run_record(&self) -> RunRecord {
        let c = &self.config;
        let mut adapters = BTreeMap::from([("model_type".to_string(), format!("{:?}", c.model_type))]);
        if c.model_type == ModelType::Lora {
            let mut layers: Vec<&str> = self.model.unet.adapted_layers().iter().map(|l| l.path.as_str()).collect();
            layers.extend(self.model.unet.adapted_convs().iter().map(|c| c.path.as_str()));
            adapters.insert("lora_rank".into(), c.lora_rank.to_string());
            adapters.insert("lora_alpha".into(), c.lora_alpha.to_string());
            if let Some(lycoris) = &c.lycoris {
                adapters.insert("lycoris_config".into(), lycoris.source.clone());
            }
            if c.use_dora {
                // Only when on, so records from before DoRA still compare equal.
                adapters.insert("use_dora".into(), "true".into());
            }
            adapters.insert("LoRA target layers".into(), format!("{} layers, {}", layers.len(), &RunRecord::content_hash(&layers)[..12]));
            adapters.insert("train_text_encoder".into(), c.train_text_encoder.to_string());
        } else if c.train_text_encoder {
            // Only when on, so full fine-tunes recorded before it compare equal.
            adapters.insert("train_text_encoder".into(), "true".into());
        }
        let datasets = self.plan.datasets.iter().map(|d| (d.id.clone(), RunRecord::content_hash(&d.images))).collect();
        let model = serde_json::to_value(&self.model.fingerprints).expect("fingerprints serialise");
        RunRecord::new(model, adapters, serde_json::to_value(c).expect("configs serialise"), datasets)
    }

    /// Readies the output folder and records this run in it: a new run
    /// into a folder that holds one is refused, `StartOver` moves the old
    /// outputs aside, and resuming (`resume`: `latest` or a checkpoint)
    /// checks the folder's record, refusing a changed model or adapter
    /// layout. Returns what to tell the user (what changed, where old
    /// outputs went, which checkpoint was resumed).
    pub fn begin(&mut self, output_use: OutputUse, resume: Option<&str>) -> Result<Vec<String>> {
        let output_dir = self.config.output_dir.clone();
        let mut notes = run_record::clean_interrupted_writes(self.storage, &output_dir)?;
        if let Some(aside) = run_record::prepare_output(self.storage, &output_dir, output_use)? {
            notes.push(format!("the earlier run's outputs were moved to {aside}"));
        }
        let record = self.run_record();
        if let (Some(which), OutputUse::Resume) = (resume, output_use) {
            if let Some(earlier) = run_record::read(self.storage, &output_dir)? {
                match record.compare(&earlier) {
                    Ok(changes) => notes.extend(changes.into_iter().map(|c| format!("since the run began: {c}"))),
                    Err(problems) => {
                        return Err(Error::Config {
                            source_name: join(&output_dir, run_record::RUN_RECORD),
                            problems: problems.into_iter().map(|p| format!("cannot resume: {p}")).collect(),
                        })
                    }
                }
            }
            let path = self.resume(which)?;
            notes.push(format!("resumed from {path} at step {}", self.step));
            notes.extend(self.resume_notes.iter().cloned());
        }
        run_record::write(self.storage, &output_dir, &record)?;
        Ok(notes)
    }

    /// Continues from a checkpoint (`latest` or a path): weights, moments,
    /// step, sampler positions; metrics after that step are dropped.
    pub fn resume(&mut self, which: &str) -> Result<String> {
        let path = checkpoint::resolve(self.storage, &self.config.output_dir, which)?;
        let saved = checkpoint::load(self.storage, &path)?;
        // The UNet's tensors, and the text encoders' by prefix.
        let mut unet = BTreeMap::new();
        let mut text: BTreeMap<&str, BTreeMap<String, HostTensor>> = BTreeMap::new();
        let mut averages = BTreeMap::new();
        for (name, tensor) in saved.trainable.clone() {
            if name.starts_with(ema::CHECKPOINT_PREFIX) {
                averages.insert(name, tensor);
                continue;
            }
            match [TEXT_ENCODER_PREFIX, TEXT_ENCODER_2_PREFIX].into_iter().find(|p| name.starts_with(p)) {
                Some(prefix) => text.entry(prefix).or_default().insert(name[prefix.len()..].to_string(), tensor),
                None => unet.insert(name, tensor),
            };
        }
        if !text.is_empty() && !self.config.train_text_encoder {
            return Err(Error::Config {
                source_name: path,
                problems: vec!["this checkpoint trained the text encoder; set train_text_encoder to resume it".into()],
            });
        }
        self.model.unet = checkpoint::restore_trainable(self.model.unet.clone(), &unet, &self.train_device, &path)?;
        let train_device = &self.train_device;
        update_text_encoders(self.config.train_text_encoder, &mut self.model, |prefix, encoder| {
            checkpoint::restore_trainable(encoder, &text.remove(prefix).unwrap_or_default(), train_device, &path)
        })?;
        if saved.state.optimizer != self.optimizer.rule.name() {
            return Err(Error::Config {
                source_name: path,
                problems: vec![format!(
                    "this checkpoint was trained with {} and the config says {}: resume with the same optimizer, or start over (--start-over keeps the old outputs)",
                    saved.state.optimizer,
                    self.optimizer.rule.name()
                )],
            });
        }
        self.optimizer.load_state(&saved.optimizer, &saved.state.optimizer_scalars, saved.state.step, &self.device).map_err(|e| match e {
            Error::Io { path: tensor, message } => Error::Io { path: format!("{path}: {tensor}"), message },
            other => other,
        })?;
        let mut notes = Vec::new();
        match (self.ema.as_mut(), averages.is_empty()) {
            (Some(ema), false) => ema.load_state(&averages, &self.device, &path)?,
            (Some(_), true) if saved.state.step > 0 => {
                notes.push("the checkpoint has no EMA weights (use_ema was off): the EMA starts from the resumed weights".to_string())
            }
            (None, false) => notes.push("the checkpoint's EMA weights are dropped: use_ema is off".to_string()),
            _ => {}
        }
        let mut misfits = Vec::new();
        misfits.extend(self.main.sampler.restore(saved.state.sampler.clone()).err());
        if let (Some(prior), Some(state)) = (self.prior.as_mut(), saved.state.prior_sampler.clone()) {
            misfits.extend(prior.sampler.restore(state).err());
        }
        notes.extend(misfits.into_iter().map(|m| format!("{m}: the data order starts a new pass (the step count goes on)")));
        self.resume_notes = notes;
        self.step = saved.state.step;
        self.epoch = saved.state.epoch;
        let metrics_path = self.output_path("metrics.jsonl");
        let kept = match self.storage.read(&metrics_path)? {
            Some(bytes) => metrics::parse_jsonl(&String::from_utf8_lossy(&bytes), self.step),
            None => Vec::new(),
        };
        self.storage.write(&metrics_path, metrics::to_jsonl(&kept).as_bytes())?;
        self.metrics = kept;
        Ok(path)
    }

    /// Writes the trained LoRA in kohya format; returns its path.
    pub async fn export_lora(&self, name: &str) -> Result<String> {
        self.write_lora(name, "trained weights").await
    }

    /// With `use_ema`, writes the EMA weights as a second LoRA beside the
    /// trained one, `<name>-ema.safetensors` (SimpleTuner keeps a LoRA's
    /// EMA only in its checkpoints); returns its path.
    pub async fn export_lora_ema(&mut self, name: &str) -> Result<Option<String>> {
        let Some(trained) = self.put_ema_weights() else { return Ok(None) };
        let written = self.write_lora(&format!("{name}-ema"), "EMA of the trained weights").await;
        self.put_back(trained);
        written.map(Some)
    }

    async fn write_lora(&self, name: &str, weights: &str) -> Result<String> {
        let c = &self.config;
        let extra = BTreeMap::from([
            ("ss_output_name".to_string(), name.to_string()),
            ("ss_steps".to_string(), self.step.to_string()),
            ("ss_epoch".to_string(), self.epoch.to_string()),
            ("ss_learning_rate".to_string(), c.learning_rate.to_string()),
            ("ss_lr_scheduler".to_string(), format!("{:?}", c.lr_scheduler).to_lowercase()),
            ("ss_optimizer".to_string(), format!("{:?}", c.optimizer).to_lowercase()),
            ("ss_seed".to_string(), c.seed.to_string()),
            ("ss_training_comment".to_string(), "trained with Burnbooth".to_string()),
            ("ss_sd_model_name".to_string(), self.plan.model.clone().unwrap_or_default()),
            ("modelspec.title".to_string(), name.to_string()),
            ("burnbooth.regularisation_mode".to_string(), format!("{:?}", c.regularisation_mode)),
            ("burnbooth.lora_dropout".to_string(), c.lora_dropout.to_string()),
            ("burnbooth.weights".to_string(), weights.to_string()),
        ]);
        let bytes = export::kohya_file(&self.model, &extra, self.config.lycoris.as_ref()).await?;
        let path = self.output_path(&format!("{name}.safetensors"));
        self.storage.write(&path, &bytes)?;
        Ok(path)
    }

    /// Writes a full fine-tune as a diffusers folder `<output>/<name>/` (the
    /// configs come from `configs`, the source folder's files by name, or
    /// are the family's published ones) and the single-file checkpoint
    /// `<output>/<name>.safetensors`. Returns both paths. With `use_ema`
    /// the EMA weights are exported, as SimpleTuner does.
    pub async fn export_full(&mut self, name: &str, configs: Option<&BTreeMap<String, String>>) -> Result<(String, String)> {
        let trained = self.put_ema_weights();
        let written = self.write_full(name, configs).await;
        if let Some(trained) = trained {
            self.put_back(trained);
        }
        written
    }

    async fn write_full(&self, name: &str, configs: Option<&BTreeMap<String, String>>) -> Result<(String, String)> {
        let dir = self.output_path(name);
        // Written beside the old export and swapped in whole: a run killed
        // mid-export leaves the previous export as it was
        // (run_record::clean_interrupted_writes tidies up at the next start).
        let partial = format!("{dir}{}", run_record::PARTIAL);
        self.storage.remove_all(&partial)?;
        full_export::write_diffusers_folder(&self.model, self.storage, &partial, configs, self.checkpoint_hook.as_ref()).await?;
        let old = format!("{dir}{}", run_record::REPLACED);
        if self.storage.exists(&dir)? {
            self.storage.remove_all(&old)?;
            self.storage.rename(&dir, &old)?;
        }
        self.storage.rename(&partial, &dir)?;
        self.storage.remove_all(&old)?;
        let path = self.output_path(&format!("{name}.safetensors"));
        self.storage.write(&path, &full_export::single_file_checkpoint(&self.model).await?)?;
        Ok((dir, path))
    }
}
