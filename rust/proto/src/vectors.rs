//! Shared test vectors: one frame per message type plus hostile frames. The Rust tests
//! write them to `tests/vectors/protocol/` (with `TARTARUS_UPDATE_VECTORS=1`) and check
//! them; the Python tests decode and re-encode them byte for byte.

use std::collections::BTreeMap;

use crate::frame::{encode_frame, MAX_FRAME_BYTES};
use crate::messages::*;
use crate::PROTOCOL_VERSION;

fn file_info() -> FileInfo {
    FileInfo {
        path: "/work/a.txt".into(),
        name: "a.txt".into(),
        kind: FileKind::File,
        size: 1234,
        mode: 0o100644,
        mtime: 1_764_000_000.25,
    }
}

fn exit_info() -> ExitInfo {
    ExitInfo {
        pid: 42,
        code: Some(3),
        signal: None,
        timed_out: false,
        dropped_chunks: 0,
        duration_s: 0.5,
    }
}

/// One valid envelope per message type (some types twice, to cover optional fields).
pub fn valid() -> Vec<(&'static str, Envelope)> {
    let env: BTreeMap<String, String> = [
        ("A".to_string(), "1".to_string()),
        ("PATH".into(), "/bin".into()),
    ]
    .into();
    let m = |id: u64, body: Message| Envelope::new(id, body);
    vec![
        (
            "hello",
            m(
                0,
                Message::Hello(Hello {
                    version: PROTOCOL_VERSION,
                    client: "tartarus-py/0.1.0".into(),
                }),
            ),
        ),
        ("ping", m(1, Message::Ping {})),
        (
            "exec_argv",
            m(
                2,
                Message::Exec(Exec {
                    argv: Some(vec!["echo".into(), "hi".into()]),
                    ..Exec::default()
                }),
            ),
        ),
        (
            "exec_full",
            m(
                3,
                Message::Exec(Exec {
                    argv: None,
                    shell: Some("echo $A | cat".into()),
                    env,
                    cwd: Some("/tmp".into()),
                    user: Some("1000:1000".into()),
                    stdin: true,
                    pty: Some(PtySize { rows: 24, cols: 80 }),
                    timeout_s: Some(2.5),
                    background: true,
                    buffer_bytes: Some(65536),
                }),
            ),
        ),
        (
            "write_stdin",
            m(
                4,
                Message::WriteStdin {
                    pid: 42,
                    data: b"hello\n".to_vec(),
                },
            ),
        ),
        ("close_stdin", m(5, Message::CloseStdin { pid: 42 })),
        (
            "resize",
            m(
                6,
                Message::Resize {
                    pid: 42,
                    rows: 50,
                    cols: 132,
                },
            ),
        ),
        (
            "signal",
            m(
                7,
                Message::Signal {
                    pid: 42,
                    signal: 15,
                },
            ),
        ),
        ("list_processes", m(8, Message::ListProcesses {})),
        (
            "attach",
            m(
                9,
                Message::Attach {
                    pid: 42,
                    since_seq: 7,
                    follow: true,
                },
            ),
        ),
        (
            "logs",
            m(
                10,
                Message::Logs {
                    since_seq: 0,
                    follow: false,
                },
            ),
        ),
        ("cancel", m(11, Message::Cancel { target: 10 })),
        (
            "read_file",
            m(
                12,
                Message::ReadFile {
                    path: "/etc/hostname".into(),
                    max_bytes: Some(1 << 20),
                },
            ),
        ),
        (
            "write_file",
            m(
                13,
                Message::WriteFile {
                    path: "/tmp/x".into(),
                    data: vec![0, 1, 2, 255],
                    mode: 0o600,
                    make_parents: true,
                },
            ),
        ),
        (
            "open_read",
            m(
                14,
                Message::OpenRead {
                    path: "/big".into(),
                },
            ),
        ),
        (
            "read_chunk",
            m(
                15,
                Message::ReadChunk {
                    handle: 1,
                    offset: 1 << 33,
                    length: 262_144,
                },
            ),
        ),
        (
            "open_write",
            m(
                16,
                Message::OpenWrite {
                    path: "/big".into(),
                    mode: 0o644,
                    make_parents: false,
                },
            ),
        ),
        (
            "write_chunk",
            m(
                17,
                Message::WriteChunk {
                    handle: 2,
                    offset: 0,
                    data: vec![7; 300],
                },
            ),
        ),
        ("commit", m(18, Message::Commit { handle: 2 })),
        ("close_handle", m(19, Message::CloseHandle { handle: 1 })),
        (
            "list_dir",
            m(
                20,
                Message::ListDir {
                    path: "/".into(),
                    limit: None,
                },
            ),
        ),
        (
            "stat",
            m(
                21,
                Message::Stat {
                    path: "/work/a.txt".into(),
                },
            ),
        ),
        (
            "mkdir",
            m(
                22,
                Message::Mkdir {
                    path: "/a/b".into(),
                    parents: true,
                    mode: 0o755,
                },
            ),
        ),
        (
            "remove",
            m(
                23,
                Message::Remove {
                    path: "/a".into(),
                    recursive: true,
                },
            ),
        ),
        (
            "rename",
            m(
                24,
                Message::Rename {
                    src: "/a".into(),
                    dst: "/b".into(),
                },
            ),
        ),
        (
            "watch_dir",
            m(
                28,
                Message::WatchDir {
                    path: "/work".into(),
                    recursive: true,
                },
            ),
        ),
        ("get_stats", m(25, Message::GetStats {})),
        ("shutdown", m(26, Message::Shutdown { grace_s: 10.0 })),
        (
            "reseed",
            m(
                27,
                Message::Reseed {
                    entropy: (0..32).collect(),
                    generation: 3,
                },
            ),
        ),
        (
            "hello_ok",
            m(
                0,
                Message::HelloOk(HelloOk {
                    version: PROTOCOL_VERSION,
                    agent: "0.1.0".into(),
                    pid: 1,
                    max_frame: MAX_FRAME_BYTES as u32,
                    features: vec!["pty".into(), "init".into()],
                }),
            ),
        ),
        ("pong", m(1, Message::Pong {})),
        ("ok", m(5, Message::Ok {})),
        (
            "shut_down",
            m(
                9,
                Message::ShutDown {
                    terminated: 2,
                    killed: 1,
                },
            ),
        ),
        (
            "error",
            m(
                12,
                Message::error(codes::NOT_FOUND, "/etc/hostname: no such file"),
            ),
        ),
        (
            "started",
            m(
                2,
                Message::Started {
                    pid: 42,
                    pty: false,
                },
            ),
        ),
        (
            "output",
            m(
                2,
                Message::Output(Output {
                    pid: 42,
                    stream: Stream::Stderr,
                    seq: 1,
                    data: b"hi\n".to_vec(),
                }),
            ),
        ),
        ("exit", m(2, Message::Exit(exit_info()))),
        (
            "exit_signal",
            m(
                2,
                Message::Exit(ExitInfo {
                    pid: 43,
                    code: None,
                    signal: Some(9),
                    timed_out: true,
                    dropped_chunks: 17,
                    duration_s: 2.0,
                }),
            ),
        ),
        (
            "process_list",
            m(
                8,
                Message::ProcessList {
                    processes: vec![
                        ProcessInfo {
                            pid: 42,
                            argv: vec!["/bin/sh".into(), "-c".into(), "sleep 1".into()],
                            started_at: 1_764_000_000.5,
                            running: true,
                            pty: false,
                            background: true,
                            exit: None,
                            last_seq: 0,
                            evicted_chunks: 0,
                        },
                        ProcessInfo {
                            pid: 43,
                            argv: vec!["true".into()],
                            started_at: 1_764_000_001.0,
                            running: false,
                            pty: true,
                            background: false,
                            exit: Some(exit_info()),
                            last_seq: 3,
                            evicted_chunks: 1,
                        },
                    ],
                },
            ),
        ),
        (
            "log",
            m(
                10,
                Message::Log(LogRecord {
                    seq: 100_000,
                    ts: 1_764_000_002.125,
                    pid: 42,
                    stream: Stream::Stdout,
                    data: b"line\n".to_vec(),
                }),
            ),
        ),
        ("end", m(10, Message::End {})),
        (
            "file_data",
            m(
                12,
                Message::FileData {
                    data: b"tartarus\n".to_vec(),
                    size: 9,
                },
            ),
        ),
        (
            "opened",
            m(
                14,
                Message::Opened {
                    handle: 1,
                    size: 70_000,
                    mode: 0o100644,
                },
            ),
        ),
        (
            "chunk",
            m(
                15,
                Message::Chunk {
                    data: vec![9; 70_000],
                    eof: true,
                },
            ),
        ),
        ("committed", m(18, Message::Committed { size: 300 })),
        ("file_info", m(21, Message::FileInfo(file_info()))),
        (
            "dir_listing",
            m(
                20,
                Message::DirListing {
                    entries: vec![
                        file_info(),
                        FileInfo {
                            path: "/work/d".into(),
                            name: "d".into(),
                            kind: FileKind::Dir,
                            size: 4096,
                            mode: 0o40755,
                            mtime: 0.0,
                        },
                    ],
                    truncated: false,
                },
            ),
        ),
        (
            "stats_result",
            m(
                25,
                Message::StatsResult(Stats {
                    cpu_seconds: 1.5,
                    memory_bytes: 10 << 20,
                    memory_total_bytes: 512 << 20,
                    pids: 3,
                    uptime_s: 12.0,
                }),
            ),
        ),
        ("watching", m(28, Message::Watching {})),
        (
            "fs_event",
            m(
                28,
                Message::FsEvent {
                    path: "/work/d/a.txt".into(),
                    kind: "write".into(),
                },
            ),
        ),
    ]
}

