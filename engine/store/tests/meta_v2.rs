//! Format-2 metadata: what a persist costs (independent of the volume
//! size), what survives a crash at any point of a persist, torn
//! activity-log transactions, and format-1 detection and conversion.

mod common;

use std::cell::Cell;
use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use common::TempDir;
use msl_core::bitmap::PAGE_BITS;
use msl_core::meta::Meta;
use msl_store::testkit::{stats_delta, stats_sum, Rng};
use msl_store::{convert_v1_to_v2, CreateOptions, MetaIo, MetaStats, MetaStore, StoreError};
use msl_wire::DiskState;

const CLUSTER: u64 = 0x5eed_cafe_f00d_0002;
const EXTENT: u64 = 1024;
const GIB_BLOCKS: u64 = 1 << 18;
const TIB_BLOCKS: u64 = 1 << 28;

/// A running node's metadata (not clean), durably created.
fn running(dir: &TempDir, blocks: u64) -> (std::path::PathBuf, MetaStore, Meta) {
    running_with(dir, blocks, &CreateOptions::default())
}

fn running_with(
    dir: &TempDir,
    blocks: u64,
    opts: &CreateOptions,
) -> (std::path::PathBuf, MetaStore, Meta) {
    let path = dir.join("meta");
    let mut m = Meta::create(CLUSTER, 1, blocks, 4096, Some(7));
    m.clean = false;
    let s = MetaStore::create(&path, &m, opts).unwrap();
    (path, s, m)
}

/// `a` and `b` agree wherever a crashed node's restart cannot tell them
/// apart: the same state, the same activity log (as a set), and the same
/// bits outside the log's extents (a node that starts after a crash marks
/// those extents dirty; with `clean`, every bit must agree).
fn same_after_restart(a: &Meta, b: &Meta) -> Result<(), String> {
    if (a.gens, a.disk, a.role, a.clean) != (b.gens, b.disk, b.role, b.clean) {
        return Err(format!(
            "state differs: {:?} vs {:?}",
            (a.gens.current, a.disk, a.role, a.clean),
            (b.gens.current, b.disk, b.role, b.clean)
        ));
    }
    let (la, lb): (BTreeSet<u64>, BTreeSet<u64>) = (
        a.al.iter().copied().collect(),
        b.al.iter().copied().collect(),
    );
    if la != lb {
        return Err(format!("activity log differs: {la:?} vs {lb:?}"));
    }
    let (mut x, mut y) = (a.dirty.clone(), b.dirty.clone());
    if !a.clean {
        for e in &la {
            x.set_range(e * EXTENT, EXTENT);
            y.set_range(e * EXTENT, EXTENT);
        }
    }
    if x != y {
        let first = (0..a.volume_blocks).find(|&i| x.get(i) != y.get(i));
        return Err(format!(
            "bits differ outside the log, first at block {first:?}"
        ));
    }
    Ok(())
}

/// A degraded primary's pattern: each write goes to a random extent; a
/// new extent enters the log (evicting the oldest when full) and is
/// persisted before its write; the write's bits are set after.
fn hot_extents(s: &mut MetaStore, m: &mut Meta, rng: &mut Rng, writes: usize, al_max: usize) {
    let extents = m.volume_blocks / EXTENT;
    for _ in 0..writes {
        let e = rng.below(extents);
        if !m.al.contains(&e) {
            if m.al.len() == al_max {
                m.al.remove(0);
            }
            m.al.push(e);
            s.persist(&m.clone()).unwrap();
        }
        m.dirty.set(e * EXTENT + rng.below(EXTENT));
    }
}

/// Persist costs of the hot-extent pattern and of a commit on a volume of
/// `blocks`.
fn costs(blocks: u64) -> (MetaStats, MetaStats) {
    let dir = TempDir::new("cost");
    let (path, mut s, mut m) = running(&dir, blocks);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    // Fill the log first, then measure the steady state (evictions).
    hot_extents(&mut s, &mut m, &mut rng, 61, 61);
    let before = s.stats();
    hot_extents(&mut s, &mut m, &mut rng, 300, 61);
    let hot = stats_delta(before, s.stats());
    // A commit: a new generation and bits set in three pages far apart.
    let before = s.stats();
    m.gens.current += 1;
    m.disk = DiskState::Outdated;
    for k in 0..3 {
        m.dirty.set(blocks / 3 * k + 5);
    }
    s.persist(&m.clone()).unwrap();
    let commit = stats_delta(before, s.stats());
    drop(s);
    let (_, got) = MetaStore::open(&path).unwrap();
    same_after_restart(&got, &m).unwrap();
    (hot, commit)
}

