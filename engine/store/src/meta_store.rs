//! Crash-safe metadata whose write cost is what changed (format 2).
//!
//! File layout (all integers little-endian, every region 4 KiB aligned):
//!
//! ```text
//! [0, 4096)        label, written once at create
//!   0  magic "MSLSTOR\0"  8  format u32 (2)   12 reserved u32
//!   16 cluster_id u64     24 volume_blocks u64
//!   32 block_size u32     36 node_id u16      38 reserved u16
//!   40 al_capacity u32    44 sb_size u32      48 ring_len u32
//!   52 pages u32          56 extent_blocks u64
//!   64 crc32c of bytes [0, 64) u32
//! superblock A, superblock B (sb_size bytes each)
//!   0  magic "MSLSUPB2"   8  seq u64          16 al_seq u64
//!   24 extent_blocks u64  32 len u32          36 slot index u32
//!   40 epoch u32 (the node's start epoch; 0 in files written before it
//!      was kept)          44 crc32c of [0, 44) ++ payload
//!   48 payload: `Meta::encode_fields()` (generations, state, geometry,
//!      the activity log as of `al_seq`; no bitmap), then optionally the
//!      uniform runs: magic "MSLRUNS2", count u32, per run first page
//!      u32 and page count u32 (top bit set: every bit of those pages is
//!      set; clear: none is)
//! activity-log ring: ring_len blocks of 4 KiB, transaction s in block s % ring_len
//!   0  magic "MSLALTX2"   8  seq u64          16 extent_blocks u64
//!   24 entries u32        28 len u32          32 reserved u32
//!   36 crc32c of [0, 36) ++ payload          40 payload, `len` bytes:
//!      per entry: extent u64, kind u8 (0 add, 1 evict, 2 evict with bits),
//!      for kind 2 the extent's bits, ceil(n / 64) u64 words (n = the
//!      extent's blocks inside the volume)
//! bitmap: `pages` pages, two copies each, page p copy c at
//!   bitmap_offset + (2p + c) * 4096
//!   0  magic "MSLPAGE2"   8  seq u64          16 page u32
//!   20 reserved u32       24 reserved u32     28 crc32c of [0, 28) ++ words
//!   32 the page's words (`PAGE_WORDS` u64, the last page zero-padded)
//!   An all-zero block is a page never written: no bits set.
//! ```
//!
//! **Loading.** The newest superblock whose checksum holds gives the
//! commit sequence `P`. A page inside one of its uniform runs holds what
//! the run says; any other page is the valid copy with the highest
//! sequence not above `P` (copies above `P` belong to a commit that never
//! landed and are zeroed). Then the activity-log transactions
//! `al_seq + 1, al_seq + 2, ...` are replayed while they are valid and
//! consecutive: each adds and evicts extents, and sets the bits of the
//! extents it evicts.
//!
//! **Persisting** compares the new `Meta` with the durable state and picks
//! the cheapest write that is crash-safe:
//! * nothing at all, when only bits inside activity-log extents changed
//!   (a crashed node marks its whole activity log dirty at start);
//! * one transaction (one 4 KiB write, one `fdatasync`), when only the
//!   activity log changed (plus bits in extents it keeps or evicts): the
//!   "new hot extent" case, whatever the volume size;
//! * a commit otherwise (state or generations changed, bits outside the
//!   log, a clean shutdown, or the ring would wrap onto transactions the
//!   newest superblock still needs): the changed pages into their spare
//!   copies, `fdatasync`, the superblock into its spare slot, `fdatasync`.
//!   Pages wholly clean or wholly dirty go as runs in the superblock
//!   instead (as many as its slot has room for), so marking a volume
//!   for a full sync, and the resync clearing it, write almost no pages;
//!   a page leaving the runs is written in that commit (its copies are
//!   stale), into its spare copy like any other.
//!
//! A torn write fails its checksum and the previous state is used: a torn
//! page copy leaves the other copy; a torn superblock leaves the other one
//! (whose pages are still there: a commit writes only spare copies); a
//! torn transaction ends the replay before it.
//!
//! **Start epoch.** Every superblock carries the node's start epoch: the
//! number of daemon starts so far. [`MetaStore::next_epoch`] raises it by
//! one and commits (a superblock write and `fdatasync`) before the daemon
//! sends anything; every later commit carries it on. A torn commit leaves
//! the other superblock, which holds the same epoch (the one that raised
//! it, or a later one), so an epoch once returned is never handed out
//! again. A new file starts at the wall clock's seconds since 1970, not at
//! 0: a node whose metadata is created again (`mslctl create-md --force`)
//! still starts above every epoch its peer heard from the old file (one
//! start a second at most), so the peer does not take it for a replay.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io;
use std::path::{Path, PathBuf};

use msl_core::bitmap::{Bitmap, PAGE_BITS, PAGE_WORDS};

/// Changed bitmap pages above which a persist goes as a commit at once
/// (1024 pages: 32 Mi blocks, 128 GiB of 4 KiB blocks).
const BULK_PAGES: usize = 1024;
use msl_core::meta::Meta;
use msl_core::Config;
use msl_wire::{DiskState, Generations, Role};

use crate::error::StoreError;
use crate::io::MetaIo;

/// Alignment of every region of the file.
pub const PAGE: u64 = 4096;
/// Activity-log capacity a superblock holds by [`CreateOptions::default`]
/// (8 bytes per extent; far above the core's default).
pub const DEFAULT_AL_CAPACITY: u32 = 4096;
/// Activity-log transactions in the ring by [`CreateOptions::default`]
/// (4 MiB): a commit is forced at most once per this many transactions.
pub const DEFAULT_RING_LEN: u32 = 1024;
/// Metadata format this build writes.
pub const FORMAT: u32 = 2;

const LABEL_MAGIC: &[u8; 8] = b"MSLSTOR\0";
const LABEL_LEN: usize = 68;
const SB_MAGIC: &[u8; 8] = b"MSLSUPB2";
const SB_HDR: usize = 48;
const TX_MAGIC: &[u8; 8] = b"MSLALTX2";
const TX_HDR: usize = 40;
const PG_MAGIC: &[u8; 8] = b"MSLPAGE2";
const PG_HDR: usize = 32;
const BLOCK: usize = PAGE as usize;
/// Pages read per `pread` at load.
const LOAD_CHUNK_PAGES: usize = 128;
const WHAT: &str = "metadata";
const DEFAULT_EXTENT_BLOCKS: u64 = 1024;

/// Options for [`MetaStore::create`].
#[derive(Clone, Copy, Debug)]
pub struct CreateOptions {
    /// Overwrite an existing file (`mslctl create-md --force`).
    pub force: bool,
    /// Activity-log extents a superblock must hold (at least the
    /// configured `al_extents`).
    pub al_capacity: u32,
    /// Blocks per activity-log extent (the configured `extent_blocks`);
    /// [`MetaStore::open_checked`] takes it from the configuration.
    pub extent_blocks: u64,
    /// Transactions in the activity-log ring.
    pub ring_len: u32,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            force: false,
            al_capacity: DEFAULT_AL_CAPACITY,
            extent_blocks: DEFAULT_EXTENT_BLOCKS,
            ring_len: DEFAULT_RING_LEN,
        }
    }
}

/// Identity and geometry recorded in the label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub(crate) cluster_id: u64,
    pub(crate) node_id: u16,
    pub(crate) volume_blocks: u64,
    pub(crate) block_size: u32,
}

impl Geometry {
    pub(crate) fn of(m: &Meta) -> Geometry {
        Geometry {
            cluster_id: m.cluster_id,
            node_id: m.node_id,
            volume_blocks: m.volume_blocks,
            block_size: m.block_size,
        }
    }

    /// The first field that differs: (key, self's value, other's value).
    pub(crate) fn diff(&self, other: &Geometry) -> Option<(&'static str, String, String)> {
        if self.cluster_id != other.cluster_id {
            return Some((
                "cluster_id",
                format!("{:#018x}", self.cluster_id),
                format!("{:#018x}", other.cluster_id),
            ));
        }
        if self.node_id != other.node_id {
            let (a, b) = (self.node_id, other.node_id);
            return Some(("node_id", a.to_string(), b.to_string()));
        }
        if self.volume_blocks != other.volume_blocks {
            let (a, b) = (self.volume_blocks, other.volume_blocks);
            return Some(("volume_blocks", a.to_string(), b.to_string()));
        }
        if self.block_size != other.block_size {
            let (a, b) = (self.block_size, other.block_size);
            return Some(("block_size", a.to_string(), b.to_string()));
        }
        None
    }
}

