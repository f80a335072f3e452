//! The supervisor's own confinement: once the jail's child runs, the process that
//! waits for it and cleans up its cgroup keeps only the syscalls that takes
//! ([`tartarus_seccomp::builtin::supervisor`]), so a compromise of it gains little.

use tartarus_seccomp::{builtin, CompiledProfile};

use crate::Result;

/// Compiled before the child starts, so a profile that cannot compile stops the jail
/// before anything runs.
pub struct Lockdown(CompiledProfile);

impl Lockdown {
    pub fn prepare() -> Result<Self> {
        Ok(Self(builtin::supervisor().compile()?))
    }

    /// Installs the filter on the calling (single-threaded) supervisor.
    pub fn engage(&self) -> Result<()> {
        Ok(self.0.install()?)
    }
}
