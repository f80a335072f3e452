//! Styx's egress filter in the kernel: loads `bpf/egress.bpf.c` (a tc classifier), attaches
//! it to the host end of sandbox links and keeps its maps.
//!
//! The maps are pinned under one directory of the BPF filesystem, so every Tartarus server
//! on the host, and the next one after a restart, shares them. The classifier is attached
//! by netlink (cls_bpf, direct action) on the link's clsact ingress hook, not by a TCX
//! link: a netlink filter lives as long as its interface, so sandboxes that outlive a
//! server stay filtered and deleting the link removes it.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap as BpfHashMap, Map, MapData, MapError};
use aya::programs::tc::{self, NlOptions, SchedClassifier, TcAttachOptions, TcAttachType};
use aya::{Ebpf, EbpfLoader, Pod};

/// The object file, aligned: the ELF parser reads its headers in place.
#[repr(C, align(32))]
struct Aligned<T: ?Sized>(T);
static OBJECT: &Aligned<[u8]> =
    &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/egress.bpf.o")));
const PROGRAM: &str = "tt_egress";
const BPF_FS: &str = "/sys/fs/bpf";
// Magic number of the BPF filesystem (statfs's f_type).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Port ranges one network (with the networks around it) may carry; see the C file.
pub const MAX_RANGES: usize = 32;
/// Resolver answers kept for one address (different names and ports).
pub const MAX_NAMED: usize = 8;

#[repr(C)]
#[derive(Clone, Copy)]
struct LinkValue {
    saddr: u32,
    resolver: u32,
    accept_otherwise: u32,
    ifname: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RangeValue {
    first: u16,
    last: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct RuleValue {
    count: u32,
    accept: u32,
    ranges: [RangeValue; MAX_RANGES],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct NamedKey {
    ifindex: u32,
    addr: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct NamedRange {
    first: u16,
    last: u16,
    pad: u32,
    expires_ns: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct NamedValue {
    count: u32,
    pad: u32,
    ranges: [NamedRange; MAX_NAMED],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct DropsValue {
    denied: u64,
    spoofed: u64,
}

// SAFETY: plain `repr(C)` integers and arrays of them, no padding bytes the kernel could
// read uninitialised (fields are laid out to fill every word).
unsafe impl Pod for LinkValue {}
// SAFETY: as above.
unsafe impl Pod for RuleValue {}
// SAFETY: as above.
unsafe impl Pod for NamedKey {}
// SAFETY: as above (`pad` fills the hole before the u64).
unsafe impl Pod for NamedValue {}
// SAFETY: as above.
unsafe impl Pod for DropsValue {}

/// One port range: `first == 0` matches every packet to the network (any protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    pub first: u16,
    pub last: u16,
}

impl Ports {
    pub const ANY: Ports = Ports {
        first: 0,
        last: u16::MAX,
    };
}

/// What packets to `network/prefix_len` meet, in order: the first range that matches
/// decides (accept or drop); none matching falls through to the resolver's answers and
/// then the link's default. Longest prefix wins, so a network's list repeats the ranges
/// of the wider networks around it that apply after its own.
#[derive(Debug, Clone)]
pub struct NetworkRule {
    pub network: Ipv4Addr,
    pub prefix_len: u8,
    pub ranges: Vec<(Ports, bool)>,
}

/// Everything the filter needs to know about one link.
#[derive(Debug, Clone)]
pub struct LinkRules {
    pub host_if: String,
    pub sandbox_address: Ipv4Addr,
    pub resolver: Option<Ipv4Addr>,
    pub accept_otherwise: bool,
    pub rules: Vec<NetworkRule>,
}

/// A link the filter has rules for, and what it dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkDrops {
    pub host_if: String,
    pub ifindex: u32,
    pub denied: u64,
    pub spoofed: u64,
}

fn other<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> io::Error + '_ {
    move |e| io::Error::other(format!("{what}: {e}"))
}

/// The loaded object (its maps opened from their pins), once per process.
struct Loaded {
    pin_dir: PathBuf,
    ebpf: Ebpf,
}

static LOADED: Mutex<Option<Loaded>> = Mutex::new(None);

fn is_bpf_fs(path: &Path) -> io::Result<bool> {
    let stat = nix::sys::statfs::statfs(path).map_err(io::Error::from)?;
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between libcs
    Ok(stat.filesystem_type().0 as i64 == BPF_FS_MAGIC)
}

/// Mounts the BPF filesystem at /sys/fs/bpf when it is not (a fresh host, or a
/// container's /sys), so pins outlive this process.
fn ensure_bpf_fs() -> io::Result<()> {
    let root = Path::new(BPF_FS);
    if is_bpf_fs(root)? {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        root,
        Some("bpf"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        Some("mode=0700"),
    )
    .map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("cannot mount the BPF filesystem at {BPF_FS}: {e}"),
        )
    })
}

fn with_loaded<T>(pin_dir: &Path, work: impl FnOnce(&mut Ebpf) -> io::Result<T>) -> io::Result<T> {
    let mut guard = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    if guard.as_ref().is_some_and(|l| l.pin_dir != pin_dir) {
        *guard = None;
    }
    if guard.is_none() {
        ensure_bpf_fs()?;
        fs::create_dir_all(pin_dir)?;
        let mut ebpf = EbpfLoader::new()
            .map_pin_path(pin_dir)
            .load(&OBJECT.0)
            .map_err(other("cannot load the egress filter"))?;
        let program: &mut SchedClassifier = ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| io::Error::other("the egress filter object has no tt_egress"))?
            .try_into()
            .map_err(other("tt_egress is not a tc classifier"))?;
        program
            .load()
            .map_err(other("the kernel refused the egress filter"))?;
        *guard = Some(Loaded {
            pin_dir: pin_dir.to_owned(),
            ebpf,
        });
    }
    let loaded = guard.as_mut().expect("loaded above");
    work(&mut loaded.ebpf)
}