/// The label: identity and layout, written once.
#[derive(Clone, Copy, Debug)]
struct Label {
    geo: Geometry,
    al_capacity: u32,
    sb_size: u32,
    ring_len: u32,
    pages: u32,
    extent_blocks: u64,
}

impl Label {
    fn for_meta(meta: &Meta, opts: &CreateOptions) -> Result<Label, String> {
        let al_capacity = opts.al_capacity.max(meta.al.len() as u32);
        let pages = meta.volume_blocks.div_ceil(64).div_ceil(PAGE_WORDS as u64);
        let pages = u32::try_from(pages).map_err(|_| "volume too large".to_string())?;
        // The fields encoding with a full log, rounded up to whole blocks.
        let mut probe = Meta::create(0, 0, 0, 0, None);
        probe.al = vec![0; al_capacity as usize];
        let need = SB_HDR + probe.encode_fields().len();
        Ok(Label {
            geo: Geometry::of(meta),
            al_capacity,
            sb_size: u32::try_from((need as u64).div_ceil(PAGE) * PAGE)
                .map_err(|_| "activity log too large".to_string())?,
            ring_len: opts.ring_len.max(2),
            pages,
            extent_blocks: opts.extent_blocks.max(1),
        })
    }

    fn encode(&self) -> [u8; LABEL_LEN] {
        let mut b = [0u8; LABEL_LEN];
        b[0..8].copy_from_slice(LABEL_MAGIC);
        b[8..12].copy_from_slice(&FORMAT.to_le_bytes());
        b[16..24].copy_from_slice(&self.geo.cluster_id.to_le_bytes());
        b[24..32].copy_from_slice(&self.geo.volume_blocks.to_le_bytes());
        b[32..36].copy_from_slice(&self.geo.block_size.to_le_bytes());
        b[36..38].copy_from_slice(&self.geo.node_id.to_le_bytes());
        b[40..44].copy_from_slice(&self.al_capacity.to_le_bytes());
        b[44..48].copy_from_slice(&self.sb_size.to_le_bytes());
        b[48..52].copy_from_slice(&self.ring_len.to_le_bytes());
        b[52..56].copy_from_slice(&self.pages.to_le_bytes());
        b[56..64].copy_from_slice(&self.extent_blocks.to_le_bytes());
        let crc = crc32c::crc32c(&b[..64]);
        b[64..68].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8; LABEL_LEN], path: &Path) -> Result<Label, StoreError> {
        let path = path.to_path_buf();
        if &b[0..8] != LABEL_MAGIC {
            let detail = if b.iter().all(|&x| x == 0) {
                "the label is all zeroes".into()
            } else {
                format!("bad label magic {:02x?}", &b[0..8])
            };
            return Err(StoreError::NotMetadata { path, detail });
        }
        let format = le32(&b[8..12]);
        if format == crate::v1::SB_FORMAT {
            return Err(StoreError::OldFormat { path, format });
        }
        let stored = le32(&b[64..68]);
        let computed = crc32c::crc32c(&b[..64]);
        if stored != computed {
            return Err(StoreError::Corrupt {
                path,
                detail: format!(
                    "label checksum mismatch (computed {computed:#010x}, stored {stored:#010x})"
                ),
            });
        }
        if format != FORMAT {
            return Err(StoreError::Corrupt {
                path,
                detail: format!("unsupported metadata format {format} (this build reads {FORMAT})"),
            });
        }
        let l = Label {
            geo: Geometry {
                cluster_id: le64(&b[16..24]),
                volume_blocks: le64(&b[24..32]),
                block_size: le32(&b[32..36]),
                node_id: u16::from_le_bytes([b[36], b[37]]),
            },
            al_capacity: le32(&b[40..44]),
            sb_size: le32(&b[44..48]),
            ring_len: le32(&b[48..52]),
            pages: le32(&b[52..56]),
            extent_blocks: le64(&b[56..64]),
        };
        let pages = l.geo.volume_blocks.div_ceil(64).div_ceil(PAGE_WORDS as u64);
        let bad = if u64::from(l.pages) != pages {
            Some(format!(
                "{} bitmap pages for {} blocks",
                l.pages, l.geo.volume_blocks
            ))
        } else if l.sb_size < PAGE as u32 || !u64::from(l.sb_size).is_multiple_of(PAGE) {
            Some(format!("superblock size {}", l.sb_size))
        } else if !(2..=1 << 20).contains(&l.ring_len) {
            Some(format!("ring length {}", l.ring_len))
        } else if l.extent_blocks == 0 {
            Some("extent size 0".into())
        } else {
            None
        };
        match bad {
            Some(what) => Err(StoreError::Corrupt {
                path,
                detail: format!("invalid label: {what}"),
            }),
            None => Ok(l),
        }
    }

    fn sb_offset(&self, slot: usize) -> u64 {
        PAGE + slot as u64 * u64::from(self.sb_size)
    }

    fn ring_offset(&self) -> u64 {
        PAGE + 2 * u64::from(self.sb_size)
    }

    fn tx_offset(&self, seq: u64) -> u64 {
        self.ring_offset() + (seq % u64::from(self.ring_len)) * PAGE
    }

    fn bitmap_offset(&self) -> u64 {
        self.ring_offset() + u64::from(self.ring_len) * PAGE
    }

    fn page_offset(&self, page: usize, copy: usize) -> u64 {
        self.bitmap_offset() + (2 * page as u64 + copy as u64) * PAGE
    }

    fn file_len(&self) -> u64 {
        self.bitmap_offset() + 2 * u64::from(self.pages) * PAGE
    }
}

pub(crate) fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

pub(crate) fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn slot_name(slot: usize) -> char {
    if slot == 0 {
        'A'
    } else {
        'B'
    }
}

/// CRC32C of words as little-endian bytes.
fn words_crc(words: &[u64]) -> u32 {
    let mut crc = 0;
    let mut buf = [0u8; 512];
    for chunk in words.chunks(64) {
        for (i, w) in chunk.iter().enumerate() {
            buf[8 * i..8 * i + 8].copy_from_slice(&w.to_le_bytes());
        }
        crc = crc32c::crc32c_append(crc, &buf[..8 * chunk.len()]);
    }
    crc
}

/// One 4 KiB page record.
fn encode_page(page: usize, seq: u64, words: &[u64]) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    b[0..8].copy_from_slice(PG_MAGIC);
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    b[16..20].copy_from_slice(&(page as u32).to_le_bytes());
    for (i, w) in words.iter().enumerate() {
        b[PG_HDR + 8 * i..PG_HDR + 8 * i + 8].copy_from_slice(&w.to_le_bytes());
    }
    let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..28]), &b[PG_HDR..]);
    b[28..32].copy_from_slice(&crc.to_le_bytes());
    b
}

/// `Some((seq, words))` for a valid copy (seq 0 and no bits for a block
/// never written), `None` for a torn or foreign one.
fn decode_page(page: usize, b: &[u8], nwords: usize) -> Option<(u64, Vec<u64>)> {
    if b.iter().all(|&x| x == 0) {
        return Some((0, vec![0; nwords]));
    }
    if &b[0..8] != PG_MAGIC || le32(&b[16..20]) as usize != page {
        return None;
    }
    let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..28]), &b[PG_HDR..]);
    if crc != le32(&b[28..32]) {
        return None;
    }
    let words = (0..nwords).map(|i| le64(&b[PG_HDR + 8 * i..])).collect();
    Some((le64(&b[8..16]), words))
}

const RUNS_MAGIC: &[u8; 8] = b"MSLRUNS2";
/// Magic and count before a superblock's runs.
const RUNS_HDR: usize = 12;
/// Flag of a run's page count: the pages have every bit set.
const RUN_FULL: u32 = 1 << 31;

/// What a superblock says of a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Its copies hold it.
    Copy,
    /// No bit set.
    Zero,
    /// Every bit set.
    Full,
}

