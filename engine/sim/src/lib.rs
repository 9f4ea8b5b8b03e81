//! Deterministic simulator for msl.
//!
//! Two nodes of the real protocol core (`msl_core::Node`), a client
//! workload and seeded faults run on virtual time. Every MSL frame and LAN
//! server-state packet goes through the real wire encoder and parser (with
//! the cluster key), so corruption is caught exactly where the daemon would
//! catch it. Disks have a volatile cache that a crash partly loses.
//!
//! Checked throughout: every read returns the last acknowledged write (or a
//! write whose outcome the client never learned); no two nodes acknowledge
//! client writes in the same generation; the service address is never held
//! twice; with a witness (`Options::witness`), no two nodes acknowledge
//! writes in overlapping time. Checked at the end, after all faults heal: one primary, one
//! in-sync secondary, empty dirty maps, byte-identical volumes.
//!
//! A quarter of the seeds (`runs_verify`) end with an online verify of a
//! mostly thin volume while the client writes, after one block was given
//! data behind one node's back: the run must report exactly that block,
//! and holes on both sides must have gone as zero ranges.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::fmt::Write as _;
use std::io::{BufWriter, Write as _};
use std::path::PathBuf;

use msl_core::config::NoQuorum;
use msl_core::meta::Meta;
use msl_core::node::{Action, ClientError, Event, IoKind, Node, Notice};
use msl_core::rng::Rng;
use msl_core::{Config, Micros};
use msl_wire::{self as wire, DiskState, Header, Message, Role};

pub mod scenario;
mod witness;

thread_local! {
    static RECORD_NEXT: RefCell<Option<PathBuf>> = const { RefCell::new(None) };
}

/// Write the full trace of the next simulator created on this thread to
/// `path`: every input fed to a node and every action it emits (Debug
/// form, with virtual time and node id), the simulator's own lines
/// (faults, restarts, safety violations) and the final node status. Two
/// builds that behave the same write byte-identical files, so `diff -r`
/// over a directory of traces shows any change of behaviour.
pub fn record_next_run(path: PathBuf) {
    RECORD_NEXT.with(|r| *r.borrow_mut() = Some(path));
}

/// Block payload in the simulator: one u64 tag per block.
type Buf = Vec<u8>;

fn tags(b: &[u8]) -> impl Iterator<Item = u64> + '_ {
    b.chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
}

fn buf_of(t: &[u64]) -> Buf {
    t.iter().flat_map(|v| v.to_le_bytes()).collect()
}

const CLUSTER: u64 = 0x6D73_6C2D_7369_6D00;
const SEC: u64 = 1_000_000;
const MS: u64 = 1_000;
/// A run that needs more events than this is livelocked (a normal seed
/// needs well under a million).
const EVENT_BUDGET: u64 = 20_000_000;

/// Link fault rates (per million) and delays.
#[derive(Clone, Copy, Debug)]
pub struct NetFaults {
    pub loss_ppm: u32,
    pub dup_ppm: u32,
    pub corrupt_ppm: u32,
    /// Extra random delay up to this (reorders frames).
    pub jitter_us: u64,
    pub latency_us: u64,
    /// Serialization time of one data frame (control frames skip the queue).
    pub data_frame_us: u64,
}

impl NetFaults {
    pub fn clean() -> Self {
        NetFaults {
            loss_ppm: 0,
            dup_ppm: 0,
            corrupt_ppm: 0,
            jitter_us: 0,
            latency_us: 50,
            data_frame_us: 2,
        }
    }
}

/// Simulation options.
#[derive(Clone, Debug)]
pub struct Options {
    pub seed: u64,
    pub volume_blocks: u64,
    pub msl: NetFaults,
    pub lan: NetFaults,
    pub client_qd: usize,
    /// Mean gap between client operations.
    pub client_think_us: u64,
    pub disk_latency_us: u64,
    pub trace: bool,
    /// Relax "no acknowledged write lost" to flushed writes only (double
    /// failures, where NBD semantics allow unflushed writes to be lost).
    pub relaxed_durability: bool,
    /// Activity-log slots per node (small by default, to exercise eviction).
    pub al_extents: usize,
    /// A witness on a third host grants the lease (see `witness.rs`).
    pub witness: bool,
    pub on_no_quorum: NoQuorum,
    /// The disk carries out each operation when it is issued, in order,
    /// and reports it done later (msld's disk thread runs its operations
    /// in order): a read sees every write issued before it and none
    /// after. Off: each operation takes effect when it completes, in any
    /// order.
    pub ordered_disk: bool,
    /// The client reads and writes only blocks below this (0: the whole
    /// volume); the blocks above stay holes unless a resync or a test
    /// writes them.
    pub client_blocks: u64,
    /// Extra time each node's flushes take (a disk whose cache is slower
    /// to flush than its peer's).
    pub flush_extra_us: [u64; 2],
}

impl Options {
    pub fn new(seed: u64) -> Self {
        Options {
            seed,
            volume_blocks: 64,
            msl: NetFaults::clean(),
            lan: NetFaults::clean(),
            client_qd: 4,
            client_think_us: 2 * MS,
            disk_latency_us: 200,
            trace: false,
            relaxed_durability: false,
            al_extents: 4,
            witness: false,
            on_no_quorum: NoQuorum::Suspend,
            ordered_disk: false,
            client_blocks: 0,
            flush_extra_us: [0; 2],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    NodeTick(usize, u32),
    Msl { to: usize, epoch: u32, frame: usize },
    Lan { to: usize, epoch: u32, frame: usize },
    DiskDone { node: usize, epoch: u32, io: u64 },
    ClientDeliver { node: usize, epoch: u32, op: u64 },
    ClientReply { op: u64, ok: bool, frame: usize },
    ClientTick,
    Restart { node: usize },
    Thaw { node: usize, epoch: u32 },
    Attack,
    LeaseTick { node: usize, epoch: u32 },
    WitnessRx { from: usize, frame: usize },
    WitnessReply { to: usize, epoch: u32, frame: usize },
}

/// What the attacker injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttackMode {
    /// Anything: earlier frames and packets replayed as they were, on
    /// their own path or on the other one (MSL bytes into the LAN and the
    /// reverse), and forgeries (a real frame with one byte flipped, or
    /// random bytes), to either node.
    Mixed,
    /// Only node `n`'s earlier frames and packets, replayed unchanged to
    /// its peer on the path they were sent on.
    ReplayFrom(usize),
    /// Only frames and packets replayed on the other path.
    CrossDomain,
}

/// An attacker on both wires, without the keys: it records what it sees
/// and injects it back later.
struct Attacker {
    /// Injecting (else only recording).
    active: bool,
    mode: AttackMode,
    /// Mean gap between two injections.
    every_us: Micros,
    rng: Rng,
    /// Recorded frames: (sender, sent on the LAN, bytes).
    seen: Vec<(usize, bool, Vec<u8>)>,
}

/// The most frames the attacker keeps (a random sample of all it saw).
const ATTACKER_MEMORY: usize = 4096;

/// Frames (and, apart, LAN packets) a frozen node's host keeps for it; the
/// rest of what arrives meanwhile is lost, as in a full receive ring.
const RX_QUEUE_FRAMES: usize = 64;

/// What an injected frame is, for the check on arrival.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Injected {
    /// Authentic, on the path it was sent on: parses; the core must drop it
    /// as not fresh (or, for session frames, as a duplicate).
    Replay,
    /// Authentic but on the other path: must fail authentication.
    CrossDomain,
    /// Made up without the key: must be rejected by the parser.
    Forged,
}

/// An input that reached a frozen node, fed to it when it thaws.
#[derive(Clone, Debug)]
enum Held {
    /// Its host received it (frame, packet, disk completion, link change);
    /// frames carry their arrival time.
    Event(Event<Buf>),
    /// A client request that reached the server.
    Client(u64),
}

#[derive(Clone, Debug)]
enum DiskOp {
    Write {
        block: u64,
        vals: Vec<u64>,
        fua: bool,
    },
    Read {
        block: u64,
        count: u64,
    },
    Flush {
        upto: u64,
    },
    /// Carried out when issued (`Options::ordered_disk`): what its
    /// completion reports.
    Done(Event<Buf>),
}

/// A disk with a volatile write cache.
#[derive(Clone, Debug, Default)]
pub struct Disk {
    durable: Vec<u64>,
    /// block -> (write order, value)
    cache: BTreeMap<u64, (u64, u64)>,
    order: u64,
    /// Fail the next I/O.
    pub fail_next: bool,
}

impl Disk {
    fn new(blocks: u64) -> Self {
        Disk {
            durable: vec![0; blocks as usize],
            ..Disk::default()
        }
    }

    /// What a read returns now.
    pub fn view(&self) -> Vec<u64> {
        let mut v = self.durable.clone();
        for (b, (_, val)) in &self.cache {
            v[*b as usize] = *val;
        }
        v
    }

    fn write(&mut self, block: u64, val: u64, fua: bool) {
        self.order += 1;
        if fua {
            self.durable[block as usize] = val;
            self.cache.remove(&block);
        } else {
            self.cache.insert(block, (self.order, val));
        }
    }

    fn flush(&mut self, upto: u64) {
        let keys: Vec<u64> = self
            .cache
            .iter()
            .filter(|(_, (o, _))| *o <= upto)
            .map(|(b, _)| *b)
            .collect();
        for b in keys {
            if let Some((_, v)) = self.cache.remove(&b) {
                self.durable[b as usize] = v;
            }
        }
    }

    /// Power loss: each cached write independently survives or not.
    fn crash(&mut self, rng: &mut Rng) {
        for (b, (_, v)) in std::mem::take(&mut self.cache) {
            if rng.below(2) == 0 {
                self.durable[b as usize] = v;
            }
        }
    }
}

