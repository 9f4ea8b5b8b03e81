//! What a metadata persist costs, by volume size:
//! `msl-store-bench [--dir DIR] [--sizes 1G,1T,8T] [--hot N] [--rounds N]`.
//!
//! For each volume size (4 KiB blocks, 4 MiB extents, a 1237-extent
//! activity log: the core's defaults) it creates a metadata file in DIR
//! (default: the system temp dir; removed afterwards), fills the
//! activity log (half the extents where the volume has fewer than twice
//! the log's), then measures:
//! * `hot`: N new hot extents, each evicting the oldest and then taking a
//!   write (a degraded primary under random writes); persisted as the
//!   store sees it, and again including the clone of the whole `Meta`
//!   that the core's `Action::PersistMeta` makes today;
//! * `progress`: resync progress, 16 MiB of blocks cleared per persist
//!   over a 1 GiB dirty region;
//! * `open`: loading the file.
//!
//! The hot-extent runs are interleaved across the volumes in rounds and
//! the median round rate is printed: an `fdatasync` here takes from under
//! 1 ms to over 10 ms depending on the neighbours' load.
//!
//! Format 1 wrote the whole bitmap per persist: its bytes per persist are
//! printed alongside (`blocks / 8` plus the header), computed, not run.

use std::path::PathBuf;
use std::time::Instant;

use msl_core::meta::Meta;
use msl_store::testkit::{stats_delta, stats_sum, Rng};
use msl_store::{CreateOptions, MetaStats, MetaStore};

const EXTENT: u64 = 1024;
const AL: usize = 1237;

fn parse_size(s: &str) -> Option<u64> {
    let (num, unit) = s.split_at(s.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "G" => n << 30,
        "T" => n << 40,
        _ => return None,
    })
}

/// Activity-log size on a volume of `extents`: the core's default, or
/// half the extents on a volume too small for it to ever evict.
fn al_len(extents: u64) -> usize {
    AL.min((extents / 2) as usize)
}

/// One new hot extent: evict the oldest, persist, then the write's bit.
fn hot_step(s: &mut MetaStore, m: &mut Meta, rng: &mut Rng, clone: bool) {
    let extents = m.volume_blocks / EXTENT;
    let e = loop {
        let e = rng.below(extents);
        if !m.al.contains(&e) {
            break e;
        }
    };
    if m.al.len() >= al_len(extents) {
        m.al.remove(0);
    }
    m.al.push(e);
    let r = if clone {
        s.persist(&m.clone())
    } else {
        s.persist(m)
    };
    r.unwrap_or_else(|e| panic!("{e}"));
    m.dirty.set(e * EXTENT + rng.below(EXTENT));
}

fn line(what: &str, d: MetaStats, rate: f64) {
    let n = d.persists.max(1) as f64;
    println!(
        "  {what:<22} {:>9.0} persists/s  {:>9.0} B/persist  {:>5.2} fdatasync/persist  \
         ({} transactions, {} commits, {} pages)",
        rate,
        d.bytes_written as f64 / n,
        d.syncs as f64 / n,
        d.transactions,
        d.commits,
        d.pages_written
    );
}

/// One volume under test.
struct Vol {
    size: u64,
    path: PathBuf,
    s: MetaStore,
    m: Meta,
    rng: Rng,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let mut dir = std::env::temp_dir();
    let mut sizes = vec![1u64 << 30, 1 << 40];
    let mut hot = 2000u64;
    let mut rounds = 5u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().unwrap_or_default();
        match a.as_str() {
            "--dir" => dir = PathBuf::from(v),
            "--sizes" => {
                sizes = v
                    .split(',')
                    .map(|s| {
                        parse_size(s).unwrap_or_else(|| panic!("bad size {s:?} (e.g. 1G, 8T)"))
                    })
                    .collect()
            }
            "--hot" => hot = v.parse().expect("--hot N"),
            "--rounds" => rounds = v.parse::<u64>().expect("--rounds N").max(1),
            _ => {
                eprintln!(
                    "usage: msl-store-bench [--dir DIR] [--sizes 1G,1T,8T] [--hot N] [--rounds N]"
                );
                std::process::exit(2);
            }
        }
    }
    let mut vols = Vec::new();
    for &size in &sizes {
        let blocks = size / 4096;
        let path = dir.join(format!("msl-store-bench-{}-{size}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut m = Meta::create(1, 1, blocks, 4096, Some(7));
        m.clean = false;
        let t = Instant::now();
        let s = MetaStore::create(&path, &m, &CreateOptions::default()).unwrap();
        println!(
            "volume {} GiB: metadata file {} MiB (created in {:.2} s); \
             format 1 wrote {} KiB per persist",
            size >> 30,
            s.file_len() >> 20,
            t.elapsed().as_secs_f64(),
            (blocks / 8 + 64 + 8 * AL as u64) >> 10
        );
        let mut v = Vol {
            size,
            path,
            s,
            m,
            rng: Rng(0x9e37_79b9_7f4a_7c15),
        };
        for _ in 0..al_len(blocks / EXTENT) {
            hot_step(&mut v.s, &mut v.m, &mut v.rng, false);
        }
        vols.push(v);
    }
    // Hot extents, in rounds interleaved across the volumes (the time of
    // an fdatasync varies a lot on a shared disk): the median round rate.
    println!("\nnew hot extents ({hot} per volume, {rounds} interleaved rounds, median rate):");
    for clone in [false, true] {
        let mut rates = vec![Vec::new(); vols.len()];
        let mut totals: Vec<MetaStats> = vec![MetaStats::default(); vols.len()];
        for _ in 0..rounds {
            for (i, v) in vols.iter_mut().enumerate() {
                let before = v.s.stats();
                let t = Instant::now();
                for _ in 0..hot / rounds {
                    hot_step(&mut v.s, &mut v.m, &mut v.rng, clone);
                }
                let d = stats_delta(before, v.s.stats());
                rates[i].push(d.persists as f64 / t.elapsed().as_secs_f64());
                totals[i] = stats_sum(totals[i], d);
            }
        }
        for (i, v) in vols.iter().enumerate() {
            let what = format!(
                "{:>5} GiB{}",
                v.size >> 30,
                if clone { " +Meta clone" } else { "" }
            );
            line(&what, totals[i], median(rates[i].clone()));
        }
    }
    println!("\nresync progress (16 MiB cleared per persist over a dirty GiB):");
    for v in &mut vols {
        let blocks = v.size / 4096;
        let region = (1u64 << 30) / 4096;
        let first = blocks / 2 - region / 2;
        v.m.dirty.set_range(first, region);
        v.m.gens.current += 1;
        v.s.persist(&v.m).unwrap();
        let before = v.s.stats();
        let t = Instant::now();
        let step = (16u64 << 20) / 4096;
        let mut at = first;
        while at < first + region {
            for b in at..at + step {
                v.m.dirty.clear(b);
            }
            v.s.persist(&v.m).unwrap();
            at += step;
        }
        let d = stats_delta(before, v.s.stats());
        let rate = d.persists as f64 / t.elapsed().as_secs_f64();
        line(&format!("{:>5} GiB", v.size >> 30), d, rate);
    }
    println!("\nopen:");
    for v in vols {
        let (size, path) = (v.size, v.path.clone());
        drop(v);
        let t = Instant::now();
        let (_, got) = MetaStore::open(&path).unwrap();
        println!(
            "  {:>5} GiB              {:.3} s ({} dirty blocks)",
            size >> 30,
            t.elapsed().as_secs_f64(),
            got.dirty.count()
        );
        let _ = std::fs::remove_file(&path);
    }
}
