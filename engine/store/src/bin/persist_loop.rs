//! Crash-test helper: `msl-store-persist-loop [--hot] <meta file>`.
//!
//! Opens the metadata file, then persists versions `v+1, v+2, ...` in a
//! tight loop, printing each version on its own line to stdout only after
//! `persist` returned. The crash test kills it with SIGKILL and checks
//! that no printed (acknowledged) version was lost.
//!
//! * default: versions of [`msl_store::testkit::sample_meta`] (`v` is the
//!   loaded `gens.current`): every persist is a commit.
//! * `--hot`: a degraded primary's pattern, every persist an activity-log
//!   transaction: version `v` adds extent [`hot_extent`]`(v)` to the log
//!   (evicting the oldest beyond [`HOT_LOG`]), then sets one bit in it.
//!   `v` is found from the loaded log; like the core after a crash, the
//!   loop first marks the loaded log's extents dirty.

use std::io::Write;
use std::path::PathBuf;

use msl_store::testkit::{hot_extent, hot_version, sample_meta, HOT_EXTENT_BLOCKS, HOT_LOG};
use msl_store::MetaStore;

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let hot = args.first().is_some_and(|a| a == "--hot");
    if hot {
        args.remove(0);
    }
    let Some(path) = args.first().map(PathBuf::from) else {
        eprintln!("usage: msl-store-persist-loop [--hot] <meta file>");
        std::process::exit(2);
    };
    let (mut store, base) = match MetaStore::open(&path) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    let mut out = std::io::stdout().lock();
    let mut m = base.clone();
    let mut v = if hot {
        for e in &m.al {
            m.dirty.set_range(e * HOT_EXTENT_BLOCKS, HOT_EXTENT_BLOCKS);
        }
        hot_version(&m.al)
    } else {
        base.gens.current
    };
    loop {
        v += 1;
        let r = if hot {
            m.al.push(hot_extent(v));
            if m.al.len() > HOT_LOG {
                m.al.remove(0);
            }
            store.persist(&m.clone())
        } else {
            store.persist(&sample_meta(&base, v))
        };
        if let Err(e) = r {
            eprintln!("{e}");
            std::process::exit(1);
        }
        if hot {
            m.dirty
                .set(hot_extent(v) * HOT_EXTENT_BLOCKS + v % HOT_EXTENT_BLOCKS);
        }
        // One write(2) per acknowledged version.
        if writeln!(out, "{v}").and_then(|()| out.flush()).is_err() {
            std::process::exit(0);
        }
    }
}
