//! The core's own tests: two nodes wired back to back by one pair driver.

extern crate std;

use super::*;
use alloc::vec::Vec;

fn node(id: u16, gen: Option<u64>) -> Node<Vec<u8>> {
    sized(id, gen, 64)
}

/// A node of a volume of `blocks` blocks of 4 KiB.
fn sized(id: u16, gen: Option<u64>, blocks: u64) -> Node<Vec<u8>> {
    let cfg = Config::new(id, 3 - id, 7, blocks, 4096);
    Node::new(
        cfg,
        Meta::create(7, id, blocks, 4096, gen),
        u64::from(id),
        0,
    )
}

fn drain(n: &mut Node<Vec<u8>>) -> Vec<Action<Vec<u8>>> {
    core::iter::from_fn(|| n.poll_action()).collect()
}

/// Drive two nodes over a perfect link with instant disks until `until`.
fn connect(a: &mut Node<Vec<u8>>, b: &mut Node<Vec<u8>>, until: Micros) {
    run_pair(
        a,
        b,
        0,
        until,
        &|_, _, count| alloc::vec![0; count as usize * 8],
    );
}

/// `connect` from `from` to `until`; reads return `read(on_a, block,
/// count)`. Returns the last metadata each node persisted (a, b).
fn run_pair(
    a: &mut Node<Vec<u8>>,
    b: &mut Node<Vec<u8>>,
    from: Micros,
    until: Micros,
    read: &dyn Fn(bool, u64, u64) -> Vec<u8>,
) -> [Option<Meta>; 2] {
    run_pair_with(a, b, from, until, read, [true, true])
}

/// `run_pair`, with the MSL carrying a's frames only if `msl[0]` and
/// b's only if `msl[1]` (the LAN always carries both).
fn run_pair_with(
    a: &mut Node<Vec<u8>>,
    b: &mut Node<Vec<u8>>,
    from: Micros,
    until: Micros,
    read: &dyn Fn(bool, u64, u64) -> Vec<u8>,
    msl: [bool; 2],
) -> [Option<Meta>; 2] {
    let mut persisted = [None, None];
    drive(a, b, from, until, &mut |from_a, now, src, act| match act {
        Action::SendMsl { .. } if !msl[usize::from(!from_a)] => None,
        Action::Write { io, .. } | Action::Flush { io } => {
            src.handle(now, Event::IoDone { io, ok: true });
            None
        }
        Action::Read { io, block, count } => {
            read_done(src, now, io, read(from_a, block, count));
            None
        }
        Action::PersistMeta(m) => {
            persisted[usize::from(!from_a)] = Some(m);
            None
        }
        other => Some(other),
    });
    persisted
}

/// What a node does with an action that is not a frame for its peer:
/// `(from_a, now, the node, action)`; returns the action if it is one.
type Local<'a> =
    dyn FnMut(bool, Micros, &mut Node<Vec<u8>>, Action<Vec<u8>>) -> Option<Action<Vec<u8>>> + 'a;

/// Drive two nodes over a perfect link from `from` to `until` in steps of
/// 100 us; `local` handles their actions, and the frames it gives back go
/// to the peer.
fn drive(
    a: &mut Node<Vec<u8>>,
    b: &mut Node<Vec<u8>>,
    from: Micros,
    until: Micros,
    local: &mut Local,
) {
    let mut now = from;
    while now < until {
        now += 100;
        for from_a in [true, false] {
            let acts = if from_a { drain(a) } else { drain(b) };
            for act in acts {
                let (src, dst) = if from_a {
                    (&mut *a, &mut *b)
                } else {
                    (&mut *b, &mut *a)
                };
                if let Some(frame) = local(from_a, now, src, act) {
                    deliver(dst, now, frame);
                }
            }
        }
        a.handle(now, Event::Tick);
        b.handle(now, Event::Tick);
    }
}

/// A read of `n`'s volume completed at `now` with `data`.
fn read_done(n: &mut Node<Vec<u8>>, now: Micros, io: IoId, data: Vec<u8>) {
    n.handle(
        now,
        Event::ReadDone {
            io,
            ok: true,
            payload: Some(data),
        },
    );
}

/// Hand a frame one node sent to `dst` at `now` (a perfect link); any
/// other action comes back.
pub(super) fn deliver(
    dst: &mut Node<Vec<u8>>,
    now: Micros,
    act: Action<Vec<u8>>,
) -> Option<Action<Vec<u8>>> {
    match act {
        Action::SendMsl {
            header,
            msg,
            payload,
        } => dst.handle(
            now,
            Event::MslFrame {
                header,
                msg,
                payload,
                arrived: now,
            },
        ),
        Action::SendLan { header, hb } => lan_hb(dst, now, header, hb),
        other => return Some(other),
    }
    None
}

#[test]
fn test_connected_pair_unknown_ignorable_type_counted_only() {
    let (mut a, mut b) = (node(1, Some(5)), node(2, None));
    connect(&mut a, &mut b, 200_000);
    assert!(a.in_sync() && b.in_sync());
    a.handle(
        200_000,
        Event::MslUnknownType {
            code: 99,
            must_understand: false,
        },
    );
    assert!(a.in_sync());
    assert_eq!(a.counters.frames_unknown_ignored, 1);
}

#[test]
fn test_connected_pair_unknown_must_understand_refuses_session() {
    let (mut a, mut b) = (node(1, Some(5)), node(2, None));
    connect(&mut a, &mut b, 200_000);
    assert!(a.in_sync());
    a.handle(
        200_000,
        Event::MslUnknownType {
            code: 99,
            must_understand: true,
        },
    );
    assert!(!a.in_sync());
    assert_eq!(a.counters.frames_unknown_refused, 1);
}

#[test]
fn test_primary_clean_shutdown_starts_no_generation() {
    let (mut a, mut b) = (node(1, Some(5)), node(2, None));
    connect(&mut a, &mut b, 200_000);
    let before = a.meta().gens;
    a.shutdown();
    assert_eq!(a.meta().gens.current, before.current);
    assert_eq!(
        a.meta().gens.bitmap,
        0,
        "shutdown must not start change tracking"
    );
    assert!(a.meta().clean);
    assert_eq!(a.role(), Role::Secondary);
}

#[test]
fn test_in_sync_pair_verify_reports_exactly_the_differing_block() {
    let (mut a, mut b) = (node(1, Some(5)), node(2, None));
    connect(&mut a, &mut b, 200_000);
    assert!(a.in_sync() && b.in_sync());
    // Identical volumes except block 37 on the secondary.
    let read = |on_a: bool, block: u64, count: u64| -> Vec<u8> {
        (block..block + count)
            .flat_map(|blk| {
                let v = if !on_a && blk == 37 { 0xee } else { blk as u8 };
                [v; 4096]
            })
            .collect()
    };
    a.handle(
        200_000,
        Event::Admin(AdminCmd::Verify {
            start_block: 0,
            count: u64::MAX,
            resync: false,
        }),
    );
    let st = a.status().verify;
    assert!(st.active);
    assert_eq!(st.total_blocks, 64, "clipped to the volume");
    run_pair(&mut a, &mut b, 200_000, 300_000, &read);
    let st = a.status().verify;
    assert!(!st.active, "{st:?}");
    assert_eq!(st.checked_blocks, 64);
    assert_eq!(st.differing_blocks, 1);
    assert_eq!(st.first_differing[0], 37);
    assert!(a.in_sync(), "verify must not disturb the pair");
    // The secondary refuses to start one.
    b.handle(
        300_000,
        Event::Admin(AdminCmd::Verify {
            start_block: 0,
            count: 8,
            resync: false,
        }),
    );
    assert!(!b.status().verify.active);
    // Same data on both sides: nothing differs.
    a.handle(
        300_000,
        Event::Admin(AdminCmd::Verify {
            start_block: 0,
            count: 64,
            resync: false,
        }),
    );
    run_pair(&mut a, &mut b, 300_000, 400_000, &|_, blk, n| {
        (blk..blk + n).flat_map(|x| [x as u8; 4096]).collect()
    });
    let st = a.status().verify;
    assert_eq!((st.active, st.differing_blocks, st.runs), (false, 0, 2));
}

#[test]
fn test_verify_with_resync_resends_exactly_the_differing_block() {
    let (mut a, mut b) = (node(1, Some(5)), node(2, None));
    connect(&mut a, &mut b, 200_000);
    let full_sync = a.counters.resync_blocks_sent;
    let read = |on_a: bool, block: u64, count: u64| -> Vec<u8> {
        (block..block + count)
            .flat_map(|blk| [if !on_a && blk == 9 { 0xee } else { 1 }; 4096])
            .collect()
    };
    a.handle(
        200_000,
        Event::Admin(AdminCmd::Verify {
            start_block: 0,
            count: 64,
            resync: true,
        }),
    );
    run_pair(&mut a, &mut b, 200_000, 600_000, &read);
    assert_eq!(a.status().verify.differing_blocks, 1);
    assert!(a.in_sync() && b.in_sync(), "reconnected and resynced");
    assert_eq!(
        a.counters.resync_blocks_sent - full_sync,
        1,
        "only the differing block is resent"
    );
    assert_eq!(a.role(), Role::Primary);
}