fn map<'a>(ebpf: &'a mut Ebpf, name: &str) -> io::Result<&'a mut Map> {
    ebpf.map_mut(name)
        .ok_or_else(|| io::Error::other(format!("the egress filter object has no map {name}")))
}

fn links_map(ebpf: &mut Ebpf) -> io::Result<BpfHashMap<&mut MapData, u32, LinkValue>> {
    BpfHashMap::try_from(map(ebpf, "tt_links")?).map_err(other("tt_links"))
}

fn drops_map(ebpf: &mut Ebpf) -> io::Result<BpfHashMap<&mut MapData, u32, DropsValue>> {
    BpfHashMap::try_from(map(ebpf, "tt_drops")?).map_err(other("tt_drops"))
}

fn rules_map(ebpf: &mut Ebpf) -> io::Result<LpmTrie<&mut MapData, [u8; 8], RuleValue>> {
    LpmTrie::try_from(map(ebpf, "tt_rules")?).map_err(other("tt_rules"))
}

fn named_map(ebpf: &mut Ebpf) -> io::Result<BpfHashMap<&mut MapData, NamedKey, NamedValue>> {
    BpfHashMap::try_from(map(ebpf, "tt_named")?).map_err(other("tt_named"))
}

fn ifindex(name: &str) -> io::Result<u32> {
    let c =
        std::ffi::CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no interface {name}"),
        ));
    }
    Ok(index)
}

fn ifname_bytes(name: &str) -> io::Result<[u8; 16]> {
    let mut out = [0u8; 16];
    if name.len() >= out.len() || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not an interface name"),
        ));
    }
    out[..name.len()].copy_from_slice(name.as_bytes());
    Ok(out)
}

fn ifname_of(value: &LinkValue) -> String {
    let end = value
        .ifname
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(value.ifname.len());
    String::from_utf8_lossy(&value.ifname[..end]).into_owned()
}

fn rule_key(ifindex: u32, network: Ipv4Addr, prefix_len: u8) -> Key<[u8; 8]> {
    let mut data = [0u8; 8];
    data[..4].copy_from_slice(&ifindex.to_ne_bytes());
    data[4..].copy_from_slice(&network.octets());
    Key::new(32 + u32::from(prefix_len), data)
}

fn be(address: Ipv4Addr) -> u32 {
    // The kernel compares these with packet fields, which are in network order.
    u32::from_ne_bytes(address.octets())
}

fn missing_is_ok(result: Result<(), MapError>) -> io::Result<()> {
    match result {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(io::Error::other(e.to_string())),
    }
}

