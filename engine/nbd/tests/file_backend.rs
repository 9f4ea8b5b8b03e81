//! FileBackend on its own: bytes land in the file, zeroes read as zeroes,
//! trim keeps the size.

use msl_nbd::{Backend, FileBackend};

#[test]
fn file_backend_round_trip_zero_and_trim() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.img");
    let be = FileBackend::create(&path, 1 << 20).unwrap();
    assert_eq!(be.size(), 1 << 20);
    let data: Vec<u8> = (0..65536u32).map(|i| (i * 7) as u8).collect();
    be.write(4096, &data, true).unwrap();
    let mut back = vec![0u8; data.len()];
    be.read(4096, &mut back).unwrap();
    assert_eq!(back, data);
    be.write_zeroes(8192, 4096, false).unwrap();
    be.trim(65536, 4096).unwrap();
    be.flush().unwrap();
    let f = std::fs::read(&path).unwrap();
    assert_eq!(f.len(), 1 << 20);
    assert_eq!(&f[4096..8192], &data[..4096]);
    assert!(f[8192..12288].iter().all(|&b| b == 0));
    assert_eq!(&f[12288..65536], &data[8192..61440]);
    assert!(be.can_multi_conn());
    // Reopen read-only: same size, writes refused by the OS.
    let ro = FileBackend::open(&path, true).unwrap();
    assert_eq!(ro.size(), 1 << 20);
    assert!(ro.write(0, b"x", false).is_err());
}
