//! The image pipeline on real encoded files: header probing, orientation,
//! skipped files with reasons, captions, transparency, resize and crop.

mod common;

use std::collections::BTreeMap;

use common::*;
use image::ImageFormat;
use trainer_core::data::geometry::{CropStyle, GeometrySettings, ResolutionType, Sizer};
use trainer_core::data::preprocess::{decode_oriented, prepare, resize_lanczos};
use trainer_core::data::probe::{probe, DEFAULT_MAX_IMAGE_PIXELS};
use trainer_core::data::source::SliceAccess;
use trainer_core::rng::SeededRng;

fn probe_size(bytes: &[u8]) -> [u32; 2] {
    probe(&mut SliceAccess(bytes), DEFAULT_MAX_IMAGE_PIXELS).unwrap().unwrap().oriented_size()
}

#[test]
fn headers_give_sizes_for_every_format() {
    for format in [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::WebP, ImageFormat::Bmp] {
        let bytes = encoded_image(123, 77, format);
        assert_eq!(probe_size(&bytes), [123, 77], "{format:?}");
    }
}

#[test]
fn exif_orientation_swaps_size_in_header_and_pixels() {
    let rotated = with_exif_orientation(&jpeg(120, 80), 6);
    assert_eq!(probe_size(&rotated), [80, 120]);
    let image = decode_oriented(&rotated, DEFAULT_MAX_IMAGE_PIXELS).unwrap();
    assert_eq!(image.dimensions(), (80, 120));
    // Orientation 6 means "rotate 90 degrees clockwise to display": the
    // stored top-left pixel ends up top-right.
    let stored = decode_oriented(&jpeg(120, 80), DEFAULT_MAX_IMAGE_PIXELS).unwrap();
    let corner = stored.get_pixel(0, 0);
    let moved = image.get_pixel(79, 0);
    for c in 0..3 {
        assert!((corner[c] as i32 - moved[c] as i32).abs() <= 12, "{corner:?} vs {moved:?}");
    }
}

