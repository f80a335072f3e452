//! One client connection: the handshake, then many concurrent requests.
//!
//! The reader never waits on the writer: every request runs in its own task and every
//! reply is queued by a task, so a client that sends while not reading can always be
//! read from. Output back-pressure stops at the bounded per-process buffers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tartarus_proto::{
    body_length, check_version, codes, decode_body, peek_id, DecodeError, HelloOk, LogRecord,
    Message, PtySize, HEADER_BYTES, MAX_FRAME_BYTES, PROTOCOL_VERSION,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::AbortHandle;

use crate::files::{self, Handles};
use crate::process::{Failure, Registry};
use crate::reply::Replier;
use crate::ring::{pump, PumpEnd};
use crate::watch::{Watch, Watches};

/// Frames queued for the writer per connection.
const OUT_QUEUE: usize = 64;
/// Requests in flight per connection.
const MAX_IN_FLIGHT: usize = 1024;
/// How long a closing connection may take to flush its last frames.
const FLUSH_GRACE: Duration = Duration::from_secs(2);
/// How long a closing connection waits for the processes it killed to be reaped.
const KILL_SETTLE: Duration = Duration::from_secs(2);
/// Input discarded after a fatal protocol error, so the error reply is not lost.
const LINGER_BYTES: u64 = 1 << 20;
/// Time allowed for the client's hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

pub const FEATURES: &[&str] = &[
    "exec",
    "pty",
    "stdin",
    "attach",
    "logs",
    "files",
    "stream-files",
    "stats",
    "reseed",
    "watch",
];

/// What the whole agent shares between connections.
pub struct Agent {
    pub registry: Arc<Registry>,
    pub started: Instant,
    next_conn: AtomicU64,
    /// Set to `Some(grace_s)` when the agent should shut down.
    pub shutdown: watch::Sender<Option<f64>>,
    /// Set once shutdown is complete and the process may exit: how it ended the
    /// processes (terminated, killed).
    pub finished: watch::Sender<Option<(u32, u32)>>,
}

impl Agent {
    pub fn new(registry: Arc<Registry>) -> Arc<Self> {
        Arc::new(Self {
            registry,
            started: Instant::now(),
            next_conn: AtomicU64::new(1),
            shutdown: watch::channel(None).0,
            finished: watch::channel(None).0,
        })
    }

    fn shutting_down(&self) -> bool {
        self.shutdown.borrow().is_some()
    }

    /// Terminates every process: SIGTERM, up to `grace_s` to exit, then SIGKILL.
    /// Returns how many exited within the grace period and how many were killed.
    pub async fn terminate_all(&self, grace_s: f64) -> (u32, u32) {
        let grace = Duration::from_secs_f64(grace_s.clamp(0.0, 3600.0));
        let running = self.registry.running();
        for p in &running {
            let _ = p.signal(libc::SIGTERM);
        }
        let all_ended = || async {
            for p in &running {
                p.output.wait_from(u64::MAX, 0).await;
            }
        };
        if tokio::time::timeout(grace, all_ended()).await.is_ok() {
            return (running.len() as u32, 0);
        }
        // Counted among those it sent SIGTERM; anything started since is killed too.
        let killed = running.iter().filter(|p| p.running()).count() as u32;
        for p in self.registry.running() {
            let _ = p.signal(libc::SIGKILL);
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), all_ended()).await;
        (running.len() as u32 - killed, killed)
    }
}

struct Conn {
    id: u64,
    out: mpsc::Sender<Vec<u8>>,
    handles: Handles,
    /// Directory watches open on this connection.
    watches: Watches,
    tasks: Mutex<HashMap<u64, AbortHandle>>,
    /// Notified whenever a request task finishes.
    task_done: Notify,
}