/// `verify --resync` on a large volume: a differing block is on disk
/// as out of sync within a second of being found, while the run goes
/// on (a crash then must not forget it), and not with every chunk.
#[test]
fn test_verify_with_resync_persists_what_it_finds_within_a_second() {
    const BLOCKS: u64 = 4096;
    let (mut a, mut b) = (sized(1, Some(5), BLOCKS), sized(2, None, BLOCKS));
    let read = |on_a: bool, block: u64, count: u64| -> Vec<u8> {
        (block..block + count)
            .flat_map(|blk| [if !on_a && blk == 9 { 0xee } else { 1 }; 4096])
            .collect()
    };
    run_pair(&mut a, &mut b, 0, 1_000_000, &read);
    assert!(a.in_sync());
    a.handle(
        1_000_000,
        Event::Admin(AdminCmd::Verify {
            start_block: 0,
            count: BLOCKS,
            resync: true,
        }),
    );
    let mut now = 1_000_000;
    let mut on_disk = None;
    while a.status().verify.differing_blocks == 0 && now < 2_000_000 {
        let [on_a, _] = run_pair(&mut a, &mut b, now, now + 100, &read);
        on_disk = on_a.or(on_disk);
        now += 100;
    }
    assert_eq!(a.status().verify.differing_blocks, 1);
    // The peer stalls (nothing more is delivered): only time passes.
    let mut persisted = |a: &mut Node<Vec<u8>>| {
        for act in drain(a) {
            if let Action::PersistMeta(m) = act {
                on_disk = Some(m);
            }
        }
        on_disk.as_ref().is_some_and(|m| m.dirty.get(9))
    };
    // b stays alive on both paths (heartbeats), nothing else arrives.
    let end = now + BITMAP_PERSIST_INTERVAL_US;
    while now < end && !persisted(&mut a) {
        now += 20_000;
        b.handle(now, Event::Tick);
        drain(&mut b);
        let (header, hb) = (b.header(0, 0), b.my_heartbeat());
        let msg = Message::Heartbeat(hb);
        lan_hb(&mut a, now, header, hb);
        a.handle(
            now,
            Event::MslFrame {
                header,
                msg,
                payload: None,
                arrived: now,
            },
        );
    }
    assert!(persisted(&mut a), "block 9 persisted as out of sync");
    assert!(a.status().verify.active, "the run goes on");
}

#[test]
fn test_resync_rate_limit_paces_full_sync() {
    let limited = |id: u16, gen: Option<u64>| {
        let mut cfg = Config::new(id, 3 - id, 7, 64, 4096);
        cfg.resync_max_bytes_per_s = 100 * 4096; // 100 blocks per second
        Node::new(cfg, Meta::create(7, id, 64, 4096, gen), u64::from(id), 0)
    };
    let (mut a, mut b) = (limited(1, Some(5)), limited(2, None));
    // Data (not zeroes, which go as zero runs outside the rate cap).
    let data = |_: bool, _: u64, n: u64| alloc::vec![0xa5u8; n as usize * 4096];
    run_pair(&mut a, &mut b, 0, 300_000, &data);
    let sent = a.counters.resync_blocks_sent;
    assert!(!b.in_sync(), "64 blocks at 100/s cannot be done in 0.3 s");
    assert!(
        (5..=32).contains(&sent),
        "about 100 blocks/s for under 0.3 s, got {sent}"
    );
    run_pair(&mut a, &mut b, 300_000, 1_200_000, &data);
    assert!(a.in_sync() && b.in_sync(), "done after 1.2 s");
    assert_eq!(a.counters.resync_blocks_sent, 64);
}

/// With clients idle, a resync has no more bytes read but not yet applied
/// than `resync_max_in_flight_bytes` (what the peer's receive ring
/// holds), in messages of 256 KiB: with every read held back it stops
/// there, not at `resync_max_in_flight` reads.
#[test]
fn test_idle_resync_keeps_its_bytes_in_flight_under_the_bound() {
    let make = |id: u16, gen: Option<u64>| {
        let mut cfg = Config::new(id, 3 - id, 7, 4096, 4096);
        cfg.resync_max_in_flight_bytes = 1 << 20;
        cfg.resync_idle_us = 0; // no client has written: idle from the start
        Node::new(cfg, Meta::create(7, id, 4096, 4096, gen), u64::from(id), 0)
    };
    let (mut a, mut b) = (make(1, Some(5)), make(2, None));
    let mut reads = Vec::new();
    drive(
        &mut a,
        &mut b,
        0,
        300_000,
        &mut |from_a, now, src, act| match act {
            Action::Write { io, .. } | Action::Flush { io } => {
                src.handle(now, Event::IoDone { io, ok: true });
                None
            }
            Action::Read { block, count, .. } if from_a => {
                reads.push((block, count));
                None
            }
            Action::PersistMeta(_) => None,
            other => Some(other),
        },
    );
    assert!(
        a.cfg.resync_max_in_flight > 4,
        "the read count is not what binds"
    );
    assert_eq!(reads, [(0, 64), (64, 64), (128, 64), (192, 64)]);
}

#[test]
fn test_source_crash_mid_resync_resumes_from_persisted_progress() {
    const BLOCKS: u64 = 512;
    let limited = |id: u16, meta: Meta, now: Micros| {
        let mut cfg = Config::new(id, 3 - id, 7, BLOCKS, 4096);
        cfg.resync_max_bytes_per_s = 100 * 4096; // 100 blocks per second
                                                 // Every start of a node has the next epoch (the host persists it).
        cfg.epoch = u64::from(now > 0);
        Node::new(cfg, meta, u64::from(id), now)
    };
    let mut a = limited(1, Meta::create(7, 1, BLOCKS, 4096, Some(5)), 0);
    let mut b = limited(2, Meta::create(7, 2, BLOCKS, 4096, None), 0);
    let zeros = |_: bool, _: u64, n: u64| alloc::vec![0u8; n as usize * 4096];
    let [on_a, on_b] = run_pair(&mut a, &mut b, 0, 2_500_000, &zeros);
    let (on_a, on_b) = (on_a.expect("a persisted"), on_b.expect("b persisted"));
    assert!(!b.in_sync(), "512 blocks at 100/s take 5 s");
    // The persisted maps show the progress (about 240 blocks done, at
    // most one second of it not yet on disk) and are supersets of the
    // in-memory maps: a bit is never cleared on disk before memory.
    let left_a = a.meta().dirty.count();
    for (node, disk) in [(&a, &on_a), (&b, &on_b)] {
        let (mem, persisted) = (node.meta().dirty.count(), disk.dirty.count());
        assert!(
            persisted >= mem && persisted <= mem + 110,
            "persisted {persisted} vs in memory {mem}"
        );
        let mut check = disk.dirty.clone();
        assert_eq!(
            check.union(&node.meta().dirty),
            0,
            "persisted map is a superset"
        );
    }
    assert!(left_a < BLOCKS - 150, "resync progressed: {left_a} left");
    // kill -9 of the source: it restarts from what it persisted; the
    // target notices the loss, then the pair reconnects.
    let crash = 2_500_000;
    let mut a = limited(1, on_a.clone(), crash);
    let mut now = crash;
    while now < crash + 1_000_000 {
        now += 1_000;
        b.handle(now, Event::Tick);
        drain(&mut b);
    }
    run_pair(&mut a, &mut b, now, now + 200_000, &zeros);
    let total = b.status().resync_total;
    assert!(
        total > 0 && total <= on_a.dirty.count().max(on_b.dirty.count()) && total < BLOCKS - 150,
        "resumed with {total} blocks (source persisted {}, target {}, {left_a} left at the crash)",
        on_a.dirty.count(),
        on_b.dirty.count()
    );
    run_pair(&mut a, &mut b, now + 200_000, now + 5_000_000, &zeros);
    assert!(a.in_sync() && b.in_sync(), "resumed resync completed");
    assert!(
        a.counters.resync_blocks_sent <= total,
        "only the remaining blocks were sent: {}",
        a.counters.resync_blocks_sent
    );
}

/// Blocks a full sync of 8192 blocks sends in 0.3 s while a client
/// writes block 0 every millisecond (never idle), with this floor.
fn resync_under_load(floor: u64) -> u64 {
    let make = |id: u16, gen: Option<u64>| {
        let mut cfg = Config::new(id, 3 - id, 7, 8192, 4096);
        cfg.resync_min_bytes_per_s = floor;
        Node::new(cfg, Meta::create(7, id, 8192, 4096, gen), u64::from(id), 0)
    };
    let (mut a, mut b) = (make(1, Some(5)), make(2, None));
    // Data (not zeroes, which go as zero runs outside the floor's budget).
    let data = |_: bool, _: u64, n: u64| alloc::vec![0xa5u8; n as usize * 4096];
    for ms in 0..300u64 {
        let now = ms * 1000;
        a.handle(
            now,
            Event::ClientWrite {
                req: ms + 1,
                block: 0,
                count: 1,
                kind: IoKind::Write,
                fua: false,
                payload: Some(alloc::vec![1u8; 4096]),
            },
        );
        run_pair(&mut a, &mut b, now, now + 1000, &data);
    }
    assert!(a.serving() && a.counters.client_writes == 300);
    a.counters.resync_blocks_sent
}

#[test]
fn test_resync_floor_rate_enforced_under_client_load() {
    // One block in flight moves a block per link round trip (200-300 us
    // here): about 1000-1500 blocks in 0.3 s. A 64 MiB/s floor is
    // 16384 blocks/s: about 4900 blocks in 0.3 s.
    let only_in_flight = resync_under_load(0);
    let floored = resync_under_load(64 << 20);
    assert!(
        only_in_flight < 2000,
        "without a rate floor: {only_in_flight} blocks"
    );
    assert!(
        (4000..=5400).contains(&floored),
        "64 MiB/s floor for 0.3 s: {floored} blocks (without: {only_in_flight})"
    );
}

/// 64 blocks in extents of 8 (block b is in extent b / 8).
fn small_extents(id: u16, gen: Option<u64>) -> Node<Vec<u8>> {
    let mut cfg = Config::new(id, 3 - id, 7, 64, 4096);
    cfg.extent_blocks = 8;
    Node::new(cfg, Meta::create(7, id, 64, 4096, gen), u64::from(id), 0)
}

/// A pair of `small_extents` nodes (1 primary), in sync at 200 ms.
fn in_sync_small_extents() -> (Node<Vec<u8>>, Node<Vec<u8>>) {
    let (mut a, mut b) = (small_extents(1, Some(5)), small_extents(2, None));
    connect(&mut a, &mut b, 200_000);
    (a, b)
}

/// A one-block client write of `byte`s on `n`.
fn write_block(n: &mut Node<Vec<u8>>, now: Micros, req: u64, block: u64, byte: u8) {
    n.handle(
        now,
        Event::ClientWrite {
            req,
            block,
            count: 1,
            kind: IoKind::Write,
            fua: false,
            payload: Some(alloc::vec![byte; 4096]),
        },
    );
}

