//! AF_XDP sockets over xdpilone's rings: UMEM layout, the XSKMAP, our XDP
//! program attached through a BPF link, and the two halves.
//!
//! UMEM layout (chunk = `frame_size`, 4096 by default):
//! ```text
//! [ RX chunks: rx_frames x chunk ][ TX pairs: tx_pairs x 2 chunks ]
//! ```
//! RX chunks cycle fill ring -> kernel -> RX ring -> fill ring and are
//! touched only by the RX half. TX frames use two adjacent chunks, so a
//! frame longer than one chunk is written contiguously and sent as two
//! descriptors (multi-buffer, `XDP_PKT_CONTD`); they cycle free list -> TX
//! ring -> completion ring -> free list and are touched only by the TX half.

use std::io;
use std::num::NonZeroU32;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use xdpilone::xdp::XdpDesc;
use xdpilone::{
    CompletionQueue, FillQueue, IfInfo, RingRx, RingTx, Socket, SocketConfig, Umem, UmemConfig,
};

use super::Mmap;

/// `XDP_PKT_CONTD`: more descriptors of this packet follow.
const XDP_PKT_CONTD: u32 = 1;
const XDP_COPY: u16 = 1 << 1;
const XDP_USE_NEED_WAKEUP: u16 = 1 << 3;
const XDP_USE_SG: u16 = 1 << 4;

fn errno(what: &str, e: xdpilone::Errno) -> io::Error {
    let e = io::Error::from_raw_os_error(e.get_raw());
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Geometry of one socket.
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    pub chunk: u32,
    pub rx_frames: u32,
    pub tx_pairs: u32,
    pub ring: u32,
}

/// Kernel objects that must outlive both halves: the UMEM memory and
/// registration, the XSKMAP, the program and its link.
struct Shared {
    // Field order is drop order: detach the program before the socket goes.
    _link: Option<OwnedFd>,
    _prog: Option<OwnedFd>,
    _map: OwnedFd,
    _umem: Umem,
    mem: Mmap,
}

// SAFETY: `Umem` holds a raw pointer to `mem`, which lives as long as it in
// this struct; neither half mutates the Umem after setup, and buffer access
// is partitioned between the halves (RX chunks vs TX pairs) and synchronised
// with the kernel through the rings.
unsafe impl Send for Shared {}
// SAFETY: as above; shared references only read the Umem's configuration.
unsafe impl Sync for Shared {}

/// Transmit half.
pub struct XskTx {
    shared: Arc<Shared>,
    tx: RingTx,
    comp: CompletionQueue,
    fd: RawFd,
    chunk: u64,
    tx_base: u64,
    free: Vec<u64>,
    descs: Vec<XdpDesc>,
    max_frame: usize,
    /// Bytes of UMEM per TX frame (whole chunks).
    span: u64,
    /// TX ring slots (descriptors).
    ring: u32,
}

/// Receive half.
pub struct XskRx {
    shared: Arc<Shared>,
    rx: RingRx,
    fill: FillQueue,
    fd: RawFd,
    chunk: u64,
    recycle: Vec<u64>,
    /// A multi-buffer frame being gathered.
    scratch: Vec<u8>,
    in_frame: bool,
    /// Frames whose pieces exceeded `scratch` (dropped, counted).
    pub oversize: u64,
}

