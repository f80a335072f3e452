//! Starting a child without fork. glibc's posix_spawn clones with CLONE_VM|CLONE_VFORK,
//! so the child never gets a copy of the agent's address space that exec would throw
//! away at once. Under gVisor that copy is a whole new address space in the sentry
//! (fork+exec 15–18 ms against 5–10 ms for posix_spawn on systrap, measured with
//! Python's `os.fork`/`os.posix_spawn` of `/bin/true` in a sandbox); on Linux it is the
//! page tables of a multi-threaded agent.
//!
//! posix_spawn can make the child a session leader, reset its signals, wire its stdio
//! and change its directory, which is all a plain exec needs. It cannot change user or
//! take a controlling terminal: those execs fork through `std::process::Command`.

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;

/// A child started by [`spawn`]: its pid and the host ends of its pipes.
pub struct Child {
    pub pid: u32,
    pub stdin: Option<OwnedFd>,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// Runs `program` (a path, see [`find_program`]) with `argv` and exactly `env`, as the
/// leader of a new session, with signals at their defaults and none blocked; stdout and
/// stderr are pipes, stdin a pipe or /dev/null.
pub fn spawn(
    program: &Path,
    argv: &[String],
    env: &BTreeMap<String, String>,
    cwd: Option<&str>,
    want_stdin: bool,
) -> io::Result<Child> {
    let program = c_string(program.as_os_str().as_bytes())?;
    let argv = argv
        .iter()
        .map(|a| c_string(a.as_bytes()))
        .collect::<io::Result<Vec<_>>>()?;
    let env = env
        .iter()
        .map(|(k, v)| {
            if k.is_empty() || k.contains('=') {
                return Err(invalid(format!("bad environment variable name {k:?}")));
            }
            c_string(format!("{k}={v}").as_bytes())
        })
        .collect::<io::Result<Vec<_>>>()?;
    let cwd = cwd.map(|d| c_string(d.as_bytes())).transpose()?;

    let (out_r, out_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let (err_r, err_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let input = if want_stdin {
        Some(nix::unistd::pipe2(OFlag::O_CLOEXEC)?)
    } else {
        None
    };

    let mut actions = FileActions::new()?;
    match &input {
        Some((r, _)) => actions.dup2(r, 0)?,
        None => actions.open_null(0)?,
    }
    actions.dup2(&out_w, 1)?;
    actions.dup2(&err_w, 2)?;
    if let Some(dir) = &cwd {
        actions.chdir(dir)?;
    }
    let attr = Attributes::new()?;

    let mut argv_ptrs: Vec<*mut libc::c_char> =
        argv.iter().map(|a| a.as_ptr().cast_mut()).collect();
    argv_ptrs.push(std::ptr::null_mut());
    let mut env_ptrs: Vec<*mut libc::c_char> = env.iter().map(|e| e.as_ptr().cast_mut()).collect();
    env_ptrs.push(std::ptr::null_mut());
    let mut pid: libc::pid_t = 0;
    // SAFETY: every pointer is valid for the call: `program`, `argv` and `env` own the
    // strings the NULL-terminated pointer arrays point into, and `actions` and `attr`
    // were initialised by their constructors. posix_spawn does not keep any of them.
    let rc = unsafe {
        libc::posix_spawn(
            &mut pid,
            program.as_ptr(),
            actions.as_ptr(),
            attr.as_ptr(),
            argv_ptrs.as_ptr(),
            env_ptrs.as_ptr(),
        )
    };
    check(rc)?;
    Ok(Child {
        pid: pid as u32,
        stdin: input.map(|(_, w)| w),
        stdout: out_r,
        stderr: err_r,
    })
}

/// What execvp would run for `name` with the child's `PATH`: `name` itself if it holds
/// a slash, else the first executable file of that name in `path`'s directories
/// (relative ones, and empty ones meaning `.`, taken from `cwd` when given). The error
/// is execvp's: permission denied if only non-executable files matched, else not found.
pub fn find_program(name: &str, path: &str, cwd: Option<&str>) -> io::Result<PathBuf> {
    if name.contains('/') {
        return Ok(PathBuf::from(name));
    }
    if name.is_empty() {
        return Err(io::Error::from_raw_os_error(libc::ENOENT));
    }
    let mut denied = false;
    for dir in path.split(':') {
        let dir = Path::new(if dir.is_empty() { "." } else { dir });
        let candidate = match cwd {
            Some(cwd) if dir.is_relative() => Path::new(cwd).join(dir).join(name),
            _ => dir.join(name),
        };
        match candidate.metadata() {
            Ok(meta) if meta.is_file() && meta.permissions().mode() & 0o111 != 0 => {
                return Ok(candidate)
            }
            Ok(meta) if meta.is_file() => denied = true,
            _ => {}
        }
    }
    Err(io::Error::from_raw_os_error(if denied {
        libc::EACCES
    } else {
        libc::ENOENT
    }))
}

fn c_string(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        invalid(format!(
            "{:?} holds a NUL byte",
            OsStr::from_bytes(bytes).to_string_lossy()
        ))
    })
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

/// posix_spawn's functions return an error number rather than set errno.
fn check(rc: libc::c_int) -> io::Result<()> {
    match rc {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// Boxed: glibc's object is only ever used through a pointer, never moved after init.
struct FileActions(Box<MaybeUninit<libc::posix_spawn_file_actions_t>>);

impl FileActions {
    fn new() -> io::Result<Self> {
        let mut inner = Box::new(MaybeUninit::uninit());
        // SAFETY: init writes a fresh object into the boxed, writable storage.
        check(unsafe { libc::posix_spawn_file_actions_init(inner.as_mut_ptr()) })?;
        Ok(Self(inner))
    }

    fn as_ptr(&self) -> *const libc::posix_spawn_file_actions_t {
        self.0.as_ptr()
    }

    fn dup2(&mut self, fd: &OwnedFd, target: libc::c_int) -> io::Result<()> {
        // SAFETY: the object was initialised in `new`; the descriptor stays open until
        // posix_spawn returns (the caller owns it).
        check(unsafe {
            libc::posix_spawn_file_actions_adddup2(self.0.as_mut_ptr(), fd.as_raw_fd(), target)
        })
    }

    fn open_null(&mut self, target: libc::c_int) -> io::Result<()> {
        // SAFETY: the object was initialised in `new`; glibc copies the path.
        check(unsafe {
            libc::posix_spawn_file_actions_addopen(
                self.0.as_mut_ptr(),
                target,
                c"/dev/null".as_ptr(),
                libc::O_RDONLY,
                0,
            )
        })
    }

    fn chdir(&mut self, dir: &CString) -> io::Result<()> {
        // SAFETY: the object was initialised in `new`; glibc copies the path.
        check(unsafe {
            libc::posix_spawn_file_actions_addchdir_np(self.0.as_mut_ptr(), dir.as_ptr())
        })
    }
}

impl Drop for FileActions {
    fn drop(&mut self) {
        // SAFETY: initialised in `new` and destroyed exactly once, here.
        unsafe { libc::posix_spawn_file_actions_destroy(self.0.as_mut_ptr()) };
    }
}

struct Attributes(Box<MaybeUninit<libc::posix_spawnattr_t>>);

impl Attributes {
    /// A new session; every signal at its default (the agent ignores SIGPIPE, and an
    /// ignored signal stays ignored across exec) and none blocked. The default set is
    /// every bit, not `sigfillset`'s: that leaves out glibc's two internal signals
    /// (32, 33), which posix_spawn then sets to ignored in the child, where a Go or musl
    /// program would find them so.
    fn new() -> io::Result<Self> {
        let mut inner = Box::new(MaybeUninit::uninit());
        // SAFETY: init writes a fresh object into the boxed, writable storage.
        check(unsafe { libc::posix_spawnattr_init(inner.as_mut_ptr()) })?;
        let mut attr = Self(inner);
        let mut all = MaybeUninit::<libc::sigset_t>::uninit();
        let mut none = MaybeUninit::<libc::sigset_t>::uninit();
        let flags = libc::POSIX_SPAWN_SETSID
            | libc::POSIX_SPAWN_SETSIGDEF as libc::c_short
            | libc::POSIX_SPAWN_SETSIGMASK as libc::c_short;
        // SAFETY: write_bytes/sigemptyset initialise the local sets (a sigset_t is plain
        // bits) before they are read;
        // the attribute object was initialised above and the setters copy the sets.
        unsafe {
            std::ptr::write_bytes(all.as_mut_ptr(), 0xff, 1);
            libc::sigemptyset(none.as_mut_ptr());
            check(libc::posix_spawnattr_setsigdefault(
                attr.0.as_mut_ptr(),
                all.as_ptr(),
            ))?;
            check(libc::posix_spawnattr_setsigmask(
                attr.0.as_mut_ptr(),
                none.as_ptr(),
            ))?;
            check(libc::posix_spawnattr_setflags(attr.0.as_mut_ptr(), flags))?;
        }
        Ok(attr)
    }

    fn as_ptr(&self) -> *const libc::posix_spawnattr_t {
        self.0.as_ptr()
    }
}

impl Drop for Attributes {
    fn drop(&mut self) {
        // SAFETY: initialised in `new` and destroyed exactly once, here.
        unsafe { libc::posix_spawnattr_destroy(self.0.as_mut_ptr()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn env() -> BTreeMap<String, String> {
        BTreeMap::from([
            ("PATH".into(), "/usr/bin:/bin".into()),
            ("X".into(), "1".into()),
        ])
    }

    fn wait(pid: u32) -> i32 {
        let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
        match status.unwrap() {
            nix::sys::wait::WaitStatus::Exited(_, code) => code,
            other => panic!("{other:?}"),
        }
    }

    fn read_all(fd: OwnedFd) -> String {
        let mut s = String::new();
        std::fs::File::from(fd).read_to_string(&mut s).unwrap();
        s
    }

    #[test]
    fn child_leads_a_session_in_its_directory_with_exactly_its_environment() {
        let sh = find_program("sh", "/usr/bin:/bin", None).unwrap();
        let argv = [
            "sh".to_string(),
            "-c".into(),
            // `cut` runs in the shell's session, which the shell leads: its id is the
            // shell's pid. Nothing is ignored (the agent ignores SIGPIPE) or blocked.
            "echo $(cut -d' ' -f6 /proc/self/stat) $$; pwd; env | sort; \
             grep -E '^(SigIgn|SigBlk)' /proc/self/status; echo oops >&2"
                .into(),
        ];
        let child = spawn(&sh, &argv, &env(), Some("/tmp"), false).unwrap();
        let out = read_all(child.stdout);
        let err = read_all(child.stderr);
        assert_eq!(wait(child.pid), 0);
        let lines: Vec<&str> = out.lines().collect();
        let ids: Vec<&str> = lines[0].split(' ').collect();
        assert_eq!(ids[0], ids[1], "{out}");
        assert_eq!(lines[1], "/tmp");
        assert!(
            lines.contains(&"X=1") && lines.contains(&"PATH=/usr/bin:/bin"),
            "{out}"
        );
        assert!(!out.contains("HOME="), "{out}");
        assert!(out.contains("SigBlk:\t0000000000000000"), "{out}");
        assert!(out.contains("SigIgn:\t0000000000000000"), "{out}");
        assert_eq!(err, "oops\n");
    }

    #[test]
    fn stdin_is_a_pipe_when_asked_and_dev_null_otherwise() {
        let cat = find_program("cat", "/bin", None).unwrap();
        let argv = ["cat".to_string()];
        let child = spawn(&cat, &argv, &env(), None, true).unwrap();
        let mut input = std::fs::File::from(child.stdin.unwrap());
        std::io::Write::write_all(&mut input, b"through\n").unwrap();
        drop(input);
        assert_eq!(read_all(child.stdout), "through\n");
        assert_eq!(wait(child.pid), 0);

        let child = spawn(&cat, &argv, &env(), None, false).unwrap();
        assert!(child.stdin.is_none());
        assert_eq!(read_all(child.stdout), "");
        assert_eq!(wait(child.pid), 0);
    }

    #[test]
    fn exec_failures_are_errors_not_children() {
        let e = spawn(
            Path::new("/no/such/program"),
            &["x".into()],
            &env(),
            None,
            false,
        );
        assert_eq!(e.err().unwrap().raw_os_error(), Some(libc::ENOENT));
        let e = spawn(Path::new("/etc/passwd"), &["x".into()], &env(), None, false);
        assert_eq!(e.err().unwrap().raw_os_error(), Some(libc::EACCES));
        let e = spawn(
            Path::new("/bin/true"),
            &["x\0y".into()],
            &env(),
            None,
            false,
        );
        assert_eq!(e.err().unwrap().kind(), io::ErrorKind::InvalidInput);
        let bad = BTreeMap::from([("A=B".to_string(), "1".to_string())]);
        let e = spawn(Path::new("/bin/true"), &["x".into()], &bad, None, false);
        assert_eq!(e.err().unwrap().kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn find_program_follows_execvp() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("plain"), "").unwrap();
        std::fs::write(d.join("tool"), "").unwrap();
        std::fs::set_permissions(d.join("tool"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::create_dir(d.join("sub")).unwrap();
        let path = format!("/nonexistent::{}", d.display());
        assert_eq!(find_program("tool", &path, None).unwrap(), d.join("tool"));
        assert_eq!(
            find_program("plain", &path, None)
                .unwrap_err()
                .raw_os_error(),
            Some(libc::EACCES)
        );
        assert_eq!(
            find_program("none", &path, None)
                .unwrap_err()
                .raw_os_error(),
            Some(libc::ENOENT)
        );
        assert_eq!(
            find_program("sub", &path, None).unwrap_err().raw_os_error(),
            Some(libc::ENOENT)
        );
        assert_eq!(
            find_program("", &path, None).unwrap_err().raw_os_error(),
            Some(libc::ENOENT)
        );
        // An empty entry is the working directory, the child's when it has one.
        let cwd = d.to_str().unwrap();
        assert_eq!(
            find_program("tool", ":/bin", Some(cwd)).unwrap(),
            d.join(".").join("tool")
        );
        assert_eq!(find_program("./x", "", None).unwrap(), PathBuf::from("./x"));
    }
}