/// A LAN server-state packet from the peer, on adapter 0.
fn lan_hb(n: &mut Node<Vec<u8>>, now: Micros, header: Header, hb: Heartbeat) {
    n.handle(
        now,
        Event::LanFrame {
            adapter: 0,
            header,
            hb,
            arrived: now,
        },
    );
}

/// Whether `n` applied a received write in `extent` that no flush
/// there has covered yet.
fn unflushed_here(n: &Node<Vec<u8>>, extent: u64) -> bool {
    n.session
        .as_ref()
        .is_some_and(|s| s.recv.unstable_applied.contains_key(&extent))
}

/// A write the secondary received but has not flushed is not lost to
/// a later power loss of that node after it took over: at the session's
/// end it goes into its activity log (persisted) with a flush, and a
/// restart before that flush finished marks the extent for resync
/// (msl-sim seed 839 lost such writes with stable points 5 s apart).
#[test]
fn test_received_unflushed_writes_are_protected_when_the_secondary_takes_over() {
    let (mut a, mut b) = in_sync_small_extents();
    assert!(a.in_sync() && b.in_sync());
    write_block(&mut a, 200_000, 1, 9, 3);
    // Applied on b and acknowledged; b's next stable point is seconds
    // away.
    run_pair(
        &mut a,
        &mut b,
        200_000,
        210_000,
        &|_, _, n| alloc::vec![0; n as usize * 4096],
    );
    assert!(
        a.ios.count(io::Kind::ClientWrite) == 0,
        "the write was acknowledged"
    );
    assert!(unflushed_here(&b, 1), "applied on b, not yet flushed there");
    // The primary dies: b hears nothing more, ends the session, takes
    // over.
    let mut acts = Vec::new();
    let mut now = 210_000;
    while now < 1_500_000 {
        now += 1_000;
        b.handle(now, Event::Tick);
        acts.extend(drain(&mut b));
    }
    assert_eq!(b.role(), Role::Primary, "b took over");
    let persisted: Vec<&Meta> = acts
        .iter()
        .filter_map(|a| match a {
            Action::PersistMeta(m) => Some(m),
            _ => None,
        })
        .collect();
    assert!(
        persisted.last().is_some_and(|m| m.al.contains(&1)),
        "extent 1 (block 9) in b's persisted activity log: {:?}",
        persisted.iter().map(|m| &m.al).collect::<Vec<_>>()
    );
    let first_with_1 = acts
        .iter()
        .position(|a| matches!(a, Action::PersistMeta(m) if m.al.contains(&1)))
        .unwrap();
    assert!(
        acts[first_with_1..]
            .iter()
            .any(|a| matches!(a, Action::Flush { .. })),
        "a local flush issued once extent 1 was persisted"
    );
    // Power loss before that flush completed: b restarts from what it
    // persisted, with block 9's extent marked for resync from its peer.
    let mut last = persisted.last().map(|m| (*m).clone()).unwrap();
    last.clean = false;
    let restarted = small_extents(2, None);
    let cfg = restarted.config().clone();
    let b2: Node<Vec<u8>> = Node::new(cfg, last, 2, now);
    assert!(b2.meta().dirty.get(9), "block 9 marked out of sync");
}

/// With the activity log full of hot extents, received writes that
/// need protecting are marked out of sync instead: the log never grows
/// past `al_extents` (its on-disk slots are sized for it).
#[test]
fn test_protecting_received_writes_never_overfills_the_log() {
    let mut cfg = Config::new(2, 1, 7, 64, 4096);
    cfg.extent_blocks = 8;
    cfg.al_extents = 2;
    let mut n: Node<Vec<u8>> = Node::new(cfg, Meta::create(7, 2, 64, 4096, None), 2, 0);
    n.protect_received(alloc::vec![0, 1]);
    // Their flush has not completed: both hot, no room for more.
    n.protect_received(alloc::vec![5, 6]);
    assert_eq!(n.actlog.slots.len(), 2, "log capacity kept");
    let listed: Vec<u64> = n.actlog.slots.iter().map(|s| s.extent).collect();
    for x in [0u64, 1, 5, 6] {
        let covered = listed.contains(&x) || n.meta().dirty.get(x * 8);
        assert!(covered, "extent {x} neither in the log nor marked");
    }
    assert!(n.meta().dirty.get(40) && n.meta().dirty.get(48));
    // Once the flushes complete the slots are cold and give way.
    for a in drain(&mut n) {
        if let Action::Flush { io } = a {
            n.handle(1_000, Event::IoDone { io, ok: true });
        }
    }
    n.protect_received(alloc::vec![3]);
    assert_eq!(n.actlog.slots.len(), 2);
    assert!(
        n.actlog.slots.iter().any(|s| s.extent == 3),
        "a cold slot was reused"
    );
    assert!(!n.meta().dirty.get(24), "extent 3 needed no resync mark");
}

/// A planned switchover: the secondary takes the role at once, with the
/// writes it received but has not flushed in its activity log (a flush
/// on its way); those slots cool once that flush completes, although
/// the old primary never sends the new one a write.
#[test]
fn test_handover_puts_received_unflushed_writes_in_the_new_primarys_log() {
    let (mut a, mut b) = in_sync_small_extents();
    write_block(&mut a, 200_000, 1, 17, 4);
    let zeros = |_: bool, _: u64, n: u64| alloc::vec![0; n as usize * 4096];
    run_pair(&mut a, &mut b, 200_000, 210_000, &zeros);
    assert!(a.ios.count(io::Kind::ClientWrite) == 0);
    a.handle(210_000, Event::Admin(AdminCmd::Switchover));
    // One step at a time, so b's persisted log is seen before its
    // flush completes (run_pair completes flushes at once).
    let [_, on_b] = run_pair(&mut a, &mut b, 210_000, 210_300, &zeros);
    assert_eq!(b.role(), Role::Primary, "b took the role at once");
    assert!(
        on_b.is_some_and(|m| m.al.contains(&2)),
        "extent 2 (block 17) in b's persisted activity log"
    );
    run_pair(&mut a, &mut b, 210_300, 400_000, &zeros);
    let slot = b.actlog.slots.iter().find(|s| s.extent == 2).unwrap();
    assert!(b.al_cold(slot), "flushed here: cold");
    // The new primary mirrors its own writes to the old one.
    assert!(b.mirroring(), "b mirrors after the switchover");
    write_block(&mut b, 400_000, 2, 33, 5);
    run_pair(&mut a, &mut b, 400_000, 410_000, &zeros);
    assert!(b.ios.count(io::Kind::ClientWrite) == 0, "acknowledged");
    assert!(
        unflushed_here(&a, 4),
        "block 33 (extent 4) applied on the old primary"
    );
    assert_eq!(b.meta().dirty.count(), 0, "nothing left to resync");
}

/// A planned switchover whose handover never reaches the peer (the MSL
/// breaks first): the old primary hears on the LAN that the peer is
/// still secondary and no longer connected, takes the role back and
/// serves; the peer's copy is outdated, and it is resynced from the
/// changed blocks once the MSL is back.
#[test]
fn test_switchover_cut_before_the_peer_took_the_role_gives_it_back() {
    let (mut a, mut b) = in_sync_small_extents();
    let zeros = |_: bool, _: u64, n: u64| alloc::vec![0; n as usize * 4096];
    let before = a.meta().gens.current;
    a.handle(200_000, Event::Admin(AdminCmd::Switchover));
    assert_eq!(a.role(), Role::Secondary, "a handed the role over");
    run_pair_with(&mut a, &mut b, 200_000, 2_000_000, &zeros, [false, false]);
    assert_eq!(a.role(), Role::Primary, "a took the role back");
    assert!(a.serving());
    assert_eq!(b.role(), Role::Secondary);
    assert_eq!(
        b.meta().disk,
        DiskState::Outdated,
        "b knows it falls behind"
    );
    assert_eq!(
        b.meta().gens.current,
        before,
        "b never applied the handover"
    );
    assert_eq!(
        a.meta().gens.bitmap,
        before,
        "changes counted from b's generation"
    );
    write_block(&mut a, 2_000_000, 1, 17, 4);
    run_pair_with(&mut a, &mut b, 2_000_000, 2_100_000, &zeros, [false, false]);
    assert!(
        a.ios.count(io::Kind::ClientWrite) == 0,
        "acknowledged without the peer"
    );
    assert!(a.meta().dirty.get(17));
    // The MSL is back: b is resynced from the changed blocks only.
    run_pair(&mut a, &mut b, 2_100_000, 4_000_000, &zeros);
    assert!(a.in_sync() && b.in_sync());
    assert_eq!((a.role(), b.role()), (Role::Primary, Role::Secondary));
    assert_eq!(a.meta().dirty.count(), 0);
    assert_eq!(b.meta().disk, DiskState::UpToDate);
    assert!(
        a.meta().gens.bitmap == 0 && b.meta().gens.current == a.meta().gens.current,
        "one generation again"
    );
}

/// A secondary that was in sync and has no MSL session, hearing the
/// primary serve on the LAN, marks its copy outdated (so it cannot
/// take over with stale data later), even when it missed the moment
/// the MSL broke: a brief MSL flap clears `msl_lost_pending`, and the
/// session it ended then was never re-established.
#[test]
fn test_secondary_without_msl_hearing_the_primary_marks_its_copy_outdated() {
    let (mut a, mut b) = in_sync_small_extents();
    let zeros = |_: bool, _: u64, n: u64| alloc::vec![0; n as usize * 4096];
    run_pair_with(&mut a, &mut b, 200_000, 700_000, &zeros, [false, false]);
    assert!(b.session.is_none());
    // What the flap leaves: in sync when its last session ended, no
    // pending MSL loss, the peer known primary.
    b.peer.was_in_sync = true;
    b.peer.msl_lost_pending = false;
    b.peer.role = Some(Role::Primary);
    b.meta.disk = DiskState::UpToDate;
    run_pair_with(&mut a, &mut b, 700_000, 900_000, &zeros, [false, false]);
    assert_eq!(b.meta().disk, DiskState::Outdated);
    assert_eq!(a.role(), Role::Primary);
}

