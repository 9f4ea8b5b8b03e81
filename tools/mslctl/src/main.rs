//! `mslctl`: show and change the state of an msl node (see the library).

use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use mslctl::cli::Args;

fn main() -> ExitCode {
    match mslctl::run(Args::parse(), Path::new(msl_control::SOCKET_DIR)) {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            eprintln!("mslctl: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}
