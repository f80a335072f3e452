//! The state section: everything but guest memory, as MessagePack (field names kept,
//! so a reader in another language, e.g. `tartarus snapshot inspect`, can decode it).
//! It is checked for consistency before anything is built from it; the checks and the
//! page map are shared with the reader in `tartarus_vmm_api::snapshot::state`.

use serde::{Deserialize, Serialize};
use tartarus_vmm_api::config::MachineConfig;
use tartarus_vmm_api::snapshot::state::{check_machine, StateError};

use super::kvm_state::{VcpuState, VmState};
use crate::boot::regs::EntryMode;
use crate::devices::generation::GenerationState;
use crate::devices::legacy::SerialSnapshot;
use crate::devices::virtio::attach::VirtioSnapshot;

/// Device state that is not KVM's.
#[derive(Clone, Serialize, Deserialize)]
pub struct DeviceStates {
    pub serial: SerialSnapshot,
    pub generation: GenerationState,
    pub virtio: Option<VirtioSnapshot>,
}

#[derive(Serialize, Deserialize)]
pub struct SnapshotState {
    /// The tartarus-vmm that wrote it (for people; the format version is what counts).
    pub vmm_version: String,
    /// CPU vendor of the host it was taken on: a snapshot does not move across vendors.
    pub cpu_vendor: String,
    pub machine: MachineConfig,
    pub entry: EntryMode,
    /// Guest RAM ranges (guest address, length), in the order the memory section
    /// (of the full snapshot) stores them.
    pub ram: Vec<(u64, u64)>,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DeviceStates,
}

impl SnapshotState {
    pub fn encode(&self) -> Result<Vec<u8>, StateError> {
        rmp_serde::to_vec_named(self).map_err(|e| StateError(format!("cannot encode: {e}")))
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, StateError> {
        let state: SnapshotState = rmp_serde::from_slice(bytes)
            .map_err(|e| StateError(format!("cannot decode the state section: {e}")))?;
        state.check()?;
        Ok(state)
    }

    /// The fields must agree with each other before a VM is built from them.
    fn check(&self) -> Result<(), StateError> {
        check_machine(&self.machine, &self.ram, self.vcpus.len())
    }

    pub fn memory_bytes(&self) -> u64 {
        self.ram.iter().map(|r| r.1).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_state_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = SnapshotState::decode(&bytes);
        }
    }
}
