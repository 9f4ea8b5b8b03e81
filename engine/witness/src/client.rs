//! The node's side of the lease: builds requests, judges replies, and says
//! whether the node holds the lease now. No I/O and no clock: the caller
//! passes its monotonic time (microseconds) in.
//!
//! The lease is measured on the node's own clock from the moment it SENT
//! the request that won it: `valid_until = sent_at + lease_us - margin`.
//! The witness measures the same lease from when it received that request,
//! which is later, so the node's lease always ends first, whatever the
//! network delays and however long the node itself was paused. Measuring
//! from the reply's arrival would be wrong: a reply delayed by `d` would
//! stretch the node's lease `d` past the witness's, into a lease the
//! witness has meanwhile granted to the other node.
//!
//! `margin_us` covers the clocks' rate difference over one lease (a few
//! ppm on real hardware; the default leaves far more).
//!
//! Only a reply to a request this client sent, and newer than any reply it
//! already took, counts: duplicated, reordered or replayed replies are
//! ignored and counted. [`LeaseClient::on_stall`] drops the lease and
//! every request in flight: a node that finds it did not run for a while
//! must not act on a lease it checked before the stall.

use std::collections::VecDeque;

use msl_wire::{Key, Role};
use serde::Serialize;

use crate::proto::{Op, ProtoError, Reply, Request, Verdict, REQUEST_LEN};

/// Requests remembered while waiting for their replies; an older one's
/// reply is ignored.
pub const MAX_IN_FLIGHT: usize = 16;

/// What a node needs to talk to its witness.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// The node's cluster.
    pub cluster_id: u64,
    /// The node.
    pub node_id: u16,
    /// The node's start epoch (as in its HELLOs: persisted and one higher
    /// at every start). The witness answers only requests newer than the
    /// last it saw from this node, by `(epoch, counter)`.
    pub epoch: u64,
    /// The cluster's witness key (`Key::derive(master, Domain::Witness)`).
    pub key: Key,
    /// Taken off every lease for clock-rate differences.
    pub margin_us: u64,
}

/// Client event counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ClientCounters {
    /// Requests built.
    pub sent: u64,
    /// Grants taken.
    pub granted: u64,
    /// Refusals taken (held, start-up window, released).
    pub refused: u64,
    /// Replies to no request in flight, or older than one already taken.
    pub stale: u64,
    /// Replies for another cluster, node or epoch.
    pub not_for_us: u64,
    /// Replies whose tag did not verify.
    pub bad_tag: u64,
    /// Bytes that are not a reply.
    pub malformed: u64,
    /// Times the witness epoch changed (the witness restarted).
    pub witness_restarts: u64,
    /// Stalls reported with `on_stall`.
    pub stalls: u64,
}

/// What a reply did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The node holds the lease until `valid_until` (its own clock).
    Granted {
        /// End of the lease on the node's clock.
        valid_until: u64,
    },
    /// The witness refused (or confirmed a release): the node holds nothing.
    Refused {
        /// Why.
        verdict: Verdict,
        /// The holder the witness named.
        holder: Option<u16>,
        /// How long until the witness may grant.
        wait_us: u32,
    },
    /// The reply was ignored; the lease is unchanged.
    Ignored(Ignored),
}

/// Why a reply was ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ignored {
    /// Not a well-formed reply.
    Malformed(ProtoError),
    /// The tag did not verify.
    BadTag,
    /// Another cluster, node or epoch.
    NotForUs,
    /// Echoes a request not in flight or older than one already answered.
    Stale {
        /// The counter it echoes.
        counter: u64,
    },
}

/// The node's lease state.
pub struct LeaseClient {
    cfg: ClientConfig,
    role: Role,
    generation: u64,
    next_counter: u64,
    /// `(counter, sent_at)`, oldest first.
    in_flight: VecDeque<(u64, u64)>,
    newest_answered: u64,
    valid_until: Option<u64>,
    witness_epoch: Option<u64>,
    last_reply: Option<Reply>,
    counters: ClientCounters,
}

