//! Shared vectors for the VMM's jail configuration (`--jail`), which Python mirrors
//! (`tests/vectors/config/`; the machine's are in `tartarus-vmm-api`). Each vector holds a
//! document as `written` and the `canonical` form this crate serializes it to; the
//! Python tests decode both with their mirror types and must encode back `canonical`.
//! `TARTARUS_UPDATE_VECTORS=1 cargo test -p tartarus-vmm --test config_vectors`
//! rewrites them after an intended change.

#[path = "../../test_support/config_vectors.rs"]
mod config_vectors;

use config_vectors::check;
use serde_json::{json, Value};
use tartarus_vmm::jail::JailConfig;

#[test]
fn vmm_jail_config_vectors() {
    let jail = |name: &str, written: Value| check::<JailConfig>("VmmJailConfig", name, written);
    jail(
        "vmm_jail_full",
        json!({
            "id": "sbx-0123456789ab",
            "chroot_base": "/run/tartarus/vmm-jail",
            "uid": 1000,
            "gid": 1000,
            "mounts": [
                {"source": "/var/lib/tartarus/run", "destination": "/run", "readonly": false},
                {"source": "/opt/vmlinux", "destination": "/boot/vmlinux", "readonly": true}
            ],
            "cgroup": {
                "parent": "tartarus/vmm",
                "guest_memory_mib": 256,
                "overhead_mib": 96,
                "pids": 64,
                "cpu_quota_us": 50000,
                "cpu_period_us": 100000
            },
            "max_open_files": 512
        }),
    );
    jail(
        "vmm_jail_minimal",
        json!({"id": "vm", "uid": 1000, "gid": 1000}),
    );
    jail(
        "vmm_jail_sparse_nested",
        json!({
            "id": "vm",
            "uid": 1,
            "gid": 2,
            "mounts": [{"source": "/k", "destination": "/boot/vmlinux"}],
            "cgroup": {"guest_memory_mib": 64}
        }),
    );
}
