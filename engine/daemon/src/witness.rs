//! The node's side of the witness: a UDP socket on the LAN side, the
//! lease client (`msl_witness::client::LeaseClient`) and the timers around
//! it, driven by the core's `Action::WantLease` and feeding it
//! `Event::Lease` and `Event::WitnessUnreachable`.
//!
//! The driver owns the [`WitnessLink`] and calls it on the core's clock
//! (the `now` it passes the core), so a lease's end is on that clock too.
//! Replies come in on a receive thread as `Input::Witness` through the
//! core's inbox, like every other input. While the core wants the lease the
//! link sends a request at once and renews every quarter of the dead
//! interval; after a refusal it asks again as soon as the witness said it
//! may grant. A witness silent for one dead interval while the lease is
//! wanted is reported unreachable. When the driver finds the core did not
//! run for a stall's length it calls [`WitnessLink::on_stall`]: the lease
//! and every request in flight are forgotten, and a new request goes out.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use msl_core::node::Event;
use msl_witness::client::{ClientConfig, ClientCounters, Ignored, LeaseClient, Outcome};
use msl_witness::proto::REPLY_LEN;
use serde::Serialize;

use crate::inbox::Inbox;
use crate::input::{Block, Input};

/// What the link needs besides the lease client's identity.
#[derive(Clone, Debug)]
pub struct WitnessSetup {
    /// The witness.
    pub addr: SocketAddr,
    /// This node's LAN address to send from.
    pub bind: std::net::IpAddr,
    /// Taken off every lease (clock-rate differences).
    pub margin_us: u64,
    /// The dead interval: renewals every quarter of it, the witness
    /// unreachable after a whole one without a reply.
    pub dead_us: u64,
    /// `on_no_quorum`, for status.
    pub on_no_quorum: &'static str,
}

/// The witness as `mslctl status` and the metrics show it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct WitnessView {
    pub address: String,
    pub on_no_quorum: &'static str,
    /// The core asks for the lease (a primary, or a takeover waiting).
    pub wanted: bool,
    /// False once no reply came for a dead interval while the lease was
    /// wanted; true again at the next reply.
    pub reachable: bool,
    /// This node holds the lease now.
    pub held: bool,
    /// Milliseconds left of the lease held (0 if none).
    pub remaining_ms: u64,
    /// The lease holder the witness named in its last reply.
    pub holder: Option<u16>,
    /// The last reply's verdict ("granted", "held", "startup", "released").
    pub last_verdict: Option<String>,
    /// Lease per grant in the last grant (milliseconds).
    pub lease_ms: u64,
    /// Milliseconds since the last reply taken (None: none yet).
    pub last_reply_ms_ago: Option<u64>,
    pub counters: WitnessCounters,
}

/// The lease client's counts and the link's own.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct WitnessCounters {
    #[serde(flatten)]
    pub client: ClientCounters,
    /// Requests the socket refused to send.
    pub send_errors: u64,
    /// Datagrams from another address than the witness's.
    pub foreign: u64,
    /// Grants of a lease longer than the dead interval: the witness's
    /// `lease_ms` delays a takeover past the dead interval.
    pub long_leases: u64,
}

/// The view shared with status and metrics.
pub type SharedView = Arc<Mutex<WitnessView>>;

/// The node's link to its witness (see the module documentation).
pub struct WitnessLink {
    sock: UdpSocket,
    setup: WitnessSetup,
    client: LeaseClient,
    want: bool,
    /// When the last reply was taken, or the lease was last asked for.
    last_reply: u64,
    replied_once: bool,
    unreachable: bool,
    /// When the next request goes out (while wanted).
    next_request: u64,
    /// Datagrams from elsewhere (read by the receive thread).
    foreign: Arc<std::sync::atomic::AtomicU64>,
    send_errors: u64,
    long_leases: u64,
    lease_us: u64,
    view: SharedView,
}

