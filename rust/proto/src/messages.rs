//! Every message of the agent protocol. One enum, internally tagged by `"type"`, so a
//! frame body is a MessagePack map `{"id": u64, "body": {"type": "...", ...fields}}`.
//! Field order and names are part of the wire format: the Python mirror
//! (`tartarus/runtime/protocol.py`) declares the same fields in the same order, and the
//! shared test vectors check both sides produce the same bytes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A frame: the request id ties responses and events to the request that caused them.
/// The client picks ids (unique among its in-flight requests); id 0 is the handshake.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub id: u64,
    pub body: Message,
}

impl Envelope {
    pub fn new(id: u64, body: Message) -> Self {
        Self { id, body }
    }
}

/// Which output stream a chunk came from. A PTY merges both into `stdout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtySize {
    pub rows: u16,
    pub cols: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Other,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileInfo {
    pub path: String,
    pub name: String,
    pub kind: FileKind,
    pub size: u64,
    pub mode: u32,
    pub mtime: f64,
}

/// How a process ended. `dropped_chunks` counts the output chunks this subscriber did
/// not receive because the bounded buffer evicted them first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExitInfo {
    pub pid: u32,
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub dropped_chunks: u64,
    pub duration_s: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessInfo {
    pub pid: u32,
    pub argv: Vec<String>,
    /// Unix time (seconds) when the process started.
    pub started_at: f64,
    pub running: bool,
    pub pty: bool,
    pub background: bool,
    pub exit: Option<ExitInfo>,
    /// Sequence number of the newest output chunk (0: no output yet).
    pub last_seq: u64,
    /// Chunks evicted from this process's bounded buffer so far.
    pub evicted_chunks: u64,
}