struct SimNode {
    node: Option<Node<Buf>>,
    epoch: u32,
    /// The node's start count, persisted with its metadata: every start
    /// runs with the next one (`Config::epoch`).
    boot_epoch: u64,
    /// The process does not run (VM pause, SIGSTOP): its inputs queue up
    /// in `held`, its disk and its peer go on.
    frozen: bool,
    held: Vec<Held>,
    /// Until then its host's receive queues overflow while it runs: every
    /// frame and packet for it is lost (`lose_input`).
    deaf_until: Micros,
    /// Its host lost input it has not reported yet: it feeds
    /// `Event::InputOverrun` before its next input, as msld's driver does.
    input_lost: bool,

    disk: Disk,
    meta: Option<Vec<u8>>,
    ios: BTreeMap<u64, DiskOp>,
    holds_address: bool,
    lan_adapter_ok: bool,
    next_tick: Micros,
    cfg: Config,
    roles: Vec<Role>,
    notices: Vec<(Micros, Notice)>,
    /// When this node acknowledged a client write.
    acks: Vec<Micros>,
    /// The host's witness lease client (with `Options::witness`).
    lease: Option<witness::LeaseHost>,
}

impl SimNode {
    /// The process is gone: in-flight I/O and events for it are void, and
    /// it holds no address.
    fn stop(&mut self) {
        self.node = None;
        self.epoch += 1;
        self.ios.clear();
        self.holds_address = false;
        self.frozen = false;
        self.held.clear();
        self.deaf_until = 0;
        self.input_lost = false;
    }
}

#[derive(Clone, Debug)]
enum OpKind {
    Write {
        block: u64,
        vals: Vec<u64>,
        fua: bool,
    },
    Read {
        block: u64,
        count: u64,
    },
    Flush,
}

#[derive(Clone, Debug)]
struct Op {
    kind: OpKind,
    issued: Micros,
    /// Values read (captured when the node served the read).
    read: Option<Vec<u64>>,
}

/// Client-visible truth per block.
#[derive(Clone, Debug, Default)]
struct BlockModel {
    acked: u64,
    /// Acked after the last acked flush (lost only under relaxed rules).
    acked_flushed: u64,
    uncertain: Vec<u64>,
}

/// Outcome of a run.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub seed: u64,
    pub acked_writes: u64,
    pub reads_checked: u64,
    pub takeovers: u64,
    pub resyncs: u64,
    pub faults: Vec<String>,
    pub end_us: Micros,
    /// Frames and packets the attacker injected.
    pub attacks: u64,
    /// Injected frames the parser rejected (forged, or on the wrong path).
    pub attacks_rejected: u64,
    /// Replays that parsed and reached a node (which must ignore them).
    pub replays_delivered: u64,
    /// Online verify runs that completed, and the blocks they found a hole
    /// on both sides.
    pub verifies: u64,
    pub verify_hole_blocks: u64,
    /// Frames and packets a node's host lost to full receive queues
    /// (`Sim::lose_input`, or more than `RX_QUEUE_FRAMES` held in a freeze).
    pub input_lost: u64,
    /// Stable-point FLUSH barriers each node sent its peer (first sends,
    /// not retransmissions).
    pub barriers: [u64; 2],
}

/// The simulator.
pub struct Sim {
    pub opts: Options,
    rng: Rng,
    now: Micros,
    queue: BinaryHeap<Reverse<(Micros, u64, Ev)>>,
    qseq: u64,
    nodes: [SimNode; 2],
    frames: BTreeMap<usize, Vec<u8>>,
    next_frame: usize,
    /// The cluster's keys, one per domain (derived from one master key, as
    /// the daemon does): MSL frames and LAN packets never verify as each
    /// other.
    msl_key: wire::Key,
    lan_key: wire::Key,
    witness_key: wire::Key,
    witness: witness::WitnessHost,
    /// With a witness: (node, generation, first ack, last ack).
    ack_spans: Vec<(usize, u64, Micros, Micros)>,
    msl_cut: bool,
    msl_blackhole: bool,
    lan_cut: bool,
    msl_link_free: [Micros; 2],
    /// The newest stable-point barrier each node sent (`Report::barriers`).
    barrier_seq: [u64; 2],
    double_cut_seen: bool,
    attacker: Option<Attacker>,
    injected: BTreeMap<usize, Injected>,
    events: u64,
    // client
    ops: BTreeMap<u64, Op>,
    next_op: u64,
    next_tag: u64,
    busy_blocks: BTreeSet<u64>,
    model: Vec<BlockModel>,
    pending_flush_model: BTreeMap<u64, Vec<(u64, u64)>>,
    acked_since_flush: Vec<(u64, u64)>,
    client_on: bool,
    generations: BTreeMap<u64, usize>,
    pub report: Report,
    trace: VecDeque<String>,
    /// Full trace file (see [`record_next_run`]).
    record: Option<BufWriter<std::fs::File>>,
    failure: Option<String>,
    /// Longest time the client could not complete any operation.
    pub last_client_ok: Micros,
    pub longest_pause_us: Micros,
}

impl Sim {
    pub fn new(opts: Options) -> Self {
        let mut rng = Rng::new(opts.seed);
        let blocks = opts.volume_blocks;
        let al_extents = opts.al_extents;
        let mk = |id: u16, peer: u16, rng: &mut Rng| {
            let mut cfg = Config::new(id, peer, CLUSTER, blocks, 4096);
            cfg.extent_blocks = 8;
            cfg.al_extents = al_extents;
            cfg.window = 64;
            cfg.resync_max_in_flight = 8;
            cfg.witness = opts.witness;
            cfg.on_no_quorum = opts.on_no_quorum;
            let gen = if id == 1 { Some(rng.nonzero()) } else { None };
            let meta = Meta::create(CLUSTER, id, blocks, 4096, gen);
            SimNode {
                node: None,
                epoch: 0,
                boot_epoch: 0,
                frozen: false,
                held: Vec::new(),
                deaf_until: 0,
                input_lost: false,
                disk: Disk::new(blocks),
                meta: Some(meta.encode()),
                ios: BTreeMap::new(),
                holds_address: false,
                lan_adapter_ok: true,
                next_tick: 0,
                cfg,
                roles: vec![Role::Secondary],
                notices: Vec::new(),
                acks: Vec::new(),
                lease: None,
            }
        };
        let n1 = mk(1, 2, &mut rng);
        let n2 = mk(2, 1, &mut rng);
        let mut key = [0u8; 32];
        for (i, k) in key.iter_mut().enumerate() {
            *k = (opts.seed as u8).wrapping_add(i as u8);
        }
        let mut sim = Sim {
            rng,
            now: 0,
            queue: BinaryHeap::new(),
            qseq: 0,
            nodes: [n1, n2],
            frames: BTreeMap::new(),
            next_frame: 0,
            msl_key: wire::Key::derive(&key, wire::Domain::Msl),
            lan_key: wire::Key::derive(&key, wire::Domain::Lan),
            witness_key: wire::Key::derive(&key, wire::Domain::Witness),
            witness: witness::WitnessHost::new(0, wire::Key::derive(&key, wire::Domain::Witness)),
            ack_spans: Vec::new(),
            msl_cut: false,
            msl_blackhole: false,
            lan_cut: false,
            msl_link_free: [0; 2],
            barrier_seq: [0; 2],
            double_cut_seen: false,
            attacker: None,
            injected: BTreeMap::new(),
            events: 0,
            ops: BTreeMap::new(),
            next_op: 1,
            next_tag: 1,
            busy_blocks: BTreeSet::new(),
            model: vec![BlockModel::default(); blocks as usize],
            pending_flush_model: BTreeMap::new(),
            acked_since_flush: Vec::new(),
            client_on: false,
            generations: BTreeMap::new(),
            report: Report {
                seed: opts.seed,
                ..Report::default()
            },
            trace: VecDeque::new(),
            record: RECORD_NEXT
                .with(|r| r.borrow_mut().take())
                .and_then(|p| std::fs::File::create(p).ok())
                .map(BufWriter::new),
            failure: None,
            last_client_ok: 0,
            longest_pause_us: 0,
            opts,
        };
        sim.start_node(0);
        sim.start_node(1);
        sim
    }

    pub fn now(&self) -> Micros {
        self.now
    }

    /// One line of the full trace, if this run records one.
    fn record(&mut self, line: std::fmt::Arguments) {
        if let Some(w) = self.record.as_mut() {
            let _ = writeln!(w, "[{:>4}.{:06}] {line}", self.now / SEC, self.now % SEC);
        }
    }

    fn log(&mut self, line: String) {
        let l = format!("[{:>4}.{:06}] {}", self.now / SEC, self.now % SEC, line);
        if self.opts.trace {
            println!("{l}");
        }
        if let Some(w) = self.record.as_mut() {
            let _ = writeln!(w, "{l}");
        }
        self.trace.push_back(l);
        if self.trace.len() > 60 {
            self.trace.pop_front();
        }
    }

    fn fail(&mut self, what: String) {
        if self.failure.is_none() {
            self.log(format!("SAFETY VIOLATION: {what}"));
            self.failure = Some(what);
        }
    }

    /// The failure, with the recent trace.
    pub fn failure(&self) -> Option<String> {
        self.failure.as_ref().map(|f| {
            let mut s = format!("seed {}: {f}\nlast events:\n", self.opts.seed);
            for l in &self.trace {
                let _ = writeln!(s, "  {l}");
            }
            s
        })
    }

    fn push(&mut self, at: Micros, ev: Ev) {
        self.qseq += 1;
        self.queue.push(Reverse((at, self.qseq, ev)));
    }

    fn store_frame(&mut self, f: Vec<u8>) -> usize {
        self.next_frame += 1;
        self.frames.insert(self.next_frame, f);
        self.next_frame
    }

    // ------------------------------------------------------------------
    // Nodes

    fn start_node(&mut self, i: usize) {
        let seed = self.rng.next_u64();
        let n = &mut self.nodes[i];
        let meta = match n.meta.as_ref().map(|b| Meta::decode(b)) {
            Some(Ok(m)) => m,
            _ => {
                self.fail(format!("n{} metadata unreadable after restart", i + 1));
                return;
            }
        };
        n.epoch += 1;
        n.ios.clear();
        n.holds_address = false;
        n.frozen = false;
        n.held.clear();
        n.boot_epoch += 1;
        n.cfg.epoch = n.boot_epoch;
        let node = Node::new(n.cfg.clone(), meta, seed, self.now);
        n.node = Some(node);
        if self.opts.witness {
            self.nodes[i].lease = Some(self.new_lease_host(i));
        }
        let n = &mut self.nodes[i];
        n.next_tick = 0;
        let ok = n.lan_adapter_ok;
        let msl = !self.msl_cut;
        self.log(format!("n{} starts", i + 1));
        self.feed(
            i,
            Event::LanAdapter {
                adapter: 0,
                link_up: ok,
                carrier: ok,
            },
        );
        self.feed(i, Event::MslLink { up: msl });
    }

