//! What a metadata persist costs, by volume size:
//! `msl-store-bench [--dir DIR] [--sizes 1G,1T,8T] [--hot N]`.
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
//! Format 1 wrote the whole bitmap per persist: its bytes per persist are
//! printed alongside (`blocks / 8` plus the header), computed, not run.

use std::path::PathBuf;
use std::time::Instant;

use msl_core::meta::Meta;
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

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

fn delta(a: MetaStats, b: MetaStats) -> MetaStats {
    MetaStats {
        persists: b.persists - a.persists,
        skipped: b.skipped - a.skipped,
        transactions: b.transactions - a.transactions,
        commits: b.commits - a.commits,
        pages_written: b.pages_written - a.pages_written,
        bytes_written: b.bytes_written - a.bytes_written,
        syncs: b.syncs - a.syncs,
    }
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

fn line(what: &str, d: MetaStats, secs: f64) {
    let n = d.persists.max(1) as f64;
    println!(
        "  {what:<22} {:>9.0} persists/s  {:>9.0} B/persist  {:>5.2} fdatasync/persist  \
         ({} transactions, {} commits, {} pages)",
        d.persists as f64 / secs,
        d.bytes_written as f64 / n,
        d.syncs as f64 / n,
        d.transactions,
        d.commits,
        d.pages_written
    );
}

fn main() {
    let mut dir = std::env::temp_dir();
    let mut sizes = vec![1u64 << 30, 1 << 40];
    let mut hot = 2000u64;
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
            _ => {
                eprintln!("usage: msl-store-bench [--dir DIR] [--sizes 1G,1T,8T] [--hot N]");
                std::process::exit(2);
            }
        }
    }
    for size in sizes {
        let blocks = size / 4096;
        let path = dir.join(format!("msl-store-bench-{}-{size}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut m = Meta::create(1, 1, blocks, 4096, Some(7));
        m.clean = false;
        let t = Instant::now();
        let mut s = MetaStore::create(&path, &m, &CreateOptions::default()).unwrap();
        let create_s = t.elapsed().as_secs_f64();
        println!(
            "volume {} GiB: metadata file {} MiB (created in {create_s:.2} s); \
             format 1 wrote {} KiB per persist",
            size >> 30,
            s.file_len() >> 20,
            (blocks / 8 + 64 + 8 * AL as u64) >> 10
        );
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..al_len(blocks / EXTENT) {
            hot_step(&mut s, &mut m, &mut rng, false);
        }
        for clone in [false, true] {
            let before = s.stats();
            let t = Instant::now();
            for _ in 0..hot {
                hot_step(&mut s, &mut m, &mut rng, clone);
            }
            let what = if clone {
                "hot extent (+Meta clone)"
            } else {
                "hot extent"
            };
            line(what, delta(before, s.stats()), t.elapsed().as_secs_f64());
        }
        // Resync progress over a dirty GiB.
        let region = (1u64 << 30) / 4096;
        let first = blocks / 2 - region / 2;
        m.dirty.set_range(first, region);
        m.gens.current += 1;
        s.persist(&m).unwrap();
        let before = s.stats();
        let t = Instant::now();
        let step = (16u64 << 20) / 4096;
        let mut at = first;
        while at < first + region {
            for b in at..at + step {
                m.dirty.clear(b);
            }
            s.persist(&m).unwrap();
            at += step;
        }
        line(
            "resync progress",
            delta(before, s.stats()),
            t.elapsed().as_secs_f64(),
        );
        drop(s);
        let t = Instant::now();
        let (_, got) = MetaStore::open(&path).unwrap();
        println!(
            "  open                   {:.3} s ({} dirty blocks)",
            t.elapsed().as_secs_f64(),
            got.dirty.count()
        );
        let _ = std::fs::remove_file(&path);
    }
}
