//! The node's public API: what the host feeds in ([`Event`]), what it
//! executes ([`Action`]), what it tells the administrator ([`Notice`]) and
//! what `mslctl status` shows ([`Status`]).

use alloc::vec::Vec;
use core::fmt;

use msl_wire::{
    AdapterHealth, DiskState, Generations, Header, Heartbeat, Message, Role, MAX_ADAPTERS,
};

use crate::config::WriteMode;
use crate::gens::{Rule, Strategy};
use crate::meta::Meta;
use crate::verify::VerifyStatus;

/// Block payloads as the host holds them. The core never looks inside a
/// client block; it only builds and reads memory-image chunks.
pub trait Payload: Clone {
    fn from_bytes(bytes: &[u8]) -> Self;
    fn bytes(&self) -> &[u8];
}

/// Shared, immutable block data: cloning (for the retransmission buffer)
/// shares the block instead of copying it. What the daemon uses.
impl Payload for alloc::sync::Arc<[u8]> {
    fn from_bytes(bytes: &[u8]) -> Self {
        alloc::sync::Arc::from(bytes)
    }
    fn bytes(&self) -> &[u8] {
        self
    }
}

impl Payload for Vec<u8> {
    fn from_bytes(bytes: &[u8]) -> Self {
        bytes.to_vec()
    }
    fn bytes(&self) -> &[u8] {
        self
    }
}

/// Host-chosen id of a client request.
pub type ReqId = u64;

/// Core-chosen id of a local I/O.
pub type IoId = u64;

/// Memory-image chunk size (fits one frame at MTU 1500).
pub const IMAGE_CHUNK: usize = 1024;

/// What a client write does to its blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoKind {
    Write,
    Trim,
    Zeroes,
}

/// Planned administrator commands (`mslctl`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminCmd {
    /// Become primary (only with consistent, newest data, or `force`).
    Promote { force: bool },
    /// Stop serving; stay secondary.
    Demote,
    /// Hand the primary role to the in-sync peer without losing a write.
    Switchover,
    /// Drop the MSL session and stop reconnecting.
    Disconnect,
    /// Reconnect after `Disconnect`.
    Connect,
    /// Discard local data: full resync of this node from the peer.
    Invalidate,
    /// Online verify of `[start_block, start_block + count)` against the
    /// peer (primary only, while in sync). Progress and result in
    /// `Status::verify`; `VerifyFinished` when done. With `resync`,
    /// differing blocks are marked dirty and resynced from the primary
    /// (the session restarts once, like after a lost link).
    Verify {
        start_block: u64,
        count: u64,
        resync: bool,
    },
}

/// Inputs.
#[derive(Clone, Debug)]
pub enum Event<H> {
    /// Nothing but time passing (timers).
    Tick,
    /// Carrier of the MSL adapter.
    MslLink {
        up: bool,
    },
    /// Link/carrier of a LAN adapter.
    LanAdapter {
        adapter: u8,
        link_up: bool,
        carrier: bool,
    },
    /// A verified frame from the MSL (the host checked CRC, auth, cluster).
    MslFrame {
        header: Header,
        msg: Message,
        payload: Option<H>,
        /// When the frame arrived, taken on the receiving thread (the
        /// host's clock, as `now`): liveness counts from arrival, not from
        /// when the core got to it.
        arrived: crate::Micros,
    },
    /// A frame from the peer that verified (CRC, auth, cluster) but whose
    /// message type this build does not know. Ignored and counted, unless
    /// the sender marked it must-understand: then the session is refused.
    MslUnknownType {
        code: u8,
        must_understand: bool,
    },
    /// A verified server-state packet from a LAN adapter.
    LanFrame {
        adapter: u8,
        header: Header,
        hb: Heartbeat,
        /// When the packet arrived (see `MslFrame::arrived`).
        arrived: crate::Micros,
    },
    /// A client write, trim or write-zeroes of whole blocks.
    ClientWrite {
        req: ReqId,
        block: u64,
        count: u64,
        kind: IoKind,
        fua: bool,
        payload: Option<H>,
    },
    ClientFlush {
        req: ReqId,
    },
    /// A `Write` or `Flush` action finished.
    IoDone {
        io: IoId,
        ok: bool,
    },
    /// A `Read` action finished.
    ReadDone {
        io: IoId,
        ok: bool,
        payload: Option<H>,
    },
    /// Instead of `ReadDone`: the read's range, and the `blocks` blocks
    /// from its first (at least the read's count), hold no data on this
    /// volume and read as zeroes (a hole of a sparse file, found without
    /// reading it, e.g. with `SEEK_DATA`). A host that cannot tell always
    /// answers `ReadDone`.
    ReadHole {
        io: IoId,
        blocks: u64,
    },
    /// A `PersistMeta` action failed.
    MetaFailed,
    Admin(AdminCmd),
    /// The host lost input: a receive queue overflowed (the MSL ring, a
    /// LAN socket, the hand-off queue). The peer's frames may be among what
    /// was lost, so whatever silence the node measured is void: every path
    /// that was alive gets a fresh dead interval. It is not a stall: the
    /// node ran, so its own heartbeats went out and the peer cannot have
    /// taken over meanwhile; a primary keeps serving. Fed together with a
    /// gap of more than `stall_threshold_us`, the gap makes it a stall.
    InputOverrun,
    /// Whether this node holds the witness lease, and until when (the
    /// host's clock, as `now`): the host's lease client answers after
    /// every reply from the witness and whenever its view changes. Only
    /// with `Config::witness`.
    Lease {
        held: bool,
        until: crate::Micros,
    },
    /// The host has heard nothing from the witness for a while (or hears
    /// it again): with `NoQuorum::Sft3`, the node then behaves as without
    /// a witness.
    WitnessUnreachable {
        unreachable: bool,
    },
}