    /// Deliver an event to a live node and run its actions.
    fn feed(&mut self, i: usize, ev: Event<Buf>) {
        let now = self.now;
        if self.nodes[i].node.is_none() {
            return;
        }
        if self.nodes[i].frozen {
            // The host queues it; the core sees it when it runs again. A
            // timer is not an input: the thaw ends with one Tick.
            if !matches!(ev, Event::Tick) {
                self.nodes[i].held.push(Held::Event(ev));
            }
            return;
        }
        if std::mem::take(&mut self.nodes[i].input_lost) {
            // The host finds the drops when it next runs, before any input.
            self.feed(i, Event::InputOverrun);
        }
        if self.record.is_some() {
            self.record(format_args!("n{} <- {ev:?}", i + 1));
        }
        let Some(node) = self.nodes[i].node.as_mut() else {
            return;
        };
        node.handle(now, ev);
        self.drain_actions(i);
    }

    fn drain_actions(&mut self, i: usize) {
        loop {
            let Some(node) = self.nodes[i].node.as_mut() else {
                return;
            };
            let Some(a) = node.poll_action() else {
                break;
            };
            self.do_action(i, a);
        }
        self.check_roles(i);
        if let Some(node) = self.nodes[i].node.as_ref() {
            let t = node.poll_timeout().max(self.now + 1);
            let n = &mut self.nodes[i];
            if n.next_tick <= self.now || t < n.next_tick {
                n.next_tick = t;
                let e = n.epoch;
                self.push(t, Ev::NodeTick(i, e));
            }
        }
    }

    fn check_roles(&mut self, i: usize) {
        let Some(node) = self.nodes[i].node.as_ref() else {
            return;
        };
        let r = node.role();
        if self.nodes[i].roles.last() != Some(&r) {
            self.nodes[i].roles.push(r);
        }
    }

    fn do_action(&mut self, i: usize, a: Action<Buf>) {
        let peer = 1 - i;
        if self.record.is_some() {
            self.record(format_args!("n{} -> {a:?}", i + 1));
        }
        match a {
            Action::SendMsl {
                header,
                msg,
                payload,
            } => self.send_msl(i, header, msg, payload),
            Action::WantLease(w) => self.want_lease(i, w),
            Action::SendLan { header, hb } => {
                if self.lan_cut || !self.nodes[i].lan_adapter_ok || !self.nodes[peer].lan_adapter_ok
                {
                    return;
                }
                let Some(bytes) = self.encode(&header, &Message::Heartbeat(hb), None, true) else {
                    return;
                };
                self.overheard(i, true, &bytes);
                let f = self.opts.lan;
                if self.rng.chance(f.loss_ppm) {
                    return;
                }
                let at = self.now + f.latency_us + self.rng.below(f.jitter_us + 1);
                let id = self.store_frame(bytes);
                let e = self.nodes[peer].epoch;
                self.push(
                    at,
                    Ev::Lan {
                        to: peer,
                        epoch: e,
                        frame: id,
                    },
                );
            }
            Action::Write {
                io,
                block,
                count,
                kind,
                fua,
                payload,
            } => {
                let vals: Vec<u64> = match (kind, &payload) {
                    (IoKind::Write, Some(p)) => tags(p).collect(),
                    _ => vec![0; count as usize],
                };
                if vals.len() as u64 != count {
                    self.fail(format!(
                        "n{} write of {count} blocks carries {} values",
                        i + 1,
                        vals.len()
                    ));
                    return;
                }
                self.disk_op(i, io, DiskOp::Write { block, vals, fua });
            }
            Action::Read { io, block, count } => self.disk_op(i, io, DiskOp::Read { block, count }),
            Action::Flush { io } => {
                let upto = self.nodes[i].disk.order;
                self.disk_op(i, io, DiskOp::Flush { upto });
            }
            Action::PersistMeta(m) => {
                self.nodes[i].meta = Some(m.encode());
            }
            Action::Reply { req, result } => self.reply(i, req, result),
            Action::Notify(n) => {
                self.log(format!("n{} {}: {}", i + 1, n.kind(), n));
                if matches!(n, Notice::Takeover { .. }) {
                    self.report.takeovers += 1;
                }
                if matches!(n, Notice::ResyncFinished { source: false, .. }) {
                    self.report.resyncs += 1;
                }
                self.nodes[i].notices.push((self.now, n));
            }
            Action::ServiceAddress { hold } => {
                self.nodes[i].holds_address = hold;
                self.log(format!(
                    "n{} {} the service address",
                    i + 1,
                    if hold { "claims" } else { "releases" }
                ));
            }
            Action::Restart => {
                self.log(format!("n{} restarts itself", i + 1));
                self.push(self.now + 1, Ev::Restart { node: i });
            }
        }
    }

    fn encode(
        &mut self,
        header: &Header,
        msg: &Message,
        payload: Option<&[u8]>,
        lan: bool,
    ) -> Option<Vec<u8>> {
        let p = payload.unwrap_or(&[]);
        let mut out = vec![0u8; wire::buffer_len(msg, p.len(), true)];
        let key = if lan { &self.lan_key } else { &self.msl_key };
        match wire::emit(header, msg, p, Some(key), &mut out) {
            Ok(n) => {
                out.truncate(n);
                Some(out)
            }
            Err(e) => {
                self.fail(format!("emit failed for {msg:?}: {e}"));
                None
            }
        }
    }

    fn send_msl(&mut self, i: usize, header: Header, msg: Message, payload: Option<Buf>) {
        if let Message::Data(d) = &msg {
            let barrier = d.write_id == 0 && d.len == 0 && d.flags & wire::data_flags::FLUSH != 0;
            if barrier && header.seq > self.barrier_seq[i] {
                self.barrier_seq[i] = header.seq;
                self.report.barriers[i] += 1;
            }
        }
        if self.msl_cut || self.msl_blackhole {
            return;
        }
        let Some(mut bytes) = self.encode(&header, &msg, payload.as_deref(), false) else {
            return;
        };
        self.overheard(i, false, &bytes);
        let f = self.opts.msl;
        if self.rng.chance(f.loss_ppm) {
            return;
        }
        if self.rng.chance(f.corrupt_ppm) {
            let bit = self.rng.below(bytes.len() as u64 * 8);
            bytes[(bit / 8) as usize] ^= 1 << (bit % 8);
        }
        let mut at = self.now + f.latency_us + self.rng.below(f.jitter_us + 1);
        if !msg.is_control() {
            // Data frames queue behind each other on the wire.
            let free = self.msl_link_free[i].max(self.now) + f.data_frame_us;
            self.msl_link_free[i] = free;
            at = at.max(free + f.latency_us);
        }
        let peer = 1 - i;
        let e = self.nodes[peer].epoch;
        let dup = self.rng.chance(f.dup_ppm);
        if dup {
            let id = self.store_frame(bytes.clone());
            let later = at + self.rng.below(f.jitter_us + 100);
            self.push(
                later,
                Ev::Msl {
                    to: peer,
                    epoch: e,
                    frame: id,
                },
            );
        }
        let id = self.store_frame(bytes);
        self.push(
            at,
            Ev::Msl {
                to: peer,
                epoch: e,
                frame: id,
            },
        );
    }

    fn disk_op(&mut self, i: usize, io: u64, op: DiskOp) {
        let mut lat = self.opts.disk_latency_us / 2 + self.rng.below(self.opts.disk_latency_us + 1);
        if matches!(op, DiskOp::Flush { .. }) {
            lat += self.opts.flush_extra_us[i];
        }
        let op = match op {
            // A flush covers what was written before it either way.
            DiskOp::Write { .. } | DiskOp::Read { .. } if self.opts.ordered_disk => {
                DiskOp::Done(self.execute(i, io, op))
            }
            op => op,
        };
        self.nodes[i].ios.insert(io, op);
        let e = self.nodes[i].epoch;
        self.push(
            self.now + lat,
            Ev::DiskDone {
                node: i,
                epoch: e,
                io,
            },
        );
    }

    fn on_disk_done(&mut self, i: usize, io: u64) {
        let Some(op) = self.nodes[i].ios.remove(&io) else {
            return;
        };
        let failed = std::mem::take(&mut self.nodes[i].disk.fail_next);
        if failed {
            self.log(format!("n{} disk I/O error injected", i + 1));
            let ev = match op {
                DiskOp::Read { .. }
                | DiskOp::Done(Event::ReadDone { .. } | Event::ReadHole { .. }) => {
                    Event::ReadDone {
                        io,
                        ok: false,
                        payload: None,
                    }
                }
                _ => Event::IoDone { io, ok: false },
            };
            self.feed(i, ev);
            return;
        }
        let ev = self.execute(i, io, op);
        self.feed(i, ev);
    }

    /// Carry out a disk operation on node `i`'s disk; returns the event
    /// its completion reports.
    fn execute(&mut self, i: usize, io: u64, op: DiskOp) -> Event<Buf> {
        match op {
            DiskOp::Write { block, vals, fua } => {
                for (k, v) in vals.iter().enumerate() {
                    self.nodes[i].disk.write(block + k as u64, *v, fua);
                }
                Event::IoDone { io, ok: true }
            }
            DiskOp::Read { block, count } => {
                let view = self.nodes[i].disk.view();
                let vals = &view[block as usize..(block + count) as usize];
                // All zeroes: a hole, reported with its extent as a host
                // with sparse files does (SEEK_DATA), without the data.
                if vals.iter().all(|&v| v == 0) {
                    let blocks = view[block as usize..]
                        .iter()
                        .take_while(|&&v| v == 0)
                        .count() as u64;
                    Event::ReadHole { io, blocks }
                } else {
                    Event::ReadDone {
                        io,
                        ok: true,
                        payload: Some(buf_of(vals)),
                    }
                }
            }
            DiskOp::Flush { upto } => {
                self.nodes[i].disk.flush(upto);
                Event::IoDone { io, ok: true }
            }
            DiskOp::Done(ev) => ev,
        }
    }

