//! Volume: read/write/FUA/flush/trim/zeroes round trips on a temp file.

mod common;

use std::os::unix::fs::MetadataExt;

use common::TempDir;
use msl_store::{StoreError, Volume, VolumeKind, VolumeOptions};

const SIZE: u64 = 8 << 20;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

fn read(v: &Volume, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0xAAu8; len];
    v.read_at(&mut b, off).unwrap();
    b
}

#[test]
fn create_and_size() {
    let dir = TempDir::new("vol-size");
    let path = dir.join("vol");
    let v = Volume::open(&path, SIZE).unwrap();
    assert_eq!(v.kind(), VolumeKind::File);
    assert_eq!(v.size(), SIZE);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), SIZE);
    assert_eq!(read(&v, SIZE - 4096, 4096), vec![0; 4096]);
    // Locked while open.
    let e = Volume::open(&path, SIZE).unwrap_err();
    assert!(matches!(e, StoreError::Locked { .. }), "{e}");
    drop(v);
    // A longer existing file is used up to the configured size; a shorter
    // one is extended.
    let v = Volume::open(&path, SIZE / 2).unwrap();
    assert_eq!(v.size(), SIZE / 2);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), SIZE);
    drop(v);
    let v = Volume::open(&path, SIZE * 2).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), SIZE * 2);
    drop(v);
    // Not a file or block device.
    let e = Volume::open(std::path::Path::new("/dev/null"), SIZE).unwrap_err();
    assert!(matches!(e, StoreError::NotFileOrDevice { .. }), "{e}");
    let e = Volume::open(dir.path(), SIZE).unwrap_err();
    assert!(matches!(e, StoreError::NotFileOrDevice { .. }), "{e}");
}

#[test]
fn write_read_fua_flush_round_trip() {
    let dir = TempDir::new("vol-rw");
    let path = dir.join("vol");
    let v = Volume::open(&path, SIZE).unwrap();
    let a = pattern(64 << 10, 1);
    let b = pattern(4096, 2);
    let c = pattern(1000, 3); // unaligned
    v.write_at(&a, 0, false).unwrap();
    v.write_at(&b, 1 << 20, true).unwrap();
    v.write_at(&c, SIZE - 1000, true).unwrap();
    v.flush().unwrap();
    assert_eq!(read(&v, 0, a.len()), a);
    assert_eq!(read(&v, 1 << 20, b.len()), b);
    assert_eq!(read(&v, SIZE - 1000, c.len()), c);
    // Overwrite part of `a` with FUA, then reopen: everything persisted.
    v.write_at(&b, 8192, true).unwrap();
    drop(v);
    let v = Volume::open(&path, SIZE).unwrap();
    let mut want = a.clone();
    want[8192..8192 + 4096].copy_from_slice(&b);
    assert_eq!(read(&v, 0, want.len()), want);
    assert_eq!(read(&v, SIZE - 1000, c.len()), c);
    // read_vec returns the same bytes as read_at, whole and unaligned.
    assert_eq!(v.read_vec(0, want.len()).unwrap(), want);
    assert_eq!(v.read_vec(SIZE - 1000, 1000).unwrap(), c);
    assert_eq!(v.read_vec(8192, 0).unwrap(), Vec::<u8>::new());
    assert!(!v.is_failed());
}

#[test]
fn trim_and_write_zeroes_read_back_zero() {
    let dir = TempDir::new("vol-trim");
    let path = dir.join("vol");
    let v = Volume::open(&path, SIZE).unwrap();
    let data = pattern(2 << 20, 7);
    v.write_at(&data, 0, false).unwrap();
    v.flush().unwrap();
    let blocks_before = std::fs::metadata(&path).unwrap().blocks();

    // Aligned trim of 1 MiB, plus an unaligned one.
    v.trim(512 << 10, 1 << 20).unwrap();
    v.trim(100, 300).unwrap();
    v.flush().unwrap();
    let got = read(&v, 0, data.len());
    let mut want = data.clone();
    want[512 << 10..(512 << 10) + (1 << 20)].fill(0);
    want[100..400].fill(0);
    assert!(
        got == want,
        "trimmed ranges must read as zeroes, the rest intact"
    );
    let blocks_after = std::fs::metadata(&path).unwrap().blocks();
    eprintln!("trim: st_blocks {blocks_before} -> {blocks_after}");

    // write_zeroes: aligned and unaligned.
    v.write_zeroes(0, 64 << 10).unwrap();
    v.write_zeroes((1600 << 10) + 3, 5000).unwrap();
    v.flush().unwrap();
    want[..64 << 10].fill(0);
    want[(1600 << 10) + 3..(1600 << 10) + 3 + 5000].fill(0);
    assert!(read(&v, 0, data.len()) == want);
    // Zero-length operations are fine.
    v.trim(0, 0).unwrap();
    v.write_zeroes(SIZE, 0).unwrap();
    // File size unchanged (KEEP_SIZE).
    assert_eq!(std::fs::metadata(&path).unwrap().len(), SIZE);
}

