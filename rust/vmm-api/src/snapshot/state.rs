//! What a reader checks in the state section (MessagePack, written by
//! `tartarus_vmm::snapshot::state`) and the page map of a diff snapshot.
//!
//! The VMM decodes the whole state to rebuild a machine; a reader such as `inspect`
//! decodes only `StateView`, the parts that describe the snapshot, and runs the same
//! consistency checks (`check_machine`) on them.

use serde::de::IgnoredAny;
use serde::Deserialize;

use super::format::PAGE_SIZE;
use crate::config::MachineConfig;
use crate::layout::ram_ranges;

#[derive(Debug, thiserror::Error)]
#[error("the snapshot state is inconsistent: {0}")]
pub struct StateError(pub String);

/// The machine must be valid, its RAM ranges must be those of its memory size, and
/// there must be one saved vCPU per configured vCPU.
pub fn check_machine(
    machine: &MachineConfig,
    ram: &[(u64, u64)],
    vcpus: usize,
) -> Result<(), StateError> {
    machine.validate().map_err(|e| StateError(e.to_string()))?;
    if ram != ram_ranges(machine.memory_bytes()) {
        return Err(StateError(format!(
            "RAM ranges {:?} do not match {} MiB of memory",
            ram, machine.memory_mib
        )));
    }
    if vcpus != usize::from(machine.vcpus) {
        return Err(StateError(format!(
            "{} vCPU states for {} vCPUs",
            vcpus, machine.vcpus
        )));
    }
    Ok(())
}

/// The parts of the state section a reader describes; KVM and device state are skipped.
#[derive(Deserialize)]
pub struct StateView {
    pub vmm_version: String,
    pub cpu_vendor: String,
    pub machine: MachineConfig,
    pub entry: IgnoredAny,
    pub ram: Vec<(u64, u64)>,
    pub vm: IgnoredAny,
    pub vcpus: Vec<IgnoredAny>,
    pub devices: DevicesView,
}

#[derive(Deserialize)]
pub struct DevicesView {
    pub serial: IgnoredAny,
    pub generation: GenerationView,
    pub virtio: Option<IgnoredAny>,
}

#[derive(Deserialize)]
pub struct GenerationView {
    pub generation: u64,
}

impl StateView {
    pub fn decode(bytes: &[u8]) -> Result<Self, StateError> {
        let state: StateView = rmp_serde::from_slice(bytes)
            .map_err(|e| StateError(format!("cannot decode the state section: {e}")))?;
        check_machine(&state.machine, &state.ram, state.vcpus.len())?;
        Ok(state)
    }
}

/// Runs of guest pages a diff snapshot carries: (first guest page number, page count),
/// sorted, not overlapping, inside guest RAM. Stored as little-endian u64 pairs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageMap {
    pub runs: Vec<(u64, u64)>,
}

impl PageMap {
    pub fn pages(&self) -> u64 {
        self.runs.iter().map(|r| r.1).sum()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.runs.len() * 16);
        for &(first, count) in &self.runs {
            out.extend_from_slice(&first.to_le_bytes());
            out.extend_from_slice(&count.to_le_bytes());
        }
        out
    }

    /// Parses and checks a page map against guest RAM.
    pub fn decode(bytes: &[u8], ram: &[(u64, u64)]) -> Result<Self, StateError> {
        if bytes.len() % 16 != 0 {
            return Err(StateError(format!(
                "page map of {} bytes is not whole runs",
                bytes.len()
            )));
        }
        let runs: Vec<(u64, u64)> = bytes
            .chunks_exact(16)
            .map(|c| {
                let (a, b) = c.split_at(8);
                (
                    u64::from_le_bytes(a.try_into().unwrap_or_default()),
                    u64::from_le_bytes(b.try_into().unwrap_or_default()),
                )
            })
            .collect();
        let mut end_of_last = 0u64;
        for (i, &(first, count)) in runs.iter().enumerate() {
            let end = first.checked_add(count).filter(|_| count > 0);
            let Some(end) = end else {
                return Err(StateError(format!("page run {i} is empty or overflows")));
            };
            if i > 0 && first < end_of_last {
                return Err(StateError(format!("page run {i} is out of order")));
            }
            let inside = ram.iter().any(|&(start, len)| {
                first >= start / PAGE_SIZE && end <= (start + len) / PAGE_SIZE
            });
            if !inside {
                return Err(StateError(format!("page run {i} lies outside guest RAM")));
            }
            end_of_last = end;
        }
        Ok(PageMap { runs })
    }

    /// Builds runs from per-page flags over guest RAM.
    pub fn from_dirty(ram: &[(u64, u64)], dirty: &[Vec<bool>]) -> Self {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (&(start, _), flags) in ram.iter().zip(dirty) {
            let first_page = start / PAGE_SIZE;
            for (i, _) in flags.iter().enumerate().filter(|(_, &d)| d) {
                let page = first_page + i as u64;
                match runs.last_mut() {
                    Some((first, count)) if *first + *count == page => *count += 1,
                    _ => runs.push((page, 1)),
                }
            }
        }
        PageMap { runs }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const RAM: &[(u64, u64)] = &[(0, 64 << 20)];

    #[test]
    fn runs_are_built_from_flags_and_round_trip() {
        let mut flags = vec![false; (64 << 20) / 4096];
        flags[3] = true;
        flags[4] = true;
        flags[10] = true;
        let map = PageMap::from_dirty(RAM, &[flags]);
        assert_eq!(map.runs, vec![(3, 2), (10, 1)]);
        assert_eq!(map.pages(), 3);
        assert_eq!(PageMap::decode(&map.encode(), RAM).unwrap(), map);
    }

    #[test]
    fn bad_page_maps_are_refused() {
        let enc = |runs: Vec<(u64, u64)>| PageMap { runs }.encode();
        for bad in [
            enc(vec![(5, 0)]),
            enc(vec![(10, 1), (5, 1)]),
            enc(vec![(1, 3), (2, 1)]),
            enc(vec![(u64::MAX, 2)]),
            enc(vec![((64 << 20) / 4096, 1)]),
            vec![1, 2, 3],
        ] {
            assert!(PageMap::decode(&bad, RAM).is_err());
        }
    }

    proptest! {
        #[test]
        fn any_page_map_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(map) = PageMap::decode(&bytes, RAM) {
                prop_assert_eq!(map.encode(), bytes);
            }
        }

        #[test]
        fn any_state_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = StateView::decode(&bytes);
        }
    }
}
