//! `mslctl verify` of a thin pair: two sparse 4 TiB file volumes holding a
//! few MiB of data, a real msld pair in network namespaces (msl-harness).
//! The holes go as zero ranges, so the run costs what the data costs; a
//! block written into one side's hole behind msld's back (data on the
//! primary only, data on the secondary only) is found as differing, and
//! zero bytes where the other side has a hole are equal.
//!
//! Needs root and a file system taking 4 TiB sparse files (ext4, xfs).

mod common;

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use msl_harness::{Pair, PairOptions};
use serde_json::Value;

const BLOCK: u64 = 4096;
const SIZE: u64 = 4 << 40;
const BLOCKS: u64 = SIZE / BLOCK;

/// Write `data` at `offset` into node `id`'s volume file (msld stopped).
fn write_behind(pair: &Pair, id: u16, offset: u64, data: &[u8]) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(pair.volume_path(id))
        .unwrap();
    f.write_all_at(data, offset).unwrap();
    f.sync_all().unwrap();
}

/// `mslctl verify --json` on node `id`: (exit code, status.verify, time).
fn verify(pair: &Pair, id: u16) -> (i32, Value, f64) {
    let (code, out, err, took) = common::mslctl(&pair.socket(id), &["verify", "--json"]);
    let v = serde_json::from_str(out.trim()).unwrap_or_else(|e| {
        panic!(
            "verify on node {id}: exit {code}, {e}\nstdout: {out}\nstderr: {err}\n{}",
            pair.diagnostics()
        )
    });
    (code, v, took)
}

fn primary(pair: &Pair) -> u16 {
    let t = Instant::now();
    loop {
        for id in [1, 2] {
            if pair.status(id).is_ok_and(|s| s["role"] == "primary") {
                return id;
            }
        }
        assert!(t.elapsed() < Duration::from_secs(30), "no primary");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn test_verify_of_a_4tib_thin_pair_skips_holes_and_finds_data_on_one_side_only() {
    let pair = Pair::new(PairOptions {
        volume_bytes: SIZE,
        ..PairOptions::default()
    })
    .expect("build the pair (run as root)");
    for id in 1..=2u16 {
        // Thin file volumes: the [volume] section ends the file.
        let cfg = pair.config_path(id);
        let text = std::fs::read_to_string(&cfg).unwrap();
        assert!(text.trim_end().ends_with(".meta\""), "{text}");
        std::fs::write(&cfg, text + "preallocate = false\n").unwrap();
        common::create_md_blank(&cfg, id);
    }
    // The same data on both sides: 1 MiB at 0, 1 MiB at 1 TiB, the last
    // block. The rest is a hole on both.
    let data: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8 + 1).collect();
    for id in 1..=2u16 {
        write_behind(&pair, id, 0, &data);
        write_behind(&pair, id, 1 << 40, &data);
        write_behind(&pair, id, SIZE - BLOCK, &data[..BLOCK as usize]);
    }
    pair.start_both().unwrap();
    pair.wait_in_sync(1, Duration::from_secs(60)).unwrap();

    let p = primary(&pair);
    let (code, v, took) = verify(&pair, p);
    eprintln!("4 TiB thin pair, 2 MiB of data: verify {took:.2} s: {v}");
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["checked_blocks"], BLOCKS, "{v}");
    assert_eq!(v["differing_blocks"], 0, "{v}");
    let holes = v["hole_blocks"].as_u64().unwrap();
    // The data (513 blocks) and the chunks read around it; the rest holes.
    assert!(holes > BLOCKS - 4096, "{v}");
    assert!(took < 60.0, "verify took {took:.1} s");
    // The plain output says how many blocks were holes on both sides.
    let (code, out, err, _) = common::mslctl(&pair.socket(p), &["verify"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("verify: {BLOCKS} blocks compared"))
            && out.contains("holes on both sides"),
        "{out}"
    );
    let s = pair.status(p).unwrap();
    assert_eq!(s["verify"]["runs"], 2, "{s}");

    // Behind msld's back: data on node 1 only (in node 2's hole), data on
    // node 2 only (in node 1's hole), zero bytes on node 2 where node 1
    // has a hole (equal), a changed byte in the shared data.
    pair.stop(1).unwrap();
    pair.stop(2).unwrap();
    let on_1_only = (2u64 << 40) / BLOCK + 2;
    let on_2_only = (3u64 << 40) / BLOCK + 7;
    let changed = (1u64 << 40) / BLOCK + 100;
    write_behind(&pair, 1, on_1_only * BLOCK, &[0xa1; BLOCK as usize]);
    write_behind(&pair, 2, on_2_only * BLOCK, &[0xb2; BLOCK as usize]);
    write_behind(&pair, 2, (3u64 << 39) + (5 << 20), &[0; 1 << 20]);
    write_behind(&pair, 2, changed * BLOCK + 17, &[0xff]);
    pair.start_both().unwrap();
    let p = primary(&pair);
    pair.wait_in_sync(p, Duration::from_secs(60)).unwrap();
    let (code, v, took) = verify(&pair, p);
    eprintln!("after writing behind msld's back: verify {took:.2} s: {v}");
    assert_eq!(code, 2, "blocks differ: {v}");
    assert_eq!(v["checked_blocks"], BLOCKS, "{v}");
    assert_eq!(v["differing_blocks"], 3, "{v}");
    let first: Vec<u64> = v["first_differing"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_u64().unwrap())
        .collect();
    assert_eq!(first, [changed, on_1_only, on_2_only], "{v}");
    assert!(v["hole_blocks"].as_u64().unwrap() > BLOCKS - 8192, "{v}");
    assert!(took < 60.0, "verify took {took:.1} s");
    pair.stop(1).unwrap();
    pair.stop(2).unwrap();
}
