//! MetaStore: round trips, A/B superblocks, corruption handling, identity
//! checks, the I/O error latch, and torn writes at every point of a commit.

mod common;

use std::cell::Cell;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::TempDir;
use msl_core::meta::Meta;
use msl_core::Config;
use msl_store::testkit::sample_meta;
use msl_store::{CreateOptions, MetaIo, MetaStore, StoreError};

const CLUSTER: u64 = 0x5eed_cafe_f00d_0001;
const BLOCKS: u64 = 100_000;
const BS: u32 = 4096;

fn base() -> Meta {
    Meta::create(CLUSTER, 1, BLOCKS, BS, None)
}

/// A store holding version `v` (after versions 0..v were written).
fn store_at(dir: &TempDir, v: u64) -> (PathBuf, MetaStore) {
    let path = dir.join("meta");
    let mut s =
        MetaStore::create(&path, &sample_meta(&base(), 0), &CreateOptions::default()).unwrap();
    for i in 1..=v {
        s.persist(&sample_meta(&base(), i)).unwrap();
    }
    (path, s)
}

fn reopen(path: &Path) -> Meta {
    MetaStore::open(path).unwrap().1
}

fn flip(path: &Path, off: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, off).unwrap();
    b[0] ^= 0x40;
    f.write_all_at(&b, off).unwrap();
    f.sync_all().unwrap();
}

fn slot_seq(path: &Path, off: u64) -> u64 {
    let f = File::open(path).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, off + 8).unwrap();
    u64::from_le_bytes(b)
}

fn slot_len(path: &Path, off: u64) -> u64 {
    let f = File::open(path).unwrap();
    let mut b = [0u8; 4];
    f.read_exact_at(&mut b, off + 32).unwrap();
    u64::from(u32::from_le_bytes(b))
}

#[test]
fn create_open_round_trip() {
    let dir = TempDir::new("rt");
    let path = dir.join("meta");
    let m = sample_meta(&base(), 7);
    let s = MetaStore::create(&path, &m, &CreateOptions::default()).unwrap();
    assert_eq!(s.seq(), 1);
    assert_eq!(s.next_slot(), 'B');
    let (a, _) = s.slot_region('A');
    assert_eq!(a, 4096);
    drop(s);
    let (s, got) = MetaStore::open(&path).unwrap();
    assert_eq!(got, m);
    assert_eq!(s.seq(), 1);
    // Layout: 4 KiB label, two 4 KiB-aligned superblocks, the activity-log
    // ring, then two copies of each bitmap page; no temp file left.
    let (b_off, size) = s.slot_region('B');
    assert_eq!(size % 4096, 0);
    assert_eq!(b_off, 4096 + size);
    let pages = BLOCKS.div_ceil(64 * 508);
    let ring = u64::from(msl_store::DEFAULT_RING_LEN) * 4096;
    assert_eq!(s.file_len(), 4096 + 2 * size + ring + 2 * pages * 4096);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), s.file_len());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn persist_alternates_slots_and_newest_wins() {
    let dir = TempDir::new("alt");
    let (path, mut s) = store_at(&dir, 0);
    let (a, _) = s.slot_region('A');
    let (b, _) = s.slot_region('B');
    for v in 1..=6u64 {
        let expect_slot = if v % 2 == 1 { 'B' } else { 'A' };
        assert_eq!(s.next_slot(), expect_slot);
        s.persist(&sample_meta(&base(), v)).unwrap();
        assert_eq!(s.seq(), v + 1);
        // The slot just written holds seq v+1, the other seq v.
        let (new, old) = if expect_slot == 'A' { (a, b) } else { (b, a) };
        assert_eq!(slot_seq(&path, new), v + 1);
        assert_eq!(slot_seq(&path, old), v);
    }
    drop(s);
    let (s, m) = MetaStore::open(&path).unwrap();
    assert_eq!(m, sample_meta(&base(), 6));
    assert_eq!(s.seq(), 7);
    // Seq 7 is in slot A, so the next write goes to B.
    assert_eq!(s.next_slot(), 'B');
}

