//! The MSL frame: a fixed header, a fixed-size type-specific body, payload
//! bytes and a 16-byte AEGIS-128X4 MAC tag.
//!
//! The same bytes travel after the Ethernet header on the MSL and as the UDP
//! payload of LAN server-state packets.
//!
//! ```text
//!  0      2    3     4     5          6          7         8
//!  +------+----+-----+-----+----------+----------+---------+
//!  |magic |ver |type |flags|frag_index|frag_count|reserved |
//!  +------+----+-----+-----+----------+----------+---------+
//!  8 cluster_id u64 | 16 sender u16 | 18 body_len u16 | 20 payload_len u32
//!  24 generation u64 | 32 seq u64 | 40 ack u64 | 48 body ... payload ...
//!  then a 16-byte tag: AEGISMAC-128X4 (RFC 10032, all-zero nonce) over
//!  magic..payload, under the domain key's first 16 bytes if flags & AUTH,
//!  else under the well-known `KEYLESS_MAC_KEY`.
//! ```
//!
//! One pass over the frame both checks its integrity and authenticates it:
//! the tag replaces the CRC32C and the keyed BLAKE3 tag of version 2. A pair
//! without a cluster key still gets an integrity check (the tag under the
//! well-known key), which catches damage but, like a CRC, not forgery.
//!
//! All integers are big-endian. Everything here (field offsets, body layouts,
//! type codes, flag bits, the MAC) is fixed for `VERSION` 4; changing any of
//! it needs a version bump.
//!
//! [`parse`] validates a frame completely before returning it: after it
//! succeeds, every field of the returned [`Message`] is meaningful. It never
//! panics, never allocates and does not copy the payload.

use core::fmt;
use core::ops::Range;

use crate::msg::{
    data_flags, hello_flags, verify_flags, Ack, AdapterHealth, Data, DiskState, Generations,
    Header, Heartbeat, Hello, Message, MsgType, ResyncData, ResyncDone, Role, RoleChange,
    RolePhase, StateImageChunk, Verify, HISTORY_LEN, MAX_ADAPTERS, MAX_SACK,
};

/// A byte range inside a header or body (smoltcp style).
pub type Field = Range<usize>;

/// Frame magic, "MS".
pub const MAGIC: u16 = 0x4D53;
/// Wire format version. Frames with any other version are refused
/// (`ParseError::BadVersion`, whose message says which node to upgrade).
/// Version 4: the frame's MAC is AEGIS-128X4, four AEGIS-128L lanes side
/// by side (version 3 used AEGIS-128L; bench/README.md compares them).
/// Version 3 replaced a CRC32C and, when keyed, a keyed BLAKE3 tag
/// (version 2).
pub const VERSION: u8 = 4;
/// Length of the fixed frame header.
pub const HEADER_LEN: usize = field::HEADER_END;
/// Length of the MAC tag that ends every frame.
pub const TAG_LEN: usize = 16;
/// Length of an AEGIS-128X4 key: the first `MAC_KEY_LEN` bytes of a
/// [`Key`] key the frame MAC.
pub const MAC_KEY_LEN: usize = 16;
/// The MAC key of frames without `flags::AUTH` (pairs without a cluster
/// key). Public and fixed: the tag then guards against damage, not forgery.
pub const KEYLESS_MAC_KEY: [u8; MAC_KEY_LEN] = *b"msl keyless mac\0";
/// Largest body of any known message type.
pub const MAX_BODY_LEN: usize = body::ack::LEN;

/// Byte offsets of the fixed header fields.
pub mod field {
    use super::Field;

    /// `0x4D53` ("MS").
    pub const MAGIC: Field = 0..2;
    /// Wire format version.
    pub const VERSION: usize = 2;
    /// Message type code (see `MsgType::to_u8`).
    pub const MSG_TYPE: usize = 3;
    /// Header flags (see `super::flags`).
    pub const FLAGS: usize = 4;
    /// Index of this fragment, `< FRAG_COUNT`.
    pub const FRAG_INDEX: usize = 5;
    /// Number of fragments of the message, `>= 1`.
    pub const FRAG_COUNT: usize = 6;
    /// Must be zero.
    pub const RESERVED: usize = 7;
    /// Cluster the sender belongs to.
    pub const CLUSTER_ID: Field = 8..16;
    /// Sender node id.
    pub const SENDER: Field = 16..18;
    /// Length of the type-specific body that follows the header.
    pub const BODY_LEN: Field = 18..20;
    /// Length of the payload that follows the body.
    pub const PAYLOAD_LEN: Field = 20..24;
    /// Sender's data generation.
    pub const GENERATION: Field = 24..32;
    /// Reliable sequence number (0 for control messages).
    pub const SEQ: Field = 32..40;
    /// Piggybacked cumulative acknowledgement.
    pub const ACK: Field = 40..48;
    /// First byte after the header (start of the body).
    pub const HEADER_END: usize = 48;
}

/// Header flag bits. Bits not defined here are reserved and must be zero.
pub mod flags {
    /// The receiver must refuse the frame if it does not know its type
    /// (otherwise it may silently ignore it).
    pub const MUST_UNDERSTAND: u8 = 0x80;
    /// The tag is under the cluster's key for the domain (else under
    /// `KEYLESS_MAC_KEY`).
    pub const AUTH: u8 = 0x40;
    /// Every flag this version defines.
    pub const KNOWN: u8 = MUST_UNDERSTAND | AUTH;
}

/// Byte layouts of the type-specific bodies. Every body has a fixed size
/// (`LEN`); reserved bytes must be zero; bools are one byte, 0 or 1.
pub mod body {
    /// HELLO body.
    pub mod hello {
        use crate::frame::Field;
        /// `Role` code.
        pub const ROLE: usize = 0;
        /// `DiskState` code.
        pub const DISK: usize = 1;
        /// `hello_flags` bits.
        pub const FLAGS: usize = 2;
        /// Must be zero.
        pub const RESERVED: usize = 3;
        /// Block size in bytes.
        pub const BLOCK_SIZE: Field = 4..8;
        /// Volume size in bytes.
        pub const VOLUME_BYTES: Field = 8..16;
        /// `Generations::current`.
        pub const GEN_CURRENT: Field = 16..24;
        /// `Generations::bitmap`.
        pub const GEN_BITMAP: Field = 24..32;
        /// `Generations::history`, `HISTORY_LEN` u64s, newest first.
        pub const GEN_HISTORY: usize = 32;
        /// Dirty block count.
        pub const DIRTY_BLOCKS: Field = 64..72;
        /// Session id.
        pub const SESSION: Field = 72..80;
        /// Sender's start epoch.
        pub const EPOCH: Field = 80..88;
        /// Sender's packet counter in that epoch (shared with heartbeats).
        pub const COUNTER: Field = 88..96;
        /// Body length.
        pub const LEN: usize = 96;
    }

    /// DATA body.
    pub mod data {
        use crate::frame::Field;
        /// Write id.
        pub const WRITE_ID: Field = 0..8;
        /// Byte offset on the volume.
        pub const OFFSET: Field = 8..16;
        /// Byte length of the whole write.
        pub const LEN_BYTES: Field = 16..20;
        /// `data_flags` bits.
        pub const FLAGS: usize = 20;
        /// Must be zero.
        pub const RESERVED: Field = 21..24;
        /// Body length.
        pub const LEN: usize = 24;
    }

