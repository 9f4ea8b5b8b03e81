//! The witness as a third actor: the real `msl_witness` state machine on
//! its own host, and one real `LeaseClient` per node on the node's host,
//! over simulated UDP with its own faults (loss, delay, the witness's
//! crash and restart, its stalls, a partition between the witness and
//! either node or both).

use msl_witness::client::{ClientConfig, LeaseClient};
use msl_witness::witness::{Settings, Witness};

use super::*;

/// Lease per grant: twice msl-witness's default (which equals msld's
/// default dead interval), so leases outlive failure detection here and
/// takeovers wait on the lease as well.
pub const LEASE_US: u64 = 800 * MS;
/// Node-side margin for clock-rate differences.
const MARGIN_US: u64 = 10 * MS;
/// No reply for this long: the host reports the witness unreachable.
const UNREACHABLE_US: u64 = LEASE_US;

/// The witness host.
pub(crate) struct WitnessHost {
    pub(crate) w: Option<Witness>,
    /// Its restarts (a fresh `witness_epoch` each).
    pub(crate) starts: u64,
    /// Packets between the witness and node i are dropped.
    pub(crate) cut: [bool; 2],
    /// The witness process does not run until then: requests queue and
    /// are handled (with that time as their arrival) when it runs again.
    pub(crate) stalled_until: Micros,
}

/// A node host's side: its lease client and what the core asked for.
pub(crate) struct LeaseHost {
    pub(crate) client: LeaseClient,
    pub(crate) want: bool,
    pub(crate) last_reply: Micros,
    pub(crate) unreachable: bool,
    /// A renewal tick is queued.
    pub(crate) ticking: bool,
}

impl WitnessHost {
    pub(crate) fn new(now: Micros, key: wire::Key) -> Self {
        let mut h = WitnessHost {
            w: None,
            starts: 0,
            cut: [false; 2],
            stalled_until: 0,
        };
        h.start(now, key, 0);
        h
    }

    /// (Re)start: it remembers no lease, and grants nothing for one lease.
    pub(crate) fn start(&mut self, now: Micros, key: wire::Key, startup_us: u64) {
        self.starts += 1;
        self.stalled_until = 0;
        let mut w = Witness::new(
            Settings {
                lease_us: LEASE_US as u32,
                startup_us,
                witness_epoch: self.starts,
            },
            now,
        );
        w.add_cluster(CLUSTER, key);
        self.w = Some(w);
    }
}

impl Sim {
    pub(crate) fn witness_key(&self) -> wire::Key {
        self.witness_key.clone()
    }

    /// A fresh lease client for node `i`'s start.
    pub(crate) fn new_lease_host(&self, i: usize) -> LeaseHost {
        LeaseHost {
            client: LeaseClient::new(ClientConfig {
                cluster_id: CLUSTER,
                node_id: self.nodes[i].cfg.node_id,
                epoch: self.nodes[i].cfg.epoch,
                key: self.witness_key(),
                margin_us: MARGIN_US,
            }),
            want: false,
            last_reply: self.now,
            unreachable: false,
            ticking: false,
        }
    }

    /// `Action::WantLease` from node `i`.
    pub(crate) fn want_lease(&mut self, i: usize, want: bool) {
        let now = self.now;
        let Some(h) = self.nodes[i].lease.as_mut() else {
            return;
        };
        if h.want == want && !want {
            return;
        }
        h.want = want;
        if want {
            h.last_reply = now;
            self.lease_request(i);
        } else {
            let bytes = h.client.release(now).to_vec();
            self.send_to_witness(i, bytes);
        }
    }

    /// Send an acquire/renew and arm the next one a quarter lease later.
    fn lease_request(&mut self, i: usize) {
        let now = self.now;
        let e = self.nodes[i].epoch;
        let view = self.nodes[i]
            .node
            .as_ref()
            .map(|n| (n.role(), n.meta().gens.current));
        let Some(h) = self.nodes[i].lease.as_mut() else {
            return;
        };
        // The node's generation as it is now, as msld sends it.
        if let Some((role, gen)) = view {
            h.client.set_view(role, gen);
        }
        let bytes = h.client.request(now).to_vec();
        let arm = !h.ticking;
        h.ticking = true;
        self.send_to_witness(i, bytes);
        if arm {
            self.push(now + LEASE_US / 4, Ev::LeaseTick { node: i, epoch: e });
        }
    }

    pub(crate) fn lease_tick(&mut self, i: usize) {
        let now = self.now;
        let frozen = self.nodes[i].frozen;
        let Some(h) = self.nodes[i].lease.as_mut() else {
            return;
        };
        h.ticking = false;
        if !h.want {
            return;
        }
        if frozen {
            // The host does not run either: try again later.
            h.ticking = true;
            let e = self.nodes[i].epoch;
            self.push(now + LEASE_US / 4, Ev::LeaseTick { node: i, epoch: e });
            return;
        }
        let silent = now.saturating_sub(h.last_reply) >= UNREACHABLE_US;
        let report = silent && !h.unreachable;
        if report {
            h.unreachable = true;
        }
        self.lease_request(i);
        if report {
            self.feed(i, Event::WitnessUnreachable { unreachable: true });
        }
    }

    fn send_to_witness(&mut self, i: usize, bytes: Vec<u8>) {
        let f = self.opts.lan;
        if self.witness.cut[i] || self.rng.chance(f.loss_ppm) {
            return;
        }
        let at = self.now + f.latency_us + self.rng.below(f.jitter_us + 1);
        let frame = self.store_frame(bytes);
        self.push(at, Ev::WitnessRx { from: i, frame });
    }

