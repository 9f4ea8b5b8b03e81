//! The "idle cycles" hooks on a real pair: a full resync (invalidate)
//! with the client writing, then one with the client idle.

use std::time::Duration;

use msl_harness::measure::{resync_idle, resync_under_load, ResyncTrigger};
use msl_harness::workload::{Workload, WorkloadOptions};
use msl_harness::{Pair, PairOptions};

#[test]
fn test_resync_under_load_and_idle_report_progress_and_rates() {
    let pair = Pair::new(PairOptions::default()).expect("build the pair (run as root)");
    pair.start_both().unwrap();
    pair.wait_in_sync(1, Duration::from_secs(30)).unwrap();
    let mut o = WorkloadOptions::new(pair.service_addr());
    o.blocks = 1024;
    o.max_writes_per_s = Some(500);
    let wl = Workload::start(pair.topo.client_ns(), o).unwrap();
    wl.wait_acks(100, Duration::from_secs(10)).unwrap();
    let r = resync_under_load(
        &pair,
        &wl,
        1,
        ResyncTrigger::Invalidate,
        Duration::from_secs(2),
        Duration::from_secs(40),
    )
    .unwrap();
    eprintln!("{}", r.to_json());
    let volume_blocks = (64 << 20) / 4096;
    assert_eq!(r.resync.blocks, volume_blocks, "invalidate: a full resync");
    assert!(r.before_mib_s > 0.5, "{r:?}");
    assert!(
        r.during_mib_s > 0.0,
        "clients starved during the resync: {r:?}"
    );
    assert!(r.resync.mib_s > 0.0 && r.resync.resync_s > 0.0);
    let report = wl.stop();
    let v = report.verify(pair.topo.client_ns()).unwrap();
    assert_eq!(v.acked_writes_lost, 0, "{:?}", v.problems);
    let idle = resync_idle(&pair, 1, ResyncTrigger::Invalidate, Duration::from_secs(40)).unwrap();
    eprintln!("idle: {}", idle.to_json());
    assert_eq!(idle.blocks, volume_blocks);
    assert!(idle.mib_s > 0.0);
    pair.stop(2).unwrap();
    pair.stop(1).unwrap();
    assert_eq!(pair.sha256(1).unwrap(), pair.sha256(2).unwrap());
}
