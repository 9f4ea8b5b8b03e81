//! Waiting for the outcome of a state change, and for sync or connection.
//!
//! msld accepts an administrator command at once and hands it to the
//! node's core, which carries it out or refuses it with a `warning` event
//! (`"promote refused: ..."`). So a command's outcome is read from the
//! event stream (subscribed BEFORE the command is sent, so its events
//! cannot be missed) and from the status document (polled; a status
//! request queues behind the command in the core, so the first poll
//! already sees what the command did at once).

use std::path::Path;
use std::time::{Duration, Instant};

use msl_control::{request, Event, EventStream, Request, StatusView};

/// How often the status is polled while waiting.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Where a wait stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The outcome is there; what happened.
    Done(String),
    /// It cannot happen; why.
    Refused(String),
    Pending,
}

/// Why a wait ended without success.
#[derive(Debug)]
pub enum WaitError {
    /// msld could not be asked, or went away.
    Error(String),
    Refused(String),
    /// The time ran out; the last status seen.
    Timeout(String),
}

/// What is waited for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Goal {
    /// The outcome of this administrator command.
    Command(Request),
    Sync,
    Connect,
}

impl Goal {
    fn name(&self) -> &'static str {
        match self {
            Goal::Command(r) => r.name(),
            Goal::Sync => "wait-sync",
            Goal::Connect => "wait-connect",
        }
    }
}

/// Judges events and status snapshots against a goal.
#[derive(Debug)]
pub struct Judge {
    goal: Goal,
    /// The status before the command was sent.
    before: StatusView,
    /// An event already told the outcome (e.g. `switchover_done`,
    /// `resync_started` after `invalidate`).
    seen_done: Option<String>,
}

impl Judge {
    pub fn new(goal: Goal, before: StatusView) -> Self {
        Judge {
            goal,
            before,
            seen_done: None,
        }
    }

    /// An event arrived.
    pub fn on_event(&mut self, e: &Event) -> Verdict {
        let msg = || format!("{}: {}", e.event, e.message);
        if e.event == "disk_failed" {
            return Verdict::Refused(format!("the node failed: {}", e.message));
        }
        match &self.goal {
            Goal::Command(req) => {
                if let Some(why) = e.refusal_of(req.name()) {
                    return Verdict::Refused(why.to_string());
                }
                match (req, e.event.as_str()) {
                    (Request::Switchover, "switchover_done") => {
                        self.seen_done = Some(e.message.clone());
                    }
                    (Request::Invalidate, "resync_started") => {
                        self.seen_done = Some(e.message.clone());
                    }
                    (Request::Connect, "split_brain_refused" | "connection_refused") => {
                        return Verdict::Refused(msg());
                    }
                    _ => {}
                }
            }
            Goal::Sync | Goal::Connect => {
                if e.event == "split_brain_refused" {
                    return Verdict::Refused(msg());
                }
            }
        }
        match &self.seen_done {
            Some(m) => Verdict::Done(m.clone()),
            None => Verdict::Pending,
        }
    }

    /// A status snapshot arrived.
    pub fn on_status(&mut self, s: &StatusView) -> Verdict {
        if let Some(m) = &self.seen_done {
            return Verdict::Done(m.clone());
        }
        let failed = "the node is fail-closed after an I/O failure (see `mslctl events`; \
                      restart msld once the disk is fixed)";
        match &self.goal {
            Goal::Command(Request::Promote { .. }) => {
                if s.is_primary() {
                    return Verdict::Done("this node is primary".into());
                }
                if s.failed {
                    return Verdict::Refused(format!("promote refused: {failed}"));
                }
            }
            Goal::Command(Request::Demote) => {
                if !s.is_primary() {
                    return Verdict::Done("this node is secondary".into());
                }
            }
            Goal::Command(Request::Switchover) => {
                if self.before.is_primary() && !s.is_primary() && !s.switching {
                    return Verdict::Done(format!(
                        "this node is secondary, node {} took over",
                        s.peer
                    ));
                }
            }
            Goal::Command(Request::Disconnect) => {
                if !s.connected {
                    return Verdict::Done("MSL session down, not reconnecting".into());
                }
            }
            Goal::Command(Request::Connect) | Goal::Connect => {
                if s.connected {
                    return Verdict::Done(format!("connected to node {}", s.peer));
                }
                if s.failed {
                    return Verdict::Refused(failed.into());
                }
            }
            Goal::Command(Request::Invalidate) => {
                if s.disk != "uptodate" || s.resync.active {
                    return Verdict::Done(format!(
                        "local data marked {}; full resync from node {}",
                        s.disk, s.peer
                    ));
                }
            }
            Goal::Sync => {
                if s.connected && s.in_sync && !s.resync.active && s.disk == "uptodate" {
                    return Verdict::Done(format!("in sync with node {}", s.peer));
                }
                if s.failed {
                    return Verdict::Refused(failed.into());
                }
            }
            Goal::Command(_) => {}
        }
        Verdict::Pending
    }
}

