//! The witness's state machine: who holds each cluster's lease, and until
//! when. No I/O and no clock: the caller passes the time (microseconds on
//! one monotonic clock) with every packet.
//!
//! Rules, per cluster:
//! * at most one node holds a live lease; a request from the holder
//!   renews it (`expires = now + lease_us`), a request from any other node
//!   is granted only once no lease is live;
//! * the lease runs from when the witness *received* the request, so it
//!   ends no later than the node's own view of it (which runs from when
//!   the node *sent* the request);
//! * per (cluster, node) the newest `(epoch, counter)` is kept and only a
//!   strictly newer one is answered: replayed, duplicated or reordered
//!   requests are dropped without a reply;
//! * a witness that started less than `startup_us` ago grants nothing: it
//!   may have granted a lease before it restarted and remembers no lease,
//!   so it waits out the longest lease it could have granted;
//! * the generation the last holder reported outlives a restart when the
//!   caller keeps [`Witness::memory`] durably (written before a reply that
//!   changed it is sent) and hands it back with [`Witness::restore`]:
//!   without it, a restarted witness could grant the lease to a node that
//!   lacks writes the holder acknowledged alone;
//! * packets that fail to parse or verify are dropped and counted, never
//!   answered (a forged packet gets no reply to reflect).

use std::collections::BTreeMap;

use msl_wire::{Key, Role};
use serde::Serialize;

use crate::proto::{self, Op, ProtoError, Reply, Request, Verdict, REPLY_LEN};

/// Nodes a cluster may have in the witness's table (a pair needs two; a
/// few more allow renumbering a node without restarting the witness).
/// Bounds memory against a key holder inventing node ids.
pub const MAX_NODES: usize = 8;

/// Witness-wide settings.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Lease granted per request.
    pub lease_us: u32,
    /// Nothing is granted until this long after the start (at least the
    /// longest lease a previous run of this witness may have granted).
    pub startup_us: u64,
    /// Random per start, echoed in every reply.
    pub witness_epoch: u64,
}

/// Event counts (per cluster, and witness-wide totals).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    /// Leases granted to a node that did not hold one.
    pub granted: u64,
    /// Leases renewed by their holder.
    pub renewed: u64,
    /// Requests refused because another node holds a live lease.
    pub refused_held: u64,
    /// Requests refused because the node's generation is not the last
    /// holder's (it may lack writes the holder acknowledged alone).
    pub refused_behind: u64,
    /// Requests refused inside the start-up window.
    pub refused_startup: u64,
    /// Release requests answered.
    pub released: u64,
    /// Requests dropped as not newer than the last from that node.
    pub replayed: u64,
    /// Requests whose tag did not verify.
    pub bad_tag: u64,
    /// Bytes that are not a request (length, magic, version, kind, fields).
    pub malformed: u64,
    /// Requests naming a cluster this witness does not serve.
    pub unknown_cluster: u64,
    /// Requests from a node beyond `MAX_NODES` in its cluster.
    pub too_many_nodes: u64,
}

/// What the witness knows of one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeView {
    /// Newest `(epoch, counter)` accepted.
    pub newest: (u64, u64),
    /// When that request arrived.
    pub last_request_us: u64,
    /// Role the node reported.
    pub role: Role,
    /// Generation the node reported.
    pub generation: u64,
}

struct Cluster {
    key: Key,
    /// `(node, expires_us)` of the last grant; live while `now < expires`.
    lease: Option<(u16, u64)>,
    /// `(node, generation)` the last holder reported with its last granted
    /// request: another node is granted only at that generation (it has
    /// every write the holder may have acknowledged alone). Cleared when
    /// the holder releases; unknown after a restart.
    holder_gen: Option<(u16, u64)>,
    nodes: BTreeMap<u16, NodeView>,
    counters: Counters,
}

impl Cluster {
    fn live_holder(&self, now: u64) -> Option<(u16, u64)> {
        self.lease.filter(|&(_, exp)| now < exp)
    }
}

