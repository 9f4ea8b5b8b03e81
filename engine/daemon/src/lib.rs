//! Building blocks of `msld`, the mirroring daemon (issue 4, in progress):
//! the configuration file and administrator notifications. The daemon's
//! event loop, which drives `msl_core::Node` with the transports
//! (`msl-transport`), the volume and metadata store (`msl-store`) and the NBD
//! front end (`msl-nbd`), is built on these.

pub mod config;
pub mod control;
pub mod driver;
pub mod frontend;
pub mod inbox;
pub mod lan;
pub mod md;
pub mod notify;
pub mod service;
pub mod telemetry;

pub use config::{ConfigError, DaemonConfig};
pub use notify::{EventRecord, Notifier, Sinks};
