//! Descriptor-chain validation: the first thing a device does with a driver's request.
//!
//! virtio-queue's chain iterator stops quietly on a loop, an out-of-range `next` index
//! or an unreadable descriptor. A device must not mistake such a truncated chain for a
//! complete request, so [`ValidChain::parse`] walks the chain, rejects it unless its last
//! descriptor ends it, and checks every buffer against guest memory and the spec's rule
//! that device-readable buffers come before device-writable ones.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// One guest buffer of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// Why a descriptor chain was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("descriptor chain is truncated (loop, bad next index or unreadable descriptor)")]
    Truncated,
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    #[error("buffer {addr:#x}+{len} is outside guest memory")]
    OutOfMemory { addr: u64, len: u32 },
    #[error("descriptor chain carries more than {0} bytes")]
    TooLong(u64),
}

/// A chain whose buffers all lie in guest memory, readable ones first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidChain {
    pub head: u16,
    pub readable: Vec<Segment>,
    pub writable: Vec<Segment>,
}

impl ValidChain {
    /// Walks `chain` and validates it; `max_bytes` bounds the total buffer length.
    pub fn parse<M>(chain: DescriptorChain<M>, max_bytes: u64) -> Result<Self, ChainError>
    where
        M: Deref<Target = GuestMemoryMmap>,
    {
        let head = chain.head_index();
        let mem = chain.memory().clone();
        let mut readable = Vec::new();
        let mut writable = Vec::new();
        let mut total = 0u64;
        let mut ended = false;
        for desc in chain {
            total += u64::from(desc.len());
            if total > max_bytes {
                return Err(ChainError::TooLong(max_bytes));
            }
            let seg = Segment {
                addr: desc.addr(),
                len: desc.len(),
            };
            if seg.len > 0 && !mem.check_range(seg.addr, seg.len as usize) {
                return Err(ChainError::OutOfMemory {
                    addr: seg.addr.raw_value(),
                    len: seg.len,
                });
            }
            if desc.is_write_only() {
                writable.push(seg);
            } else if writable.is_empty() {
                readable.push(seg);
            } else {
                return Err(ChainError::ReadableAfterWritable);
            }
            ended = !desc.has_next();
        }
        if !ended {
            return Err(ChainError::Truncated);
        }
        Ok(ValidChain {
            head,
            readable,
            writable,
        })
    }

    pub fn readable_len(&self) -> u64 {
        total_len(&self.readable)
    }

    pub fn writable_len(&self) -> u64 {
        total_len(&self.writable)
    }

    /// Reads device-readable bytes starting `offset` bytes into the chain's readable part.
    /// Returns how many bytes were read (fewer than `buf.len()` at the end of the chain).
    pub fn read_at(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, String> {
        let mut done = 0usize;
        for_each_piece(&self.readable, offset, buf.len(), |addr, at, len| {
            mem.read_slice(&mut buf[at..at + len], addr)
                .map_err(|e| e.to_string())?;
            done = at + len;
            Ok(())
        })?;
        Ok(done)
    }

    /// Writes `data` into the device-writable part starting at `offset`.
    /// Returns how many bytes fit.
    pub fn write_at(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        data: &[u8],
    ) -> Result<usize, String> {
        let mut done = 0usize;
        for_each_piece(&self.writable, offset, data.len(), |addr, at, len| {
            mem.write_slice(&data[at..at + len], addr)
                .map_err(|e| e.to_string())?;
            done = at + len;
            Ok(())
        })?;
        Ok(done)
    }
}

fn total_len(segments: &[Segment]) -> u64 {
    segments.iter().map(|s| u64::from(s.len)).sum()
}

/// Calls `f(guest_addr, buf_offset, len)` for each contiguous piece of the byte range
/// `[offset, offset + len)` of the concatenated `segments`.
fn for_each_piece(
    segments: &[Segment],
    offset: u64,
    len: usize,
    mut f: impl FnMut(GuestAddress, usize, usize) -> Result<(), String>,
) -> Result<(), String> {
    let mut skip = offset;
    let mut at = 0usize;
    for seg in segments {
        if at == len {
            break;
        }
        let seg_len = u64::from(seg.len);
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        // `skip < seg_len <= u32::MAX`, so these fit in usize.
        let avail = (seg_len - skip) as usize;
        let n = avail.min(len - at);
        let addr = seg
            .addr
            .checked_add(skip)
            .ok_or_else(|| "guest address overflow".to_string())?;
        f(addr, at, n)?;
        at += n;
        skip = 0;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segs(lens: &[u32]) -> Vec<Segment> {
        let mut addr = 0x1000;
        lens.iter()
            .map(|&len| {
                let s = Segment {
                    addr: GuestAddress(addr),
                    len,
                };
                addr += 0x1000;
                s
            })
            .collect()
    }

    #[test]
    fn pieces_span_segments() {
        let mut seen = Vec::new();
        for_each_piece(&segs(&[4, 4, 4]), 2, 7, |a, at, n| {
            seen.push((a.raw_value(), at, n));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, vec![(0x1002, 0, 2), (0x2000, 2, 4), (0x3000, 6, 1)]);
    }

    #[test]
    fn pieces_stop_at_the_end() {
        let mut total = 0;
        for_each_piece(&segs(&[4]), 3, 100, |_, _, n| {
            total += n;
            Ok(())
        })
        .unwrap();
        assert_eq!(total, 1);
    }
}