    /// ACK body.
    pub mod ack {
        use crate::frame::Field;
        /// Cumulative acknowledgement.
        pub const CUMULATIVE: Field = 0..8;
        /// Applied (written) point.
        pub const APPLIED: Field = 8..16;
        /// Stable (flushed) point.
        pub const STABLE: Field = 16..24;
        /// Number of valid SACK ranges, `<= MAX_SACK`.
        pub const SACK_LEN: usize = 24;
        /// Must be zero.
        pub const RESERVED: Field = 25..32;
        /// `MAX_SACK` ranges of (first u64, last u64), always all encoded.
        pub const SACK: usize = 32;
        /// Bytes per SACK range.
        pub const SACK_ENTRY_LEN: usize = 16;
        /// Body length.
        pub const LEN: usize = SACK + crate::msg::MAX_SACK * SACK_ENTRY_LEN;
    }

    /// HEARTBEAT body.
    pub mod heartbeat {
        use crate::frame::Field;
        /// `Role` code.
        pub const ROLE: usize = 0;
        /// `DiskState` code.
        pub const DISK: usize = 1;
        /// Bool.
        pub const MSL_UP: usize = 2;
        /// Bool.
        pub const IN_SYNC: usize = 3;
        /// Number of valid adapters, `<= MAX_ADAPTERS`.
        pub const ADAPTER_COUNT: usize = 4;
        /// Must be zero.
        pub const RESERVED: Field = 5..8;
        /// Sender's packet counter in its epoch.
        pub const COUNTER: Field = 8..16;
        /// Sender's start epoch.
        pub const EPOCH: Field = 16..24;
        /// `MAX_ADAPTERS` entries of (link_up, carrier, reachable, reserved),
        /// always all encoded.
        pub const ADAPTERS: usize = 24;
        /// Bytes per adapter entry.
        pub const ADAPTER_ENTRY_LEN: usize = 4;
        /// Body length.
        pub const LEN: usize = ADAPTERS + crate::msg::MAX_ADAPTERS * ADAPTER_ENTRY_LEN;
    }

    /// STATE_IMAGE body.
    pub mod state_image {
        use crate::frame::Field;
        /// Total image length (u64: an image is not limited to 4 GiB).
        pub const TOTAL_LEN: Field = 0..8;
        /// Offset of this chunk in the image.
        pub const OFFSET: Field = 8..16;
        /// CRC32C of the whole image.
        pub const IMAGE_CRC: Field = 16..20;
        /// Must be zero.
        pub const RESERVED: Field = 20..24;
        /// Body length.
        pub const LEN: usize = 24;
    }

    /// RESYNC_DATA body.
    pub mod resync_data {
        use crate::frame::Field;
        /// Byte offset on the volume.
        pub const OFFSET: Field = 0..8;
        /// Byte length of the range.
        pub const LEN_BYTES: Field = 8..12;
        /// `data_flags` bits.
        pub const FLAGS: usize = 12;
        /// Must be zero.
        pub const RESERVED: Field = 13..16;
        /// Body length.
        pub const LEN: usize = 16;
    }

    /// RESYNC_DONE body.
    pub mod resync_done {
        use crate::frame::Field;
        /// Blocks sent in this resync.
        pub const BLOCKS_SENT: Field = 0..8;
        /// Body length.
        pub const LEN: usize = 8;
    }

    /// ROLE_CHANGE body.
    pub mod role_change {
        use crate::frame::Field;
        /// `RolePhase` code.
        pub const PHASE: usize = 0;
        /// Must be zero.
        pub const RESERVED: Field = 1..8;
        /// Generation the new primary writes in.
        pub const GENERATION: Field = 8..16;
        /// Body length.
        pub const LEN: usize = 16;
    }

    /// VERIFY_REQ and VERIFY_REPLY body.
    pub mod verify {
        use crate::frame::Field;
        /// First block of the range.
        pub const START_BLOCK: Field = 0..8;
        /// Blocks in the range.
        pub const COUNT: Field = 8..12;
        /// `verify_flags` bits.
        pub const FLAGS: usize = 12;
        /// Must be zero.
        pub const RESERVED: Field = 13..16;
        /// Body length.
        pub const LEN: usize = 16;
    }
}

/// Pre-shared key of one domain. Its first `MAC_KEY_LEN` bytes key the
/// frame MAC (AEGIS-128X4); all 32 key the witness protocol's BLAKE3 tag.
#[derive(Clone)]
pub struct Key(pub [u8; 32]);

/// What a key authenticates. Each domain gets its own key, derived from the
/// cluster's master key, so bytes captured in one domain never verify in
/// another (a LAN server-state packet replayed on the MSL, or the reverse,
/// fails its tag check).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Domain {
    /// Frames on the mirrored server link.
    Msl,
    /// Server-state packets on the LAN.
    Lan,
    /// Packets to and from a witness.
    Witness,
}

impl Domain {
    /// The blake3 `derive_key` context string of the domain (fixed: changing
    /// one changes every key derived for it).
    pub const fn context(self) -> &'static str {
        match self {
            Domain::Msl => "msl mirrored server link frame key v1",
            Domain::Lan => "msl LAN server-state packet key v1",
            Domain::Witness => "msl witness packet key v1",
        }
    }
}

impl Key {
    /// The key for one domain, derived from the cluster's master key.
    pub fn derive(master: &[u8; 32], domain: Domain) -> Key {
        Key(blake3::derive_key(domain.context(), master))
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

/// What the receiver expects of every frame.
#[derive(Clone, Copy, Debug)]
pub struct Expect<'k> {
    /// Frames from other clusters are refused.
    pub cluster_id: u64,
    /// If set, every frame must carry a valid tag under this key; if unset,
    /// frames carrying a tag are refused.
    pub key: Option<&'k Key>,
}

/// A fully validated frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parsed<'a> {
    /// Header as on the wire (`flags` includes `flags::AUTH` if the frame was
    /// authenticated).
    pub header: Header,
    /// The decoded body.
    pub msg: Message,
    /// This frame's payload bytes (borrowed from the input, never copied).
    pub payload: &'a [u8],
}

impl Parsed<'_> {
    /// True if this frame is one fragment of a larger message
    /// (`frag_count > 1`). Unfragmented frames can be used directly, without
    /// going through a `Reassembler` (which would copy the payload).
    pub fn is_fragment(&self) -> bool {
        self.header.frag_count > 1
    }
}

