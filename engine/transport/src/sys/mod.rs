//! Every system call of the transport, and all of its `unsafe`.
//!
//! Like mio's `sys/`: one `syscall!` macro turns libc's `-1 + errno` into
//! `io::Result`, and every `unsafe` block says why it is sound. Nothing here
//! knows about MSL frames.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicPtr, AtomicU32, Ordering};
use std::time::Duration;

use crate::link::FrameRef;

/// Call a libc function; `-1` becomes `Err(last_os_error)`.
macro_rules! syscall {
    ($fn:ident ( $($arg:expr),* $(,)? )) => {{
        // SAFETY: each caller documents why the arguments are valid for this
        // call; the macro only converts the return convention.
        #[allow(unused_unsafe)]
        let res = unsafe { libc::$fn($($arg),*) };
        if res == -1 {
            Err(io::Error::last_os_error())
        } else {
            Ok(res)
        }
    }};
}

/// EtherType in network byte order, as the `protocol` of packet sockets.
pub fn proto_be(ethertype: u16) -> u16 {
    ethertype.to_be()
}

// ---------------------------------------------------------------------------
// Interfaces and namespaces
// ---------------------------------------------------------------------------

/// Move the calling thread into the network namespace at `path`
/// (e.g. `/run/netns/NAME`). Only this thread changes namespace.
pub fn setns_net(path: &str) -> io::Result<()> {
    let f = std::fs::File::open(path)?;
    syscall!(setns(f.as_raw_fd(), libc::CLONE_NEWNET))?;
    Ok(())
}

/// Detach and remove a named network namespace's bind mount
/// (what `ip netns del` does). Async-signal-safe: only `umount2` and
/// `unlink` on a pre-built C string.
///
/// # Safety
/// `path` must point to a NUL-terminated string.
unsafe fn netns_remove_raw(path: *const libc::c_char) {
    // SAFETY: the caller guarantees `path` is NUL-terminated; both calls are
    // async-signal-safe and their failure is harmless (already removed).
    unsafe {
        libc::umount2(path, libc::MNT_DETACH);
        libc::unlink(path);
    }
}

/// Remove a named network namespace's bind mount at `path`.
pub fn netns_remove(path: &str) {
    if let Ok(c) = CString::new(path) {
        // SAFETY: `c` is NUL-terminated and alive for the call.
        unsafe { netns_remove_raw(c.as_ptr()) };
    }
}

/// Whether the effective user is root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

const MAX_CLEANUP: usize = 16;
static CLEANUP: [AtomicPtr<libc::c_char>; MAX_CLEANUP] =
    [const { AtomicPtr::new(std::ptr::null_mut()) }; MAX_CLEANUP];
static HANDLERS: std::sync::Once = std::sync::Once::new();

extern "C" fn on_fatal_signal(sig: libc::c_int) {
    for slot in &CLEANUP {
        let p = slot.swap(std::ptr::null_mut(), Ordering::SeqCst);
        if !p.is_null() {
            // SAFETY: registered pointers are leaked, NUL-terminated CStrings.
            unsafe { netns_remove_raw(p) };
        }
    }
    // SAFETY: restoring the default action and re-raising is
    // async-signal-safe; the process then dies of `sig` as it would have.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

/// On SIGINT/SIGTERM/SIGHUP/SIGQUIT, remove every registered namespace
/// path, then die of the signal as before. Installed once per process.
pub fn install_cleanup_handlers() {
    HANDLERS.call_once(|| {
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
            // SAFETY: `on_fatal_signal` only does async-signal-safe work
            // (atomic swaps, umount2, unlink, signal, raise).
            unsafe {
                libc::signal(sig, on_fatal_signal as *const () as libc::sighandler_t);
            }
        }
    });
}

