//! msl witness: a small process on a third host that arbitrates, per
//! cluster, which node of a mirrored pair may serve without its peer.
//!
//! SFT III's two paths (the MSL and the client LAN) tell a dead server from
//! a broken link, but not from both links breaking at once: then both nodes
//! would serve and one side's acknowledged writes would be lost. The
//! witness grants the right to serve without the peer as a time-bounded
//! lease, to at most one node of a cluster at a time.
//!
//! * [`proto`]: the two UDP packets (request, reply), authenticated with
//!   the cluster's witness key;
//! * [`witness`]: the witness's state machine (no I/O, time passed in);
//! * [`client`]: the node's side: requests, replies, `holds(now)`;
//! * [`config`]: the `msl-witness` configuration file;
//! * [`server`]: the UDP loop and status file of the `msl-witness` process.

pub mod client;
pub mod config;
pub mod proto;
pub mod server;
pub mod witness;

pub use client::{ClientConfig, LeaseClient, Outcome};
pub use proto::{Op, ProtoError, Reply, Request, Verdict};
pub use witness::{Counters, Dropped, Settings, Witness};
