//! Large volumes, as users run them: loop devices over sparse files of
//! 1 TiB and 8 TiB, a real msld pair in network namespaces.
//!
//! - Two blank devices created with `mslctl create-md --blank` pair
//!   without copying the volume, and mirror writes at its far end.
//! - On 1 TiB: kill -9 of the primary during writes, of the lone primary
//!   during a degraded run, and of the target during a resync lose no
//!   acknowledged write, and the resyncs send only what the activity log
//!   and the bitmap name (the written region), never the volume.
//!
//! Needs root, losetup (util-linux) and a file system taking 8 TiB sparse
//! files (ext4 takes up to 16 TiB).

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use msl_harness::workload::{check_image, Workload, WorkloadOptions, WorkloadReport};
use msl_harness::{Pair, PairOptions};

const BLOCK: u64 = 4096;

/// A loop device over a sparse file, detached and removed on drop.
struct LoopDev {
    dev: String,
    backing: PathBuf,
}

impl LoopDev {
    fn new(backing: &Path, size: u64) -> LoopDev {
        let f = std::fs::File::create(backing).unwrap();
        f.set_len(size)
            .unwrap_or_else(|e| panic!("a sparse file of {size} bytes: {e}"));
        let out = Command::new("losetup")
            .args(["--find", "--show", "--direct-io=on"])
            .arg(backing)
            .output()
            .expect("losetup (util-linux)");
        assert!(
            out.status.success(),
            "losetup {}: {}",
            backing.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        LoopDev {
            dev: String::from_utf8_lossy(&out.stdout).trim().to_string(),
            backing: backing.to_path_buf(),
        }
    }

    /// `len` bytes at `offset`, read from the device.
    fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let f = std::fs::File::open(&self.dev).unwrap();
        let mut b = vec![0u8; len];
        f.read_exact_at(&mut b, offset).unwrap();
        b
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
        let _ = std::fs::remove_file(&self.backing);
    }
}

/// A pair over two loop devices; fields drop in order: the daemons stop
/// before the devices go.
struct BigPair {
    pair: Pair,
    devs: Vec<LoopDev>,
}

/// `mslctl create-md --blank` on both nodes (`--initial-primary` on node
/// 1), over fresh sparse loop devices of `size` bytes.
fn blank_pair(size: u64, opts: PairOptions) -> BigPair {
    let pair = Pair::new(PairOptions {
        volume_bytes: size,
        ..opts
    })
    .expect("build the pair (run as root)");
    let mut devs = Vec::new();
    for id in 1..=2u16 {
        let dev = LoopDev::new(&pair.dir().join(format!("n{id}.backing")), size);
        std::os::unix::fs::symlink(&dev.dev, pair.volume_path(id)).unwrap();
        let text = common::create_md_blank(&pair.config_path(id), id);
        assert!(text.contains("block device zeroed"), "{text}");
        devs.push(dev);
    }
    BigPair { pair, devs }
}