/// Removes every map entry of interface index `index` (rules, resolver answers, counters,
/// the link itself).
fn clear(ebpf: &mut Ebpf, index: u32) -> io::Result<()> {
    {
        let mut rules = rules_map(ebpf)?;
        let keys: Vec<Key<[u8; 8]>> = rules
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.data()[..4] == index.to_ne_bytes())
            .collect();
        for key in keys {
            missing_is_ok(rules.remove(&key))?;
        }
    }
    {
        let mut named = named_map(ebpf)?;
        let keys: Vec<NamedKey> = named
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.ifindex == index)
            .collect();
        for key in keys {
            missing_is_ok(named.remove(&key))?;
        }
    }
    missing_is_ok(drops_map(ebpf)?.remove(&index))?;
    missing_is_ok(links_map(ebpf)?.remove(&index))?;
    Ok(())
}

/// Loads the filter (mounting the BPF filesystem and pinning its maps under `pin_dir`
/// if need be): whether this host can enforce with it.
pub fn probe(pin_dir: &Path) -> io::Result<()> {
    with_loaded(pin_dir, |_| Ok(()))
}

/// Installs `rules` for the link and attaches the filter to its host end, replacing
/// what was there. The link must exist (and should still be down).
pub fn attach(pin_dir: &Path, rules: &LinkRules) -> io::Result<()> {
    let index = ifindex(&rules.host_if)?;
    let ifname = ifname_bytes(&rules.host_if)?;
    for rule in &rules.rules {
        if rule.ranges.len() > MAX_RANGES || rule.prefix_len > 32 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}/{}: more than {MAX_RANGES} port ranges apply to it",
                    rule.network, rule.prefix_len
                ),
            ));
        }
    }
    with_loaded(pin_dir, |ebpf| {
        // Entries of this index (the kernel hands indexes out again) or of this name (a
        // link gone in a crash, whose lease slot is reused) are old: start clean.
        let mut stale = named(ebpf, &rules.host_if)?;
        if links_map(ebpf)?.get(&index, 0).is_ok() {
            stale.push(index);
        }
        for old in stale {
            clear(ebpf, old)?;
        }
        let link = LinkValue {
            saddr: be(rules.sandbox_address),
            resolver: rules.resolver.map(be).unwrap_or(0),
            accept_otherwise: u32::from(rules.accept_otherwise),
            ifname,
        };
        // The link entry first: an attach that fails halfway leaves entries the next
        // attach or detach of this name or index finds (the link is still down, so
        // nothing crosses it meanwhile).
        links_map(ebpf)?
            .insert(index, link, 0)
            .map_err(other("tt_links"))?;
        drops_map(ebpf)?
            .insert(index, DropsValue::default(), 0)
            .map_err(other("tt_drops"))?;
        {
            let mut trie = rules_map(ebpf)?;
            for rule in &rules.rules {
                let mut value = RuleValue {
                    count: rule.ranges.len() as u32,
                    accept: 0,
                    ranges: [RangeValue::default(); MAX_RANGES],
                };
                for (i, (ports, accept)) in rule.ranges.iter().enumerate() {
                    value.ranges[i] = RangeValue {
                        first: ports.first,
                        last: ports.last,
                    };
                    value.accept |= u32::from(*accept) << i;
                }
                trie.insert(&rule_key(index, rule.network, rule.prefix_len), value, 0)
                    .map_err(other("tt_rules"))?;
            }
        }
        attach_classifier(ebpf, &rules.host_if)
    })
}

fn attach_classifier(ebpf: &mut Ebpf, host_if: &str) -> io::Result<()> {
    match tc::qdisc_add_clsact(host_if) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            // Attached before (rules replaced): one filter, not two.
            match tc::qdisc_detach_program(host_if, TcAttachType::Ingress, PROGRAM) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(other("cannot replace the egress filter")(e)),
            }
        }
        Err(e) => return Err(other("cannot add a clsact qdisc")(e)),
    }
    let program: &mut SchedClassifier = ebpf
        .program_mut(PROGRAM)
        .ok_or_else(|| io::Error::other("no tt_egress"))?
        .try_into()
        .map_err(other("tt_egress"))?;
    let id = program
        .attach_with_options(
            host_if,
            TcAttachType::Ingress,
            TcAttachOptions::Netlink(NlOptions::default()),
        )
        .map_err(other("cannot attach the egress filter"))?;
    let link = program.take_link(id).map_err(other("tt_egress"))?;
    // The filter belongs to the interface from here: dropping the link would detach it.
    std::mem::forget(link);
    Ok(())
}

