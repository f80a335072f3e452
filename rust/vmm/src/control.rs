//! Run control shared by the vCPU threads and whoever drives the VM (API, watchdog):
//! run / pause / stop, the first exit reason, and kicking vCPUs out of `KVM_RUN`.
//!
//! A kick is a real-time signal with a no-op handler: `KVM_RUN` returns `EINTR` and the
//! vCPU thread looks at the target state. A signal that lands just before the thread
//! enters `KVM_RUN` is lost, so whoever waits for the vCPUs to park or stop re-kicks
//! every few milliseconds until they do.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

/// How often a waiting controller re-kicks vCPUs that have not reacted yet.
const REKICK_INTERVAL: Duration = Duration::from_millis(5);

/// Why the guest stopped running.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum VmExit {
    /// The guest asked for a CPU reset (i8042 or KVM reset event): how Linux reboots.
    Reset,
    /// The guest shut down (KVM shutdown event or a triple fault).
    Shutdown { detail: String },
    /// A vCPU executed `hlt` with nothing to wake it (only without an in-kernel LAPIC).
    Halt { vcpu: u8 },
    /// The VMM was told to stop the guest.
    Stopped,
    /// The wall-clock limit passed.
    WallClockLimit { limit_ms: u64 },
    /// KVM could not go on emulating the guest (e.g. an exception the emulator cannot
    /// deliver); `data` is KVM's diagnostic words.
    InternalError {
        vcpu: u8,
        suberror: u32,
        data: Vec<u64>,
        rip: Option<u64>,
    },
    /// Entering the guest failed in hardware.
    FailEntry { vcpu: u8, hardware_reason: u64 },
    /// KVM_RUN itself failed.
    RunFailed {
        vcpu: u8,
        errno: i32,
        message: String,
    },
    /// KVM returned an exit the VMM does not handle.
    Unhandled { vcpu: u8, exit: String },
    /// The guest crashed (KVM crash event, e.g. a guest panic notifier).
    Crash,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Run,
    Pause,
    Stop,
}

struct Inner {
    target: Target,
    parked: usize,
    /// vCPU threads that may be in KVM_RUN, by pthread id; a thread removes itself
    /// before it ends, so a kick never targets a finished thread.
    alive: Vec<libc::pthread_t>,
    exit: Option<VmExit>,
}