/// Why a packet got no reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    /// Not a well-formed request (see the error).
    Malformed(ProtoError),
    /// The tag did not verify under the named cluster's key.
    BadTag {
        /// The cluster the packet claimed.
        cluster_id: u64,
    },
    /// No such cluster here.
    UnknownCluster(u64),
    /// Not newer than the newest request from that node.
    Replayed {
        /// Sender.
        node_id: u16,
        /// The packet's stamp.
        stamp: (u64, u64),
        /// The newest stamp already accepted.
        newest: (u64, u64),
    },
    /// The cluster already has `MAX_NODES` nodes.
    TooManyNodes(u16),
}

/// A request answered: the reply and its bytes.
#[derive(Clone, Copy, Debug)]
pub struct Answer {
    /// The decoded reply.
    pub reply: Reply,
    /// Its bytes, tagged under the cluster's key.
    pub bytes: [u8; REPLY_LEN],
}

/// The witness.
pub struct Witness {
    settings: Settings,
    start_us: u64,
    clusters: BTreeMap<u64, Cluster>,
    totals: Counters,
    /// Bumped whenever [`Witness::memory`] changes.
    memory_changes: u64,
}

/// What a witness must remember across a restart, per cluster: the node
/// that last held the lease and the generation it reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Remembered {
    /// The cluster.
    pub cluster_id: u64,
    /// The last holder.
    pub node_id: u16,
    /// The generation it reported with its last granted request.
    pub generation: u64,
}

fn clamp_u32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

impl Witness {
    /// A witness started at `start_us` with no memory of earlier runs.
    pub fn new(settings: Settings, start_us: u64) -> Witness {
        Witness {
            settings,
            start_us,
            clusters: BTreeMap::new(),
            totals: Counters::default(),
            memory_changes: 0,
        }
    }

    /// Per cluster, the last holder and its generation: to be kept
    /// durably whenever [`Witness::memory_changes`] moves, before the
    /// reply that moved it is sent.
    pub fn memory(&self) -> Vec<Remembered> {
        self.clusters
            .iter()
            .filter_map(|(&cluster_id, c)| {
                c.holder_gen.map(|(node_id, generation)| Remembered {
                    cluster_id,
                    node_id,
                    generation,
                })
            })
            .collect()
    }

    /// How many times [`Witness::memory`] changed.
    pub fn memory_changes(&self) -> u64 {
        self.memory_changes
    }

    /// Take back what an earlier run remembered (after `add_cluster`);
    /// entries of clusters not served are ignored. Returns how many were
    /// taken.
    pub fn restore(&mut self, memory: &[Remembered]) -> usize {
        let mut n = 0;
        for m in memory {
            if let Some(c) = self.clusters.get_mut(&m.cluster_id) {
                c.holder_gen = Some((m.node_id, m.generation));
                n += 1;
            }
        }
        n
    }

    /// Serve `cluster_id` with its witness key (replaces any earlier key).
    pub fn add_cluster(&mut self, cluster_id: u64, key: Key) {
        self.clusters.insert(
            cluster_id,
            Cluster {
                key,
                lease: None,
                holder_gen: None,
                nodes: BTreeMap::new(),
                counters: Counters::default(),
            },
        );
    }

    /// Settings in force.
    pub fn settings(&self) -> Settings {
        self.settings
    }

    /// Witness-wide counters.
    pub fn counters(&self) -> Counters {
        self.totals
    }

    /// One cluster's counters.
    pub fn cluster_counters(&self, cluster_id: u64) -> Option<Counters> {
        self.clusters.get(&cluster_id).map(|c| c.counters)
    }

    /// The live holder of a cluster's lease and when it expires.
    pub fn holder(&self, cluster_id: u64, now_us: u64) -> Option<(u16, u64)> {
        self.clusters.get(&cluster_id)?.live_holder(now_us)
    }

    /// Handle one datagram received at `now_us`: the reply to send back,
    /// or why none is sent.
    pub fn handle(&mut self, now_us: u64, bytes: &[u8]) -> Result<Answer, Dropped> {
        let r = self.handle_inner(now_us, bytes);
        if let Err(d) = &r {
            self.count_drop(*d);
        }
        r
    }

