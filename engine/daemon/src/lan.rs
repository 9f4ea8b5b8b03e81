//! The heartbeat path on the LAN: UDP server-state packets, one socket per
//! LAN adapter, same frame format and authentication as the MSL.
//!
//! Sending is a plain `send_to` per adapter. Receiving runs one thread per
//! socket: every datagram is parsed and checked (CRC, key, cluster); what
//! fails is counted by reason and dropped, what passes is handed to the
//! daemon's event loop through a bounded channel (never blocking: a full
//! channel drops the packet and counts it; heartbeats are periodic).
//!
//! Each packet carries when it arrived: the kernel stamps it on receipt
//! (`SO_TIMESTAMPNS`, the realtime clock), and the receive thread turns
//! that into a monotonic `Instant` by subtracting the packet's age from
//! now. A node whose core ran late (paused, starved) then still sees when
//! the peer's heartbeats really came in. The kernel also reports the
//! datagrams it dropped on a full socket buffer (`SO_RXQ_OVFL`).

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use msl_wire::{Expect, Header, Heartbeat, Key, Message, RxCounters};

pub use crate::input::LanPacket;

/// One LAN adapter's heartbeat endpoint.
#[derive(Clone, Debug)]
pub struct LanEndpoint {
    /// Index reported to the core (`Event::LanFrame { adapter }`).
    pub adapter: u8,
    /// Local address to bind (this node's address on the adapter + port).
    pub local: SocketAddr,
    /// The peer's address on the same LAN + port.
    pub peer: SocketAddr,
}

/// LAN server-state packets that failed authentication.
pub fn lan_auth_failures(rx: &RxCounters) -> u64 {
    rx.bad_auth + rx.missing_auth + rx.unexpected_auth
}

/// Counters (shared with the receive threads).
#[derive(Debug, Default)]
pub struct LanCounters {
    pub sent: AtomicU64,
    pub send_errors: AtomicU64,
    pub delivered: AtomicU64,
    pub not_heartbeat: AtomicU64,
    pub queue_full: AtomicU64,
    /// Datagrams the kernel dropped because the socket's buffer was full
    /// (the receive thread fell behind), all adapters.
    pub kernel_dropped: AtomicU64,
    /// Parse failures by reason (`rx_bad_checksum`, `rx_bad_auth`, ...).
    pub rx: Mutex<RxCounters>,
}

/// The LAN heartbeat path of one node.
pub struct LanPath {
    socks: Vec<(LanEndpoint, Arc<UdpSocket>)>,
    key: Option<Key>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    pub counters: Arc<LanCounters>,
}

impl LanPath {
    /// Bind one socket per adapter and start the receive threads, which
    /// push verified packets into `out`.
    pub fn start(
        endpoints: &[LanEndpoint],
        cluster_id: u64,
        key: Option<Key>,
        out: SyncSender<LanPacket>,
    ) -> io::Result<Self> {
        let counters = Arc::new(LanCounters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mut socks = Vec::new();
        let mut threads = Vec::new();
        for ep in endpoints {
            let sock = UdpSocket::bind(ep.local).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "LAN adapter {}: cannot bind heartbeat socket {}: {e}",
                        ep.adapter, ep.local
                    ),
                )
            })?;
            sock.set_read_timeout(Some(Duration::from_millis(50)))?;
            // Without kernel stamps the thread's clock at receipt serves.
            let stamped = set_flag(&sock, libc::SO_TIMESTAMPNS).is_ok();
            let _ = set_flag(&sock, libc::SO_RXQ_OVFL);
            if !stamped {
                tracing::warn!(
                    "msld: LAN adapter {}: no kernel receive timestamps; heartbeats are timed when read",
                    ep.adapter
                );
            }
            let sock = Arc::new(sock);
            let (s, c, st, o, k, adapter) = (
                sock.clone(),
                counters.clone(),
                stop.clone(),
                out.clone(),
                key.clone(),
                ep.adapter,
            );
            let t = std::thread::Builder::new()
                .name(format!("msl-lan-rx{adapter}"))
                .spawn(move || rx_loop(&s, adapter, cluster_id, k.as_ref(), &o, &c, &st))?;
            threads.push(t);
            socks.push((ep.clone(), sock));
        }
        Ok(LanPath {
            socks,
            key,
            stop,
            threads,
            counters,
        })
    }

    /// Local addresses actually bound (useful with port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.socks
            .iter()
            .filter_map(|(_, s)| s.local_addr().ok())
            .collect()
    }

    /// Send a server-state packet on every adapter. Failures are counted
    /// (an adapter that is down cannot send: that is what health is for).
    pub fn send(&self, header: &Header, hb: &Heartbeat) {
        let msg = Message::Heartbeat(*hb);
        let mut buf = [0u8; 256];
        let Ok(n) = msl_wire::emit(header, &msg, &[], self.key.as_ref(), &mut buf) else {
            self.counters.send_errors.fetch_add(1, Ordering::Relaxed);
            return;
        };
        for (ep, sock) in &self.socks {
            match sock.send_to(&buf[..n], ep.peer) {
                Ok(_) => self.counters.sent.fetch_add(1, Ordering::Relaxed),
                Err(_) => self.counters.send_errors.fetch_add(1, Ordering::Relaxed),
            };
        }
    }
}

