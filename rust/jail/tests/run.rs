//! `tartarus-jail run` end to end: real namespaces, overlay, cgroups and seccomp, with
//! a busybox rootfs (Debian's busybox-static).
//!
//! Tests that need something of the host are `#[ignore = "needs ..."]`: `cargo test`
//! lists them as ignored, and `scripts/rust-test-probe` runs each one where it finds
//! what the test needs (and says why it leaves out the others).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{json, Value};

const BUSYBOX: &str = "/usr/bin/busybox";

struct Fixture {
    dir: PathBuf,
}

impl Fixture {
    /// A busybox rootfs and an empty work dir under a unique temporary directory.
    fn new(name: &str) -> Self {
        assert!(
            Path::new(BUSYBOX).exists(),
            "{BUSYBOX} missing (apt-get install busybox-static)"
        );
        let dir = std::env::temp_dir().join(format!("tjail-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let bin = dir.join("rootfs/bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(dir.join("rootfs/etc")).unwrap();
        std::fs::create_dir_all(dir.join("work")).unwrap();
        std::fs::copy(BUSYBOX, bin.join("busybox")).unwrap();
        let list = Command::new(BUSYBOX).arg("--list").output().unwrap();
        for applet in String::from_utf8_lossy(&list.stdout).lines() {
            if applet != "busybox" {
                std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
            }
        }
        Self { dir }
    }

    fn config(&self, script: &str) -> Value {
        json!({
            "id": "test",
            "rootfs": self.dir.join("rootfs"),
            "work_dir": self.dir.join("work"),
            "argv": ["/bin/sh", "-c", script],
        })
    }

    fn run(&self, config: &Value) -> (Output, Vec<Value>) {
        let path = self.dir.join("config.json");
        std::fs::write(&path, config.to_string()).unwrap();
        let events = self.dir.join("events");
        let file = std::fs::File::create(&events).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tartarus-jail"));
        cmd.args(["run", "--config"])
            .arg(&path)
            .args(["--events-fd", "3"]);
        // SAFETY: dup2 in the child only.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                // dup2 onto itself keeps FD_CLOEXEC: clear it explicitly.
                let rc = if fd == 3 {
                    libc::fcntl(3, libc::F_SETFD, 0)
                } else {
                    libc::dup2(fd, 3)
                };
                if rc < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = cmd.output().unwrap();
        let events = std::fs::read_to_string(&events)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (out, events)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Polls the events file until it holds `needle` (10 s at most); returns its text.
fn events_with(path: &Path, needle: &str, what: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: {text}");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
#[ignore = "needs busybox; run where a probe finds it"]
fn runs_a_command_in_fresh_namespaces() {
    let fx = Fixture::new("echo");
    let (out, events) =
        fx.run(&fx.config("echo hello; hostname; cat /proc/self/status | grep -c Seccomp:.2"));
    assert_eq!(stdout(&out), "hello\ntartarus\n1\n", "{out:?}");
    assert!(out.status.success());
    assert_eq!(events[0]["event"], "started");
    assert_eq!(
        events[1],
        json!({"event": "exited", "code": 0, "oom_kills": 0})
    );
}

#[test]
#[ignore = "needs busybox; run where a probe finds it"]
fn exit_code_and_bad_config_are_reported() {
    let fx = Fixture::new("exit");
    let (out, _) = fx.run(&fx.config("exit 7"));
    assert_eq!(out.status.code(), Some(7));
    let mut config = fx.config("true");
    config["argv"] = json!(["/bin/no-such-program"]);
    let (out, events) = fx.run(&config);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no-such-program"),
        "{out:?}"
    );
    assert!(events.is_empty());
    config["argv"] = json!(["relative"]);
    let (out, _) = fx.run(&config);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("absolute path"),
        "{out:?}"
    );
}

#[test]
#[ignore = "needs busybox; run where a probe finds it"]
fn writes_land_in_scratch_and_vanish() {
    let fx = Fixture::new("scratch");
    let (out, _) = fx.run(&fx.config("echo data > /etc/new && cat /etc/new && mkdir /opt"));
    assert_eq!(stdout(&out), "data\n", "{out:?}");
    assert!(!fx.dir.join("rootfs/etc/new").exists());
    assert!(!fx.dir.join("rootfs/opt").exists());
    assert_eq!(std::fs::read_dir(fx.dir.join("work")).unwrap().count(), 0);
}

#[test]
#[ignore = "needs busybox; run where a probe finds it"]
fn host_paths_are_unreachable_and_network_is_loopback_only() {
    let fx = Fixture::new("escape");
    let script = "cat /etc/shadow; ls /work /root /home 2>&1 | wc -l; ip -o link | wc -l";
    let (out, _) = fx.run(&fx.config(script));
    let text = stdout(&out);
    assert!(!text.contains("root:"), "{text}");
    assert_eq!(text.lines().collect::<Vec<_>>(), vec!["3", "1"], "{out:?}");
}

#[test]
#[ignore = "needs busybox, root; run where a probe finds it"]
fn joins_a_prepared_network_namespace() {
    let fx = Fixture::new("netns");
    let name = format!("tt-jailtest-{}", std::process::id());
    let ip = |args: &[&str]| {
        let status = Command::new("ip").args(args).status().unwrap();
        assert!(status.success(), "ip {args:?}");
    };
    ip(&["netns", "add", &name]);
    ip(&[
        "-n", &name, "link", "add", "probe0", "type", "veth", "peer", "name", "probe1",
    ]);
    let mut config =
        fx.config("ip -o link | cut -d: -f2 | cut -d@ -f1 | tr -d ' ' | sort | tr '\\n' ,");
    config["network_namespace"] = json!(format!("/run/netns/{name}"));
    let (out, _) = fx.run(&config);
    ip(&["netns", "del", &name]);
    // The namespace the host prepared, with its interfaces, not a fresh one.
    assert_eq!(stdout(&out), "lo,probe0,probe1,", "{out:?}");
}

#[test]
#[ignore = "needs busybox; run where a probe finds it"]
fn bind_mounts_cannot_be_steered_outside_by_symlinks() {
    let fx = Fixture::new("symlink");
    std::os::unix::fs::symlink("/tmp", fx.dir.join("rootfs/escape")).unwrap();
    let mut config = fx.config("true");
    config["mounts"] = json!([{"source": fx.dir.join("work"), "destination": "/escape/x"}]);
    let (out, _) = fx.run(&config);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("outside the jail"),
        "{out:?}"
    );
}

#[test]
#[ignore = "needs busybox, root, cgroups; run where a probe finds it"]
fn cgroup_limits_contain_a_fork_bomb_and_are_removed() {
    let fx = Fixture::new("pids");
    let name = format!("t{}", std::process::id());
    // The inner shell forks until it fails; the outer counts with a glob (no fork).
    let mut config = fx
        .config("sh -c 'while true; do sleep 5 & done' 2>/dev/null; set -- /proc/[0-9]*; echo $#");
    config["cgroup"] =
        json!({"parent": "tartarus-test/jail", "name": name, "pids": 16, "memory_bytes": 64 << 20});
    let (out, events) = fx.run(&config);
    let running: u32 = stdout(&out).trim().parse().unwrap();
    assert!(running <= 16, "{running} processes despite pids.max=16");
    let dirs = events[0]["cgroup"]["dirs"].as_array().unwrap().clone();
    assert!(!dirs.is_empty());
    for dir in dirs {
        let path = PathBuf::from(dir["path"].as_str().unwrap());
        assert!(!path.exists(), "{} left behind", path.display());
        // The shared parents stay for other jails; this test's are removed when empty.
        for parent in path.ancestors().skip(1).take(2) {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// Not root: the jail makes a user namespace (uid 0 inside maps to the caller) and
/// still mounts, pivots and drops privileges; no cgroup without delegation. Files of the
/// rootfs owned by host root stay read-only (their owner is not mapped); /tmp is ours.
#[test]
#[ignore = "needs busybox, root, setpriv, userns; run where a probe finds it"]
fn runs_rootless_in_a_user_namespace() {
    let fx = Fixture::new("rootless");
    let nobody = 65534;
    for dir in [&fx.dir, &fx.dir.join("work")] {
        std::os::unix::fs::chown(dir, Some(nobody), Some(nobody)).unwrap();
    }
    let config = fx.config("id -u; cat /proc/self/uid_map; echo scratch > /tmp/x && cat /tmp/x");
    let path = fx.dir.join("config.json");
    std::fs::write(&path, config.to_string()).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_tartarus-jail"))
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.first(), Some(&"0"), "{out:?}");
    assert!(
        lines[1].split_whitespace().eq(["0", "65534", "1"]),
        "{out:?}"
    );
    assert_eq!(lines.get(2), Some(&"scratch"), "{out:?}");
}

/// Once the child runs, the supervisor itself is under its seccomp profile, and still
/// forwards a signal and cleans up under it.
#[test]
#[ignore = "needs busybox; run where a probe finds it"]
fn the_supervisor_is_confined_and_still_cleans_up() {
    let fx = Fixture::new("supervisor");
    let path = fx.dir.join("config.json");
    std::fs::write(&path, fx.config("sleep 30").to_string()).unwrap();
    let events = fx.dir.join("events");
    let file = std::fs::File::create(&events).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tartarus-jail"))
        .args(["run", "--config"])
        .arg(&path)
        .args(["--events-fd", "1"])
        .stdout(file)
        .spawn()
        .unwrap();
    events_with(&events, "\"started\"", "the jail never started");
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let mode = status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .map(str::trim);
    assert_eq!(mode, Some("2"), "{status}");
    // SAFETY: kill takes plain integers; the child is ours and still running.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let code = child.wait().unwrap();
    assert_eq!(code.code(), Some(128 + libc::SIGTERM), "{code:?}");
    let text = std::fs::read_to_string(&events).unwrap();
    assert!(text.contains("\"exited\""), "{text}");
}

/// When the process that started the jail dies, the jail ends with it, and the
/// supervisor still reports (a host process killed with SIGKILL leaves no sandbox).
#[test]
#[ignore = "needs busybox; run where a probe finds it"]
fn the_jail_ends_when_its_starter_dies() {
    let fx = Fixture::new("orphan");
    let path = fx.dir.join("config.json");
    std::fs::write(&path, fx.config("sleep 30").to_string()).unwrap();
    let events = fx.dir.join("events");
    // The shell starts the jail in the background and exits, as a crashed host would.
    let status = Command::new("/bin/sh")
        .args([
            "-c",
            r#""$0" run --config "$1" --events-fd 3 3>"$2" & sleep 0.5"#,
        ])
        .arg(env!("CARGO_BIN_EXE_tartarus-jail"))
        .arg(&path)
        .arg(&events)
        .status()
        .unwrap();
    assert!(status.success());
    let text = events_with(&events, "\"exited\"", "the jail outlived its starter");
    assert!(text.contains("\"started\""), "{text}");
}
