//! `tartarus-vmm`: one microVM monitor process per sandbox.
//!
//! ```text
//! tartarus-vmm --version
//! tartarus-vmm probe                          KVM flavour probe (JSON), for the doctor
//! tartarus-vmm run --config FILE [--jail FILE] [--no-seccomp]
//!     boot the machine in FILE, wait for the guest to exit, print {"exit", "metrics"}
//! tartarus-vmm serve --api-sock PATH [--config FILE] [--jail FILE] [--no-seccomp]
//!     serve the control API on PATH (and boot FILE right away if given)
//! tartarus-vmm seccomp-selftest api|vcpu [--jail FILE]
//!     install that thread's filter, then make a call it forbids: the process must die
//! tartarus-vmm inspect-snapshot FILE [--verify]
//!     check a snapshot (its memory too with --verify) and print what it holds (JSON)
//! ```
//! `--jail FILE` (JSON, see `jail::JailConfig`) runs the VMM in its own jail; the
//! machine's paths are then paths inside it. /dev/kvm, the API socket and the
//! `--config` file are opened before entering it.
//! Exit status: 0 when the guest reset, shut down or halted (or `stop` was asked),
//! 1 for any other guest exit, 2 for usage errors, 3 when the VMM could not start;
//! jailed, 128 + N when signal N killed the VMM.

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use kvm_ioctls::Kvm;
use serde_json::json;
use tartarus_vmm::api::{self, Handler};
use tartarus_vmm::control::VmExit;
use tartarus_vmm::jail::{self, JailConfig};
use tartarus_vmm::metrics::mark_process_start;
use tartarus_vmm::seccomp::{self, ThreadKind};
use tartarus_vmm::vmm::Vmm;
use tartarus_vmm_api::api::Request;
use tartarus_vmm_api::config::MachineConfig;

const USAGE: &str = "usage: tartarus-vmm --version | probe | \
run --config FILE [--jail FILE] [--no-seccomp] | \
serve --api-sock PATH [--config FILE] [--jail FILE] [--no-seccomp] | \
seccomp-selftest api|vcpu [--jail FILE] | \
inspect-snapshot FILE [--verify]";

const EXIT_GUEST_FAILED: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_START_FAILED: u8 = 3;

#[derive(Default)]
struct Args {
    api_sock: Option<PathBuf>,
    config: Option<PathBuf>,
    jail: Option<PathBuf>,
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
            "--jail" => args.jail = Some(value()?),
            "--no-seccomp" => args.seccomp = false,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(args)
}

fn fail(message: impl std::fmt::Display) -> u8 {
    eprintln!("tartarus-vmm: {message}");
    EXIT_START_FAILED
}

fn read_json<T: serde::de::DeserializeOwned>(path: &PathBuf) -> Result<T, String> {
    let text = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_slice(&text).map_err(|e| format!("{} is not valid: {e}", path.display()))
}

fn exit_code(exit: Option<&VmExit>) -> u8 {
    match exit {
        Some(VmExit::Reset | VmExit::Shutdown { .. } | VmExit::Halt { .. } | VmExit::Stopped) => 0,
        _ => EXIT_GUEST_FAILED,
    }
}

/// What is read from the host before the jail: KVM, the machine and jail configs.
struct Prepared {
    kvm: Kvm,
    machine: Option<MachineConfig>,
    jail: Option<(JailConfig, u64)>,
}

fn prepare(args: &Args) -> Result<Prepared, String> {
    let machine: Option<MachineConfig> = args.config.as_ref().map(read_json).transpose()?;
    let jail = match &args.jail {
        Some(path) => {
            let config: JailConfig = read_json(path)?;
            let guest_mib = config
                .validate(machine.as_ref().map(|m| m.memory_mib))
                .map_err(|e| format!("jail: {e}"))?;
            Some((config, guest_mib))
        }
        None => None,
    };
    let kvm = Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    Ok(Prepared { kvm, machine, jail })
}

/// Runs `vmm` in the jail if one is configured, else right here.
fn confined(jail: Option<&(JailConfig, u64)>, vmm: impl FnOnce() -> u8) -> u8 {
    match jail {
        Some((config, guest_mib)) => match jail::run_jailed(config, *guest_mib, vmm) {
            Ok(never) => match never {},
            Err(e) => fail(format!("jail: {e}")),
        },
        None => vmm(),
    }
}

/// Installs the API thread's filter and returns the service (inside the jail, if any).
fn service(kvm: Kvm, seccomp_on: bool, guest_limit_mib: Option<u64>) -> Result<Vmm, String> {
    let vcpu_filter = if seccomp_on {
        let filters = seccomp::filters().map_err(|e| e.to_string())?;
        seccomp::install(&filters, ThreadKind::Api).map_err(|e| e.to_string())?;
        Some(Arc::new(filters.vcpu))
    } else {
        None
    };
    let mut vmm = Vmm::new(kvm, vcpu_filter);
    if let Some(mib) = guest_limit_mib {
        vmm.limit_guest_memory(mib);
    }
    Ok(vmm)
}

