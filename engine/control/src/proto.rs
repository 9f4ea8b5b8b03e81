//! The JSON on the control socket.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Longest request line the daemon reads (a longer one is refused).
pub const MAX_REQUEST_BYTES: usize = 4096;

/// One request: `{"cmd": "<name>", ...arguments}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// The status document ([`Answer::status`]).
    Status,
    /// Subscribe to the event stream.
    Events,
    /// Become primary; refused if the peer is a live primary or the local
    /// data is not up to date, unless `force`.
    Promote {
        #[serde(default)]
        force: bool,
    },
    Demote,
    /// Planned handover to the in-sync peer.
    Switchover,
    Disconnect,
    Connect,
    /// Discard this node's data: full resync from the peer.
    Invalidate,
    /// Online verify (primary, in sync); progress in `status.verify`.
    Verify {
        #[serde(default)]
        start_block: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        count: Option<u64>,
        #[serde(default)]
        resync: bool,
    },
}

/// Every command name, in the order of [`Request`].
pub const COMMANDS: [&str; 9] = [
    "status",
    "events",
    "promote",
    "demote",
    "switchover",
    "disconnect",
    "connect",
    "invalidate",
    "verify",
];

impl Request {
    /// The command name (`"promote"`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Events => "events",
            Request::Promote { .. } => "promote",
            Request::Demote => "demote",
            Request::Switchover => "switchover",
            Request::Disconnect => "disconnect",
            Request::Connect => "connect",
            Request::Invalidate => "invalidate",
            Request::Verify { .. } => "verify",
        }
    }

    /// Commands that change the node's state and whose outcome arrives
    /// later (as events and in the status document).
    pub fn is_state_change(&self) -> bool {
        matches!(
            self,
            Request::Promote { .. }
                | Request::Demote
                | Request::Switchover
                | Request::Disconnect
                | Request::Connect
                | Request::Invalidate
        )
    }

    /// Parse one request line (server side). The error is the text the
    /// daemon answers with (`not JSON: ...`, `missing "cmd"`, `unknown
    /// command `x``, `request too long`).
    pub fn parse_line(line: &str) -> Result<Request, String> {
        if line.len() > MAX_REQUEST_BYTES {
            return Err("request too long".into());
        }
        let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
        let Some(cmd) = v.get("cmd").and_then(Value::as_str).map(str::to_owned) else {
            return Err("missing \"cmd\"".into());
        };
        if !COMMANDS.contains(&cmd.as_str()) {
            return Err(format!("unknown command `{cmd}`"));
        }
        serde_json::from_value(v).map_err(|e| format!("bad arguments to `{cmd}`: {e}"))
    }

    /// The request line (without the newline).
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| unreachable!("plain enum"))
    }
}

/// One answer. `ok` says whether the daemon did what was asked; when not,
/// `error` says why, and `refused` marks a refusal by the node's state (as
/// opposed to a broken request or a daemon shutting down).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refused: bool,
    /// The command answered (admin commands).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// `status`: the status document (keys in engine/daemon/README.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Value>,
    /// `verify`: how many verify runs had finished before this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runs_before: Option<u64>,
    /// `events`: the stream follows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streaming: Option<bool>,
    /// Keys this version does not know.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Answer {
    pub fn ok() -> Self {
        Answer {
            ok: true,
            ..Answer::default()
        }
    }

    pub fn error(why: impl Into<String>) -> Self {
        Answer {
            ok: false,
            error: Some(why.into()),
            ..Answer::default()
        }
    }

    /// The node refused the command in its current state.
    pub fn refused(why: impl Into<String>) -> Self {
        Answer {
            refused: true,
            ..Answer::error(why)
        }
    }
}

/// One event of the stream (and of `mslctl events --json`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Wall clock, milliseconds since the Unix epoch.
    #[serde(default)]
    pub ts_ms: u64,
    #[serde(default)]
    pub node: u16,
    /// Stable machine name (`role_changed`, `takeover`, `warning`, ...;
    /// `exists` for the current state of `mslctl events --now`).
    pub event: String,
    /// Human-readable text.
    #[serde(default)]
    pub message: String,
    /// Structured fields (`role`, `generation`, `peer`, `reason`, ...)
    /// besides the text; whatever the daemon adds.
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

impl Event {
    /// The `warning` a node sends when it refuses `cmd` in its state
    /// (`"promote refused: ..."`): the reason, if this is one.
    pub fn refusal_of(&self, cmd: &str) -> Option<&str> {
        if self.event != "warning" && self.event != "refused" {
            return None;
        }
        let m = self.message.as_str();
        m.strip_prefix(cmd)
            .is_some_and(|rest| rest.starts_with(" refused"))
            .then_some(m)
    }
}

