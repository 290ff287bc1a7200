//! LoRA dropout's masks from a counter-based hash: element i of a mask is
//! dropped when a keyed hash of i falls below a threshold, so any element
//! can be computed alone, in any order, on any device. The CPU fills a mask
//! in chunks on all cores; the GPUs compute the same hash in a kernel of
//! trainer-core's (`models/dropout.rs`), so no mask is drawn on the host
//! and uploaded (a test there checks that both give the same mask).

/// Elements per parallel work item.
const CHUNK: usize = 1 << 16;

/// One round of Chris Wellons' `lowbias32` integer hash (a bijection of
/// u32 whose every input bit flips about half of the output bits).
#[inline(always)]
pub fn lowbias32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

/// A dropout mask: its key, the hash values below which an element is
/// dropped, and the scale of the elements kept.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DropoutMask {
    pub key: u64,
    /// ⌊p 2³²⌋: an element is dropped with probability p (to 2⁻³²).
    pub threshold: u32,
    /// 1 / (1 − p), so that the mask's mean is 1.
    pub keep_scale: f32,
}

impl DropoutMask {
    /// The mask keyed `key` that drops elements with probability `p`
    /// (at least 0, below 1).
    pub fn new(key: u64, p: f64) -> Self {
        assert!((0.0..1.0).contains(&p), "dropout probability {p} outside [0, 1)");
        Self { key, threshold: (p * 4_294_967_296.0) as u32, keep_scale: (1.0 / (1.0 - p)) as f32 }
    }

    /// The key's low and high halves, as a 32-bit kernel takes them.
    pub fn key_halves(&self) -> (u32, u32) {
        (self.key as u32, (self.key >> 32) as u32)
    }

    /// Element `index`'s value: 0 if dropped, else the keep scale.
    #[inline(always)]
    pub fn value(&self, index: u32) -> f32 {
        let (low, high) = self.key_halves();
        // Three rounds, keyed between them: with one key XORed into the
        // index only, keys one bit apart would give the same mask with
        // neighbours swapped.
        if lowbias32(lowbias32(lowbias32(index ^ low) ^ high) ^ low) < self.threshold {
            0.0
        } else {
            self.keep_scale
        }
    }

    /// Writes elements `0..out.len()` into `out`, in chunks on all cores.
    pub fn fill(&self, out: &mut [f32]) {
        assert!(u32::try_from(out.len()).is_ok(), "a dropout mask of {} elements: more than 32-bit indices reach", out.len());
        let items: Vec<_> = out.chunks_mut(CHUNK).enumerate().collect();
        let work = |(chunk, out): (usize, &mut [f32])| {
            let start = (chunk * CHUNK) as u32;
            out.iter_mut().zip(start..).for_each(|(out, index)| *out = self.value(index));
        };
        crate::matrix::for_each(items, |_, item| work(item));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Over a million elements the dropped share is p within five standard
    /// deviations, kept elements hold exactly 1/(1 − p), neighbours are
    /// dropped together as often as independent draws would be, and the
    /// next key drops an unrelated set (about 2p(1 − p) of the elements
    /// differ, also against its neighbours). The parallel fill equals element-by-element values.
    #[test]
    fn masks_drop_the_share_asked_for_independently_of_neighbours_and_keys() {
        let n = 1 << 20;
        for p in [0.1, 0.25, 0.5] {
            let mask = DropoutMask::new(0x1234_5678_9abc_def0, p);
            let mut values = vec![f32::NAN; n];
            mask.fill(&mut values);
            let deviation = (p * (1.0 - p) / n as f64).sqrt();
            let dropped = values.iter().filter(|&&v| v == 0.0).count() as f64 / n as f64;
            assert!((dropped - p).abs() < 5.0 * deviation, "p {p}: dropped {dropped}");
            assert!(values.iter().all(|&v| v == 0.0 || v == (1.0 / (1.0 - p)) as f32));
            let both = values.windows(2).filter(|pair| pair[0] == 0.0 && pair[1] == 0.0).count() as f64 / (n - 1) as f64;
            assert!((both - p * p).abs() < 5.0 * (p * p * (1.0 - p * p) / n as f64).sqrt(), "p {p}: neighbours dropped together {both}");
            let mut other = vec![0.0; n];
            DropoutMask::new(0x1234_5678_9abc_def1, p).fill(&mut other);
            let expected = 2.0 * p * (1.0 - p);
            let tolerance = 5.0 * (expected * (1.0 - expected) / n as f64).sqrt();
            let differ = values.iter().zip(&other).filter(|(a, b)| a != b).count() as f64 / n as f64;
            assert!((differ - expected).abs() < tolerance, "p {p}: keys differ in {differ}");
            // Not the same mask with neighbours swapped either.
            let swapped = (0..n).filter(|&i| values[i] != other[i ^ 1]).count() as f64 / n as f64;
            assert!((swapped - expected).abs() < tolerance, "p {p}: keys differ in {swapped} with neighbours swapped");
            for index in [0, 1, 65_535, 65_536, 1_000_000] {
                assert_eq!(values[index], mask.value(index as u32));
            }
        }
    }

    /// p = 0 keeps every element at 1.
    #[test]
    fn no_dropout_keeps_everything() {
        let mut values = vec![0.0; 1000];
        DropoutMask::new(7, 0.0).fill(&mut values);
        assert!(values.iter().all(|&v| v == 1.0));
    }
}