#[test]
fn bad_files_are_skipped_with_reasons_and_good_ones_kept() {
    let good = jpeg(640, 480);
    let truncated_jpeg = good[..good.len() / 2].to_vec();
    let good_png = png(300, 300);
    let truncated_png = good_png[..good_png.len() - 30].to_vec();
    let source = source_with(&[
        ("good.jpg", good),
        ("nested/deeper/good.png", good_png),
        ("empty.jpg", vec![]),
        ("cut.jpg", truncated_jpeg),
        ("cut.png", truncated_png),
        ("text.jpg", b"this is not an image".to_vec()),
        ("notes.md", b"# notes".to_vec()),
        ("caption.txt", b"ignored".to_vec()),
    ]);
    let training = training("MODEL_FAMILY=sd1x\nDATALOADER_CONFIG=d.json\nTRAIN_BATCH_SIZE=1\nMAX_NUM_STEPS=10");
    let config = dataloader(r#"[{"id": "d", "type": "local", "instance_data_dir": "x", "resolution": 256}]"#, &training).unwrap();
    let plan = plan_memory(&training, &config, BTreeMap::from([("d".to_string(), source.clone())])).unwrap();
    let dataset = &plan.datasets[0];
    let used: Vec<&str> = dataset.images.iter().map(|i| i.path.as_str()).collect();
    assert_eq!(used, ["good.jpg", "nested/deeper/good.png"]);
    let reason = |path: &str| dataset.skipped.iter().find(|s| s.path == path).map(|s| s.reason.clone()).unwrap_or_default();
    assert!(reason("empty.jpg").contains("0 bytes"));
    assert!(reason("cut.jpg").contains("truncated"), "{}", reason("cut.jpg"));
    assert!(reason("cut.png").contains("truncated"), "{}", reason("cut.png"));
    assert!(reason("text.jpg").contains("not an image"));
    assert!(reason("notes.md").contains("not an image file"));
    assert_eq!(dataset.skipped.len(), 5, "caption .txt files are not reported: {:?}", dataset.skipped);
    assert_eq!(dataset.images_found, 6);
    // Nothing was written into the source.
    assert_eq!(source.files.len(), 8);
}

#[test]
fn a_dataset_without_usable_images_names_its_folder() {
    let training = training("MODEL_FAMILY=sd1x\nDATALOADER_CONFIG=d.json\nMAX_NUM_STEPS=10");
    let config = dataloader(r#"[{"id": "d", "type": "local", "instance_data_dir": "x"}]"#, &training).unwrap();
    let source = source_with(&[("a.jpg", vec![])]);
    let text = error_text(plan_memory(&training, &config, BTreeMap::from([("d".to_string(), source)])));
    assert!(text.contains("dataset 'd'") && text.contains("no usable image") && text.contains("a.jpg"), "{text}");
}

#[test]
fn bucket_that_cannot_fill_a_batch_says_how_to_fix_it() {
    let training = training("MODEL_FAMILY=sd1x\nDATALOADER_CONFIG=d.json\nTRAIN_BATCH_SIZE=4\nMAX_NUM_STEPS=10");
    let config = dataloader(r#"[{"id": "d", "type": "local", "instance_data_dir": "x", "resolution": 512}]"#, &training).unwrap();
    let source = source_with(&[("a.jpg", jpeg(512, 512)), ("b.jpg", jpeg(600, 600))]);
    let text = error_text(plan_memory(&training, &config, BTreeMap::from([("d".to_string(), source.clone())])));
    assert!(text.contains("dataset 'd'") && text.contains("bucket 1.0") && text.contains("repeats to at least 1") && text.contains("add 2 more"), "{text}");

    let allowed = training.clone();
    let mut allowed = allowed;
    allowed.allow_dataset_oversubscription = true;
    let plan = plan_memory(&allowed, &config, BTreeMap::from([("d".to_string(), source)])).unwrap();
    assert!(plan.datasets[0].notes.iter().any(|n| n.contains("allow_dataset_oversubscription")));
}

#[test]
fn captions_follow_each_strategy() {
    let training = training("MODEL_FAMILY=sd1x\nDATALOADER_CONFIG=d.json\nTRAIN_BATCH_SIZE=1\nMAX_NUM_STEPS=10");
    let files = [
        ("a_photo_of_sks_dog.jpg", jpeg(64, 64)),
        ("a_photo_of_sks_dog.txt", b"first caption\r\n\r\n  second caption  \r\n".to_vec()),
        ("no_caption_file.jpg", jpeg(64, 64)),
    ];
    let source = source_with(&files);
    let plan_for = |entry: &str| {
        let config = dataloader(&format!(r#"[{{"id": "d", "type": "local", "instance_data_dir": "x", "resolution": 64{entry}}}]"#), &training).unwrap();
        plan_memory(&training, &config, BTreeMap::from([("d".to_string(), source.clone())])).unwrap().datasets.remove(0)
    };
    let by_filename = plan_for(r#", "caption_strategy": "filename""#);
    assert_eq!(by_filename.images[0].caption, "a photo of sks dog");

    let textfile = plan_for(r#", "caption_strategy": "textfile""#);
    assert_eq!(textfile.images.len(), 1);
    assert_eq!(textfile.images[0].caption_variants, ["first caption", "second caption"]);
    assert!(textfile.skipped[0].reason.contains("no_caption_file.txt"), "{:?}", textfile.skipped);

    let single = plan_for(r#", "caption_strategy": "textfile", "disable_multiline_split": true"#);
    assert_eq!(single.images[0].caption, "first caption\r\n\r\n  second caption");

    let prepended = plan_for(r#", "caption_strategy": "filename", "prepend_instance_prompt": true, "instance_prompt": "zwx""#);
    assert_eq!(prepended.images[0].caption, "zwx a photo of sks dog");

    let only = plan_for(r#", "caption_strategy": "textfile", "only_instance_prompt": true, "instance_prompt": ["zwx", "zwx toy"]"#);
    assert_eq!(only.images.len(), 2, "only_instance_prompt needs no caption files");
    assert_eq!(only.images[0].caption_variants, ["zwx", "zwx toy"]);
}

/// caption_shuffle: every line of a caption file gets its shuffled-tag
/// variants (the kept tags first), the instance prompt goes in front
/// afterwards, the plan shows examples, and bad settings are named.
#[test]
fn caption_shuffle_adds_variants_that_keep_the_leading_tags_and_the_plan_shows_them() {
    let training = training("MODEL_FAMILY=sd1x\nDATALOADER_CONFIG=d.json\nTRAIN_BATCH_SIZE=1\nMAX_NUM_STEPS=10\nTRAINING_SEED=3");
    let files = [("dog.jpg", jpeg(64, 64)), ("dog.txt", b"sks dog, red collar, on grass, sunny\nsks dog, sitting\n".to_vec())];
    let source = source_with(&files);
    let entry = r#"[{"id": "d", "type": "local", "instance_data_dir": "x", "resolution": 64, "caption_strategy": "textfile",
        "prepend_instance_prompt": true, "instance_prompt": "photo:",
        "caption_shuffle": {"enable": true, "count": 3, "position_start": 1}}]"#;
    let config = dataloader(entry, &training).unwrap();
    let shuffle = config.datasets[0].caption_shuffle.unwrap();
    assert_eq!((shuffle.seed, shuffle.count, shuffle.position_start, shuffle.include_original), (3, 3, 1, true), "the training seed by default");
    let plan = plan_memory(&training, &config, BTreeMap::from([("d".to_string(), source)])).unwrap();
    let variants = plan.datasets[0].images[0].captions();
    assert_eq!(variants[0], "photo: sks dog, red collar, on grass, sunny");
    let first_line: Vec<&String> = variants.iter().filter(|v| v.contains("collar")).collect();
    assert!(first_line.len() >= 3, "the first line and its shuffles: {variants:?}");
    for variant in &first_line {
        assert!(variant.starts_with("photo: sks dog, "), "{variant}");
    }
    // "sks dog, sitting" keeps "sks dog" and has one tag left: nothing to shuffle.
    assert_eq!(variants.iter().filter(|v| v.contains("sitting")).collect::<Vec<_>>(), ["photo: sks dog, sitting"]);
    let described = trainer_core::plan::describe(&plan);
    assert!(
        described
            .contains("caption_shuffle: 3 shuffled order(s) of each caption's tags (split on comma, the first 1 kept in place, the caption as written too)"),
        "{described}"
    );

    for (setting, problem) in [
        (r#"{"enable": true, "split_on": "semicolon"}"#, r#"'caption_shuffle.split_on' must be "comma", "space" or "period""#),
        (r#"{"enable": true, "count": 0}"#, "'caption_shuffle.count' must be a whole number of at least 1"),
        (r#"{"enable": "yes"}"#, "'caption_shuffle.enable' must be true or false"),
        (r#"true"#, "'caption_shuffle' must be an object"),
    ] {
        let json = format!(r#"[{{"id": "d", "type": "local", "instance_data_dir": "x", "caption_shuffle": {setting}}}]"#);
        let message = error_text(dataloader(&json, &training));
        assert!(message.contains(problem), "{setting} -> {message}");
    }
    let off = dataloader(r#"[{"id": "d", "type": "local", "instance_data_dir": "x", "caption_shuffle": {"enable": false, "count": 5}}]"#, &training).unwrap();
    assert!(off.datasets[0].caption_shuffle.is_none());
}

#[test]
fn transparency_is_composited_on_white() {
    let image = decode_oriented(&transparent_png(8, 8), DEFAULT_MAX_IMAGE_PIXELS).unwrap();
    assert!(image.pixels().all(|p| p.0 == [255, 255, 255]));
}

#[test]
fn prepare_resizes_with_lanczos_and_crops_where_planned() {
    // A 400x300 image with a black square at the centre of its left half.
    let mut original = image::RgbImage::from_pixel(400, 300, image::Rgb([200, 200, 200]));
    for y in 140..160 {
        for x in 90..110 {
            original.put_pixel(x, y, image::Rgb([0, 0, 0]));
        }
    }
    let mut bytes = std::io::Cursor::new(Vec::new());
    original.write_to(&mut bytes, ImageFormat::Png).unwrap();
    let bytes = bytes.into_inner();

    let settings =
        GeometrySettings { resolution: 150.0, resolution_type: ResolutionType::Pixel, crop: true, crop_style: CropStyle::Center, ..Default::default() };
    let mut sizer = Sizer::new(settings);
    let geometry = sizer.geometry([400, 300], &mut SeededRng::new(0));
    assert_eq!(geometry.target_size, [128, 128]);
    let mut resizer = fast_image_resize::Resizer::new();
    let out = prepare(&bytes, &geometry, &mut resizer).unwrap();
    assert_eq!(out.dimensions(), (128, 128));
    // The crop equals the resized image's window at the recorded offset.
    let resized = resize_lanczos(&original, geometry.resize_size, &mut resizer);
    let [top, left] = geometry.crop_offset;
    for (x, y, pixel) in out.enumerate_pixels() {
        assert_eq!(pixel, resized.get_pixel(x + left, y + top));
    }
    // Lanczos keeps a dark square dark and the flat background exactly flat.
    let scale = geometry.resize_size[0] as f64 / 400.0;
    let cx = (100.0 * scale) as u32 - left;
    let cy = (150.0 * scale) as u32 - top;
    assert!(out.get_pixel(cx, cy)[0] < 40, "{:?}", out.get_pixel(cx, cy));
    assert_eq!(out.get_pixel(127, 5).0, [200, 200, 200]);
}

#[test]
fn grayscale_and_cmyk_free_jpegs_decode_to_rgb() {
    let gray = image::GrayImage::from_fn(40, 30, |x, _| image::Luma([(x * 6) as u8]));
    let mut bytes = std::io::Cursor::new(Vec::new());
    gray.write_to(&mut bytes, ImageFormat::Jpeg).unwrap();
    let rgb = decode_oriented(&bytes.into_inner(), DEFAULT_MAX_IMAGE_PIXELS).unwrap();
    assert_eq!(rgb.dimensions(), (40, 30));
    let p = rgb.get_pixel(20, 10);
    assert!(p[0] == p[1] && p[1] == p[2] && (p[0] as i32 - 120).abs() < 10, "{p:?}");
}
