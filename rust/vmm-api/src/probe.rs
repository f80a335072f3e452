//! KVM flavour probe: does this host's KVM run a full guest operating system?
//!
//! The answer is decided by running guest code, not by reading a module name. A tiny
//! 64-bit guest executes `int3` through its own IDT. Hardware virtualisation (VMX/SVM)
//! delivers the exception and the vCPU halts inside the handler. An emulated KVM (PVM
//! without a PVM-aware guest) cannot deliver it and ends the run in
//! `KVM_EXIT_INTERNAL_ERROR`. Operating systems need exceptions, so only the first
//! flavour boots Linux.

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_segment, kvm_userspace_memory_region, KVM_EXIT_INTERNAL_ERROR};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use serde::Serialize;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

/// Path of the KVM device node.
pub const KVM_DEVICE: &str = "/dev/kvm";

/// How long the probe guest may run before it is kicked out of `KVM_RUN`.
const PROBE_DEADLINE: Duration = Duration::from_secs(5);

const GUEST_MEM_SIZE: usize = 1 << 20;
const GDT_ADDR: u64 = 0x500;
const IDT_ADDR: u64 = 0x1000;
const PML4_ADDR: u64 = 0x9000;
const PDPT_ADDR: u64 = 0xa000;
const PD_ADDR: u64 = 0xb000;
/// Exception handlers: vector `v` starts at `HANDLERS_ADDR + v` and is a single `hlt`.
const HANDLERS_ADDR: u64 = 0x10000;
const INT3_CODE_ADDR: u64 = 0x20000;
const LOOP_CODE_ADDR: u64 = 0x21000;
const STACK_TOP: u64 = 0x80000;
/// Iterations of the `dec/jnz` loop used to estimate guest instruction cost.
const LOOP_ITERATIONS: u64 = 20_000;

const X86_INT3_VECTOR: u64 = 3;
const HLT: u8 = 0xf4;

/// What kind of virtualisation `/dev/kvm` offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KvmFlavour {
    /// Hardware-assisted (VMX/SVM): guest exceptions are delivered, Linux boots.
    Hardware,
    /// Emulated (e.g. PVM without a PVM-aware guest): exceptions are not delivered.
    Emulated,
    /// The probe ran but ended in a way neither flavour explains.
    Unknown,
    /// No usable KVM device.
    Unavailable,
}

/// The probe's findings, serialisable for `tartarus doctor --json`.
#[derive(Debug, Clone, Serialize)]
pub struct KvmProbe {
    pub device_present: bool,
    pub openable: bool,
    pub api_version: Option<i32>,
    pub flavour: KvmFlavour,
    /// Whether the probe guest's `int3` reached its handler; `None` if it never ran.
    pub exception_delivered: Option<bool>,
    /// Whether a full guest OS (Linux) can run: true only for hardware flavour.
    pub full_guests: bool,
    /// How the probe run ended, e.g. `hlt in vector 3 handler` or `internal error, suberror 1`.
    pub exit: String,
    /// Measured wall time per guest loop iteration (two instructions), in nanoseconds.
    pub loop_ns_per_iteration: Option<f64>,
    /// A sentence a human can act on.
    pub detail: String,
}

impl KvmProbe {
    fn unavailable(device_present: bool, openable: bool, detail: String) -> Self {
        KvmProbe {
            device_present,
            openable,
            api_version: None,
            flavour: KvmFlavour::Unavailable,
            exception_delivered: None,
            full_guests: false,
            exit: "not run".into(),
            loop_ns_per_iteration: None,
            detail,
        }
    }
}

/// Runs the probe against `/dev/kvm`. Never panics; every failure is a finding.
pub fn probe_kvm() -> KvmProbe {
    let present = std::path::Path::new(KVM_DEVICE).exists();
    if !present {
        return KvmProbe::unavailable(false, false, format!("{KVM_DEVICE} does not exist"));
    }
    let kvm = match Kvm::new() {
        Ok(kvm) => kvm,
        Err(e) => {
            return KvmProbe::unavailable(true, false, format!("cannot open {KVM_DEVICE}: {e}"))
        }
    };
    let api_version = kvm.get_api_version();
    let (tx, rx) = mpsc::channel();
    let worker = thread::Builder::new()
        .name("kvm-probe".into())
        .spawn(move || {
            let _ = tx.send(run_probe_guest(&kvm));
        });
    let worker = match worker {
        Ok(w) => w,
        Err(e) => return KvmProbe::unavailable(true, true, format!("cannot spawn probe: {e}")),
    };
    let outcome = match rx.recv_timeout(PROBE_DEADLINE) {
        Ok(outcome) => outcome,
        Err(_) => {
            // The guest did not halt in time: interrupt KVM_RUN with a signal.
            let _ = worker.kill(SIGRTMIN());
            rx.recv_timeout(Duration::from_secs(1))
                .unwrap_or(Err(format!(
                    "probe guest did not stop within {PROBE_DEADLINE:?}"
                )))
        }
    };
    let _ = worker.join();
    let mut probe = match outcome {
        Ok(run) => classify(run),
        Err(e) => KvmProbe::unavailable(true, true, format!("probe VM setup failed: {e}")),
    };
    probe.api_version = Some(api_version);
    probe
}