    fn count_drop(&mut self, d: Dropped) {
        let (cluster, bump): (Option<u64>, fn(&mut Counters)) = match d {
            Dropped::Malformed(_) => (None, |c| c.malformed += 1),
            Dropped::BadTag { cluster_id } => (Some(cluster_id), |c| c.bad_tag += 1),
            Dropped::UnknownCluster(_) => (None, |c| c.unknown_cluster += 1),
            Dropped::Replayed { .. } => (None, |c| c.replayed += 1),
            Dropped::TooManyNodes(_) => (None, |c| c.too_many_nodes += 1),
        };
        bump(&mut self.totals);
        if let Some(c) = cluster.and_then(|id| self.clusters.get_mut(&id)) {
            bump(&mut c.counters);
        }
    }

    fn handle_inner(&mut self, now: u64, bytes: &[u8]) -> Result<Answer, Dropped> {
        let cluster_id = proto::request_cluster(bytes).map_err(Dropped::Malformed)?;
        let startup_end = self.start_us.saturating_add(self.settings.startup_us);
        let s = self.settings;
        let c = self
            .clusters
            .get_mut(&cluster_id)
            .ok_or(Dropped::UnknownCluster(cluster_id))?;
        let req = match Request::decode(bytes, &c.key) {
            Ok(r) => r,
            Err(ProtoError::BadTag) => return Err(Dropped::BadTag { cluster_id }),
            Err(e) => return Err(Dropped::Malformed(e)),
        };
        let stamp = (req.epoch, req.counter);
        match c.nodes.get(&req.node_id) {
            Some(v) if stamp <= v.newest => {
                c.counters.replayed += 1;
                return Err(Dropped::Replayed {
                    node_id: req.node_id,
                    stamp,
                    newest: v.newest,
                });
            }
            None if c.nodes.len() >= MAX_NODES => return Err(Dropped::TooManyNodes(req.node_id)),
            _ => {}
        }
        c.nodes.insert(
            req.node_id,
            NodeView {
                newest: stamp,
                last_request_us: now,
                role: req.role,
                generation: req.generation,
            },
        );

        let live = c.live_holder(now);
        let (verdict, wait_us) = match req.op {
            Op::Release => {
                if live.map(|(n, _)| n) == Some(req.node_id) {
                    c.lease = None;
                }
                // A node that gives the lease up hands over (a switchover,
                // a demotion): its generation no longer bars the other.
                if c.holder_gen.is_some_and(|(n, _)| n == req.node_id) {
                    c.holder_gen = None;
                    self.memory_changes += 1;
                }
                (Verdict::Released, 0)
            }
            Op::Acquire if now < startup_end => (Verdict::Startup, startup_end - now),
            Op::Acquire => match (live, c.holder_gen) {
                (Some((n, exp)), _) if n != req.node_id => (Verdict::Held, exp - now),
                (_, Some((n, g))) if n != req.node_id && g != req.generation => {
                    (Verdict::Behind, 0)
                }
                _ => {
                    c.lease = Some((req.node_id, now + u64::from(s.lease_us)));
                    let held = Some((req.node_id, req.generation));
                    if c.holder_gen != held {
                        c.holder_gen = held;
                        self.memory_changes += 1;
                    }
                    (Verdict::Granted, 0)
                }
            },
        };
        let bump: fn(&mut Counters) = match (verdict, live) {
            (Verdict::Released, _) => |x| x.released += 1,
            (Verdict::Startup, _) => |x| x.refused_startup += 1,
            (Verdict::Held, _) => |x| x.refused_held += 1,
            (Verdict::Behind, _) => |x| x.refused_behind += 1,
            (Verdict::Granted, Some((n, _))) if n == req.node_id => |x| x.renewed += 1,
            (Verdict::Granted, _) => |x| x.granted += 1,
        };
        bump(&mut c.counters);
        bump(&mut self.totals);

        let reply = Reply {
            cluster_id,
            node_id: req.node_id,
            verdict,
            holder: c.live_holder(now).map(|(n, _)| n),
            lease_us: if verdict == Verdict::Granted {
                s.lease_us
            } else {
                0
            },
            wait_us: clamp_u32(wait_us),
            epoch: req.epoch,
            counter: req.counter,
            witness_epoch: s.witness_epoch,
        };
        Ok(Answer {
            reply,
            bytes: reply.encode(&c.key),
        })
    }

