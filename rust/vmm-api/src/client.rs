//! A blocking client for the control API (used by `tartarus._core` and tests).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::api::{ApiError, ErrorKind, Response, MAX_REQUEST_BYTES};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the VMM at {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("VMM connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the VMM sent an answer that is not valid JSON: {0}")]
    Decode(String),
    #[error("the VMM refused the request: {0}")]
    Api(ApiError),
}

pub struct VmmClient {
    path: PathBuf,
    timeout: Duration,
}

impl VmmClient {
    pub fn new(path: impl AsRef<Path>, timeout: Duration) -> Self {
        VmmClient {
            path: path.as_ref().to_path_buf(),
            timeout,
        }
    }

    /// Sends one request (a JSON object with an `op`) and returns its `result`.
    pub fn request(&self, request: &Value) -> Result<Value, ClientError> {
        let stream = UnixStream::connect(&self.path).map_err(|source| ClientError::Connect {
            path: self.path.display().to_string(),
            source,
        })?;
        stream.set_read_timeout(Some(self.timeout))?;
        stream.set_write_timeout(Some(self.timeout))?;
        let mut line =
            serde_json::to_vec(request).map_err(|e| ClientError::Decode(e.to_string()))?;
        line.push(b'\n');
        (&stream).write_all(&line)?;
        let mut answer = Vec::new();
        let mut reader = BufReader::new(std::io::Read::take(&stream, MAX_REQUEST_BYTES));
        reader.read_until(b'\n', &mut answer)?;
        let response: Response =
            serde_json::from_slice(&answer).map_err(|e| ClientError::Decode(e.to_string()))?;
        match (response.ok, response.result, response.error) {
            (true, Some(v), _) => Ok(v),
            (false, _, Some(e)) => Err(ClientError::Api(e)),
            _ => Err(ClientError::Api(ApiError::new(
                ErrorKind::Internal,
                "the answer has neither a result nor an error",
            ))),
        }
    }
}