impl Drop for LanPath {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Turn on a boolean `SOL_SOCKET` option.
fn set_flag(sock: &UdpSocket, opt: libc::c_int) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `on`, which
    // lives across the call; the descriptor is open (owned by `sock`).
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// One received datagram: its length, the kernel's receive timestamp
/// (realtime, since the Unix epoch) and the socket's drop counter, when
/// the socket reports them.
struct Received {
    len: usize,
    stamp: Option<Duration>,
    dropped: Option<u32>,
}

/// Receive one datagram into `buf` with its control messages.
fn recv_stamped(sock: &UdpSocket, buf: &mut [u8]) -> io::Result<Received> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // Room for a timespec and a u32 with their headers, 8-byte aligned.
    let mut control = [0u64; 16];
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: `msg` points at `iov` (which points at `buf`) and at
    // `control`, all alive and exclusively borrowed across the call, with
    // their true lengths; the kernel writes at most that much.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut got = Received {
        len: n as usize,
        stamp: None,
        dropped: None,
    };
    // SAFETY: the CMSG_* walk stays inside `control` as the kernel filled
    // it (msg_controllen was updated by recvmsg); each payload is read
    // unaligned with the size its type says.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            let h = &*c;
            if h.cmsg_level == libc::SOL_SOCKET && h.cmsg_type == libc::SCM_TIMESTAMPNS {
                let t: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                if t.tv_sec >= 0 && (0..1_000_000_000).contains(&t.tv_nsec) {
                    got.stamp = Some(Duration::new(t.tv_sec as u64, t.tv_nsec as u32));
                }
            } else if h.cmsg_level == libc::SOL_SOCKET && h.cmsg_type == libc::SO_RXQ_OVFL {
                got.dropped = Some(std::ptr::read_unaligned(libc::CMSG_DATA(c).cast()));
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok(got)
}

/// When a datagram arrived, on the monotonic clock: `mono_now` minus its
/// age, the realtime clock now (`real_now`) less the kernel's stamp
/// (`stamp`; both since the Unix epoch). An age below zero (the realtime
/// clock stepped back) counts as zero; a datagram cannot have arrived
/// before its socket existed (`floor`: the realtime clock stepped forward).
/// Without a stamp: now.
pub(crate) fn arrival_instant(
    stamp: Option<Duration>,
    real_now: Duration,
    mono_now: Instant,
    floor: Instant,
) -> Instant {
    let age = stamp.map_or(Duration::ZERO, |k| real_now.saturating_sub(k));
    mono_now
        .checked_sub(age)
        .map_or(floor, |t| t.max(floor))
        .min(mono_now)
}

