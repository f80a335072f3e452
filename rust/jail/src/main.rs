//! `tartarus-jail`: runs a program in a jail described by a JSON config; also prints
//! seccomp profiles and learns them from strace output.
//!
//! ```text
//! tartarus-jail run --config FILE|- [--events-fd N]
//! tartarus-jail profile                 # the jail's default seccomp profile (JSON)
//! tartarus-jail learn STRACE_LOG        # an allow-list profile from `strace -f -o LOG`
//! tartarus-jail --version
//! ```

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::process::ExitCode;

use tartarus_jail::launch::{self, Event};
use tartarus_jail::JailConfig;
use tartarus_seccomp::builtin::{jail_default, EPERM};
use tartarus_seccomp::learn::{parse_strace, profile_from_summary};
use tartarus_seccomp::Action;

const USAGE: &str = "usage: tartarus-jail run --config FILE|- [--events-fd N]
       tartarus-jail profile
       tartarus-jail learn STRACE_LOG
       tartarus-jail --version";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("run") => run(&args[1..]),
        Some("profile") => {
            println!("{}", jail_default().to_json());
            Ok(0)
        }
        Some("learn") if args.len() == 2 => learn(&args[1]),
        Some("--version") => {
            println!("tartarus-jail {}", env!("CARGO_PKG_VERSION"));
            Ok(0)
        }
        _ => Err(USAGE.to_string()),
    };
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(255)),
        Err(message) => {
            eprintln!("tartarus-jail: {message}");
            ExitCode::from(125)
        }
    }
}

fn run(args: &[String]) -> Result<i32, String> {
    let mut config_path = None;
    let mut events_fd = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--config" => config_path = it.next().cloned(),
            "--events-fd" => {
                let fd: i32 = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--events-fd needs a file descriptor number")?;
                // SAFETY: F_GETFD only inspects the descriptor table.
                if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                    return Err(format!("--events-fd {fd} is not an open file descriptor"));
                }
                events_fd = Some(fd);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    let path = config_path.ok_or(format!("--config is required\n{USAGE}"))?;
    let text = if path == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| format!("reading config from stdin: {e}"))?;
        s
    } else {
        std::fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?
    };
    let config = JailConfig::from_json(&text).map_err(|e| e.to_string())?;
    // SAFETY: the caller hands us this descriptor for our exclusive use.
    let mut sink = events_fd.map(|fd| unsafe { File::from_raw_fd(fd) });
    let mut emit = |event: &Event| {
        if let Some(out) = sink.as_mut() {
            let mut line = serde_json::to_vec(event).expect("events serialise");
            line.push(b'\n');
            // A vanished reader must not take the jail down with it.
            let _ = out.write_all(&line);
        }
    };
    launch::run(&config, &mut emit).map_err(|e| e.to_string())
}

fn learn(log: &str) -> Result<i32, String> {
    let text = std::fs::read_to_string(log).map_err(|e| format!("reading {log}: {e}"))?;
    let summary = parse_strace(&text);
    if summary.syscalls.is_empty() {
        return Err(format!(
            "{log} holds no syscalls: is it `strace -f -o` output?"
        ));
    }
    let (profile, unknown) = profile_from_summary("learned", &summary, Action::Errno(EPERM));
    if !unknown.is_empty() {
        eprintln!("tartarus-jail: skipped syscalls unknown on this architecture: {unknown:?}");
    }
    println!("{}", profile.to_json());
    Ok(0)
}
