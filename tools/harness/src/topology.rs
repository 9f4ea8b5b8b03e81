//! The test hosts: two servers and a LAN switch, each a network namespace.
//!
//! ```text
//!   ns_a (server 1)                 ns_lan (switch + client host)            ns_b (server 2)
//!   msla 10.79.0.1 <================ MSL veth pair ================> mslb 10.79.0.2
//!   a-lan 10.77.1.1 <--veth--> pa -- br0 10.77.1.50 (client) -- pb <--veth--> b-lan 10.77.1.2
//! ```
//!
//! The LAN goes through a Linux bridge so that downing one server's LAN
//! adapter leaves the other's carrier up (with a direct a-lan<->b-lan veth,
//! downing one end drops the other's carrier too, and scenario 4 could not
//! be told apart from a LAN failure on both sides).
//!
//! The hosts are `msl_transport::netns::Topology` with a switched LAN, the
//! builder the daemon's end-to-end tests and the benches use too (unique
//! names, removed on drop and on SIGINT/SIGTERM, swept after a SIGKILL);
//! this adds what the harness knows about msld: the service address and
//! the client host.

use std::io;
use std::ops::Deref;
use std::process::Command;

use msl_transport::netns::{self, Lan, VethPair};

pub use msl_transport::netns::ip_output as ip;
pub use msl_transport::netns::{BRIDGE, CLIENT_IP, LAN_A, LAN_B, LAN_IF_A, LAN_IF_B};

/// The floating service address (held by the primary).
pub const SERVICE_IP: &str = "10.77.1.100";
/// The witness (msl-witness) on the client host: a second address on the
/// bridge, so a server's path to it can be cut (a blackhole route) without
/// cutting its path to the client.
pub const WITNESS_IP: &str = "10.77.1.60";
/// The witness's UDP port.
pub const WITNESS_PORT: u16 = 7790;

/// Two server namespaces joined by the MSL veth pair, plus the LAN switch
/// namespace with the client host. Everything is removed on drop. The
/// shared builder's calls (`veth`, `server_ns`, `msl_if`, `set_link`, ...)
/// are reached through `Deref`.
#[derive(Debug)]
pub struct Topology {
    hosts: netns::Topology,
    client: String,
}

impl Deref for Topology {
    type Target = netns::Topology;
    fn deref(&self) -> &netns::Topology {
        &self.hosts
    }
}

impl Topology {
    /// Build it. Needs root; any failure removes what was made.
    pub fn create() -> io::Result<Topology> {
        let hosts = netns::Topology::create(Lan::Switched)?;
        let client = hosts
            .client_ns()
            .ok_or_else(|| io::Error::other("a switched LAN without its switch namespace"))?
            .to_string();
        Ok(Topology { hosts, client })
    }

    /// The client host's namespace.
    pub fn client_ns(&self) -> &str {
        &self.client
    }

    /// LAN adapter of server `node`.
    pub fn lan_if(node: u16) -> &'static str {
        netns::Topology::lan_if(node)
    }

    /// Whether server `node` holds the service address on its LAN adapter
    /// (read with `ip -n NS addr`).
    pub fn holds_service_address(&self, node: u16) -> io::Result<bool> {
        self.hosts.has_address(node, SERVICE_IP)
    }

    /// A command that runs `program` inside namespace `ns`
    /// (`ip netns exec`, which also remounts /sys for that namespace).
    pub fn command_in(ns: &str, program: &str) -> Command {
        netns::command_in(ns, program)
    }

    /// A command that runs `program` on the client host.
    pub fn client_command(&self, program: &str) -> Command {
        Self::command_in(self.client_ns(), program)
    }

    /// Run `f` on a thread inside the client namespace (sockets it creates
    /// stay there).
    pub fn in_client_ns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        VethPair::in_ns(self.client_ns(), f)
    }
}
