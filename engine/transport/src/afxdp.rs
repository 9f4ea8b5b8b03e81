//! AF_XDP backend: an XDP socket per MSL interface, fed by our own XDP
//! program that redirects only EtherType 0x88B5 into the socket's XSKMAP
//! and passes everything else to the kernel stack.
//!
//! The program is eleven eBPF instructions assembled here (no clang, no
//! libbpf, no libxdp) and attached through a BPF link, so the kernel
//! detaches it when the process exits, even on SIGKILL. It is loaded as
//! `xdp.frags` (multi-buffer aware), needed in native mode when the MTU
//! exceeds one page. The rings are xdpilone's (pure Rust, libc only).
//!
//! On veth only copy mode exists (zero-copy bind returns EOPNOTSUPP), so
//! the socket always binds with `XDP_COPY | XDP_USE_SG`.

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use crate::link::{FrameRef, RxLink, RxStats, TxLink, TxStats};
use crate::sys;
use crate::IfaceInfo;

/// Where the XDP program runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum XdpMode {
    /// Generic (SKB) mode: works on every driver.
    #[default]
    Generic,
    /// Native (driver) mode.
    Native,
}

/// AF_XDP socket settings.
#[derive(Clone, Copy, Debug)]
pub struct XdpConfig {
    pub mode: XdpMode,
    /// UMEM chunk size (a frame longer than this uses two chunks).
    pub chunk: u32,
    pub rx_frames: u32,
    pub tx_frames: u32,
    pub ring: u32,
}

impl Default for XdpConfig {
    fn default() -> Self {
        XdpConfig {
            mode: XdpMode::Generic,
            chunk: 4096,
            rx_frames: 4096,
            tx_frames: 1024,
            ring: 4096,
        }
    }
}

impl XdpConfig {
    /// Frames of `frame_len` bytes the receive ring holds: a frame takes as
    /// many chunks as it spans.
    pub fn rx_ring_frames(&self, frame_len: usize) -> usize {
        self.rx_frames as usize / frame_len.div_ceil(self.chunk as usize).max(1)
    }
}

/// eBPF instruction encoding: `code, dst:4|src:4, off: i16, imm: i32`.
const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    (code as u64)
        | (((dst & 0xf) as u64) << 8)
        | (((src & 0xf) as u64) << 12)
        | ((off as u16 as u64) << 16)
        | ((imm as u32 as u64) << 32)
}

const BPF_LDX_W: u8 = 0x61; // LDX | MEM | W
const BPF_LDX_H: u8 = 0x69; // LDX | MEM | H
const BPF_MOV64_X: u8 = 0xbf;
const BPF_MOV64_K: u8 = 0xb7;
const BPF_ADD64_K: u8 = 0x07;
const BPF_JGT_X: u8 = 0x2d;
const BPF_JNE_K: u8 = 0x55;
const BPF_LD_IMM64: u8 = 0x18;
const BPF_CALL: u8 = 0x85;
const BPF_EXIT: u8 = 0x95;
const BPF_PSEUDO_MAP_FD: u8 = 1;
const HELPER_REDIRECT_MAP: i32 = 51;
const XDP_PASS: i32 = 2;

/// The EtherType filter:
/// ```text
///   if data + 14 > data_end || eth.type != 0x88B5 { return XDP_PASS }
///   return bpf_redirect_map(xskmap, ctx->rx_queue_index, XDP_PASS)
/// ```
pub fn ethertype_filter_prog(xskmap_fd: RawFd, ethertype: u16) -> Vec<u64> {
    // The EtherType as a little-endian u16 load of its network-order bytes.
    let et_le = i32::from(u16::from_le_bytes(ethertype.to_be_bytes()));
    vec![
        insn(BPF_MOV64_X, 6, 1, 0, 0),                          // 0: r6 = ctx
        insn(BPF_LDX_W, 2, 6, 0, 0),                            // 1: r2 = ctx->data
        insn(BPF_LDX_W, 3, 6, 4, 0),                            // 2: r3 = ctx->data_end
        insn(BPF_MOV64_X, 4, 2, 0, 0),                          // 3: r4 = r2
        insn(BPF_ADD64_K, 4, 0, 0, 14),                         // 4: r4 += 14
        insn(BPF_JGT_X, 4, 3, 8, 0),                            // 5: if r4 > r3 goto 14
        insn(BPF_LDX_H, 4, 2, 12, 0),                           // 6: r4 = eth.type
        insn(BPF_JNE_K, 4, 0, 6, et_le),                        // 7: if r4 != type goto 14
        insn(BPF_LDX_W, 2, 6, 16, 0),                           // 8: r2 = ctx->rx_queue_index
        insn(BPF_LD_IMM64, 1, BPF_PSEUDO_MAP_FD, 0, xskmap_fd), // 9: r1 = map
        0,                                                      // 10: (second half of ld_imm64)
        insn(BPF_MOV64_K, 3, 0, 0, XDP_PASS),                   // 11: r3 = XDP_PASS (fallback)
        insn(BPF_CALL, 0, 0, 0, HELPER_REDIRECT_MAP),           // 12
        insn(BPF_EXIT, 0, 0, 0, 0),                             // 13
        insn(BPF_MOV64_K, 0, 0, 0, XDP_PASS),                   // 14: r0 = XDP_PASS
        insn(BPF_EXIT, 0, 0, 0, 0),                             // 15
    ]
}