impl Conn {
    fn idle(&self) -> bool {
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// Waits until no request is in flight.
    async fn wait_idle(&self) {
        loop {
            let notified = self.task_done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.idle() {
                return;
            }
            notified.await;
        }
    }

    fn replier(&self, id: u64) -> Replier {
        Replier::new(self.out.clone(), id)
    }

    /// Queues a reply from a task, so the reader never waits for the writer.
    fn reply_later(&self, id: u64, body: Message) {
        let reply = self.replier(id);
        tokio::spawn(async move {
            reply.send(body).await;
        });
    }

    fn fail_later(&self, id: u64, (code, message): Failure) {
        self.reply_later(id, Message::error(code, message));
    }
}

enum ReadError {
    Decode(DecodeError),
    /// The peer closed the connection cleanly between frames, or the transport failed.
    Closed,
}

/// Reads one frame body; the length is checked before anything is allocated.
async fn read_body<R: AsyncRead + Unpin>(r: &mut R) -> Result<Vec<u8>, ReadError> {
    let mut header = [0u8; HEADER_BYTES];
    let mut got = 0;
    while got < HEADER_BYTES {
        match r.read(&mut header[got..]).await {
            Ok(0) if got == 0 => return Err(ReadError::Closed),
            Ok(0) => {
                return Err(ReadError::Decode(DecodeError::Truncated {
                    expected: HEADER_BYTES,
                    got,
                }))
            }
            Ok(n) => got += n,
            Err(_) => return Err(ReadError::Closed),
        }
    }
    let len = body_length(header).map_err(ReadError::Decode)?;
    let mut body = vec![0u8; len];
    let mut got = 0;
    while got < len {
        match r.read(&mut body[got..]).await {
            Ok(0) => {
                return Err(ReadError::Decode(DecodeError::Truncated {
                    expected: len,
                    got,
                }))
            }
            Ok(n) => got += n,
            Err(_) => return Err(ReadError::Closed),
        }
    }
    Ok(body)
}

/// After the peer closes its sending side, how long requests already received may take
/// to answer before their streams are dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Linger {
    /// Up to `FLUSH_GRACE`: a client may send a request, close its side, then read.
    Answer,
    /// Not at all: the host hung up a connection the agent dialled and reads no more
    /// (it is about to checkpoint the sandbox, which must not wait seconds for a stream).
    None,
}

/// Serves one connection until the peer closes it or the agent shuts down.
pub async fn serve<R, W>(agent: Arc<Agent>, mut reader: R, mut writer: W, linger: Linger)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (out, mut queue) = mpsc::channel::<Vec<u8>>(OUT_QUEUE);
    let writer_task = tokio::spawn(async move {
        while let Some(frame) = queue.recv().await {
            if writer.write_all(&frame).await.is_err() {
                return;
            }
            if queue.is_empty() && writer.flush().await.is_err() {
                return;
            }
        }
        let _ = writer.shutdown().await;
    });
    let conn = Arc::new(Conn {
        id: agent.next_conn.fetch_add(1, Ordering::Relaxed),
        out,
        handles: Handles::default(),
        watches: Watches::default(),
        tasks: Mutex::new(HashMap::new()),
        task_done: Notify::new(),
    });

    let mut fatal = !handshake(&agent, &conn, &mut reader).await;
    while !fatal {
        match read_body(&mut reader).await {
            Ok(body) => dispatch(&agent, &conn, &body),
            Err(ReadError::Closed) => break,
            Err(ReadError::Decode(err)) => {
                // After a bad header the stream cannot be resynchronised.
                conn.reply_later(
                    0,
                    Message::error(err.code(), format!("{err}; closing the connection")),
                );
                fatal = true;
            }
        }
    }

    if !fatal && linger == Linger::Answer {
        // The peer may have closed only its sending side: requests already received
        // get a bounded time to answer.
        let _ = tokio::time::timeout(FLUSH_GRACE, conn.wait_idle()).await;
    }
    let tasks: Vec<AbortHandle> = conn
        .tasks
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain()
        .map(|(_, t)| t)
        .collect();
    tasks.iter().for_each(AbortHandle::abort);
    let killed = agent.registry.kill_owned_by(conn.id);
    drop(conn);
    // Until they are reaped: a client that connects next (the dialling agent's next
    // connection comes right after) sees them gone, not dying.
    let reaped = async {
        for p in &killed {
            p.output.wait_from(u64::MAX, 0).await;
        }
    };
    let _ = tokio::time::timeout(KILL_SETTLE, reaped).await;
    // The writer ends once every queued reply is written and all senders are gone.
    let abort = writer_task.abort_handle();
    if tokio::time::timeout(FLUSH_GRACE, writer_task)
        .await
        .is_err()
    {
        abort.abort();
    }
    if fatal {
        // Closing with unread input would reset the connection and could destroy the
        // error reply before the peer reads it; discard a bounded amount first.
        let mut sink = tokio::io::sink();
        let mut rest = (&mut reader).take(LINGER_BYTES);
        let _ = tokio::time::timeout(FLUSH_GRACE, tokio::io::copy(&mut rest, &mut sink)).await;
    }
}

