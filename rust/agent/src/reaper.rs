//! Reaps every child: our own processes (whose exit statuses go to whoever spawned
//! them) and orphans re-parented to the agent when it is PID 1 or a subreaper.
//!
//! Spawning and reaping share one lock, so a child that exits at once is never reaped
//! before its waiter is registered (and std's own `waitpid` after a failed exec never
//! races with ours).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::Signal;
use tokio::sync::oneshot;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Code(i32),
    Signal(i32),
}

#[derive(Default)]
pub struct Reaper {
    waiters: Mutex<HashMap<i32, oneshot::Sender<Ended>>>,
}

pub struct SpawnGuard<'a> {
    waiters: MutexGuard<'a, HashMap<i32, oneshot::Sender<Ended>>>,
}

impl SpawnGuard<'_> {
    /// Registers interest in `pid`'s exit status.
    pub fn watch(&mut self, pid: u32) -> oneshot::Receiver<Ended> {
        let (tx, rx) = oneshot::channel();
        self.waiters.insert(pid as i32, tx);
        rx
    }
}

impl Reaper {
    /// Hold this while spawning a child and registering it with [`SpawnGuard::watch`].
    pub fn lock(&self) -> SpawnGuard<'_> {
        SpawnGuard {
            waiters: self.waiters.lock().unwrap_or_else(|p| p.into_inner()),
        }
    }

    /// Collects every exited child; returns how many were reaped.
    pub fn reap_all(&self) -> usize {
        let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        let mut reaped = 0;
        loop {
            let ended = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, Ended::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, Ended::Signal(sig as i32)),
                Ok(WaitStatus::StillAlive) | Err(_) => return reaped,
                Ok(_) => continue,
            };
            reaped += 1;
            if let Some(tx) = waiters.remove(&ended.0.as_raw()) {
                let _ = tx.send(ended.1);
            }
        }
    }

    /// Reaps on every SIGCHLD, forever.
    pub async fn run(&self, mut sigchld: Signal) {
        loop {
            self.reap_all();
            sigchld.recv().await;
        }
    }
}