/// The kind of each page of `map`, in runs of equal uniform pages: at
/// most `room` runs, in page order (pages beyond are [`Kind::Copy`]).
fn uniform_runs(map: &Bitmap, room: usize) -> (Vec<(u32, u32, Kind)>, Vec<Kind>) {
    let pages = map.page_count();
    let mut kinds = vec![Kind::Copy; pages];
    let mut runs: Vec<(u32, u32, Kind)> = Vec::new();
    for (p, k) in kinds.iter_mut().enumerate() {
        let kind = if map.page_ones(p) == 0 {
            Kind::Zero
        } else if map.page_full(p) {
            Kind::Full
        } else {
            continue;
        };
        let full = runs.len() == room;
        match runs.last_mut() {
            Some((first, n, rk)) if *rk == kind && (*first + *n) as usize == p => *n += 1,
            _ if full => break,
            _ => runs.push((p as u32, 1, kind)),
        }
        *k = kind;
    }
    (runs, kinds)
}

/// Words of page `p` of a map of `nwords` words.
fn page_len(nwords: usize, p: usize) -> usize {
    (nwords - p * PAGE_WORDS).min(PAGE_WORDS)
}

/// The words of a page of `pw` words of a uniform kind (no bit for
/// [`Kind::Copy`]).
fn uniform_words(kind: Kind, pw: usize) -> Vec<u64> {
    vec![if kind == Kind::Full { !0 } else { 0 }; pw]
}

fn uniform_crc(kind: Kind, pw: usize) -> u32 {
    words_crc(&uniform_words(kind, pw))
}

fn encode_runs(runs: &[(u32, u32, Kind)], out: &mut Vec<u8>) {
    if runs.is_empty() {
        return;
    }
    out.extend_from_slice(RUNS_MAGIC);
    out.extend_from_slice(&(runs.len() as u32).to_le_bytes());
    for &(first, n, kind) in runs {
        let flag = if kind == Kind::Full { RUN_FULL } else { 0 };
        out.extend_from_slice(&first.to_le_bytes());
        out.extend_from_slice(&(n | flag).to_le_bytes());
    }
}

/// The kind of each page from a superblock's runs (`b`: what follows its
/// fields), checked: ascending, apart, inside the map, and full only over
/// pages of [`PAGE_BITS`] bits.
fn decode_runs(b: &[u8], blocks: u64) -> Result<Vec<Kind>, String> {
    let pages = blocks.div_ceil(64).div_ceil(PAGE_WORDS as u64) as usize;
    let whole = (blocks / PAGE_BITS) as usize;
    let mut kinds = vec![Kind::Copy; pages];
    if b.is_empty() {
        return Ok(kinds);
    }
    if b.len() < RUNS_HDR || &b[..8] != RUNS_MAGIC {
        return Err("bytes after its fields are not uniform runs".into());
    }
    let n = le32(&b[8..12]) as usize;
    if b.len() != RUNS_HDR + 8 * n {
        return Err(format!("{n} uniform runs in {} bytes", b.len() - RUNS_HDR));
    }
    let mut next = 0usize;
    for r in b[RUNS_HDR..].chunks_exact(8) {
        let first = le32(&r[..4]) as usize;
        let x = le32(&r[4..]);
        let (count, kind) = (
            (x & !RUN_FULL) as usize,
            if x & RUN_FULL != 0 {
                Kind::Full
            } else {
                Kind::Zero
            },
        );
        let end = first.saturating_add(count);
        let limit = if kind == Kind::Full { whole } else { pages };
        if first < next || count == 0 || end > limit {
            return Err(format!(
                "uniform run of {count} pages from page {first} is out of order or outside the map"
            ));
        }
        kinds[first..end].fill(kind);
        next = end;
    }
    Ok(kinds)
}

/// Where a superblock is and what it holds besides `meta`'s fields.
struct SbPlace {
    slot: usize,
    seq: u64,
    al_seq: u64,
    extent_blocks: u64,
    epoch: u32,
}

fn encode_sb(at: &SbPlace, meta: &Meta, runs: &[(u32, u32, Kind)]) -> Vec<u8> {
    let SbPlace {
        slot,
        seq,
        al_seq,
        extent_blocks,
        epoch,
    } = *at;
    let mut payload = meta.encode_fields();
    encode_runs(runs, &mut payload);
    let mut b = Vec::with_capacity(SB_HDR + payload.len());
    b.extend_from_slice(SB_MAGIC);
    b.extend_from_slice(&seq.to_le_bytes());
    b.extend_from_slice(&al_seq.to_le_bytes());
    b.extend_from_slice(&extent_blocks.to_le_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    b.extend_from_slice(&(slot as u32).to_le_bytes());
    b.extend_from_slice(&epoch.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..44]), &payload);
    b.extend_from_slice(&crc.to_le_bytes());
    b.extend_from_slice(&payload);
    b
}

/// The start epoch a new file begins at: seconds since 1970 (fits 32 bits
/// until 2106), so it is above the epochs of any file this node had before.
fn creation_epoch() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX / 2))
}

/// A valid superblock: (seq, al_seq, extent_blocks, epoch, fields, the
/// kind of each page).
type SbContent = (u64, u64, u64, u32, Meta, Vec<Kind>);

/// `Err(Ok(why))`: torn or never written (fall back);
/// `Err(Err(why))`: checksum valid, content not (never roll back silently).
fn decode_sb(slot: usize, b: &[u8], geo: &Geometry) -> Result<SbContent, Result<String, String>> {
    if b[..SB_HDR].iter().all(|&x| x == 0) {
        return Err(Ok("never written".into()));
    }
    if &b[0..8] != SB_MAGIC {
        return Err(Ok(format!("bad superblock magic {:02x?}", &b[0..8])));
    }
    let seq = le64(&b[8..16]);
    let len = le32(&b[32..36]) as usize;
    if len > b.len() - SB_HDR {
        return Err(Ok(format!("length {len} exceeds the slot")));
    }
    let payload = &b[SB_HDR..SB_HDR + len];
    let computed = crc32c::crc32c_append(crc32c::crc32c(&b[..44]), payload);
    let stored = le32(&b[44..48]);
    if computed != stored {
        return Err(Ok(format!(
            "checksum mismatch (seq {seq}, computed {computed:#010x}, stored {stored:#010x})"
        )));
    }
    let name = slot_name(slot);
    if le32(&b[36..40]) as usize != slot {
        return Err(Err(format!(
            "superblock {name} holds a copy of slot {} (seq {seq})",
            le32(&b[36..40])
        )));
    }
    let flen = Meta::fields_len(payload).unwrap_or(payload.len());
    let meta = Meta::decode_fields(&payload[..flen]).map_err(|e| {
        Err(format!(
            "superblock {name} (seq {seq}) passes its checksum but does not decode: {e}"
        ))
    })?;
    let kinds = decode_runs(&payload[flen..], geo.volume_blocks).map_err(|e| {
        Err(format!(
            "superblock {name} (seq {seq}) passes its checksum but its {e}"
        ))
    })?;
    if let Some((key, found, expected)) = Geometry::of(&meta).diff(geo) {
        return Err(Err(format!(
            "superblock {name} (seq {seq}) has {key} {found} but the label says {expected}"
        )));
    }
    let extent_blocks = le64(&b[24..32]);
    if extent_blocks == 0 {
        return Err(Err(format!(
            "superblock {name} (seq {seq}) has extent size 0"
        )));
    }
    Ok((
        seq,
        le64(&b[16..24]),
        extent_blocks,
        le32(&b[40..44]),
        meta,
        kinds,
    ))
}

/// An activity-log transaction.
#[derive(Debug, Default)]
struct Tx {
    seq: u64,
    extent_blocks: u64,
    added: Vec<u64>,
    /// Evicted extents, with their bits when those change on disk.
    evicted: Vec<(u64, Option<Vec<u64>>)>,
}

/// Blocks `[first, end)` of extent `e` inside a volume of `blocks`.
fn extent_range(e: u64, extent_blocks: u64, blocks: u64) -> (u64, u64) {
    let first = e.saturating_mul(extent_blocks).min(blocks);
    (first, first.saturating_add(extent_blocks).min(blocks))
}

fn read_bits(map: &Bitmap, first: u64, end: u64) -> Vec<u64> {
    let mut out = vec![0u64; (end - first).div_ceil(64) as usize];
    for i in first..end {
        if map.get(i) {
            let k = i - first;
            out[(k / 64) as usize] |= 1 << (k % 64);
        }
    }
    out
}

