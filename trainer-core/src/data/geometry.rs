//! Target sizes, aspect buckets and crops, computed exactly as SimpleTuner
//! does (multiaspect/image.py and image_manipulation/training_sample.py), so
//! that a dataset buckets the same here as there.
//!
//! Python's `int()` truncates and its `round()` rounds half to even; both are
//! reproduced below with `f64` arithmetic, which is what Python uses too.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::rng::SeededRng;

/// Width and height in pixels.
pub type Size = [u32; 2];

/// How `resolution` is read. `pixel_area` is rewritten to `Area` when the
/// config is loaded (edge E becomes E*E/1e6 megapixels), as SimpleTuner does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResolutionType {
    /// `resolution` is the shorter edge in pixels.
    Pixel,
    /// `resolution` is an area in megapixels.
    Area,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CropStyle {
    Center,
    Corner,
    Random,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CropAspect {
    Square,
    Preserve,
    Random,
    Closest,
}

/// The sizing settings of one dataset, after config normalisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GeometrySettings {
    pub resolution: f64,
    pub resolution_type: ResolutionType,
    pub crop: bool,
    pub crop_style: CropStyle,
    pub crop_aspect: CropAspect,
    /// Candidate aspect ratios for `crop_aspect` random / closest.
    pub crop_aspect_buckets: Vec<f64>,
    pub maximum_image_size: Option<f64>,
    pub target_downsample_size: Option<f64>,
    pub minimum_image_size: Option<f64>,
    /// Sizes are multiples of this (64 for the SD families).
    pub alignment: u32,
    /// Decimal places of bucket keys.
    pub rounding: u32,
}

impl Default for GeometrySettings {
    fn default() -> Self {
        Self {
            resolution: 1.048576,
            resolution_type: ResolutionType::Area,
            crop: false,
            crop_style: CropStyle::Random,
            crop_aspect: CropAspect::Square,
            crop_aspect_buckets: Vec::new(),
            maximum_image_size: None,
            target_downsample_size: None,
            minimum_image_size: None,
            alignment: 64,
            rounding: 2,
        }
    }
}

/// Where one image ends up: the sizes SimpleTuner records in its bucket
/// metadata, plus the size we actually resize to before cropping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageGeometry {
    pub original_size: Size,
    pub target_size: Size,
    pub intermediary_size: Size,
    /// The size the image is resized to before the crop. Equal to
    /// `intermediary_size` except on the `target_downsample_size` path.
    pub resize_size: Size,
    /// Top-left corner of the crop in the resized image, as (top, left).
    pub crop_offset: [u32; 2],
    /// Rounded aspect ratio of the target size: the bucket key.
    pub aspect_bucket: f64,
}

/// Python's `round(x)`: half to even.
fn py_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// Python's `int(x)` on a float: truncation toward zero.
fn py_int(x: f64) -> i64 {
    x.trunc() as i64
}

/// Python's `round(x, digits)`: correctly rounded from the exact binary
/// value, which is what Rust's fixed-precision formatting also computes.
pub fn py_round_digits(x: f64, digits: u32) -> f64 {
    format!("{x:.prec$}", prec = digits as usize).parse().expect("formatted float parses")
}

/// Formats a bucket key as Python's `str(float)` would ("1.0", "1.29").
pub fn bucket_key(aspect: f64) -> String {
    let text = format!("{aspect}");
    if text.contains('.') || text.contains('e') {
        text
    } else {
        format!("{text}.0")
    }
}

/// Stateful sizing for one dataset: in area mode the first image of each
/// bucket fixes that bucket's target size (SimpleTuner's aspect_resolution_map),
/// so every image in a bucket gets the same size and they can be batched.
#[derive(Debug, Clone)]
pub struct Sizer {
    settings: GeometrySettings,
    /// Bucket key (aspect formatted as Python does) -> target size.
    resolution_map: BTreeMap<String, Size>,
}

impl Sizer {
    pub fn new(settings: GeometrySettings) -> Self {
        Self { settings, resolution_map: BTreeMap::new() }
    }

    pub fn settings(&self) -> &GeometrySettings {
        &self.settings
    }

    fn round_to_multiple(&self, value: f64) -> i64 {
        let a = self.settings.alignment as f64;
        (py_round(value / a) * a).max(a) as i64
    }

    fn aspect(&self, width: f64, height: f64) -> f64 {
        py_round_digits(width / height, self.settings.rounding)
    }

    /// `calculate_new_size_by_pixel_edge`: shorter edge = `resolution`.
    fn by_pixel_edge(&self, aspect: f64, resolution: i64, original: Size) -> (Size, Size) {
        let (w0, h0) = (original[0] as f64, original[1] as f64);
        let (wt, ht) = if w0 < h0 { (resolution, py_int(resolution as f64 / aspect)) } else { (py_int(resolution as f64 * aspect), resolution) };
        let (wa, ha) = (self.round_to_multiple(wt as f64), self.round_to_multiple(ht as f64));
        let r0 = w0 / h0;
        let (wi, hi) = if r0 >= 1.0 {
            let mut hi = ha.max(ht);
            let mut wi = py_int(hi as f64 * r0);
            if wi < wa {
                wi = wa;
                hi = py_int(wi as f64 / r0);
            }
            (wi, hi)
        } else {
            let mut wi = wa.max(wt);
            let mut hi = py_int(wi as f64 / r0);
            if hi < ha {
                hi = ha;
                wi = py_int(hi as f64 * r0);
            }
            (wi, hi)
        };
        ([wa as u32, ha as u32], [wi as u32, hi as u32])
    }