/// The HELLO path: the MSL fails one way (b's frames are lost), so b
/// keeps hearing a and never reports its MSL down; a's new session
/// attempts end b's session. When b's HELLO gets through again, a
/// takes the role back instead of connecting as a second secondary.
#[test]
fn test_switchover_lost_one_way_role_taken_back_at_the_next_session() {
    let (mut a, mut b) = in_sync_small_extents();
    b.cfg.miss_count *= 3; // b gives up on the MSL after a does
    let zeros = |_: bool, _: u64, n: u64| alloc::vec![0; n as usize * 4096];
    a.handle(200_000, Event::Admin(AdminCmd::Switchover));
    drain(&mut a); // the handover never leaves
                   // Both ways cut until a's session ends (no more retransmissions
                   // of the handover), then only b's frames are lost.
    run_pair_with(&mut a, &mut b, 200_000, 700_000, &zeros, [false, false]);
    assert!(a.session.is_none() && b.session.is_some());
    run_pair_with(&mut a, &mut b, 700_000, 1_500_000, &zeros, [true, false]);
    assert_eq!((a.role(), b.role()), (Role::Secondary, Role::Secondary));
    assert!(a.switchover.unconfirmed && b.session.is_none());
    let sent = a.counters.resync_blocks_sent;
    run_pair(&mut a, &mut b, 1_500_000, 4_000_000, &zeros);
    assert_eq!((a.role(), b.role()), (Role::Primary, Role::Secondary));
    assert!(a.serving() && a.in_sync() && b.in_sync());
    assert_eq!(a.meta().dirty.count(), 0);
    // Connecting as two secondaries would also end with a primary
    // (the one ahead), but through a full resync of the 64 blocks.
    assert!(
        a.counters.resync_blocks_sent - sent < 64,
        "changed blocks only, not the volume: {}",
        a.counters.resync_blocks_sent - sent
    );
}

/// The guards of taking the role back: only a LAN heartbeat sent after
/// the handover, by a peer still secondary in the generation before it,
/// with its MSL session ended, and hearing this node on the LAN.
#[test]
fn test_switchover_role_taken_back_only_on_a_heartbeat_that_proves_it() {
    let (mut a, mut b) = in_sync_small_extents();
    let before = a.meta().gens.current;
    // A heartbeat a already had before the handover, replayed later
    // (with the MSL down, as before the pair connected).
    let stale = {
        let h = b.header(0, 0);
        let mut hb = b.my_heartbeat();
        hb.msl_up = false;
        (hb.epoch, hb.counter) = a.peer.fresh_lan;
        (h, hb)
    };
    a.handle(200_000, Event::Admin(AdminCmd::Switchover));
    assert_eq!(a.role(), Role::Secondary);
    drain(&mut a); // the handover never leaves
    for n in [&mut a, &mut b] {
        n.handle(200_100, Event::MslLink { up: false });
        drain(n);
    }
    b.handle(300_000, Event::Tick);
    let (h, hb) = (b.header(0, 0), b.my_heartbeat());
    assert!(hb.role == Role::Secondary && !hb.msl_up && h.generation == before);
    let mut now = 300_000;
    let mut offer = |a: &mut Node<Vec<u8>>, header: Header, hb: Heartbeat| {
        now += 1_000;
        lan_hb(a, now, header, hb);
        a.role()
    };
    // Each a newer heartbeat than the last (older ones are replays).
    let mut fresh = 0;
    let mut next = |mut hb: Heartbeat| {
        fresh += 1;
        hb.counter += fresh;
        hb
    };
    let mut up = next(hb);
    up.msl_up = true;
    assert_eq!(
        offer(&mut a, h, up),
        Role::Secondary,
        "peer still connected"
    );
    let mut other = h;
    other.generation = before ^ 1;
    assert_eq!(
        offer(&mut a, other, next(hb)),
        Role::Secondary,
        "peer in another generation"
    );
    let mut deaf = next(hb);
    deaf.adapters = [AdapterHealth::default(); MAX_ADAPTERS];
    assert_eq!(
        offer(&mut a, h, deaf),
        Role::Secondary,
        "peer does not hear us"
    );
    // After a LAN outage a replayed heartbeat is taken as news.
    a.lan.lose();
    assert_eq!(
        offer(&mut a, stale.0, stale.1),
        Role::Secondary,
        "sent before the handover"
    );
    assert_eq!(offer(&mut a, h, next(hb)), Role::Primary, "taken back");
    assert!(a.serving());
}

/// The other side of that race: the peer applied the handover and the
/// MSL broke before the old primary heard so. The peer serves; the old
/// primary must not take the role back (that would be two primaries).
#[test]
fn test_switchover_cut_after_the_peer_took_the_role_is_not_undone() {
    let (mut a, mut b) = in_sync_small_extents();
    let zeros = |_: bool, _: u64, n: u64| alloc::vec![0; n as usize * 4096];
    a.handle(200_000, Event::Admin(AdminCmd::Switchover));
    // a's frames reach b; nothing of b's reaches a over the MSL.
    for act in drain(&mut a) {
        if let Action::SendMsl {
            header,
            msg,
            payload,
        } = act
        {
            b.handle(
                200_100,
                Event::MslFrame {
                    header,
                    msg,
                    payload,
                    arrived: 200_100,
                },
            );
        }
    }
    assert_eq!(b.role(), Role::Primary, "b applied the handover");
    run_pair_with(&mut a, &mut b, 200_100, 2_000_000, &zeros, [false, false]);
    assert_eq!(a.role(), Role::Secondary, "a did not take the role back");
    assert_eq!(b.role(), Role::Primary);
    assert!(b.serving());
    assert_eq!(
        a.meta().disk,
        DiskState::Outdated,
        "a knows it falls behind"
    );
    assert!(
        a.switchover.running.is_none(),
        "the switchover is over: a serves if it is ever primary again"
    );
}

#[test]
fn test_cold_start_pair_initial_primary_serves_and_syncs() {
    let (mut a, mut b) = (node(1, Some(5)), node(2, None));
    connect(&mut a, &mut b, 200_000);
    assert_eq!(a.role(), Role::Primary);
    assert!(a.serving());
    assert_eq!(b.role(), Role::Secondary);
    assert_eq!(b.meta().disk, DiskState::UpToDate);
    assert_eq!(a.meta().gens.current, b.meta().gens.current);
}

/// `auto_takeover` off (a cluster manager decides): the pair starts with
/// no primary until promoted, and a secondary whose primary dies waits for
/// the promotion instead of taking over.
#[test]
fn test_cluster_role_control_never_promotes_by_itself() {
    let cluster = |id: u16, gen: Option<u64>| {
        let mut cfg = Config::new(id, 3 - id, 7, 64, 4096);
        cfg.auto_takeover = false;
        Node::<Vec<u8>>::new(cfg, Meta::create(7, id, 64, 4096, gen), u64::from(id), 0)
    };
    let (mut a, mut b) = (cluster(1, Some(5)), cluster(2, None));
    connect(&mut a, &mut b, 200_000);
    assert_eq!(a.role(), Role::Secondary, "no cold-start promotion");
    assert_eq!(b.role(), Role::Secondary);
    a.handle(200_100, Event::Admin(AdminCmd::Promote { force: false }));
    run_pair(
        &mut a,
        &mut b,
        200_100,
        600_000,
        &|_, _, c| alloc::vec![0; c as usize * 8],
    );
    assert_eq!(a.role(), Role::Primary, "promoted by command");
    assert!(b.in_sync(), "the peer syncs from the promoted node");
    drain(&mut b);
    // The primary dies: b never takes over on its own.
    secondary_alone(&mut b, 600_000, 2_000_000, 10_000);
    assert_eq!(b.role(), Role::Secondary);
    assert!(drain(&mut b).iter().any(|x| matches!(
        x,
        Action::Notify(Notice::CannotTakeOver { reason }) if reason.contains("cluster")
    )));
    b.handle(2_000_100, Event::Admin(AdminCmd::Promote { force: false }));
    assert_eq!(b.role(), Role::Primary, "the cluster manager promotes it");
}

/// The role/disk transition table as text, one reason per line.
fn role_table() -> alloc::string::String {
    use core::fmt::Write as _;
    let mut out = alloc::string::String::new();
    let show = |v: Option<alloc::string::String>| v.unwrap_or_else(|| "-".into());
    for r in Reason::ALL {
        let t = r.transition();
        let _ = writeln!(
            out,
            "{:<24} from {:<9} -> role {:<9} disk {:<12} \"{}\"",
            alloc::format!("{r:?}"),
            show(t.from.map(|x| alloc::format!("{x:?}"))),
            show(t.role.map(|x| alloc::format!("{x:?}"))),
            show(t.disk.map(|x| alloc::format!("{x:?}"))),
            r.text()
        );
    }
    out
}

#[test]
fn test_role_transition_table_matches_snapshot() {
    let table = role_table();
    assert!(
        table == include_str!("role_table.txt"),
        "the role/disk transition table changed; if intended, put this in engine/core/src/node/role_table.txt:\n{table}"
    );
    let mut seen = alloc::vec::Vec::new();
    for r in Reason::ALL {
        assert!(!seen.contains(&r), "{r:?} listed twice");
        seen.push(r);
    }
}

#[test]
fn test_role_transition_refuses_a_reason_from_the_wrong_role() {
    // A secondary cannot hand the primary role over.
    let mut a = node(1, Some(5));
    assert_eq!(a.role(), Role::Secondary);
    let r = std::panic::catch_unwind(core::panic::AssertUnwindSafe(|| {
        a.transition(Reason::HandoverSent)
    }));
    assert!(r.is_err());
}

#[test]
fn test_liveness_keeps_the_latest_arrival_not_the_latest_processed() {
    let mut p = PathLiveness::default();
    assert!(p.heard(1_000));
    // A frame processed later but that arrived earlier moves nothing.
    assert!(!p.heard(500));
    assert_eq!(p.deadline(400_000), Some(401_000));
    assert!(!p.expire(400_999, 400_000));
    assert!(p.expire(401_000, 400_000));
}