fn write_bits(words: &mut [u64], first: u64, end: u64, bits: &[u64]) {
    for i in first..end {
        let k = i - first;
        let w = &mut words[(i / 64) as usize];
        if bits[(k / 64) as usize] >> (k % 64) & 1 == 1 {
            *w |= 1 << (i % 64);
        } else {
            *w &= !(1 << (i % 64));
        }
    }
}

impl Tx {
    fn encode(&self) -> Vec<u8> {
        let mut p = Vec::new();
        for e in &self.added {
            p.extend_from_slice(&e.to_le_bytes());
            p.push(0);
        }
        for (e, bits) in &self.evicted {
            p.extend_from_slice(&e.to_le_bytes());
            match bits {
                None => p.push(1),
                Some(words) => {
                    p.push(2);
                    for w in words {
                        p.extend_from_slice(&w.to_le_bytes());
                    }
                }
            }
        }
        let mut b = vec![0u8; BLOCK];
        b[0..8].copy_from_slice(TX_MAGIC);
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.extent_blocks.to_le_bytes());
        let n = (self.added.len() + self.evicted.len()) as u32;
        b[24..28].copy_from_slice(&n.to_le_bytes());
        b[28..32].copy_from_slice(&(p.len() as u32).to_le_bytes());
        b[TX_HDR..TX_HDR + p.len()].copy_from_slice(&p);
        let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..36]), &p);
        b[36..40].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Bytes [`Tx::encode`] needs for its payload.
    fn payload_len(&self, blocks: u64) -> usize {
        let mut n = self.added.len() * 9;
        for (e, bits) in &self.evicted {
            n += 9;
            if bits.is_some() {
                let (a, z) = extent_range(*e, self.extent_blocks, blocks);
                n += (z - a).div_ceil(64) as usize * 8;
            }
        }
        n
    }

    /// The transaction `seq` if block `b` holds it intact.
    fn decode(b: &[u8], seq: u64, blocks: u64) -> Option<Tx> {
        if &b[0..8] != TX_MAGIC || le64(&b[8..16]) != seq {
            return None;
        }
        let len = le32(&b[28..32]) as usize;
        if len > BLOCK - TX_HDR {
            return None;
        }
        let p = &b[TX_HDR..TX_HDR + len];
        if crc32c::crc32c_append(crc32c::crc32c(&b[..36]), p) != le32(&b[36..40]) {
            return None;
        }
        let mut tx = Tx {
            seq,
            extent_blocks: le64(&b[16..24]),
            ..Tx::default()
        };
        if tx.extent_blocks == 0 {
            return None;
        }
        let mut at = 0;
        for _ in 0..le32(&b[24..28]) {
            let e = le64(p.get(at..at + 8)?);
            let kind = *p.get(at + 8)?;
            at += 9;
            match kind {
                0 => tx.added.push(e),
                1 => tx.evicted.push((e, None)),
                2 => {
                    let (a, z) = extent_range(e, tx.extent_blocks, blocks);
                    let n = (z - a).div_ceil(64) as usize;
                    let raw = p.get(at..at + 8 * n)?;
                    at += 8 * n;
                    tx.evicted
                        .push((e, Some(raw.chunks(8).map(le64).collect())));
                }
                _ => return None,
            }
        }
        (at == len).then_some(tx)
    }
}

/// What a persist cost (cumulative since open): for benches and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MetaStats {
    /// `persist` calls that returned `Ok`.
    pub persists: u64,
    /// Of those, the ones that wrote nothing (only bits covered by the
    /// activity log changed, or nothing at all).
    pub skipped: u64,
    /// Activity-log transactions written.
    pub transactions: u64,
    /// Commits (superblock writes).
    pub commits: u64,
    /// Bitmap pages written.
    pub pages_written: u64,
    /// Bytes written to the file.
    pub bytes_written: u64,
    /// `fdatasync` calls.
    pub syncs: u64,
}

/// The fields of a `Meta` a transaction cannot change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct State {
    gens: Generations,
    disk: DiskState,
    role: Role,
    clean: bool,
}

impl State {
    fn of(m: &Meta) -> State {
        State {
            gens: m.gens,
            disk: m.disk,
            role: m.role,
            clean: m.clean,
        }
    }
}

/// Lock `file` exclusively (advisory `flock`) or say who holds it.
fn lock(file: &File, what: &'static str, path: &Path) -> Result<(), StoreError> {
    match file.try_lock() {
        Ok(()) => Ok(()),
        Err(TryLockError::WouldBlock) => Err(StoreError::Locked {
            what,
            path: path.to_path_buf(),
        }),
        Err(TryLockError::Error(e)) => Err(io_err(path, "lock", e)),
    }
}

pub(crate) fn io_err(path: &Path, op: impl Into<String>, source: io::Error) -> StoreError {
    StoreError::Io {
        what: WHAT,
        path: path.to_path_buf(),
        op: op.into(),
        source,
    }
}

/// The node's metadata file: load on start, persist on every
/// `Action::PersistMeta`.
///
/// Holds an exclusive advisory lock on the file while open (when opened
/// through [`MetaStore::open`]). Memory beyond the caller's `Meta`: about
/// 5 bytes per bitmap page (8 KiB per TiB at 4 KiB blocks), plus the pages
/// that differ from disk inside activity-log extents.
#[derive(Debug)]
pub struct MetaStore<D: MetaIo = File> {
    path: PathBuf,
    io: D,
    label: Label,
    /// Sequence number of the newest durable superblock, and the slot the
    /// next commit writes.
    seq: u64,
    next: usize,
    /// `al_seq` of that superblock, and of the newest durable transaction.
    sb_al_seq: u64,
    al_seq: u64,
    /// Extent size used for the activity log from now on.
    extent_blocks: u64,
    /// Durable state fields and activity log.
    state: State,
    al: BTreeSet<u64>,
    /// Per page: the copy holding its durable content.
    cur: Vec<u8>,
    /// Per page: what the newest durable superblock's runs say of it
    /// ([`Kind::Copy`]: `cur` holds it).
    kinds: Vec<Kind>,
    /// Per page: CRC32C of its durable content (page plus transactions).
    crc: Vec<u32>,
    /// Durable content of the pages where it differs from the last
    /// persisted map (bits inside activity-log extents) or from the page
    /// on disk (bits carried by transactions since the last commit).
    pending: BTreeMap<usize, Vec<u64>>,
    /// Pages of `pending` that differ from the last persisted map.
    differs: BTreeSet<usize>,
    /// Pages of `pending` that differ from the page on disk: a commit
    /// writes them, since its superblock ends the transactions' replay.
    carried: BTreeSet<usize>,
    /// (lineage, change counter) of the last persisted map.
    last: Option<(u64, u64)>,
    stats: MetaStats,
    /// First I/O error, once one happened.
    failed: Option<String>,
    /// At open: the superblock not loaded, if it was unusable, and why.
    rejected: Option<(char, String)>,
    /// Start epoch every commit writes (see [`MetaStore::next_epoch`]).
    epoch: u32,
}