#[test]
fn hot_extent_costs_one_small_write_whatever_the_volume_size() {
    let (gib_hot, gib_commit) = costs(GIB_BLOCKS);
    let (tib_hot, tib_commit) = costs(TIB_BLOCKS);
    eprintln!("1 GiB: {gib_hot:?} {gib_commit:?}\n1 TiB: {tib_hot:?} {tib_commit:?}");
    for hot in [gib_hot, tib_hot] {
        assert!(hot.persists > 0);
        // Every new hot extent: one 4 KiB transaction and one fdatasync.
        assert_eq!(hot.transactions, hot.persists, "{hot:?}");
        assert_eq!(hot.bytes_written, 4096 * hot.persists, "{hot:?}");
        assert_eq!(hot.syncs, hot.persists, "{hot:?}");
        assert_eq!((hot.commits, hot.pages_written), (0, 0), "{hot:?}");
    }
    // A commit writes the pages that changed: the three new bits, the
    // pages the log's bits sit in, and the pages whose bits transactions
    // carried since the last commit; not the map.
    for (c, hot) in [(gib_commit, gib_hot), (tib_commit, tib_hot)] {
        assert_eq!(c.commits, 1);
        let bound = 3 + 61 + hot.transactions;
        assert!(c.pages_written >= 3 && c.pages_written <= bound, "{c:?}");
        assert!(c.bytes_written <= (c.pages_written + 1) * 4096, "{c:?}");
        assert_eq!(c.syncs, 2, "{c:?}");
    }
    let map_bytes = TIB_BLOCKS / 8;
    assert!(
        tib_commit.bytes_written * 10 < map_bytes,
        "{tib_commit:?} vs a {map_bytes}-byte map"
    );
    // Independent of the volume size (same random pattern on both).
    assert_eq!(gib_hot.bytes_written / gib_hot.persists, 4096);
    assert_eq!(tib_hot.bytes_written / tib_hot.persists, 4096);
}

/// A metadata file whose `k`-th write (from 0) is torn after `n` bytes.
struct Tearing {
    file: File,
    tear: Option<(usize, usize)>,
    writes: Cell<usize>,
    reads: Cell<usize>,
}

impl MetaIo for Tearing {
    fn pread_exact(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.reads.set(self.reads.get() + 1);
        self.file.read_exact_at(buf, offset)
    }
    fn pwrite_all(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let k = self.writes.get();
        self.writes.set(k + 1);
        match self.tear {
            Some((at, n)) if at == k => {
                self.file.write_all_at(&buf[..n.min(buf.len())], offset)?;
                Err(io::Error::from_raw_os_error(libc::EIO))
            }
            _ => self.file.write_all_at(buf, offset),
        }
    }
    fn fdatasync(&self) -> io::Result<()> {
        Ok(())
    }
    fn file_len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        self.file.next_data(offset)
    }
}

fn open_tearing(path: &Path, tear: Option<(usize, usize)>) -> (MetaStore<Tearing>, Meta) {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let io = Tearing {
        file,
        tear,
        writes: Cell::new(0),
        reads: Cell::new(0),
    };
    MetaStore::open_io(io, path).unwrap()
}

/// Persist `next` over a copy of `path` at `crash` with write `tear.0`
/// torn after `tear.1` bytes: the copy must then hold `acked` or `next`,
/// and `next` if the persist reported success.
fn crash_copy(
    path: &Path,
    crash: &Path,
    tear: (usize, usize),
    acked: &Meta,
    next: &Meta,
    what: &str,
) {
    std::fs::copy(path, crash).unwrap();
    let (mut c, from_copy) = open_tearing(crash, Some(tear));
    same_after_restart(&from_copy, acked).unwrap_or_else(|e| panic!("{what}: {e}"));
    let res = c.persist(next);
    drop(c);
    let (_, got) = open_tearing(crash, None);
    let old = same_after_restart(&got, acked);
    let new = same_after_restart(&got, next);
    assert!(
        old.is_ok() || new.is_ok(),
        "{what}, tear {tear:?} ({res:?}): neither version: {old:?} / {new:?}"
    );
    if res.is_ok() {
        new.unwrap_or_else(|e| panic!("{what}: acknowledged but lost: {e}"));
    }
}

