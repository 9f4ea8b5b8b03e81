//! The real crash test: SIGKILL a process that persists metadata in a
//! tight loop, at seeded random moments, and check that every version it
//! acknowledged (printed after `persist` returned) survived.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::TempDir;
use msl_core::meta::Meta;
use msl_store::testkit::sample_meta;
use msl_store::{CreateOptions, MetaStore};

/// Defaults; override with `MSL_STORE_CRASH_ITERS` / `MSL_STORE_CRASH_SEED`
/// for a longer soak.
const ITERATIONS: u32 = 20;
const SEED: u64 = 0x6d73_6c2d_6b69_6c6c;

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// xorshift64*: enough randomness for kill timing, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn sigkill_during_persist_loses_no_acknowledged_version() {
    let dir = TempDir::new("crash");
    let path = dir.join("meta");
    // 4 Mi blocks: 129 bitmap pages; each version changes a few of them
    // and the superblock, so a kill can land between the page writes and
    // the superblock, or inside either.
    let base = Meta::create(0xc0ff_ee00_0000_0001, 1, 4 << 20, 4096, None);
    drop(MetaStore::create(&path, &sample_meta(&base, 0), &CreateOptions::default()).unwrap());

    let iterations: u32 = env_or("MSL_STORE_CRASH_ITERS", ITERATIONS);
    let seed: u64 = env_or("MSL_STORE_CRASH_SEED", SEED);
    let mut rng = Rng(seed | 1);
    let started = Instant::now();
    let mut acked = 0u64;
    let (mut in_flight_landed, mut total_acks, mut torn) = (0u32, 0u64, 0u32);
    let mut last_torn = String::new();
    for it in 0..iterations {
        // Mostly mid-loop kills, sometimes right after start (during open
        // or the first persist).
        let delay_us = if rng.next().is_multiple_of(5) {
            rng.next() % 3_000
        } else {
            2_000 + rng.next() % 150_000
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_msl-store-persist-loop"))
            .arg(&path)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut last = None;
            let mut n = 0u64;
            let mut line = Vec::new();
            loop {
                line.clear();
                match r.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    // A line without its newline was not fully written.
                    Ok(_) if line.last() != Some(&b'\n') => break,
                    Ok(_) => {
                        let s = std::str::from_utf8(&line[..line.len() - 1]).unwrap();
                        last = Some(s.parse::<u64>().unwrap());
                        n += 1;
                    }
                }
            }
            (last, n)
        });
        std::thread::sleep(Duration::from_micros(delay_us));
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        let (last, n) = reader.join().unwrap();
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        assert!(
            status.code().is_none(),
            "iteration {it}: helper exited by itself ({status}): {err}"
        );
        if let Some(v) = last {
            assert!(v > acked, "iteration {it}: versions must increase");
            acked = v;
        }
        total_acks += n;

        let (s, m) = MetaStore::open(&path)
            .unwrap_or_else(|e| panic!("iteration {it} (killed after {delay_us} us): {e}"));
        let v = m.gens.current;
        assert!(
            v >= acked,
            "iteration {it}: acknowledged version {acked} lost (loaded {v})"
        );
        // At most one persist was in flight when the kill landed.
        assert!(v <= acked + 1, "iteration {it}: loaded {v} > {acked} + 1");
        if v == acked + 1 {
            in_flight_landed += 1;
        }
        assert!(
            m == sample_meta(&base, v),
            "iteration {it}: version {v} content differs"
        );
        if let Some((slot, why)) = s.rejected_slot() {
            if why.contains("checksum mismatch") && why != last_torn {
                last_torn = why.to_string();
                // The kill tore a superblock write; the other one was loaded.
                torn += 1;
                eprintln!("iteration {it}: slot {slot} torn: {why}");
            }
        }
        drop(s);
        // The next child continues from what was loaded.
        acked = v;
    }
    let elapsed = started.elapsed();
    eprintln!(
        "crash test (seed {seed:#x}): {iterations} kills, {total_acks} acknowledged persists, \
         final version {acked}, {in_flight_landed} kills left the in-flight version durable, \
         {torn} kills tore a slot write, {elapsed:?}"
    );
    assert!(total_acks > 0, "the helper never got to persist");
    assert!(
        elapsed < Duration::from_secs(30),
        "crash test too slow: {elapsed:?}"
    );
}
