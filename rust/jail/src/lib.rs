//! The Tartarus jail: runs a program (normally the agent) inside fresh user (when not
//! root), mount, pid, ipc, uts and network namespaces, on an overlay of the template
//! rootfs whose writable layer lives in a tmpfs that disappears with the jail, under
//! cgroup limits (v1, v2 or hybrid), rlimits, a reduced capability set,
//! `no_new_privs` and a seccomp profile (Typhon).
//!
//! The building blocks are public so other jails (the VMM's) can reuse them:
//! [`namespaces`], [`mounts`], [`cgroup`], [`privileges`]. [`launch`] puts them
//! together for `tartarus-jail run`; [`supervisor`] is the process on the host that waits
//! for a jail, ends it with its starter and confines itself.

pub mod cgroup;
pub mod config;
pub mod launch;
pub mod mounts;
pub mod namespaces;
pub mod privileges;
pub mod spawn;
pub mod supervisor;

pub use config::JailConfig;

/// A failed step, with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("{what}: {source}")]
    Os {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid jail configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Seccomp(#[from] tartarus_seccomp::SeccompError),
}

pub type Result<T> = std::result::Result<T, JailError>;

/// Adds "what was being done" to OS errors.
pub trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for std::result::Result<T, std::io::Error> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| JailError::Os {
            what: what(),
            source,
        })
    }
}

impl<T> Context<T> for std::result::Result<T, nix::Error> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|errno| JailError::Os {
            what: what(),
            source: std::io::Error::from(errno),
        })
    }
}
