//! The core's input queue, and which thread runs the core.
//!
//! Every input for the protocol core (MSL frames, LAN server-state packets,
//! client writes, flush completions, admin commands) enters one FIFO
//! channel. The thread that puts an input in then runs the core for what is
//! queued itself, if no other thread is running it at that moment: a lone
//! client write is handled on the NBD reader that read it, the peer's ack
//! on the MSL receive thread that received it, with no wake-up of another
//! thread (each hand-off cost tens of microseconds of a queue-depth-1 write
//! on this kind of machine). A thread that finds the core busy leaves its
//! input queued; the thread running the core looks at the queue again after
//! letting go (or, when it leaves work behind, wakes the core thread), so
//! nothing queued is left behind.
//!
//! Whatever thread sends an input may so run the core: its actions (MSL
//! sends, reply callbacks; disk I/O is handed to the driver's I/O worker,
//! or done by an NBD reader after it lets go: `driver::writes_here`) run
//! there too, and a callback must never block. A panic in the core
//! stops the process.
//!
//! The core thread remains, for timers and backlogs: it sleeps until the
//! core's next deadline, and a thread that ran the core wakes it when it
//! leaves inputs behind (it handles at most `INLINE_BUDGET` before going
//! back to its own work), when the core stopped, or when the next deadline
//! moved earlier than the one the core thread sleeps for.
//!
//! Order: only the thread holding the core takes inputs out of the channel,
//! so inputs are handled in the order they entered it, whichever thread
//! handles them (frames of one sender never overtake each other).

use std::sync::atomic::{fence, AtomicIsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SendError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::Thread;
use std::time::Duration;

use crate::input::{Exit, Input};

/// Inputs a thread other than the core thread handles in one go before it
/// hands the rest to the core thread.
pub const INLINE_BUDGET: usize = 64;

/// The longest the core thread sleeps, and the shortest (microseconds).
const MAX_SLEEP_US: u64 = 50_000;
const MIN_SLEEP_US: u64 = 100;

/// What runs the core: the driver.
pub trait Runner: Send {
    /// Handle queued inputs (at most `budget`), and a timer tick if due;
    /// `Drained::handled` says how many it took out of `rx`.
    fn drain(&mut self, rx: &Receiver<Input>, budget: usize) -> Drained;
    /// Stop: the last actions, answers for waiting clients.
    fn finish(&mut self, exit: Exit) -> Exit;
    /// Microseconds on the core's clock.
    fn now_us(&self) -> u64;
}

/// Outcome of `Runner::drain`.
pub struct Drained {
    /// Inputs handled.
    pub handled: usize,
    /// The core's next deadline (microseconds on its clock).
    pub deadline_us: u64,
    /// The core stopped.
    pub exit: Option<Exit>,
}

struct Slot {
    runner: Box<dyn Runner>,
    rx: Receiver<Input>,
    /// When the core thread wakes next (core clock), set under the lock.
    sleep_until: u64,
}

struct Cell {
    slot: Mutex<Option<Slot>>,
    /// Inputs in the channel (may dip below zero for a moment: a sender
    /// counts after its input is in, and it can be taken before that).
    pending: AtomicIsize,
    core_thread: OnceLock<Thread>,
    /// Whether senders run the core themselves (else only the core thread
    /// does, woken by each sender).
    inline: bool,
    /// The longest the core thread sleeps (microseconds).
    max_sleep_us: u64,
}

impl Cell {
    /// Run the core (the caller holds `slot`) and count what it took.
    fn drain(&self, slot: &mut Slot, budget: usize) -> Drained {
        let d = guarded(|| slot.runner.drain(&slot.rx, budget));
        self.pending.fetch_sub(d.handled as isize, Ordering::SeqCst);
        d
    }

    fn wake_core(&self) {
        if let Some(t) = self.core_thread.get() {
            t.unpark();
        }
    }
}

/// Sending side of the core's input queue (cheap to clone).
#[derive(Clone)]
pub struct Inbox {
    tx: SyncSender<Input>,
    cell: Arc<Cell>,
}

/// Receiving side: becomes the core thread (`run`).
pub struct InboxRx {
    rx: Receiver<Input>,
    cell: Arc<Cell>,
}

/// A core input queue holding up to `capacity` inputs; senders run the
/// core themselves when it is free (see the module documentation).
pub fn inbox(capacity: usize) -> (Inbox, InboxRx) {
    inbox_sleeping(capacity, true, MAX_SLEEP_US)
}

/// As `inbox`, choosing whether senders may run the core (`inline`; with
/// `false` the core thread handles every input, woken by each sender: the
/// comparison the tests make) and the core thread's longest sleep between
/// timer checks (tests use a long one: nothing then hides an input left
/// behind).
fn inbox_sleeping(capacity: usize, inline: bool, max_sleep_us: u64) -> (Inbox, InboxRx) {
    let (tx, rx) = sync_channel(capacity);
    let cell = Arc::new(Cell {
        slot: Mutex::new(None),
        pending: AtomicIsize::new(0),
        core_thread: OnceLock::new(),
        inline,
        max_sleep_us,
    });
    (
        Inbox {
            tx,
            cell: cell.clone(),
        },
        InboxRx { rx, cell },
    )
}

fn lock_slot(m: &Mutex<Option<Slot>>) -> MutexGuard<'_, Option<Slot>> {
    m.lock().unwrap_or_else(|_| core_panicked())
}