/// Register a namespace path for removal from a fatal signal; returns a
/// slot for `unregister_cleanup` (`usize::MAX` if the table is full).
pub fn register_cleanup(path: &str) -> usize {
    let Ok(c) = CString::new(path) else {
        return usize::MAX;
    };
    let raw = c.into_raw();
    for (i, slot) in CLEANUP.iter().enumerate() {
        if slot
            .compare_exchange(
                std::ptr::null_mut(),
                raw,
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_ok()
        {
            return i;
        }
    }
    // SAFETY: `raw` came from `into_raw` just above and was not shared.
    drop(unsafe { CString::from_raw(raw) });
    usize::MAX
}

/// Forget a registration (after the namespace was removed normally).
pub fn unregister_cleanup(slot: usize) {
    if let Some(s) = CLEANUP.get(slot) {
        let p = s.swap(std::ptr::null_mut(), Ordering::SeqCst);
        if !p.is_null() {
            // SAFETY: `p` came from `CString::into_raw` in `register_cleanup`
            // and was removed from the table, so nothing else frees it.
            drop(unsafe { CString::from_raw(p) });
        }
    }
}

/// CPU time consumed by the calling thread (user + system).
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if r != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Wait until `fd` is readable or `timeout` passes. Returns whether it is
/// readable. `EINTR` counts as a timeout.
pub fn poll_in(fd: RawFd, timeout: Duration) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // Sub-millisecond waits round up to 1 ms, except an explicit zero.
    let ms = if ms == 0 && !timeout.is_zero() { 1 } else { ms };
    // SAFETY: `p` is one valid pollfd.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(r > 0 && p.revents & (libc::POLLIN | libc::POLLERR) != 0)
}

/// `recv(fd, buf, MSG_DONTWAIT)`: `Ok(0)` means the peer closed, `WouldBlock`
/// means nothing is there.
pub fn recv_dontwait(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    let n = syscall!(recv(
        fd,
        buf.as_mut_ptr().cast(),
        buf.len(),
        libc::MSG_DONTWAIT
    ))?;
    Ok(n as usize)
}

fn setsockopt<T>(fd: RawFd, level: i32, name: i32, val: &T) -> io::Result<()> {
    syscall!(setsockopt(
        fd,
        level,
        name,
        (val as *const T).cast(),
        std::mem::size_of::<T>() as libc::socklen_t
    ))?;
    Ok(())
}

fn getsockopt<T: Default>(fd: RawFd, level: i32, name: i32) -> io::Result<T> {
    let mut val = T::default();
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    syscall!(getsockopt(
        fd,
        level,
        name,
        (&mut val as *mut T).cast(),
        &mut len
    ))?;
    Ok(val)
}

/// Set `SO_SNDBUF`/`SO_RCVBUF` (the `FORCE` variants, as root, beyond
/// `wmem_max`); falls back to the plain ones.
pub fn set_bufs(fd: RawFd, bytes: usize) {
    let v = bytes.min(i32::MAX as usize) as libc::c_int;
    if setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, &v).is_err() {
        let _ = setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, &v);
    }
    if setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &v).is_err() {
        let _ = setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, &v);
    }
}

// ---------------------------------------------------------------------------
// AF_PACKET
// ---------------------------------------------------------------------------

/// An `AF_PACKET, SOCK_RAW` socket for `ethertype`, bound to `ifindex`.
pub fn packet_socket(ethertype: u16) -> io::Result<OwnedFd> {
    let proto = proto_be(ethertype);
    let fd = syscall!(socket(
        libc::AF_PACKET,
        libc::SOCK_RAW | libc::SOCK_CLOEXEC,
        i32::from(proto)
    ))?;
    // SAFETY: `fd` was just returned by socket() and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(fd)
}

/// Bind a packet socket to `ifindex` (after any ring is set up).
pub fn packet_bind(fd: RawFd, ifindex: u32, ethertype: u16) -> io::Result<()> {
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto_be(ethertype);
    sll.sll_ifindex = ifindex as i32;
    syscall!(bind(
        fd,
        (&sll as *const libc::sockaddr_ll).cast(),
        std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t
    ))?;
    Ok(())
}

/// Skip the qdisc layer on transmit (frames go straight to the driver).
pub fn packet_qdisc_bypass(fd: RawFd) -> io::Result<()> {
    setsockopt(fd, libc::SOL_PACKET, libc::PACKET_QDISC_BYPASS, &1i32)
}

/// `(packets, drops)` since the last call (the kernel resets on read).
pub fn packet_stats(fd: RawFd) -> io::Result<(u64, u64)> {
    #[derive(Default)]
    #[repr(C)]
    struct StatsV3 {
        packets: u32,
        drops: u32,
        freeze_q_cnt: u32,
    }
    let s: StatsV3 = getsockopt(fd, libc::SOL_PACKET, libc::PACKET_STATISTICS)?;
    Ok((u64::from(s.packets), u64::from(s.drops)))
}

/// Pieces a frame may be sent from (see `FrameRef`).
const PARTS: usize = 3;

