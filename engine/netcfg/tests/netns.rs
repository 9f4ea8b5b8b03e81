//! Namespace tests: the library runs inside test-created network namespaces
//! (on a thread that `setns`-ed into them) and the results are checked with
//! `ip -n NS ...`. Needs root; fails loudly otherwise.
//!
//! Every namespace name contains the test's pid and tag, and a Drop guard
//! deletes the namespaces (and with them every veth and bridge inside) on
//! every exit path, panics included. Addresses: 10.77.1.0/24 and fd77:1::/64
//! only.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

use msl_netcfg::{
    add_address, has_address, interface_index, interface_mac, link_health, remove_address,
    send_gratuitous_arp_with_interval, send_unsolicited_na_with_interval, Error,
};

const SERVICE: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 100);
const SERVICE_IP: IpAddr = IpAddr::V4(SERVICE);

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "msl-netcfg namespace tests need root (network namespaces, veth)"
    );
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip(args: &[&str]) -> String {
    run("ip", args)
}

/// Namespaces owned by one test; deleted on drop.
struct Namespaces {
    names: Vec<String>,
}

impl Namespaces {
    fn new(tag: &str, hosts: &[&str]) -> Self {
        require_root();
        let mut ns = Namespaces { names: Vec::new() };
        for h in hosts {
            let name = format!("msl-nc-{}-{tag}-{h}", std::process::id());
            ip(&["netns", "add", &name]);
            ns.names.push(name.clone());
            ip(&["-n", &name, "link", "set", "lo", "up"]);
        }
        ns
    }