impl MetaStore<File> {
    /// Create a new metadata file at `path` holding `meta` (commit 1),
    /// durably, and open it.
    ///
    /// Fails with [`StoreError::Exists`] if the file exists, unless
    /// `opts.force`. The file is written under a temporary name, synced,
    /// and linked (or, with `force`, renamed) into place, and the
    /// directory is synced: a crash leaves either no file (or the old one)
    /// or the complete new one. All of its blocks are allocated
    /// (`fallocate`), so a later persist cannot fail for want of space.
    pub fn create(path: &Path, meta: &Meta, opts: &CreateOptions) -> Result<Self, StoreError> {
        let path = path.to_path_buf();
        match fs::symlink_metadata(&path) {
            Ok(_) if !opts.force => return Err(StoreError::Exists { path }),
            Ok(_) => {
                // Do not pull the file from under a running daemon.
                if let Ok(f) = File::open(&path) {
                    lock(&f, WHAT, &path)?;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path, "stat", e)),
        }
        let label = Label::for_meta(meta, opts).map_err(|detail| StoreError::Corrupt {
            path: path.clone(),
            detail,
        })?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "meta".into());
        let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
        let _ = fs::remove_file(&tmp);
        let result = (|| {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&tmp)
                .map_err(|e| io_err(&tmp, "create", e))?;
            allocate(&f, label.file_len()).map_err(|e| io_err(&tmp, "allocate", e))?;
            MetaIo::pwrite_all(&f, &label.encode(), 0)
                .map_err(|e| io_err(&tmp, "write label", e))?;
            MetaIo::pwrite_all(
                &f,
                &encode_sb(
                    &SbPlace {
                        slot: 0,
                        seq: 1,
                        al_seq: 0,
                        extent_blocks: label.extent_blocks,
                        epoch: creation_epoch(),
                    },
                    meta,
                    &[],
                ),
                label.sb_offset(0),
            )
            .map_err(|e| io_err(&tmp, "write superblock A", e))?;
            // Pages with bits, copy 0; the rest stay zero (no bits).
            for p in 0..label.pages as usize {
                if meta.dirty.page_ones(p) != 0 {
                    let b = encode_page(p, 1, meta.dirty.page_words(p));
                    MetaIo::pwrite_all(&f, &b, label.page_offset(p, 0))
                        .map_err(|e| io_err(&tmp, format!("write bitmap page {p}"), e))?;
                }
            }
            f.sync_all().map_err(|e| io_err(&tmp, "fsync", e))?;
            drop(f);
            if opts.force {
                fs::rename(&tmp, &path).map_err(|e| io_err(&path, "rename into place", e))?;
            } else {
                match fs::hard_link(&tmp, &path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        return Err(StoreError::Exists { path: path.clone() })
                    }
                    Err(e) => return Err(io_err(&path, "link into place", e)),
                }
                let _ = fs::remove_file(&tmp);
            }
            File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io_err(&dir, "fsync directory", e))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result?;
        let (store, _) = Self::open(&path)?;
        Ok(store)
    }

    /// Open the metadata file at `path` (locking it) and load the newest
    /// valid version.
    pub fn open(path: &Path) -> Result<(Self, Meta), StoreError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| io_err(path, "open", e))?;
        lock(&file, WHAT, path)?;
        Self::open_io(file, path)
    }

    /// [`MetaStore::open`], then check the identity and geometry against
    /// the node's configuration: cluster id, node id, volume size, block
    /// size, and that a superblock can hold `cfg.al_extents` extents. The
    /// activity log's extent size follows `cfg.extent_blocks` from then
    /// on (each transaction records the size it used).
    pub fn open_checked(path: &Path, cfg: &Config) -> Result<(Self, Meta), StoreError> {
        let (mut store, meta) = Self::open(path)?;
        let want = Geometry {
            cluster_id: cfg.cluster_id,
            node_id: cfg.node_id,
            volume_blocks: cfg.volume_blocks,
            block_size: cfg.block_size,
        };
        if let Some((key, found, expected)) = store.label.geo.diff(&want) {
            return Err(StoreError::Mismatch {
                path: path.to_path_buf(),
                key,
                found,
                expected,
            });
        }
        if (store.label.al_capacity as usize) < cfg.al_extents {
            return Err(StoreError::Mismatch {
                path: path.to_path_buf(),
                key: "al_extents (slot capacity)",
                found: store.label.al_capacity.to_string(),
                expected: cfg.al_extents.to_string(),
            });
        }
        store.extent_blocks = cfg.extent_blocks.max(1);
        Ok((store, meta))
    }
}

/// Give `f` length `len` with every block allocated (zeroes).
fn allocate(f: &File, len: u64) -> io::Result<()> {
    f.set_len(len)?;
    let off = 0;
    let len = i64::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    loop {
        // SAFETY: plain syscall on an open file descriptor; no memory is passed.
        let r = unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(f), 0, off, len) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            // A filesystem without fallocate: the file stays sparse.
            Some(libc::EOPNOTSUPP) => return Ok(()),
            _ => return Err(e),
        }
    }
}

impl<D: MetaIo> MetaStore<D> {
    /// Load from an already opened file (or a test wrapper around one).
    /// `path` is used in messages only. No lock is taken. Page copies of a
    /// commit that never landed are zeroed (one write and `fdatasync`
    /// each, after a crash during a commit only).
    pub fn open_io(io: D, path: &Path) -> Result<(Self, Meta), StoreError> {
        let path = path.to_path_buf();
        let len = io.file_len().map_err(|e| io_err(&path, "stat", e))?;
        if len == 0 {
            return Err(StoreError::NotMetadata {
                path,
                detail: "the file is empty".into(),
            });
        }
        if len < LABEL_LEN as u64 {
            return Err(StoreError::Truncated {
                path,
                len,
                need: PAGE,
            });
        }
        let mut lb = [0u8; LABEL_LEN];
        io.pread_exact(&mut lb, 0)
            .map_err(|e| io_err(&path, "read label", e))?;
        let label = Label::decode(&lb, &path)?;
        if len < label.file_len() {
            return Err(StoreError::Truncated {
                path,
                len,
                need: label.file_len(),
            });
        }
        // Superblocks.
        let mut buf = vec![0u8; label.sb_size as usize];
        let mut found: [Result<SbContent, String>; 2] = [Err(String::new()), Err(String::new())];
        for (slot, out) in found.iter_mut().enumerate() {
            let off = label.sb_offset(slot);
            io.pread_exact(&mut buf, off).map_err(|e| {
                io_err(
                    &path,
                    format!("read superblock {} at offset {off}", slot_name(slot)),
                    e,
                )
            })?;
            *out = match decode_sb(slot, &buf, &label.geo) {
                Ok(v) => Ok(v),
                Err(Ok(why)) => Err(why),
                Err(Err(detail)) => return Err(StoreError::Corrupt { path, detail }),
            };
        }
        let [a, b] = found;
        let (newest, (seq, sb_al_seq, sb_eb, epoch, mut meta, kinds), rejected) = match (a, b) {
            (Ok(x), Ok(y)) => {
                if y.0 > x.0 {
                    (1, y, None)
                } else {
                    (0, x, None)
                }
            }
            (Ok(x), Err(why)) => (0, x, Some(('B', why))),
            (Err(why), Ok(y)) => (1, y, Some(('A', why))),
            (Err(slot_a), Err(slot_b)) => {
                return Err(StoreError::BothSlotsBad {
                    path,
                    slot_a,
                    slot_b,
                })
            }
        };
        // Bitmap pages: what the superblock's runs say, else the valid
        // copy with the highest sequence <= seq.
        let pages = label.pages as usize;
        let nwords = label.geo.volume_blocks.div_ceil(64) as usize;
        let blocks = label.geo.volume_blocks;
        // Pages without a bit stay shared zero pages, full ones share the
        // full page: an empty or wholly dirty map of a large volume costs
        // little memory.
        let mut map = Bitmap::new(blocks);
        let mut crc: Vec<u32> = (0..pages)
            .map(|p| uniform_crc(kinds[p], page_len(nwords, p)))
            .collect();
        for (p, k) in kinds.iter().enumerate() {
            if *k == Kind::Full {
                map.set_range(p as u64 * PAGE_BITS, PAGE_BITS);
            }
        }
        let mut cur = vec![0u8; pages];
        let mut scrub = Vec::new();
        let mut chunk = vec![0u8; LOAD_CHUNK_PAGES * 2 * BLOCK];
        // Where the file next holds data: chunks never written (both
        // copies of every page a hole: no bits set) are not read, so a
        // large, clean map loads without reading its hundreds of MiB.
        let mut data_at = Some(0);
        for first in (0..pages).step_by(LOAD_CHUNK_PAGES) {
            let n = LOAD_CHUNK_PAGES.min(pages - first);
            let off = label.page_offset(first, 0);
            let end = off + (n * 2 * BLOCK) as u64;
            if data_at.is_some_and(|d| d < off) {
                data_at = io
                    .next_data(off)
                    .map_err(|e| io_err(&path, format!("seek data from offset {off}"), e))?;
            }
            if data_at.is_none_or(|d| d >= end) {
                continue;
            }
            io.pread_exact(&mut chunk[..n * 2 * BLOCK], off)
                .map_err(|e| io_err(&path, format!("read bitmap pages at offset {off}"), e))?;
            for i in 0..n {
                let p = first + i;
                let pw = (nwords - p * PAGE_WORDS).min(PAGE_WORDS);
                let mut best: Option<(usize, u64, Vec<u64>)> = None;
                for c in 0..2 {
                    let blk = &chunk[(2 * i + c) * BLOCK..(2 * i + c + 1) * BLOCK];
                    match decode_page(p, blk, pw) {
                        Some((s, _)) if s > seq => scrub.push(label.page_offset(p, c)),
                        Some((s, w)) if best.as_ref().is_none_or(|b| s > b.1) => {
                            best = Some((c, s, w))
                        }
                        _ => {}
                    }
                }
                if kinds[p] != Kind::Copy {
                    // The superblock's run holds it; its copies are stale
                    // (read only to scrub those of a torn commit).
                    continue;
                }
                let Some((c, _, w)) = best else {
                    return Err(StoreError::Corrupt {
                        path,
                        detail: format!(
                            "bitmap page {p}: neither copy is valid at commit {seq} \
                             (a page is written only into its spare copy, so this is not a torn write)"
                        ),
                    });
                };
                cur[p] = c as u8;
                crc[p] = words_crc(&w);
                if w.iter().any(|&x| x != 0) {
                    map.set_page_words(p, &w);
                }
            }
        }
        // Activity-log transactions after the superblock.
        let mut al_seq = sb_al_seq;
        let mut touched = BTreeSet::new();
        let mut tb = vec![0u8; BLOCK];
        loop {
            let s = al_seq + 1;
            io.pread_exact(&mut tb, label.tx_offset(s))
                .map_err(|e| io_err(&path, format!("read activity-log transaction {s}"), e))?;
            let Some(tx) = Tx::decode(&tb, s, blocks) else {
                break;
            };
            if s - sb_al_seq > u64::from(label.ring_len) {
                break;
            }
            meta.al.retain(|e| !tx.evicted.iter().any(|(x, _)| x == e));
            for e in &tx.added {
                if !meta.al.contains(e) {
                    meta.al.push(*e);
                }
            }
            for (e, bits) in &tx.evicted {
                if let Some(bits) = bits {
                    let (a, z) = extent_range(*e, tx.extent_blocks, blocks);
                    for i in a..z {
                        let k = i - a;
                        if bits[(k / 64) as usize] >> (k % 64) & 1 == 1 {
                            map.set(i);
                        } else {
                            map.clear(i);
                        }
                    }
                    if a < z {
                        let (pa, pz) =
                            (a / 64 / PAGE_WORDS as u64, (z - 1) / 64 / PAGE_WORDS as u64);
                        touched.extend(pa as usize..=pz as usize);
                    }
                }
            }
            al_seq = s;
        }
        let mut pending = BTreeMap::new();
        let carried = touched.clone();
        for p in touched {
            let w = map.page_words(p).to_vec();
            crc[p] = words_crc(&w);
            pending.insert(p, w);
        }
        meta.dirty = map;
        let mut store = MetaStore {
            path,
            io,
            label,
            seq,
            next: 1 - newest,
            sb_al_seq,
            al_seq,
            extent_blocks: sb_eb,
            state: State::of(&meta),
            al: meta.al.iter().copied().collect(),
            cur,
            kinds,
            crc,
            pending,
            differs: BTreeSet::new(),
            carried,
            last: Some((meta.dirty.origin(), meta.dirty.change_seq())),
            stats: MetaStats::default(),
            failed: None,
            rejected,
            epoch,
        };
        // Page copies of the commit that never landed: zero them, or a
        // later commit with the same sequence would make them valid.
        if !scrub.is_empty() {
            let zero = vec![0u8; BLOCK];
            for off in scrub {
                store.write(&zero, off, || {
                    format!("zero stale page copy at offset {off}")
                })?;
            }
            store.sync()?;
        }
        Ok((store, meta))
    }