/// Up to `MAX_MMSG` frames for one `sendmmsg`, with their iovecs (up to
/// `PARTS` per frame, gathered by the kernel), all allocated once.
pub struct MmsgBatch {
    hdrs: Vec<libc::mmsghdr>,
    iovs: Vec<libc::iovec>,
}

// SAFETY: the raw pointers inside are rebuilt from borrowed slices on every
// `send`, never dereferenced outside it, so moving the batch between threads
// is sound.
unsafe impl Send for MmsgBatch {}

impl MmsgBatch {
    pub fn new(cap: usize) -> MmsgBatch {
        // SAFETY: mmsghdr/iovec are plain old data; all-zero is valid.
        let hdrs = vec![unsafe { std::mem::zeroed::<libc::mmsghdr>() }; cap];
        let iovs = vec![
            libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0
            };
            cap * PARTS
        ];
        MmsgBatch { hdrs, iovs }
    }

    pub fn capacity(&self) -> usize {
        self.hdrs.len()
    }

    /// Send every frame with blocking `sendmmsg` on a bound packet socket;
    /// returns when all were handed to the kernel. A device that keeps
    /// refusing (queue full, no buffers) for `STUCK_FOR` fails the call:
    /// the frames are lost (the reliable layer resends them) and the
    /// sending thread is free again.
    pub fn send(&mut self, fd: RawFd, frames: &[FrameRef<'_>]) -> io::Result<()> {
        const STUCK_FOR: std::time::Duration = std::time::Duration::from_millis(100);
        let n = self.prepare(frames);
        let mut done = 0usize;
        let mut stuck_since: Option<std::time::Instant> = None;
        while done < n {
            match self.send_from(fd, done, n, 0)? {
                Some(k) => {
                    done += k;
                    stuck_since = None;
                }
                None => {
                    // Transient: device queue full. Yield and retry.
                    let since = *stuck_since.get_or_insert_with(std::time::Instant::now);
                    if since.elapsed() > STUCK_FOR {
                        return Err(io::Error::new(
                            io::ErrorKind::WouldBlock,
                            "the device accepted no frame for 100 ms",
                        ));
                    }
                    std::thread::yield_now();
                }
            }
        }
        Ok(())
    }

    /// Send frames in order without waiting (`MSG_DONTWAIT`): returns how
    /// many of the first frames went out.
    pub fn send_nowait(&mut self, fd: RawFd, frames: &[FrameRef<'_>]) -> io::Result<usize> {
        let n = self.prepare(frames);
        let mut done = 0usize;
        while done < n {
            match self.send_from(fd, done, n, libc::MSG_DONTWAIT) {
                Ok(Some(k)) => done += k,
                Ok(None) => break,
                // Report what went out; the error repeats on the next call.
                Err(_) if done > 0 => break,
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    /// Point the headers at (up to `capacity()` of) `frames`.
    fn prepare(&mut self, frames: &[FrameRef<'_>]) -> usize {
        let n = frames.len().min(self.hdrs.len());
        for (i, f) in frames[..n].iter().enumerate() {
            let iovs = &mut self.iovs[i * PARTS..(i + 1) * PARTS];
            let mut k = 0;
            for p in f.parts().into_iter().filter(|p| !p.is_empty()) {
                iovs[k] = libc::iovec {
                    iov_base: p.as_ptr() as *mut libc::c_void,
                    iov_len: p.len(),
                };
                k += 1;
            }
            // SAFETY: all-zero msghdr is valid.
            let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
            h.msg_iov = iovs.as_mut_ptr();
            h.msg_iovlen = k as _;
            self.hdrs[i] = libc::mmsghdr {
                msg_hdr: h,
                msg_len: 0,
            };
        }
        n
    }

    /// One `sendmmsg` of the prepared frames `done..n`: how many went
    /// out, or None when the device has no room now (EAGAIN / ENOBUFS).
    fn send_from(
        &mut self,
        fd: RawFd,
        done: usize,
        n: usize,
        flags: i32,
    ) -> io::Result<Option<usize>> {
        loop {
            // SAFETY: hdrs[done..n] point at iovecs that point into the
            // caller's frames, alive for this call (`prepare` ran in the
            // same `send`/`send_nowait`); the socket is bound so no address.
            let r = unsafe {
                libc::sendmmsg(
                    fd,
                    self.hdrs.as_mut_ptr().add(done),
                    (n - done) as libc::c_uint,
                    flags,
                )
            };
            if r >= 0 {
                return Ok(Some(r as usize));
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ENOBUFS) | Some(libc::EAGAIN) => return Ok(None),
                _ => return Err(e),
            }
        }
    }
}

/// TPACKET ring versions used here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TpVersion {
    /// Per-frame status: each frame is handed over as it arrives (low
    /// latency).
    V2,
    /// Variable-size frames packed in blocks; a block is handed over when
    /// full or after its retire timeout (high throughput, batching).
    V3,
}

const TP_STATUS_KERNEL: u32 = 0;
const TP_STATUS_USER: u32 = 1;

#[repr(C)]
struct TpacketReq3 {
    block_size: u32,
    block_nr: u32,
    frame_size: u32,
    frame_nr: u32,
    retire_blk_tov: u32,
    sizeof_priv: u32,
    feature_req_word: u32,
}

/// An mmapped `PACKET_RX_RING`.
pub struct RxRing {
    base: NonNull<u8>,
    len: usize,
    version: TpVersion,
    block_size: usize,
    block_nr: usize,
    frame_size: usize,
    frame_nr: usize,
    /// V3: next block to read; V2: next frame to read.
    cursor: usize,
}

// SAFETY: the mapping is owned by this value alone; the kernel side is
// synchronised through the status words with acquire/release ordering.
unsafe impl Send for RxRing {}

impl RxRing {
    /// Set up and map an RX ring on an unbound packet socket.
    /// `block_size` must be a multiple of the page size and hold a frame.
    pub fn new(
        fd: RawFd,
        version: TpVersion,
        block_size: usize,
        block_nr: usize,
        frame_size: usize,
        retire_tov_ms: u32,
    ) -> io::Result<RxRing> {
        let v: libc::c_int = match version {
            TpVersion::V2 => 1, // TPACKET_V2
            TpVersion::V3 => 2, // TPACKET_V3
        };
        setsockopt(fd, libc::SOL_PACKET, libc::PACKET_VERSION, &v)?;
        let frames_per_block = block_size / frame_size;
        let frame_nr = frames_per_block * block_nr;
        let req = TpacketReq3 {
            block_size: block_size as u32,
            block_nr: block_nr as u32,
            frame_size: frame_size as u32,
            frame_nr: frame_nr as u32,
            retire_blk_tov: retire_tov_ms,
            sizeof_priv: 0,
            feature_req_word: 0,
        };
        match version {
            TpVersion::V3 => setsockopt(fd, libc::SOL_PACKET, libc::PACKET_RX_RING, &req)?,
            TpVersion::V2 => {
                // tpacket_req: the first four fields.
                let req2: [u32; 4] = [req.block_size, req.block_nr, req.frame_size, req.frame_nr];
                setsockopt(fd, libc::SOL_PACKET, libc::PACKET_RX_RING, &req2)?
            }
        }
        let len = block_size * block_nr;
        // SAFETY: mapping a fresh shared region of the ring the kernel just
        // allocated for `fd`; the length is exactly the ring size.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_LOCKED | libc::MAP_POPULATE,
                fd,
                0,
            )
        };
        let p = if p == libc::MAP_FAILED {
            // MAP_LOCKED may exceed RLIMIT_MEMLOCK; retry without it.
            // SAFETY: as above.
            let p2 = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_POPULATE,
                    fd,
                    0,
                )
            };
            if p2 == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            p2
        } else {
            p
        };
        Ok(RxRing {
            base: NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap returned null"))?,
            len,
            version,
            block_size,
            block_nr,
            frame_size,
            frame_nr,
            cursor: 0,
        })
    }

    fn status_word(&self, off: usize) -> &AtomicU32 {
        // SAFETY: `off` is inside the mapping and 4-byte aligned (block and
        // frame starts are page / TPACKET_ALIGNMENT aligned); the kernel
        // writes this word concurrently, hence atomic access.
        unsafe { &*(self.base.as_ptr().add(off) as *const AtomicU32) }
    }

    fn read_u32(&self, off: usize) -> u32 {
        // SAFETY: `off + 4 <= len` is checked by callers' structure walks;
        // the word is stable once the status says TP_STATUS_USER.
        unsafe { std::ptr::read_unaligned(self.base.as_ptr().add(off) as *const u32) }
    }

    fn read_u16(&self, off: usize) -> u16 {
        // SAFETY: as `read_u32`.
        unsafe { std::ptr::read_unaligned(self.base.as_ptr().add(off) as *const u16) }
    }

    fn bytes(&self, off: usize, len: usize) -> Option<&[u8]> {
        if off.checked_add(len)? > self.len {
            return None;
        }
        // SAFETY: bounds checked above; the frame is owned by user space
        // until its status is handed back.
        Some(unsafe { std::slice::from_raw_parts(self.base.as_ptr().add(off), len) })
    }

    /// Hand every frame that is ready to `f`, up to `max_frames` (V2) or
    /// whole blocks until `max_frames` is reached (V3). Returns the number of
    /// frames seen.
    pub fn drain(&mut self, max_frames: usize, f: &mut dyn FnMut(&[u8])) -> usize {
        match self.version {
            TpVersion::V2 => self.drain_v2(max_frames, f),
            TpVersion::V3 => self.drain_v3(max_frames, f),
        }
    }

    /// Whether a frame or block is ready now.
    pub fn ready(&self) -> bool {
        let off = match self.version {
            TpVersion::V2 => self.frame_off_v2(self.cursor),
            TpVersion::V3 => self.cursor * self.block_size + 8,
        };
        self.status_word(off).load(Ordering::Acquire) & TP_STATUS_USER != 0
    }

    fn frame_off_v2(&self, i: usize) -> usize {
        let per_block = self.block_size / self.frame_size;
        (i / per_block) * self.block_size + (i % per_block) * self.frame_size
    }

    fn drain_v2(&mut self, max_frames: usize, f: &mut dyn FnMut(&[u8])) -> usize {
        let mut n = 0;
        while n < max_frames {
            let off = self.frame_off_v2(self.cursor);
            let st = self.status_word(off);
            if st.load(Ordering::Acquire) & TP_STATUS_USER == 0 {
                break;
            }
            // tpacket2_hdr: status@0 len@4 snaplen@8 mac@12 net@14
            let snap = self.read_u32(off + 8) as usize;
            let mac = usize::from(self.read_u16(off + 12));
            if mac + snap <= self.frame_size {
                if let Some(b) = self.bytes(off + mac, snap) {
                    f(b);
                }
            }
            st.store(TP_STATUS_KERNEL, Ordering::Release);
            self.cursor = (self.cursor + 1) % self.frame_nr;
            n += 1;
        }
        n
    }

    fn drain_v3(&mut self, max_frames: usize, f: &mut dyn FnMut(&[u8])) -> usize {
        let mut n = 0;
        let mut blocks = 0;
        while n < max_frames && blocks < self.block_nr {
            let boff = self.cursor * self.block_size;
            // tpacket_block_desc: version@0 offset_to_priv@4, then
            // tpacket_hdr_v1: block_status@8 num_pkts@12 offset_to_first_pkt@16
            let st = self.status_word(boff + 8);
            if st.load(Ordering::Acquire) & TP_STATUS_USER == 0 {
                break;
            }
            let num = self.read_u32(boff + 12) as usize;
            let mut poff = self.read_u32(boff + 16) as usize;
            for _ in 0..num {
                if poff + 28 > self.block_size {
                    break;
                }
                let p = boff + poff;
                // tpacket3_hdr: next_offset@0 sec@4 nsec@8 snaplen@12 len@16
                // status@20 mac@24 net@26
                let next = self.read_u32(p) as usize;
                let snap = self.read_u32(p + 12) as usize;
                let mac = usize::from(self.read_u16(p + 24));
                if poff + mac + snap <= self.block_size {
                    if let Some(b) = self.bytes(p + mac, snap) {
                        f(b);
                    }
                }
                n += 1;
                if next == 0 {
                    break;
                }
                poff += next;
            }
            st.store(TP_STATUS_KERNEL, Ordering::Release);
            self.cursor = (self.cursor + 1) % self.block_nr;
            blocks += 1;
        }
        n
    }
}