/// Create an XDP socket on (ifindex, queue 0) and attach `prog_insns`
/// (which must redirect through the XSKMAP at `map_fd`, created here and
/// passed to `build_prog`) through a BPF link with `xdp_flags`.
pub fn open(
    ifindex: u32,
    geo: Geometry,
    max_frame: usize,
    xdp_flags: u32,
    build_prog: &dyn Fn(RawFd) -> Vec<u64>,
) -> io::Result<(XskTx, XskRx)> {
    let chunk = geo.chunk as usize;
    // Chunks per TX frame: a frame is written contiguously across them.
    let per_tx = max_frame.div_ceil(chunk).max(1);
    if per_tx > 8 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("frames of {max_frame} bytes need more than eight {chunk}-byte chunks"),
        ));
    }
    let total = (geo.rx_frames as usize + per_tx * geo.tx_pairs as usize) * chunk;
    let mem = Mmap::anonymous(total)
        .map_err(|e| io::Error::new(e.kind(), format!("UMEM mmap of {total} bytes: {e}")))?;
    // The fill ring is twice the RX chunks: the kernel publishes its fill
    // consumer index lazily, so user space may see fewer free slots than
    // there are chunks to return.
    let ring = geo.ring.max(geo.rx_frames).next_power_of_two();
    let fill_size = (2 * geo.rx_frames).next_power_of_two();
    let comp_size = (per_tx as u32 * geo.tx_pairs).next_power_of_two();
    // SAFETY: `mem` is page-aligned, writable and lives in `Shared` for at
    // least as long as the Umem (declared before it, dropped after).
    let umem = unsafe {
        Umem::new(
            UmemConfig {
                fill_size,
                complete_size: comp_size,
                frame_size: geo.chunk,
                headroom: 0,
                flags: 0,
            },
            mem.as_nonnull_slice(),
        )
    }
    .map_err(|e| errno("XDP_UMEM_REG (root needed; CAP_IPC_LOCK for large UMEM)", e))?;
    let mut info = IfInfo::invalid();
    info.from_ifindex(ifindex)
        .map_err(|e| errno("interface lookup", e))?;
    info.set_queue(0);
    let sock = Socket::with_shared(&info, &umem).map_err(|e| errno("AF_XDP socket", e))?;
    let dq = umem
        .fq_cq(&sock)
        .map_err(|e| errno("fill/completion rings", e))?;
    let user = umem
        .rx_tx(
            &sock,
            &SocketConfig {
                rx_size: NonZeroU32::new(ring),
                tx_size: NonZeroU32::new(ring),
                bind_flags: XDP_COPY | XDP_USE_SG | XDP_USE_NEED_WAKEUP,
            },
        )
        .map_err(|e| errno("RX/TX rings", e))?;
    let rx = user.map_rx().map_err(|e| errno("mmap RX ring", e))?;
    let tx = user.map_tx().map_err(|e| errno("mmap TX ring", e))?;
    umem.bind(&user)
        .map_err(|e| errno("bind (copy mode, multi-buffer)", e))?;
    let fd = rx.as_raw_fd();

    let map = super::bpf_xskmap_create(1)
        .map_err(|e| io::Error::new(e.kind(), format!("XSKMAP create: {e}")))?;
    super::bpf_map_update_u32(map.as_raw_fd(), 0, fd as u32)
        .map_err(|e| io::Error::new(e.kind(), format!("XSKMAP insert: {e}")))?;
    let insns = build_prog(map.as_raw_fd());
    let prog = super::bpf_prog_load_xdp(&insns, super::BPF_F_XDP_HAS_FRAGS)?;
    let link = super::bpf_link_create_xdp(prog.as_raw_fd(), ifindex, xdp_flags).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("attaching the XDP program (BPF link, flags {xdp_flags:#x}): {e}"),
        )
    })?;

    let (mut fill, comp) = dq.into_parts();
    let chunk64 = geo.chunk as u64;
    let mut filled = 0u32;
    for _ in 0..1_000 {
        if filled == geo.rx_frames {
            break;
        }
        let mut w = fill.fill(geo.rx_frames - filled);
        filled += w.insert((u64::from(filled)..u64::from(geo.rx_frames)).map(|i| i * chunk64));
        w.commit();
    }
    if filled != geo.rx_frames {
        return Err(io::Error::other(
            "AF_XDP fill ring smaller than the RX chunks",
        ));
    }
    let tx_base = u64::from(geo.rx_frames) * chunk64;
    let free: Vec<u64> = (0..u64::from(geo.tx_pairs))
        .map(|i| tx_base + i * per_tx as u64 * chunk64)
        .collect();
    let shared = Arc::new(Shared {
        _link: Some(link),
        _prog: Some(prog),
        _map: map,
        _umem: umem,
        mem,
    });
    Ok((
        XskTx {
            ring,
            shared: shared.clone(),
            tx,
            comp,
            fd,
            chunk: chunk64,
            tx_base,
            free,
            descs: Vec::with_capacity(per_tx * crate::MAX_BATCH),
            max_frame,
            span: per_tx as u64 * chunk64,
        },
        XskRx {
            shared,
            rx,
            fill,
            fd,
            chunk: chunk64,
            recycle: Vec::with_capacity(geo.rx_frames as usize),
            scratch: Vec::with_capacity(max_frame + chunk),
            in_frame: false,
            oversize: 0,
        },
    ))
}

impl XskTx {
    pub fn max_frame_len(&self) -> usize {
        self.max_frame
    }

    /// Move completed TX pairs back to the free list.
    pub fn reap(&mut self) {
        let mut r = self.comp.complete(u32::MAX);
        while let Some(addr) = r.read() {
            let off = addr.wrapping_sub(self.tx_base);
            if off % self.span == 0 {
                self.free.push(addr);
            }
        }
        r.release();
    }

    /// Push the TX ring through the kernel (copy mode transmits only
    /// inside `sendto`, a bounded number of frames per call).
    pub fn kick(&mut self) -> io::Result<()> {
        for _ in 0..64 {
            if self.tx.pending() == 0 {
                break;
            }
            super::xdp_kick_tx(self.fd)?;
            self.reap();
        }
        Ok(())
    }