/// Why a received frame was dropped. Every variant has its own counter
/// (`counter_name`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// Shorter than the fixed header, or shorter than the lengths its header
    /// declares.
    Truncated {
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// The magic is not `0x4D53`.
    BadMagic(u16),
    /// A wire version this build does not speak.
    BadVersion(u8),
    /// Declared lengths are inconsistent with the buffer, the body size of
    /// the type, or the type does not allow a payload.
    BadLength(&'static str),
    /// A frame without `flags::AUTH` whose tag does not verify under
    /// `KEYLESS_MAC_KEY`: damaged on the way.
    BadChecksum,
    /// A key is configured but the frame is not tagged under a key (its
    /// tag, under `KEYLESS_MAC_KEY`, verifies).
    MissingAuth,
    /// No key is configured but the frame is tagged under a key.
    UnexpectedAuth,
    /// The tag of a frame with `flags::AUTH` does not verify under the
    /// configured key: another key, or damaged or forged bytes.
    BadAuth,
    /// The frame belongs to another cluster.
    WrongCluster(u64),
    /// A message type this build does not know.
    UnknownType {
        /// The type code.
        code: u8,
        /// The sender set `flags::MUST_UNDERSTAND`: the frame must not be
        /// ignored silently.
        must_understand: bool,
    },
    /// A field holds a value that is not allowed (names the field).
    BadField(&'static str),
    /// An Ethernet frame with another EtherType than `ETHERTYPE_MSL`.
    BadEtherType(u16),
}

impl ParseError {
    /// Stable snake_case metric name for this kind of error.
    pub const fn counter_name(&self) -> &'static str {
        match self {
            ParseError::Truncated { .. } => "rx_truncated",
            ParseError::BadMagic(_) => "rx_bad_magic",
            ParseError::BadVersion(_) => "rx_bad_version",
            ParseError::BadLength(_) => "rx_bad_length",
            ParseError::BadChecksum => "rx_bad_checksum",
            ParseError::MissingAuth => "rx_missing_auth",
            ParseError::UnexpectedAuth => "rx_unexpected_auth",
            ParseError::BadAuth => "rx_bad_auth",
            ParseError::WrongCluster(_) => "rx_wrong_cluster",
            ParseError::UnknownType { .. } => "rx_unknown_type",
            ParseError::BadField(_) => "rx_bad_field",
            ParseError::BadEtherType(_) => "rx_bad_ethertype",
        }
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ParseError::Truncated { need, have } => {
                write!(f, "frame truncated: need {need} bytes, have {have}")
            }
            ParseError::BadMagic(m) => {
                write!(f, "bad frame magic 0x{m:04x} (expected 0x{MAGIC:04x})")
            }
            ParseError::BadVersion(v) if v < VERSION => write!(
                f,
                "frame of wire version {v} refused: this node speaks version {VERSION} \
                 (AEGIS-128X4 frame MAC); upgrade the node that sent it to this msl release \
                 (both nodes of a pair run the same wire version)"
            ),
            ParseError::BadVersion(v) => write!(
                f,
                "frame of wire version {v} refused: this node speaks version {VERSION}; \
                 upgrade this node to the msl release of the node that sent it \
                 (both nodes of a pair run the same wire version)"
            ),
            ParseError::BadLength(what) => write!(f, "inconsistent frame length: {what}"),
            ParseError::BadChecksum => f.write_str(
                "frame checksum mismatch: the keyless frame's MAC tag does not verify (damaged frame)",
            ),
            ParseError::MissingAuth => f.write_str(
                "frame is not authenticated with a key but a key is configured (is the peer configured with the key?)",
            ),
            ParseError::UnexpectedAuth => f.write_str(
                "frame is authenticated with a key but no key is configured here",
            ),
            ParseError::BadAuth => {
                f.write_str("frame authentication tag does not verify (different keys?)")
            }
            ParseError::WrongCluster(c) => {
                write!(f, "frame from another cluster (cluster id 0x{c:016x})")
            }
            ParseError::UnknownType {
                code,
                must_understand,
            } => {
                if must_understand {
                    write!(f, "unknown message type {code} marked must-understand")
                } else {
                    write!(f, "unknown message type {code} (ignorable)")
                }
            }
            ParseError::BadField(what) => write!(f, "invalid field value: {what}"),
            ParseError::BadEtherType(t) => write!(
                f,
                "unexpected EtherType 0x{t:04x} (expected 0x{:04x})",
                crate::ETHERTYPE_MSL
            ),
        }
    }
}

impl std::error::Error for ParseError {}

/// Why a frame could not be emitted. Emit never panics; it refuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmitError {
    /// The output buffer is too small.
    BufferTooSmall {
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// The payload does not fit the 32-bit payload length field (or, when
    /// fragmenting, the message cannot be split into at most
    /// `frag::MAX_FRAGMENTS` frames of the given size).
    PayloadTooLarge {
        /// Payload length.
        len: usize,
        /// Largest payload that would have fit.
        max: usize,
    },
    /// Only DATA, STATE_IMAGE and RESYNC_DATA carry payload.
    PayloadNotAllowed(MsgType),
    /// A header or body field holds a value that `parse` would refuse
    /// (names the field).
    InvalidField(&'static str),
    /// `max_frame` cannot hold even the header, body and trailer.
    FrameTooSmall {
        /// `max_frame` given.
        max_frame: usize,
        /// Smallest usable `max_frame` for this message.
        min: usize,
    },
    /// Fragment index out of range for the message.
    FragmentIndex {
        /// Requested index.
        index: usize,
        /// Number of fragments.
        count: usize,
    },
}

impl fmt::Display for EmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            EmitError::BufferTooSmall { need, have } => {
                write!(f, "output buffer too small: need {need} bytes, have {have}")
            }
            EmitError::PayloadTooLarge { len, max } => {
                write!(f, "payload of {len} bytes too large (max {max})")
            }
            EmitError::PayloadNotAllowed(t) => {
                write!(f, "message type {t} does not carry a payload")
            }
            EmitError::InvalidField(what) => write!(f, "refusing to emit invalid field: {what}"),
            EmitError::FrameTooSmall { max_frame, min } => write!(
                f,
                "max frame size {max_frame} too small for this message (need at least {min})"
            ),
            EmitError::FragmentIndex { index, count } => {
                write!(
                    f,
                    "fragment index {index} out of range (message has {count})"
                )
            }
        }
    }
}

impl std::error::Error for EmitError {}

/// Received-frame counters: one per `ParseError` kind plus `ok`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RxCounters {
    /// Frames accepted.
    pub ok: u64,
    /// `ParseError::Truncated`.
    pub truncated: u64,
    /// `ParseError::BadMagic`.
    pub bad_magic: u64,
    /// `ParseError::BadVersion`.
    pub bad_version: u64,
    /// `ParseError::BadLength`.
    pub bad_length: u64,
    /// `ParseError::BadChecksum`.
    pub bad_checksum: u64,
    /// `ParseError::MissingAuth`.
    pub missing_auth: u64,
    /// `ParseError::UnexpectedAuth`.
    pub unexpected_auth: u64,
    /// `ParseError::BadAuth`.
    pub bad_auth: u64,
    /// `ParseError::WrongCluster`.
    pub wrong_cluster: u64,
    /// `ParseError::UnknownType`.
    pub unknown_type: u64,
    /// `ParseError::BadField`.
    pub bad_field: u64,
    /// `ParseError::BadEtherType`.
    pub bad_ethertype: u64,
}

impl RxCounters {
    /// Number of `(name, value)` pairs `snapshot` returns.
    pub const LEN: usize = 13;

