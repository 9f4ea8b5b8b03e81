//! The outbox: actions for the host, executed in the order they were
//! queued (a `PersistMeta` before the actions after it).

use alloc::collections::VecDeque;

use super::Action;

/// Actions queued for the host.
pub(super) struct Outbox<H> {
    queue: VecDeque<Action<H>>,
}

impl<H> Outbox<H> {
    pub(super) fn new() -> Self {
        Outbox {
            queue: VecDeque::new(),
        }
    }

    pub(super) fn push(&mut self, a: Action<H>) {
        self.queue.push_back(a);
    }

    pub(super) fn pop(&mut self) -> Option<Action<H>> {
        self.queue.pop_front()
    }
}