    fn latched(&self) -> Result<(), StoreError> {
        match &self.failed {
            Some(first) => Err(StoreError::PreviousIo {
                what: WHAT,
                path: self.path.clone(),
                first: first.clone(),
            }),
            None => Ok(()),
        }
    }

    fn write(&mut self, b: &[u8], off: u64, op: impl FnOnce() -> String) -> Result<(), StoreError> {
        match self.io.pwrite_all(b, off) {
            Ok(()) => {
                self.stats.bytes_written += b.len() as u64;
                Ok(())
            }
            Err(e) => {
                let err = io_err(&self.path, op(), e);
                self.failed = Some(err.to_string());
                Err(err)
            }
        }
    }

    fn sync(&mut self) -> Result<(), StoreError> {
        match self.io.fdatasync() {
            Ok(()) => {
                self.stats.syncs += 1;
                Ok(())
            }
            Err(e) => {
                let err = io_err(&self.path, "fdatasync", e);
                self.failed = Some(err.to_string());
                Err(err)
            }
        }
    }

    /// The durable content of page `p`.
    fn durable_page(&mut self, p: usize) -> Result<Vec<u64>, StoreError> {
        if let Some(w) = self.pending.get(&p) {
            return Ok(w.clone());
        }
        let nwords = self.label.geo.volume_blocks.div_ceil(64) as usize;
        let pw = page_len(nwords, p);
        if self.kinds[p] != Kind::Copy {
            return Ok(uniform_words(self.kinds[p], pw));
        }
        let c = usize::from(self.cur[p]);
        let off = self.label.page_offset(p, c);
        let mut b = vec![0u8; BLOCK];
        if let Err(e) = self.io.pread_exact(&mut b, off) {
            let err = io_err(
                &self.path,
                format!("read bitmap page {p} at offset {off}"),
                e,
            );
            self.failed = Some(err.to_string());
            return Err(err);
        }
        match decode_page(p, &b, pw) {
            Some((_, w)) if words_crc(&w) == self.crc[p] => Ok(w),
            _ => {
                let err = StoreError::Corrupt {
                    path: self.path.clone(),
                    detail: format!("bitmap page {p} changed on disk behind the store's back"),
                };
                self.failed = Some(err.to_string());
                Err(err)
            }
        }
    }

    /// Write `meta` durably and atomically, at the cost of what changed
    /// since the last persist (see the module documentation). When this
    /// returns `Ok`, `meta` survives a crash, except that bits inside its
    /// activity-log extents may come back clear while `clean` is false
    /// (the core marks those extents dirty after a crash); when it returns
    /// `Err`, the file holds either the previous or this version.
    ///
    /// The first I/O error latches the store: this call returns
    /// [`StoreError::Io`] and every later one [`StoreError::PreviousIo`]
    /// (the host then reports `Event::MetaFailed`). A `meta` of another
    /// cluster or geometry, or with an activity log larger than the file
    /// holds, is refused without writing or latching.
    pub fn persist(&mut self, meta: &Meta) -> Result<(), StoreError> {
        self.persist_as(meta, false)
    }

    /// Raise the node's start epoch by one and make it durable (a commit
    /// of `meta`: a superblock write and `fdatasync`, plus the bitmap
    /// pages that differ from disk); returns the new epoch. The daemon
    /// calls it once per start, before it sends anything, with the
    /// metadata it loaded: a peer then tells a restarted node from a
    /// replay of its old frames. Files written before the epoch was kept
    /// hold 0, so their first start is epoch 1.
    ///
    /// On `Err` the epoch is not raised; after an I/O error the file holds
    /// the old or the new epoch and the store is latched (the daemon does
    /// not start), so an epoch this returned `Ok` for is never returned
    /// again.
    pub fn next_epoch(&mut self, meta: &Meta) -> Result<u64, StoreError> {
        self.latched()?;
        let old = self.epoch;
        let next = old.checked_add(1).ok_or_else(|| StoreError::Corrupt {
            path: self.path.clone(),
            detail: format!("start epoch {old} cannot be raised (the field is 32 bits)"),
        })?;
        self.epoch = next;
        match self.persist_as(meta, true) {
            Ok(()) => Ok(u64::from(next)),
            Err(e) => {
                self.epoch = old;
                Err(e)
            }
        }
    }

    /// The start epoch the newest superblock holds (0 for files written
    /// before it was kept).
    pub fn epoch(&self) -> u64 {
        u64::from(self.epoch)
    }