    /// Count the outcome of a `parse` / `parse_eth` call.
    pub fn record<T>(&mut self, r: &Result<T, ParseError>) {
        match r {
            Ok(_) => self.ok += 1,
            Err(e) => self.record_error(e),
        }
    }

    /// Count one dropped frame.
    pub fn record_error(&mut self, e: &ParseError) {
        let c = match e {
            ParseError::Truncated { .. } => &mut self.truncated,
            ParseError::BadMagic(_) => &mut self.bad_magic,
            ParseError::BadVersion(_) => &mut self.bad_version,
            ParseError::BadLength(_) => &mut self.bad_length,
            ParseError::BadChecksum => &mut self.bad_checksum,
            ParseError::MissingAuth => &mut self.missing_auth,
            ParseError::UnexpectedAuth => &mut self.unexpected_auth,
            ParseError::BadAuth => &mut self.bad_auth,
            ParseError::WrongCluster(_) => &mut self.wrong_cluster,
            ParseError::UnknownType { .. } => &mut self.unknown_type,
            ParseError::BadField(_) => &mut self.bad_field,
            ParseError::BadEtherType(_) => &mut self.bad_ethertype,
        };
        *c += 1;
    }

    /// Total frames dropped for any reason.
    pub fn dropped(&self) -> u64 {
        self.snapshot()[1..].iter().map(|(_, v)| v).sum()
    }

    /// All counters with their metric names (`rx_ok` first, then the names
    /// `ParseError::counter_name` returns), for export.
    pub fn snapshot(&self) -> [(&'static str, u64); Self::LEN] {
        [
            ("rx_ok", self.ok),
            ("rx_truncated", self.truncated),
            ("rx_bad_magic", self.bad_magic),
            ("rx_bad_version", self.bad_version),
            ("rx_bad_length", self.bad_length),
            ("rx_bad_checksum", self.bad_checksum),
            ("rx_missing_auth", self.missing_auth),
            ("rx_unexpected_auth", self.unexpected_auth),
            ("rx_bad_auth", self.bad_auth),
            ("rx_wrong_cluster", self.wrong_cluster),
            ("rx_unknown_type", self.unknown_type),
            ("rx_bad_field", self.bad_field),
            ("rx_bad_ethertype", self.bad_ethertype),
        ]
    }
}

// ---------------------------------------------------------------------------
// Byte helpers. Callers pass constant field ranges into slices whose length
// has already been checked, so the indexing cannot fail; the `get`-based
// variants are used where lengths come from the wire.
// ---------------------------------------------------------------------------

#[inline]
fn rd_u16(b: &[u8], f: Field) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[f]);
    u16::from_be_bytes(a)
}

#[inline]
fn rd_u32(b: &[u8], f: Field) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[f]);
    u32::from_be_bytes(a)
}

#[inline]
fn rd_u64(b: &[u8], f: Field) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[f]);
    u64::from_be_bytes(a)
}

#[inline]
fn rd_u64_at(b: &[u8], at: usize) -> u64 {
    rd_u64(b, at..at + 8)
}

#[inline]
fn wr_u16(b: &mut [u8], f: Field, v: u16) {
    b[f].copy_from_slice(&v.to_be_bytes());
}

#[inline]
fn wr_u32(b: &mut [u8], f: Field, v: u32) {
    b[f].copy_from_slice(&v.to_be_bytes());
}

#[inline]
fn wr_u64(b: &mut [u8], f: Field, v: u64) {
    b[f].copy_from_slice(&v.to_be_bytes());
}

#[inline]
fn rd_bool(v: u8, what: &'static str) -> Result<bool, ParseError> {
    match v {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(ParseError::BadField(what)),
    }
}

#[inline]
fn all_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

/// AEGISMAC-128X4 with a 128-bit tag.
type Mac = aegis::aegis128x4::Aegis128X4Mac<TAG_LEN>;

/// The MAC state after absorbing `bytes` (magic through payload), under
/// `key`'s first `MAC_KEY_LEN` bytes, or `KEYLESS_MAC_KEY` without a key.
///
/// The nonce is fixed (all zeros, `Aegis128X4Mac::new`). That is sound for
/// the MAC: RFC 10032 (section "AEGIS as a Message Authentication Code")
/// allows reusing a (key, nonce) pair for the MAC with different inputs,
/// unlike encryption; no keystream is ever produced, and these keys serve
/// nothing but this MAC. Each key belongs to one domain (`Key::derive`),
/// so a tag from one domain never verifies in another; and what a nonce
/// would otherwise give, telling one transmission from a replay of it, the
/// authenticated bytes carry themselves: (epoch, counter) in HELLO and
/// HEARTBEAT, (generation, seq) in the header, checked by the receiver.
fn mac(key: Option<&Key>, bytes: &[u8]) -> Mac {
    let k = match key {
        Some(k) => {
            let mut a = [0u8; MAC_KEY_LEN];
            a.copy_from_slice(&k.0[..MAC_KEY_LEN]);
            a
        }
        None => KEYLESS_MAC_KEY,
    };
    let mut m = Mac::new(&k);
    m.update(bytes);
    m
}

// ---------------------------------------------------------------------------
// Checked view.
// ---------------------------------------------------------------------------

/// A view over the bytes of one frame (smoltcp style).
///
/// `new_checked` verifies that the buffer holds the fixed header and every
/// byte the header declares (body, payload, tag); after that no accessor
/// can panic. Accessors that depend on wire-supplied lengths are also written
/// so that they cannot panic on a `new_unchecked` view: they return empty
/// slices / zero instead. `new_checked` does not verify the tag: use
/// [`parse`] for full validation.
#[derive(Clone, Copy, Debug)]
pub struct Frame<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Frame<T> {
    /// Wrap a buffer without checking anything.
    pub const fn new_unchecked(buffer: T) -> Frame<T> {
        Frame { buffer }
    }

    /// Wrap a buffer and check its length (`check_len`).
    pub fn new_checked(buffer: T) -> Result<Frame<T>, ParseError> {
        let f = Self::new_unchecked(buffer);
        f.check_len()?;
        Ok(f)
    }

    /// Check that the buffer holds the header and every byte it declares.
    /// Returns `Truncated` if not.
    pub fn check_len(&self) -> Result<(), ParseError> {
        let have = self.buffer.as_ref().len();
        if have < HEADER_LEN {
            return Err(ParseError::Truncated {
                need: HEADER_LEN,
                have,
            });
        }
        let need = self.total_len();
        if need > have {
            return Err(ParseError::Truncated { need, have });
        }
        Ok(())
    }

    /// Give back the underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    #[inline]
    fn hdr(&self) -> &[u8] {
        let b = self.buffer.as_ref();
        b.get(..HEADER_LEN).unwrap_or(&[0u8; HEADER_LEN])
    }

