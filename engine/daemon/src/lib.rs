//! `msld`, the mirroring daemon of one node, as a library: `assemble()`
//! opens the volume and metadata, builds the protocol core and starts the
//! transports and threads around it; `bin/msld.rs` and the tests use it.
//!
//! Modules, leaves first (each uses only modules above it):
//!
//! * [`config`]: the configuration file; [`md`]: metadata creation.
//! * [`input`]: what the core consumes (`Input`, block payloads, `Exit`).
//! * [`counters`]: the daemon's own counters, shared by its threads.
//! * [`inbox`]: the core's input queue, and which thread runs the core.
//! * [`notify`]: events: administrator notifications and the event stream.
//! * [`lan`]: the LAN heartbeat path; [`msl`]: the MSL transmit and receive
//!   threads.
//! * [`driver`]: executes the core's actions (volume, metadata, MSL, LAN).
//! * [`client`], [`frontend`], [`service`]: the NBD front end, link
//!   watching and the service address.
//! * [`status`], [`control`], [`metrics`]: `mslctl status`, the control
//!   socket, the Prometheus endpoint.
//! * [`witness`]: the lease from the pair's witness, for the driver.
//! * [`reload`]: SIGHUP: the settings a running node takes from its
//!   configuration file again.
//! * [`assemble`]: the whole daemon.

pub mod assemble;
pub mod cli;
pub mod client;
pub mod config;
pub mod control;
pub mod counters;
pub mod driver;
pub mod frontend;
pub mod inbox;
pub mod input;
pub mod lan;
pub mod md;
pub mod metrics;
pub mod msl;
pub mod notify;
pub mod reload;
pub mod service;
pub mod status;
pub mod witness;

pub use assemble::{assemble, Daemon};
pub use config::{ConfigError, DaemonConfig};
pub use notify::{EventRecord, Notifier, Sinks};