    fn on_frame(&mut self, to: usize, frame: usize, lan: bool) {
        let Some(bytes) = self.frames.remove(&frame) else {
            return;
        };
        let injected = self.injected.remove(&frame);
        let expect = wire::Expect {
            cluster_id: CLUSTER,
            key: Some(if lan { &self.lan_key } else { &self.msl_key }),
        };
        let result = wire::parse(&bytes, &expect);
        match (injected, &result) {
            (Some(_), Err(_)) => self.report.attacks_rejected += 1,
            (Some(Injected::Replay), Ok(_)) => self.report.replays_delivered += 1,
            (Some(kind), Ok(p)) => {
                let what = format!(
                    "an injected {kind:?} frame ({:?}) verified on the {} path",
                    p.msg,
                    if lan { "LAN" } else { "MSL" }
                );
                self.fail(what);
                return;
            }
            (None, _) => {}
        }
        let parsed = match result {
            Ok(p) => p,
            Err(wire::ParseError::UnknownType {
                code,
                must_understand,
            }) if !lan => {
                self.feed(
                    to,
                    Event::MslUnknownType {
                        code,
                        must_understand,
                    },
                );
                return;
            }
            Err(_) => return, // counted by the host; never reaches the core
        };
        let header = parsed.header;
        let msg = parsed.msg;
        let payload = if parsed.payload.is_empty() {
            None
        } else {
            Some(parsed.payload.to_vec())
        };
        if lan {
            if let Message::Heartbeat(hb) = msg {
                self.feed(
                    to,
                    Event::LanFrame {
                        adapter: 0,
                        header,
                        hb,
                        arrived: self.now(),
                    },
                );
            }
        } else {
            self.feed(
                to,
                Event::MslFrame {
                    header,
                    msg,
                    payload,
                    arrived: self.now(),
                },
            );
        }
    }

    // ------------------------------------------------------------------
    // Faults

    pub fn crash(&mut self, i: usize) {
        if self.nodes[i].node.is_none() {
            return;
        }
        self.fault(
            format!("n{} crashes (kill -9 / power loss)", i + 1),
            Some(format!("crash n{}", i + 1)),
        );
        let mut rng = Rng::new(self.rng.next_u64());
        self.nodes[i].stop();
        self.nodes[i].disk.crash(&mut rng);
    }

    pub fn restart(&mut self, i: usize) {
        if self.nodes[i].node.is_some() {
            return;
        }
        self.start_node(i);
    }

    /// Clean stop of a node's daemon (administrator, maintenance): flushed
    /// and shut down, then down until `restart`.
    pub fn stop_clean(&mut self, i: usize) {
        if self.nodes[i].node.is_some() {
            self.record(format_args!("n{} <- shutdown", i + 1));
        }
        if let Some(node) = self.nodes[i].node.as_mut() {
            node.shutdown();
        }
        self.drain_actions(i);
        self.nodes[i].disk.flush(u64::MAX);
        self.nodes[i].stop();
    }

    /// Planned restart (the node asked for it): clean shutdown first.
    fn planned_restart(&mut self, i: usize) {
        self.stop_clean(i);
        self.start_node(i);
    }

    /// Freeze node `i` for `d`: its process does not run (VM pause,
    /// SIGSTOP, a slow fsync on the core thread) while its disk, the links
    /// and its peer go on. Frames, packets, disk completions and client
    /// requests for it queue up with their arrival times; on thaw they are
    /// fed in arrival order, then one Tick (input before timers, as the
    /// daemon does).
    pub fn freeze(&mut self, i: usize, d: Micros) {
        if self.nodes[i].node.is_none() || self.nodes[i].frozen {
            return;
        }
        self.fault(
            format!("n{} frozen for {} ms", i + 1, d / MS),
            Some(format!("freeze n{} {} ms", i + 1, d / MS)),
        );
        self.nodes[i].frozen = true;
        let e = self.nodes[i].epoch;
        self.push(self.now + d, Ev::Thaw { node: i, epoch: e });
    }

    pub fn is_frozen(&self, i: usize) -> bool {
        self.nodes[i].frozen
    }

    fn thaw(&mut self, i: usize) {
        if !self.nodes[i].frozen {
            return;
        }
        self.fault(format!("n{} runs again", i + 1), None);
        self.nodes[i].frozen = false;
        self.lease_stall(i);
        // The host's receive queues held what arrived meanwhile up to their
        // size; later frames and packets were lost, found on the first run.
        let mut held = std::mem::take(&mut self.nodes[i].held);
        let (mut msl, mut lan) = (0, 0);
        held.retain(|h| {
            let n = match h {
                Held::Event(Event::MslFrame { .. }) => &mut msl,
                Held::Event(Event::LanFrame { .. }) => &mut lan,
                _ => return true,
            };
            *n += 1;
            *n <= RX_QUEUE_FRAMES
        });
        let lost = msl.saturating_sub(RX_QUEUE_FRAMES) + lan.saturating_sub(RX_QUEUE_FRAMES);
        if lost > 0 {
            self.nodes[i].input_lost = true;
            self.report.input_lost += lost as u64;
        }
        for h in held {
            match h {
                Held::Event(ev) => self.feed(i, ev),
                Held::Client(op) => {
                    if self.nodes[i].node.is_some() {
                        self.client_deliver(i, op);
                    }
                }
            }
        }
        self.feed(i, Event::Tick);
    }

    /// Node `i`'s host loses every frame and packet for it for `d` while
    /// it runs (its receive ring and socket buffers overflow: a flood, a
    /// starved receive thread); it reports the loss to the core
    /// (`Event::InputOverrun`) when it next runs.
    pub fn lose_input(&mut self, i: usize, d: Micros) {
        if self.nodes[i].node.is_none() {
            return;
        }
        self.fault(
            format!("n{} loses its input for {} ms", i + 1, d / MS),
            Some(format!("lose input n{} {} ms", i + 1, d / MS)),
        );
        self.nodes[i].deaf_until = self.now + d;
    }

    /// Someone starts recording every frame and packet on both wires (a
    /// sample of at most `ATTACKER_MEMORY`), for an attacker started later.
    pub fn eavesdrop(&mut self) {
        if self.attacker.is_none() {
            let seed = self.rng.next_u64();
            self.attacker = Some(Attacker {
                active: false,
                mode: AttackMode::Mixed,
                every_us: 1,
                rng: Rng::new(seed),
                seen: Vec::new(),
            });
        }
    }

    /// Start an attacker on both wires that injects a frame every
    /// `every_us` on average (see [`AttackMode`]), from now on, out of what
    /// it recorded since `eavesdrop` (or from now).
    pub fn attacker(&mut self, mode: AttackMode, every_us: Micros) {
        self.fault(
            format!("attacker on the wires ({mode:?}, every {every_us} us)"),
            Some(format!("attacker {mode:?}")),
        );
        self.eavesdrop();
        if let Some(a) = self.attacker.as_mut() {
            let was = a.active;
            (a.active, a.mode, a.every_us) = (true, mode, every_us.max(1));
            if !was {
                self.push(self.now + 1, Ev::Attack);
            }
        }
    }

    fn overheard(&mut self, from: usize, lan: bool, bytes: &[u8]) {
        let (seen, rng) = match self.attacker.as_mut() {
            Some(a) => (&mut a.seen, &mut a.rng),
            None => return,
        };
        if seen.len() < ATTACKER_MEMORY {
            seen.push((from, lan, bytes.to_vec()));
        } else {
            let k = rng.below(ATTACKER_MEMORY as u64) as usize;
            seen[k] = (from, lan, bytes.to_vec());
        }
    }

    fn attack(&mut self) {
        let now = self.now;
        let Some(a) = self.attacker.as_mut().filter(|a| a.active) else {
            return;
        };
        let next = now + 1 + a.rng.below(2 * a.every_us);
        let pool: Vec<usize> = match a.mode {
            AttackMode::ReplayFrom(n) => (0..a.seen.len()).filter(|&k| a.seen[k].0 == n).collect(),
            _ => (0..a.seen.len()).collect(),
        };
        let pick = (!pool.is_empty()).then(|| pool[a.rng.below(pool.len() as u64) as usize]);
        let Some(k) = pick else {
            self.push(next, Ev::Attack);
            return;
        };
        let (from, lan, mut bytes) = a.seen[k].clone();
        let roll = a.rng.below(100);
        let (to, lan, kind) = match a.mode {
            AttackMode::ReplayFrom(_) => (1 - from, lan, Injected::Replay),
            AttackMode::CrossDomain => (1 - from, !lan, Injected::CrossDomain),
            AttackMode::Mixed => {
                let to = if a.rng.below(10) == 0 { from } else { 1 - from };
                let on_lan = a.rng.below(2) == 0;
                if roll < 55 {
                    (to, lan, Injected::Replay)
                } else if roll < 75 {
                    (to, !lan, Injected::CrossDomain)
                } else if roll < 90 {
                    let at = a.rng.below(bytes.len() as u64) as usize;
                    bytes[at] ^= 1 << a.rng.below(8);
                    (to, on_lan, Injected::Forged)
                } else {
                    let len = 1 + a.rng.below(2 * bytes.len() as u64) as usize;
                    bytes = (0..len).map(|_| a.rng.below(256) as u8).collect();
                    (to, on_lan, Injected::Forged)
                }
            }
        };
        self.report.attacks += 1;
        self.push(next, Ev::Attack);
        let id = self.store_frame(bytes);
        self.injected.insert(id, kind);
        let epoch = self.nodes[to].epoch;
        let at = now + 50;
        let ev = if lan {
            Ev::Lan {
                to,
                epoch,
                frame: id,
            }
        } else {
            Ev::Msl {
                to,
                epoch,
                frame: id,
            }
        };
        self.push(at, ev);
    }