/// Reads and answers the client's hello; false if the connection must close.
async fn handshake<R: AsyncRead + Unpin>(agent: &Agent, conn: &Conn, reader: &mut R) -> bool {
    let body = match tokio::time::timeout(HELLO_TIMEOUT, read_body(reader)).await {
        Ok(Ok(body)) => body,
        Ok(Err(ReadError::Decode(err))) => {
            conn.reply_later(0, Message::error(err.code(), err.to_string()));
            return false;
        }
        Ok(Err(ReadError::Closed)) | Err(_) => return false,
    };
    let envelope = match decode_body(&body) {
        Ok(envelope) => envelope,
        Err(err) => {
            let id = peek_id(&body).unwrap_or(0);
            conn.reply_later(id, Message::error(err.code(), err.to_string()));
            return false;
        }
    };
    let Message::Hello(hello) = envelope.body else {
        conn.reply_later(
            envelope.id,
            Message::error(
                codes::HANDSHAKE_REQUIRED,
                format!(
                    "the first message must be hello, got {}",
                    envelope.body.type_name()
                ),
            ),
        );
        return false;
    };
    if let Err(err) = check_version(hello.version) {
        conn.reply_later(
            envelope.id,
            Message::error(
                err.code(),
                format!("{err}; use a client and agent from the same release"),
            ),
        );
        return false;
    }
    if agent.shutting_down() {
        conn.reply_later(
            envelope.id,
            Message::error(codes::SHUTTING_DOWN, "the agent is shutting down"),
        );
        return false;
    }
    conn.reply_later(
        envelope.id,
        Message::HelloOk(HelloOk {
            version: PROTOCOL_VERSION,
            agent: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            max_frame: MAX_FRAME_BYTES as u32,
            features: FEATURES.iter().map(|f| (*f).to_owned()).collect(),
        }),
    );
    true
}

