//! Wire types shared by the Tartarus agent, VMM and core: the agent protocol.
//!
//! A connection carries frames (`u32` big-endian length + MessagePack body, see
//! [`frame`]); each frame is an [`Envelope`] with a request id and a [`Message`]. The
//! client opens with [`Message::Hello`]; the agent answers [`Message::HelloOk`] or a
//! `version_mismatch` error. The full specification is `docs/protocol.md`.

pub mod frame;
pub mod messages;
pub mod vectors;

pub use frame::{
    body_length, decode_body, decode_complete_frame, decode_frame, encode_frame, peek_id,
    DecodeError, EncodeError, HEADER_BYTES, MAX_CHUNK_BYTES, MAX_FRAME_BYTES,
};
pub use messages::*;

/// Version of the agent wire protocol; bumped on incompatible changes.
pub const PROTOCOL_VERSION: u32 = 1;

/// Checks a peer's hello against our version.
pub fn check_version(theirs: u32) -> Result<(), DecodeError> {
    if theirs == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(DecodeError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs,
        })
    }
}
