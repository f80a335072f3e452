//! virtio-vsock with a "hybrid" host side: unix sockets instead of host AF_VSOCK.
//!
//! - Host → guest: a host program connects to the unix socket at `uds_path` and writes
//!   `CONNECT <port>\n`; the device opens a stream to guest port `<port>` and answers
//!   `OK <host port>\n` once the guest accepts (the socket is closed if it refuses).
//! - Guest → host: a guest connection to CID 2 port `P` is forwarded to the unix socket
//!   `<uds_path>_P`, which a host program must be listening on.
//!
//! The agent listens on guest port [`AGENT_PORT`]. Streams use credit-based flow control
//! ([`connection`]). Connections are not part of a snapshot: on restore the device sends
//! the guest a transport-reset event, and host programs reconnect.

pub mod connection;
pub mod packet;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use self::connection::{ConnState, Connection, CONN_BUF};
use self::packet::*;
use super::chain::ValidChain;
use super::device::{add_used, DeviceError, QueueContext, VirtioDevice};

pub const VIRTIO_ID_VSOCK: u32 = 19;
/// The guest port `tartarus-agent` listens on inside a microVM.
pub const AGENT_PORT: u32 = 1024;
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];
const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;
/// Largest payload we accept from or send to the guest in one packet.
const MAX_PAYLOAD: usize = 64 * 1024;
/// Host connections still writing their `CONNECT` line; the oldest is dropped past this.
const MAX_PENDING_HOST: usize = 64;
const MAX_CONNECTIONS: usize = 1024;
/// Host ports for host-initiated streams are allocated from here up.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
const CONNECT_LINE_MAX: usize = 32;
/// How long the guest has to answer a host-initiated connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause before accepting again after accept() failed (e.g. out of descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Snapshot state: the guest's CID. Connections are deliberately not saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    pub guest_cid: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved (must be 3 or more)")]
    BadCid(u64),
    #[error("cannot listen on {path}: {source}")]
    Listen {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    /// Host connections that have not finished their `CONNECT` line.
    pending_host: VecDeque<UnixStream>,
    /// Keyed by (local port, peer port).
    conns: HashMap<(u32, u32), Connection>,
    /// Packets without payload waiting for an rx buffer.
    control: VecDeque<Header>,
    /// No rx buffer was available last time we looked: do not read host sockets.
    rx_starved: bool,
    reset_event_pending: bool,
    next_local_port: u32,
    /// accept() failed: the listener is not polled until then (no busy loop on EMFILE).
    accept_paused_until: Option<Instant>,
}

