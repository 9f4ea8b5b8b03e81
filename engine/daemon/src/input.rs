//! What the protocol core consumes, as the daemon's threads hand it over:
//! the [`Input`] enum and the types it carries (block payloads, where a
//! client's answer goes, LAN packets), and why the core stopped ([`Exit`]).
//!
//! A leaf: every other module may use it, it uses none of them.

use std::sync::mpsc::SyncSender;
use std::time::Instant;

use bytes::Bytes;
use msl_core::node::{ClientError, IoKind, Status};
use msl_core::AdminCmd;
use msl_wire::{Header, Heartbeat, Message};

/// Block data as the core holds it: a shared buffer (`bytes::Bytes`), so
/// keeping a block for retransmission does not copy it, a client write's
/// pieces and a volume read's buffer become blocks without a copy, and the
/// MSL frames are sent from it (see `msl_transport::worker::Payload`).
#[derive(Clone)]
pub struct Block(Bytes);

impl Block {
    /// The shared buffer.
    pub fn shared(&self) -> &Bytes {
        &self.0
    }
}

impl From<Bytes> for Block {
    fn from(b: Bytes) -> Block {
        Block(b)
    }
}

impl From<Vec<u8>> for Block {
    /// Takes the buffer over (no copy).
    fn from(v: Vec<u8>) -> Block {
        Block(Bytes::from(v))
    }
}

impl From<&[u8]> for Block {
    fn from(b: &[u8]) -> Block {
        Block(Bytes::copy_from_slice(b))
    }
}

impl std::ops::Deref for Block {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl msl_core::node::Payload for Block {
    fn from_bytes(bytes: &[u8]) -> Self {
        Block::from(bytes)
    }
    fn bytes(&self) -> &[u8] {
        self
    }
}

/// What the core consumes (through its `Inbox`).
pub enum Input {
    Msl {
        header: Header,
        msg: Message,
        payload: Option<Block>,
        /// When the receive thread took the frame (its last fragment)
        /// off the link: the core counts liveness from it.
        arrived: Instant,
    },
    MslUnknown {
        code: u8,
        must_understand: bool,
    },
    Lan(LanPacket),
    LanAdapter {
        adapter: u8,
        up: bool,
    },
    MslLink {
        up: bool,
    },
    Write {
        block: u64,
        count: u64,
        kind: IoKind,
        fua: bool,
        payload: Option<Block>,
        reply: ReplyTo,
    },
    Flush {
        reply: SyncSender<Reply>,
    },
    Admin(AdminCmd),
    Status(SyncSender<Status>),
    Stop,
    /// A volume write, trim or flush run off the core thread finished.
    IoDone {
        io: u64,
        ok: bool,
    },
    /// A volume read run off the core thread finished.
    ReadDone {
        io: u64,
        ok: bool,
        payload: Option<Block>,
    },
    /// A volume read found a hole of `blocks` blocks from its first
    /// (`Event::ReadHole`), instead of reading.
    ReadHole {
        io: u64,
        blocks: u64,
    },
    /// A metadata persist run off the core thread finished: with `ok`,
    /// it is durable and what the core emitted after it may happen;
    /// without, nothing after it may (the core gets `MetaFailed`).
    MetaDone {
        ok: bool,
    },
    /// A datagram from the witness's address (see `witness`).
    Witness {
        bytes: Vec<u8>,
        arrived: Instant,
    },
}

/// A client request's outcome.
pub type Reply = Result<(), ClientError>;

/// Where a client write's outcome goes.
pub enum ReplyTo {
    /// A thread waiting on the channel.
    Wait(SyncSender<Reply>),
    /// Called by whichever thread runs the core (an NBD reader, the MSL
    /// receive thread, ...; it must not block): the NBD front end's
    /// completion, which queues the reply for the connection's reply thread.
    Call(Box<dyn FnOnce(Reply) + Send>),
    /// An NBD write's completion and the ticket that counts it in flight:
    /// the common case of [`ReplyTo::Call`] without a boxed closure per
    /// write. The ticket is released before the reply is queued.
    Nbd(msl_nbd::Completion, Ticket),
}

/// Where a [`Ticket`] goes back to.
pub trait Release: Send + Sync {
    /// `n` counted items are done.
    fn release(&self, n: usize);
}

/// Counts `n` items (client writes in flight) until dropped: answered, or
/// dropped unanswered when the core is gone.
pub struct Ticket {
    owner: std::sync::Arc<dyn Release>,
    n: usize,
}

impl Ticket {
    pub fn new(owner: std::sync::Arc<dyn Release>, n: usize) -> Ticket {
        Ticket { owner, n }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.owner.release(self.n);
    }
}

/// The error an NBD client gets for a refused or failed request (the errno
/// NBD carries to it).
pub fn nbd_error(e: ClientError) -> std::io::Error {
    let errno = match e {
        ClientError::NotPrimary => 108, // ESHUTDOWN: reconnect to the service address
        ClientError::IoError => 5,      // EIO
        ClientError::OutOfRange => 22,  // EINVAL
        ClientError::Busy => 12,        // ENOMEM: try again
    };
    std::io::Error::from_raw_os_error(errno)
}

impl ReplyTo {
    pub(crate) fn send(self, r: Reply) {
        match self {
            ReplyTo::Wait(tx) => {
                let _ = tx.send(r);
            }
            ReplyTo::Call(f) => f(r),
            ReplyTo::Nbd(done, ticket) => {
                drop(ticket);
                done.complete(r.map_err(nbd_error));
            }
        }
    }
}

/// Why the driver stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// `Input::Stop` (clean shutdown).
    Stopped,
    /// The core asked to restart as secondary (after a switchover).
    Restart,
}

/// A verified server-state packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LanPacket {
    pub adapter: u8,
    pub header: Header,
    pub hb: Heartbeat,
    /// When it arrived: the kernel's receive timestamp where the socket
    /// gives one, else when the receive thread read it.
    pub arrived: Instant,
}
