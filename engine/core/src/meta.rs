//! Persistent node metadata and the memory image, with their byte encoding.
//!
//! Both are versioned and checksummed (CRC32C over everything before the
//! trailer). Decoding untrusted bytes never panics: every length is checked
//! against the remaining input before it is used.

use alloc::vec::Vec;
use core::fmt;

use msl_wire::{DiskState, Generations, Role, HISTORY_LEN};

use crate::bitmap::{Bitmap, PAGE_WORDS};

const META_MAGIC: &[u8; 8] = b"MSLMETA\0";
const IMAGE_MAGIC: &[u8; 8] = b"MSLIMAG\0";
const FIELDS_MAGIC: &[u8; 8] = b"MSLMFLD\0";
/// Format version of [`Meta::encode`]; bump on any layout change.
pub const META_VERSION: u32 = 1;
/// Format version of [`Image::encode`]: 2 sends only the bitmap pages
/// that hold a set bit (1 sent every word), so the image of a large,
/// mostly clean volume stays small.
pub const IMAGE_VERSION: u32 = 2;

/// What a node keeps on disk (written atomically by the host).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    pub cluster_id: u64,
    pub node_id: u16,
    pub volume_blocks: u64,
    pub block_size: u32,
    pub gens: Generations,
    pub disk: DiskState,
    /// Role when this was written; `Primary` after a crash means the node
    /// was a crashed primary.
    pub role: Role,
    /// Set by a clean shutdown, cleared when the node starts.
    pub clean: bool,
    /// Blocks out of sync with the peer (source: peer lacks them; target:
    /// this node lacks them).
    pub dirty: Bitmap,
    /// Activity log: extents that may hold writes not yet stable on both
    /// nodes. Merged into `dirty` when the peer is lost or after a crash.
    pub al: Vec<u64>,
}

