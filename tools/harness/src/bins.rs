//! Finding (and if need be building) the msld, mslctl and msl-witness
//! binaries.
//!
//! Looked for in `$MSL_BIN_DIR`, next to the running executable (and its
//! parent, for test binaries in `target/<profile>/deps`), then in the
//! workspace's `target/<profile>`. When the binary is missing, or older
//! than the daemon's sources in this checkout, the harness runs
//! `cargo build [--release] --bin msld --bin mslctl` (same profile as the
//! running executable) and says so: a stale msld would test old code.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::SystemTime;

/// The workspace root (this crate is tools/harness).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn release_profile() -> bool {
    std::env::current_exe().is_ok_and(|p| p.components().any(|c| c.as_os_str() == "release"))
}

fn candidates(name: &str) -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(d) = std::env::var_os("MSL_BIN_DIR") {
        v.push(PathBuf::from(d).join(name));
        return v;
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            v.push(dir.join(name));
        }
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let profile = if release_profile() {
        "release"
    } else {
        "debug"
    };
    v.push(target.join(profile).join(name));
    v
}

fn newest_mtime(dir: &Path, newest: &mut SystemTime) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n != "target" && n != "tests") {
                newest_mtime(&p, newest);
            }
        } else if p.extension().is_some_and(|x| x == "rs" || x == "toml") {
            if let Ok(m) = e.metadata().and_then(|m| m.modified()) {
                *newest = (*newest).max(m);
            }
        }
    }
}

/// Newest modification time of the sources msld and mslctl are built from
/// (None when this is not a source checkout).
fn sources_mtime() -> Option<SystemTime> {
    let root = workspace_root();
    if !root.join("engine/daemon").is_dir() {
        return None;
    }
    let mut newest = SystemTime::UNIX_EPOCH;
    newest_mtime(&root.join("engine"), &mut newest);
    newest_mtime(&root.join("tools/mslctl"), &mut newest);
    Some(newest)
}

fn find(name: &str) -> Option<PathBuf> {
    candidates(name).into_iter().find(|p| p.is_file())
}

fn is_fresh(p: &Path, src: Option<SystemTime>) -> bool {
    match (src, p.metadata().and_then(|m| m.modified())) {
        (Some(s), Ok(b)) => b >= s,
        (None, _) => true,
        (_, Err(_)) => false,
    }
}

fn build() -> Result<(), String> {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root()).args([
        "build",
        "--bin",
        "msld",
        "--bin",
        "mslctl",
        "--bin",
        "msl-witness",
    ]);
    if release_profile() {
        cmd.arg("--release");
    }
    eprintln!("msl-harness: building msld and mslctl: {cmd:?}");
    let st = cmd
        .status()
        .map_err(|e| format!("running cargo to build msld: {e}"))?;
    if !st.success() {
        return Err(format!("building msld failed ({st})"));
    }
    Ok(())
}

/// Path of `name` (`msld`, `mslctl` or `msl-witness`), built first if
/// missing or stale.
pub fn binary(name: &str) -> Result<PathBuf, String> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let src = if std::env::var_os("MSL_BIN_DIR").is_some() {
        None
    } else {
        sources_mtime()
    };
    if let Some(p) = find(name).filter(|p| is_fresh(p, src)) {
        return Ok(p);
    }
    if std::env::var_os("MSL_BIN_DIR").is_some() {
        return Err(format!(
            "{name} not found in $MSL_BIN_DIR ({:?})",
            std::env::var_os("MSL_BIN_DIR")
        ));
    }
    eprintln!("msl-harness: {name} is missing or older than its sources");
    if let Err(e) = BUILT.get_or_init(build) {
        // A checkout that does not build right now: use what exists, loudly.
        return match find(name) {
            Some(p) => {
                eprintln!("msl-harness: WARNING: {e}; using the older {}", p.display());
                Ok(p)
            }
            None => Err(e.clone()),
        };
    }
    find(name).ok_or_else(|| {
        format!(
            "{name} still not found after building (looked in {:?})",
            candidates(name)
        )
    })
}
