//! A queue from any number of threads to one worker that takes everything
//! queued at once, without an allocation per item.
//!
//! The unbounded channels of std and crossbeam store their items in
//! linked blocks of 31 or 32 and allocate a block as one fills, so a
//! steady stream of work through them allocates once per 31 or 32 items;
//! flume's allocates a waiting hook each time its receiver sleeps. Here
//! the items live in a `VecDeque` under a mutex, and the worker takes them
//! all by swapping in its own empty `VecDeque`: both keep their room, so
//! once they have grown to the deepest batch nothing is allocated. The
//! sender wakes the worker only when it sleeps. Written here because it
//! is a few lines of std; the one zero-allocation channel crate found
//! (kanal) needs dozens of `unsafe` blocks for the same job.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::Thread;

use crossbeam_utils::Backoff;

struct State<T> {
    items: VecDeque<T>,
    /// The [`Receiver`] is alive; `send` fails without it.
    receiver: bool,
    /// The receiver sleeps (parked) until a sender unparks it.
    sleeping: Option<Thread>,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    /// Live [`Sender`]s; the receiver ends when none is left. Outside the
    /// lock: a sender is made and dropped per NBD write.
    senders: AtomicUsize,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // No code that can panic runs under this lock.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The sending end; clone it for more senders.
pub struct Sender<T>(Arc<Shared<T>>);

/// The worker's end.
pub struct Receiver<T>(Arc<Shared<T>>);

/// A new queue and its two ends.
pub fn queue<T>() -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            receiver: true,
            sleeping: None,
        }),
        senders: AtomicUsize::new(1),
    });
    (Sender(shared.clone()), Receiver(shared))
}

impl<T> Sender<T> {
    /// Queue `item` (never waits); hands it back if the receiver is gone.
    pub fn send(&self, item: T) -> Result<(), T> {
        let mut s = self.0.lock();
        if !s.receiver {
            return Err(item);
        }
        s.items.push_back(item);
        let wake = s.sleeping.take();
        drop(s);
        if let Some(t) = wake {
            t.unpark();
        }
        Ok(())
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.0.senders.fetch_add(1, Ordering::Relaxed);
        Sender(self.0.clone())
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        if self.0.senders.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        // The last one: a receiver that saw a sender left sleeps under
        // the lock taken here, so it is woken, or it looks after this.
        let wake = self.0.lock().sleeping.take();
        if let Some(t) = wake {
            t.unpark();
        }
    }
}

impl<T> Receiver<T> {
    /// Wait until something is queued and move all of it into `batch`
    /// (best empty: then the two swap their room; items already in it
    /// stay first). Returns false once every sender is gone and nothing
    /// is left. Before it sleeps it looks again a few times, spinning,
    /// then yielding the CPU, as crossbeam's channels do: on a CPU shared
    /// with the senders the next item often comes before a sleep and a
    /// wake-up would.
    pub fn take(&self, batch: &mut VecDeque<T>) -> bool {
        let backoff = Backoff::new();
        loop {
            let mut s = self.0.lock();
            if Self::move_out(&mut s, batch) {
                return true;
            }
            if self.0.senders.load(Ordering::Acquire) == 0 {
                return false;
            }
            if !backoff.is_completed() {
                drop(s);
                backoff.snooze();
                continue;
            }
            // An unpark between here and `park` makes `park` return at
            // once; a spurious return just looks again.
            s.sleeping = Some(std::thread::current());
            drop(s);
            std::thread::park();
        }
    }

    /// Like [`Receiver::take`] without waiting: false if nothing is queued.
    pub fn try_take(&self, batch: &mut VecDeque<T>) -> bool {
        Self::move_out(&mut self.0.lock(), batch)
    }

    fn move_out(s: &mut State<T>, batch: &mut VecDeque<T>) -> bool {
        s.sleeping = None;
        if s.items.is_empty() {
            return false;
        }
        if batch.is_empty() {
            std::mem::swap(&mut s.items, batch);
        } else {
            batch.extend(s.items.drain(..));
        }
        true
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let left = {
            let mut s = self.0.lock();
            s.receiver = false;
            std::mem::take(&mut s.items)
        };
        // Dropped outside the lock: an item's drop may send again.
        drop(left);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn test_items_arrive_once_each_in_order_per_sender() {
        let (tx, rx) = queue::<(usize, u32)>();
        let senders: Vec<_> = (0..4)
            .map(|t| {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    for i in 0..20_000 {
                        tx.send((t, i)).ok().unwrap();
                    }
                })
            })
            .collect();
        drop(tx);
        let mut next = [0u32; 4];
        let mut batch = VecDeque::new();
        while rx.take(&mut batch) {
            for (t, i) in batch.drain(..) {
                assert_eq!(i, next[t], "sender {t}'s items out of order");
                next[t] += 1;
            }
        }
        for s in senders {
            s.join().unwrap();
        }
        assert_eq!(next, [20_000; 4]);
    }

    #[test]
    fn test_receiver_ends_when_the_last_sender_goes() {
        let (tx, rx) = queue::<u8>();
        let tx2 = tx.clone();
        let worker = std::thread::spawn(move || {
            let mut batch = VecDeque::new();
            let mut got = Vec::new();
            while rx.take(&mut batch) {
                got.extend(batch.drain(..));
            }
            got
        });
        tx.send(1).ok().unwrap();
        drop(tx);
        std::thread::sleep(Duration::from_millis(20));
        tx2.send(2).ok().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(!worker.is_finished(), "a sender is still alive");
        drop(tx2);
        assert_eq!(worker.join().unwrap(), vec![1, 2]);
    }

    #[test]
    fn test_send_hands_the_item_back_when_the_receiver_is_gone() {
        let (tx, rx) = queue::<String>();
        tx.send("queued".into()).ok().unwrap();
        drop(rx);
        assert_eq!(tx.send("late".into()), Err("late".to_string()));
    }

    #[test]
    fn test_take_appends_to_a_batch_that_is_not_empty() {
        let (tx, rx) = queue::<u8>();
        let mut batch = VecDeque::from([1]);
        tx.send(2).ok().unwrap();
        assert!(rx.try_take(&mut batch));
        assert_eq!(batch, [1, 2]);
        assert!(!rx.try_take(&mut batch), "nothing left");
    }

    #[test]
    fn test_a_sleeping_receiver_wakes_for_a_send() {
        let (tx, rx) = queue::<u8>();
        let worker = std::thread::spawn(move || {
            let mut batch = VecDeque::new();
            assert!(rx.take(&mut batch));
            batch
        });
        std::thread::sleep(Duration::from_millis(50));
        tx.send(7).ok().unwrap();
        assert_eq!(worker.join().unwrap(), [7]);
    }
}
