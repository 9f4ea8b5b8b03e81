//! The files of dist/ against what they name: every metric the Grafana
//! dashboard and the alert rules query is one msld exports; the rules pass
//! `promtool check rules`; the OCF agent's metadata is valid and it drives
//! a node through mslctl (against the fake msld of `common`). Checks that
//! need a tool the machine lacks (promtool, xmllint, ocf-shellfuncs) say so
//! on stderr and pass.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use common::{base_status, fake, Act};
use serde_json::json;

fn dist() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../dist")
}

/// `msl_...` names in a text (metric names in queries and annotations).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let b = text.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut i = 0;
    while let Some(at) = text[i..].find("msl_") {
        let start = i + at;
        let mut end = start;
        while end < b.len() && word(b[end]) {
            end += 1;
        }
        if start == 0 || !word(b[start - 1]) {
            names.insert(text[start..end].to_string());
        }
        i = end.max(start + 1);
    }
    names
}

/// The metric families msld exports, from its own renderer.
fn exported() -> BTreeSet<String> {
    let cfg = msl_core::Config::new(1, 2, 7, 64, 4096);
    let meta = msl_core::meta::Meta::create(7, 1, 64, 4096, Some(3));
    let mut n: msl_core::Node<Vec<u8>> = msl_core::Node::new(cfg, meta, 1, 0);
    n.handle(
        0,
        msl_core::Event::LanAdapter {
            adapter: 0,
            link_up: true,
            carrier: true,
        },
    );
    let t = msl_daemon::status::Telemetry {
        nbd: Some(Arc::default()),
        lan: Some(Arc::default()),
        notify: Some(Arc::default()),
        lan_interfaces: vec!["eth0".into()],
        block_size: 4096,
        ..Default::default()
    };
    let text = msl_daemon::metrics::prometheus(&n.status(), &t);
    // Sample names, and family names (a histogram's samples are
    // `<family>_bucket`, `_sum`, `_count`).
    text.lines()
        .filter(|l| !l.is_empty())
        .filter_map(|l| match l.strip_prefix("# TYPE ") {
            Some(t) => t.split(' ').next(),
            None if l.starts_with('#') => None,
            None => l.split(['{', ' ']).next(),
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn test_dashboard_and_alerts_name_only_exported_metrics() {
    let exported = exported();
    for name in [
        "msl_role",
        "msl_disk_state",
        "msl_build_info",
        "msl_link_tx_frames_total",
        "msl_nbd_requests_total",
        "msl_client_write_latency_seconds_bucket",
    ] {
        assert!(exported.contains(name), "{name}: {exported:?}");
    }
    assert!(
        !exported.iter().any(|n| n.starts_with("msl_msl_")),
        "no doubled prefix: {exported:?}"
    );
    for file in ["grafana/msl-dashboard.json", "prometheus/msl-alerts.yml"] {
        let text = std::fs::read_to_string(dist().join(file)).unwrap();
        if file.ends_with(".json") {
            serde_json::from_str::<serde_json::Value>(&text).expect("dashboard is JSON");
        }
        let named = metric_names(&text);
        assert!(named.len() >= 10, "{file}: {named:?}");
        let missing: Vec<_> = named.difference(&exported).collect();
        assert!(
            missing.is_empty(),
            "{file} names metrics msld does not export: {missing:?}"
        );
    }
}

#[test]
fn test_metric_name_scanner() {
    let n = metric_names("rate(msl_a_total{x=\"1\"}[1m]) / xmsl_b + msl_c");
    assert_eq!(
        n.into_iter().collect::<Vec<_>>(),
        ["msl_a_total", "msl_c"],
        "a name inside another word is not one"
    );
}

fn have(tool: &str) -> bool {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(ok, "{tool} not installed: run `bash scripts/setup.sh`");
    ok
}

#[test]
fn test_alert_rules_pass_promtool() {
    if !have("promtool") {
        return;
    }
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(dist().join("prometheus/msl-alerts.yml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

const SHELLFUNCS: &str = "/usr/lib/ocf/lib/heartbeat/ocf-shellfuncs";

/// Run the OCF agent: (exit code, stdout + stderr).
fn agent(action: &str, env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(dist().join("ocf/msld"))
        .arg(action)
        .env("OCF_ROOT", "/usr/lib/ocf")
        .env("HA_RSCTMP", std::env::temp_dir())
        .env("OCF_RESOURCE_INSTANCE", "msl-test")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn test_ocf_agent_metadata_is_valid() {
    assert!(
        Path::new(SHELLFUNCS).exists(),
        "{SHELLFUNCS} missing: run `bash scripts/setup.sh` (resource-agents)"
    );
    let (code, xml) = agent("meta-data", &[]);
    assert_eq!(code, 0);
    assert!(xml.contains("<resource-agent name=\"msld\""), "{xml}");
    for action in [
        "start",
        "stop",
        "promote",
        "demote",
        "monitor",
        "notify",
        "validate-all",
    ] {
        assert!(
            xml.contains(&format!("<action name=\"{action}\"")),
            "{action}"
        );
    }
    let rng = "/usr/share/resource-agents/metadata.rng";
    assert!(
        Path::new(rng).exists(),
        "{rng} missing: run `bash scripts/setup.sh`"
    );
    if have("xmllint") {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("msld.xml");
        std::fs::write(&f, &xml).unwrap();
        let out = Command::new("xmllint")
            .args(["--noout", "--relaxng", rng])
            .arg(&f)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
}

#[test]
fn test_ocf_agent_monitor_promote_demote_through_mslctl() {
    assert!(
        Path::new(SHELLFUNCS).exists(),
        "{SHELLFUNCS} missing: run `bash scripts/setup.sh` (resource-agents)"
    );
    let srv = fake(
        base_status(),
        &[
            (
                "promote",
                Act::Apply(
                    json!({"role": "primary", "peer_role": "secondary"}),
                    "role_changed",
                ),
            ),
            (
                "demote",
                Act::Apply(json!({"role": "secondary"}), "role_changed"),
            ),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("node1.toml");
    std::fs::write(
        &cfg,
        format!(
            "control_socket = \"{}\"\nrole_control = \"cluster\"\n",
            srv.sock.display()
        ),
    )
    .unwrap();
    let (cfg, mslctl) = (
        cfg.to_str().unwrap().to_string(),
        env!("CARGO_BIN_EXE_mslctl"),
    );
    // Any executable stands in for msld: these actions never start it.
    let env = [
        ("OCF_RESKEY_config", cfg.as_str()),
        ("OCF_RESKEY_mslctl", mslctl),
        ("OCF_RESKEY_msld", mslctl),
    ];
    assert_eq!(agent("validate-all", &env).0, 0);
    let (code, out) = agent("monitor", &env);
    assert_eq!(code, 0, "secondary answers OCF_SUCCESS: {out}");
    let (code, out) = agent("promote", &env);
    assert_eq!(code, 0, "{out}");
    assert_eq!(srv.fake.status.lock().unwrap()["role"], "primary");
    assert_eq!(agent("monitor", &env).0, 8, "primary: OCF_RUNNING_MASTER");
    assert_eq!(agent("demote", &env).0, 0);
    assert_eq!(srv.fake.status.lock().unwrap()["role"], "secondary");
    srv.fake.status.lock().unwrap()["failed"] = true.into();
    assert_eq!(agent("monitor", &env).0, 1, "fail-closed: OCF_ERR_GENERIC");
    // A refused promote is an error with the node's reason.
    srv.fake.status.lock().unwrap()["failed"] = false.into();
    drop(srv);
    let srv = fake(
        base_status(),
        &[("promote", Act::RefuseByWarning("peer alive"))],
    );
    std::fs::write(
        &cfg,
        format!("control_socket = \"{}\"\n", srv.sock.display()),
    )
    .unwrap();
    let (code, out) = agent("promote", &env);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("promote refused: peer alive"), "{out}");
    // No daemon: not running; stop of a stopped node succeeds.
    let none = dir.path().join("none.toml");
    std::fs::write(&none, "control_socket = \"/nonexistent/x.sock\"\n").unwrap();
    let env = [
        ("OCF_RESKEY_config", none.to_str().unwrap()),
        ("OCF_RESKEY_mslctl", mslctl),
        ("OCF_RESKEY_msld", mslctl),
    ];
    assert_eq!(agent("monitor", &env).0, 7, "OCF_NOT_RUNNING");
    assert_eq!(agent("stop", &env).0, 0);
    // A missing config is a configuration error, but monitor still says
    // "not running" (a node being dismantled).
    let env = [
        ("OCF_RESKEY_config", "/nonexistent/msl.toml"),
        ("OCF_RESKEY_mslctl", mslctl),
        ("OCF_RESKEY_msld", mslctl),
    ];
    assert_eq!(agent("validate-all", &env).0, 6, "OCF_ERR_CONFIGURED");
    assert_eq!(agent("monitor", &env).0, 7);
}