    /// [`MetaStore::persist`]; with `commit`, as a commit whatever
    /// changed.
    fn persist_as(&mut self, meta: &Meta, commit: bool) -> Result<(), StoreError> {
        self.latched()?;
        if let Some((key, found, expected)) = self.label.geo.diff(&Geometry::of(meta)) {
            return Err(StoreError::Mismatch {
                path: self.path.clone(),
                key,
                found,
                expected,
            });
        }
        if meta.al.len() > self.label.al_capacity as usize {
            return Err(StoreError::TooLarge {
                path: self.path.clone(),
                need: SB_HDR as u64 + meta.encode_fields().len() as u64,
                cap: u64::from(self.label.sb_size),
            });
        }
        let bm = &meta.dirty;
        let new_al: BTreeSet<u64> = meta.al.iter().copied().collect();
        // Pages whose content may differ from disk. A page that differs
        // (inside the log) but has not changed since the last persist
        // still differs only inside the log's extents: it needs a look
        // only if one of them leaves the log, or for a commit.
        let mut cand: BTreeSet<usize> = BTreeSet::new();
        match self.last {
            Some((o, s)) if o == bm.origin() && s <= bm.change_seq() => {
                cand.extend(bm.changed_pages_since(s));
                let blocks = self.label.geo.volume_blocks;
                for &e in self.al.difference(&new_al) {
                    let (a, z) = extent_range(e, self.extent_blocks, blocks);
                    if a < z {
                        let (pa, pz) = (a / PAGE_BITS, (z - 1) / PAGE_BITS);
                        cand.extend(self.differs.range(pa as usize..=pz as usize).copied());
                    }
                }
            }
            _ => {
                cand.extend(self.differs.iter().copied());
                cand.extend(
                    (0..bm.page_count()).filter(|&p| words_crc(bm.page_words(p)) != self.crc[p]),
                )
            }
        }
        if cand.len() > BULK_PAGES {
            // Too many pages for a transaction (a full sync marks the whole
            // map): a commit at once. It writes every page whose content
            // is not its durable one by checksum (as below), plus those the
            // log holds apart, without reading the durable copies back or
            // holding them: for a fully dirty 8 TiB map that is 256 MiB of
            // reads and of memory saved.
            let mut diffs: Vec<(usize, Vec<u64>)> = cand
                .into_iter()
                .filter(|&p| {
                    self.pending.contains_key(&p)
                        || self.differs.contains(&p)
                        || words_crc(bm.page_words(p)) != self.crc[p]
                })
                .map(|p| (p, Vec::new()))
                .collect();
            let seen: BTreeSet<usize> = diffs.iter().map(|(p, _)| *p).collect();
            let apart: Vec<usize> = self
                .differs
                .iter()
                .chain(self.pending.keys())
                .filter(|p| !seen.contains(p))
                .copied()
                .collect();
            diffs.extend(apart.into_iter().map(|p| (p, Vec::new())));
            let result = self.commit(meta, new_al, diffs);
            if result.is_ok() {
                self.stats.persists += 1;
                self.last = Some((bm.origin(), bm.change_seq()));
            }
            return result;
        }
        let mut diffs: Vec<(usize, Vec<u64>)> = Vec::new();
        for p in cand {
            if !self.pending.contains_key(&p) && words_crc(bm.page_words(p)) == self.crc[p] {
                continue;
            }
            let d = self.durable_page(p)?;
            if d != bm.page_words(p) {
                diffs.push((p, d));
            } else {
                self.differs.remove(&p);
                if !self.carried.contains(&p) {
                    self.pending.remove(&p);
                }
            }
        }
        let tx = if commit {
            None
        } else {
            self.plan_tx(meta, &new_al, &diffs)
        };
        if tx.is_none() {
            // A commit writes every page that differs.
            let seen: BTreeSet<usize> = diffs.iter().map(|(p, _)| *p).collect();
            for &p in self.differs.difference(&seen) {
                diffs.push((p, self.pending[&p].clone()));
            }
        }
        let result = match tx {
            Some(tx) if tx.added.is_empty() && tx.evicted.is_empty() => {
                // Only bits inside the log changed: nothing to write.
                self.stats.skipped += 1;
                for (p, d) in diffs {
                    self.pending.insert(p, d);
                    self.differs.insert(p);
                }
                Ok(())
            }
            Some(tx) => self.write_tx(tx, meta, new_al, diffs),
            None => self.commit(meta, new_al, diffs),
        };
        if result.is_ok() {
            self.stats.persists += 1;
            self.last = Some((bm.origin(), bm.change_seq()));
        }
        result
    }

    /// The transaction that makes `meta` durable, if one can.
    fn plan_tx(
        &self,
        meta: &Meta,
        new_al: &BTreeSet<u64>,
        diffs: &[(usize, Vec<u64>)],
    ) -> Option<Tx> {
        if meta.clean || State::of(meta) != self.state {
            return None;
        }
        let eb = self.extent_blocks;
        let blocks = self.label.geo.volume_blocks;
        let evicted: BTreeSet<u64> = self.al.difference(new_al).copied().collect();
        // Every differing bit must lie in a logged or evicted extent.
        let mut carry = BTreeSet::new();
        for (p, d) in diffs {
            for (i, (m, w)) in meta.dirty.page_words(*p).iter().zip(d).enumerate() {
                let mut x = m ^ w;
                while x != 0 {
                    let bit = x.trailing_zeros();
                    x &= x - 1;
                    let block = ((p * PAGE_WORDS + i) as u64) * 64 + u64::from(bit);
                    let e = block / eb;
                    if evicted.contains(&e) {
                        carry.insert(e);
                    } else if !new_al.contains(&e) {
                        return None;
                    }
                }
            }
        }
        let tx = Tx {
            seq: self.al_seq + 1,
            extent_blocks: eb,
            added: new_al.difference(&self.al).copied().collect(),
            evicted: evicted
                .iter()
                .map(|&e| {
                    let bits = carry.contains(&e).then(|| {
                        let (a, z) = extent_range(e, eb, blocks);
                        read_bits(&meta.dirty, a, z)
                    });
                    (e, bits)
                })
                .collect(),
        };
        let room = self.al_seq - self.sb_al_seq < u64::from(self.label.ring_len) - 1;
        (tx.payload_len(blocks) <= BLOCK - TX_HDR && room).then_some(tx)
    }

    fn write_tx(
        &mut self,
        tx: Tx,
        meta: &Meta,
        new_al: BTreeSet<u64>,
        diffs: Vec<(usize, Vec<u64>)>,
    ) -> Result<(), StoreError> {
        let off = self.label.tx_offset(tx.seq);
        let seq = tx.seq;
        self.write(&tx.encode(), off, || {
            format!("write activity-log transaction {seq} at offset {off}")
        })?;
        self.sync()?;
        self.stats.transactions += 1;
        self.al_seq = seq;
        self.al = new_al;
        // The durable content of the pages now includes the carried bits.
        let blocks = self.label.geo.volume_blocks;
        let mut diffs: BTreeMap<usize, Vec<u64>> = diffs.into_iter().collect();
        for (e, bits) in &tx.evicted {
            if bits.is_none() {
                continue;
            }
            let (a, z) = extent_range(*e, tx.extent_blocks, blocks);
            for (p, d) in diffs.iter_mut() {
                let base = (*p * PAGE_WORDS) as u64 * 64;
                let end = base + d.len() as u64 * 64;
                let (pa, pz) = (a.max(base), z.min(end));
                if pa < pz {
                    self.carried.insert(*p);
                    // Bits of this page inside the extent, from the map.
                    let src = read_bits(&meta.dirty, pa, pz);
                    write_bits(d, pa - base, pz - base, &src);
                }
            }
        }
        for (p, d) in diffs {
            self.crc[p] = words_crc(&d);
            if d == meta.dirty.page_words(p) {
                self.differs.remove(&p);
            } else {
                self.differs.insert(p);
            }
            if d == meta.dirty.page_words(p) && !self.carried.contains(&p) {
                self.pending.remove(&p);
            } else {
                self.pending.insert(p, d);
            }
        }
        Ok(())
    }

