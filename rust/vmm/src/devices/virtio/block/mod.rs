//! virtio-blk over a host file: the template's ext4 image read-only as the root disk,
//! and per-sandbox writable scratch disks ([`scratch`], "Lethe").
//!
//! Requests are served on the thread that delivers the notification (the vCPU thread
//! for a QueueNotify write). A rate-limited disk parks a request that finds its bucket
//! empty and its worker retries it when the bucket has refilled.

pub mod request;
pub mod scratch;
#[cfg(test)]
mod tests;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tartarus_vmm_api::config::RateLimit;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use self::request::{parse, Request, RequestError, RequestKind, MAX_REQUEST_BYTES, SECTOR_SIZE};
use super::chain::ValidChain;
use super::device::{add_used, DeviceError, QueueContext, VirtioDevice};
use super::rate_limiter::RateLimiter;

pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 1] = [QUEUE_SIZE];
/// Bounce-buffer size: guest data moves through it in pieces this large.
const CHUNK: usize = 1 << 20;

/// How a disk is attached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockConfig {
    pub path: PathBuf,
    pub read_only: bool,
    /// Up to 20 bytes the guest reads with GET_ID (shows up as the disk's serial).
    pub id: String,
    #[serde(default)]
    pub rate_limit: RateLimit,
}

/// Counters exported as metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockStats {
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub requests: u64,
    pub refused: u64,
    pub throttled: u64,
}

/// What a snapshot records: enough to check the same disk is attached on restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub capacity_sectors: u64,
    pub read_only: bool,
    pub stats: BlockStats,
}

pub struct Block {
    file: File,
    config: BlockConfig,
    capacity_sectors: u64,
    limiter: RateLimiter,
    throttled_until: Option<Instant>,
    stats: BlockStats,
}

#[derive(Debug, thiserror::Error)]
pub enum BlockOpenError {
    #[error("cannot open disk image {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk image {0} is smaller than one sector")]
    Empty(PathBuf),
}

