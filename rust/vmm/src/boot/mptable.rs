//! The Intel MultiProcessor table: tells a guest without ACPI how many CPUs it has and
//! how legacy interrupts reach the IOAPIC.
//!
//! The table is built as bytes (so it can be checked without guest memory) and placed
//! at the start of the EBDA, where Linux scans for the `_MP_` floating pointer.

use tartarus_vmm_api::layout::MAX_VCPUS;

use crate::layout::{APIC_START, EBDA_END, EBDA_START, IOAPIC_START, IRQ_MAX};

const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const PROCESSOR_LEN: usize = 20;
const ENTRY_LEN: usize = 8;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const SPEC_REV: u8 = 4;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IOINT: u8 = 3;
const ENTRY_LINTSRC: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const BUS_ID_ISA: u8 = 0;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MpTableError {
    #[error("{0} vCPUs requested; the MP table supports 1 to {MAX_VCPUS}")]
    BadCpuCount(u8),
}

/// Bytes of the whole MP table (floating pointer first) for `num_cpus` vCPUs, to be
/// written at `EBDA_START`.
pub fn build_mptable(num_cpus: u8) -> Result<Vec<u8>, MpTableError> {
    if num_cpus == 0 || num_cpus > MAX_VCPUS {
        return Err(MpTableError::BadCpuCount(num_cpus));
    }
    let ioapic_id = num_cpus + 1;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        // CPU signature (family 6) and feature flags (FPU, APIC): informational only.
        entries.extend_from_slice(&0x600u32.to_le_bytes());
        entries.extend_from_slice(&0x201u32.to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, BUS_ID_ISA]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;
    // Every ISA IRQ, the timer's IRQ 0 included, is an ordinary interrupt on the IOAPIC pin
    // of the same number. Declaring IRQ 0 as ExtINT (the 8259 route) leaves Linux without
    // an IOAPIC entry for its timer: its timer check then dereferences a missing irq_cfg
    // and the guest panics before init. The 8259 stays reachable through LINT0 below.
    for irq in 0..=IRQ_MAX as u8 {
        entries.extend_from_slice(&[
            ENTRY_IOINT,
            INT_TYPE_INT,
            0,
            0,
            BUS_ID_ISA,
            irq,
            ioapic_id,
            irq,
        ]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_LINTSRC, INT_TYPE_EXTINT, 0, 0, BUS_ID_ISA, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LINTSRC, INT_TYPE_NMI, 0, 0, BUS_ID_ISA, 0, 0xff, 1]);
    count += 2;

    let table_len = HEADER_LEN + entries.len();
    let mut header = Vec::with_capacity(table_len);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&(table_len as u16).to_le_bytes());
    header.push(SPEC_REV);
    header.push(0); // checksum, below
    header.extend_from_slice(b"TARTARUS");
    header.extend_from_slice(b"MICROVM     ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    header.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    header.extend_from_slice(&entries);
    header[7] = checksum(&header);

    let mut table = Vec::with_capacity(FLOATING_LEN + table_len);
    table.extend_from_slice(b"_MP_");
    table.extend_from_slice(&((EBDA_START as usize + FLOATING_LEN) as u32).to_le_bytes());
    table.extend_from_slice(&[1, SPEC_REV, 0, 0, 0, 0, 0, 0]);
    table[10] = checksum(&table);
    table.extend_from_slice(&header);
    debug_assert!(table.len() <= (EBDA_END - EBDA_START) as usize);
    Ok(table)
}

/// The byte that makes `bytes` sum to zero (mod 256) when stored in its checksum field.
fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_sub(*b))
}

/// Length of the table for `num_cpus` vCPUs; lets callers check the fit up front.
pub fn mptable_len(num_cpus: u8) -> usize {
    FLOATING_LEN
        + HEADER_LEN
        + PROCESSOR_LEN * num_cpus as usize
        + ENTRY_LEN * (2 + (IRQ_MAX as usize + 1) + 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn zero_or_too_many_cpus_are_rejected() {
        assert_eq!(build_mptable(0), Err(MpTableError::BadCpuCount(0)));
        assert_eq!(
            build_mptable(MAX_VCPUS + 1),
            Err(MpTableError::BadCpuCount(MAX_VCPUS + 1))
        );
    }

    #[test]
    fn the_largest_table_fits_in_the_ebda() {
        assert!(mptable_len(MAX_VCPUS) <= (EBDA_END - EBDA_START) as usize);
    }

    /// The I/O-interrupt entries of a table: (interrupt type, source IRQ, IOAPIC pin).
    fn io_interrupts(table: &[u8]) -> Vec<(u8, u8, u8)> {
        let header = &table[FLOATING_LEN..];
        let len = u16::from_le_bytes([header[4], header[5]]) as usize;
        let mut off = HEADER_LEN;
        let mut found = Vec::new();
        while off < len {
            let entry = &header[off..];
            if entry[0] == ENTRY_IOINT {
                found.push((entry[1], entry[5], entry[7]));
            }
            off += if entry[0] == ENTRY_PROCESSOR {
                PROCESSOR_LEN
            } else {
                ENTRY_LEN
            };
        }
        found
    }

    #[test]
    fn every_isa_irq_is_an_ordinary_interrupt_on_its_own_pin() {
        // An ExtINT entry for IRQ 0 made Linux panic in its IOAPIC timer check.
        let entries = io_interrupts(&build_mptable(1).unwrap());
        assert_eq!(entries.len(), IRQ_MAX as usize + 1);
        for (irq, (kind, source, pin)) in entries.into_iter().enumerate() {
            assert_eq!(kind, INT_TYPE_INT, "ISA IRQ {irq} must not be ExtINT");
            assert_eq!((source as usize, pin as usize), (irq, irq));
        }
    }

    proptest! {
        #[test]
        fn table_is_well_formed(cpus in 1..=MAX_VCPUS) {
            let t = build_mptable(cpus).unwrap();
            prop_assert_eq!(t.len(), mptable_len(cpus));
            prop_assert_eq!(&t[0..4], b"_MP_");
            prop_assert_eq!(sum(&t[..FLOATING_LEN]), 0);
            let pointer = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
            prop_assert_eq!(pointer, EBDA_START + FLOATING_LEN as u64);
            let header = &t[FLOATING_LEN..];
            prop_assert_eq!(&header[0..4], b"PCMP");
            let len = u16::from_le_bytes([header[4], header[5]]) as usize;
            prop_assert_eq!(len, header.len());
            prop_assert_eq!(sum(header), 0);
            let count = u16::from_le_bytes([header[34], header[35]]) as usize;
            // Walk the entries: processors are 20 bytes, the rest 8.
            let mut off = HEADER_LEN;
            let mut seen = 0;
            let mut processors = 0;
            while off < len {
                let size = if header[off] == ENTRY_PROCESSOR { processors += 1; PROCESSOR_LEN } else { ENTRY_LEN };
                off += size;
                seen += 1;
            }
            prop_assert_eq!(off, len);
            prop_assert_eq!(seen, count);
            prop_assert_eq!(processors, cpus as usize);
        }
    }
}
