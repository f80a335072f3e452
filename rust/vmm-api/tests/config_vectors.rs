//! Shared vectors for the machine configuration Python mirrors (`tests/vectors/config/`):
//! the `configure` request and the VMM's `--config` file. Each vector holds a document as
//! `written` and the `canonical` form this crate serializes it to; the Python tests
//! decode both with their mirror types and must encode back `canonical`.
//! `TARTARUS_UPDATE_VECTORS=1 cargo test -p tartarus-vmm-api --test config_vectors`
//! rewrites them after an intended change.

#[path = "../../test_support/config_vectors.rs"]
mod config_vectors;

use config_vectors::check;
use serde_json::{json, Value};
use tartarus_vmm_api::config::MachineConfig;

#[test]
fn machine_config_vectors() {
    let machine =
        |name: &str, written: Value| check::<MachineConfig>("MachineConfig", name, written);
    machine(
        "machine_full",
        json!({
            "vcpus": 2,
            "memory_mib": 256,
            "kernel": "/boot/vmlinux",
            "cmdline": "console=ttyS0 reboot=k panic=1",
            "boot_protocol": "pvh",
            "cpu_template": "host",
            "serial": {"kind": "file", "path": "/run/serial.log"},
            "serial_limit_bytes": 4096,
            "memory": {"file": "/boot/memory", "hugepages": false},
            "wall_clock_limit_ms": 60000,
            "drives": [
                {
                    "path": "/drives/0",
                    "read_only": true,
                    "id": "rootfs",
                    "rate_limit": {"bytes_per_sec": 1048576, "ops_per_sec": 1000, "burst_bytes": 65536, "burst_ops": 10},
                    "scratch": null
                },
                {
                    "path": "/run/scratch.img",
                    "read_only": false,
                    "id": "scratch",
                    "rate_limit": {"bytes_per_sec": null, "ops_per_sec": null, "burst_bytes": 0, "burst_ops": 0},
                    "scratch": {"size_mib": 64, "wipe": "shred"}
                }
            ],
            "vsock": {"guest_cid": 3, "uds_path": "/run/vsock.sock"},
            "track_dirty_pages": true
        }),
    );
    machine("machine_minimal", json!({"memory_mib": 64, "kernel": "/k"}));
    machine(
        "machine_sparse_nested",
        json!({
            "memory_mib": 128,
            "kernel": "/k",
            "serial": {"kind": "socket", "path": "/serial.sock"},
            "memory": {"hugepages": true},
            "drives": [{"path": "/a", "rate_limit": {"ops_per_sec": 5}, "scratch": {}}]
        }),
    );
    machine(
        "machine_serial_stdout",
        json!({"memory_mib": 64, "kernel": "/k", "serial": {"kind": "stdout"}, "drives": []}),
    );
}