    /// A snapshot for the status file.
    pub fn status(&self, now_us: u64) -> Status {
        let startup_end = self.start_us.saturating_add(self.settings.startup_us);
        Status {
            witness_epoch: self.settings.witness_epoch,
            lease_ms: u64::from(self.settings.lease_us) / 1000,
            uptime_ms: now_us.saturating_sub(self.start_us) / 1000,
            startup_remaining_ms: startup_end.saturating_sub(now_us) / 1000,
            counters: self.totals,
            clusters: self
                .clusters
                .iter()
                .map(|(&id, c)| {
                    let live = c.live_holder(now_us);
                    ClusterStatus {
                        id,
                        holder: live.map(|(n, _)| n),
                        lease_remaining_ms: live.map(|(_, exp)| (exp - now_us) / 1000),
                        nodes: c
                            .nodes
                            .iter()
                            .map(|(&node_id, v)| NodeStatus {
                                node_id,
                                last_request_ms_ago: now_us.saturating_sub(v.last_request_us)
                                    / 1000,
                                epoch: v.newest.0,
                                counter: v.newest.1,
                                role: role_name(v.role),
                                generation: v.generation,
                            })
                            .collect(),
                        counters: c.counters,
                    }
                })
                .collect(),
        }
    }
}

fn role_name(r: Role) -> String {
    match r {
        Role::Primary => "primary".into(),
        Role::Secondary => "secondary".into(),
        Role::Unknown(n) => format!("unknown({n})"),
    }
}

/// The witness's state as written to the status file.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    /// Random per start.
    pub witness_epoch: u64,
    /// Lease granted per request.
    pub lease_ms: u64,
    /// Time since start.
    pub uptime_ms: u64,
    /// Time until the start-up window ends (0 once it has).
    pub startup_remaining_ms: u64,
    /// Witness-wide counters.
    pub counters: Counters,
    /// Per cluster.
    pub clusters: Vec<ClusterStatus>,
}

/// One cluster in the status file.
#[derive(Clone, Debug, Serialize)]
pub struct ClusterStatus {
    /// Cluster id.
    pub id: u64,
    /// Live lease holder, if any.
    pub holder: Option<u16>,
    /// Time left on the live lease.
    pub lease_remaining_ms: Option<u64>,
    /// Nodes heard from since the start.
    pub nodes: Vec<NodeStatus>,
    /// This cluster's counters.
    pub counters: Counters,
}

/// One node in the status file.
#[derive(Clone, Debug, Serialize)]
pub struct NodeStatus {
    /// Node id.
    pub node_id: u16,
    /// Time since its last accepted request.
    pub last_request_ms_ago: u64,
    /// Its start epoch.
    pub epoch: u64,
    /// Its last counter.
    pub counter: u64,
    /// Role it reported.
    pub role: String,
    /// Generation it reported.
    pub generation: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use msl_wire::Domain;

    const LEASE: u32 = 800_000;
    const START: u64 = 1_000_000;
    const READY: u64 = START + 800_000;

    fn key(n: u8) -> Key {
        Key::derive(&[n; 32], Domain::Witness)
    }

    fn witness() -> Witness {
        let mut w = Witness::new(
            Settings {
                lease_us: LEASE,
                startup_us: u64::from(LEASE),
                witness_epoch: 42,
            },
            START,
        );
        w.add_cluster(7, key(1));
        w.add_cluster(8, key(2));
        w
    }

    fn req(cluster: u64, node: u16, epoch: u64, counter: u64, op: Op) -> Request {
        Request {
            cluster_id: cluster,
            node_id: node,
            op,
            role: Role::Secondary,
            generation: 5,
            epoch,
            counter,
        }
    }

