//! Typed message representations (the `Repr` side, in smoltcp's terms).
//!
//! These are what the protocol core produces and consumes. `frame.rs` turns
//! them into bytes and back. Field order and widths on the wire are fixed
//! there; changing any of them needs a `VERSION` bump.

/// Protocol roles as carried on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Mirrors the primary; serves no clients.
    Secondary,
    /// Serves clients and mirrors their writes to the secondary.
    Primary,
    /// A value this build does not know (kept, never guessed).
    Unknown(u8),
}

/// State of a node's copy of the volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DiskState {
    /// Byte-identical to the latest data the pair acknowledged.
    UpToDate,
    /// Consistent but missing writes (mirror side shut down, or behind).
    Outdated,
    /// Being resynchronized: not consistent until RESYNC_DONE.
    Inconsistent,
    /// Latched after an I/O error: no more acknowledgements.
    Failed,
    /// A value this build does not know (kept, never guessed).
    Unknown(u8),
}

/// How many history generation identifiers are kept and exchanged.
pub const HISTORY_LEN: usize = 4;

/// Generation identifiers (DRBD's UUID set).
///
/// * `current`: the data generation this node holds.
/// * `bitmap`: the generation at which this node started tracking changes
///   against an absent or lagging peer (0 = not tracking).
/// * `history`: earlier `current` values, newest first (0 = empty slot).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Generations {
    /// The data generation this node holds.
    pub current: u64,
    /// Generation at which change tracking started (0 = not tracking).
    pub bitmap: u64,
    /// Earlier `current` values, newest first (0 = empty slot).
    pub history: [u64; HISTORY_LEN],
}

/// Per-HELLO flags.
pub mod hello_flags {
    /// The sender was primary when it stopped without a clean shutdown.
    pub const CRASHED_PRIMARY: u8 = 0x01;
    /// The sender holds a resync bitmap from an interrupted resync as target.
    pub const RESYNC_TARGET: u8 = 0x02;
    /// Every flag this version defines; other bits are rejected on the wire.
    /// Sent once a node has established the session; a node already in
    /// session never answers such a HELLO (that keeps the handshake free of
    /// ping-pong loops).
    pub const ESTABLISHED: u8 = 0x04;
    /// Every flag this version understands.
    pub const KNOWN: u8 = CRASHED_PRIMARY | RESYNC_TARGET | ESTABLISHED;
}

/// HELLO: sent by both nodes when the MSL comes up, before anything else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Sender's current role.
    pub role: Role,
    /// State of the sender's copy.
    pub disk: DiskState,
    /// Volume size in bytes (must match the peer's).
    pub volume_bytes: u64,
    /// Block size in bytes (must match the peer's).
    pub block_size: u32,
    /// Sender's generation identifiers.
    pub gens: Generations,
    /// `hello_flags` bits.
    pub flags: u8,
    /// Blocks this node considers out of sync (summary only; the bitmap
    /// itself follows in the memory image or in DIRTY_MAP chunks).
    pub dirty_blocks: u64,
    /// Random per connection attempt; both sides restart sequence numbers
    /// for a new session pair.
    pub session: u64,
    /// The sender's start epoch (one higher at every start of its daemon).
    pub epoch: u64,
    /// The sender's packet counter in `epoch`, shared with its heartbeats:
    /// strictly increasing, so `(epoch, counter)` orders every HELLO and
    /// heartbeat a node sends and a receiver drops one not newer than the
    /// newest it has.
    pub counter: u64,
}

/// Flags on DATA / RESYNC_DATA.
pub mod data_flags {
    /// Force unit access: durable on the receiver before it is acked stable.
    pub const FUA: u8 = 0x01;
    /// A flush barrier: no payload; the receiver flushes its volume.
    pub const FLUSH: u8 = 0x02;
    /// Trim / discard the range (no payload).
    pub const TRIM: u8 = 0x04;
    /// Write zeroes over the range (no payload).
    pub const ZEROES: u8 = 0x08;
    /// Every flag this version defines; other bits are rejected on the wire
    /// (an unknown flag could change what a write means).
    pub const KNOWN: u8 = FUA | FLUSH | TRIM | ZEROES;
}

/// DATA: a client write mirrored to the peer (or one fragment of it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Data {
    /// Primary-assigned id of the client write (echoed in completions).
    pub write_id: u64,
    /// Byte offset of the write on the volume.
    pub offset: u64,
    /// Byte length of the whole write.
    pub len: u32,
    /// `data_flags` bits.
    pub flags: u8,
}