impl Drop for RxRing {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the region mapped in `new`, once.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

// ---------------------------------------------------------------------------
// AF_XDP helpers (the rings themselves are xdpilone's)
// ---------------------------------------------------------------------------

/// Anonymous, page-aligned, populated memory for a UMEM.
pub struct Mmap {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: plain anonymous memory owned by this value.
unsafe impl Send for Mmap {}
// SAFETY: shared access is only through raw pointers handed out by
// `as_ptr`, whose users synchronise through the XDP rings.
unsafe impl Sync for Mmap {}

impl Mmap {
    pub fn anonymous(len: usize) -> io::Result<Mmap> {
        // SAFETY: a fresh private anonymous mapping; no aliasing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mmap {
            ptr: NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap returned null"))?,
            len,
        })
    }

    pub fn as_nonnull_slice(&self) -> NonNull<[u8]> {
        NonNull::slice_from_raw_parts(self.ptr, self.len)
    }

    /// Bytes `[off, off+len)` of the mapping.
    ///
    /// # Safety
    /// The caller must own that range (no concurrent writer: the kernel has
    /// handed the chunk to user space and no other thread uses it).
    pub unsafe fn slice(&self, off: usize, len: usize) -> &[u8] {
        debug_assert!(off + len <= self.len);
        // SAFETY: guaranteed by the caller; bounds asserted.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(off), len) }
    }

