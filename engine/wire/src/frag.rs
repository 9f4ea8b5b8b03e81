//! Fragmentation: splitting a message whose payload does not fit one frame
//! (MTU 1500, or the 3840-byte AF_XDP receive limit) into up to 255 frames,
//! and reassembling them into fixed, preallocated slots.
//!
//! Rules on the wire (fixed for `VERSION` 1):
//!
//! * every fragment of a message carries the same header (same `seq`,
//!   `generation`, `sender`), the same body, and `frag_index` `0..frag_count`;
//! * fragment `i` carries payload bytes `[i * chunk, min((i + 1) * chunk,
//!   len))`: every fragment but the last carries exactly `chunk` bytes and
//!   the last carries `1..=chunk` bytes. The receiver learns `chunk` from the
//!   first non-last fragment it sees, so sender and receiver need not agree
//!   on a frame size;
//! * only DATA, STATE_IMAGE and RESYNC_DATA carry payload, so only they are
//!   ever fragmented; a fragment never has an empty payload.
//!
//! The body's length / offset fields describe the whole message, not the
//! fragment.

use core::fmt;

use crate::frame::{self, EmitError, Key, Parsed};
use crate::msg::{Header, Message, ResyncDone};

/// At most this many fragments per message (`frag_count` is a u8).
pub const MAX_FRAGMENTS: usize = 255;

/// Payload bytes that fit in one frame of at most `max_frame` bytes (the
/// frame without the Ethernet header). 0 if the message type carries no
/// payload or if `max_frame` cannot hold header, body and trailer.
pub fn max_payload_per_frame(msg: &Message, max_frame: usize, keyed: bool) -> usize {
    let t = msg.msg_type();
    if !t.carries_payload() {
        return 0;
    }
    max_frame.saturating_sub(frame::overhead(t, keyed))
}

/// Number of frames needed to send `payload_len` payload bytes with frames
/// of at most `max_frame` bytes. Always at least 1. A result above
/// `MAX_FRAGMENTS` (including `usize::MAX` when no payload byte fits a
/// frame) means the message cannot be sent at this frame size:
/// `emit_fragment` refuses it.
pub fn fragment_count(msg: &Message, payload_len: usize, max_frame: usize, keyed: bool) -> usize {
    if payload_len == 0 {
        return 1;
    }
    let chunk = max_payload_per_frame(msg, max_frame, keyed);
    if chunk == 0 {
        return usize::MAX;
    }
    payload_len.div_ceil(chunk)
}

/// Like `fragment_count`, but refuses what cannot be sent, with the reason.
pub fn try_fragment_count(
    msg: &Message,
    payload_len: usize,
    max_frame: usize,
    keyed: bool,
) -> Result<u8, EmitError> {
    let t = msg.msg_type();
    if payload_len > 0 && !t.carries_payload() {
        return Err(EmitError::PayloadNotAllowed(t));
    }
    let min = frame::overhead(t, keyed) + usize::from(payload_len > 0);
    if max_frame < min {
        return Err(EmitError::FrameTooSmall { max_frame, min });
    }
    let n = fragment_count(msg, payload_len, max_frame, keyed);
    u8::try_from(n).map_err(|_| EmitError::PayloadTooLarge {
        len: payload_len,
        max: MAX_FRAGMENTS * max_payload_per_frame(msg, max_frame, keyed),
    })
}

