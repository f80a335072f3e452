//! One vsock stream between a guest port and a host unix socket, with credit-based
//! flow control in both directions.
//!
//! Guest → host: we advertise `CONN_BUF` bytes of buffer (`buf_alloc`) and count what we
//! have written to the unix socket (`fwd_cnt`); the guest never has more than
//! `buf_alloc - (sent - fwd_cnt)` bytes in flight, so `to_host` never exceeds `CONN_BUF`.
//! A guest that ignores its credit is reset. Host → guest: we read from the unix socket
//! only as much as the guest's advertised credit allows, so a slow guest pushes back on
//! the host through the socket.

use std::io::{self, ErrorKind, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use super::packet::{Header, HOST_CID, TYPE_STREAM};

/// Receive buffer we advertise per connection.
pub const CONN_BUF: u32 = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: REQUEST sent to the guest, waiting for RESPONSE until the instant.
    Connecting {
        deadline: Instant,
    },
    Established,
}

#[derive(Debug)]
pub struct Connection {
    pub stream: UnixStream,
    /// The host-side port (ours); for guest-initiated streams, the port the guest dialled.
    pub local_port: u32,
    /// The guest-side port.
    pub peer_port: u32,
    pub state: ConnState,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes we have sent to the guest.
    tx_cnt: Wrapping<u32>,
    /// Bytes from the guest written to the unix socket.
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    fwd_cnt_sent: Wrapping<u32>,
    /// Bytes for the host not yet written (our reply line first, then guest data).
    reply: Vec<u8>,
    to_host: Vec<u8>,
    /// The guest will send no more data: shut the socket's write side once drained.
    pub guest_done_sending: bool,
    /// The host closed its side (read returned 0).
    pub host_eof: bool,
}

impl Connection {
    pub fn new(stream: UnixStream, local_port: u32, peer_port: u32, state: ConnState) -> Self {
        Connection {
            stream,
            local_port,
            peer_port,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            fwd_cnt_sent: Wrapping(0),
            reply: Vec::new(),
            to_host: Vec::new(),
            guest_done_sending: false,
            host_eof: false,
        }
    }

    /// A header for a packet from this connection's host side to the guest.
    pub fn header(&mut self, guest_cid: u64, op: u16) -> Header {
        self.fwd_cnt_sent = self.fwd_cnt;
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_BUF,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// Every guest packet carries its credit.
    pub fn update_peer_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
    }

    /// How many bytes the guest can take now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether the guest should be told about buffer space we freed.
    pub fn credit_update_due(&self) -> bool {
        (self.fwd_cnt - self.fwd_cnt_sent).0 >= CONN_BUF / 4
    }

    /// Queues the `OK <port>\n` line for a host-initiated stream.
    pub fn queue_reply(&mut self, line: &[u8]) {
        self.reply.extend_from_slice(line);
    }

    /// Accepts guest data; `false` if the guest overran the credit we gave it.
    pub fn accept_guest_data(&mut self, data: &[u8]) -> bool {
        if self.to_host.len() + data.len() > CONN_BUF as usize {
            return false;
        }
        self.to_host.extend_from_slice(data);
        true
    }

    pub fn wants_write(&self) -> bool {
        !self.reply.is_empty() || !self.to_host.is_empty()
    }

    /// Writes pending bytes to the host without blocking.
    pub fn flush_to_host(&mut self) -> io::Result<()> {
        while !self.reply.is_empty() {
            match self.stream.write(&self.reply) {
                Ok(n) => drop(self.reply.drain(..n)),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        while !self.to_host.is_empty() {
            match self.stream.write(&self.to_host) {
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.guest_done_sending {
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        Ok(())
    }

    /// Reads up to `buf.len()` bytes the host sent; `Ok(0)` with `host_eof` set on EOF,
    /// `Ok(0)` without it when nothing is ready.
    pub fn read_from_host(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.stream.read(buf) {
                Ok(0) => {
                    self.host_eof = true;
                    return Ok(0);
                }
                Ok(n) => {
                    self.tx_cnt += Wrapping(n as u32);
                    return Ok(n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(0),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether reading from the host makes sense now.
    pub fn can_send_to_guest(&self) -> bool {
        self.state == ConnState::Established && !self.host_eof && self.peer_credit() > 0
    }
}