/// Why a client request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientError {
    /// This node does not serve clients now (reconnect to the service
    /// address).
    NotPrimary,
    /// An I/O error latched the node fail-closed.
    IoError,
    /// Request outside the volume.
    OutOfRange,
    /// Too many requests queued.
    Busy,
}

/// Which path a liveness notice is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    Msl,
    Lan,
}

/// Administrator notifications (console, log file, notification command).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    RoleChanged {
        role: Role,
        generation: u64,
        reason: &'static str,
    },
    PeerLost {
        path: Path,
    },
    PeerFound {
        path: Path,
    },
    MslLinkDown,
    MslLinkUp,
    /// Peer silent on both paths.
    PeerDown {
        peer_was: Role,
    },
    /// Primary keeps serving without its peer and tracks changes.
    Degraded {
        reason: &'static str,
    },
    /// Secondary took over after the primary failed.
    Takeover {
        generation: u64,
        reason: &'static str,
    },
    /// MSL lost but primary alive on the LAN: mirror side shut down.
    MirrorShutDown,
    CannotTakeOver {
        reason: &'static str,
    },
    Connected {
        strategy: Strategy,
        rule: Rule,
    },
    Refused {
        strategy: Strategy,
        rule: Rule,
    },
    ResyncStarted {
        source: bool,
        blocks: u64,
        full: bool,
    },
    ResyncProgress {
        source: bool,
        remaining: u64,
        total: u64,
    },
    ResyncFinished {
        source: bool,
        blocks: u64,
    },
    SwitchoverStarted {
        reason: &'static str,
    },
    SwitchoverDone {
        new_primary: u16,
    },
    AdapterHealth {
        adapter: u8,
        working: bool,
    },
    VerifyStarted {
        start_block: u64,
        blocks: u64,
    },
    VerifyFinished {
        checked: u64,
        differing: u64,
        first: Option<u64>,
    },
    VerifyAborted {
        reason: &'static str,
    },
    DiskFailed {
        what: &'static str,
    },
    /// This node did not run for `for_us`: it restarted its failure
    /// detection, and a primary holds new writes for one dead interval
    /// until it knows the peer did not take over.
    Stalled {
        for_us: u64,
    },
    Warning {
        what: &'static str,
    },
    /// The witness granted this node the lease (until `until`, its clock).
    LeaseGained {
        until: u64,
    },
    /// This node no longer holds the witness lease.
    LeaseLost {
        reason: &'static str,
    },
    /// The witness stopped or started answering.
    WitnessReachable {
        reachable: bool,
    },
}

