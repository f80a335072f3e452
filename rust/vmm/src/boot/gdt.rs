//! Boot GDT entries and their `kvm_segment` form.
//!
//! The VMM loads segment registers directly through KVM, but the guest may reload them
//! from the GDT, so the table in guest memory and the registers must describe the same
//! segments.

use kvm_bindings::kvm_segment;

/// Flat segments for the 64-bit entry: null, code (L=1), data, TSS.
pub const GDT_LONG_MODE: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// Flat segments for the 32-bit PVH entry: null, code (D=1), data, TSS.
pub const GDT_PROTECTED_MODE: [u64; 4] = [
    0,
    gdt_entry(0xc09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x008b, 0, 0x67),
];

/// Encodes a descriptor from its access/flags word (`0xF0AA`: flags nibble, access byte),
/// base and 20-bit limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

fn base(entry: u64) -> u64 {
    ((entry & 0xff00_0000_0000_0000) >> 32)
        | ((entry & 0x0000_00ff_0000_0000) >> 16)
        | ((entry & 0x0000_0000_ffff_0000) >> 16)
}

/// The segment limit in bytes, as KVM (and the VMCS) hold it: the descriptor's 20-bit
/// limit, in 4 KiB units when the granularity bit is set.
fn limit(entry: u64) -> u32 {
    let raw = (((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0x0000_0000_0000_ffff)) as u32;
    if bits(entry, 55, 1) == 1 {
        (raw << 12) | 0xfff
    } else {
        raw
    }
}

fn bits(entry: u64, shift: u32, width: u32) -> u8 {
    ((entry >> shift) & ((1 << width) - 1)) as u8
}

/// The `kvm_segment` for GDT entry `index` holding `entry`.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let present = bits(entry, 47, 1);
    kvm_segment {
        base: base(entry),
        limit: limit(entry),
        selector: u16::from(index) * 8,
        type_: bits(entry, 40, 4),
        present,
        dpl: bits(entry, 45, 2),
        db: bits(entry, 54, 1),
        s: bits(entry, 44, 1),
        l: bits(entry, 53, 1),
        g: bits(entry, 55, 1),
        avl: bits(entry, 52, 1),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn long_mode_code_segment_is_64_bit() {
        let cs = segment_from_gdt(GDT_LONG_MODE[1], 1);
        assert_eq!(
            (cs.l, cs.db, cs.type_, cs.present, cs.selector),
            (1, 0, 0xb, 1, 8)
        );
    }

    #[test]
    fn protected_mode_code_segment_is_32_bit() {
        let cs = segment_from_gdt(GDT_PROTECTED_MODE[1], 1);
        // A 4 GiB flat segment: the PVH entry sits at 1 MiB, beyond a 20-bit byte limit.
        assert_eq!((cs.l, cs.db, cs.g, cs.limit), (0, 1, 1, 0xffff_ffff));
        let ds = segment_from_gdt(GDT_PROTECTED_MODE[2], 2);
        assert_eq!((ds.db, ds.g, ds.limit), (1, 1, 0xffff_ffff));
    }

    #[test]
    fn byte_granular_limits_are_kept() {
        let tss = segment_from_gdt(GDT_PROTECTED_MODE[3], 3);
        assert_eq!((tss.g, tss.limit), (0, 0x67));
    }

    #[test]
    fn null_descriptor_is_unusable() {
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
    }

    proptest! {
        #[test]
        fn base_and_limit_round_trip(flags in any::<u16>(), b in any::<u32>(), l in 0u32..0x10_0000) {
            let e = gdt_entry(flags & 0xf0ff, b, l);
            let seg = segment_from_gdt(e, 3);
            prop_assert_eq!(seg.base, u64::from(b));
            let bytes = if flags & 0x8000 != 0 { (l << 12) | 0xfff } else { l };
            prop_assert_eq!(seg.limit, bytes);
            prop_assert_eq!(seg.selector, 24);
        }
    }
}
