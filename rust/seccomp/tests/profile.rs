//! Profile model: JSON round trips, compilation, and filters installed in real children.

use std::os::unix::process::CommandExt;
use std::process::Command;

use tartarus_seccomp::builtin::{jail_default, EPERM};
use tartarus_seccomp::{Action, DenyRule, Profile, SeccompError, SyscallRule};

#[test]
fn json_round_trip_keeps_every_field() {
    let profile = jail_default();
    let back = Profile::from_json(&profile.to_json()).unwrap();
    assert_eq!(back, profile);
}

#[test]
fn unknown_fields_and_bad_actions_are_rejected() {
    let err = Profile::from_json(r#"{"name":"x","default_action":"allow","bogus":1}"#).unwrap_err();
    assert!(err.to_string().contains("bogus"), "{err}");
    let err = Profile::from_json(r#"{"name":"x","default_action":"explode"}"#).unwrap_err();
    assert!(matches!(err, SeccompError::Parse(_)));
}

#[test]
fn unknown_syscall_names_are_an_error_unless_skipped() {
    let mut profile = Profile {
        name: "t".into(),
        default_action: Action::Errno(EPERM),
        allow: vec![SyscallRule::any("read"), SyscallRule::any("no_such_call")],
        deny: Vec::new(),
        skip_unknown: false,
    };
    let err = profile.compile().unwrap_err();
    assert!(err.to_string().contains("no_such_call"), "{err}");
    profile.skip_unknown = true;
    assert_eq!(profile.compile().unwrap().filters.len(), 1);
}

#[test]
fn default_profile_compiles_to_allow_filter_plus_one_per_deny_action() {
    let compiled = jail_default().compile().unwrap();
    // ENOSYS (clone3) filter, EPERM (TIOCSTI) filter, then the allow list
    assert_eq!(compiled.filters.len(), 3);
}

#[test]
fn allow_everything_compiles_to_no_filter() {
    let profile = Profile {
        name: "open".into(),
        default_action: Action::Allow,
        allow: Vec::new(),
        deny: Vec::new(),
        skip_unknown: false,
    };
    assert!(profile.compile().unwrap().filters.is_empty());
}

/// Runs `sh -c script` with `profile` installed in the child before exec.
fn run_confined(profile: &Profile, script: &str) -> std::process::Output {
    let compiled = profile.compile().unwrap();
    let mut cmd = Command::new("/bin/sh");
    cmd.args(["-c", script]);
    // SAFETY: the closure only calls prctl/seccomp (install allocates only on failure).
    unsafe {
        cmd.pre_exec(move || compiled.install().map_err(std::io::Error::other));
    }
    cmd.output().unwrap()
}

#[test]
fn default_profile_runs_a_shell_and_denies_namespaces() {
    let out = run_confined(
        &jail_default(),
        "echo hello; ls / >/dev/null && echo listed",
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\nlisted\n");
    assert!(out.status.success(), "{out:?}");
    if std::path::Path::new("/usr/bin/unshare").exists() {
        let out = run_confined(&jail_default(), "unshare -n true");
        assert!(!out.status.success(), "unshare must fail: {out:?}");
    }
}

#[test]
fn deny_rule_beats_allow_and_default_allow() {
    let profile = Profile {
        name: "no-mkdir".into(),
        default_action: Action::Allow,
        allow: Vec::new(),
        deny: vec![
            DenyRule {
                syscall: "mkdir".into(),
                args: Vec::new(),
                action: Action::Errno(EPERM),
            },
            DenyRule {
                syscall: "mkdirat".into(),
                args: Vec::new(),
                action: Action::Errno(EPERM),
            },
        ],
        skip_unknown: true,
    };
    let dir = std::env::temp_dir().join(format!("typhon-{}", std::process::id()));
    let out = run_confined(&profile, &format!("mkdir {} && echo made", dir.display()));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"),
        "{out:?}"
    );
    assert!(!dir.exists());
}

#[test]
fn denied_errno_wins_over_the_default_errno() {
    // clone3 is denied with ENOSYS (so libc falls back to clone) while anything else not
    // allowed gets EPERM: a thread must still start under the default profile.
    let out = run_confined(&jail_default(), "echo ok");
    assert!(out.status.success());
    let compiled = jail_default().compile().unwrap();
    let handle = std::thread::spawn(move || {
        compiled.install().unwrap();
        // SAFETY: a raw clone3 with a null argument: only the errno matters.
        let rc = unsafe { libc::syscall(libc::SYS_clone3, 0usize, 0usize) };
        let errno = std::io::Error::last_os_error().raw_os_error();
        let spawned = std::thread::spawn(|| 7).join().unwrap();
        (rc, errno, spawned)
    });
    assert_eq!(handle.join().unwrap(), (-1, Some(libc::ENOSYS), 7));
}
