//! Where the guest's serial console goes: a log file, a unix socket, this process's
//! stdout, or nowhere. Output is capped so a chatty guest cannot fill the host's disk;
//! bytes past the cap are counted as dropped.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tartarus_vmm_api::config::SerialConfig;

#[derive(Debug, Default)]
pub struct SerialCounters {
    pub bytes: AtomicU64,
    pub dropped: AtomicU64,
}

enum Sink {
    None,
    File(File),
    Socket(UnixStream),
    Stdout,
}

pub struct SerialOutput {
    sink: Sink,
    limit: u64,
    counters: Arc<SerialCounters>,
}

impl SerialOutput {
    pub fn open(
        config: &SerialConfig,
        limit: u64,
        counters: Arc<SerialCounters>,
    ) -> io::Result<Self> {
        let sink = match config {
            SerialConfig::None => Sink::None,
            SerialConfig::File { path } => Sink::File(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?,
            ),
            SerialConfig::Socket { path } => Sink::Socket(
                UnixStream::connect(path)
                    .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?,
            ),
            SerialConfig::Stdout => Sink::Stdout,
        };
        Ok(SerialOutput {
            sink,
            limit,
            counters,
        })
    }
}

impl Write for SerialOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.counters.bytes.load(Ordering::Relaxed);
        let room = self.limit.saturating_sub(written) as usize;
        let take = buf.len().min(room);
        self.counters
            .dropped
            .fetch_add((buf.len() - take) as u64, Ordering::Relaxed);
        if take > 0 {
            let data = &buf[..take];
            // A sink that fails (socket peer gone, disk full) must not stop the guest:
            // the bytes are counted as dropped instead.
            let ok = match &mut self.sink {
                Sink::None => true,
                Sink::File(f) => f.write_all(data).is_ok(),
                Sink::Socket(s) => s.write_all(data).is_ok(),
                Sink::Stdout => io::stdout().write_all(data).is_ok(),
            };
            if ok {
                self.counters
                    .bytes
                    .fetch_add(take as u64, Ordering::Relaxed);
            } else {
                self.counters
                    .dropped
                    .fetch_add(take as u64, Ordering::Relaxed);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.sink {
            Sink::File(f) => f.flush(),
            Sink::Stdout => io::stdout().flush(),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_past_the_limit_is_dropped_and_counted() {
        let dir = std::env::temp_dir().join(format!("tartarus-serial-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("serial.log");
        let counters = Arc::new(SerialCounters::default());
        let mut out = SerialOutput::open(
            &SerialConfig::File { path: path.clone() },
            5,
            counters.clone(),
        )
        .unwrap();
        out.write_all(b"hello world").unwrap();
        out.flush().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"hello");
        assert_eq!(counters.bytes.load(Ordering::Relaxed), 5);
        assert_eq!(counters.dropped.load(Ordering::Relaxed), 6);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_missing_socket_is_an_error_not_a_panic() {
        let cfg = SerialConfig::Socket {
            path: "/nonexistent/serial.sock".into(),
        };
        assert!(SerialOutput::open(&cfg, 1, Arc::default()).is_err());
    }
}
