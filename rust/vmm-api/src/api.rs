//! The control API's messages: newline-delimited JSON over a unix stream socket (the
//! server is `tartarus_vmm::api`, the client is `client`).
//!
//! Each request is one JSON object on one line, tagged by `op`; each answer is one line,
//! `{"ok": true, "result": ...}` or `{"ok": false, "error": {"kind": ..., "message": ...}}`.
//! The shapes are plain tagged objects so msgspec Structs (`tag_field="op"`) mirror
//! them on the Python side. Lines are bounded (`MAX_REQUEST_BYTES`) both ways.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{DriveConfig, MachineConfig, SerialConfig};
use crate::snapshot::format::SnapshotKind;

/// Longest request line accepted.
pub const MAX_REQUEST_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Sets (or replaces, before `start`) the machine configuration.
    Configure {
        machine: MachineConfig,
    },
    /// Builds the VM and starts its vCPUs.
    Start {},
    Pause {},
    Resume {},
    State {},
    Metrics {},
    /// Waits up to `timeout_ms` (at most 60 s) for the guest to exit; returns the state.
    Wait {
        timeout_ms: u64,
    },
    /// Stops the guest if it runs, answers, and ends the VMM process.
    Stop {},
    /// Pauses the guest (if it runs), writes a snapshot to `path`, and leaves the
    /// guest as it was (running again, or paused).
    Snapshot {
        path: PathBuf,
        #[serde(default)]
        kind: SnapshotKind,
    },
    /// Builds the machine from a snapshot instead of `configure` + `start`.
    Restore(RestoreOptions),
}

/// Categories a client can act on without parsing messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request was not valid JSON or not a known operation.
    BadRequest,
    /// The operation does not apply in the VM's current state.
    InvalidState,
    /// The machine configuration is invalid.
    Config,
    /// Building or booting the VM failed (kernel, memory, KVM).
    Boot,
    /// A snapshot file is unusable: corrupted, truncated, from another version, or not
    /// the parent a diff needs.
    Snapshot,
    /// Something inside the VMM failed.
    Internal,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            kind,
            message: message.into(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
}

impl Response {
    pub fn from_result(r: Result<Value, ApiError>) -> Self {
        match r {
            Ok(v) => Response {
                ok: true,
                result: Some(v),
                error: None,
            },
            Err(e) => Response {
                ok: false,
                result: None,
                error: Some(e),
            },
        }
    }
}

/// Parses one request line; a bad line is a `bad_request` error, never a panic.
pub fn parse_request(line: &[u8]) -> Result<Request, ApiError> {
    serde_json::from_slice(line).map_err(|e| ApiError::new(ErrorKind::BadRequest, e.to_string()))
}

/// How to restore, as the `restore` API request carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreOptions {
    /// The snapshot to restore (full, or a diff whose parent is `base`).
    pub snapshot: PathBuf,
    /// The full snapshot a diff applies to.
    #[serde(default)]
    pub base: Option<PathBuf>,
    /// Where this clone's serial output goes (the snapshot's own setting otherwise).
    #[serde(default)]
    pub serial: Option<SerialConfig>,
    #[serde(default)]
    pub wall_clock_limit_ms: Option<u64>,
    #[serde(default)]
    pub track_dirty_pages: Option<bool>,
    /// This clone's disks, replacing the snapshot's: the same disks in the same order
    /// (a scratch disk is this clone's copy of the one saved with the snapshot).
    #[serde(default)]
    pub drives: Option<Vec<DriveConfig>>,
    /// This clone's vsock host socket (the snapshot's path belongs to the original).
    #[serde(default)]
    pub vsock_uds_path: Option<PathBuf>,
    /// The clone index the guest reads from the generation device.
    #[serde(default)]
    pub clone_id: u64,
    /// Check the sha256 of guest memory before mapping it (reads the whole file).
    #[serde(default = "yes")]
    pub verify_memory: bool,
    /// Start the vCPUs running (else they wait, paused, for `resume`).
    #[serde(default = "yes")]
    pub resume: bool,
}

fn yes() -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn requests_parse_from_tagged_objects() {
        assert_eq!(
            parse_request(br#"{"op":"start"}"#).unwrap(),
            Request::Start {}
        );
        assert_eq!(
            parse_request(br#"{"op":"wait","timeout_ms":5}"#).unwrap(),
            Request::Wait { timeout_ms: 5 }
        );
        let r = parse_request(br#"{"op":"configure","machine":{"memory_mib":8,"kernel":"/k"}}"#);
        assert!(matches!(r, Ok(Request::Configure { .. })));
        assert_eq!(
            parse_request(br#"{"op":"snapshot","path":"/s"}"#).unwrap(),
            Request::Snapshot {
                path: "/s".into(),
                kind: SnapshotKind::Full
            }
        );
        let r = parse_request(br#"{"op":"restore","snapshot":"/s","clone_id":3}"#).unwrap();
        let Request::Restore(o) = r else {
            panic!("{r:?}")
        };
        assert_eq!((o.clone_id, o.resume, o.verify_memory), (3, true, true));
        assert!(parse_request(br#"{"op":"restore","snapshot":"/s","bogus":1}"#).is_err());
    }

    #[test]
    fn unknown_ops_and_fields_are_bad_requests() {
        for bad in [
            &br#"{"op":"explode"}"#[..],
            br#"{"op":"start","x":1}"#,
            b"not json",
            b"",
        ] {
            assert_eq!(parse_request(bad).unwrap_err().kind, ErrorKind::BadRequest);
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_request(&bytes);
        }
    }
}
