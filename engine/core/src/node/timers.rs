//! The node's timers: one deadline per [`Timer`], in one table. What a
//! timer does when it fires, and whether it is armed in the current state,
//! is the business of the part that owns it; the node asks the table for
//! the earliest deadline in [`Node::poll_timeout`](super::Node::poll_timeout).

use crate::Micros;

/// Every timer of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Timer {
    /// The next heartbeat (LAN server-state packet and MSL heartbeat).
    Heartbeat,
    /// The next HELLO while no MSL session is up.
    Hello,
    /// Resync rate cap: the next resync read may start then.
    ResyncPace,
    /// Resync floor under client load: a read beyond the in-flight floor
    /// may start then.
    ResyncFloor,
    /// The peer's LAN side has worked better since before this deadline
    /// minus the debounce: a switchover starts then.
    SwitchoverDebounce,
}

const TIMERS: usize = 5;

/// Deadlines by timer; `None`: not armed.
#[derive(Clone, Debug)]
pub(super) struct TimerTable {
    at: [Option<Micros>; TIMERS],
}

impl TimerTable {
    pub(super) fn new() -> Self {
        TimerTable { at: [None; TIMERS] }
    }

    pub(super) fn get(&self, t: Timer) -> Option<Micros> {
        self.at[t as usize]
    }

    /// The deadline, or 0 (due since the start) when not armed.
    pub(super) fn deadline(&self, t: Timer) -> Micros {
        self.get(t).unwrap_or(0)
    }

    pub(super) fn set(&mut self, t: Timer, at: Micros) {
        self.at[t as usize] = Some(at);
    }

    pub(super) fn stop(&mut self, t: Timer) {
        self.at[t as usize] = None;
    }

    /// Armed and due at `now`.
    pub(super) fn expired(&self, t: Timer, now: Micros) -> bool {
        self.get(t).is_some_and(|at| now >= at)
    }
}