impl Meta {
    /// Fresh metadata for a new node. The initial primary's data is
    /// declared authoritative (new generation); the other starts
    /// inconsistent and receives a full sync.
    pub fn create(
        cluster_id: u64,
        node_id: u16,
        volume_blocks: u64,
        block_size: u32,
        initial_generation: Option<u64>,
    ) -> Meta {
        Meta {
            cluster_id,
            node_id,
            volume_blocks,
            block_size,
            gens: Generations {
                current: initial_generation.unwrap_or(0),
                ..Generations::default()
            },
            disk: if initial_generation.is_some() {
                DiskState::UpToDate
            } else {
                DiskState::Inconsistent
            },
            role: Role::Secondary,
            clean: true,
            dirty: Bitmap::new(volume_blocks),
            al: Vec::new(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        self.encode_as(META_MAGIC, true)
    }

    /// Everything but the dirty bitmap (which a paged store keeps in its
    /// own pages), checksummed like [`Meta::encode`]; read back with
    /// [`Meta::decode_fields`].
    pub fn encode_fields(&self) -> Vec<u8> {
        self.encode_as(FIELDS_MAGIC, false)
    }

    /// Decode what [`Meta::encode_fields`] wrote; the dirty map comes back
    /// empty, sized for `volume_blocks`.
    pub fn decode_fields(bytes: &[u8]) -> Result<Meta, DecodeError> {
        Self::decode_as(bytes, FIELDS_MAGIC, false)
    }

    fn encode_as(&self, magic: &[u8; 8], with_bitmap: bool) -> Vec<u8> {
        let nwords = if with_bitmap {
            self.dirty.words().len()
        } else {
            0
        };
        let mut w = Writer(Vec::with_capacity(128 + nwords * 8 + self.al.len() * 8));
        w.bytes(magic);
        w.u32(META_VERSION);
        w.u64(self.cluster_id);
        w.u16(self.node_id);
        w.u64(self.volume_blocks);
        w.u32(self.block_size);
        w.gens(&self.gens);
        w.u8(disk_code(self.disk));
        w.u8(role_code(self.role));
        w.u8(u8::from(self.clean));
        w.u32(self.al.len() as u32);
        for e in &self.al {
            w.u64(*e);
        }
        w.u32(nwords as u32);
        if with_bitmap {
            for x in self.dirty.words() {
                w.u64(*x);
            }
        }
        w.finish()
    }

    pub fn decode(bytes: &[u8]) -> Result<Meta, DecodeError> {
        Self::decode_as(bytes, META_MAGIC, true)
    }

    fn decode_as(bytes: &[u8], magic: &[u8; 8], with_bitmap: bool) -> Result<Meta, DecodeError> {
        let mut r = Reader::checked(bytes, magic, META_VERSION)?;
        let cluster_id = r.u64()?;
        let node_id = r.u16()?;
        let volume_blocks = r.u64()?;
        let block_size = r.u32()?;
        let gens = r.gens()?;
        let disk = disk_from(r.u8()?).ok_or(DecodeError::BadField("disk state"))?;
        let role = role_from(r.u8()?).ok_or(DecodeError::BadField("role"))?;
        let clean = r.bool()?;
        let al_len = r.u32()? as usize;
        let mut al = Vec::with_capacity(al_len.min(r.remaining() / 8));
        for _ in 0..al_len {
            let e = r.u64()?;
            al.push(e);
        }
        let dirty = if with_bitmap {
            r.bitmap(volume_blocks)?
        } else {
            if r.u32()? != 0 {
                return Err(DecodeError::BadField("dirty bitmap length"));
            }
            Bitmap::new(volume_blocks)
        };
        r.end()?;
        Ok(Meta {
            cluster_id,
            node_id,
            volume_blocks,
            block_size,
            gens,
            disk,
            role,
            clean,
            dirty,
            al,
        })
    }
}

/// The memory image: what a returning server needs to stand in instantly,
/// sent first in a resync.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    pub cluster_id: u64,
    pub node_id: u16,
    pub volume_blocks: u64,
    pub block_size: u32,
    pub gens: Generations,
    pub disk: DiskState,
    pub role: Role,
    /// The sender's dirty map (the receiver merges it with its own).
    pub dirty: Bitmap,
    /// The sender's next reliable sequence number (diagnostics, and the
    /// base for resuming).
    pub tx_next_seq: u64,
    /// Opaque state registered by the front end (e.g. export parameters).
    pub frontend: Vec<u8>,
}

impl Image {
    /// The bitmap goes as its page count, then each page with a set bit:
    /// its index (u32, ascending) and its words.
    pub fn encode(&self) -> Vec<u8> {
        let pages: Vec<usize> = (0..self.dirty.page_count())
            .filter(|&p| self.dirty.page_ones(p) != 0)
            .collect();
        let mut w = Writer(Vec::with_capacity(
            128 + pages.len() * (4 + PAGE_WORDS * 8) + self.frontend.len(),
        ));
        w.bytes(IMAGE_MAGIC);
        w.u32(IMAGE_VERSION);
        w.u64(self.cluster_id);
        w.u16(self.node_id);
        w.u64(self.volume_blocks);
        w.u32(self.block_size);
        w.gens(&self.gens);
        w.u8(disk_code(self.disk));
        w.u8(role_code(self.role));
        w.u64(self.tx_next_seq);
        w.u32(self.frontend.len() as u32);
        w.bytes(&self.frontend);
        w.u32(self.dirty.page_count() as u32);
        w.u32(pages.len() as u32);
        for p in pages {
            w.u32(p as u32);
            for x in self.dirty.page_words(p) {
                w.u64(*x);
            }
        }
        w.finish()
    }