impl Block {
    pub fn open(config: BlockConfig) -> Result<Self, BlockOpenError> {
        let file = open_disk(&config.path, config.read_only)?;
        let len = file
            .metadata()
            .map_err(|source| BlockOpenError::Open {
                path: config.path.clone(),
                source,
            })?
            .len();
        let capacity_sectors = len / SECTOR_SIZE;
        if capacity_sectors == 0 {
            return Err(BlockOpenError::Empty(config.path.clone()));
        }
        Ok(Block {
            file,
            limiter: RateLimiter::new(config.rate_limit, Instant::now()),
            config,
            capacity_sectors,
            throttled_until: None,
            stats: BlockStats::default(),
        })
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    pub fn stats(&self) -> BlockStats {
        self.stats
    }

    /// Serves the request queue until it is empty or the rate limiter says stop.
    fn process(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, DeviceError> {
        let mut used = false;
        // Bounded: a driver that keeps refilling the ring cannot pin this thread.
        for _ in 0..queue.size() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let chain = match ValidChain::parse(chain, MAX_REQUEST_BYTES + 4096) {
                Ok(chain) => chain,
                Err(_) => {
                    // Nothing in this chain can be trusted, not even its status byte.
                    self.stats.refused += 1;
                    add_used(queue, mem, head, 0)?;
                    used = true;
                    continue;
                }
            };
            let len = match parse(chain.clone(), mem, self.capacity_sectors) {
                Ok(req) => {
                    if let Err(retry_at) = self.limiter.consume(1, req.data_len, Instant::now()) {
                        queue.go_to_previous_position();
                        self.throttled_until = Some(retry_at);
                        self.stats.throttled += 1;
                        break;
                    }
                    self.stats.requests += 1;
                    self.execute(&req, mem)
                }
                Err(e) => {
                    self.stats.refused += 1;
                    refuse(&chain, mem, &e)
                }
            };
            add_used(queue, mem, head, len)?;
            used = true;
        }
        if used {
            return queue
                .needs_notification(mem)
                .map_err(|e| DeviceError::Memory(e.to_string()));
        }
        Ok(false)
    }

    /// Runs a valid request; returns the number of bytes written to guest buffers.
    fn execute(&mut self, req: &Request, mem: &GuestMemoryMmap) -> u32 {
        let status_offset = req.chain.writable_len() - 1;
        let (status, written) = match self.transfer(req, mem) {
            Ok(written) => (VIRTIO_BLK_S_OK, written),
            Err(_) => (VIRTIO_BLK_S_IOERR, 0),
        };
        let _ = req.chain.write_at(mem, status_offset, &[status as u8]);
        // The used length counts every byte the device wrote: data plus status.
        u32::try_from(written + 1).unwrap_or(u32::MAX)
    }

    fn transfer(&mut self, req: &Request, mem: &GuestMemoryMmap) -> Result<u64, String> {
        let base = req.sector * SECTOR_SIZE;
        match req.kind {
            RequestKind::In => {
                let mut buf = vec![0u8; CHUNK.min(req.data_len as usize)];
                let mut done = 0u64;
                while done < req.data_len {
                    let n = (req.data_len - done).min(CHUNK as u64) as usize;
                    self.file
                        .read_exact_at(&mut buf[..n], base + done)
                        .map_err(|e| e.to_string())?;
                    req.chain.write_at(mem, done, &buf[..n])?;
                    done += n as u64;
                }
                self.stats.read_bytes += done;
                Ok(done)
            }
            RequestKind::Out => {
                if self.config.read_only {
                    return Err("write to a read-only disk".into());
                }
                let mut buf = vec![0u8; CHUNK.min(req.data_len as usize)];
                let mut done = 0u64;
                while done < req.data_len {
                    let n = (req.data_len - done).min(CHUNK as u64) as usize;
                    let got = req
                        .chain
                        .read_at(mem, request::HEADER_LEN + done, &mut buf[..n])?;
                    if got != n {
                        return Err("short data buffer".into());
                    }
                    self.file
                        .write_all_at(&buf[..n], base + done)
                        .map_err(|e| e.to_string())?;
                    done += n as u64;
                }
                self.stats.write_bytes += done;
                Ok(0)
            }
            RequestKind::Flush => {
                if !self.config.read_only {
                    self.file.sync_data().map_err(|e| e.to_string())?;
                }
                Ok(0)
            }
            RequestKind::GetId => {
                let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
                let bytes = self.config.id.as_bytes();
                let n = bytes.len().min(id.len());
                id[..n].copy_from_slice(&bytes[..n]);
                let n = (req.data_len as usize).min(id.len());
                req.chain.write_at(mem, 0, &id[..n])?;
                Ok(n as u64)
            }
        }
    }
}

fn open_disk(path: &Path, read_only: bool) -> Result<File, BlockOpenError> {
    OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(|source| BlockOpenError::Open {
            path: path.to_path_buf(),
            source,
        })
}

/// Reports a refused request through its status byte, when it has one.
fn refuse(chain: &ValidChain, mem: &GuestMemoryMmap, e: &RequestError) -> u32 {
    if !e.has_status() {
        return 0;
    }
    let status = match e {
        RequestError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP,
        _ => VIRTIO_BLK_S_IOERR,
    };
    match chain.write_at(mem, chain.writable_len() - 1, &[status as u8]) {
        Ok(1) => 1,
        _ => 0,
    }
}

impl VirtioDevice for Block {
    type State = BlockState;

    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_BLK_F_SEG_MAX) | (1u64 << VIRTIO_BLK_F_BLK_SIZE);
        f |= if self.config.read_only {
            1u64 << VIRTIO_BLK_F_RO
        } else {
            1u64 << VIRTIO_BLK_F_FLUSH
        };
        f
    }

    fn config_space(&self) -> Vec<u8> {
        // struct virtio_blk_config: capacity, size_max, seg_max, geometry, blk_size.
        let mut c = Vec::with_capacity(24);
        c.extend_from_slice(&self.capacity_sectors.to_le_bytes());
        c.extend_from_slice(&0u32.to_le_bytes());
        c.extend_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        c.extend_from_slice(&0u32.to_le_bytes());
        c.extend_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c
    }

    fn activate(&mut self, _acked_features: u64) -> Result<(), DeviceError> {
        Ok(())
    }

    fn process_queue(&mut self, queue: usize, ctx: QueueContext<'_>) -> Result<bool, DeviceError> {
        if self.throttled_until.is_some() {
            // The worker resumes the queue when the bucket refills.
            return Ok(false);
        }
        let q = ctx
            .queues
            .get_mut(queue)
            .ok_or(DeviceError::QueueNotReady(queue))?;
        self.process(q, ctx.mem)
    }

    fn reset(&mut self) {
        self.throttled_until = None;
    }

    fn backend_deadline(&self) -> Option<Instant> {
        self.throttled_until
    }

    fn process_backend(&mut self, ctx: QueueContext<'_>) -> Result<bool, DeviceError> {
        match self.throttled_until {
            Some(at) if at <= Instant::now() => {
                self.throttled_until = None;
                self.process(&mut ctx.queues[0], ctx.mem)
            }
            _ => Ok(false),
        }
    }

    fn save(&self) -> BlockState {
        BlockState {
            capacity_sectors: self.capacity_sectors,
            read_only: self.config.read_only,
            stats: self.stats,
        }
    }

    fn restore(&mut self, state: BlockState) -> Result<(), DeviceError> {
        if state.capacity_sectors != self.capacity_sectors
            || state.read_only != self.config.read_only
        {
            return Err(DeviceError::State(format!(
                "snapshot disk had {} sectors (read-only {}), attached disk has {} (read-only {})",
                state.capacity_sectors,
                state.read_only,
                self.capacity_sectors,
                self.config.read_only
            )));
        }
        self.stats = state.stats;
        Ok(())
    }
}