/// Byte positions in a superblock: each header field, the body, and the
/// last payload byte (the core's own trailer CRC).
fn positions(path: &Path, off: u64) -> Vec<(&'static str, u64)> {
    let len = slot_len(path, off);
    vec![
        ("header magic", off),
        ("header seq", off + 9),
        ("header al_seq", off + 17),
        ("header extent size", off + 25),
        ("header len", off + 32),
        ("header slot index", off + 36),
        ("header crc", off + 45),
        ("body start", off + 48),
        ("body middle", off + 48 + len / 2),
        ("body trailer crc", off + 48 + len - 1),
    ]
}

#[test]
fn corrupt_newest_slot_falls_back_to_previous() {
    let dir = TempDir::new("cnew");
    // Versions 0..=3 as seqs 1..=4: seq 4 (v3) in slot B, seq 3 (v2) in A.
    let (path, s) = store_at(&dir, 3);
    let (b, _) = s.slot_region('B');
    drop(s);
    let pristine = std::fs::read(&path).unwrap();
    for (what, pos) in positions(&path, b) {
        std::fs::write(&path, &pristine).unwrap();
        flip(&path, pos);
        let (mut s, m) = MetaStore::open(&path).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(m.gens.current, 2, "{what}");
        assert!(m == sample_meta(&base(), 2), "{what}");
        assert_eq!(s.seq(), 3, "{what}");
        // The next persist overwrites the damaged slot, not the good one.
        assert_eq!(s.next_slot(), 'B', "{what}");
        s.persist(&sample_meta(&base(), 9)).unwrap();
        assert_eq!(s.seq(), 4, "{what}");
        drop(s);
        assert!(reopen(&path) == sample_meta(&base(), 9), "{what}");
    }
}

#[test]
fn corrupt_older_slot_keeps_newest() {
    let dir = TempDir::new("cold");
    let (path, s) = store_at(&dir, 3); // seq 4 (v3) in B, seq 3 (v2) in A
    let (a, _) = s.slot_region('A');
    drop(s);
    let pristine = std::fs::read(&path).unwrap();
    for (what, pos) in positions(&path, a) {
        std::fs::write(&path, &pristine).unwrap();
        flip(&path, pos);
        let (s, m) = MetaStore::open(&path).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(m.gens.current, 3, "{what}");
        assert!(m == sample_meta(&base(), 3), "{what}");
        assert_eq!(s.seq(), 4, "{what}");
        assert_eq!(s.next_slot(), 'A', "{what}");
    }
}

#[test]
fn both_slots_corrupt_is_a_clear_error() {
    let dir = TempDir::new("both");
    let (path, s) = store_at(&dir, 1);
    let (a, _) = s.slot_region('A');
    let (b, _) = s.slot_region('B');
    drop(s);
    flip(&path, a + 40);
    flip(&path, b + 26);
    let e = MetaStore::open(&path).unwrap_err();
    assert!(matches!(e, StoreError::BothSlotsBad { .. }), "{e}");
    let msg = e.to_string();
    for needle in [
        path.to_str().unwrap(),
        "both slots",
        "slot A: checksum mismatch",
        "slot B: checksum mismatch",
        "mslctl create-md --force",
        "full resync",
    ] {
        assert!(msg.contains(needle), "missing {needle:?} in: {msg}");
    }
}

#[test]
fn fresh_file_with_slot_a_destroyed_reports_never_written() {
    let dir = TempDir::new("fresh");
    let (path, s) = store_at(&dir, 0); // only slot A written
    let (a, _) = s.slot_region('A');
    drop(s);
    flip(&path, a + 100);
    let msg = MetaStore::open(&path).unwrap_err().to_string();
    assert!(msg.contains("slot B: never written"), "{msg}");
}

#[test]
fn valid_checksum_with_bad_content_is_not_silently_rolled_back() {
    // A slot whose CRC is right but whose metadata does not decode is a
    // format/software problem, not a torn write: refuse, don't fall back.
    let dir = TempDir::new("fatal");
    let (path, s) = store_at(&dir, 1); // seq 2 in B
    let (b, _) = s.slot_region('B');
    drop(s);
    let payload = b"MSLMFLD\0garbage-that-is-not-metadata";
    let mut slot = Vec::new();
    slot.extend_from_slice(b"MSLSUPB2");
    slot.extend_from_slice(&3u64.to_le_bytes()); // seq
    slot.extend_from_slice(&0u64.to_le_bytes()); // al_seq
    slot.extend_from_slice(&1024u64.to_le_bytes()); // extent size
    slot.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    slot.extend_from_slice(&1u32.to_le_bytes()); // slot B
    slot.extend_from_slice(&[0; 4]);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&slot), payload);
    slot.extend_from_slice(&crc.to_le_bytes());
    slot.extend_from_slice(payload);
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&slot, b).unwrap();
    drop(f);
    let e = MetaStore::open(&path).unwrap_err();
    assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains("passes its checksum"), "{e}");
}