    pub fn decode(bytes: &[u8]) -> Result<Image, DecodeError> {
        let mut r = Reader::checked(bytes, IMAGE_MAGIC, IMAGE_VERSION)?;
        let cluster_id = r.u64()?;
        let node_id = r.u16()?;
        let volume_blocks = r.u64()?;
        let block_size = r.u32()?;
        let gens = r.gens()?;
        let disk = disk_from(r.u8()?).ok_or(DecodeError::BadField("disk state"))?;
        let role = role_from(r.u8()?).ok_or(DecodeError::BadField("role"))?;
        let tx_next_seq = r.u64()?;
        let fe_len = r.u32()? as usize;
        let frontend = r.take(fe_len)?.to_vec();
        let dirty = r.sparse_bitmap(volume_blocks)?;
        r.end()?;
        Ok(Image {
            cluster_id,
            node_id,
            volume_blocks,
            block_size,
            gens,
            disk,
            role,
            dirty,
            tx_next_seq,
            frontend,
        })
    }
}

fn disk_code(d: DiskState) -> u8 {
    match d {
        DiskState::UpToDate => 0,
        DiskState::Outdated => 1,
        DiskState::Inconsistent => 2,
        DiskState::Failed => 3,
        DiskState::Unknown(n) => n,
    }
}

fn disk_from(c: u8) -> Option<DiskState> {
    Some(match c {
        0 => DiskState::UpToDate,
        1 => DiskState::Outdated,
        2 => DiskState::Inconsistent,
        3 => DiskState::Failed,
        _ => return None,
    })
}

fn role_code(r: Role) -> u8 {
    match r {
        Role::Secondary => 0,
        Role::Primary => 1,
        Role::Unknown(n) => n,
    }
}

fn role_from(c: u8) -> Option<Role> {
    Some(match c {
        0 => Role::Secondary,
        1 => Role::Primary,
        _ => return None,
    })
}

/// Why metadata or an image could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    Truncated { need: usize, have: usize },
    BadMagic,
    BadVersion(u32),
    BadChecksum { computed: u32, stored: u32 },
    BadField(&'static str),
    TrailingBytes(usize),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated { need, have } => {
                write!(f, "truncated: need {need} more bytes, have {have}")
            }
            DecodeError::BadMagic => write!(f, "not msl metadata (bad magic)"),
            DecodeError::BadVersion(v) => write!(
                f,
                "unsupported version {v} (this build reads metadata {META_VERSION}, images {IMAGE_VERSION})"
            ),
            DecodeError::BadChecksum { computed, stored } => {
                write!(
                    f,
                    "checksum mismatch: computed {computed:#010x}, stored {stored:#010x}"
                )
            }
            DecodeError::BadField(what) => write!(f, "invalid {what}"),
            DecodeError::TrailingBytes(n) => write!(f, "{n} unexpected trailing bytes"),
        }
    }
}

struct Writer(Vec<u8>);

impl Writer {
    fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.bytes(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
    fn gens(&mut self, g: &Generations) {
        self.u64(g.current);
        self.u64(g.bitmap);
        for h in g.history {
            self.u64(h);
        }
    }
    fn finish(mut self) -> Vec<u8> {
        let crc = crc32c::crc32c(&self.0);
        self.u32(crc);
        self.0
    }
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn checked(bytes: &'a [u8], magic: &[u8; 8], version: u32) -> Result<Self, DecodeError> {
        if bytes.len() < 16 {
            return Err(DecodeError::Truncated {
                need: 16,
                have: bytes.len(),
            });
        }
        if &bytes[..8] != magic {
            return Err(DecodeError::BadMagic);
        }
        let (body, trailer) = bytes.split_at(bytes.len() - 4);
        let stored = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
        let computed = crc32c::crc32c(body);
        if stored != computed {
            return Err(DecodeError::BadChecksum { computed, stored });
        }
        let mut r = Reader { buf: &body[8..] };
        let v = r.u32()?;
        if v != version {
            return Err(DecodeError::BadVersion(v));
        }
        Ok(r)
    }
    fn remaining(&self) -> usize {
        self.buf.len()
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated {
                need: n,
                have: self.buf.len(),
            });
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn bool(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::BadField("boolean")),
        }
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn gens(&mut self) -> Result<Generations, DecodeError> {
        let current = self.u64()?;
        let bitmap = self.u64()?;
        let mut history = [0u64; HISTORY_LEN];
        for h in &mut history {
            *h = self.u64()?;
        }
        Ok(Generations {
            current,
            bitmap,
            history,
        })
    }
    fn bitmap(&mut self, blocks: u64) -> Result<Bitmap, DecodeError> {
        let n = self.u32()? as usize;
        if n as u64 != blocks.div_ceil(64) || n > self.remaining() / 8 {
            return Err(DecodeError::BadField("dirty bitmap length"));
        }
        let mut words = Vec::with_capacity(n);
        for _ in 0..n {
            words.push(self.u64()?);
        }
        Bitmap::from_words(blocks, words).ok_or(DecodeError::BadField("dirty bitmap"))
    }
    /// A bitmap as [`Image::encode`] writes it: the page count, then the
    /// pages with a set bit, by ascending index.
    fn sparse_bitmap(&mut self, blocks: u64) -> Result<Bitmap, DecodeError> {
        let mut b = Bitmap::new(blocks);
        if self.u32()? as usize != b.page_count() {
            return Err(DecodeError::BadField("dirty bitmap page count"));
        }
        let n = self.u32()? as usize;
        let mut next = 0usize;
        let mut words = Vec::with_capacity(PAGE_WORDS);
        for _ in 0..n {
            let p = self.u32()? as usize;
            if p < next || p >= b.page_count() {
                return Err(DecodeError::BadField("dirty bitmap page index"));
            }
            next = p + 1;
            words.clear();
            for _ in 0..b.page_words(p).len() {
                words.push(self.u64()?);
            }
            b.set_page_words(p, &words);
        }
        Ok(b)
    }
    fn end(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes(self.buf.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Meta {
        let mut m = Meta::create(0xC1, 1, 200, 4096, Some(77));
        m.dirty.set(3);
        m.dirty.set(199);
        m.al = alloc::vec![1, 5];
        m.gens.history[0] = 9;
        m
    }

    #[test]
    fn test_meta_roundtrip() {
        let m = sample();
        assert_eq!(Meta::decode(&m.encode()), Ok(m));
    }

    #[test]
    fn test_meta_any_bit_flip_rejected() {
        let bytes = sample().encode();
        for i in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(Meta::decode(&b).is_err(), "flip of bit {i} accepted");
        }
    }

    #[test]
    fn test_fields_roundtrip_without_bitmap() {
        let m = sample();
        let bytes = m.encode_fields();
        assert!(bytes.len() < m.encode().len());
        let got = Meta::decode_fields(&bytes).unwrap();
        assert_eq!(got.dirty, Bitmap::new(m.volume_blocks));
        assert_eq!(
            Meta {
                dirty: m.dirty.clone(),
                ..got
            },
            m
        );
        assert!(
            Meta::decode(&bytes).is_err(),
            "fields are not full metadata"
        );
        assert!(Meta::decode_fields(&m.encode()).is_err());
        for i in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(Meta::decode_fields(&b).is_err(), "flip of bit {i} accepted");
        }
    }

