//! Saving and restoring what KVM holds for a VM and its vCPUs: registers, FPU/XSAVE,
//! MSRs, the local APIC, pending events, the interrupt controllers, the PIT and the
//! KVM clock. vCPUs must be paused (out of `KVM_RUN`, pending I/O completed) while
//! their state is read.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum KvmStateError {
    #[error("KVM {what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

fn kvm_fail(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmStateError {
    move |source| KvmStateError::Kvm { what, source }
}

/// One vCPU as KVM sees it.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub msrs: Vec<kvm_msr_entry>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    pub tsc_khz: Option<u32>,
}

/// The VM-wide devices KVM emulates, and its clock.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
}

/// Most MSRs read or written in one ioctl.
const MSR_BATCH: usize = 64;

/// The MSRs worth saving: every one KVM lists, minus those this vCPU cannot read.
pub fn msr_indices(kvm: &Kvm) -> Result<Vec<u32>, KvmStateError> {
    Ok(kvm
        .get_msr_index_list()
        .map_err(kvm_fail("get MSR index list"))?
        .as_slice()
        .to_vec())
}

fn msrs_of(entries: &[kvm_msr_entry]) -> Result<Msrs, KvmStateError> {
    Msrs::from_entries(entries).map_err(|e| KvmStateError::Invalid(format!("MSR list: {e:?}")))
}

/// Reads every MSR in `indices` that the vCPU has. `KVM_GET_MSRS` stops at the first
/// MSR it cannot read; that one is skipped and the rest are read again.
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, KvmStateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(MSR_BATCH)];
        let wanted: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = msrs_of(&wanted)?;
        let read = fd.get_msrs(&mut msrs).map_err(kvm_fail("get MSRs"))?;
        out.extend_from_slice(&msrs.as_slice()[..read.min(batch.len())]);
        // Skip the one KVM refused (if any) and go on after it.
        let consumed = if read < batch.len() { read + 1 } else { read };
        rest = &rest[consumed..];
    }
    Ok(out)
}

impl VcpuState {
    pub fn save(fd: &VcpuFd, msr_indices: &[u32]) -> Result<Self, KvmStateError> {
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_fail("get CPUID"))?
            .as_slice()
            .to_vec();
        Ok(VcpuState {
            cpuid,
            msrs: read_msrs(fd, msr_indices)?,
            regs: fd.get_regs().map_err(kvm_fail("get registers"))?,
            sregs: fd.get_sregs().map_err(kvm_fail("get special registers"))?,
            xsave: fd.get_xsave().map_err(kvm_fail("get XSAVE"))?,
            xcrs: fd.get_xcrs().map_err(kvm_fail("get XCRs"))?,
            debugregs: fd
                .get_debug_regs()
                .map_err(kvm_fail("get debug registers"))?,
            lapic: fd.get_lapic().map_err(kvm_fail("get LAPIC"))?,
            mp_state: fd.get_mp_state().map_err(kvm_fail("get MP state"))?,
            events: fd.get_vcpu_events().map_err(kvm_fail("get vCPU events"))?,
            tsc_khz: fd.get_tsc_khz().ok(),
        })
    }

    /// Loads the state into a new vCPU, in the order KVM needs: CPUID first (it
    /// decides which XSAVE features and MSRs exist), events last.
    pub fn restore(&self, kvm_handle: &Kvm, fd: &VcpuFd) -> Result<(), KvmStateError> {
        let cpuid = CpuId::from_entries(&self.cpuid)
            .map_err(|e| KvmStateError::Invalid(format!("saved CPUID: {e:?}")))?;
        fd.set_cpuid2(&cpuid).map_err(kvm_fail("set CPUID"))?;
        if let Some(khz) = self.tsc_khz {
            // Same frequency as the host needs no scaling; a different host must scale.
            if fd.get_tsc_khz().ok() != Some(khz) && kvm_handle.check_extension(Cap::TscControl) {
                fd.set_tsc_khz(khz).map_err(kvm_fail("set TSC frequency"))?;
            }
        }
        fd.set_mp_state(self.mp_state)
            .map_err(kvm_fail("set MP state"))?;
        fd.set_regs(&self.regs).map_err(kvm_fail("set registers"))?;
        fd.set_sregs(&self.sregs)
            .map_err(kvm_fail("set special registers"))?;
        // SAFETY: `self.xsave` is a whole `kvm_xsave` as KVM_GET_XSAVE returned it, so
        // KVM reads no more than the struct holds.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(kvm_fail("set XSAVE"))?;
        fd.set_xcrs(&self.xcrs).map_err(kvm_fail("set XCRs"))?;
        fd.set_debug_regs(&self.debugregs)
            .map_err(kvm_fail("set debug registers"))?;
        fd.set_lapic(&self.lapic).map_err(kvm_fail("set LAPIC"))?;
        for chunk in self.msrs.chunks(MSR_BATCH) {
            let set = fd
                .set_msrs(&msrs_of(chunk)?)
                .map_err(kvm_fail("set MSRs"))?;
            if set != chunk.len() {
                return Err(KvmStateError::Invalid(format!(
                    "KVM refused saved MSR {:#x}: the snapshot comes from a different CPU or KVM",
                    chunk[set].index
                )));
            }
        }
        fd.set_vcpu_events(&self.events)
            .map_err(kvm_fail("set vCPU events"))?;
        Ok(())
    }
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, KvmStateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(kvm_fail("get irqchip"))?;
    Ok(chip)
}

impl VmState {
    pub fn save(vm: &VmFd) -> Result<Self, KvmStateError> {
        Ok(VmState {
            pit: vm.get_pit2().map_err(kvm_fail("get PIT"))?,
            clock: vm.get_clock().map_err(kvm_fail("get clock"))?,
            pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
        })
    }

    /// Loads the state into a VM whose irqchip and PIT exist (before its vCPUs run).
    pub fn restore(&self, vm: &VmFd) -> Result<(), KvmStateError> {
        vm.set_pit2(&self.pit).map_err(kvm_fail("set PIT"))?;
        // Only the clock value: the guest sees no time pass while it was a snapshot.
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(kvm_fail("set clock"))?;
        for (chip, want) in [
            (&self.pic_master, KVM_IRQCHIP_PIC_MASTER),
            (&self.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
            (&self.ioapic, KVM_IRQCHIP_IOAPIC),
        ] {
            if chip.chip_id != want {
                return Err(KvmStateError::Invalid(format!(
                    "saved irqchip {} where {want} belongs",
                    chip.chip_id
                )));
            }
            vm.set_irqchip(chip).map_err(kvm_fail("set irqchip"))?;
        }
        Ok(())
    }
}

/// The CPU vendor string from CPUID leaf 0 ("GenuineIntel", "AuthenticAMD").
pub fn cpu_vendor(cpuid: &[kvm_cpuid_entry2]) -> String {
    let Some(leaf0) = cpuid.iter().find(|e| e.function == 0) else {
        return String::new();
    };
    let mut bytes = Vec::with_capacity(12);
    for reg in [leaf0.ebx, leaf0.edx, leaf0.ecx] {
        bytes.extend_from_slice(&reg.to_le_bytes());
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// This host's CPU vendor, as KVM reports it.
pub fn host_cpu_vendor(kvm_handle: &Kvm) -> Result<String, KvmStateError> {
    let cpuid = kvm_handle
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_fail("get supported CPUID"))?;
    Ok(cpu_vendor(cpuid.as_slice()))
}