/// Emit fragment `index` of `msg` with the whole message `payload`, as a
/// frame of at most `max_frame` bytes; returns the bytes written.
///
/// `header.frag_index` / `frag_count` are ignored and set from `index` and
/// the fragment count. Call with `index` in `0..fragment_count(..)`.
pub fn emit_fragment(
    header: &Header,
    msg: &Message,
    payload: &[u8],
    index: usize,
    max_frame: usize,
    key: Option<&Key>,
    out: &mut [u8],
) -> Result<usize, EmitError> {
    let keyed = key.is_some();
    let count = try_fragment_count(msg, payload.len(), max_frame, keyed)?;
    let Ok(frag_index) = u8::try_from(index) else {
        return Err(EmitError::FragmentIndex {
            index,
            count: usize::from(count),
        });
    };
    if frag_index >= count {
        return Err(EmitError::FragmentIndex {
            index,
            count: usize::from(count),
        });
    }
    let slice = if count == 1 {
        payload
    } else {
        let chunk = max_payload_per_frame(msg, max_frame, keyed);
        let start = index * chunk;
        let end = payload.len().min(start + chunk);
        payload.get(start..end).unwrap_or(&[])
    };
    let h = Header {
        frag_index,
        frag_count: count,
        ..*header
    };
    frame::emit(&h, msg, slice, key, out)
}

/// Why a fragment was refused by the `Reassembler`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReassemblyError {
    /// The fragment's header fields are not a valid fragment (only possible
    /// for a `Parsed` that did not come from `frame::parse`).
    BadFragment(&'static str),
    /// The message would exceed the slot size given to `Reassembler::new`.
    TooLarge {
        /// Bytes the message needs (at least).
        need: usize,
        /// Slot size.
        max: usize,
    },
    /// Fragment sizes contradict each other (the slot is dropped).
    Inconsistent(&'static str),
}

impl ReassemblyError {
    /// Stable snake_case metric name for this kind of error.
    pub const fn counter_name(&self) -> &'static str {
        match self {
            ReassemblyError::BadFragment(_) => "reasm_bad_fragment",
            ReassemblyError::TooLarge { .. } => "reasm_too_large",
            ReassemblyError::Inconsistent(_) => "reasm_inconsistent",
        }
    }
}

impl fmt::Display for ReassemblyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ReassemblyError::BadFragment(what) => write!(f, "invalid fragment: {what}"),
            ReassemblyError::TooLarge { need, max } => write!(
                f,
                "reassembled message needs {need} bytes, more than the {max}-byte slot (raise max_message_payload?)"
            ),
            ReassemblyError::Inconsistent(what) => {
                write!(f, "inconsistent fragments, message dropped: {what}")
            }
        }
    }
}

impl std::error::Error for ReassemblyError {}

/// A complete message out of the `Reassembler`: header (as unfragmented),
/// body and the whole payload, borrowed from the reassembler.
pub type Reassembled<'s> = (Header, Message, &'s [u8]);

/// One message being reassembled.
#[derive(Debug)]
struct Slot {
    busy: bool,
    /// Allocation order, for evicting the oldest.
    stamp: u64,
    sender: u16,
    generation: u64,
    seq: u64,
    msg: Message,
    frag_count: u8,
    /// Bitmap of fragments received.
    have: [u64; 4],
    received: u16,
    /// Payload bytes per non-last fragment; 0 until a non-last one arrived.
    chunk: usize,
    /// Payload bytes of the last fragment; 0 until it arrived.
    last_len: usize,
    /// The last fragment arrived before `chunk` was known and is parked at
    /// the end of `buf`.
    last_parked: bool,
    buf: Box<[u8]>,
}

impl Slot {
    fn new(max: usize) -> Slot {
        Slot {
            busy: false,
            stamp: 0,
            sender: 0,
            generation: 0,
            seq: 0,
            msg: Message::ResyncDone(ResyncDone { blocks_sent: 0 }),
            frag_count: 0,
            have: [0; 4],
            received: 0,
            chunk: 0,
            last_len: 0,
            last_parked: false,
            buf: vec![0u8; max].into_boxed_slice(),
        }
    }

    fn matches(&self, h: &Header) -> bool {
        self.busy && self.sender == h.sender && self.generation == h.generation && self.seq == h.seq
    }