fn dispatch(agent: &Arc<Agent>, conn: &Arc<Conn>, body: &[u8]) {
    let envelope = match decode_body(body) {
        Ok(envelope) => envelope,
        Err(err) => {
            let id = match &err {
                DecodeError::UnknownMessage { id, .. } => id.unwrap_or(0),
                _ => peek_id(body).unwrap_or(0),
            };
            conn.reply_later(id, Message::error(err.code(), err.to_string()));
            return;
        }
    };
    let id = envelope.id;
    let msg = envelope.body;
    if !msg.is_request() {
        conn.fail_later(
            id,
            (
                codes::NOT_A_REQUEST,
                format!("{} is not a request", msg.type_name()),
            ),
        );
        return;
    }
    // Requests that must keep their arrival order are handled right here.
    let registry = &agent.registry;
    let immediate = match &msg {
        Message::Hello(_) => Some(Err((
            codes::INVALID_ARGUMENT,
            "hello was already received".into(),
        ))),
        Message::WriteStdin { pid, data } => Some(
            registry
                .get(*pid)
                .and_then(|p| p.write_stdin(data.clone(), conn.replier(id)))
                .map(|()| None),
        ),
        Message::CloseStdin { pid } => Some(
            registry
                .get(*pid)
                .and_then(|p| p.close_stdin(conn.replier(id)))
                .map(|()| None),
        ),
        Message::Resize { pid, rows, cols } => Some(
            registry
                .get(*pid)
                .and_then(|p| {
                    p.resize(PtySize {
                        rows: *rows,
                        cols: *cols,
                    })
                })
                .map(|()| Some(Message::Ok {})),
        ),
        Message::Signal { pid, signal } => Some(
            registry
                .get(*pid)
                .and_then(|p| p.signal(*signal))
                .map(|()| Some(Message::Ok {})),
        ),
        Message::Cancel { target } => {
            let task = conn
                .tasks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(target);
            if let Some(task) = task {
                task.abort();
                conn.reply_later(*target, Message::End {});
            }
            Some(Ok(Some(Message::Ok {})))
        }
        _ => None,
    };
    if let Some(result) = immediate {
        match result {
            Ok(Some(reply)) => conn.reply_later(id, reply),
            Ok(None) => {}
            Err(failure) => conn.fail_later(id, failure),
        }
        return;
    }

    let mut tasks = conn.tasks.lock().unwrap_or_else(|p| p.into_inner());
    if tasks.contains_key(&id) {
        drop(tasks);
        conn.fail_later(
            id,
            (
                codes::DUPLICATE_ID,
                format!("request id {id} is already in flight"),
            ),
        );
        return;
    }
    if tasks.len() >= MAX_IN_FLIGHT {
        drop(tasks);
        conn.fail_later(
            id,
            (
                codes::BUSY,
                format!("{MAX_IN_FLIGHT} requests in flight; wait for some to finish"),
            ),
        );
        return;
    }
    let (agent2, conn2) = (agent.clone(), conn.clone());
    let task = tokio::spawn(async move {
        let reply = conn2.replier(id);
        handle(&agent2, &conn2, &reply, msg).await;
        conn2
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        conn2.task_done.notify_waiters();
    });
    tasks.insert(id, task.abort_handle());
}

/// Runs blocking file system work off the reactor.
async fn blocking<T, F>(f: F) -> Result<T, Failure>
where
    F: FnOnce() -> Result<T, Failure> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err((codes::INTERNAL, format!("file task failed: {e}"))))
}