impl Vsock {
    /// Listens on `uds_path` (which must not exist) for host-initiated connections.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        if guest_cid < 3 || guest_cid > u64::from(u32::MAX) {
            return Err(VsockError::BadCid(guest_cid));
        }
        let listen_err = |source| VsockError::Listen {
            path: uds_path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(uds_path).map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        Ok(Vsock {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            pending_host: VecDeque::new(),
            conns: HashMap::new(),
            control: VecDeque::new(),
            rx_starved: false,
            reset_event_pending: false,
            next_local_port: FIRST_LOCAL_PORT,
            accept_paused_until: None,
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Drops every connection (host sockets see EOF) and tells the guest to do the same.
    pub fn reset_connections(&mut self) {
        self.conns.clear();
        self.pending_host.clear();
        self.control.clear();
        self.reset_event_pending = true;
    }

    fn rst_for(&self, hdr: &Header) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            type_: TYPE_STREAM,
            op: OP_RST,
            ..Header::default()
        }
    }

    fn queue_control(&mut self, key: (u32, u32), op: u16, flags: u32) {
        let cid = self.guest_cid;
        if let Some(conn) = self.conns.get_mut(&key) {
            let mut hdr = conn.header(cid, op);
            hdr.flags = flags;
            self.control.push_back(hdr);
        }
    }

    fn close(&mut self, key: (u32, u32), send_rst: bool) {
        if self.conns.remove(&key).is_some() && send_rst {
            self.control.push_back(Header {
                src_cid: HOST_CID,
                dst_cid: self.guest_cid,
                src_port: key.0,
                dst_port: key.1,
                type_: TYPE_STREAM,
                op: OP_RST,
                ..Header::default()
            });
        }
    }

    /// Serves the transmit queue: packets the guest sends.
    fn process_tx(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, DeviceError> {
        let mut used = false;
        for _ in 0..queue.size() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            if let Ok(chain) = ValidChain::parse(chain, (HDR_LEN + MAX_PAYLOAD) as u64) {
                self.handle_guest_packet(&chain, mem);
            }
            queue
                .add_used(mem, head, 0)
                .map_err(|e| DeviceError::Memory(e.to_string()))?;
            used = true;
        }
        Ok(used)
    }

    fn handle_guest_packet(&mut self, chain: &ValidChain, mem: &GuestMemoryMmap) {
        let mut raw = [0u8; HDR_LEN];
        if chain.read_at(mem, 0, &mut raw) != Ok(HDR_LEN) {
            return;
        }
        let hdr = Header::parse(&raw);
        // Packets not from our guest or not for the host are dropped; a guest cannot
        // spoof another CID or reach anything but the host side it was given.
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            return;
        }
        if hdr.type_ != TYPE_STREAM {
            self.control.push_back(self.rst_for(&hdr));
            return;
        }
        let len = hdr.len as usize;
        let mut data = Vec::new();
        if hdr.op == OP_RW {
            if len > MAX_PAYLOAD || (len as u64) > chain.readable_len() - HDR_LEN as u64 {
                self.close((hdr.dst_port, hdr.src_port), true);
                return;
            }
            data.resize(len, 0);
            if chain.read_at(mem, HDR_LEN as u64, &mut data) != Ok(len) {
                return;
            }
        }
        let key = (hdr.dst_port, hdr.src_port);
        if hdr.op == OP_REQUEST {
            self.guest_connect(&hdr);
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            if hdr.op != OP_RST {
                self.control.push_back(self.rst_for(&hdr));
            }
            return;
        };
        conn.update_peer_credit(&hdr);
        match hdr.op {
            OP_RESPONSE if matches!(conn.state, ConnState::Connecting { .. }) => {
                conn.state = ConnState::Established;
                conn.queue_reply(format!("OK {}\n", conn.local_port).as_bytes());
                if conn.flush_to_host().is_err() {
                    self.close(key, true);
                }
            }
            OP_RW if conn.state == ConnState::Established => {
                if !conn.accept_guest_data(&data) || conn.flush_to_host().is_err() {
                    self.close(key, true);
                } else if conn.credit_update_due() {
                    self.queue_control(key, OP_CREDIT_UPDATE, 0);
                }
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => self.queue_control(key, OP_CREDIT_UPDATE, 0),
            OP_SHUTDOWN => {
                if hdr.flags & SHUTDOWN_SEND != 0 {
                    conn.guest_done_sending = true;
                    let _ = conn.flush_to_host();
                }
                if hdr.flags & (SHUTDOWN_SEND | SHUTDOWN_RCV) == (SHUTDOWN_SEND | SHUTDOWN_RCV) {
                    // A full shutdown is answered with RST, which ends the stream.
                    self.close(key, true);
                }
            }
            OP_RST => self.close(key, false),
            _ => self.close(key, true),
        }
    }

    /// The guest dials host port `hdr.dst_port`: connect to `<uds_path>_<port>`.
    fn guest_connect(&mut self, hdr: &Header) {
        let key = (hdr.dst_port, hdr.src_port);
        if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNECTIONS {
            self.control.push_back(self.rst_for(hdr));
            return;
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", hdr.dst_port));
        let stream = match UnixStream::connect(&path) {
            Ok(s) if s.set_nonblocking(true).is_ok() => s,
            _ => {
                self.control.push_back(self.rst_for(hdr));
                return;
            }
        };
        let mut conn = Connection::new(stream, hdr.dst_port, hdr.src_port, ConnState::Established);
        conn.update_peer_credit(hdr);
        self.conns.insert(key, conn);
        self.queue_control(key, OP_RESPONSE, 0);
    }

    /// Accepts host connections and reads their `CONNECT <port>` lines.
    fn serve_host_side(&mut self) {
        let now = Instant::now();
        if self.accept_paused_until.is_some_and(|t| t > now) {
            // Still backing off after an accept failure.
        } else {
            self.accept_paused_until = None;
            self.accept_host_connections(now);
        }
        self.expire_connects(now);
        let pending = std::mem::take(&mut self.pending_host);
        for mut stream in pending {
            match read_connect_line(&mut stream) {
                LineRead::Port(port) => self.host_connect(stream, port),
                LineRead::NotYet => self.pending_host.push_back(stream),
                LineRead::Invalid => {}
            }
        }
        let keys: Vec<_> = self.conns.keys().copied().collect();
        for key in keys {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            if !conn.wants_write() {
                continue;
            }
            if conn.flush_to_host().is_err() {
                self.close(key, true);
            } else if conn.credit_update_due() {
                // The host drained data the guest was waiting to send more of.
                self.queue_control(key, OP_CREDIT_UPDATE, 0);
            }
        }
    }

    fn accept_host_connections(&mut self, now: Instant) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    if self.pending_host.len() >= MAX_PENDING_HOST {
                        self.pending_host.pop_front();
                    }
                    self.pending_host.push_back(stream);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.accept_paused_until = Some(now + ACCEPT_BACKOFF);
                    break;
                }
            }
        }
    }

    /// Host connections the guest never answered are reset (the host sees EOF).
    fn expire_connects(&mut self, now: Instant) {
        let expired: Vec<_> = self
            .conns
            .iter()
            .filter(
                |(_, c)| matches!(c.state, ConnState::Connecting { deadline } if deadline <= now),
            )
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            self.close(key, true);
        }
    }

    fn host_connect(&mut self, stream: UnixStream, port: u32) {
        if self.conns.len() >= MAX_CONNECTIONS {
            return;
        }
        let local_port = self.allocate_local_port(port);
        let key = (local_port, port);
        self.conns.insert(
            key,
            Connection::new(
                stream,
                local_port,
                port,
                ConnState::Connecting {
                    deadline: Instant::now() + CONNECT_TIMEOUT,
                },
            ),
        );
        self.queue_control(key, OP_REQUEST, 0);
    }

    fn allocate_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&(port, peer_port)) {
                return port;
            }
        }
    }

    /// Fills guest receive buffers: control packets first, then host data within credit.
    fn process_rx(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, DeviceError> {
        let mut used = false;
        let mut buf = vec![0u8; MAX_PAYLOAD];
        for _ in 0..queue.size() {
            let has_data = self.conns.values().any(Connection::can_send_to_guest);
            if self.control.is_empty() && !has_data {
                break;
            }
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                self.rx_starved = true;
                break;
            };
            let head = chain.head_index();
            let chain = match ValidChain::parse(chain, u64::MAX) {
                Ok(c) if c.writable_len() >= HDR_LEN as u64 => c,
                _ => {
                    add_used(queue, mem, head, 0)?;
                    used = true;
                    continue;
                }
            };
            let room = (chain.writable_len() - HDR_LEN as u64).min(MAX_PAYLOAD as u64) as usize;
            let Some((hdr, n)) = self.next_rx_packet(&mut buf[..room]) else {
                // Nothing to send after all (sockets had no data): give the buffer back.
                queue.go_to_previous_position();
                break;
            };
            let written = chain
                .write_at(mem, 0, &hdr.to_bytes())
                .and_then(|_| chain.write_at(mem, HDR_LEN as u64, &buf[..n]))
                .map_err(DeviceError::Memory)?;
            add_used(queue, mem, head, (HDR_LEN + written) as u32)?;
            used = true;
        }
        Ok(used)
    }

    /// The next packet for the guest, payload in `buf[..n]`.
    fn next_rx_packet(&mut self, buf: &mut [u8]) -> Option<(Header, usize)> {
        if let Some(hdr) = self.control.pop_front() {
            return Some((hdr, 0));
        }
        let cid = self.guest_cid;
        let keys: Vec<_> = self
            .conns
            .iter()
            .filter(|(_, c)| c.can_send_to_guest())
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            let conn = self.conns.get_mut(&key)?;
            let max = buf.len().min(conn.peer_credit() as usize);
            match conn.read_from_host(&mut buf[..max]) {
                Ok(0) if conn.host_eof => {
                    // The host closed: tell the guest neither side will send more.
                    let mut hdr = conn.header(cid, OP_SHUTDOWN);
                    hdr.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
                    return Some((hdr, 0));
                }
                Ok(0) => {}
                Ok(n) => {
                    let mut hdr = conn.header(cid, OP_RW);
                    hdr.len = n as u32;
                    return Some((hdr, n));
                }
                Err(_) => {
                    self.conns.remove(&key);
                    return Some((
                        Header {
                            src_cid: HOST_CID,
                            dst_cid: cid,
                            src_port: key.0,
                            dst_port: key.1,
                            type_: TYPE_STREAM,
                            op: OP_RST,
                            ..Header::default()
                        },
                        0,
                    ));
                }
            }
        }
        None
    }

    fn deliver_reset_event(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, DeviceError> {
        if !self.reset_event_pending {
            return Ok(false);
        }
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            return Ok(false);
        };
        let head = chain.head_index();
        let len = match ValidChain::parse(chain, 4096) {
            Ok(c) => c
                .write_at(mem, 0, &EVENT_TRANSPORT_RESET.to_le_bytes())
                .unwrap_or(0),
            Err(_) => 0,
        };
        self.reset_event_pending = false;
        add_used(queue, mem, head, len as u32)?;
        Ok(true)
    }

    fn serve(&mut self, ctx: QueueContext<'_>) -> Result<bool, DeviceError> {
        let [rx, _tx, event] = ctx.queues else {
            return Err(DeviceError::QueueNotReady(RX));
        };
        let mut used = self.deliver_reset_event(event, ctx.mem)?;
        self.serve_host_side();
        used |= self.process_rx(rx, ctx.mem)?;
        Ok(used)
    }
}

