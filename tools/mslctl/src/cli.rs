//! The command line (also read by the man page and completion generator).

use std::path::PathBuf;

use clap::{Args as ClapArgs, Parser, Subcommand};

/// Success: the command's outcome is there (`promote`: this node is
/// primary; `wait-sync`: in sync; ...).
pub const EXIT_OK: u8 = 0;
/// msld could not be asked: not running, wrong socket, not root, a broken
/// answer, or the daemon went away while waiting.
pub const EXIT_ERROR: u8 = 1;
/// A usage error (from the argument parser); `verify`: blocks differ.
pub const EXIT_USAGE_OR_DIFFER: u8 = 2;
/// The node refused the command in its current state (the reason is on
/// standard error), or a wait cannot succeed (split brain, failed disk).
pub const EXIT_REFUSED: u8 = 3;
/// The outcome did not arrive within --timeout.
pub const EXIT_TIMEOUT: u8 = 4;

const AFTER_HELP: &str = "\
The control socket is the one given by --socket, else the control_socket of \
the node's config given by --config, else /run/msl/msld.sock, else the only \
socket in /run/msl.

Exit status:
  0  done: the outcome is there (--no-wait: msld accepted the request)
  1  msld could not be asked (not running, not root, wrong socket) or went away
  2  usage error; verify: blocks differ
  3  refused by the node (reason on stderr); a wait that cannot succeed
  4  no outcome within --timeout";

#[derive(Parser, Debug)]
#[command(
    name = "mslctl",
    version,
    about = "Show and change the state of an msl node",
    long_about = "Show and change the state of an msl node: talks to msld over its \
                  root-only control socket. State changes wait for their outcome \
                  and exit non-zero with the reason when the node refuses.",
    after_help = AFTER_HELP
)]
pub struct Args {
    /// msld's control socket.
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// The node's msld configuration file (its control_socket is used;
    /// create-md reads the whole file).
    #[arg(long, short = 'c', global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// How a state change waits for its outcome.
#[derive(ClapArgs, Debug, Clone, Copy)]
pub struct WaitOpts {
    /// Return once msld accepted the request, without waiting for the
    /// outcome (exit 0 even if the node then refuses).
    #[arg(long)]
    pub no_wait: bool,
    /// Seconds to wait for the outcome (exit 4 after that).
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub timeout: u64,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Role, peer, links, generation, dirty data, resync progress, counters.
    Status {
        /// One JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Follow the event stream (one line per event) until interrupted.
    Events {
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
        /// Print the current state as `exists` events (node, peer, MSL,
        /// LAN adapters, resync, verify), then exit.
        #[arg(long)]
        now: bool,
    },
    /// Make this node primary; waits until it is (refused if the peer is a
    /// live primary or the local data is not up to date, unless --force).
    Promote {
        /// Promote even with data that is not up to date or a live primary
        /// peer (risks split brain).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        wait: WaitOpts,
    },
    /// Stop serving clients and stay secondary; waits until secondary.
    Demote {
        #[command(flatten)]
        wait: WaitOpts,
    },
    /// Planned handover to the in-sync peer, losing no acknowledged write;
    /// waits until the peer is primary (refused unless this node is an
    /// in-sync primary).
    Switchover {
        #[command(flatten)]
        wait: WaitOpts,
    },
    /// Drop the MSL session and stop reconnecting; waits until disconnected.
    Disconnect {
        #[command(flatten)]
        wait: WaitOpts,
    },
    /// Reconnect after `disconnect`; waits until the MSL session is up
    /// (refused when the peer refuses the session, e.g. split brain).
    Connect {
        #[command(flatten)]
        wait: WaitOpts,
    },
    /// Discard this node's data: full resync from the peer (refused on the
    /// primary); waits until the data is marked out of date.
    Invalidate {
        #[command(flatten)]
        wait: WaitOpts,
    },
    /// Wait until the pair is connected and in sync (no resync running,
    /// this node's data up to date).
    WaitSync {
        /// Seconds to wait (0: no limit); exit 4 after that.
        #[arg(long, value_name = "SECS", default_value_t = 0)]
        timeout: u64,
    },
    /// Wait until the MSL session with the peer is up.
    WaitConnect {
        /// Seconds to wait (0: no limit); exit 4 after that.
        #[arg(long, value_name = "SECS", default_value_t = 0)]
        timeout: u64,
    },
    /// Online verify (on the primary, while in sync): compare both copies
    /// block by block without pausing clients; holes of thin file volumes
    /// that are holes on both sides are compared without reading them
    /// (counted as "holes on both sides"). Shows progress; exits 0 when
    /// identical, 2 when blocks differ, 1 on error.
    Verify {
        /// First block to compare.
        #[arg(long, default_value_t = 0)]
        start_block: u64,
        /// Blocks to compare (default: to the end of the volume).
        #[arg(long)]
        count: Option<u64>,
        /// Print the final status.verify document as JSON.
        #[arg(long)]
        json: bool,
        /// Mark differing blocks out of sync and resend them from the
        /// primary (the MSL session restarts once).
        #[arg(long)]
        resync: bool,
    },
    /// Create (initialise) this node's metadata from its msld config
    /// (--config FILE): cluster id, node id, volume geometry, a fresh
    /// generation; and the volume file if it does not exist. Both are
    /// owner-only (0600). Refuses to overwrite an existing metadata file
    /// unless --force. (`msld --create` also creates it on a first start.)
    CreateMd {
        /// Declare this node's volume the authoritative data of the pair
        /// (give it on exactly one node); otherwise it waits for a full sync.
        #[arg(long)]
        initial_primary: bool,
        /// Overwrite existing metadata (its generations and dirty map are
        /// lost: the node needs a full resync).
        #[arg(long)]
        force: bool,
        /// The volume is new and blank, and so is the peer's (create both
        /// nodes with --blank): the pair comes up in sync without copying
        /// the volume. A file volume holding any data is refused; a block
        /// device is zeroed (a discard).
        #[arg(long)]
        blank: bool,
    },
    /// Convert this node's metadata from format 1 to the current format in
    /// place (--config FILE; msld stopped): generations, state, dirty map
    /// and activity log are kept, the old file stays as `<metadata>.v1`.
    ConvertMd,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn test_cli_definition_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn test_help_documents_every_exit_code() {
        let help = Args::command().render_long_help().to_string();
        for code in [
            EXIT_OK,
            EXIT_ERROR,
            EXIT_USAGE_OR_DIFFER,
            EXIT_REFUSED,
            EXIT_TIMEOUT,
        ] {
            assert!(
                help.contains(&format!("\n  {code}  ")),
                "exit {code}: {help}"
            );
        }
    }

    #[test]
    fn test_create_md_takes_the_global_config() {
        let a = Args::try_parse_from(["mslctl", "create-md", "--config", "/x.toml", "--force"])
            .unwrap();
        assert_eq!(a.config, Some(PathBuf::from("/x.toml")));
        assert!(matches!(a.cmd, Cmd::CreateMd { force: true, .. }));
    }
}
