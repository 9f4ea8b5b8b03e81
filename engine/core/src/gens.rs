//! Generation identifiers and the resync decision on reconnect.
//!
//! Modeled on DRBD's `drbd_uuid_compare`: the decision returns the strategy
//! AND the rule that fired, so operators and tests can see why a direction
//! or a split-brain verdict was chosen. `decide(a, b)` and `decide(b, a)`
//! always agree (one side's Source is the other's Target).

use msl_wire::{DiskState, Generations, Role, HISTORY_LEN};

/// One node's side of the comparison (from local metadata or a HELLO).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SideView {
    pub node_id: u16,
    pub role: Role,
    pub disk: DiskState,
    pub gens: Generations,
    /// Was primary when it stopped without a clean shutdown.
    pub crashed_primary: bool,
}

/// What the local node does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// Local node is the resync source; only blocks in the merged dirty
    /// bitmaps are sent (possibly none).
    SourceBitmap,
    /// Local node is the source; every block is sent.
    SourceFull,
    /// Local node receives a bitmap-based resync.
    TargetBitmap,
    /// Local node receives a full resync.
    TargetFull,
    /// Both changed data independently: refused, administrator decides.
    SplitBrain,
    /// Histories share nothing: refused.
    Unrelated,
    /// Neither side holds consistent data: refused until one is promoted.
    NoGoodData,
}

impl Strategy {
    pub fn is_source(self) -> bool {
        matches!(self, Strategy::SourceBitmap | Strategy::SourceFull)
    }
    pub fn is_target(self) -> bool {
        matches!(self, Strategy::TargetBitmap | Strategy::TargetFull)
    }
    pub fn is_refusal(self) -> bool {
        matches!(
            self,
            Strategy::SplitBrain | Strategy::Unrelated | Strategy::NoGoodData
        )
    }
    fn mirror(self) -> Strategy {
        match self {
            Strategy::SourceBitmap => Strategy::TargetBitmap,
            Strategy::SourceFull => Strategy::TargetFull,
            Strategy::TargetBitmap => Strategy::SourceBitmap,
            Strategy::TargetFull => Strategy::SourceFull,
            s => s,
        }
    }
}

/// The rule that decided (stable names: shown to operators, used in tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    NodeFailed,
    BothFresh,
    PeerFresh,
    BothInconsistent,
    PeerInconsistent,
    /// Same current generation: the primary (else the side that did not
    /// crash, else the up-to-date side, else the lower node id) sources the
    /// union of both dirty maps.
    EqualGenerations,
    /// Peer's current generation is where local change tracking started.
    PeerAtBitmap,
    /// Both started tracking changes from the same generation.
    BothChangedSinceBitmap,
    /// One side diverged from a generation the other already left.
    DivergedFromHistory,
    /// Peer's data is an ancestor of local data (no bitmap for it).
    PeerInHistory,
    /// Peer's data is one of our past generations, at or after the one our
    /// change tracking started from (a target finished a resync the source
    /// never heard of, and the source went on writing).
    PeerBehindBitmap,
    Unrelated,
}

