//! Training and dataloader configs: SimpleTuner's real examples, the guide's
//! setup, the three file forms, and every documented error.

mod common;

use std::collections::BTreeMap;

use common::*;
use trainer_core::config::dataset::CaptionStrategy;
use trainer_core::config::training::{ConfigFormat, LrSchedule, ModelFamily, OptimizerKind, TrainingConfig};
use trainer_core::data::geometry::ResolutionType;
use trainer_core::plan::StopsOn;

const GUIDE_ENV: &str = r#"
export MODEL_FAMILY=sdxl
MODEL_TYPE=lora
TRAIN_BATCH_SIZE=1
LEARNING_RATE=4e-6
LEARNING_RATE_END=4e-7
OPTIMIZER=adamw-bf16
MAX_NUM_STEPS=1000
NUM_EPOCHS=25
VALIDATION_STEPS=100
VALIDATION_PROMPT="a photograph of subjectname"
DATALOADER_CONFIG="multidatabackend-dreambooth.json"
"#;

fn shared_config(name: &str) -> String {
    std::fs::read_to_string(format!("{}/tests/fixtures/configs/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

#[test]
fn guide_env_config_resolves_as_decisions_say() {
    let config = TrainingConfig::parse(GUIDE_ENV, ConfigFormat::Env, "/home/me/training/sdxl-env.sh", &no_env).unwrap();
    assert_eq!(config.model_family, ModelFamily::Sdxl);
    assert_eq!(config.dataset_options.train_batch_size, 1);
    assert_eq!(config.learning_rate, 4e-6);
    assert_eq!(config.lr_end, 4e-7);
    assert_eq!(config.lr_scheduler, LrSchedule::Polynomial, "LEARNING_RATE_END implies a decaying schedule");
    assert_eq!(config.optimizer, OptimizerKind::AdamwBf16);
    assert_eq!(config.max_train_steps, Some(1000));
    assert_eq!(config.num_train_epochs, Some(25));
    assert_eq!(config.validation_step_interval, 100);
    assert_eq!(config.validation_prompt.as_deref(), Some("a photograph of subjectname"));
    // A relative DATALOADER_CONFIG is relative to the config file's folder.
    assert_eq!(config.data_backend_config, "/home/me/training/multidatabackend-dreambooth.json");
}

#[test]
fn json_and_toml_forms_resolve_to_the_same_config() {
    let env = TrainingConfig::parse(GUIDE_ENV, ConfigFormat::Env, "/t/config.env", &no_env).unwrap();
    let json = r#"{"--model_family": "sdxl", "model_type": "lora", "train_batch_size": 1, "learning_rate": 4e-6,
        "lr_end": 4e-7, "optimizer": "adamw_bf16", "max_train_steps": 1000, "num_train_epochs": 25,
        "validation_steps": 100, "validation_prompt": "a photograph of subjectname",
        "data_backend_config": "multidatabackend-dreambooth.json"}"#;
    let json = TrainingConfig::parse(json, ConfigFormat::Json, "/t/config.json", &no_env).unwrap();
    let toml = r#"
model_family = "sdxl"
model_type = "lora"
"--train_batch_size" = 1
learning_rate = 4e-6
lr_end = 4e-7
optimizer = "adamw-bf16"
max_train_steps = 1000
num_train_epochs = 25
validation_step_interval = 100
validation_prompt = "a photograph of subjectname"
data_backend_config = "multidatabackend-dreambooth.json"
"#;
    let toml = TrainingConfig::parse(toml, ConfigFormat::Toml, "/t/config.toml", &no_env).unwrap();
    let canonical = |c: &TrainingConfig| {
        let mut value = serde_json::to_value(c).unwrap();
        value.as_object_mut().unwrap().remove("source_name");
        value.as_object_mut().unwrap().remove("warnings");
        value
    };
    assert_eq!(canonical(&env), canonical(&json));
    assert_eq!(canonical(&env), canonical(&toml));
}

#[test]
fn guide_dataloader_config_00_loads_with_its_settings() {
    let training = training(GUIDE_ENV);
    let config = dataloader(&shared_config("00-dreambooth-single-subject.json"), &training).unwrap();
    assert_eq!(config.datasets.len(), 2);
    let subject = &config.datasets[0];
    assert_eq!(subject.id, "subjectname-data");
    assert_eq!(subject.caption_strategy, CaptionStrategy::InstancePrompt);
    assert_eq!(subject.instance_prompts, ["subjectname"]);
    assert_eq!(subject.geometry.resolution_type, ResolutionType::Area);
    assert_eq!(subject.geometry.resolution, 0.5);
    assert_eq!(subject.geometry.minimum_image_size, Some(0.25));
    let reg = &config.datasets[1];
    assert_eq!(reg.repeats, 10);
    assert!(reg.ignore_epochs);
    assert_eq!(config.default_text_embeds().id, "textembeds");
    assert_eq!(subject.text_embeds, "textembeds");
}

/// The guide's setup end to end: env config + config 00, with images in
/// memory standing in for the two folders.
fn guide_plan(env: &str) -> trainer_core::plan::Plan {
    let training = training(env);
    let config = dataloader(&shared_config("00-dreambooth-single-subject.json"), &training).unwrap();
    let subject = source_with(&[("a.jpg", jpeg(800, 600)), ("b.jpg", jpeg(600, 800)), ("c.png", png(768, 768)), ("tiny.jpg", jpeg(300, 200))]);
    let reg: Vec<(String, Vec<u8>)> = (0..12).map(|i| (format!("man_{i}.jpg"), jpeg(900, 900))).collect();
    let reg = source_with(&reg.iter().map(|(p, b)| (p.as_str(), b.clone())).collect::<Vec<_>>());
    let sources = BTreeMap::from([("subjectname-data".to_string(), subject), ("regularisation-data".to_string(), reg)]);
    plan_memory(&training, &config, sources).unwrap()
}

#[test]
fn guide_setup_plans_and_names_the_limit_that_stops() {
    let plan = guide_plan(GUIDE_ENV);
    let subject = &plan.datasets[0];
    assert_eq!(subject.images_used, 3);
    assert_eq!(subject.skipped.len(), 1);
    assert!(subject.skipped[0].reason.contains("minimum_image_size"), "{:?}", subject.skipped);
    // area 0.5: 800x600 -> 832x640 bucket 1.3; square -> 768 (SimpleTuner's remap).
    let a = subject.images.iter().find(|i| i.path == "a.jpg").unwrap();
    assert_eq!((a.target_size, a.aspect_bucket.as_str()), ([832, 640], "1.3"));
    let c = subject.images.iter().find(|i| i.path == "c.png").unwrap();
    assert_eq!(c.target_size, [768, 768]);
    assert_eq!(a.caption, "subjectname");
    // 25 epochs take far longer than 1000 steps when the regularisation set,
    // which does not hold epochs open, is drawn most of the time.
    assert_eq!(plan.stops_on, StopsOn::MaxSteps);
    assert_eq!(plan.max_steps, 1000);
    assert!(plan.steps_per_epoch > 6, "{}", plan.steps_per_epoch);
    assert!(plan.warnings.iter().any(|w| w.contains("whichever comes first")));

    let short = guide_plan(&GUIDE_ENV.replace("NUM_EPOCHS=25", "NUM_EPOCHS=2"));
    assert_eq!(short.stops_on, StopsOn::Epochs);
    assert!(short.max_steps < 1000);
    assert_eq!(short.epochs, 2);
}

#[test]
fn every_shared_config_loads_or_fails_naming_dataset_and_reason() {
    let training = training(GUIDE_ENV);
    let loads = [
        "00-dreambooth-single-subject.json",
        "02-simpletuner-config-multidatabackend-multiresolution.json",
        "06-simpletuner-doc-DREAMBOOTH-md-subject-plus-regularisation.json",
    ];
    for name in loads {
        let config = dataloader(&shared_config(name), &training).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!config.datasets.is_empty());
    }
    let multi = dataloader(&shared_config("02-simpletuner-config-multidatabackend-multiresolution.json"), &training).unwrap();
    assert_eq!(multi.datasets.len(), 4);
    assert_eq!(multi.datasets[0].geometry.resolution, 512.0 * 512.0 / 1e6);
    assert_eq!(multi.datasets[0].cache_dir_vae, "/cfg/cache/vae-512", "relative cache dirs resolve against the config's folder");

    let huggingface = error_text(dataloader(&shared_config("04-simpletuner-examples-small-dreambooth-512px.json"), &training));
    assert!(huggingface.contains("dataset 'dreambooth-512'") && huggingface.contains("huggingface"), "{huggingface}");
    for name in ["01-simpletuner-config-multidatabackend.json.example.json", "05-simpletuner-v0.9.7.5-multidatabackend.example.json"] {
        let text = error_text(dataloader(&shared_config(name), &training));
        assert!(text.contains("dataset 'something-special-to-remember-by'") && text.contains("crop_style"), "{name}: {text}");
        assert!(text.contains("dataset 'another-special-name-for-another-backend'") && text.contains("'aws'"), "{name}: {text}");
    }
}

#[test]
fn env_placeholders_expand_or_name_the_missing_variable() {
    let training = training(GUIDE_ENV);
    let json = r#"[{"id": "d", "type": "local", "instance_data_dir": "{env:DATA_ROOT}/photos", "cache_dir_vae": "{output_dir}/vae/{model_family}/{id}"}]"#;
    let text = error_text(dataloader(json, &training));
    assert!(text.contains("dataset 'd'") && text.contains("DATA_ROOT"), "{text}");
    let env = |name: &str| (name == "DATA_ROOT").then(|| "/data".to_string());
    let config = trainer_core::config::dataset::parse_dataloader_config(json, "x.json", None, &training.dataset_defaults(), &env).unwrap();
    assert_eq!(config.datasets[0].instance_data_dir, "/data/photos");
    assert!(config.datasets[0].cache_dir_vae.ends_with("/vae/sdxl/d"), "{}", config.datasets[0].cache_dir_vae);
}

#[test]
fn dataloader_errors_name_the_dataset_key_and_value() {
    let cases: &[(&str, &[&str])] = &[
        (r#"[{"id": "a", "type": "local", "instance_data_dir": "x", "crop": "yes"}]"#, &["dataset 'a'", "'crop'", "\"yes\""]),
        (r#"[{"id": "a", "type": "local", "instance_data_dir": "x", "repeats": -1}]"#, &["dataset 'a'", "'repeats'", "-1"]),
        (r#"[{"id": "a", "type": "local", "instance_data_dir": "x", "repeats": "many"}]"#, &["dataset 'a'", "'repeats'", "many"]),
        (r#"[{"id": "a", "type": "local", "instance_data_dir": "x"}, {"id": "a", "type": "local", "instance_data_dir": "y"}]"#, &["dataset 'a'", "twice"]),
        (
            r#"[{"id": "a", "type": "local", "instance_data_dir": "x", "cache_dir_vae": "c"}, {"id": "b", "type": "local", "instance_data_dir": "y", "cache_dir_vae": "c/"}]"#,
            &["'a'", "'b'", "cache_dir_vae"],
        ),
        (r#"[{"id": "a", "type": "local"}]"#, &["dataset 'a'", "instance_data_dir"]),
        (r#"[{"id": "a", "type": "csv", "instance_data_dir": "x"}]"#, &["dataset 'a'", "'csv'", "not supported"]),
        (r#"[{"id": "a", "type": "ftp", "instance_data_dir": "x"}]"#, &["dataset 'a'", "'ftp'"]),
        (r#"[{"id": "a", "instance_data_dir": "x"}]"#, &["dataset 'a'", "'type'"]),
        (r#"[{"id": "a", "type": "local", "instance_data_dir": "x", "caption_strategy": "instanceprompt"}]"#, &["dataset 'a'", "instance_prompt"]),
        (
            r#"[{"id": "a", "type": "local", "instance_data_dir": "x", "resolution": 512.5, "resolution_type": "pixel_area"}]"#,
            &["dataset 'a'", "pixel_area", "512.5"],
        ),
        (r#"[{"id": "a", "type": "local", "instance_data_dir": "x", "crop_style": "middle"}]"#, &["dataset 'a'", "crop_style", "middle"]),
        (r#"[{"id": "a", "type": "local", "instance_data_dir": "x", "crop": true, "crop_aspect": "closest"}]"#, &["dataset 'a'", "crop_aspect_buckets"]),
        (r#"[{"id": "a", "type": "local", "instance_data_dir": "x", "text_embeds": "nope"}]"#, &["dataset 'a'", "'nope'"]),
        (
            r#"[{"id": "a", "type": "local", "instance_data_dir": "x"}, {"id": "t1", "type": "local", "dataset_type": "text_embeds", "default": true}, {"id": "t2", "type": "local", "dataset_type": "text_embeds", "default": true}]"#,
            &["t1", "t2", "default"],
        ),
        (r#"[{"id": "a", "type": "local", "instance_data_dir": "x", "dataset_type": "video"}]"#, &["dataset 'a'", "video"]),
        (
            r#"[{"id": "a", "type": "local", "instance_data_dir": "x"}, {"id": "m", "type": "local", "dataset_type": "conditioning", "conditioning_type": "canny", "instance_data_dir": "y"}]"#,
            &["dataset 'm'", "conditioning_type 'canny'", "'mask'"],
        ),
        (
            r#"[{"id": "a", "type": "local", "instance_data_dir": "x"}, {"id": "m", "type": "local", "dataset_type": "conditioning", "conditioning_type": "mask", "instance_data_dir": "y"}]"#,
            &["mask dataset 'm' belongs to no image dataset", "source_dataset_id"],
        ),
        (
            r#"[{"id": "a", "type": "local", "instance_data_dir": "x"}, {"id": "m", "type": "local", "dataset_type": "conditioning", "conditioning_type": "mask", "instance_data_dir": "y", "source_dataset_id": "b"}]"#,
            &["mask dataset 'm'", "source_dataset_id 'b'"],
        ),
        (r#"[{"id": "a", "type": "local", "instance_data_dir": "x", "conditioning_data": "m"}]"#, &["dataset 'a'", "conditioning_data 'm'"]),
        (
            r#"[{"id": "a", "type": "local", "instance_data_dir": "x", "conditioning_data": ["m", "n"]}, {"id": "m", "type": "local", "dataset_type": "conditioning", "conditioning_type": "mask", "instance_data_dir": "y"}, {"id": "n", "type": "local", "dataset_type": "conditioning", "conditioning_type": "mask", "instance_data_dir": "z"}]"#,
            &["dataset 'a' has two mask datasets, 'm' and 'n'"],
        ),
        (r#"[{"id": "a", "type": "local", "instance_data_dir": "x", "conditioning_type": "mask"}]"#, &["dataset 'a'", "belong on the mask dataset"]),
        (
            r#"[{"id": "a", "type": "local", "instance_data_dir": "x", "resolution_type": "area", "minimum_image_size": 512}]"#,
            &["dataset 'a'", "minimum_image_size", "megapixels"],
        ),
        (r#"[]"#, &["empty"]),
        (r#"{"id": "a"}"#, &["array"]),
        (r#"[{"id": "a",]"#, &["not valid JSON"]),
    ];
    for (json, needles) in cases {
        let text = error_text(dataloader_with_defaults(json));
        assert!(text.contains("/cfg/dataloader.json"), "the file is named: {text}");
        for needle in *needles {
            assert!(text.contains(needle), "error for {json} should mention {needle}: {text}");
        }
    }
}

#[test]
fn string_booleans_and_numbers_are_accepted_with_a_warning() {
    let json = r#"[{"id": "a", "type": "local", "instance_data_dir": "x", "crop": "false", "repeats": "3"}]"#;
    let config = dataloader_with_defaults(json).unwrap();
    assert!(!config.datasets[0].geometry.crop, "\"false\" means false (SimpleTuner treats it as true)");
    assert_eq!(config.datasets[0].repeats, 3);
    assert!(config.warnings.iter().any(|w| w.contains("'crop'") && w.contains("dataset 'a'")), "{:?}", config.warnings);
    assert!(config.warnings.iter().any(|w| w.contains("'repeats'")), "{:?}", config.warnings);
}

#[test]
fn unknown_keys_warn_with_a_suggestion_or_fail_when_strict() {
    let json = r#"[{"id": "a", "type": "local", "instance_data_dir": "x", "instance_promt": "sks"}]"#;
    let config = dataloader_with_defaults(json).unwrap();
    let warning = config.warnings.iter().find(|w| w.contains("instance_promt")).expect("a warning for the unknown key");
    assert!(warning.contains("dataset 'a'") && warning.contains("did you mean 'instance_prompt'"), "{warning}");

    let defaults = trainer_core::config::dataset::DatasetDefaults { strict: true, ..Default::default() };
    let strict = trainer_core::config::dataset::parse_dataloader_config(json, "d.json", None, &defaults, &no_env);
    assert!(error_text(strict).contains("instance_promt"));
}

/// Prodigy and Adafactor read SimpleTuner's `optimizer_config` over its
/// defaults; Prodigy's learning rate is 1 unless optimizer_config says
/// otherwise (learning_rate is not used, with a warning, as SimpleTuner
/// overrides it).
#[test]
fn prodigy_and_adafactor_read_optimizer_config_over_simpletuners_defaults() {
    let base = "MODEL_FAMILY=sd1x\nDATALOADER_CONFIG=d.json\n";
    let plain = training(&format!("{base}OPTIMIZER=prodigy\n"));
    assert_eq!(plain.optimizer, OptimizerKind::Prodigy);
    let defaults = plain.prodigy.unwrap();
    assert_eq!((defaults.beta1, defaults.beta2, defaults.d0, defaults.d_coef, defaults.weight_decay), (0.9, 0.99, 1e-6, 1.0, 0.0));
    assert!(!defaults.use_bias_correction && !defaults.safeguard_warmup && defaults.decouple);
    assert_eq!(plain.learning_rate, 1.0);
    assert!(plain.warnings.is_empty(), "{:?}", plain.warnings);

    let tuned = training(&format!(
        "{base}OPTIMIZER=prodigy\nLEARNING_RATE=1e-4\nTRAINER_EXTRA_ARGS=\"--optimizer_config=d_coef=0.5,use_bias_correction=true,safeguard_warmup=true,lr=0.8,beta3=none,growth_rate=1.02 --prodigy_steps=200 --optimizer_beta1=0.8 --optimizer_beta2=0.95\"\n"
    ));
    let p = tuned.prodigy.unwrap();
    assert_eq!((p.d_coef, p.growth_rate, p.prodigy_steps, p.beta1, p.beta2, p.beta3), (0.5, 1.02, 200, 0.8, 0.95, None));
    assert!(p.use_bias_correction && p.safeguard_warmup);
    assert_eq!(tuned.learning_rate, 0.8);
    assert!(tuned.warnings.iter().any(|w| w.contains("learning_rate 0.0001 is not used by prodigy")), "{:?}", tuned.warnings);

    let adafactor = training(&format!("{base}OPTIMIZER=torch-adafactor\nTRAINER_EXTRA_ARGS=\"--optimizer_config=d=2,weight_decay=0.01,eps2=1e-2\"\n"));
    assert_eq!(adafactor.optimizer, OptimizerKind::Adafactor);
    let a = adafactor.adafactor.unwrap();
    assert_eq!((a.clip_threshold, a.weight_decay, a.epsilon2, a.beta2_decay), (2.0, 0.01, 1e-2, -0.8));
    let renamed = training(&format!("{base}OPTIMIZER=adafactor\n"));
    assert_eq!(renamed.optimizer, OptimizerKind::Adafactor);
    assert!(renamed.warnings.iter().any(|w| w.contains("SimpleTuner has removed it")), "{:?}", renamed.warnings);

    let adamw = training(&format!("{base}OPTIMIZER=adamw\nTRAINER_EXTRA_ARGS=\"--optimizer_config=d_coef=2 --prodigy_steps=5\"\n"));
    assert!(adamw.prodigy.is_none() && adamw.adafactor.is_none());
    assert!(adamw.warnings.iter().any(|w| w.contains("optimizer_config is ignored by AdamW")), "{:?}", adamw.warnings);
    assert!(adamw.warnings.iter().any(|w| w.contains("prodigy_steps is ignored")), "{:?}", adamw.warnings);
}

#[test]
fn training_config_errors_are_named() {
    let cases: &[(&str, &str)] = &[
        ("MODEL_FAMILY=flux\nDATALOADER_CONFIG=d.json", "model_family 'flux'"),
        ("DATALOADER_CONFIG=d.json", "model_family"),
        ("MODEL_FAMILY=sd1x", "data_backend_config"),
        ("MODEL_FAMILY=sd1x\nDATALOADER_CONFIG=d.json\nMAX_NUM_STEPS=0\nNUM_EPOCHS=0", "num_train_epochs"),
        ("MODEL_FAMILY=sd1x\nDATALOADER_CONFIG=d.json\nOPTIMIZER=lion", "optimizer 'lion' is not supported; use adamw, adamw_bf16, prodigy or torch-adafactor"),
        (
            "MODEL_FAMILY=sd1x\nDATALOADER_CONFIG=d.json\nOPTIMIZER=prodigy\nTRAINER_EXTRA_ARGS=\"--optimizer_config=d_coeff=2\"",
            "optimizer_config key 'd_coeff' is not one this optimizer takes",
        ),
        ("MODEL_FAMILY=sd1x\nDATALOADER_CONFIG=d.json\nOPTIMIZER=prodigy\nTRAINER_EXTRA_ARGS=\"--optimizer_config=d_coef=big\"", "'d_coef=big'"),
        (
            "MODEL_FAMILY=sd1x\nDATALOADER_CONFIG=d.json\nOPTIMIZER=prodigy\nTRAINER_EXTRA_ARGS=\"--optimizer_config=safeguard_warmup=1\"",
            "'safeguard_warmup' must be true or false",
        ),
        ("MODEL_FAMILY=sd1x\nDATALOADER_CONFIG=d.json\nOPTIMIZER=prodigy\nTRAINER_EXTRA_ARGS=\"--text_encoder_lr=1e-4\"", "prodigy estimates one step size"),
        (
            "MODEL_FAMILY=sd1x\nDATALOADER_CONFIG=d.json\nOPTIMIZER=torch-adafactor\nTRAINER_EXTRA_ARGS=\"--optimizer_config=d=0.5\"",
            "'d' (the clipping threshold) must be at least 1",
        ),
        ("MODEL_FAMILY=sd1x\nDATALOADER_CONFIG=d.json\nTRAIN_BATCH_SIZE=two", "train_batch_size"),
        ("MODEL_FAMILY=sd1x\nDATALOADER_CONFIG=d.json\nLEARNING_RATE=1e-7\nLR_END=1e-6", "lr_end"),
        ("MODEL_FAMILY=sd1x\nDATALOADER_CONFIG=d.json\nVALIDATION_PROMPT=\"unterminated", "quote"),
        (
            "MODEL_FAMILY=sd1x\nDATALOADER_CONFIG=d.json\nTRAINER_EXTRA_ARGS=\"--prediction_type=x0\"",
            "'prediction_type' is 'x0', which is not one of: epsilon, v_prediction, sample",
        ),
        ("MODEL_FAMILY=sd1x\nDATALOADER_CONFIG=d.json\nLEARNING_RATE=0", "learning_rate must be positive"),
        ("MODEL_FAMILY=sd1x\nDATALOADER_CONFIG=d.json\nLR_END=-1e-6", "'lr_end' must be at least 0, not -0.000001"),
        ("MODEL_FAMILY=sd1x\nDATALOADER_CONFIG=d.json\nTRAINER_EXTRA_ARGS=\"--adam_beta1=1.0\"", "'adam_beta1' must be at least 0 and below 1, not 1"),
        ("MODEL_FAMILY=sd1x\nDATALOADER_CONFIG=d.json\nTRAINER_EXTRA_ARGS=\"--adam_beta2=-0.5\"", "'adam_beta2' must be at least 0 and below 1"),
        ("MODEL_FAMILY=sd1x\nDATALOADER_CONFIG=d.json\nTRAINER_EXTRA_ARGS=\"--adam_epsilon=0\"", "'adam_epsilon' must be positive"),
        ("MODEL_FAMILY=sd1x\nDATALOADER_CONFIG=d.json\nTRAINER_EXTRA_ARGS=\"--adam_weight_decay=-0.01\"", "'adam_weight_decay' must be at least 0"),
        ("MODEL_FAMILY=sd1x\nDATALOADER_CONFIG=d.json\nTRAINER_EXTRA_ARGS=\"--lora_dropout=1.0\"", "'lora_dropout' must be at least 0 and below 1"),
        ("MODEL_FAMILY=sd1x\nDATALOADER_CONFIG=d.json\nLORA_ALPHA=0", "'lora_alpha' must be positive"),
        ("MODEL_FAMILY=sd1x\nDATALOADER_CONFIG=d.json\nTRAINER_EXTRA_ARGS=\"--max_grad_norm=-1\"", "'max_grad_norm' must be at least 0"),
        ("MODEL_FAMILY=sd1x\nDATALOADER_CONFIG=d.json\nPRIOR_LOSS_WEIGHT=-1", "'prior_loss_weight' must be at least 0"),
        ("MODEL_FAMILY=sd1x\nDATALOADER_CONFIG=d.json\nTRAINER_EXTRA_ARGS=\"--text_encoder_lr=0\"", "'text_encoder_lr' must be positive"),
    ];
    for (text, needle) in cases {
        let result = TrainingConfig::parse(text, ConfigFormat::Env, "/x/config.env", &no_env);
        let message = error_text(result);
        assert!(message.contains("/x/config.env") && message.contains(needle), "{text:?} -> {message}");
    }
    let json = TrainingConfig::parse(
        "{\"model_family\": \"sd1x\", \"data_backend_config\": \"d.json\", \"gradient_checkpointing\": \"maybe\"}",
        ConfigFormat::Json,
        "c.json",
        &no_env,
    );
    assert!(error_text(json).contains("gradient_checkpointing"));
    let unknown = TrainingConfig::parse("MODEL_FAMILY=sd1x\nDATALOADER_CONFIG=d.json\nLEARNING_RAT=1", ConfigFormat::Env, "c.env", &no_env).unwrap();
    assert!(unknown.warnings.iter().any(|w| w.contains("LEARNING_RAT") && w.contains("LEARNING_RATE")), "{:?}", unknown.warnings);
}

#[test]
fn extra_args_and_legacy_keys_are_read() {
    let config =
        training("MODEL_FAMILY=sd2x\nDATALOADER_CONFIG=d.json\nTRAINER_EXTRA_ARGS=\"--lora_rank=8 --snr_gamma 5 --offset_noise\"\nCHECKPOINTING_STEPS=250");
    assert_eq!(config.lora_rank, 8);
    assert_eq!(config.snr_gamma, Some(5.0));
    assert!(config.offset_noise);
    assert_eq!(config.checkpoint_step_interval, 250);
    let json =
        TrainingConfig::parse(r#"{"model_family": "sd1x", "data_backend_config": "d.json", "checkpointing_steps": 50}"#, ConfigFormat::Json, "c.json", &no_env)
            .unwrap();
    assert_eq!(json.checkpoint_step_interval, 50);
}

/// LoCon (`algo` locon or lora) as LyCORIS reads it: conv_dim and
/// conv_alpha fall back to the linear ones, alpha 0 means the rank, 1x1
/// kernels take the linear rank; without apply_preset every Linear layer
/// and convolution is adapted; enable_conv false keeps the convolutions
/// out; target_name adds layers by name.
#[test]
fn lycoris_config_reads_locon_as_lycoris_does() {
    use trainer_core::config::lycoris::{parse_lycoris_config, LycorisAlgo};
    let (full, warnings) = parse_lycoris_config(r#"{"algo": "lora", "linear_dim": 8, "linear_alpha": 4}"#).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!((full.algo, full.conv_dim, full.conv_alpha), (LycorisAlgo::Locon, 8, 4.0));
    for path in
        ["conv_in", "conv_out", "down_blocks.0.resnets.0.conv1", "up_blocks.1.upsamplers.0.conv", "time_embedding.linear_1", "mid_block.attentions.0.proj_in"]
    {
        assert_eq!(full.target_for(path).map(|t| t.algo), Some(LycorisAlgo::Locon), "{path}");
    }
    let (settings, _) = parse_lycoris_config(r#"{"algo": "locon", "linear_dim": 4, "linear_alpha": 0, "conv_dim": 2, "conv_alpha": 1}"#).unwrap();
    assert_eq!((settings.locon_rank_alpha(1), settings.locon_rank_alpha(3)), ((4, 4.0), (2, 1.0)));
    let (no_conv, _) =
        parse_lycoris_config(r#"{"algo": "locon", "apply_preset": {"target_module": ["ResnetBlock2D", "Downsample2D"], "enable_conv": false}}"#).unwrap();
    assert!(no_conv.target_for("down_blocks.0.resnets.0.conv1").is_none() && no_conv.target_for("down_blocks.0.downsamplers.0.conv").is_none());
    assert!(no_conv.target_for("down_blocks.0.resnets.0.time_emb_proj").is_some());
    let (named, _) = parse_lycoris_config(r#"{"algo": "locon", "apply_preset": {"target_module": ["Attention"], "target_name": ["conv_in"]}}"#).unwrap();
    assert!(named.target_for("conv_in").is_some() && named.target_for("conv_out").is_none());
    assert!(named.target_for("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k").is_some());
}

/// lora_type lycoris reads lycoris_config (relative to the config file) as
/// SimpleTuner does, LoKr with apply_preset; what Burnbooth cannot train
/// yet is refused by name.
#[test]
fn lycoris_config_is_read_for_lokr_and_unsupported_parts_are_named() {
    use trainer_core::config::lycoris::{parse_lycoris_config, LycorisAlgo};
    let files = BTreeMap::from([
        ("/p/config.env".to_string(), "MODEL_FAMILY=sd1x\nMODEL_TYPE=lora\nDATALOADER_CONFIG=d.json\nLORA_TYPE=lycoris\nLYCORIS_CONFIG=lycoris.json\n".to_string()),
        ("/p/d.json".to_string(), r#"[{"id": "a", "type": "local", "instance_data_dir": "x"}]"#.to_string()),
        (
            "/p/lycoris.json".to_string(),
            r#"{"algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 16,
                "apply_preset": {"target_module": ["Attention", "FeedForward"], "module_algo_map": {"Attention": {"factor": 16}, "FeedForward": {"factor": 8}}}}"#
                .to_string(),
        ),
    ]);
    let read = |path: &str| files.get(path).cloned().ok_or_else(|| trainer_core::Error::Io { path: path.into(), message: "missing".into() });
    let (training, _) = trainer_core::config::load("/p/config.env", None, &read, &no_env).unwrap();
    let lokr = training.lycoris.unwrap();
    assert_eq!((lokr.algo, lokr.linear_dim, lokr.linear_alpha, lokr.multiplier, lokr.full_matrix), (LycorisAlgo::Lokr, 10000, 1, 1, false));
    let factor_for = |path: &str| lokr.target_for(path).map(|t| (t.algo, t.factor));
    assert_eq!(factor_for("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"), Some((LycorisAlgo::Lokr, 16)));
    assert_eq!(factor_for("down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"), Some((LycorisAlgo::Lokr, 8)));
    assert_eq!(factor_for("down_blocks.0.attentions.0.proj_in"), None);

    let mut missing = files.clone();
    missing.remove("/p/lycoris.json");
    let read_missing = |path: &str| missing.get(path).cloned().ok_or_else(|| trainer_core::Error::Io { path: path.into(), message: "missing".into() });
    let message = error_text(trainer_core::config::load("/p/config.env", None, &read_missing, &no_env));
    assert!(message.contains("/p/lycoris.json") && message.contains("LYCORIS_CONFIG"), "{message}");

    let (_, warnings) = parse_lycoris_config(r#"{"algo": "lokr", "factor": 4}"#).unwrap();
    assert!(warnings.iter().any(|w| w.contains("no apply_preset") && w.contains("leaves the convolutions")), "{warnings:?}");
    for (config, problem) in [
        (r#"{"algo": "loha"}"#, "algo 'loha' is not supported yet"),
        (r#"{"algo": "lokr", "apply_preset": {"target_module": ["ResnetBlock2D"]}}"#, "LoKr on the convolutions of 'ResnetBlock2D' is not supported yet"),
        (r#"{"algo": "lokr", "apply_preset": {"target_module": ["UNetMidBlock2D"]}}"#, "'UNetMidBlock2D', which Burnbooth cannot adapt yet"),
        (r#"{"algo": "locon", "apply_preset": {"target_module": ["Attention"], "exclude_name": ["x"]}}"#, "'apply_preset.exclude_name' is not supported yet"),
        (r#"{"algo": "locon", "multiplier": 2}"#, "LoCon trains with multiplier 1 only"),
        (r#"{"algo": "locon", "conv_dim": -2}"#, "'conv_dim' must be at least 1"),
        (r#"{"algo": "lokr", "decompose_both": true}"#, "'decompose_both' is not supported yet"),
        (r#"{"algo": "lokr", "rank_dropout": 0.1}"#, "'rank_dropout' is not supported yet"),
        (r#"{"algo": "lokr", "factor": "big"}"#, "'factor' must be a number"),
        ("[1]", "must be a JSON object"),
    ] {
        let problems = parse_lycoris_config(config).unwrap_err().join("; ");
        assert!(problems.contains(problem), "{config} -> {problems}");
    }
    let both = TrainingConfig::parse(
        "MODEL_FAMILY=sd1x\nMODEL_TYPE=lora\nDATALOADER_CONFIG=d.json\nLORA_TYPE=lycoris\nTRAINER_EXTRA_ARGS=\"--use_dora\"\n",
        ConfigFormat::Env,
        "/x/c.env",
        &no_env,
    );
    assert!(error_text(both).contains("use_dora works with lora_type standard"));
}

/// user_prompt_library (relative to the config file) adds validation
/// prompts by shortname; a bad library is named with its problem, and
/// SimpleTuner's built-in library, which is not included, is said so.
#[test]
fn user_prompt_library_is_read_and_checked() {
    use trainer_core::config::parse_prompt_library;
    let files = BTreeMap::from([
        (
            "/p/config.env".to_string(),
            "MODEL_FAMILY=sd1x\nDATALOADER_CONFIG=d.json\nTRAINER_EXTRA_ARGS=\"--user_prompt_library=prompts.json --validation_prompt_library\"\n".to_string(),
        ),
        ("/p/d.json".to_string(), r#"[{"id": "a", "type": "local", "instance_data_dir": "x"}]"#.to_string()),
        ("/p/prompts.json".to_string(), r#"{"dog": "a photo of zwx dog", "beach": {"prompt": "zwx dog on a beach", "adapter_strength": 0.8}}"#.to_string()),
    ]);
    let read = |path: &str| files.get(path).cloned().ok_or_else(|| trainer_core::Error::Io { path: path.into(), message: "missing".into() });
    let (training, _) = trainer_core::config::load("/p/config.env", None, &read, &no_env).unwrap();
    assert_eq!(training.validation_prompts, [("beach".to_string(), "zwx dog on a beach".to_string()), ("dog".to_string(), "a photo of zwx dog".to_string())]);
    assert!(training.warnings.iter().any(|w| w.contains("built-in prompt library is not included")), "{:?}", training.warnings);
    for (library, problem) in
        [(r#"{"a b": "x"}"#, "shortname 'a b'"), (r#"{"a": 3}"#, "'a' must be a non-empty prompt"), (r#"{}"#, "empty"), (r#"["x"]"#, "must be a JSON object")]
    {
        let problems = parse_prompt_library(library).unwrap_err().join("; ");
        assert!(problems.contains(problem), "{library} -> {problems}");
    }
}
