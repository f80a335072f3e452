//! virtio-vsock driven like Linux's virtio_transport: rx buffers of header + 4 KiB,
//! packets on tx, host programs on real unix sockets.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::virtio::test_driver::{Desc, Driver, DATA};
use crate::devices::virtio::worker::DeviceWorker;

const GUEST_CID: u64 = 3;
const RX_BUFS: u64 = DATA;
const RX_DATA: u32 = 4096;
const TX_HDR: u64 = DATA + 0x80_0000;
const TX_DATA: u64 = TX_HDR + 0x1000;
const EVENT_BUF: u64 = DATA + 0x90_0000;

struct Guest {
    d: Driver<Vsock>,
    /// rx head index → buffer address.
    rx_bufs: HashMap<u32, u64>,
    _dir: tempfile::TempDir,
    uds: PathBuf,
}

impl Guest {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let mut d = Driver::new(Vsock::new(GUEST_CID, &uds).unwrap());
        d.init(1 << VIRTIO_F_VERSION_1, &[QUEUE_SIZE; 3]);
        let mut g = Guest {
            d,
            rx_bufs: HashMap::new(),
            _dir: dir,
            uds,
        };
        for i in 0..16 {
            g.post_rx(RX_BUFS + i * 0x2000);
        }
        g.d.add_chain(EVENT, &[Desc::w(EVENT_BUF, 8)]);
        g.d.notify(RX);
        g
    }

    fn post_rx(&mut self, addr: u64) {
        let head = self.d.add_chain(
            RX,
            &[Desc::w(addr, HDR_LEN as u32), Desc::w(addr + 64, RX_DATA)],
        );
        self.rx_bufs.insert(u32::from(head), addr);
    }

    /// Lets the device serve its host side (what the worker thread does).
    fn backend(&self) {
        self.d.transport.lock().unwrap().process_backend();
    }

    fn recv(&mut self) -> Option<(Header, Vec<u8>)> {
        let (head, len) = self.d.pop_used(RX)?;
        let addr = self.rx_bufs.remove(&head).expect("known rx buffer");
        let mut raw = [0u8; HDR_LEN];
        self.d.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
        let hdr = Header::parse(&raw);
        assert_eq!(len as usize, HDR_LEN + hdr.len as usize);
        let mut data = vec![0u8; hdr.len as usize];
        self.d
            .mem
            .read_slice(&mut data, GuestAddress(addr + 64))
            .unwrap();
        self.post_rx(addr);
        self.d.notify(RX);
        Some((hdr, data))
    }

    fn recv_wait(&mut self) -> (Header, Vec<u8>) {
        for _ in 0..2000 {
            self.backend();
            if let Some(p) = self.recv() {
                return p;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("no packet for the guest");
    }

    fn send(&mut self, hdr: Header, data: &[u8]) {
        self.d
            .mem
            .write_slice(&hdr.to_bytes(), GuestAddress(TX_HDR))
            .unwrap();
        self.d.mem.write_slice(data, GuestAddress(TX_DATA)).unwrap();
        let mut descs = vec![Desc::r(TX_HDR, HDR_LEN as u32)];
        if !data.is_empty() {
            descs.push(Desc::r(TX_DATA, data.len() as u32));
        }
        self.d.add_chain(TX, &descs);
        self.d.notify(TX);
        // Served at once without a worker, by the worker thread with one.
        let returned = self.d.wait_used(TX, Duration::from_secs(10));
        assert!(returned.is_some(), "tx buffer returned");
    }

    fn packet(&self, src_port: u32, dst_port: u32, op: u16) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 1 << 20,
            ..Header::default()
        }
    }

    /// Host dials guest `port`; the guest accepts. Returns the host stream and host port.
    fn host_connect(&mut self, port: u32) -> (UnixStream, u32) {
        let mut host = UnixStream::connect(&self.uds).unwrap();
        host.write_all(format!("CONNECT {port}\n").as_bytes())
            .unwrap();
        let (req, _) = self.recv_wait();
        assert_eq!(req.op, OP_REQUEST);
        assert_eq!(
            (req.dst_cid, req.dst_port, req.src_cid),
            (GUEST_CID, port, HOST_CID)
        );
        let resp = self.packet(port, req.src_port, OP_RESPONSE);
        self.send(resp, &[]);
        let line = read_line(&mut host);
        assert_eq!(line, format!("OK {}\n", req.src_port));
        (host, req.src_port)
    }
}

fn read_line(s: &mut UnixStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap() == 1 {
        line.push(b[0]);
        if b[0] == b'\n' {
            break;
        }
    }
    String::from_utf8(line).unwrap()
}