    /// Trace a fault; `injected` names it in the report (heals pass None).
    pub fn fault(&mut self, what: String, injected: Option<String>) {
        self.log(format!("FAULT {what}"));
        if let Some(f) = injected {
            self.report.faults.push(f);
        }
    }

    pub fn set_msl_cut(&mut self, cut: bool) {
        if self.msl_cut == cut {
            return;
        }
        let what = format!(
            "MSL link {}",
            if cut { "down (ip link set down)" } else { "up" }
        );
        self.fault(what, cut.then(|| "msl cut".into()));
        self.msl_cut = cut;
        for i in 0..2 {
            self.feed(i, Event::MslLink { up: !cut });
        }
    }

    pub fn set_msl_blackhole(&mut self, on: bool) {
        let what = format!(
            "MSL silently {}",
            if on { "dropping every frame" } else { "healed" }
        );
        self.fault(what, on.then(|| "msl blackhole".into()));
        self.msl_blackhole = on;
    }

    pub fn set_lan_cut(&mut self, cut: bool) {
        let what = format!(
            "LAN between the servers {}",
            if cut { "cut" } else { "healed" }
        );
        self.fault(what, cut.then(|| "lan cut".into()));
        self.lan_cut = cut;
    }

    pub fn set_lan_adapter(&mut self, i: usize, ok: bool) {
        let what = format!(
            "n{} LAN adapter {}",
            i + 1,
            if ok { "repaired" } else { "failed" }
        );
        self.fault(what, (!ok).then(|| format!("lan adapter n{}", i + 1)));
        self.nodes[i].lan_adapter_ok = ok;
        self.feed(
            i,
            Event::LanAdapter {
                adapter: 0,
                link_up: ok,
                carrier: ok,
            },
        );
    }

    pub fn disk_error(&mut self, i: usize) {
        self.fault(
            format!("n{} next disk I/O fails", i + 1),
            Some(format!("disk error n{}", i + 1)),
        );
        self.nodes[i].disk.fail_next = true;
    }

    /// Heal a node whose disk failed: restart it (as an operator would).
    pub fn repair_failed(&mut self, i: usize) {
        self.nodes[i].disk.fail_next = false;
        if self.nodes[i].node.as_ref().is_some_and(|n| n.is_failed()) {
            // The daemon restarts (the page cache survives a process restart).
            self.log(format!("n{} repaired and restarted", i + 1));
            let n = &mut self.nodes[i];
            n.disk.fail_next = false;
            n.disk.flush(u64::MAX);
            n.stop();
            self.start_node(i);
        }
    }

    pub fn admin(&mut self, i: usize, cmd: msl_core::AdminCmd) {
        self.feed(i, Event::Admin(cmd));
    }

    // ------------------------------------------------------------------
    // Client

    pub fn client(&mut self, on: bool) {
        if on && !self.client_on {
            self.push(self.now + 1, Ev::ClientTick);
            self.last_client_ok = self.now;
        }
        self.client_on = on;
    }

    fn serving_node(&self) -> Option<usize> {
        let holders: Vec<usize> = (0..2)
            .filter(|&i| {
                self.nodes[i].holds_address
                    && self.nodes[i].lan_adapter_ok
                    && self.nodes[i].node.is_some()
            })
            .collect();
        // A node that is frozen, or runs again but holds until it knows
        // whether it was replaced, still has the address but its
        // gratuitous ARP is older than a new holder's: clients follow the
        // new one. Otherwise they stay where they were (during a double cut
        // both hold it).
        let settled = |i: &usize| {
            let n = &self.nodes[*i];
            !n.frozen
                && n.node
                    .as_ref()
                    .is_some_and(|n| !n.holding_after_stall() && !n.holding_for_lease())
        };
        holders
            .iter()
            .copied()
            .find(settled)
            .or_else(|| holders.first().copied())
    }

    fn client_tick(&mut self) {
        if !self.client_on {
            return;
        }
        let gap = self.opts.client_think_us / 2 + self.rng.below(self.opts.client_think_us + 1);
        self.push(self.now + gap, Ev::ClientTick);
        // Give up on operations that never got an answer.
        let stale: Vec<u64> = self
            .ops
            .iter()
            .filter(|(_, o)| self.now > o.issued + 3 * SEC)
            .map(|(k, _)| *k)
            .collect();
        for k in stale {
            if let Some(op) = self.ops.remove(&k) {
                self.op_uncertain(op);
            }
        }
        if self.ops.len() >= self.opts.client_qd {
            return;
        }
        let Some(node) = self.serving_node() else {
            return;
        };
        let blocks = match self.opts.client_blocks {
            0 => self.opts.volume_blocks,
            n => n.min(self.opts.volume_blocks),
        };
        let r = self.rng.below(100);
        let kind = if r < 8 {
            OpKind::Flush
        } else {
            let count = 1 + self.rng.below(3);
            let block = self.rng.below(blocks - count + 1);
            if (block..block + count).any(|b| self.busy_blocks.contains(&b)) {
                return;
            }
            if r < 30 {
                OpKind::Read { block, count }
            } else {
                let vals: Vec<u64> = (0..count)
                    .map(|_| {
                        self.next_tag += 1;
                        self.next_tag
                    })
                    .collect();
                OpKind::Write {
                    block,
                    vals,
                    fua: self.rng.below(10) == 0,
                }
            }
        };
        match &kind {
            OpKind::Write { block, vals, .. } => (0..vals.len() as u64).for_each(|k| {
                self.busy_blocks.insert(block + k);
            }),
            OpKind::Read { block, count } => (*block..block + count).for_each(|b| {
                self.busy_blocks.insert(b);
            }),
            OpKind::Flush => {}
        }
        let id = self.next_op;
        self.next_op += 1;
        self.ops.insert(
            id,
            Op {
                kind,
                issued: self.now,
                read: None,
            },
        );
        let at = self.now + self.opts.lan.latency_us;
        let e = self.nodes[node].epoch;
        self.push(
            at,
            Ev::ClientDeliver {
                node,
                epoch: e,
                op: id,
            },
        );
    }

    fn client_deliver(&mut self, node: usize, op_id: u64) {
        let Some(op) = self.ops.get(&op_id).cloned() else {
            return;
        };
        if !self.nodes[node].lan_adapter_ok {
            return; // lost on the wire; times out
        }
        match op.kind {
            OpKind::Write { block, vals, fua } => {
                let payload = Some(buf_of(&vals));
                let count = vals.len() as u64;
                self.feed(
                    node,
                    Event::ClientWrite {
                        req: op_id,
                        block,
                        count,
                        kind: IoKind::Write,
                        fua,
                        payload,
                    },
                );
            }
            OpKind::Flush => self.feed(node, Event::ClientFlush { req: op_id }),
            OpKind::Read { block, count } => {
                let serving = self.nodes[node].node.as_ref().is_some_and(|n| n.serving());
                if serving {
                    let view = self.nodes[node].disk.view();
                    let vals = view[block as usize..(block + count) as usize].to_vec();
                    if let Some(o) = self.ops.get_mut(&op_id) {
                        o.read = Some(vals);
                    }
                }
                self.reply(
                    node,
                    op_id,
                    if serving {
                        Ok(())
                    } else {
                        Err(ClientError::NotPrimary)
                    },
                );
            }
        }
    }

    fn reply(&mut self, i: usize, req: u64, result: Result<(), ClientError>) {
        if !self.nodes[i].lan_adapter_ok {
            return;
        }
        // Generation uniqueness: record who acknowledges writes in which
        // generation.
        if result.is_ok() {
            if let (Some(op), Some(node)) = (self.ops.get(&req), self.nodes[i].node.as_ref()) {
                if matches!(op.kind, OpKind::Write { .. }) {
                    self.nodes[i].acks.push(self.now);
                    let g = node.meta().gens.current;
                    // Only acknowledgements without the peer count: one
                    // made in a session is of a write the peer has too.
                    if !node.status().connected {
                        self.check_ack_span(i, g);
                        self.check_ack_lease(i);
                    }
                    match self.generations.get(&g) {
                        Some(&other) if other != i => {
                            let msg = format!("n{} and n{} both acknowledged client writes in generation {g:016x}", other + 1, i + 1);
                            self.fail(msg);
                        }
                        _ => {
                            self.generations.insert(g, i);
                        }
                    }
                }
            }
        }
        let id = self.store_frame(Vec::new());
        let at = self.now + self.opts.lan.latency_us;
        self.push(
            at,
            Ev::ClientReply {
                op: req,
                ok: result.is_ok(),
                frame: id,
            },
        );
    }

    fn client_reply(&mut self, op_id: u64, ok: bool) {
        let Some(op) = self.ops.remove(&op_id) else {
            return; // already given up
        };
        if !ok {
            self.op_uncertain(op);
            return;
        }
        self.longest_pause_us = self.longest_pause_us.max(self.now - self.last_client_ok);
        self.last_client_ok = self.now;
        match op.kind {
            OpKind::Write { block, vals, .. } => {
                for (k, v) in vals.iter().enumerate() {
                    let b = block as usize + k;
                    self.model[b].acked = *v;
                    self.model[b].uncertain.clear();
                    self.busy_blocks.remove(&(b as u64));
                    self.acked_since_flush.push((b as u64, *v));
                }
                self.report.acked_writes += 1;
            }
            OpKind::Read { block, count } => {
                let vals = op.read.unwrap_or_default();
                for k in 0..count {
                    let b = (block + k) as usize;
                    let v = vals.get(k as usize).copied().unwrap_or(u64::MAX);
                    self.check_value(b, v, "client read");
                    self.busy_blocks.remove(&(b as u64));
                }
                self.report.reads_checked += 1;
            }
            OpKind::Flush => {
                let covered = std::mem::take(&mut self.acked_since_flush);
                let _ = self.pending_flush_model.remove(&op_id);
                for (b, v) in covered {
                    if self.model[b as usize].acked == v {
                        self.model[b as usize].acked_flushed = v;
                    }
                }
            }
        }
    }

