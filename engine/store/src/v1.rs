//! Reader for metadata format 1 (a superblock and two A/B slots, each
//! holding the whole encoded `Meta`), kept only to convert such files to
//! the current format (`convert_v1_to_v2`).
//!
//! Format 1 layout (all integers little-endian):
//!
//! ```text
//! [0, 4096)                      superblock
//!   0  magic "MSLSTOR\0"   8  format u32 (1)  12 reserved u32
//!   16 slot_size u64       24 cluster_id u64   32 volume_blocks u64
//!   40 block_size u32      44 node_id u16      46 reserved u16
//!   48 al_capacity u32     52 crc32c of bytes [0, 52) u32
//! [4096, 4096 + S)               slot A
//! [4096 + S, 4096 + 2S)          slot B
//!   0  magic "MSLSLOT1"    8  seq u64   16 len u32   20 slot index u32
//!   24 crc32c u32 of bytes [0, 24) followed by the payload
//!   28 reserved u32        32 payload: `Meta::encode()` (len bytes)
//! ```

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

use msl_core::meta::Meta;

use crate::error::StoreError;
use crate::io::MetaIo;
use crate::meta_store::{io_err, le32, le64, Geometry};

const PAGE: u64 = 4096;
/// Format number at offset 8 of the superblock.
pub(crate) const SB_FORMAT: u32 = 1;
const SB_MAGIC: &[u8; 8] = b"MSLSTOR\0";
const SB_LEN: usize = 56;
const SLOT_MAGIC: &[u8; 8] = b"MSLSLOT1";
const SLOT_HDR: usize = 32;
/// Refuse absurd slot sizes from a (CRC-valid but) hostile superblock.
const MAX_SLOT: u64 = 1 << 32;

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

/// Load the newest valid version of a format-1 file.
pub(crate) fn load<D: MetaIo>(io: &D, path: &Path) -> Result<Meta, StoreError> {
    let path = path.to_path_buf();
    let len = io.file_len().map_err(|e| io_err(&path, "stat", e))?;
    let mut sbb = [0u8; SB_LEN];
    if len < SB_LEN as u64 {
        return Err(StoreError::Truncated {
            path,
            len,
            need: PAGE,
        });
    }
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
    match found {
        [Ok((sa, ma)), Ok((sb_, mb))] => Ok(if sb_ > sa { mb } else { ma }),
        [Ok((_, m)), Err(_)] | [Err(_), Ok((_, m))] => Ok(m),
        [Err(slot_a), Err(slot_b)] => Err(StoreError::BothSlotsBad {
            path,
            slot_a,
            slot_b,
        }),
    }
}

/// Write a complete format-1 file holding `meta` (sequence 1 in slot A):
/// for tests of the conversion.
pub(crate) fn write(path: &Path, meta: &Meta, al_capacity: u32) -> io::Result<()> {
    let geo = Geometry::of(meta);
    let mut m = meta.clone();
    m.al = vec![0; al_capacity.max(meta.al.len() as u32) as usize];
    let need = SLOT_HDR + m.encode().len();
    let sb = Superblock {
        slot_size: (need as u64).div_ceil(PAGE) * PAGE,
        geo,
        al_capacity,
    };
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)?;
    f.set_len(sb.file_len())?;
    MetaIo::pwrite_all(&f, &sb.encode(), 0)?;
    MetaIo::pwrite_all(&f, &encode_slot(0, 1, &meta.encode()), sb.slot_offset(0))?;
    File::sync_all(&f)
}