impl LeaseClient {
    /// A client holding nothing.
    pub fn new(cfg: ClientConfig) -> LeaseClient {
        LeaseClient {
            cfg,
            role: Role::Secondary,
            generation: 0,
            next_counter: 1,
            in_flight: VecDeque::new(),
            newest_answered: 0,
            valid_until: None,
            witness_epoch: None,
            last_reply: None,
            counters: ClientCounters::default(),
        }
    }

    /// The role and generation reported in the next requests (for the
    /// witness's status only).
    pub fn set_view(&mut self, role: Role, generation: u64) {
        self.role = role;
        self.generation = generation;
    }

    fn build(&mut self, now: u64, op: Op) -> [u8; REQUEST_LEN] {
        let counter = self.next_counter;
        self.next_counter += 1;
        if self.in_flight.len() == MAX_IN_FLIGHT {
            self.in_flight.pop_front();
        }
        self.in_flight.push_back((counter, now));
        self.counters.sent += 1;
        Request {
            cluster_id: self.cfg.cluster_id,
            node_id: self.cfg.node_id,
            op,
            role: self.role,
            generation: self.generation,
            epoch: self.cfg.epoch,
            counter,
        }
        .encode(&self.cfg.key)
    }

    /// A request to acquire or renew the lease, sent at `now`.
    pub fn request(&mut self, now: u64) -> [u8; REQUEST_LEN] {
        self.build(now, Op::Acquire)
    }

    /// A request to give the lease up; the node stops holding it at once.
    /// Requests sent before it are forgotten: the witness may still grant
    /// one of them before the release arrives, but it ends that lease when
    /// the release does, so its reply must not count.
    pub fn release(&mut self, now: u64) -> [u8; REQUEST_LEN] {
        self.valid_until = None;
        self.in_flight.clear();
        self.build(now, Op::Release)
    }

    /// Take a datagram from the witness, received at `now`.
    pub fn on_reply(&mut self, now: u64, bytes: &[u8]) -> Outcome {
        let _ = now;
        let o = self.judge(bytes);
        if let Outcome::Ignored(i) = o {
            match i {
                Ignored::Malformed(_) => self.counters.malformed += 1,
                Ignored::BadTag => self.counters.bad_tag += 1,
                Ignored::NotForUs => self.counters.not_for_us += 1,
                Ignored::Stale { .. } => self.counters.stale += 1,
            }
        }
        o
    }

    fn judge(&mut self, bytes: &[u8]) -> Outcome {
        let r = match Reply::decode(bytes, &self.cfg.key) {
            Ok(r) => r,
            Err(ProtoError::BadTag) => return Outcome::Ignored(Ignored::BadTag),
            Err(e) => return Outcome::Ignored(Ignored::Malformed(e)),
        };
        if r.cluster_id != self.cfg.cluster_id
            || r.node_id != self.cfg.node_id
            || r.epoch != self.cfg.epoch
        {
            return Outcome::Ignored(Ignored::NotForUs);
        }
        let sent_at = match self.in_flight.iter().find(|&&(c, _)| c == r.counter) {
            Some(&(_, t)) if r.counter > self.newest_answered => t,
            _ => return Outcome::Ignored(Ignored::Stale { counter: r.counter }),
        };
        self.newest_answered = r.counter;
        self.in_flight.retain(|&(c, _)| c > r.counter);
        if self.witness_epoch.is_some_and(|e| e != r.witness_epoch) {
            self.counters.witness_restarts += 1;
        }
        self.witness_epoch = Some(r.witness_epoch);
        self.last_reply = Some(r);
        if r.granted() {
            let valid_until = (sent_at + u64::from(r.lease_us)).saturating_sub(self.cfg.margin_us);
            self.valid_until = Some(valid_until);
            self.counters.granted += 1;
            Outcome::Granted { valid_until }
        } else {
            self.valid_until = None;
            self.counters.refused += 1;
            Outcome::Refused {
                verdict: r.verdict,
                holder: r.holder,
                wait_us: r.wait_us,
            }
        }
    }

    /// True while the node holds the lease at `now` (its own clock).
    pub fn holds(&self, now: u64) -> bool {
        self.valid_until.is_some_and(|v| now < v)
    }

    /// End of the lease held, if any (it may already be past).
    pub fn valid_until(&self) -> Option<u64> {
        self.valid_until
    }