    fn op_uncertain(&mut self, op: Op) {
        match op.kind {
            OpKind::Write { block, vals, .. } => {
                for (k, v) in vals.iter().enumerate() {
                    let b = block as usize + k;
                    self.model[b].uncertain.push(*v);
                    self.busy_blocks.remove(&(b as u64));
                }
            }
            OpKind::Read { block, count } => (block..block + count).for_each(|b| {
                self.busy_blocks.remove(&b);
            }),
            OpKind::Flush => {}
        }
    }

    fn check_value(&mut self, b: usize, v: u64, what: &str) {
        let m = &self.model[b];
        let ok = v == m.acked
            || m.uncertain.contains(&v)
            || (self.opts.relaxed_durability && (v == m.acked_flushed || v != 0));
        if !ok {
            let msg = format!(
                "{what}: block {b} reads {v:#x}, but the last acknowledged write was {:#x} (uncertain: {:x?})",
                m.acked, m.uncertain
            );
            self.fail(msg);
        }
    }

    // ------------------------------------------------------------------
    // Running

    /// Process events until virtual time `t` (or a failure).
    pub fn run_until(&mut self, t: Micros) {
        while self.failure.is_none() {
            let Some(Reverse((at, _, ev))) = self.queue.peek().copied() else {
                self.now = t;
                break;
            };
            if at > t {
                self.now = t;
                break;
            }
            self.queue.pop();
            self.now = at;
            self.events += 1;
            if self.events > EVENT_BUDGET {
                self.fail(format!(
                    "livelock: more than {EVENT_BUDGET} events by t={at}us"
                ));
                break;
            }
            self.step(ev);
        }
    }

    pub fn run_for(&mut self, d: Micros) {
        let t = self.now + d;
        self.run_until(t);
    }

    fn step(&mut self, ev: Ev) {
        match ev {
            Ev::NodeTick(i, e) => {
                if self.nodes[i].epoch == e && self.nodes[i].next_tick <= self.now {
                    self.nodes[i].next_tick = 0;
                    self.feed(i, Event::Tick);
                }
            }
            Ev::Msl { to, epoch, frame } | Ev::Lan { to, epoch, frame }
                if self.nodes[to].epoch == epoch && self.now < self.nodes[to].deaf_until =>
            {
                self.frames.remove(&frame);
                self.injected.remove(&frame);
                self.nodes[to].input_lost = true;
                self.report.input_lost += 1;
            }
            Ev::Msl { to, epoch, frame } => {
                if self.nodes[to].epoch == epoch && !self.msl_cut && !self.msl_blackhole {
                    self.on_frame(to, frame, false);
                } else {
                    self.frames.remove(&frame);
                }
            }
            Ev::Lan { to, epoch, frame } => {
                // The attacker sits on the receiver's side of a LAN cut.
                let cut = self.lan_cut && !self.injected.contains_key(&frame);
                if self.nodes[to].epoch == epoch && !cut && self.nodes[to].lan_adapter_ok {
                    self.on_frame(to, frame, true);
                } else {
                    self.frames.remove(&frame);
                    self.injected.remove(&frame);
                }
            }
            Ev::DiskDone { node, epoch, io } => {
                if self.nodes[node].epoch == epoch {
                    self.on_disk_done(node, io);
                }
            }
            Ev::ClientDeliver { node, epoch, op } => {
                if self.nodes[node].epoch == epoch && self.nodes[node].node.is_some() {
                    if self.nodes[node].frozen {
                        self.nodes[node].held.push(Held::Client(op));
                    } else {
                        self.client_deliver(node, op);
                    }
                }
            }
            Ev::Attack => self.attack(),
            Ev::Thaw { node, epoch } => {
                if self.nodes[node].epoch == epoch {
                    self.thaw(node);
                }
            }
            Ev::ClientReply { op, ok, frame } => {
                self.frames.remove(&frame);
                self.client_reply(op, ok);
            }
            Ev::ClientTick => self.client_tick(),
            Ev::Restart { node } => self.planned_restart(node),
            Ev::LeaseTick { node, epoch } => {
                if self.nodes[node].epoch == epoch {
                    self.lease_tick(node);
                }
            }
            Ev::WitnessRx { from, frame } => self.witness_rx(from, frame),
            Ev::WitnessReply { to, epoch, frame } => {
                if self.nodes[to].epoch == epoch {
                    self.witness_reply(to, frame);
                } else {
                    self.frames.remove(&frame);
                }
            }
        }
        self.check_invariants();
    }

    fn check_invariants(&mut self) {
        if (self.msl_cut || self.msl_blackhole) && self.lan_cut {
            self.double_cut_seen = true;
        }
        // A node that does not run, or that runs again but holds everything
        // until it knows whether it was replaced, cannot serve a client on
        // the address it still has (its gratuitous ARP is older than the
        // new holder's); it must settle within one dead interval.
        let holders: Vec<usize> = (0..2)
            .filter(|&i| {
                let n = &self.nodes[i];
                n.holds_address
                    && !n.frozen
                    && n.node
                        .as_ref()
                        .is_some_and(|n| !n.holding_after_stall() && !n.holding_for_lease())
            })
            .collect();
        if holders.len() > 1 && !self.allow_dual_primary() {
            self.fail("both nodes hold the service address".into());
        }
    }

    fn allow_dual_primary(&self) -> bool {
        // Only a cut of BOTH paths between live nodes can cause this (a
        // double failure). Until the split brain is detected on reconnect
        // both may hold it; then the higher node id steps down.
        self.double_cut_seen
            && !(self.has_notice(0, "split_brain_refused")
                && self.has_notice(1, "split_brain_refused"))
    }

    pub fn role(&self, i: usize) -> Option<Role> {
        self.nodes[i].node.as_ref().map(|n| n.role())
    }

    pub fn roles_seen(&self, i: usize) -> &[Role] {
        &self.nodes[i].roles
    }

    pub fn notices(&self, i: usize) -> &[(Micros, Notice)] {
        &self.nodes[i].notices
    }

    pub fn has_notice(&self, i: usize, kind: &str) -> bool {
        self.nodes[i].notices.iter().any(|(_, n)| n.kind() == kind)
    }

    pub fn first_notice_at(&self, i: usize, kind: &str) -> Option<Micros> {
        self.nodes[i]
            .notices
            .iter()
            .find(|(_, n)| n.kind() == kind)
            .map(|(t, _)| *t)
    }

    /// When node `i` acknowledged client writes.
    pub fn acks(&self, i: usize) -> &[Micros] {
        &self.nodes[i].acks
    }

    pub fn holds_address(&self, i: usize) -> bool {
        self.nodes[i].holds_address && self.nodes[i].node.is_some()
    }

    /// Cap node `i`'s resync rate (bytes/s, 0 = none), now and after
    /// restarts: a slow resync a crash can interrupt halfway.
    /// Write `val` into block `block` of node `i`'s disk behind its back
    /// (durable at once), as a faulty disk or an administrator would.
    pub fn write_behind(&mut self, i: usize, block: u64, val: u64) {
        let d = &mut self.nodes[i].disk;
        d.cache.remove(&block);
        d.durable[block as usize] = val;
    }

    /// What node `i`'s disk reads now.
    pub fn disk_view(&self, i: usize) -> Vec<u64> {
        self.nodes[i].disk.view()
    }

    pub fn set_resync_rate(&mut self, i: usize, bytes_per_s: u64) {
        self.record(format_args!("n{} <- resync rate {bytes_per_s}", i + 1));
        let n = &mut self.nodes[i];
        n.cfg.resync_max_bytes_per_s = bytes_per_s;
        if bytes_per_s > 0 {
            n.cfg.resync_min_bytes_per_s = n.cfg.resync_min_bytes_per_s.min(bytes_per_s);
        }
        if let Some(node) = n.node.as_mut() {
            node.set_resync_max_rate(bytes_per_s);
        }
    }

    /// Simulator-wide figures so far (attacker counts among them).
    pub fn report(&self) -> &Report {
        &self.report
    }

    pub fn node(&self, i: usize) -> Option<&Node<Buf>> {
        self.nodes[i].node.as_ref()
    }

    /// Pair healthy: one serving primary, one in-sync secondary, nothing
    /// dirty.
    pub fn converged(&self) -> bool {
        let (Some(a), Some(b)) = (self.nodes[0].node.as_ref(), self.nodes[1].node.as_ref()) else {
            return false;
        };
        if self.nodes.iter().any(|n| n.frozen) {
            return false;
        }
        let one_primary = (a.role() == Role::Primary) ^ (b.role() == Role::Primary);
        let (sa, sb) = (a.status(), b.status());
        let paths_up = sa.msl_alive && sa.lan_alive && sb.msl_alive && sb.lan_alive;
        one_primary
            && paths_up
            && (a.serving() || b.serving())
            && a.in_sync()
            && b.in_sync()
            && a.meta().dirty.count() == 0
            && b.meta().dirty.count() == 0
            && a.meta().disk == DiskState::UpToDate
            && b.meta().disk == DiskState::UpToDate
    }

    /// Run until converged (true) or `limit` passes.
    pub fn run_until_converged(&mut self, limit: Micros) -> bool {
        let end = self.now + limit;
        while self.now < end && self.failure.is_none() {
            if self.converged() {
                return true;
            }
            self.run_for(10 * MS);
        }
        self.converged()
    }