#[test]
fn truncated_and_foreign_files() {
    let dir = TempDir::new("trunc");
    let (path, s) = store_at(&dir, 2);
    let (b, size) = s.slot_region('B');
    drop(s);
    let pristine = std::fs::read(&path).unwrap();
    let cut = |len: u64| {
        std::fs::write(&path, &pristine).unwrap();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len)
            .unwrap();
        MetaStore::open(&path).unwrap_err()
    };
    for len in [b + size / 2, b, 5000] {
        let e = cut(len);
        assert!(matches!(e, StoreError::Truncated { .. }), "{len}: {e}");
        let msg = e.to_string();
        assert!(msg.contains(&format!("is {len} bytes")), "{msg}");
        assert!(msg.contains(path.to_str().unwrap()), "{msg}");
    }
    assert!(matches!(cut(30), StoreError::Truncated { .. }));
    let e = cut(0);
    assert!(matches!(e, StoreError::NotMetadata { .. }), "{e}");
    assert!(e.to_string().contains("empty"), "{e}");

    // Wrong magic: some other file.
    std::fs::write(&path, vec![b'x'; 20_000]).unwrap();
    let e = MetaStore::open(&path).unwrap_err();
    assert!(matches!(e, StoreError::NotMetadata { .. }), "{e}");
    assert!(e.to_string().contains("bad label magic"), "{e}");

    // Label bit flip.
    std::fs::write(&path, &pristine).unwrap();
    flip(&path, 30);
    let e = MetaStore::open(&path).unwrap_err();
    assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains("label checksum mismatch"), "{e}");

    let e = MetaStore::open(&dir.join("missing")).unwrap_err();
    assert!(matches!(e, StoreError::Io { .. }), "{e}");
}

#[test]
fn identity_and_geometry_checked_against_config() {
    let dir = TempDir::new("cfg");
    let (path, s) = store_at(&dir, 1);
    drop(s);
    let ok = Config::new(1, 2, CLUSTER, BLOCKS, BS);
    drop(MetaStore::open_checked(&path, &ok).unwrap());
    let cases: [(&str, Config); 5] = [
        ("cluster_id", Config::new(1, 2, CLUSTER + 1, BLOCKS, BS)),
        ("node_id", Config::new(2, 1, CLUSTER, BLOCKS, BS)),
        ("volume_blocks", Config::new(1, 2, CLUSTER, BLOCKS * 2, BS)),
        ("block_size", Config::new(1, 2, CLUSTER, BLOCKS, 512)),
        ("al_extents", {
            let mut c = Config::new(1, 2, CLUSTER, BLOCKS, BS);
            c.al_extents = 1_000_000;
            c
        }),
    ];
    for (key, cfg) in cases {
        let e = MetaStore::open_checked(&path, &cfg).unwrap_err();
        assert!(matches!(e, StoreError::Mismatch { .. }), "{key}: {e}");
        let msg = e.to_string();
        assert!(msg.contains(key), "{key}: {msg}");
        assert!(msg.contains(path.to_str().unwrap()), "{msg}");
    }
    let msg = MetaStore::open_checked(&path, &cases_cluster())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("cluster_id is 0x5eedcafef00d0001 on disk but 0x5eedcafef00d0002"),
        "{msg}"
    );
}

fn cases_cluster() -> Config {
    Config::new(1, 2, CLUSTER + 1, BLOCKS, BS)
}

#[test]
fn persist_refuses_foreign_or_oversized_meta_without_latching() {
    let dir = TempDir::new("refuse");
    let path = dir.join("meta");
    let opts = CreateOptions {
        al_capacity: 8,
        ..CreateOptions::default()
    };
    let mut s = MetaStore::create(&path, &base(), &opts).unwrap();
    let mut other = base();
    other.cluster_id ^= 1;
    let e = s.persist(&other).unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::Mismatch {
                key: "cluster_id",
                ..
            }
        ),
        "{e}"
    );
    let mut big = base();
    big.al = (0..10_000).collect();
    let e = s.persist(&big).unwrap_err();
    assert!(matches!(e, StoreError::TooLarge { .. }), "{e}");
    assert!(!s.is_failed());
    s.persist(&sample_meta(&base(), 1)).unwrap();
    drop(s);
    assert_eq!(reopen(&path), sample_meta(&base(), 1));
}

