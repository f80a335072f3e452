//! Processes the agent runs: spawning (pipes or a PTY, user, env, cwd, timeout), the
//! table of running and recently exited processes, stdin, signals and output streams.

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tartarus_proto::{codes, Exec, ExitInfo, Message, Output, ProcessInfo, PtySize, Stream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::fdio::AsyncPipe;
use crate::reaper::{Ended, Reaper};
use crate::reply::Replier;
use crate::ring::{pump, Entry, PumpEnd, Ring};
use crate::spawn;
use crate::user::{self, Credentials};

/// Default bound of one process's output buffer.
pub const DEFAULT_BUFFER_BYTES: usize = 16 << 20;
const MIN_BUFFER_BYTES: usize = 4 << 10;
const MAX_BUFFER_BYTES: usize = 256 << 20;
/// Exited processes kept for `list_processes` and late `attach`.
const MAX_EXITED: usize = 128;
/// Output retained across all exited processes; the oldest are trimmed first.
const RETAINED_BYTES: usize = 64 << 20;
/// Stdin accepted but not yet written to the child.
const MAX_STDIN_PENDING: usize = 8 << 20;
/// Size of one read from a child's output.
const READ_BYTES: usize = crate::ring::COALESCE_BYTES;
/// Capacity asked for the output pipes, so a fast writer is not switched out every
/// 64 KiB (the kernel's default) while the agent catches up.
const PIPE_BYTES: i32 = 1 << 20;
/// After a process exits, how long to keep draining output held open by its children.
const DRAIN_GRACE: Duration = Duration::from_millis(200);
/// How long a timed-out process's group may take to die and be reaped.
const GROUP_SETTLE: Duration = Duration::from_secs(2);
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub type Failure = (&'static str, String);

pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

enum StdinOp {
    Data(Vec<u8>, Replier),
    Close(Replier),
}

#[derive(Debug, Clone, Copy)]
struct ExitRecord {
    ended: Ended,
    duration_s: f64,
}

pub struct Process {
    pub pid: u32,
    pub argv: Vec<String>,
    pub started_at: f64,
    pub pty: bool,
    pub background: bool,
    /// The connection that started it: a foreground process dies with it.
    pub owner: u64,
    pub output: Arc<Ring>,
    stdin: Mutex<Option<mpsc::UnboundedSender<StdinOp>>>,
    stdin_pending: Arc<AtomicUsize>,
    pty_master: Option<Arc<AsyncPipe>>,
    timed_out: AtomicBool,
    exit: Mutex<Option<ExitRecord>>,
}

impl Process {
    pub fn running(&self) -> bool {
        self.exit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
    }

    fn exit_info(&self, dropped_chunks: u64) -> Option<ExitInfo> {
        let record = *self.exit.lock().unwrap_or_else(|p| p.into_inner());
        record.map(|r| {
            let (code, signal) = match r.ended {
                Ended::Code(c) => (Some(c), None),
                Ended::Signal(s) => (None, Some(s)),
            };
            ExitInfo {
                pid: self.pid,
                code,
                signal,
                timed_out: self.timed_out.load(Ordering::SeqCst),
                dropped_chunks,
                duration_s: r.duration_s,
            }
        })
    }

    pub fn info(&self) -> ProcessInfo {
        let exit = self.exit_info(self.output.evicted());
        ProcessInfo {
            pid: self.pid,
            argv: self.argv.clone(),
            started_at: self.started_at,
            running: exit.is_none(),
            pty: self.pty,
            background: self.background,
            exit,
            last_seq: self.output.last_seq(),
            evicted_chunks: self.output.evicted(),
        }
    }

    /// Sends a signal to the process group (every exec leads its own session).
    pub fn signal(&self, signal: i32) -> Result<(), Failure> {
        let sig = Signal::try_from(signal)
            .map_err(|_| (codes::INVALID_ARGUMENT, format!("{signal} is not a signal")))?;
        if !self.running() {
            return Err((
                codes::NO_SUCH_PROCESS,
                format!("process {} has exited", self.pid),
            ));
        }
        let pid = Pid::from_raw(self.pid as i32);
        killpg(pid, sig)
            .or_else(|_| kill(pid, sig))
            .map_err(|e| (codes::NO_SUCH_PROCESS, format!("process {}: {e}", self.pid)))
    }

    pub fn resize(&self, size: PtySize) -> Result<(), Failure> {
        let Some(master) = &self.pty_master else {
            return Err((
                codes::INVALID_ARGUMENT,
                format!("process {} has no terminal", self.pid),
            ));
        };
        set_window_size(master.raw(), size)
            .map_err(|e| (codes::IO, format!("resize of process {}: {e}", self.pid)))
    }

    /// Queues stdin data; the reply comes once it is written to the child. Queueing is
    /// synchronous so writes keep the order in which they arrived.
    pub fn write_stdin(&self, data: Vec<u8>, reply: Replier) -> Result<(), Failure> {
        let pending = self.stdin_pending.load(Ordering::SeqCst);
        if pending + data.len() > MAX_STDIN_PENDING {
            return Err((
                codes::BUSY,
                format!(
                    "process {} has {pending} bytes of stdin not yet read; wait for replies before sending more",
                    self.pid
                ),
            ));
        }
        let guard = self.stdin.lock().unwrap_or_else(|p| p.into_inner());
        let Some(tx) = guard.as_ref() else {
            return Err((
                codes::INVALID_ARGUMENT,
                format!(
                    "process {} has no open stdin (exec with stdin=true)",
                    self.pid
                ),
            ));
        };
        self.stdin_pending.fetch_add(data.len(), Ordering::SeqCst);
        tx.send(StdinOp::Data(data, reply)).map_err(|_| {
            (
                codes::INVALID_ARGUMENT,
                format!("stdin of process {} is closed", self.pid),
            )
        })
    }

    pub fn close_stdin(&self, reply: Replier) -> Result<(), Failure> {
        let tx = self.stdin.lock().unwrap_or_else(|p| p.into_inner()).take();
        match tx {
            Some(tx) => tx
                .send(StdinOp::Close(reply))
                .map_err(|_| (codes::INVALID_ARGUMENT, "stdin already closed".into())),
            None => Err((
                codes::INVALID_ARGUMENT,
                format!("process {} has no open stdin", self.pid),
            )),
        }
    }

    /// Streams output with `seq > since_seq`, then (if the process ended) its exit.
    /// With `follow`, waits for new output until the process exits.
    pub async fn stream(&self, reply: &Replier, since_seq: u64, follow: bool) {
        let emit = |entry: Entry| {
            reply.send(Message::Output(Output {
                pid: self.pid,
                stream: entry.stream,
                seq: entry.seq,
                data: entry.data.to_vec(),
            }))
        };
        match pump(&self.output, since_seq, follow, emit).await {
            (PumpEnd::Closed, dropped) => {
                if let Some(exit) = self.exit_info(dropped) {
                    reply.send(Message::Exit(exit)).await;
                }
            }
            (PumpEnd::CaughtUp, _) => {
                reply.send(Message::End {}).await;
            }
            (PumpEnd::Gone, _) => {}
        }
    }
}

pub struct Registry {
    reaper: Arc<Reaper>,
    pub log: Arc<Ring>,
    etc: PathBuf,
    procs: Mutex<BTreeMap<u32, Arc<Process>>>,
    exited: Mutex<VecDeque<Arc<Process>>>,
}

struct Spawned {
    pid: u32,
    exit_rx: tokio::sync::oneshot::Receiver<Ended>,
    outputs: Vec<(AsyncPipe, Stream)>,
    stdin: Option<Arc<AsyncPipe>>,
    pty_master: Option<Arc<AsyncPipe>>,
}

impl Registry {
    pub fn new(reaper: Arc<Reaper>, log: Arc<Ring>, etc: PathBuf) -> Arc<Self> {
        Arc::new(Self {
            reaper,
            log,
            etc,
            procs: Mutex::new(BTreeMap::new()),
            exited: Mutex::new(VecDeque::new()),
        })
    }

    pub fn get(&self, pid: u32) -> Result<Arc<Process>, Failure> {
        self.procs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&pid)
            .cloned()
            .ok_or_else(|| (codes::NO_SUCH_PROCESS, format!("no process {pid}")))
    }

    pub fn list(&self) -> Vec<ProcessInfo> {
        let procs: Vec<Arc<Process>> = self
            .procs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        procs.iter().map(|p| p.info()).collect()
    }

    pub fn running(&self) -> Vec<Arc<Process>> {
        let procs = self.procs.lock().unwrap_or_else(|p| p.into_inner());
        procs.values().filter(|p| p.running()).cloned().collect()
    }

    /// Kills the foreground processes a closed connection left behind; returns them.
    pub fn kill_owned_by(&self, conn: u64) -> Vec<Arc<Process>> {
        let mut killed = Vec::new();
        for p in self.running() {
            if p.owner == conn && !p.background {
                let _ = p.signal(libc::SIGKILL);
                killed.push(p);
            }
        }
        killed
    }

    /// Starts a process and the tasks that collect its output and exit status.
    pub fn spawn(self: &Arc<Self>, req: Exec, owner: u64) -> Result<Arc<Process>, Failure> {
        let argv = match (req.argv, req.shell) {
            (Some(argv), None) if !argv.is_empty() => argv,
            (None, Some(shell)) => vec!["/bin/sh".into(), "-c".into(), shell],
            _ => {
                return Err((
                    codes::INVALID_ARGUMENT,
                    "exec needs exactly one of a non-empty argv or a shell string".into(),
                ))
            }
        };
        let creds = match &req.user {
            Some(spec) => {
                Some(user::resolve(spec, &self.etc).map_err(|e| (codes::INVALID_ARGUMENT, e))?)
            }
            None => None,
        };
        // With no user asked for, the command runs as the agent does; its passwd entry
        // supplies a HOME the sandbox's environment lacks.
        let own = match &creds {
            Some(_) => None,
            None => user::resolve(&nix::unistd::geteuid().as_raw().to_string(), &self.etc).ok(),
        };
        if let Some(c) = &creds {
            let euid = nix::unistd::geteuid().as_raw();
            if euid != 0 && c.uid != euid {
                return Err((
                    codes::PERMISSION_DENIED,
                    format!(
                        "the agent runs as uid {euid} and cannot run as uid {}",
                        c.uid
                    ),
                ));
            }
        }
        if let Some(cwd) = &req.cwd {
            if !std::path::Path::new(cwd).is_dir() {
                return Err((
                    codes::NOT_FOUND,
                    format!("working directory {cwd} does not exist"),
                ));
            }
        }
        let limit = req.buffer_bytes.map_or(DEFAULT_BUFFER_BYTES, |b| {
            b.clamp(MIN_BUFFER_BYTES as u64, MAX_BUFFER_BYTES as u64) as usize
        });
        let launch = Launch {
            argv: &argv,
            env: child_env(&req.env, creds.as_ref(), own.as_ref(), req.pty.is_some()),
            cwd: req.cwd.as_deref(),
            pty: req.pty,
            stdin: req.stdin,
            creds,
        };
        let started = Instant::now();
        let spawned = spawn_child(&self.reaper, launch).map_err(|e| {
            if e.raw_os_error() == Some(libc::EAGAIN) {
                return (
                    codes::BUSY,
                    format!(
                        "cannot run {:?}: the sandbox is at its process limit ({e})",
                        argv[0]
                    ),
                );
            }
            let code = match e.kind() {
                std::io::ErrorKind::NotFound => codes::NOT_FOUND,
                std::io::ErrorKind::PermissionDenied => codes::PERMISSION_DENIED,
                std::io::ErrorKind::InvalidInput => codes::INVALID_ARGUMENT,
                _ => codes::IO,
            };
            (code, format!("cannot run {:?}: {e}", argv[0]))
        })?;

        let (stdin_tx, stdin_rx) = mpsc::unbounded_channel();
        let has_stdin = spawned.stdin.is_some();
        let process = Arc::new(Process {
            pid: spawned.pid,
            argv,
            started_at: unix_now(),
            pty: req.pty.is_some(),
            background: req.background,
            owner,
            output: Ring::new(limit),
            stdin: Mutex::new(has_stdin.then_some(stdin_tx)),
            stdin_pending: Arc::new(AtomicUsize::new(0)),
            pty_master: spawned.pty_master.clone(),
            timed_out: AtomicBool::new(false),
            exit: Mutex::new(None),
        });
        self.procs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(process.pid, process.clone());

        if let Some(pipe) = spawned.stdin {
            tokio::spawn(write_stdin_loop(
                pipe,
                stdin_rx,
                process.stdin_pending.clone(),
                process.pty,
            ));
        }
        let readers: Vec<JoinHandle<()>> = spawned
            .outputs
            .into_iter()
            .map(|(pipe, stream)| {
                tokio::spawn(read_output(pipe, stream, process.clone(), self.log.clone()))
            })
            .collect();
        let timeout = req
            .timeout_s
            .filter(|t| t.is_finite() && *t > 0.0)
            .map(|t| Duration::from_secs_f64(t.min(1e9)));
        tokio::spawn(self.clone().supervise(
            process.clone(),
            spawned.exit_rx,
            readers,
            timeout,
            started,
        ));
        Ok(process)
    }

    async fn supervise(
        self: Arc<Self>,
        process: Arc<Process>,
        mut exit_rx: tokio::sync::oneshot::Receiver<Ended>,
        mut readers: Vec<JoinHandle<()>>,
        timeout: Option<Duration>,
        started: Instant,
    ) {
        let ended = match timeout {
            Some(limit) => tokio::select! {
                ended = &mut exit_rx => ended,
                () = tokio::time::sleep(limit) => {
                    process.timed_out.store(true, Ordering::SeqCst);
                    let _ = process.signal(libc::SIGKILL);
                    let ended = exit_rx.await;
                    settle_group(process.pid).await;
                    ended
                }
            },
            None => exit_rx.await,
        };
        let ended = ended.unwrap_or(Ended::Signal(libc::SIGKILL));
        let duration_s = started.elapsed().as_secs_f64();
        // Output still in the pipes belongs to this process; children that inherited
        // them may keep them open, so the drain is bounded.
        let drain = async {
            for reader in readers.iter_mut() {
                let _ = reader.await;
            }
        };
        if tokio::time::timeout(DRAIN_GRACE, drain).await.is_err() {
            readers.iter().for_each(JoinHandle::abort);
        }
        *process.stdin.lock().unwrap_or_else(|p| p.into_inner()) = None;
        *process.exit.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(ExitRecord { ended, duration_s });
        process.output.close();
        self.retire(process);
    }

    /// Keeps a bounded history of exited processes and of their output.
    fn retire(&self, process: Arc<Process>) {
        let mut exited = self.exited.lock().unwrap_or_else(|p| p.into_inner());
        exited.push_back(process);
        while exited.len() > MAX_EXITED {
            if let Some(old) = exited.pop_front() {
                let mut procs = self.procs.lock().unwrap_or_else(|p| p.into_inner());
                if procs.get(&old.pid).is_some_and(|p| Arc::ptr_eq(p, &old)) {
                    procs.remove(&old.pid);
                }
            }
        }
        let mut retained: usize = exited.iter().map(|p| p.output.buffered_bytes()).sum();
        for old in exited.iter() {
            if retained <= RETAINED_BYTES {
                break;
            }
            retained -= old.output.buffered_bytes();
            old.output.shrink_to(0);
        }
    }
}

/// The environment of a command: the agent's, then the user's identity (`creds`, the
/// user the request named), then the request's own variables. `own` is the agent's own
/// passwd entry when no user was named: runsc gives its container a HOME from
/// /etc/passwd but the jail starts the agent without one, and a command that uses `~`
/// (pip, git, shells) must see the same HOME on every backend.
fn child_env(
    extra: &BTreeMap<String, String>,
    creds: Option<&Credentials>,
    own: Option<&Credentials>,
    pty: bool,
) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = std::env::vars().collect();
    env.entry("PATH".into())
        .or_insert_with(|| DEFAULT_PATH.into());
    if let Some(c) = creds {
        if let Some(home) = &c.home {
            env.insert("HOME".into(), home.clone());
        }
        if let Some(name) = &c.name {
            env.insert("USER".into(), name.clone());
            env.insert("LOGNAME".into(), name.clone());
        }
    } else if let Some(home) = own.and_then(|c| c.home.as_ref()) {
        env.entry("HOME".into()).or_insert_with(|| home.clone());
    }
    if pty {
        env.entry("TERM".into())
            .or_insert_with(|| "xterm-256color".into());
    }
    env.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
    env
}

