//! The named scenarios: the four SFT III seed failures and the extra cases,
//! each asserting the role sequence and the notifications, plus the
//! standard safety checks of the simulator.

use msl_core::node::Notice;
use msl_core::AdminCmd;
use msl_wire::Role;

use crate::{AttackMode, Options, Sim, MS, SEC};

/// Figures from one scenario run.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub name: &'static str,
    pub detection_ms: Option<f64>,
    pub takeover_ms: Option<f64>,
    pub client_pause_ms: f64,
    pub acked_writes: u64,
}

fn ensure(cond: bool, what: &str, sim: &Sim) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        let mut s = format!("scenario check failed: {what}\n");
        for i in 0..2 {
            s.push_str(&format!(
                "  n{} roles {:?}; notices:\n",
                i + 1,
                sim.roles_seen(i)
            ));
            for (t, n) in sim.notices(i) {
                s.push_str(&format!(
                    "    {:>8.3}s {}: {n}\n",
                    *t as f64 / 1e6,
                    n.kind()
                ));
            }
        }
        Err(s)
    }
}

/// The standard end of a scenario: the simulator's final safety checks,
/// then its figures.
fn finish(
    sim: &mut Sim,
    name: &'static str,
    detection_ms: Option<f64>,
    takeover_ms: Option<f64>,
) -> Result<Outcome, String> {
    let client_pause_ms = ms(sim.longest_pause_us);
    sim.final_check()?;
    Ok(Outcome {
        name,
        detection_ms,
        takeover_ms,
        client_pause_ms,
        acked_writes: sim.report.acked_writes,
    })
}