fn rx_loop(
    sock: &UdpSocket,
    adapter: u8,
    cluster_id: u64,
    key: Option<&Key>,
    out: &SyncSender<LanPacket>,
    counters: &LanCounters,
    stop: &AtomicBool,
) {
    let mut buf = [0u8; 2048];
    let expect = Expect { cluster_id, key };
    let bound = Instant::now();
    let mut dropped_seen = 0u32;
    while !stop.load(Ordering::Relaxed) {
        let got = match recv_stamped(sock, &mut buf) {
            Ok(got) => got,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(_) => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let arrived = arrival_instant(
            got.stamp,
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default(),
            Instant::now(),
            bound,
        );
        if let Some(d) = got.dropped {
            // The socket's own running count: add what it rose by.
            let new = d.wrapping_sub(dropped_seen);
            dropped_seen = d;
            counters
                .kernel_dropped
                .fetch_add(u64::from(new), Ordering::Relaxed);
        }
        let n = got.len.min(buf.len());
        let parsed = msl_wire::parse(&buf[..n], &expect);
        if let Ok(mut rx) = counters.rx.lock() {
            rx.record(&parsed);
        }
        let p = match parsed {
            Ok(p) => p,
            Err(e) => {
                crate::msl::warn_other_version("LAN", &e);
                continue;
            }
        };
        let Message::Heartbeat(hb) = p.msg else {
            counters.not_heartbeat.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        match out.try_send(LanPacket {
            adapter,
            header: p.header,
            hb,
            arrived,
        }) {
            Ok(()) => counters.delivered.fetch_add(1, Ordering::Relaxed),
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                counters.queue_full.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use msl_wire::{AdapterHealth, DiskState, Role, MAX_ADAPTERS};
    use std::sync::mpsc::sync_channel;
    use std::time::Instant;

    const CLUSTER: u64 = 0x6d73_6c00;

    fn hb(counter: u64) -> Heartbeat {
        Heartbeat {
            role: Role::Primary,
            disk: DiskState::UpToDate,
            msl_up: true,
            in_sync: true,
            adapters: [AdapterHealth {
                link_up: true,
                carrier: true,
                reachable: true,
            }; MAX_ADAPTERS],
            adapter_count: 1,
            epoch: 1,
            counter,
        }
    }

    fn header(sender: u16) -> Header {
        Header {
            cluster_id: CLUSTER,
            sender,
            generation: 9,
            seq: 0,
            ack: 0,
            flags: 0,
            frag_index: 0,
            frag_count: 1,
        }
    }

    fn lo() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    /// Start a receiver on an ephemeral loopback port.
    fn receiver(key: Option<Key>) -> (LanPath, std::sync::mpsc::Receiver<LanPacket>, SocketAddr) {
        let (tx, rx) = sync_channel(64);
        let ep = LanEndpoint {
            adapter: 0,
            local: lo(),
            peer: lo(),
        };
        let p = LanPath::start(&[ep], CLUSTER, key, tx).unwrap();
        let addr = p.local_addrs()[0];
        (p, rx, addr)
    }

    fn sender(key: Option<Key>, to: SocketAddr) -> LanPath {
        let (tx, _rx) = sync_channel(1);
        LanPath::start(
            &[LanEndpoint {
                adapter: 0,
                local: lo(),
                peer: to,
            }],
            CLUSTER,
            key,
            tx,
        )
        .unwrap()
    }

    fn wait_for<T>(mut f: impl FnMut() -> Option<T>) -> Option<T> {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(3) {
            if let Some(v) = f() {
                return Some(v);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    }

    /// The kernel's realtime stamp becomes a monotonic instant by the
    /// packet's age, clamped to [the socket's start, now].
    #[test]
    fn test_arrival_instant_subtracts_the_packets_age_and_clamps() {
        let floor = Instant::now();
        let mono = floor + Duration::from_secs(10);
        let real = Duration::from_secs(1_700_000_000);
        let ms = Duration::from_millis;
        // 250 ms old.
        assert_eq!(
            arrival_instant(Some(real - ms(250)), real, mono, floor),
            mono - ms(250)
        );
        // No stamp: now.
        assert_eq!(arrival_instant(None, real, mono, floor), mono);
        // Stamped in the future (the realtime clock stepped back): now.
        assert_eq!(arrival_instant(Some(real + ms(5)), real, mono, floor), mono);
        // Older than the socket (the realtime clock stepped forward): the
        // socket's start.
        assert_eq!(
            arrival_instant(Some(real - Duration::from_secs(3600)), real, mono, floor),
            floor
        );
    }

    /// A datagram left in the socket for 150 ms carries the kernel's
    /// receive time, not the time it was read.
    #[test]
    fn test_kernel_stamp_gives_the_time_of_receipt() {
        let rx = UdpSocket::bind(lo()).unwrap();
        set_flag(&rx, libc::SO_TIMESTAMPNS).unwrap();
        set_flag(&rx, libc::SO_RXQ_OVFL).unwrap();
        let tx = UdpSocket::bind(lo()).unwrap();
        tx.send_to(b"hello", rx.local_addr().unwrap()).unwrap();
        std::thread::sleep(Duration::from_millis(150));
        let mut buf = [0u8; 64];
        let got = recv_stamped(&rx, &mut buf).unwrap();
        assert_eq!(&buf[..got.len], b"hello");
        // The kernel adds the drop count only once there were drops.
        assert_eq!(got.dropped.unwrap_or(0), 0);
        let stamp = got.stamp.expect("kernel timestamp");
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap();
        let age = now.saturating_sub(stamp);
        assert!(
            age >= Duration::from_millis(140) && age < Duration::from_secs(5),
            "age {age:?}"
        );
    }

    /// The receive thread's packets carry an arrival time between the
    /// send and their delivery.
    #[test]
    fn test_delivered_heartbeat_carries_its_arrival() {
        let (_b, rx, addr) = receiver(None);
        let a = sender(None, addr);
        let before = Instant::now();
        a.send(&header(1), &hb(5));
        let got = wait_for(|| rx.try_recv().ok()).expect("heartbeat delivered");
        let after = Instant::now();
        // The kernel clock and the realtime read differ by a little.
        assert!(got.arrived + Duration::from_millis(5) >= before);
        assert!(got.arrived <= after);
    }

    #[test]
    fn test_keyed_pair_heartbeat_delivered() {
        let key = Key([7; 32]);
        let (b, rx, addr) = receiver(Some(key.clone()));
        let a = sender(Some(key), addr);
        a.send(&header(1), &hb(42));
        let got = wait_for(|| rx.try_recv().ok()).expect("heartbeat delivered");
        assert_eq!(got.hb.counter, 42);
        assert_eq!(got.header.sender, 1);
        assert_eq!(b.counters.delivered.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn test_wrong_key_counted_and_dropped() {
        let (b, rx, addr) = receiver(Some(Key([7; 32])));
        let a = sender(Some(Key([8; 32])), addr);
        a.send(&header(1), &hb(1));
        let bad = wait_for(|| {
            let n = b.counters.rx.lock().unwrap().bad_auth;
            (n > 0).then_some(n)
        });
        assert_eq!(bad, Some(1));
        assert!(
            rx.try_recv().is_err(),
            "a packet that failed authentication was delivered"
        );
    }

    #[test]
    fn test_garbage_and_unkeyed_packets_counted_and_dropped() {
        let (b, rx, addr) = receiver(Some(Key([7; 32])));
        let raw = UdpSocket::bind(lo()).unwrap();
        raw.send_to(b"not an msl packet", addr).unwrap();
        let a = sender(None, addr);
        a.send(&header(1), &hb(1));
        let dropped = wait_for(|| {
            let rx = b.counters.rx.lock().unwrap();
            (rx.dropped() >= 2).then_some(rx.missing_auth)
        });
        assert_eq!(dropped, Some(1), "unkeyed packet counted as missing auth");
        assert!(rx.try_recv().is_err());
    }
}
