//! Typhon: seccomp profiles for Tartarus.
//!
//! A [`Profile`] (default action, allowed and denied syscalls, argument conditions) is
//! compiled to BPF with rust-vmm's `seccompiler` and installed with `no_new_privs`.
//! [`builtin::jail_default`] is the jail's profile; [`learn`] builds profiles from real
//! `strace -f` output.

pub mod builtin;
pub mod learn;
pub mod profile;

pub use profile::{
    Action, ArgCondition, ArgWidth, CmpOp, CompiledProfile, DenyRule, Profile, SyscallRule,
};

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot parse seccomp profile: {0}")]
    Parse(String),
    #[error("cannot compile seccomp profile: {0}")]
    Compile(String),
    #[error(
        "seccomp profile {profile:?} names syscalls that {arch} does not have: {names:?} \
         (fix the names or set \"skip_unknown\": true)"
    )]
    UnknownSyscalls {
        profile: String,
        arch: &'static str,
        names: Vec<String>,
    },
    #[error("cannot install seccomp filter: {0}")]
    Install(String),
}

/// Sets `no_new_privs` on the calling thread: exec can no longer gain privileges
/// (setuid bits, file capabilities). Required before an unprivileged seccomp install.
pub fn set_no_new_privs() -> std::io::Result<()> {
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) takes no pointers.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl CompiledProfile {
    /// Installs every filter on the calling thread (and the children and programs it
    /// starts), after setting `no_new_privs`. It allocates only to report a failure, so
    /// it may run between fork and exec.
    pub fn install(&self) -> Result<(), SeccompError> {
        set_no_new_privs().map_err(|e| SeccompError::Install(format!("no_new_privs: {e}")))?;
        for filter in &self.filters {
            seccompiler::apply_filter(filter).map_err(|e| SeccompError::Install(e.to_string()))?;
        }
        Ok(())
    }
}
