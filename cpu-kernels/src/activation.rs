//! GELU (the erf form, PyTorch's default) and SiLU with their gradients,
//! element by element over f32 slices, vectorised like the attention's
//! exponentials (see the crate docs). burn's CPU backend calls libm's
//! scalar `erff`/`expf` for each element and builds SiLU from a sigmoid, a
//! product and their backward passes: 7 % of the mid-size UNet's step in
//! libm alone (DEVELOPERS.md, "Speed on the CPU backend").

use crate::attention::{exp, Simd};

/// Elements per parallel work item: large enough that scheduling is noise.
const CHUNK: usize = 1 << 16;

/// erf(x) within 1.5e-7 absolute (Abramowitz & Stegun 7.1.26): for x ≥ 0,
/// 1 − t(a₁ + t(a₂ + t(a₃ + t(a₄ + t a₅)))) e^(−x²) with t = 1/(1 + p x),
/// odd in x.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let value = 1.0 - poly * exp(-a * a);
    value.copysign(x)
}

/// x Φ(x) = x (1 + erf(x / √2)) / 2.
#[inline(always)]
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// d/dx x Φ(x) = Φ(x) + x φ(x), φ the standard normal density.
#[inline(always)]
fn gelu_slope(x: f32) -> f32 {
    const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;
    0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2)) + x * FRAC_1_SQRT_2PI * exp(-0.5 * x * x)
}

/// 1 / (1 + e⁻ˣ).
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

#[inline(always)]
fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

/// d/dx x σ(x) = σ(x) (1 + x (1 − σ(x))).
#[inline(always)]
fn silu_slope(x: f32) -> f32 {
    let s = sigmoid(x);
    s * (1.0 + x * (1.0 - s))
}

/// Which activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Gelu,
    Silu,
}

/// `out[i] = f(x[i])`.
#[inline(always)]
fn apply(activation: Activation, x: &[f32], out: &mut [f32]) {
    match activation {
        Activation::Gelu => out.iter_mut().zip(x).for_each(|(out, &x)| *out = gelu(x)),
        Activation::Silu => out.iter_mut().zip(x).for_each(|(out, &x)| *out = silu(x)),
    }
}

/// `out[i] = grad[i] f'(x[i])`.
#[inline(always)]
fn apply_backward(activation: Activation, x: &[f32], grad: &[f32], out: &mut [f32]) {
    let triples = out.iter_mut().zip(x).zip(grad);
    match activation {
        Activation::Gelu => triples.for_each(|((out, &x), &grad)| *out = grad * gelu_slope(x)),
        Activation::Silu => triples.for_each(|((out, &x), &grad)| *out = grad * silu_slope(x)),
    }
}