enum LineRead {
    Port(u32),
    NotYet,
    Invalid,
}

/// Reads `CONNECT <port>\n` without consuming any byte after the newline.
fn read_connect_line(stream: &mut UnixStream) -> LineRead {
    let mut peek = [0u8; CONNECT_LINE_MAX];
    // SAFETY: recv into a live buffer of the given length; MSG_PEEK leaves the bytes queued.
    let r = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            peek.as_mut_ptr().cast(),
            peek.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    let n = match r {
        0 => return LineRead::Invalid,
        n if n > 0 => n as usize,
        _ if std::io::Error::last_os_error().kind() == ErrorKind::WouldBlock => {
            return LineRead::NotYet
        }
        _ => return LineRead::Invalid,
    };
    let Some(end) = peek[..n].iter().position(|&b| b == b'\n') else {
        return if n == CONNECT_LINE_MAX {
            LineRead::Invalid
        } else {
            LineRead::NotYet
        };
    };
    let mut line = vec![0u8; end + 1];
    if stream.read_exact(&mut line).is_err() {
        return LineRead::Invalid;
    }
    parse_connect_line(&line[..end]).map_or(LineRead::Invalid, LineRead::Port)
}

/// Parses `CONNECT <port>` (an optional trailing `\r` is allowed).
pub fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let port = line.strip_prefix("CONNECT ")?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

