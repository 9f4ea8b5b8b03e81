//! Synchronous rtnetlink requests: one socket per call (these operations are
//! rare: role changes and health polls), so there is no shared state.

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{
    AddressAttribute, AddressHeaderFlags, AddressMessage, AddressScope,
};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage, State};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use crate::{check_prefix, Error, Result};

/// A kernel that does not answer within this time is treated as an error
/// rather than hanging the daemon.
const RECV_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) struct Link {
    pub index: u32,
    pub mac: Option<Vec<u8>>,
    pub admin_up: bool,
    pub oper_up: bool,
    pub carrier: bool,
}

fn os_err(op: &'static str, ifname: &str, addr: Option<IpAddr>, source: io::Error) -> Error {
    Error::Os {
        op,
        ifname: ifname.to_owned(),
        addr,
        source,
    }
}

fn open(op: &'static str, ifname: &str) -> Result<Socket> {
    let mut sock = Socket::new(NETLINK_ROUTE).map_err(|e| os_err(op, ifname, None, e))?;
    sock.bind_auto().map_err(|e| os_err(op, ifname, None, e))?;
    sock.connect(&SocketAddr::new(0, 0))
        .map_err(|e| os_err(op, ifname, None, e))?;
    set_recv_timeout(&sock).map_err(|e| os_err(op, ifname, None, e))?;
    Ok(sock)
}

fn set_recv_timeout(sock: &Socket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let tv = libc::timeval {
        tv_sec: RECV_TIMEOUT.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    // SAFETY: the fd is a live socket owned by `sock`; `tv` is a valid
    // timeval that outlives the call and its size is passed correctly.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Send one request and collect the answers until the ACK (or DONE for a
/// dump). A NACK becomes `Err(io::Error)` with the kernel's errno.
fn request(
    sock: &Socket,
    msg: RouteNetlinkMessage,
    flags: u16,
) -> std::result::Result<Vec<RouteNetlinkMessage>, io::Error> {
    const SEQ: u32 = 1;
    let mut packet = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(msg));
    packet.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
    packet.header.sequence_number = SEQ;
    packet.finalize();
    let mut buf = vec![0u8; packet.buffer_len()];
    packet.serialize(&mut buf[..]);
    sock.send(&buf, 0)?;

    let mut out = Vec::new();
    let mut rx = vec![0u8; 64 * 1024];
    loop {
        let n = sock.recv(&mut &mut rx[..], 0)?;
        let mut off = 0;
        while off < n {
            let reply: NetlinkMessage<RouteNetlinkMessage> =
                NetlinkMessage::deserialize(&rx[off..n])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let len = reply.header.length as usize;
            if reply.header.sequence_number == SEQ {
                match reply.payload {
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(out),
                            Some(_) => Err(e.to_io()),
                        }
                    }
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    _ => {}
                }
            }
            if len == 0 {
                break;
            }
            off += (len + 3) & !3;
        }
    }
}

pub(crate) fn get_link(ifname: &str) -> Result<Link> {
    const OP: &str = "get link";
    if ifname.is_empty() || ifname.len() >= libc::IFNAMSIZ {
        return Err(Error::Invalid(format!(
            "interface name {ifname:?} must be 1..{} bytes",
            libc::IFNAMSIZ - 1
        )));
    }
    let sock = open(OP, ifname)?;
    let mut msg = LinkMessage::default();
    msg.attributes
        .push(LinkAttribute::IfName(ifname.to_owned()));
    let replies = match request(&sock, RouteNetlinkMessage::GetLink(msg), 0) {
        Ok(r) => r,
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {
            return Err(Error::NoSuchInterface {
                ifname: ifname.to_owned(),
                source: e,
            })
        }
        Err(e) => return Err(os_err(OP, ifname, None, e)),
    };
    for r in replies {
        if let RouteNetlinkMessage::NewLink(l) = r {
            let mut link = Link {
                index: l.header.index,
                mac: None,
                admin_up: l.header.flags.contains(LinkFlags::Up),
                oper_up: false,
                carrier: false,
            };
            for a in l.attributes {
                match a {
                    LinkAttribute::Address(m) => link.mac = Some(m),
                    LinkAttribute::OperState(s) => link.oper_up = s == State::Up,
                    LinkAttribute::Carrier(c) => link.carrier = c != 0,
                    _ => {}
                }
            }
            return Ok(link);
        }
    }
    Err(Error::Protocol {
        ifname: ifname.to_owned(),
        detail: "RTM_GETLINK answered without a link message".into(),
    })
}

fn address_message(index: u32, ip: IpAddr, prefix: u8) -> AddressMessage {
    let mut msg = AddressMessage::default();
    msg.header.index = index;
    msg.header.prefix_len = prefix;
    msg.header.scope = AddressScope::Universe;
    match ip {
        IpAddr::V4(v4) => {
            msg.header.family = AddressFamily::Inet;
            msg.attributes.push(AddressAttribute::Local(ip));
            msg.attributes.push(AddressAttribute::Address(ip));
            if prefix < 31 {
                let host_mask = u32::MAX.checked_shr(u32::from(prefix)).unwrap_or(0);
                let bcast = Ipv4Addr::from(u32::from(v4) | host_mask);
                msg.attributes.push(AddressAttribute::Broadcast(bcast));
            }
        }
        IpAddr::V6(_) => {
            msg.header.family = AddressFamily::Inet6;
            msg.header.flags = AddressHeaderFlags::Nodad;
            msg.attributes.push(AddressAttribute::Local(ip));
            msg.attributes.push(AddressAttribute::Address(ip));
        }
    }
    msg
}

pub(crate) fn change_address(ifname: &str, ip: IpAddr, prefix: u8, add: bool) -> Result<()> {
    let op = if add { "add address" } else { "remove address" };
    check_prefix(ip, prefix)?;
    let index = get_link(ifname)?.index;
    let sock = open(op, ifname)?;
    let msg = address_message(index, ip, prefix);
    let (msg, flags) = if add {
        (
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    } else {
        (RouteNetlinkMessage::DelAddress(msg), 0)
    };
    match request(&sock, msg, flags) {
        Ok(_) => Ok(()),
        // Idempotence: already there / already gone.
        Err(e) if add && e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        Err(e) if !add && e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Err(Error::NoSuchInterface {
            ifname: ifname.to_owned(),
            source: e,
        }),
        Err(e) => Err(os_err(op, ifname, Some(ip), e)),
    }
}

pub(crate) fn has_address(ifname: &str, ip: IpAddr) -> Result<bool> {
    const OP: &str = "list addresses";
    let index = get_link(ifname)?.index;
    let sock = open(OP, ifname)?;
    let mut msg = AddressMessage::default();
    msg.header.family = if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    msg.header.index = index;
    let replies = request(&sock, RouteNetlinkMessage::GetAddress(msg), NLM_F_DUMP)
        .map_err(|e| os_err(OP, ifname, Some(ip), e))?;
    Ok(replies.into_iter().any(|r| match r {
        RouteNetlinkMessage::NewAddress(a) if a.header.index == index => {
            a.attributes.iter().any(|attr| {
                matches!(attr, AddressAttribute::Local(x) | AddressAttribute::Address(x) if *x == ip)
            })
        }
        _ => false,
    }))
}
