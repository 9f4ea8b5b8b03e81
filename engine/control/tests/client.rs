//! The client against a scripted server on a real Unix socket: answers,
//! an event stream delivered in pieces, timeouts, and each kind of failure.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use msl_control::{request, request_value, ClientError, EventStream, Request};

/// Serve one connection: read the request line, hand it to `f` with the
/// connection to write on.
fn serve_one(
    f: impl FnOnce(String, &mut std::os::unix::net::UnixStream) + Send + 'static,
) -> (tempfile::TempDir, PathBuf, JoinHandle<()>) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ctl.sock");
    let l = UnixListener::bind(&sock).unwrap();
    let t = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut line = String::new();
        BufReader::new(c.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        f(line, &mut c);
    });
    (dir, sock, t)
}

#[test]
fn test_request_sends_one_line_and_parses_the_answer() {
    let (_d, sock, t) = serve_one(|line, c| {
        assert_eq!(line, "{\"cmd\":\"promote\",\"force\":true}\n");
        writeln!(
            c,
            r#"{{"ok":false,"error":"promote refused: peer alive","refused":true}}"#
        )
        .unwrap();
    });
    let a = request(&sock, &Request::Promote { force: true }).unwrap();
    assert!(!a.ok && a.refused);
    assert_eq!(a.error.as_deref(), Some("promote refused: peer alive"));
    t.join().unwrap();
}

#[test]
fn test_request_failures_are_told_apart() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("none.sock");
    let e = request(&missing, &Request::Status).unwrap_err();
    assert!(matches!(e, ClientError::Connect { .. }), "{e}");
    assert!(e.to_string().contains("none.sock") && e.to_string().contains("--config"));

    let (_d, sock, t) = serve_one(|_, _| {});
    let e = request(&sock, &Request::Status).unwrap_err();
    assert!(matches!(e, ClientError::NoAnswer { .. }), "{e}");
    t.join().unwrap();

    let (_d, sock, t) = serve_one(|_, c| writeln!(c, "hello").unwrap());
    let e = request(&sock, &Request::Status).unwrap_err();
    assert!(matches!(e, ClientError::BadAnswer { .. }), "{e}");
    t.join().unwrap();
}

#[test]
fn test_event_stream_reassembles_split_lines_and_times_out() {
    let (_d, sock, t) = serve_one(|line, c| {
        assert_eq!(line, "{\"cmd\":\"events\"}\n");
        writeln!(c, r#"{{"ok":true,"streaming":true}}"#).unwrap();
        // One event written in two pieces with a pause longer than the
        // reader's first deadline.
        c.write_all(br#"{"ts_ms":1,"node":1,"event":"role_ch"#)
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        c.write_all(b"anged\",\"message\":\"m\",\"role\":\"primary\"}\n")
            .unwrap();
        writeln!(c, "not an event").unwrap();
        writeln!(c, r#"{{"event":"warning","message":"demote refused: x"}}"#).unwrap();
        std::thread::sleep(Duration::from_millis(500));
    });
    let mut s = EventStream::open(&sock).unwrap();
    let t0 = Instant::now();
    assert_eq!(
        s.next_before(t0 + Duration::from_millis(100)).unwrap(),
        None,
        "half a line is not an event"
    );
    let e = s
        .next_before(Instant::now() + Duration::from_secs(3))
        .unwrap()
        .unwrap();
    assert_eq!(e.event, "role_changed");
    assert_eq!(e.fields["role"], "primary");
    let e = s
        .next_before(Instant::now() + Duration::from_secs(3))
        .unwrap()
        .unwrap();
    assert_eq!(e.refusal_of("demote"), Some("demote refused: x"));
    t.join().unwrap();
    let e = s
        .next_before(Instant::now() + Duration::from_secs(3))
        .unwrap_err();
    assert!(e.to_string().contains("ended the event stream"), "{e}");
}

#[test]
fn test_request_value_round_trip() {
    let (_d, sock, t) = serve_one(|line, c| {
        assert_eq!(line, "{\"cmd\":\"status\",\"x\":1}\n");
        writeln!(c, r#"{{"ok":true,"status":{{"role":"primary"}}}}"#).unwrap();
    });
    let v = request_value(&sock, &serde_json::json!({"cmd": "status", "x": 1})).unwrap();
    assert_eq!(v["status"]["role"], "primary");
    t.join().unwrap();
    let e = request_value(&sock.with_file_name("gone.sock"), &serde_json::json!({})).unwrap_err();
    assert!(e.contains("gone.sock"), "{e}");
}