    fn start(&mut self, p: &Parsed<'_>, stamp: u64) {
        self.busy = true;
        self.stamp = stamp;
        self.sender = p.header.sender;
        self.generation = p.header.generation;
        self.seq = p.header.seq;
        self.msg = p.msg;
        self.frag_count = p.header.frag_count;
        self.have = [0; 4];
        self.received = 0;
        self.chunk = 0;
        self.last_len = 0;
        self.last_parked = false;
    }

    /// Place one new (non-duplicate) fragment. On error the caller frees
    /// the slot.
    fn place(&mut self, index: usize, payload: &[u8]) -> Result<(), ReassemblyError> {
        let n = usize::from(self.frag_count);
        let max = self.buf.len();
        let len = payload.len();
        let too_large = |need: usize| ReassemblyError::TooLarge { need, max };
        if index + 1 == n {
            // The last fragment.
            if self.chunk != 0 {
                if len > self.chunk {
                    return Err(ReassemblyError::Inconsistent(
                        "last fragment longer than the others",
                    ));
                }
                let at = (n - 1) * self.chunk;
                let end = at.checked_add(len).filter(|&e| e <= max);
                let Some(dst) = end.and_then(|e| self.buf.get_mut(at..e)) else {
                    return Err(too_large(at.saturating_add(len)));
                };
                dst.copy_from_slice(payload);
            } else {
                // Size of the others unknown yet: park it at the end.
                let Some(at) = max.checked_sub(len) else {
                    return Err(too_large(len));
                };
                self.buf[at..].copy_from_slice(payload);
                self.last_parked = true;
            }
            self.last_len = len;
        } else {
            if self.chunk == 0 {
                // First non-last fragment: now the layout is known.
                let need = (n - 1)
                    .checked_mul(len)
                    .and_then(|x| x.checked_add(self.last_len.max(1)))
                    .unwrap_or(usize::MAX);
                if need > max {
                    return Err(too_large(need));
                }
                if self.last_parked {
                    if self.last_len > len {
                        return Err(ReassemblyError::Inconsistent(
                            "last fragment longer than the others",
                        ));
                    }
                    let from = max - self.last_len;
                    self.buf.copy_within(from..max, (n - 1) * len);
                    self.last_parked = false;
                }
                self.chunk = len;
            } else if len != self.chunk {
                return Err(ReassemblyError::Inconsistent(
                    "non-last fragments of different sizes",
                ));
            }
            // index < n - 1, so this ends at or before (n - 1) * chunk,
            // which was checked to fit.
            let at = index * self.chunk;
            self.buf[at..at + len].copy_from_slice(payload);
        }
        self.have[index / 64] |= 1 << (index % 64);
        self.received += 1;
        Ok(())
    }
}

/// Reassembles fragmented messages in a fixed number of slots, each a
/// buffer of `max_message_payload` bytes allocated once in `new`.
///
/// Frames with `frag_count == 1` pass through too (copied into a dedicated
/// buffer); on the hot path check `Parsed::is_fragment` first and use such
/// frames directly to avoid the copy.
#[derive(Debug)]
pub struct Reassembler {
    slots: Vec<Slot>,
    /// Buffer for unfragmented frames passed through `push`.
    pass: Box<[u8]>,
    next_stamp: u64,
    evicted: u64,
    resets: u64,
}

impl Reassembler {
    /// `slots` messages can be in reassembly at once (at least 1), each of
    /// up to `max_message_payload` payload bytes. All memory is allocated
    /// here.
    pub fn new(slots: usize, max_message_payload: usize) -> Self {
        Reassembler {
            slots: (0..slots.max(1))
                .map(|_| Slot::new(max_message_payload))
                .collect(),
            pass: vec![0u8; max_message_payload].into_boxed_slice(),
            next_stamp: 0,
            evicted: 0,
            resets: 0,
        }
    }