impl Rule {
    pub fn name(self) -> &'static str {
        match self {
            Rule::NodeFailed => "node-failed",
            Rule::BothFresh => "both-fresh",
            Rule::PeerFresh => "peer-fresh",
            Rule::BothInconsistent => "both-inconsistent",
            Rule::PeerInconsistent => "peer-inconsistent",
            Rule::EqualGenerations => "equal-generations",
            Rule::PeerAtBitmap => "peer-at-bitmap",
            Rule::BothChangedSinceBitmap => "split-brain-both-changed",
            Rule::DivergedFromHistory => "split-brain-diverged-from-history",
            Rule::PeerInHistory => "peer-in-history",
            Rule::PeerBehindBitmap => "peer-behind-bitmap",
            Rule::Unrelated => "unrelated-data",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub strategy: Strategy,
    pub rule: Rule,
}

fn d(strategy: Strategy, rule: Rule) -> Decision {
    Decision { strategy, rule }
}

fn in_history(g: &Generations, id: u64) -> bool {
    id != 0 && g.history[..HISTORY_LEN].contains(&id)
}

fn consistent(s: DiskState) -> bool {
    matches!(s, DiskState::UpToDate | DiskState::Outdated)
}

/// Decide sync direction for the local node against its peer.
pub fn decide(local: &SideView, peer: &SideView) -> Decision {
    // Evaluate from the side with the lower node id so both nodes run the
    // same rule sequence and get mirrored answers.
    if local.node_id > peer.node_id {
        let r = decide_ordered(peer, local);
        return d(r.strategy.mirror(), r.rule);
    }
    decide_ordered(local, peer)
}

fn decide_ordered(a: &SideView, b: &SideView) -> Decision {
    use Strategy::*;
    if a.disk == DiskState::Failed || b.disk == DiskState::Failed {
        return d(NoGoodData, Rule::NodeFailed);
    }
    let (ga, gb) = (&a.gens, &b.gens);
    match (ga.current == 0, gb.current == 0) {
        (true, true) => return d(NoGoodData, Rule::BothFresh),
        (false, true) if consistent(a.disk) => return d(SourceFull, Rule::PeerFresh),
        (true, false) if consistent(b.disk) => return d(TargetFull, Rule::PeerFresh),
        _ => {}
    }
    match (consistent(a.disk), consistent(b.disk)) {
        (false, false) => return d(NoGoodData, Rule::BothInconsistent),
        // An interrupted resync resumes: the target's own map holds what it
        // still lacks, the source's what changed since it started tracking
        // (the source may have moved on to newer generations meanwhile).
        (true, false) => {
            let bitmap_ok = gb.current != 0
                && (gb.current == ga.current || gb.current == ga.bitmap || tracked_since(a, b));
            return d(
                if bitmap_ok { SourceBitmap } else { SourceFull },
                Rule::PeerInconsistent,
            );
        }
        (false, true) => {
            let bitmap_ok = ga.current != 0
                && (ga.current == gb.current || ga.current == gb.bitmap || tracked_since(b, a));
            return d(
                if bitmap_ok { TargetBitmap } else { TargetFull },
                Rule::PeerInconsistent,
            );
        }
        (true, true) => {}
    }
    if ga.current == gb.current {
        let a_wins = match (a.role == Role::Primary, b.role == Role::Primary) {
            (true, false) => true,
            (false, true) => false,
            // A crashed primary lost its volatile cache: its activity-log
            // blocks are suspect, while the secondary applied every
            // acknowledged write. The node that did not crash sources.
            _ => match (a.crashed_primary, b.crashed_primary) {
                (true, false) => false,
                (false, true) => true,
                _ => match (a.disk == DiskState::UpToDate, b.disk == DiskState::UpToDate) {
                    (true, false) => true,
                    (false, true) => false,
                    _ => true, // lower node id
                },
            },
        };
        return d(
            if a_wins { SourceBitmap } else { TargetBitmap },
            Rule::EqualGenerations,
        );
    }
    if ga.bitmap != 0 && ga.bitmap == gb.bitmap {
        return d(SplitBrain, Rule::BothChangedSinceBitmap);
    }
    if ga.bitmap != 0 && ga.bitmap == gb.current {
        return d(SourceBitmap, Rule::PeerAtBitmap);
    }
    if gb.bitmap != 0 && gb.bitmap == ga.current {
        return d(TargetBitmap, Rule::PeerAtBitmap);
    }
    // A target finished its resync (adopted the source's generation, no
    // writes of its own since: no bitmap) but the source never learned it
    // and moved on, tracking changes since an older generation.
    if tracked_since(a, b) {
        return d(SourceBitmap, Rule::PeerBehindBitmap);
    }
    if tracked_since(b, a) {
        return d(TargetBitmap, Rule::PeerBehindBitmap);
    }
    if in_history(ga, gb.bitmap) || in_history(gb, ga.bitmap) {
        return d(SplitBrain, Rule::DivergedFromHistory);
    }
    if in_history(ga, gb.current) {
        return d(SourceFull, Rule::PeerInHistory);
    }
    if in_history(gb, ga.current) {
        return d(TargetFull, Rule::PeerInHistory);
    }
    d(Unrelated, Rule::Unrelated)
}

/// `x`'s change tracking covers everything since `y`'s current generation:
/// `y` never wrote on its own since (no bitmap generation), `y`'s current is
/// in `x`'s history, and `x`'s bitmap generation is that one or older (a
/// bitmap generation that left the history is older than all of it).
fn tracked_since(x: &SideView, y: &SideView) -> bool {
    let (gx, gy) = (&x.gens, &y.gens);
    if gx.bitmap == 0 || gy.bitmap != 0 || gy.current == 0 {
        return false;
    }
    let pos = |id: u64| gx.history.iter().position(|&h| h == id);
    match (pos(gy.current), pos(gx.bitmap)) {
        (Some(peer), Some(bitmap)) => peer <= bitmap,
        (Some(_), None) => true,
        _ => false,
    }
}

/// Start a new generation: the old current goes to history; if change
/// tracking is not already running (`track` and no bitmap generation yet),
/// it starts at the old current.
pub fn new_generation(g: &mut Generations, id: u64, track: bool) {
    if track && g.bitmap == 0 {
        g.bitmap = g.current;
    }
    push_history(g, g.current);
    g.current = id;
}

/// Undo [`new_generation`] without tracking: back to the generation before
/// the current one (for a generation that never held a write).
pub fn undo_generation(g: &mut Generations) {
    if g.history[0] == 0 {
        return;
    }
    g.current = g.history[0];
    g.history.copy_within(1.., 0);
    g.history[HISTORY_LEN - 1] = 0;
}

/// Push `id` to the front of the history (no duplicates, no zeros).
pub fn push_history(g: &mut Generations, id: u64) {
    if id == 0 || g.history[0] == id {
        return;
    }
    g.history.copy_within(0..HISTORY_LEN - 1, 1);
    g.history[0] = id;
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{any, prop_assert_eq, proptest};
    use proptest::strategy::Strategy as _;

    fn side(node_id: u16, current: u64, bitmap: u64, history: [u64; HISTORY_LEN]) -> SideView {
        SideView {
            node_id,
            role: Role::Secondary,
            disk: DiskState::UpToDate,
            gens: Generations {
                current,
                bitmap,
                history,
            },
            crashed_primary: false,
        }
    }

    #[test]
    fn test_takeover_then_old_primary_returns_bitmap_target() {
        // S took over: tracking since G1, now G3. P comes back at G1.
        let s = side(2, 3, 1, [1, 0, 0, 0]);
        let p = side(1, 1, 0, [0; 4]);
        assert_eq!(
            decide(&s, &p),
            d(Strategy::SourceBitmap, Rule::PeerAtBitmap)
        );
        assert_eq!(
            decide(&p, &s),
            d(Strategy::TargetBitmap, Rule::PeerAtBitmap)
        );
    }

    #[test]
    fn test_target_finished_resync_source_missed_it_bitmap_resync() {
        // P tracked since G1 and resynced S to G2; S finished (G2, no
        // bitmap) but P lost S before hearing it and moved on to G3, G4
        // (msl-sim seed 452). S wrote nothing of its own: bitmap resync.
        let p = side(1, 4, 1, [3, 2, 1, 0]);
        let s = side(2, 2, 0, [1, 0, 0, 0]);
        let want = d(Strategy::SourceBitmap, Rule::PeerBehindBitmap);
        assert_eq!(decide(&p, &s), want);
        assert_eq!(decide(&s, &p), d(Strategy::TargetBitmap, want.rule));
        // P's tracking started after G2: its map does not cover S's gap.
        let p_late = side(1, 4, 3, [3, 2, 1, 0]);
        assert_eq!(
            decide(&p_late, &s),
            d(Strategy::SourceFull, Rule::PeerInHistory)
        );
        // S wrote on its own since G2 (it has a bitmap): still split brain.
        let s_wrote = side(2, 5, 2, [2, 1, 0, 0]);
        assert_eq!(decide(&p, &s_wrote).strategy, Strategy::SplitBrain);
    }

    #[test]
    fn test_interrupted_resync_resumes_after_source_moved_on() {
        // P (tracking since G1) was resyncing S, which adopted G2; the
        // session dropped and P went on to G3. S is inconsistent: bitmap.
        let p = side(1, 3, 1, [2, 1, 0, 0]);
        let mut s = side(2, 2, 0, [1, 0, 0, 0]);
        s.disk = DiskState::Inconsistent;
        assert_eq!(
            decide(&p, &s),
            d(Strategy::SourceBitmap, Rule::PeerInconsistent)
        );
        assert_eq!(
            decide(&s, &p),
            d(Strategy::TargetBitmap, Rule::PeerInconsistent)
        );
        // P's tracking started after G2: full.
        let p_late = side(1, 4, 3, [3, 2, 1, 0]);
        assert_eq!(decide(&p_late, &s).strategy, Strategy::SourceFull);
    }

    #[test]
    fn test_both_changed_split_brain_refused() {
        let p = side(1, 2, 1, [1, 0, 0, 0]);
        let s = side(2, 3, 1, [1, 0, 0, 0]);
        assert_eq!(decide(&p, &s).strategy, Strategy::SplitBrain);
        assert_eq!(decide(&s, &p).rule, Rule::BothChangedSinceBitmap);
    }

    /// A handover's generation the peer never entered, undone: the old
    /// primary is back at the generation before it, which the peer's
    /// takeover descends from, so it rejoins as a target, not diverged.
    #[test]
    fn test_undone_handover_generation_rejoins_behind_the_peer() {
        let mut old = side(1, 5, 0, [4, 3, 0, 0]);
        new_generation(&mut old.gens, 9, false); // the handover's
        let peer = side(2, 7, 5, [5, 4, 3, 0]); // took over from 5
        assert_eq!(decide(&old, &peer).strategy, Strategy::SplitBrain);
        undo_generation(&mut old.gens);
        assert_eq!(old.gens, side(1, 5, 0, [4, 3, 0, 0]).gens);
        assert!(decide(&old, &peer).strategy.is_target());
        let mut first = side(1, 5, 0, [0; 4]);
        undo_generation(&mut first.gens);
        assert_eq!(first.gens.current, 5, "nothing before it to go back to");
    }

    #[test]
    fn test_unrelated_refused() {
        let a = side(1, 10, 0, [11, 0, 0, 0]);
        let b = side(2, 20, 0, [21, 0, 0, 0]);
        assert_eq!(decide(&a, &b), d(Strategy::Unrelated, Rule::Unrelated));
    }

    #[test]
    fn test_fresh_peer_gets_full_sync() {
        let a = side(2, 10, 0, [0; 4]);
        let mut b = side(1, 0, 0, [0; 4]);
        b.disk = DiskState::Inconsistent;
        assert_eq!(decide(&a, &b).strategy, Strategy::SourceFull);
        assert_eq!(decide(&b, &a).strategy, Strategy::TargetFull);
    }

    #[test]
    fn test_equal_generations_survivor_sources_crashed_primary() {
        // Found by msl-sim seed 187: the crashed primary's cache was lost,
        // so its activity-log blocks must come from the secondary.
        let mut a = side(1, 5, 0, [0; 4]);
        a.crashed_primary = true;
        let b = side(2, 5, 0, [0; 4]);
        assert_eq!(
            decide(&a, &b),
            d(Strategy::TargetBitmap, Rule::EqualGenerations)
        );
        assert_eq!(
            decide(&b, &a),
            d(Strategy::SourceBitmap, Rule::EqualGenerations)
        );
    }

    #[test]
    fn test_new_generation_starts_tracking_once() {
        let mut g = Generations {
            current: 1,
            ..Generations::default()
        };
        new_generation(&mut g, 2, true);
        new_generation(&mut g, 3, true);
        assert_eq!(g.bitmap, 1);
        assert_eq!(g.current, 3);
        assert_eq!(g.history[..2], [2, 1]);
    }

    fn arb_side(id: u16) -> impl proptest::strategy::Strategy<Value = SideView> {
        (
            0u64..6,
            0u64..6,
            proptest::array::uniform4(0u64..6),
            0u8..4,
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(move |(c, b, h, disk, prim, crashed)| SideView {
                node_id: id,
                role: if prim { Role::Primary } else { Role::Secondary },
                disk: match disk {
                    0 => DiskState::UpToDate,
                    1 => DiskState::Outdated,
                    2 => DiskState::Inconsistent,
                    _ => DiskState::Failed,
                },
                gens: Generations {
                    current: c,
                    bitmap: b,
                    history: h,
                },
                crashed_primary: crashed,
            })
    }

    proptest! {
        /// Both nodes always reach mirrored verdicts by the same rule.
        #[test]
        fn prop_decision_is_antisymmetric(a in arb_side(1), b in arb_side(2)) {
            let x = decide(&a, &b);
            let y = decide(&b, &a);
            prop_assert_eq!(x.rule, y.rule);
            prop_assert_eq!(x.strategy, y.strategy.mirror());
        }
    }
}
