//! Open both ends of the MSL in a [`VethPair`] with one backend, optionally
//! behind the fault layer: the shared setup of the integration tests and
//! `msl-bench link`.

use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use crate::fault::{FaultConfig, FaultTx};
use crate::netns::{VethPair, IP_B};
use crate::{open, tcp, BackendKind, IfaceInfo, OpenOptions, RxLink, TxLink};

/// A backend to stream over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkKind {
    Raw(BackendKind),
    /// The same frames over one kernel TCP connection.
    Tcp,
}

impl fmt::Display for LinkKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkKind::Raw(k) => write!(f, "{k}"),
            LinkKind::Tcp => f.write_str("tcp"),
        }
    }
}

/// TCP port of the TCP backend inside namespace B.
pub const TCP_PORT: u16 = 7789;

/// One side's opened link.
pub type Side = (Box<dyn TxLink>, Box<dyn RxLink>);

/// Both sides, their MACs and what `auto` chose.
pub struct OpenedPair {
    pub a: Side,
    pub b: Side,
    pub mac_a: [u8; 6],
    pub mac_b: [u8; 6],
    pub chosen: LinkKind,
    pub fallback_reason: Option<String>,
}

fn wrap(tx: Box<dyn TxLink>, fault: Option<FaultConfig>) -> Box<dyn TxLink> {
    match fault {
        Some(f) if f.is_active() => Box::new(FaultTx::new(tx, f)),
        _ => tx,
    }
}

/// Where the two ends of the MSL are: a namespace (empty: the caller's
/// own) and an interface for each side, and side B's IP for TCP.
#[derive(Clone, Debug)]
pub struct Ends {
    pub ns_a: String,
    pub ns_b: String,
    pub if_a: String,
    pub if_b: String,
    pub ip_b: String,
}

impl From<&VethPair> for Ends {
    fn from(v: &VethPair) -> Ends {
        Ends {
            ns_a: v.ns_a.clone(),
            ns_b: v.ns_b.clone(),
            if_a: v.if_a.to_string(),
            if_b: v.if_b.to_string(),
            ip_b: IP_B.to_string(),
        }
    }
}

/// Run `f` in namespace `ns` (or right here if `ns` is empty).
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    if ns.is_empty() {
        Ok(f())
    } else {
        VethPair::in_ns(ns, f)
    }
}

/// Open `kind` on both ends. `fault_a` / `fault_b` wrap the transmit half
/// of side A (data) / side B (acks).
pub fn open_pair(
    veth: &Ends,
    kind: LinkKind,
    opts: &OpenOptions,
    fault_a: Option<FaultConfig>,
    fault_b: Option<FaultConfig>,
) -> io::Result<OpenedPair> {
    let if_a = in_ns(&veth.ns_a, || IfaceInfo::lookup(&veth.if_a))??;
    let if_b = in_ns(&veth.ns_b, || IfaceInfo::lookup(&veth.if_b))??;
    match kind {
        LinkKind::Raw(k) => {
            let oa = in_ns(&veth.ns_a, || open(k, &if_a, opts))??;
            let ob = in_ns(&veth.ns_b, || open(k, &if_b, opts))??;
            let chosen = LinkKind::Raw(oa.backend);
            let fallback_reason = oa.fallback_reason.clone();
            Ok(OpenedPair {
                a: (wrap(oa.tx, fault_a), oa.rx),
                b: (wrap(ob.tx, fault_b), ob.rx),
                mac_a: if_a.mac,
                mac_b: if_b.mac,
                chosen,
                fallback_reason,
            })
        }
        LinkKind::Tcp => {
            let addr: SocketAddr = format!("{}:{TCP_PORT}", veth.ip_b)
                .parse()
                .map_err(|e| io::Error::other(format!("{e}")))?;
            let listener = in_ns(&veth.ns_b, || TcpListener::bind(addr))??;
            let max = if_a.max_frame_len();
            let (atx, arx) = in_ns(&veth.ns_a, || tcp::connect(addr, max))??;
            let (btx, brx) = tcp::accept(&listener, max, Duration::from_secs(5))?;
            Ok(OpenedPair {
                a: (wrap(Box::new(atx), fault_a), Box::new(arx)),
                b: (wrap(Box::new(btx), fault_b), Box::new(brx)),
                mac_a: if_a.mac,
                mac_b: if_b.mac,
                chosen: LinkKind::Tcp,
                fallback_reason: None,
            })
        }
    }
}
