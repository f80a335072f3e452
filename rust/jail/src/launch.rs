//! `tartarus-jail run`: puts the building blocks together.
//!
//! Three processes:
//! - the supervisor (this process, on the host): creates the cgroup, forks the jail's
//!   init into new namespaces, writes its id maps, moves it into the cgroup, reports
//!   events, and stays as its [`Supervisor`] (stop signals forwarded, the jail ended
//!   if the starter dies); when the jail ends it reports how and removes the cgroup;
//! - the jail's init (PID 1 inside): builds the filesystem, pivots into it, drops
//!   privileges, installs the seccomp profile, forks the program, forwards signals to
//!   it and reaps orphans; when the program exits, init exits and the kernel kills
//!   whatever is left in the PID namespace;
//! - the program (normally `tartarus-agent serve`).

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{sethostname, Pid};
use serde::Serialize;
use tartarus_seccomp::{builtin, CompiledProfile};

use crate::cgroup::{Cgroup, Hierarchies, Limits};
use crate::config::{JailConfig, SeccompChoice, Stdio, UserNamespace};
use crate::mounts;
use crate::namespaces::{self, Namespaces};
use crate::privileges;
use crate::spawn::{spawn_held, Hold, Never, Report};
use crate::supervisor::{self, Host, OnStop, Supervisor};
use crate::{Context, JailError, Result};

/// A line on the events channel (JSON, one per line).
#[derive(Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event<'a> {
    /// The program is running inside the jail.
    Started {
        /// Host pid of the jail's init: SIGKILL it to tear the jail down at once.
        pid: i32,
        /// Host pid of the supervisor (this process), which a host that restarted finds
        /// its jail by (with `outlive_host` it is not the process the host started).
        supervisor: i32,
        cgroup: Option<&'a Cgroup>,
        user_namespace: bool,
    },
    /// The jail is gone and its cgroup removed.
    Exited {
        /// The program's exit code, or 128 + signal if a signal ended it.
        code: i32,
        /// OOM kills inside the jail over its lifetime.
        oom_kills: u64,
    },
}

/// Runs the jail to completion. `events` receives the `Started` and `Exited` lines.
/// Returns the exit code for the supervisor (the program's).
///
/// With `outlive_host`, the process the host started returns 0 at once and the
/// supervisor goes on in a fork of it, in a session of its own: not the host's child,
/// so nothing the host's end does (its exit, a runtime killing the children it
/// started) reaches the jail. Its events still go to the same descriptor.
pub fn run(config: &JailConfig, events: &mut dyn FnMut(&Event)) -> Result<i32> {
    if config.outlive_host {
        // SAFETY: tartarus-jail is single-threaded until here (nothing spawned yet).
        match unsafe { nix::unistd::fork() }.context(|| "fork".into())? {
            nix::unistd::ForkResult::Parent { .. } => return Ok(0),
            nix::unistd::ForkResult::Child => {
                nix::unistd::setsid().context(|| "setsid".into())?;
            }
        }
    }
    // First, so the parent it remembers is the one that started this process.
    let supervisor = Supervisor::prepare()?;
    config.validate()?;
    let seccomp = match &config.seccomp {
        SeccompChoice::Default => Some(builtin::jail_default().compile()?),
        SeccompChoice::Profile(p) => Some(p.compile()?),
        SeccompChoice::None => None,
    };
    let keep = privileges::parse_capabilities(&config.capabilities)?;
    // SAFETY: geteuid/getegid cannot fail.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let user_ns = match config.user_namespace {
        UserNamespace::Auto => euid != 0,
        UserNamespace::Always => true,
        UserNamespace::Never => false,
    };
    let cgroup = match &config.cgroup {
        Some(cg) => {
            let limits = Limits {
                memory_bytes: cg.memory_bytes,
                pids: cg.pids,
                cpu_quota_us: cg.cpu_quota_us,
                cpu_period_us: cg.cpu_period_us,
                hugetlb_2mb_bytes: None,
            };
            Some(Cgroup::create(
                &Hierarchies::detect()?,
                &cg.parent,
                &cg.name,
                &limits,
            )?)
        }
        None => None,
    };
    let result = supervise(
        &supervisor,
        config,
        cgroup.as_ref(),
        seccomp.as_ref(),
        &keep,
        user_ns.then_some((euid, egid)),
        events,
    );
    if let Some(cg) = &cgroup {
        cg.kill_all(Duration::from_secs(5));
        cg.remove(Duration::from_secs(5))?;
    }
    let (code, oom_kills) = result?;
    events(&Event::Exited { code, oom_kills });
    Ok(code)
}

