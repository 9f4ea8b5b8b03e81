//! Fragmentation: splitting a message whose payload does not fit one frame
//! (MTU 1500, or the 3840-byte AF_XDP receive limit) into up to 255 frames,
//! and reassembling them into a fixed number of slots of bounded size.
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
use core::ops::Range;

use bytes::{Bytes, BytesMut};
use msl_buf::Chunks;

use crate::frame::{self, EmitError, Key, Parsed, TAG_LEN};
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
    let (h, range) = fragment(header, msg, payload.len(), index, max_frame, key.is_some())?;
    frame::emit(&h, msg, &payload[range], key, out)
}

/// [`emit_fragment`] without copying the payload (see
/// [`frame::emit_head`]): writes fragment `index`'s header and body into
/// `head`; returns their length, the range of `payload` the fragment
/// carries and its tag. On the wire: `head[..len]`, `payload[range]`, tag.
pub fn emit_fragment_head(
    header: &Header,
    msg: &Message,
    payload: &[u8],
    index: usize,
    max_frame: usize,
    key: Option<&Key>,
    head: &mut [u8],
) -> Result<(usize, Range<usize>, [u8; TAG_LEN]), EmitError> {
    let (h, range) = fragment(header, msg, payload.len(), index, max_frame, key.is_some())?;
    let (len, tag) = frame::emit_head(&h, msg, &payload[range.clone()], key, head)?;
    Ok((len, range, tag))
}

/// Fragment `index`'s header and the range of the payload it carries.
fn fragment(
    header: &Header,
    msg: &Message,
    payload_len: usize,
    index: usize,
    max_frame: usize,
    keyed: bool,
) -> Result<(Header, Range<usize>), EmitError> {
    let count = try_fragment_count(msg, payload_len, max_frame, keyed)?;
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
    let range = if count == 1 {
        0..payload_len
    } else {
        let chunk = max_payload_per_frame(msg, max_frame, keyed);
        let start = (index * chunk).min(payload_len);
        start..payload_len.min(start + chunk)
    };
    let h = Header {
        frag_index,
        frag_count: count,
        ..*header
    };
    Ok((h, range))
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
    /// Largest payload of a message (`Reassembler::new`).
    max: usize,
    /// The message's payload so far, at its offsets. It grows as fragments
    /// arrive: appended when they come in order (nothing zeroed first),
    /// zero-filled up to a fragment that comes early. Its room is cut from
    /// the reassembler's chunks of [`SLOT_CHUNK`] bytes, reused once every
    /// message taken from one is gone (`msl_buf::Chunks`).
    buf: BytesMut,
    /// The last fragment, kept here while `chunk` is unknown (it arrived
    /// before every other).
    parked: Vec<u8>,
}

/// Bytes of one of the reassembler's chunks, which the slots cut their
/// messages' room from: the room of the largest message that fits 255
/// frames of the largest MTU (9216), so every message fits one; or twice
/// the reassembler's largest message, if that is less.
pub const SLOT_CHUNK: usize = MAX_FRAGMENTS * 9216;

/// Chunks set aside besides the one in use (see `msl_buf::Chunks`).
pub(crate) const SLOT_CHUNKS_KEPT: usize = 3;

/// Write `data` at `at` in `buf`, growing it: appended when `at` is its
/// end.
fn put(buf: &mut BytesMut, at: usize, data: &[u8]) {
    if buf.len() == at {
        buf.extend_from_slice(data);
        return;
    }
    if buf.len() < at + data.len() {
        buf.resize(at + data.len(), 0);
    }
    buf[at..at + data.len()].copy_from_slice(data);
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
            max,
            buf: BytesMut::new(),
            parked: Vec::new(),
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
        self.buf.clear();
        self.parked.clear();
    }

    /// Place one new (non-duplicate) fragment. On error the caller frees
    /// the slot.
    fn place(
        &mut self,
        index: usize,
        payload: &[u8],
        chunks: &mut Chunks,
    ) -> Result<(), ReassemblyError> {
        let n = usize::from(self.frag_count);
        let max = self.max;
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
                if at.checked_add(len).is_none_or(|e| e > max) {
                    return Err(too_large(at.saturating_add(len)));
                }
                put(&mut self.buf, at, payload);
            } else {
                // Size of the others unknown yet: park it.
                if len > max {
                    return Err(too_large(len));
                }
                self.parked.clear();
                self.parked.extend_from_slice(payload);
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
                if self.last_len > len {
                    return Err(ReassemblyError::Inconsistent(
                        "last fragment longer than the others",
                    ));
                }
                self.chunk = len;
                // Room for a last fragment as long as the others, so the
                // buffer is never moved while the message comes in.
                let room = need.max(n.saturating_mul(len).min(max));
                if self.buf.capacity() < room {
                    // Empty until now: only the last fragment came before.
                    self.buf = chunks.take(room);
                }
                if !self.parked.is_empty() {
                    let parked = std::mem::take(&mut self.parked);
                    put(&mut self.buf, (n - 1) * len, &parked);
                    self.parked = parked;
                }
            } else if len != self.chunk {
                return Err(ReassemblyError::Inconsistent(
                    "non-last fragments of different sizes",
                ));
            }
            // index < n - 1, so this ends at or before (n - 1) * chunk,
            // which was checked to fit.
            put(&mut self.buf, index * self.chunk, payload);
        }
        self.have[index / 64] |= 1 << (index % 64);
        self.received += 1;
        Ok(())
    }
}

