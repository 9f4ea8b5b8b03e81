//! The I/O table: every local read, write and flush the node asked the
//! host for, by its [`IoId`], with what it is for. A completion is looked
//! up here once, instead of in one map per purpose.
//!
//! I/O that belongs to an MSL session (applying the peer's writes, the
//! receiving side's flushes, resync reads) is dropped from the table when
//! the session ends: a late completion of it finds nothing and changes
//! nothing, whichever session runs by then.

use super::write::PendingWrite;
use super::{IoId, ReqId};
use crate::seqmap::SeqMap;

/// What an I/O in flight is for.
#[derive(Clone, Debug)]
pub(super) enum Purpose {
    /// A client write on the primary (released once both halves are done).
    ClientWrite(PendingWrite),
    /// A local flush covering the writes up to `mark` (a write id): a
    /// client's, or a stable point of the node's own (`client: None`).
    Flush { mark: u64, client: Option<ReqId> },
    /// Writing the peer's message `seq` (receiving side of a session).
    Apply { seq: u64 },
    /// A flush on the receiving side covering messages up to `seq`.
    ApplyFlush { seq: u64 },
    /// A resync read of `count` blocks from `block` (source side);
    /// `cancelled` once a client wrote some of them meanwhile; `writes`:
    /// the session's client-write count when it was issued, or `u64::MAX`
    /// if a client write was in flight then (a hole it reports beyond its
    /// blocks is trusted only if no client write was in flight or came
    /// since).
    ResyncRead {
        block: u64,
        count: u64,
        cancelled: bool,
        writes: u64,
    },
    /// A verify read of `count` blocks from `start`; `reply`: the peer
    /// asked for it (answer with the digests), else the local half of this
    /// node's own run. `zero_range`: the peer's zero-range request; the
    /// read is of its first block only, to learn the hole there.
    VerifyRead {
        start: u64,
        count: u32,
        reply: bool,
        zero_range: bool,
    },
}

/// The kinds of [`Purpose`], for counting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    ClientWrite,
    /// A client's flush.
    Flush,
    /// A flush of the node's own (a stable point).
    StablePoint,
    Apply,
    ApplyFlush,
    ResyncRead,
    VerifyRead,
}

const KINDS: usize = 7;

impl Purpose {
    pub(super) fn kind(&self) -> Kind {
        match self {
            Purpose::ClientWrite(_) => Kind::ClientWrite,
            Purpose::Flush { client: None, .. } => Kind::StablePoint,
            Purpose::Flush { .. } => Kind::Flush,
            Purpose::Apply { .. } => Kind::Apply,
            Purpose::ApplyFlush { .. } => Kind::ApplyFlush,
            Purpose::ResyncRead { .. } => Kind::ResyncRead,
            Purpose::VerifyRead { .. } => Kind::VerifyRead,
        }
    }

    /// Whether it dies with the MSL session.
    fn session_scoped(&self) -> bool {
        matches!(
            self.kind(),
            Kind::Apply | Kind::ApplyFlush | Kind::ResyncRead
        )
    }
}

/// I/O in flight by id; ids are handed out in increasing order.
#[derive(Debug)]
pub(super) struct IoTable {
    next: IoId,
    ios: SeqMap<IoId, Purpose>,
    counts: [usize; KINDS],
}

impl IoTable {
    pub(super) fn new() -> Self {
        IoTable {
            next: 1,
            ios: SeqMap::new(),
            counts: [0; KINDS],
        }
    }

    /// Register a new I/O; returns the id to put in its action.
    pub(super) fn start(&mut self, p: Purpose) -> IoId {
        let io = self.next;
        self.next += 1;
        self.counts[p.kind() as usize] += 1;
        let old = self.ios.insert(io, p);
        debug_assert!(old.is_none(), "io {io} issued twice");
        io
    }

    pub(super) fn kind(&self, io: IoId) -> Option<Kind> {
        self.ios.get(&io).map(Purpose::kind)
    }

    pub(super) fn get_mut(&mut self, io: IoId) -> Option<&mut Purpose> {
        self.ios.get_mut(&io)
    }

    /// Remove a finished I/O.
    pub(super) fn take(&mut self, io: IoId) -> Option<Purpose> {
        let p = self.ios.remove(&io)?;
        let k = p.kind() as usize;
        assert!(
            self.counts[k] > 0,
            "io table count of {:?} underflows",
            p.kind()
        );
        self.counts[k] -= 1;
        Some(p)
    }

    /// How many of a kind are in flight.
    pub(super) fn count(&self, k: Kind) -> usize {
        self.counts[k as usize]
    }

    /// Client writes in flight (or waiting for the peer), by io id.
    pub(super) fn client_writes(&self) -> impl Iterator<Item = (IoId, &PendingWrite)> {
        self.ios.iter().filter_map(|(&io, p)| match p {
            Purpose::ClientWrite(w) => Some((io, w)),
            _ => None,
        })
    }

    pub(super) fn client_writes_mut(&mut self) -> impl Iterator<Item = &mut PendingWrite> {
        self.ios.values_mut().filter_map(|p| match p {
            Purpose::ClientWrite(w) => Some(w),
            _ => None,
        })
    }

    /// Remove every client write, in io order.
    pub(super) fn take_client_writes(&mut self) -> alloc::vec::Vec<PendingWrite> {
        let ios: alloc::vec::Vec<IoId> = self.client_writes().map(|(io, _)| io).collect();
        ios.into_iter()
            .filter_map(|io| match self.take(io) {
                Some(Purpose::ClientWrite(w)) => Some(w),
                _ => None,
            })
            .collect()
    }

    /// Mark resync reads overlapping `[block, block + count)` cancelled.
    pub(super) fn cancel_resync_reads(&mut self, block: u64, count: u64) {
        for p in self.ios.values_mut() {
            if let Purpose::ResyncRead {
                block: b,
                count: c,
                cancelled,
                ..
            } = p
            {
                if *b < block + count && block < *b + *c {
                    *cancelled = true;
                }
            }
        }
    }

    /// The MSL session ended: its I/O is forgotten.
    pub(super) fn end_session(&mut self) {
        self.ios.retain(|_, p| !p.session_scoped());
        for k in [Kind::Apply, Kind::ApplyFlush, Kind::ResyncRead] {
            self.counts[k as usize] = 0;
        }
        debug_assert_eq!(self.ios.len(), self.counts.iter().sum::<usize>());
    }
}
