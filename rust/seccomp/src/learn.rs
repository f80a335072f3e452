//! Profile learning: reads the output of `strace -f` and builds an allow-list profile of
//! the syscalls the traced program made.
//!
//! Understood line shapes (with or without `-f` pid prefixes, `-t`/`-tt`/`-ttt`/`-r`
//! timestamps):
//!
//! ```text
//! 1234  openat(AT_FDCWD, "/etc/passwd", O_RDONLY) = 3
//! [pid  1235] read(3,  <unfinished ...>
//! [pid  1235] <... read resumed>"root:x", 4096) = 6
//! 1234  --- SIGCHLD {si_signo=SIGCHLD, ...} ---
//! 1234  +++ exited with 0 +++
//! strace: Process 1235 attached
//! ```

use std::collections::BTreeMap;

use crate::profile::{syscall_name, syscall_number, Action, Profile, SyscallRule};

/// What a strace log says about the syscalls a program made.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StraceSummary {
    /// Syscall name → number of calls.
    pub syscalls: BTreeMap<String, u64>,
    /// Lines that were neither a syscall nor a known status line.
    pub unparsed_lines: u64,
}

/// One classified strace line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line<'a> {
    /// The start of a call (complete or `<unfinished ...>`).
    Call(&'a str),
    /// `<... name resumed>`: the end of a call that started on an earlier line.
    Resumed(&'a str),
    /// Signals, exits, attach/detach notices, blank lines.
    Status,
    Unparsed,
}

/// Parses a whole strace log.
pub fn parse_strace(text: &str) -> StraceSummary {
    let mut summary = StraceSummary::default();
    // Resumed calls whose start is not in the log (it began before tracing) count once.
    let mut pending: BTreeMap<&str, u64> = BTreeMap::new();
    for line in text.lines() {
        match parse_line(line) {
            Line::Call(name) => {
                *summary.syscalls.entry(name.to_string()).or_default() += 1;
                if line.trim_end().ends_with("<unfinished ...>") {
                    *pending.entry(name).or_default() += 1;
                }
            }
            Line::Resumed(name) => match pending.get_mut(name) {
                Some(n) if *n > 0 => *n -= 1,
                _ => *summary.syscalls.entry(name.to_string()).or_default() += 1,
            },
            Line::Status => {}
            Line::Unparsed => summary.unparsed_lines += 1,
        }
    }
    summary
}

/// Classifies one line of strace output.
pub fn parse_line(line: &str) -> Line<'_> {
    let rest = strip_timestamp(strip_pid(line.trim_start()));
    if rest.is_empty()
        || rest.starts_with("---")
        || rest.starts_with("+++")
        || line.starts_with("strace: ")
    {
        return Line::Status;
    }
    if let Some(resumed) = rest.strip_prefix("<... ") {
        let name = resumed.split_whitespace().next().unwrap_or_default();
        return if is_syscall_name(name) && resumed[name.len()..].starts_with(" resumed>") {
            Line::Resumed(name)
        } else {
            Line::Unparsed
        };
    }
    match rest.split_once('(') {
        Some((name, _)) if is_syscall_name(name) => Line::Call(name),
        _ => Line::Unparsed,
    }
}

fn strip_pid(line: &str) -> &str {
    if let Some(rest) = line.strip_prefix("[pid") {
        return match rest.split_once(']') {
            Some((pid, after)) if is_number(pid.trim()) => after.trim_start(),
            _ => line,
        };
    }
    match line.split_once(char::is_whitespace) {
        Some((pid, after)) if is_number(pid) => after.trim_start(),
        _ => line,
    }
}

/// Removes `12:34:56`, `12:34:56.123456`, `1700000000.123456` or a `-r` delta.
fn strip_timestamp(line: &str) -> &str {
    match line.split_once(char::is_whitespace) {
        Some((stamp, after))
            if !stamp.is_empty()
                && stamp
                    .chars()
                    .all(|c| c.is_ascii_digit() || c == ':' || c == '.')
                && stamp.chars().any(|c| c == ':' || c == '.') =>
        {
            after.trim_start()
        }
        _ => line,
    }
}

fn is_number(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

fn is_syscall_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Builds an allow-list profile from what a program was seen to call; anything else
/// gets `default_action`. Names this architecture does not know are reported back.
pub fn profile_from_summary(
    name: &str,
    summary: &StraceSummary,
    default_action: Action,
) -> (Profile, Vec<String>) {
    let mut allow = Vec::new();
    let mut unknown = Vec::new();
    for syscall in summary.syscalls.keys() {
        // Normalise `syscall_0x1b6` to its name where this architecture has one.
        match syscall_number(syscall).and_then(syscall_name) {
            Some(known) => allow.push(SyscallRule::any(known)),
            None => unknown.push(syscall.clone()),
        }
    }
    allow.sort_by(|a, b| a.syscall.cmp(&b.syscall));
    allow.dedup();
    let profile = Profile {
        name: name.to_string(),
        default_action,
        allow,
        deny: Vec::new(),
        skip_unknown: false,
    };
    (profile, unknown)
}
