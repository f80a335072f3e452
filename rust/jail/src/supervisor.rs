//! The supervisor: the process on the host that started a jail and waits for it. Both
//! jails use it (`tartarus-jail run` and the VMM's `--jail`):
//! - it passes the usual stop signals on to the jailed child, or turns them into a
//!   SIGKILL of the child (a PID 1 ignores signals it has no handler for);
//! - it ends the jail when whoever started the supervisor dies (`PR_SET_PDEATHSIG`),
//!   since nobody is left who can reach the sandbox, unless that host re-attaches to
//!   its jails when it restarts ([`Host::MayRestart`]); the supervisor still removes
//!   the cgroup and reports on its way out;
//! - once the child runs it keeps only the syscalls waiting and cleaning up take
//!   ([`tartarus_seccomp::builtin::supervisor`]), so a compromise of it gains little.
//!
//! The jail's init passes stop signals on to its program the same way
//! ([`pass_stop_signals`], [`set_child`]).

use std::sync::atomic::{AtomicI32, Ordering};

use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use tartarus_seccomp::{builtin, CompiledProfile};

use crate::{Context, Result};

/// Signals a supervisor is asked to stop with.
const STOP_SIGNALS: [Signal; 4] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
];

/// The kernel sends this when the thread that started the supervisor dies.
const PARENT_GONE: Signal = Signal::SIGUSR1;

/// The jailed child (set once it exists) and who started the supervisor. Statics
/// because signal handlers can reach nothing else.
static CHILD: AtomicI32 = AtomicI32::new(0);
static PARENT: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe and takes plain integers.
        unsafe { libc::kill(pid, sig) };
    }
}

extern "C" fn kill_child(_: libc::c_int) {
    forward(libc::SIGKILL);
}

/// What a stop signal sent to the supervisor does to the jailed child.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnStop {
    /// The child gets the same signal (the jail's init passes it on to the program).
    Forward,
    /// The child is killed at once.
    Kill,
}

/// What the jail does when whoever started the supervisor dies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Host {
    /// The jail ends with it.
    Needed,
    /// The jail runs on: a restarted host re-attaches to it, or reaps it.
    MayRestart,
}

/// Made before the child exists: it remembers who started the supervisor and compiles
/// the supervisor's profile, so a profile that cannot compile stops the jail before
/// anything runs.
pub struct Supervisor {
    lockdown: CompiledProfile,
}

impl Supervisor {
    pub fn prepare() -> Result<Self> {
        // SAFETY: getppid cannot fail.
        PARENT.store(unsafe { libc::getppid() }, Ordering::SeqCst);
        Ok(Self {
            lockdown: builtin::supervisor().compile()?,
        })
    }

    /// Takes charge of `child`: signal handlers, the parent-death signal, then the
    /// supervisor's own seccomp filter (the process must be single-threaded). If any
    /// step fails the child is killed, since it would be left unguarded.
    pub fn watch(&self, child: Pid, on_stop: OnStop, host: Host) -> Result<()> {
        set_child(child);
        let steps = || -> Result<()> {
            pass_stop_signals(on_stop)?;
            if host == Host::Needed {
                end_with_parent()?;
            }
            Ok(self.lockdown.install()?)
        };
        steps().inspect_err(|_| kill_child(0))
    }
}

/// The process stop signals go to from now on.
pub fn set_child(child: Pid) {
    CHILD.store(child.as_raw(), Ordering::SeqCst);
}

/// Installs the handlers that pass stop signals on to the child (none until
/// [`set_child`]).
pub fn pass_stop_signals(on_stop: OnStop) -> Result<()> {
    let handler = match on_stop {
        OnStop::Forward => forward as extern "C" fn(libc::c_int),
        OnStop::Kill => kill_child,
    };
    STOP_SIGNALS
        .into_iter()
        .try_for_each(|sig| install(sig, handler))
}

fn install(sig: Signal, handler: extern "C" fn(libc::c_int)) -> Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(handler),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    // SAFETY: every handler here only calls kill(2), which is async-signal-safe.
    unsafe { signal::sigaction(sig, &action) }.context(|| format!("sigaction {sig}"))?;
    Ok(())
}

fn end_with_parent() -> Result<()> {
    install(PARENT_GONE, kill_child)?;
    // SAFETY: prctl(PR_SET_PDEATHSIG, sig) takes no pointers.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, PARENT_GONE as libc::c_ulong) } != 0 {
        return Err(std::io::Error::last_os_error()).context(|| "PR_SET_PDEATHSIG".into());
    }
    // The parent may have died before the request above: then no signal comes.
    // SAFETY: getppid cannot fail.
    if unsafe { libc::getppid() } != PARENT.load(Ordering::SeqCst) {
        kill_child(0);
    }
    Ok(())
}

/// How the jailed child ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    Exited(i32),
    Killed(Signal),
}

impl Ended {
    /// The exit code, or 128 + the signal that ended it (as a shell reports it).
    pub fn code(self) -> i32 {
        match self {
            Ended::Exited(code) => code,
            Ended::Killed(sig) => 128 + sig as i32,
        }
    }
}

/// Waits until `child` ends.
pub fn wait_for(child: Pid) -> Result<Ended> {
    loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(Ended::Exited(code)),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(Ended::Killed(sig)),
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e).context(|| "waiting for the jail".into()),
        }
    }
}
