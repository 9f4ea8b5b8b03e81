//! `msl-bench`: benchmarks of the msl data path.
//!
//! `msl-bench link` builds a two-namespace veth topology (or uses the
//! namespaces and interfaces given), streams 4 KiB blocks for N seconds on
//! each backend with reliable delivery and per-block verification, runs
//! iperf3 TCP on the same link as the kernel's ceiling, and prints one table
//! (or JSON lines) plus an SVG latency chart. `--qd1` measures one block in
//! flight at a time against a kernel-TCP ping-pong of the same size.
//!
//! `msl-bench nbd` runs the same fio jobs (nbd engine) against a mirrored
//! msld pair, the same primary degraded, nbdkit and qemu-nbd, all reached
//! from the client host over the same bridge, and prints medians side by
//! side with the ratios against the goals. `msl-bench resync` measures
//! the idle-cycles goals: client throughput during a resync, and the resync
//! rate with clients idle against the link's raw capacity.

mod chart;
mod fio;
mod link;
mod nbd;
mod qemu_mirror;
mod resync;
mod scale;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "msl-bench", about = "msl benchmarks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Stream 4 KiB blocks over the MSL on each backend and compare with
    /// iperf3 TCP on the same link. Needs root.
    Link(link::LinkArgs),
    /// fio against msl (mirrored and degraded), nbdkit and qemu-nbd over
    /// the same LAN path. Needs root, fio, nbdkit, qemu-nbd, nbdinfo.
    Nbd(nbd::NbdArgs),
    /// Idle cycles: client throughput before and during a full resync, and
    /// the resync's rate with clients idle against the link's raw
    /// capacity. Needs root.
    Resync(resync::ResyncArgs),
    /// What a volume's size costs: a primary running alone on loop devices
    /// of each size (sparse), fio random writes over a hot span and over
    /// the whole volume, side by side. Needs root, fio, nbdinfo, losetup.
    Scale(scale::ScaleArgs),
    /// Serve a file with msl's own NBD server (msl-nbd's FileBackend,
    /// unreplicated): the `msl-nbd-file` server of `msl-bench nbd`.
    #[command(hide = true)]
    ServeFile(nbd::ServeFileArgs),
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Link(a) => link::run(a).map_err(|e| e.to_string()),
        Cmd::Nbd(a) => nbd::run(a),
        Cmd::ServeFile(a) => nbd::serve_file(a),
        Cmd::Resync(a) => resync::run(a),
        Cmd::Scale(a) => scale::run(a),
    };
    if let Err(e) = r {
        eprintln!("msl-bench: {e}");
        std::process::exit(1);
    }
}