/// Raw observations from one probe run.
struct ProbeRun {
    int3_exit: String,
    delivered: bool,
    internal_error: bool,
    loop_ns: Option<f64>,
}

fn classify(run: ProbeRun) -> KvmProbe {
    let (flavour, detail) = if run.delivered {
        (
            KvmFlavour::Hardware,
            "hardware virtualisation: guest exceptions are delivered; full guests run".to_string(),
        )
    } else if run.internal_error {
        (
            KvmFlavour::Emulated,
            "emulated KVM: a guest int3 ends in KVM_EXIT_INTERNAL_ERROR, so Linux guests \
             hang at their first exception; only poll-mode probe guests run here"
                .to_string(),
        )
    } else {
        (
            KvmFlavour::Unknown,
            format!(
                "unexpected probe result ({}); treating full guests as unsupported",
                run.int3_exit
            ),
        )
    };
    KvmProbe {
        device_present: true,
        openable: true,
        api_version: None,
        flavour,
        exception_delivered: Some(run.delivered),
        full_guests: flavour == KvmFlavour::Hardware,
        exit: run.int3_exit,
        loop_ns_per_iteration: run.loop_ns,
        detail,
    }
}

extern "C" fn noop_signal_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn run_probe_guest(kvm: &Kvm) -> Result<ProbeRun, String> {
    // Kicks this thread out of KVM_RUN when the deadline passes (no SA_RESTART).
    register_signal_handler(SIGRTMIN(), noop_signal_handler)
        .map_err(|e| format!("signal handler: {e}"))?;
    let mem = build_guest_memory().map_err(|e| format!("guest memory: {e}"))?;
    let vm = kvm.create_vm().map_err(|e| format!("create VM: {e}"))?;
    let region = mem.iter().next().ok_or("guest memory has no region")?;
    let mem_region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: region.len(),
        userspace_addr: region.as_ptr() as u64,
    };
    // SAFETY: the region is a live mmap owned by `mem`, which outlives the VM and its vCPU
    // (both are dropped at the end of this function, before `mem`).
    unsafe { vm.set_user_memory_region(mem_region) }.map_err(|e| format!("memory region: {e}"))?;
    let mut vcpu = vm.create_vcpu(0).map_err(|e| format!("create vCPU: {e}"))?;
    enter_long_mode(&vcpu)?;

    let int3 = run_at(&mut vcpu, INT3_CODE_ADDR)?;
    let handler_hlt = HANDLERS_ADDR + X86_INT3_VECTOR + 1;
    let delivered = int3.halted_at == Some(handler_hlt);
    let internal_error = int3.internal_error.is_some();
    let int3_exit = match (&int3.internal_error, int3.halted_at) {
        (Some(sub), _) => format!("KVM_EXIT_INTERNAL_ERROR, suberror {sub}"),
        (None, Some(rip)) if rip == handler_hlt => "hlt in the int3 handler".into(),
        (None, Some(rip)) => format!("hlt at {rip:#x}, not in the int3 handler"),
        (None, None) => int3.other.clone().unwrap_or_else(|| "no exit".into()),
    };

    // Timing a plain loop tells the operator how slow guest code is here.
    enter_long_mode(&vcpu)?;
    let started = Instant::now();
    let looped = run_at(&mut vcpu, LOOP_CODE_ADDR)?;
    let elapsed = started.elapsed();
    let loop_ns = looped
        .halted_at
        .map(|_| elapsed.as_nanos() as f64 / LOOP_ITERATIONS as f64);
    Ok(ProbeRun {
        int3_exit,
        delivered,
        internal_error,
        loop_ns,
    })
}

struct RunResult {
    halted_at: Option<u64>,
    internal_error: Option<u32>,
    other: Option<String>,
}

fn run_at(vcpu: &mut VcpuFd, rip: u64) -> Result<RunResult, String> {
    let mut regs = vcpu.get_regs().map_err(|e| format!("get regs: {e}"))?;
    regs.rip = rip;
    regs.rflags = 0x2;
    regs.rsp = STACK_TOP;
    vcpu.set_regs(&regs).map_err(|e| format!("set regs: {e}"))?;
    let exit = vcpu.run();
    let mut result = RunResult {
        halted_at: None,
        internal_error: None,
        other: None,
    };
    match exit {
        Ok(VcpuExit::Hlt) => {
            let regs = vcpu.get_regs().map_err(|e| format!("get regs: {e}"))?;
            result.halted_at = Some(regs.rip);
        }
        Ok(VcpuExit::InternalError) => {
            let run = vcpu.get_kvm_run();
            debug_assert_eq!(run.exit_reason, KVM_EXIT_INTERNAL_ERROR);
            // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the active
            // member of the exit union; it is plain old data.
            let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
            result.internal_error = Some(suberror);
        }
        Ok(other) => result.other = Some(format!("unexpected exit {other:?}")),
        Err(e) => result.other = Some(format!("KVM_RUN failed: {e}")),
    }
    Ok(result)
}

