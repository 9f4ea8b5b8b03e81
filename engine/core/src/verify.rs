//! Online verify: compare both copies of a block range while the pair is
//! connected, without pausing clients (DRBD's online verify).
//!
//! The primary walks the range in chunks. For each chunk it reads (and
//! hashes) its own blocks at the moment it queues VERIFY_REQ on the reliable
//! stream, on the core thread: every write queued before the request is
//! already on its volume and every later one is not. The secondary handles
//! VERIFY_REQ in stream order, after every write sent before it has been
//! applied, and answers VERIFY_REPLY with its digests. So both digests
//! describe the same moment of the mirrored stream. Writes a client sends
//! meanwhile do not disturb the comparison.
//!
//! Holes: when the primary's read of a chunk finds a hole that goes on
//! past it, the run covers the rest of the hole (up to
//! `MAX_ZERO_RANGE_BLOCKS`) with one zero-range VERIFY_REQ instead of
//! chunks. The secondary, in stream order as for any VERIFY_REQ, answers
//! how many blocks from its first are a hole on its side too, without
//! reading them; the blocks after those are verified chunk by chunk (so a
//! block with data on the secondary only is compared, and one holding zero
//! bytes equals a hole). The primary's hole was seen by its chunk read,
//! earlier than the request goes out: the request covers only blocks no
//! client write issued since that read touched (`note_write`), so at the
//! request's point of the stream the range is still a hole on the primary,
//! and both sides are compared at the same moment, as for a chunk.
//!
//! Digest: the first 8 bytes of BLAKE3 of each block (a 64-bit digest; a
//! random collision hides a difference with probability 2^-64 per block),
//! and 0 for a block of zeroes, whatever its size: a hole digests without
//! hashing, and zero bytes on one side equal a hole on the other.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

/// Blocks per VERIFY_REQ while clients are idle (1 MiB at 4 KiB blocks:
/// one volume read).
pub const CHUNK_BLOCKS: u32 = 256;
/// Chunks in flight at once while clients are idle.
pub const MAX_IN_FLIGHT: usize = 2;
/// While clients write: one small chunk at a time, so that the reads and
/// hashing on both core threads come in short slices between writes.
pub const BUSY_CHUNK_BLOCKS: u32 = 32;
/// Differing block numbers kept for the report.
pub const FIRST_DIFFERING: usize = 8;
/// Most blocks one zero-range VERIFY_REQ covers (4 GiB at 4 KiB blocks):
/// a terabyte hole costs a few hundred round trips, and progress still
/// shows.
pub const MAX_ZERO_RANGE_BLOCKS: u32 = 1 << 20;

/// 64-bit digest of one block (0 for zeroes).
pub fn block_digest(block: &[u8]) -> u64 {
    if block.iter().all(|&b| b == 0) {
        return 0;
    }
    let h = blake3::hash(block);
    let mut d = [0u8; 8];
    d.copy_from_slice(&h.as_bytes()[..8]);
    u64::from_le_bytes(d)
}

/// Digests of `count` blocks of zeroes (a hole), as `digests` gives them.
pub fn zero_digests(count: usize) -> Vec<u8> {
    alloc::vec![0; count * 8]
}

/// Digests of consecutive blocks, as the VERIFY_REPLY payload (8 bytes
/// little endian per block).
pub fn digests(data: &[u8], block_size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() / block_size.max(1) * 8);
    for b in data.chunks(block_size.max(1)) {
        out.extend_from_slice(&block_digest(b).to_le_bytes());
    }
    out
}

/// Progress and result of the current or last verify run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerifyStatus {
    pub active: bool,
    /// Range being verified.
    pub start_block: u64,
    pub total_blocks: u64,
    /// Blocks compared so far.
    pub checked_blocks: u64,
    pub differing_blocks: u64,
    /// Of `checked_blocks`, those found a hole on both sides (compared
    /// without reading them).
    pub hole_blocks: u64,
    /// The first differing block numbers (`first_len` valid).
    pub first_differing: [u64; FIRST_DIFFERING],
    pub first_len: u8,
    /// Why the run stopped early, if it did.
    pub aborted: Option<&'static str>,
    /// Runs completed since start.
    pub runs: u64,
}

#[derive(Debug)]
struct Chunk {
    count: u32,
    local: Option<Vec<u8>>,
    remote: Option<Vec<u8>>,
    /// A zero-range request (the primary's blocks are a hole): no digests.
    zero_range: bool,
    /// While the local read is pending: the first block at or after the
    /// chunk's start that a client write issued since the read touched
    /// (a hole the read reports is trusted only below it).
    written_from: u64,
}