/// Maximum selective-acknowledgement ranges in one ACK.
pub const MAX_SACK: usize = 4;

/// ACK: cumulative + selective acknowledgement of reliable frames, and the
/// receiver's durability points.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ack {
    /// Every reliable sequence number `<= cumulative` was received.
    pub cumulative: u64,
    /// Every sequence number `<= applied` was written to the receiver's
    /// volume (protocol C "written").
    pub applied: u64,
    /// Every sequence number `<= stable` is on stable storage (flushed).
    pub stable: u64,
    /// Received ranges above `cumulative`, inclusive `(first, last)`.
    pub sack: [(u64, u64); MAX_SACK],
    /// Number of valid entries in `sack` (`<= MAX_SACK`).
    pub sack_len: u8,
}

/// Per-adapter LAN health as reported by its owner.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AdapterHealth {
    /// Administrative / operational link state is up.
    pub link_up: bool,
    /// The adapter sees carrier.
    pub carrier: bool,
    /// Peer heartbeats arrive on this adapter.
    pub reachable: bool,
}

impl AdapterHealth {
    /// Adapter is usable for clients (link and carrier).
    pub fn working(&self) -> bool {
        self.link_up && self.carrier
    }
}

/// Maximum LAN adapters reported per node.
pub const MAX_ADAPTERS: usize = 4;

/// HEARTBEAT: server state. Sent on the MSL (control class) and as the LAN
/// server-state packet over UDP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    /// Sender's current role.
    pub role: Role,
    /// State of the sender's copy.
    pub disk: DiskState,
    /// Sender currently hears the peer on the MSL.
    pub msl_up: bool,
    /// Sender's pair view: connected and in sync.
    pub in_sync: bool,
    /// Sender's LAN adapters; the first `adapter_count` are valid.
    pub adapters: [AdapterHealth; MAX_ADAPTERS],
    /// Number of valid entries in `adapters` (`<= MAX_ADAPTERS`).
    pub adapter_count: u8,
    /// The sender's packet counter in `epoch` (see `Hello::counter`).
    pub counter: u64,
    /// The sender's start epoch.
    pub epoch: u64,
}

impl Heartbeat {
    /// Number of adapters with link and carrier.
    pub fn working_adapters(&self) -> u8 {
        let n = usize::from(self.adapter_count).min(MAX_ADAPTERS);
        self.adapters[..n].iter().filter(|a| a.working()).count() as u8
    }
}

/// STATE_IMAGE: one chunk of the memory image (payload follows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateImageChunk {
    /// Total image length in bytes.
    pub total_len: u64,
    /// Offset of this chunk in the image.
    pub offset: u64,
    /// CRC32C of the whole image, checked after reassembly.
    pub image_crc: u32,
}

/// RESYNC_DATA: one block range sent by the resync source (payload follows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResyncData {
    /// Byte offset of the range on the volume.
    pub offset: u64,
    /// Byte length of the range.
    pub len: u32,
    /// `data_flags` bits (ZEROES / TRIM ranges carry no payload).
    pub flags: u8,
}

/// RESYNC_DONE: the source has sent every dirty block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResyncDone {
    /// Blocks the source sent in this resync.
    pub blocks_sent: u64,
}

/// ROLE_CHANGE phases (planned switchover).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RolePhase {
    /// Old primary has drained and hands over: "you are primary now".
    Handover,
    /// New primary confirms it took over with `generation`.
    Accepted,
    /// The sender (the old primary of a switchover away from its failed
    /// LAN adapter) restarts itself now: the receiver ends the session at
    /// once instead of waiting out the sender's silence.
    Leaving,
    /// A value this build does not know (kept, never guessed).
    Unknown(u8),
}

/// ROLE_CHANGE: planned switchover.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoleChange {
    /// Which step of the switchover this is.
    pub phase: RolePhase,
    /// The generation the new primary writes in.
    pub generation: u64,
}

/// VERIFY_REQ / VERIFY_REPLY flags.
pub mod verify_flags {
    /// A zero range. On VERIFY_REQ: the sender's blocks of the range are a
    /// hole at this point of the stream; the receiver reads none of them
    /// and answers how many, from the first, are a hole on its side too.
    /// On VERIFY_REPLY: that answer, in `count` (no payload); the blocks
    /// after them are verified block by block.
    pub const ZERO_RANGE: u8 = 0x01;
    /// Every flag this version defines; other bits are rejected on the wire.
    pub const KNOWN: u8 = ZERO_RANGE;
}

