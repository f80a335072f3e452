//! `watch_dir`: streams the changes in a directory (optionally its whole tree), read
//! from an inotify instance of the watch's own. Dropping a [`Watch`] (the request's task
//! ends or is aborted by `cancel`) closes the instance and with it every kernel watch.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent, WatchDescriptor};
use tartarus_proto::{codes, Message};
use tokio::io::unix::AsyncFd;

use crate::files::{checked_path, io_failure};
use crate::process::Failure;
use crate::reply::Replier;

/// Directory watches open at once per connection.
pub const MAX_WATCHES: usize = 16;
/// Directories one recursive watch covers (the watched one included).
pub const MAX_DIRS: usize = 4096;

/// `fs_event` kinds.
pub const CREATE: &str = "create";
pub const WRITE: &str = "write";
pub const REMOVE: &str = "remove";
pub const RENAME: &str = "rename";
pub const CHMOD: &str = "chmod";
/// Events were lost (the kernel queue overflowed, or a new subdirectory could not be
/// watched); `path` is the watched directory.
pub const OVERFLOW: &str = "overflow";

/// Counts a connection's open watches.
#[derive(Default)]
pub struct Watches {
    open: Arc<AtomicUsize>,
}

impl Watches {
    /// Takes one of the connection's watch slots; `busy` when all are taken.
    pub fn acquire(&self) -> Result<WatchSlot, Failure> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_WATCHES).then_some(n + 1)
            })
            .map(|_| WatchSlot {
                open: self.open.clone(),
            })
            .map_err(|_| {
                let message = format!(
                    "{MAX_WATCHES} directory watches are open on this connection; cancel one"
                );
                (codes::BUSY, message)
            })
    }

    #[cfg(test)]
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

/// One taken watch slot, given back when dropped.
pub struct WatchSlot {
    open: Arc<AtomicUsize>,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

fn watch_flags() -> AddWatchFlags {
    AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF
        | AddWatchFlags::IN_ONLYDIR
        | AddWatchFlags::IN_DONT_FOLLOW
        // No events for entries that are unlinked but still open.
        | AddWatchFlags::from_bits_retain(libc::IN_EXCL_UNLINK)
}

fn display(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

fn limit_reached(path: &Path) -> Failure {
    (
        codes::IO,
        format!(
            "{}: the kernel's inotify watch limit (fs.inotify.max_user_watches) is reached",
            display(path)
        ),
    )
}

/// What [`walk`] added.
#[derive(Default)]
struct Walk {
    added: Vec<(WatchDescriptor, PathBuf)>,
    /// Directories were left unwatched because the budget was spent (or the kernel's
    /// watch limit was reached).
    truncated: bool,
    /// Every entry found below the top (when asked for), at most `MAX_DIRS`.
    found: Vec<PathBuf>,
}

/// Watches `top` and, breadth first, every directory below it (symlinks are not
/// followed), at most `budget` directories. Each directory is watched before it is
/// listed, so an entry created meanwhile is either listed or reported.
///
/// With `strict` the top must be watchable (its errors are returned, as is reaching the
/// kernel's watch limit); otherwise a directory that is gone or unreadable is skipped.
fn walk(
    inotify: &Inotify,
    top: &Path,
    budget: usize,
    strict: bool,
    collect: bool,
) -> Result<Walk, Failure> {
    let mut walk = Walk::default();
    let mut queue = VecDeque::from([top.to_path_buf()]);
    let mut seen = HashSet::new();
    while let Some(dir) = queue.pop_front() {
        if walk.added.len() >= budget {
            walk.truncated = true;
            break;
        }
        let wd = match inotify.add_watch(&dir, watch_flags()) {
            Ok(wd) => wd,
            Err(Errno::ENOSPC) if strict => return Err(limit_reached(&dir)),
            Err(Errno::ENOSPC) => {
                walk.truncated = true;
                break;
            }
            Err(e) if strict && dir == top => {
                return Err(io_failure(&display(top), &io::Error::from(e)))
            }
            // Gone, replaced by a file, or not ours to read: not watched.
            Err(_) => continue,
        };
        if !seen.insert(wd) {
            // Watched already: a directory mounted below itself.
            continue;
        }
        walk.added.push((wd, dir.clone()));
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if strict && dir == top => return Err(io_failure(&display(top), &e)),
            Err(_) => continue,
        };
        for entry in entries.flatten() {
            let path = entry.path();
            // The entry's own type: a symlink to a directory is not descended into.
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                if walk.added.len() + queue.len() >= budget {
                    // More directories than the budget: no need to look further.
                    walk.truncated = true;
                    return Ok(walk);
                }
                queue.push_back(path.clone());
            }
            if collect {
                if walk.found.len() < MAX_DIRS {
                    walk.found.push(path);
                } else {
                    walk.truncated = true;
                }
            }
        }
    }
    Ok(walk)
}

