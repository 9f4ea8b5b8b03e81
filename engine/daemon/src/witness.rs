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
            Outcome::Refused { wait_us, .. } => {
                // Ask again once the witness may grant (the other node's
                // lease ended, or its start-up window), not a whole renewal
                // period later: a takeover waits on this.
                if self.want {
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
