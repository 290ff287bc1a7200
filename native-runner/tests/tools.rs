//! `native-runner find-token` and `make-reg` on the tiny fixture model.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn model() -> String {
    repo().join("trainer-core/tests/fixtures/models/sd1/diffusers").display().to_string()
}

fn runner(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_native-runner")).args(args).current_dir(dir).output().unwrap()
}

fn ok(output: Output) -> (String, String) {
    let (stdout, stderr) = (String::from_utf8(output.stdout).unwrap(), String::from_utf8(output.stderr).unwrap());
    assert!(output.status.success(), "failed:\n{stderr}");
    (stdout, stderr)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("burnbooth-tools-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap()
}

#[test]
fn find_token_ranks_single_tokens_by_prior_deterministically() {
    let dir = scratch("find");
    let model = model();
    let args = ["find-token", "--model", &model, "--count", "12", "--max-chars", "4", "--json"];
    let (first, _) = ok(runner(&args, &dir));
    let (second, _) = ok(runner(&args, &dir));
    assert_eq!(first, second, "the ranking must be deterministic");
    let found = json(&first);
    let found = found.as_array().unwrap();
    assert_eq!(found.len(), 12);
    let mut last_prior = f64::MIN;
    for candidate in found {
        let text = candidate["text"].as_str().unwrap();
        assert!((3..=4).contains(&text.len()) && text.chars().all(|c| c.is_ascii_lowercase()), "{text}");
        assert!(candidate["warning"].is_null(), "warning-free candidates come first: {candidate}");
        let prior = candidate["prior"].as_f64().unwrap();
        assert!(prior >= last_prior, "sorted by prior");
        last_prior = prior;
        // The candidate really is one token: checking it gives the same single id.
        let (checked, _) = ok(runner(&["find-token", "--model", &model, "--check", text, "--json"], &dir));
        let checked = json(&checked);
        assert_eq!(checked[0]["ids"], candidate["ids"]);
        assert_eq!(checked[0]["ids"].as_array().unwrap().len(), 1, "{text} is one token");
        assert!((checked[0]["prior"].as_f64().unwrap() - prior).abs() < 1e-9, "the same prior when checked alone");
    }
    // A longer search scores more words; its best prior can only be lower or equal.
    let (wider, _) = ok(runner(&["find-token", "--model", &model, "--count", "1", "--max-chars", "5", "--json"], &dir));
    assert!(json(&wider)[0]["prior"].as_f64().unwrap() <= found[0]["prior"].as_f64().unwrap());
}

#[test]
fn find_token_check_explains_known_words_and_multi_token_names() {
    let dir = scratch("check");
    let model = model();
    let (out, _) =
        ok(runner(&["find-token", "--model", &model, "--check", "sks", "--check", "tom cruise", "--check", "zwxrobot", "--class", "man", "--json"], &dir));
    let reports = json(&out);
    assert!(reports[0]["warning"].as_str().unwrap().contains("rifle"), "{}", reports[0]);
    assert_eq!(reports[1]["pieces"], serde_json::json!(["tom", "cruise"]));
    assert!(reports[1]["warning"].as_str().unwrap().starts_with("2 tokens"));
    assert!(reports[2]["ids"].as_array().unwrap().len() > 1, "zwxrobot is several tokens: {}", reports[2]);
    for report in reports.as_array().unwrap() {
        let prior = report["prior"].as_f64().unwrap();
        assert!(prior.is_finite() && prior > 0.0, "{report}");
    }
    // The table form names the measure.
    let (table, _) = ok(runner(&["find-token", "--model", &model, "--check", "sks"], &dir));
    assert!(table.contains("prior") && table.contains("sks") && table.contains("rifle"), "{table}");
}

#[test]
fn make_reg_makes_valid_images_resumes_and_writes_an_entry_plan_accepts() {
    let dir = scratch("reg");
    let model = model();
    let args = [
        "make-reg",
        "--model",
        &model,
        "--prompt",
        "a picture of a toy",
        "--count",
        "3",
        "--out",
        "classes",
        "--steps",
        "2",
        "--resolution",
        "64",
        "--device",
        "cpu",
        "--seed",
        "5",
    ];
    let (entry_text, stderr) = ok(runner(&args, &dir));
    assert!(stderr.contains("3 image(s) generated, 0 already there"), "{stderr}");
    let mut first = Vec::new();
    for i in 0..3 {
        let path = dir.join(format!("classes/reg-{i:05}.png"));
        let image = image::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!((image.width(), image.height()), (64, 64));
        first.push(std::fs::read(&path).unwrap());
    }
    assert_ne!(first[0], first[1], "each image has its own seed");
    // Remove one and run again: only that one is made, identical to before.
    std::fs::remove_file(dir.join("classes/reg-00001.png")).unwrap();
    let (_, stderr) = ok(runner(&args, &dir));
    assert!(stderr.contains("1 image(s) generated, 2 already there"), "{stderr}");
    assert_eq!(std::fs::read(dir.join("classes/reg-00001.png")).unwrap(), first[1], "resuming regenerates the same image");

    // The printed entry (also saved beside the images) goes into a dataloader config that plan accepts.
    let saved = json(&std::fs::read_to_string(dir.join("classes-dataloader-entry.json")).unwrap());
    let entry = saved[0].clone();
    assert!(entry_text.contains("\"is_regularisation_data\": true"));
    assert_eq!(entry["instance_data_dir"], "classes");
    let subject = repo().join("examples/dreambooth/subject");
    let dataloader = serde_json::json!([
        {"id": "subject", "type": "local", "instance_data_dir": subject, "caption_strategy": "instanceprompt",
         "instance_prompt": "zwxrobot", "resolution": 64, "resolution_type": "pixel_area", "minimum_image_size": 64,
         "cache_dir_vae": "cache/vae/subject"},
        entry,
        {"id": "text", "type": "local", "dataset_type": "text_embeds", "default": true, "cache_dir": "cache/text"}
    ]);
    std::fs::write(dir.join("dataloader.json"), serde_json::to_string_pretty(&dataloader).unwrap()).unwrap();
    std::fs::write(
        dir.join("config.env"),
        "MODEL_FAMILY=sd1x\nMODEL_TYPE=lora\nMAX_NUM_STEPS=10\nDATALOADER_CONFIG=dataloader.json\nREGULARISATION_MODE=prior_preservation\n",
    )
    .unwrap();
    let (plan, _) = ok(runner(&["plan", "--config", "config.env"], &dir));
    assert!(plan.contains("Dataset 'regularisation-data'  [regularisation]\n  folder: classes\n  images: 3 found, 3 used, 0 skipped"), "{plan}");
}