    /// Stop the client, let everything drain, and check the final state:
    /// converged, volumes identical, every block as acknowledged.
    pub fn final_check(&mut self) -> Result<(), String> {
        self.client(false);
        let end = self.now + 10 * SEC;
        while !self.ops.is_empty() && self.now < end && self.failure.is_none() {
            self.run_for(10 * MS);
        }
        // Requests whose answer was lost (e.g. the server's LAN adapter died
        // after it took the request) stay unknown to the client.
        for (_, op) in std::mem::take(&mut self.ops) {
            self.op_uncertain(op);
        }
        if !self.run_until_converged(30 * SEC) {
            let st: Vec<String> = (0..2)
                .map(|i| match self.nodes[i].node.as_ref() {
                    Some(n) => format!("n{}: {:?}", i + 1, n.status()),
                    None => format!("n{}: down", i + 1),
                })
                .collect();
            self.fail(format!(
                "pair did not converge after faults healed:\n  {}",
                st.join("\n  ")
            ));
        }
        // Let the secondary finish applying and flushing.
        self.run_for(500 * MS);
        if self.failure.is_none() {
            let a = self.nodes[0].disk.view();
            let b = self.nodes[1].disk.view();
            if a != b {
                let diff: Vec<String> = (0..a.len())
                    .filter(|&k| a[k] != b[k])
                    .map(|k| {
                        format!(
                            "block {k}: n1 {:#x} n2 {:#x} acked {:#x}",
                            a[k], b[k], self.model[k].acked
                        )
                    })
                    .collect();
                self.fail(format!(
                    "volumes differ after convergence: {}",
                    diff.join("; ")
                ));
            }
            let p = (0..2)
                .find(|&i| self.role(i) == Some(Role::Primary))
                .unwrap_or(0);
            let view = self.nodes[p].disk.view();
            for (b, v) in view.into_iter().enumerate() {
                self.check_value(b, v, "final volume");
            }
        }
        self.report.end_us = self.now;
        if self.record.is_some() {
            for i in 0..2 {
                let st = self.nodes[i].node.as_ref().map(|n| n.status());
                self.record(format_args!("n{} status {st:?}", i + 1));
            }
        }
        match self.failure() {
            Some(f) => Err(f),
            None => Ok(()),
        }
    }

    /// Bring the pair up and in sync with the client running.
    pub fn start_pair(&mut self) -> Result<(), String> {
        self.client(true);
        if !self.run_until_converged(10 * SEC) {
            self.fail("pair never came up in sync".into());
        }
        match self.failure() {
            Some(f) => Err(f),
            None => Ok(()),
        }
    }
}

/// The witness cut from node `who`, alone or with a second fault healed
/// before the witness reaches `who` again: a crash or a stall of either
/// node, the MSL or the LAN cut, a stall of the witness. Or, without the
/// cut, a stall of the witness alone or with one of the primary (which
/// holds the lease), or the primary stalling while it holds the lease
/// alone after its secondary crashed. `x` draws which.
fn witness_pair_of_faults(sim: &mut Sim, x: &mut Rng, who: usize, primary: usize, hold: Micros) {
    let secondary = 1 - primary;
    match x.below(11) {
        kind @ 0..=7 => {
            sim.witness_cut(who, true);
            if kind == 0 {
                sim.run_for(hold);
            } else {
                sim.run_for(x.below(SEC));
                let node = if x.below(2) == 0 { who } else { 1 - who };
                match kind {
                    1 | 2 => {
                        sim.crash(node);
                        sim.run_for(hold);
                        sim.restart(node);
                    }
                    3 | 4 => {
                        let d = freeze_len(x);
                        sim.freeze(node, d);
                        sim.run_for(d);
                    }
                    5 => {
                        sim.set_msl_cut(true);
                        sim.run_for(hold);
                        sim.set_msl_cut(false);
                    }
                    6 => {
                        sim.set_lan_cut(true);
                        sim.run_for(hold);
                        sim.set_lan_cut(false);
                    }
                    _ => {
                        let d = freeze_len(x);
                        sim.witness_freeze(d);
                        sim.run_for(d);
                    }
                }
                sim.run_for(x.below(SEC));
            }
            sim.witness_cut(who, false);
        }
        8 => {
            // The witness does not run (shorter than a lease, or longer).
            let d = freeze_len(x);
            sim.witness_freeze(d);
            sim.run_for(d);
        }
        9 => {
            // The witness stalls and so does the primary, which holds the
            // lease: the secondary may win it only once both the witness's
            // copy and the primary's have ended.
            let d = freeze_len(x);
            sim.witness_freeze(d);
            sim.run_for(x.below(d));
            let d = freeze_len(x);
            sim.freeze(primary, d);
            sim.run_for(d);
        }
        _ => {
            // The secondary crashes; the primary, alone under the lease,
            // stalls (the secondary back before it runs again, or after).
            sim.crash(secondary);
            sim.run_for(x.below(SEC));
            let d = freeze_len(x);
            sim.freeze(primary, d);
            if x.below(2) == 0 {
                sim.run_for(d + hold);
                sim.restart(secondary);
            } else {
                sim.run_for(x.below(d));
                sim.restart(secondary);
                sim.run_for(d);
            }
        }
    }
}

/// A freeze length from 50 ms to 10 s: shorter than the dead interval,
/// around it, a few dead intervals, and long.
fn freeze_len(r: &mut Rng) -> Micros {
    match r.below(4) {
        0 => 50 * MS + r.below(350 * MS),
        1 => 350 * MS + r.below(300 * MS),
        2 => 650 * MS + r.below(2 * SEC),
        _ => 3 * SEC + r.below(7 * SEC),
    }
}

/// One seeded run with random faults. Faults come one at a time (the
/// product's guarantee is for single failures); each heals before the next.
pub fn run_seed(seed: u64, trace: bool) -> Result<Report, String> {
    let mut r = Rng::new(seed.wrapping_mul(0x2545_F491_4F6C_DD1D));
    let mut o = Options::new(seed);
    o.trace = trace;
    o.msl.loss_ppm = r.below(40_000) as u32;
    o.msl.dup_ppm = r.below(20_000) as u32;
    o.msl.corrupt_ppm = r.below(10_000) as u32;
    o.msl.jitter_us = r.below(2_000);
    o.lan.loss_ppm = r.below(40_000) as u32;
    o.lan.jitter_us = r.below(2_000);
    o.client_qd = 1 + r.below(6) as usize;
    // A quarter of the seeds run with a witness, drawn apart so that the
    // others keep their schedules.
    let mut wr = Rng::new(seed ^ 0x5749_544E_4553_5321);
    let witness = wr.below(4) == 0;
    o.witness = witness;
    // The second fault of a witness episode comes from its own stream, so
    // the episodes drawn from `wr` keep their schedules.
    let mut xr = Rng::new(seed ^ 0x5345_434F_4E44_2121);
    // A quarter of the seeds end with an online verify (`verify_episode`)
    // on a larger, mostly thin volume, with a disk that runs its
    // operations in order, as msld's does (verify relies on it).
    let mut vr = Rng::new(seed ^ VERIFY_SEEDS);
    let verify = vr.below(4) == 0;
    debug_assert_eq!(verify, runs_verify(seed));
    if verify {
        o.ordered_disk = true;
        o.client_blocks = 64 + vr.below(512);
        o.volume_blocks = o.client_blocks + 1024 + vr.below(3072);
    }
    // An eighth of the episodes start with a node's host losing its input
    // for a while (drawn apart: the other faults keep their schedules).
    let mut ir = Rng::new(seed ^ LOST_INPUT_SEEDS);
    let attack = r.below(2) == 0;
    let attack_every = 1 + r.below(30 * MS);
    let mut sim = Sim::new(o);
    if attack {
        // It records from the start and injects from the start.
        sim.attacker(AttackMode::Mixed, attack_every);
    }
    sim.start_pair()?;
    let episodes = 1 + r.below(3);
    for _ in 0..episodes {
        sim.run_for(r.below(SEC));
        let primary = (0..2)
            .find(|&i| sim.role(i) == Some(Role::Primary))
            .unwrap_or(0);
        let secondary = 1 - primary;
        if ir.below(8) == 0 {
            // The receive ring overflows while the node runs: at most a
            // few frames, or everything for longer than the dead interval.
            // The node must neither hold (it ran, so it was heard) nor
            // judge the peer by the silence it could not hear.
            let who = if ir.below(2) == 0 { primary } else { secondary };
            let d = match ir.below(3) {
                0 => 1 + ir.below(5 * MS),
                1 => 50 * MS + ir.below(300 * MS),
                _ => 400 * MS + ir.below(2 * SEC),
            };
            sim.lose_input(who, d);
            sim.run_for(d);
        }
        let hold = 100 * MS + r.below(2 * SEC);
        if witness && wr.below(2) == 0 {
            witness_episode(&mut sim, &mut wr, &mut xr, primary);
        } else {
            match r.below(14) {
                13 => {
                    // Both paths drop everything for less than the dead
                    // interval, then the secondary does not run for less than
                    // the stall threshold while the primary's frames arrive
                    // again: it must read them before judging the primary (the
                    // primary, which heard nothing for longer, may go degraded).
                    let out = 250 * MS + r.below(90 * MS);
                    sim.set_msl_blackhole(true);
                    sim.set_lan_cut(true);
                    sim.run_for(out);
                    sim.set_msl_blackhole(false);
                    sim.set_lan_cut(false);
                    let d = 100 * MS + r.below(40 * MS);
                    sim.freeze(secondary, d);
                    sim.run_for(d);
                }
                10 | 11 => {
                    // A node does not run for a while, at any moment (mid-write
                    // under the client load).
                    let who = if r.below(2) == 0 { primary } else { secondary };
                    let d = freeze_len(&mut r);
                    sim.freeze(who, d);
                    sim.run_for(d);
                }
                12 => {
                    // A freeze in the middle of the resync after a crash.
                    sim.crash(secondary);
                    sim.run_for(hold);
                    sim.restart(secondary);
                    sim.run_for(r.below(100 * MS));
                    let who = if r.below(2) == 0 { primary } else { secondary };
                    let d = freeze_len(&mut r);
                    sim.freeze(who, d);
                    sim.run_for(d);
                }
                9 => {
                    // Administrator restarts the primary's daemon cleanly.
                    let (what, name) = (
                        format!("n{} daemon stopped cleanly", primary + 1),
                        format!("clean restart n{}", primary + 1),
                    );
                    sim.fault(what, Some(name));
                    sim.stop_clean(primary);
                    sim.run_for(hold);
                    sim.restart(primary);
                }
                0 => {
                    sim.crash(primary);
                    sim.run_for(hold);
                    sim.restart(primary);
                }
                1 => {
                    sim.crash(secondary);
                    sim.run_for(hold);
                    sim.restart(secondary);
                }
                2 => {
                    sim.set_msl_cut(true);
                    sim.run_for(hold);
                    sim.set_msl_cut(false);
                }
                3 => {
                    sim.set_msl_blackhole(true);
                    sim.run_for(hold);
                    sim.set_msl_blackhole(false);
                }
                4 => {
                    sim.set_lan_cut(true);
                    sim.run_for(hold);
                    sim.set_lan_cut(false);
                }
                5 => {
                    sim.set_lan_adapter(primary, false);
                    if r.below(3) == 0 {
                        // A freeze in the middle of the switchover it starts.
                        sim.run_for(r.below(600 * MS));
                        let who = if r.below(2) == 0 { primary } else { secondary };
                        let d = freeze_len(&mut r);
                        sim.freeze(who, d);
                        sim.run_for(d);
                    }
                    sim.run_for(hold.max(SEC));
                    sim.set_lan_adapter(primary, true);
                }
                6 => {
                    sim.disk_error(primary);
                    sim.run_for(hold);
                    sim.repair_failed(primary);
                }
                7 => {
                    sim.disk_error(secondary);
                    sim.run_for(hold);
                    sim.repair_failed(secondary);
                }
                _ => {
                    // A crash of the returning node in the middle of its resync.
                    sim.crash(secondary);
                    sim.run_for(hold);
                    sim.restart(secondary);
                    sim.run_for(r.below(50 * MS));
                    sim.crash(secondary);
                    sim.run_for(hold / 2);
                    sim.restart(secondary);
                }
            }
        }
        if let Some(f) = sim.failure() {
            return Err(f);
        }
        // Once the fault has healed the pair is back in sync on its own
        // (the returning node resynced, roles settled) within 20 s.
        if !sim.run_until_converged(20 * SEC) {
            return Err(format!(
                "the pair did not converge within 20 s of the fault healing (at {:.3} s)",
                sim.now() as f64 / 1e6
            ));
        }
    }
    if verify {
        verify_episode(&mut sim, &mut vr)?;
    }
    sim.final_check()?;
    Ok(sim.report.clone())
}

