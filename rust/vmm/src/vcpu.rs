//! vCPU threads: run guest code, dispatch port and MMIO exits to the buses, and turn
//! every other way `KVM_RUN` can end into a `VmExit` (never a hang, never a panic).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::control::{Control, VmExit};
use crate::devices::DeviceManager;
use crate::metrics::Metrics;

/// A vCPU's descriptor, shared by its thread (which holds the lock while in
/// `KVM_RUN`) and the machine (which reads and writes state while the vCPU is parked).
pub type SharedVcpu = Arc<Mutex<VcpuFd>>;

pub fn lock_vcpu(fd: &SharedVcpu) -> MutexGuard<'_, VcpuFd> {
    fd.lock().unwrap_or_else(|p| p.into_inner())
}

/// Lets KVM finish the instruction whose port or MMIO access was just served (it
/// completes it on the next `KVM_RUN`), without running any further guest code, so
/// the registers a snapshot reads are those after the instruction.
fn complete_pending_io(fd: &mut VcpuFd) {
    fd.set_kvm_immediate_exit(1);
    let _ = fd.run();
    fd.set_kvm_immediate_exit(0);
}

/// Everything a vCPU thread needs.
pub struct Vcpu {
    pub id: u8,
    pub fd: SharedVcpu,
    pub devices: Arc<DeviceManager>,
    pub control: Arc<Control>,
    pub metrics: Arc<Metrics>,
}

/// What one `KVM_RUN` came back with, after its borrow of the run area ended.
enum Step {
    Continue,
    Exit(VmExit),
    InternalError,
    TripleFault,
}

impl Vcpu {
    /// Runs until the VM stops; records the exit reason in `control`.
    pub fn run(self) {
        self.control.register_current_thread();
        let shared = self.fd.clone();
        while self
            .control
            .checkpoint(&mut || complete_pending_io(&mut lock_vcpu(&shared)))
        {
            let mut fd = lock_vcpu(&self.fd);
            match self.run_once(&mut fd) {
                Step::Continue => {}
                Step::Exit(exit) => {
                    self.control.request_exit(exit);
                    break;
                }
                Step::TripleFault => {
                    let exit = VmExit::Shutdown {
                        detail: self.triple_fault(&fd),
                    };
                    self.control.request_exit(exit);
                    break;
                }
                Step::InternalError => {
                    let exit = self.internal_error(&mut fd);
                    self.control.request_exit(exit);
                    break;
                }
            }
        }
        self.control.unregister_current_thread();
    }

    fn run_once(&self, fd: &mut VcpuFd) -> Step {
        let id = self.id;
        let m = &self.metrics;
        let exit = fd.run();
        if exit.is_ok() {
            m.note_exit();
        }
        match exit {
            Ok(VcpuExit::IoIn(port, data)) => {
                m.exits.io_in.fetch_add(1, Ordering::Relaxed);
                self.devices.pio_read(port, data);
                Step::Continue
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                m.exits.io_out.fetch_add(1, Ordering::Relaxed);
                self.devices.pio_write(port, data);
                Step::Continue
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                m.exits.mmio_read.fetch_add(1, Ordering::Relaxed);
                self.devices.mmio_read(addr, data);
                Step::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                m.exits.mmio_write.fetch_add(1, Ordering::Relaxed);
                self.devices.mmio_write(addr, data);
                Step::Continue
            }
            Ok(VcpuExit::Hlt) => Step::Exit(VmExit::Halt { vcpu: id }),
            Ok(VcpuExit::Shutdown) => Step::TripleFault,
            Ok(VcpuExit::SystemEvent(kind, _)) => Step::Exit(match kind {
                KVM_SYSTEM_EVENT_RESET => VmExit::Reset,
                KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::Shutdown {
                    detail: "KVM system event: shutdown".into(),
                },
                KVM_SYSTEM_EVENT_CRASH => VmExit::Crash,
                other => VmExit::Unhandled {
                    vcpu: id,
                    exit: format!("system event {other}"),
                },
            }),
            Ok(VcpuExit::InternalError) => Step::InternalError,
            Ok(VcpuExit::FailEntry(reason, _cpu)) => Step::Exit(VmExit::FailEntry {
                vcpu: id,
                hardware_reason: reason,
            }),
            // An interrupt window or signal exit: just look at the control state again.
            Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) => Step::Continue,
            Ok(other) => Step::Exit(VmExit::Unhandled {
                vcpu: id,
                exit: format!("{other:?}"),
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                m.exits.interrupted.fetch_add(1, Ordering::Relaxed);
                Step::Continue
            }
            Err(e) => Step::Exit(VmExit::RunFailed {
                vcpu: id,
                errno: e.errno(),
                message: e.to_string(),
            }),
        }
    }

    /// Where the vCPU was when the guest triple-faulted: enough to tell early boot (real
    /// mode, paging off), the decompressor and the kernel proper apart, and which vCPU.
    fn triple_fault(&self, fd: &VcpuFd) -> String {
        let regs = fd.get_regs().ok();
        let sregs = fd.get_sregs().ok();
        let events = fd.get_vcpu_events().ok();
        let reg = |f: fn(&kvm_bindings::kvm_regs) -> u64| regs.as_ref().map_or(0, f);
        let sreg = |f: fn(&kvm_bindings::kvm_sregs) -> u64| sregs.as_ref().map_or(0, f);
        format!(
            "vcpu {} triple fault at rip {:#x} rsp {:#x} (cs {:#x}, cr0 {:#x}, cr2 {:#x}, \
             cr3 {:#x}, cr4 {:#x}, efer {:#x}; pending exception {})",
            self.id,
            reg(|r| r.rip),
            reg(|r| r.rsp),
            sreg(|s| u64::from(s.cs.selector)),
            sreg(|s| s.cr0),
            sreg(|s| s.cr2),
            sreg(|s| s.cr3),
            sreg(|s| s.cr4),
            sreg(|s| s.efer),
            events.map_or_else(
                || "unknown".to_string(),
                |e| if e.exception.injected != 0 || e.exception.pending != 0 {
                    format!(
                        "{} error code {:#x}",
                        e.exception.nr, e.exception.error_code
                    )
                } else {
                    "none".to_string()
                }
            ),
        )
    }

    /// Reads KVM's internal-error report: suberror, its data words, and where the guest was.
    fn internal_error(&self, fd: &mut VcpuFd) -> VmExit {
        let run = fd.get_kvm_run();
        // SAFETY: the last exit was KVM_EXIT_INTERNAL_ERROR, so `internal` is the active
        // member of the exit union; it is plain old data.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        let rip = fd.get_regs().ok().map(|r| r.rip);
        VmExit::InternalError {
            vcpu: self.id,
            suberror: internal.suberror,
            data: internal.data[..n].to_vec(),
            rip,
        }
    }
}
