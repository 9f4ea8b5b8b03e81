//! mslctl against a real msld pair in network namespaces (msl-harness):
//! each state change the node refuses exits 3 with the node's reason, the
//! accepted ones exit 0 once their outcome is there, `wait-sync` ends when
//! the pair is in sync. Needs root; fails loudly otherwise.

mod common;

use std::time::{Duration, Instant};

use msl_harness::{Pair, PairOptions};

/// mslctl on node `id`'s socket: (exit code, stdout, stderr).
fn ctl(pair: &Pair, id: u16, args: &[&str]) -> (i32, String, String) {
    let (code, out, err, _) = common::mslctl(&pair.socket(id), args);
    (code, out, err)
}

/// Run mslctl on node `id` and check its exit code and that `text` is in
/// its output; on failure show both nodes' state and recent events.
#[track_caller]
fn check(pair: &Pair, id: u16, args: &[&str], code: i32, text: &str) {
    let (c, out, err) = ctl(pair, id, args);
    if c != code || !(out.contains(text) || err.contains(text)) {
        panic!(
            "mslctl {args:?} on node {id}: exit {c}, wanted {code} and {text:?}\n\
             stdout: {out}\nstderr: {err}\n{}",
            pair.diagnostics()
        );
    }
}

#[test]
fn test_real_pair_refusals_exit_3_outcomes_exit_0_waits_time_out() {
    let t0 = Instant::now();
    let pair = Pair::new(PairOptions::default()).expect("build the pair (run as root)");
    pair.start_both().unwrap();
    pair.wait_in_sync(1, Duration::from_secs(30)).unwrap();

    // Refused by the node, with its reason.
    let t = "--timeout=10";
    check(
        &pair,
        2,
        &["promote", t],
        3,
        "promote refused: the peer is primary and alive",
    );
    check(
        &pair,
        1,
        &["invalidate", t],
        3,
        "invalidate refused on the primary",
    );
    check(
        &pair,
        2,
        &["switchover", t],
        3,
        "switchover refused: this node is not an in-sync primary",
    );
    // --no-wait: msld judges the request at once, so a refusal still
    // exits 3; an accepted one (here: nothing to do) exits 0.
    check(
        &pair,
        2,
        &["promote", "--no-wait"],
        3,
        "promote refused: the peer is primary and alive",
    );
    check(&pair, 2, &["demote", "--no-wait"], 0, "demote: requested");

    // The current state, then exit.
    check(
        &pair,
        1,
        &["events", "--now"],
        0,
        "exists: node: role primary",
    );
    check(&pair, 2, &["wait-sync", t], 0, "in sync with node 1");

    // A planned switchover returns once node 2 is primary.
    check(
        &pair,
        1,
        &["switchover", "--timeout=30"],
        0,
        "switchover: done",
    );
    let s2 = pair.status(2).unwrap();
    assert_eq!(s2["role"], "primary", "{s2}");

    // The old primary, now secondary, may discard its data.
    check(&pair, 1, &["invalidate", t], 0, "invalidate: done");
    check(&pair, 1, &["wait-sync", "--timeout=30"], 0, "in sync");

    // Demote, then promote the other node.
    check(&pair, 2, &["demote", t], 0, "demote: done");
    check(&pair, 1, &["promote", t], 0, "promote: done");
    assert_eq!(pair.status(1).unwrap()["role"], "primary");

    pair.stop(1).unwrap();
    pair.stop(2).unwrap();
    // No daemon: exit 1, naming the socket.
    check(&pair, 1, &["status"], 1, "cannot connect");
    eprintln!("real pair: {:.1} s", t0.elapsed().as_secs_f64());
}
