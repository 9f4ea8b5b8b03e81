//! `mslctl create-md`: creates a node's metadata from its msld config,
//! refuses to overwrite without --force, names the bad key of a wrong
//! config. The real binary, on the example config with paths moved into a
//! temporary directory.

use std::path::{Path, PathBuf};
use std::process::Command;

fn example_config(dir: &Path, edit: impl Fn(String) -> String) -> PathBuf {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/node1.toml"
    ))
    .unwrap()
    .replace("/var/lib/msl/", &format!("{}/", dir.display()))
    .replace("/etc/msl/", &format!("{}/", dir.display()))
    .replace("size_bytes = 1073741824", "size_bytes = 16777216");
    let p = dir.join("node1.toml");
    std::fs::write(&p, edit(text)).unwrap();
    p
}

fn create_md(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mslctl"))
        .arg("create-md")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// The generation `create-md` reports.
fn generation(out: &str) -> String {
    let at = out.find("generation ").expect("generation in output") + 11;
    out[at..at + 16].to_string()
}

#[test]
fn test_create_md_creates_refuses_overwrite_and_forces() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = example_config(dir.path(), |t| t);
    let cfg = cfg.to_str().unwrap();
    let meta = dir.path().join("node1.meta");
    let (ok, out, err) = create_md(&["--config", cfg, "--initial-primary"]);
    assert!(ok, "{out}{err}");
    assert!(meta.exists());
    assert!(
        out.contains("node 1") && out.contains("4096 blocks"),
        "{out}"
    );
    // The volume file is created too; both owner-only.
    assert!(out.contains("created volume"), "{out}");
    {
        use std::os::unix::fs::PermissionsExt;
        for f in ["node1.meta", "node1.img"] {
            let m = std::fs::metadata(dir.path().join(f)).unwrap();
            assert_eq!(m.permissions().mode() & 0o777, 0o600, "{f}");
        }
        assert_eq!(
            std::fs::metadata(dir.path().join("node1.img"))
                .unwrap()
                .len(),
            16 << 20
        );
    }
    let g1 = generation(&out);
    assert_ne!(g1, "0000000000000000", "initial primary gets a generation");
    // Valid metadata is kept: refused without --force, and the refusal
    // shows it loads (node and generation read back from the file).
    let before = std::fs::read(&meta).unwrap();
    let (ok, _, err) = create_md(&["--config", cfg]);
    assert!(!ok);
    assert!(
        err.contains("already holds valid metadata") && err.contains("--force"),
        "{err}"
    );
    assert!(
        err.contains(&g1),
        "refusal names the loaded generation: {err}"
    );
    assert_eq!(std::fs::read(&meta).unwrap(), before, "file untouched");
    // --force: fresh metadata (a new generation).
    let (ok, out, err) = create_md(&["--config", cfg, "--initial-primary", "--force"]);
    assert!(ok, "{out}{err}");
    assert_ne!(generation(&out), g1);
    // A secondary's fresh metadata has no generation yet (full sync).
    let (ok, out, _) = create_md(&["--config", cfg, "--force"]);
    assert!(ok);
    assert_eq!(generation(&out), "0000000000000000", "{out}");
}

#[test]
fn test_create_md_corrupt_existing_file_refused_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = example_config(dir.path(), |t| t);
    let meta = dir.path().join("node1.meta");
    std::fs::write(&meta, vec![0x5a; 10_000]).unwrap();
    let (ok, _, err) = create_md(&["--config", cfg.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("cannot be used") && err.contains("node1.meta"),
        "{err}"
    );
    let (ok, out, err) = create_md(&["--config", cfg.to_str().unwrap(), "--force"]);
    assert!(ok, "{out}{err}");
}

#[test]
fn test_create_md_wrong_config_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = example_config(dir.path(), |t| t.replace("peer_id = 2", "peer_id = 1"));
    let (ok, _, err) = create_md(&["--config", cfg.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("peer_id"), "{err}");
    assert!(!dir.path().join("node1.meta").exists(), "nothing created");
    let cfg = example_config(dir.path(), |t| {
        t.replace("block_size = 4096", "block_size = 1000")
    });
    let (ok, _, err) = create_md(&["--config", cfg.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("block_size"), "{err}");
    let (ok, _, err) = create_md(&["--config", "/nonexistent/msl.toml"]);
    assert!(!ok);
    assert!(err.contains("/nonexistent/msl.toml"), "{err}");
}

/// `convert-md` turns format-1 metadata into the current format, keeping
/// the generation and the dirty map; the old file stays as `.v1`.
#[test]
fn test_convert_md_keeps_generation_and_dirty_map() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = example_config(dir.path(), |t| t);
    let meta_path = dir.path().join("node1.meta");
    // The example's cluster id and node, 16 MiB of 4 KiB blocks.
    let mut m = msl_core::meta::Meta::create(0x6d736c2d64656d6f, 1, 4096, 4096, Some(0xabc1));
    for b in [3, 700, 4000] {
        m.dirty.set(b);
    }
    msl_store::testkit::write_v1(&meta_path, &m).unwrap();
    // msld refuses format 1 naming the command; mslctl converts.
    let out = Command::new(env!("CARGO_BIN_EXE_mslctl"))
        .args(["convert-md", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("000000000000abc1") && said.contains("3 blocks"),
        "{said}"
    );
    assert!(dir.path().join("node1.meta.v1").exists(), "old file kept");
    let (_, back) = msl_store::MetaStore::open(&meta_path).unwrap();
    assert_eq!(back.gens.current, 0xabc1);
    assert_eq!(back.dirty.count(), 3);
    // A second conversion is refused (not format 1), the file untouched.
    let before = std::fs::read(&meta_path).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mslctl"))
        .args(["convert-md", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(std::fs::read(&meta_path).unwrap(), before);
    // Without --config: a usage error naming the flag.
    let out = Command::new(env!("CARGO_BIN_EXE_mslctl"))
        .arg("convert-md")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--config"));
}
