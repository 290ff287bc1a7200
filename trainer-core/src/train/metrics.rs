//! Training metrics: one JSON line per step (`metrics.jsonl`) and a loss
//! plot (`loss.png`) next to the outputs.

use image::{Rgb, RgbImage};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepMetrics {
    pub step: u64,
    pub epoch: u64,
    pub loss: f32,
    pub lr: f64,
    pub grad_norm: f32,
    /// Seconds since the run (or the resumed run) started.
    pub time: f64,
    /// The validation loss on the held-out images after this step, when computed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f32>,
    /// Prodigy's step size d after this step (SimpleTuner logs it as `prodigy_d`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prodigy_d: Option<f64>,
}

/// Parses `metrics.jsonl`, keeping the lines up to `last_step` (a resumed
/// run rewrites what came after its checkpoint).
pub fn parse_jsonl(text: &str, last_step: u64) -> Vec<StepMetrics> {
    text.lines().filter_map(|line| serde_json::from_str::<StepMetrics>(line).ok()).filter(|m| m.step <= last_step).collect()
}

pub fn to_jsonl(metrics: &[StepMetrics]) -> String {
    metrics.iter().map(|m| serde_json::to_string(m).expect("metrics serialise") + "\n").collect()
}

/// Exponential moving average, the smoothed curve of the plot.
pub fn smoothed(values: &[f32], weight: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(values.len());
    let mut average: Option<f32> = None;
    for &v in values {
        let next = match average {
            Some(a) => a * weight + v * (1.0 - weight),
            None => v,
        };
        average = Some(next);
        out.push(next);
    }
    out
}

/// A loss-over-steps chart: raw losses in light blue, the smoothed curve
/// in dark blue, on a light grid. Log-free, scaled to the data's range.
pub fn loss_plot(metrics: &[StepMetrics], width: u32, height: u32) -> RgbImage {
    let mut image = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    let margin = 24i64;
    let (w, h) = (width as i64 - 2 * margin, height as i64 - 2 * margin);
    for i in 0..=4 {
        let y = margin + h * i / 4;
        line(&mut image, (margin, y), (margin + w, y), Rgb([230, 230, 235]));
    }
    line(&mut image, (margin, margin), (margin, margin + h), Rgb([120, 120, 130]));
    line(&mut image, (margin, margin + h), (margin + w, margin + h), Rgb([120, 120, 130]));
    let finite: Vec<&StepMetrics> = metrics.iter().filter(|m| m.loss.is_finite()).collect();
    if finite.len() < 2 {
        return image;
    }
    let losses: Vec<f32> = finite.iter().map(|m| m.loss).collect();
    // The validation loss shares the axis, so the two compare at a glance.
    let evals: Vec<(u64, f32)> = metrics.iter().filter_map(|m| m.eval_loss.filter(|l| l.is_finite()).map(|l| (m.step, l))).collect();
    let (lo, hi) = losses.iter().chain(evals.iter().map(|(_, l)| l)).fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let span = (hi - lo).max(1e-12);
    let (first, last) = (finite[0].step as f64, finite[finite.len() - 1].step as f64);
    let point = |step: u64, loss: f32| -> (i64, i64) {
        let x = margin + ((step as f64 - first) / (last - first).max(1.0) * w as f64).round() as i64;
        let y = margin + h - (((loss - lo) / span) as f64 * h as f64).round() as i64;
        (x, y)
    };
    for pair in finite.windows(2) {
        line(&mut image, point(pair[0].step, pair[0].loss), point(pair[1].step, pair[1].loss), Rgb([170, 200, 240]));
    }
    let smooth = smoothed(&losses, 0.9);
    for i in 1..finite.len() {
        let a = point(finite[i - 1].step, smooth[i - 1]);
        let b = point(finite[i].step, smooth[i]);
        line(&mut image, a, b, Rgb([30, 70, 160]));
        line(&mut image, (a.0, a.1 + 1), (b.0, b.1 + 1), Rgb([30, 70, 160]));
    }
    let orange = Rgb([220, 110, 20]);
    for pair in evals.windows(2) {
        line(&mut image, point(pair[0].0, pair[0].1), point(pair[1].0, pair[1].1), orange);
    }
    for &(step, loss) in &evals {
        let (x, y) = point(step, loss);
        for (dx, dy) in [(-2, 0), (2, 0), (0, -2), (0, 2)] {
            line(&mut image, (x, y), (x + dx, y + dy), orange);
        }
    }
    image
}

/// Bresenham's line, clipped to the image.
fn line(image: &mut RgbImage, (mut x0, mut y0): (i64, i64), (x1, y1): (i64, i64), color: Rgb<u8>) {
    let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
    let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
    let mut error = dx + dy;
    loop {
        if x0 >= 0 && y0 >= 0 && (x0 as u32) < image.width() && (y0 as u32) < image.height() {
            image.put_pixel(x0 as u32, y0 as u32, color);
        }
        if x0 == x1 && y0 == y1 {
            break;
        }
        let doubled = 2 * error;
        if doubled >= dy {
            error += dy;
            x0 += sx;
        }
        if doubled <= dx {
            error += dx;
            y0 += sy;
        }
    }
}

/// PNG bytes of an image.
pub fn png_bytes(image: &RgbImage) -> Vec<u8> {
    let mut bytes = Vec::new();
    image::codecs::png::PngEncoder::new(&mut bytes)
        .write_image(image.as_raw(), image.width(), image.height(), image::ExtendedColorType::Rgb8)
        .expect("encoding to memory cannot fail");
    bytes
}

use image::ImageEncoder as _;

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(step: u64, loss: f32, eval_loss: Option<f32>) -> StepMetrics {
        StepMetrics { step, epoch: 1, loss, lr: 1e-4, grad_norm: 1.0, time: step as f64, eval_loss, prodigy_d: None }
    }

    /// The validation loss is drawn in orange beside the training loss (blue),
    /// and its points round-trip through metrics.jsonl.
    #[test]
    fn the_plot_shows_the_validation_loss_beside_the_training_loss() {
        let orange = |image: &RgbImage| image.pixels().filter(|p| **p == Rgb([220, 110, 20])).count();
        let plain: Vec<StepMetrics> = (1..=10).map(|s| entry(s, 1.0 / s as f32, None)).collect();
        assert_eq!(orange(&loss_plot(&plain, 320, 200)), 0);
        let with_eval: Vec<StepMetrics> = (1..=10).map(|s| entry(s, 1.0 / s as f32, (s % 5 == 0).then_some(0.5))).collect();
        assert!(orange(&loss_plot(&with_eval, 320, 200)) > 10);
        let parsed = parse_jsonl(&to_jsonl(&with_eval), 10);
        assert_eq!(parsed.iter().filter_map(|m| m.eval_loss).count(), 2);
    }
}
