//! Writes the man pages of mslctl (section 8: mslctl.8 and one page per
//! subcommand, mslctl-promote.8, ...) and of msld (msld.8), and the shell
//! completions (bash, zsh, fish) of both, from their clap definitions, so
//! they never disagree with `--help`.
//!
//!     cargo run -p mslctl --features gen-docs --bin mslctl-gen-docs -- OUTDIR
//!
//! Output: OUTDIR/man/*.8, OUTDIR/completions/{mslctl,msld}.bash,
//! _mslctl, _msld, {mslctl,msld}.fish.

use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;
use msl_daemon::cli::Args as MsldArgs;
use mslctl::cli::Args;

fn man_pages(
    cmd: &clap::Command,
    dir: &Path,
    parent: Option<&str>,
) -> std::io::Result<Vec<PathBuf>> {
    // Subcommand pages are named `mslctl-promote` and show `mslctl
    // promote` in their synopsis. clap wants 'static names: a short-lived
    // generator may leak them.
    let (name, bin) = match parent {
        None => (cmd.get_name().to_string(), cmd.get_name().to_string()),
        Some(p) => (
            format!("{p}-{}", cmd.get_name()),
            format!("{p} {}", cmd.get_name()),
        ),
    };
    let name: &'static str = Box::leak(name.into_boxed_str());
    let cmd = cmd.clone().name(name).bin_name(bin);
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .section("8")
        .manual("msl")
        .source(format!("msl {}", env!("CARGO_PKG_VERSION")))
        .render(&mut out)?;
    let path = dir.join(format!("{name}.8"));
    std::fs::write(&path, out)?;
    let mut pages = vec![path];
    // `mslctl help` gets a page; its copies of every subcommand do not.
    if cmd.get_name().ends_with("-help") {
        return Ok(pages);
    }
    for sub in cmd.get_subcommands() {
        pages.extend(man_pages(sub, dir, Some(name))?);
    }
    Ok(pages)
}

fn main() -> std::io::Result<()> {
    let out = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/docs"));
    let man = out.join("man");
    let comp = out.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&comp)?;
    let mut pages = Vec::new();
    let mut files = Vec::new();
    for (mut cmd, bin) in [(Args::command(), "mslctl"), (MsldArgs::command(), "msld")] {
        cmd.build();
        pages.extend(man_pages(&cmd, &man, None)?);
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            files.push(clap_complete::generate_to(
                shell,
                &mut cmd.clone(),
                bin,
                &comp,
            )?);
        }
    }
    println!(
        "mslctl-gen-docs: {} man pages in {}, completions {}",
        pages.len(),
        man.display(),
        files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok(())
}
