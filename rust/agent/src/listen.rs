//! Where the agent takes its connection: a unix socket or vsock port it listens on, its
//! own stdin/stdout, or a unix socket of the host's that it dials (gVisor: the host
//! listens on a socket in a directory bound into the sandbox, `runsc --host-uds=open`).

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{
    accept4, bind, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};
use tokio::net::{UnixListener, UnixStream};

use crate::conn::{serve, Agent, Linger};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Unix(PathBuf),
    Vsock(u32),
    Stdio,
    /// Connects out to this socket, and again whenever the connection ends.
    Dial(PathBuf),
}

/// Redialling: every `DIAL_FAST` while the host is expected back at once (it hangs up
/// around a checkpoint and listens again right after the restore, so this bounds what
/// a restore waits for the agent), then every `DIAL_SLOW` (the host is down for longer,
/// e.g. a server restart). Counted in attempts, not time: a sandbox restored long after
/// its checkpoint must not find its clock has moved it to the slow pace.
const DIAL_FAST: Duration = Duration::from_millis(1);
const DIAL_FAST_ATTEMPTS: u32 = 5000;
const DIAL_SLOW: Duration = Duration::from_millis(100);

impl std::str::FromStr for Listen {
    type Err = String;

    fn from_str(spec: &str) -> Result<Self, String> {
        if spec == "stdio" {
            return Ok(Listen::Stdio);
        }
        if let Some(path) = spec.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path, e.g. unix:/run/agent.sock".into());
            }
            return Ok(Listen::Unix(PathBuf::from(path)));
        }
        if let Some(path) = spec.strip_prefix("dial:") {
            if path.is_empty() {
                return Err("dial: needs a socket path, e.g. dial:/run/host/agent.sock".into());
            }
            return Ok(Listen::Dial(PathBuf::from(path)));
        }
        if let Some(port) = spec.strip_prefix("vsock:") {
            return port
                .parse()
                .map(Listen::Vsock)
                .map_err(|_| format!("vsock:{port}: the port must be a number"));
        }
        Err(format!(
            "cannot listen on {spec:?}: expected unix:PATH, vsock:PORT, dial:PATH or stdio"
        ))
    }
}

/// Accepts connections until the agent shuts down (or, for stdio, serves one).
pub async fn run(agent: Arc<Agent>, listen: Listen) -> io::Result<()> {
    match listen {
        Listen::Stdio => {
            serve(
                agent.clone(),
                tokio::io::stdin(),
                tokio::io::stdout(),
                Linger::Answer,
            )
            .await;
            // The one connection is gone: nobody can reach the processes any more.
            agent.shutdown.send_replace(Some(0.0));
            Ok(())
        }
        Listen::Unix(path) => {
            // Replace a stale socket from an earlier run, never another kind of file.
            if let Ok(meta) = std::fs::symlink_metadata(&path) {
                if meta.file_type().is_socket() {
                    std::fs::remove_file(&path)?;
                }
            }
            let listener = UnixListener::bind(&path).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot listen on {}: {e}", path.display()),
                )
            })?;
            loop {
                let (stream, _) = listener.accept().await?;
                let (r, w) = stream.into_split();
                tokio::spawn(serve(agent.clone(), r, w, Linger::Answer));
            }
        }
        Listen::Dial(path) => loop {
            let stream = dial(&path).await;
            let (r, w) = stream.into_split();
            // One connection at a time: the next dial waits until the host hangs up.
            serve(agent.clone(), r, w, Linger::None).await;
        },
        Listen::Vsock(port) => {
            let fd = socket(
                AddressFamily::Vsock,
                SockType::Stream,
                SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
                None,
            )
            .map_err(|e| io::Error::other(format!("vsock socket: {e}")))?;
            bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))
                .map_err(|e| io::Error::other(format!("bind vsock:{port}: {e}")))?;
            nix::sys::socket::listen(&fd, Backlog::new(128).unwrap_or(Backlog::MAXCONN))?;
            let listener = crate::fdio::register(fd)?;
            loop {
                let mut guard = listener.readable().await?;
                let accepted = guard.try_io(|fd| {
                    accept4(
                        fd.get_ref(),
                        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
                    )
                    .map_err(io::Error::from)
                });
                let Ok(result) = accepted else { continue };
                let owned = match result {
                    Ok(owned) => owned,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        eprintln!("tartarus-agent: vsock accept: {e}");
                        continue;
                    }
                };
                // A connected vsock socket reads and writes like a unix stream socket;
                // tokio only needs the descriptor, never its address.
                let stream = UnixStream::from_std(std::os::unix::net::UnixStream::from(owned))?;
                let (r, w) = stream.into_split();
                tokio::spawn(serve(agent.clone(), r, w, Linger::Answer));
            }
        }
    }
}

/// Connects to `path`, retrying until the host listens there.
async fn dial(path: &std::path::Path) -> UnixStream {
    let mut failures: u32 = 0;
    loop {
        match UnixStream::connect(path).await {
            Ok(stream) => return stream,
            Err(e) => {
                let expected = matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                );
                if !expected && failures == 0 {
                    eprintln!("tartarus-agent: dial {}: {e}", path.display());
                }
                failures = failures.saturating_add(1);
                let pause = if failures < DIAL_FAST_ATTEMPTS {
                    DIAL_FAST
                } else {
                    DIAL_SLOW
                };
                tokio::time::sleep(pause).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_specs_parse() {
        assert_eq!("stdio".parse::<Listen>(), Ok(Listen::Stdio));
        assert_eq!("vsock:1024".parse::<Listen>(), Ok(Listen::Vsock(1024)));
        assert_eq!(
            "unix:/run/a.sock".parse::<Listen>(),
            Ok(Listen::Unix("/run/a.sock".into()))
        );
        assert!("vsock:x".parse::<Listen>().is_err());
        assert!("unix:".parse::<Listen>().is_err());
        assert_eq!(
            "dial:/h/a.sock".parse::<Listen>(),
            Ok(Listen::Dial("/h/a.sock".into()))
        );
        assert!("dial:".parse::<Listen>().is_err());
        assert!("tcp:1".parse::<Listen>().is_err());
    }
}