/// Renames of watched directories whose `IN_MOVED_TO` or `IN_MOVE_SELF` is awaited.
const MAX_PENDING_MOVES: usize = 64;

fn init_failure(err: Errno) -> Failure {
    match err {
        Errno::EMFILE => (
            codes::IO,
            "the kernel's inotify instance limit (fs.inotify.max_user_instances) is reached"
                .to_owned(),
        ),
        e => io_failure("inotify_init1", &io::Error::from(e)),
    }
}

/// A watch set up by [`Watch::start`], not yet registered with the reactor.
pub struct Prepared {
    inotify: Arc<Inotify>,
    root: PathBuf,
    root_wd: WatchDescriptor,
    recursive: bool,
    dirs: HashMap<WatchDescriptor, PathBuf>,
}

/// One `watch_dir` stream.
pub struct Watch {
    /// A duplicate of the inotify descriptor, registered with the reactor for its
    /// readiness; events are read through `inotify` (the same open file description).
    fd: AsyncFd<OwnedFd>,
    inotify: Arc<Inotify>,
    root: PathBuf,
    root_wd: WatchDescriptor,
    recursive: bool,
    /// Every watched directory, by watch descriptor.
    dirs: HashMap<WatchDescriptor, PathBuf>,
    /// Watched directories renamed away from these paths (by rename cookie): an
    /// `IN_MOVED_TO` with the cookie moves their watches to the new path; their own
    /// `IN_MOVE_SELF` without one means they left the tree.
    moved_from: VecDeque<(u32, PathBuf)>,
}

/// Whether the stream goes on.
enum Flow {
    Continue,
    /// It ended (its last message is sent) or the connection is gone.
    Stop,
}