fn configure_and_start(vmm: &mut Vmm, machine: MachineConfig) -> Result<(), String> {
    vmm.handle(Request::Configure { machine })
        .and_then(|_| vmm.handle(Request::Start {}))
        .map(|_| ())
        .map_err(|e| e.message)
}

fn run(args: &Args) -> u8 {
    if args.config.is_none() {
        return fail("run needs --config FILE");
    }
    let Prepared { kvm, machine, jail } = match prepare(args) {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    let Some(machine) = machine else {
        return fail("run needs --config FILE");
    };
    let limit = jail.as_ref().map(|j| j.1);
    confined(jail.as_ref(), move || {
        let mut vmm = match service(kvm, args.seccomp, limit) {
            Ok(v) => v,
            Err(e) => return fail(e),
        };
        if let Err(e) = configure_and_start(&mut vmm, machine) {
            return fail(e);
        }
        while vmm.wait(Duration::from_secs(3600)).is_none() {}
        let report = vmm.report();
        let metrics = vmm.handle(Request::Metrics {}).unwrap_or_default();
        vmm.shutdown();
        println!("{}", json!({"exit": report.exit, "metrics": metrics}));
        exit_code(report.exit.as_ref())
    })
}

fn serve(args: &Args) -> u8 {
    let Some(sock) = &args.api_sock else {
        return fail("serve needs --api-sock PATH");
    };
    let Prepared { kvm, machine, jail } = match prepare(args) {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    // Bound before the jail: the socket lives outside it, where the host can reach it.
    let listener: UnixListener = match api::bind(sock) {
        Ok(l) => l,
        Err(e) => return fail(format!("cannot listen on {}: {e}", sock.display())),
    };
    let limit = jail.as_ref().map(|j| j.1);
    confined(jail.as_ref(), move || {
        let mut vmm = match service(kvm, args.seccomp, limit) {
            Ok(v) => v,
            Err(e) => return fail(e),
        };
        if let Some(machine) = machine {
            if let Err(e) = configure_and_start(&mut vmm, machine) {
                return fail(e);
            }
        }
        api::serve(&listener, &mut vmm);
        0
    })
}

/// Proves the filters bite: installs them as the VMM does (in the jail with
/// `--jail`), shows an allowed call works, then makes a call the thread may not make
/// (`getppid` on the API thread, `openat` on a vCPU thread, which the API thread may
/// make). Reaching the end is a failure.
fn seccomp_selftest(rest: &[String]) -> u8 {
    let (kind, args) = match rest.split_first() {
        Some((kind, flags)) if kind == "api" || kind == "vcpu" => match parse_args(flags) {
            Ok(a) => (kind.clone(), a),
            Err(e) => return fail(e),
        },
        _ => {
            eprintln!("usage: tartarus-vmm seccomp-selftest api|vcpu [--jail FILE]");
            return EXIT_USAGE;
        }
    };
    let jail = match &args.jail {
        Some(path) => match read_json::<JailConfig>(path).and_then(|c| {
            c.validate(Some(1))
                .map(|mib| (c, mib))
                .map_err(|e| e.to_string())
        }) {
            Ok(j) => Some(j),
            Err(e) => return fail(format!("jail: {e}")),
        },
        None => None,
    };
    confined(jail.as_ref(), || selftest_body(&kind))
}

fn selftest_body(kind: &str) -> u8 {
    let filters = match seccomp::filters() {
        Ok(f) => f,
        Err(e) => return fail(e),
    };
    if let Err(e) = seccomp::install(&filters, ThreadKind::Api) {
        return fail(e);
    }
    println!("api filter installed");
    if kind == "api" {
        // SAFETY: getppid has no arguments and no side effects.
        unsafe { libc::getppid() };
    } else {
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
    println!("survived a forbidden system call");
    EXIT_GUEST_FAILED
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
    match tartarus_vmm_api::snapshot::inspect(std::path::Path::new(path), verify) {
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
        return ExitCode::from(EXIT_USAGE);
    };
    if command == "seccomp-selftest" {
        return ExitCode::from(seccomp_selftest(&argv[1..]));
    }
    if command == "inspect-snapshot" {
        return inspect_snapshot(&argv[1..]);
    }
    let args = match parse_args(&argv[1..]) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("tartarus-vmm: {e}\n{USAGE}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let code = match command.as_str() {
        "--version" => {
            println!("tartarus-vmm {}", env!("CARGO_PKG_VERSION"));
            0
        }
        "probe" => {
            println!("{}", json!(tartarus_vmm_api::probe::probe_kvm()));
            0
        }
        "run" => run(&args),
        "serve" => serve(&args),
        _ => {
            eprintln!("{USAGE}");
            EXIT_USAGE
        }
    };
    ExitCode::from(code)
}
