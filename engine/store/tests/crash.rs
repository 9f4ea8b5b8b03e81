//! The real crash test: SIGKILL a process that persists metadata in a
//! tight loop, at seeded random moments, and check that every version it
//! acknowledged (printed after `persist` returned) survived.

mod common;

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::process::{ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::TempDir;
use msl_core::meta::Meta;
use msl_store::testkit::{sample_meta, Rng};
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

/// The tests of this file run one at a time: a child forked by one test
/// inherits, until it execs, the descriptors of the other test's open
/// metadata file, and with them its lock.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// What the persist loop printed: the last version and how many.
type Acks = (Option<u64>, u64);

/// Run the persist-loop helper with `args`, SIGKILL it after `delay_us`
/// microseconds; its exit status, what `read` made of its output, and
/// its standard error.
fn kill_loop_after(
    args: &[&OsStr],
    delay_us: u64,
    read: fn(ChildStdout) -> Acks,
) -> (ExitStatus, Acks, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_msl-store-persist-loop"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || read(stdout));
    std::thread::sleep(Duration::from_micros(delay_us));
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    let acks = reader.join().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (status, acks, err)
}

/// The versions among the whole lines (a last line without its newline
/// was not fully written: "1" of "15" is not a version); `version` reads
/// one line.
fn versions(stdout: ChildStdout, version: impl Fn(&str) -> Option<u64>) -> Acks {
    let mut r = BufReader::new(stdout);
    let mut last = None;
    let mut n = 0u64;
    let mut line = Vec::new();
    loop {
        line.clear();
        match r.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) if line.last() != Some(&b'\n') => break,
            Ok(_) => {
                if let Some(v) = std::str::from_utf8(&line[..line.len() - 1])
                    .ok()
                    .and_then(&version)
                {
                    last = Some(v);
                    n += 1;
                }
            }
        }
    }
    (last, n)
}

/// Every whole line is a version.
fn whole_versions(stdout: ChildStdout) -> Acks {
    versions(stdout, |s| Some(s.parse::<u64>().unwrap()))
}

/// The whole lines that read as numbers.
fn numeric_lines(stdout: ChildStdout) -> Acks {
    versions(stdout, |s| s.parse::<u64>().ok())
}

#[test]
fn sigkill_during_persist_loses_no_acknowledged_version() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
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
        let (status, (last, n), err) =
            kill_loop_after(&[path.as_os_str()], delay_us, whole_versions);
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

#[test]
fn sigkill_during_hot_extent_transactions_loses_no_acknowledged_extent() {
    use msl_store::testkit::{
        hot_extent, hot_version, HOT_EXTENTS, HOT_EXTENT_BLOCKS as EXT, HOT_LOG,
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("crash-hot");
    let path = dir.join("meta");
    let mut base = Meta::create(0xc0ff_ee00_0000_0002, 1, HOT_EXTENTS * EXT, 4096, Some(1));
    base.clean = false;
    // A short ring: kills also land in the commits its wraps force.
    let opts = CreateOptions {
        extent_blocks: EXT,
        ring_len: 32,
        ..CreateOptions::default()
    };
    drop(MetaStore::create(&path, &base, &opts).unwrap());
    let iterations: u32 = env_or("MSL_STORE_CRASH_ITERS", ITERATIONS);
    let mut rng = Rng(env_or("MSL_STORE_CRASH_SEED", SEED) | 1);
    let mut acked = 0u64;
    let mut total_acks = 0u64;
    for it in 0..iterations {
        let delay_us = 2_000 + rng.next() % 100_000;
        let (status, (last, n), err) = kill_loop_after(
            &["--hot".as_ref(), path.as_os_str()],
            delay_us,
            numeric_lines,
        );
        assert!(status.code().is_none(), "iteration {it}: {status}: {err}");
        if let Some(v) = last {
            acked = v;
        }
        total_acks += n;
        let (_, m) = MetaStore::open(&path).unwrap_or_else(|e| panic!("iteration {it}: {e}"));
        let v = hot_version(&m.al);
        assert!(
            v >= acked && v <= acked + 1,
            "iteration {it}: acked {acked}, loaded {v}"
        );
        // The log is exactly the last HOT_LOG extents of version v.
        let want: std::collections::BTreeSet<u64> = (v.saturating_sub(HOT_LOG as u64 - 1)..=v)
            .filter(|&i| i > 0)
            .map(hot_extent)
            .collect();
        let got: std::collections::BTreeSet<u64> = m.al.iter().copied().collect();
        assert_eq!(got, want, "iteration {it}: log of version {v}");
        // Every write to an extent that left the log is on disk.
        for i in 1..=v.saturating_sub(HOT_LOG as u64) {
            let bit = hot_extent(i) * EXT + i % EXT;
            assert!(
                m.dirty.get(bit),
                "iteration {it}: the bit of version {i} was lost"
            );
        }
        // Extents never written hold no bits.
        for i in v + 1..v + 50 {
            let e = hot_extent(i);
            assert_eq!(
                m.dirty.count_range(e * EXT, EXT),
                0,
                "iteration {it}: extent {e}"
            );
        }
        // The next child continues from what was loaded.
        acked = v;
    }
    assert!(total_acks > 0, "no persist was acknowledged");
    eprintln!("{iterations} kills, {total_acks} acknowledged transactions, final version {acked}");
}