/// A client write of one block (block 0) as request `req`.
fn write_block_0(req: u64) -> Event<Vec<u8>> {
    Event::ClientWrite {
        req,
        block: 0,
        count: 1,
        kind: IoKind::Write,
        fua: false,
        payload: Some(alloc::vec![0; 8]),
    }
}

/// Connect a pair (node 1 primary), then keep node 2 ticking alone (the
/// primary silent) from `from` to `until`, every `step`.
fn secondary_alone(b: &mut Node<Vec<u8>>, from: Micros, until: Micros, step: Micros) {
    let mut t = from;
    while t < until {
        t += step;
        b.handle(t, Event::Tick);
    }
}

#[test]
fn test_stalled_secondary_waits_a_full_dead_interval_of_its_own_time() {
    let (mut a, mut b) = (node(1, Some(5)), node(2, None));
    connect(&mut a, &mut b, 200_000);
    assert!(a.role() == Role::Primary && b.in_sync());
    drain(&mut b);
    // b does not run for 1 s; the primary died meanwhile (nothing queued).
    b.handle(1_200_000, Event::Tick);
    let acts = drain(&mut b);
    assert!(acts
        .iter()
        .any(|x| matches!(x, Action::Notify(Notice::Stalled { for_us }) if *for_us >= 1_000_000)));
    assert_eq!(b.role(), Role::Secondary, "no takeover on waking");
    assert!(b.status().msl_alive && b.status().lan_alive);
    assert_eq!(b.status().counters.stalls, 1);
    secondary_alone(&mut b, 1_200_000, 1_590_000, 10_000);
    assert_eq!(
        b.role(),
        Role::Secondary,
        "silence counted only while running"
    );
    secondary_alone(&mut b, 1_590_000, 1_620_000, 10_000);
    assert_eq!(
        b.role(),
        Role::Primary,
        "took over after a full dead interval"
    );
}

#[test]
fn test_input_overrun_voids_the_silence_measured_so_far() {
    let (mut a, mut b) = (node(1, Some(5)), node(2, None));
    connect(&mut a, &mut b, 200_000);
    assert!(b.in_sync());
    // Ticks 100 ms apart (under the stall threshold): only the host's
    // report of lost input restarts failure detection.
    b.handle(300_000, Event::Tick);
    drain(&mut b);
    b.handle(350_000, Event::InputOverrun);
    // Lost input is not a stall: no notice of one, counted apart.
    assert!(!drain(&mut b)
        .iter()
        .any(|x| matches!(x, Action::Notify(n) if n.kind() == "stalled")));
    assert_eq!(b.status().counters.stalls, 0);
    assert_eq!(b.status().counters.input_lost, 1);
    secondary_alone(&mut b, 350_000, 700_000, 50_000);
    assert_eq!(
        b.role(),
        Role::Secondary,
        "500 ms after the primary was last heard, but 350 ms after the overrun"
    );
    secondary_alone(&mut b, 700_000, 800_000, 20_000);
    assert_eq!(b.role(), Role::Primary);
}

#[test]
fn test_primary_that_lost_input_keeps_serving() {
    let (mut a, mut b) = (node(1, Some(5)), node(2, None));
    connect(&mut a, &mut b, 200_000);
    assert!(a.serving());
    drain(&mut a);
    // The host's receive ring overflowed while the core ran (ticks 100 ms
    // apart, under the stall threshold): a ran, so its heartbeats went out
    // and b cannot have taken over. It holds nothing.
    a.handle(300_000, Event::Tick);
    a.handle(350_000, Event::InputOverrun);
    assert!(a.serving() && !a.holding_after_stall());
    assert_eq!(a.status().counters.stalls, 0);
    a.handle(350_001, write_block_0(9));
    let acts = drain(&mut a);
    assert!(
        acts.iter().any(|x| matches!(x, Action::Write { .. })),
        "the write starts at once: {acts:?}"
    );
    assert!(!acts
        .iter()
        .any(|x| matches!(x, Action::Notify(n) if n.kind() == "stalled")));
}

#[test]
fn test_lost_input_reported_after_a_gap_is_a_stall() {
    let (mut a, mut b) = (node(1, Some(5)), node(2, None));
    connect(&mut a, &mut b, 200_000);
    drain(&mut a);
    // The host finds its ring overflowed when it runs again after 1 s: the
    // gap makes it a stall, whatever the event that reveals it.
    a.handle(1_200_000, Event::InputOverrun);
    assert!(!a.serving() && a.holding_after_stall());
    assert_eq!(a.status().counters.stalls, 1);
    assert_eq!(a.status().counters.input_lost, 0);
    assert!(drain(&mut a)
        .iter()
        .any(|x| matches!(x, Action::Notify(Notice::Stalled { for_us }) if *for_us >= 1_000_000)));
}

#[test]
fn test_stalled_primary_holds_writes_and_reads_for_a_dead_interval() {
    let (mut a, mut b) = (node(1, Some(5)), node(2, None));
    connect(&mut a, &mut b, 200_000);
    assert!(a.serving());
    drain(&mut a);
    a.handle(1_200_000, Event::Tick);
    assert!(!a.serving() && a.holding_after_stall());
    a.handle(1_200_001, write_block_0(9));
    let acts = drain(&mut a);
    assert!(
        !acts
            .iter()
            .any(|x| matches!(x, Action::Reply { .. } | Action::Write { .. })),
        "the write waits: neither started, failed nor acknowledged: {acts:?}"
    );
    assert_eq!(a.status().pending_writes, 1);
    // The peer stays silent for a full dead interval of a's running time:
    // a goes degraded, keeps the address and serves the write.
    let mut t = 1_200_001;
    while t < 1_600_000 {
        t += 10_000;
        a.handle(t, Event::Tick);
    }
    let acts = drain(&mut a);
    assert!(a.serving() && a.role() == Role::Primary);
    assert!(acts.iter().any(|x| matches!(x, Action::Write { .. })));
    assert!(!acts
        .iter()
        .any(|x| matches!(x, Action::ServiceAddress { hold: false })));
}

#[test]
fn test_replayed_heartbeat_dropped_even_on_a_dead_path() {
    let (mut a, mut b) = (node(1, Some(5)), node(2, None));
    connect(&mut a, &mut b, 200_000);
    // b's heartbeat as a captured it, and a newer one.
    let (h, old) = (b.header(0, 0), b.my_heartbeat());
    let newer = b.my_heartbeat();
    lan_hb(&mut a, 200_100, h, newer);
    let replayed = a.status().counters.frames_replayed;
    // b falls silent: a's LAN path dies (a stays primary, degraded).
    let mut t = 200_100;
    while t < 700_000 {
        t += 50_000;
        a.handle(t, Event::Tick);
    }
    assert!(!a.status().lan_alive);
    let mut old_secondary = old;
    old_secondary.role = Role::Primary;
    lan_hb(&mut a, 700_001, h, old_secondary);
    assert!(!a.status().lan_alive, "a replay does not revive the path");
    assert_eq!(a.status().counters.frames_replayed, replayed + 1);
    assert_eq!(a.status().peer_role, Some(Role::Secondary));
    // b restarts: its next epoch's first heartbeat is newer than anything
    // of the previous one.
    let mut restarted = b.my_heartbeat();
    (restarted.epoch, restarted.counter) = (old.epoch + 1, 1);
    lan_hb(&mut a, 700_002, h, restarted);
    assert!(a.status().lan_alive);
    assert_eq!(a.status().counters.frames_replayed, replayed + 1);
    // From then on the previous epoch is over on every path, the MSL
    // included (where a has heard nothing of the new one yet).
    let mut stale = b.my_heartbeat();
    stale.counter = u64::MAX;
    a.handle(
        700_003,
        Event::MslFrame {
            header: h,
            msg: Message::Heartbeat(stale),
            payload: None,
            arrived: 700_003,
        },
    );
    assert_eq!(a.status().counters.frames_replayed, replayed + 2);
}

#[test]
fn test_replayed_hello_never_ends_a_live_session() {
    let (mut a, mut b) = (node(1, Some(5)), node(2, None));
    connect(&mut a, &mut b, 200_000);
    assert!(a.in_sync());
    // A HELLO of b's that a already had (same epoch, an older counter),
    // claiming a new session: a replay, not a restart of b.
    let mut hello = b.my_hello();
    hello.session ^= 1 << 40;
    hello.counter = 1;
    let h = b.header(0, 0);
    let replayed = a.status().counters.frames_replayed;
    a.handle(
        200_100,
        Event::MslFrame {
            header: h,
            msg: Message::Hello(hello),
            payload: None,
            arrived: 200_100,
        },
    );
    assert!(a.in_sync(), "session still up");
    assert_eq!(a.status().counters.frames_replayed, replayed + 1);
    // The same HELLO from b's next start ends it (a restarted peer).
    hello.epoch += 1;
    a.handle(
        200_200,
        Event::MslFrame {
            header: h,
            msg: Message::Hello(hello),
            payload: None,
            arrived: 200_200,
        },
    );
    assert!(!a.in_sync());
}