    /// The node found it did not run for a while: drop the lease and
    /// forget every request in flight, so only a request sent after the
    /// stall can win a new one.
    pub fn on_stall(&mut self) {
        self.valid_until = None;
        self.in_flight.clear();
        self.counters.stalls += 1;
    }

    /// The last reply taken (not ignored).
    pub fn last_reply(&self) -> Option<Reply> {
        self.last_reply
    }

    /// Event counts.
    pub fn counters(&self) -> ClientCounters {
        self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::witness::{Settings, Witness};
    use msl_wire::Domain;

    const LEASE: u32 = 800_000;
    const MARGIN: u64 = 10_000;

    fn key() -> Key {
        Key::derive(&[3; 32], Domain::Witness)
    }

    fn client(node: u16, epoch: u64) -> LeaseClient {
        LeaseClient::new(ClientConfig {
            cluster_id: 7,
            node_id: node,
            epoch,
            key: key(),
            margin_us: MARGIN,
        })
    }

    fn witness() -> Witness {
        let mut w = Witness::new(
            Settings {
                lease_us: LEASE,
                startup_us: 0,
                witness_epoch: 1,
            },
            0,
        );
        w.add_cluster(7, key());
        w
    }

    /// The lease runs from the send time, not from the reply's arrival.
    #[test]
    fn test_lease_measured_from_send_time() {
        let mut w = witness();
        let mut a = client(1, 5);
        let q = a.request(1_000);
        let ans = w.handle(300_000, &q).unwrap();
        let o = a.on_reply(600_000, &ans.bytes);
        let until = 1_000 + u64::from(LEASE) - MARGIN;
        assert_eq!(o, Outcome::Granted { valid_until: until });
        assert!(a.holds(600_000));
        assert!(a.holds(until - 1));
        assert!(!a.holds(until));
        // The witness's lease ends later than the node's.
        assert!(w.holder(7, 300_000).unwrap().1 > until);
    }

    #[test]
    fn test_duplicate_and_older_replies_ignored() {
        let mut w = witness();
        let mut a = client(1, 5);
        let q1 = a.request(0);
        let q2 = a.request(100_000);
        let r1 = w.handle(1, &q1).unwrap().bytes;
        let r2 = w.handle(100_001, &q2).unwrap().bytes;
        assert!(matches!(a.on_reply(100_002, &r2), Outcome::Granted { .. }));
        // r1 answers an older request: it must not move the lease back or on.
        assert_eq!(
            a.on_reply(100_003, &r1),
            Outcome::Ignored(Ignored::Stale { counter: 1 })
        );
        assert_eq!(
            a.on_reply(100_004, &r2),
            Outcome::Ignored(Ignored::Stale { counter: 2 })
        );
        assert_eq!(a.valid_until(), Some(100_000 + u64::from(LEASE) - MARGIN));
        assert_eq!(a.counters().stale, 2);
    }

    #[test]
    fn test_reply_for_other_node_or_epoch_ignored() {
        let mut w = witness();
        let mut a = client(1, 5);
        let mut a_old = client(1, 4);
        let mut b = client(2, 5);
        a.request(0);
        let qb = b.request(0);
        let rb = w.handle(1, &qb).unwrap().bytes;
        assert_eq!(a.on_reply(2, &rb), Outcome::Ignored(Ignored::NotForUs));
        // A reply to the node's previous run (older epoch, same counter).
        let q_old = a_old.request(0);
        let r_old = w.handle(2, &q_old).unwrap().bytes;
        assert_eq!(a.on_reply(3, &r_old), Outcome::Ignored(Ignored::NotForUs));
        assert!(!a.holds(3));
        let mut forged = rb;
        forged[30] ^= 1;
        assert_eq!(b.on_reply(4, &forged), Outcome::Ignored(Ignored::BadTag));
        assert_eq!(
            b.on_reply(4, &forged[..10]),
            Outcome::Ignored(Ignored::Malformed(ProtoError::Length { got: 10, want: 72 }))
        );
        let c = a.counters();
        assert_eq!((c.not_for_us, c.granted), (2, 0));
    }

    #[test]
    fn test_refusal_drops_the_lease() {
        let mut w = witness();
        let mut a = client(1, 5);
        let mut b = client(2, 6);
        let r = w.handle(0, &a.request(0)).unwrap().bytes;
        assert!(matches!(a.on_reply(0, &r), Outcome::Granted { .. }));
        let r = w.handle(10, &b.request(10)).unwrap().bytes;
        assert_eq!(
            b.on_reply(10, &r),
            Outcome::Refused {
                verdict: Verdict::Held,
                holder: Some(1),
                wait_us: LEASE - 10
            }
        );
        // A's release: it holds nothing at once, and B can then win.
        let rel = a.release(20);
        assert!(!a.holds(20));
        let r = w.handle(21, &rel).unwrap().bytes;
        assert!(matches!(
            a.on_reply(21, &r),
            Outcome::Refused {
                verdict: Verdict::Released,
                ..
            }
        ));
        let r = w.handle(30, &b.request(30)).unwrap().bytes;
        assert!(matches!(b.on_reply(30, &r), Outcome::Granted { .. }));
    }

    /// After a stall the lease is gone, and a reply to a request sent
    /// before the stall does not bring it back.
    #[test]
    fn test_stall_drops_lease_and_requests_in_flight() {
        let mut w = witness();
        let mut a = client(1, 5);
        let r = w.handle(0, &a.request(0)).unwrap().bytes;
        a.on_reply(0, &r);
        let before = a.request(100_000);
        a.on_stall();
        assert!(!a.holds(100_001));
        let r = w.handle(200_000, &before).unwrap().bytes;
        assert_eq!(
            a.on_reply(200_001, &r),
            Outcome::Ignored(Ignored::Stale { counter: 2 })
        );
        assert!(!a.holds(200_001));
        let r = w.handle(300_001, &a.request(300_000)).unwrap().bytes;
        assert!(matches!(a.on_reply(300_002, &r), Outcome::Granted { .. }));
        assert!(a.holds(300_002));
        assert_eq!(a.counters().stalls, 1);
    }

    /// An acquire sent before a release, granted by the witness before
    /// the release reached it, must not give the lease back: the witness
    /// ended that lease when the release arrived, and may have granted the
    /// other node since.
    #[test]
    fn test_grant_of_a_request_sent_before_a_release_ignored() {
        let mut w = witness();
        let mut a = client(1, 5);
        let mut b = client(2, 6);
        let acquire = a.request(0);
        let release = a.release(10);
        let granted = w.handle(20, &acquire).unwrap().bytes;
        w.handle(30, &release).unwrap();
        let r = w.handle(40, &b.request(40)).unwrap().bytes;
        assert!(matches!(b.on_reply(40, &r), Outcome::Granted { .. }));
        assert_eq!(
            a.on_reply(50, &granted),
            Outcome::Ignored(Ignored::Stale { counter: 1 })
        );
        assert!(!a.holds(50) && b.holds(50));
    }

    #[test]
    fn test_witness_restart_counted() {
        let mut w = witness();
        let mut a = client(1, 5);
        let r = w.handle(0, &a.request(0)).unwrap().bytes;
        a.on_reply(0, &r);
        let mut w2 = Witness::new(
            Settings {
                lease_us: LEASE,
                startup_us: u64::from(LEASE),
                witness_epoch: 2,
            },
            1_000,
        );
        w2.add_cluster(7, key());
        let r = w2.handle(2_000, &a.request(2_000)).unwrap().bytes;
        assert!(matches!(
            a.on_reply(2_000, &r),
            Outcome::Refused {
                verdict: Verdict::Startup,
                ..
            }
        ));
        assert_eq!(a.counters().witness_restarts, 1);
    }

    #[test]
    fn test_only_the_last_requests_in_flight_count() {
        let mut w = witness();
        let mut a = client(1, 5);
        let first = a.request(0);
        for t in 1..=MAX_IN_FLIGHT as u64 {
            a.request(t);
        }
        let r = w.handle(100, &first).unwrap().bytes;
        assert_eq!(
            a.on_reply(100, &r),
            Outcome::Ignored(Ignored::Stale { counter: 1 })
        );
    }
}