async fn handle(agent: &Arc<Agent>, conn: &Arc<Conn>, reply: &Replier, msg: Message) {
    let result: Result<Message, Failure> = match msg {
        Message::Ping {} => Ok(Message::Pong {}),
        Message::Exec(exec) => {
            if agent.shutting_down() {
                Err((codes::SHUTTING_DOWN, "the agent is shutting down".into()))
            } else {
                match agent.registry.spawn(exec, conn.id) {
                    Ok(process) => {
                        if reply
                            .send(Message::Started {
                                pid: process.pid,
                                pty: process.pty,
                            })
                            .await
                        {
                            process.stream(reply, 0, true).await;
                        }
                        return;
                    }
                    Err(failure) => Err(failure),
                }
            }
        }
        Message::Attach {
            pid,
            since_seq,
            follow,
        } => match agent.registry.get(pid) {
            Ok(process) => {
                if reply
                    .send(Message::Started {
                        pid,
                        pty: process.pty,
                    })
                    .await
                {
                    process.stream(reply, since_seq, follow).await;
                }
                return;
            }
            Err(failure) => Err(failure),
        },
        Message::ListProcesses {} => Ok(Message::ProcessList {
            processes: agent.registry.list(),
        }),
        Message::Logs { since_seq, follow } => {
            let emit = |entry: crate::ring::Entry| {
                reply.send(Message::Log(LogRecord {
                    seq: entry.seq,
                    ts: entry.ts,
                    pid: entry.pid,
                    stream: entry.stream,
                    data: entry.data.to_vec(),
                }))
            };
            match pump(&agent.registry.log, since_seq, follow, emit).await {
                (PumpEnd::Gone, _) => return,
                _ => Ok(Message::End {}),
            }
        }
        Message::ReadFile { path, max_bytes } => {
            blocking(move || files::read_file(&path, max_bytes))
                .await
                .map(|(data, size)| Message::FileData { data, size })
        }
        Message::WriteFile {
            path,
            data,
            mode,
            make_parents,
        } => blocking(move || files::write_file(&path, &data, mode, make_parents))
            .await
            .map(|()| Message::Ok {}),
        Message::OpenRead { path } => {
            let c = conn.clone();
            blocking(move || c.handles.open_read(&path))
                .await
                .map(|(handle, size, mode)| Message::Opened { handle, size, mode })
        }
        Message::ReadChunk {
            handle,
            offset,
            length,
        } => {
            let c = conn.clone();
            blocking(move || c.handles.read_chunk(handle, offset, length))
                .await
                .map(|(data, eof)| Message::Chunk { data, eof })
        }
        Message::OpenWrite {
            path,
            mode,
            make_parents,
        } => {
            let c = conn.clone();
            blocking(move || c.handles.open_write(&path, mode, make_parents))
                .await
                .map(|handle| Message::Opened {
                    handle,
                    size: 0,
                    mode,
                })
        }
        Message::WriteChunk {
            handle,
            offset,
            data,
        } => {
            let c = conn.clone();
            blocking(move || c.handles.write_chunk(handle, offset, &data))
                .await
                .map(|()| Message::Ok {})
        }
        Message::Commit { handle } => {
            let c = conn.clone();
            blocking(move || c.handles.commit(handle))
                .await
                .map(|size| Message::Committed { size })
        }
        Message::CloseHandle { handle } => {
            let c = conn.clone();
            blocking(move || c.handles.close(handle))
                .await
                .map(|()| Message::Ok {})
        }
        Message::ListDir { path, limit } => blocking(move || files::list_dir(&path, limit))
            .await
            .map(|(entries, truncated)| Message::DirListing { entries, truncated }),
        Message::Stat { path } => blocking(move || files::stat(&path))
            .await
            .map(Message::FileInfo),
        Message::Mkdir {
            path,
            parents,
            mode,
        } => blocking(move || files::mkdir(&path, parents, mode))
            .await
            .map(|()| Message::Ok {}),
        Message::Remove { path, recursive } => blocking(move || files::remove(&path, recursive))
            .await
            .map(|()| Message::Ok {}),
        Message::Rename { src, dst } => blocking(move || files::rename(&src, &dst))
            .await
            .map(|()| Message::Ok {}),
        Message::WatchDir { path, recursive } => {
            // Held until the stream ends or its task is aborted (`cancel`).
            let slot = match conn.watches.acquire() {
                Ok(slot) => slot,
                Err((code, message)) => {
                    reply.error(code, message).await;
                    return;
                }
            };
            let watch = blocking(move || Watch::start(&path, recursive))
                .await
                .and_then(|prepared| prepared.register());
            match watch {
                Ok(watch) => {
                    if reply.send(Message::Watching {}).await {
                        watch.run(reply).await;
                    }
                    drop(slot);
                    return;
                }
                Err(failure) => Err(failure),
            }
        }
        Message::GetStats {} => {
            let started = agent.started;
            blocking(move || Ok(crate::stats::collect(started)))
                .await
                .map(Message::StatsResult)
        }
        Message::Reseed { entropy, .. } => blocking(move || crate::reseed::reseed(&entropy))
            .await
            .map(|_| Message::Ok {}),
        Message::Shutdown { grace_s } => {
            agent.shutdown.send_replace(Some(grace_s));
            // The main task terminates the processes and then lets the agent exit;
            // this reply is sent once that is done.
            let mut finished = agent.finished.subscribe();
            let ended = finished
                .wait_for(Option::is_some)
                .await
                .map_or(None, |done| *done);
            let (terminated, killed) = ended.unwrap_or_default();
            Ok(Message::ShutDown { terminated, killed })
        }
        other => Err((
            codes::INVALID_ARGUMENT,
            format!("{} cannot be handled here", other.type_name()),
        )),
    };
    match result {
        Ok(message) => reply.send(message).await,
        Err((code, message)) => reply.error(code, message).await,
    };
}