#[test]
fn out_of_range_is_refused_without_latching() {
    let dir = TempDir::new("vol-range");
    let v = Volume::open(&dir.join("vol"), SIZE).unwrap();
    let mut buf = [0u8; 512];
    for e in [
        v.read_at(&mut buf, SIZE - 100).unwrap_err(),
        v.read_vec(SIZE - 100, 512).unwrap_err(),
        v.write_at(&buf, SIZE, false).unwrap_err(),
        v.write_at(&buf, u64::MAX - 10, true).unwrap_err(),
        v.trim(SIZE - 10, 11).unwrap_err(),
        v.write_zeroes(u64::MAX, 2).unwrap_err(),
    ] {
        assert!(matches!(e, StoreError::OutOfRange { .. }), "{e}");
        assert!(e.to_string().contains("past the end"), "{e}");
    }
    assert!(!v.is_failed());
    v.write_at(&buf, SIZE - 512, false).unwrap();
}

#[test]
fn thin_volume_of_a_tebibyte_and_its_data_ranges() {
    let dir = TempDir::new("vol-thin");
    let path = dir.join("vol");
    let tib = 1u64 << 40;
    let thin = VolumeOptions { preallocate: false };
    let v = Volume::open_with(&path, tib, &thin).unwrap();
    assert_eq!(v.size(), tib);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), tib);
    assert!(
        v.allocated_bytes().unwrap() < 1 << 20,
        "thin: nothing allocated"
    );
    assert_eq!(v.next_data(0).unwrap(), None, "all holes");
    assert!(v.is_hole(0, tib).unwrap());
    // Two written ranges far apart.
    let (a, b) = (tib / 2 + 8192, tib - 3 * 4096);
    v.write_at(&pattern(4096, 1), a, false).unwrap();
    v.write_at(&pattern(8192, 2), b, false).unwrap();
    v.flush().unwrap();
    let (s, e) = v.next_data(0).unwrap().unwrap();
    assert!(s <= a && e >= a + 4096 && e < b, "{s}..{e}");
    let (s2, e2) = v.next_data(e).unwrap().unwrap();
    assert!(s2 <= b && e2 >= b + 8192 && e2 <= tib, "{s2}..{e2}");
    assert_eq!(v.next_data(e2).unwrap(), None);
    assert!(v.is_hole(0, a - 4096).unwrap());
    assert!(!v.is_hole(0, a + 1).unwrap());
    assert_eq!(read(&v, a, 4096), pattern(4096, 1));
    assert_eq!(read(&v, a - 4096, 4096), vec![0; 4096]);
    // A trimmed range becomes a hole again.
    v.trim(a, 4096).unwrap();
    let (s3, _) = v.next_data(0).unwrap().unwrap();
    assert!(s3 > a, "{s3}");
    assert!(v.allocated_bytes().unwrap() < 1 << 20);
    drop(v);
    // Preallocated (the default) allocates the whole file.
    let path = dir.join("full");
    let v = Volume::open(&path, SIZE).unwrap();
    assert!(v.allocated_bytes().unwrap() >= SIZE);
}

/// A resync source asks where its holes end (`hole_blocks`), and a target
/// zeroes a range the way the volume is kept (`zero_range`): a hole in a
/// thin file (no space used, even for a terabyte), zeroes kept allocated
/// in a preallocated one.
#[test]
fn hole_blocks_and_zero_range_follow_the_volume() {
    let dir = TempDir::new("vol-holes");
    let tib = 1u64 << 40;
    let thin = VolumeOptions { preallocate: false };
    let v = Volume::open_with(&dir.join("thin"), tib, &thin).unwrap();
    let a = tib / 2;
    v.write_at(&pattern(4096, 3), a, false).unwrap();
    v.flush().unwrap();
    // From 0: a hole up to the data (file-system granularity), counted in
    // 4 KiB blocks; a range reaching the data is not a hole.
    let n = v.hole_blocks(0, 65536, 4096).unwrap().unwrap();
    assert!(n * 4096 <= a && n * 4096 > a - (1 << 20), "{n}");
    assert_eq!(v.hole_blocks(a - 4096, 8192, 4096).unwrap(), None);
    assert_eq!(v.hole_blocks(a, 4096, 4096).unwrap(), None);
    // After the data: a hole to the end of the volume.
    let from = a + (1 << 20);
    assert_eq!(
        v.hole_blocks(from, 4096, 4096).unwrap(),
        Some((tib - from) / 4096)
    );
    // Zeroing the whole terabyte of a thin file punches it: the data
    // reads as zeroes and nothing is allocated.
    v.zero_range(0, tib).unwrap();
    assert_eq!(read(&v, a, 4096), vec![0; 4096]);
    assert_eq!(v.next_data(0).unwrap(), None);
    assert!(v.allocated_bytes().unwrap() < 1 << 20);
    drop(v);
    // A preallocated file keeps its blocks when zeroed.
    let v = Volume::open(&dir.join("full"), SIZE).unwrap();
    v.write_at(&pattern(4096, 4), 0, false).unwrap();
    v.zero_range(0, SIZE).unwrap();
    assert_eq!(read(&v, 0, 4096), vec![0; 4096]);
    assert!(v.allocated_bytes().unwrap() >= SIZE);
}