#[test]
fn crash_at_any_point_of_any_persist_recovers_the_previous_or_the_new_version() {
    // Random persists of every kind (new hot extents with evictions, bits
    // set in and outside the log, resync clearing bits, state changes, a
    // clean stop and restart); after each, a copy of the file as a crash
    // would leave it at a random point of the next persist.
    let dir = TempDir::new("model");
    let blocks = 300_000; // 10 pages, 293 extents
                          // A short ring: wraps (forced commits) happen, and the copies are small.
    let opts = CreateOptions {
        ring_len: 16,
        ..CreateOptions::default()
    };
    let (path, mut s, mut m) = running_with(&dir, blocks, &opts);
    let mut total = MetaStats::default();
    let crash = dir.join("crash");
    let mut rng = Rng(42);
    let mut acked = m.clone();
    for step in 0..400 {
        let mut next = m.clone();
        match rng.below(12) {
            0..=3 => {
                // A new hot extent (bits follow).
                let e = rng.below(blocks / EXTENT);
                if !next.al.contains(&e) {
                    if next.al.len() >= 12 {
                        let i = rng.below(next.al.len() as u64) as usize;
                        next.al.remove(i);
                    }
                    next.al.push(e);
                }
            }
            4..=5 => {
                // Writes into hot extents.
                for _ in 0..5 {
                    if let Some(&e) = next.al.get(rng.below(next.al.len().max(1) as u64) as usize) {
                        next.dirty.set(e * EXTENT + rng.below(EXTENT));
                    }
                }
            }
            6 => {
                // Out-of-sync marks anywhere (e.g. a merged peer map).
                let b = rng.below(blocks);
                next.dirty.set_range(b, rng.below(5000));
            }
            7 => {
                // Resync progress: bits cleared anywhere.
                for _ in 0..50 {
                    if let Some(b) = next.dirty.next_set(rng.below(blocks)) {
                        next.dirty.clear(b);
                    }
                }
            }
            10 => {
                // A full-sync mark over whole pages (they go as a run).
                let b = rng.below(blocks);
                next.dirty.set_range(b, rng.below(3 * PAGE_BITS));
            }
            11 => {
                // A resync clearing whole pages.
                let b = rng.below(blocks);
                next.dirty.clear_range(b, rng.below(3 * PAGE_BITS));
            }
            8 => {
                next.gens.current += 1;
                next.disk = if next.disk == DiskState::UpToDate {
                    DiskState::Outdated
                } else {
                    DiskState::UpToDate
                };
            }
            _ => {
                // A clean stop (the log merged into the map), then a start.
                for e in std::mem::take(&mut next.al) {
                    next.dirty.set_range(e * EXTENT, EXTENT);
                }
                next.clean = true;
                s.persist(&next).unwrap();
                total = stats_sum(total, s.stats());
                drop(s);
                let (s2, loaded) = MetaStore::open(&path).unwrap();
                assert_eq!(loaded, next, "step {step}: a clean stop is exact");
                s = s2;
                acked = next.clone();
                next.clean = false;
            }
        }
        // The crash copy: tear a random write of this persist.
        let tear = (rng.below(4) as usize, rng.below(4200) as usize);
        crash_copy(&path, &crash, tear, &acked, &next, &format!("step {step}"));
        // The real persist.
        s.persist(&next.clone()).unwrap();
        m = next;
        acked = m.clone();
    }
    let st = stats_sum(total, s.stats());
    eprintln!("{st:?}");
    assert!(
        st.transactions > 50 && st.commits > 50 && st.skipped > 10,
        "{st:?}"
    );
    drop(s);
    let (_, got) = MetaStore::open(&path).unwrap();
    same_after_restart(&got, &m).unwrap();
}

