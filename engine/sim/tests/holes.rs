//! A resync source whose volume has holes (its host reports them, as
//! `SEEK_DATA` does for sparse files) sends them as zero runs, without
//! reading them, and the target ends identical: for a new pair's full
//! sync, and for one forced while clients write.

use msl_core::AdminCmd;
use msl_sim::{Options, Sim};

const MS: u64 = 1_000;
const SEC: u64 = 1_000_000;

fn counters(sim: &Sim, i: usize) -> msl_core::node::Counters {
    sim.node(i).expect("node up").status().counters
}

#[test]
fn test_new_pair_full_sync_of_a_blank_volume_sends_only_zero_runs() {
    for seed in 1..=3 {
        let mut o = Options::new(seed);
        o.volume_blocks = 4096;
        let mut sim = Sim::new(o);
        sim.start_pair().unwrap();
        let c = counters(&sim, 0);
        assert_eq!(c.resync_blocks_sent, 0, "seed {seed}: {c:?}");
        // One zero run per contiguous hole, not one per block or read.
        assert_eq!(c.resync_zero_blocks_sent, 4096, "seed {seed}: {c:?}");
        sim.run_for(2 * SEC);
        sim.final_check().unwrap();
    }
}

#[test]
fn test_full_sync_under_client_writes_sends_data_and_zero_runs_and_converges() {
    for seed in 1..=5 {
        let mut o = Options::new(seed);
        o.volume_blocks = 2048;
        let mut sim = Sim::new(o);
        sim.start_pair().unwrap();
        sim.run_for(2 * SEC);
        // The secondary discards its copy: a full sync while the client
        // goes on writing (some blocks hold data, the rest are holes).
        let secondary = (0..2)
            .find(|&i| sim.role(i) == Some(msl_wire::Role::Secondary))
            .expect("a secondary");
        let primary = 1 - secondary;
        let before = counters(&sim, primary);
        sim.admin(secondary, AdminCmd::Invalidate);
        sim.run_for(3 * SEC);
        let c = counters(&sim, primary);
        assert!(
            c.resync_blocks_sent > before.resync_blocks_sent,
            "seed {seed}: written blocks go with their data: {c:?}"
        );
        assert!(
            c.resync_zero_blocks_sent > before.resync_zero_blocks_sent,
            "seed {seed}: holes go as zero runs: {c:?}"
        );
        sim.run_for(500 * MS);
        sim.final_check()
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    }
}

/// A client write into a hole the source had already reported ends what
/// it knows of that hole (193, 513), and a hole reported by a read issued
/// while a client write was in flight, or before one that came since, is
/// not trusted beyond the read (1481, 2672: disk I/O completes out of
/// order): without that, a block written there would have gone to the
/// target as zeroes after its data, an acknowledged write lost.
#[test]
fn test_regression_seeds_write_into_a_known_hole() {
    for seed in [193, 513, 1481, 2672] {
        if let Err(e) = msl_sim::run_seed(seed, false) {
            panic!("seed {seed}: {e}");
        }
    }
}