/// Milliseconds from `t0` to node `i`'s first `kind` notice, if any.
fn ms_since(sim: &Sim, i: usize, kind: &str, t0: u64) -> Option<f64> {
    sim.first_notice_at(i, kind).map(|t| ms(t - t0))
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn pair(seed: u64) -> Result<Sim, String> {
    pair_overheard(seed, false)
}

/// `pair`, with every frame and packet recorded from the start if
/// `eavesdrop` (for an attacker started later).
fn pair_overheard(seed: u64, eavesdrop: bool) -> Result<Sim, String> {
    let mut o = Options::new(seed);
    o.msl.loss_ppm = 5_000;
    o.lan.loss_ppm = 5_000;
    o.msl.jitter_us = 300;
    let mut sim = Sim::new(o);
    if eavesdrop {
        sim.eavesdrop();
    }
    sim.start_pair()?;
    ensure(
        sim.role(0) == Some(Role::Primary),
        "n1 starts as primary",
        &sim,
    )?;
    sim.run_for(SEC);
    Ok(sim)
}

/// Scenario 1: the primary fails (kill -9 or power loss): the secondary takes over;
/// the old primary comes back as secondary and is resynced.
pub fn primary_fails(seed: u64) -> Result<Outcome, String> {
    let mut sim = pair(seed)?;
    let t0 = sim.now();
    sim.crash(0);
    sim.run_for(2 * SEC);
    ensure(sim.role(1) == Some(Role::Primary), "n2 took over", &sim)?;
    ensure(
        sim.has_notice(1, "peer_down") && sim.has_notice(1, "takeover"),
        "n2 notified peer down + takeover",
        &sim,
    )?;
    ensure(sim.holds_address(1), "n2 holds the service address", &sim)?;
    let detect = ms_since(&sim, 1, "peer_down", t0);
    let takeover = ms_since(&sim, 1, "takeover", t0);
    ensure(
        takeover.is_some_and(|t| t <= 500.0),
        "takeover within 0.5 s",
        &sim,
    )?;
    sim.restart(0);
    ensure(
        sim.run_until_converged(20 * SEC),
        "pair converges after n1 returns",
        &sim,
    )?;
    ensure(
        sim.role(0) == Some(Role::Secondary),
        "n1 rejoined as secondary",
        &sim,
    )?;
    ensure(
        sim.has_notice(0, "resync_started") && sim.has_notice(0, "resync_finished"),
        "n1 was resynced",
        &sim,
    )?;
    ensure(
        sim.roles_seen(1) == [Role::Secondary, Role::Primary],
        "n2 roles: secondary -> primary",
        &sim,
    )?;
    finish(&mut sim, "primary-fails", detect, takeover)
}

/// Scenario 2: the secondary fails: the primary says so, stays primary, tracks
/// changes, and resyncs the secondary when it returns.
pub fn secondary_fails(seed: u64) -> Result<Outcome, String> {
    let mut sim = pair(seed)?;
    let t0 = sim.now();
    sim.crash(1);
    sim.run_for(2 * SEC);
    ensure(sim.role(0) == Some(Role::Primary), "n1 still primary", &sim)?;
    ensure(
        sim.has_notice(0, "degraded"),
        "n1 notified: degraded, tracking changes",
        &sim,
    )?;
    ensure(
        sim.node(0).is_some_and(|n| n.meta().dirty.count() > 0),
        "n1 tracks changed blocks",
        &sim,
    )?;
    let detect = ms_since(&sim, 0, "degraded", t0);
    sim.restart(1);
    ensure(
        sim.run_until_converged(20 * SEC),
        "pair converges after n2 returns",
        &sim,
    )?;
    ensure(
        sim.has_notice(1, "resync_finished"),
        "n2 was resynced",
        &sim,
    )?;
    ensure(
        sim.roles_seen(0) == [Role::Secondary, Role::Primary],
        "n1 stayed primary throughout",
        &sim,
    )?;
    finish(&mut sim, "secondary-fails", detect, None)
}

/// Scenario 3: the MSL fails while both servers live: the secondary hears the primary
/// on the LAN, shuts its mirror side down and does NOT take over.
pub fn msl_fails(seed: u64) -> Result<Outcome, String> {
    let mut sim = pair(seed)?;
    let t0 = sim.now();
    sim.set_msl_cut(true);
    // Watch closely: the address must never move, n2 never primary.
    for _ in 0..300 {
        sim.run_for(10 * MS);
        ensure(
            sim.role(1) == Some(Role::Secondary) && !sim.holds_address(1),
            "n2 never takes over",
            &sim,
        )?;
        ensure(sim.holds_address(0), "service address stays on n1", &sim)?;
    }
    ensure(
        sim.has_notice(1, "mirror_shut_down"),
        "n2 shut its mirror side down",
        &sim,
    )?;
    ensure(!sim.has_notice(1, "takeover"), "no takeover on n2", &sim)?;
    ensure(
        sim.node(1)
            .is_some_and(|n| n.meta().disk == msl_wire::DiskState::Outdated),
        "n2 data marked outdated",
        &sim,
    )?;
    ensure(
        sim.has_notice(0, "degraded"),
        "n1 degraded, tracking changes",
        &sim,
    )?;
    let detect = ms_since(&sim, 1, "mirror_shut_down", t0);
    sim.set_msl_cut(false);
    ensure(
        sim.run_until_converged(20 * SEC),
        "pair converges after the MSL is repaired",
        &sim,
    )?;
    ensure(
        sim.roles_seen(1) == [Role::Secondary],
        "n2 was never primary",
        &sim,
    )?;
    finish(&mut sim, "msl-fails", detect, None)
}

/// Scenario 4: the primary's LAN adapter fails while in sync: planned switchover to
/// the secondary, the failed server restarts itself as secondary.
pub fn lan_adapter_fails(seed: u64) -> Result<Outcome, String> {
    let mut sim = pair(seed)?;
    let t0 = sim.now();
    sim.set_lan_adapter(0, false);
    sim.run_for(3 * SEC);
    ensure(
        sim.role(1) == Some(Role::Primary) && sim.holds_address(1),
        "n2 took over clients",
        &sim,
    )?;
    ensure(
        sim.has_notice(0, "switchover_started") && sim.has_notice(0, "switchover_done"),
        "n1 reported the switchover",
        &sim,
    )?;
    ensure(
        !sim.has_notice(1, "takeover"),
        "a planned switchover, not a failover",
        &sim,
    )?;
    ensure(
        sim.role(0) == Some(Role::Secondary),
        "n1 restarted as secondary",
        &sim,
    )?;
    let takeover = ms_since(&sim, 0, "switchover_done", t0);
    sim.set_lan_adapter(0, true);
    ensure(sim.run_until_converged(20 * SEC), "pair converges", &sim)?;
    finish(&mut sim, "lan-adapter-fails", None, takeover)
}

/// The administrator's planned switchover (`mslctl switchover`) under
/// client load, then the new primary loses power: every write it
/// acknowledged must be on the old primary, which takes over (the new
/// primary must mirror its writes from its first one).
pub fn admin_switchover_then_crash(seed: u64) -> Result<Outcome, String> {
    let mut sim = pair(seed)?;
    let t0 = sim.now();
    sim.admin(0, AdminCmd::Switchover);
    sim.run_for(2 * SEC);
    ensure(
        sim.role(1) == Some(Role::Primary) && sim.role(0) == Some(Role::Secondary),
        "n2 primary, n1 secondary after the switchover",
        &sim,
    )?;
    ensure(
        sim.has_notice(0, "switchover_done"),
        "n1 reported the switchover",
        &sim,
    )?;
    let takeover = ms_since(&sim, 0, "switchover_done", t0);
    sim.crash(1);
    sim.run_for(2 * SEC);
    ensure(
        sim.role(0) == Some(Role::Primary),
        "n1 took over from the crashed new primary",
        &sim,
    )?;
    sim.restart(1);
    ensure(sim.run_until_converged(20 * SEC), "pair converges", &sim)?;
    finish(&mut sim, "admin-switchover-then-crash", None, takeover)
}

/// The administrator's planned switchover, with the MSL cut the moment the
/// old primary has handed the role over, before the peer hears of it.
/// Nobody would serve if both stayed secondary: the old primary sees on
/// the LAN that the peer is still secondary and no longer connected, and
/// takes the role back. Never two primaries; once the MSL is back the pair converges and
/// no acknowledged write is lost.
pub fn admin_switchover_msl_cut(seed: u64) -> Result<Outcome, String> {
    let mut sim = pair(seed)?;
    let t0 = sim.now();
    sim.admin(0, AdminCmd::Switchover);
    while sim.role(0) == Some(Role::Primary) && sim.now() < t0 + 2 * SEC {
        sim.run_for(10);
    }
    ensure(
        sim.role(0) == Some(Role::Secondary),
        "n1 handed the role over",
        &sim,
    )?;
    let peer_took_it = sim.role(1) == Some(Role::Primary);
    sim.set_msl_cut(true);
    for _ in 0..300 {
        sim.run_for(10 * MS);
        ensure(
            !(sim.role(0) == Some(Role::Primary) && sim.role(1) == Some(Role::Primary)),
            "never two primaries",
            &sim,
        )?;
    }
    let serving = |i: usize| sim.node(i).is_some_and(|n| n.serving());
    ensure(
        serving(0) != serving(1),
        "exactly one server serves clients with the MSL still cut",
        &sim,
    )?;
    if !peer_took_it {
        ensure(
            sim.role(0) == Some(Role::Primary) && sim.holds_address(0),
            "n1 took the role back",
            &sim,
        )?;
        ensure(
            sim.roles_seen(1) == [Role::Secondary],
            "n2 was never primary",
            &sim,
        )?;
    }
    let takeover = sim
        .notices(0)
        .iter()
        .chain(sim.notices(1))
        .filter(|(t, n)| *t > t0 && n.kind() == "role_changed")
        .map(|(t, _)| *t)
        .max()
        .map(|t| ms(t - t0));
    sim.set_msl_cut(false);
    ensure(sim.run_until_converged(20 * SEC), "pair converges", &sim)?;
    finish(&mut sim, "admin-switchover-msl-cut", None, takeover)
}

/// Both links cut at once: each side believes the other dead. msl's
/// documented behaviour: the secondary takes over, the primary keeps
/// serving degraded, and on reconnect the split brain is detected and
/// REFUSED (never silently merged); the administrator picks the survivor
/// with `invalidate` on the other node, which is then fully resynced.
pub fn both_links_cut(seed: u64) -> Result<Outcome, String> {
    let mut sim = pair(seed)?;
    sim.set_msl_cut(true);
    sim.set_lan_cut(true);
    sim.run_for(2 * SEC);
    ensure(
        sim.role(0) == Some(Role::Primary) && sim.role(1) == Some(Role::Primary),
        "both sides primary during the partition",
        &sim,
    )?;
    sim.client(false);
    sim.run_for(SEC);
    sim.set_msl_cut(false);
    sim.set_lan_cut(false);
    let healed = sim.now();
    sim.run_for(2 * SEC);
    ensure(
        sim.has_notice(0, "split_brain_refused") && sim.has_notice(1, "split_brain_refused"),
        "split brain refused on both",
        &sim,
    )?;
    let merged = (0..2).any(|i| {
        sim.notices(i)
            .iter()
            .any(|(t, n)| *t >= healed && n.kind() == "resync_started")
    });
    ensure(!merged, "nothing merged", &sim)?;
    ensure(
        sim.holds_address(0) && !sim.holds_address(1),
        "only n1 holds the address after detection",
        &sim,
    )?;
    // The administrator keeps n1's data.
    sim.admin(1, AdminCmd::Demote);
    sim.admin(1, AdminCmd::Invalidate);
    ensure(
        sim.run_until_converged(20 * SEC),
        "pair converges after the administrator's decision",
        &sim,
    )?;
    ensure(sim.role(0) == Some(Role::Primary), "n1 primary", &sim)?;
    Ok(Outcome {
        name: "both-links-cut",
        detection_ms: None,
        takeover_ms: None,
        client_pause_ms: 0.0,
        acked_writes: sim.report.acked_writes,
    })
}

/// Both links cut at once with a witness that reaches both nodes: the
/// witness lets only one node acknowledge writes during the cut (the
/// primary, which holds the lease), no acknowledged write is lost, and
/// after the heal the pair resyncs by itself (no split brain, no
/// administrator) to identical volumes.
pub fn both_links_cut_witness(seed: u64) -> Result<Outcome, String> {
    let mut o = Options::new(seed);
    o.msl.loss_ppm = 5_000;
    o.lan.loss_ppm = 5_000;
    o.msl.jitter_us = 300;
    o.witness = true;
    let mut sim = Sim::new(o);
    sim.start_pair()?;
    ensure(
        sim.role(0) == Some(Role::Primary),
        "n1 starts as primary",
        &sim,
    )?;
    sim.run_for(SEC);
    let cut = sim.now();
    sim.set_msl_cut(true);
    sim.set_lan_cut(true);
    sim.run_for(3 * SEC);
    let healed = sim.now();
    let during = |i: usize| {
        sim.acks(i)
            .iter()
            .filter(|&&t| t > cut + 2 * MS && t < healed)
            .count()
    };
    let (a1, a2) = (during(0), during(1));
    ensure(
        a1 > 0,
        "n1 (lease holder) acknowledges during the cut",
        &sim,
    )?;
    ensure(a2 == 0, "n2 acknowledges nothing during the cut", &sim)?;
    ensure(
        sim.role(1) == Some(Role::Secondary),
        "n2 did not take over",
        &sim,
    )?;
    sim.set_msl_cut(false);
    sim.set_lan_cut(false);
    ensure(
        sim.run_until_converged(20 * SEC),
        "pair converges without the administrator",
        &sim,
    )?;
    ensure(
        !(0..2).any(|i| sim.has_notice(i, "split_brain_refused")),
        "no split brain",
        &sim,
    )?;
    finish(&mut sim, "both-links-cut-witness", None, None)
}

/// A pair with a witness (default network), in sync and serving for 1 s.
fn witness_pair_serving(seed: u64) -> Result<Sim, String> {
    let mut o = Options::new(seed);
    o.witness = true;
    let mut sim = Sim::new(o);
    sim.start_pair()?;
    sim.run_for(SEC);
    Ok(sim)
}

/// The same cut with the witness reachable from the secondary only (the
/// primary loses its peer and the witness at once): the primary never
/// renews its lease without the peer so acknowledges nothing alone, the
/// secondary wins the lease once the primary's has run out and takes
/// over, no acknowledged write is lost, and after the heal the old
/// primary steps down and is resynced without a split brain.
pub fn both_links_cut_witness_with_secondary(seed: u64) -> Result<Outcome, String> {
    let mut sim = witness_pair_serving(seed)?;
    sim.witness_cut(0, true);
    sim.set_msl_cut(true);
    sim.set_lan_cut(true);
    let cut = sim.now();
    // Client requests stuck on n1 (it holds them, without the lease) time
    // out after 3 s; then the client follows n2's address.
    sim.run_for(6 * SEC);
    ensure(
        sim.role(1) == Some(Role::Primary),
        "n2 took over with the lease",
        &sim,
    )?;
    let last1 = sim.acks(0).iter().copied().filter(|&t| t > cut).max();
    let first2 = sim.acks(1).iter().copied().filter(|&t| t > cut).min();
    ensure(
        first2.is_some() && last1.is_none_or(|l| Some(l) < first2),
        &format!(
            "n1 stopped acknowledging before n2 started (n1 last {last1:?}, n2 first {first2:?})"
        ),
        &sim,
    )?;
    ensure(sim.report().takeovers == 1, "one takeover", &sim)?;
    sim.set_msl_cut(false);
    sim.set_lan_cut(false);
    sim.witness_cut(0, false);
    ensure(
        sim.run_until_converged(20 * SEC),
        "pair converges without the administrator",
        &sim,
    )?;
    ensure(sim.role(1) == Some(Role::Primary), "n2 stays primary", &sim)?;
    ensure(
        !(0..2).any(|i| sim.has_notice(i, "split_brain_refused")),
        "no split brain",
        &sim,
    )?;
    finish(
        &mut sim,
        "both-links-cut-witness-with-secondary",
        None,
        None,
    )
}

/// With a witness, the secondary crashes and the primary, serving alone
/// under the lease, does not run for 95 ms (shorter than the core's stall
/// threshold): its host's lease client drops the lease at once, and the
/// host tells the core before anything queued meanwhile, so the primary
/// acknowledges nothing until a lease won after the stall (the simulator
/// fails any acknowledgement without its peer that the host's client does
/// not cover). It serves again under the new lease, and the pair resyncs
/// when the secondary returns.
pub fn lease_holder_short_stall_alone(seed: u64) -> Result<Outcome, String> {
    let mut sim = witness_pair_serving(seed)?;
    sim.crash(1);
    sim.run_for(SEC);
    ensure(
        sim.node(0)
            .is_some_and(|n| n.serving() && !n.status().connected),
        "n1 serves alone under the lease",
        &sim,
    )?;
    sim.freeze(0, 95 * MS);
    sim.run_for(95 * MS);
    let thaw = sim.now();
    sim.run_for(SEC);
    let after = |kind: &str| {
        sim.notices(0)
            .iter()
            .find(|(t, n)| *t >= thaw && n.kind() == kind)
            .map(|(t, _)| *t)
    };
    let (lost, regained) = (after("lease_lost"), after("lease_gained"));
    ensure(
        lost == Some(thaw) && regained.is_some(),
        &format!(
            "n1 lost the lease at the thaw and won a new one (lost {lost:?}, won {regained:?})"
        ),
        &sim,
    )?;
    let regained = regained.unwrap_or(0);
    ensure(
        !sim.acks(0).iter().any(|&a| a >= thaw && a < regained)
            && sim.acks(0).iter().any(|&a| a >= regained),
        "n1 acknowledged nothing between the thaw and the new lease, then served again",
        &sim,
    )?;
    sim.restart(1);
    finish(&mut sim, "lease-holder-short-stall-alone", None, None)
}

/// The primary crashes while it is resyncing the secondary (a double
/// failure: unflushed writes on the only up-to-date copy may be lost, as
/// NBD allows; flushed ones may not). The inconsistent target must not
/// take over; when the primary returns it resumes the resync where its
/// persisted progress stopped instead of starting over.
pub fn primary_crash_during_resync(seed: u64) -> Result<Outcome, String> {
    let mut o = Options::new(seed);
    o.relaxed_durability = true;
    // A resync of 50 blocks/s over 512 blocks: the crash comes 4 s in.
    o.volume_blocks = 512;
    let mut sim = Sim::new(o);
    sim.start_pair()?;
    sim.set_resync_rate(0, 50 * 4096);
    sim.crash(1);
    sim.run_for(3 * SEC);
    sim.restart(1);
    // Wait for the resync to start, then kill the source.
    for _ in 0..500 {
        sim.run_for(MS);
        if sim.has_notice(1, "resync_started") {
            break;
        }
    }
    ensure(sim.has_notice(1, "resync_started"), "resync started", &sim)?;
    // Clients pause: only the resync's own progress writes reach n1's
    // metadata (client writes persist it too, as the activity log moves).
    sim.client(false);
    sim.run_for(4 * SEC);
    let totals = |sim: &Sim| -> Vec<u64> {
        sim.notices(1)
            .iter()
            .filter_map(|(_, n)| match n {
                Notice::ResyncStarted { blocks, .. } => Some(*blocks),
                _ => None,
            })
            .collect()
    };
    let first = totals(&sim).last().copied().unwrap_or(0);
    let left = sim.node(0).map_or(0, |n| n.status().resync_remaining);
    ensure(
        left > 0 && left + 100 < first,
        &format!("the resync progressed: {left} of {first} blocks left at the crash"),
        &sim,
    )?;
    sim.crash(0);
    sim.run_for(2 * SEC);
    ensure(
        sim.role(1) == Some(Role::Secondary) && !sim.holds_address(1),
        "inconsistent target does not take over",
        &sim,
    )?;
    ensure(
        sim.has_notice(1, "cannot_take_over"),
        "n2 says why it cannot take over",
        &sim,
    )?;
    sim.restart(0);
    sim.client(true);
    ensure(
        sim.run_until_converged(20 * SEC),
        "pair converges when n1 returns",
        &sim,
    )?;
    ensure(sim.role(0) == Some(Role::Primary), "n1 primary again", &sim)?;
    // Resumed: what was left, at most a second of unpersisted progress (50
    // blocks) and the crashed primary's hot activity-log extents (4 x 8).
    let second = totals(&sim).last().copied().unwrap_or(0);
    ensure(
        second >= left && second <= left + 50 + 32 && second < first,
        &format!("the resync resumed: {first} blocks, {left} left at the crash, {second} after"),
        &sim,
    )?;
    finish(&mut sim, "primary-crash-during-resync", None, None)
}

/// A saturated MSL (slow link, deep client queue) never causes a false
/// takeover: control frames do not wait behind data.
pub fn saturated_msl_no_false_takeover(seed: u64) -> Result<Outcome, String> {
    let mut o = Options::new(seed);
    o.al_extents = 8; // the whole volume: the link, not the AL, is the limit
    let mut sim = Sim::new(o);
    sim.start_pair()?;
    // Now saturate: a very slow link (data queues for seconds behind a deep
    // client queue) while heartbeats keep their own path.
    sim.opts.msl.data_frame_us = 3_000;
    sim.opts.client_qd = 32;
    sim.opts.client_think_us = 100;
    sim.run_for(10 * SEC);
    ensure(
        sim.report.acked_writes > 100,
        &format!(
            "the client kept writing through the saturated link ({} acked)",
            sim.report.acked_writes
        ),
        &sim,
    )?;
    ensure(
        !sim.has_notice(1, "takeover") && !sim.has_notice(0, "degraded"),
        "no false failure detection",
        &sim,
    )?;
    ensure(
        sim.roles_seen(1) == [Role::Secondary],
        "n2 never primary",
        &sim,
    )?;
    finish(&mut sim, "saturated-msl", None, None)
}

fn n1_stayed_primary(sim: &Sim) -> Result<(), String> {
    ensure(
        sim.roles_seen(0) == [Role::Secondary, Role::Primary] && sim.holds_address(0),
        "n1 stayed primary and kept the service address",
        sim,
    )
}

/// A secondary that does not run for `d` (VM pause, SIGSTOP) does not take
/// over when it runs again: the primary's frames that arrived meanwhile
/// are read before any timer, and its silence counts only from when it
/// runs. The primary meanwhile goes degraded (if the freeze outlasts its
/// dead interval) and resyncs the secondary afterwards.
fn secondary_frozen(seed: u64, d: u64, name: &'static str) -> Result<Outcome, String> {
    let mut sim = pair(seed)?;
    sim.freeze(1, d);
    sim.run_for(d);
    let thawed = sim.now();
    ensure(
        sim.has_notice(1, "stalled"),
        "n2 noticed that it stalled",
        &sim,
    )?;
    sim.run_for(2 * SEC);
    ensure(
        !sim.has_notice(1, "takeover") && sim.roles_seen(1) == [Role::Secondary],
        "n2 never took over",
        &sim,
    )?;
    n1_stayed_primary(&sim)?;
    ensure(
        sim.acks(0).iter().any(|&t| t > thawed),
        "n1 went on acknowledging writes",
        &sim,
    )?;
    ensure(sim.run_until_converged(20 * SEC), "pair converges", &sim)?;
    finish(&mut sim, name, None, None)
}

/// The secondary frozen for 0.6 s (longer than the dead interval).
pub fn secondary_frozen_short(seed: u64) -> Result<Outcome, String> {
    secondary_frozen(seed, 600 * MS, "secondary-frozen-0.6s")
}

/// The secondary frozen for 10 s.
pub fn secondary_frozen_long(seed: u64) -> Result<Outcome, String> {
    secondary_frozen(seed, 10 * SEC, "secondary-frozen-10s")
}

/// Both paths drop everything for 300 ms (under the dead interval), then
/// the secondary does not run for 140 ms (under the stall threshold, so
/// it is not a stall) while the primary's heartbeats arrive again. When
/// it runs, the frames that arrived meanwhile must count before any
/// timer, by their arrival time: the primary was silent for 300 ms, not
/// 440 ms, and the secondary must not take over from a live primary.
pub fn outage_then_short_freeze(seed: u64) -> Result<Outcome, String> {
    let mut sim = pair(seed)?;
    sim.set_msl_blackhole(true);
    sim.set_lan_cut(true);
    sim.run_for(300 * MS);
    sim.set_msl_blackhole(false);
    sim.set_lan_cut(false);
    sim.freeze(1, 140 * MS);
    sim.run_for(140 * MS);
    sim.run_for(2 * SEC);
    ensure(!sim.has_notice(1, "stalled"), "140 ms is not a stall", &sim)?;
    ensure(
        sim.roles_seen(1) == [Role::Secondary]
            && sim.roles_seen(0) == [Role::Secondary, Role::Primary],
        "n2 never took over, n1 stayed primary",
        &sim,
    )?;
    ensure(sim.run_until_converged(20 * SEC), "pair converges", &sim)?;
    finish(&mut sim, "outage-then-short-freeze", None, None)
}

/// The primary does not run for 2 s: the secondary takes over. When the
/// old primary runs again it learns from the frames queued meanwhile that
/// it was replaced: it acknowledges no write (the ones it held fail), gives
/// the service address up and rejoins as a resynced secondary.
pub fn primary_frozen(seed: u64) -> Result<Outcome, String> {
    let mut sim = pair(seed)?;
    let t0 = sim.now();
    sim.freeze(0, 2 * SEC);
    sim.run_for(2 * SEC);
    let thawed = sim.now();
    ensure(
        sim.role(1) == Some(Role::Primary) && sim.has_notice(1, "takeover"),
        "n2 took over while n1 was frozen",
        &sim,
    )?;
    let takeover = ms_since(&sim, 1, "takeover", t0);
    sim.run_for(2 * SEC);
    ensure(
        sim.has_notice(0, "stalled"),
        "n1 noticed that it stalled",
        &sim,
    )?;
    ensure(
        sim.role(0) == Some(Role::Secondary) && !sim.holds_address(0),
        "n1 stepped down and released the service address",
        &sim,
    )?;
    ensure(
        sim.node(0)
            .is_some_and(|n| n.status().counters.deposed == 1),
        "n1 counted itself deposed once",
        &sim,
    )?;
    ensure(
        !sim.has_notice(0, "degraded"),
        "n1 never went degraded",
        &sim,
    )?;
    ensure(
        sim.acks(0).iter().all(|&t| t < t0),
        "n1 acknowledged nothing after it froze",
        &sim,
    )?;
    ensure(
        sim.acks(1).iter().any(|&t| t > thawed),
        "n2 serves the client",
        &sim,
    )?;
    ensure(
        sim.run_until_converged(20 * SEC),
        "pair converges with n2 primary",
        &sim,
    )?;
    ensure(
        sim.role(0) == Some(Role::Secondary) && sim.has_notice(0, "resync_finished"),
        "n1 rejoined as a resynced secondary",
        &sim,
    )?;
    finish(&mut sim, "primary-frozen-2s", None, takeover)
}

/// The primary dies while an attacker replays its earlier heartbeats (and
/// every other frame it sent) to the secondary on both paths, every 5 ms:
/// the replays are not fresh, so they neither keep the paths alive nor
/// report the dead primary's role, and the secondary takes over in time.
pub fn replayed_heartbeats_as_primary_dies(seed: u64) -> Result<Outcome, String> {
    let mut sim = pair_overheard(seed, true)?;
    sim.attacker(AttackMode::ReplayFrom(0), 5 * MS);
    sim.run_for(500 * MS);
    let t0 = sim.now();
    sim.crash(0);
    sim.run_for(2 * SEC);
    ensure(
        sim.role(1) == Some(Role::Primary) && sim.has_notice(1, "takeover"),
        "n2 took over despite the replays",
        &sim,
    )?;
    let takeover = ms_since(&sim, 1, "takeover", t0);
    ensure(
        takeover.is_some_and(|t| t <= 500.0),
        "takeover within 0.5 s",
        &sim,
    )?;
    let dropped = sim
        .node(1)
        .map_or(0, |n| n.status().counters.frames_replayed);
    ensure(
        sim.report().replays_delivered > 100 && dropped > 10,
        &format!(
            "replays reached n2 ({}) and n2 dropped its heartbeats and HELLOs among them as not fresh ({dropped})",
            sim.report().replays_delivered
        ),
        &sim,
    )?;
    sim.restart(0);
    ensure(
        sim.run_until_converged(20 * SEC),
        "pair converges after n1 returns",
        &sim,
    )?;
    finish(&mut sim, "replayed-heartbeats", None, takeover)
}

/// The LAN between the servers is cut (the secondary hears the primary
/// on the MSL only, its LAN path dead), and an attacker on the
/// secondary's side of the cut replays the primary's earlier packets.
/// Then the primary dies. The replays must not revive the dead LAN path
/// (which would make the secondary see the primary alive on the LAN once
/// the MSL falls silent, shut its mirror side down and never take over):
/// a packet is judged fresh whatever the state of its path.
pub fn replayed_heartbeats_on_a_dead_lan(seed: u64) -> Result<Outcome, String> {
    let mut sim = pair_overheard(seed, true)?;
    sim.set_lan_cut(true);
    sim.run_for(SEC);
    ensure(
        sim.node(1)
            .is_some_and(|n| !n.status().lan_alive && n.in_sync()),
        "n2 in sync over the MSL, its LAN path dead",
        &sim,
    )?;
    sim.attacker(AttackMode::ReplayFrom(0), 5 * MS);
    sim.run_for(500 * MS);
    let t0 = sim.now();
    sim.crash(0);
    sim.run_for(2 * SEC);
    ensure(
        sim.role(1) == Some(Role::Primary) && !sim.has_notice(1, "mirror_shut_down"),
        "n2 took over despite the replays on its dead LAN path",
        &sim,
    )?;
    let takeover = ms_since(&sim, 1, "takeover", t0);
    ensure(
        takeover.is_some_and(|t| t <= 500.0),
        "takeover within 0.5 s",
        &sim,
    )?;
    sim.set_lan_cut(false);
    sim.restart(0);
    ensure(
        sim.run_until_converged(20 * SEC),
        "pair converges after n1 returns",
        &sim,
    )?;
    finish(&mut sim, "replayed-heartbeats-dead-lan", None, takeover)
}

/// An attacker replays every LAN packet it saw on the MSL and every MSL
/// frame on the LAN, every 2 ms: each fails authentication (the domains
/// have their own keys; the simulator fails the run if one verifies), and
/// the pair runs on undisturbed.
pub fn cross_domain_replays_rejected(seed: u64) -> Result<Outcome, String> {
    let mut sim = pair_overheard(seed, true)?;
    sim.attacker(AttackMode::CrossDomain, 2 * MS);
    sim.run_for(3 * SEC);
    let r = sim.report();
    ensure(
        r.attacks > 1000 && r.attacks_rejected > 1000 && r.replays_delivered == 0,
        &format!(
            "every cross-domain replay rejected ({} injected, {} rejected)",
            r.attacks, r.attacks_rejected
        ),
        &sim,
    )?;
    ensure(
        sim.roles_seen(0) == [Role::Secondary, Role::Primary]
            && sim.roles_seen(1) == [Role::Secondary]
            && !sim.has_notice(0, "degraded"),
        "no role change, no session lost",
        &sim,
    )?;
    finish(&mut sim, "cross-domain-replays", None, None)
}

/// Node `i`'s host loses its input for `d`, and something was lost.
fn lose_input(sim: &mut Sim, i: usize, d: u64) -> Result<(), String> {
    let before = sim.report.input_lost;
    sim.lose_input(i, d);
    sim.run_for(d);
    ensure(
        sim.report.input_lost > before,
        &format!("frames for n{} were lost while it ran", i + 1),
        sim,
    )
}

/// The secondary's host loses every frame and packet for 1.2 s (three
/// dead intervals) while it runs: a flooded LAN and a full MSL receive
/// ring. Its host reports the loss each time it runs, so the silence it
/// measured is void: it must not take over from the primary it could not
/// hear. It did not stall: no notice of one.
pub fn secondary_loses_input(seed: u64) -> Result<Outcome, String> {
    let mut sim = pair(seed)?;
    lose_input(&mut sim, 1, 1_200 * MS)?;
    sim.run_for(2 * SEC);
    ensure(
        sim.roles_seen(1) == [Role::Secondary] && !sim.has_notice(1, "takeover"),
        "n2 never took over",
        &sim,
    )?;
    ensure(
        !sim.has_notice(1, "stalled"),
        "lost input is not a stall",
        &sim,
    )?;
    n1_stayed_primary(&sim)?;
    ensure(sim.run_until_converged(20 * SEC), "pair converges", &sim)?;
    finish(&mut sim, "secondary-loses-input", None, None)
}

/// The primary's host loses its input for 30 ms (its MSL receive ring
/// overflows under a burst) while it runs. It ran, so its heartbeats went
/// out and the secondary cannot have taken over: it holds nothing and goes
/// on acknowledging writes as soon as the peer's acks arrive again (a stall
/// would hold them for a dead interval, 400 ms).
pub fn primary_loses_input(seed: u64) -> Result<Outcome, String> {
    let mut sim = pair(seed)?;
    lose_input(&mut sim, 0, 30 * MS)?;
    let t0 = sim.now();
    sim.run_for(2 * SEC);
    ensure(
        !sim.has_notice(0, "stalled") && !sim.has_notice(0, "degraded"),
        "n1 neither stalled nor lost its peer",
        &sim,
    )?;
    let first = sim.acks(0).iter().find(|&&t| t > t0).copied();
    ensure(
        first.is_some_and(|t| t < t0 + 150 * MS),
        &format!(
            "n1 acknowledged a write within 150 ms of the loss (first at {:?} ms)",
            first.map(|t| ms(t - t0))
        ),
        &sim,
    )?;
    ensure(sim.run_until_converged(20 * SEC), "pair converges", &sim)?;
    finish(&mut sim, "primary-loses-input", None, None)
}

/// The secondary's disk takes 20 ms longer per flush than the primary's,
/// and the client writes across more extents than the activity log holds,
/// so the primary needs stable points often. Each waits for the peer to
/// report the last one stable: at most one barrier per peer flush, not one
/// per local flush (which would bury the peer under barriers it can only
/// take one flush at a time, and starve the client).
pub fn slow_peer_flush(seed: u64) -> Result<Outcome, String> {
    let mut o = Options::new(seed);
    o.flush_extra_us = [0, 20 * MS];
    o.client_qd = 6;
    let mut sim = Sim::new(o);
    sim.start_pair()?;
    let (acked, sent) = (sim.report.acked_writes, sim.report.barriers[0]);
    sim.run_for(5 * SEC);
    let barriers = sim.report.barriers[0] - sent;
    ensure(
        barriers <= 5 * SEC / (20 * MS) + 10,
        &format!("n1 sent {barriers} stable-point barriers in 5 s to a peer that flushes in 20 ms"),
        &sim,
    )?;
    ensure(
        sim.report.acked_writes - acked >= 200,
        &format!(
            "the client kept writing ({} writes acknowledged in 5 s)",
            sim.report.acked_writes - acked
        ),
        &sim,
    )?;
    ensure(sim.run_until_converged(20 * SEC), "pair converges", &sim)?;
    finish(&mut sim, "slow-peer-flush", None, None)
}

/// A scenario: runs with a seed, returns its figures or what failed.
pub type ScenarioFn = fn(u64) -> Result<Outcome, String>;

/// Every named scenario.
pub fn all() -> Vec<(&'static str, ScenarioFn)> {
    vec![
        ("primary-fails", primary_fails),
        ("secondary-fails", secondary_fails),
        ("msl-fails", msl_fails),
        ("lan-adapter-fails", lan_adapter_fails),
        ("both-links-cut", both_links_cut),
        ("both-links-cut-witness", both_links_cut_witness),
        (
            "both-links-cut-witness-with-secondary",
            both_links_cut_witness_with_secondary,
        ),
        (
            "lease-holder-short-stall-alone",
            lease_holder_short_stall_alone,
        ),
        ("primary-crash-during-resync", primary_crash_during_resync),
        ("saturated-msl", saturated_msl_no_false_takeover),
        ("admin-switchover-then-crash", admin_switchover_then_crash),
        ("admin-switchover-msl-cut", admin_switchover_msl_cut),
        ("secondary-frozen-0.6s", secondary_frozen_short),
        ("secondary-frozen-10s", secondary_frozen_long),
        ("primary-frozen-2s", primary_frozen),
        ("outage-then-short-freeze", outage_then_short_freeze),
        ("replayed-heartbeats", replayed_heartbeats_as_primary_dies),
        (
            "replayed-heartbeats-dead-lan",
            replayed_heartbeats_on_a_dead_lan,
        ),
        ("cross-domain-replays", cross_domain_replays_rejected),
        ("secondary-loses-input", secondary_loses_input),
        ("primary-loses-input", primary_loses_input),
        ("slow-peer-flush", slow_peer_flush),
    ]
}
