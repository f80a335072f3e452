//! The control API: newline-delimited JSON over a unix stream socket.
//!
//! Each request is one JSON object on one line, tagged by `op`; each answer is one line,
//! `{"ok": true, "result": ...}` or `{"ok": false, "error": {"kind": ..., "message": ...}}`.
//! The shapes are plain tagged objects so msgspec Structs (`tag_field="op"`) mirror
//! them on the Python side. Lines are bounded and connections time out, so a client
//! that misbehaves cannot wedge the VMM.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::MachineConfig;
use crate::snapshot::format::SnapshotKind;
use crate::snapshot::RestoreOptions;

/// Longest request line accepted.
pub const MAX_REQUEST_BYTES: u64 = 1 << 20;
/// A connection idle this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

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
        path: std::path::PathBuf,
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

/// Something that answers API requests.
pub trait Handler {
    fn handle(&mut self, request: Request) -> Result<Value, ApiError>;
    /// True once the process should stop serving (after `stop`).
    fn finished(&self) -> bool;
}

/// Parses one request line; a bad line is a `bad_request` error, never a panic.
pub fn parse_request(line: &[u8]) -> Result<Request, ApiError> {
    serde_json::from_slice(line).map_err(|e| ApiError::new(ErrorKind::BadRequest, e.to_string()))
}

/// Binds the API socket at `path`, replacing a stale socket file (but nothing else).
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)?;
        } else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
    }
    UnixListener::bind(path)
}

/// Serves connections one at a time until the handler is finished.
pub fn serve(listener: &UnixListener, handler: &mut dyn Handler) {
    while !handler.finished() {
        let Ok((stream, _)) = listener.accept() else {
            continue;
        };
        serve_connection(stream, handler);
    }
}

fn serve_connection(stream: UnixStream, handler: &mut dyn Handler) {
    let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IDLE_TIMEOUT));
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    let mut writer = write_half;
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = Vec::new();
        let read = (&mut reader)
            .take(MAX_REQUEST_BYTES + 1)
            .read_until(b'\n', &mut line);
        match read {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let too_long = line.len() as u64 > MAX_REQUEST_BYTES;
        let result = if too_long {
            Err(ApiError::new(
                ErrorKind::BadRequest,
                format!("request longer than {MAX_REQUEST_BYTES} bytes"),
            ))
        } else {
            parse_request(&line).and_then(|req| handler.handle(req))
        };
        let mut out = serde_json::to_vec(&Response::from_result(result)).unwrap_or_else(|_| {
            br#"{"ok":false,"error":{"kind":"internal","message":"cannot encode response"}}"#
                .to_vec()
        });
        out.push(b'\n');
        if writer.write_all(&out).is_err() || too_long || handler.finished() {
            return;
        }
    }
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
