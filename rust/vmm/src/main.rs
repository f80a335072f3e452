//! `tartarus-vmm`: one microVM monitor process per sandbox.

use std::process::ExitCode;

fn usage() -> ExitCode {
    eprintln!("usage: tartarus-vmm --version | probe");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--version") => {
            println!("tartarus-vmm {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Some("probe") => {
            let probe = tartarus_vmm::probe::probe_kvm();
            match serde_json::to_string(&probe) {
                Ok(json) => {
                    println!("{json}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("tartarus-vmm: cannot encode probe: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        _ => usage(),
    }
}