fn counter(pair: &Pair, id: u16, name: &str) -> u64 {
    pair.status(id).unwrap()["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("counter {name} missing"))
}

/// Every acknowledged write of `report` is on both devices, and the two
/// copies of the region are identical.
fn check_both_devices(b: &BigPair, report: &WorkloadReport) {
    let (first, n) = (report.opts.first_block, report.opts.blocks);
    let images: Vec<Vec<u8>> = b
        .devs
        .iter()
        .map(|d| d.read(first * BLOCK, (n * BLOCK) as usize))
        .collect();
    for (i, img) in images.iter().enumerate() {
        let r = check_image(img, first, &report.blocks);
        assert!(r.blocks_checked > 0);
        assert_eq!(
            r.acked_writes_lost,
            0,
            "node {}'s device lost acknowledged writes: {:?}",
            i + 1,
            r.problems
        );
    }
    assert!(
        images[0] == images[1],
        "the two devices differ in the region"
    );
}

#[test]
fn test_blank_8tib_pair_comes_up_in_sync_without_copying() {
    let size = 8u64 << 40;
    let b = blank_pair(size, PairOptions::default());
    let pair = &b.pair;
    let t0 = Instant::now();
    pair.start_both().unwrap();
    let took = pair.wait_in_sync(1, Duration::from_secs(120)).unwrap();
    eprintln!(
        "8 TiB blank pair in sync {took:?} after start ({:?} with create-md)",
        t0.elapsed()
    );
    assert_eq!(counter(pair, 1, "resync_blocks_sent"), 0, "nothing to copy");
    assert_eq!(counter(pair, 2, "resync_blocks_received"), 0);
    let (s1, s2) = (pair.status(1).unwrap(), pair.status(2).unwrap());
    assert_eq!(s1["generation"], s2["generation"], "{s1}\n{s2}");
    // Writes at the far end of the volume are mirrored.
    let mut o = WorkloadOptions::new(pair.service_addr());
    o.blocks = 4096;
    o.first_block = size / BLOCK - o.blocks;
    o.max_writes_per_s = Some(2000);
    let w = Workload::start(pair.topo.client_ns(), o).unwrap();
    w.wait_acks(2000, Duration::from_secs(60)).unwrap();
    let report = w.stop();
    let v = report.verify(pair.topo.client_ns()).unwrap();
    assert_eq!(v.acked_writes_lost, 0, "{:?}", v.problems);
    pair.stop(1).unwrap();
    pair.stop(2).unwrap();
    check_both_devices(&b, &report);
}

#[test]
fn test_create_md_blank_refuses_a_file_volume_holding_data() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    std::fs::write(&key, "ab".repeat(32)).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let vol = dir.path().join("vol.img");
    let f = std::fs::File::create(&vol).unwrap();
    f.set_len(64 << 20).unwrap();
    f.write_all_at(b"data", 40 << 20).unwrap();
    drop(f);
    let cfg = dir.path().join("n1.toml");
    std::fs::write(
        &cfg,
        format!(
            "node_id = 1\npeer_id = 2\ncluster_id = 7\nkey_file = \"{}\"\n\
             service_address = \"10.1.2.3/24\"\nservice_interface = \"lan0\"\n\
             control_socket = \"{d}/n1.sock\"\n[msl]\ninterface = \"msl0\"\n\
             [[lan]]\ninterface = \"lan0\"\naddress = \"127.0.0.1\"\npeer_address = \"127.0.0.2\"\n\
             [volume]\npath = \"{}\"\nsize_bytes = {}\nmetadata = \"{d}/n1.meta\"\n",
            key.display(),
            vol.display(),
            64u64 << 20,
            d = dir.path().display()
        ),
    )
    .unwrap();
    let run = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_mslctl"))
            .args(["create-md", "--config"])
            .arg(&cfg)
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, text) = run(&["--blank", "--initial-primary"]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("holds data") && text.contains(&(40u64 << 20).to_string()),
        "{text}"
    );
    assert!(
        !dir.path().join("n1.meta").exists(),
        "no metadata on refusal"
    );
    // Once the data is gone (a hole), the volume is blank.
    let f = std::fs::OpenOptions::new().write(true).open(&vol).unwrap();
    f.set_len(0).unwrap();
    f.set_len(64 << 20).unwrap();
    let (ok, text) = run(&["--blank", "--initial-primary"]);
    assert!(ok, "{text}");
    assert!(text.contains("holds no data"), "{text}");
    // And existing metadata is never overwritten without --force.
    let (ok, text) = run(&["--blank"]);
    assert!(!ok && text.contains("refusing to overwrite"), "{text}");
}

