//! msl data path: moves MSL frames between the protocol core and the wire.
//!
//! * Backends, each split into a transmit half ([`TxLink`]) and a receive
//!   half ([`RxLink`]) owned by one pinned worker thread each:
//!   [`afxdp`] (AF_XDP sockets with our own EtherType-filter XDP program,
//!   the default on real NICs), [`afpacket`] (`sendmmsg` + TPACKET ring,
//!   the fallback), and [`tcp`] (the same frames over kernel TCP, for
//!   comparison).
//! * [`fault`]: a seeded drop/duplicate/reorder/corrupt layer for tests.
//! * [`worker`]: the MSL workers msld runs: an encoder into a frame pool
//!   fixed at start, a transmit worker fed by lock-free queues (control
//!   ahead of data) with direct sends when the link is free, a receive
//!   worker (checks, reassembly), each pinnable to a core.
//! * [`stream`]: patterned block streaming over those workers with
//!   reliable delivery; used by the tests and `msl-bench link`.
//! * [`netns`]: the two-namespace veth topology with guaranteed cleanup.
//!
//! All `unsafe` lives in the private `sys` module.

pub mod afpacket;
pub mod afxdp;
pub mod fault;
pub mod link;
pub mod mem;
pub mod netns;
pub mod pair;
pub mod stream;
mod sys;
pub mod tcp;
pub mod worker;

use std::fmt;
use std::io;
use std::str::FromStr;

pub use link::{RxLink, RxStats, TxLink, TxStats, MAX_BATCH};

/// Which raw-frame backend to use (`backend = "afxdp" | "afpacket" | "auto"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BackendKind {
    AfXdp,
    AfPacket,
    /// Try AF_XDP; fall back to AF_PACKET and log why.
    #[default]
    Auto,
}

impl FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "afxdp" => Ok(BackendKind::AfXdp),
            "afpacket" => Ok(BackendKind::AfPacket),
            "auto" => Ok(BackendKind::Auto),
            o => Err(format!(
                "unknown backend {o:?}: expected \"afxdp\", \"afpacket\" or \"auto\""
            )),
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::AfXdp => "afxdp",
            BackendKind::AfPacket => "afpacket",
            BackendKind::Auto => "auto",
        })
    }
}

/// An interface as seen from the calling thread's network namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IfaceInfo {
    pub name: String,
    pub index: u32,
    pub mac: [u8; 6],
    pub mtu: usize,
}

impl IfaceInfo {
    /// Look `name` up (index and MAC through pnet, MTU through an ioctl).
    /// Must run in the namespace that holds the interface.
    pub fn lookup(name: &str) -> io::Result<IfaceInfo> {
        let ifs = pnet_datalink::interfaces();
        let Some(i) = ifs.iter().find(|i| i.name == name) else {
            let names: Vec<&str> = ifs.iter().map(|i| i.name.as_str()).collect();
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("interface {name:?} not found (have: {})", names.join(", ")),
            ));
        };
        let mac = i.mac.map(|m| m.octets()).unwrap_or([0; 6]);
        let mtu = sys::if_mtu(name)
            .map_err(|e| io::Error::new(e.kind(), format!("reading the MTU of {name}: {e}")))?;
        Ok(IfaceInfo {
            name: name.to_string(),
            index: i.index,
            mac,
            mtu,
        })
    }

    /// Largest Ethernet frame on this interface (MTU + Ethernet header).
    pub fn max_frame_len(&self) -> usize {
        self.mtu + msl_wire::ETH_HEADER_LEN
    }
}

/// Options for opening a raw backend.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenOptions {
    pub afpacket: afpacket::RingConfig,
    pub afxdp: afxdp::XdpConfig,
}

/// The two halves of an opened link and what was chosen.
pub struct Opened {
    pub tx: Box<dyn TxLink>,
    pub rx: Box<dyn RxLink>,
    pub backend: BackendKind,
    /// Why `auto` did not pick AF_XDP, if it did not.
    pub fallback_reason: Option<String>,
}

/// Open a raw-frame backend on `iface` (in the calling thread's namespace).
/// `Auto` tries AF_XDP first and falls back to AF_PACKET, logging why.
pub fn open(kind: BackendKind, iface: &IfaceInfo, opts: &OpenOptions) -> io::Result<Opened> {
    match kind {
        BackendKind::AfPacket => {
            let tx = afpacket::AfPacketTx::open(iface)?;
            let rx = afpacket::AfPacketRx::open(iface, opts.afpacket)?;
            Ok(Opened {
                tx: Box::new(tx),
                rx: Box::new(rx),
                backend: BackendKind::AfPacket,
                fallback_reason: None,
            })
        }
        BackendKind::AfXdp => {
            let (tx, rx) = afxdp::open(iface, &opts.afxdp)?;
            Ok(Opened {
                tx: Box::new(tx),
                rx: Box::new(rx),
                backend: BackendKind::AfXdp,
                fallback_reason: None,
            })
        }
        BackendKind::Auto => match open(BackendKind::AfXdp, iface, opts) {
            Ok(o) => Ok(o),
            Err(e) => {
                let reason = e.to_string();
                eprintln!(
                    "msl-transport: AF_XDP unavailable on {}: {reason}; falling back to AF_PACKET",
                    iface.name
                );
                let mut o = open(BackendKind::AfPacket, iface, opts)?;
                o.fallback_reason = Some(reason);
                Ok(o)
            }
        },
    }
}

/// CPU time the calling thread has used (for benchmark accounting).
pub fn thread_cpu_time() -> std::time::Duration {
    sys::thread_cpu_time()
}
