//! mslctl's exit statuses and messages: the real binary against the fake
//! msld of `common` (a test aid; see there).

mod common;

use std::process::Command;
use std::time::Duration;

use common::{base_status, fake, mslctl, Act};
use serde_json::{json, Value};

const VERBS: [&str; 6] = [
    "promote",
    "demote",
    "switchover",
    "disconnect",
    "connect",
    "invalidate",
];

#[test]
fn test_every_verb_refused_by_the_core_exits_3_with_the_reason() {
    for verb in VERBS {
        let srv = fake(
            base_status(),
            &[(verb, Act::RefuseByWarning("fake reason"))],
        );
        // From a state where the verb's goal is not already reached.
        {
            let mut s = srv.fake.status.lock().unwrap();
            if verb == "demote" || verb == "switchover" {
                s["role"] = "primary".into();
            }
            if verb == "connect" {
                s["connected"] = false.into();
            }
        }
        let (code, out, err, _) = mslctl(&srv.sock, &[verb, "--timeout", "5"]);
        assert_eq!(code, 3, "{verb}: {out}{err}");
        assert!(
            err.contains(&format!("{verb} refused: fake reason")),
            "{verb}: {err}"
        );
    }
}

#[test]
fn test_every_verb_refused_in_the_answer_exits_3_and_failure_exits_1() {
    for verb in VERBS {
        let srv = fake(
            base_status(),
            &[(verb, Act::RefuseInAnswer("said at once"))],
        );
        let (code, _, err, _) = mslctl(&srv.sock, &[verb]);
        assert_eq!(code, 3, "{verb}: {err}");
        assert!(err.contains("said at once"), "{verb}: {err}");
        // --no-wait still reports a refusal the daemon answered with.
        let (code, _, _, _) = mslctl(&srv.sock, &[verb, "--no-wait"]);
        assert_eq!(code, 3, "{verb} --no-wait");
        let srv = fake(
            base_status(),
            &[(verb, Act::Fail("the daemon is shutting down"))],
        );
        let (code, _, err, _) = mslctl(&srv.sock, &[verb]);
        assert_eq!(code, 1, "{verb}: {err}");
        assert!(err.contains("shutting down"), "{err}");
    }
}

#[test]
fn test_every_verb_done_when_its_outcome_shows() {
    let cases: [(&str, Value, Value, &str); 6] = [
        (
            "promote",
            json!({}),
            json!({"role": "primary"}),
            "role_changed",
        ),
        (
            "demote",
            json!({"role": "primary"}),
            json!({"role": "secondary"}),
            "role_changed",
        ),
        (
            "switchover",
            json!({"role": "primary", "peer_role": "secondary"}),
            json!({"role": "secondary", "peer_role": "primary"}),
            "role_changed",
        ),
        (
            "disconnect",
            json!({}),
            json!({"connected": false, "in_sync": false}),
            "warning",
        ),
        (
            "connect",
            json!({"connected": false, "in_sync": false}),
            json!({"connected": true}),
            "connected",
        ),
        (
            "invalidate",
            json!({}),
            json!({"disk": "inconsistent", "in_sync": false}),
            "warning",
        ),
    ];
    for (verb, from, to, event) in cases {
        let mut st = base_status();
        for (k, v) in from.as_object().unwrap() {
            st[k] = v.clone();
        }
        let srv = fake(st, &[(verb, Act::Apply(to.clone(), event))]);
        let (code, out, err, secs) = mslctl(&srv.sock, &[verb, "--timeout", "5"]);
        assert_eq!(code, 0, "{verb}: {out}{err}");
        assert!(out.starts_with(&format!("{verb}: done")), "{verb}: {out}");
        // Not before the fake carried it out (200 ms), not much after.
        assert!((0.15..3.0).contains(&secs), "{verb}: {secs} s");
        for (k, v) in to.as_object().unwrap() {
            assert_eq!(&srv.fake.status.lock().unwrap()[k], v);
        }
    }
}

#[test]
fn test_no_outcome_exits_4_after_the_timeout_and_no_wait_exits_0() {
    let mut st = base_status();
    st["connected"] = false.into();
    let srv = fake(st, &[("connect", Act::Nothing)]);
    let (code, _, err, secs) = mslctl(&srv.sock, &["connect", "--timeout", "1"]);
    assert_eq!(code, 4, "{err}");
    assert!(
        err.contains("no outcome in time") && err.contains("not connected"),
        "{err}"
    );
    assert!((0.9..3.0).contains(&secs), "{secs} s");
    // --no-wait: today's behaviour (accepted = exit 0), even if refused later.
    let srv = fake(base_status(), &[("promote", Act::RefuseByWarning("x"))]);
    let (code, out, _, _) = mslctl(&srv.sock, &["promote", "--no-wait"]);
    assert_eq!(code, 0);
    assert!(out.contains("promote: requested"), "{out}");
}