/// Lets the link reach `address` on `ports` until `ttl` from now (a resolver's answer).
/// Answers for one address merge; when more than `MAX_NAMED` would be kept, the one
/// that expires first gives way.
pub fn allow_resolved(
    pin_dir: &Path,
    host_if: &str,
    address: Ipv4Addr,
    ports: Ports,
    ttl: Duration,
) -> io::Result<()> {
    let now = monotonic_ns()?;
    let expires_ns = now.saturating_add(u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX));
    with_loaded(pin_dir, |ebpf| {
        let index = find(ebpf, host_if)?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no egress rules for {host_if}"),
            )
        })?;
        let key = NamedKey {
            ifindex: index,
            addr: be(address),
        };
        let mut named = named_map(ebpf)?;
        let mut kept: Vec<NamedRange> = match named.get(&key, 0) {
            Ok(value) => value.ranges[..(value.count as usize).min(MAX_NAMED)]
                .iter()
                .filter(|r| r.expires_ns > now)
                .copied()
                .collect(),
            Err(_) => Vec::new(),
        };
        match kept
            .iter_mut()
            .find(|r| r.first == ports.first && r.last == ports.last)
        {
            Some(r) => r.expires_ns = r.expires_ns.max(expires_ns),
            None => kept.push(NamedRange {
                first: ports.first,
                last: ports.last,
                pad: 0,
                expires_ns,
            }),
        }
        kept.sort_by_key(|r| std::cmp::Reverse(r.expires_ns));
        kept.truncate(MAX_NAMED);
        let mut value = NamedValue {
            count: kept.len() as u32,
            pad: 0,
            ranges: [NamedRange::default(); MAX_NAMED],
        };
        value.ranges[..kept.len()].copy_from_slice(&kept);
        named.insert(key, value, 0).map_err(other("tt_named"))
    })
}

fn monotonic_ns() -> io::Result<u64> {
    // bpf_ktime_get_ns is CLOCK_MONOTONIC.
    let now =
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_err(io::Error::from)?;
    Ok(u64::try_from(now.tv_sec()).unwrap_or(0) * 1_000_000_000
        + u64::try_from(now.tv_nsec()).unwrap_or(0))
}

/// The index of the live link `host_if`, if it has rules: the interface of that name
/// now, whose entry must carry the name (old entries of a reused name do not count).
fn find(ebpf: &mut Ebpf, host_if: &str) -> io::Result<Option<u32>> {
    let Ok(index) = ifindex(host_if) else {
        return Ok(None);
    };
    Ok(match links_map(ebpf)?.get(&index, 0) {
        Ok(value) if ifname_of(&value) == host_if => Some(index),
        _ => None,
    })
}

/// Every index whose entry carries the name `host_if` (live or not).
fn named(ebpf: &mut Ebpf, host_if: &str) -> io::Result<Vec<u32>> {
    let links = links_map(ebpf)?;
    Ok(links
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, value)| ifname_of(value) == host_if)
        .map(|(index, _)| index)
        .collect())
}

/// Removes the link's rules, answers and counters; false if it had none. The filter
/// itself goes with the interface.
pub fn detach(pin_dir: &Path, host_if: &str) -> io::Result<bool> {
    with_loaded(pin_dir, |ebpf| {
        // Every entry of that name: the link is usually gone by now, and a crash may
        // have left older ones.
        let found = named(ebpf, host_if)?;
        for index in &found {
            clear(ebpf, *index)?;
        }
        Ok(!found.is_empty())
    })
}

/// Every link with rules, and its drop counters.
pub fn links(pin_dir: &Path) -> io::Result<Vec<LinkDrops>> {
    with_loaded(pin_dir, |ebpf| {
        let found: Vec<(u32, String)> = links_map(ebpf)?
            .iter()
            .filter_map(Result::ok)
            .map(|(index, value)| (index, ifname_of(&value)))
            .collect();
        let drops = drops_map(ebpf)?;
        let mut seen = HashSet::new();
        Ok(found
            .into_iter()
            .filter(|(_, name)| seen.insert(name.clone()))
            .map(|(ifindex, host_if)| {
                let d = drops.get(&ifindex, 0).unwrap_or_default();
                LinkDrops {
                    host_if,
                    ifindex,
                    denied: d.denied,
                    spoofed: d.spoofed,
                }
            })
            .collect())
    })
}
