//! Payload buffers without an allocation per payload.
//!
//! A client write's payload, an MSL message's payload and a reassembled
//! message each live in a shared buffer (`bytes::Bytes`) that the volume
//! write, the MSL frames and the retransmission queue hold at once.
//! [`Chunks`] cuts those buffers from a few large chunks: each chunk is
//! used front to back, then set aside, and taken again once every buffer
//! cut from it is gone (`BytesMut::try_reclaim`). A steady stream with less
//! than the ring's bytes in flight therefore allocates nothing; a deeper
//! one allocates one chunk per chunk's worth of payloads.
//!
//! Written here because it is a few lines over `bytes`: the pool crates
//! hand out fixed-size buffers, which would waste most of a 64 KiB buffer
//! on a 4 KiB write or copy a large one.
//!
//! [`queue`] carries work from many threads to one worker (the disk
//! worker's operations, an NBD connection's replies) the same way: its
//! room is kept, so a steady stream allocates nothing.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::collections::VecDeque;

use bytes::BytesMut;

pub mod queue;

/// Buffers cut from a ring of chunks (see the crate).
#[derive(Debug)]
pub struct Chunks {
    /// The chunk buffers are cut from now; always empty (`len` 0).
    cur: BytesMut,
    /// Chunks used up, oldest first, waiting for their buffers to go.
    spare: VecDeque<BytesMut>,
    size: usize,
    keep: usize,
    fresh: u64,
    /// `cur` is a chunk (false until the first one is made).
    started: bool,
}

impl Chunks {
    /// Chunks of `size` bytes, at most `keep` of them set aside besides the
    /// one in use. Nothing is allocated until the first [`Chunks::take`].
    pub fn new(size: usize, keep: usize) -> Self {
        Chunks {
            cur: BytesMut::new(),
            spare: VecDeque::with_capacity(keep + 1),
            size: size.max(1),
            keep,
            fresh: 0,
            started: false,
        }
    }

    /// Bytes of a chunk of [`Chunks::for_blocks`].
    pub const BLOCK_CHUNK: usize = 512 * 1024;

    /// The ring for block payloads of up to 64 KiB (an NBD connection's
    /// writes, the blocks the MSL receiver takes off its ring): chunks of
    /// [`Chunks::BLOCK_CHUNK`] bytes, 3 set aside.
    pub fn for_blocks() -> Self {
        Self::new(Self::BLOCK_CHUNK, 3)
    }

    /// An empty buffer with room for at least `need` bytes, cut from the
    /// current chunk; freeze it once written. A request larger than a
    /// chunk gets a buffer of its own.
    pub fn take(&mut self, need: usize) -> BytesMut {
        if need > self.size {
            self.fresh += 1;
            return BytesMut::with_capacity(need);
        }
        if self.cur.capacity() < need {
            self.next_chunk();
        }
        let rest = self.cur.split_off(need);
        std::mem::replace(&mut self.cur, rest)
    }

    /// Set the current chunk aside and move to the oldest chunk whose
    /// buffers are all gone (the current one included), or to a new one.
    fn next_chunk(&mut self) {
        let used = std::mem::take(&mut self.cur);
        if self.started {
            self.spare.push_back(used);
        }
        self.started = true;
        let size = self.size;
        self.cur = match self.spare.iter_mut().position(|c| c.try_reclaim(size)) {
            Some(i) => self.spare.remove(i).unwrap_or_default(),
            None => {
                self.fresh += 1;
                BytesMut::with_capacity(size)
            }
        };
        while self.spare.len() > self.keep {
            // Its memory goes when its last buffer does.
            self.spare.pop_front();
        }
    }

    /// Chunks (and oversized buffers) allocated so far.
    pub fn allocations(&self) -> u64 {
        self.fresh
    }
}

#[cfg(test)]
mod tests {
    use super::Chunks;
    use bytes::Bytes;

    fn fill(c: &mut Chunks, len: usize, byte: u8) -> Bytes {
        let mut b = c.take(len);
        assert!(b.is_empty() && b.capacity() >= len);
        b.resize(len, byte);
        b.freeze()
    }

    /// Buffers dropped at once: one chunk serves every payload.
    #[test]
    fn test_released_buffers_reuse_one_chunk() {
        let mut c = Chunks::new(64 * 1024, 3);
        for i in 0..10_000 {
            let b = fill(&mut c, 4096 + i % 3, i as u8);
            assert!(b.iter().all(|&x| x == i as u8));
        }
        assert_eq!(c.allocations(), 1);
    }

    /// Buffers held while the ring turns: a chunk comes back once every
    /// buffer cut from it is gone, and held buffers are never written to.
    #[test]
    fn test_held_buffers_keep_their_chunk_until_dropped() {
        let mut c = Chunks::new(64 * 1024, 3);
        // A window of 24 KiB x 4 in flight (96 KiB: two chunks' worth).
        let mut held = std::collections::VecDeque::new();
        for i in 0..5_000u32 {
            held.push_back((fill(&mut c, 24 * 1024, i as u8), i as u8));
            if held.len() > 4 {
                let (b, v) = held.pop_front().unwrap();
                assert!(b.iter().all(|&x| x == v), "payload {v} overwritten");
            }
        }
        assert!(c.allocations() <= 3, "{} chunks", c.allocations());
        // Past the ring (everything held): new chunks, nothing overwritten.
        let all: Vec<_> = (0..40u8).map(|i| (fill(&mut c, 24 * 1024, i), i)).collect();
        for (b, v) in &all {
            assert!(b.iter().all(|x| x == v));
        }
        assert!(c.allocations() > 3);
    }

    /// A request larger than a chunk gets its own buffer.
    #[test]
    fn test_oversized_request_gets_its_own_buffer() {
        let mut c = Chunks::new(4096, 1);
        let b = c.take(10_000);
        assert!(b.capacity() >= 10_000);
        assert_eq!(c.allocations(), 1);
    }
}