/// Runs a command: `argv`, or `shell` (run by `/bin/sh -c`); exactly one of the two.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Exec {
    pub argv: Option<Vec<String>>,
    pub shell: Option<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    /// A user name from the sandbox's /etc/passwd, or a numeric `uid[:gid]`.
    pub user: Option<String>,
    /// Keep stdin open for `write_stdin`; otherwise it is /dev/null (a PTY always has one).
    pub stdin: bool,
    pub pty: Option<PtySize>,
    /// Kill the process group after this many seconds; `exit.timed_out` says so.
    pub timeout_s: Option<f64>,
    /// Survives the connection that started it (and can be attached to later).
    pub background: bool,
    /// Bound of this process's output buffer in bytes (the agent clamps it).
    pub buffer_bytes: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    pub client: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HelloOk {
    pub version: u32,
    pub agent: String,
    pub pid: u32,
    pub max_frame: u32,
    pub features: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Output {
    pub pid: u32,
    pub stream: Stream,
    pub seq: u64,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogRecord {
    pub seq: u64,
    pub ts: f64,
    pub pid: u32,
    pub stream: Stream,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub cpu_seconds: f64,
    pub memory_bytes: u64,
    pub memory_total_bytes: u64,
    pub pids: u32,
    pub uptime_s: f64,
}

/// Stable error codes; `message` says what went wrong for people.
pub mod codes {
    pub const MALFORMED: &str = "malformed";
    pub const UNKNOWN_MESSAGE: &str = "unknown_message";
    pub const VERSION_MISMATCH: &str = "version_mismatch";
    pub const HANDSHAKE_REQUIRED: &str = "handshake_required";
    pub const NOT_A_REQUEST: &str = "not_a_request";
    pub const DUPLICATE_ID: &str = "duplicate_id";
    pub const INVALID_ARGUMENT: &str = "invalid_argument";
    pub const NOT_FOUND: &str = "not_found";
    pub const PERMISSION_DENIED: &str = "permission_denied";
    pub const ALREADY_EXISTS: &str = "already_exists";
    pub const NOT_A_DIRECTORY: &str = "not_a_directory";
    pub const IS_A_DIRECTORY: &str = "is_a_directory";
    pub const NOT_EMPTY: &str = "not_empty";
    pub const TOO_LARGE: &str = "too_large";
    pub const NO_SUCH_PROCESS: &str = "no_such_process";
    pub const NO_SUCH_HANDLE: &str = "no_such_handle";
    pub const BUSY: &str = "busy";
    pub const IO: &str = "io";
    pub const SHUTTING_DOWN: &str = "shutting_down";
    pub const INTERNAL: &str = "internal";
}

/// Every message, requests (client → agent) and responses/events (agent → client).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    // ---- requests ----
    Hello(Hello),
    Ping {},
    Exec(Exec),
    WriteStdin {
        pid: u32,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    CloseStdin {
        pid: u32,
    },
    Resize {
        pid: u32,
        rows: u16,
        cols: u16,
    },
    Signal {
        pid: u32,
        signal: i32,
    },
    ListProcesses {},
    Attach {
        pid: u32,
        since_seq: u64,
        follow: bool,
    },
    Logs {
        since_seq: u64,
        follow: bool,
    },
    Cancel {
        target: u64,
    },
    ReadFile {
        path: String,
        max_bytes: Option<u64>,
    },
    WriteFile {
        path: String,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        mode: u32,
        make_parents: bool,
    },
    OpenRead {
        path: String,
    },
    ReadChunk {
        handle: u64,
        offset: u64,
        length: u32,
    },
    OpenWrite {
        path: String,
        mode: u32,
        make_parents: bool,
    },
    WriteChunk {
        handle: u64,
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    Commit {
        handle: u64,
    },
    CloseHandle {
        handle: u64,
    },
    ListDir {
        path: String,
        limit: Option<u32>,
    },
    Stat {
        path: String,
    },
    Mkdir {
        path: String,
        parents: bool,
        mode: u32,
    },
    Remove {
        path: String,
        recursive: bool,
    },
    Rename {
        src: String,
        dst: String,
    },
    /// Streams changes in a directory (and with `recursive` its subdirectories):
    /// `watching`, then `fs_event`s until cancelled or the directory goes away (`end`).
    WatchDir {
        path: String,
        recursive: bool,
    },
    GetStats {},
    Shutdown {
        grace_s: f64,
    },
    /// Sent by the host to a guest restored from a snapshot: mix `entropy` into the
    /// kernel's random number generator and reseed it now, so clones that share one
    /// memory image (RNG state included) diverge. `generation` counts restores.
    Reseed {
        #[serde(with = "serde_bytes")]
        entropy: Vec<u8>,
        generation: u64,
    },

    // ---- responses and events ----
    HelloOk(HelloOk),
    Pong {},
    Ok {},
    /// The answer to `shutdown`: how many processes exited after their SIGTERM within
    /// the grace period, and how many were still running at its end and were killed.
    ShutDown {
        terminated: u32,
        killed: u32,
    },
    Error {
        code: String,
        message: String,
    },
    Started {
        pid: u32,
        pty: bool,
    },
    Output(Output),
    Exit(ExitInfo),
    ProcessList {
        processes: Vec<ProcessInfo>,
    },
    Log(LogRecord),
    /// The end of a stream (logs without follow, a cancelled stream).
    End {},
    FileData {
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        size: u64,
    },
    Opened {
        handle: u64,
        size: u64,
        mode: u32,
    },
    Chunk {
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        eof: bool,
    },
    Committed {
        size: u64,
    },
    FileInfo(FileInfo),
    DirListing {
        entries: Vec<FileInfo>,
        truncated: bool,
    },
    StatsResult(Stats),
    /// The answer to `watch_dir` once the watch is in place; events follow.
    Watching {},
    /// A change seen by `watch_dir`: `path` is the entry that changed (the watched
    /// directory's path joined with the entry's name), `kind` one of `create`, `write`,
    /// `remove`, `rename`, `chmod`, or `overflow` (events were lost; `path` is the
    /// watched directory).
    FsEvent {
        path: String,
        kind: String,
    },
}

/// Every `type` tag, in declaration order (requests first).
pub const MESSAGE_TYPES: &[&str] = &[
    "hello",
    "ping",
    "exec",
    "write_stdin",
    "close_stdin",
    "resize",
    "signal",
    "list_processes",
    "attach",
    "logs",
    "cancel",
    "read_file",
    "write_file",
    "open_read",
    "read_chunk",
    "open_write",
    "write_chunk",
    "commit",
    "close_handle",
    "list_dir",
    "stat",
    "mkdir",
    "remove",
    "rename",
    "watch_dir",
    "get_stats",
    "shutdown",
    "reseed",
    "hello_ok",
    "pong",
    "ok",
    "shut_down",
    "error",
    "started",
    "output",
    "exit",
    "process_list",
    "log",
    "end",
    "file_data",
    "opened",
    "chunk",
    "committed",
    "file_info",
    "dir_listing",
    "stats_result",
    "watching",
    "fs_event",
];

impl Message {
    pub fn error(code: &str, message: impl Into<String>) -> Self {
        Message::Error {
            code: code.to_owned(),
            message: message.into(),
        }
    }

    /// True for messages a client may send (the agent rejects the others).
    pub fn is_request(&self) -> bool {
        use Message::*;
        matches!(
            self,
            Hello(_)
                | Ping {}
                | Exec(_)
                | WriteStdin { .. }
                | CloseStdin { .. }
                | Resize { .. }
                | Signal { .. }
                | ListProcesses {}
                | Attach { .. }
                | Logs { .. }
                | Cancel { .. }
                | ReadFile { .. }
                | WriteFile { .. }
                | OpenRead { .. }
                | ReadChunk { .. }
                | OpenWrite { .. }
                | WriteChunk { .. }
                | Commit { .. }
                | CloseHandle { .. }
                | ListDir { .. }
                | Stat { .. }
                | Mkdir { .. }
                | Remove { .. }
                | Rename { .. }
                | WatchDir { .. }
                | GetStats {}
                | Shutdown { .. }
                | Reseed { .. }
        )
    }

    /// The message's `type` tag.
    pub fn type_name(&self) -> &'static str {
        use Message::*;
        match self {
            Hello(_) => "hello",
            Ping {} => "ping",
            Exec(_) => "exec",
            WriteStdin { .. } => "write_stdin",
            CloseStdin { .. } => "close_stdin",
            Resize { .. } => "resize",
            Signal { .. } => "signal",
            ListProcesses {} => "list_processes",
            Attach { .. } => "attach",
            Logs { .. } => "logs",
            Cancel { .. } => "cancel",
            ReadFile { .. } => "read_file",
            WriteFile { .. } => "write_file",
            OpenRead { .. } => "open_read",
            ReadChunk { .. } => "read_chunk",
            OpenWrite { .. } => "open_write",
            WriteChunk { .. } => "write_chunk",
            Commit { .. } => "commit",
            CloseHandle { .. } => "close_handle",
            ListDir { .. } => "list_dir",
            Stat { .. } => "stat",
            Mkdir { .. } => "mkdir",
            Remove { .. } => "remove",
            Rename { .. } => "rename",
            WatchDir { .. } => "watch_dir",
            GetStats {} => "get_stats",
            Shutdown { .. } => "shutdown",
            Reseed { .. } => "reseed",
            HelloOk(_) => "hello_ok",
            Pong {} => "pong",
            Ok {} => "ok",
            ShutDown { .. } => "shut_down",
            Error { .. } => "error",
            Started { .. } => "started",
            Output(_) => "output",
            Exit(_) => "exit",
            ProcessList { .. } => "process_list",
            Log(_) => "log",
            End {} => "end",
            FileData { .. } => "file_data",
            Opened { .. } => "opened",
            Chunk { .. } => "chunk",
            Committed { .. } => "committed",
            FileInfo(_) => "file_info",
            DirListing { .. } => "dir_listing",
            StatsResult(_) => "stats_result",
            Watching {} => "watching",
            FsEvent { .. } => "fs_event",
        }
    }
}