impl WitnessLink {
    /// Bind the socket, start the receive thread (it forwards replies to
    /// `inputs` stamped with `Instant`s, until `stop`).
    pub fn start(
        setup: WitnessSetup,
        client: ClientConfig,
        inputs: Inbox,
        stop: Arc<AtomicBool>,
    ) -> Result<WitnessLink, String> {
        let sock = UdpSocket::bind(SocketAddr::new(setup.bind, 0))
            .map_err(|e| format!("witness: cannot bind a UDP socket on {}: {e}", setup.bind))?;
        let rx = sock
            .try_clone()
            .map_err(|e| format!("witness: socket: {e}"))?;
        rx.set_read_timeout(Some(Duration::from_millis(100)))
            .map_err(|e| format!("witness: socket: {e}"))?;
        let foreign = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let f = foreign.clone();
        let from = setup.addr;
        std::thread::Builder::new()
            .name("msl-witness-rx".into())
            .spawn(move || receive(rx, from, inputs, stop, f))
            .map_err(|e| format!("witness: cannot start the receive thread: {e}"))?;
        let view = Arc::new(Mutex::new(WitnessView {
            address: setup.addr.to_string(),
            on_no_quorum: setup.on_no_quorum,
            reachable: true,
            ..WitnessView::default()
        }));
        Ok(WitnessLink {
            sock,
            client: LeaseClient::new(client),
            want: false,
            last_reply: 0,
            replied_once: false,
            unreachable: false,
            next_request: u64::MAX,
            foreign,
            send_errors: 0,
            long_leases: 0,
            lease_us: 0,
            view,
            setup,
        })
    }

    /// The view status and metrics read.
    pub fn view(&self) -> SharedView {
        self.view.clone()
    }

    fn renew_us(&self) -> u64 {
        (self.setup.dead_us / 4).max(1_000)
    }

    fn send(&mut self, bytes: &[u8]) {
        if self.sock.send_to(bytes, self.setup.addr).is_err() {
            self.send_errors += 1;
        }
    }

    fn request(&mut self, now: u64) {
        let q = self.client.request(now);
        self.send(&q);
        self.next_request = now + self.renew_us();
    }

    /// The role and generation the next requests report (the witness's
    /// status shows them).
    pub fn set_view(&mut self, role: msl_wire::Role, generation: u64) {
        self.client.set_view(role, generation);
    }

    /// `Action::WantLease(want)` at `now`.
    pub fn want(&mut self, now: u64, want: bool) {
        if !want && !self.want {
            return;
        }
        self.want = want;
        if want {
            // The silence that makes the witness unreachable counts from
            // the first request of a wish.
            self.last_reply = now;
            self.request(now);
        } else {
            let q = self.client.release(now);
            self.send(&q);
            self.next_request = u64::MAX;
        }
        self.publish(now);
    }

    /// When `tick` is due next (core clock; `u64::MAX`: nothing to do).
    pub fn due(&self) -> u64 {
        if !self.want {
            return u64::MAX;
        }
        let unreachable_at = if self.unreachable {
            u64::MAX
        } else {
            self.last_reply + self.setup.dead_us
        };
        self.next_request.min(unreachable_at)
    }

    /// Timers: a renewal due, the witness silent too long.
    pub fn tick(&mut self, now: u64) -> Option<Event<Block>> {
        if !self.want {
            return None;
        }
        if now >= self.next_request {
            self.request(now);
        }
        let mut ev = None;
        if !self.unreachable && now.saturating_sub(self.last_reply) >= self.setup.dead_us {
            self.unreachable = true;
            ev = Some(Event::WitnessUnreachable { unreachable: true });
        }
        self.publish(now);
        ev
    }

    /// A datagram from the witness, taken at `now`: the events for the core.
    pub fn on_reply(&mut self, now: u64, bytes: &[u8]) -> Vec<Event<Block>> {
        let o = self.client.on_reply(now, bytes);
        let mut evs = Vec::new();
        match o {
            Outcome::Ignored(i) => {
                if let Ignored::Malformed(e) = i {
                    tracing::debug!("msld: witness: malformed reply: {e}");
                }
                self.publish(now);
                return evs;
            }
            Outcome::Granted { .. } => {
                if let Some(r) = self.client.last_reply() {
                    self.lease_us = u64::from(r.lease_us);
                    if self.lease_us > self.setup.dead_us {
                        if self.long_leases == 0 {
                            tracing::warn!(
                                "msld: the witness grants {} ms leases, longer than the dead \
                                 interval ({} ms): a takeover waits for the lease, so set the \
                                 witness's lease_ms to at most {} ms",
                                self.lease_us / 1000,
                                self.setup.dead_us / 1000,
                                self.setup.dead_us / 1000
                            );
                        }
                        self.long_leases += 1;
                    }
                }
            }
            Outcome::Refused {
                verdict, wait_us, ..
            } => {
                // Ask again once the witness may grant (the other node's
                // lease ended, or its start-up window), not a whole renewal
                // period later: a takeover waits on this. A node behind
                // the holder's generation asks at the renewal period.
                if self.want && verdict != msl_witness::proto::Verdict::Behind {
                    let at = now + u64::from(wait_us) + 1_000;
                    self.next_request = self.next_request.min(at);
                }
            }
        }
        self.last_reply = now;
        self.replied_once = true;
        if std::mem::take(&mut self.unreachable) {
            evs.push(Event::WitnessUnreachable { unreachable: false });
        }
        evs.push(Event::Lease {
            held: self.client.holds(now),
            until: self.client.valid_until().unwrap_or(0),
        });
        self.publish(now);
        evs
    }

