//! AF_PACKET backend: batched `sendmmsg` on one socket, a `PACKET_RX_RING`
//! (TPACKET_V3 for throughput, TPACKET_V2 for latency) on another.
//!
//! The transmit socket is bound with protocol 0, so it receives nothing; the
//! receive socket is bound to the MSL EtherType only and ignores its own
//! outgoing frames.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use crate::link::{FrameRef, RxLink, RxStats, TxLink, TxStats, MAX_BATCH};
use crate::sys;
use crate::IfaceInfo;

pub use crate::sys::TpVersion;

/// Receive ring geometry.
#[derive(Clone, Copy, Debug)]
pub struct RingConfig {
    pub version: TpVersion,
    /// Total ring memory in bytes (rounded to whole blocks).
    pub bytes: usize,
    /// V3 only: how long a partly filled block waits before it is handed
    /// to user space.
    pub retire_tov_ms: u32,
}

impl Default for RingConfig {
    fn default() -> Self {
        RingConfig {
            version: TpVersion::V3,
            bytes: 32 << 20,
            retire_tov_ms: 1,
        }
    }
}

/// Transmit half: `sendmmsg` of up to `MAX_BATCH` frames per call.
pub struct AfPacketTx {
    fd: OwnedFd,
    max_frame: usize,
    bufs: Vec<Vec<u8>>,
    lens: [usize; MAX_BATCH],
    batch: sys::MmsgBatch,
    stats: TxStats,
}

impl AfPacketTx {
    pub fn open(iface: &IfaceInfo) -> io::Result<AfPacketTx> {
        let ctx = |what: &str, e: io::Error| {
            io::Error::new(
                e.kind(),
                format!(
                    "AF_PACKET tx on {}: {what}: {e} (needs root or CAP_NET_RAW)",
                    iface.name
                ),
            )
        };
        let fd = sys::packet_socket(0).map_err(|e| ctx("socket", e))?;
        sys::packet_bind(fd.as_raw_fd(), iface.index, 0).map_err(|e| ctx("bind", e))?;
        // Best effort: bypassing the qdisc saves a lock per frame.
        let _ = sys::packet_qdisc_bypass(fd.as_raw_fd());
        sys::set_bufs(fd.as_raw_fd(), 8 << 20);
        let max_frame = iface.max_frame_len();
        Ok(AfPacketTx {
            fd,
            max_frame,
            bufs: (0..MAX_BATCH).map(|_| vec![0u8; max_frame]).collect(),
            lens: [0; MAX_BATCH],
            batch: sys::MmsgBatch::new(MAX_BATCH),
            stats: TxStats::default(),
        })
    }
}

impl TxLink for AfPacketTx {
    fn max_frame_len(&self) -> usize {
        self.max_frame
    }

    fn send_with(
        &mut self,
        max: usize,
        emit: &mut dyn FnMut(usize, &mut [u8]) -> Option<usize>,
    ) -> io::Result<usize> {
        let max = max.min(MAX_BATCH).min(self.batch.capacity());
        let mut n = 0;
        while n < max {
            match emit(n, &mut self.bufs[n]) {
                Some(len) => {
                    self.lens[n] = len.min(self.max_frame);
                    n += 1;
                }
                None => break,
            }
        }
        if n == 0 {
            return Ok(0);
        }
        let mut frames = [FrameRef::default(); MAX_BATCH];
        for (f, (b, &len)) in frames
            .iter_mut()
            .zip(self.bufs.iter().zip(&self.lens))
            .take(n)
        {
            *f = FrameRef::whole(&b[..len]);
        }
        self.batch.send(self.fd.as_raw_fd(), &frames[..n])?;
        self.stats.frames += n as u64;
        Ok(n)
    }

    /// Straight from the caller's buffers: `sendmmsg` with an iovec per
    /// piece of each frame, no copy in user space.
    fn send_frames(&mut self, frames: &[FrameRef<'_>]) -> io::Result<()> {
        for chunk in frames.chunks(self.batch.capacity()) {
            self.batch.send(self.fd.as_raw_fd(), chunk)?;
            self.stats.frames += chunk.len() as u64;
        }
        Ok(())
    }

    fn try_send_frames(&mut self, frames: &[FrameRef<'_>]) -> io::Result<usize> {
        let max = self.max_frame_len();
        let mut sent = 0usize;
        for chunk in frames.chunks(self.batch.capacity()) {
            if chunk.iter().any(|f| f.len() > max) {
                break;
            }
            let k = match self.batch.send_nowait(self.fd.as_raw_fd(), chunk) {
                Ok(k) => k,
                // What went out is reported; the error comes with the next
                // call (the caller counts only unsent frames as errors).
                Err(_) if sent > 0 => break,
                Err(e) => return Err(e),
            };
            sent += k;
            self.stats.frames += k as u64;
            if k < chunk.len() {
                break;
            }
        }
        Ok(sent)
    }

    fn stats(&self) -> TxStats {
        self.stats
    }
}

/// Receive half: an mmapped RX ring.
pub struct AfPacketRx {
    fd: OwnedFd,
    ring: sys::RxRing,
    stats: RxStats,
}

impl AfPacketRx {
    pub fn open(iface: &IfaceInfo, cfg: RingConfig) -> io::Result<AfPacketRx> {
        let ctx = |what: &str, e: io::Error| {
            io::Error::new(
                e.kind(),
                format!(
                    "AF_PACKET rx ring on {}: {what}: {e} (needs root or CAP_NET_RAW)",
                    iface.name
                ),
            )
        };
        let et = msl_wire::ETHERTYPE_MSL;
        let fd = sys::packet_socket(et).map_err(|e| ctx("socket", e))?;
        let _ = sys::packet_ignore_outgoing(fd.as_raw_fd());
        let page = 4096usize;
        let (block, frame) = match cfg.version {
            // V3: frames are packed; the frame size only has to be sane.
            TpVersion::V3 => (256 << 10, 2048),
            // V2: one slot per frame, big enough for the MTU plus headers.
            TpVersion::V2 => {
                let frame = (iface.max_frame_len() + 128).next_multiple_of(16);
                (frame.next_multiple_of(page), frame)
            }
        };
        let blocks = (cfg.bytes / block).max(4);
        let ring = sys::RxRing::new(
            fd.as_raw_fd(),
            cfg.version,
            block,
            blocks,
            frame,
            cfg.retire_tov_ms,
        )
        .map_err(|e| ctx("PACKET_RX_RING", e))?;
        sys::packet_bind(fd.as_raw_fd(), iface.index, et).map_err(|e| ctx("bind", e))?;
        Ok(AfPacketRx {
            fd,
            ring,
            stats: RxStats::default(),
        })
    }
}

impl RxLink for AfPacketRx {
    fn recv(
        &mut self,
        max: usize,
        timeout: Duration,
        f: &mut dyn FnMut(&[u8]),
    ) -> io::Result<usize> {
        if !self.ring.ready() && !timeout.is_zero() {
            sys::poll_in(self.fd.as_raw_fd(), timeout)?;
        }
        let n = self.ring.drain(max, f);
        self.stats.frames += n as u64;
        Ok(n)
    }

    fn stats(&mut self) -> RxStats {
        if let Ok((_, drops)) = sys::packet_stats(self.fd.as_raw_fd()) {
            self.stats.kernel_dropped += drops;
        }
        self.stats
    }
}
