//! Shared vectors for `tartarus-jail`'s configuration, which Python mirrors
//! (`tests/vectors/config/jail_*.json`). Each vector holds a document as `written` and the
//! `canonical` form this crate serializes it to; the Python tests decode both with their
//! mirror types. `TARTARUS_UPDATE_VECTORS=1 cargo test -p tartarus-jail --test
//! config_vectors` rewrites them after an intended change.

use std::path::PathBuf;

use serde_json::{json, Value};
use tartarus_jail::config::JailConfig;

fn check(name: &str, written: Value) {
    let value: JailConfig =
        serde_json::from_value(written.clone()).unwrap_or_else(|e| panic!("{name}: {e}"));
    let canonical = serde_json::to_value(&value).unwrap();
    let again: JailConfig = serde_json::from_value(canonical.clone()).unwrap();
    assert_eq!(
        serde_json::to_value(&again).unwrap(),
        canonical,
        "{name}: not a round trip"
    );
    let doc = json!({"type": "JailConfig", "written": written, "canonical": canonical});
    let mut text = serde_json::to_string_pretty(&doc).unwrap();
    text.push('\n');
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/vectors/config")
        .join(format!("{name}.json"));
    if std::env::var_os("TARTARUS_UPDATE_VECTORS").is_some() {
        std::fs::write(&path, &text).unwrap();
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!("{name}: {e}; run TARTARUS_UPDATE_VECTORS=1 cargo test -p tartarus-jail --test config_vectors")
    });
    assert_eq!(
        on_disk, text,
        "{name} differs; config changed? rerun with TARTARUS_UPDATE_VECTORS=1"
    );
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
            "network": true,
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
            "stdio": {"file": "/var/lib/tartarus/sandboxes/sbx-1/agent.log"}
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
