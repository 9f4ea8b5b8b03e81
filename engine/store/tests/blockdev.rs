//! Volume on a real block device: a loop device over a temp file.
//!
//! Needs root and `losetup`; skipped (with a message) otherwise.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::TempDir;
use msl_store::{StoreError, Volume, VolumeKind};

const SIZE: u64 = 4 << 20;

/// An attached loop device, detached on drop.
struct Loop(PathBuf);

impl Loop {
    fn attach(file: &Path) -> Option<Loop> {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "skipping: losetup failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        let dev = String::from_utf8(out.stdout).ok()?.trim().to_string();
        Some(Loop(PathBuf::from(dev)))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

#[test]
fn volume_on_loop_device() {
    let dir = TempDir::new("loop");
    let backing = dir.join("backing");
    std::fs::write(&backing, vec![0x5Au8; SIZE as usize]).unwrap();
    let Some(dev) = Loop::attach(&backing) else {
        return;
    };

    let e = Volume::open(&dev.0, SIZE + 4096).unwrap_err();
    assert!(matches!(e, StoreError::TooSmall { size: SIZE, .. }), "{e}");

    let v = Volume::open(&dev.0, SIZE).unwrap();
    assert_eq!(v.kind(), VolumeKind::BlockDevice);
    let e = Volume::open(&dev.0, SIZE).unwrap_err();
    assert!(matches!(e, StoreError::Locked { .. }), "{e}");

    let data: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    v.write_at(&data, 0, true).unwrap();
    v.write_at(&data, SIZE - data.len() as u64, false).unwrap();
    v.flush().unwrap();
    let mut got = vec![0u8; data.len()];
    v.read_at(&mut got, 0).unwrap();
    assert!(got == data);

    v.trim(64 << 10, 64 << 10).unwrap();
    v.write_zeroes(192 << 10, 4096).unwrap();
    v.trim(1000, 24).unwrap(); // unaligned: falls back to writing zeroes
    v.flush().unwrap();
    let mut want = data.clone();
    want[64 << 10..128 << 10].fill(0);
    want[192 << 10..(192 << 10) + 4096].fill(0);
    want[1000..1024].fill(0);
    v.read_at(&mut got, 0).unwrap();
    assert!(got == want, "trimmed / zeroed ranges must read as zeroes");
    drop(v);

    // Everything reached the backing file.
    let back = std::fs::read(&backing).unwrap();
    assert!(back[..want.len()] == want[..]);
    assert!(back[SIZE as usize - data.len()..] == data[..]);
    assert!(back[want.len()..SIZE as usize - data.len()]
        .iter()
        .all(|&b| b == 0x5A));
}
