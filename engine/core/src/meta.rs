//! Persistent node metadata and the memory image, with their byte encoding.
//!
//! Both are versioned and checksummed (CRC32C over everything before the
//! trailer). Decoding untrusted bytes never panics: every length is checked
//! against the remaining input before it is used.

use alloc::vec::Vec;
use core::fmt;

use msl_wire::{DiskState, Generations, Role, HISTORY_LEN};

use crate::bitmap::{Bitmap, PAGE_BITS, PAGE_WORDS};

const META_MAGIC: &[u8; 8] = b"MSLMETA\0";
const IMAGE_MAGIC: &[u8; 8] = b"MSLIMAG\0";
const FIELDS_MAGIC: &[u8; 8] = b"MSLMFLD\0";
/// Format version of [`Meta::encode`]; bump on any layout change.
pub const META_VERSION: u32 = 1;
/// Format version of [`Image::encode`]: 2 sends only the bitmap pages
/// that hold a set bit (1 sent every word), so the image of a large,
/// mostly clean volume stays small; 3 sends a page with every bit set as
/// its index alone ([`FULL_PAGE`]), so does the image of a volume wholly
/// out of sync.
pub const IMAGE_VERSION: u32 = 3;

/// Flag of an image's page index: the page has every bit set, and no
/// words follow.
pub const FULL_PAGE: u32 = 1 << 31;

/// An image's record of page `p` with a set bit: its index, flagged
/// [`FULL_PAGE`] when every bit is set, else followed by its words.
fn page_record(dirty: &Bitmap, p: usize, out: &mut Vec<u8>) {
    if dirty.page_full(p) {
        out.extend_from_slice(&(p as u32 | FULL_PAGE).to_le_bytes());
        return;
    }
    out.extend_from_slice(&(p as u32).to_le_bytes());
    for x in dirty.page_words(p) {
        out.extend_from_slice(&x.to_le_bytes());
    }
}

/// Bytes of [`page_record`] for page `p`.
fn page_record_len(dirty: &Bitmap, p: usize) -> u64 {
    if dirty.page_full(p) {
        4
    } else {
        4 + 8 * dirty.page_words(p).len() as u64
    }
}