/// Draws which seeds run `verify_episode` (chosen so that the regression
/// seeds, which replay runs without it, are not among them).
const VERIFY_SEEDS: u64 = 0x5645_5249_4659_263F;

/// Draws which episodes start with `Sim::lose_input`.
const LOST_INPUT_SEEDS: u64 = 0x4C4F_5354_494E_5055;

/// Whether `run_seed(seed)` ends with an online verify (`verify_episode`).
pub fn runs_verify(seed: u64) -> bool {
    Rng::new(seed ^ VERIFY_SEEDS).below(4) == 0
}

/// An online verify with resync of the whole volume while the client goes
/// on writing (into holes too, as the run passes them), after a block
/// above the client's blocks was given data behind one node's back (the
/// other side has a hole there). The run must report exactly that block:
/// a client write racing a zero range must make neither a false "equal"
/// nor a false "differing". Most of the volume must have gone as holes on
/// both sides. The resync that follows makes the copies equal again.
fn verify_episode(sim: &mut Sim, v: &mut Rng) -> Result<(), String> {
    let Some(primary) = (0..2).find(|&i| sim.role(i) == Some(Role::Primary)) else {
        return Ok(());
    };
    let (first, blocks) = (sim.opts.client_blocks, sim.opts.volume_blocks);
    let stray = first + v.below(blocks - first);
    let side = v.below(2) as usize;
    sim.fault(
        format!("block {stray} given data behind n{}'s back", side + 1),
        Some("verify".into()),
    );
    sim.write_behind(side, stray, 0x5eed_0000_0000 | stray);
    let status = |sim: &Sim| sim.node(primary).map(|n| n.status().verify);
    let runs = status(sim).map_or(0, |s| s.runs);
    sim.admin(
        primary,
        msl_core::AdminCmd::Verify {
            start_block: 0,
            count: u64::MAX,
            resync: true,
        },
    );
    let end = sim.now + 30 * SEC;
    while status(sim).is_some_and(|s| s.active) && sim.now < end {
        sim.run_for(10 * MS);
    }
    let mut judged = false;
    match status(sim) {
        // Refused (not in sync), aborted (the session ended) or the node
        // went away: nothing to judge.
        Some(st) if st.runs > runs && st.aborted.is_none() => {
            judged = true;
            let found = &st.first_differing[..usize::from(st.first_len)];
            if st.differing_blocks != 1 || found != [stray] || st.checked_blocks != blocks {
                sim.fail(format!(
                    "online verify: only block {stray} differs (data on n{} only); the run reported {st:?}",
                    side + 1
                ));
            }
            if st.hole_blocks == 0 || st.hole_blocks >= blocks {
                sim.fail(format!(
                    "online verify: {} of {blocks} blocks found holes on both sides: {st:?}",
                    st.hole_blocks
                ));
            }
            sim.report.verifies += 1;
            sim.report.verify_hole_blocks += st.hole_blocks;
        }
        Some(st) if st.active => sim.fail(format!("online verify did not end: {st:?}")),
        _ => {}
    }
    if let Some(f) = sim.failure() {
        return Err(f);
    }
    // The resync copies the primary's block; a stray block on the
    // primary is then on both: the client never wrote it, so clear it.
    // A verify that did not run to its end found nothing to resync: the
    // stray block, a fault no node can see, is cleared on both as well.
    sim.run_until_converged(20 * SEC);
    sim.run_for(500 * MS);
    if !judged || side == primary || sim.disk_view(primary)[stray as usize] != 0 {
        sim.write_behind(0, stray, 0);
        sim.write_behind(1, stray, 0);
    }
    Ok(())
}

/// One fault involving the witness (runs with `Options::witness`): its
/// crash and restart, a partition between it and either node (alone or
/// with a second fault, see `witness_pair_of_faults`), its stall, both
/// inter-node links cut at once with the witness reaching both nodes or
/// only one (also just after a witness restart, inside its start-up
/// window; or the witness then lost by both), a stall of the primary cut
/// from the witness, the primary's crash while the witness is down, and
/// stalls of the primary while it holds the lease. Every combination of
/// two faults in which the witness stays reachable from one node is
/// drawn. `x` draws the second faults (so that the episodes drawn from
/// `r` keep their schedules).
///
/// A second failure during a double cut after the primary won the lease
/// alone (the witness cut from it, its stall) is drawn: the witness grants
/// the secondary nothing at a generation older than the holder's. Not
/// here: the primary's crash then (unflushed writes acknowledged alone
/// are lost by NBD's rules, not checked by this draw) and a witness
/// restart then (a restarted witness knows no generation).
fn witness_episode(sim: &mut Sim, r: &mut Rng, x: &mut Rng, primary: usize) {
    let secondary = 1 - primary;
    let hold = 100 * MS + r.below(2 * SEC);
    let cut_both = |sim: &mut Sim, on: bool, blackhole: bool| {
        if blackhole {
            sim.set_msl_blackhole(on);
        } else {
            sim.set_msl_cut(on);
        }
        sim.set_lan_cut(on);
    };
    let blackhole = r.below(2) == 0;
    match r.below(9) {
        0..=2 => {
            // Both links cut; the witness reaches both, only the primary,
            // or only the secondary.
            let away = match r.below(3) {
                0 => None,
                1 => Some(secondary),
                _ => Some(primary),
            };
            if let Some(i) = away {
                sim.witness_cut(i, true);
            }
            cut_both(sim, true, blackhole);
            if away.is_none() && x.below(2) == 0 {
                // The primary wins the lease alone and acknowledges alone,
                // then loses the witness or stalls: the secondary must not
                // win the lease at its older generation (the writes
                // acknowledged alone would be lost).
                sim.run_for(300 * MS + x.below(SEC));
                if x.below(2) == 0 {
                    sim.witness_cut(primary, true);
                    sim.run_for(hold + SEC);
                    cut_both(sim, false, blackhole);
                    sim.run_for(x.below(SEC));
                    sim.witness_cut(primary, false);
                } else {
                    let d = freeze_len(x);
                    sim.freeze(primary, d);
                    sim.run_for(d + hold);
                    cut_both(sim, false, blackhole);
                }
                return;
            }
            sim.run_for(hold + SEC);
            cut_both(sim, false, blackhole);
            if let Some(i) = away {
                sim.run_for(r.below(SEC));
                sim.witness_cut(i, false);
            }
        }
        3 => {
            sim.witness_crash();
            sim.run_for(hold);
            sim.witness_restart();
        }
        4 => {
            let who = if r.below(2) == 0 { primary } else { secondary };
            witness_pair_of_faults(sim, x, who, primary, hold);
        }
        5 => {
            // The primary, cut from the witness, stalls.
            sim.witness_cut(primary, true);
            sim.run_for(r.below(SEC));
            let d = freeze_len(r);
            sim.freeze(primary, d);
            sim.run_for(d);
            sim.witness_cut(primary, false);
        }
        8 => {
            // Both links cut, then the witness lost by both nodes: the
            // primary's lease runs out and nobody may acknowledge until
            // the links heal.
            cut_both(sim, true, blackhole);
            sim.run_for(r.below(SEC));
            sim.witness_cut(0, true);
            sim.witness_cut(1, true);
            sim.run_for(hold + SEC);
            cut_both(sim, false, blackhole);
            sim.run_for(r.below(SEC));
            sim.witness_cut(0, false);
            sim.witness_cut(1, false);
        }
        6 => {
            // The primary crashes while the witness is down: no takeover
            // until the witness is back.
            sim.witness_crash();
            sim.crash(primary);
            sim.run_for(hold);
            sim.witness_restart();
            sim.run_for(2 * SEC);
            sim.restart(primary);
        }
        _ => {
            // Both links cut soon after a witness restart: nobody holds a
            // lease until its start-up window ends, then either may win.
            sim.witness_crash();
            sim.run_for(r.below(SEC));
            sim.witness_restart();
            sim.run_for(r.below(witness::LEASE_US));
            cut_both(sim, true, blackhole);
            sim.run_for(hold + SEC);
            cut_both(sim, false, blackhole);
        }
    }
}