    /// `calculate_new_size_by_pixel_area`: about `megapixels` of area.
    fn by_pixel_area(&mut self, aspect: f64, megapixels: f64, original: Size, remember: bool) -> (Size, Size) {
        let (w0, h0) = (original[0] as f64, original[1] as f64);
        let edge = self.round_to_multiple(py_int((megapixels * 1e6).sqrt()) as f64);
        if aspect == 1.0 && original[0] == original[1] {
            let e = edge as u32;
            return ([e, e], [e, e]);
        }
        let r0 = w0 / h0;
        let mut wt = self.round_to_multiple(edge as f64 * aspect.sqrt());
        let mut ht = self.round_to_multiple(edge as f64 / aspect.sqrt());
        let (mut wi, mut hi) = if wt < ht { (wt, py_int(wt as f64 / r0)) } else { (py_int(ht as f64 * r0), ht) };
        let key = bucket_key(self.aspect(wt as f64, ht as f64));
        let stored = self.resolution_map.get(&key).copied();
        if let Some([w, h]) = stored {
            wt = w as i64;
            ht = h as i64;
        }
        if wt > wi || ht > hi {
            // Grow the intermediary, keeping the original aspect, until the
            // target fits inside it.
            if wt > wi {
                let dw = wt - wi;
                wi += dw;
                hi += py_int(dw as f64 / r0);
            }
            if ht > hi {
                let dh = ht - hi;
                hi += dh;
                wi += py_int(dh as f64 * r0);
            }
        } else if stored.is_none() && remember {
            self.resolution_map.insert(key, [wt as u32, ht as u32]);
        }
        ([wt as u32, ht as u32], [wi as u32, hi as u32])
    }

    fn by_resolution(&mut self, aspect: f64, resolution: f64, original: Size, remember: bool) -> (Size, Size) {
        match self.settings.resolution_type {
            ResolutionType::Pixel => self.by_pixel_edge(aspect, resolution as i64, original),
            ResolutionType::Area => self.by_pixel_area(aspect, resolution, original, remember),
        }
    }

    /// The square edge used for square crops and square buckets. In area
    /// mode SimpleTuner maps the common megapixel values to fixed edges.
    pub fn square_edge(&self) -> u32 {
        let s = &self.settings;
        match s.resolution_type {
            ResolutionType::Pixel => self.round_to_multiple(s.resolution.trunc()) as u32,
            ResolutionType::Area => self.round_to_multiple(self.target_area().sqrt()) as u32,
        }
    }

    /// Area mode's target area in pixels: SimpleTuner maps the common
    /// megapixel values to fixed square edges (0.5 MP -> 768 x 768).
    fn target_area(&self) -> f64 {
        const REMAP: [(f64, f64); 5] = [(0.25, 512.0), (0.5, 768.0), (1.0, 1024.0), (2.0, 1536.0), (4.0, 2048.0)];
        let resolution = self.settings.resolution;
        REMAP.iter().find(|(mp, _)| (resolution - mp).abs() < 0.05).map(|(_, edge)| edge * edge).unwrap_or(resolution * 1e6)
    }

    /// Does the original image meet `minimum_image_size`? (Evaluated on the
    /// original size, as SimpleTuner does.) Returns the reason when not.
    pub fn check_minimum_size(&self, original: Size) -> Result<(), String> {
        let s = &self.settings;
        let Some(minimum) = s.minimum_image_size else { return Ok(()) };
        let [w, h] = original;
        match s.resolution_type {
            ResolutionType::Pixel => {
                if (w as f64) < minimum || (h as f64) < minimum {
                    return Err(format!("too small: {w}x{h} has an edge under minimum_image_size {minimum} px"));
                }
            }
            ResolutionType::Area => {
                let minimum_pixels = minimum * 1e6;
                if s.crop && s.crop_aspect == CropAspect::Square {
                    let edge = minimum_pixels.sqrt().floor();
                    if (w as f64) < edge || (h as f64) < edge {
                        return Err(format!("too small: {w}x{h} has an edge under {edge} px (minimum_image_size {minimum} MP, square crop)"));
                    }
                }
                if (w as f64) * (h as f64) < minimum_pixels {
                    return Err(format!("too small: {w}x{h} is {:.3} MP, under minimum_image_size {minimum} MP", w as f64 * h as f64 / 1e6));
                }
            }
        }
        Ok(())
    }