    fn send(w: &mut Witness, now: u64, r: Request, k: &Key) -> Result<Reply, Dropped> {
        w.handle(now, &r.encode(k)).map(|a| {
            assert_eq!(Reply::decode(&a.bytes, k), Ok(a.reply), "bytes match reply");
            a.reply
        })
    }

    /// A holder that reported a generation the other node does not have
    /// (it went on alone) bars that node from the lease after it expires,
    /// until the other is at that generation or the holder releases.
    #[test]
    fn test_behind_the_holders_generation_refused_until_caught_up_or_released() {
        let mut w = witness();
        let k = key(1);
        let at = |node, epoch, counter, generation| Request {
            generation,
            ..req(7, node, epoch, counter, Op::Acquire)
        };
        // Node 1 holds at generation 5, then renews alone at 9.
        assert!(send(&mut w, READY, at(1, 10, 1, 5), &k).unwrap().granted());
        assert!(send(&mut w, READY + 100, at(1, 10, 2, 9), &k)
            .unwrap()
            .granted());
        let exp = READY + 100 + u64::from(LEASE);
        // Expired: node 2 at generation 5 lacks what node 1 did alone.
        let b = send(&mut w, exp, at(2, 20, 1, 5), &k).unwrap();
        assert_eq!((b.verdict, b.holder, b.wait_us), (Verdict::Behind, None, 0));
        assert_eq!(w.cluster_counters(7).unwrap().refused_behind, 1);
        // At node 1's generation (it resynced from it): granted.
        let b = send(&mut w, exp + 1, at(2, 20, 2, 9), &k).unwrap();
        assert_eq!((b.verdict, b.holder), (Verdict::Granted, Some(2)));
        // Node 2 now holds at 9, goes on at 11 and releases: node 1, at
        // 9, may take the lease again (a handover).
        assert!(send(&mut w, exp + 2, at(2, 20, 3, 11), &k)
            .unwrap()
            .granted());
        let rel = Request {
            generation: 11,
            ..req(7, 2, 20, 4, Op::Release)
        };
        assert_eq!(
            send(&mut w, exp + 3, rel, &k).unwrap().verdict,
            Verdict::Released
        );
        assert!(send(&mut w, exp + 4, at(1, 10, 3, 9), &k)
            .unwrap()
            .granted());
    }

    /// What a restarted witness is handed back bars the node that is
    /// behind exactly as before the restart; renewals at the same
    /// generation do not change what must be kept.
    #[test]
    fn test_holders_generation_outlives_a_restart_through_its_memory() {
        let mut w = witness();
        let k = key(1);
        let at = |node, counter, generation| Request {
            generation,
            ..req(7, node, 10 + u64::from(node), counter, Op::Acquire)
        };
        assert!(w.memory().is_empty());
        assert!(send(&mut w, READY, at(1, 1, 5), &k).unwrap().granted());
        assert_eq!(w.memory_changes(), 1);
        assert!(send(&mut w, READY + 1, at(1, 2, 5), &k).unwrap().granted());
        assert_eq!(w.memory_changes(), 1, "a renewal changes nothing to keep");
        assert!(send(&mut w, READY + 2, at(1, 3, 9), &k).unwrap().granted());
        assert_eq!(w.memory_changes(), 2);
        let kept = w.memory();
        assert_eq!(
            kept,
            [Remembered {
                cluster_id: 7,
                node_id: 1,
                generation: 9
            }]
        );
        // Restarted: past its start-up window node 2, at 5, is behind.
        let mut w2 = witness();
        assert_eq!(w2.restore(&kept), 1);
        let b = send(&mut w2, READY, at(2, 1, 5), &k).unwrap();
        assert_eq!(b.verdict, Verdict::Behind);
        // Without the memory it would have been granted.
        let mut w3 = witness();
        assert!(send(&mut w3, READY, at(2, 1, 5), &k).unwrap().granted());
        // A release is kept too: then node 2 may take it.
        let rel = Request {
            generation: 9,
            ..req(7, 1, 11, 4, Op::Release)
        };
        send(&mut w2, READY + 1, rel, &k).unwrap();
        assert!(w2.memory().is_empty());
        assert!(send(&mut w2, READY + 2, at(2, 2, 5), &k).unwrap().granted());
        // Entries of clusters not served are ignored.
        assert_eq!(
            witness().restore(&[Remembered {
                cluster_id: 99,
                node_id: 1,
                generation: 1
            }]),
            0
        );
    }