#[test]
fn test_peer_judged_on_ticks_only_so_queued_frames_count_first() {
    let (mut a, mut b) = (node(1, Some(5)), node(2, None));
    connect(&mut a, &mut b, 200_000);
    // b runs (ticks under the stall threshold apart); the primary's
    // packets stop reaching it after 200 ms.
    secondary_alone(&mut b, 200_000, 550_000, 50_000);
    // The host feeds what queued while it was busy: first some other input
    // (no verdict on the peer after it), then the primary's packets, which
    // arrived in time, then the Tick.
    b.handle(
        620_000,
        Event::LanAdapter {
            adapter: 0,
            link_up: true,
            carrier: true,
        },
    );
    assert!(b.status().msl_alive && b.status().lan_alive);
    assert_eq!(b.role(), Role::Secondary);
    let (h, hb) = (a.header(0, 0), a.my_heartbeat());
    b.handle(
        620_000,
        Event::MslFrame {
            header: h,
            msg: Message::Heartbeat(hb),
            payload: None,
            arrived: 610_000,
        },
    );
    let hb = a.my_heartbeat();
    b.handle(
        620_000,
        Event::LanFrame {
            adapter: 0,
            header: h,
            hb,
            arrived: 610_000,
        },
    );
    b.handle(620_000, Event::Tick);
    assert_eq!(b.role(), Role::Secondary, "the primary was heard at 610 ms");
    assert!(!drain(&mut b)
        .iter()
        .any(|x| matches!(x, Action::Notify(Notice::PeerLost { .. }))));
    // Silent from then on: dead a full interval after the last arrival.
    secondary_alone(&mut b, 620_000, 1_000_000, 10_000);
    assert_eq!(b.role(), Role::Secondary);
    secondary_alone(&mut b, 1_000_000, 1_020_000, 10_000);
    assert_eq!(b.role(), Role::Primary);
}

fn witness_node(id: u16, gen: Option<u64>, on_no_quorum: NoQuorum) -> Node<Vec<u8>> {
    let mut cfg = Config::new(id, 3 - id, 7, 64, 4096);
    cfg.witness = true;
    cfg.on_no_quorum = on_no_quorum;
    Node::new(cfg, Meta::create(7, id, 64, 4096, gen), u64::from(id), 0)
}

/// A witness pair (a primary), in sync at 200 ms.
fn witness_pair(on_no_quorum: NoQuorum) -> (Node<Vec<u8>>, Node<Vec<u8>>) {
    let (mut a, mut b) = (
        witness_node(1, Some(5), on_no_quorum),
        witness_node(2, None, on_no_quorum),
    );
    connect(&mut a, &mut b, 200_000);
    assert!(a.role() == Role::Primary && b.in_sync());
    (a, b)
}

/// Ticks every 10 ms; instant local I/O. Returns every action but the
/// I/O itself.
fn alone(n: &mut Node<Vec<u8>>, from: Micros, until: Micros) -> Vec<Action<Vec<u8>>> {
    let mut out = Vec::new();
    let mut t = from;
    while t < until {
        t += 10_000;
        n.handle(t, Event::Tick);
        complete_io(n, t, &mut out);
    }
    out
}

fn complete_io(n: &mut Node<Vec<u8>>, t: Micros, out: &mut Vec<Action<Vec<u8>>>) {
    loop {
        let acts = drain(n);
        if acts.is_empty() {
            return;
        }
        for a in acts {
            match a {
                Action::Write { io, .. } | Action::Flush { io } => {
                    n.handle(t, Event::IoDone { io, ok: true })
                }
                other => out.push(other),
            }
        }
    }
}

fn acked(acts: &[Action<Vec<u8>>], req: u64) -> bool {
    acts.iter()
        .any(|x| matches!(x, Action::Reply { req: r, result: Ok(()) } if *r == req))
}

fn wants(acts: &[Action<Vec<u8>>]) -> Option<bool> {
    acts.iter().rev().find_map(|x| match x {
        Action::WantLease(w) => Some(*w),
        _ => None,
    })
}

#[test]
fn test_witness_off_never_asks_for_a_lease() {
    let (mut a, mut b) = (node(1, Some(5)), node(2, None));
    connect(&mut a, &mut b, 200_000);
    let mut acts = alone(&mut a, 200_000, 800_000);
    acts.extend(alone(&mut b, 200_000, 800_000));
    assert_eq!(wants(&acts), None);
    assert_eq!(b.role(), Role::Primary, "takeover without a witness");
}

#[test]
fn test_witness_primary_asks_for_the_lease_at_once() {
    let mut a = witness_node(1, Some(5), NoQuorum::Suspend);
    let mut b = witness_node(2, None, NoQuorum::Suspend);
    connect(&mut a, &mut b, 200_000);
    assert_eq!(a.role(), Role::Primary);
    assert!(a.status().lease_wanted);
    assert!(
        !b.status().lease_wanted,
        "an in-sync secondary does not compete"
    );
}

/// Rule (a): the secondary takes over only once it holds the lease.
#[test]
fn test_witness_secondary_takes_over_only_with_the_lease() {
    let (_a, mut b) = witness_pair(NoQuorum::Suspend);
    drain(&mut b);
    let acts = alone(&mut b, 200_000, 1_000_000);
    assert_eq!(b.role(), Role::Secondary, "primary silent, but no lease");
    assert_eq!(wants(&acts), Some(true));
    assert!(acts.iter().any(|x| matches!(
        x,
        Action::Notify(Notice::CannotTakeOver { reason }) if reason.contains("witness")
    )));
    b.handle(
        1_000_001,
        Event::Lease {
            held: true,
            until: 1_800_000,
        },
    );
    let acts = drain(&mut b);
    assert_eq!(b.role(), Role::Primary);
    assert!(acts.iter().any(|x| x_is(x, "lease_gained")));
    assert!(acts.iter().any(|x| x_is(x, "takeover")));
}

fn x_is(x: &Action<Vec<u8>>, kind: &str) -> bool {
    matches!(x, Action::Notify(n) if n.kind() == kind)
}

/// A lease that arrives after the primary was heard again does not make
/// the secondary take over, and it gives the wish up.
#[test]
fn test_witness_late_lease_after_the_peer_came_back_is_no_takeover() {
    let (mut a, mut b) = witness_pair(NoQuorum::Suspend);
    drain(&mut b);
    alone(&mut b, 200_000, 1_000_000);
    // The primary is heard on the LAN again.
    let hb = a.my_heartbeat();
    let h = a.header(0, 0);
    lan_hb(&mut b, 1_000_000, h, hb);
    b.handle(
        1_000_001,
        Event::Lease {
            held: true,
            until: 1_800_000,
        },
    );
    let acts = drain(&mut b);
    assert_eq!(b.role(), Role::Secondary);
    assert_eq!(wants(&acts), Some(false));
}

/// Rule (b): a primary that lost its peer acknowledges only while it
/// holds the lease; writes wait (neither failed nor acknowledged).
#[test]
fn test_witness_degraded_primary_acknowledges_only_with_the_lease() {
    let (mut a, _b) = witness_pair(NoQuorum::Suspend);
    drain(&mut a);
    alone(&mut a, 200_000, 700_000);
    assert!(!a.status().connected && a.role() == Role::Primary);
    assert!(!a.serving());
    write_block(&mut a, 700_001, 11, 0, 1);
    let mut acts = Vec::new();
    complete_io(&mut a, 700_001, &mut acts);
    acts.extend(alone(&mut a, 700_001, 900_000));
    assert!(
        !acts.iter().any(|x| matches!(x, Action::Reply { .. })),
        "{acts:?}"
    );
    assert_eq!(a.status().pending_writes, 1);
    a.handle(
        900_001,
        Event::Lease {
            held: true,
            until: 1_300_000,
        },
    );
    let mut acts = Vec::new();
    complete_io(&mut a, 900_001, &mut acts);
    assert!(acked(&acts, 11), "{acts:?}");
    assert!(a.serving());
    // The lease lapses (checked on a Tick): no more acknowledgements.
    let acts = alone(&mut a, 900_001, 1_310_000);
    assert!(acts.iter().any(|x| x_is(x, "lease_lost")));
    assert!(!a.serving());
    write_block(&mut a, 1_310_001, 12, 1, 2);
    let mut acts = Vec::new();
    complete_io(&mut a, 1_310_001, &mut acts);
    assert!(!acked(&acts, 12));
}

/// Rule (b) at the session's end: a write the peer never confirmed,
/// released when the primary goes degraded, is withheld until the lease.
#[test]
fn test_witness_write_in_flight_at_session_end_withheld_until_the_lease() {
    let (mut a, _b) = witness_pair(NoQuorum::Suspend);
    drain(&mut a);
    write_block(&mut a, 200_001, 21, 3, 7);
    let mut acts = Vec::new();
    complete_io(&mut a, 200_001, &mut acts);
    assert!(!acked(&acts, 21), "waits for the peer");
    let acts = alone(&mut a, 200_001, 800_000);
    assert!(!a.status().connected);
    assert!(!acked(&acts, 21), "withheld without the lease: {acts:?}");
    a.handle(
        800_001,
        Event::Lease {
            held: true,
            until: 1_500_000,
        },
    );
    assert!(acked(&drain(&mut a), 21));
}

/// Rule (c): a stall voids the lease, and a lease report on the event
/// that revealed the stall does not bring it back.
#[test]
fn test_witness_stall_voids_the_lease_until_renewed() {
    let (mut a, _b) = witness_pair(NoQuorum::Suspend);
    drain(&mut a);
    alone(&mut a, 200_000, 700_000);
    a.handle(
        700_001,
        Event::Lease {
            held: true,
            until: 5_000_000,
        },
    );
    assert!(a.serving());
    drain(&mut a);
    // a does not run for 1 s: the report it finds queued was made before.
    a.handle(
        1_800_000,
        Event::Lease {
            held: true,
            until: 5_000_000,
        },
    );
    let acts = drain(&mut a);
    assert!(acts.iter().any(|x| x_is(x, "lease_lost")));
    assert!(a.status().lease_until.is_none());
    // Past the post-stall hold, still no lease: nothing acknowledged.
    alone(&mut a, 1_800_000, 2_300_000);
    assert!(!a.serving());
    a.handle(
        2_300_001,
        Event::Lease {
            held: true,
            until: 3_000_000,
        },
    );
    assert!(a.serving());
}

/// Rule (d), suspend: an unreachable witness changes nothing.
#[test]
fn test_witness_unreachable_suspend_waits() {
    let (_a, mut b) = witness_pair(NoQuorum::Suspend);
    b.handle(200_001, Event::WitnessUnreachable { unreachable: true });
    alone(&mut b, 200_001, 1_000_000);
    assert_eq!(b.role(), Role::Secondary);
}

