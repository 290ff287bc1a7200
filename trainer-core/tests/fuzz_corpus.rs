//! A short fuzzing run in every test run: each reader of untrusted bytes
//! (trainer_core::fuzz_targets) over its committed seed corpus
//! (fuzz/corpus/<target>/, from scripts/make_fuzz_corpus.py) and thousands
//! of deterministic mutations of it: bit flips, truncations, repeated and
//! spliced slices, and the integers headers are made of (0, 0xFF..,
//! 0x7FFF_FFFF, lengths near the end). A panic fails the test and writes
//! the input to the system temp dir; add it to the corpus once fixed.

use std::path::{Path, PathBuf};

use trainer_core::fuzz_targets::TARGETS;

/// Mutated inputs per target (about a second each on this machine).
const MUTATIONS: usize = 3000;

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())).map(|e| e.unwrap().path()).collect();
    paths.sort();
    paths.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// xorshift64*: the same mutations on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(seed: &[u8], other: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut data = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(data.len() + 1);
        match rng.below(7) {
            0 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] ^= 1 << rng.below(8);
            }
            1 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] = [0x00, 0xFF, 0x7F, 0x80, 0x01][rng.below(5)];
            }
            2 => data.truncate(at),
            3 => {
                // An integer a header could hold, little- or big-endian.
                let value = [0u32, u32::MAX, 0x7FFF_FFFF, 0xFFFF, data.len() as u32, (data.len() as u32).wrapping_sub(1)][rng.below(6)];
                let bytes = if rng.below(2) == 0 { value.to_le_bytes() } else { value.to_be_bytes() };
                let end = (at + 4).min(data.len());
                data.splice(at..end, bytes);
            }
            4 if !data.is_empty() => {
                // Repeat a slice (segments and chunks that come twice).
                let start = rng.below(data.len());
                let end = (start + 1 + rng.below(64)).min(data.len());
                let slice = data[start..end].to_vec();
                data.splice(at..at, slice);
            }
            5 if !other.is_empty() => {
                // Splice in part of another seed.
                let start = rng.below(other.len());
                let end = (start + 1 + rng.below(256)).min(other.len());
                data.splice(at..at, other[start..end].iter().copied());
            }
            _ => {
                let end = (at + 1 + rng.below(16)).min(data.len());
                data.drain(at..end);
            }
        }
    }
    data
}

fn run(target: &str, function: fn(&[u8]), input: &[u8]) {
    if std::panic::catch_unwind(|| function(input)).is_err() {
        let path: PathBuf = std::env::temp_dir()
            .join(format!("burnbooth-fuzz-{target}-{:016x}", input.iter().fold(0xcbf29ce484222325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x100000001b3))));
        std::fs::write(&path, input).unwrap();
        panic!("{target} panicked on {} bytes, written to {}", input.len(), Path::new(&path).display());
    }
}

#[test]
fn every_reader_survives_its_corpus_and_mutations_of_it() {
    // Panics are caught and reported with their input; keep the default hook quiet.
    std::panic::set_hook(Box::new(|_| {}));
    for (target, function) in TARGETS {
        let seeds = corpus(target);
        assert!(!seeds.is_empty(), "no seeds for {target}");
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ target.len() as u64);
        for seed in &seeds {
            run(target, *function, seed);
        }
        for _ in 0..MUTATIONS {
            let seed = &seeds[rng.below(seeds.len())];
            let other = &seeds[rng.below(seeds.len())];
            let input = mutate(seed, other, &mut rng);
            run(target, *function, &input);
        }
    }
}
