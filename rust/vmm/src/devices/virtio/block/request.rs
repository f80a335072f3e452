//! virtio-blk request parsing: a validated chain becomes a request or a refusal.
//!
//! Layout (virtio 1.2 section 5.2.6): a 16-byte device-readable header (type, reserved,
//! sector), data buffers (device-readable for writes, device-writable for reads), and
//! a final device-writable status byte. Every length and sector range is checked with
//! overflow-safe arithmetic against the disk's capacity before any I/O happens.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use vm_memory::GuestMemoryMmap;

use crate::devices::virtio::chain::ValidChain;

pub const SECTOR_SIZE: u64 = 512;
pub const HEADER_LEN: u64 = 16;
/// Largest data transfer one request may carry.
pub const MAX_REQUEST_BYTES: u64 = 32 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    In,
    Out,
    Flush,
    GetId,
}

/// A request whose sectors and buffers have been checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestKind,
    pub sector: u64,
    /// Bytes of data to transfer (0 for flush).
    pub data_len: u64,
    pub chain: ValidChain,
}

/// Why a request was refused. `status_writable` tells whether a status byte can be
/// reported (otherwise the chain is returned with nothing written).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("request has no 16-byte header")]
    NoHeader,
    #[error("request has no writable status byte")]
    NoStatus,
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    #[error("data buffers point the wrong way for this request type")]
    WrongDirection,
    #[error("data length {0} is not a whole number of sectors")]
    PartialSector(u64),
    #[error("sectors {sector}..+{len} bytes are beyond the disk's end")]
    OutOfRange { sector: u64, len: u64 },
    #[error("request of {0} bytes exceeds the {MAX_REQUEST_BYTES}-byte limit")]
    TooLarge(u64),
    #[error("header unreadable: {0}")]
    Memory(String),
}

impl RequestError {
    /// Whether the driver can be told through the status byte.
    pub fn has_status(&self) -> bool {
        !matches!(self, RequestError::NoStatus)
    }
}

/// Parses and validates a request against a disk of `capacity_sectors`.
pub fn parse(
    chain: ValidChain,
    mem: &GuestMemoryMmap,
    capacity_sectors: u64,
) -> Result<Request, RequestError> {
    if chain.writable_len() == 0 {
        return Err(RequestError::NoStatus);
    }
    if chain.readable_len() < HEADER_LEN {
        return Err(RequestError::NoHeader);
    }
    let mut header = [0u8; HEADER_LEN as usize];
    let n = chain
        .read_at(mem, 0, &mut header)
        .map_err(RequestError::Memory)?;
    if n != header.len() {
        return Err(RequestError::NoHeader);
    }
    let kind_raw = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let extra_readable = chain.readable_len() - HEADER_LEN;
    let writable_data = chain.writable_len() - 1;
    let (kind, data_len) = match kind_raw {
        VIRTIO_BLK_T_IN => {
            if extra_readable != 0 {
                return Err(RequestError::WrongDirection);
            }
            (RequestKind::In, writable_data)
        }
        VIRTIO_BLK_T_OUT => {
            if writable_data != 0 {
                return Err(RequestError::WrongDirection);
            }
            (RequestKind::Out, extra_readable)
        }
        VIRTIO_BLK_T_FLUSH => {
            if extra_readable != 0 || writable_data != 0 {
                return Err(RequestError::WrongDirection);
            }
            (RequestKind::Flush, 0)
        }
        VIRTIO_BLK_T_GET_ID => {
            if extra_readable != 0 {
                return Err(RequestError::WrongDirection);
            }
            (RequestKind::GetId, writable_data)
        }
        other => return Err(RequestError::Unsupported(other)),
    };
    if matches!(kind, RequestKind::In | RequestKind::Out) {
        if data_len > MAX_REQUEST_BYTES {
            return Err(RequestError::TooLarge(data_len));
        }
        if data_len % SECTOR_SIZE != 0 {
            return Err(RequestError::PartialSector(data_len));
        }
        let end = sector.checked_add(data_len / SECTOR_SIZE);
        if end.is_none_or(|end| end > capacity_sectors) {
            return Err(RequestError::OutOfRange {
                sector,
                len: data_len,
            });
        }
    }
    Ok(Request {
        kind,
        sector,
        data_len,
        chain,
    })
}
