//! The heartbeat path on the LAN: UDP server-state packets, one socket per
//! LAN adapter, same frame format and authentication as the MSL.
//!
//! Sending is a plain `send_to` per adapter. Receiving runs one thread per
//! socket: every datagram is parsed and checked (CRC, key, cluster); what
//! fails is counted by reason and dropped, what passes is handed to the
//! daemon's event loop through a bounded channel (never blocking: a full
//! channel drops the packet and counts it; heartbeats are periodic).

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

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
    /// Parse failures by reason (`rx_bad_crc`, `rx_bad_auth`, ...).
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
    while !stop.load(Ordering::Relaxed) {
        let n = match sock.recv_from(&mut buf) {
            Ok((n, _)) => n,
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
        let parsed = msl_wire::parse(&buf[..n], &expect);
        if let Ok(mut rx) = counters.rx.lock() {
            rx.record(&parsed);
        }
        let Ok(p) = parsed else {
            continue;
        };
        let Message::Heartbeat(hb) = p.msg else {
            counters.not_heartbeat.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        match out.try_send(LanPacket {
            adapter,
            header: p.header,
            hb,
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
