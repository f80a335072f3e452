//! `tartarus-agent`: the agent that runs inside every sandbox.

use std::process::ExitCode;

fn main() -> ExitCode {
    match std::env::args().nth(1).as_deref() {
        Some("--version") => {
            println!("tartarus-agent {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("usage: tartarus-agent --version");
            ExitCode::from(2)
        }
    }
}
