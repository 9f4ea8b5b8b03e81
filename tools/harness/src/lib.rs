//! msl end-to-end harness: a real msld pair in network namespaces.
//!
//! * [`topology`]: two server namespaces joined by the MSL veth pair, a LAN
//!   switch namespace (Linux bridge) with the client host 10.77.1.50.
//! * [`pair`]: msld configurations, a supervisor per node (restarts msld on
//!   exit 75), kill -9 / stop / start, status and events over the control
//!   socket, logs, backing files and their SHA-256.
//! * [`bins`]: finding (or building) msld and mslctl.
//!
//! Needs root. See README.md for the API and how to run the scenarios.

pub mod bins;
pub mod pair;
pub mod pki;
pub mod topology;

pub use pair::{sha256_file, unix_ms, wait_for, Event, ExitRecord, Pair, PairOptions};
pub use topology::{Topology, CLIENT_IP, SERVICE_IP};
pub mod measure;
pub mod scenario;
pub mod workload;