/// Rule (d), sft3: an unreachable witness means today's behaviour, for
/// the secondary's takeover and the degraded primary's writes.
#[test]
fn test_witness_unreachable_sft3_serves_without_the_lease() {
    let (mut a, mut b) = witness_pair(NoQuorum::Sft3);
    alone(&mut b, 200_000, 1_000_000);
    assert_eq!(
        b.role(),
        Role::Secondary,
        "the witness answers: wait for it"
    );
    b.handle(1_000_001, Event::WitnessUnreachable { unreachable: true });
    assert_eq!(b.role(), Role::Primary);
    a.handle(200_001, Event::WitnessUnreachable { unreachable: true });
    drain(&mut a);
    alone(&mut a, 200_001, 700_000);
    write_block(&mut a, 700_001, 31, 0, 1);
    let mut acts = Vec::new();
    complete_io(&mut a, 700_001, &mut acts);
    assert!(acked(&acts, 31));
}

/// Both links cut: the lease holder takes over, the old primary (no
/// lease) acknowledges nothing alone; on heal it steps down and the pair
/// resyncs from the new primary without a split brain.
#[test]
fn test_witness_both_links_cut_heal_resyncs_without_split_brain() {
    let (mut a, mut b) = witness_pair(NoQuorum::Suspend);
    drain(&mut a);
    drain(&mut b);
    write_block(&mut a, 200_001, 41, 2, 9);
    alone(&mut a, 200_001, 1_000_000);
    alone(&mut b, 200_000, 1_000_000);
    b.handle(
        1_000_001,
        Event::Lease {
            held: true,
            until: 60_000_000,
        },
    );
    assert_eq!(b.role(), Role::Primary);
    assert_eq!(a.role(), Role::Primary);
    assert!(!a.serving() && b.serving());
    write_block(&mut b, 1_000_002, 42, 5, 3);
    let mut acts = Vec::new();
    complete_io(&mut b, 1_000_002, &mut acts);
    assert!(acked(&acts, 42));
    run_pair(
        &mut a,
        &mut b,
        1_000_002,
        2_000_000,
        &|_, _, c| alloc::vec![0; c as usize * 8],
    );
    assert_eq!(a.role(), Role::Secondary);
    assert_eq!(b.role(), Role::Primary);
    assert_eq!(a.counters.split_brains + b.counters.split_brains, 0);
    assert!(a.in_sync() && b.in_sync());
    assert_eq!(a.meta().gens.current, b.meta().gens.current);
}

#[test]
fn test_witness_notice_names_are_stable() {
    assert_eq!(Notice::LeaseGained { until: 1 }.kind(), "lease_gained");
    assert_eq!(Notice::LeaseLost { reason: "x" }.kind(), "lease_lost");
    assert_eq!(
        Notice::WitnessReachable { reachable: false }.kind(),
        "witness_unreachable"
    );
    assert_eq!(
        Notice::WitnessReachable { reachable: true }.kind(),
        "witness_reachable"
    );
}

/// A lease held while the peer mirrored every write is void once the
/// peer is lost: the primary asks for a renewal at once and acknowledges
/// alone only under a lease reported after the loss.
#[test]
fn test_witness_lease_held_in_session_void_when_the_peer_is_lost() {
    let (mut a, _b) = witness_pair(NoQuorum::Suspend);
    a.handle(
        200_001,
        Event::Lease {
            held: true,
            until: 5_000_000,
        },
    );
    drain(&mut a);
    assert!(a.status().lease_until.is_some());
    write_block(&mut a, 200_002, 51, 4, 4);
    let mut acts = Vec::new();
    complete_io(&mut a, 200_002, &mut acts);
    acts.extend(alone(&mut a, 200_002, 700_000));
    assert!(!a.status().connected);
    assert!(acts.iter().any(|x| x_is(x, "lease_lost")));
    assert!(
        acts.iter().any(|x| matches!(x, Action::WantLease(true))),
        "asks for a renewal at once: {acts:?}"
    );
    assert!(
        !acked(&acts, 51),
        "not under the lease from before the loss"
    );
    a.handle(
        700_001,
        Event::Lease {
            held: true,
            until: 1_500_000,
        },
    );
    assert!(acked(&drain(&mut a), 51));
}

/// A heartbeat the primary sent while it mirrored every write to this
/// secondary, arriving late (held back on the wire, fresh by its counter)
/// after the primary went silent and while the secondary waits for the
/// lease, is no sign of writes this node lacks: the secondary keeps its
/// copy up to date and takes over once the witness grants the lease
/// (msl-sim seed 2049 stayed without a primary). The same heartbeat
/// reporting the pair out of sync marks the copy outdated.
#[test]
fn test_witness_late_in_sync_heartbeat_keeps_the_secondary_up_to_date() {
    for in_sync in [true, false] {
        let (mut a, mut b) = witness_pair(NoQuorum::Suspend);
        drain(&mut b);
        let mut hb = a.my_heartbeat();
        assert!(hb.in_sync && hb.role == Role::Primary);
        hb.in_sync = in_sync;
        let h = a.header(0, 0);
        let acts = alone(&mut b, 200_000, 1_000_000);
        assert!(acts.iter().any(|x| x_is(x, "cannot_take_over")));
        lan_hb(&mut b, 1_000_000, h, hb);
        let acts = drain(&mut b);
        assert!(acts.iter().any(|x| x_is(x, "peer_found")));
        if !in_sync {
            assert_eq!(b.meta().disk, DiskState::Outdated);
            assert!(acts.iter().any(|x| x_is(x, "mirror_shut_down")));
            continue;
        }
        assert_eq!(b.meta().disk, DiskState::UpToDate);
        assert!(!acts.iter().any(|x| x_is(x, "mirror_shut_down")));
        // Silent again: the secondary asks for the lease once more and
        // takes over with it.
        let acts = alone(&mut b, 1_000_000, 1_600_000);
        assert_eq!(wants(&acts), Some(true));
        assert_eq!(b.role(), Role::Secondary);
        b.handle(
            1_600_001,
            Event::Lease {
                held: true,
                until: 2_400_000,
            },
        );
        assert_eq!(b.role(), Role::Primary);
        assert!(b.serving());
    }
}

/// A run of blocks that reads as zeroes resyncs as "zero this range" (a
/// RESYNC_DATA with `data_flags::ZEROES` and no payload); the target
/// writes zeroes there (`IoKind::Zeroes`) over whatever it held, and ends
/// byte-identical to the source. Runs with data go with their bytes.
#[test]
fn test_resync_sends_zeroed_ranges_as_zero_messages_target_ends_identical() {
    const BS: usize = 4096;
    let (mut a, mut b) = (node(1, Some(5)), node(2, None));
    // The source: blocks 16..40 zero, the others each a distinct pattern.
    // The target: garbage everywhere (a full resync rewrites all of it).
    let mut disks: [Vec<Vec<u8>>; 2] = [
        (0..64u8)
            .map(|i| alloc::vec![if (16..40).contains(&i) { 0 } else { i + 1 }; BS])
            .collect(),
        (0..64).map(|_| alloc::vec![0xEE; BS]).collect(),
    ];
    let (mut zero_msgs, mut data_msgs) = (0, 0);
    let mut now = 0;
    while !(a.in_sync() && b.in_sync()) {
        assert!(now < 2_000_000, "no sync after {now} us");
        now += 100;
        for from_a in [true, false] {
            let me = usize::from(!from_a);
            let acts = if from_a { drain(&mut a) } else { drain(&mut b) };
            for act in acts {
                let (src, dst) = if from_a {
                    (&mut a, &mut b)
                } else {
                    (&mut b, &mut a)
                };
                if let Action::SendMsl {
                    msg: Message::ResyncData(r),
                    payload,
                    ..
                } = &act
                {
                    assert!(from_a, "only the source sends resync data");
                    if r.flags & data_flags::ZEROES != 0 {
                        assert!(payload.is_none(), "a zero range carries no bytes");
                        zero_msgs += 1;
                    } else {
                        let p = payload.as_ref().expect("a data range carries its bytes");
                        assert_eq!(p.len(), r.len as usize);
                        assert!(p.iter().any(|&x| x != 0));
                        data_msgs += 1;
                    }
                }
                match deliver(dst, now, act) {
                    Some(Action::Write {
                        io,
                        block,
                        count,
                        kind,
                        payload,
                        ..
                    }) => {
                        for k in 0..count as usize {
                            let d = &mut disks[me][block as usize + k];
                            match kind {
                                IoKind::Zeroes => d.fill(0),
                                IoKind::Write => {
                                    let p = payload.as_ref().expect("write with its bytes");
                                    d.copy_from_slice(&p[k * BS..(k + 1) * BS]);
                                }
                                IoKind::Trim => panic!("resync never trims"),
                            }
                        }
                        src.handle(now, Event::IoDone { io, ok: true })
                    }
                    Some(Action::Flush { io }) => src.handle(now, Event::IoDone { io, ok: true }),
                    Some(Action::Read { io, block, count }) => {
                        let range = block as usize..(block + count) as usize;
                        read_done(src, now, io, disks[me][range].concat())
                    }
                    _ => {}
                }
            }
        }
        a.handle(now, Event::Tick);
        b.handle(now, Event::Tick);
    }
    assert!(
        zero_msgs > 0 && data_msgs > 0,
        "{zero_msgs} zero ranges, {data_msgs} data ranges"
    );
    assert_eq!(b.counters.resync_blocks_received, 64);
    assert_eq!(b.meta().disk, DiskState::UpToDate);
    assert!(disks[0] == disks[1], "target differs from the source");
    assert!(disks[1][16..40].iter().all(|d| d.iter().all(|&x| x == 0)));
}

// ----- online verify over holes ---------------------------------------------

/// A thin volume: the blocks that hold data (by their byte), the rest a
/// hole that a read reports with its extent, as `SEEK_DATA` does.
struct Thin {
    data: BTreeMap<u64, u8>,
    blocks: u64,
    /// Writes to these blocks are acknowledged but lost (a faulty disk).
    lost: BTreeSet<u64>,
}

impl Thin {
    fn new(blocks: u64, data: &[(u64, u8)]) -> Self {
        Thin {
            data: data.iter().copied().collect(),
            blocks,
            lost: BTreeSet::new(),
        }
    }

