//! Write the fuzz seed corpus: valid frames of every message type (plain,
//! keyed, inside Ethernet) and fragment sequences, as
//! `fuzz/corpus/<target>/seed-*`.
//!
//! Run after any wire format change, then commit the files:
//!
//! ```sh
//! cargo run -p msl-wire --example gen_corpus
//! ```
//!
//! `--out DIR` writes somewhere else than `<repo>/fuzz/corpus`.

use std::path::PathBuf;
use std::{env, fs, process};

fn main() {
    let args: Vec<String> = env::args().skip(1).collect();
    let out = match args.as_slice() {
        [] => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus"),
        [flag, dir] if flag == "--out" => PathBuf::from(dir),
        _ => {
            eprintln!("usage: gen_corpus [--out DIR]");
            process::exit(2);
        }
    };
    let mut written = 0;
    for (target, name, bytes) in msl_wire::fuzz_support::seeds() {
        let dir = out.join(target);
        let path = dir.join(&name);
        if let Err(e) = fs::create_dir_all(&dir).and_then(|()| fs::write(&path, &bytes)) {
            eprintln!("gen_corpus: cannot write {}: {e}", path.display());
            process::exit(1);
        }
        written += 1;
    }
    println!(
        "gen_corpus: wrote {written} seed files under {}",
        out.display()
    );
}