#[test]
fn torn_transaction_at_every_offset_keeps_the_previous_log() {
    let dir = TempDir::new("torn-tx");
    let (path, mut s, mut m) = running(&dir, GIB_BLOCKS);
    for e in 0..5 {
        m.al.push(e);
        s.persist(&m).unwrap();
        m.dirty.set(e * EXTENT + 3);
    }
    drop(s);
    let prev = m.clone();
    let pristine = std::fs::read(&path).unwrap();
    // The next transaction evicts extent 0 (carrying its bit) and adds 9.
    let mut next = m.clone();
    next.al.remove(0);
    next.al.push(9);
    // The record: a 40-byte header, the added extent (9 bytes), the
    // evicted one with its 1024 bits (9 + 128); a cut past its last
    // non-zero byte (the ring block was zeroes) is no tear.
    let record = {
        let copy = dir.join("probe");
        std::fs::copy(&path, &copy).unwrap();
        let (mut s, _) = MetaStore::open(&copy).unwrap();
        s.persist(&next).unwrap();
        let off = s.transaction_offset(s.al_seq()) as usize;
        let b = std::fs::read(&copy).unwrap();
        let block = &b[off..off + 4096];
        block.iter().rposition(|&x| x != 0).unwrap() + 1
    };
    assert!(record > 58, "the record holds the carried bits: {record}");
    let mut cuts: Vec<usize> = (0..record).step_by(7).collect();
    cuts.extend([1, 39, 40, 41, record - 1, record, 2048, 4095]);
    for n in cuts {
        std::fs::write(&path, &pristine).unwrap();
        let (mut s, _) = open_tearing(&path, Some((0, n)));
        assert!(s.persist(&next).is_err(), "cut {n}");
        drop(s);
        let (mut s, got) = MetaStore::open(&path).unwrap();
        let want = if n < record { &prev } else { &next };
        same_after_restart(&got, want).unwrap_or_else(|e| panic!("cut {n}: {e}"));
        s.persist(&next).unwrap();
        drop(s);
        let (_, got) = MetaStore::open(&path).unwrap();
        same_after_restart(&got, &next).unwrap_or_else(|e| panic!("cut {n}: {e}"));
        assert!(
            got.dirty.get(3),
            "cut {n}: the evicted extent's bit is on disk"
        );
    }
}

#[test]
fn ring_wrap_forces_a_commit_before_overwriting_needed_transactions() {
    let dir = TempDir::new("wrap");
    let path = dir.join("meta");
    let mut m = Meta::create(CLUSTER, 1, GIB_BLOCKS, 4096, Some(7));
    m.clean = false;
    let opts = CreateOptions {
        ring_len: 4,
        ..CreateOptions::default()
    };
    let mut s = MetaStore::create(&path, &m, &opts).unwrap();
    for e in 0..20 {
        m.al.push(e);
        if m.al.len() > 2 {
            m.al.remove(0);
        }
        s.persist(&m).unwrap();
        m.dirty.set(e * EXTENT + e);
    }
    let st = s.stats();
    assert!(st.commits >= 5, "{st:?}");
    drop(s);
    let (_, got) = MetaStore::open(&path).unwrap();
    same_after_restart(&got, &m).unwrap();
}

