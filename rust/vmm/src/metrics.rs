//! Counters the VMM keeps while the guest runs, and the report the API returns.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use serde::Serialize;

use crate::devices::serial_output::SerialCounters;
use crate::devices::UnclaimedAccesses;

static PROCESS_START: OnceLock<Instant> = OnceLock::new();

/// Records when the process started; call first thing in `main`.
pub fn mark_process_start() {
    let _ = PROCESS_START.set(Instant::now());
}

/// Microseconds since `mark_process_start` (or since the first call to this).
pub fn micros_since_start() -> u64 {
    PROCESS_START
        .get_or_init(Instant::now)
        .elapsed()
        .as_micros() as u64
}

/// This process's user + system CPU time and peak RSS.
pub fn process_usage() -> (u64, u64) {
    // SAFETY: rusage is plain old data that getrusage fills.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return (0, 0);
    }
    let micros = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    (
        micros(ru.ru_utime) + micros(ru.ru_stime),
        ru.ru_maxrss as u64 * 1024,
    )
}

#[derive(Debug, Default)]
pub struct ExitCounters {
    pub io_in: AtomicU64,
    pub io_out: AtomicU64,
    pub mmio_read: AtomicU64,
    pub mmio_write: AtomicU64,
    /// KVM_RUN returned early because a controller kicked the vCPU.
    pub interrupted: AtomicU64,
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub exits: ExitCounters,
    pub serial: Arc<SerialCounters>,
    first_exit_us: AtomicU64,
    first_exit_cpu_us: AtomicU64,
    started_us: AtomicU64,
}

impl Metrics {
    /// Notes the first exit from guest code: proof the guest ran its first instructions.
    pub fn note_exit(&self) {
        if self.first_exit_us.load(Ordering::Relaxed) != 0 {
            return;
        }
        let now = micros_since_start().max(1);
        if self
            .first_exit_us
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.first_exit_cpu_us
                .store(process_usage().0, Ordering::Relaxed);
        }
    }

    pub fn note_start(&self) {
        self.started_us
            .store(micros_since_start(), Ordering::Relaxed);
    }

    pub fn report(
        &self,
        unclaimed: Option<&UnclaimedAccesses>,
        guest_memory_bytes: u64,
    ) -> MetricsReport {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let opt = |v: u64| (v != 0).then_some(v);
        let (cpu_us, max_rss_bytes) = process_usage();
        MetricsReport {
            uptime_us: micros_since_start(),
            cpu_us,
            max_rss_bytes,
            guest_memory_bytes,
            start_us: opt(get(&self.started_us)),
            first_exit_us: opt(get(&self.first_exit_us)),
            first_exit_cpu_us: opt(get(&self.first_exit_cpu_us)),
            exits_io_in: get(&self.exits.io_in),
            exits_io_out: get(&self.exits.io_out),
            exits_mmio_read: get(&self.exits.mmio_read),
            exits_mmio_write: get(&self.exits.mmio_write),
            exits_interrupted: get(&self.exits.interrupted),
            unclaimed_pio_reads: unclaimed.map_or(0, |u| get(&u.pio_reads)),
            unclaimed_pio_writes: unclaimed.map_or(0, |u| get(&u.pio_writes)),
            unclaimed_mmio_reads: unclaimed.map_or(0, |u| get(&u.mmio_reads)),
            unclaimed_mmio_writes: unclaimed.map_or(0, |u| get(&u.mmio_writes)),
            serial_bytes: get(&self.serial.bytes),
            serial_dropped_bytes: get(&self.serial.dropped),
        }
    }
}

/// The `metrics` answer. Times are microseconds since the VMM process started.
#[derive(Debug, Clone, Serialize)]
pub struct MetricsReport {
    pub uptime_us: u64,
    /// User + system CPU time of the whole VMM process (vCPU threads included).
    pub cpu_us: u64,
    /// Peak resident set of the process, guest memory the guest touched included.
    pub max_rss_bytes: u64,
    pub guest_memory_bytes: u64,
    /// When `start` began building the VM.
    pub start_us: Option<u64>,
    /// When the guest first exited to the VMM (its first instructions had run).
    pub first_exit_us: Option<u64>,
    /// Process CPU time spent up to that first exit.
    pub first_exit_cpu_us: Option<u64>,
    pub exits_io_in: u64,
    pub exits_io_out: u64,
    pub exits_mmio_read: u64,
    pub exits_mmio_write: u64,
    pub exits_interrupted: u64,
    pub unclaimed_pio_reads: u64,
    pub unclaimed_pio_writes: u64,
    pub unclaimed_mmio_reads: u64,
    pub unclaimed_mmio_writes: u64,
    pub serial_bytes: u64,
    pub serial_dropped_bytes: u64,
}