impl Notice {
    /// Stable machine-readable event name.
    pub fn kind(&self) -> &'static str {
        match self {
            Notice::RoleChanged { .. } => "role_changed",
            Notice::PeerLost { .. } => "peer_lost",
            Notice::PeerFound { .. } => "peer_found",
            Notice::MslLinkDown => "msl_link_down",
            Notice::MslLinkUp => "msl_link_up",
            Notice::PeerDown { .. } => "peer_down",
            Notice::Degraded { .. } => "degraded",
            Notice::Takeover { .. } => "takeover",
            Notice::MirrorShutDown => "mirror_shut_down",
            Notice::CannotTakeOver { .. } => "cannot_take_over",
            Notice::Connected { .. } => "connected",
            Notice::Refused {
                strategy: Strategy::SplitBrain,
                ..
            } => "split_brain_refused",
            Notice::Refused { .. } => "connection_refused",
            Notice::ResyncStarted { .. } => "resync_started",
            Notice::ResyncProgress { .. } => "resync_progress",
            Notice::ResyncFinished { .. } => "resync_finished",
            Notice::SwitchoverStarted { .. } => "switchover_started",
            Notice::SwitchoverDone { .. } => "switchover_done",
            Notice::AdapterHealth { .. } => "lan_adapter_health",
            Notice::VerifyStarted { .. } => "verify_started",
            Notice::VerifyFinished { .. } => "verify_finished",
            Notice::VerifyAborted { .. } => "verify_aborted",
            Notice::DiskFailed { .. } => "disk_failed",
            Notice::Stalled { .. } => "stalled",
            Notice::Warning { .. } => "warning",
            Notice::LeaseGained { .. } => "lease_gained",
            Notice::LeaseLost { .. } => "lease_lost",
            Notice::WitnessReachable { reachable: true } => "witness_reachable",
            Notice::WitnessReachable { reachable: false } => "witness_unreachable",
        }
    }
}

impl fmt::Display for Notice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Notice::RoleChanged { role, generation, reason } => {
                write!(f, "role is now {role:?} (generation {generation:016x}): {reason}")
            }
            Notice::PeerLost { path } => write!(f, "peer silent on the {path:?} path"),
            Notice::PeerFound { path } => write!(f, "peer heard again on the {path:?} path"),
            Notice::MslLinkDown => write!(f, "MSL adapter lost carrier"),
            Notice::MslLinkUp => write!(f, "MSL adapter has carrier"),
            Notice::PeerDown { peer_was } => write!(f, "peer ({peer_was:?}) is down: silent on both MSL and LAN"),
            Notice::Degraded { reason } => write!(f, "still primary, running degraded and tracking changes: {reason}"),
            Notice::Takeover { generation, reason } => {
                write!(f, "took over as primary in generation {generation:016x}: {reason}")
            }
            Notice::MirrorShutDown => write!(
                f,
                "MSL lost but the primary is alive on the LAN: mirror side shut down, data outdated, not taking over"
            ),
            Notice::CannotTakeOver { reason } => write!(f, "cannot take over: {reason}"),
            Notice::Connected { strategy, rule } => {
                write!(f, "MSL session up: {strategy:?} by rule {}", rule.name())
            }
            Notice::Refused { strategy, rule } => write!(
                f,
                "MSL session refused: {strategy:?} by rule {}; data not merged, administrator must decide",
                rule.name()
            ),
            Notice::ResyncStarted { source, blocks, full } => write!(
                f,
                "resync started as {}: {blocks} blocks{}",
                if *source { "source" } else { "target" },
                if *full { " (full)" } else { "" }
            ),
            Notice::ResyncProgress { source, remaining, total } => write!(
                f,
                "resync ({}) {remaining} of {total} blocks remaining",
                if *source { "source" } else { "target" }
            ),
            Notice::ResyncFinished { source, blocks } => write!(
                f,
                "resync finished as {} after {blocks} blocks: volumes in sync",
                if *source { "source" } else { "target" }
            ),
            Notice::SwitchoverStarted { reason } => write!(f, "switchover started: {reason}"),
            Notice::SwitchoverDone { new_primary } => write!(f, "switchover done: node {new_primary} is primary"),
            Notice::AdapterHealth { adapter, working } => {
                write!(f, "LAN adapter {adapter} is {}", if *working { "working" } else { "FAILED" })
            }
            Notice::DiskFailed { what } => write!(f, "I/O error on {what}: node fail-closed, no more acknowledgements"),
            Notice::VerifyStarted { start_block, blocks } => {
                write!(f, "online verify started: {blocks} blocks from block {start_block}")
            }
            Notice::VerifyFinished { checked, differing, first } => match first {
                None => write!(f, "online verify finished: {checked} blocks compared, all identical"),
                Some(b) => write!(
                    f,
                    "online verify finished: {checked} blocks compared, {differing} DIFFER (first: block {b})"
                ),
            },
            Notice::VerifyAborted { reason } => write!(f, "online verify aborted: {reason}"),
            Notice::Stalled { for_us } => write!(
                f,
                "this node did not run for {} ms: failure detection restarted, peer judged after a full dead interval",
                for_us / 1000
            ),
            Notice::Warning { what } => write!(f, "{what}"),
            Notice::LeaseGained { until } => write!(f, "holds the witness lease (until {until} us)"),
            Notice::LeaseLost { reason } => write!(f, "no longer holds the witness lease: {reason}"),
            Notice::WitnessReachable { reachable: true } => write!(f, "the witness answers again"),
            Notice::WitnessReachable { reachable: false } => write!(f, "the witness does not answer"),
        }
    }
}