/// A panic while running the core leaves it in an unknown state (a write
/// half applied, an action half done): stop the process at once, whichever
/// thread ran it, rather than go on or leave senders waiting on a core
/// that will never run again. The supervisor restarts msld.
fn core_panicked() -> ! {
    tracing::error!("msld: the protocol core panicked; stopping the process");
    std::process::abort();
}

/// Run `f` on the core; a panic in it stops the process (`core_panicked`).
fn guarded<T>(f: impl FnOnce() -> T) -> T {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| core_panicked())
}

// The errors hand the input back, as `SyncSender`'s do (a status request
// retries with it), so they are as large as an input.
#[allow(clippy::result_large_err)]
impl Inbox {
    /// Queue an input (waiting while the queue is full), then run the core
    /// if it is free. Fails once the core has stopped and its queue is
    /// gone (an input queued while it stops is dropped unanswered: a
    /// waiting client then sees its reply channel close).
    pub fn send(&self, input: Input) -> Result<(), SendError<Input>> {
        self.push(input)?;
        self.kick();
        Ok(())
    }

    /// As `send`, but fails instead of waiting when the queue is full.
    pub fn try_send(&self, input: Input) -> Result<(), TrySendError<Input>> {
        self.tx.try_send(input)?;
        self.cell.pending.fetch_add(1, Ordering::SeqCst);
        self.kick();
        Ok(())
    }

