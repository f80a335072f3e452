//! The profile model: a default action, allowed syscalls, denied syscalls, and argument
//! conditions, (de)serialisable as JSON so profiles can be stored and shipped.

use std::collections::BTreeMap;
use std::str::FromStr;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use serde::{Deserialize, Serialize};
use syscalls::Sysno;

use crate::SeccompError;

/// What the kernel does with a syscall.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Allow,
    /// Fail the call with this errno (e.g. 1 = EPERM, 38 = ENOSYS).
    Errno(u32),
    KillProcess,
    KillThread,
    /// Deliver SIGSYS.
    Trap,
    /// Allow, and log to the audit log.
    Log,
}

impl From<Action> for SeccompAction {
    fn from(action: Action) -> Self {
        match action {
            Action::Allow => SeccompAction::Allow,
            Action::Errno(e) => SeccompAction::Errno(e),
            Action::KillProcess => SeccompAction::KillProcess,
            Action::KillThread => SeccompAction::KillThread,
            Action::Trap => SeccompAction::Trap,
            Action::Log => SeccompAction::Log,
        }
    }
}

/// How an argument is compared with `value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    /// `(arg & mask) == value`.
    MaskedEq(u64),
}

/// Width of the compared argument: 32-bit (`int`, flags) or 64-bit (pointers, sizes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArgWidth {
    Dword,
    #[default]
    Qword,
}

/// One condition on a syscall argument (index 0..=5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArgCondition {
    pub index: u8,
    pub op: CmpOp,
    pub value: u64,
    #[serde(default)]
    pub width: ArgWidth,
}

/// A syscall, optionally restricted to calls whose arguments meet every condition.
/// Several rules for one syscall match if any of them does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyscallRule {
    pub syscall: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<ArgCondition>,
}

impl SyscallRule {
    pub fn any(syscall: &str) -> Self {
        Self {
            syscall: syscall.to_string(),
            args: Vec::new(),
        }
    }
}

/// A syscall that gets `action` instead of the default, even if it is also allowed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenyRule {
    pub syscall: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<ArgCondition>,
    pub action: Action,
}

/// A seccomp profile.
///
/// Semantics: a syscall matching a `deny` rule gets that rule's action; otherwise one
/// matching an `allow` rule is allowed; anything else gets `default_action`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub name: String,
    pub default_action: Action,
    #[serde(default)]
    pub allow: Vec<SyscallRule>,
    #[serde(default)]
    pub deny: Vec<DenyRule>,
    /// Skip syscall names this architecture does not have (for profiles written for
    /// several architectures) instead of refusing the profile.
    #[serde(default)]
    pub skip_unknown: bool,
}

/// A profile compiled for this architecture: BPF programs to install in order.
#[derive(Debug, Clone)]
pub struct CompiledProfile {
    pub filters: Vec<BpfProgram>,
}

impl Profile {
    pub fn from_json(text: &str) -> Result<Self, SeccompError> {
        serde_json::from_str(text).map_err(|e| SeccompError::Parse(e.to_string()))
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a profile always serialises")
    }

    /// Compiles the profile for the architecture this program runs on.
    ///
    /// The kernel runs every installed filter and keeps the most restrictive verdict, so
    /// the profile becomes one filter per deny action (mismatch: allow), then one
    /// allow-list filter (mismatch: the default action), installed last because it may
    /// forbid seccomp(2) itself. A denied syscall thus loses even when it
    /// is also allowed.
    pub fn compile(&self) -> Result<CompiledProfile, SeccompError> {
        let arch = TargetArch::try_from(std::env::consts::ARCH)
            .map_err(|e| SeccompError::Compile(e.to_string()))?;
        let mut filters = Vec::new();
        let mut by_action: BTreeMap<Action, Vec<&DenyRule>> = BTreeMap::new();
        for rule in &self.deny {
            by_action.entry(rule.action).or_default().push(rule);
        }
        for (action, rules) in by_action {
            if action == Action::Allow {
                continue;
            }
            let map = self.rule_map(rules.iter().map(|r| (&r.syscall, &r.args)))?;
            filters.push(build(map, Action::Allow, action, arch)?);
        }
        // Last: once installed, the allow list may forbid seccomp(2) itself.
        if self.default_action != Action::Allow {
            // The allow list lets unconditionally denied syscalls through, so their deny
            // filter decides: among equal verdicts (two errnos) the kernel keeps the last
            // installed filter's, which would otherwise be the default's errno.
            let denied = self
                .deny
                .iter()
                .filter(|r| r.args.is_empty())
                .map(|r| (&r.syscall, &r.args));
            let allowed = self.rule_map(
                self.allow
                    .iter()
                    .map(|r| (&r.syscall, &r.args))
                    .chain(denied),
            )?;
            filters.push(build(allowed, self.default_action, Action::Allow, arch)?);
        }
        Ok(CompiledProfile { filters })
    }