impl Chunk {
    fn new(count: u32, zero_range: bool) -> Self {
        Chunk {
            count,
            local: None,
            remote: None,
            zero_range,
            written_from: u64::MAX,
        }
    }
}

/// The primary's side of a run.
#[derive(Debug, Default)]
pub struct VerifyRun {
    pub status: VerifyStatus,
    next_block: u64,
    end_block: u64,
    in_flight: BTreeMap<u64, Chunk>,
    /// The primary's blocks from `next_block` up to here are a hole: seen
    /// by a chunk read, and no client write issued since touched them.
    hole_until: u64,
    /// Differing blocks found since the last `take_differing` (at most a
    /// chunk or two: the node drains it after every comparison).
    differing: Vec<u64>,
}

impl VerifyRun {
    /// Start over `[start, start + count)`, clipped to the volume.
    pub fn start(&mut self, start: u64, count: u64, volume_blocks: u64) {
        let start = start.min(volume_blocks);
        let end = start.saturating_add(count).min(volume_blocks);
        let runs = self.status.runs;
        *self = VerifyRun {
            status: VerifyStatus {
                active: true,
                start_block: start,
                total_blocks: end - start,
                runs,
                ..VerifyStatus::default()
            },
            next_block: start,
            end_block: end,
            in_flight: BTreeMap::new(),
            hole_until: 0,
            differing: Vec::new(),
        };
    }

    /// The next chunk to request, if the run has room for one. `busy`:
    /// clients are writing (smaller chunks, one at a time).
    pub fn next_chunk(&mut self, busy: bool) -> Option<(u64, u32)> {
        let (chunk, max) = if busy {
            (BUSY_CHUNK_BLOCKS, 1)
        } else {
            (CHUNK_BLOCKS, MAX_IN_FLIGHT)
        };
        if !self.status.active
            || self.in_flight.len() >= max
            || self.next_block >= self.end_block
            || self.in_flight.values().any(|c| c.zero_range)
        {
            // While a zero range is out, nothing more: its reply may send
            // the run back to its first block that holds data.
            return None;
        }
        let start = self.next_block;
        let count = (self.end_block - start).min(u64::from(chunk)) as u32;
        self.next_block += u64::from(count);
        self.in_flight.insert(start, Chunk::new(count, false));
        Some((start, count))
    }

    /// The next zero range to request, `(start, count)`: the blocks from
    /// `next_block` on that are known to be a hole here (`local_hole`).
    /// One at a time, and no chunk while it is out.
    pub fn next_zero_range(&mut self) -> Option<(u64, u32)> {
        let from = self.next_block;
        if !self.status.active || self.in_flight.values().any(|c| c.zero_range) {
            return None;
        }
        let end = self
            .hole_until
            .min(self.end_block)
            .min(from.saturating_add(u64::from(MAX_ZERO_RANGE_BLOCKS)));
        if end <= from {
            return None;
        }
        let count = (end - from) as u32;
        self.next_block = end;
        self.in_flight.insert(from, Chunk::new(count, true));
        Some((from, count))
    }

    /// A client write of `[block, block + count)` was issued (to the local
    /// volume and the stream). A hole seen before it is no longer trusted
    /// where it writes.
    pub fn note_write(&mut self, block: u64, count: u64) {
        let end = block.saturating_add(count);
        for (&start, c) in self.in_flight.iter_mut() {
            if c.local.is_none() && !c.zero_range && end > start {
                c.written_from = c.written_from.min(block.max(start));
            }
        }
        if end > self.next_block {
            self.hole_until = self.hole_until.min(block.max(self.next_block));
        }
    }

    /// The local read of the chunk at `start` found it in a hole of `hole`
    /// blocks from `start` (as the volume was when the read was issued).
    /// The blocks past those already requested go as zero ranges
    /// (`next_zero_range`). Call before `local` (which ends the chunk).
    pub fn local_hole(&mut self, start: u64, hole: u64) {
        if let Some(c) = self.in_flight.get(&start) {
            let until = start.saturating_add(hole).min(c.written_from);
            self.hole_until = self.hole_until.max(until);
        }
    }

