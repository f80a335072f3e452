//! `tartarus-jail relay unix:PATH`: joins its stdin and stdout to a unix socket.
//!
//! gVisor cannot checkpoint a sandbox holding a host-backed socket, so the agent
//! inside listens on a socket of the sandbox's own and the host reaches it through
//! this relay, started with `runsc exec` (whose stdio are plain pipes).

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// Connects (retrying while the socket does not exist yet or refuses, up to
/// `timeout`), then copies both ways until either side closes.
pub fn relay(path: &str, timeout: Duration) -> std::io::Result<()> {
    let deadline = Instant::now() + timeout;
    let stream = loop {
        match UnixStream::connect(path) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline && is_not_ready(&e) => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("connect {path}: {e}"),
                ))
            }
        }
    };
    let mut to_socket = stream.try_clone()?;
    let upstream = std::thread::spawn(move || {
        let _ = copy(&mut std::io::stdin().lock(), &mut to_socket);
        let _ = to_socket.shutdown(Shutdown::Write);
    });
    let mut from_socket = stream;
    let result = copy(&mut from_socket, &mut std::io::stdout().lock());
    drop(upstream);
    result
}

fn is_not_ready(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
    )
}

/// Copies with a flush after every read, so frames are not held back.
fn copy(from: &mut impl Read, to: &mut impl Write) -> std::io::Result<()> {
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        to.flush()?;
    }
}