/// The status document, as the view a wait needs.
pub fn status(socket: &Path) -> Result<StatusView, WaitError> {
    let a = request(socket, &Request::Status).map_err(|e| WaitError::Error(e.to_string()))?;
    if !a.ok {
        return Err(WaitError::Error(
            a.error.unwrap_or_else(|| "status failed".into()),
        ));
    }
    StatusView::from_value(&a.status.unwrap_or_default()).map_err(WaitError::Error)
}

/// A short description of a status for timeout messages.
pub fn describe(s: &StatusView) -> String {
    let mut d = format!(
        "role {}, disk {}, {}, {}",
        s.role,
        s.disk,
        if s.connected {
            "connected"
        } else {
            "not connected"
        },
        if s.in_sync { "in sync" } else { "not in sync" }
    );
    if s.resync.active {
        d.push_str(&format!(
            ", resync {} of {} blocks remaining",
            s.resync.remaining_blocks, s.resync.total_blocks
        ));
    }
    d
}

/// Send `req` (a state change) and wait for its outcome; with `timeout`
/// `None`, wait forever.
pub fn command(
    socket: &Path,
    req: &Request,
    timeout: Option<Duration>,
) -> Result<String, WaitError> {
    let deadline = timeout.map(|t| Instant::now() + t);
    let before = status(socket)?;
    let mut events = EventStream::open(socket).map_err(|e| WaitError::Error(e.to_string()))?;
    let a = request(socket, req).map_err(|e| WaitError::Error(e.to_string()))?;
    if !a.ok {
        let why = a.error.unwrap_or_else(|| format!("{} failed", req.name()));
        let refused = a.refused || why.starts_with(&format!("{} refused", req.name()));
        return Err(if refused {
            WaitError::Refused(why)
        } else {
            WaitError::Error(why)
        });
    }
    let judge = Judge::new(Goal::Command(req.clone()), before);
    follow(socket, &mut events, judge, deadline)
}

/// Wait for sync or connection.
pub fn until(socket: &Path, goal: Goal, timeout: Option<Duration>) -> Result<String, WaitError> {
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut events = EventStream::open(socket).map_err(|e| WaitError::Error(e.to_string()))?;
    let before = status(socket)?;
    follow(socket, &mut events, Judge::new(goal, before), deadline)
}