/// The error a hostile vector must produce (see `DecodeError`).
pub const TRUNCATED: &str = "truncated";
pub const OVERSIZED: &str = "oversized";
pub const MALFORMED: &str = "malformed";
pub const UNKNOWN_MESSAGE: &str = "unknown_message";
pub const VERSION_MISMATCH: &str = "version_mismatch";

fn frame_of(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

fn encoded(envelope: &Envelope) -> Vec<u8> {
    encode_frame(envelope).expect("sample envelopes encode")
}

/// Hostile frames: (name, bytes, expected error). Each is one complete input.
pub fn invalid() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let ping = encoded(&Envelope::new(1, Message::Ping {}));
    let hello_v99 = encoded(&Envelope::new(
        0,
        Message::Hello(Hello {
            version: 99,
            client: "future".into(),
        }),
    ));
    // {"id": 5, "body": {"type": "teleport"}}
    let unknown = frame_of(b"\x82\xa2id\x05\xa4body\x81\xa4type\xa8teleport");
    // {"id": 5, "body": {"type": "signal", "pid": "x"}}: a known type with a bad field.
    let bad_field = frame_of(b"\x82\xa2id\x05\xa4body\x82\xa4type\xa6signal\xa3pid\xa1x");
    // {"id": 5, "body": [[[[...]]]]}: nested far deeper than any message.
    let mut deep = b"\x82\xa2id\x05\xa4body".to_vec();
    deep.extend(std::iter::repeat_n(0x91u8, 10_000));
    deep.push(0xc0);
    vec![
        ("truncated_header", ping[..2].to_vec(), TRUNCATED),
        ("truncated_body", ping[..ping.len() - 1].to_vec(), TRUNCATED),
        (
            "oversized_header",
            ((MAX_FRAME_BYTES + 1) as u32).to_be_bytes().to_vec(),
            OVERSIZED,
        ),
        ("huge_header", vec![0xff, 0xff, 0xff, 0xff], OVERSIZED),
        ("empty_frame", vec![0, 0, 0, 0], MALFORMED),
        ("garbage", frame_of(b"\xc1\xc1\xc1 not msgpack"), MALFORMED),
        ("not_a_map", frame_of(b"\x93\x01\x02\x03"), MALFORMED),
        ("bad_field", bad_field, MALFORMED),
        // bin32 claiming 4 GiB of data inside a small frame.
        (
            "lying_length",
            frame_of(b"\x82\xa2id\x05\xa4body\xc6\xff\xff\xff\xff"),
            MALFORMED,
        ),
        ("too_deep", frame_of(&deep), MALFORMED),
        ("unknown_type", unknown, UNKNOWN_MESSAGE),
        ("hello_wrong_version", hello_v99, VERSION_MISMATCH),
    ]
}