#[test]
fn config_space_holds_the_guest_cid() {
    let g = Guest::new();
    assert_eq!(g.d.read_config(0, 8), 3u64.to_le_bytes().to_vec());
    assert_eq!(g.d.read(crate::devices::virtio::mmio::reg::DEVICE_ID), 19);
}

#[test]
fn reserved_cids_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    assert!(Vsock::new(2, &dir.path().join("a")).is_err());
    assert!(Vsock::new(1 << 40, &dir.path().join("b")).is_err());
}

#[test]
fn host_initiated_stream_carries_data_both_ways() {
    let mut g = Guest::new();
    let (mut host, host_port) = g.host_connect(AGENT_PORT);
    host.write_all(b"hello guest").unwrap();
    let (hdr, data) = g.recv_wait();
    assert_eq!(
        (hdr.op, hdr.src_port, hdr.dst_port),
        (OP_RW, host_port, AGENT_PORT)
    );
    assert_eq!(data, b"hello guest");
    let mut rw = g.packet(AGENT_PORT, host_port, OP_RW);
    rw.len = 11;
    g.send(rw, b"hello host!");
    let mut got = [0u8; 11];
    host.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello host!");
}

#[test]
fn guest_initiated_stream_reaches_the_port_socket() {
    let mut g = Guest::new();
    let mut path = g.uds.clone().into_os_string();
    path.push("_5000");
    let listener = UnixListener::bind(&path).unwrap();
    g.send(g.packet(40000, 5000, OP_REQUEST), &[]);
    let (resp, _) = g.recv_wait();
    assert_eq!(
        (resp.op, resp.src_port, resp.dst_port),
        (OP_RESPONSE, 5000, 40000)
    );
    let (mut host, _) = listener.accept().unwrap();
    let mut rw = g.packet(40000, 5000, OP_RW);
    rw.len = 4;
    g.send(rw, b"ping");
    let mut got = [0u8; 4];
    host.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
    host.write_all(b"pong").unwrap();
    let (hdr, data) = g.recv_wait();
    assert_eq!((hdr.op, data.as_slice()), (OP_RW, &b"pong"[..]));
}

#[test]
fn guest_connect_without_a_listener_is_reset() {
    let mut g = Guest::new();
    g.send(g.packet(40000, 6000, OP_REQUEST), &[]);
    let (hdr, _) = g.recv_wait();
    assert_eq!((hdr.op, hdr.dst_port), (OP_RST, 40000));
}

#[test]
fn guest_refusing_a_host_connection_closes_the_socket() {
    let mut g = Guest::new();
    let mut host = UnixStream::connect(&g.uds).unwrap();
    host.write_all(b"CONNECT 77\n").unwrap();
    let (req, _) = g.recv_wait();
    g.send(g.packet(77, req.src_port, OP_RST), &[]);
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(host.read(&mut buf).unwrap(), 0);
    assert_eq!(g.d.transport.lock().unwrap().device().connection_count(), 0);
}

#[test]
fn host_data_respects_the_guest_credit() {
    let mut g = Guest::new();
    let (mut host, host_port) = g.host_connect(AGENT_PORT);
    // The guest re-advertises a 100-byte buffer with nothing consumed.
    let mut credit = g.packet(AGENT_PORT, host_port, OP_CREDIT_UPDATE);
    credit.buf_alloc = 100;
    g.send(credit, &[]);
    host.write_all(&[7u8; 1000]).unwrap();
    let (hdr, data) = g.recv_wait();
    assert_eq!((hdr.op, data.len()), (OP_RW, 100));
    g.backend();
    assert!(g.recv().is_none(), "no data beyond the credit");
    credit.fwd_cnt = 100;
    g.send(credit, &[]);
    let (_, data) = g.recv_wait();
    assert_eq!(data.len(), 100);
}

