//! The strace parser: property tests over generated logs, and real strace end to end.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::process::Command;

use proptest::prelude::*;
use tartarus_seccomp::builtin::EPERM;
use tartarus_seccomp::learn::{parse_line, parse_strace, profile_from_summary, Line};
use tartarus_seccomp::Action;

const NAMES: &[&str] = &[
    "read",
    "write",
    "openat",
    "close",
    "mmap",
    "execve",
    "wait4",
    "clone",
    "futex",
    "newfstatat",
    "rt_sigaction",
    "exit_group",
    "syscall_0x1b6",
];

#[derive(Debug, Clone)]
enum Event {
    /// A complete call, or one split into unfinished + resumed.
    Call {
        pid: u32,
        name: usize,
        args: String,
        split: bool,
    },
    Signal {
        pid: u32,
    },
    Exit {
        pid: u32,
        code: u8,
    },
}

fn event() -> impl Strategy<Value = Event> {
    let args = "[ -~&&[^\n]]{0,40}";
    prop_oneof![
        6 => (1u32..100_000, 0..NAMES.len(), args, any::<bool>())
            .prop_map(|(pid, name, args, split)| Event::Call { pid, name, args, split }),
        1 => (1u32..100_000).prop_map(|pid| Event::Signal { pid }),
        1 => (1u32..100_000, any::<u8>()).prop_map(|(pid, code)| Event::Exit { pid, code }),
    ]
}

#[derive(Debug, Clone, Copy)]
enum PidStyle {
    None,
    File,
    Bracket,
}

#[derive(Debug, Clone, Copy)]
enum Stamp {
    None,
    Clock,
    Micro,
    Epoch,
}

fn prefix(pid: u32, style: PidStyle, stamp: Stamp) -> String {
    let pid = match style {
        PidStyle::None => String::new(),
        PidStyle::File => format!("{pid:<5} "),
        PidStyle::Bracket => format!("[pid {pid:>5}] "),
    };
    let stamp = match stamp {
        Stamp::None => String::new(),
        Stamp::Clock => "12:34:56 ".into(),
        Stamp::Micro => "12:34:56.123456 ".into(),
        Stamp::Epoch => "1700000000.123456 ".into(),
    };
    pid + &stamp
}

fn render(events: &[Event], style: PidStyle, stamp: Stamp) -> (String, BTreeMap<String, u64>) {
    let mut text = String::new();
    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    for e in events {
        match e {
            Event::Call {
                pid,
                name,
                args,
                split,
            } => {
                let p = prefix(*pid, style, stamp);
                let n = NAMES[*name];
                *expected.entry(n.to_string()).or_default() += 1;
                if *split {
                    text += &format!("{p}{n}({args} <unfinished ...>\n");
                    text += &format!("{p}<... {n} resumed>{args}) = 0\n");
                } else {
                    text += &format!("{p}{n}({args}) = -1 ENOENT (No such file or directory)\n");
                }
            }
            Event::Signal { pid } => {
                text += &format!(
                    "{}--- SIGCHLD {{si_signo=SIGCHLD, si_code=CLD_EXITED}} ---\n",
                    prefix(*pid, style, stamp)
                );
            }
            Event::Exit { pid, code } => {
                text += &format!("{}+++ exited with {code} +++\n", prefix(*pid, style, stamp));
            }
        }
    }
    (text, expected)
}

fn style() -> impl Strategy<Value = PidStyle> {
    prop_oneof![
        Just(PidStyle::None),
        Just(PidStyle::File),
        Just(PidStyle::Bracket)
    ]
}

fn stamp() -> impl Strategy<Value = Stamp> {
    prop_oneof![
        Just(Stamp::None),
        Just(Stamp::Clock),
        Just(Stamp::Micro),
        Just(Stamp::Epoch)
    ]
}

proptest! {
    #[test]
    fn counts_every_generated_call_once(
        events in proptest::collection::vec(event(), 0..60),
        style in style(),
        stamp in stamp(),
    ) {
        let (text, expected) = render(&events, style, stamp);
        let summary = parse_strace(&text);
        prop_assert_eq!(summary.syscalls, expected);
        prop_assert_eq!(summary.unparsed_lines, 0);
    }

    #[test]
    fn never_panics_on_arbitrary_text(text in "\\PC{0,400}") {
        let summary = parse_strace(&text);
        let lines = text.lines().count() as u64;
        prop_assert!(summary.unparsed_lines <= lines);
    }
}

#[test]
fn classifies_real_world_lines() {
    assert_eq!(parse_line("strace: Process 42 attached"), Line::Status);
    assert_eq!(parse_line("42 +++ killed by SIGKILL +++"), Line::Status);
    assert_eq!(
        parse_line("[pid    42] <... read resumed>\"x\", 1) = 1"),
        Line::Resumed("read")
    );
    assert_eq!(
        parse_line("execve(\"/bin/sh\", [\"sh\"], 0x7ff /* 3 vars */) = 0"),
        Line::Call("execve")
    );
    assert_eq!(parse_line("garbage without a call"), Line::Unparsed);
    assert_eq!(parse_line("42 ???( <unfinished ...>"), Line::Unparsed);
}

#[test]
fn resumed_call_without_its_start_still_counts() {
    let summary = parse_strace("42 <... wait4 resumed>[{WIFEXITED(s)}], 0, NULL) = 43\n");
    assert_eq!(summary.syscalls.get("wait4"), Some(&1));
}

/// Learns a profile from a real `strace -f` run, then runs the same program under it
/// (it works) and a program that needs one more syscall (that call is denied).
/// `scripts/rust-test-probe` runs it where strace is on PATH.
#[test]
#[ignore = "needs strace; run where a probe finds it"]
fn learned_profile_runs_the_traced_program_and_nothing_more() {
    let dir = std::env::temp_dir().join(format!("typhon-learn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("trace.txt");
    let script = "echo learned | cat";
    let status = Command::new("strace")
        .args(["-f", "-qq", "-o"])
        .arg(&log)
        .args(["/bin/sh", "-c", script])
        .status()
        .unwrap();
    assert!(status.success());
    let summary = parse_strace(&std::fs::read_to_string(&log).unwrap());
    assert!(summary.syscalls.contains_key("execve"), "{summary:?}");
    assert!(summary.syscalls.contains_key("write"), "{summary:?}");
    let (profile, unknown) = profile_from_summary("learned", &summary, Action::Errno(EPERM));
    assert!(unknown.is_empty(), "{unknown:?}");
    assert!(!profile
        .allow
        .iter()
        .any(|r| r.syscall == "mkdir" || r.syscall == "mkdirat"));
    let compiled = profile.compile().unwrap();

    let run = |script: &str| {
        let compiled = compiled.clone();
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", script]);
        // SAFETY: the closure only calls prctl/seccomp (install allocates only on failure).
        unsafe {
            cmd.pre_exec(move || compiled.install().map_err(std::io::Error::other));
        }
        cmd.output().unwrap()
    };
    let out = run(script);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "learned\n", "{out:?}");
    assert!(out.status.success());

    let target = dir.join("made");
    let out = run(&format!("mkdir {}", target.display()));
    assert!(!out.status.success(), "mkdir must be denied: {out:?}");
    assert!(!target.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
