//! The fuzz targets on stable: every committed seed-corpus file, plus a few
//! thousand deterministic mutations of them, go through the same functions
//! the cargo-fuzz targets call.

use std::fs;
use std::path::{Path, PathBuf};

use crate::fuzz_support::{fuzz_parse_eth, fuzz_parse_frame, fuzz_reassemble, seeds};

const TARGETS: [&str; 3] = ["parse_frame", "parse_eth", "reassemble"];
const MUTATIONS_PER_TARGET: usize = 3000;
const REGENERATE: &str = "run `cargo run -p msl-wire --example gen_corpus` and commit fuzz/corpus";

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus")
}

fn run_target(target: &str, data: &[u8]) {
    match target {
        "parse_frame" => fuzz_parse_frame(data),
        "parse_eth" => fuzz_parse_eth(data),
        "reassemble" => fuzz_reassemble(data),
        other => panic!("unknown fuzz target {other}"),
    }
}

/// Every file in `fuzz/corpus/<target>/` (seeds and anything a local fuzz
/// run added), sorted by name.
fn corpus_files(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir().join(target);
    let entries =
        fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}; {REGENERATE}", dir.display()));
    let mut files: Vec<(String, Vec<u8>)> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().is_file())
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let bytes = fs::read(e.path()).unwrap_or_else(|err| panic!("{name}: {err}"));
            (name, bytes)
        })
        .collect();
    files.sort();
    files
}

#[test]
fn test_committed_seed_corpus_is_current() {
    for (target, name, bytes) in seeds() {
        let path = corpus_dir().join(target).join(&name);
        let on_disk =
            fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}; {REGENERATE}", path.display()));
        assert!(
            on_disk == bytes,
            "{} is stale (wire format changed?); {REGENERATE}",
            path.display()
        );
    }
}

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One to four libFuzzer-like mutations.
fn mutate(rng: &mut Rng, data: &mut Vec<u8>, other: &[u8]) {
    for _ in 0..1 + rng.below(4) {
        match rng.below(7) {
            0 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] ^= 1 << rng.below(8);
            }
            1 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] = rng.next() as u8;
            }
            2 if !data.is_empty() => {
                // An "interesting" value at a header-ish offset.
                let i = rng.below(data.len().min(64));
                data[i] = [0, 1, 2, 0x7f, 0x80, 0xff][rng.below(6)];
            }
            3 => {
                let n = rng.below(data.len() + 1);
                data.truncate(n);
            }
            4 => {
                let i = rng.below(data.len() + 1);
                data.insert(i, rng.next() as u8);
            }
            5 if !data.is_empty() => {
                let i = rng.below(data.len());
                data.remove(i);
            }
            _ => {
                // Splice: our prefix, the other input's suffix.
                let i = rng.below(data.len() + 1);
                let j = rng.below(other.len() + 1);
                data.truncate(i);
                data.extend_from_slice(&other[j..]);
            }
        }
    }
}

#[test]
fn test_seed_corpus_and_mutations_never_panic() {
    let mut total = 0;
    for (t, target) in TARGETS.iter().enumerate() {
        let files = corpus_files(target);
        assert!(
            files.iter().filter(|(n, _)| n.starts_with("seed-")).count() >= 3,
            "too few seeds for {target}; {REGENERATE}"
        );
        for (_, bytes) in &files {
            run_target(target, bytes);
            total += 1;
        }
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ t as u64);
        for _ in 0..MUTATIONS_PER_TARGET {
            let (_, base) = &files[rng.below(files.len())];
            let (_, other) = &files[rng.below(files.len())];
            let mut data = base.clone();
            mutate(&mut rng, &mut data, other);
            run_target(target, &data);
            total += 1;
        }
    }
    assert!(total >= TARGETS.len() * MUTATIONS_PER_TARGET);
}