fn follow(
    socket: &Path,
    events: &mut EventStream,
    mut judge: Judge,
    deadline: Option<Instant>,
) -> Result<String, WaitError> {
    loop {
        let s = status(socket)?;
        match judge.on_status(&s) {
            Verdict::Done(m) => return Ok(m),
            Verdict::Refused(m) => return Err(WaitError::Refused(m)),
            Verdict::Pending => {}
        }
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            return Err(WaitError::Timeout(format!(
                "{}: no outcome in time; now {}",
                judge.goal.name(),
                describe(&s)
            )));
        }
        let next_poll = deadline.map_or(now + POLL_INTERVAL, |d| d.min(now + POLL_INTERVAL));
        while let Some(e) = events
            .next_before(next_poll)
            .map_err(|e| WaitError::Error(e.to_string()))?
        {
            match judge.on_event(&e) {
                Verdict::Done(m) => return Ok(m),
                Verdict::Refused(m) => return Err(WaitError::Refused(m)),
                Verdict::Pending => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(role: &str, disk: &str, connected: bool, in_sync: bool) -> StatusView {
        StatusView {
            node: 1,
            peer: 2,
            role: role.into(),
            disk: disk.into(),
            connected,
            in_sync,
            ..StatusView::default()
        }
    }

    fn ev(kind: &str, msg: &str) -> Event {
        Event {
            event: kind.into(),
            message: msg.into(),
            ..Event::default()
        }
    }

    #[test]
    fn test_promote_done_when_primary_refused_by_warning_or_failure() {
        let goal = Goal::Command(Request::Promote { force: false });
        let mut j = Judge::new(goal.clone(), st("secondary", "outdated", false, false));
        assert_eq!(
            j.on_status(&st("secondary", "outdated", false, false)),
            Verdict::Pending
        );
        // Another command's refusal is not this one's.
        assert_eq!(
            j.on_event(&ev("warning", "switchover refused: x")),
            Verdict::Pending
        );
        assert_eq!(
            j.on_event(&ev(
                "warning",
                "promote refused: local data is not up to date"
            )),
            Verdict::Refused("promote refused: local data is not up to date".into())
        );
        assert!(matches!(
            j.on_status(&st("primary", "uptodate", false, false)),
            Verdict::Done(_)
        ));
        let mut failed = st("secondary", "uptodate", false, false);
        failed.failed = true;
        let mut j = Judge::new(goal, failed.clone());
        assert!(matches!(j.on_status(&failed), Verdict::Refused(m) if m.contains("fail-closed")));
    }

    #[test]
    fn test_switchover_needs_the_role_to_move_not_just_a_status() {
        let mut j = Judge::new(
            Goal::Command(Request::Switchover),
            st("primary", "uptodate", true, true),
        );
        let mut switching = st("primary", "uptodate", true, true);
        switching.switching = true;
        assert_eq!(j.on_status(&switching), Verdict::Pending);
        assert!(matches!(
            j.on_status(&st("secondary", "uptodate", true, true)),
            Verdict::Done(_)
        ));
        // A secondary asked to switch over: never "done" by its status.
        let mut j = Judge::new(
            Goal::Command(Request::Switchover),
            st("secondary", "uptodate", true, true),
        );
        assert_eq!(
            j.on_status(&st("secondary", "uptodate", true, true)),
            Verdict::Pending
        );
        assert!(matches!(
            j.on_event(&ev(
                "warning",
                "switchover refused: this node is not an in-sync primary"
            )),
            Verdict::Refused(_)
        ));
        // The done event settles it even before the status shows it.
        let mut j = Judge::new(
            Goal::Command(Request::Switchover),
            st("primary", "uptodate", true, true),
        );
        assert_eq!(
            j.on_event(&ev("switchover_done", "node 2 is primary")),
            Verdict::Done("node 2 is primary".into())
        );
    }

    #[test]
    fn test_connect_refused_by_split_brain_and_wait_sync_needs_everything() {
        let mut j = Judge::new(
            Goal::Command(Request::Connect),
            st("primary", "uptodate", false, false),
        );
        assert!(matches!(
            j.on_event(&ev("split_brain_refused", "data not merged")),
            Verdict::Refused(m) if m.contains("split_brain_refused")
        ));
        let mut j = Judge::new(Goal::Sync, st("secondary", "inconsistent", true, false));
        let mut resyncing = st("secondary", "inconsistent", true, false);
        resyncing.resync.active = true;
        assert_eq!(j.on_status(&resyncing), Verdict::Pending);
        assert_eq!(
            j.on_status(&st("secondary", "outdated", true, true)),
            Verdict::Pending,
            "in_sync with data not up to date is not done"
        );
        assert!(matches!(
            j.on_status(&st("secondary", "uptodate", true, true)),
            Verdict::Done(_)
        ));
        let mut j = Judge::new(Goal::Connect, st("secondary", "uptodate", false, false));
        assert_eq!(
            j.on_status(&st("secondary", "uptodate", false, false)),
            Verdict::Pending
        );
        assert!(matches!(
            j.on_status(&st("secondary", "uptodate", true, false)),
            Verdict::Done(_)
        ));
    }

    #[test]
    fn test_invalidate_done_when_data_marked_or_resync_started() {
        let before = st("secondary", "uptodate", true, true);
        let mut j = Judge::new(Goal::Command(Request::Invalidate), before.clone());
        assert_eq!(j.on_status(&before), Verdict::Pending);
        assert!(matches!(
            j.on_status(&st("secondary", "inconsistent", true, false)),
            Verdict::Done(_)
        ));
        let mut j = Judge::new(Goal::Command(Request::Invalidate), before.clone());
        assert!(matches!(
            j.on_event(&ev("resync_started", "resync started as target")),
            Verdict::Done(_)
        ));
        assert!(
            matches!(j.on_status(&before), Verdict::Done(_)),
            "a resync that already finished still counts"
        );
    }
}