    #[test]
    fn test_grant_renew_refuse_expire_then_grant_other() {
        let mut w = witness();
        let k = key(1);
        let a = send(&mut w, READY, req(7, 1, 10, 1, Op::Acquire), &k).unwrap();
        assert_eq!(
            (a.verdict, a.holder, a.lease_us),
            (Verdict::Granted, Some(1), LEASE)
        );
        assert_eq!((a.epoch, a.counter, a.witness_epoch), (10, 1, 42));
        // Renewal moves the expiry to now + lease.
        let r = send(&mut w, READY + 500_000, req(7, 1, 10, 2, Op::Acquire), &k).unwrap();
        assert!(r.granted());
        assert_eq!(
            w.holder(7, READY + 500_000),
            Some((1, READY + 500_000 + u64::from(LEASE)))
        );
        // The other node is refused while the lease is live, told how long.
        let b = send(&mut w, READY + 600_000, req(7, 2, 20, 1, Op::Acquire), &k).unwrap();
        assert_eq!(
            (b.verdict, b.holder, b.lease_us),
            (Verdict::Held, Some(1), 0)
        );
        assert_eq!(b.wait_us, 700_000);
        // One microsecond before expiry: still refused; at expiry: granted.
        let exp = READY + 500_000 + u64::from(LEASE);
        let b = send(&mut w, exp - 1, req(7, 2, 20, 2, Op::Acquire), &k).unwrap();
        assert_eq!((b.verdict, b.wait_us), (Verdict::Held, 1));
        let b = send(&mut w, exp, req(7, 2, 20, 3, Op::Acquire), &k).unwrap();
        assert_eq!((b.verdict, b.holder), (Verdict::Granted, Some(2)));
        let c = w.cluster_counters(7).unwrap();
        assert_eq!((c.granted, c.renewed, c.refused_held), (2, 1, 2));
        assert_eq!(w.counters(), c, "totals match the only busy cluster");
    }

    #[test]
    fn test_replays_dropped_per_node_lexicographic() {
        let mut w = witness();
        let k = key(1);
        assert!(send(&mut w, READY, req(7, 1, 10, 5, Op::Acquire), &k).is_ok());
        for (e, c) in [(10, 5), (10, 4), (9, 100)] {
            let d = send(&mut w, READY + 1, req(7, 1, e, c, Op::Acquire), &k).unwrap_err();
            assert_eq!(
                d,
                Dropped::Replayed {
                    node_id: 1,
                    stamp: (e, c),
                    newest: (10, 5)
                }
            );
        }
        // A newer epoch (the node restarted) starts over at any counter.
        assert!(send(&mut w, READY + 2, req(7, 1, 11, 1, Op::Acquire), &k).is_ok());
        // The other node's stamps are separate.
        assert!(send(&mut w, READY + 3, req(7, 2, 1, 1, Op::Acquire), &k).is_ok());
        assert_eq!(w.counters().replayed, 3);
        // The exact same bytes twice: the second is dropped.
        let bytes = req(7, 2, 1, 2, Op::Acquire).encode(&k);
        assert!(w.handle(READY + 4, &bytes).is_ok());
        assert!(matches!(
            w.handle(READY + 5, &bytes),
            Err(Dropped::Replayed { .. })
        ));
    }

    #[test]
    fn test_startup_window_grants_nothing() {
        let mut w = witness();
        let k = key(1);
        let r = send(&mut w, START + 100_000, req(7, 1, 1, 1, Op::Acquire), &k).unwrap();
        assert_eq!(
            (r.verdict, r.holder, r.wait_us),
            (Verdict::Startup, None, 700_000)
        );
        let r = send(&mut w, READY - 1, req(7, 1, 1, 2, Op::Acquire), &k).unwrap();
        assert_eq!(r.verdict, Verdict::Startup);
        assert_eq!(w.holder(7, READY - 1), None);
        let r = send(&mut w, READY, req(7, 1, 1, 3, Op::Acquire), &k).unwrap();
        assert_eq!(r.verdict, Verdict::Granted);
        assert_eq!(w.counters().refused_startup, 2);
    }

