//! The per-device worker thread: serves the guest's queue notifications, polls the
//! device's host-side file descriptors (sockets) and deadlines (rate-limit refills).
//!
//! A QueueNotify write on a vCPU thread only records the queue and writes the worker's
//! wake eventfd, so device I/O (files, sockets, allocations) happens here, under the
//! VMM's wider API seccomp filter, and vCPU threads keep their narrow one.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::VirtioDevice;
use super::mmio::MmioTransport;

/// Stops and joins its thread when dropped.
pub struct DeviceWorker {
    stop: Arc<EventFd>,
    handle: Option<JoinHandle<()>>,
}

impl DeviceWorker {
    pub fn spawn<D: VirtioDevice + 'static>(
        name: &str,
        transport: Arc<Mutex<MmioTransport<D>>>,
    ) -> io::Result<Self> {
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        lock(&transport).set_wake(wake.clone());
        let thread_stop = stop.clone();
        let handle = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || run(&transport, &thread_stop, &wake))?;
        Ok(DeviceWorker {
            stop,
            handle: Some(handle),
        })
    }
}

impl Drop for DeviceWorker {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves registers consistent enough to keep serving.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn run<D: VirtioDevice>(transport: &Mutex<MmioTransport<D>>, stop: &EventFd, wake: &EventFd) {
    // Work that predates the worker (a restored device's reset event) is served first.
    lock(transport).process_backend();
    loop {
        let (fds, deadline) = lock(transport).backend_wait();
        let mut pollfds: Vec<libc::pollfd> = [stop.as_raw_fd(), wake.as_raw_fd()]
            .into_iter()
            .map(|fd| (fd, libc::POLLIN))
            .chain(fds)
            .map(|(fd, events)| libc::pollfd {
                fd,
                events,
                revents: 0,
            })
            .collect();
        let timeout_ms = deadline.map_or(-1, |at| {
            let wait = at.saturating_duration_since(Instant::now());
            i32::try_from(wait.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
        });
        // SAFETY: `pollfds` is a live, correctly sized array of pollfd for the call.
        let n = unsafe {
            libc::poll(
                pollfds.as_mut_ptr(),
                pollfds.len() as libc::nfds_t,
                timeout_ms,
            )
        };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if pollfds[0].revents != 0 {
            return;
        }
        if pollfds[1].revents != 0 {
            let _ = wake.read();
        }
        lock(transport).process_backend();
    }
}
