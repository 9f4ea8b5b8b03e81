//! Streams patterned 4 KiB blocks between two network namespaces over a
//! real veth pair, on every backend, while the fault layer drops 1 % of
//! frames (both directions), reorders some, duplicates and corrupts a few.
//! Every block must arrive once, in order, intact.
//!
//! Needs root (network namespaces, raw sockets, BPF). Without root it
//! fails loudly instead of passing silently. `MSL_STREAM_BLOCKS` overrides
//! the block count (default 262144 = 1 GiB per backend).

use std::time::{Duration, Instant};

use msl_transport::fault::FaultConfig;
use msl_transport::netns::{is_root, VethPair};
use msl_transport::pair::{open_pair, LinkKind};
use msl_transport::stream::{run_pair, StreamConfig, BLOCK_SIZE};
use msl_transport::{BackendKind, OpenOptions};

fn blocks() -> u64 {
    std::env::var("MSL_STREAM_BLOCKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(262_144)
}

fn require_root() {
    assert!(
        is_root(),
        "this test needs root (network namespaces, raw sockets, XDP): run `sudo -E cargo test -p msl-transport --test netns_stream` (CI runs as root)"
    );
}

fn stream_with_faults(kind: LinkKind, seed: u64, blocks_per_frame: usize) {
    require_root();
    let n = blocks();
    let veth = VethPair::create(9000).expect("creating the veth pair");
    let fault = |seed| FaultConfig {
        seed,
        drop_ppm: 10_000,
        duplicate_ppm: 1_000,
        reorder_ppm: 5_000,
        corrupt_ppm: 500,
        reorder_depth: 8,
    };
    let opened = open_pair(
        &(&veth).into(),
        kind,
        &OpenOptions::default(),
        Some(fault(seed)),
        Some(fault(seed ^ 0xACC)),
    )
    .unwrap_or_else(|e| panic!("opening {kind} on {veth:?}: {e}"));
    let cfg = StreamConfig {
        blocks: n,
        sender_mac: opened.mac_a,
        receiver_mac: opened.mac_b,
        drain_timeout: Duration::from_secs(30),
        blocks_per_frame,
        ..StreamConfig::default()
    };
    let t0 = Instant::now();
    let (snd, rcv) = run_pair(opened.a, opened.b, &cfg).expect("streaming");
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "{kind} (seed {seed:#x}, {blocks_per_frame} blocks/frame): {n} blocks in {secs:.2} s ({:.2} Gbit/s payload); retransmits {}, \
         fault drops {} / dup {} / reorder {} / corrupt {}; receiver: malformed {} {:?}, duplicates {}, kernel drops {}",
        n as f64 * BLOCK_SIZE as f64 * 8.0 / secs / 1e9,
        snd.retransmits,
        snd.tx.fault_dropped,
        snd.tx.fault_duplicated,
        snd.tx.fault_reordered,
        snd.tx.fault_corrupted,
        rcv.malformed,
        rcv.malformed_by_reason,
        rcv.duplicates,
        rcv.kernel_dropped,
    );
    assert!(
        snd.complete,
        "{kind}: not every block was acknowledged: sent {}, acked {}, retransmits {}",
        snd.blocks_sent, snd.blocks_acked, snd.retransmits
    );
    assert_eq!(snd.blocks_sent, n, "{kind}: blocks sent");
    assert_eq!(snd.blocks_acked, n, "{kind}: blocks acknowledged");
    assert_eq!(rcv.verified, n, "{kind}: blocks verified by the receiver");
    assert_eq!(
        rcv.bad_pattern, 0,
        "{kind}: blocks applied with wrong content"
    );
    assert_eq!(
        rcv.order_errors, 0,
        "{kind}: blocks applied out of order or twice"
    );
    assert_eq!(
        rcv.bad_data, 0,
        "{kind}: well-formed frames with a bad block header"
    );
    assert!(
        snd.retransmits > 0,
        "{kind}: 1 % loss must cause retransmissions"
    );
    if snd.tx.fault_corrupted > 0 {
        assert!(
            rcv.malformed > 0,
            "{kind}: corrupted frames must be refused"
        );
    }
    drop(veth);
}