pub struct Control {
    inner: Mutex<Inner>,
    cond: Condvar,
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal that kicks vCPU threads.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

/// Installs the kick handler (process-wide, without SA_RESTART so KVM_RUN returns).
pub fn install_kick_handler() -> std::io::Result<()> {
    register_signal_handler(kick_signal(), noop_handler)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

impl Default for Control {
    fn default() -> Self {
        Control {
            inner: Mutex::new(Inner {
                target: Target::Run,
                parked: 0,
                alive: Vec::new(),
                exit: None,
            }),
            cond: Condvar::new(),
        }
    }
}

impl Control {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere must not take the controller down with it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn kick_all(inner: &Inner) {
        for &t in &inner.alive {
            // SAFETY: `t` is a live thread: threads leave `alive` (under this lock)
            // before they end, and we hold the lock.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    /// Called by a vCPU thread when it starts.
    pub fn register_current_thread(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.lock().alive.push(me);
    }

    /// Called by a vCPU thread just before it ends.
    pub fn unregister_current_thread(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        let mut inner = self.lock();
        // SAFETY: pthread_equal only compares the two ids.
        inner
            .alive
            .retain(|&t| unsafe { libc::pthread_equal(t, me) } == 0);
        self.cond.notify_all();
    }

    /// Where a vCPU thread waits while paused. Returns false when it must stop.
    /// `before_park` runs (without the lock) each time the thread is about to park, so
    /// that a parked vCPU has no half-finished work (a snapshot may read it).
    pub fn checkpoint(&self, before_park: &mut dyn FnMut()) -> bool {
        let mut inner = self.lock();
        let mut ready = false;
        loop {
            match inner.target {
                Target::Run => return true,
                Target::Stop => return false,
                Target::Pause if !ready => {
                    drop(inner);
                    before_park();
                    ready = true;
                    inner = self.lock();
                }
                Target::Pause => {
                    inner.parked += 1;
                    self.cond.notify_all();
                    inner = self.cond.wait(inner).unwrap_or_else(|p| p.into_inner());
                    inner.parked -= 1;
                }
            }
        }
    }

    /// Makes vCPU threads park as soon as they start (a restored machine waiting for
    /// `resume`). Call before the threads are started.
    pub fn hold(&self) {
        let mut inner = self.lock();
        if inner.target == Target::Run {
            inner.target = Target::Pause;
        }
    }

    /// Records why the guest stopped (the first reason wins) and stops every vCPU.
    pub fn request_exit(&self, exit: VmExit) {
        let mut inner = self.lock();
        if inner.exit.is_none() {
            inner.exit = Some(exit);
        }
        inner.target = Target::Stop;
        Self::kick_all(&inner);
        self.cond.notify_all();
    }

    pub fn exit(&self) -> Option<VmExit> {
        self.lock().exit.clone()
    }

    pub fn target(&self) -> Target {
        self.lock().target
    }

    pub fn running_vcpus(&self) -> usize {
        self.lock().alive.len()
    }

    /// Pauses every vCPU; returns once all of them are parked (or gone).
    pub fn pause(&self) {
        let mut inner = self.lock();
        if inner.target == Target::Stop {
            return;
        }
        inner.target = Target::Pause;
        while inner.target == Target::Pause && inner.parked < inner.alive.len() {
            Self::kick_all(&inner);
            inner = self
                .cond
                .wait_timeout(inner, REKICK_INTERVAL)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    pub fn resume(&self) {
        let mut inner = self.lock();
        if inner.target == Target::Pause {
            inner.target = Target::Run;
            self.cond.notify_all();
        }
    }

    /// Waits until every vCPU thread has ended, re-kicking them while the target is Stop.
    /// Returns false if `timeout` passed first.
    pub fn wait_stopped(&self, timeout: Option<Duration>) -> bool {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut inner = self.lock();
        while !inner.alive.is_empty() || inner.exit.is_none() {
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return false;
            }
            if inner.target == Target::Stop {
                Self::kick_all(&inner);
            }
            let wait = deadline.map_or(REKICK_INTERVAL, |d| (d - now).min(REKICK_INTERVAL));
            inner = self
                .cond
                .wait_timeout(inner, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// Waits for an exit reason or until `deadline`; returns the exit if there is one.
    pub fn wait_exit_until(&self, deadline: Instant) -> Option<VmExit> {
        let mut inner = self.lock();
        loop {
            if inner.exit.is_some() {
                return inner.exit.clone();
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            inner = self
                .cond
                .wait_timeout(inner, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn first_exit_reason_wins() {
        let c = Control::default();
        c.request_exit(VmExit::Reset);
        c.request_exit(VmExit::Stopped);
        assert_eq!(c.exit(), Some(VmExit::Reset));
        assert_eq!(c.target(), Target::Stop);
        assert!(c.wait_stopped(Some(Duration::from_millis(10))));
    }

    #[test]
    fn pause_waits_for_threads_to_park_and_resume_releases_them() {
        install_kick_handler().unwrap();
        let c = Arc::new(Control::default());
        let worker = {
            let c = c.clone();
            std::thread::spawn(move || {
                c.register_current_thread();
                let mut rounds = 0u64;
                let mut flushes = 0;
                while c.checkpoint(&mut || flushes += 1) {
                    rounds += 1;
                    std::thread::sleep(Duration::from_millis(1));
                }
                c.unregister_current_thread();
                assert!(flushes >= 1, "the thread got ready before it parked");
                rounds
            })
        };
        while c.running_vcpus() == 0 {
            std::thread::yield_now();
        }
        c.pause();
        assert_eq!(c.lock().parked, 1);
        c.resume();
        c.request_exit(VmExit::Stopped);
        assert!(c.wait_stopped(Some(Duration::from_secs(5))));
        assert!(worker.join().unwrap() > 0);
    }

    #[test]
    fn exit_serialises_with_a_reason_tag() {
        let v = serde_json::to_value(VmExit::InternalError {
            vcpu: 0,
            suberror: 1,
            data: vec![2],
            rip: None,
        })
        .unwrap();
        assert_eq!(v["reason"], "internal_error");
        assert_eq!(v["suberror"], 1);
    }
}
