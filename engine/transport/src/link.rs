//! The two halves every backend provides: a transmit half that fills
//! backend-owned buffers in batches, and a receive half that hands out
//! received frames in batches. Each half is owned by one pinned worker
//! thread, so neither needs a lock.

use std::io;
use std::time::Duration;

/// Most frames one `send_with` or `recv` call handles.
pub const MAX_BATCH: usize = 64;

/// One Ethernet frame as the byte runs it goes out from, back to back: up
/// to three (the header and body, the payload where it lies, the tag), so
/// a payload leaves from its own buffer, gathered by the kernel
/// (`sendmmsg` iovecs) or copied once into a backend's buffer.
#[derive(Clone, Copy, Debug, Default)]
pub struct FrameRef<'a> {
    parts: [&'a [u8]; 3],
}

impl<'a> FrameRef<'a> {
    /// A frame made of `parts`, in order (empty parts are skipped).
    pub fn new(parts: [&'a [u8]; 3]) -> Self {
        FrameRef { parts }
    }

    /// A frame in one piece.
    pub fn whole(bytes: &'a [u8]) -> Self {
        FrameRef {
            parts: [bytes, &[], &[]],
        }
    }

    /// Its pieces, in order.
    pub fn parts(&self) -> [&'a [u8]; 3] {
        self.parts
    }

    /// Bytes on the wire.
    pub fn len(&self) -> usize {
        self.parts.iter().map(|p| p.len()).sum()
    }

    /// True for a frame of no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Write the frame into the start of `out`; returns its length, or
    /// `None` (nothing written) when `out` is too short.
    pub fn copy_to(&self, out: &mut [u8]) -> Option<usize> {
        let n = self.len();
        let out = out.get_mut(..n)?;
        let mut at = 0;
        for p in self.parts {
            out[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        Some(n)
    }

    /// The frame as one buffer.
    pub fn to_vec(&self) -> Vec<u8> {
        self.parts.concat()
    }
}

impl<'a> From<&'a [u8]> for FrameRef<'a> {
    fn from(bytes: &'a [u8]) -> Self {
        FrameRef::whole(bytes)
    }
}

/// Transmit half of a link.
pub trait TxLink: Send {
    /// Largest Ethernet frame (header included) this link carries.
    fn max_frame_len(&self) -> usize;

    /// Send up to `max` frames (at most `MAX_BATCH`). For frame `i` the
    /// backend hands `emit` a buffer of `max_frame_len()` bytes; `emit`
    /// writes one Ethernet frame and returns its length, or `None` when it
    /// has nothing more to send. Returns how many frames were sent. Frames
    /// that `emit` wrote are always sent (the backend reserves room first).
    fn send_with(
        &mut self,
        max: usize,
        emit: &mut dyn FnMut(usize, &mut [u8]) -> Option<usize>,
    ) -> io::Result<usize>;

    /// Send frames that are already encoded, in order; returns once all
    /// were handed to the backend. Backends that can send from the
    /// caller's memory (AF_PACKET `sendmmsg`) override this to avoid a copy.
    fn send_frames(&mut self, frames: &[FrameRef<'_>]) -> io::Result<()> {
        let max = self.max_frame_len();
        if let Some(f) = frames.iter().find(|f| f.len() > max) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("frame of {} bytes exceeds the link's {max}", f.len()),
            ));
        }
        let mut i = 0usize;
        let mut idle_rounds = 0u32;
        while i < frames.len() {
            let n = self.send_with(frames.len() - i, &mut |j, buf| {
                let f = frames.get(i + j)?;
                f.copy_to(buf)
            })?;
            if n == 0 {
                idle_rounds += 1;
                if idle_rounds > 1_000_000 {
                    return Err(io::Error::other("link accepts no frames"));
                }
                std::thread::yield_now();
            }
            i += n;
        }
        Ok(())
    }

    /// Send frames in order without ever waiting for room: returns how
    /// many of the first frames were handed to the backend. 0 when it
    /// cannot send now without waiting, or cannot promise not to wait
    /// (the default). For a thread that must not block (msld's core
    /// thread); the caller queues the rest for a thread that may wait.
    fn try_send_frames(&mut self, frames: &[FrameRef<'_>]) -> io::Result<usize> {
        let _ = frames;
        Ok(0)
    }

    /// Called when the worker is idle: push out anything held back
    /// (the fault layer's reordered frames) and reap completions.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    /// Frames the kernel or the fault layer discarded on this side.
    fn stats(&self) -> TxStats {
        TxStats::default()
    }
}

/// Receive half of a link.
pub trait RxLink: Send {
    /// Wait up to `timeout` for frames, then pass each ready frame (up to
    /// `max`) to `f`. The slice is valid only during the call. Returns the
    /// number of frames passed.
    fn recv(
        &mut self,
        max: usize,
        timeout: Duration,
        f: &mut dyn FnMut(&[u8]),
    ) -> io::Result<usize>;

    /// Counters of frames lost below the protocol (ring overflow, etc.).
    fn stats(&mut self) -> RxStats {
        RxStats::default()
    }
}

/// Transmit-side counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxStats {
    pub frames: u64,
    /// Dropped by the fault layer.
    pub fault_dropped: u64,
    pub fault_duplicated: u64,
    pub fault_reordered: u64,
    pub fault_corrupted: u64,
}

/// Receive-side counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RxStats {
    pub frames: u64,
    /// Lost in the kernel (ring full, socket drops), cumulative.
    pub kernel_dropped: u64,
}

impl TxLink for Box<dyn TxLink> {
    fn max_frame_len(&self) -> usize {
        (**self).max_frame_len()
    }
    fn send_with(
        &mut self,
        max: usize,
        emit: &mut dyn FnMut(usize, &mut [u8]) -> Option<usize>,
    ) -> io::Result<usize> {
        (**self).send_with(max, emit)
    }
    fn send_frames(&mut self, frames: &[FrameRef<'_>]) -> io::Result<()> {
        (**self).send_frames(frames)
    }
    fn try_send_frames(&mut self, frames: &[FrameRef<'_>]) -> io::Result<usize> {
        (**self).try_send_frames(frames)
    }
    fn flush(&mut self) -> io::Result<()> {
        (**self).flush()
    }
    fn stats(&self) -> TxStats {
        (**self).stats()
    }
}

impl RxLink for Box<dyn RxLink> {
    fn recv(
        &mut self,
        max: usize,
        timeout: Duration,
        f: &mut dyn FnMut(&[u8]),
    ) -> io::Result<usize> {
        (**self).recv(max, timeout, f)
    }
    fn stats(&mut self) -> RxStats {
        (**self).stats()
    }
}
