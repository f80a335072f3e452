//! `tartarus-vmm`: one microVM monitor process per sandbox.
//!
//! ```text
//! tartarus-vmm --version
//! tartarus-vmm probe                          KVM flavour probe (JSON), for the doctor
//! tartarus-vmm run --config FILE [--no-seccomp]
//!     boot the machine in FILE, wait for the guest to exit, print {"exit", "metrics"}
//! tartarus-vmm serve --api-sock PATH [--config FILE] [--no-seccomp]
//!     serve the control API on PATH (and boot FILE right away if given)
//! tartarus-vmm seccomp-selftest api|vcpu
//!     install that thread's filter, then make a call it forbids: the process must die
//! tartarus-vmm inspect-snapshot FILE [--verify]
//!     check a snapshot (its memory too with --verify) and print what it holds (JSON)
//! ```
//! Exit status: 0 when the guest reset, shut down or halted (or `stop` was asked),
//! 1 for any other guest exit, 2 for usage errors, 3 when the VMM could not start.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tartarus_vmm::api::{self, Handler, Request};
use tartarus_vmm::config::MachineConfig;
use tartarus_vmm::control::VmExit;
use tartarus_vmm::metrics::mark_process_start;
use tartarus_vmm::seccomp::{self, ThreadKind};
use tartarus_vmm::vmm::Vmm;

const USAGE: &str = "usage: tartarus-vmm --version | probe | \
run --config FILE [--no-seccomp] | \
serve --api-sock PATH [--config FILE] [--no-seccomp] | \
inspect-snapshot FILE [--verify]";

#[derive(Default)]
struct Args {
    api_sock: Option<PathBuf>,
    config: Option<PathBuf>,
    seccomp: bool,
}

fn parse_args(rest: &[String]) -> Result<Args, String> {
    let mut args = Args {
        seccomp: true,
        ..Args::default()
    };
    let mut it = rest.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .map(PathBuf::from)
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--api-sock" => args.api_sock = Some(value()?),
            "--config" => args.config = Some(value()?),
            "--no-seccomp" => args.seccomp = false,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(args)
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("tartarus-vmm: {message}");
    ExitCode::from(3)
}

fn read_json<T: serde::de::DeserializeOwned>(path: &PathBuf) -> Result<T, String> {
    let text = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_slice(&text).map_err(|e| format!("{} is not valid: {e}", path.display()))
}

fn exit_code(exit: Option<&VmExit>) -> ExitCode {
    match exit {
        Some(VmExit::Reset | VmExit::Shutdown { .. } | VmExit::Halt { .. } | VmExit::Stopped) => {
            ExitCode::SUCCESS
        }
        _ => ExitCode::FAILURE,
    }
}

/// Opens KVM, enters the jail, installs the API thread's filter, returns the service.
fn prepare(args: &Args) -> Result<Vmm, String> {
    let kvm = kvm_ioctls::Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    let vcpu_filter = if args.seccomp {
        let filters = seccomp::filters().map_err(|e| e.to_string())?;
        seccomp::install(&filters, ThreadKind::Api).map_err(|e| e.to_string())?;
        Some(Arc::new(filters.vcpu))
    } else {
        None
    };
    Ok(Vmm::new(kvm, vcpu_filter))
}

fn configure_and_start(vmm: &mut Vmm, path: &PathBuf) -> Result<(), String> {
    let machine: MachineConfig = read_json(path)?;
    vmm.handle(Request::Configure { machine })
        .and_then(|_| vmm.handle(Request::Start {}))
        .map(|_| ())
        .map_err(|e| e.message)
}

fn run(args: &Args) -> ExitCode {
    let Some(config) = &args.config else {
        return fail("run needs --config FILE");
    };
    let mut vmm = match prepare(args) {
        Ok(v) => v,
        Err(e) => return fail(e),
    };
    if let Err(e) = configure_and_start(&mut vmm, config) {
        return fail(e);
    }
    while vmm.wait(Duration::from_secs(3600)).is_none() {}
    let report = vmm.report();
    let metrics = vmm.handle(Request::Metrics {}).unwrap_or_default();
    vmm.shutdown();
    println!("{}", json!({"exit": report.exit, "metrics": metrics}));
    exit_code(report.exit.as_ref())
}

fn serve(args: &Args) -> ExitCode {
    let Some(sock) = &args.api_sock else {
        return fail("serve needs --api-sock PATH");
    };
    // Bound before the jail: the socket lives outside it, where the host can reach it.
    let listener = match api::bind(sock) {
        Ok(l) => l,
        Err(e) => return fail(format!("cannot listen on {}: {e}", sock.display())),
    };
    let mut vmm = match prepare(args) {
        Ok(v) => v,
        Err(e) => return fail(e),
    };
    if let Some(config) = &args.config {
        if let Err(e) = configure_and_start(&mut vmm, config) {
            return fail(e);
        }
    }
    api::serve(&listener, &mut vmm);
    ExitCode::SUCCESS
}

/// Proves the filters bite: installs them as the VMM does, shows an allowed call works,
/// then makes a call the thread may not make (`getppid` on the API thread, `openat` on
/// a vCPU thread, which the API thread may make). Reaching the end is a failure.
fn seccomp_selftest(kind: Option<&str>) -> ExitCode {
    let filters = match seccomp::filters() {
        Ok(f) => f,
        Err(e) => return fail(e),
    };
    if let Err(e) = seccomp::install(&filters, ThreadKind::Api) {
        return fail(e);
    }
    println!("api filter installed");
    match kind {
        Some("api") => {
            // SAFETY: getppid has no arguments and no side effects.
            unsafe { libc::getppid() };
        }
        Some("vcpu") => {
            let vcpu = Arc::new(filters.vcpu);
            let worker = std::thread::spawn(move || {
                if let Err(e) = seccompiler::apply_filter(&vcpu) {
                    eprintln!("tartarus-vmm: {e}");
                    return;
                }
                println!("vcpu filter installed");
                let _ = std::fs::File::open("/dev/null");
            });
            let _ = worker.join();
        }
        _ => {
            eprintln!("usage: tartarus-vmm seccomp-selftest api|vcpu");
            return ExitCode::from(2);
        }
    }
    println!("survived a forbidden system call");
    ExitCode::FAILURE
}

/// Exit status 0 and the summary, or 1 and why the snapshot is refused.
fn inspect_snapshot(rest: &[String]) -> ExitCode {
    let (path, verify) = match rest {
        [path] => (path, false),
        [path, flag] if flag == "--verify" => (path, true),
        _ => {
            eprintln!("usage: tartarus-vmm inspect-snapshot FILE [--verify]");
            return ExitCode::from(2);
        }
    };
    match tartarus_vmm::snapshot::inspect(std::path::Path::new(path), verify) {
        Ok(summary) => {
            println!("{}", json!(summary));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tartarus-vmm: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    mark_process_start();
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some(command) = argv.first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    if command == "seccomp-selftest" {
        return seccomp_selftest(argv.get(1).map(String::as_str));
    }
    if command == "inspect-snapshot" {
        return inspect_snapshot(&argv[1..]);
    }
    let args = match parse_args(&argv[1..]) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("tartarus-vmm: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match command.as_str() {
        "--version" => {
            println!("tartarus-vmm {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        "probe" => {
            println!("{}", json!(tartarus_vmm::probe::probe_kvm()));
            ExitCode::SUCCESS
        }
        "run" => run(&args),
        "serve" => serve(&args),
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}