#[test]
fn draining_the_host_socket_returns_credit_to_the_guest() {
    let mut g = Guest::new();
    let (mut host, host_port) = g.host_connect(AGENT_PORT);
    // More than the socket buffer holds: the rest waits in the device for the host.
    let total = 6 * 65536;
    let chunk = vec![0x42u8; 65536];
    for _ in 0..6 {
        let mut rw = g.packet(AGENT_PORT, host_port, OP_RW);
        rw.len = 65536;
        g.send(rw, &chunk);
    }
    let mut got = vec![0u8; total];
    let reader = std::thread::spawn(move || {
        host.read_exact(&mut got).unwrap();
        got
    });
    let mut last_fwd = 0;
    for _ in 0..2000 {
        g.backend();
        while let Some((hdr, _)) = g.recv() {
            if hdr.op == OP_CREDIT_UPDATE {
                last_fwd = hdr.fwd_cnt;
            }
        }
        if last_fwd as usize == total {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(reader.join().unwrap().iter().all(|&b| b == 0x42));
    assert_eq!(
        last_fwd as usize, total,
        "the guest learns all its data was forwarded"
    );
}

#[test]
fn unanswered_host_connections_time_out() {
    let mut g = Guest::new();
    let mut host = UnixStream::connect(&g.uds).unwrap();
    host.write_all(b"CONNECT 1024\n").unwrap();
    let (req, _) = g.recv_wait();
    assert_eq!(req.op, OP_REQUEST);
    let deadline = g.d.transport.lock().unwrap().device().backend_deadline();
    assert!(deadline.is_some_and(|d| d > Instant::now()));
    // Pretend the guest stayed silent past the deadline.
    {
        let mut t = g.d.transport.lock().unwrap();
        for conn in t.device_mut().conns.values_mut() {
            conn.state = ConnState::Connecting {
                deadline: Instant::now(),
            };
        }
    }
    g.backend();
    let (rst, _) = g.recv_wait();
    assert_eq!((rst.op, rst.dst_port), (OP_RST, 1024));
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 4];
    assert_eq!(host.read(&mut buf).unwrap(), 0);
    assert_eq!(g.d.transport.lock().unwrap().device().connection_count(), 0);
}

#[test]
fn credit_request_gets_an_update() {
    let mut g = Guest::new();
    let (_host, host_port) = g.host_connect(AGENT_PORT);
    g.send(g.packet(AGENT_PORT, host_port, OP_CREDIT_REQUEST), &[]);
    let (hdr, _) = g.recv_wait();
    assert_eq!((hdr.op, hdr.buf_alloc), (OP_CREDIT_UPDATE, STREAM_BUFFER));
}

#[test]
fn host_close_becomes_a_guest_shutdown() {
    let mut g = Guest::new();
    let (host, host_port) = g.host_connect(AGENT_PORT);
    drop(host);
    let (hdr, _) = g.recv_wait();
    assert_eq!(
        (hdr.op, hdr.flags),
        (OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND)
    );
    g.send(g.packet(AGENT_PORT, host_port, OP_RST), &[]);
    assert_eq!(g.d.transport.lock().unwrap().device().connection_count(), 0);
}

#[test]
fn guest_full_shutdown_is_answered_with_rst() {
    let mut g = Guest::new();
    let (mut host, host_port) = g.host_connect(AGENT_PORT);
    let mut sd = g.packet(AGENT_PORT, host_port, OP_SHUTDOWN);
    sd.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    g.send(sd, &[]);
    let (hdr, _) = g.recv_wait();
    assert_eq!(hdr.op, OP_RST);
    let mut buf = [0u8; 4];
    assert_eq!(host.read(&mut buf).unwrap(), 0);
}

#[test]
fn a_lying_length_resets_the_stream() {
    let mut g = Guest::new();
    let (_host, host_port) = g.host_connect(AGENT_PORT);
    let mut rw = g.packet(AGENT_PORT, host_port, OP_RW);
    rw.len = 1 << 30;
    g.send(rw, b"short");
    let (hdr, _) = g.recv_wait();
    assert_eq!(hdr.op, OP_RST);
    assert_eq!(g.d.transport.lock().unwrap().device().connection_count(), 0);
}

#[test]
fn spoofed_cids_are_dropped_silently() {
    let mut g = Guest::new();
    let mut req = g.packet(40000, 5000, OP_REQUEST);
    req.src_cid = 99;
    g.send(req, &[]);
    let mut req = g.packet(40000, 5000, OP_REQUEST);
    req.dst_cid = 7;
    g.send(req, &[]);
    g.backend();
    assert!(g.recv().is_none());
}

#[test]
fn bad_connect_lines_close_the_host_socket() {
    let mut g = Guest::new();
    for line in [
        &b"CONNECT abc\n"[..],
        b"HELLO 1\n",
        b"CONNECT \n",
        &[b'x'; 40],
    ] {
        let mut host = UnixStream::connect(&g.uds).unwrap();
        host.write_all(line).unwrap();
        g.backend();
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 8];
        // Closed with our bytes unread: EOF or a reset, never data.
        match host.read(&mut buf) {
            Ok(n) => assert_eq!(n, 0, "{line:?}"),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{line:?}"),
        }
    }
    assert!(g.recv().is_none());
}

#[test]
fn restore_resets_connections_and_signals_the_guest() {
    let mut g = Guest::new();
    let (mut host, _) = g.host_connect(AGENT_PORT);
    let saved = g.d.transport.lock().unwrap().save();
    let json = serde_json::to_string(&saved).unwrap();
    g.d.transport
        .lock()
        .unwrap()
        .restore(serde_json::from_str(&json).unwrap())
        .unwrap();
    let mut buf = [0u8; 4];
    assert_eq!(host.read(&mut buf).unwrap(), 0);
    g.backend();
    let (_, len) = g.d.pop_used(EVENT).expect("reset event");
    assert_eq!(len, 4);
    let id: u32 = g.d.mem.read_obj(GuestAddress(EVENT_BUF)).unwrap();
    assert_eq!(id, EVENT_TRANSPORT_RESET);
}