    /// Mutable bytes `[off, off+len)` of the mapping.
    ///
    /// # Safety
    /// As `slice`, and no other reference to the range may exist.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut(&self, off: usize, len: usize) -> &mut [u8] {
        debug_assert!(off + len <= self.len);
        // SAFETY: guaranteed by the caller; bounds asserted.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(off), len) }
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the region mapped in `anonymous`, once.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// `XDP_STATISTICS` of an XDP socket: (rx_dropped, rx_invalid_descs,
/// tx_invalid_descs, rx_ring_full, rx_fill_ring_empty_descs,
/// tx_ring_empty_descs).
pub fn xdp_stats(fd: RawFd) -> io::Result<[u64; 6]> {
    const SOL_XDP: i32 = 283;
    const XDP_STATISTICS: i32 = 7;
    let s: [u64; 6] = getsockopt(fd, SOL_XDP, XDP_STATISTICS)?;
    Ok(s)
}

/// Kick the kernel to process the TX ring of an XDP socket (copy mode).
pub fn xdp_kick_tx(fd: RawFd) -> io::Result<()> {
    // SAFETY: a zero-length sendto with null buffers is the documented AF_XDP
    // TX wake-up; no memory is read.
    let r = unsafe {
        libc::sendto(
            fd,
            std::ptr::null(),
            0,
            libc::MSG_DONTWAIT,
            std::ptr::null(),
            0,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EBUSY) | Some(libc::ENOBUFS) | Some(libc::EINTR) => {
                Ok(())
            }
            _ => Err(e),
        }
    } else {
        Ok(())
    }
}