#[test]
fn create_refuses_existing_unless_forced_and_lock_excludes() {
    let dir = TempDir::new("exists");
    let (path, s) = store_at(&dir, 2);
    let e = MetaStore::create(&path, &base(), &CreateOptions::default()).unwrap_err();
    assert!(matches!(e, StoreError::Exists { .. }), "{e}");
    assert!(e.to_string().contains("--force"), "{e}");
    // Open twice: the second sees the lock.
    let e = MetaStore::open(&path).unwrap_err();
    assert!(matches!(e, StoreError::Locked { .. }), "{e}");
    // Forced create while in use is refused too.
    let force = CreateOptions {
        force: true,
        ..CreateOptions::default()
    };
    let e = MetaStore::create(&path, &base(), &force).unwrap_err();
    assert!(matches!(e, StoreError::Locked { .. }), "{e}");
    drop(s);
    let s = MetaStore::create(&path, &sample_meta(&base(), 42), &force).unwrap();
    assert_eq!(s.seq(), 1);
    drop(s);
    assert_eq!(reopen(&path), sample_meta(&base(), 42));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

/// A metadata file whose writes or syncs fail on demand.
struct Faulty {
    file: File,
    /// Tear write number `k` (counting from 0) after `n` bytes: `(k, n)`.
    /// Earlier writes land whole.
    tear_at: Cell<Option<(usize, usize)>>,
    writes: Cell<usize>,
    /// Length of each write so far.
    lens: std::cell::RefCell<Vec<usize>>,
    fail_write: Cell<bool>,
    fail_sync: Cell<bool>,
}

impl MetaIo for Faulty {
    fn pread_exact(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn pwrite_all(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let k = self.writes.get();
        self.writes.set(k + 1);
        self.lens.borrow_mut().push(buf.len());
        if let Some((at, n)) = self.tear_at.get() {
            if k == at {
                self.file.write_all_at(&buf[..n.min(buf.len())], offset)?;
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
        }
        if self.fail_write.get() {
            // A torn write: half the bytes land, then EIO.
            self.file.write_all_at(&buf[..buf.len() / 2], offset)?;
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.file.write_all_at(buf, offset)
    }
    fn fdatasync(&self) -> io::Result<()> {
        if self.fail_sync.get() {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.file.sync_data()
    }
    fn file_len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
}

fn faulty(path: &Path) -> (MetaStore<Faulty>, Meta) {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let io = Faulty {
        file,
        tear_at: Cell::new(None),
        writes: Cell::new(0),
        lens: Default::default(),
        fail_write: Cell::new(false),
        fail_sync: Cell::new(false),
    };
    MetaStore::open_io(io, path).unwrap()
}

fn assert_latched<D: MetaIo>(s: &mut MetaStore<D>, v: u64) {
    assert!(s.is_failed());
    for _ in 0..3 {
        let e = s.persist(&sample_meta(&base(), v)).unwrap_err();
        assert!(matches!(e, StoreError::PreviousIo { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("earlier error") && msg.contains("fail closed"),
            "{msg}"
        );
    }
}

#[test]
fn failed_sync_latches_previous_io() {
    let dir = TempDir::new("latch-sync");
    let (path, s) = store_at(&dir, 2);
    drop(s);
    let (mut s, _) = faulty(&path);
    s.persist(&sample_meta(&base(), 3)).unwrap();
    s.io_fail_sync();
    let e = s.persist(&sample_meta(&base(), 4)).unwrap_err();
    assert!(matches!(e, StoreError::Io { .. }), "{e}");
    assert!(e.to_string().contains("fdatasync"), "{e}");
    assert!(e.to_string().contains("Input/output error"), "{e}");
    assert_latched(&mut s, 5);
    drop(s);
    // The write reached the page cache; either version is acceptable, the
    // acknowledged one (3) must not be lost.
    let got = reopen(&path).gens.current;
    assert!(got == 3 || got == 4, "{got}");
}

#[test]
fn failed_torn_write_latches_and_keeps_previous() {
    let dir = TempDir::new("latch-write");
    let (path, s) = store_at(&dir, 2);
    drop(s);
    let (mut s, _) = faulty(&path);
    s.io_fail_write();
    let e = s.persist(&sample_meta(&base(), 3)).unwrap_err();
    assert!(matches!(e, StoreError::Io { .. }), "{e}");
    assert!(e.to_string().contains("write bitmap page"), "{e}");
    assert_latched(&mut s, 4);
    drop(s);
    assert_eq!(reopen(&path), sample_meta(&base(), 2));
}

#[test]
fn real_io_error_latches() {
    // EBADF from the kernel: the file opened read-only.
    let dir = TempDir::new("latch-ro");
    let (path, s) = store_at(&dir, 1);
    drop(s);
    let (mut s, _) = MetaStore::open_io(File::open(&path).unwrap(), &path).unwrap();
    let e = s.persist(&sample_meta(&base(), 2)).unwrap_err();
    assert!(matches!(e, StoreError::Io { .. }), "{e}");
    assert_latched(&mut s, 3);
    drop(s);
    assert_eq!(reopen(&path), sample_meta(&base(), 1));
}

trait FaultCtl {
    fn io_fail_sync(&mut self);
    fn io_fail_write(&mut self);
}

impl FaultCtl for MetaStore<Faulty> {
    fn io_fail_sync(&mut self) {
        self.io().fail_sync.set(true);
    }
    fn io_fail_write(&mut self) {
        self.io().fail_write.set(true);
    }
}

#[test]
fn torn_write_at_every_point_of_a_commit_keeps_previous_version() {
    // A crash during a commit leaves every earlier write of it whole and
    // any prefix of the current one: for every write of the commit (the
    // changed bitmap pages, then the superblock), and every 512-byte
    // boundary (and a few odd lengths) inside it, the previous version
    // must load, and the next persist must succeed.
    let dir = TempDir::new("torn");
    let (path, s) = store_at(&dir, 4);
    drop(s);
    let pristine = std::fs::read(&path).unwrap();
    let new = sample_meta(&base(), 5);
    // How many writes the commit does: run it once.
    let (mut s, _) = faulty(&path);
    s.persist(&new).unwrap();
    let lens = s.io().lens.borrow().clone();
    let writes = lens.len();
    assert!(writes >= 2, "pages and the superblock: {writes}");
    drop(s);
    let mut cuts: Vec<usize> = (0..4096).step_by(512).collect();
    cuts.extend([1, 7, 31, 33, 47, 49, 2051, 4095]);
    for (k, &len) in lens.iter().enumerate() {
        // A cut at or past the write's end is no tear.
        for &n in cuts.iter().filter(|&&n| n < len) {
            std::fs::write(&path, &pristine).unwrap();
            let (mut s, _) = faulty(&path);
            s.io().tear_at.set(Some((k, n)));
            assert!(s.persist(&new).is_err());
            assert!(s.is_failed());
            drop(s);
            let (mut s, m) =
                MetaStore::open(&path).unwrap_or_else(|e| panic!("write {k} cut {n}: {e}"));
            assert!(
                m == sample_meta(&base(), 4),
                "write {k} cut {n}: loaded {}",
                m.gens.current
            );
            // Only the superblock write (the last) can leave B torn.
            if k + 1 == writes && n > 8 {
                let (slot, why) = s.rejected_slot().expect("torn superblock reported");
                assert_eq!(slot, 'B', "write {k} cut {n}"); // v4 is seq 5 in A
                assert!(
                    why.contains("checksum mismatch") || why.contains("bad superblock magic"),
                    "write {k} cut {n}: {why}"
                );
            }
            s.persist(&new).unwrap();
            drop(s);
            assert!(reopen(&path) == new, "write {k} cut {n}");
        }
    }
}

/// The start epoch: 0 at create (the same bytes as files written before
/// it was kept), raised by one per `next_epoch`, carried by every later
/// transaction and commit, and there after a reopen.
#[test]
fn start_epoch_is_raised_durably_and_survives_reopen_and_persists() {
    let dir = TempDir::new("epoch");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let (path, s) = store_at(&dir, 3);
    let (a, _) = s.slot_region('A');
    drop(s);
    let f = File::open(&path).unwrap();
    let mut raw = [0u8; 4];
    f.read_exact_at(&mut raw, a + 40).unwrap();
    let e0 = u64::from(u32::from_le_bytes(raw));
    assert!(
        (now..now + 60).contains(&e0),
        "a new file starts at the wall clock's seconds ({now}), not {e0}: \
         recreated metadata must start above the old file's epochs"
    );
    let (mut s, m) = MetaStore::open(&path).unwrap();
    assert_eq!(s.epoch(), e0);
    assert_eq!(s.next_epoch(&m).unwrap(), e0 + 1);
    assert_eq!(s.epoch(), e0 + 1);
    drop(s);
    let (mut s, m) = MetaStore::open(&path).unwrap();
    assert_eq!(s.epoch(), e0 + 1);
    // Raising the epoch changes nothing else.
    assert!(m == sample_meta(&base(), 3));
    assert_eq!(s.next_epoch(&m).unwrap(), e0 + 2);
    // Later commits and transactions carry it on.
    for v in 4..12 {
        s.persist(&sample_meta(&base(), v)).unwrap();
    }
    assert!(s.stats().commits >= 2, "{:?}", s.stats());
    drop(s);
    let (s, m) = MetaStore::open(&path).unwrap();
    assert_eq!(s.epoch(), e0 + 2);
    assert!(m == sample_meta(&base(), 11));
}

/// A torn write never loses a raised epoch: tearing any write of a later
/// commit (pages or superblock) at every 512-byte step leaves the epoch
/// the last `next_epoch` returned; tearing the raise itself fails it, and
/// the next raise returns a higher epoch than any returned before.
#[test]
fn torn_superblock_never_loses_or_reuses_a_start_epoch() {
    let dir = TempDir::new("epoch-torn");
    let (path, s) = store_at(&dir, 4);
    drop(s);
    let (mut s, m) = MetaStore::open(&path).unwrap();
    let e1 = s.epoch() + 1;
    assert_eq!(s.next_epoch(&m).unwrap(), e1);
    drop(s);
    let pristine = std::fs::read(&path).unwrap();
    let new = sample_meta(&base(), 5);
    let mut cuts: Vec<usize> = (0..4096).step_by(512).collect();
    cuts.extend([1, 41, 43, 45, 4095]);
    // A later commit, torn at every write and cut.
    let (mut s, _) = faulty(&path);
    s.persist(&new).unwrap();
    assert_eq!(s.stats().commits, 1, "version 5 needs a commit");
    let lens = s.io().lens.borrow().clone();
    drop(s);
    for (k, &len) in lens.iter().enumerate() {
        for &n in cuts.iter().filter(|&&n| n < len) {
            std::fs::write(&path, &pristine).unwrap();
            let (mut s, _) = faulty(&path);
            s.io().tear_at.set(Some((k, n)));
            assert!(s.persist(&new).is_err());
            drop(s);
            let (s, _) = MetaStore::open(&path).unwrap();
            assert_eq!(s.epoch(), e1, "commit write {k} cut {n}");
        }
    }
    // The raise itself, torn at every write and cut (or written whole
    // and then failing): it returns an error, and whatever the file holds
    // the next raise is above e1, the only epoch returned so far.
    std::fs::write(&path, &pristine).unwrap();
    let (mut s, m) = faulty(&path);
    assert_eq!(s.next_epoch(&m).unwrap(), e1 + 1);
    let lens = s.io().lens.borrow().clone();
    drop(s);
    for (k, &len) in lens.iter().enumerate() {
        for &n in cuts.iter().filter(|&&n| n < len).chain([&len]) {
            std::fs::write(&path, &pristine).unwrap();
            let (mut s, m) = faulty(&path);
            s.io().tear_at.set(Some((k, n)));
            assert!(s.next_epoch(&m).is_err(), "raise write {k} cut {n}");
            assert_eq!(s.epoch(), e1, "a failed raise keeps the old epoch");
            drop(s);
            let (mut s, m) = MetaStore::open(&path).unwrap();
            let held = s.epoch();
            assert!(
                held == e1 || (held == e1 + 1 && n == len),
                "write {k} cut {n}: {held}"
            );
            let next = s.next_epoch(&m).unwrap();
            assert!(next > e1, "raise write {k} cut {n}: epoch {next} again");
        }
    }
}