#[test]
fn worker_thread_serves_a_stream_end_to_end() {
    let mut g = Guest::new();
    let _worker = DeviceWorker::spawn("vsock-test", g.d.transport.clone()).unwrap();
    let uds = g.uds.clone();
    let host = std::thread::spawn(move || {
        let mut s = UnixStream::connect(&uds).unwrap();
        s.write_all(b"CONNECT 1024\n").unwrap();
        let line = read_line(&mut s);
        assert!(line.starts_with("OK "));
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        s.write_all(&payload).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut received = Vec::new();
    let mut host_port = 0;
    let mut fwd = 0u32;
    loop {
        let Some((hdr, data)) = g.d.wait_used(RX, Duration::from_secs(10)).map(|(head, _)| {
            let addr = g.rx_bufs.remove(&head).unwrap();
            let mut raw = [0u8; HDR_LEN];
            g.d.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
            let hdr = Header::parse(&raw);
            let mut data = vec![0u8; hdr.len as usize];
            g.d.mem
                .read_slice(&mut data, GuestAddress(addr + 64))
                .unwrap();
            g.post_rx(addr);
            g.d.notify(RX);
            (hdr, data)
        }) else {
            panic!("stream stalled after {} bytes", received.len());
        };
        match hdr.op {
            OP_REQUEST => {
                host_port = hdr.src_port;
                g.send(g.packet(AGENT_PORT, host_port, OP_RESPONSE), &[]);
            }
            OP_RW => {
                received.extend_from_slice(&data);
                fwd += data.len() as u32;
                let mut up = g.packet(AGENT_PORT, host_port, OP_CREDIT_UPDATE);
                up.fwd_cnt = fwd;
                g.send(up, &[]);
            }
            OP_SHUTDOWN => break,
            other => panic!("unexpected op {other}"),
        }
    }
    host.join().unwrap();
    assert_eq!(received.len(), 300_000);
    assert!(received
        .iter()
        .enumerate()
        .all(|(i, &b)| b == (i % 253) as u8));
}

proptest! {
    #[test]
    fn connect_line_parser_accepts_only_decimal_ports(line in proptest::collection::vec(any::<u8>(), 0..40)) {
        if let Some(port) = parse_connect_line(&line) {
            let text = String::from_utf8(line).unwrap();
            let digits = text.trim_end_matches('\r').strip_prefix("CONNECT ").unwrap();
            prop_assert!(digits.bytes().all(|b| b.is_ascii_digit()));
            prop_assert_eq!(digits.parse::<u32>().unwrap(), port);
        }
    }

    #[test]
    fn every_port_round_trips(port in any::<u32>()) {
        prop_assert_eq!(parse_connect_line(format!("CONNECT {port}").as_bytes()), Some(port));
    }

    /// Random packets from a hostile guest never panic the device or leak connections.
    #[test]
    fn hostile_packets_are_contained(
        packets in proptest::collection::vec(
            (0u16..10, 0u64..5, 0u64..4, 0u32..3, 0u32..3, any::<u32>(), any::<u32>(), 0usize..64),
            1..40,
        )
    ) {
        let mut g = Guest::new();
        for (op, src_cid, dst_cid, src_port, dst_port, len, flags, data_len) in packets {
            let hdr = Header {
                src_cid, dst_cid, src_port, dst_port, len, type_: TYPE_STREAM, op, flags,
                buf_alloc: 4096, fwd_cnt: 0,
            };
            g.send(hdr, &vec![0xaa; data_len]);
            g.backend();
            while g.recv().is_some() {}
        }
        prop_assert!(g.d.transport.lock().unwrap().device().connection_count() <= 9);
    }
}

#[test]
fn a_host_connection_before_the_driver_is_up_gives_the_worker_nothing_to_spin_on() {
    // While the guest boots, clients already dial the listener; the device cannot serve
    // them before DRIVER_OK, so the worker must not poll the (ready) listener until then.
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let d = Driver::new(Vsock::new(GUEST_CID, &uds).unwrap());
    let _early = UnixStream::connect(&uds).unwrap();
    let (fds, deadline) = d.transport.lock().unwrap().backend_wait();
    assert!(fds.is_empty() && deadline.is_none(), "{fds:?}");
    let mut d = d;
    d.init(1 << VIRTIO_F_VERSION_1, &[QUEUE_SIZE; 3]);
    let (fds, _) = d.transport.lock().unwrap().backend_wait();
    assert!(
        !fds.is_empty(),
        "after DRIVER_OK the listener is polled again"
    );
}