    /// Queue an input without running the core (a batch of inputs is
    /// queued first, then one `kick` handles them together).
    pub fn push(&self, input: Input) -> Result<(), SendError<Input>> {
        self.tx.send(input)?;
        self.cell.pending.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Queue an input without waiting and without running the core: fails
    /// (handing it back) when the queue is full or gone.
    pub fn try_push(&self, input: Input) -> Result<(), TrySendError<Input>> {
        self.tx.try_send(input)?;
        self.cell.pending.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Run the core for what is queued, on this thread if no other thread
    /// is running it; wake the core thread for what this one leaves.
    pub fn kick(&self) {
        let cell = &*self.cell;
        if !cell.inline {
            cell.wake_core();
            return;
        }
        let mut budget = INLINE_BUDGET;
        // Count before try_lock, and a holder unlocks before it reads the
        // count: with the fences one of the two sees the other (the
        // failed try_lock alone orders nothing).
        fence(Ordering::SeqCst);
        while cell.pending.load(Ordering::SeqCst) > 0 {
            if budget == 0 {
                cell.wake_core();
                return;
            }
            let mut guard = match cell.slot.try_lock() {
                Ok(g) => g,
                // Another thread runs the core: it looks at the queue
                // again after letting go, and takes what is here.
                Err(std::sync::TryLockError::WouldBlock) => return,
                Err(std::sync::TryLockError::Poisoned(_)) => core_panicked(),
            };
            // No core yet (it starts later and takes what is queued) or
            // stopped (the input is dropped with the queue).
            let Some(slot) = guard.as_mut() else {
                return;
            };
            let d = cell.drain(slot, budget);
            // Earlier than the core thread will look anyway (it never
            // sleeps less than MIN_SLEEP_US, so a deadline inside that
            // needs no wake-up).
            let wake =
                d.exit.is_some() || d.deadline_us < slot.sleep_until.saturating_sub(MIN_SLEEP_US);
            drop(guard);
            fence(Ordering::SeqCst);
            if wake {
                cell.wake_core();
                return;
            }
            budget = budget.saturating_sub(d.handled.max(1));
        }
    }
}

impl InboxRx {
    /// The receiving end itself (tests that play the core).
    pub fn into_receiver(self) -> Receiver<Input> {
        self.rx
    }

    /// Become the core thread: install `runner`, then handle what other
    /// threads leave queued and the core's timers, until the core stops.
    pub fn run(self, runner: Box<dyn Runner>) -> Exit {
        let cell = self.cell;
        let _ = cell.core_thread.set(std::thread::current());
        *lock_slot(&cell.slot) = Some(Slot {
            runner,
            rx: self.rx,
            sleep_until: 0,
        });
        loop {
            let mut guard = lock_slot(&cell.slot);
            let Some(slot) = guard.as_mut() else {
                return Exit::Stopped;
            };
            let d = cell.drain(slot, usize::MAX);
            if let Some(exit) = d.exit {
                let Some(mut slot) = guard.take() else {
                    return exit;
                };
                drop(guard);
                return guarded(|| slot.runner.finish(exit));
            }
            let now = slot.runner.now_us();
            let wait = d
                .deadline_us
                .saturating_sub(now)
                .clamp(MIN_SLEEP_US, cell.max_sleep_us);
            slot.sleep_until = now + wait;
            drop(guard);
            fence(Ordering::SeqCst);
            if cell.pending.load(Ordering::SeqCst) > 0 {
                continue;
            }
            std::thread::park_timeout(Duration::from_micros(wait));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::thread::ThreadId;
    use std::time::Instant;

    /// The core thread's longest sleep in these tests: an input left
    /// behind would wait this long, far past the tests' deadlines.
    const LONG_SLEEP_US: u64 = 10_000_000;

    /// A core that records which input it handled on which thread.
    /// `MslLink` moves its next deadline to 20 ms from now; reaching a
    /// deadline records a tick.
    struct Recorder {
        seen: Seen,
        ticks: Arc<Mutex<Vec<Instant>>>,
        finished: Arc<Mutex<Option<Exit>>>,
        exit: Option<Exit>,
        epoch: Instant,
        deadline: u64,
    }

    impl Recorder {
        fn new(seen: &Seen) -> Self {
            Recorder {
                seen: seen.clone(),
                ticks: Arc::default(),
                finished: Arc::default(),
                exit: None,
                epoch: Instant::now(),
                deadline: u64::MAX,
            }
        }
    }

    impl Runner for Recorder {
        fn drain(&mut self, rx: &Receiver<Input>, budget: usize) -> Drained {
            if self.now_us() >= self.deadline {
                self.ticks.lock().unwrap().push(Instant::now());
                self.deadline = u64::MAX;
            }
            let mut handled = 0;
            while self.exit.is_none() && handled < budget {
                let Ok(i) = rx.try_recv() else { break };
                handled += 1;
                match i {
                    Input::IoDone { io, .. } => {
                        let me = std::thread::current().id();
                        self.seen.lock().unwrap().push((me, io));
                    }
                    Input::MslLink { .. } => self.deadline = self.now_us() + 20_000,
                    Input::Stop => self.exit = Some(Exit::Stopped),
                    _ => {}
                }
            }
            Drained {
                handled,
                deadline_us: self.deadline,
                exit: self.exit,
            }
        }
        fn finish(&mut self, exit: Exit) -> Exit {
            *self.finished.lock().unwrap() = Some(exit);
            exit
        }
        fn now_us(&self) -> u64 {
            self.epoch.elapsed().as_micros() as u64
        }
    }

    type Seen = Arc<Mutex<Vec<(ThreadId, u64)>>>;

    /// Wait up to 2 s for `ok`; the core thread sleeps 10 s, so only a
    /// wake-up (or a sender running the core) gets there in time.
    fn soon(what: &str, ok: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while !ok() {
            assert!(Instant::now() < deadline, "{what}: not within 2 s");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Four senders, 5000 inputs each, numbered; all handled without any
    /// later send; then Stop. Returns what the core saw, the core thread's
    /// id and how `finish` was called.
    fn run_senders(inline: bool) -> (Vec<(ThreadId, u64)>, ThreadId, Option<Exit>) {
        let (inbox, rx) = inbox_sleeping(64, inline, LONG_SLEEP_US);
        let seen: Seen = Arc::default();
        let r = Recorder::new(&seen);
        let finished = r.finished.clone();
        let core = std::thread::spawn(move || (rx.run(Box::new(r)), std::thread::current().id()));
        let senders: Vec<_> = (0..4u64)
            .map(|p| {
                let inbox = inbox.clone();
                std::thread::spawn(move || {
                    for i in 0..5000u64 {
                        inbox
                            .send(Input::IoDone {
                                io: p << 32 | i,
                                ok: true,
                            })
                            .unwrap();
                    }
                })
            })
            .collect();
        for s in senders {
            s.join().unwrap();
        }
        // Nothing left behind: every input handled with no later send.
        soon("all 20000 inputs handled", || {
            seen.lock().unwrap().len() == 20_000
        });
        inbox.send(Input::Stop).unwrap();
        let (exit, core_id) = core.join().unwrap();
        assert_eq!(exit, Exit::Stopped);
        let seen = seen.lock().unwrap().clone();
        let finished = *finished.lock().unwrap();
        (seen, core_id, finished)
    }

    fn assert_all_in_order(seen: &[(ThreadId, u64)]) {
        let mut next: HashMap<u64, u64> = HashMap::new();
        for &(_, io) in seen {
            let (p, i) = (io >> 32, io & 0xffff_ffff);
            let n = next.entry(p).or_default();
            assert_eq!(i, *n, "sender {p}: input {i} handled when {n} was due");
            *n += 1;
        }
        assert_eq!(next.len(), 4);
        assert!(next.values().all(|&n| n == 5000), "{next:?}");
    }

    #[test]
    fn test_senders_run_the_core_in_order_and_stop_reaches_the_core_thread() {
        let (seen, core_id, finished) = run_senders(true);
        assert_all_in_order(&seen);
        let off_core = seen.iter().filter(|(t, _)| *t != core_id).count();
        assert!(
            off_core > 0,
            "no input was handled by the thread that sent it"
        );
        // The core thread learnt of the Stop (whoever handled it) and
        // finished the core.
        assert_eq!(finished, Some(Exit::Stopped));
    }

    #[test]
    fn test_without_inline_only_the_core_thread_runs_the_core() {
        let (seen, core_id, finished) = run_senders(false);
        assert_all_in_order(&seen);
        assert!(seen.iter().all(|(t, _)| *t == core_id));
        assert_eq!(finished, Some(Exit::Stopped));
    }

    /// A sender handles at most `INLINE_BUDGET` inputs; it wakes the core
    /// thread for the rest, which would otherwise sleep 10 s.
    #[test]
    fn test_inputs_past_a_senders_budget_are_handed_to_the_core_thread() {
        let (inbox, rx) = inbox_sleeping(1024, true, LONG_SLEEP_US);
        let seen: Seen = Arc::default();
        let r = Recorder::new(&seen);
        let core = std::thread::spawn(move || (rx.run(Box::new(r)), std::thread::current().id()));
        // Let the core thread start and go to sleep.
        std::thread::sleep(Duration::from_millis(50));
        for io in 0..200 {
            inbox.push(Input::IoDone { io, ok: true }).unwrap();
        }
        inbox.kick();
        soon("200 inputs handled", || seen.lock().unwrap().len() == 200);
        let me = std::thread::current().id();
        let here = seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| *t == me)
            .count();
        assert_eq!(here, INLINE_BUDGET, "this thread handled its budget only");
        inbox.send(Input::Stop).unwrap();
        let (exit, _) = core.join().unwrap();
        assert_eq!(exit, Exit::Stopped);
    }

    /// A sender that moves the core's next deadline earlier than the core
    /// thread's wake-up wakes it: the timer fires on time, not 10 s later.
    #[test]
    fn test_an_earlier_deadline_wakes_the_core_thread() {
        let (inbox, rx) = inbox_sleeping(16, true, LONG_SLEEP_US);
        let seen: Seen = Arc::default();
        let r = Recorder::new(&seen);
        let ticks = r.ticks.clone();
        let core = std::thread::spawn(move || rx.run(Box::new(r)));
        std::thread::sleep(Duration::from_millis(50));
        let t = Instant::now();
        inbox.send(Input::MslLink { up: true }).unwrap();
        soon("the 20 ms timer fired", || {
            !ticks.lock().unwrap().is_empty()
        });
        let fired = ticks.lock().unwrap()[0];
        assert!(fired >= t + Duration::from_millis(20), "fired early");
        inbox.send(Input::Stop).unwrap();
        assert_eq!(core.join().unwrap(), Exit::Stopped);
    }

    #[test]
    fn test_inputs_sent_before_the_core_starts_are_handled() {
        let (inbox, rx) = inbox(16);
        for io in 0..10 {
            inbox.send(Input::IoDone { io, ok: true }).unwrap();
        }
        inbox.send(Input::Stop).unwrap();
        let seen: Seen = Arc::default();
        assert_eq!(rx.run(Box::new(Recorder::new(&seen))), Exit::Stopped);
        let ios: Vec<u64> = seen.lock().unwrap().iter().map(|&(_, io)| io).collect();
        assert_eq!(ios, (0..10).collect::<Vec<_>>());
        // Once stopped, sending fails (the queue is gone).
        assert!(inbox.send(Input::Stop).is_err());
    }
}
