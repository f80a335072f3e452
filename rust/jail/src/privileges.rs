//! Dropping privileges: capabilities, rlimits, user and group ids.

use std::collections::HashSet;

use caps::{CapSet, Capability, CapsHashSet};
use nix::sys::resource::{setrlimit, Resource};
use nix::unistd::{setgroups, setresgid, setresuid, Gid, Uid};

use crate::config::Rlimit;
use crate::{JailError, Result};

fn caps_error(what: &str, e: caps::errors::CapsError) -> JailError {
    JailError::Os {
        what: what.to_string(),
        source: std::io::Error::other(e.to_string()),
    }
}

/// Parses capability names (`CAP_CHOWN`).
pub fn parse_capabilities(names: &[String]) -> Result<CapsHashSet> {
    names
        .iter()
        .map(|n| {
            n.parse::<Capability>()
                .map_err(|_| JailError::Config(format!("unknown capability {n:?}")))
        })
        .collect()
}

/// Drops everything but `keep` from the bounding set, so no later exec can regain it.
/// Needs CAP_SETPCAP, so it comes before [`limit_capabilities`].
pub fn limit_bounding_set(keep: &CapsHashSet) -> Result<()> {
    for cap in caps::all().iter().filter(|c| !keep.contains(c)) {
        if caps::has_cap(None, CapSet::Bounding, *cap).unwrap_or(false) {
            caps::drop(None, CapSet::Bounding, *cap)
                .map_err(|e| caps_error(&format!("dropping {cap} from the bounding set"), e))?;
        }
    }
    Ok(())
}

/// Keeps only `keep` in the inheritable, permitted and effective sets and clears the
/// ambient set.
pub fn limit_capabilities(keep: &CapsHashSet) -> Result<()> {
    caps::clear(None, CapSet::Ambient).map_err(|e| caps_error("clearing ambient caps", e))?;
    let permitted =
        caps::read(None, CapSet::Permitted).map_err(|e| caps_error("reading permitted caps", e))?;
    let kept: HashSet<Capability> = keep.intersection(&permitted).copied().collect();
    caps::set(None, CapSet::Inheritable, &kept)
        .map_err(|e| caps_error("setting inheritable caps", e))?;
    caps::set(None, CapSet::Effective, &kept)
        .map_err(|e| caps_error("setting effective caps", e))?;
    caps::set(None, CapSet::Permitted, &kept).map_err(|e| caps_error("setting permitted caps", e))
}

/// The rlimit resource for a name such as `nofile`.
pub fn rlimit_resource(name: &str) -> Result<Resource> {
    Ok(match name {
        "as" => Resource::RLIMIT_AS,
        "core" => Resource::RLIMIT_CORE,
        "cpu" => Resource::RLIMIT_CPU,
        "data" => Resource::RLIMIT_DATA,
        "fsize" => Resource::RLIMIT_FSIZE,
        "locks" => Resource::RLIMIT_LOCKS,
        "memlock" => Resource::RLIMIT_MEMLOCK,
        "msgqueue" => Resource::RLIMIT_MSGQUEUE,
        "nice" => Resource::RLIMIT_NICE,
        "nofile" => Resource::RLIMIT_NOFILE,
        "nproc" => Resource::RLIMIT_NPROC,
        "rss" => Resource::RLIMIT_RSS,
        "rtprio" => Resource::RLIMIT_RTPRIO,
        "sigpending" => Resource::RLIMIT_SIGPENDING,
        "stack" => Resource::RLIMIT_STACK,
        other => return Err(JailError::Config(format!("unknown rlimit {other:?}"))),
    })
}

pub fn apply_rlimits(limits: &[Rlimit]) -> Result<()> {
    for r in limits {
        setrlimit(rlimit_resource(&r.resource)?, r.soft, r.hard).map_err(|e| JailError::Os {
            what: format!("setrlimit {} {}/{}", r.resource, r.soft, r.hard),
            source: e.into(),
        })?;
    }
    Ok(())
}

/// Becomes `uid`/`gid` with no supplementary groups. `setgroups` may be denied in a
/// user namespace (after "deny" was written); the map then holds only one group.
pub fn switch_user(uid: u32, gid: u32) -> Result<()> {
    let _ = setgroups(&[Gid::from_raw(gid)]);
    setresgid(Gid::from_raw(gid), Gid::from_raw(gid), Gid::from_raw(gid)).map_err(|e| {
        JailError::Os {
            what: format!("setresgid {gid}"),
            source: e.into(),
        }
    })?;
    setresuid(Uid::from_raw(uid), Uid::from_raw(uid), Uid::from_raw(uid)).map_err(|e| {
        JailError::Os {
            what: format!("setresuid {uid}"),
            source: e.into(),
        }
    })
}

/// Sets `PR_SET_PDEATHSIG(SIGKILL)`: this process dies with its parent. A change of
/// user or group id clears it, so [`drop_privileges`] sets it again.
pub fn die_with_parent() -> Result<()> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes plain integers.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
        return Err(JailError::Os {
            what: "PR_SET_PDEATHSIG".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// The last steps into a jail, in the order the kernel needs them: rlimits, the
/// bounding set (needs CAP_SETPCAP), the user and group ids (when not root), the
/// remaining capabilities, then `no_new_privs`. Still dies with its parent afterwards.
pub fn drop_privileges(rlimits: &[Rlimit], keep: &CapsHashSet, uid: u32, gid: u32) -> Result<()> {
    apply_rlimits(rlimits)?;
    limit_bounding_set(keep)?;
    if uid != 0 || gid != 0 {
        switch_user(uid, gid)?;
        die_with_parent()?;
    }
    limit_capabilities(keep)?;
    tartarus_seccomp::set_no_new_privs().map_err(|source| JailError::Os {
        what: "no_new_privs".into(),
        source,
    })
}
