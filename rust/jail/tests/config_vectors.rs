//! Shared vectors for `tartarus-jail`'s configuration, which Python mirrors
//! (`tests/vectors/config/jail_*.json`). Each vector holds a document as `written` and the
//! `canonical` form this crate serializes it to; the Python tests decode both with their
//! mirror types. `TARTARUS_UPDATE_VECTORS=1 cargo test -p tartarus-jail --test
//! config_vectors` rewrites them after an intended change.

#[path = "../../test_support/config_vectors.rs"]
mod config_vectors;

use serde_json::{json, Value};
use tartarus_jail::config::JailConfig;

fn check(name: &str, written: Value) {
    config_vectors::check::<JailConfig>("JailConfig", name, written);
}

#[test]
fn jail_config_vectors() {
    check(
        "jail_full",
        json!({
            "id": "sbx-1",
            "rootfs": "/var/lib/tartarus/templates/python/rootfs",
            "work_dir": "/var/lib/tartarus/sandboxes/sbx-1/work",
            "hostname": "sandbox",
            "scratch_mib": 512,
            "network_namespace": "/run/netns/tt-sbx-1",
            "user_namespace": "never",
            "mounts": [
                {"source": "/usr/bin/tartarus-agent", "destination": "/.tartarus/agent", "readonly": true},
                {"source": "/var/lib/tartarus/sandboxes/sbx-1/sock", "destination": "/.tartarus/sock", "readonly": false}
            ],
            "cgroup": {
                "parent": "tartarus/sandboxes",
                "name": "sbx-1",
                "memory_bytes": 536870912,
                "pids": 256,
                "cpu_quota_us": 50000,
                "cpu_period_us": 100000
            },
            "rlimits": [{"resource": "nofile", "soft": 1024, "hard": 2048}],
            "capabilities": ["CAP_CHOWN"],
            "seccomp": "none",
            "argv": ["/.tartarus/agent", "--listen", "/.tartarus/sock/agent.sock"],
            "env": {"HOME": "/root", "LANG": "C.UTF-8"},
            "cwd": "/root",
            "uid": 1000,
            "gid": 1000,
            "stdio": {"file": "/var/lib/tartarus/sandboxes/sbx-1/agent.log"},
            "outlive_host": true
        }),
    );
    check(
        "jail_minimal",
        json!({"id": "j", "rootfs": "/r", "work_dir": "/w", "argv": ["/bin/true"]}),
    );
    check(
        "jail_sparse_nested",
        json!({
            "id": "j",
            "rootfs": "/r",
            "work_dir": "/w",
            "argv": ["/bin/sh", "-c", "exit 0"],
            "mounts": [{"source": "/a", "destination": "/b"}],
            "cgroup": {"parent": "p", "name": "n"},
            "stdio": "null"
        }),
    );
}