    /// Frames `send_with` takes right now without waiting for ring room:
    /// 0 unless the kernel consumed every descriptor already queued.
    pub fn room_now(&mut self) -> usize {
        self.reap();
        if self.tx.pending() != 0 {
            return 0;
        }
        let per_frame = (self.max_frame as u64).div_ceil(self.chunk).max(1) as usize;
        (self.ring as usize / per_frame).min(self.free.len())
    }

    pub fn send_with(
        &mut self,
        max: usize,
        emit: &mut dyn FnMut(usize, &mut [u8]) -> Option<usize>,
    ) -> io::Result<usize> {
        self.reap();
        if self.free.is_empty() {
            self.kick()?;
            self.reap();
        }
        let frames = max.min(crate::MAX_BATCH).min(self.free.len());
        if frames == 0 {
            return Ok(0);
        }
        self.descs.clear();
        let mut n = 0usize;
        while n < frames {
            let Some(base) = self.free.pop() else { break };
            // SAFETY: the pair at `base` is on the free list, so neither the
            // kernel (completed) nor the RX half (different region) uses it.
            let buf = unsafe { self.shared.mem.slice_mut(base as usize, self.max_frame) };
            let Some(len) = emit(n, buf) else {
                self.free.push(base);
                break;
            };
            let len = len.min(self.max_frame) as u64;
            // One descriptor per chunk; all but the last say "more follows".
            let mut off = 0u64;
            while off < len {
                let piece = (len - off).min(self.chunk);
                let more = off + piece < len;
                self.descs.push(XdpDesc {
                    addr: base + off,
                    len: piece as u32,
                    options: if more { XDP_PKT_CONTD } else { 0 },
                });
                off += piece;
            }
            n += 1;
        }
        let mut i = 0usize;
        let mut stuck_since: Option<std::time::Instant> = None;
        while i < self.descs.len() {
            let k = {
                let mut w = self.tx.transmit((self.descs.len() - i) as u32);
                let k = w.insert(self.descs[i..].iter().copied()) as usize;
                w.commit();
                k
            };
            i += k;
            if k == 0 {
                // TX ring full: let the kernel drain it.
                self.kick()?;
                let since = *stuck_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() > Duration::from_secs(5) {
                    return Err(io::Error::other(
                        "AF_XDP TX ring made no progress for 5 s (is the interface down?)",
                    ));
                }
            } else {
                stuck_since = None;
            }
        }
        self.kick()?;
        Ok(n)
    }
}

impl XskRx {
    /// Wait up to `timeout`, then hand up to `max` frames to `f`.
    pub fn recv(
        &mut self,
        max: usize,
        timeout: Duration,
        f: &mut dyn FnMut(&[u8]),
    ) -> io::Result<usize> {
        if self.rx.available() == 0 {
            if self.fill.needs_wakeup() {
                super::xdp_kick_rx(self.fd);
            }
            if !timeout.is_zero() {
                super::poll_in(self.fd, timeout)?;
            }
        }
        let mut frames = 0usize;
        {
            // Read descriptors, up to `max` whole frames (plus any pieces).
            let mut r = self.rx.receive((4 * max) as u32);
            while let Some(d) = r.read() {
                let base = d.addr - d.addr % self.chunk;
                self.recycle.push(base);
                let len = d.len as usize;
                let more = d.options & XDP_PKT_CONTD != 0;
                // SAFETY: the kernel handed this chunk to user space via the
                // RX ring; it is not refilled until `recycle` goes back below.
                let piece = unsafe { self.shared.mem.slice(d.addr as usize, len) };
                if !self.in_frame && !more {
                    f(piece);
                    frames += 1;
                    continue;
                }
                if self.scratch.len() + len <= self.scratch.capacity() {
                    self.scratch.extend_from_slice(piece);
                } else {
                    self.oversize += 1;
                    self.scratch.clear();
                }
                self.in_frame = more;
                if !more {
                    if !self.scratch.is_empty() {
                        f(&self.scratch);
                        frames += 1;
                    }
                    self.scratch.clear();
                }
            }
            r.release();
        }
        // Every chunk goes back to the fill ring. A reservation can come
        // back short: xdpilone serves it from a cached consumer index, and
        // the kernel publishes its fill consumer index lazily. Whatever does
        // not fit now stays in `recycle` for the next call.
        for _ in 0..4 {
            if self.recycle.is_empty() {
                break;
            }
            let k = {
                let mut w = self.fill.fill(self.recycle.len() as u32);
                let k = w.insert(self.recycle.iter().copied()) as usize;
                w.commit();
                k
            };
            self.recycle.drain(..k);
        }
        Ok(frames)
    }

    /// (rx_dropped, rx_invalid, tx_invalid, rx_ring_full, fill_empty, tx_empty)
    pub fn stats(&self) -> [u64; 6] {
        super::xdp_stats(self.fd).unwrap_or_default()
    }
}
