//! The work queue allocates nothing once its two buffers have grown to
//! the deepest batch; std's channel, run through the same loop, shows the
//! count would catch it (a block per 31 items). Its own binary without
//! the test harness, so no other thread allocates while it counts.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

struct Counting;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged, counting calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        System.realloc(p, l, n)
    }
}

#[global_allocator]
static A: Counting = Counting;

/// Items per burst; the sender waits for the worker between bursts, so
/// no backlog grows past it.
const BURST: usize = 64;

/// Items taken in whole bursts at the start.
const GATED: usize = 8 * BURST;

/// Allocations while `steady` items go through after `warm` did.
fn count(
    send: impl Fn(u64) + Send + 'static,
    mut recv_all: impl FnMut() -> usize + Send + 'static,
    warm: u64,
    steady: u64,
) -> usize {
    let taken = Arc::new(AtomicUsize::new(0));
    let sent = Arc::new(AtomicUsize::new(0));
    let (t, sent_w) = (taken.clone(), sent.clone());
    let total = warm + steady;
    let worker = std::thread::spawn(move || {
        loop {
            let done = t.load(Ordering::Acquire);
            if done as u64 >= total {
                break;
            }
            // The first bursts are taken whole, so both of the queue's
            // buffers grow to a burst's room before anything is counted,
            // however the threads happen to be scheduled.
            if done < GATED {
                while sent_w.load(Ordering::Acquire) < done + BURST {
                    std::thread::yield_now();
                }
            }
            let n = recv_all();
            t.fetch_add(n, Ordering::Release);
        }
    });
    let mut before = 0;
    for i in 0..total {
        if i == warm {
            while (taken.load(Ordering::Acquire) as u64) < warm {
                std::thread::yield_now();
            }
            before = ALLOCS.load(Ordering::Relaxed);
        }
        send(i);
        sent.fetch_add(1, Ordering::Release);
        if i % BURST as u64 == BURST as u64 - 1 {
            while (taken.load(Ordering::Acquire) as u64) <= i {
                std::thread::yield_now();
            }
        }
    }
    while (taken.load(Ordering::Acquire) as u64) < total {
        std::thread::yield_now();
    }
    let n = ALLOCS.load(Ordering::Relaxed) - before;
    worker.join().unwrap();
    n
}

fn main() {
    let (tx, rx) = msl_buf::queue::queue::<u64>();
    let mut batch = VecDeque::new();
    let ours = count(
        move |i| tx.send(i).ok().unwrap(),
        move || {
            assert!(rx.take(&mut batch));
            let n = batch.len();
            batch.clear();
            n
        },
        10_000,
        100_000,
    );
    let (tx, rx) = std::sync::mpsc::channel::<u64>();
    let std_allocs = count(
        move |i| tx.send(i).unwrap(),
        move || {
            rx.recv().unwrap();
            1 + rx.try_iter().count()
        },
        10_000,
        100_000,
    );
    println!("allocations per 100000 items: msl_buf::queue {ours}, std::sync::mpsc {std_allocs}");
    assert!(
        std_allocs > 1000,
        "the count missed std's blocks ({std_allocs})"
    );
    assert_eq!(ours, 0, "the queue allocated in the steady state");
    println!("test queue_allocs ... ok");
}
