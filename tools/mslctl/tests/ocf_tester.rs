//! `ocf-tester` (Debian's resource-agents) passes the OCF agent
//! dist/ocf/msld driving a real msld: node 1 of a harness pair, in its
//! network namespace, its peer not running. ocf-tester runs meta-data,
//! validate-all, monitor, start, notify, demote/promote (twice each, and
//! again on a node already in that role), stop, and restarts. Needs root;
//! scripts/setup.sh installs ocf-tester (resource-agents).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use msl_harness::{Pair, PairOptions};

#[test]
fn test_ocf_tester_passes_the_agent_on_a_real_msld() {
    assert!(
        Path::new("/usr/sbin/ocf-tester").exists(),
        "ocf-tester missing: run `bash scripts/setup.sh` (resource-agents)"
    );
    let t0 = Instant::now();
    let pair = Pair::new(PairOptions::default()).expect("build the pair (run as root)");
    let dir = pair.dir().to_path_buf();
    let msld = msl_harness::bins::binary("msld").unwrap();
    let mslctl = env!("CARGO_BIN_EXE_mslctl");
    let config = pair.config_path(1);
    // The data is this node's own (what `msld --initial-primary` does on a
    // first start), so it may be promoted without its peer.
    let out = Command::new(mslctl)
        .args(["create-md", "--initial-primary", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // msld runs in node 1's namespace: `ip netns exec` execs it in place,
    // so the agent's pid file holds msld's pid.
    let wrapper = dir.join("msld-in-ns");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec ip netns exec {} {} \"$@\"\n",
            pair.topo.server_ns(1),
            msld.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let agent = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../dist/ocf/msld");
    let out = Command::new("ocf-tester")
        .args(["-n", "msl-ocf-test"])
        .arg("-o")
        .arg(format!("config={}", config.display()))
        .arg("-o")
        .arg(format!("msld={}", wrapper.display()))
        .arg("-o")
        .arg(format!("mslctl={mslctl}"))
        .arg(&agent)
        .env("HA_RSCTMP", &dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Whatever happened, no msld of this test survives it.
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "OCF_ROOT=/usr/lib/ocf HA_RSCTMP={} OCF_RESOURCE_INSTANCE=msl-ocf-test \
             OCF_RESKEY_config={} OCF_RESKEY_msld={} OCF_RESKEY_mslctl={mslctl} {} stop",
            dir.display(),
            config.display(),
            wrapper.display(),
            agent.display()
        ))
        .status();
    assert!(out.status.success(), "ocf-tester failed:\n{text}");
    assert!(text.contains("passed all tests"), "{text}");
    // The agent really drove msld: promoted and demoted twice each.
    let log = pair.log(1);
    for (what, times) in [
        ("administrator promoted this node", 2),
        ("administrator demoted this node", 2),
    ] {
        assert!(
            log.matches(what).count() >= times,
            "{what} x{times} not in node 1's event log:\n{log}"
        );
    }
    eprintln!("{text}ocf-tester: {:.1} s", t0.elapsed().as_secs_f64());
}