/// VERIFY_REQ / VERIFY_REPLY: online comparison of a block range.
///
/// The primary sends VERIFY_REQ on the reliable stream, so the secondary
/// answers only after applying every write sent before it; the secondary
/// answers VERIFY_REPLY with one 64-bit digest per block as payload
/// (`count * 8` bytes, little endian), or, to a zero-range request
/// (`verify_flags::ZERO_RANGE`), with how many of its blocks are a hole.
/// Neither is must-understand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verify {
    /// First block of the range.
    pub start_block: u64,
    /// Blocks in the range (a zero-range reply: the blocks from
    /// `start_block` that are a hole on the replying side).
    pub count: u32,
    /// `verify_flags` bits.
    pub flags: u8,
}

/// Message type codes. Values may never change without a version bump.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MsgType {
    /// HELLO (1).
    Hello,
    /// DATA (2).
    Data,
    /// ACK (3).
    Ack,
    /// HEARTBEAT (4).
    Heartbeat,
    /// STATE_IMAGE (5).
    StateImage,
    /// RESYNC_DATA (6).
    ResyncData,
    /// RESYNC_DONE (7).
    ResyncDone,
    /// ROLE_CHANGE (8).
    RoleChange,
    /// VERIFY_REQ (9).
    VerifyReq,
    /// VERIFY_REPLY (10).
    VerifyReply,
    /// A type code this build does not know.
    Unknown(u8),
}

/// A parsed message body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message {
    /// HELLO.
    Hello(Hello),
    /// DATA (payload: the written bytes).
    Data(Data),
    /// ACK.
    Ack(Ack),
    /// HEARTBEAT.
    Heartbeat(Heartbeat),
    /// STATE_IMAGE (payload: a chunk of the memory image).
    StateImage(StateImageChunk),
    /// RESYNC_DATA (payload: the block range).
    ResyncData(ResyncData),
    /// RESYNC_DONE.
    ResyncDone(ResyncDone),
    /// ROLE_CHANGE.
    RoleChange(RoleChange),
    /// VERIFY_REQ.
    VerifyReq(Verify),
    /// VERIFY_REPLY (payload: one 64-bit digest per block).
    VerifyReply(Verify),
}

impl Message {
    /// The type code of this message.
    pub fn msg_type(&self) -> MsgType {
        match self {
            Message::Hello(_) => MsgType::Hello,
            Message::Data(_) => MsgType::Data,
            Message::Ack(_) => MsgType::Ack,
            Message::Heartbeat(_) => MsgType::Heartbeat,
            Message::StateImage(_) => MsgType::StateImage,
            Message::ResyncData(_) => MsgType::ResyncData,
            Message::ResyncDone(_) => MsgType::ResyncDone,
            Message::RoleChange(_) => MsgType::RoleChange,
            Message::VerifyReq(_) => MsgType::VerifyReq,
            Message::VerifyReply(_) => MsgType::VerifyReply,
        }
    }

    /// Reliable messages carry a sequence number, are retransmitted until
    /// acknowledged and are delivered in order. Heartbeats and acks are
    /// control traffic: unsequenced, never queued behind data.
    pub fn is_reliable(&self) -> bool {
        !matches!(self, Message::Ack(_) | Message::Heartbeat(_))
    }

    /// Control messages go out ahead of bulk data.
    pub fn is_control(&self) -> bool {
        matches!(
            self,
            Message::Ack(_) | Message::Heartbeat(_) | Message::Hello(_) | Message::RoleChange(_)
        )
    }
}

/// Header fields that the sender sets (the rest is derived on emit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Cluster this frame belongs to; receivers drop other clusters.
    pub cluster_id: u64,
    /// Sender node id.
    pub sender: u16,
    /// Sender's data generation.
    pub generation: u64,
    /// Reliable sequence number (0 for control messages).
    pub seq: u64,
    /// Piggybacked cumulative acknowledgement of the peer's reliable frames.
    pub ack: u64,
    /// Header flags (see `frame::flags`); must-understand etc.
    pub flags: u8,
    /// Fragment index and count (count 1 = not fragmented).
    pub frag_index: u8,
    /// Number of fragments of the message (1 = not fragmented).
    pub frag_count: u8,
}

// ---------------------------------------------------------------------------
// Wire codes. These values may never change without a `VERSION` bump.
// ---------------------------------------------------------------------------

