//! The msl protocol core.
//!
//! Everything that decides lives here: roles, the MSL handshake, heartbeats
//! and failure detection on the two paths, generation identifiers and the
//! resync decision, the write path (sync and degraded), dirty tracking with
//! an activity log, resync planning and reliable delivery.
//!
//! The crate is `no_std` (with `alloc`) on purpose: it cannot open a socket,
//! start a thread or read a clock. The host (the daemon, or the simulator)
//! feeds it events stamped with `now` (microseconds on any monotonic clock)
//! and executes the actions it returns, in order. Randomness comes from a
//! seed passed in at construction.
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod bitmap;
pub mod config;
pub mod gens;
pub mod meta;
pub mod node;
pub mod reliable;
pub mod rng;
pub mod seqmap;
pub mod verify;

pub use config::{Config, ConfigError, WriteMode};
pub use node::{Action, AdminCmd, ClientError, Event, IoKind, Node, Notice};

/// Time in microseconds on the host's monotonic clock (or virtual time).
pub type Micros = u64;