    /// The peer's answer to the zero range at `start`: its first `hole`
    /// blocks are a hole there too (equal); the rest are verified chunk by
    /// chunk. Returns false for a reply that matches no zero range.
    pub fn remote_zero(&mut self, start: u64, hole: u32) -> bool {
        match self.in_flight.get(&start) {
            Some(c) if c.zero_range && hole <= c.count => {
                let count = c.count;
                self.in_flight.remove(&start);
                if hole < count {
                    // Data on the peer: verify from there chunk by chunk.
                    // Nothing was requested after the zero range.
                    self.next_block = start + u64::from(hole);
                    self.hole_until = 0;
                }
                self.status.checked_blocks += u64::from(hole);
                self.status.hole_blocks += u64::from(hole);
                self.finish_if_done();
                true
            }
            _ => false,
        }
    }

    /// Local digests of a chunk (from the primary's own read).
    pub fn local(&mut self, start: u64, digests: Vec<u8>) {
        if let Some(c) = self.in_flight.get_mut(&start) {
            c.local = Some(digests);
        }
        self.compare(start);
    }

    /// The peer's digests (VERIFY_REPLY). Returns false for a reply that
    /// matches no request (counted by the caller).
    pub fn remote(&mut self, start: u64, count: u32, digests: &[u8]) -> bool {
        match self.in_flight.get_mut(&start) {
            Some(c) if !c.zero_range && c.count == count && digests.len() == count as usize * 8 => {
                c.remote = Some(digests.to_vec());
                self.compare(start);
                true
            }
            _ => false,
        }
    }

    fn compare(&mut self, start: u64) {
        let Some(c) = self.in_flight.get(&start) else {
            return;
        };
        let (Some(l), Some(r)) = (&c.local, &c.remote) else {
            return;
        };
        let st = &mut self.status;
        for (i, (a, b)) in l.chunks(8).zip(r.chunks(8)).enumerate() {
            if a != b {
                self.differing.push(start + i as u64);
                st.differing_blocks += 1;
                if usize::from(st.first_len) < FIRST_DIFFERING {
                    st.first_differing[usize::from(st.first_len)] = start + i as u64;
                    st.first_len += 1;
                }
            }
        }
        st.checked_blocks += u64::from(c.count);
        self.in_flight.remove(&start);
        self.finish_if_done();
    }

    fn finish_if_done(&mut self) {
        if self.next_block >= self.end_block && self.in_flight.is_empty() {
            self.status.active = false;
            self.status.runs += 1;
        }
    }

    /// Blocks found different since the last call.
    pub fn take_differing(&mut self) -> Vec<u64> {
        core::mem::take(&mut self.differing)
    }