/// Transmit half.
pub struct AfXdpTx {
    inner: sys::xsk::XskTx,
    stats: TxStats,
}

/// Receive half.
pub struct AfXdpRx {
    inner: sys::xsk::XskRx,
    stats: RxStats,
}

/// Open an AF_XDP socket on `iface` queue 0 and attach the filter program.
/// Errors name the step and the interface.
pub fn open(iface: &IfaceInfo, cfg: &XdpConfig) -> io::Result<(AfXdpTx, AfXdpRx)> {
    let flags = match cfg.mode {
        XdpMode::Generic => sys::XDP_FLAGS_SKB_MODE,
        XdpMode::Native => sys::XDP_FLAGS_DRV_MODE,
    };
    let geo = sys::xsk::Geometry {
        chunk: cfg.chunk,
        rx_frames: cfg.rx_frames,
        tx_pairs: cfg.tx_frames,
        ring: cfg.ring,
    };
    let (tx, rx) = sys::xsk::open(iface.index, geo, iface.max_frame_len(), flags, &|map| {
        ethertype_filter_prog(map, msl_wire::ETHERTYPE_MSL)
    })
    .map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "AF_XDP ({:?} mode) on {}: {e} (needs root and CONFIG_XDP_SOCKETS; try backend = \"afpacket\")",
                cfg.mode, iface.name
            ),
        )
    })?;
    if cfg.mode == XdpMode::Native {
        // Move veth's receive work off the sender's core (best effort).
        sys::set_threaded_napi(&iface.name);
    }
    Ok((
        AfXdpTx {
            inner: tx,
            stats: TxStats::default(),
        },
        AfXdpRx {
            inner: rx,
            stats: RxStats::default(),
        },
    ))
}

impl TxLink for AfXdpTx {
    fn max_frame_len(&self) -> usize {
        self.inner.max_frame_len()
    }

    fn send_with(
        &mut self,
        max: usize,
        emit: &mut dyn FnMut(usize, &mut [u8]) -> Option<usize>,
    ) -> io::Result<usize> {
        let n = self.inner.send_with(max, emit)?;
        self.stats.frames += n as u64;
        Ok(n)
    }

    fn try_send_frames(&mut self, frames: &[FrameRef<'_>]) -> io::Result<usize> {
        let room = self.inner.room_now();
        let max = self.max_frame_len();
        let take = frames
            .iter()
            .take(room)
            .take_while(|f| f.len() <= max)
            .count();
        if take == 0 {
            return Ok(0);
        }
        // With that much room `send_with` never waits for the ring.
        let n = self
            .inner
            .send_with(take, &mut |j, buf| frames.get(j)?.copy_to(buf))?;
        self.stats.frames += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.kick()?;
        self.inner.reap();
        Ok(())
    }

    fn stats(&self) -> TxStats {
        self.stats
    }
}

impl RxLink for AfXdpRx {
    fn recv(
        &mut self,
        max: usize,
        timeout: Duration,
        f: &mut dyn FnMut(&[u8]),
    ) -> io::Result<usize> {
        let n = self.inner.recv(max, timeout, f)?;
        self.stats.frames += n as u64;
        Ok(n)
    }

    fn stats(&mut self) -> RxStats {
        let s = self.inner.stats();
        if std::env::var_os("MSL_DEBUG").is_some() {
            eprintln!(
                "msl-transport debug: xdp rx_dropped {} rx_invalid {} tx_invalid {} rx_ring_full {} fill_empty {} tx_empty {} oversize {}",
                s[0], s[1], s[2], s[3], s[4], s[5], self.inner.oversize
            );
        }
        // rx_dropped + rx_ring_full: frames the kernel could not deliver.
        self.stats.kernel_dropped = s[0] + s[3] + self.inner.oversize;
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_prog_jumps_land_on_pass() {
        let p = ethertype_filter_prog(3, 0x88B5);
        assert_eq!(p.len(), 16);
        for (i, &ins) in p.iter().enumerate() {
            let code = (ins & 0xff) as u8;
            if code == BPF_JGT_X || code == BPF_JNE_K {
                let off = ((ins >> 16) & 0xffff) as u16 as i16;
                assert_eq!(i as i64 + 1 + i64::from(off), 14, "jump at {i}");
            }
        }
        // 0x88B5 on the wire loads as 0xB588 on little-endian.
        assert_eq!((p[7] >> 32) as u32, 0xB588);
    }
}