#[test]
fn test_afpacket_lossy_link_delivers_every_block_once_in_order() {
    stream_with_faults(LinkKind::Raw(BackendKind::AfPacket), 0xA1, 2);
}

#[test]
fn test_afxdp_lossy_link_delivers_every_block_once_in_order() {
    stream_with_faults(LinkKind::Raw(BackendKind::AfXdp), 0xB2, 2);
}

#[test]
fn test_tcp_lossy_link_delivers_every_block_once_in_order() {
    stream_with_faults(LinkKind::Tcp, 0xC3, 1);
}

/// Receive rings far smaller than the window: the kernel drops frames when
/// the ring is full (AF_XDP gives no backpressure), and reliable delivery
/// must retransmit them.
fn stream_over_small_rings(kind: BackendKind) {
    require_root();
    let n = blocks() / 4;
    let veth = VethPair::create(9000).expect("creating the veth pair");
    let mut opts = OpenOptions::default();
    opts.afpacket.bytes = 1 << 20; // 4 blocks of 256 KiB: ~120 frames
    opts.afxdp.rx_frames = 256;
    opts.afxdp.ring = 256;
    let opened = open_pair(&(&veth).into(), LinkKind::Raw(kind), &opts, None, None)
        .unwrap_or_else(|e| panic!("opening {kind} on {veth:?}: {e}"));
    let cfg = StreamConfig {
        blocks: n,
        blocks_per_frame: 2,
        sender_mac: opened.mac_a,
        receiver_mac: opened.mac_b,
        drain_timeout: Duration::from_secs(30),
        ..StreamConfig::default()
    };
    let (snd, rcv) = run_pair(opened.a, opened.b, &cfg).expect("streaming");
    eprintln!(
        "{kind} small rings: {n} blocks, kernel drops {} (receiver) {} (sender), retransmits {}",
        rcv.kernel_dropped, snd.rx_kernel_dropped, snd.retransmits
    );
    assert!(snd.complete, "{kind}: not every block was acknowledged");
    assert_eq!(rcv.verified, n, "{kind}: blocks verified by the receiver");
    assert_eq!(rcv.bad_pattern + rcv.order_errors + rcv.bad_data, 0);
    if rcv.kernel_dropped > 0 {
        assert!(
            snd.retransmits > 0,
            "{kind}: ring drops must be retransmitted"
        );
    }
}

#[test]
fn test_afpacket_ring_overflow_is_retransmitted() {
    stream_over_small_rings(BackendKind::AfPacket);
}

#[test]
fn test_afxdp_ring_overflow_is_retransmitted() {
    stream_over_small_rings(BackendKind::AfXdp);
}

/// `auto` tries AF_XDP first and falls back to AF_PACKET with the reason
/// when AF_XDP cannot be set up (here: a UMEM chunk size the kernel
/// refuses), and the fallback link carries the stream.
#[test]
fn test_auto_unusable_afxdp_falls_back_to_afpacket() {
    require_root();
    let veth = VethPair::create(9000).expect("creating the veth pair");
    let mut opts = OpenOptions::default();
    opts.afxdp.chunk = 3000; // not a power of two: XDP_UMEM_REG says EINVAL
    let opened = open_pair(
        &(&veth).into(),
        LinkKind::Raw(BackendKind::Auto),
        &opts,
        None,
        None,
    )
    .expect("auto must fall back, not fail");
    assert_eq!(opened.chosen, LinkKind::Raw(BackendKind::AfPacket));
    let reason = opened.fallback_reason.clone().expect("a logged reason");
    assert!(reason.contains("AF_XDP"), "reason names AF_XDP: {reason}");
    let cfg = StreamConfig {
        blocks: 10_000,
        sender_mac: opened.mac_a,
        receiver_mac: opened.mac_b,
        ..StreamConfig::default()
    };
    let (snd, rcv) = run_pair(opened.a, opened.b, &cfg).expect("streaming");
    assert!(snd.complete);
    assert_eq!(rcv.verified, 10_000);
}