/// The fields of the status document that scripts wait on. Missing keys
/// read as their defaults; all other keys are ignored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct StatusView {
    pub node: u16,
    pub peer: u16,
    /// `primary` | `secondary`.
    pub role: String,
    /// `uptodate` | `inconsistent` | `outdated` | ...
    pub disk: String,
    pub failed: bool,
    pub generation: String,
    pub connected: bool,
    pub in_sync: bool,
    pub msl_alive: bool,
    pub lan_alive: bool,
    pub peer_role: Option<String>,
    /// A switchover is under way.
    pub switching: bool,
    pub resync: ResyncView,
    pub last_session_end: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct ResyncView {
    pub active: bool,
    pub source: bool,
    pub remaining_blocks: u64,
    pub total_blocks: u64,
}

impl StatusView {
    pub fn from_value(v: &Value) -> Result<Self, String> {
        Self::deserialize(v).map_err(|e| format!("bad status document: {e}"))
    }

    pub fn is_primary(&self) -> bool {
        self.role == "primary"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn test_request_lines_match_the_daemon_wire_format() {
        let cases = [
            (Request::Status, json!({"cmd": "status"})),
            (Request::Events, json!({"cmd": "events"})),
            (
                Request::Promote { force: true },
                json!({"cmd": "promote", "force": true}),
            ),
            (Request::Demote, json!({"cmd": "demote"})),
            (Request::Switchover, json!({"cmd": "switchover"})),
            (Request::Disconnect, json!({"cmd": "disconnect"})),
            (Request::Connect, json!({"cmd": "connect"})),
            (Request::Invalidate, json!({"cmd": "invalidate"})),
            (
                Request::Verify {
                    start_block: 5,
                    count: None,
                    resync: true,
                },
                json!({"cmd": "verify", "start_block": 5, "resync": true}),
            ),
        ];
        for (req, want) in cases {
            let line = req.to_line();
            assert_eq!(serde_json::from_str::<Value>(&line).unwrap(), want);
            assert_eq!(Request::parse_line(&line).unwrap(), req);
            assert_eq!(want["cmd"], req.name());
        }
    }

    #[test]
    fn test_parse_line_errors_name_the_problem() {
        assert!(Request::parse_line("{")
            .unwrap_err()
            .starts_with("not JSON"));
        assert_eq!(Request::parse_line("{}").unwrap_err(), "missing \"cmd\"");
        assert_eq!(
            Request::parse_line(r#"{"cmd":"reboot"}"#).unwrap_err(),
            "unknown command `reboot`"
        );
        assert!(Request::parse_line(r#"{"cmd":"promote","force":"yes"}"#)
            .unwrap_err()
            .contains("bad arguments to `promote`"));
        let long = format!(r#"{{"cmd":"status","pad":"{}"}}"#, "x".repeat(5000));
        assert_eq!(Request::parse_line(&long).unwrap_err(), "request too long");
        // Defaults: a promote without force is not forced.
        assert_eq!(
            Request::parse_line(r#"{"cmd":"promote"}"#).unwrap(),
            Request::Promote { force: false }
        );
    }

    #[test]
    fn test_answer_keeps_unknown_keys_and_omits_empty_ones() {
        let a: Answer =
            serde_json::from_str(r#"{"ok":true,"cmd":"demote","note":"n","future":7}"#).unwrap();
        assert!(a.ok);
        assert_eq!(a.cmd.as_deref(), Some("demote"));
        assert_eq!(a.extra["future"], 7);
        assert_eq!(
            serde_json::to_value(Answer::refused("promote refused: x")).unwrap(),
            json!({"ok": false, "error": "promote refused: x", "refused": true})
        );
        assert_eq!(
            serde_json::to_value(Answer::ok()).unwrap(),
            json!({"ok": true})
        );
    }

    #[test]
    fn test_event_structured_fields_and_refusal_matching() {
        let e: Event = serde_json::from_value(json!({
            "ts_ms": 1, "node": 2, "event": "role_changed",
            "message": "role is now Primary", "role": "primary", "generation": "00ff"
        }))
        .unwrap();
        assert_eq!(e.fields["role"], "primary");
        assert_eq!(e.refusal_of("promote"), None);
        let w = Event {
            event: "warning".into(),
            message: "promote refused: the peer is primary and alive".into(),
            ..Event::default()
        };
        assert_eq!(w.refusal_of("promote"), Some(w.message.as_str()));
        assert_eq!(w.refusal_of("demote"), None);
        assert_eq!(w.refusal_of("prom"), None, "a prefix of the verb is not it");
    }

    #[test]
    fn test_status_view_reads_the_daemon_document_leniently() {
        let s = StatusView::from_value(&json!({
            "node": 1, "peer": 2, "role": "primary", "disk": "uptodate",
            "connected": true, "in_sync": false, "switching": false,
            "resync": {"active": true, "source": true, "remaining_blocks": 3, "total_blocks": 9,
                       "rate_mib_s": 1.5},
            "counters": {"x": 1}
        }))
        .unwrap();
        assert!(s.is_primary() && s.connected && !s.in_sync && !s.switching);
        assert_eq!(s.resync.remaining_blocks, 3);
        assert!(
            StatusView::from_value(&json!({"switching": true}))
                .unwrap()
                .switching
        );
        assert!(StatusView::from_value(&json!({"role": 7})).is_err());
    }
}