impl Watch {
    /// Watches `path` (and with `recursive` every directory below it). Blocking: a
    /// recursive watch walks the tree.
    pub fn start(path: &str, recursive: bool) -> Result<Prepared, Failure> {
        let root = std::path::absolute(checked_path(path)?).map_err(|e| io_failure(path, &e))?;
        let inotify =
            Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).map_err(init_failure)?;
        let dirs: HashMap<WatchDescriptor, PathBuf> = if recursive {
            let walk = walk(&inotify, &root, MAX_DIRS, true, false)?;
            if walk.truncated {
                return Err((
                    codes::TOO_LARGE,
                    format!(
                        "{} holds more than {MAX_DIRS} directories; watch a smaller tree",
                        display(&root)
                    ),
                ));
            }
            walk.added.into_iter().collect()
        } else {
            let wd = inotify
                .add_watch(&root, watch_flags())
                .map_err(|e| match e {
                    Errno::ENOSPC => limit_reached(&root),
                    e => io_failure(path, &io::Error::from(e)),
                })?;
            HashMap::from([(wd, root.clone())])
        };
        let root_wd = dirs
            .iter()
            .find_map(|(wd, dir)| (*dir == root).then_some(*wd))
            .ok_or_else(|| (codes::INTERNAL, "the root watch is missing".to_owned()))?;
        Ok(Prepared {
            inotify: Arc::new(inotify),
            root,
            root_wd,
            recursive,
            dirs,
        })
    }

    /// Streams `fs_event`s until the watched directory goes away or the connection
    /// does; ends with `end` (or `error` if the inotify instance fails).
    pub async fn run(mut self, reply: &Replier) {
        loop {
            let events = {
                let mut ready = match self.fd.readable().await {
                    Ok(ready) => ready,
                    Err(e) => {
                        reply.error(codes::IO, format!("inotify: {e}")).await;
                        return;
                    }
                };
                match ready.try_io(|_| self.inotify.read_events().map_err(io::Error::from)) {
                    Ok(Ok(events)) => events,
                    Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Ok(Err(e)) => {
                        reply.error(codes::IO, format!("inotify: {e}")).await;
                        return;
                    }
                    // Not readable after all: readiness is cleared, wait again.
                    Err(_) => continue,
                }
            };
            for event in events {
                if let Flow::Stop = self.event(event, reply).await {
                    return;
                }
            }
        }
    }

    async fn emit(&self, reply: &Replier, path: &Path, kind: &str) -> Flow {
        let sent = reply
            .send(Message::FsEvent {
                path: display(path),
                kind: kind.to_owned(),
            })
            .await;
        if sent {
            Flow::Continue
        } else {
            Flow::Stop
        }
    }

    async fn event(&mut self, event: InotifyEvent, reply: &Replier) -> Flow {
        let mask = event.mask;
        if mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
            return self.emit(reply, &self.root, OVERFLOW).await;
        }
        if event.wd == self.root_wd
            && mask.intersects(
                AddWatchFlags::IN_DELETE_SELF
                    | AddWatchFlags::IN_MOVE_SELF
                    | AddWatchFlags::IN_UNMOUNT
                    | AddWatchFlags::IN_IGNORED,
            )
        {
            // The watched directory was deleted, moved away or unmounted.
            if let Flow::Continue = self.emit(reply, &self.root, REMOVE).await {
                reply.send(Message::End {}).await;
            }
            return Flow::Stop;
        }
        if mask.contains(AddWatchFlags::IN_IGNORED) {
            // The kernel dropped this watch (its directory is gone).
            self.dirs.remove(&event.wd);
            return Flow::Continue;
        }
        let Some(dir) = self.dirs.get(&event.wd).cloned() else {
            // A watch removed since this event was queued.
            return Flow::Continue;
        };
        let Some(name) = event.name else {
            // An event on a watched directory itself: its parent's watch reports it,
            // except for the watched directory's own attributes.
            if event.wd == self.root_wd && mask.contains(AddWatchFlags::IN_ATTRIB) {
                return self.emit(reply, &self.root, CHMOD).await;
            }
            if mask.contains(AddWatchFlags::IN_MOVE_SELF) {
                self.moved_self(&dir);
            }
            return Flow::Continue;
        };
        let path = dir.join(name);
        // As inotify watchers commonly name them (fsnotify, E2B's envd): the name an
        // entry moves to is created, the one it leaves is renamed.
        let kind = if mask.intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO) {
            CREATE
        } else if mask.contains(AddWatchFlags::IN_MOVED_FROM) {
            RENAME
        } else if mask.contains(AddWatchFlags::IN_DELETE) {
            REMOVE
        } else if mask.contains(AddWatchFlags::IN_ATTRIB) {
            CHMOD
        } else if mask.contains(AddWatchFlags::IN_MODIFY) {
            WRITE
        } else {
            return Flow::Continue;
        };
        // A directory that appears is watched before it is reported, so a client that
        // sees its event sees what happens in it from then on.
        let mut walk = Walk::default();
        if self.recursive && mask.contains(AddWatchFlags::IN_ISDIR) {
            if mask.contains(AddWatchFlags::IN_MOVED_FROM) {
                if self.moved_from.len() == MAX_PENDING_MOVES {
                    self.moved_from.pop_front();
                }
                self.moved_from.push_back((event.cookie, path.clone()));
            } else if mask.contains(AddWatchFlags::IN_MOVED_TO) {
                match self.moved_from.iter().position(|(c, _)| *c == event.cookie) {
                    Some(i) => {
                        let (_, from) = self.moved_from.remove(i).unwrap_or_default();
                        self.relocate(&from, &path);
                    }
                    None => walk = self.add(path.clone(), false).await,
                }
            } else if mask.contains(AddWatchFlags::IN_CREATE) {
                walk = self.add(path.clone(), true).await;
            }
        }
        if let Flow::Stop = self.emit(reply, &path, kind).await {
            return Flow::Stop;
        }
        // What was created in a new directory before its watch was in place.
        for found in &walk.found {
            if let Flow::Stop = self.emit(reply, found, CREATE).await {
                return Flow::Stop;
            }
        }
        if walk.truncated {
            return self.emit(reply, &self.root, OVERFLOW).await;
        }
        Flow::Continue
    }

    /// A watched directory below the root was renamed: if no `IN_MOVED_TO` placed it
    /// in the tree, it left, and so did everything below it.
    fn moved_self(&mut self, dir: &Path) {
        if let Some(i) = self.moved_from.iter().position(|(_, p)| p == dir) {
            self.moved_from.remove(i);
            self.forget(dir);
        }
    }

    /// Stops watching `top` and every directory below it.
    fn forget(&mut self, top: &Path) {
        let inotify = &self.inotify;
        self.dirs.retain(|wd, dir| {
            if dir.starts_with(top) {
                let _ = inotify.rm_watch(*wd);
                false
            } else {
                true
            }
        });
    }

    /// The watched directories below `from` moved to `to` (watches follow their inode).
    fn relocate(&mut self, from: &Path, to: &Path) {
        for dir in self.dirs.values_mut() {
            if let Ok(rest) = dir.strip_prefix(from) {
                *dir = if rest.as_os_str().is_empty() {
                    to.to_path_buf()
                } else {
                    to.join(rest)
                };
            }
        }
    }

    /// Watches a directory that appeared in the tree, and what is below it. For a new
    /// directory (`created`), also lists what was created in it meanwhile.
    async fn add(&mut self, top: PathBuf, created: bool) -> Walk {
        let budget = MAX_DIRS.saturating_sub(self.dirs.len());
        let inotify = self.inotify.clone();
        let walked =
            tokio::task::spawn_blocking(move || walk(&inotify, &top, budget, false, created)).await;
        let walk = match walked {
            Ok(Ok(walk)) => walk,
            _ => Walk {
                truncated: true,
                ..Walk::default()
            },
        };
        for (wd, dir) in &walk.added {
            // A directory watched already keeps its path.
            self.dirs.entry(*wd).or_insert_with(|| dir.clone());
        }
        walk
    }
}