    /// Stop the run (session lost, local read failed).
    pub fn abort(&mut self, why: &'static str) {
        if self.status.active {
            self.status.active = false;
            self.status.aborted = Some(why);
            self.in_flight.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks(vals: &[u8]) -> Vec<u8> {
        vals.iter().flat_map(|&v| [v; 16]).collect()
    }

    #[test]
    fn test_verify_run_finds_exactly_the_differing_blocks() {
        let mut r = VerifyRun::default();
        r.start(0, 600, 1000);
        let mut seen = 0;
        while r.status.active {
            let mut chunks = Vec::new();
            while let Some(c) = r.next_chunk(false) {
                chunks.push(c);
            }
            assert!(chunks.len() <= MAX_IN_FLIGHT);
            for (start, count) in chunks {
                let local: Vec<u8> = (0..count).map(|i| (start + u64::from(i)) as u8).collect();
                let mut remote = local.clone();
                // Blocks 3 and 300 differ on the peer.
                for b in [3u64, 300] {
                    if (start..start + u64::from(count)).contains(&b) {
                        remote[(b - start) as usize] ^= 0xff;
                    }
                }
                // Reply before the local digest: order does not matter.
                assert!(r.remote(start, count, &digests(&blocks(&remote), 16)));
                r.local(start, digests(&blocks(&local), 16));
                seen += count;
            }
        }
        assert_eq!(seen, 600);
        assert_eq!(r.status.checked_blocks, 600);
        assert_eq!(r.status.differing_blocks, 2);
        assert_eq!(&r.status.first_differing[..2], &[3, 300]);
        assert_eq!(r.take_differing(), alloc::vec![3, 300]);
        assert!(r.take_differing().is_empty());
        assert_eq!(r.status.runs, 1);
        assert!(r.status.aborted.is_none());
    }

    #[test]
    fn test_verify_reply_unknown_or_wrong_length_rejected() {
        let mut r = VerifyRun::default();
        r.start(10, 5, 12);
        assert_eq!(r.status.total_blocks, 2, "clipped to the volume");
        let (s, c) = r.next_chunk(false).unwrap();
        assert_eq!((s, c), (10, 2));
        assert!(!r.remote(11, 2, &[0; 16]), "no such chunk");
        assert!(!r.remote(10, 2, &[0; 8]), "short digest list");
        r.abort("session ended");
        assert!(!r.status.active);
        assert_eq!(r.status.aborted, Some("session ended"));
        assert!(r.next_chunk(false).is_none());
    }

    #[test]
    fn test_verify_busy_clients_get_small_chunks_one_at_a_time() {
        let mut r = VerifyRun::default();
        r.start(0, 1000, 1000);
        assert_eq!(r.next_chunk(true), Some((0, BUSY_CHUNK_BLOCKS)));
        assert_eq!(r.next_chunk(true), None, "one at a time while busy");
        assert_eq!(
            r.next_chunk(false),
            Some((32, CHUNK_BLOCKS)),
            "idle: room for a second"
        );
        assert_eq!(r.next_chunk(false), None);
    }

    #[test]
    fn test_verify_zero_range_after_a_hole_and_back_to_chunks_at_peer_data() {
        let mut r = VerifyRun::default();
        let total = 3 * u64::from(MAX_ZERO_RANGE_BLOCKS);
        r.start(0, total, total);
        assert_eq!(r.next_chunk(false), Some((0, CHUNK_BLOCKS)));
        assert_eq!(r.next_chunk(false), Some((256, CHUNK_BLOCKS)));
        assert_eq!(r.next_zero_range(), None, "no hole seen yet");
        // The first chunk's read: a hole up to 2_000_000 (a write issued
        // since at 900_000 cuts it there).
        r.note_write(900_000, 8);
        r.local_hole(0, 2_000_000);
        r.local(0, zero_digests(256));
        assert_eq!(r.next_zero_range(), Some((512, 900_000 - 512)));
        assert_eq!(
            r.next_chunk(false),
            None,
            "nothing while a zero range is out"
        );
        assert_eq!(r.next_zero_range(), None, "one at a time");
        assert!(!r.remote_zero(256, 0), "a chunk, not a zero range");
        assert!(
            !r.remote(512, 900_000 - 512, &[]),
            "a zero range, not a chunk"
        );
        assert!(!r.remote_zero(512, 900_000), "more than asked");
        // The peer has data at 700_000: chunks from there.
        assert!(r.remote_zero(512, 700_000 - 512));
        assert_eq!(r.status.hole_blocks, 700_000 - 512);
        assert_eq!(r.next_zero_range(), None);
        assert_eq!(r.next_chunk(false), None, "256 still in flight: one more");
        assert!(r.remote(0, 256, &zero_digests(256)));
        assert_eq!(r.next_chunk(false), Some((700_000, CHUNK_BLOCKS)));
        assert!(r.status.active);
        assert_eq!(r.status.checked_blocks, 256 + 700_000 - 512);
    }

    #[test]
    fn test_verify_hole_to_the_end_goes_in_capped_zero_ranges() {
        let mut r = VerifyRun::default();
        let total = 2 * u64::from(MAX_ZERO_RANGE_BLOCKS) + 100;
        r.start(0, total, total);
        let (s, c) = r.next_chunk(true).unwrap();
        r.local_hole(s, total);
        r.local(s, zero_digests(c as usize));
        assert!(r.remote(s, c, &zero_digests(c as usize)));
        let mut ranges = 0;
        while let Some((s, c)) = r.next_zero_range() {
            assert!(c <= MAX_ZERO_RANGE_BLOCKS);
            assert!(r.remote_zero(s, c));
            ranges += 1;
        }
        assert_eq!(ranges, 3);
        assert!(!r.status.active);
        assert_eq!(r.status.checked_blocks, total);
        assert_eq!(r.status.hole_blocks, total - u64::from(BUSY_CHUNK_BLOCKS));
        assert_eq!(r.status.differing_blocks, 0);
        assert_eq!(r.status.runs, 1);
    }

    #[test]
    fn test_zero_digests_are_digests_of_zero_blocks() {
        assert_eq!(zero_digests(3), digests(&[0u8; 3 * 4096], 4096));
        assert_eq!(
            zero_digests(2),
            digests(&[0u8; 2 * 8], 8),
            "whatever the size"
        );
        let mut one = [0u8; 4096];
        one[4095] = 1;
        assert_ne!(block_digest(&one), 0);
    }

    #[test]
    fn test_block_digest_differs_on_one_byte() {
        let a = [7u8; 4096];
        let mut b = a;
        b[4095] = 8;
        assert_ne!(block_digest(&a), block_digest(&b));
        assert_eq!(block_digest(&a), block_digest(&[7u8; 4096]));
    }
}