impl VirtioDevice for Vsock {
    type State = VsockState;

    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        0
    }

    fn config_space(&self) -> Vec<u8> {
        self.guest_cid.to_le_bytes().to_vec()
    }

    fn activate(&mut self, _acked_features: u64) -> Result<(), DeviceError> {
        Ok(())
    }

    fn process_queue(&mut self, queue: usize, ctx: QueueContext<'_>) -> Result<bool, DeviceError> {
        let mem = ctx.mem;
        let mut used = false;
        if queue == TX {
            used |= self.process_tx(&mut ctx.queues[TX], mem)?;
        }
        if queue == RX {
            self.rx_starved = false;
        }
        if queue == RX || queue == TX {
            used |= self.process_rx(&mut ctx.queues[RX], mem)?;
        }
        if queue == EVENT {
            used |= self.deliver_reset_event(&mut ctx.queues[EVENT], mem)?;
        }
        Ok(used)
    }

    fn reset(&mut self) {
        self.conns.clear();
        self.pending_host.clear();
        self.control.clear();
        self.rx_starved = false;
        self.reset_event_pending = false;
    }

    fn backend_fds(&self) -> Vec<(RawFd, i16)> {
        let mut fds = Vec::new();
        if self.accept_paused_until.is_none() {
            fds.push((self.listener.as_raw_fd(), libc::POLLIN));
        }
        fds.extend(
            self.pending_host
                .iter()
                .map(|s| (s.as_raw_fd(), libc::POLLIN)),
        );
        for conn in self.conns.values() {
            let mut events = 0;
            if conn.wants_write() {
                events |= libc::POLLOUT;
            }
            if !self.rx_starved && conn.can_send_to_guest() {
                events |= libc::POLLIN;
            }
            if events != 0 {
                fds.push((conn.stream.as_raw_fd(), events));
            }
        }
        fds
    }

    fn backend_deadline(&self) -> Option<Instant> {
        let connects = self.conns.values().filter_map(|c| match c.state {
            ConnState::Connecting { deadline } => Some(deadline),
            ConnState::Established => None,
        });
        connects.chain(self.accept_paused_until).min()
    }

    fn process_backend(&mut self, ctx: QueueContext<'_>) -> Result<bool, DeviceError> {
        self.serve(ctx)
    }

    fn save(&self) -> VsockState {
        VsockState {
            guest_cid: self.guest_cid,
        }
    }

    fn restore(&mut self, state: VsockState) -> Result<(), DeviceError> {
        if state.guest_cid != self.guest_cid {
            return Err(DeviceError::State(format!(
                "snapshot guest CID {} differs from the device's {}",
                state.guest_cid, self.guest_cid
            )));
        }
        self.reset_connections();
        Ok(())
    }
}

/// Bytes of buffer each stream advertises to the guest.
pub const STREAM_BUFFER: u32 = CONN_BUF;
