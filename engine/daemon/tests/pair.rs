//! Two core drivers in one process: the MSL over the in-memory link, the
//! LAN heartbeats over real UDP on loopback, volumes and metadata in real
//! files. Writes go through node 1 and must reach both files; when node 1
//! stops, node 2 takes over; when it returns it rejoins as secondary and is
//! resynced.

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use msl_core::meta::Meta;
use msl_core::{Config, Notice};
use msl_daemon::assemble::{MslLink, NodeParts, Wiring};
use msl_daemon::client::Client;
use msl_daemon::driver::NoHost;
use msl_daemon::input::{Exit, Input};
use msl_daemon::lan::LanEndpoint;
use msl_daemon::notify::{Notifier, Sinks};
use msl_store::{CreateOptions, MetaStore, Volume};
use msl_transport::mem;
use msl_wire::{DiskState, Key, Role};

const CLUSTER: u64 = 0x6d73_6c2d_7465_7374;
const BLOCKS: u64 = 1024;
const BS: u32 = 4096;

fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct NodeRun {
    client: Client,
    thread: Option<JoinHandle<Exit>>,
    stop: Arc<AtomicBool>,
}

impl NodeRun {
    fn stop(&mut self) -> Exit {
        let _ = self.client.inputs.send(Input::Stop);
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .map(|t| t.join().unwrap())
            .unwrap_or(Exit::Stopped)
    }
}

impl Drop for NodeRun {
    fn drop(&mut self) {
        self.stop();
    }
}

#[allow(clippy::too_many_arguments)]
fn start(
    dir: &Path,
    id: u16,
    fresh_primary: bool,
    tx: mem::MemTx,
    rx: mem::MemRx,
    lan_local: u16,
    lan_peer: u16,
) -> NodeRun {
    let cfg = Config::new(id, 3 - id, CLUSTER, BLOCKS, BS);
    let meta_path = dir.join(format!("n{id}.meta"));
    let (store, meta) = if meta_path.exists() {
        MetaStore::open(&meta_path).unwrap()
    } else {
        let meta = Meta::create(
            CLUSTER,
            id,
            BLOCKS,
            BS,
            fresh_primary.then_some(0x1234_5678),
        );
        (
            MetaStore::create(&meta_path, &meta, &CreateOptions::default()).unwrap(),
            meta,
        )
    };
    let volume =
        Arc::new(Volume::open(&dir.join(format!("n{id}.img")), BLOCKS * u64::from(BS)).unwrap());
    let notifier = Notifier::start(
        Sinks {
            console: false,
            log_file: Some(dir.join(format!("n{id}.log"))),
            command: None,
            command_timeout: Duration::from_secs(1),
            hub: None,
        },
        1024,
    );
    let parts = NodeParts {
        core: cfg,
        meta,
        store,
        volume,
        msl: MslLink {
            tx: Box::new(tx),
            rx: Box::new(rx),
            mac: [2, 0, 0, 0, 0, id as u8],
            max_frame: 9014,
            tx_cpu: None,
            rx_cpu: None,
        },
        key: Some(Key([9; 32])),
        lan: vec![LanEndpoint {
            adapter: 0,
            local: SocketAddr::from(([127, 0, 0, 1], lan_local)),
            peer: SocketAddr::from(([127, 0, 0, 1], lan_peer)),
        }],
        notifier,
    };
    let d = Wiring::start(parts)
        .and_then(|w| w.core(NoHost, u64::from(id)))
        .unwrap();
    let client = d.client.clone();
    let stop = d.stop_flag();
    NodeRun {
        client,
        thread: Some(std::thread::spawn(move || d.run())),
        stop,
    }
}

fn wait(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(secs) {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("timed out waiting for: {what}");
}

fn pattern(block: u64, round: u8) -> Vec<u8> {
    (0..BS as usize)
        .map(|i| (block as u8).wrapping_mul(31) ^ (i as u8) ^ round)
        .collect()
}

#[test]
fn test_pair_in_sync_writes_reach_both_files_then_takeover_and_resync() {
    let dir = tempfile::tempdir().unwrap();
    let (pa, pb) = (free_port(), free_port());
    let (tx12, rx12) = mem::channel(8192, 9014);
    let (tx21, rx21) = mem::channel(8192, 9014);
    let mut n1 = start(dir.path(), 1, true, tx12, rx21, pa, pb);
    let n2 = start(dir.path(), 2, false, tx21, rx12, pb, pa);
    wait("pair in sync", 10, || {
        n1.client
            .status()
            .is_some_and(|s| s.in_sync && s.role == Role::Primary)
            && n2
                .client
                .status()
                .is_some_and(|s| s.in_sync && s.disk == DiskState::UpToDate)
    });
    // Writes through the primary are acknowledged only once mirrored.
    for b in 0..256u64 {
        let blk = (b * 7) % BLOCKS;
        n1.client
            .write_blocks(blk * u64::from(BS), &pattern(blk, 1), b % 16 == 0)
            .expect("write acknowledged");
    }
    n1.client.flush().expect("flush acknowledged");
    // Node 1 goes away (both paths fall silent): node 2 takes over.
    let t = Instant::now();
    assert_eq!(n1.stop(), Exit::Stopped);
    wait("node 2 takes over", 5, || {
        n2.client.status().is_some_and(|s| s.role == Role::Primary)
    });
    let takeover = t.elapsed();
    assert!(
        takeover < Duration::from_millis(1500),
        "takeover took {takeover:?}"
    );
    for b in 0..64u64 {
        n2.client
            .write_blocks(b * u64::from(BS), &pattern(b, 2), false)
            .expect("write on the new primary");
    }
    // Node 1 returns: secondary, resynced.
    let (tx12, rx12) = mem::channel(8192, 9014);
    let (tx21, rx21) = mem::channel(8192, 9014);
    drop(n2);
    let mut n2 = start(dir.path(), 2, false, tx21, rx12, pb, pa);
    let mut n1 = start(dir.path(), 1, false, tx12, rx21, pa, pb);
    wait("pair in sync again", 15, || {
        let (a, b) = (n1.client.status(), n2.client.status());
        a.is_some_and(|s| s.in_sync && s.role == Role::Secondary) && b.is_some_and(|s| s.in_sync)
    });
    n2.client.flush().expect("flush");
    std::thread::sleep(Duration::from_millis(300));
    n1.stop();
    n2.stop();
    let a = std::fs::read(dir.path().join("n1.img")).unwrap();
    let b = std::fs::read(dir.path().join("n2.img")).unwrap();
    assert!(a == b, "volumes differ after resync");
    for blk in 0..64u64 {
        let off = (blk * u64::from(BS)) as usize;
        assert_eq!(
            &a[off..off + BS as usize],
            &pattern(blk, 2)[..],
            "block {blk}"
        );
    }
    let log2 = std::fs::read_to_string(dir.path().join("n2.log")).unwrap();
    assert!(log2.contains("event=takeover"), "{log2}");
    let _ = Notice::MslLinkDown;
}