    fn name(&self, i: usize) -> &str {
        &self.names[i]
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// Run `f` on a fresh thread that has joined namespace `ns`.
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: the fd is a valid namespace file for the duration of the
        // call; CLONE_NEWNET only switches this thread's network namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

fn veth(a_ns: &str, a: &str, b_ns: &str, b: &str) {
    ip(&[
        "link", "add", a, "netns", a_ns, "type", "veth", "peer", "name", b, "netns", b_ns,
    ]);
}

/// Two hosts A and B joined by a-lan <-> b-lan, 10.77.1.1 and .2.
fn two_hosts(tag: &str) -> Namespaces {
    let ns = Namespaces::new(tag, &["A", "B"]);
    let (a, b) = (ns.name(0).to_owned(), ns.name(1).to_owned());
    veth(&a, "a-lan", &b, "b-lan");
    ip(&["-n", &a, "addr", "add", "10.77.1.1/24", "dev", "a-lan"]);
    ip(&["-n", &b, "addr", "add", "10.77.1.2/24", "dev", "b-lan"]);
    ip(&["-n", &a, "link", "set", "a-lan", "up"]);
    ip(&["-n", &b, "link", "set", "b-lan", "up"]);
    ns
}

fn accept_garp(ns: &str, dev: &str) {
    for key in ["all", dev] {
        run(
            "ip",
            &[
                "netns",
                "exec",
                ns,
                "sysctl",
                "-qw",
                &format!("net.ipv4.conf.{key}.arp_accept=1"),
            ],
        );
    }
}

fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn neigh_lladdr(ns: &str, dev: &str, addr: Ipv4Addr) -> Option<String> {
    let out = ip(&["-n", ns, "neigh", "show", &addr.to_string(), "dev", dev]);
    let mut words = out.split_whitespace();
    while let Some(w) = words.next() {
        if w == "lladdr" {
            return words.next().map(str::to_owned);
        }
    }
    None
}

fn ip_shows_addr(ns: &str, dev: &str, cidr: &str) -> bool {
    ip(&["-n", ns, "-o", "addr", "show", "dev", dev])
        .split_whitespace()
        .any(|w| w == cidr)
}

#[test]
fn address_add_remove_is_idempotent() {
    let ns = two_hosts("addr");
    let a = ns.name(0).to_owned();

    let a2 = a.clone();
    in_ns(&a2, || {
        assert!(!has_address("a-lan", SERVICE_IP).unwrap());
        add_address("a-lan", SERVICE_IP, 24).unwrap();
        add_address("a-lan", SERVICE_IP, 24).unwrap(); // twice is fine
        assert!(has_address("a-lan", SERVICE_IP).unwrap());
        assert!(has_address("a-lan", "10.77.1.1".parse().unwrap()).unwrap());
    });
    assert!(ip_shows_addr(&a, "a-lan", "10.77.1.100/24"));

    in_ns(&a, || {
        remove_address("a-lan", SERVICE_IP, 24).unwrap();
        remove_address("a-lan", SERVICE_IP, 24).unwrap(); // twice is fine
        assert!(!has_address("a-lan", SERVICE_IP).unwrap());
        // The node's own address is untouched.
        assert!(has_address("a-lan", "10.77.1.1".parse().unwrap()).unwrap());
    });
    assert!(!ip_shows_addr(&a, "a-lan", "10.77.1.100/24"));
    assert!(ip_shows_addr(&a, "a-lan", "10.77.1.1/24"));

    // Errors name the interface and the errno meaning.
    let msg = in_ns(&a, || {
        let e = add_address("nosuch0", SERVICE_IP, 24).unwrap_err();
        assert!(matches!(e, Error::NoSuchInterface { .. }), "{e:?}");
        let e2 = remove_address("nosuch0", SERVICE_IP, 24).unwrap_err();
        assert!(matches!(e2, Error::NoSuchInterface { .. }), "{e2:?}");
        let bad = add_address("a-lan", SERVICE_IP, 33).unwrap_err();
        assert!(matches!(bad, Error::Invalid(_)), "{bad:?}");
        e.to_string()
    });
    assert!(msg.contains("nosuch0"), "{msg}");
    assert!(msg.contains("No such device"), "{msg}");
}

#[test]
fn helpers_and_link_health() {
    let ns = two_hosts("link");
    let (a, b) = (ns.name(0).to_owned(), ns.name(1).to_owned());

    // index and MAC agree with ip(8).
    let (idx, mac) = in_ns(&a, || {
        (
            interface_index("a-lan").unwrap(),
            interface_mac("a-lan").unwrap(),
        )
    });
    let line = ip(&["-n", &a, "-o", "link", "show", "a-lan"]);
    assert!(line.starts_with(&format!("{idx}: a-lan")), "{line}");
    assert!(
        line.contains(&format!("link/ether {}", mac_str(mac))),
        "{line}"
    );

    let health = |ns: &str, dev: &'static str| in_ns(ns, move || link_health(dev).unwrap());
    wait_for("a-lan and b-lan up", Duration::from_secs(3), || {
        health(&a, "a-lan").is_healthy() && health(&b, "b-lan").is_healthy()
    });
    let h = health(&a, "a-lan");
    assert!(h.exists && h.admin_up && h.oper_up && h.carrier, "{h:?}");

    let missing = health(&a, "nosuch0");
    assert!(!missing.exists && !missing.is_healthy(), "{missing:?}");

    ip(&["-n", &a, "link", "set", "a-lan", "down"]);
    wait_for(
        "a-lan down, b-lan carrier lost",
        Duration::from_secs(3),
        || {
            let ha = health(&a, "a-lan");
            let hb = health(&b, "b-lan");
            !ha.admin_up && !ha.oper_up && hb.exists && hb.admin_up && !hb.carrier && !hb.oper_up
        },
    );

    // Announcing on a downed adapter fails with the errno meaning.
    let e = in_ns(&a, || {
        send_gratuitous_arp_with_interval("a-lan", SERVICE, 1, Duration::ZERO).unwrap_err()
    });
    let msg = e.to_string();
    assert!(
        msg.contains("a-lan") && msg.contains("10.77.1.100"),
        "{msg}"
    );
    assert!(msg.contains("Network is down"), "{msg}");

    ip(&["-n", &a, "link", "set", "a-lan", "up"]);
    wait_for("link back up", Duration::from_secs(3), || {
        health(&a, "a-lan").is_healthy() && health(&b, "b-lan").is_healthy()
    });
}

#[test]
fn gratuitous_arp_updates_peer_neighbour_table() {
    let ns = two_hosts("garp");
    let (a, b) = (ns.name(0).to_owned(), ns.name(1).to_owned());
    accept_garp(&b, "b-lan");
    // A stale entry pointing at some other MAC: the GARP must override it.
    ip(&[
        "-n",
        &b,
        "neigh",
        "add",
        "10.77.1.100",
        "lladdr",
        "02:00:00:00:00:99",
        "dev",
        "b-lan",
        "nud",
        "stale",
    ]);
    assert_eq!(
        neigh_lladdr(&b, "b-lan", SERVICE).as_deref(),
        Some("02:00:00:00:00:99")
    );

    let mac = in_ns(&a, || {
        add_address("a-lan", SERVICE_IP, 24).unwrap();
        send_gratuitous_arp_with_interval("a-lan", SERVICE, 2, Duration::from_millis(20)).unwrap();
        interface_mac("a-lan").unwrap()
    });
    let want = mac_str(mac);
    wait_for(
        "B learns service IP -> A's MAC",
        Duration::from_secs(2),
        || neigh_lladdr(&b, "b-lan", SERVICE).as_deref() == Some(want.as_str()),
    );

    // Errors name the interface.
    let e = in_ns(&a, || {
        send_gratuitous_arp_with_interval("nosuch0", SERVICE, 1, Duration::ZERO)
    })
    .unwrap_err();
    assert!(e.to_string().contains("nosuch0"), "{e}");
}

/// A, B and a client C on one bridged LAN (the bridge lives in C). The
/// service address moves from A to B; C's ARP cache follows the GARPs and
/// C's traffic reaches B.
#[test]
fn service_address_failover() {
    let ns = Namespaces::new("fo", &["A", "B", "C"]);
    let (a, b, c) = (
        ns.name(0).to_owned(),
        ns.name(1).to_owned(),
        ns.name(2).to_owned(),
    );
    ip(&[
        "-n",
        &c,
        "link",
        "add",
        "lanbr",
        "type",
        "bridge",
        "forward_delay",
        "0",
    ]);
    veth(&a, "a-lan", &c, "ca");
    veth(&b, "b-lan", &c, "cb");
    for port in ["ca", "cb"] {
        ip(&["-n", &c, "link", "set", port, "master", "lanbr"]);
        ip(&["-n", &c, "link", "set", port, "up"]);
    }
    ip(&["-n", &c, "addr", "add", "10.77.1.3/24", "dev", "lanbr"]);
    ip(&["-n", &c, "link", "set", "lanbr", "up"]);
    ip(&["-n", &a, "addr", "add", "10.77.1.1/24", "dev", "a-lan"]);
    ip(&["-n", &b, "addr", "add", "10.77.1.2/24", "dev", "b-lan"]);
    ip(&["-n", &a, "link", "set", "a-lan", "up"]);
    ip(&["-n", &b, "link", "set", "b-lan", "up"]);
    accept_garp(&c, "lanbr");

    let up =
        |ns: &str, dev: &'static str| in_ns(ns, move || link_health(dev).unwrap().is_healthy());
    wait_for("LAN links up", Duration::from_secs(3), || {
        up(&a, "a-lan") && up(&b, "b-lan")
    });

    let garp = Duration::from_millis(20);
    // A is primary.
    let mac_a = in_ns(&a, move || {
        add_address("a-lan", SERVICE_IP, 24).unwrap();
        send_gratuitous_arp_with_interval("a-lan", SERVICE, 2, garp).unwrap();
        interface_mac("a-lan").unwrap()
    });
    let want_a = mac_str(mac_a);
    wait_for("C: service IP -> A", Duration::from_secs(2), || {
        neigh_lladdr(&c, "lanbr", SERVICE).as_deref() == Some(want_a.as_str())
    });

    // A demotes, B takes over.
    in_ns(&a, || remove_address("a-lan", SERVICE_IP, 24).unwrap());
    assert!(!ip_shows_addr(&a, "a-lan", "10.77.1.100/24"));
    let mac_b = in_ns(&b, move || {
        add_address("b-lan", SERVICE_IP, 24).unwrap();
        send_gratuitous_arp_with_interval("b-lan", SERVICE, 2, garp).unwrap();
        interface_mac("b-lan").unwrap()
    });
    assert_ne!(mac_a, mac_b);
    assert!(ip_shows_addr(&b, "b-lan", "10.77.1.100/24"));
    let want_b = mac_str(mac_b);
    wait_for("C: service IP -> B", Duration::from_secs(2), || {
        neigh_lladdr(&c, "lanbr", SERVICE).as_deref() == Some(want_b.as_str())
    });

    // C's traffic to the service address now reaches B: a TCP connection
    // from C lands on a listener bound to the service address inside B.
    let listener = in_ns(&b, || std::net::TcpListener::bind((SERVICE, 7777)).unwrap());
    in_ns(&c, || {
        std::net::TcpStream::connect_timeout(&(SERVICE, 7777).into(), Duration::from_secs(2))
            .expect("C connects to the service address on B")
    });
    let (_conn, peer) = listener.accept().unwrap();
    assert_eq!(peer.ip(), IpAddr::V4(Ipv4Addr::new(10, 77, 1, 3)));
}

const SERVICE6: Ipv6Addr = Ipv6Addr::new(0xfd77, 1, 0, 0, 0, 0, 0, 0x100);

fn neigh6_lladdr(ns: &str, dev: &str, addr: Ipv6Addr) -> Option<String> {
    let out = ip(&[
        "-n",
        ns,
        "-6",
        "neigh",
        "show",
        &addr.to_string(),
        "dev",
        dev,
    ]);
    let mut words = out.split_whitespace();
    while let Some(w) = words.next() {
        if w == "lladdr" {
            return words.next().map(str::to_owned);
        }
    }
    None
}

/// An `AF_PACKET` socket receiving every IPv6 frame on `dev` of the calling
/// thread's namespace (the socket stays in that namespace afterwards).
fn ipv6_capture(dev: &str) -> OwnedFd {
    let proto = 0x86ddu16.to_be();
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
    assert!(
        fd >= 0,
        "packet socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fd was just returned by socket(2).
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain old data.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = interface_index(dev).unwrap() as i32;
    // SAFETY: valid socket and sockaddr for the length passed.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 200_000,
    };
    // SAFETY: valid socket; tv outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    assert_eq!(rc, 0);
    sock
}

/// Independent ones'-complement sum over the IPv6 pseudo-header and `msg`
/// (RFC 4443): 0xffff for a message whose checksum is right.
fn pseudo_sum(src: &[u8], dst: &[u8], msg: &[u8]) -> u16 {
    let mut buf = Vec::new();
    buf.extend_from_slice(src);
    buf.extend_from_slice(dst);
    buf.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    buf.extend_from_slice(&[0, 0, 0, 58]);
    buf.extend_from_slice(msg);
    if buf.len() % 2 == 1 {
        buf.push(0);
    }
    let mut sum: u64 = buf
        .chunks(2)
        .map(|c| u64::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The advertisement B receives is a well-formed unsolicited NA for the
/// service address from A's MAC, and B's stale neighbour entry for the
/// address moves to A's MAC. The IPv6 address is usable at once (nodad).
#[test]
fn unsolicited_na_updates_peer_neighbour_cache() {
    let ns = two_hosts("na6");
    let (a, b) = (ns.name(0).to_owned(), ns.name(1).to_owned());
    for (n, dev) in [(&a, "a-lan"), (&b, "b-lan")] {
        run(
            "ip",
            &[
                "netns",
                "exec",
                n,
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{dev}.disable_ipv6=0"),
            ],
        );
    }
    ip(&[
        "-n",
        &b,
        "-6",
        "addr",
        "add",
        "fd77:1::2/64",
        "dev",
        "b-lan",
        "nodad",
    ]);
    ip(&[
        "-n",
        &b,
        "-6",
        "neigh",
        "add",
        &SERVICE6.to_string(),
        "lladdr",
        "02:00:00:00:00:99",
        "dev",
        "b-lan",
        "nud",
        "stale",
    ]);
    assert_eq!(
        neigh6_lladdr(&b, "b-lan", SERVICE6).as_deref(),
        Some("02:00:00:00:00:99")
    );
    let cap = in_ns(&b, || ipv6_capture("b-lan"));

    let (mac, flags) = in_ns(&a, || {
        add_address("a-lan", IpAddr::V6(SERVICE6), 64).unwrap();
        let flags = ip(&["-6", "-o", "addr", "show", "dev", "a-lan"]);
        send_unsolicited_na_with_interval("a-lan", SERVICE6, 3, Duration::from_millis(20)).unwrap();
        (interface_mac("a-lan").unwrap(), flags)
    });
    let line = flags
        .lines()
        .find(|l| l.contains("fd77:1::100/64"))
        .unwrap_or_else(|| panic!("service address not on a-lan: {flags}"));
    assert!(!line.contains("tentative"), "added without nodad: {line}");

    // Find the NA among whatever else IPv6 sends (MLD, router solicits).
    let start = Instant::now();
    let frame = loop {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "no NA captured on b-lan"
        );
        let mut buf = [0u8; 2048];
        // SAFETY: buf is valid for its length.
        let n = unsafe { libc::recv(cap.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            continue;
        }
        let f = buf[..n as usize].to_vec();
        if f.len() >= 55 && f[20] == 58 && f[54] == 136 {
            break f;
        }
    };
    assert_eq!(frame.len(), 86, "{frame:02x?}");
    assert_eq!(&frame[0..6], &[0x33, 0x33, 0, 0, 0, 1]);
    assert_eq!(&frame[6..12], &mac);
    assert_eq!(frame[14] >> 4, 6);
    assert_eq!(u16::from_be_bytes([frame[18], frame[19]]), 32);
    assert_eq!(frame[21], 255, "hop limit");
    assert_eq!(&frame[22..38], &SERVICE6.octets());
    assert_eq!(
        &frame[38..54],
        &"ff02::1".parse::<Ipv6Addr>().unwrap().octets()
    );
    let icmp = &frame[54..];
    assert_eq!(icmp[1], 0, "code");
    assert_eq!(
        icmp[4] & 0xe0,
        0x20,
        "Override set, Router and Solicited clear"
    );
    assert_eq!(&icmp[8..24], &SERVICE6.octets());
    assert_eq!(&icmp[24..26], &[2, 1], "Target Link-Layer Address option");
    assert_eq!(&icmp[26..32], &mac);
    assert_eq!(
        pseudo_sum(&frame[22..38], &frame[38..54], icmp),
        0xffff,
        "checksum"
    );

    let want = mac_str(mac);
    wait_for(
        "B's neighbour cache maps the service IPv6 address to A's MAC",
        Duration::from_secs(2),
        || neigh6_lladdr(&b, "b-lan", SERVICE6).as_deref() == Some(want.as_str()),
    );

    let e = in_ns(&a, || {
        send_unsolicited_na_with_interval("nosuch0", SERVICE6, 1, Duration::ZERO)
    })
    .unwrap_err();
    assert!(e.to_string().contains("nosuch0"), "{e}");
}