fn set_window_size(fd: &OwnedFd, size: PtySize) -> std::io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which points at a live
    // local for the duration of the call; `fd` is an open descriptor we own.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn set_cloexec(fd: &OwnedFd) -> std::io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    Ok(())
}

/// Best effort: the limit (/proc/sys/fs/pipe-max-size) may be lower.
fn grow_pipe(fd: &OwnedFd) {
    let _ = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_BYTES));
}

/// Kills what is left of a timed-out process's group until none of it is left
/// unreaped, so its end frees the pids it held: a fork bomb's children may fork
/// past the first kill, and until they are reaped they count against the
/// sandbox's pids limit and make the next exec fail with EAGAIN.
async fn settle_group(pid: u32) {
    let group = Pid::from_raw(pid as i32);
    let gone = async {
        while killpg(group, Signal::SIGKILL).is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let _ = tokio::time::timeout(GROUP_SETTLE, gone).await;
}

/// What to run: the request, resolved.
struct Launch<'a> {
    argv: &'a [String],
    env: BTreeMap<String, String>,
    cwd: Option<&'a str>,
    pty: Option<PtySize>,
    stdin: bool,
    creds: Option<Credentials>,
}

fn spawn_child(reaper: &Reaper, launch: Launch<'_>) -> std::io::Result<Spawned> {
    if launch.pty.is_none() && launch.creds.is_none() {
        spawn_plain(reaper, launch)
    } else {
        fork_child(reaper, launch)
    }
}