    #[test]
    fn test_image_roundtrip() {
        let m = sample();
        let img = Image {
            cluster_id: 1,
            node_id: 2,
            volume_blocks: m.volume_blocks,
            block_size: 4096,
            gens: m.gens,
            disk: DiskState::UpToDate,
            role: Role::Primary,
            dirty: m.dirty.clone(),
            tx_next_seq: 5,
            frontend: alloc::vec![1, 2, 3],
        };
        assert_eq!(Image::decode(&img.encode()), Ok(img));
    }

    fn image(dirty: Bitmap) -> Image {
        Image {
            cluster_id: 1,
            node_id: 2,
            volume_blocks: dirty.len(),
            block_size: 4096,
            gens: Generations::default(),
            disk: DiskState::UpToDate,
            role: Role::Primary,
            dirty,
            tx_next_seq: 5,
            frontend: alloc::vec![1, 2, 3],
        }
    }

    #[test]
    fn test_image_of_a_large_clean_volume_is_small() {
        // 8 TiB of 4 KiB blocks, two dirty bits far apart.
        let mut dirty = Bitmap::new(1 << 31);
        dirty.set(7);
        dirty.set((1 << 31) - 1);
        let img = image(dirty);
        let bytes = img.encode();
        assert!(bytes.len() < 3 * 4096 + 256, "{} bytes", bytes.len());
        assert_eq!(Image::decode(&bytes), Ok(img));
    }

    #[test]
    fn test_image_any_bit_flip_rejected() {
        let mut dirty = Bitmap::new(100_000);
        dirty.set(3);
        dirty.set(99_999);
        let bytes = image(dirty).encode();
        for i in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(Image::decode(&b).is_err(), "flip of bit {i} accepted");
        }
    }

    proptest! {
        #[test]
        fn prop_image_roundtrip(bits in proptest::collection::vec(0u64..200_000, 0..50)) {
            let mut dirty = Bitmap::new(200_000);
            for b in bits { dirty.set(b); }
            let img = image(dirty);
            prop_assert_eq!(Image::decode(&img.encode()), Ok(img));
        }

        #[test]
        fn prop_decode_arbitrary_bytes_never_panics(b in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = Meta::decode(&b);
            let _ = Image::decode(&b);
        }

        #[test]
        fn prop_truncated_meta_rejected(cut in 0usize..100) {
            let bytes = sample().encode();
            let cut = cut.min(bytes.len() - 1);
            prop_assert!(Meta::decode(&bytes[..cut]).is_err());
        }
    }
}