#[test]
fn format_1_is_refused_with_how_to_convert_and_converts() {
    let dir = TempDir::new("v1");
    let path = dir.join("meta");
    let mut m = Meta::create(CLUSTER, 1, 100_000, 4096, Some(9));
    m.dirty.set(77);
    m.dirty.set(99_999);
    m.al = vec![3, 4];
    msl_store::testkit::write_v1(&path, &m).unwrap();
    let e = MetaStore::open(&path).unwrap_err();
    assert!(matches!(e, StoreError::OldFormat { format: 1, .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("mslctl convert-md") && msg.contains("format 1"),
        "{msg}"
    );
    let got = convert_v1_to_v2(&path, &CreateOptions::default()).unwrap();
    assert_eq!(got, m);
    let (_, loaded) = MetaStore::open(&path).unwrap();
    assert_eq!(loaded, m);
    let mut backup = path.clone().into_os_string();
    backup.push(".v1");
    assert!(Path::new(&backup).exists(), "the format-1 file is kept");
    let e = convert_v1_to_v2(&path, &CreateOptions::default()).unwrap_err();
    assert!(e.to_string().contains("nothing to convert"), "{e}");
}

#[test]
fn batched_transaction_is_one_write_and_all_or_nothing_at_any_tear() {
    // The core batches as many new hot extents into one metadata write
    // as `al_txn_extents` allows; in the worst case each evicts a slot
    // whose bits go with it. That batch must be one transaction, and a
    // crash anywhere in its write must leave either none or all of it.
    let dir = TempDir::new("batch-tx");
    let (path, mut s, mut m) = running(&dir, GIB_BLOCKS);
    let n = msl_core::meta::al_txn_extents(EXTENT);
    assert!(n > 1, "{n}");
    for e in 0..n as u64 {
        m.al.push(e);
        s.persist(&m).unwrap();
        m.dirty.set(e * EXTENT + 3);
    }
    let prev = m.clone();
    let mut next = m.clone();
    next.al.clear();
    for e in 100..100 + n as u64 {
        next.al.push(e);
        next.dirty.set(e * EXTENT + 5);
    }
    let probe = dir.join("probe");
    std::fs::copy(&path, &probe).unwrap();
    drop(s);
    let pristine = std::fs::read(&path).unwrap();
    {
        let (mut p, _) = MetaStore::open(&probe).unwrap();
        let b0 = p.stats();
        p.persist(&next).unwrap();
        let d = stats_delta(b0, p.stats());
        assert_eq!((d.transactions, d.commits, d.syncs), (1, 0, 1), "{d:?}");
    }
    let (mut saw_old, mut saw_new) = (false, false);
    for cut in (0..4096).step_by(29).chain([39, 40, 41, 4095]) {
        std::fs::write(&path, &pristine).unwrap();
        let (mut t, _) = open_tearing(&path, Some((0, cut)));
        let res = t.persist(&next);
        drop(t);
        let (_, got) = MetaStore::open(&path).unwrap();
        let old = same_after_restart(&got, &prev);
        let new = same_after_restart(&got, &next);
        assert!(
            old.is_ok() || new.is_ok(),
            "cut {cut} ({res:?}): a mix: {old:?} / {new:?}"
        );
        saw_old |= old.is_ok();
        saw_new |= new.is_ok();
        if new.is_ok() {
            for e in 0..n as u64 {
                assert!(
                    got.dirty.get(e * EXTENT + 3),
                    "cut {cut}: evicted {e} lost its bit"
                );
            }
        }
    }
    assert!(
        saw_old && saw_new,
        "tears gave old {saw_old}, new {saw_new}"
    );
}

/// A change of more pages than a transaction takes (a full sync marks the
/// whole map, its progress clears thousands of pages) goes as one commit
/// that writes exactly the pages that changed, and a crash at any of its
/// writes leaves the previous or the new version.
#[test]
fn bulk_change_is_one_commit_of_the_changed_pages_and_crash_safe() {
    let dir = TempDir::new("bulk");
    let pages = 1100u64;
    let blocks = pages * 32768; // 1,100 bitmap pages (about 140 GiB)
    let (path, mut s, mut m) = running(&dir, blocks);
    // A hot extent and a few bits, persisted the usual way.
    m.al.push(3);
    m.dirty.set_range(3 * EXTENT, 10);
    s.persist(&m).unwrap();
    let acked = m.clone();
    let crash = dir.join("crash");
    for (label, change) in [
        ("mark all", 0usize),
        ("mark all but ten pages", 1),
        ("mark all from page 55", 2),
    ] {
        let mut next = acked.clone();
        match change {
            0 => next.dirty.set_all(),
            1 => {
                next.dirty.set_all();
                next.dirty.clear_range(0, 10 * 32768 + 5);
            }
            _ => {
                next.dirty.set_range(blocks / 20, blocks);
            }
        }
        // Crash copies: tear the first, a middle and the last writes.
        for at in [0usize, 1, 500, 1099, 1100, 1101] {
            crash_copy(&path, &crash, (at, 100), &acked, &next, label);
        }
        // On a copy: the real persist is one commit of the changed pages.
        std::fs::copy(&path, &crash).unwrap();
        let (mut c, _) = open_tearing(&crash, None);
        let before = c.stats();
        let reads = c.io().reads.get();
        c.persist(&next).unwrap();
        let d = stats_delta(before, c.stats());
        // Without reading the pages' durable copies back.
        assert_eq!(c.io().reads.get(), reads, "{label}: pages read back");
        // The changed pages that are neither wholly clean nor wholly
        // dirty (those go as runs in the superblock), and the few whose
        // bits the log carried.
        let changed = (0..pages as usize)
            .filter(|&p| next.dirty.page_words(p) != acked.dirty.page_words(p))
            .filter(|&p| next.dirty.page_ones(p) != 0 && !next.dirty.page_full(p))
            .count() as u64;
        assert_eq!((d.commits, d.transactions), (1, 0), "{label}: {d:?}");
        assert!(
            d.pages_written >= changed && d.pages_written <= changed + 16,
            "{label}: {changed} mixed pages changed: {d:?}"
        );
        assert!(changed <= 3, "{label}: {changed} mixed pages");
        drop(c);
        let (_, got) = open_tearing(&crash, None);
        same_after_restart(&got, &next).unwrap_or_else(|e| panic!("{label}: {e}"));
    }
    // And on the store itself, then reopened.
    m.dirty.set_all();
    s.persist(&m).unwrap();
    drop(s);
    let (_, got) = MetaStore::open(&path).unwrap();
    same_after_restart(&got, &m).unwrap();
}

#[test]
fn loading_reads_only_the_bitmap_pages_ever_written() {
    let dir = TempDir::new("sparse-load");
    // 1 TiB: 8,257 pages, 65 load chunks of 128 pages.
    let (path, mut s, mut m) = running(&dir, TIB_BLOCKS);
    let (_, fresh) = open_tearing(&path, None);
    same_after_restart(&fresh, &m).unwrap();
    // A new file: the label, the superblocks and one transaction read.
    let (c, _) = open_tearing(&path, None);
    let blank_reads = c.io().reads.get();
    assert!(blank_reads <= 4, "{blank_reads} reads of a blank map");
    drop(c);
    // Bits in two far-apart pages, committed: two chunks to read more.
    m.dirty.set_range(5, 3);
    m.dirty.set_range(TIB_BLOCKS - 100, 100);
    m.clean = true;
    s.persist(&m).unwrap();
    let (c, got) = open_tearing(&path, None);
    same_after_restart(&got, &m).unwrap();
    assert_eq!(
        c.io().reads.get(),
        blank_reads + 2,
        "only the two chunks read"
    );
    drop(c);
    // Wholly dirty (a full sync): the full pages go as a run in the
    // superblock, only the partial last page is written, the same two
    // chunks are read, and every bit is back.
    m.dirty.set_all();
    let before = s.stats();
    s.persist(&m).unwrap();
    let d = stats_delta(before, s.stats());
    assert_eq!((d.commits, d.pages_written), (1, 1), "{d:?}");
    let (c, got) = open_tearing(&path, None);
    same_after_restart(&got, &m).unwrap();
    assert_eq!(got.dirty.count(), TIB_BLOCKS);
    assert_eq!(c.io().reads.get(), blank_reads + 2);
    drop(c);
    // The resync clears it page by page: cleared pages join a run, the
    // page it is in the middle of is written; nothing lost at a restart.
    for k in 1..=4u64 {
        m.dirty.clear_range(0, k * 1000 * PAGE_BITS + 77);
        let before = s.stats();
        s.persist(&m).unwrap();
        let d = stats_delta(before, s.stats());
        assert!(d.pages_written <= 2, "step {k}: {d:?}");
        let (_, got) = open_tearing(&path, None);
        same_after_restart(&got, &m).unwrap();
    }
}

#[test]
fn a_uniform_page_pushed_out_of_the_runs_is_written() {
    // A superblock of one block has room for about 490 runs.
    let dir = TempDir::new("runs-room");
    let opts = CreateOptions {
        al_capacity: 1,
        ..CreateOptions::default()
    };
    let pages = 1200u64;
    let (path, mut s, mut m) = running_with(&dir, pages * PAGE_BITS, &opts);
    // A wholly dirty page far out: it goes as a run, its copies never
    // written.
    m.dirty.set_range(1100 * PAGE_BITS, PAGE_BITS);
    s.persist(&m).unwrap();
    assert_eq!(s.stats().pages_written, 0);
    // One bit in every other page before it: 500 runs of clean pages,
    // more than the room, so the full page no longer has a run and must
    // be written now although it did not change.
    for p in (0..1000).step_by(2) {
        m.dirty.set(p * PAGE_BITS + 5);
    }
    s.persist(&m).unwrap();
    drop(s);
    let (_, got) = MetaStore::open(&path).unwrap();
    same_after_restart(&got, &m).unwrap();
    assert_eq!(got.dirty.count(), PAGE_BITS + 500);
}
