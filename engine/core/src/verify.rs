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
//! Digest: the first 8 bytes of BLAKE3 of each block (a 64-bit digest; a
//! random collision hides a difference with probability 2^-64 per block).

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

/// 64-bit digest of one block.
pub fn block_digest(block: &[u8]) -> u64 {
    let h = blake3::hash(block);
    let mut d = [0u8; 8];
    d.copy_from_slice(&h.as_bytes()[..8]);
    u64::from_le_bytes(d)
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
    /// The first differing block numbers (`first_len` valid).
    pub first_differing: [u64; FIRST_DIFFERING],
    pub first_len: u8,
    /// Why the run stopped early, if it did.
    pub aborted: Option<&'static str>,
    /// Runs completed since start.
    pub runs: u64,
}

#[derive(Debug, Default)]
struct Chunk {
    count: u32,
    local: Option<Vec<u8>>,
    remote: Option<Vec<u8>>,
}

/// The primary's side of a run.
#[derive(Debug, Default)]
pub struct VerifyRun {
    pub status: VerifyStatus,
    next_block: u64,
    end_block: u64,
    in_flight: BTreeMap<u64, Chunk>,
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
        if !self.status.active || self.in_flight.len() >= max || self.next_block >= self.end_block {
            return None;
        }
        let start = self.next_block;
        let count = (self.end_block - start).min(u64::from(chunk)) as u32;
        self.next_block += u64::from(count);
        self.in_flight.insert(
            start,
            Chunk {
                count,
                ..Chunk::default()
            },
        );
        Some((start, count))
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
            Some(c) if c.count == count && digests.len() == count as usize * 8 => {
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
        if self.next_block >= self.end_block && self.in_flight.is_empty() {
            st.active = false;
            st.runs += 1;
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
    fn test_block_digest_differs_on_one_byte() {
        let a = [7u8; 4096];
        let mut b = a;
        b[4095] = 8;
        assert_ne!(block_digest(&a), block_digest(&b));
        assert_eq!(block_digest(&a), block_digest(&[7u8; 4096]));
    }
}