/// Pipes, the agent's user: posix_spawn, no fork (see `spawn`).
fn spawn_plain(reaper: &Reaper, launch: Launch<'_>) -> std::io::Result<Spawned> {
    let path = launch.env.get("PATH").map_or(DEFAULT_PATH, String::as_str);
    let program = spawn::find_program(&launch.argv[0], path, launch.cwd)?;
    let mut guard = reaper.lock();
    let child = spawn::spawn(&program, launch.argv, &launch.env, launch.cwd, launch.stdin)?;
    let exit_rx = guard.watch(child.pid);
    drop(guard);
    grow_pipe(&child.stdout);
    grow_pipe(&child.stderr);
    Ok(Spawned {
        pid: child.pid,
        exit_rx,
        outputs: vec![
            (AsyncPipe::new(child.stdout)?, Stream::Stdout),
            (AsyncPipe::new(child.stderr)?, Stream::Stderr),
        ],
        stdin: child.stdin.map(AsyncPipe::new).transpose()?.map(Arc::new),
        pty_master: None,
    })
}

/// A PTY or another user: fork, since posix_spawn can do neither.
fn fork_child(reaper: &Reaper, launch: Launch<'_>) -> std::io::Result<Spawned> {
    let mut cmd = Command::new(&launch.argv[0]);
    cmd.args(&launch.argv[1..]);
    cmd.env_clear().envs(&launch.env);
    if let Some(cwd) = launch.cwd {
        cmd.current_dir(cwd);
    }
    let (pty, want_stdin, creds) = (launch.pty, launch.stdin, launch.creds);
    let mut master = None;
    if let Some(size) = pty {
        let winsize = nix::pty::Winsize {
            ws_row: size.rows,
            ws_col: size.cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pair = nix::pty::openpty(Some(&winsize), None)?;
        set_cloexec(&pair.master)?;
        set_cloexec(&pair.slave)?;
        cmd.stdin(Stdio::from(pair.slave.try_clone()?));
        cmd.stdout(Stdio::from(pair.slave.try_clone()?));
        cmd.stderr(Stdio::from(pair.slave));
        master = Some(pair.master);
    } else {
        cmd.stdin(if want_stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        cmd.stdout(Stdio::piped());
        cmd.stderr(Stdio::piped());
    }
    let with_tty = pty.is_some();
    let groups: Vec<libc::gid_t> = creds.as_ref().map(|c| c.groups.clone()).unwrap_or_default();
    let ids = creds.as_ref().map(|c| (c.uid, c.gid));
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (setsid, ioctl, setgroups, setgid, setuid) on
    // memory prepared before the fork; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if with_tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some((uid, gid)) = ids {
                if libc::setgroups(groups.len(), groups.as_ptr()) < 0
                    || libc::setgid(gid) < 0
                    || libc::setuid(uid) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut guard = reaper.lock();
    let mut child = cmd.spawn()?;
    let pid = child.id();
    let exit_rx = guard.watch(pid);
    drop(guard);
    drop(cmd);

    let mut outputs = Vec::new();
    let mut stdin = None;
    let mut pty_master = None;
    if let Some(master) = master {
        let pipe = Arc::new(AsyncPipe::new(master)?);
        // The same master carries input and output; a second descriptor lets the
        // reader and writer register with the reactor independently.
        let reader = AsyncPipe::new(pipe.raw().try_clone()?)?;
        outputs.push((reader, Stream::Stdout));
        stdin = Some(pipe.clone());
        pty_master = Some(pipe);
    } else {
        if let Some(out) = child.stdout.take() {
            let out = OwnedFd::from(out);
            grow_pipe(&out);
            outputs.push((AsyncPipe::new(out)?, Stream::Stdout));
        }
        if let Some(err) = child.stderr.take() {
            let err = OwnedFd::from(err);
            grow_pipe(&err);
            outputs.push((AsyncPipe::new(err)?, Stream::Stderr));
        }
        if let Some(input) = child.stdin.take() {
            stdin = Some(Arc::new(AsyncPipe::new(OwnedFd::from(input))?));
        }
    }
    Ok(Spawned {
        pid,
        exit_rx,
        outputs,
        stdin,
        pty_master,
    })
}

async fn read_output(pipe: AsyncPipe, stream: Stream, process: Arc<Process>, log: Arc<Ring>) {
    let mut buf = vec![0u8; READ_BYTES];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let ts = unix_now();
                process.output.push(process.pid, stream, ts, &buf[..n]);
                log.push(process.pid, stream, ts, &buf[..n]);
            }
        }
    }
}