/// A page index read from an image: the page, and whether it is full.
/// Refused unless it follows `next` and lies inside the map.
fn page_index(x: u32, next: usize, dirty: &Bitmap) -> Result<(usize, bool), DecodeError> {
    let p = (x & !FULL_PAGE) as usize;
    let full = x & FULL_PAGE != 0;
    if p < next || p >= dirty.page_count() || (full && !dirty.page_may_fill(p)) {
        return Err(DecodeError::BadField("dirty bitmap page index"));
    }
    Ok((p, full))
}

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

    /// The length of what [`Meta::encode_fields`] wrote at the start of
    /// `bytes` (which may go on with other data), read from its
    /// activity-log count; `None` if `bytes` is too short to tell or to
    /// hold it. [`Meta::decode_fields`] checks the content.
    pub fn fields_len(bytes: &[u8]) -> Option<usize> {
        // Magic, version, ids, geometry, generations, disk, role, clean.
        const AL_COUNT_AT: usize = 8 + 4 + 8 + 2 + 8 + 4 + 8 * (2 + HISTORY_LEN) + 3;
        let n = bytes.get(AL_COUNT_AT..AL_COUNT_AT + 4)?;
        let al = u32::from_le_bytes([n[0], n[1], n[2], n[3]]) as usize;
        // The count, the extents, the (zero) bitmap length, the checksum.
        let len = al.checked_mul(8)?.checked_add(AL_COUNT_AT + 4 + 4 + 4)?;
        (len <= bytes.len()).then_some(len)
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
    /// its index (u32, ascending; flagged [`FULL_PAGE`] when every bit is
    /// set) and, unless full, its words.
    pub fn encode(&self) -> Vec<u8> {
        let pages: Vec<usize> = (0..self.dirty.page_count())
            .filter(|&p| self.dirty.page_ones(p) != 0)
            .collect();
        let bytes: u64 = pages.iter().map(|&p| page_record_len(&self.dirty, p)).sum();
        let mut w = Writer(Vec::with_capacity(
            128 + bytes as usize + self.frontend.len(),
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
            page_record(&self.dirty, p, &mut w.0);
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

/// Activity-log extents one metadata write may add: as many as fit one
/// transaction block of the metadata store's ring (4 KiB less its 40-byte
/// header), counting each as an addition (extent u64, kind u8) plus, in
/// the worst case, the eviction of a slot with its bits (extent, kind,
/// `extent_blocks` bits). The store writes such a batch as one
/// transaction (its tests check this); a larger one would cost it a full
/// commit.
pub fn al_txn_extents(extent_blocks: u64) -> usize {
    const TXN_PAYLOAD: u64 = 4096 - 40;
    let per = 9 + 9 + extent_blocks.div_ceil(64) * 8;
    (TXN_PAYLOAD / per).max(1) as usize
}

/// Largest front-end state an image may carry (it is opaque export
/// parameters, a few bytes): a corrupt length is refused before anything
/// is buffered for it.
pub const MAX_FRONTEND: usize = 1 << 20;

/// Bytes of the image before the front-end state: magic, version, ids,
/// geometry, generations, disk, role, sequence, front-end length.
const IMAGE_FIXED: usize = 8 + 4 + 8 + 2 + 8 + 4 + 8 * (2 + HISTORY_LEN) + 1 + 1 + 8 + 4;

/// Produces the bytes of [`Image::encode`] piece by piece, so an image of
/// any size is sent in chunks without ever being built whole: it holds a
/// copy-on-write snapshot of the bitmap (one pointer per page) and at most
/// one encoded page. [`ImageEncoder::total_len`] and
/// [`ImageEncoder::image_crc`] are known before the first chunk.
#[derive(Clone)]
pub struct ImageEncoder {
    dirty: Bitmap,
    /// Encoded bytes not handed out yet, and how many of them were.
    pending: Vec<u8>,
    pending_at: usize,
    /// Next page to look at.
    next_page: usize,
    /// Running CRC32C of the body (everything before the trailer).
    body_crc: u32,
    /// The trailer was produced.
    trailer_done: bool,
    total_len: u64,
    image_crc: u32,
    /// Bytes handed out so far.
    produced: u64,
}

impl ImageEncoder {
    pub fn new(img: &Image) -> ImageEncoder {
        let dirty = img.dirty.clone();
        let npages = (0..dirty.page_count())
            .filter(|&p| dirty.page_ones(p) != 0)
            .count();
        let page_bytes: u64 = (0..dirty.page_count())
            .filter(|&p| dirty.page_ones(p) != 0)
            .map(|p| page_record_len(&dirty, p))
            .sum();
        let mut w = Writer(Vec::with_capacity(IMAGE_FIXED + img.frontend.len() + 8));
        w.bytes(IMAGE_MAGIC);
        w.u32(IMAGE_VERSION);
        w.u64(img.cluster_id);
        w.u16(img.node_id);
        w.u64(img.volume_blocks);
        w.u32(img.block_size);
        w.gens(&img.gens);
        w.u8(disk_code(img.disk));
        w.u8(role_code(img.role));
        w.u64(img.tx_next_seq);
        w.u32(img.frontend.len() as u32);
        w.bytes(&img.frontend);
        w.u32(dirty.page_count() as u32);
        w.u32(npages as u32);
        let head = w.0;
        let total_len = head.len() as u64 + page_bytes + 4;
        let mut enc = ImageEncoder {
            dirty,
            body_crc: crc32c::crc32c(&head),
            pending: head,
            pending_at: 0,
            next_page: 0,
            trailer_done: false,
            total_len,
            image_crc: 0,
            produced: 0,
        };
        // One pass over a copy for the whole-image checksum the chunk
        // headers carry (CPU only: the copy shares the bitmap's pages).
        let mut probe = enc.clone();
        let mut crc = 0;
        let mut buf = alloc::vec![0u8; 64 << 10];
        loop {
            let n = probe.fill(&mut buf);
            if n == 0 {
                break;
            }
            crc = crc32c::crc32c_append(crc, &buf[..n]);
        }
        enc.image_crc = crc;
        enc
    }

    /// Length of the whole image in bytes.
    pub fn total_len(&self) -> u64 {
        self.total_len
    }

    /// CRC32C of the whole image (trailer included).
    pub fn image_crc(&self) -> u32 {
        self.image_crc
    }

    /// Bytes not produced yet.
    pub fn remaining(&self) -> u64 {
        self.total_len - self.produced
    }

    /// The next chunk of at most `max` bytes (`max` > 0), or `None` once
    /// everything was produced.
    pub fn next_chunk(&mut self, max: usize) -> Option<Vec<u8>> {
        let mut out = alloc::vec![0u8; max];
        let n = self.fill(&mut out);
        if n == 0 {
            return None;
        }
        out.truncate(n);
        Some(out)
    }

    /// Fill `out` with the next bytes; returns how many (0: finished).
    fn fill(&mut self, out: &mut [u8]) -> usize {
        let mut n = 0;
        while n < out.len() {
            if self.pending_at == self.pending.len() && !self.refill() {
                break;
            }
            let k = (self.pending.len() - self.pending_at).min(out.len() - n);
            out[n..n + k].copy_from_slice(&self.pending[self.pending_at..self.pending_at + k]);
            self.pending_at += k;
            n += k;
        }
        self.produced += n as u64;
        n
    }

    /// Encode the next piece (a page with a set bit, or the trailer).
    fn refill(&mut self) -> bool {
        self.pending.clear();
        self.pending_at = 0;
        while self.next_page < self.dirty.page_count() {
            let p = self.next_page;
            self.next_page += 1;
            if self.dirty.page_ones(p) == 0 {
                continue;
            }
            page_record(&self.dirty, p, &mut self.pending);
            self.body_crc = crc32c::crc32c_append(self.body_crc, &self.pending);
            return true;
        }
        if self.trailer_done {
            return false;
        }
        self.trailer_done = true;
        self.pending.extend_from_slice(&self.body_crc.to_le_bytes());
        true
    }
}

/// Decodes an image as its chunks arrive, never holding more of it than
/// one chunk plus one bitmap page beyond the bitmap it builds. The bytes
/// and checks are those of [`Image::decode`]; the volume size is checked
/// against this node's before the bitmap is allocated.
pub struct ImageDecoder {
    local_blocks: u64,
    /// Bytes received and not parsed yet (`buf[at..]`).
    buf: Vec<u8>,
    at: usize,
    received: u64,
    /// Running CRC32C of the parsed body.
    body_crc: u32,
    state: DecState,
    img: Option<Image>,
    /// Pages with a set bit still to come, the next allowed page index,
    /// and the page whose words come next.
    pages_left: u32,
    next_page: usize,
    page: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum DecState {
    Fixed,
    Frontend(usize),
    Counts,
    PageIndex,
    PageWords,
    Trailer,
    Done,
}

impl ImageDecoder {
    /// A decoder for an image of a `local_blocks`-block volume.
    pub fn new(local_blocks: u64) -> ImageDecoder {
        ImageDecoder {
            local_blocks,
            buf: Vec::new(),
            at: 0,
            received: 0,
            body_crc: 0,
            state: DecState::Fixed,
            img: None,
            pages_left: 0,
            next_page: 0,
            page: 0,
        }
    }

    /// Bytes pushed so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Feed the next bytes of the image.
    pub fn push(&mut self, data: &[u8]) -> Result<(), DecodeError> {
        self.received += data.len() as u64;
        if self.at > 0 {
            self.buf.drain(..self.at);
            self.at = 0;
        }
        self.buf.extend_from_slice(data);
        loop {
            let need = match self.state {
                DecState::Fixed => IMAGE_FIXED,
                DecState::Frontend(n) => n,
                DecState::Counts => 8,
                DecState::PageIndex => 4,
                DecState::PageWords => 8 * self.img_ref().dirty.page_words(self.page).len(),
                DecState::Trailer => 4,
                DecState::Done => {
                    let extra = self.buf.len() - self.at;
                    if extra > 0 {
                        return Err(DecodeError::TrailingBytes(extra));
                    }
                    return Ok(());
                }
            };
            if self.buf.len() - self.at < need {
                // Check magic and version as soon as they are in.
                if self.state == DecState::Fixed && self.buf.len() - self.at >= 12 {
                    Self::check_magic(&self.buf[self.at..self.at + 12])?;
                }
                return Ok(());
            }
            let start = self.at;
            self.at += need;
            let rec = &self.buf[start..start + need];
            if self.state != DecState::Trailer {
                self.body_crc = crc32c::crc32c_append(self.body_crc, rec);
            }
            let rec: Vec<u8> = rec.to_vec();
            self.step(&rec)?;
        }
    }

    fn img_ref(&self) -> &Image {
        self.img
            .as_ref()
            .expect("image fields parsed before its pages")
    }

    fn check_magic(b: &[u8]) -> Result<(), DecodeError> {
        if &b[..8] != IMAGE_MAGIC {
            return Err(DecodeError::BadMagic);
        }
        let v = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        if v != IMAGE_VERSION {
            return Err(DecodeError::BadVersion(v));
        }
        Ok(())
    }

    fn step(&mut self, rec: &[u8]) -> Result<(), DecodeError> {
        let mut r = Reader { buf: rec };
        match self.state {
            DecState::Fixed => {
                Self::check_magic(r.take(12)?)?;
                let cluster_id = r.u64()?;
                let node_id = r.u16()?;
                let volume_blocks = r.u64()?;
                if volume_blocks != self.local_blocks {
                    return Err(DecodeError::Geometry {
                        image: volume_blocks,
                        local: self.local_blocks,
                    });
                }
                let block_size = r.u32()?;
                let gens = r.gens()?;
                let disk = disk_from(r.u8()?).ok_or(DecodeError::BadField("disk state"))?;
                let role = role_from(r.u8()?).ok_or(DecodeError::BadField("role"))?;
                let tx_next_seq = r.u64()?;
                let fe_len = r.u32()? as usize;
                if fe_len > MAX_FRONTEND {
                    return Err(DecodeError::BadField("front-end state length"));
                }
                self.img = Some(Image {
                    cluster_id,
                    node_id,
                    volume_blocks,
                    block_size,
                    gens,
                    disk,
                    role,
                    dirty: Bitmap::new(volume_blocks),
                    tx_next_seq,
                    frontend: Vec::new(),
                });
                self.state = DecState::Frontend(fe_len);
            }
            DecState::Frontend(_) => {
                if let Some(img) = self.img.as_mut() {
                    img.frontend = rec.to_vec();
                }
                self.state = DecState::Counts;
            }
            DecState::Counts => {
                let page_count = r.u32()? as usize;
                let n = r.u32()?;
                let have = self.img_ref().dirty.page_count();
                if page_count != have || n as usize > have {
                    return Err(DecodeError::BadField("dirty bitmap page count"));
                }
                self.pages_left = n;
                self.state = if n == 0 {
                    DecState::Trailer
                } else {
                    DecState::PageIndex
                };
            }
            DecState::PageIndex => {
                let (p, full) = page_index(r.u32()?, self.next_page, &self.img_ref().dirty)?;
                self.next_page = p + 1;
                self.page = p;
                if !full {
                    self.state = DecState::PageWords;
                    return Ok(());
                }
                if let Some(img) = self.img.as_mut() {
                    img.dirty.set_range(p as u64 * PAGE_BITS, PAGE_BITS);
                }
                self.page_done();
            }
            DecState::PageWords => {
                let mut words = [0u64; PAGE_WORDS];
                let n = rec.len() / 8;
                for w in words.iter_mut().take(n) {
                    *w = r.u64()?;
                }
                let page = self.page;
                if let Some(img) = self.img.as_mut() {
                    img.dirty.set_page_words(page, &words[..n]);
                }
                self.page_done();
            }
            DecState::Trailer => {
                let stored = r.u32()?;
                if stored != self.body_crc {
                    return Err(DecodeError::BadChecksum {
                        computed: self.body_crc,
                        stored,
                    });
                }
                self.state = DecState::Done;
            }
            DecState::Done => {}
        }
        Ok(())
    }

    /// A page's record is in: the next one, or the trailer.
    fn page_done(&mut self) {
        self.pages_left -= 1;
        self.state = if self.pages_left == 0 {
            DecState::Trailer
        } else {
            DecState::PageIndex
        };
    }

    /// The image, once all of it arrived and checked.
    pub fn finish(self) -> Result<Image, DecodeError> {
        match (self.state, self.img) {
            (DecState::Done, Some(img)) => Ok(img),
            _ => Err(DecodeError::Truncated { need: 1, have: 0 }),
        }
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
    Truncated {
        need: usize,
        have: usize,
    },
    BadMagic,
    BadVersion(u32),
    BadChecksum {
        computed: u32,
        stored: u32,
    },
    BadField(&'static str),
    TrailingBytes(usize),
    /// An image of a volume of another size (blocks in the image, blocks
    /// here): refused before its bitmap is allocated.
    Geometry {
        image: u64,
        local: u64,
    },
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
            DecodeError::Geometry { image, local } => write!(
                f,
                "image of a {image}-block volume, this volume has {local} blocks"
            ),
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
            let (p, full) = page_index(self.u32()?, next, &b)?;
            next = p + 1;
            if full {
                b.set_range(p as u64 * PAGE_BITS, PAGE_BITS);
                continue;
            }
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
    fn test_fields_len_finds_the_end_of_the_fields() {
        let mut m = sample();
        m.al = alloc::vec![3, 9, 12];
        let mut b = m.encode_fields();
        let n = b.len();
        assert_eq!(Meta::fields_len(&b), Some(n));
        b.extend_from_slice(b"more");
        assert_eq!(Meta::fields_len(&b), Some(n));
        assert!(Meta::decode_fields(&b[..n]).is_ok());
        assert_eq!(Meta::fields_len(&b[..n - 1]), None);
        assert_eq!(Meta::fields_len(&b[..40]), None);
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

    /// The image streamed through the encoder and decoder `chunk` bytes
    /// at a time.
    fn stream(img: &Image, chunk: usize) -> (Vec<u8>, Result<Image, DecodeError>) {
        let mut enc = ImageEncoder::new(img);
        let mut dec = ImageDecoder::new(img.volume_blocks);
        let mut all = Vec::new();
        while let Some(c) = enc.next_chunk(chunk) {
            assert!(c.len() <= chunk);
            all.extend_from_slice(&c);
            if let Err(e) = dec.push(&c) {
                return (all, Err(e));
            }
        }
        assert_eq!(enc.remaining(), 0);
        assert_eq!(all.len() as u64, enc.total_len());
        assert_eq!(crc32c::crc32c(&all), enc.image_crc());
        (all, dec.finish())
    }

    #[test]
    fn test_streamed_image_is_the_encoded_image() {
        let mut dirty = Bitmap::new(3 * PAGE_BITS + 17);
        dirty.set(0);
        dirty.set(2 * PAGE_BITS + 5);
        dirty.set(3 * PAGE_BITS + 16);
        let img = image(dirty);
        for chunk in [1, 3, 1024, 4068, 1 << 20] {
            let (bytes, got) = stream(&img, chunk);
            assert_eq!(bytes, img.encode(), "chunk {chunk}");
            assert_eq!(got, Ok(img.clone()), "chunk {chunk}");
        }
    }

    #[test]
    fn test_image_above_the_old_64mib_cap_round_trips_in_1kib_chunks() {
        // 4 TiB of 4 KiB blocks, every 1000th dirty: every page holds a
        // set bit, so the image carries the whole 128 MiB map.
        let blocks = 1u64 << 30;
        let mut dirty = Bitmap::new(blocks);
        let mut b = 0;
        while b < blocks {
            dirty.set(b);
            b += 1000;
        }
        let img = image(dirty);
        let mut enc = ImageEncoder::new(&img);
        assert!(enc.total_len() > 128 << 20, "{} bytes", enc.total_len());
        let mut dec = ImageDecoder::new(blocks);
        let mut crc = 0;
        while let Some(c) = enc.next_chunk(1024) {
            crc = crc32c::crc32c_append(crc, &c);
            dec.push(&c).unwrap();
            assert!(
                dec.buf.capacity() < 64 << 10,
                "decoder buffered {}",
                dec.buf.capacity()
            );
        }
        assert_eq!(dec.received(), enc.total_len());
        assert_eq!(crc, enc.image_crc());
        let got = dec.finish().unwrap();
        assert_eq!(got.dirty.count(), img.dirty.count());
        assert!(got == img);
    }

    #[test]
    fn test_streamed_image_of_another_volume_size_refused_before_its_map() {
        let img = image(Bitmap::new(1000));
        let mut dec = ImageDecoder::new(1 << 40);
        let bytes = img.encode();
        assert_eq!(
            dec.push(&bytes),
            Err(DecodeError::Geometry {
                image: 1000,
                local: 1 << 40
            })
        );
        assert!(dec.img.is_none());
    }

    #[test]
    fn test_streamed_image_of_another_version_refused_with_its_number() {
        let mut bytes = image(Bitmap::new(1000)).encode();
        bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
        let mut dec = ImageDecoder::new(1000);
        let e = dec.push(&bytes[..12]).unwrap_err();
        assert_eq!(e, DecodeError::BadVersion(2));
        assert!(alloc::format!("{e}").contains("unsupported version 2"));
    }

    #[test]
    fn test_image_of_a_map_wholly_dirty_sends_full_pages_as_their_index() {
        // Three full pages and a partial last one, less two bits.
        let len = 3 * PAGE_BITS + 100;
        let mut dirty = Bitmap::new(len);
        dirty.set_all();
        dirty.clear(PAGE_BITS + 7);
        let img = image(dirty);
        let bytes = img.encode();
        // Two full pages as an index each; page 1 and the last with words.
        let words = PAGE_WORDS + 2;
        assert_eq!(
            bytes.len(),
            image(Bitmap::new(len)).encode().len() + 4 * 4 + 8 * words
        );
        assert_eq!(Image::decode(&bytes).as_ref(), Ok(&img));
        let (streamed, decoded) = stream(&img, 7);
        assert_eq!(streamed, bytes);
        let got = decoded.unwrap();
        assert_eq!(got, img);
        assert_eq!(got.dirty.mixed_pages(), 2);
        // A full flag on the partial last page is refused.
        let mut last = Bitmap::new(len);
        last.set_range(3 * PAGE_BITS, 100);
        let mut b = image(last).encode();
        let at = b.len() - 4 - 8 * 2 - 4;
        b[at..at + 4].copy_from_slice(&(3 | FULL_PAGE).to_le_bytes());
        b.truncate(at + 4);
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(
            Image::decode(&b),
            Err(DecodeError::BadField("dirty bitmap page index"))
        );
    }

    #[test]
    fn test_streamed_image_any_bit_flip_rejected() {
        let mut dirty = Bitmap::new(100_000);
        dirty.set(3);
        dirty.set(99_999);
        let bytes = image(dirty).encode();
        for i in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[i / 8] ^= 1 << (i % 8);
            let mut dec = ImageDecoder::new(100_000);
            let r = dec.push(&b).and_then(|_| dec.finish());
            assert!(r.is_err(), "flip of bit {i} accepted");
        }
    }

    #[test]
    fn test_streamed_image_truncated_or_extended_rejected() {
        let bytes = image(Bitmap::new(1000)).encode();
        let mut dec = ImageDecoder::new(1000);
        dec.push(&bytes[..bytes.len() - 1]).unwrap();
        assert!(dec.finish().is_err());
        let mut dec = ImageDecoder::new(1000);
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(dec.push(&long), Err(DecodeError::TrailingBytes(1)));
    }

    proptest! {
        #[test]
        fn prop_streamed_image_roundtrip_any_chunking(
            bits in proptest::collection::vec(0u64..200_000, 0..50),
            chunk in 1usize..5000,
        ) {
            let mut dirty = Bitmap::new(200_000);
            for b in bits { dirty.set(b); }
            let img = image(dirty);
            let (bytes, got) = stream(&img, chunk);
            prop_assert_eq!(bytes, img.encode());
            prop_assert_eq!(got, Ok(img));
        }

        #[test]
        fn prop_streamed_decode_arbitrary_bytes_never_panics(
            b in proptest::collection::vec(any::<u8>(), 0..400),
            blocks in 0u64..100_000,
        ) {
            let mut dec = ImageDecoder::new(blocks);
            let _ = dec.push(&b).and_then(|_| dec.finish());
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