    fn rule_map<'a>(
        &self,
        rules: impl Iterator<Item = (&'a String, &'a Vec<ArgCondition>)>,
    ) -> Result<BTreeMap<i64, Vec<SeccompRule>>, SeccompError> {
        // None = matches unconditionally (seccompiler's empty rule vector).
        let mut map: BTreeMap<i64, Option<Vec<SeccompRule>>> = BTreeMap::new();
        let mut unknown = Vec::new();
        for (name, args) in rules {
            let Some(nr) = syscall_number(name) else {
                unknown.push(name.clone());
                continue;
            };
            let entry = map.entry(nr).or_insert_with(|| Some(Vec::new()));
            if args.is_empty() {
                *entry = None;
            } else if let Some(list) = entry {
                list.push(to_rule(name, args)?);
            }
        }
        if !unknown.is_empty() && !self.skip_unknown {
            return Err(SeccompError::UnknownSyscalls {
                profile: self.name.clone(),
                arch: std::env::consts::ARCH,
                names: unknown,
            });
        }
        Ok(map
            .into_iter()
            .map(|(nr, rules)| (nr, rules.unwrap_or_default()))
            .collect())
    }
}

fn build(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: Action,
    on_match: Action,
    arch: TargetArch,
) -> Result<BpfProgram, SeccompError> {
    let filter = SeccompFilter::new(rules, mismatch.into(), on_match.into(), arch)
        .map_err(|e| SeccompError::Compile(e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| SeccompError::Compile(e.to_string()))
}

fn to_rule(name: &str, args: &[ArgCondition]) -> Result<SeccompRule, SeccompError> {
    let conditions = args
        .iter()
        .map(|c| {
            let width = match c.width {
                ArgWidth::Dword => SeccompCmpArgLen::Dword,
                ArgWidth::Qword => SeccompCmpArgLen::Qword,
            };
            let op = match c.op {
                CmpOp::Eq => SeccompCmpOp::Eq,
                CmpOp::Ne => SeccompCmpOp::Ne,
                CmpOp::Lt => SeccompCmpOp::Lt,
                CmpOp::Le => SeccompCmpOp::Le,
                CmpOp::Gt => SeccompCmpOp::Gt,
                CmpOp::Ge => SeccompCmpOp::Ge,
                CmpOp::MaskedEq(mask) => SeccompCmpOp::MaskedEq(mask),
            };
            SeccompCondition::new(c.index, width, op, c.value)
                .map_err(|e| SeccompError::Compile(format!("{name}: argument {}: {e}", c.index)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    SeccompRule::new(conditions).map_err(|e| SeccompError::Compile(format!("{name}: {e}")))
}

/// The number of a syscall on this architecture, by name (`read`) or as strace prints
/// syscalls it has no name for (`syscall_0x1b6`, `syscall_438`).
pub fn syscall_number(name: &str) -> Option<i64> {
    if let Ok(sysno) = Sysno::from_str(name) {
        return Some(i64::from(sysno.id()));
    }
    let raw = name.strip_prefix("syscall_")?;
    let nr = match raw.strip_prefix("0x") {
        Some(hex) => usize::from_str_radix(hex, 16).ok()?,
        None => raw.parse().ok()?,
    };
    Sysno::new(nr).map(|s| i64::from(s.id()))
}

/// The name of a syscall number on this architecture.
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    usize::try_from(nr)
        .ok()
        .and_then(Sysno::new)
        .map(|s| s.name())
}