async fn write_stdin_loop(
    pipe: Arc<AsyncPipe>,
    mut ops: mpsc::UnboundedReceiver<StdinOp>,
    pending: Arc<AtomicUsize>,
    pty: bool,
) {
    let mut broken: Option<String> = None;
    while let Some(op) = ops.recv().await {
        match op {
            StdinOp::Data(data, reply) => {
                let len = data.len();
                let result = match &broken {
                    Some(e) => Err(e.clone()),
                    None => pipe.write_all(&data).await.map_err(|e| e.to_string()),
                };
                pending.fetch_sub(len, Ordering::SeqCst);
                match result {
                    Ok(()) => reply.ok().await,
                    Err(e) => {
                        broken = Some(e.clone());
                        reply.error(codes::IO, format!("stdin: {e}")).await
                    }
                };
            }
            StdinOp::Close(reply) => {
                if pty {
                    // A terminal has no half-close: end-of-file is the EOF character.
                    let _ = pipe.write_all(&[4]).await;
                }
                reply.ok().await;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(name: &str, home: &str) -> Credentials {
        Credentials {
            uid: 0,
            gid: 0,
            groups: vec![0],
            name: Some(name.into()),
            home: Some(home.into()),
        }
    }

    #[test]
    fn the_agents_own_home_only_fills_a_missing_home() {
        let none = BTreeMap::new();
        let inherited = std::env::var("HOME").unwrap_or_else(|_| "/own".into());
        let env = child_env(&none, None, Some(&creds("root", "/own")), false);
        assert_eq!(env["HOME"], inherited);
        let named = child_env(&none, Some(&creds("alice", "/home/alice")), None, false);
        assert_eq!(
            (named["HOME"].as_str(), named["USER"].as_str()),
            ("/home/alice", "alice")
        );
        let extra = BTreeMap::from([("HOME".to_string(), "/work".to_string())]);
        assert_eq!(
            child_env(&extra, None, Some(&creds("root", "/own")), false)["HOME"],
            "/work"
        );
    }
}