/// Outputs, executed by the host in order.
#[derive(Clone, Debug)]
pub enum Action<H> {
    /// Send on the MSL. `msg.is_control()` frames go ahead of data.
    SendMsl {
        header: Header,
        msg: Message,
        payload: Option<H>,
    },
    /// Send a server-state packet on every LAN adapter.
    SendLan {
        header: Header,
        hb: Heartbeat,
    },
    Write {
        io: IoId,
        block: u64,
        count: u64,
        kind: IoKind,
        fua: bool,
        payload: Option<H>,
    },
    Read {
        io: IoId,
        block: u64,
        count: u64,
    },
    Flush {
        io: IoId,
    },
    /// Write this metadata durably and atomically before the next action.
    PersistMeta(Meta),
    Reply {
        req: ReqId,
        result: Result<(), ClientError>,
    },
    Notify(Notice),
    /// Hold (add + gratuitous ARP) or release the service address.
    ServiceAddress {
        hold: bool,
    },
    /// Restart this node's daemon; it comes back as secondary.
    Restart,
    /// Acquire and keep renewing the witness lease (true), or release it
    /// (false). Only with `Config::witness`; emitted when the wish changes,
    /// and `true` again when the node needs a renewal at once (it lost its
    /// peer: only a lease confirmed after that counts).
    WantLease(bool),
}

/// Counters for status and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub frames_from_stranger: u64,
    pub frames_wrong_generation: u64,
    pub frames_unexpected: u64,
    pub frames_unknown_ignored: u64,
    pub frames_unknown_refused: u64,
    pub client_writes: u64,
    pub client_writes_refused: u64,
    pub takeovers: u64,
    pub split_brains: u64,
    /// Resync blocks sent with their data.
    pub resync_blocks_sent: u64,
    /// Resync blocks sent as zero runs (holes of the source's volume):
    /// no data, no read.
    pub resync_zero_blocks_sent: u64,
    pub resync_blocks_received: u64,
    pub meta_writes: u64,
    pub retransmits: u64,
    /// Heartbeats and HELLOs dropped because they were not newer than the
    /// newest one heard from the peer on that path (replayed, duplicated or
    /// reordered).
    pub frames_replayed: u64,
    /// Stalls this node detected (times it did not run).
    pub stalls: u64,
    /// Times its host reported lost input while it ran
    /// (`Event::InputOverrun`): failure detection restarted, no hold.
    pub input_lost: u64,
    /// Times this node, primary before a stall, found that the peer took
    /// over meanwhile and stepped down without acknowledging a write.
    pub deposed: u64,
}

/// Snapshot for `mslctl status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub node_id: u16,
    pub role: Role,
    pub disk: DiskState,
    pub generation: u64,
    pub connected: bool,
    pub in_sync: bool,
    pub msl_alive: bool,
    pub lan_alive: bool,
    pub peer_role: Option<Role>,
    pub dirty_blocks: u64,
    pub resync_remaining: u64,
    pub resync_total: u64,
    pub resync_source: bool,
    pub pending_writes: usize,
    pub pending_flushes: usize,
    pub switching: bool,
    /// Why the last MSL session ended, if one did.
    pub last_session_end: Option<&'static str>,
    pub counters: Counters,
    pub peer_id: u16,
    pub write_mode: WriteMode,
    /// MSL carrier as the host reported it.
    pub msl_link_up: bool,
    /// This node's LAN adapters (the first `adapter_count` are valid):
    /// link, carrier and whether the peer's heartbeats arrive on each.
    pub adapters: [AdapterHealth; MAX_ADAPTERS],
    pub adapter_count: u8,
    /// Generation identifiers (current, bitmap, history).
    pub gens: Generations,
    /// Latched after a failed write or metadata update.
    pub failed: bool,
    /// The current or last online verify.
    pub verify: VerifyStatus,
    /// The witness lease held now, and until when (host clock).
    pub lease_until: Option<u64>,
    /// The node asks for the witness lease.
    pub lease_wanted: bool,
    /// The host reported the witness unreachable.
    pub witness_unreachable: bool,
}
