//! Crash-test helper: `msl-store-persist-loop <meta file>`.
//!
//! Opens the metadata file, then persists versions `v+1, v+2, ...` of
//! [`msl_store::testkit::sample_meta`] (where `v` is the loaded
//! `gens.current`) in a tight loop, printing each version on its own line
//! to stdout only after `persist` returned. The crash test kills it with
//! SIGKILL and checks that no printed (acknowledged) version was lost.

use std::io::Write;
use std::path::PathBuf;

use msl_store::testkit::sample_meta;
use msl_store::MetaStore;

fn main() {
    let Some(path) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: msl-store-persist-loop <meta file>");
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
    let mut v = base.gens.current;
    loop {
        v += 1;
        if let Err(e) = store.persist(&sample_meta(&base, v)) {
            eprintln!("{e}");
            std::process::exit(1);
        }
        // One write(2) per acknowledged version.
        if writeln!(out, "{v}").and_then(|()| out.flush()).is_err() {
            std::process::exit(0);
        }
    }
}
