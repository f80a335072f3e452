//! The frame codec: a u32 big-endian length, then that many bytes of MessagePack.
//!
//! Decoding never panics and never allocates more than the frame's declared length,
//! which is checked against [`MAX_FRAME_BYTES`] before anything is read or allocated.

use serde::Deserialize;

use crate::messages::{Envelope, MESSAGE_TYPES};

/// Largest frame body accepted or produced (4 MiB). Data fields are chunked well below it.
pub const MAX_FRAME_BYTES: usize = 4 << 20;
/// Largest data payload in one message (1 MiB): stdin, output, file chunks.
pub const MAX_CHUNK_BYTES: usize = 1 << 20;
/// Length of the frame header.
pub const HEADER_BYTES: usize = 4;
/// Deepest MessagePack nesting accepted; real messages nest at most 4 levels.
const MAX_DEPTH: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("truncated frame: expected {expected} bytes, got {got}")]
    Truncated { expected: usize, got: usize },
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    Oversized { len: usize, max: usize },
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("unknown message type {type_name:?}")]
    UnknownMessage { id: Option<u64>, type_name: String },
    #[error("protocol version mismatch: this side speaks {ours}, the peer {theirs}")]
    VersionMismatch { ours: u32, theirs: u32 },
}

impl DecodeError {
    /// The protocol error code the agent answers with.
    pub fn code(&self) -> &'static str {
        use crate::messages::codes;
        match self {
            DecodeError::Truncated { .. } | DecodeError::Malformed(_) => codes::MALFORMED,
            DecodeError::Oversized { .. } => codes::TOO_LARGE,
            DecodeError::UnknownMessage { .. } => codes::UNKNOWN_MESSAGE,
            DecodeError::VersionMismatch { .. } => codes::VERSION_MISMATCH,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("message of {len} bytes exceeds the frame limit of {max} bytes")]
    Oversized { len: usize, max: usize },
    #[error("cannot encode message: {0}")]
    Serialize(String),
}

/// Encodes an envelope as one frame (header + body).
pub fn encode_frame(envelope: &Envelope) -> Result<Vec<u8>, EncodeError> {
    let mut out = vec![0u8; HEADER_BYTES];
    rmp_serde::encode::write_named(&mut out, envelope)
        .map_err(|e| EncodeError::Serialize(e.to_string()))?;
    let len = out.len() - HEADER_BYTES;
    if len > MAX_FRAME_BYTES {
        return Err(EncodeError::Oversized {
            len,
            max: MAX_FRAME_BYTES,
        });
    }
    // The check above bounds `len` to 4 MiB, so it fits in a u32.
    out[..HEADER_BYTES].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Validates a frame header; returns the body length.
pub fn body_length(header: [u8; HEADER_BYTES]) -> Result<usize, DecodeError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(DecodeError::Oversized {
            len,
            max: MAX_FRAME_BYTES,
        });
    }
    if len == 0 {
        return Err(DecodeError::Malformed("empty frame".into()));
    }
    Ok(len)
}

/// Decodes a frame body (without its header).
pub fn decode_body(body: &[u8]) -> Result<Envelope, DecodeError> {
    if body.len() > MAX_FRAME_BYTES {
        return Err(DecodeError::Oversized {
            len: body.len(),
            max: MAX_FRAME_BYTES,
        });
    }
    let mut de = rmp_serde::Deserializer::from_read_ref(body);
    de.set_max_depth(MAX_DEPTH);
    match Envelope::deserialize(&mut de) {
        Ok(envelope) => Ok(envelope),
        Err(err) => Err(classify(body, err)),
    }
}

/// Decodes one whole frame (header + body) from a buffer; returns the envelope and the
/// number of bytes consumed, or `Ok(None)` if the buffer does not yet hold a whole frame.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Envelope, usize)>, DecodeError> {
    let Some(header) = buf.first_chunk::<HEADER_BYTES>() else {
        return Ok(None);
    };
    let len = body_length(*header)?;
    let Some(body) = buf.get(HEADER_BYTES..HEADER_BYTES + len) else {
        return Ok(None);
    };
    Ok(Some((decode_body(body)?, HEADER_BYTES + len)))
}

/// Decodes exactly one frame from `buf`, which must hold nothing else: a short buffer is
/// a truncated frame, not "need more data".
pub fn decode_complete_frame(buf: &[u8]) -> Result<Envelope, DecodeError> {
    let Some(header) = buf.first_chunk::<HEADER_BYTES>() else {
        return Err(DecodeError::Truncated {
            expected: HEADER_BYTES,
            got: buf.len(),
        });
    };
    let len = body_length(*header)?;
    let got = buf.len() - HEADER_BYTES;
    if got < len {
        return Err(DecodeError::Truncated { expected: len, got });
    }
    if got > len {
        return Err(DecodeError::Malformed(format!(
            "{} bytes after the end of the frame",
            got - len
        )));
    }
    decode_body(&buf[HEADER_BYTES..])
}

/// Only what is needed to tell an unknown message type from a malformed one.
#[derive(Deserialize)]
struct RawEnvelope {
    id: Option<u64>,
    body: RawBody,
}

#[derive(Deserialize)]
struct RawBody {
    #[serde(rename = "type")]
    type_name: String,
}

fn classify(body: &[u8], err: rmp_serde::decode::Error) -> DecodeError {
    let mut de = rmp_serde::Deserializer::from_read_ref(body);
    de.set_max_depth(MAX_DEPTH);
    if let Ok(raw) = RawEnvelope::deserialize(&mut de) {
        if !MESSAGE_TYPES.contains(&raw.body.type_name.as_str()) {
            let mut type_name = raw.body.type_name;
            truncate_utf8(&mut type_name, 64);
            return DecodeError::UnknownMessage {
                id: raw.id,
                type_name,
            };
        }
    }
    let mut text = err.to_string();
    truncate_utf8(&mut text, 256);
    DecodeError::Malformed(text)
}

/// Keeps error messages bounded when they quote peer input.
fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
}

/// Best-effort request id of a body that failed to decode, so the error reply can be
/// matched to the request.
pub fn peek_id(body: &[u8]) -> Option<u64> {
    #[derive(Deserialize)]
    struct IdOnly {
        id: u64,
    }
    let mut de = rmp_serde::Deserializer::from_read_ref(body);
    de.set_max_depth(MAX_DEPTH);
    IdOnly::deserialize(&mut de).ok().map(|v| v.id)
}