    /// Magic field.
    pub fn magic(&self) -> u16 {
        rd_u16(self.hdr(), field::MAGIC)
    }
    /// Version field.
    pub fn version(&self) -> u8 {
        self.hdr()[field::VERSION]
    }
    /// Raw message type code.
    pub fn msg_type_code(&self) -> u8 {
        self.hdr()[field::MSG_TYPE]
    }
    /// Message type.
    pub fn msg_type(&self) -> MsgType {
        MsgType::from_u8(self.msg_type_code())
    }
    /// Header flags.
    pub fn flags(&self) -> u8 {
        self.hdr()[field::FLAGS]
    }
    /// Fragment index.
    pub fn frag_index(&self) -> u8 {
        self.hdr()[field::FRAG_INDEX]
    }
    /// Fragment count.
    pub fn frag_count(&self) -> u8 {
        self.hdr()[field::FRAG_COUNT]
    }
    /// Reserved header byte.
    pub fn reserved(&self) -> u8 {
        self.hdr()[field::RESERVED]
    }
    /// Cluster id.
    pub fn cluster_id(&self) -> u64 {
        rd_u64(self.hdr(), field::CLUSTER_ID)
    }
    /// Sender node id.
    pub fn sender(&self) -> u16 {
        rd_u16(self.hdr(), field::SENDER)
    }
    /// Declared body length.
    pub fn body_len(&self) -> u16 {
        rd_u16(self.hdr(), field::BODY_LEN)
    }
    /// Declared payload length.
    pub fn payload_len(&self) -> u32 {
        rd_u32(self.hdr(), field::PAYLOAD_LEN)
    }
    /// Generation.
    pub fn generation(&self) -> u64 {
        rd_u64(self.hdr(), field::GENERATION)
    }
    /// Sequence number.
    pub fn seq(&self) -> u64 {
        rd_u64(self.hdr(), field::SEQ)
    }
    /// Piggybacked acknowledgement.
    pub fn ack(&self) -> u64 {
        rd_u64(self.hdr(), field::ACK)
    }
    /// The AUTH flag is set.
    pub fn has_auth(&self) -> bool {
        self.flags() & flags::AUTH != 0
    }

    /// Offset of the tag (= length of the authenticated part).
    pub fn tag_offset(&self) -> usize {
        // body_len <= 65535 and payload_len <= 2^32 - 1: no overflow on
        // 64-bit targets; saturate elsewhere so the view stays panic-free.
        HEADER_LEN
            .saturating_add(usize::from(self.body_len()))
            .saturating_add(usize::try_from(self.payload_len()).unwrap_or(usize::MAX))
    }

    /// Total frame length the header declares (including the tag).
    pub fn total_len(&self) -> usize {
        self.tag_offset().saturating_add(TAG_LEN)
    }

    /// The body bytes (empty if the buffer is too short).
    pub fn body(&self) -> &[u8] {
        let end = HEADER_LEN + usize::from(self.body_len());
        self.buffer.as_ref().get(HEADER_LEN..end).unwrap_or(&[])
    }

    /// Byte range of the payload in the buffer.
    pub fn payload_range(&self) -> Field {
        HEADER_LEN + usize::from(self.body_len())..self.tag_offset()
    }

    /// The payload bytes (empty if the buffer is too short).
    pub fn payload(&self) -> &[u8] {
        self.buffer
            .as_ref()
            .get(self.payload_range())
            .unwrap_or(&[])
    }

    /// The bytes the tag covers (magic through payload; empty if the buffer
    /// is too short).
    pub fn authenticated(&self) -> &[u8] {
        self.buffer.as_ref().get(..self.tag_offset()).unwrap_or(&[])
    }

    /// The tag carried in the frame (empty if the buffer is too short).
    pub fn tag(&self) -> &[u8] {
        let at = self.tag_offset();
        self.buffer
            .as_ref()
            .get(at..at.saturating_add(TAG_LEN))
            .unwrap_or(&[])
    }

    /// The tag of the authenticated bytes under `key` (the domain key the
    /// AUTH flag calls for), or under `KEYLESS_MAC_KEY` if `None`.
    pub fn compute_tag(&self, key: Option<&Key>) -> [u8; TAG_LEN] {
        mac(key, self.authenticated()).finalize()
    }