/// Builds identity-mapped long-mode structures, an IDT whose handlers halt, and code.
fn build_guest_memory() -> Result<GuestMemoryMmap, String> {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), GUEST_MEM_SIZE)])
        .map_err(|e| e.to_string())?;
    let w64 = |addr: u64, val: u64| {
        mem.write_obj(val, GuestAddress(addr))
            .map_err(|e| e.to_string())
    };
    // GDT: null, 64-bit code (selector 8), data (selector 16).
    w64(GDT_ADDR, 0)?;
    w64(GDT_ADDR + 8, 0x00af_9b00_0000_ffff)?;
    w64(GDT_ADDR + 16, 0x00cf_9300_0000_ffff)?;
    // Page tables: one 2 MiB identity page covers all guest memory.
    w64(PML4_ADDR, PDPT_ADDR | 0x3)?;
    w64(PDPT_ADDR, PD_ADDR | 0x3)?;
    w64(PD_ADDR, 0x83)?;
    for vector in 0..256u64 {
        mem.write_slice(
            &idt_gate(HANDLERS_ADDR + vector),
            GuestAddress(IDT_ADDR + vector * 16),
        )
        .map_err(|e| e.to_string())?;
        mem.write_obj(HLT, GuestAddress(HANDLERS_ADDR + vector))
            .map_err(|e| e.to_string())?;
    }
    // int3; hlt
    mem.write_slice(&[0xcc, HLT], GuestAddress(INT3_CODE_ADDR))
        .map_err(|e| e.to_string())?;
    // mov rcx, imm64; 1: dec rcx; jnz 1b; hlt
    let mut code = vec![0x48, 0xb9];
    code.extend_from_slice(&LOOP_ITERATIONS.to_le_bytes());
    code.extend_from_slice(&[0x48, 0xff, 0xc9, 0x75, 0xfb, HLT]);
    mem.write_slice(&code, GuestAddress(LOOP_CODE_ADDR))
        .map_err(|e| e.to_string())?;
    Ok(mem)
}

/// A 64-bit interrupt gate (present, DPL 0) to `handler` in code segment 8.
fn idt_gate(handler: u64) -> [u8; 16] {
    let mut gate = [0u8; 16];
    gate[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
    gate[2..4].copy_from_slice(&8u16.to_le_bytes());
    gate[5] = 0x8e;
    gate[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
    gate[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
    gate
}

fn enter_long_mode(vcpu: &VcpuFd) -> Result<(), String> {
    let mut sregs = vcpu.get_sregs().map_err(|e| format!("get sregs: {e}"))?;
    let segment = |selector: u16, type_: u8, l: u8, db: u8| kvm_segment {
        base: 0,
        limit: 0xfffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.cs = segment(8, 0xb, 1, 0);
    let data = segment(16, 0x3, 0, 1);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = 23;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 256 * 16 - 1;
    // PE | MP | ET | NE | PG; PAE; LME | LMA.
    sregs.cr0 = 0x8000_0033;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = 0x20;
    sregs.efer = 0x500;
    vcpu.set_sregs(&sregs)
        .map_err(|e| format!("set sregs: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idt_gate_encodes_handler_address_and_selector() {
        let gate = idt_gate(0x1234_5678_9abc_def0);
        assert_eq!(u16::from_le_bytes([gate[0], gate[1]]), 0xdef0);
        assert_eq!(u16::from_le_bytes([gate[2], gate[3]]), 8);
        assert_eq!(gate[5], 0x8e);
        assert_eq!(u16::from_le_bytes([gate[6], gate[7]]), 0x9abc);
        assert_eq!(
            u32::from_le_bytes([gate[8], gate[9], gate[10], gate[11]]),
            0x1234_5678
        );
    }

    #[test]
    fn guest_memory_holds_handlers_and_code() {
        let mem = build_guest_memory().unwrap();
        let hlt: u8 = mem.read_obj(GuestAddress(HANDLERS_ADDR + 3)).unwrap();
        assert_eq!(hlt, HLT);
        let int3: u8 = mem.read_obj(GuestAddress(INT3_CODE_ADDR)).unwrap();
        assert_eq!(int3, 0xcc);
    }

    #[test]
    fn probe_never_panics_and_is_consistent() {
        let probe = probe_kvm();
        assert_eq!(probe.full_guests, probe.flavour == KvmFlavour::Hardware);
        if !probe.device_present {
            assert_eq!(probe.flavour, KvmFlavour::Unavailable);
        }
    }
}
