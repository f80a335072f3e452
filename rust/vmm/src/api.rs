//! The control API's server side: the socket, one connection at a time, and the
//! `Handler` the VMM implements. The messages are in `tartarus_vmm_api::api`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tartarus_vmm_api::api::{
    parse_request, ApiError, ErrorKind, Request, Response, MAX_REQUEST_BYTES,
};

/// A connection idle this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Something that answers API requests.
pub trait Handler {
    fn handle(&mut self, request: Request) -> Result<Value, ApiError>;
    /// True once the process should stop serving (after `stop`).
    fn finished(&self) -> bool;
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