    /// Feed a parsed frame; returns the whole message once its last missing
    /// fragment arrives.
    ///
    /// The returned header is that of the completing fragment with
    /// `frag_index = 0` and `frag_count = 1`; the payload is the whole
    /// message payload. Duplicates are ignored. A fragment whose body or
    /// fragment count disagrees with the message in its slot (same sender,
    /// generation and seq) restarts that slot. When every slot is busy the
    /// oldest message is evicted (`evicted`). Never allocates.
    pub fn push<'s>(
        &'s mut self,
        p: &Parsed<'_>,
    ) -> Result<Option<Reassembled<'s>>, ReassemblyError> {
        let h = p.header;
        let n = usize::from(h.frag_count);
        let index = usize::from(h.frag_index);
        if n == 0 {
            return Err(ReassemblyError::BadFragment("frag_count is 0"));
        }
        if index >= n {
            return Err(ReassemblyError::BadFragment("frag_index >= frag_count"));
        }
        let done_header = Header {
            frag_index: 0,
            frag_count: 1,
            ..h
        };

        if n == 1 {
            // A complete message. Drop any stale partial copy of it (e.g. a
            // retransmission fragmented differently).
            if let Some(s) = self.slots.iter_mut().find(|s| s.matches(&h)) {
                s.busy = false;
            }
            let len = p.payload.len();
            let max = self.pass.len();
            let Some(dst) = self.pass.get_mut(..len) else {
                return Err(ReassemblyError::TooLarge { need: len, max });
            };
            dst.copy_from_slice(p.payload);
            return Ok(Some((done_header, p.msg, &self.pass[..len])));
        }

        if !p.msg.msg_type().carries_payload() {
            return Err(ReassemblyError::BadFragment(
                "fragmented message of a type without payload",
            ));
        }
        if p.payload.is_empty() {
            return Err(ReassemblyError::BadFragment("fragment with empty payload"));
        }

        let i = match self.slots.iter().position(|s| s.matches(&h)) {
            Some(i) => {
                let s = &self.slots[i];
                if s.msg != p.msg || s.frag_count != h.frag_count {
                    self.resets += 1;
                    let stamp = self.take_stamp();
                    self.slots[i].start(p, stamp);
                }
                i
            }
            None => {
                let i = match self.slots.iter().position(|s| !s.busy) {
                    Some(i) => i,
                    None => {
                        self.evicted += 1;
                        self.oldest()
                    }
                };
                let stamp = self.take_stamp();
                self.slots[i].start(p, stamp);
                i
            }
        };

        let s = &mut self.slots[i];
        if s.have[index / 64] & (1 << (index % 64)) != 0 {
            return Ok(None); // duplicate
        }
        if let Err(e) = s.place(index, p.payload) {
            s.busy = false;
            return Err(e);
        }
        if usize::from(s.received) < n {
            return Ok(None);
        }
        s.busy = false;
        // n >= 2 and every fragment arrived, so `chunk` and `last_len` are
        // known and were checked to fit the buffer.
        let total = (n - 1) * s.chunk + s.last_len;
        Ok(Some((done_header, s.msg, &s.buf[..total])))
    }

    /// Messages evicted unfinished because every slot was busy.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Slots restarted because a fragment disagreed with the message in it.
    pub fn resets(&self) -> u64 {
        self.resets
    }

    /// Messages currently being reassembled.
    pub fn in_progress(&self) -> usize {
        self.slots.iter().filter(|s| s.busy).count()
    }

    /// Drop every partial message (e.g. when the session restarts).
    pub fn clear(&mut self) {
        for s in &mut self.slots {
            s.busy = false;
        }
    }

    /// Largest message payload a slot holds.
    pub fn max_message_payload(&self) -> usize {
        self.pass.len()
    }

    fn take_stamp(&mut self) -> u64 {
        let s = self.next_stamp;
        self.next_stamp += 1;
        s
    }

    fn oldest(&self) -> usize {
        let mut best = 0;
        for (i, s) in self.slots.iter().enumerate() {
            if s.stamp < self.slots[best].stamp {
                best = i;
            }
        }
        best
    }
}