    fn commit(
        &mut self,
        meta: &Meta,
        new_al: BTreeSet<u64>,
        diffs: Vec<(usize, Vec<u64>)>,
    ) -> Result<(), StoreError> {
        let seq = self.seq + 1;
        // Uniform pages go as runs in the superblock, as many as its slot
        // holds beside the fields.
        let fields = meta.encode_fields().len();
        let room = (self.label.sb_size as usize).saturating_sub(SB_HDR + fields + RUNS_HDR) / 8;
        let (runs, kinds) = uniform_runs(&meta.dirty, room);
        // Pages whose carried bits live only in transactions go too: the
        // new superblock ends their replay. So do pages leaving the runs:
        // their copies are stale.
        let mut write: BTreeSet<usize> = diffs.into_iter().map(|(p, _)| p).collect();
        write.extend(self.carried.iter().copied());
        write.extend(
            (0..kinds.len()).filter(|&p| self.kinds[p] != Kind::Copy && kinds[p] == Kind::Copy),
        );
        write.retain(|&p| kinds[p] == Kind::Copy);
        for p in &write {
            let c = 1 - usize::from(self.cur[*p]);
            let off = self.label.page_offset(*p, c);
            let b = encode_page(*p, seq, meta.dirty.page_words(*p));
            self.write(&b, off, || format!("write bitmap page {p} at offset {off}"))?;
            self.stats.pages_written += 1;
        }
        if !write.is_empty() {
            self.sync()?;
        }
        let slot = self.next;
        let b = encode_sb(
            &SbPlace {
                slot,
                seq,
                al_seq: self.al_seq,
                extent_blocks: self.extent_blocks,
                epoch: self.epoch,
            },
            meta,
            &runs,
        );
        let off = self.label.sb_offset(slot);
        self.write(&b, off, || {
            format!("write superblock {} at offset {off}", slot_name(slot))
        })?;
        self.sync()?;
        self.stats.commits += 1;
        for p in write {
            self.cur[p] = 1 - self.cur[p];
            self.crc[p] = words_crc(meta.dirty.page_words(p));
        }
        let nwords = self.label.geo.volume_blocks.div_ceil(64) as usize;
        let (zero, full) = (
            uniform_crc(Kind::Zero, PAGE_WORDS),
            uniform_crc(Kind::Full, PAGE_WORDS),
        );
        for (p, k) in kinds.iter().enumerate() {
            self.crc[p] = match k {
                Kind::Copy => continue,
                Kind::Full => full,
                Kind::Zero if page_len(nwords, p) == PAGE_WORDS => zero,
                Kind::Zero => uniform_crc(Kind::Zero, page_len(nwords, p)),
            };
        }
        self.kinds = kinds;
        self.pending.clear();
        self.differs.clear();
        self.carried.clear();
        self.seq = seq;
        self.next = 1 - slot;
        self.sb_al_seq = self.al_seq;
        self.state = State::of(meta);
        self.al = new_al;
        Ok(())
    }

    /// Sequence number of the newest durable superblock (one per commit).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Sequence number of the newest durable activity-log transaction.
    pub fn al_seq(&self) -> u64 {
        self.al_seq
    }

    /// What the persists since open cost.
    pub fn stats(&self) -> MetaStats {
        self.stats
    }

    /// The superblock (`'A'` or `'B'`) the next commit writes.
    pub fn next_slot(&self) -> char {
        slot_name(self.next)
    }

    /// Byte offset and size of superblock `'A'` or `'B'` (for tests and
    /// `mslctl dump-md`).
    pub fn slot_region(&self, slot: char) -> (u64, u64) {
        let i = usize::from(slot == 'B');
        (self.label.sb_offset(i), u64::from(self.label.sb_size))
    }

    /// Byte offset of the ring block that transaction `seq` goes to.
    pub fn transaction_offset(&self, seq: u64) -> u64 {
        self.label.tx_offset(seq)
    }

    /// Byte offset of copy `copy` (0 or 1) of bitmap page `page`, and the
    /// copy that holds the page's durable content.
    pub fn page_offset(&self, page: usize, copy: usize) -> (u64, usize) {
        (
            self.label.page_offset(page, copy),
            usize::from(self.cur.get(page).copied().unwrap_or(0)),
        )
    }

    /// Length of the file for this layout.
    pub fn file_len(&self) -> u64 {
        self.label.file_len()
    }

    /// The superblock that was unusable when the file was opened, and why
    /// (e.g. `('B', "checksum mismatch ...")` after a crash during a
    /// commit, or `"never written"` for a fresh file). Worth a log line;
    /// not an error: the other one was loaded.
    pub fn rejected_slot(&self) -> Option<(char, &str)> {
        self.rejected.as_ref().map(|(c, s)| (*c, s.as_str()))
    }

    /// The underlying I/O object.
    pub fn io(&self) -> &D {
        &self.io
    }

    /// The metadata file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True once an I/O error latched the store.
    pub fn is_failed(&self) -> bool {
        self.failed.is_some()
    }
}

/// Convert the format-1 metadata file at `path` to format 2 in place
/// (`mslctl convert-md`): the newest valid format-1 version is read, a
/// format-2 file holding it is written under a temporary name and renamed
/// over `path`; the old file is kept as `<path>.v1`. Returns the
/// converted metadata. Refuses a file that is not format 1.
pub fn convert_v1_to_v2(path: &Path, opts: &CreateOptions) -> Result<Meta, StoreError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| io_err(path, "open", e))?;
    lock(&file, WHAT, path)?;
    let mut lb = [0u8; LABEL_LEN];
    MetaIo::pread_exact(&file, &mut lb, 0).map_err(|e| io_err(path, "read label", e))?;
    match Label::decode(&lb, path) {
        Err(StoreError::OldFormat { .. }) => {}
        Err(e) => return Err(e),
        Ok(_) => {
            return Err(StoreError::Corrupt {
                path: path.to_path_buf(),
                detail: format!("already format {FORMAT}: nothing to convert"),
            })
        }
    }
    let meta = crate::v1::load(&file, path)?;
    let mut backup = path.as_os_str().to_owned();
    backup.push(".v1");
    let backup = PathBuf::from(backup);
    fs::hard_link(path, &backup).map_err(|e| io_err(&backup, "keep the format-1 file", e))?;
    let opts = CreateOptions {
        force: true,
        al_capacity: opts.al_capacity.max(meta.al.len() as u32),
        ..*opts
    };
    // The lock is on the old inode; `create` renames the new file over it.
    drop(file);
    MetaStore::create(path, &meta, &opts)?;
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_runs_round_trip_and_bad_runs_are_refused() {
        // Four pages and a partial fifth.
        let blocks = 4 * PAGE_BITS + 10;
        let mut map = Bitmap::new(blocks);
        map.set_range(PAGE_BITS, 2 * PAGE_BITS);
        map.set(3 * PAGE_BITS + 1);
        let (runs, kinds) = uniform_runs(&map, 10);
        use Kind::*;
        assert_eq!(runs, [(0, 1, Zero), (1, 2, Full), (4, 1, Zero)]);
        assert_eq!(kinds, [Zero, Full, Full, Copy, Zero]);
        let mut b = Vec::new();
        encode_runs(&runs, &mut b);
        assert_eq!(decode_runs(&b, blocks), Ok(kinds));
        assert_eq!(decode_runs(&[], blocks), Ok(vec![Copy; 5]));
        // Room for two runs: the third page kind is left to its copy.
        let (runs, kinds) = uniform_runs(&map, 2);
        assert_eq!(runs.len(), 2);
        assert_eq!(kinds[4], Copy);
        let bad = |runs: &[(u32, u32, Kind)]| {
            let mut b = Vec::new();
            encode_runs(runs, &mut b);
            decode_runs(&b, blocks)
        };
        assert!(bad(&[(1, 1, Zero), (0, 1, Zero)]).is_err(), "out of order");
        assert!(bad(&[(0, 2, Zero), (1, 1, Full)]).is_err(), "overlapping");
        assert!(bad(&[(2, 0, Zero)]).is_err(), "empty");
        assert!(bad(&[(3, 3, Zero)]).is_err(), "past the end");
        assert!(bad(&[(4, 1, Full)]).is_err(), "full partial page");
        assert!(bad(&[(4, 1, Zero)]).is_ok());
        let mut b = Vec::new();
        encode_runs(&[(0, 1, Zero)], &mut b);
        assert!(decode_runs(&b[..b.len() - 1], blocks).is_err(), "torn");
        b[0] ^= 1;
        assert!(decode_runs(&b, blocks).is_err(), "magic");
    }
}