    /// Computes where an image of `original` size goes. `rng` picks random
    /// crop offsets and random crop aspects; seed it per image so the result
    /// does not depend on the order images are planned in.
    pub fn geometry(&mut self, original: Size, rng: &mut SeededRng) -> ImageGeometry {
        let settings = self.settings.clone();
        let edge = self.square_edge();
        let mut aspect = self.aspect(original[0] as f64, original[1] as f64);
        let square_crop = settings.crop && settings.crop_aspect == CropAspect::Square;

        let (target, mut intermediary, bucket) = if square_crop {
            let (_, mut intermediary) = self.by_resolution(1.0, settings.resolution, original, false);
            if intermediary[0] < edge {
                intermediary = [edge, edge];
            }
            ([edge, edge], intermediary, 1.0)
        } else {
            if settings.crop && !settings.crop_aspect_buckets.is_empty() {
                match settings.crop_aspect {
                    CropAspect::Closest => aspect = closest(&settings.crop_aspect_buckets, aspect),
                    CropAspect::Random => {
                        let buckets = &settings.crop_aspect_buckets;
                        aspect = buckets[rng.below(buckets.len() as u64) as usize];
                    }
                    _ => {}
                }
            }
            let (mut target, mut intermediary) = self.by_resolution(aspect, settings.resolution, original, true);
            let bucket = self.aspect(target[0] as f64, target[1] as f64);
            if intermediary[0] < edge && bucket == 1.0 {
                intermediary = [edge, edge];
            }
            if bucket == 1.0 {
                target = [edge, edge];
            }
            (target, intermediary, bucket)
        };
        // The square crop of docs/reference.md §1.2: never distort; make sure the
        // intermediary covers the P x P target on both edges.
        if square_crop && (intermediary[0] < edge || intermediary[1] < edge) {
            intermediary = cover(original, [edge, edge]);
        }

        let mut resize_size = intermediary;
        if settings.crop && settings.maximum_image_size.is_some() {
            if let Some(downsample) = settings.target_downsample_size {
                resize_size = self.downsample_size(original, downsample, target).unwrap_or(intermediary);
            }
        }
        let crop_offset = crop_offset(settings.crop_style, resize_size, target, rng);
        ImageGeometry { original_size: original, target_size: target, intermediary_size: intermediary, resize_size, crop_offset, aspect_bucket: bucket }
    }

    /// The pre-crop resize of the `maximum_image_size` + `target_downsample_size`
    /// path, when it applies.
    fn downsample_size(&mut self, original: Size, downsample: f64, target: Size) -> Option<Size> {
        let settings = self.settings.clone();
        let edge = self.square_edge();
        let needed = match settings.resolution_type {
            // SimpleTuner: true unless the image is exactly P x P.
            ResolutionType::Pixel => original != [edge, edge],
            ResolutionType::Area => {
                let area = original[0] as f64 * original[1] as f64;
                area != self.target_area() || original[0] < target[0] || original[1] < target[1]
            }
        };
        if !needed {
            return None;
        }
        let aspect = self.aspect(original[0] as f64, original[1] as f64);
        let (_, size) = self.by_resolution(aspect, downsample, original, false);
        // Scale up proportionally when an edge ended below the target.
        Some(if size[0] < target[0] {
            let scale = target[0] as f64 / size[0] as f64;
            [target[0], py_int(size[1] as f64 * scale) as u32]
        } else if size[1] < target[1] {
            let scale = target[1] as f64 / size[1] as f64;
            [py_int(size[0] as f64 * scale) as u32, target[1]]
        } else {
            size
        })
    }
}

/// The smallest size with the original's aspect that covers `target`.
fn cover(original: Size, target: Size) -> Size {
    let scale = (target[0] as f64 / original[0] as f64).max(target[1] as f64 / original[1] as f64);
    [((original[0] as f64 * scale).round() as u32).max(target[0]), ((original[1] as f64 * scale).round() as u32).max(target[1])]
}

fn closest(buckets: &[f64], aspect: f64) -> f64 {
    let mut best = buckets[0];
    for &b in buckets {
        if (b - aspect).abs() < (best - aspect).abs() {
            best = b;
        }
    }
    best
}

/// Crop offset (top, left) of `target` inside an image of size `resized`.
pub fn crop_offset(style: CropStyle, resized: Size, target: Size, rng: &mut SeededRng) -> [u32; 2] {
    let spare_w = resized[0].saturating_sub(target[0]);
    let spare_h = resized[1].saturating_sub(target[1]);
    match style {
        CropStyle::Corner => [0, 0],
        CropStyle::Center => [spare_h / 2, spare_w / 2],
        CropStyle::Random => {
            let left = rng.range_inclusive(0, spare_w);
            let top = rng.range_inclusive(0, spare_h);
            [top, left]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_rounding_rules() {
        assert_eq!(py_round(2.5), 2.0);
        assert_eq!(py_round(3.5), 4.0);
        assert_eq!(py_round_digits(1.285, 2), 1.28); // 1.285 is below the tie in binary
        assert_eq!(py_round_digits(4000.0 / 3000.0, 2), 1.33);
        assert_eq!(bucket_key(1.0), "1.0");
        assert_eq!(bucket_key(1.29), "1.29");
    }
}