#[test]
fn test_1tib_kill9_during_writes_degraded_run_and_resync_loses_nothing() {
    let size = 1u64 << 40;
    // A slow resync, so that the target can be killed in the middle of it.
    let b = blank_pair(
        size,
        PairOptions::default()
            .tunable("resync_min_mib_s", 4)
            .tunable("resync_max_mib_s", 8),
    );
    let pair = &b.pair;
    pair.start_both().unwrap();
    pair.wait_in_sync(1, Duration::from_secs(120)).unwrap();
    // 16 extents of 4 MiB at the far end of the volume, four connections.
    let region: u64 = 16 * 1024;
    let mut o = WorkloadOptions::new(pair.service_addr());
    o.blocks = region;
    o.first_block = size / BLOCK - region;
    o.connections = 4;
    o.max_writes_per_s = Some(500);
    o.io_timeout = Duration::from_secs(3);
    let w = Workload::start(pair.topo.client_ns(), o).unwrap();
    w.wait_acks(1500, Duration::from_secs(30)).unwrap();

    // The primary, killed during mirrored writes: node 2 takes over.
    pair.kill9(1).unwrap();
    pair.wait_status(2, "takes over", Duration::from_secs(15), |s| {
        s["role"] == "primary"
    })
    .unwrap();
    let acked = w.acked();
    w.wait_acks(acked + 1500, Duration::from_secs(30)).unwrap();

    // The lone primary, killed during its degraded run; restarted, the
    // administrator promotes it (no peer to decide with).
    pair.kill9(2).unwrap();
    pair.start(2).unwrap();
    pair.wait_status(2, "msld up", Duration::from_secs(60), |_| true)
        .unwrap();
    pair.admin(2, "promote").unwrap();
    pair.wait_status(2, "primary again", Duration::from_secs(30), |s| {
        s["role"] == "primary"
    })
    .unwrap();
    let acked = w.acked();
    w.wait_acks(acked + 1500, Duration::from_secs(30)).unwrap();
    let dirty = pair.status(2).unwrap()["dirty_blocks"].as_u64().unwrap();
    assert!(
        dirty > 0 && dirty <= region,
        "{dirty} dirty blocks: the written region is {region}"
    );

    // The old primary returns and is resynced; killed in the middle of it,
    // it returns again and the resync resumes.
    pair.start(1).unwrap();
    pair.wait_status(1, "resync running", Duration::from_secs(60), |s| {
        s["resync"]["active"] == true
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    pair.kill9(1).unwrap();
    pair.start(1).unwrap();
    pair.wait_in_sync(2, Duration::from_secs(180)).unwrap();
    let report = w.stop();
    let v = report.verify(pair.topo.client_ns()).unwrap();
    assert_eq!(v.acked_writes_lost, 0, "{:?}", v.problems);
    eprintln!(
        "{} writes acknowledged, {} blocks checked; resync sent {} blocks",
        report.acked_writes,
        v.blocks_checked,
        counter(pair, 2, "resync_blocks_sent")
    );
    // Only the region was ever written: both resync passes together send
    // at most twice it, not the 268,435,456 blocks of the volume.
    let sent = counter(pair, 2, "resync_blocks_sent");
    assert!(
        sent > 0 && sent <= 2 * region,
        "{sent} blocks resynced for a region of {region}"
    );
    pair.stop(1).unwrap();
    pair.stop(2).unwrap();
    check_both_devices(&b, &report);
}

/// A new secondary's full sync of an 8 TiB thin volume holding 64 MiB of
/// data copies that data and sends the holes as zero runs: it takes
/// seconds, and the secondary's file stays thin.
#[test]
fn test_full_sync_of_a_thin_8tib_volume_copies_only_its_data() {
    use std::os::unix::fs::MetadataExt;
    let size = 8u64 << 40;
    let pair = Pair::new(PairOptions {
        volume_bytes: size,
        ..PairOptions::default()
    })
    .expect("build the pair (run as root)");
    for id in 1..=2u16 {
        let f = std::fs::File::create(pair.volume_path(id)).unwrap();
        f.set_len(size).unwrap();
    }
    // 16 runs of 4 MiB spread over the volume, each its own pattern.
    let run = 4u64 << 20;
    let places: Vec<u64> = (0..16u64)
        .map(|k| k * (size / 16) + (k * 7919 % 1024) * run)
        .collect();
    let pattern = |k: usize| -> Vec<u8> {
        (0..run as usize)
            .map(|i| (i as u8) ^ (k as u8).wrapping_mul(37) ^ 0x5a)
            .collect()
    };
    {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(pair.volume_path(1))
            .unwrap();
        for (k, &off) in places.iter().enumerate() {
            f.write_all_at(&pattern(k), off).unwrap();
        }
        f.sync_all().unwrap();
    }
    pair.start(1).unwrap();
    pair.start(2).unwrap();
    let took = pair.wait_in_sync(1, Duration::from_secs(300)).unwrap();
    let data = counter(&pair, 1, "resync_blocks_sent");
    let zeroes = counter(&pair, 1, "resync_zero_blocks_sent");
    eprintln!(
        "8 TiB thin volume with {} MiB of data: full sync in {took:?}, {data} blocks copied, \
         {zeroes} sent as zero runs",
        (16 * run) >> 20
    );
    let written = 16 * run / BLOCK;
    let blocks = size / BLOCK;
    assert!(
        data >= written && data <= 2 * written,
        "{data} blocks copied for {written} written"
    );
    assert!(data + zeroes >= blocks, "{data} + {zeroes} < {blocks}");
    pair.stop(1).unwrap();
    pair.stop(2).unwrap();
    let f = std::fs::File::open(pair.volume_path(2)).unwrap();
    for (k, &off) in places.iter().enumerate() {
        let mut b = vec![0u8; run as usize];
        f.read_exact_at(&mut b, off).unwrap();
        assert!(b == pattern(k), "run {k} at {off} differs on the secondary");
    }
    let allocated = f.metadata().unwrap().blocks() * 512;
    assert!(
        allocated < 1 << 30,
        "the secondary's volume stays thin: {allocated} bytes allocated"
    );
}