/// Reassembles fragmented messages in a fixed number of slots, each
/// holding at most `max_message_payload` bytes. A slot's buffer grows as
/// its message's fragments arrive and is kept for the next message, unless
/// the caller takes the finished payload over ([`Reassembler::take_completed`]),
/// which splits it off the slot's buffer, itself cut from a few chunks
/// reused in turn: no allocation per message.
///
/// Frames with `frag_count == 1` pass through too (copied into a dedicated
/// buffer); on the hot path check `Parsed::is_fragment` first and use such
/// frames directly to avoid the copy.
#[derive(Debug)]
pub struct Reassembler {
    slots: Vec<Slot>,
    /// Buffer for unfragmented frames passed through `push`.
    pass: Vec<u8>,
    /// Where the slots' buffers are cut from.
    chunks: Chunks,
    max: usize,
    /// The slot whose message the last `push` completed.
    completed: Option<usize>,
    next_stamp: u64,
    evicted: u64,
    resets: u64,
}

impl Reassembler {
    /// `slots` messages can be in reassembly at once (at least 1), each of
    /// up to `max_message_payload` payload bytes.
    pub fn new(slots: usize, max_message_payload: usize) -> Self {
        Reassembler {
            slots: (0..slots.max(1))
                .map(|_| Slot::new(max_message_payload))
                .collect(),
            pass: Vec::new(),
            chunks: Chunks::new(
                SLOT_CHUNK.min(max_message_payload.saturating_mul(2)),
                SLOT_CHUNKS_KEPT,
            ),
            max: max_message_payload,
            completed: None,
            next_stamp: 0,
            evicted: 0,
            resets: 0,
        }
    }

    /// Right after a `push` that completed a fragmented message: its
    /// payload, handed over (no copy). `None` after any other `push`.
    pub fn take_completed(&mut self) -> Option<Bytes> {
        let i = self.completed.take()?;
        // The rest of the slot's room goes too, or its chunk could not be
        // reused while the slot waits for its next message.
        Some(std::mem::take(&mut self.slots[i].buf).freeze())
    }

    /// Feed a parsed frame; returns the whole message once its last missing
    /// fragment arrives.
    ///
    /// The returned header is that of the completing fragment with
    /// `frag_index = 0` and `frag_count = 1`; the payload is the whole
    /// message payload. Duplicates are ignored. A fragment whose body or
    /// fragment count disagrees with the message in its slot (same sender,
    /// generation and seq) restarts that slot. When every slot is busy the
    /// oldest message is evicted (`evicted`). Allocates only for a slot's
    /// buffer: a chunk now and then ([`Reassembler::allocations`]), or a
    /// buffer of its own for a message larger than a chunk.
    pub fn push<'s>(
        &'s mut self,
        p: &Parsed<'_>,
    ) -> Result<Option<Reassembled<'s>>, ReassemblyError> {
        self.completed = None;
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
            if len > self.max {
                return Err(ReassemblyError::TooLarge {
                    need: len,
                    max: self.max,
                });
            }
            self.pass.clear();
            self.pass.extend_from_slice(p.payload);
            return Ok(Some((done_header, p.msg, &self.pass)));
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
        if let Err(e) = s.place(index, p.payload, &mut self.chunks) {
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
        s.buf.truncate(total);
        self.completed = Some(i);
        Ok(Some((done_header, s.msg, &s.buf[..])))
    }

    /// Buffers allocated for messages in fragments so far: a chunk now and
    /// then, not one per message.
    pub fn allocations(&self) -> u64 {
        self.chunks.allocations()
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
        self.max
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