/// [`apply`], or [`apply_backward`] when `grad` is given: the body that
/// each `target_feature` function below compiles for its instructions.
#[inline(always)]
fn apply_either(activation: Activation, x: &[f32], grad: Option<&[f32]>, out: &mut [f32]) {
    match grad {
        Some(grad) => apply_backward(activation, x, grad, out),
        None => apply(activation, x, out),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn apply_avx512(activation: Activation, x: &[f32], grad: Option<&[f32]>, out: &mut [f32]) {
    apply_either(activation, x, grad, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn apply_avx2(activation: Activation, x: &[f32], grad: Option<&[f32]>, out: &mut [f32]) {
    apply_either(activation, x, grad, out)
}

/// One chunk, with the widest instructions the CPU has.
fn chunk(simd: Simd, activation: Activation, x: &[f32], grad: Option<&[f32]>, out: &mut [f32]) {
    match simd {
        // SAFETY: Simd::detect() found the instructions these are compiled for.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => unsafe { apply_avx512(activation, x, grad, out) },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { apply_avx2(activation, x, grad, out) },
        Simd::Baseline => apply_either(activation, x, grad, out),
    }
}

/// `out = f(x)`, or `grad ∘ f'(x)` when `grad` is given (the backward), in
/// chunks on all cores.
pub fn activation(activation: Activation, x: &[f32], grad: Option<&[f32]>, out: &mut [f32]) {
    assert_eq!(x.len(), out.len(), "activation output of the wrong length");
    if let Some(grad) = grad {
        assert_eq!(grad.len(), x.len(), "activation gradient of the wrong length");
    }
    let simd = Simd::detect();
    let items: Vec<_> = out.chunks_mut(CHUNK).enumerate().collect();
    let work = |(index, out): (usize, &mut [f32])| {
        let range = index * CHUNK..index * CHUNK + out.len();
        chunk(simd, activation, &x[range.clone()], grad.map(|grad| &grad[range]), out);
    };
    crate::matrix::for_each(items, |_, item| work(item));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn erf_f64(x: f64) -> f64 {
        // erf by its Maclaurin series (|x| ≤ 3) or 1 − erfc's continued
        // fraction beyond: the reference, in f64.
        if x.abs() <= 3.0 {
            let (mut term, mut sum, mut n) = (x, x, 0.0);
            while term.abs() > 1e-17 {
                n += 1.0;
                term *= -x * x / n;
                sum += term / (2.0 * n + 1.0);
            }
            2.0 / std::f64::consts::PI.sqrt() * sum
        } else {
            let a = x.abs();
            let mut fraction = 0.0;
            for k in (1..60).rev() {
                fraction = k as f64 / 2.0 / (a + fraction);
            }
            let erfc = (-a * a).exp() / std::f64::consts::PI.sqrt() / (a + fraction);
            (1.0 - erfc).copysign(x)
        }
    }

    /// Every SIMD level against the definitions in f64 over [-12, 12]:
    /// values within 1e-6 relative (absolute where |f| < 1), gradients
    /// likewise. (erf's approximation is within 1.5e-7; f32 rounding and
    /// 1 + erf's cancellation for negative x add about as much.)
    #[test]
    fn activations_and_their_slopes_match_the_definitions() {
        let x: Vec<f32> = (0..=240_000).map(|i| -12.0 + 24.0 * i as f32 / 240_000.0).collect();
        let grad: Vec<f32> = x.iter().map(|x| 1.0 + 0.25 * x).collect();
        let mut levels = vec![Simd::Baseline, Simd::detect()];
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            levels.push(Simd::Avx2);
        }
        let phi = |x: f64| 0.5 * (1.0 + erf_f64(x / 2f64.sqrt()));
        let density = |x: f64| (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
        let sigma = |x: f64| 1.0 / (1.0 + (-x).exp());
        // The activation, its definition and its derivative.
        type Definition<'a> = (Activation, &'a dyn Fn(f64) -> f64, &'a dyn Fn(f64) -> f64);
        let cases: [Definition; 2] = [
            (Activation::Gelu, &|x| x * phi(x), &|x| phi(x) + x * density(x)),
            (Activation::Silu, &|x| x * sigma(x), &|x| sigma(x) * (1.0 + x * (1.0 - sigma(x)))),
        ];
        for simd in levels {
            for (activation, f, slope) in &cases {
                let (mut out, mut back) = (vec![0.0; x.len()], vec![0.0; x.len()]);
                chunk(simd, *activation, &x, None, &mut out);
                chunk(simd, *activation, &x, Some(&grad), &mut back);
                for i in 0..x.len() {
                    let xi = x[i] as f64;
                    let (expected, expected_back) = (f(xi), grad[i] as f64 * slope(xi));
                    assert!((out[i] as f64 - expected).abs() <= 1e-6 * expected.abs().max(1.0), "{activation:?}({xi}) = {} not {expected}", out[i]);
                    assert!(
                        (back[i] as f64 - expected_back).abs() <= 1e-6 * expected_back.abs().max(1.0),
                        "{activation:?}'({xi}) x {} = {} not {expected_back}",
                        grad[i],
                        back[i]
                    );
                }
            }
        }
    }

    #[test]
    fn the_parallel_entry_point_covers_every_element() {
        let x: Vec<f32> = (0..3 * CHUNK + 17).map(|i| (i % 1000) as f32 / 100.0 - 5.0).collect();
        let mut out = vec![f32::NAN; x.len()];
        activation(Activation::Silu, &x, None, &mut out);
        assert!(out.iter().zip(&x).all(|(out, &x)| *out == silu(x)));
        let mut back = vec![f32::NAN; x.len()];
        activation(Activation::Gelu, &x, Some(&x), &mut back);
        assert!(back.iter().zip(&x).all(|(back, &x)| *back == x * gelu_slope(x)));
    }
}
