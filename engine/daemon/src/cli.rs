//! msld's command line, in the library so that the documentation generator
//! (`mslctl-gen-docs`) renders msld's man page and completions from the
//! same definition `msld --help` prints.

use std::path::PathBuf;

use clap::Parser;

/// msl mirroring daemon (one node of a pair).
#[derive(Clone, Debug, Parser)]
#[command(
    name = "msld",
    version,
    about = "msl mirroring daemon (one node of a pair)",
    long_about = "msl mirroring daemon (one node of a pair): mirrors every client \
                  write of the primary over the MSL to the secondary before \
                  acknowledging it, watches the peer and takes over when it fails.\n\n\
                  Exit status: 0 after a clean stop (SIGTERM/SIGINT), 75 when the \
                  node asks to be started again as secondary, 1 on a start-up error."
)]
pub struct Args {
    /// The node's configuration file (TOML).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// On first start (no metadata yet): declare this node's volume the
    /// authoritative data of the pair. Give it on exactly one node.
    #[arg(long)]
    pub initial_primary: bool,
    /// First start: create a missing volume file and metadata (owner-only,
    /// 0600). Without it (or --initial-primary) a missing file is an error
    /// naming it, so an unmounted filesystem is never replaced by an empty
    /// volume. `mslctl create-md` does the same ahead of a start.
    #[arg(long)]
    pub create: bool,
    /// Check the configuration, the files it names (cluster key, volume,
    /// metadata) and this host's network namespace (the MSL interface and
    /// each LAN adapter exist, each adapter's address is on it, the
    /// service address fits a network of its interface), then exit:
    /// 0 when all is well, 1 after naming every problem.
    #[arg(long)]
    pub check: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn test_version_and_flags_parse() {
        Args::command().debug_assert();
        let e = Args::try_parse_from(["msld", "--version"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::DisplayVersion);
        assert!(e.to_string().contains(env!("CARGO_PKG_VERSION")));
        let a = Args::try_parse_from(["msld", "--config", "/etc/msl/n.toml", "--check"]).unwrap();
        assert_eq!(a.config, PathBuf::from("/etc/msl/n.toml"));
        assert!(a.check && !a.initial_primary);
        assert!(
            Args::try_parse_from(["msld"]).is_err(),
            "--config is required"
        );
    }
}
