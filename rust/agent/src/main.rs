//! `tartarus-agent`: the agent that runs inside every sandbox.
//!
//! It speaks the agent protocol (`tartarus-proto`, spec in docs/protocol.md) on a unix
//! socket, a vsock port or its stdio, runs processes, streams their output and serves
//! files. With `--init` it is the sandbox's PID 1: it mounts what a bare rootfs lacks,
//! reaps orphans and turns SIGTERM into a graceful shutdown.

mod cmdline;
mod conn;
mod fdio;
mod files;
mod init;
mod listen;
mod process;
mod reaper;
mod reply;
mod reseed;
mod ring;
mod scratch;
mod spawn;
mod stats;
mod user;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};

use crate::conn::Agent;
use crate::listen::Listen;
use crate::process::Registry;
use crate::reaper::Reaper;
use crate::ring::Ring;

/// The sandbox log keeps this much recent output of all processes.
const LOG_BYTES: usize = 16 << 20;
/// Grace period for processes when the agent gets SIGTERM.
const SIGTERM_GRACE_S: f64 = 5.0;

const USAGE: &str =
    "usage: tartarus-agent serve --listen unix:PATH|vsock:PORT|dial:PATH|stdio [--init]
                            [--kernel-cmdline FILE]
       tartarus-agent --version";

struct Options {
    listen: Listen,
    init: bool,
    /// Where `--init` reads the kernel command line (tests point it at a file).
    kernel_cmdline: PathBuf,
}

fn parse(args: &[String]) -> Result<Option<Options>, String> {
    match args.first().map(String::as_str) {
        Some("--version" | "-V") => {
            println!(
                "tartarus-agent {} (protocol {})",
                env!("CARGO_PKG_VERSION"),
                tartarus_proto::PROTOCOL_VERSION
            );
            Ok(None)
        }
        Some("--help" | "-h") => {
            println!("{USAGE}");
            Ok(None)
        }
        Some("serve") => {
            let mut listen = None;
            let mut init = false;
            let mut kernel_cmdline = PathBuf::from(cmdline::KERNEL_CMDLINE);
            let mut rest = args[1..].iter();
            while let Some(arg) = rest.next() {
                match arg.as_str() {
                    "--listen" => {
                        let spec = rest.next().ok_or("--listen needs a value")?;
                        listen = Some(spec.parse()?);
                    }
                    "--init" => init = true,
                    "--kernel-cmdline" => {
                        let path = rest.next().ok_or("--kernel-cmdline needs a value")?;
                        kernel_cmdline = PathBuf::from(path);
                    }
                    other => match other.strip_prefix("--listen=") {
                        Some(spec) => listen = Some(spec.parse()?),
                        None => return Err(format!("unknown option {other:?}")),
                    },
                }
            }
            let listen = listen.ok_or("serve needs --listen")?;
            Ok(Some(Options {
                listen,
                init,
                kernel_cmdline,
            }))
        }
        Some(other) => Err(format!("unknown command {other:?}")),
        None => Err("no command".into()),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = match parse(&args) {
        Ok(Some(options)) => options,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tartarus-agent: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if options.init {
        init::setup_filesystems(&options.kernel_cmdline);
    }
    if nix::unistd::getpid().as_raw() != 1 {
        // Orphans of our processes come back to us to be reaped, as they would to init.
        // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer flag and touches no memory.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tartarus-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(run(options));
    // Blocking file tasks may still be running; they are abandoned.
    runtime.shutdown_timeout(Duration::from_millis(100));
    code
}

async fn run(options: Options) -> ExitCode {
    let reaper = Arc::new(Reaper::default());
    // Handlers are installed before the first child exists, so no exit is missed.
    let (sigchld, mut sigterm, mut sigint) = match (
        signal(SignalKind::child()),
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(a), Ok(b), Ok(c)) => (a, b, c),
        _ => {
            eprintln!("tartarus-agent: cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    tokio::spawn({
        let reaper = reaper.clone();
        async move { reaper.run(sigchld).await }
    });
    let registry = Registry::new(reaper, Ring::new(LOG_BYTES), PathBuf::from("/etc"));
    let agent = Agent::new(registry);

    let server = tokio::spawn(listen::run(agent.clone(), options.listen));
    let mut shutdown = agent.shutdown.subscribe();
    let grace = tokio::select! {
        _ = sigterm.recv() => SIGTERM_GRACE_S,
        _ = sigint.recv() => SIGTERM_GRACE_S,
        requested = shutdown.wait_for(Option::is_some) => requested.ok().and_then(|g| *g).unwrap_or(0.0),
        result = server => {
            if let Ok(Err(e)) = result {
                eprintln!("tartarus-agent: {e}");
                return ExitCode::FAILURE;
            }
            // Only the stdio listener returns; it has asked for a shutdown.
            agent.shutdown.borrow().unwrap_or(0.0)
        }
    };
    agent.shutdown.send_replace(Some(grace));
    let ended = agent.terminate_all(grace).await;
    agent.finished.send_replace(Some(ended));
    // Lets the writer tasks flush the shutdown reply.
    tokio::time::sleep(Duration::from_millis(50)).await;
    if options.init {
        init::power_off();
    }
    ExitCode::SUCCESS
}