fn supervise(
    supervisor: &Supervisor,
    config: &JailConfig,
    cgroup: Option<&Cgroup>,
    seccomp: Option<&CompiledProfile>,
    keep: &caps::CapsHashSet,
    id_map: Option<(u32, u32)>,
    events: &mut dyn FnMut(&Event),
) -> Result<(i32, u64)> {
    let user_ns = id_map.is_some();
    let stdio_file = match &config.stdio {
        Stdio::File(path) => Some(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .context(|| format!("opening {}", path.display()))?,
        ),
        _ => None,
    };
    let mut namespaces = Namespaces::all(user_ns);
    if let Some(path) = &config.network_namespace {
        // The supervisor joins it, so the jail's init is born there: a child in a new
        // user namespace could no longer join a namespace the host's user namespace owns.
        namespaces::join_network(path)?;
        namespaces.net = false;
    }
    let hold = Hold {
        namespaces,
        cgroup,
        id_map,
    };
    // SAFETY: tartarus-jail is single-threaded.
    let child = unsafe {
        spawn_held(hold, |report| {
            init_steps(config, seccomp, keep, user_ns, report, stdio_file)
        })
    }
    .map_err(|e| match e {
        JailError::Config(failure) => {
            JailError::Config(format!("jail {} failed to start: {failure}", config.id))
        }
        other => other,
    })?;
    let host = if config.outlive_host {
        Host::MayRestart
    } else {
        Host::Needed
    };
    supervisor.watch(child, OnStop::Forward, host)?;
    events(&Event::Started {
        pid: child.as_raw(),
        supervisor: std::process::id() as i32,
        cgroup,
        user_namespace: user_ns,
    });
    let code = supervisor::wait_for(child)?.code();
    let oom_kills = cgroup.map_or(0, |cg| cg.stats().oom_kills);
    Ok((code, oom_kills))
}

/// The jail's init, released by the supervisor (in its cgroup and namespaces). Returns
/// only on failure (reported to the supervisor).
fn init_steps(
    config: &JailConfig,
    seccomp: Option<&CompiledProfile>,
    keep: &caps::CapsHashSet,
    user_ns: bool,
    report: &Report,
    stdio_file: Option<File>,
) -> Result<Never> {
    sethostname(&config.hostname).context(|| "sethostname".into())?;
    if config.network_namespace.is_none() {
        namespaces::loopback_up()?;
    }
    mounts::make_private()?;
    let (root, _) = mounts::prepare_root(&config.rootfs, &config.work_dir, config.scratch_mib)?;
    mounts::mount_system(&root, user_ns)?;
    for m in &config.mounts {
        mounts::bind_inside(&root, &m.source, &m.destination, m.readonly)?;
    }
    mounts::pivot_into(&root)?;
    nix::unistd::chdir(config.cwd.as_str()).context(|| format!("chdir {}", config.cwd))?;
    privileges::drop_privileges(&config.rlimits, keep, config.uid, config.gid)?;

    let argv = cstrings(config.argv.iter().map(String::as_str))?;
    let mut env_pairs: Vec<String> = config.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    if !config.env.contains_key("PATH") {
        env_pairs.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    }
    let env = cstrings(env_pairs.iter().map(String::as_str))?;
    let (stdin, out): (Option<File>, Option<File>) = match (&config.stdio, stdio_file) {
        (Stdio::Inherit, _) => (None, None),
        (Stdio::Null, _) => {
            let null = OpenOptions::new().read(true).write(true).open("/dev/null");
            let null = null.context(|| "opening /dev/null".into())?;
            let copy = null.try_clone().context(|| "dup".into())?;
            (Some(null), Some(copy))
        }
        (Stdio::File(_), file) => {
            let null = File::open("/dev/null").context(|| "opening /dev/null".into())?;
            (Some(null), file)
        }
    };
    if let Some(profile) = seccomp {
        profile.install()?;
    }
    supervisor::pass_stop_signals(OnStop::Forward)?;
    let err_fd = report.raw_fd();
    // SAFETY: init is single-threaded; the child only dup2s and execs (or reports).
    match unsafe { nix::unistd::fork() }.context(|| "fork".into())? {
        nix::unistd::ForkResult::Child => {
            let reason = exec_program(&argv, &env, stdin.as_ref(), out.as_ref());
            if let Some(fd) = err_fd {
                // SAFETY: the error pipe stays open in this child until it exits.
                let _ =
                    nix::unistd::write(unsafe { BorrowedFd::borrow_raw(fd) }, reason.as_bytes());
            }
            // SAFETY: a fork child leaves without running the parent's cleanup.
            unsafe { libc::_exit(127) };
        }
        nix::unistd::ForkResult::Parent { child } => {
            supervisor::set_child(child);
            // The program's copy of the pipe closes on exec: that is the supervisor's EOF.
            report.ready();
            reap_until(child)
        }
    }
}

fn cstrings<'a>(items: impl Iterator<Item = &'a str>) -> Result<Vec<CString>> {
    items
        .map(|s| CString::new(s).map_err(|_| JailError::Config(format!("NUL byte in {s:?}"))))
        .collect()
}

fn exec_program(
    argv: &[CString],
    env: &[CString],
    stdin: Option<&File>,
    out: Option<&File>,
) -> String {
    // SAFETY: dup2 onto the standard descriptors of this (single-threaded) child.
    unsafe {
        if let Some(f) = stdin {
            libc::dup2(f.as_raw_fd(), 0);
        }
        if let Some(f) = out {
            libc::dup2(f.as_raw_fd(), 1);
            libc::dup2(f.as_raw_fd(), 2);
        }
        libc::setsid();
    }
    let err = nix::unistd::execve(&argv[0], argv, env).unwrap_err();
    format!("exec {:?}: {err}", argv[0])
}

/// Reaps every child until `program` exits, then leaves with its status (the kernel
/// then kills the rest of the PID namespace).
fn reap_until(program: Pid) -> ! {
    loop {
        match waitpid(None::<Pid>, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == program => {
                // SAFETY: leaving init; nothing to flush.
                unsafe { libc::_exit(code) }
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == program => {
                // SAFETY: as above.
                unsafe { libc::_exit(128 + sig as i32) }
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            // SAFETY: as above.
            Err(_) => unsafe { libc::_exit(125) },
        }
    }
}
