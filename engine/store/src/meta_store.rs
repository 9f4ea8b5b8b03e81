//! Crash-safe metadata: a superblock and two alternately written slots.
//!
//! File layout (all integers little-endian):
//!
//! ```text
//! [0, 4096)                      superblock (written once, at create)
//!   0  magic "MSLSTOR\0"   8  format u32   12 reserved u32
//!   16 slot_size u64       24 cluster_id u64   32 volume_blocks u64
//!   40 block_size u32      44 node_id u16      46 reserved u16
//!   48 al_capacity u32     52 crc32c of bytes [0, 52) u32
//! [4096, 4096 + S)               slot A
//! [4096 + S, 4096 + 2S)          slot B
//!   0  magic "MSLSLOT1"    8  seq u64   16 len u32   20 slot index u32
//!   24 crc32c u32 of bytes [0, 24) followed by the payload
//!   28 reserved u32        32 payload: `Meta::encode()` (len bytes)
//! ```
//!
//! `S` is a multiple of 4 KiB large enough for the encoded `Meta` of the
//! geometry with `al_capacity` activity-log extents. The file is created
//! complete (both slots allocated) under a temporary name, synced, and
//! linked into place, so its length never changes afterwards.
//!
//! A persist writes header and payload with one `pwrite` into the slot
//! that does not hold the newest valid version, with `seq` one above the
//! newest, then `fdatasync`s. Until the sync returns, the other slot still
//! holds the previous version untouched; a torn write fails its CRC.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io;
use std::path::{Path, PathBuf};

use msl_core::meta::Meta;
use msl_core::Config;

use crate::error::StoreError;
use crate::io::MetaIo;

/// Alignment of the superblock region and of slot sizes.
pub const PAGE: u64 = 4096;
/// Activity-log capacity reserved per slot by [`CreateOptions::default`]
/// (8 bytes per extent; far above the core's default of 61).
pub const DEFAULT_AL_CAPACITY: u32 = 4096;

const SB_MAGIC: &[u8; 8] = b"MSLSTOR\0";
const SB_FORMAT: u32 = 1;
const SB_LEN: usize = 56;
const SLOT_MAGIC: &[u8; 8] = b"MSLSLOT1";
const SLOT_HDR: usize = 32;
/// Refuse absurd slot sizes from a (CRC-valid but) hostile superblock.
const MAX_SLOT: u64 = 1 << 32;
const WHAT: &str = "metadata";

/// Options for [`MetaStore::create`].
#[derive(Clone, Copy, Debug)]
pub struct CreateOptions {
    /// Overwrite an existing file (`mslctl create-md --force`).
    pub force: bool,
    /// Activity-log extents each slot must hold (at least the configured
    /// `al_extents`).
    pub al_capacity: u32,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            force: false,
            al_capacity: DEFAULT_AL_CAPACITY,
        }
    }
}

/// Identity and geometry recorded in the superblock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Geometry {
    cluster_id: u64,
    node_id: u16,
    volume_blocks: u64,
    block_size: u32,
}

impl Geometry {
    fn of(m: &Meta) -> Geometry {
        Geometry {
            cluster_id: m.cluster_id,
            node_id: m.node_id,
            volume_blocks: m.volume_blocks,
            block_size: m.block_size,
        }
    }

