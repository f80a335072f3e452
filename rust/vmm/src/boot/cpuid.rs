//! CPUID filtering: what the guest is told about its CPU.
//!
//! KVM reports what it can virtualise; a CPU template narrows that to what the guest
//! should see. `host` passes KVM's set through (with the topology fixed up), `baseline`
//! hides features that make snapshots non-portable between hosts or that a sandbox has
//! no business using (AVX-512, TSX, MPX, SGX, PKU, processor trace, VMX).

use kvm_bindings::kvm_cpuid_entry2;
use tartarus_vmm_api::config::CpuTemplate;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_EXT_FEATURES: u32 = 0x7;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_XSAVE: u32 = 0xd;

const ECX_VMX: u32 = 1 << 5;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// Leaf 7 subleaf 0 EBX: SGX, HLE, RTM, MPX, AVX512F/DQ/IFMA, PT, AVX512PF/ER/CD/BW/VL.
const L7_EBX_HIDDEN: u32 = (1 << 2)
    | (1 << 4)
    | (1 << 11)
    | (1 << 14)
    | (1 << 16)
    | (1 << 17)
    | (1 << 21)
    | (1 << 25)
    | (1 << 26)
    | (1 << 27)
    | (1 << 28)
    | (1 << 30)
    | (1 << 31);
/// Leaf 7 subleaf 0 ECX: AVX512VBMI, PKU, OSPKE, WAITPKG, AVX512VBMI2, AVX512VNNI,
/// AVX512BITALG, AVX512VPOPCNTDQ, SGX_LC.
const L7_ECX_HIDDEN: u32 = (1 << 1)
    | (1 << 3)
    | (1 << 4)
    | (1 << 5)
    | (1 << 6)
    | (1 << 11)
    | (1 << 12)
    | (1 << 14)
    | (1 << 30);
/// Leaf 7 subleaf 0 EDX: AVX512_4VNNIW/4FMAPS, AVX512_VP2INTERSECT, TSX_FORCE_ABORT,
/// AVX512_FP16.
const L7_EDX_HIDDEN: u32 = (1 << 2) | (1 << 3) | (1 << 8) | (1 << 13) | (1 << 23);
/// Leaf 0xd subleaf 0 EAX: XSAVE state components for MPX (3, 4), AVX-512 (5, 6, 7), PKRU (9).
const XSAVE_HIDDEN: u32 = (1 << 3) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 7) | (1 << 9);

/// Applies `template` and the topology of vCPU `vcpu_id` out of `vcpu_count` in place.
pub fn filter_cpuid(
    entries: &mut [kvm_cpuid_entry2],
    template: CpuTemplate,
    vcpu_id: u8,
    vcpu_count: u8,
) {
    for e in entries.iter_mut() {
        match (e.function, e.index) {
            (LEAF_FEATURES, _) => {
                e.ebx = (e.ebx & 0x0000_ffff)
                    | (u32::from(vcpu_id) << 24)
                    | (u32::from(vcpu_count) << 16);
                e.ecx = (e.ecx & !ECX_VMX) | ECX_HYPERVISOR;
                if vcpu_count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            (LEAF_EXT_TOPOLOGY, _) => e.edx = u32::from(vcpu_id),
            (LEAF_EXT_FEATURES, 0) if template == CpuTemplate::Baseline => {
                e.ebx &= !L7_EBX_HIDDEN;
                e.ecx &= !L7_ECX_HIDDEN;
                e.edx &= !L7_EDX_HIDDEN;
            }
            (LEAF_EXT_FEATURES, 1) if template == CpuTemplate::Baseline => {
                // AVX512_BF16 and friends live in subleaf 1 EAX.
                e.eax &= !(1 << 5);
            }
            (LEAF_XSAVE, 0) if template == CpuTemplate::Baseline => e.eax &= !XSAVE_HIDDEN,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    #[test]
    fn host_template_keeps_avx512_baseline_hides_it() {
        let all = [u32::MAX; 4];
        let mut host = vec![entry(7, 0, all)];
        filter_cpuid(&mut host, CpuTemplate::Host, 0, 1);
        assert_eq!(host[0].ebx, u32::MAX);
        let mut base = vec![entry(7, 0, all), entry(0xd, 0, all)];
        filter_cpuid(&mut base, CpuTemplate::Baseline, 0, 1);
        assert_eq!(base[0].ebx & (1 << 16), 0);
        assert_eq!(base[1].eax & (1 << 5), 0);
        assert_ne!(base[0].ebx & (1 << 5), 0, "AVX2 stays");
    }

    proptest! {
        #[test]
        fn leaf1_reports_apic_id_hypervisor_and_no_vmx(regs in any::<[u32; 4]>(), id in 0u8..32, extra in 0u8..32) {
            let count = id.saturating_add(1).saturating_add(extra);
            let mut entries = vec![entry(1, 0, regs), entry(0xb, 0, regs)];
            filter_cpuid(&mut entries, CpuTemplate::Host, id, count);
            prop_assert_eq!(entries[0].ebx >> 24, u32::from(id));
            prop_assert_eq!((entries[0].ebx >> 16) & 0xff, u32::from(count));
            prop_assert_eq!(entries[0].ebx & 0xffff, regs[1] & 0xffff);
            prop_assert_eq!(entries[0].ecx & ECX_VMX, 0);
            prop_assert_ne!(entries[0].ecx & ECX_HYPERVISOR, 0);
            prop_assert_eq!(entries[1].edx, u32::from(id));
        }
    }
}