impl Role {
    /// Wire code: Secondary = 0, Primary = 1.
    pub const fn to_u8(self) -> u8 {
        match self {
            Role::Secondary => 0,
            Role::Primary => 1,
            Role::Unknown(n) => n,
        }
    }

    /// Decode a wire code; unknown codes are kept as `Unknown(n)`.
    pub const fn from_u8(n: u8) -> Role {
        match n {
            0 => Role::Secondary,
            1 => Role::Primary,
            n => Role::Unknown(n),
        }
    }
}

impl DiskState {
    /// Wire code: UpToDate = 0, Outdated = 1, Inconsistent = 2, Failed = 3.
    pub const fn to_u8(self) -> u8 {
        match self {
            DiskState::UpToDate => 0,
            DiskState::Outdated => 1,
            DiskState::Inconsistent => 2,
            DiskState::Failed => 3,
            DiskState::Unknown(n) => n,
        }
    }

    /// Decode a wire code; unknown codes are kept as `Unknown(n)`.
    pub const fn from_u8(n: u8) -> DiskState {
        match n {
            0 => DiskState::UpToDate,
            1 => DiskState::Outdated,
            2 => DiskState::Inconsistent,
            3 => DiskState::Failed,
            n => DiskState::Unknown(n),
        }
    }
}

impl RolePhase {
    /// Wire code: Handover = 1, Accepted = 2.
    pub const fn to_u8(self) -> u8 {
        match self {
            RolePhase::Handover => 1,
            RolePhase::Accepted => 2,
            RolePhase::Leaving => 3,
            RolePhase::Unknown(n) => n,
        }
    }

    /// Decode a wire code; unknown codes (including 0) are kept as `Unknown(n)`.
    pub const fn from_u8(n: u8) -> RolePhase {
        match n {
            1 => RolePhase::Handover,
            2 => RolePhase::Accepted,
            3 => RolePhase::Leaving,
            n => RolePhase::Unknown(n),
        }
    }
}

impl MsgType {
    /// Wire code: Hello = 1, Data = 2, Ack = 3, Heartbeat = 4, StateImage = 5,
    /// ResyncData = 6, ResyncDone = 7, RoleChange = 8, VerifyReq = 9,
    /// VerifyReply = 10.
    pub const fn to_u8(self) -> u8 {
        match self {
            MsgType::Hello => 1,
            MsgType::Data => 2,
            MsgType::Ack => 3,
            MsgType::Heartbeat => 4,
            MsgType::StateImage => 5,
            MsgType::ResyncData => 6,
            MsgType::ResyncDone => 7,
            MsgType::RoleChange => 8,
            MsgType::VerifyReq => 9,
            MsgType::VerifyReply => 10,
            MsgType::Unknown(n) => n,
        }
    }

    /// Decode a wire code; unknown codes are kept as `Unknown(n)`.
    pub const fn from_u8(n: u8) -> MsgType {
        match n {
            1 => MsgType::Hello,
            2 => MsgType::Data,
            3 => MsgType::Ack,
            4 => MsgType::Heartbeat,
            5 => MsgType::StateImage,
            6 => MsgType::ResyncData,
            7 => MsgType::ResyncDone,
            8 => MsgType::RoleChange,
            9 => MsgType::VerifyReq,
            10 => MsgType::VerifyReply,
            n => MsgType::Unknown(n),
        }
    }

    /// Only DATA, STATE_IMAGE, RESYNC_DATA and VERIFY_REPLY carry payload
    /// bytes (and so only they may be fragmented).
    pub const fn carries_payload(self) -> bool {
        matches!(
            self,
            MsgType::Data | MsgType::StateImage | MsgType::ResyncData | MsgType::VerifyReply
        )
    }

    /// Stable lower-case name for logs and metrics labels.
    pub const fn name(self) -> &'static str {
        match self {
            MsgType::Hello => "hello",
            MsgType::Data => "data",
            MsgType::Ack => "ack",
            MsgType::Heartbeat => "heartbeat",
            MsgType::StateImage => "state_image",
            MsgType::ResyncData => "resync_data",
            MsgType::ResyncDone => "resync_done",
            MsgType::RoleChange => "role_change",
            MsgType::VerifyReq => "verify_req",
            MsgType::VerifyReply => "verify_reply",
            MsgType::Unknown(_) => "unknown",
        }
    }
}

impl core::fmt::Display for MsgType {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            MsgType::Unknown(n) => write!(f, "unknown({n})"),
            t => f.write_str(t.name()),
        }
    }
}