impl Prepared {
    /// Registers the inotify instance with the reactor.
    pub fn register(self) -> Result<Watch, Failure> {
        let fd = self
            .inotify
            .as_fd()
            .try_clone_to_owned()
            .and_then(crate::fdio::register)
            .map_err(|e| io_failure("inotify", &e))?;
        Ok(Watch {
            fd,
            inotify: self.inotify,
            root: self.root,
            root_wd: self.root_wd,
            recursive: self.recursive,
            dirs: self.dirs,
            moved_from: VecDeque::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    use tartarus_proto::{
        decode_body, encode_frame, Envelope, Hello, HEADER_BYTES, PROTOCOL_VERSION,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};

    use super::*;
    use crate::conn::{serve, Agent, Linger};
    use crate::process::Registry;
    use crate::reaper::Reaper;
    use crate::ring::Ring;

    const WAIT: Duration = Duration::from_secs(10);

    /// A client speaking real frames to `serve` over an in-memory pipe.
    struct Client {
        r: ReadHalf<DuplexStream>,
        w: WriteHalf<DuplexStream>,
    }

    impl Client {
        async fn connect() -> Self {
            Self::with_buffer(1 << 16).await
        }

        async fn with_buffer(bytes: usize) -> Self {
            let agent = Agent::new(Registry::new(
                Arc::new(Reaper::default()),
                Ring::new(1 << 20),
                PathBuf::from("/etc"),
            ));
            let (ours, theirs) = tokio::io::duplex(bytes);
            let (ar, aw) = tokio::io::split(theirs);
            tokio::spawn(serve(agent, ar, aw, Linger::None));
            let (r, w) = tokio::io::split(ours);
            let mut client = Self { r, w };
            client
                .send(
                    0,
                    Message::Hello(Hello {
                        version: PROTOCOL_VERSION,
                        client: "watch-test".into(),
                    }),
                )
                .await;
            match client.recv().await.body {
                Message::HelloOk(ok) => assert!(ok.features.iter().any(|f| f == "watch")),
                other => panic!("{other:?}"),
            }
            client
        }

        async fn send(&mut self, id: u64, body: Message) {
            let frame = encode_frame(&Envelope::new(id, body)).unwrap();
            self.w.write_all(&frame).await.unwrap();
        }

        async fn recv(&mut self) -> Envelope {
            self.try_recv()
                .await
                .expect("a frame within the time limit")
        }

        async fn try_recv(&mut self) -> Option<Envelope> {
            tokio::time::timeout(WAIT, async {
                let mut header = [0u8; HEADER_BYTES];
                self.r.read_exact(&mut header).await.unwrap();
                let mut body = vec![0u8; u32::from_be_bytes(header) as usize];
                self.r.read_exact(&mut body).await.unwrap();
                decode_body(&body).unwrap()
            })
            .await
            .ok()
        }

        /// Sends `watch_dir` and returns its first reply.
        async fn watch(&mut self, id: u64, path: &Path, recursive: bool) -> Message {
            self.send(
                id,
                Message::WatchDir {
                    path: display(path),
                    recursive,
                },
            )
            .await;
            let reply = self.recv().await;
            assert_eq!(reply.id, id);
            reply.body
        }

        /// Reads frames of request `id` until the event `(path, kind)`; returns the
        /// events seen before it.
        async fn until(&mut self, id: u64, path: &Path, kind: &str) -> Vec<(String, String)> {
            let mut seen = Vec::new();
            loop {
                let Some(frame) = self.try_recv().await else {
                    panic!("no {kind} {path:?} within {WAIT:?}; saw {seen:?}");
                };
                assert_eq!(frame.id, id, "{frame:?}");
                match frame.body {
                    Message::FsEvent { path: p, kind: k } => {
                        if p == display(path) && k == kind {
                            return seen;
                        }
                        seen.push((p, k));
                    }
                    other => panic!("waiting for {kind} {path:?}, got {other:?} after {seen:?}"),
                }
            }
        }
    }

    fn code_of(message: Message) -> String {
        match message {
            Message::Error { code, .. } => code,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn file_changes_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Client::connect().await;
        assert_eq!(c.watch(1, dir.path(), false).await, Message::Watching {});
        let a = dir.path().join("a.txt");
        let b = dir.path().join("b.txt");

        let mut file = fs::File::create(&a).unwrap();
        c.until(1, &a, CREATE).await;
        io::Write::write_all(&mut file, b"hello").unwrap();
        c.until(1, &a, WRITE).await;
        drop(file);
        fs::set_permissions(&a, fs::Permissions::from_mode(0o600)).unwrap();
        c.until(1, &a, CHMOD).await;
        fs::rename(&a, &b).unwrap();
        c.until(1, &a, RENAME).await;
        c.until(1, &b, CREATE).await;
        fs::remove_file(&b).unwrap();
        c.until(1, &b, REMOVE).await;
    }

    #[tokio::test]
    async fn relative_paths_are_resolved_against_the_working_directory() {
        let dir = tempfile::tempdir().unwrap();
        let cwd = std::env::current_dir().unwrap();
        // From the working directory up to `/` and down to the temporary directory.
        let mut relative = PathBuf::new();
        for _ in cwd.components().skip(1) {
            relative.push("..");
        }
        relative.push(dir.path().strip_prefix("/").unwrap());
        let mut c = Client::connect().await;
        assert_eq!(c.watch(1, &relative, false).await, Message::Watching {});
        fs::write(dir.path().join("x"), b"").unwrap();
        c.until(1, &cwd.join(&relative).join("x"), CREATE).await;
    }

    #[tokio::test]
    async fn recursive_watches_cover_old_and_new_subdirectories() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("old/deeper");
        fs::create_dir_all(&old).unwrap();
        let mut c = Client::connect().await;
        assert_eq!(c.watch(1, dir.path(), true).await, Message::Watching {});

        fs::write(old.join("f"), b"x").unwrap();
        c.until(1, &old.join("f"), CREATE).await;

        // A file created right after its directory: reported whether or not the
        // directory's watch was in place yet.
        let new = dir.path().join("new");
        fs::create_dir(&new).unwrap();
        fs::write(new.join("f"), b"x").unwrap();
        c.until(1, &new, CREATE).await;
        c.until(1, &new.join("f"), CREATE).await;
        // Now the new directory is watched for certain.
        fs::write(new.join("f"), b"more").unwrap();
        c.until(1, &new.join("f"), WRITE).await;

        // A directory moved within the tree is watched under its new name.
        let moved = dir.path().join("moved");
        fs::rename(&new, &moved).unwrap();
        c.until(1, &new, RENAME).await;
        c.until(1, &moved, CREATE).await;
        fs::write(moved.join("g"), b"x").unwrap();
        let seen = c.until(1, &moved.join("g"), CREATE).await;
        assert!(!seen.iter().any(|(p, _)| p.contains("/new/")), "{seen:?}");

        // One moved out of the tree is not watched any more.
        let outside = tempfile::tempdir().unwrap();
        let gone = outside.path().join("gone");
        fs::rename(&moved, &gone).unwrap();
        c.until(1, &moved, RENAME).await;
        fs::write(gone.join("h"), b"x").unwrap();
        fs::write(dir.path().join("marker"), b"").unwrap();
        let seen = c.until(1, &dir.path().join("marker"), CREATE).await;
        assert!(!seen.iter().any(|(p, _)| p.ends_with("/h")), "{seen:?}");

        // Removing a subtree reports what was in it.
        fs::remove_dir_all(dir.path().join("old")).unwrap();
        c.until(1, &old.join("f"), REMOVE).await;
        c.until(1, &old, REMOVE).await;
        c.until(1, &dir.path().join("old"), REMOVE).await;
    }

    #[tokio::test]
    async fn a_plain_watch_does_not_see_into_subdirectories() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Client::connect().await;
        assert_eq!(c.watch(1, dir.path(), false).await, Message::Watching {});
        let sub = dir.path().join("sub");
        fs::create_dir(&sub).unwrap();
        c.until(1, &sub, CREATE).await;
        fs::write(sub.join("f"), b"x").unwrap();
        fs::write(dir.path().join("marker"), b"").unwrap();
        let seen = c.until(1, &dir.path().join("marker"), CREATE).await;
        assert!(
            seen.iter().all(|(p, _)| !p.starts_with(&display(&sub))),
            "{seen:?}"
        );
    }

    #[tokio::test]
    async fn bad_paths_get_error_codes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        fs::write(&file, b"").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path(), &link).unwrap();
        let mut c = Client::connect().await;
        let missing = dir.path().join("missing");
        assert_eq!(code_of(c.watch(1, &missing, false).await), codes::NOT_FOUND);
        assert_eq!(
            code_of(c.watch(2, &file, true).await),
            codes::NOT_A_DIRECTORY
        );
        assert_eq!(
            code_of(c.watch(3, &link, false).await),
            codes::NOT_A_DIRECTORY
        );
        assert_eq!(
            code_of(c.watch(4, Path::new(""), false).await),
            codes::INVALID_ARGUMENT
        );
    }

