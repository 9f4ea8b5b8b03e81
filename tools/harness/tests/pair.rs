//! The harness itself on a real pair: topology, supervisor, status, a real
//! NBD client (qemu-io) from the client host through the service address,
//! kill -9, takeover seen on the service address, restart, resync, digests.
//! Needs root and qemu-io; fails loudly otherwise.

use std::time::Duration;

use msl_harness::{Pair, PairOptions};

fn qemu_io(pair: &Pair, cmds: &[&str]) {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    let url = format!("nbd://{}:{}", msl_harness::SERVICE_IP, pair.opts.nbd_port);
    args.push(&url);
    let out = pair
        .run_in_client_ns("qemu-io", &args)
        .unwrap_or_else(|e| panic!("qemu-io (apt-get install qemu-utils): {e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("failed"), "qemu-io {cmds:?}: {text}");
}

#[test]
fn test_pair_harness_kill9_takeover_restart_resync_identical() {
    let pair = Pair::new(PairOptions::default()).expect("build the pair (run as root)");
    pair.start_both().unwrap();
    pair.wait_in_sync(1, Duration::from_secs(30)).unwrap();
    assert!(pair.topo.holds_service_address(1).unwrap());
    assert!(!pair.topo.holds_service_address(2).unwrap());
    qemu_io(&pair, &["write -P 0x5a 0 1M", "flush"]);
    pair.kill9(1).unwrap();
    assert!(pair.pid(1).is_none() && !pair.is_running(1));
    assert_eq!(pair.exits(1).last().unwrap().signal, Some(9));
    pair.wait_status(2, "takes over", Duration::from_secs(10), |s| {
        s["role"] == "primary"
    })
    .unwrap();
    msl_harness::wait_for("service address on node 2", Duration::from_secs(5), || {
        pair.topo.holds_service_address(2).unwrap_or(false)
    })
    .unwrap();
    qemu_io(
        &pair,
        &["read -P 0x5a 0 1M", "write -P 0x6b 2M 1M", "flush"],
    );
    pair.start(1).unwrap();
    pair.wait_in_sync(2, Duration::from_secs(30)).unwrap();
    pair.stop(1).unwrap();
    pair.stop(2).unwrap();
    assert_eq!(pair.restarts(1), 0);
    assert_eq!(pair.sha256(1).unwrap(), pair.sha256(2).unwrap());
    assert!(pair
        .events()
        .iter()
        .any(|e| e.node == 2 && e.kind == "takeover"));
    assert!(pair.log(2).contains("event=takeover"));
}

/// The workload's read-back check catches a lost write end to end: an
/// acknowledged block overwritten behind the workload's back (qemu-io
/// through the service address) is reported, and an untouched run is not.
#[test]
fn test_workload_verify_detects_an_overwritten_acknowledged_block() {
    use msl_harness::workload::{Workload, WorkloadOptions};
    let pair = Pair::new(PairOptions::default()).expect("build the pair (run as root)");
    pair.start_both().unwrap();
    pair.wait_in_sync(1, Duration::from_secs(30)).unwrap();
    let mut o = WorkloadOptions::new(pair.service_addr());
    o.blocks = 64;
    let wl = Workload::start(pair.topo.client_ns(), o).unwrap();
    wl.wait_acks(300, Duration::from_secs(20)).unwrap();
    let report = wl.stop();
    let clean = report.verify(pair.topo.client_ns()).unwrap();
    assert_eq!(clean.blocks_checked, 64);
    assert_eq!(clean.acked_writes_lost, 0, "{:?}", clean.problems);
    let (block, _) = report
        .blocks
        .iter()
        .find(|(_, s)| s.acked.is_some())
        .expect("an acknowledged block");
    qemu_io(&pair, &[&format!("write -z {} 4k", block * 4096), "flush"]);
    let after = report.verify(pair.topo.client_ns()).unwrap();
    assert_eq!(after.acked_writes_lost, 1, "{:?}", after.problems);
    assert!(after.problems[0].contains(&format!("block {block}:")));
}