    fn read(&self, io: IoId, block: u64, count: u64) -> Event<Vec<u8>> {
        if self.data.range(block..block + count).next().is_none() {
            let next = self
                .data
                .range(block..)
                .next()
                .map_or(self.blocks, |(&b, _)| b);
            return Event::ReadHole {
                io,
                blocks: next - block,
            };
        }
        let payload = (block..block + count)
            .flat_map(|b| [self.data.get(&b).copied().unwrap_or(0); 4096])
            .collect();
        Event::ReadDone {
            io,
            ok: true,
            payload: Some(payload),
        }
    }

    fn write(&mut self, block: u64, count: u64, kind: IoKind, payload: Option<&Vec<u8>>) {
        let range = block..block + count;
        let kept: Vec<u64> = match (kind, payload) {
            (IoKind::Write, Some(_)) => range.clone().collect(),
            // Trim, write-zeroes, a zero run (resync): a hole.
            _ => self.data.range(range.clone()).map(|(&b, _)| b).collect(),
        };
        for b in kept.into_iter().filter(|b| !self.lost.contains(b)) {
            match (kind, payload) {
                (IoKind::Write, Some(p)) => {
                    self.data.insert(b, p[((b - block) * 4096) as usize]);
                }
                _ => {
                    self.data.remove(&b);
                }
            }
        }
    }
}

/// What `run_thin` counted of a's frames.
#[derive(Default)]
struct VerifyTraffic {
    chunk_reqs: u64,
    zero_range_reqs: u64,
    zero_range_blocks: u64,
}

/// `run_pair` over two thin volumes: reads and writes act on them. With
/// `held`, a's reads are answered only when the caller hands them back
/// (answered from the volume as it was when they were issued, as a host
/// that executes its disk operations in order does).
fn run_thin(
    a: &mut Node<Vec<u8>>,
    b: &mut Node<Vec<u8>>,
    disks: &mut [Thin; 2],
    from: Micros,
    until: Micros,
    mut held: Option<&mut Vec<Event<Vec<u8>>>>,
    traffic: &mut VerifyTraffic,
) {
    drive(a, b, from, until, &mut |from_a, now, src, act| {
        let i = usize::from(!from_a);
        match act {
            Action::Write {
                io,
                block,
                count,
                kind,
                payload,
                ..
            } => {
                disks[i].write(block, count, kind, payload.as_ref());
                src.handle(now, Event::IoDone { io, ok: true });
                None
            }
            Action::Flush { io } => {
                src.handle(now, Event::IoDone { io, ok: true });
                None
            }
            Action::Read { io, block, count } => {
                let ev = disks[i].read(io, block, count);
                match held.as_deref_mut() {
                    Some(h) if from_a => h.push(ev),
                    _ => src.handle(now, ev),
                }
                None
            }
            Action::PersistMeta(_) => None,
            Action::SendMsl {
                msg: Message::VerifyReq(v),
                ..
            } if v.flags & msl_wire::verify_flags::ZERO_RANGE != 0 => {
                traffic.zero_range_reqs += 1;
                traffic.zero_range_blocks += u64::from(v.count);
                Some(act)
            }
            Action::SendMsl {
                msg: Message::VerifyReq(_),
                ..
            } => {
                traffic.chunk_reqs += 1;
                Some(act)
            }
            other => Some(other),
        }
    });
}

/// A thin pair of `blocks` blocks (16 GiB at 4 KiB), in sync, volumes as
/// given.
fn thin_pair(
    blocks: u64,
    a_data: &[(u64, u8)],
    b_data: &[(u64, u8)],
) -> (Node<Vec<u8>>, Node<Vec<u8>>, [Thin; 2]) {
    let (mut a, mut b) = (sized(1, Some(5), blocks), sized(2, None, blocks));
    // Both blank: the full sync copies a's few blocks and zeroes the rest.
    let mut disks = [Thin::new(blocks, a_data), Thin::new(blocks, a_data)];
    run_thin(
        &mut a,
        &mut b,
        &mut disks,
        0,
        1_000_000,
        None,
        &mut VerifyTraffic::default(),
    );
    assert!(a.in_sync() && b.in_sync());
    assert_eq!(disks[0].data, disks[1].data, "synced");
    disks[1].data = b_data.iter().copied().collect();
    (a, b, disks)
}

fn start_verify(a: &mut Node<Vec<u8>>, now: Micros, resync: bool) {
    a.handle(
        now,
        Event::Admin(AdminCmd::Verify {
            start_block: 0,
            count: u64::MAX,
            resync,
        }),
    );
    assert!(a.status().verify.active);
}

const THIN_BLOCKS: u64 = 1 << 22;

#[test]
fn test_verify_thin_pair_covers_holes_with_zero_ranges_and_finds_differences() {
    // Data at a few places on both; block 3_000_000 holds data on the
    // secondary only (in the primary's hole), block 100 differs, and
    // block 2_000_000 holds zero bytes on the secondary where the primary
    // has a hole (equal).
    let a_data = [(0, 1), (100, 2), (1_000_000, 3), (THIN_BLOCKS - 1, 4)];
    let b_data = [
        (0, 1),
        (100, 9),
        (1_000_000, 3),
        (2_000_000, 0),
        (3_000_000, 7),
        (THIN_BLOCKS - 1, 4),
    ];
    let (mut a, mut b, mut disks) = thin_pair(THIN_BLOCKS, &a_data, &b_data);
    start_verify(&mut a, 1_000_000, false);
    let mut t = VerifyTraffic::default();
    run_thin(
        &mut a, &mut b, &mut disks, 1_000_000, 1_500_000, None, &mut t,
    );
    let st = a.status().verify;
    assert!(!st.active && st.aborted.is_none(), "{st:?}");
    assert_eq!(st.checked_blocks, THIN_BLOCKS);
    assert_eq!(st.differing_blocks, 2, "{st:?}");
    assert_eq!(&st.first_differing[..2], &[100, 3_000_000]);
    // Everything but the chunks around the data went as zero ranges.
    // Two chunks (those in flight) at each of the 5 places with data.
    assert!(
        st.hole_blocks >= THIN_BLOCKS - 10 * verify::CHUNK_BLOCKS as u64,
        "{st:?}"
    );
    assert!(t.chunk_reqs <= 12, "{} chunks", t.chunk_reqs);
    assert!(
        t.zero_range_reqs < 40
            && t.zero_range_reqs >= THIN_BLOCKS / verify::MAX_ZERO_RANGE_BLOCKS as u64,
        "{} zero ranges",
        t.zero_range_reqs
    );
    assert_eq!(
        a.counters.frames_unexpected + b.counters.frames_unexpected,
        0
    );
}

#[test]
fn test_verify_thin_pair_with_resync_marks_the_block_present_only_on_the_secondary() {
    let a_data = [(5, 1)];
    let b_data = [(5, 1), (2_500_000, 6)];
    let (mut a, mut b, mut disks) = thin_pair(THIN_BLOCKS, &a_data, &b_data);
    start_verify(&mut a, 1_000_000, true);
    let mut t = VerifyTraffic::default();
    run_thin(
        &mut a, &mut b, &mut disks, 1_000_000, 2_000_000, None, &mut t,
    );
    let st = a.status().verify;
    assert_eq!((st.differing_blocks, st.first_differing[0]), (1, 2_500_000));
    // The resync that follows zeroes it on the secondary: a second run
    // finds both sides equal, all but a chunk as holes.
    run_thin(
        &mut a, &mut b, &mut disks, 2_000_000, 3_000_000, None, &mut t,
    );
    assert!(a.in_sync());
    assert_eq!(disks[0].data, disks[1].data);
    start_verify(&mut a, 3_000_000, false);
    run_thin(
        &mut a, &mut b, &mut disks, 3_000_000, 3_500_000, None, &mut t,
    );
    let st = a.status().verify;
    assert_eq!((st.active, st.differing_blocks, st.runs), (false, 0, 2));
    assert!(
        st.hole_blocks >= THIN_BLOCKS - 2 * verify::CHUNK_BLOCKS as u64,
        "{st:?}"
    );
}

/// A client write lands in the primary's hole after its chunk read saw
/// the hole and before the zero range goes out, and the secondary's disk
/// loses it: the zero range must not cover the written block (the
/// primary no longer has a hole there), so the loss is found, as it is
/// without holes.
#[test]
fn test_verify_zero_range_excludes_blocks_written_after_the_hole_was_seen() {
    let (mut a, mut b, mut disks) = thin_pair(THIN_BLOCKS, &[(0, 1)], &[(0, 1)]);
    disks[1].lost.insert(40_000);
    start_verify(&mut a, 1_000_000, false);
    let mut held = Vec::new();
    let mut t = VerifyTraffic::default();
    run_thin(
        &mut a,
        &mut b,
        &mut disks,
        1_000_000,
        1_000_100,
        Some(&mut held),
        &mut t,
    );
    assert_eq!(held.len(), verify::MAX_IN_FLIGHT, "both chunk reads held");
    assert_eq!(t.zero_range_reqs, 0);
    // The reads saw the volume before this write.
    write_block(&mut a, 1_000_100, 1, 40_000, 0x5a);
    run_thin(
        &mut a, &mut b, &mut disks, 1_000_100, 1_001_000, None, &mut t,
    );
    assert_eq!(disks[0].data.get(&40_000), Some(&0x5a));
    assert_eq!(disks[1].data.get(&40_000), None, "lost on the secondary");
    for ev in held {
        a.handle(1_001_000, ev);
    }
    run_thin(
        &mut a, &mut b, &mut disks, 1_001_000, 1_500_000, None, &mut t,
    );
    let st = a.status().verify;
    assert!(!st.active, "{st:?}");
    assert_eq!(st.checked_blocks, THIN_BLOCKS);
    assert_eq!(
        (st.differing_blocks, st.first_differing[0]),
        (1, 40_000),
        "{st:?}"
    );
    assert!(st.hole_blocks > THIN_BLOCKS - 4 * verify::CHUNK_BLOCKS as u64);
}
