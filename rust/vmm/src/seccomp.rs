//! Per-thread seccomp filters (seccompiler): each thread of the VMM may make only the
//! system calls its work needs; anything else kills the whole process.
//!
//! The API thread installs its filter once the VMM is set up (KVM open, jail entered);
//! it still builds (or restores) the VM and writes snapshots, so it keeps memory
//! mapping, KVM ioctls, thread creation and file writes.
//! vCPU threads inherit that filter and add a much narrower one: `KVM_RUN` and a few
//! register reads, writes to the serial sink and eventfds, futexes, and exiting.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the {0:?} seccomp filter: {1}")]
    Build(ThreadKind, String),
    #[error("cannot install the {0:?} seccomp filter: {1}")]
    Install(ThreadKind, String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread: API socket, VM construction, thread management.
    Api,
    /// A vCPU thread.
    Vcpu,
}

/// Compiled filters, one per thread kind.
pub struct Filters {
    pub api: BpfProgram,
    pub vcpu: BpfProgram,
}

const KVMIO: u64 = 0xae;

const fn io(nr: u64) -> u64 {
    (KVMIO << 8) | nr
}

const fn ior(nr: u64, size: u64) -> u64 {
    (2 << 30) | (size << 16) | (KVMIO << 8) | nr
}

/// `KVM_RUN`, and the register and event reads used to report internal errors and
/// triple faults.
const KVM_RUN: u64 = io(0x80);
const KVM_GET_REGS: u64 = ior(0x81, std::mem::size_of::<kvm_bindings::kvm_regs>() as u64);
const KVM_GET_SREGS: u64 = ior(0x83, std::mem::size_of::<kvm_bindings::kvm_sregs>() as u64);
const KVM_GET_VCPU_EVENTS: u64 = ior(
    0x9f,
    std::mem::size_of::<kvm_bindings::kvm_vcpu_events>() as u64,
);

/// Calls every thread makes just to exist, wait and end (glibc and Rust's runtime).
const COMMON: &[i64] = &[
    libc::SYS_futex,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_munmap,
    libc::SYS_madvise,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_clock_gettime,
    libc::SYS_sched_yield,
    libc::SYS_getrusage,
    // Kicking vCPUs (pthread_kill) and writing output / raising interrupts (eventfd).
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
    libc::SYS_write,
    libc::SYS_writev,
];

/// A vCPU thread closes its own vCPU descriptor when it ends.
const VCPU_ONLY: &[i64] = &[libc::SYS_close];

/// The API thread builds VMs and starts threads, so it keeps a wider set.
const API_ONLY: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_read,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_openat,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_pread64,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_ioctl,
    libc::SYS_eventfd2,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
    // vCPU threads install their own filter on top of this one.
    libc::SYS_seccomp,
    libc::SYS_rt_sigaction,
    libc::SYS_sched_getaffinity,
    libc::SYS_getrandom,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_poll,
    libc::SYS_ppoll,
    // virtio device workers: disk I/O and Lethe scratch disks, vsock unix sockets.
    libc::SYS_pwrite64,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
    libc::SYS_ftruncate,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_shutdown,
    // Snapshots: written under a temporary name, synced, renamed into place.
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
];

/// A system call allowed only when its second argument (an ioctl request, an fcntl
/// command) is one of `values`.
struct ArgRule {
    syscall: i64,
    values: &'static [u64],
}

/// vCPU threads: KVM_RUN and register reads; `fcntl(F_GETFD)` is the validity check
/// Rust's debug builds make before closing a file descriptor.
const VCPU_ARG_RULES: &[ArgRule] = &[
    ArgRule {
        syscall: libc::SYS_ioctl,
        values: &[KVM_RUN, KVM_GET_REGS, KVM_GET_SREGS, KVM_GET_VCPU_EVENTS],
    },
    ArgRule {
        syscall: libc::SYS_fcntl,
        values: &[libc::F_GETFD as u64],
    },
];

fn rules(
    syscalls: &[&[i64]],
    arg_rules: &[ArgRule],
) -> Result<BTreeMap<i64, Vec<SeccompRule>>, String> {
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for &nr in syscalls.iter().flat_map(|s| s.iter()) {
        map.insert(nr, Vec::new());
    }
    for rule in arg_rules {
        let mut list = Vec::new();
        for &value in rule.values {
            let cond = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
                .map_err(|e| e.to_string())?;
            list.push(SeccompRule::new(vec![cond]).map_err(|e| e.to_string())?);
        }
        map.insert(rule.syscall, list);
    }
    Ok(map)
}

fn compile(
    kind: ThreadKind,
    map: BTreeMap<i64, Vec<SeccompRule>>,
) -> Result<BpfProgram, SeccompError> {
    let filter = SeccompFilter::new(
        map,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| SeccompError::Build(kind, e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| SeccompError::Build(kind, e.to_string()))
}

/// Builds every thread's filter.
pub fn filters() -> Result<Filters, SeccompError> {
    let api =
        rules(&[COMMON, API_ONLY], &[]).map_err(|e| SeccompError::Build(ThreadKind::Api, e))?;
    let vcpu = rules(&[COMMON, VCPU_ONLY], VCPU_ARG_RULES)
        .map_err(|e| SeccompError::Build(ThreadKind::Vcpu, e))?;
    Ok(Filters {
        api: compile(ThreadKind::Api, api)?,
        vcpu: compile(ThreadKind::Vcpu, vcpu)?,
    })
}

/// Installs `kind`'s filter on the calling thread (sets `no_new_privs` first).
pub fn install(filters: &Filters, kind: ThreadKind) -> Result<(), SeccompError> {
    let program = match kind {
        ThreadKind::Api => &filters.api,
        ThreadKind::Vcpu => &filters.vcpu,
    };
    seccompiler::apply_filter(program).map_err(|e| SeccompError::Install(kind, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS, 0x8138_ae83);
        assert_eq!(KVM_GET_VCPU_EVENTS, 0x8040_ae9f);
    }

    #[test]
    fn filters_compile() {
        let f = filters().unwrap();
        assert!(!f.api.is_empty());
        assert!(!f.vcpu.is_empty());
    }
}
