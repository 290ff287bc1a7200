//! Every case of SimpleTuner's own sizing code (fixtures/simpletuner-sizes.json,
//! produced by running SimpleTuner's functions) must come out identical here.

use serde_json::Value;
use trainer_core::data::geometry::{CropAspect, CropStyle, GeometrySettings, ResolutionType, Sizer};
use trainer_core::rng::SeededRng;

fn vectors() -> Value {
    serde_json::from_str(include_str!("fixtures/simpletuner-sizes.json")).unwrap()
}

/// Reads a case name such as "pixel_area 1024 crop=true square" into settings.
fn settings_from_name(name: &str) -> GeometrySettings {
    let mut s = GeometrySettings::default();
    let words: Vec<&str> = name.split([' ', ',']).filter(|w| !w.is_empty()).collect();
    let value: f64 = words[1].parse().unwrap();
    (s.resolution_type, s.resolution) = match words[0] {
        "pixel_area" => (ResolutionType::Area, value * value / 1e6),
        "area" => (ResolutionType::Area, value),
        "pixel" => (ResolutionType::Pixel, value),
        other => panic!("unknown resolution type {other}"),
    };
    s.crop = name.contains("crop=true");
    if name.contains("preserve") {
        s.crop_aspect = CropAspect::Preserve;
    }
    if name.contains("center") {
        s.crop_style = CropStyle::Center;
    }
    if name.contains("maximum_image_size=1536") {
        s.maximum_image_size = Some(1536.0 * 1536.0 / 1e6);
        s.target_downsample_size = Some(1280.0 * 1280.0 / 1e6);
    }
    s
}

fn size(v: &Value) -> [u32; 2] {
    [v[0].as_u64().unwrap() as u32, v[1].as_u64().unwrap() as u32]
}

fn original(name: &str) -> [u32; 2] {
    let (w, h) = name.split_once('x').unwrap();
    [w.parse().unwrap(), h.parse().unwrap()]
}

#[test]
fn metadata_only_vectors_match_simpletuner() {
    let vectors = vectors();
    let mut checked = 0;
    let mut failures = Vec::new();
    for (config, cases) in vectors["metadata_only"].as_object().unwrap() {
        for (image, expected) in cases.as_object().unwrap() {
            // Each vector was computed with an empty aspect_resolution_map.
            let mut sizer = Sizer::new(settings_from_name(config));
            let got = sizer.geometry(original(image), &mut SeededRng::new(0));
            let want = (size(&expected["target"]), size(&expected["intermediary"]), expected["aspect"].as_f64().unwrap());
            if (got.target_size, got.intermediary_size, got.aspect_bucket) != want {
                failures.push(format!(
                    "{config} {image}: got target {:?} intermediary {:?} aspect {}, want {:?}",
                    got.target_size, got.intermediary_size, got.aspect_bucket, want
                ));
            }
            checked += 1;
        }
    }
    assert!(checked >= 100, "only {checked} vectors found");
    assert!(failures.is_empty(), "{} of {checked} vectors differ:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn with_pixels_vectors_match_simpletuner() {
    let vectors = vectors();
    let mut failures = Vec::new();
    let mut checked = 0;
    for (config, cases) in vectors["with_pixels"].as_object().unwrap() {
        let random = config.contains("random");
        for (image, expected) in cases.as_object().unwrap() {
            let mut sizer = Sizer::new(settings_from_name(config));
            let got = sizer.geometry(original(image), &mut SeededRng::new(3));
            let target = size(&expected["target"]);
            assert_eq!(size(&expected["final"]), target);
            if got.target_size != target || got.intermediary_size != size(&expected["intermediary"]) {
                failures.push(format!("{config} {image}: sizes {:?} {:?}", got.target_size, got.intermediary_size));
            }
            if random {
                // SimpleTuner's random crop is unseeded: check the offset lies
                // inside the possible range instead.
                let [top, left] = got.crop_offset;
                assert!(left + target[0] <= got.resize_size[0] && top + target[1] <= got.resize_size[1]);
            } else if got.crop_offset != size(&expected["crop"]) {
                failures.push(format!("{config} {image}: crop {:?} (resized to {:?}), want {}", got.crop_offset, got.resize_size, expected["crop"]));
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 18);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn area_buckets_share_one_size_per_bucket() {
    // Two images whose own sizes differ slightly but land in one bucket must
    // get the same target size (the first image fixes it), or they could not
    // be batched together.
    let s = GeometrySettings { resolution: 0.5, ..Default::default() };
    let mut sizer = Sizer::new(s);
    let mut rng = SeededRng::new(0);
    let a = sizer.geometry([3000, 2000], &mut rng);
    let b = sizer.geometry([1490, 1000], &mut rng);
    assert_eq!(a.aspect_bucket, b.aspect_bucket);
    assert_eq!(a.target_size, b.target_size);
}