/// Kick the kernel to refill from the fill ring (need_wakeup on RX).
pub fn xdp_kick_rx(fd: RawFd) {
    // SAFETY: a zero-length recvfrom with MSG_DONTWAIT is the documented
    // AF_XDP RX wake-up; no memory is written.
    unsafe {
        libc::recvfrom(
            fd,
            std::ptr::null_mut(),
            0,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        );
    }
}

// ---------------------------------------------------------------------------
// BPF: just enough to load an XDP program, an XSKMAP and a BPF link.
// ---------------------------------------------------------------------------

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_MAP_TYPE_XSKMAP: u32 = 17;
const BPF_PROG_TYPE_XDP: u32 = 6;
/// `BPF_XDP` attach type.
const BPF_XDP: u32 = 37;
/// The program understands multi-buffer frames (`SEC("xdp.frags")`).
pub const BPF_F_XDP_HAS_FRAGS: u32 = 1 << 5;

/// Zeroed `union bpf_attr` storage; fields are written at their offsets.
#[repr(C, align(8))]
struct BpfAttr([u8; 128]);

impl BpfAttr {
    fn new() -> BpfAttr {
        BpfAttr([0; 128])
    }
    fn u32_at(&mut self, off: usize, v: u32) {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
    }
    fn u64_at(&mut self, off: usize, v: u64) {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
    }
}