    /// Whether the carried tag verifies under `key` (or `KEYLESS_MAC_KEY`),
    /// compared in constant time.
    pub fn verify_tag(&self, key: Option<&Key>) -> bool {
        match <&[u8; TAG_LEN]>::try_from(self.tag()) {
            Ok(tag) => mac(key, self.authenticated()).verify(tag).is_ok(),
            Err(_) => false,
        }
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Frame<T> {
    /// Mutable header bytes. Panics if the buffer is shorter than the header:
    /// setters are for emitting into buffers the emitter sized itself.
    fn hdr_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[..HEADER_LEN]
    }
    /// Write the fixed header fields. The buffer must be at least
    /// `HEADER_LEN` long.
    #[allow(clippy::too_many_arguments)]
    fn set_header(
        &mut self,
        h: &Header,
        t: MsgType,
        header_flags: u8,
        body_len: u16,
        payload_len: u32,
    ) {
        let b = self.hdr_mut();
        wr_u16(b, field::MAGIC, MAGIC);
        b[field::VERSION] = VERSION;
        b[field::MSG_TYPE] = t.to_u8();
        b[field::FLAGS] = header_flags;
        b[field::FRAG_INDEX] = h.frag_index;
        b[field::FRAG_COUNT] = h.frag_count;
        b[field::RESERVED] = 0;
        wr_u64(b, field::CLUSTER_ID, h.cluster_id);
        wr_u16(b, field::SENDER, h.sender);
        wr_u16(b, field::BODY_LEN, body_len);
        wr_u32(b, field::PAYLOAD_LEN, payload_len);
        wr_u64(b, field::GENERATION, h.generation);
        wr_u64(b, field::SEQ, h.seq);
        wr_u64(b, field::ACK, h.ack);
    }
}

// ---------------------------------------------------------------------------
// Sizes.
// ---------------------------------------------------------------------------

/// Fixed body size of a message type (0 for unknown types).
pub const fn body_len(t: MsgType) -> usize {
    match t {
        MsgType::Hello => body::hello::LEN,
        MsgType::Data => body::data::LEN,
        MsgType::Ack => body::ack::LEN,
        MsgType::Heartbeat => body::heartbeat::LEN,
        MsgType::StateImage => body::state_image::LEN,
        MsgType::ResyncData => body::resync_data::LEN,
        MsgType::ResyncDone => body::resync_done::LEN,
        MsgType::RoleChange => body::role_change::LEN,
        MsgType::VerifyReq | MsgType::VerifyReply => body::verify::LEN,
        MsgType::Unknown(_) => 0,
    }
}

/// Bytes of a frame besides its payload: header, body and tag. The same
/// keyed or not (`keyed` is kept for callers that size frames either way).
pub const fn overhead(t: MsgType, keyed: bool) -> usize {
    let _ = keyed;
    HEADER_LEN + body_len(t) + TAG_LEN
}

/// Total frame length for `msg` with `payload_len` payload bytes.
pub fn buffer_len(msg: &Message, payload_len: usize, keyed: bool) -> usize {
    overhead(msg.msg_type(), keyed).saturating_add(payload_len)
}

// ---------------------------------------------------------------------------
// Emit.
// ---------------------------------------------------------------------------

/// Check that `msg` holds only values `parse` accepts, so that anything
/// `emit` writes parses back to the same message.
pub fn validate_message(msg: &Message) -> Result<(), EmitError> {
    fn role(r: Role) -> Result<(), EmitError> {
        match r {
            Role::Unknown(n) if !matches!(Role::from_u8(n), Role::Unknown(_)) => Err(
                EmitError::InvalidField("role: Unknown(n) with a known code"),
            ),
            _ => Ok(()),
        }
    }
    fn disk(d: DiskState) -> Result<(), EmitError> {
        match d {
            DiskState::Unknown(n) if !matches!(DiskState::from_u8(n), DiskState::Unknown(_)) => {
                Err(EmitError::InvalidField(
                    "disk: Unknown(n) with a known code",
                ))
            }
            _ => Ok(()),
        }
    }
    match msg {
        Message::Hello(h) => {
            role(h.role)?;
            disk(h.disk)?;
            if h.flags & !hello_flags::KNOWN != 0 {
                return Err(EmitError::InvalidField("hello flags: undefined bits set"));
            }
        }
        Message::Data(d) => {
            if d.flags & !data_flags::KNOWN != 0 {
                return Err(EmitError::InvalidField("data flags: undefined bits set"));
            }
        }
        Message::Ack(a) => {
            let n = usize::from(a.sack_len);
            if n > MAX_SACK {
                return Err(EmitError::InvalidField("ack sack_len > MAX_SACK"));
            }
            if a.sack[..n].iter().any(|&(lo, hi)| lo > hi) {
                return Err(EmitError::InvalidField("ack sack range first > last"));
            }
        }
        Message::Heartbeat(hb) => {
            role(hb.role)?;
            disk(hb.disk)?;
            if usize::from(hb.adapter_count) > MAX_ADAPTERS {
                return Err(EmitError::InvalidField(
                    "heartbeat adapter_count > MAX_ADAPTERS",
                ));
            }
        }
        Message::StateImage(_) | Message::ResyncDone(_) => {}
        Message::VerifyReq(v) | Message::VerifyReply(v) => {
            if v.flags & !verify_flags::KNOWN != 0 {
                return Err(EmitError::InvalidField("verify flags: undefined bits set"));
            }
        }
        Message::ResyncData(r) => {
            if r.flags & !data_flags::KNOWN != 0 {
                return Err(EmitError::InvalidField(
                    "resync data flags: undefined bits set",
                ));
            }
        }
        Message::RoleChange(rc) => {
            if let RolePhase::Unknown(n) = rc.phase {
                if !matches!(RolePhase::from_u8(n), RolePhase::Unknown(_)) {
                    return Err(EmitError::InvalidField(
                        "role change phase: Unknown(n) with a known code",
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Write `msg`'s body into `b`, which is exactly `body_len(msg.msg_type())`
/// bytes and already zeroed.
fn emit_body(msg: &Message, b: &mut [u8]) {
    match msg {
        Message::Hello(h) => {
            use body::hello as f;
            b[f::ROLE] = h.role.to_u8();
            b[f::DISK] = h.disk.to_u8();
            b[f::FLAGS] = h.flags;
            wr_u32(b, f::BLOCK_SIZE, h.block_size);
            wr_u64(b, f::VOLUME_BYTES, h.volume_bytes);
            wr_u64(b, f::GEN_CURRENT, h.gens.current);
            wr_u64(b, f::GEN_BITMAP, h.gens.bitmap);
            for (i, g) in h.gens.history.iter().enumerate() {
                let at = f::GEN_HISTORY + 8 * i;
                wr_u64(b, at..at + 8, *g);
            }
            wr_u64(b, f::DIRTY_BLOCKS, h.dirty_blocks);
            wr_u64(b, f::SESSION, h.session);
            wr_u64(b, f::EPOCH, h.epoch);
            wr_u64(b, f::COUNTER, h.counter);
        }
        Message::Data(d) => {
            use body::data as f;
            wr_u64(b, f::WRITE_ID, d.write_id);
            wr_u64(b, f::OFFSET, d.offset);
            wr_u32(b, f::LEN_BYTES, d.len);
            b[f::FLAGS] = d.flags;
        }
        Message::Ack(a) => {
            use body::ack as f;
            wr_u64(b, f::CUMULATIVE, a.cumulative);
            wr_u64(b, f::APPLIED, a.applied);
            wr_u64(b, f::STABLE, a.stable);
            b[f::SACK_LEN] = a.sack_len;
            for (i, &(lo, hi)) in a.sack.iter().enumerate() {
                let at = f::SACK + f::SACK_ENTRY_LEN * i;
                wr_u64(b, at..at + 8, lo);
                wr_u64(b, at + 8..at + 16, hi);
            }
        }
        Message::Heartbeat(hb) => {
            use body::heartbeat as f;
            b[f::ROLE] = hb.role.to_u8();
            b[f::DISK] = hb.disk.to_u8();
            b[f::MSL_UP] = u8::from(hb.msl_up);
            b[f::IN_SYNC] = u8::from(hb.in_sync);
            b[f::ADAPTER_COUNT] = hb.adapter_count;
            wr_u64(b, f::COUNTER, hb.counter);
            wr_u64(b, f::EPOCH, hb.epoch);
            for (i, a) in hb.adapters.iter().enumerate() {
                let at = f::ADAPTERS + f::ADAPTER_ENTRY_LEN * i;
                b[at] = u8::from(a.link_up);
                b[at + 1] = u8::from(a.carrier);
                b[at + 2] = u8::from(a.reachable);
            }
        }
        Message::StateImage(s) => {
            use body::state_image as f;
            wr_u64(b, f::TOTAL_LEN, s.total_len);
            wr_u64(b, f::OFFSET, s.offset);
            wr_u32(b, f::IMAGE_CRC, s.image_crc);
        }
        Message::ResyncData(r) => {
            use body::resync_data as f;
            wr_u64(b, f::OFFSET, r.offset);
            wr_u32(b, f::LEN_BYTES, r.len);
            b[f::FLAGS] = r.flags;
        }
        Message::ResyncDone(r) => {
            wr_u64(b, body::resync_done::BLOCKS_SENT, r.blocks_sent);
        }
        Message::RoleChange(rc) => {
            use body::role_change as f;
            b[f::PHASE] = rc.phase.to_u8();
            wr_u64(b, f::GENERATION, rc.generation);
        }
        Message::VerifyReq(v) | Message::VerifyReply(v) => {
            use body::verify as f;
            wr_u64(b, f::START_BLOCK, v.start_block);
            wr_u32(b, f::COUNT, v.count);
            b[f::FLAGS] = v.flags;
        }
    }
}

/// Check a header for emission; returns the flags to put on the wire.
fn validate_header(
    h: &Header,
    t: MsgType,
    payload_len: usize,
    keyed: bool,
) -> Result<u8, EmitError> {
    if h.flags & !flags::KNOWN != 0 {
        return Err(EmitError::InvalidField("header flags: undefined bits set"));
    }
    if h.frag_count == 0 {
        return Err(EmitError::InvalidField("frag_count is 0"));
    }
    if h.frag_index >= h.frag_count {
        return Err(EmitError::InvalidField("frag_index >= frag_count"));
    }
    if h.frag_count > 1 {
        if !t.carries_payload() {
            return Err(EmitError::InvalidField(
                "fragmented message of a type without payload",
            ));
        }
        if payload_len == 0 {
            return Err(EmitError::InvalidField("fragment with empty payload"));
        }
    }
    let auth = if keyed { flags::AUTH } else { 0 };
    Ok((h.flags & !flags::AUTH) | auth)
}

/// Write one frame for `msg` into `out`; returns the number of bytes
/// written (`buffer_len(msg, payload.len(), key.is_some())`).
///
/// Sets `flags::AUTH` iff `key` is `Some` (whatever `header.flags` says);
/// `header.frag_index` / `frag_count` are written as given (use
/// `frag::emit_fragment` to split a large payload). Refuses, without
/// panicking, anything `parse` would refuse.
pub fn emit(
    header: &Header,
    msg: &Message,
    payload: &[u8],
    key: Option<&Key>,
    out: &mut [u8],
) -> Result<usize, EmitError> {
    let need = buffer_len(msg, payload.len(), key.is_some());
    if out.len() < need {
        return Err(EmitError::BufferTooSmall {
            need,
            have: out.len(),
        });
    }
    let (head, tag) = emit_head(header, msg, payload, key, out)?;
    let tag_at = head + payload.len();
    out[head..tag_at].copy_from_slice(payload);
    out[tag_at..need].copy_from_slice(&tag);
    Ok(need)
}

/// [`emit`] without copying the payload: writes the frame's header and
/// body into `head` and returns their length and the frame's tag. The
/// frame on the wire is `head[..len]`, then `payload`, then the tag, so a
/// sender can hand the three to the kernel as one gathered frame (the
/// payload stays in the buffer it is in). Same checks as `emit`.
pub fn emit_head(
    header: &Header,
    msg: &Message,
    payload: &[u8],
    key: Option<&Key>,
    head: &mut [u8],
) -> Result<(usize, [u8; TAG_LEN]), EmitError> {
    let t = msg.msg_type();
    if !payload.is_empty() && !t.carries_payload() {
        return Err(EmitError::PayloadNotAllowed(t));
    }
    let payload_len = u32::try_from(payload.len()).map_err(|_| EmitError::PayloadTooLarge {
        len: payload.len(),
        max: u32::MAX as usize,
    })?;
    validate_message(msg)?;
    let hflags = validate_header(header, t, payload.len(), key.is_some())?;

    let blen = body_len(t);
    let body_end = HEADER_LEN + blen;
    if head.len() < body_end {
        return Err(EmitError::BufferTooSmall {
            need: body_end,
            have: head.len(),
        });
    }
    let out = &mut head[..body_end];
    // `blen` is at most MAX_BODY_LEN (96): fits u16.
    Frame::new_unchecked(&mut *out).set_header(header, t, hflags, blen as u16, payload_len);
    let body = &mut out[HEADER_LEN..body_end];
    body.fill(0);
    emit_body(msg, body);

    let mut m = mac(key, out);
    m.update(payload);
    Ok((body_end, m.finalize()))
}

// ---------------------------------------------------------------------------
// Parse.
// ---------------------------------------------------------------------------

fn parse_body(t: MsgType, b: &[u8]) -> Result<Message, ParseError> {
    // `b.len() == body_len(t)` was checked by the caller (BadLength).
    Ok(match t {
        MsgType::Hello => {
            use body::hello as f;
            if b[f::RESERVED] != 0 {
                return Err(ParseError::BadField("hello reserved byte"));
            }
            let flags = b[f::FLAGS];
            if flags & !hello_flags::KNOWN != 0 {
                return Err(ParseError::BadField("hello flags: undefined bits set"));
            }
            let mut history = [0u64; HISTORY_LEN];
            for (i, g) in history.iter_mut().enumerate() {
                *g = rd_u64_at(b, f::GEN_HISTORY + 8 * i);
            }
            Message::Hello(Hello {
                role: Role::from_u8(b[f::ROLE]),
                disk: DiskState::from_u8(b[f::DISK]),
                volume_bytes: rd_u64(b, f::VOLUME_BYTES),
                block_size: rd_u32(b, f::BLOCK_SIZE),
                gens: Generations {
                    current: rd_u64(b, f::GEN_CURRENT),
                    bitmap: rd_u64(b, f::GEN_BITMAP),
                    history,
                },
                flags,
                dirty_blocks: rd_u64(b, f::DIRTY_BLOCKS),
                session: rd_u64(b, f::SESSION),
                epoch: rd_u64(b, f::EPOCH),
                counter: rd_u64(b, f::COUNTER),
            })
        }
        MsgType::Data => {
            use body::data as f;
            if !all_zero(&b[f::RESERVED]) {
                return Err(ParseError::BadField("data reserved bytes"));
            }
            let flags = b[f::FLAGS];
            if flags & !data_flags::KNOWN != 0 {
                return Err(ParseError::BadField("data flags: undefined bits set"));
            }
            Message::Data(Data {
                write_id: rd_u64(b, f::WRITE_ID),
                offset: rd_u64(b, f::OFFSET),
                len: rd_u32(b, f::LEN_BYTES),
                flags,
            })
        }
        MsgType::Ack => {
            use body::ack as f;
            if !all_zero(&b[f::RESERVED]) {
                return Err(ParseError::BadField("ack reserved bytes"));
            }
            let sack_len = b[f::SACK_LEN];
            if usize::from(sack_len) > MAX_SACK {
                return Err(ParseError::BadField("ack sack_len > MAX_SACK"));
            }
            let mut sack = [(0u64, 0u64); MAX_SACK];
            for (i, s) in sack.iter_mut().enumerate() {
                let at = f::SACK + f::SACK_ENTRY_LEN * i;
                *s = (rd_u64_at(b, at), rd_u64_at(b, at + 8));
                if i < usize::from(sack_len) && s.0 > s.1 {
                    return Err(ParseError::BadField("ack sack range first > last"));
                }
            }
            Message::Ack(Ack {
                cumulative: rd_u64(b, f::CUMULATIVE),
                applied: rd_u64(b, f::APPLIED),
                stable: rd_u64(b, f::STABLE),
                sack,
                sack_len,
            })
        }
        MsgType::Heartbeat => {
            use body::heartbeat as f;
            if !all_zero(&b[f::RESERVED]) {
                return Err(ParseError::BadField("heartbeat reserved bytes"));
            }
            let adapter_count = b[f::ADAPTER_COUNT];
            if usize::from(adapter_count) > MAX_ADAPTERS {
                return Err(ParseError::BadField(
                    "heartbeat adapter_count > MAX_ADAPTERS",
                ));
            }
            let mut adapters = [AdapterHealth::default(); MAX_ADAPTERS];
            for (i, a) in adapters.iter_mut().enumerate() {
                let at = f::ADAPTERS + f::ADAPTER_ENTRY_LEN * i;
                *a = AdapterHealth {
                    link_up: rd_bool(b[at], "heartbeat adapter link_up")?,
                    carrier: rd_bool(b[at + 1], "heartbeat adapter carrier")?,
                    reachable: rd_bool(b[at + 2], "heartbeat adapter reachable")?,
                };
                if b[at + 3] != 0 {
                    return Err(ParseError::BadField("heartbeat adapter reserved byte"));
                }
            }
            Message::Heartbeat(Heartbeat {
                role: Role::from_u8(b[f::ROLE]),
                disk: DiskState::from_u8(b[f::DISK]),
                msl_up: rd_bool(b[f::MSL_UP], "heartbeat msl_up")?,
                in_sync: rd_bool(b[f::IN_SYNC], "heartbeat in_sync")?,
                adapters,
                adapter_count,
                counter: rd_u64(b, f::COUNTER),
                epoch: rd_u64(b, f::EPOCH),
            })
        }
        MsgType::StateImage => {
            use body::state_image as f;
            if !all_zero(&b[f::RESERVED]) {
                return Err(ParseError::BadField("state image reserved bytes"));
            }
            Message::StateImage(StateImageChunk {
                total_len: rd_u64(b, f::TOTAL_LEN),
                offset: rd_u64(b, f::OFFSET),
                image_crc: rd_u32(b, f::IMAGE_CRC),
            })
        }
        MsgType::ResyncData => {
            use body::resync_data as f;
            if !all_zero(&b[f::RESERVED]) {
                return Err(ParseError::BadField("resync data reserved bytes"));
            }
            let flags = b[f::FLAGS];
            if flags & !data_flags::KNOWN != 0 {
                return Err(ParseError::BadField(
                    "resync data flags: undefined bits set",
                ));
            }
            Message::ResyncData(ResyncData {
                offset: rd_u64(b, f::OFFSET),
                len: rd_u32(b, f::LEN_BYTES),
                flags,
            })
        }
        MsgType::ResyncDone => Message::ResyncDone(ResyncDone {
            blocks_sent: rd_u64(b, body::resync_done::BLOCKS_SENT),
        }),
        MsgType::RoleChange => {
            use body::role_change as f;
            if !all_zero(&b[f::RESERVED]) {
                return Err(ParseError::BadField("role change reserved bytes"));
            }
            Message::RoleChange(RoleChange {
                phase: RolePhase::from_u8(b[f::PHASE]),
                generation: rd_u64(b, f::GENERATION),
            })
        }
        MsgType::VerifyReq | MsgType::VerifyReply => {
            use body::verify as f;
            if !all_zero(&b[f::RESERVED]) {
                return Err(ParseError::BadField("verify reserved bytes"));
            }
            let flags = b[f::FLAGS];
            if flags & !verify_flags::KNOWN != 0 {
                return Err(ParseError::BadField("verify flags: undefined bits set"));
            }
            let v = Verify {
                start_block: rd_u64(b, f::START_BLOCK),
                count: rd_u32(b, f::COUNT),
                flags,
            };
            if t == MsgType::VerifyReq {
                Message::VerifyReq(v)
            } else {
                Message::VerifyReply(v)
            }
        }
        MsgType::Unknown(code) => {
            // Unreachable: the caller returns UnknownType first. Kept total
            // so that this function cannot panic.
            return Err(ParseError::UnknownType {
                code,
                must_understand: true,
            });
        }
    })
}

/// Validate `bytes` as one complete frame and decode it.
///
/// Checks, in this order: `Truncated`, `BadMagic`, `BadVersion`,
/// `BadLength`, then the tag in one pass over the frame (`UnexpectedAuth`
/// for a keyed frame when no key is configured, else `BadAuth` if it does
/// not verify; `BadChecksum` for a keyless frame that does not verify, then
/// `MissingAuth` if a key is configured), then `WrongCluster`,
/// `UnknownType`, `BadField`. The buffer must hold exactly
/// one frame (a longer buffer is `BadLength`, a shorter one `Truncated`).
///
/// Never panics, never allocates, never copies the payload.
pub fn parse<'a>(bytes: &'a [u8], expect: &Expect) -> Result<Parsed<'a>, ParseError> {
    if bytes.len() < HEADER_LEN {
        return Err(ParseError::Truncated {
            need: HEADER_LEN,
            have: bytes.len(),
        });
    }
    let f = Frame::new_unchecked(bytes);
    let magic = f.magic();
    if magic != MAGIC {
        return Err(ParseError::BadMagic(magic));
    }
    if f.version() != VERSION {
        return Err(ParseError::BadVersion(f.version()));
    }
    let f = Frame::new_checked(bytes)?;
    if f.total_len() != bytes.len() {
        return Err(ParseError::BadLength(
            "buffer longer than the lengths in the header",
        ));
    }
    let t = f.msg_type();
    if !matches!(t, MsgType::Unknown(_)) {
        if usize::from(f.body_len()) != body_len(t) {
            return Err(ParseError::BadLength("body length wrong for message type"));
        }
        if f.payload_len() != 0 && !t.carries_payload() {
            return Err(ParseError::BadLength(
                "payload on a message type without payload",
            ));
        }
    }
    // The tag is checked under the key the AUTH flag names, so that a
    // damaged keyless frame is `BadChecksum` and `MissingAuth` means an
    // intact frame from a peer without the key.
    if f.has_auth() {
        let Some(key) = expect.key else {
            return Err(ParseError::UnexpectedAuth);
        };
        if !f.verify_tag(Some(key)) {
            return Err(ParseError::BadAuth);
        }
    } else {
        if !f.verify_tag(None) {
            return Err(ParseError::BadChecksum);
        }
        if expect.key.is_some() {
            return Err(ParseError::MissingAuth);
        }
    }
    let cluster_id = f.cluster_id();
    if cluster_id != expect.cluster_id {
        return Err(ParseError::WrongCluster(cluster_id));
    }
    let hflags = f.flags();
    if let MsgType::Unknown(code) = t {
        return Err(ParseError::UnknownType {
            code,
            must_understand: hflags & flags::MUST_UNDERSTAND != 0,
        });
    }
    if f.reserved() != 0 {
        return Err(ParseError::BadField("header reserved byte"));
    }
    if hflags & !flags::KNOWN != 0 {
        return Err(ParseError::BadField("header flags: undefined bits set"));
    }
    let (frag_index, frag_count) = (f.frag_index(), f.frag_count());
    if frag_count == 0 {
        return Err(ParseError::BadField("frag_count is 0"));
    }
    if frag_index >= frag_count {
        return Err(ParseError::BadField("frag_index >= frag_count"));
    }
    // Slice `bytes` itself so that the payload borrows the input, not `f`.
    // `new_checked` verified the range lies inside `bytes`.
    let payload = bytes.get(f.payload_range()).unwrap_or(&[]);
    if frag_count > 1 {
        if !t.carries_payload() {
            return Err(ParseError::BadField(
                "fragmented message of a type without payload",
            ));
        }
        if payload.is_empty() {
            return Err(ParseError::BadField("fragment with empty payload"));
        }
    }
    let msg = parse_body(t, f.body())?;
    Ok(Parsed {
        header: Header {
            cluster_id,
            sender: f.sender(),
            generation: f.generation(),
            seq: f.seq(),
            ack: f.ack(),
            flags: hflags,
            frag_index,
            frag_count,
        },
        msg,
        payload,
    })
}