    #[tokio::test]
    async fn too_many_directories_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..MAX_DIRS {
            fs::create_dir(dir.path().join(i.to_string())).unwrap();
        }
        let mut c = Client::connect().await;
        // The watched directory and 4096 below it.
        assert_eq!(
            code_of(c.watch(1, dir.path(), true).await),
            codes::TOO_LARGE
        );
        fs::remove_dir(dir.path().join("0")).unwrap();
        assert_eq!(c.watch(2, dir.path(), true).await, Message::Watching {});
        assert_eq!(c.watch(3, dir.path(), false).await, Message::Watching {});
    }

    #[tokio::test]
    async fn watches_per_connection_are_limited_and_cancel_frees_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Client::connect().await;
        for id in 1..=MAX_WATCHES as u64 {
            assert_eq!(c.watch(id, dir.path(), false).await, Message::Watching {});
        }
        assert_eq!(code_of(c.watch(100, dir.path(), false).await), codes::BUSY);

        c.send(101, Message::Cancel { target: 3 }).await;
        let mut replies = [c.recv().await, c.recv().await];
        replies.sort_by_key(|e| e.id);
        assert_eq!(replies[0], Envelope::new(3, Message::End {}));
        assert_eq!(replies[1], Envelope::new(101, Message::Ok {}));
        assert_eq!(c.watch(102, dir.path(), false).await, Message::Watching {});
        assert_eq!(code_of(c.watch(103, dir.path(), false).await), codes::BUSY);

        // The cancelled watch is gone: a change is reported by the other 16 only.
        fs::write(dir.path().join("f"), b"").unwrap();
        let mut ids = Vec::new();
        for _ in 0..MAX_WATCHES {
            let frame = c.recv().await;
            assert!(matches!(frame.body, Message::FsEvent { .. }), "{frame:?}");
            ids.push(frame.id);
        }
        ids.sort_unstable();
        let expected: Vec<u64> = (1..=MAX_WATCHES as u64)
            .filter(|id| *id != 3)
            .chain([102])
            .collect();
        assert_eq!(ids, expected);
    }

    #[test]
    fn slots_are_given_back() {
        let watches = Watches::default();
        let slots: Vec<_> = (0..MAX_WATCHES)
            .map(|_| watches.acquire().unwrap())
            .collect();
        assert_eq!(watches.acquire().err().unwrap().0, codes::BUSY);
        drop(slots);
        assert_eq!(watches.open(), 0);
        assert!(watches.acquire().is_ok());
    }

    #[tokio::test]
    async fn deleting_the_watched_directory_ends_the_stream() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("w");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("f"), b"").unwrap();
        let mut c = Client::connect().await;
        assert_eq!(c.watch(1, &dir, true).await, Message::Watching {});
        fs::remove_dir_all(&dir).unwrap();
        c.until(1, &dir.join("f"), REMOVE).await;
        c.until(1, &dir, REMOVE).await;
        assert_eq!(c.recv().await, Envelope::new(1, Message::End {}));

        // Moving it away ends it too; the stream's slot is free again.
        fs::create_dir(&dir).unwrap();
        assert_eq!(c.watch(2, &dir, false).await, Message::Watching {});
        fs::rename(&dir, parent.path().join("elsewhere")).unwrap();
        c.until(2, &dir, REMOVE).await;
        assert_eq!(c.recv().await, Envelope::new(2, Message::End {}));
        c.send(3, Message::Ping {}).await;
        assert_eq!(c.recv().await, Envelope::new(3, Message::Pong {}));
    }

    #[tokio::test]
    async fn a_lagging_reader_gets_an_overflow_event() {
        let dir = tempfile::tempdir().unwrap();
        // A small pipe: the agent blocks on its replies soon and stops reading events.
        let mut c = Client::with_buffer(1024).await;
        assert_eq!(c.watch(1, dir.path(), false).await, Message::Watching {});
        let files = [dir.path().join("a"), dir.path().join("b")];
        for f in &files {
            fs::write(f, b"").unwrap();
        }
        let queued = fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(16384);
        // Alternating files, so the kernel cannot merge the events.
        for i in 0..queued + 1000 {
            let mode = if i % 4 < 2 { 0o600 } else { 0o644 };
            fs::set_permissions(&files[i % 2], fs::Permissions::from_mode(mode)).unwrap();
        }
        c.until(1, dir.path(), OVERFLOW).await;
    }
}