    pub(crate) fn witness_rx(&mut self, from: usize, frame: usize) {
        let now = self.now;
        if now < self.witness.stalled_until {
            // Queued on the witness host until its process runs again.
            let at = self.witness.stalled_until;
            self.push(at, Ev::WitnessRx { from, frame });
            return;
        }
        let Some(bytes) = self.frames.remove(&frame) else {
            return;
        };
        if self.witness.cut[from] {
            return;
        }
        let Some(w) = self.witness.w.as_mut() else {
            return;
        };
        let Ok(ans) = w.handle(now, &bytes) else {
            return;
        };
        let f = self.opts.lan;
        if self.rng.chance(f.loss_ppm) {
            return;
        }
        let at = now + f.latency_us + self.rng.below(f.jitter_us + 1);
        let frame = self.store_frame(ans.bytes.to_vec());
        let e = self.nodes[from].epoch;
        self.push(
            at,
            Ev::WitnessReply {
                to: from,
                epoch: e,
                frame,
            },
        );
    }

    pub(crate) fn witness_reply(&mut self, to: usize, frame: usize) {
        let Some(bytes) = self.frames.remove(&frame) else {
            return;
        };
        let now = self.now;
        if self.witness.cut[to] || self.nodes[to].frozen || self.nodes[to].node.is_none() {
            // A frozen host drops it: at the thaw its client forgets every
            // request in flight anyway.
            return;
        }
        let Some(h) = self.nodes[to].lease.as_mut() else {
            return;
        };
        h.client.on_reply(now, &bytes);
        h.last_reply = now;
        let back = std::mem::take(&mut h.unreachable);
        let held = h.client.holds(now);
        let until = h.client.valid_until().unwrap_or(0);
        if back {
            self.feed(to, Event::WitnessUnreachable { unreachable: false });
        }
        self.feed(to, Event::Lease { held, until });
    }

    /// The node's host did not run: its lease client drops the lease, and
    /// the host reports the loss to the core before any input queued
    /// meanwhile (the core itself sees a stall only past its threshold).
    pub(crate) fn lease_stall(&mut self, i: usize) {
        let now = self.now;
        let Some(h) = self.nodes[i].lease.as_mut() else {
            return;
        };
        let had = h.client.holds(now);
        h.client.on_stall();
        if had {
            self.feed(
                i,
                Event::Lease {
                    held: false,
                    until: 0,
                },
            );
        }
    }

    pub fn witness_crash(&mut self) {
        self.fault("witness crashes".into(), Some("witness crash".into()));
        self.witness.w = None;
    }

    pub fn witness_restart(&mut self) {
        if self.witness.w.is_some() {
            return;
        }
        self.fault("witness restarts".into(), None);
        let key = self.witness_key();
        self.witness.start(self.now, key, LEASE_US);
    }

    /// The witness process does not run for `d` (VM pause, SIGSTOP): what
    /// reaches it meanwhile is handled late, at its own clock's time then.
    pub fn witness_freeze(&mut self, d: Micros) {
        self.fault(
            format!("witness frozen for {} ms", d / MS),
            Some(format!("witness freeze {} ms", d / MS)),
        );
        self.witness.stalled_until = self.witness.stalled_until.max(self.now + d);
    }

    /// Cut (or heal) the path between the witness and node `i`.
    pub fn witness_cut(&mut self, i: usize, cut: bool) {
        let what = format!(
            "witness {} n{}",
            if cut { "cut from" } else { "reaches" },
            i + 1
        );
        self.fault(what, cut.then(|| format!("witness cut n{}", i + 1)));
        self.witness.cut[i] = cut;
    }

    /// Node `i`, without its peer, acknowledged a client write at `now`:
    /// with a witness (and `NoQuorum::Suspend`), its host's lease client
    /// must hold the lease now.
    pub(crate) fn check_ack_lease(&mut self, i: usize) {
        if !self.opts.witness || self.opts.on_no_quorum == NoQuorum::Sft3 {
            return;
        }
        let now = self.now;
        let holds = self.nodes[i]
            .lease
            .as_ref()
            .is_some_and(|h| h.client.holds(now));
        if !holds {
            let msg = format!(
                "n{} acknowledged a write without its peer and without the witness lease",
                i + 1
            );
            self.fail(msg);
        }
    }

    /// Node `i`, without its peer, acknowledged a client write in
    /// generation `g` at `now`: with a witness, two nodes' spans of such
    /// acknowledgements (per generation, first to last) never overlap in
    /// time. (A write acknowledged in a session is on both nodes: the old
    /// primary that acknowledges one late, after a stall, loses nothing.)
    pub(crate) fn check_ack_span(&mut self, i: usize, g: u64) {
        if !self.opts.witness || self.opts.on_no_quorum == NoQuorum::Sft3 {
            return;
        }
        let now = self.now;
        let span = match self.ack_spans.iter_mut().find(|s| s.0 == i && s.1 == g) {
            Some(s) => {
                s.3 = now;
                *s
            }
            None => {
                self.ack_spans.push((i, g, now, now));
                (i, g, now, now)
            }
        };
        let overlap = self
            .ack_spans
            .iter()
            .find(|o| o.0 != i && o.3 > span.2 && o.2 < now)
            .copied();
        if let Some(o) = overlap {
            let msg = format!(
                "n{} acknowledged writes from {} to {} us (generation {:016x}) while n{} did from {} to {} us (generation {:016x})",
                o.0 + 1, o.2, o.3, o.1, i + 1, span.2, now, g
            );
            self.fail(msg);
        }
    }
}