    #[test]
    fn test_release_ends_the_lease_for_the_other_node() {
        let mut w = witness();
        let k = key(1);
        assert!(send(&mut w, READY, req(7, 1, 1, 1, Op::Acquire), &k)
            .unwrap()
            .granted());
        // A release from the non-holder changes nothing.
        let r = send(&mut w, READY + 1, req(7, 2, 1, 1, Op::Release), &k).unwrap();
        assert_eq!((r.verdict, r.holder), (Verdict::Released, Some(1)));
        let r = send(&mut w, READY + 2, req(7, 1, 1, 2, Op::Release), &k).unwrap();
        assert_eq!((r.verdict, r.holder), (Verdict::Released, None));
        assert!(send(&mut w, READY + 3, req(7, 2, 1, 2, Op::Acquire), &k)
            .unwrap()
            .granted());
        assert_eq!(w.counters().released, 2);
    }

    #[test]
    fn test_clusters_are_independent_and_keyed_separately() {
        let mut w = witness();
        assert!(send(&mut w, READY, req(7, 1, 1, 1, Op::Acquire), &key(1))
            .unwrap()
            .granted());
        assert!(send(&mut w, READY, req(8, 2, 1, 1, Op::Acquire), &key(2))
            .unwrap()
            .granted());
        // Cluster 8's packet under cluster 7's key: bad tag, counted on 8.
        let d = send(&mut w, READY, req(8, 1, 1, 2, Op::Acquire), &key(1)).unwrap_err();
        assert_eq!(d, Dropped::BadTag { cluster_id: 8 });
        assert_eq!(w.cluster_counters(8).unwrap().bad_tag, 1);
        assert_eq!(w.cluster_counters(7).unwrap().bad_tag, 0);
        let d = send(&mut w, READY, req(9, 1, 1, 1, Op::Acquire), &key(1)).unwrap_err();
        assert_eq!(d, Dropped::UnknownCluster(9));
        let d = w.handle(READY, b"hello").unwrap_err();
        assert!(matches!(d, Dropped::Malformed(ProtoError::Length { .. })));
        let t = w.counters();
        assert_eq!((t.bad_tag, t.unknown_cluster, t.malformed), (1, 1, 1));
    }

    #[test]
    fn test_node_table_is_bounded() {
        let mut w = witness();
        let k = key(1);
        for n in 0..MAX_NODES as u16 {
            assert!(send(&mut w, READY, req(7, n, 1, 1, Op::Acquire), &k).is_ok());
        }
        let d = send(&mut w, READY, req(7, 99, 1, 1, Op::Acquire), &k).unwrap_err();
        assert_eq!(d, Dropped::TooManyNodes(99));
        assert_eq!(w.counters().too_many_nodes, 1);
    }

    #[test]
    fn test_status_reports_holder_nodes_and_counters() {
        let mut w = witness();
        let k = key(1);
        let mut r = req(7, 1, 10, 3, Op::Acquire);
        r.role = Role::Primary;
        r.generation = 77;
        assert!(send(&mut w, READY, r, &k).unwrap().granted());
        let s = w.status(READY + 300_000);
        assert_eq!(s.witness_epoch, 42);
        assert_eq!(s.startup_remaining_ms, 0);
        let c = &s.clusters[0];
        assert_eq!(
            (c.id, c.holder, c.lease_remaining_ms),
            (7, Some(1), Some(500))
        );
        let n = &c.nodes[0];
        assert_eq!(
            (
                n.node_id,
                n.last_request_ms_ago,
                n.epoch,
                n.counter,
                n.role.as_str(),
                n.generation
            ),
            (1, 300, 10, 3, "primary", 77)
        );
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["clusters"][0]["counters"]["granted"], 1);
        assert_eq!(v["clusters"][1]["holder"], serde_json::Value::Null);
    }
}