    /// The core did not run for a while: drop the lease and everything in
    /// flight; ask again at once if the lease is wanted.
    pub fn on_stall(&mut self, now: u64) {
        self.client.on_stall();
        if self.want {
            self.next_request = now;
        }
        self.publish(now);
    }

    fn publish(&self, now: u64) {
        let Ok(mut v) = self.view.lock() else {
            return;
        };
        let r = self.client.last_reply();
        v.wanted = self.want;
        v.reachable = !self.unreachable;
        v.held = self.client.holds(now);
        v.remaining_ms = self
            .client
            .valid_until()
            .map_or(0, |u| u.saturating_sub(now) / 1000);
        v.holder = r.and_then(|r| r.holder);
        v.last_verdict = r.map(|r| format!("{:?}", r.verdict).to_lowercase());
        v.lease_ms = self.lease_us / 1000;
        v.last_reply_ms_ago = self
            .replied_once
            .then(|| now.saturating_sub(self.last_reply) / 1000);
        v.counters = WitnessCounters {
            client: self.client.counters(),
            send_errors: self.send_errors,
            foreign: self.foreign.load(Ordering::Relaxed),
            long_leases: self.long_leases,
        };
    }
}

/// The receive thread: replies from the witness's address go to the core
/// as `Input::Witness`; anything else is counted and dropped.
fn receive(
    sock: UdpSocket,
    witness: SocketAddr,
    inputs: Inbox,
    stop: Arc<AtomicBool>,
    foreign: Arc<std::sync::atomic::AtomicU64>,
) {
    let mut buf = [0u8; 2 * REPLY_LEN];
    while !stop.load(Ordering::Relaxed) {
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => {
                tracing::warn!("msld: witness socket: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if from != witness {
            foreign.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let input = Input::Witness {
            bytes: buf[..n].to_vec(),
            arrived: Instant::now(),
        };
        if inputs.send(input).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use msl_wire::{Domain, Key};
    use msl_witness::witness::{Settings, Witness};

    const DEAD: u64 = 400_000;
    const LEASE: u32 = 400_000;

    fn key() -> Key {
        Key::derive(&[7; 32], Domain::Witness)
    }

    /// A link to a local socket standing in for the witness (the test
    /// reads the requests there and answers them through a real
    /// `Witness`), and that witness.
    fn link(node: u16) -> (WitnessLink, UdpSocket, Witness, crate::inbox::InboxRx) {
        let fake = UdpSocket::bind("127.0.0.1:0").unwrap();
        fake.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let (inbox, rx) = crate::inbox::inbox(16);
        let l = WitnessLink::start(
            WitnessSetup {
                addr: fake.local_addr().unwrap(),
                bind: "127.0.0.1".parse().unwrap(),
                margin_us: 10_000,
                dead_us: DEAD,
                on_no_quorum: "suspend",
            },
            ClientConfig {
                cluster_id: 9,
                node_id: node,
                epoch: 3,
                key: key(),
                margin_us: 10_000,
            },
            inbox,
            Arc::new(AtomicBool::new(true)),
        )
        .unwrap();
        let mut w = Witness::new(
            Settings {
                lease_us: LEASE,
                startup_us: 0,
                witness_epoch: 1,
            },
            0,
        );
        w.add_cluster(9, key());
        (l, fake, w, rx)
    }

    /// The next request the link sent, answered by the witness at `at`.
    fn answer(fake: &UdpSocket, w: &mut Witness, at: u64) -> Vec<u8> {
        let mut b = [0u8; 128];
        let (n, _) = fake.recv_from(&mut b).unwrap();
        w.handle(at, &b[..n]).unwrap().bytes.to_vec()
    }

    fn lease_of(evs: &[Event<Block>]) -> Option<(bool, u64)> {
        evs.iter().find_map(|e| match e {
            Event::Lease { held, until } => Some((*held, *until)),
            _ => None,
        })
    }

    /// A wish sends a request at once; the grant becomes `Event::Lease`
    /// until send time + lease - margin; renewals every quarter dead
    /// interval; release on `want(false)`.
    #[test]
    fn test_grant_renewal_and_release() {
        let (mut l, fake, mut w, _rx) = link(1);
        assert_eq!(l.due(), u64::MAX);
        l.want(1_000, true);
        let r = answer(&fake, &mut w, 1_500);
        let evs = l.on_reply(2_000, &r);
        assert_eq!(lease_of(&evs), Some((true, 1_000 + 400_000 - 10_000)));
        assert_eq!(l.due(), 1_000 + DEAD / 4);
        assert!(l.tick(1_000 + DEAD / 4).is_none());
        answer(&fake, &mut w, 101_500);
        l.want(200_000, false);
        let r = answer(&fake, &mut w, 200_500);
        let evs = l.on_reply(201_000, &r);
        assert_eq!(lease_of(&evs), Some((false, 0)));
        assert_eq!(l.due(), u64::MAX);
        let v = l.view().lock().unwrap().clone();
        assert_eq!((v.counters.client.sent, v.counters.client.granted), (3, 1));
        assert_eq!(v.last_verdict.as_deref(), Some("released"));
    }

    /// A refusal names the holder and brings the next request forward to
    /// when the witness may grant; no reply for a dead interval reports
    /// the witness unreachable once, a reply reports it back.
    #[test]
    fn test_refusal_retry_and_unreachable() {
        let (mut a, fa, mut w, _ra) = link(1);
        let (mut b, fb, _, _rb) = link(2);
        a.want(0, true);
        let r = answer(&fa, &mut w, 0);
        a.on_reply(0, &r);
        b.want(350_000, true);
        let r = answer(&fb, &mut w, 350_000);
        let evs = b.on_reply(350_000, &r);
        assert_eq!(lease_of(&evs), Some((false, 0)));
        // The witness may grant at 400 ms (the end of a's lease): b asks
        // again then, before its quarter-interval renewal (450 ms).
        assert_eq!(b.due(), 401_000);
        assert_eq!(b.view().lock().unwrap().holder, Some(1));
        // The witness goes silent for b for a dead interval.
        for t in [401_000, 501_000, 601_000, 701_000] {
            assert_eq!(b.due(), t);
            assert!(b.tick(t).is_none());
        }
        assert_eq!(b.due(), 750_000);
        let e = b.tick(750_000);
        assert!(matches!(
            e,
            Some(Event::WitnessUnreachable { unreachable: true })
        ));
        assert!(!b.view().lock().unwrap().reachable);
        assert!(b.tick(801_000).is_none(), "reported once");
        // Drain what b sent; the last one is answered (a's lease is over).
        let mut last = Vec::new();
        fb.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut buf = [0u8; 128];
        while let Ok((n, _)) = fb.recv_from(&mut buf) {
            last = buf[..n].to_vec();
        }
        let r = w.handle(802_000, &last).unwrap().bytes;
        let evs = b.on_reply(802_000, &r);
        assert!(matches!(
            evs[0],
            Event::WitnessUnreachable { unreachable: false }
        ));
        assert!(lease_of(&evs).unwrap().0, "{:?}", lease_of(&evs));
        assert!(b.view().lock().unwrap().reachable);
    }

    /// A stall drops the lease and the requests in flight: the reply to a
    /// request sent before it does not bring the lease back, and a new
    /// request goes out at once.
    #[test]
    fn test_stall_voids_lease_and_requests_in_flight() {
        let (mut l, fake, mut w, _rx) = link(1);
        l.want(0, true);
        let r = answer(&fake, &mut w, 0);
        l.on_reply(0, &r);
        assert!(l.tick(100_000).is_none());
        let before = answer(&fake, &mut w, 100_000);
        l.on_stall(300_000);
        assert_eq!(l.due(), 300_000);
        let evs = l.on_reply(300_001, &before);
        assert!(evs.is_empty(), "a stale reply is ignored");
        assert!(!l.view().lock().unwrap().held);
        l.tick(300_002);
        let r = answer(&fake, &mut w, 300_003);
        assert!(lease_of(&l.on_reply(300_004, &r)).unwrap().0);
        assert_eq!(l.view().lock().unwrap().counters.client.stalls, 1);
    }

    /// Garbage from the witness's address is counted, never taken.
    #[test]
    fn test_garbage_counted() {
        let (mut l, _fake, _w, _rx) = link(1);
        l.want(0, true);
        assert!(l.on_reply(1, b"not a reply").is_empty());
        assert!(l.on_reply(1, &[0u8; REPLY_LEN]).is_empty());
        let c = l.view().lock().unwrap().counters.client;
        assert_eq!(c.malformed, 2);
    }
}
