//! The SFT III failure scenarios end to end on real namespaces and real
//! msld processes (see msl_harness::scenario for what each asserts). Root
//! required; the tests run one at a time (the machine has 2 cores) and each
//! is bounded by the scenario's waits.

use std::sync::Mutex;

use msl_harness::scenario::{run, ScenarioOptions, Stderr};

static SERIAL: Mutex<()> = Mutex::new(());

fn scenario(id: &str) {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    assert!(
        msl_transport::netns::is_root(),
        "the scenario tests need root (network namespaces); CI runs them as root"
    );
    let r = run(id, &ScenarioOptions::default(), &Stderr);
    eprintln!("{}", r.to_json());
    assert!(r.passed(), "scenario {id}:\n{}", r.failures());
}

#[test]
fn test_scenario_1_primary_killed_secondary_takes_over_resync() {
    scenario("1");
}

#[test]
fn test_scenario_1b_primary_power_loss_secondary_takes_over_resync() {
    scenario("1b");
}

#[test]
fn test_scenario_2_secondary_killed_primary_serves_tracks_resync() {
    scenario("2");
}

#[test]
fn test_scenario_3_msl_down_no_takeover_primary_serves_resync() {
    scenario("3");
}

#[test]
fn test_scenario_4_primary_lan_adapter_down_switchover_restart_resync() {
    scenario("4");
}

#[test]
fn test_scenario_5_both_links_cut_split_brain_refused_admin_resolves() {
    scenario("5");
}

#[test]
fn test_scenario_6_primary_crash_during_resync_no_takeover_resumes() {
    scenario("6");
}

#[test]
fn test_scenario_5w_both_links_cut_witness_one_server_serves_no_admin() {
    scenario("5w");
}

#[test]
fn test_scenario_7_witness_down_in_sync_nothing_changes() {
    scenario("7");
}

#[test]
fn test_scenario_8_witness_down_primary_killed_suspend_waits_for_it() {
    scenario("8");
}

#[test]
fn test_scenario_8s_witness_down_primary_killed_sft3_takes_over() {
    scenario("8s");
}

#[test]
fn test_scenario_9_primary_cut_from_peer_and_witness_secondary_takes_over() {
    scenario("9");
}
