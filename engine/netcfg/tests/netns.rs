//! Namespace tests: the library runs inside test-created network namespaces
//! (on a thread that `setns`-ed into them) and the results are checked with
//! `ip -n NS ...`. Needs root; fails loudly otherwise.
//!
//! Every namespace name contains the test's pid and tag, and a Drop guard
//! deletes the namespaces (and with them every veth and bridge inside) on
//! every exit path, panics included. Addresses: 10.77.1.0/24 only.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use msl_netcfg::{
    add_address, has_address, interface_index, interface_mac, link_health, remove_address,
    send_gratuitous_arp_with_interval, Error,
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