fn bpf(cmd: libc::c_long, attr: &mut BpfAttr) -> io::Result<OwnedFd> {
    // SAFETY: `attr` is a valid, zero-padded bpf_attr of the size passed;
    // pointers written into it (by callers) point to live buffers.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            std::mem::size_of::<BpfAttr>() as libc::c_uint,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: these commands return a new file descriptor owned by us.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

/// Create an XSKMAP (`u32` queue index -> XDP socket) of `entries` entries.
pub fn bpf_xskmap_create(entries: u32) -> io::Result<OwnedFd> {
    let mut a = BpfAttr::new();
    a.u32_at(0, BPF_MAP_TYPE_XSKMAP);
    a.u32_at(4, 4); // key_size
    a.u32_at(8, 4); // value_size
    a.u32_at(12, entries);
    bpf(BPF_MAP_CREATE, &mut a)
}

/// `map[key] = value` for a map with u32 keys and values.
pub fn bpf_map_update_u32(map: RawFd, key: u32, value: u32) -> io::Result<()> {
    let mut a = BpfAttr::new();
    a.u32_at(0, map as u32);
    a.u64_at(8, &key as *const u32 as u64);
    a.u64_at(16, &value as *const u32 as u64);
    a.u64_at(24, 0); // BPF_ANY
                     // SAFETY: `a` is a valid bpf_attr for MAP_UPDATE_ELEM; key/value live
                     // until the call returns.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_ELEM,
            a.0.as_mut_ptr(),
            std::mem::size_of::<BpfAttr>() as libc::c_uint,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Load an XDP program from raw instructions (8 bytes each). On failure
/// the verifier log is returned in the error.
pub fn bpf_prog_load_xdp(insns: &[u64], prog_flags: u32) -> io::Result<OwnedFd> {
    let license = b"Dual MIT/GPL\0";
    let name = b"msl_ethertype\0";
    let mut log = vec![0u8; 64 * 1024];
    let mut a = BpfAttr::new();
    a.u32_at(0, BPF_PROG_TYPE_XDP);
    a.u32_at(4, insns.len() as u32);
    a.u64_at(8, insns.as_ptr() as u64);
    a.u64_at(16, license.as_ptr() as u64);
    a.u32_at(24, 1); // log_level
    a.u32_at(28, log.len() as u32);
    a.u64_at(32, log.as_mut_ptr() as u64);
    a.u32_at(44, prog_flags);
    a.0[48..48 + name.len().min(16)].copy_from_slice(&name[..name.len().min(16)]);
    a.u32_at(68, BPF_XDP); // expected_attach_type
    match bpf(BPF_PROG_LOAD, &mut a) {
        Ok(fd) => Ok(fd),
        Err(e) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            Err(io::Error::new(
                e.kind(),
                format!("BPF_PROG_LOAD: {e}; verifier log: {}", text.trim()),
            ))
        }
    }
}

/// XDP attach modes for `bpf_link_create`.
pub const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
pub const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

/// Attach `prog` to `ifindex` through a BPF link: the program is detached
/// when the returned fd is closed, including when the process dies.
pub fn bpf_link_create_xdp(prog: RawFd, ifindex: u32, flags: u32) -> io::Result<OwnedFd> {
    let mut a = BpfAttr::new();
    a.u32_at(0, prog as u32);
    a.u32_at(4, ifindex);
    a.u32_at(8, BPF_XDP);
    a.u32_at(12, flags);
    bpf(BPF_LINK_CREATE, &mut a)
}

/// Turn on threaded NAPI for a device (moves veth receive work off the
/// sender's core once a native XDP program is attached). Best effort.
pub fn set_threaded_napi(ifname: &str) {
    let _ = std::fs::write(format!("/sys/class/net/{ifname}/threaded"), "1");
}

/// MTU of `ifname` in the calling thread's network namespace.
pub fn if_mtu(ifname: &str) -> io::Result<usize> {
    let s = syscall!(socket(
        libc::AF_INET,
        libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
        0
    ))?;
    // SAFETY: `s` is a fresh descriptor owned here.
    let s = unsafe { OwnedFd::from_raw_fd(s) };
    // SAFETY: ifreq is plain old data; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = ifname.as_bytes();
    if name.len() >= req.ifr_name.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    for (d, &b) in req.ifr_name.iter_mut().zip(name) {
        *d = b as libc::c_char;
    }
    syscall!(ioctl(s.as_raw_fd(), libc::SIOCGIFMTU, &mut req))?;
    // SAFETY: SIOCGIFMTU filled the `ifru_mtu` member of the union.
    let mtu = unsafe { req.ifr_ifru.ifru_mtu };
    Ok(mtu.max(0) as usize)
}

/// Do not deliver this socket's own outgoing frames back to it.
pub fn packet_ignore_outgoing(fd: RawFd) -> io::Result<()> {
    const PACKET_IGNORE_OUTGOING: i32 = 23;
    setsockopt(fd, libc::SOL_PACKET, PACKET_IGNORE_OUTGOING, &1i32)
}
pub mod xsk;