    /// The first field that differs: (key, self's value, other's value).
    fn diff(&self, other: &Geometry) -> Option<(&'static str, String, String)> {
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

#[derive(Clone, Copy, Debug)]
struct Superblock {
    slot_size: u64,
    geo: Geometry,
    al_capacity: u32,
}

impl Superblock {
    fn encode(&self) -> [u8; SB_LEN] {
        let mut b = [0u8; SB_LEN];
        b[0..8].copy_from_slice(SB_MAGIC);
        b[8..12].copy_from_slice(&SB_FORMAT.to_le_bytes());
        b[16..24].copy_from_slice(&self.slot_size.to_le_bytes());
        b[24..32].copy_from_slice(&self.geo.cluster_id.to_le_bytes());
        b[32..40].copy_from_slice(&self.geo.volume_blocks.to_le_bytes());
        b[40..44].copy_from_slice(&self.geo.block_size.to_le_bytes());
        b[44..46].copy_from_slice(&self.geo.node_id.to_le_bytes());
        b[48..52].copy_from_slice(&self.al_capacity.to_le_bytes());
        let crc = crc32c::crc32c(&b[..52]);
        b[52..56].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// `Err((is_msl, detail))`.
    fn decode(b: &[u8; SB_LEN]) -> Result<Superblock, (bool, String)> {
        if &b[0..8] != SB_MAGIC {
            if b.iter().all(|&x| x == 0) {
                return Err((false, "the superblock is all zeroes".into()));
            }
            return Err((false, format!("bad superblock magic {:02x?}", &b[0..8])));
        }
        let stored = le32(&b[52..56]);
        let computed = crc32c::crc32c(&b[..52]);
        if stored != computed {
            return Err((
                true,
                format!(
                    "superblock checksum mismatch (computed {computed:#010x}, stored {stored:#010x})"
                ),
            ));
        }
        let format = le32(&b[8..12]);
        if format != SB_FORMAT {
            return Err((
                true,
                format!("unsupported store format {format} (this build reads {SB_FORMAT})"),
            ));
        }
        let slot_size = le64(&b[16..24]);
        if slot_size < PAGE || !slot_size.is_multiple_of(PAGE) || slot_size > MAX_SLOT {
            return Err((true, format!("invalid slot size {slot_size} in superblock")));
        }
        Ok(Superblock {
            slot_size,
            geo: Geometry {
                cluster_id: le64(&b[24..32]),
                volume_blocks: le64(&b[32..40]),
                block_size: le32(&b[40..44]),
                node_id: u16::from_le_bytes([b[44], b[45]]),
            },
            al_capacity: le32(&b[48..52]),
        })
    }

    fn slot_offset(&self, slot: usize) -> u64 {
        PAGE + slot as u64 * self.slot_size
    }

    fn file_len(&self) -> u64 {
        PAGE + 2 * self.slot_size
    }
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le64(b: &[u8]) -> u64 {
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

/// Header + payload for one slot write.
fn encode_slot(slot: usize, seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(SLOT_HDR + payload.len());
    b.extend_from_slice(SLOT_MAGIC);
    b.extend_from_slice(&seq.to_le_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    b.extend_from_slice(&(slot as u32).to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..24]), payload);
    b.extend_from_slice(&crc.to_le_bytes());
    b.extend_from_slice(&[0u8; 4]);
    b.extend_from_slice(payload);
    b
}

/// Why a slot holds no usable version.
enum SlotFault {
    /// Expected after a crash (torn or never written): fall back.
    Invalid(String),
    /// The slot's checksum is valid but its content is not: a format or
    /// software problem, not a torn write. Never silently roll back.
    Fatal(String),
}

fn decode_slot(slot: usize, buf: &[u8], geo: &Geometry) -> Result<(u64, Meta), SlotFault> {
    use SlotFault::{Fatal, Invalid};
    if buf[..SLOT_HDR].iter().all(|&x| x == 0) {
        return Err(Invalid("never written".into()));
    }
    if &buf[0..8] != SLOT_MAGIC {
        return Err(Invalid(format!("bad slot magic {:02x?}", &buf[0..8])));
    }
    let seq = le64(&buf[8..16]);
    let len = le32(&buf[16..20]) as usize;
    let index = le32(&buf[20..24]);
    let stored = le32(&buf[24..28]);
    if len > buf.len() - SLOT_HDR {
        return Err(Invalid(format!(
            "length {len} exceeds the slot capacity {}",
            buf.len() - SLOT_HDR
        )));
    }
    let payload = &buf[SLOT_HDR..SLOT_HDR + len];
    let computed = crc32c::crc32c_append(crc32c::crc32c(&buf[..24]), payload);
    if computed != stored {
        return Err(Invalid(format!(
            "checksum mismatch (seq {seq}, computed {computed:#010x}, stored {stored:#010x})"
        )));
    }
    if index as usize != slot {
        return Err(Fatal(format!(
            "slot {} holds a copy of slot {index} (seq {seq})",
            slot_name(slot)
        )));
    }
    let meta = Meta::decode(payload).map_err(|e| {
        Fatal(format!(
            "slot {} (seq {seq}) passes its checksum but its metadata does not decode: {e}",
            slot_name(slot)
        ))
    })?;
    if let Some((key, found, expected)) = Geometry::of(&meta).diff(geo) {
        return Err(Fatal(format!(
            "slot {} (seq {seq}) has {key} {found} but the superblock says {expected}",
            slot_name(slot)
        )));
    }
    Ok((seq, meta))
}

/// Encoded size of the largest `Meta` of this geometry.
fn max_meta_len(geo: &Geometry, al_capacity: u32) -> usize {
    let mut m = Meta::create(
        geo.cluster_id,
        geo.node_id,
        geo.volume_blocks,
        geo.block_size,
        None,
    );
    m.al = vec![0; al_capacity as usize];
    m.encode().len()
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

fn io_err(path: &Path, op: impl Into<String>, source: io::Error) -> StoreError {
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
/// through [`MetaStore::open`]).
#[derive(Debug)]
pub struct MetaStore<D: MetaIo = File> {
    path: PathBuf,
    io: D,
    sb: Superblock,
    /// Sequence number of the newest durable (or loaded) version.
    seq: u64,
    /// Slot the next persist writes (the one not holding `seq`).
    next: usize,
    /// First I/O error, once one happened.
    failed: Option<String>,
    /// At open: the slot not loaded, if it was unusable, and why.
    rejected: Option<(char, String)>,
}

impl MetaStore<File> {
    /// Create a new metadata file at `path` holding `meta` (sequence 1 in
    /// slot A), durably, and open it.
    ///
    /// Fails with [`StoreError::Exists`] if the file exists, unless
    /// `opts.force`. The file is written under a temporary name, synced,
    /// and linked (or, with `force`, renamed) into place, and the
    /// directory is synced: a crash leaves either no file (or the old one)
    /// or the complete new one.
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
        let al_capacity = opts.al_capacity.max(meta.al.len() as u32);
        let geo = Geometry::of(meta);
        let need = SLOT_HDR + max_meta_len(&geo, al_capacity);
        let sb = Superblock {
            slot_size: (need as u64).div_ceil(PAGE) * PAGE,
            geo,
            al_capacity,
        };
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
            f.set_len(sb.file_len())
                .map_err(|e| io_err(&tmp, "set length", e))?;
            MetaIo::pwrite_all(&f, &sb.encode(), 0)
                .map_err(|e| io_err(&tmp, "write superblock", e))?;
            // Write both slots in full (slot A padded, slot B zeroes) so
            // their blocks are allocated now: a later persist then cannot
            // fail with ENOSPC on filesystems that overwrite in place.
            let mut slot_a = encode_slot(0, 1, &meta.encode());
            slot_a.resize(sb.slot_size as usize, 0);
            MetaIo::pwrite_all(&f, &slot_a, sb.slot_offset(0))
                .map_err(|e| io_err(&tmp, "write slot A", e))?;
            slot_a.fill(0);
            MetaIo::pwrite_all(&f, &slot_a, sb.slot_offset(1))
                .map_err(|e| io_err(&tmp, "write slot B", e))?;
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
    /// size, and that the slots can hold `cfg.al_extents` extents.
    pub fn open_checked(path: &Path, cfg: &Config) -> Result<(Self, Meta), StoreError> {
        let (store, meta) = Self::open(path)?;
        let want = Geometry {
            cluster_id: cfg.cluster_id,
            node_id: cfg.node_id,
            volume_blocks: cfg.volume_blocks,
            block_size: cfg.block_size,
        };
        if let Some((key, found, expected)) = store.sb.geo.diff(&want) {
            return Err(StoreError::Mismatch {
                path: path.to_path_buf(),
                key,
                found,
                expected,
            });
        }
        if (store.sb.al_capacity as usize) < cfg.al_extents {
            return Err(StoreError::Mismatch {
                path: path.to_path_buf(),
                key: "al_extents (slot capacity)",
                found: store.sb.al_capacity.to_string(),
                expected: cfg.al_extents.to_string(),
            });
        }
        Ok((store, meta))
    }
}

impl<D: MetaIo> MetaStore<D> {
    /// Load from an already opened file (or a test wrapper around one).
    /// `path` is used in messages only. No lock is taken.
    pub fn open_io(io: D, path: &Path) -> Result<(Self, Meta), StoreError> {
        let path = path.to_path_buf();
        let len = io.file_len().map_err(|e| io_err(&path, "stat", e))?;
        if len < SB_LEN as u64 {
            if len == 0 {
                return Err(StoreError::NotMetadata {
                    path,
                    detail: "the file is empty".into(),
                });
            }
            return Err(StoreError::Truncated {
                path,
                len,
                need: PAGE,
            });
        }
        let mut sbb = [0u8; SB_LEN];
        io.pread_exact(&mut sbb, 0)
            .map_err(|e| io_err(&path, "read superblock", e))?;
        let sb = match Superblock::decode(&sbb) {
            Ok(sb) => sb,
            Err((false, detail)) => return Err(StoreError::NotMetadata { path, detail }),
            Err((true, detail)) => return Err(StoreError::Corrupt { path, detail }),
        };
        if len < sb.file_len() {
            return Err(StoreError::Truncated {
                path,
                len,
                need: sb.file_len(),
            });
        }
        let mut buf = vec![0u8; sb.slot_size as usize];
        let mut found: [Result<(u64, Meta), String>; 2] = [Err(String::new()), Err(String::new())];
        for (slot, out) in found.iter_mut().enumerate() {
            let off = sb.slot_offset(slot);
            io.pread_exact(&mut buf, off).map_err(|e| {
                io_err(
                    &path,
                    format!("read slot {} at offset {off}", slot_name(slot)),
                    e,
                )
            })?;
            *out = match decode_slot(slot, &buf, &sb.geo) {
                Ok(v) => Ok(v),
                Err(SlotFault::Invalid(why)) => Err(why),
                Err(SlotFault::Fatal(detail)) => return Err(StoreError::Corrupt { path, detail }),
            };
        }
        let [a, b] = found;
        let (newest, seq, meta, rejected) = match (a, b) {
            (Ok((sa, ma)), Ok((sb_, mb))) => {
                if sb_ > sa {
                    (1, sb_, mb, None)
                } else {
                    (0, sa, ma, None)
                }
            }
            (Ok((s, m)), Err(why)) => (0, s, m, Some(('B', why))),
            (Err(why), Ok((s, m))) => (1, s, m, Some(('A', why))),
            (Err(slot_a), Err(slot_b)) => {
                return Err(StoreError::BothSlotsBad {
                    path,
                    slot_a,
                    slot_b,
                })
            }
        };
        let store = MetaStore {
            path,
            io,
            sb,
            seq,
            next: 1 - newest,
            failed: None,
            rejected,
        };
        Ok((store, meta))
    }

    /// Write `meta` durably and atomically: one `pwrite` of header and
    /// payload into the older slot, then `fdatasync`. When this returns
    /// `Ok`, `meta` survives a crash; when it returns `Err`, the file
    /// holds either the previous or this version.
    ///
    /// The first I/O error latches the store: this call returns
    /// [`StoreError::Io`] and every later one [`StoreError::PreviousIo`]
    /// (the host then reports `Event::MetaFailed`). A `meta` of another
    /// cluster or geometry, or one too large for a slot, is refused without
    /// writing or latching.
    pub fn persist(&mut self, meta: &Meta) -> Result<(), StoreError> {
        if let Some(first) = &self.failed {
            return Err(StoreError::PreviousIo {
                what: WHAT,
                path: self.path.clone(),
                first: first.clone(),
            });
        }
        if let Some((key, found, expected)) = self.sb.geo.diff(&Geometry::of(meta)) {
            return Err(StoreError::Mismatch {
                path: self.path.clone(),
                key,
                found,
                expected,
            });
        }
        let seq = self.seq + 1;
        let buf = encode_slot(self.next, seq, &meta.encode());
        if buf.len() as u64 > self.sb.slot_size {
            return Err(StoreError::TooLarge {
                path: self.path.clone(),
                need: buf.len() as u64,
                cap: self.sb.slot_size,
            });
        }
        let off = self.sb.slot_offset(self.next);
        let op;
        let res = match self.io.pwrite_all(&buf, off) {
            Err(e) => {
                op = format!("write slot {} at offset {off}", slot_name(self.next));
                Err(e)
            }
            Ok(()) => {
                op = "fdatasync".to_string();
                self.io.fdatasync()
            }
        };
        match res {
            Ok(()) => {
                self.seq = seq;
                self.next = 1 - self.next;
                Ok(())
            }
            Err(e) => {
                let err = io_err(&self.path, op, e);
                self.failed = Some(err.to_string());
                Err(err)
            }
        }
    }

    /// Sequence number of the newest durable version.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The slot (`'A'` or `'B'`) the next persist writes.
    pub fn next_slot(&self) -> char {
        slot_name(self.next)
    }

    /// Byte offset and capacity of slot `'A'` or `'B'` (for tests and
    /// `mslctl dump-md`).
    pub fn slot_region(&self, slot: char) -> (u64, u64) {
        let i = usize::from(slot == 'B');
        (self.sb.slot_offset(i), self.sb.slot_size)
    }

    /// The slot that was unusable when the file was opened, and why
    /// (e.g. `('B', "checksum mismatch ...")` after a crash during a
    /// persist, or `"never written"` for a fresh file). Worth a log line;
    /// not an error: the other slot was loaded.
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