#[test]
fn test_connect_refused_by_split_brain_exits_3() {
    let mut st = base_status();
    st["connected"] = false.into();
    let srv = fake(
        st,
        &[(
            "connect",
            Act::Event("split_brain_refused", "MSL session refused: SplitBrain"),
        )],
    );
    let (code, _, err, _) = mslctl(&srv.sock, &["connect", "--timeout", "5"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("split_brain_refused"), "{err}");
}

#[test]
fn test_promote_on_a_failed_node_exits_3_without_any_event() {
    let mut st = base_status();
    st["failed"] = true.into();
    let srv = fake(st, &[("promote", Act::Nothing)]);
    let (code, _, err, secs) = mslctl(&srv.sock, &["promote", "--timeout", "5"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("fail-closed"), "{err}");
    assert!(
        secs < 2.0,
        "refused at the first status, not at the timeout"
    );
}

#[test]
fn test_wait_sync_and_wait_connect() {
    let mut st = base_status();
    st["in_sync"] = false.into();
    st["disk"] = "inconsistent".into();
    st["resync"]["active"] = true.into();
    let srv = fake(st, &[]);
    let (code, _, err, secs) = mslctl(&srv.sock, &["wait-sync", "--timeout", "1"]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("wait-sync") && err.contains("resync"), "{err}");
    assert!((0.9..3.0).contains(&secs), "{secs} s");
    // The resync ends while mslctl waits.
    let f = srv.fake.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        let mut s = f.status.lock().unwrap();
        s["in_sync"] = true.into();
        s["disk"] = "uptodate".into();
        s["resync"]["active"] = false.into();
    });
    let (code, out, err, secs) = mslctl(&srv.sock, &["wait-sync", "--timeout", "10"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("in sync with node 2"), "{out}");
    assert!((0.4..3.0).contains(&secs), "{secs} s");
    let (code, out, _, _) = mslctl(&srv.sock, &["wait-connect"]);
    assert_eq!(code, 0);
    assert!(out.contains("connected to node 2"), "{out}");
    // A split brain ends a wait: it cannot succeed without the administrator.
    let mut st = base_status();
    st["connected"] = false.into();
    let srv = fake(st, &[]);
    let f = srv.fake.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        f.publish("split_brain_refused", "data not merged");
    });
    let (code, _, err, _) = mslctl(&srv.sock, &["wait-connect", "--timeout", "10"]);
    assert_eq!(code, 3, "{err}");
}

#[test]
fn test_events_now_prints_the_state_and_exits() {
    let srv = fake(base_status(), &[]);
    let (code, out, err, _) = mslctl(&srv.sock, &["events", "--now", "--json"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let objects: Vec<&str> = lines
        .iter()
        .map(|v| v["object"].as_str().unwrap())
        .collect();
    assert_eq!(objects, ["node", "peer", "msl", "lan_adapter"]);
    assert!(lines
        .iter()
        .all(|v| v["event"] == "exists" && v["node"] == 1));
    assert_eq!(lines[0]["role"], "secondary");
    assert_eq!(lines[1]["in_sync"], true);
    let (code, out, _, _) = mslctl(&srv.sock, &["events", "--now"]);
    assert_eq!(code, 0);
    assert!(
        out.starts_with("node 1 exists: node: role secondary"),
        "{out}"
    );
}

#[test]
fn test_socket_from_config_version_and_unreachable_daemon() {
    let srv = fake(base_status(), &[]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("node1.toml");
    std::fs::write(
        &cfg,
        format!("node_id = 1\ncontrol_socket = \"{}\"\n", srv.sock.display()),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mslctl"))
        .args(["--config", cfg.to_str().unwrap(), "status", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["role"], "secondary");

    let out = Command::new(env!("CARGO_BIN_EXE_mslctl"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("mslctl {}", env!("CARGO_PKG_VERSION"))
    );

    let (code, _, err, _) = mslctl(&dir.path().join("none.sock"), &["status"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("none.sock") && err.contains("is msld running"),
        "{err}"
    );
}

/// `mslctl status` repeats `insecure_no_auth` first, in text and JSON,
/// and shows the resync limits in force.
#[test]
fn test_status_repeats_insecure_no_auth_and_resync_limits() {
    let mut st = base_status();
    st["insecure_no_auth"] = json!(true);
    st["resync"]["min_mib_s"] = json!(5);
    st["resync"]["max_mib_s"] = json!(40);
    let srv = fake(st, &[]);
    let (code, out, err, _) = mslctl(&srv.sock, &["status"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.lines()
            .next()
            .unwrap_or("")
            .contains("insecure_no_auth")
            && out.contains("NOT authenticated"),
        "{out}"
    );
    assert!(
        out.contains("at least 5 MiB/s") && out.contains("at most 40 MiB/s"),
        "{out}"
    );
    let (_, out, _, _) = mslctl(&srv.sock, &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["insecure_no_auth"], true, "{out}");
    // A keyed node's status has no warning.
    let srv = fake(base_status(), &[]);
    let (_, out, _, _) = mslctl(&srv.sock, &["status"]);
    assert!(!out.contains("insecure"), "{out}");
}
