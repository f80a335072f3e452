//! A sandbox's link to the host by rtnetlink, in-process: the veth pair (one end moved
//! into the sandbox's namespace), addresses, `up`, and the sandbox's default route. What
//! `ip` did in four processes (~6 ms of every create with a network grant) takes well
//! under a millisecond here.
//!
//! Work inside a namespace runs on a thread of its own that joins it and ends with the
//! work: no other thread of the caller changes namespace.

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use nix::sched::{setns, CloneFlags};

use crate::netns::{context, on_own_thread};

/// Replies to one request fit here (an ACK, or one link's description).
const RECEIVE_BYTES: usize = 64 << 10;

/// One rtnetlink socket, in the namespace of the thread that opened it.
struct Rtnl {
    socket: Socket,
    sequence: u32,
}

impl Rtnl {
    fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Self {
            socket,
            sequence: 0,
        })
    }

    /// Sends one request and returns the kernel's answers up to its ACK; a refusal is
    /// the error it carries (EEXIST, ENODEV, EPERM...).
    fn request(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        header.sequence_number = self.sequence;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
        packet.finalize();
        let mut out = vec![0; packet.buffer_len()];
        packet.serialize(&mut out);
        self.socket.send(&out, 0)?;
        let mut answers = Vec::new();
        loop {
            let mut buffer = Vec::with_capacity(RECEIVE_BYTES);
            let size = self.socket.recv(&mut buffer, 0)?;
            let mut offset = 0;
            while offset < size {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buffer[offset..])
                    .map_err(|e| io::Error::other(format!("bad rtnetlink reply: {e}")))?;
                let length = reply.header.length as usize;
                if length == 0 {
                    break;
                }
                offset += length;
                if reply.header.sequence_number != self.sequence {
                    continue; // a late answer to an earlier request
                }
                match reply.payload {
                    NetlinkPayload::Error(e) if e.code.is_none() => return Ok(answers),
                    NetlinkPayload::Error(e) => return Err(e.to_io()),
                    NetlinkPayload::Done(_) => return Ok(answers),
                    NetlinkPayload::InnerMessage(inner) => answers.push(inner),
                    _ => {}
                }
            }
        }
    }

    fn index_of(&mut self, name: &str) -> io::Result<u32> {
        let mut query = LinkMessage::default();
        query
            .attributes
            .push(LinkAttribute::IfName(name.to_string()));
        for answer in self.request(RouteNetlinkMessage::GetLink(query), 0)? {
            if let RouteNetlinkMessage::NewLink(link) = answer {
                return Ok(link.header.index);
            }
        }
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no link {name}"),
        ))
    }

    fn set_up(&mut self, index: u32) -> io::Result<()> {
        let mut link = LinkMessage::default();
        link.header.index = index;
        link.header.flags = LinkFlags::Up;
        link.header.change_mask = LinkFlags::Up;
        self.request(RouteNetlinkMessage::SetLink(link), 0)
            .map(drop)
    }

    fn replace_address(&mut self, index: u32, address: Ipv4Addr, prefix_len: u8) -> io::Result<()> {
        let mut message = AddressMessage::default();
        message.header.family = AddressFamily::Inet;
        message.header.prefix_len = prefix_len;
        message.header.index = index;
        message.attributes = vec![
            AddressAttribute::Local(IpAddr::V4(address)),
            AddressAttribute::Address(IpAddr::V4(address)),
        ];
        self.request(
            RouteNetlinkMessage::NewAddress(message),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(drop)
    }
}

/// Makes the veth pair `host_if` (here, with `host_address/prefix_len`, left down) and
/// `peer_if` (moved into the namespace mounted at `netns`).
pub fn add_veth(
    host_if: &str,
    peer_if: &str,
    netns: &Path,
    host_address: Ipv4Addr,
    prefix_len: u8,
) -> io::Result<()> {
    let namespace = File::open(netns).map_err(|e| context(e, &netns.display().to_string()))?;
    let mut nl = Rtnl::open()?;
    let mut peer = LinkMessage::default();
    peer.attributes = vec![
        LinkAttribute::IfName(peer_if.to_string()),
        LinkAttribute::NetNsFd(namespace.as_raw_fd()),
    ];
    let mut link = LinkMessage::default();
    link.attributes = vec![
        LinkAttribute::IfName(host_if.to_string()),
        LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
        ]),
    ];
    nl.request(
        RouteNetlinkMessage::NewLink(link),
        NLM_F_CREATE | NLM_F_EXCL,
    )
    .map_err(|e| context(e, &format!("add veth {host_if}")))?;
    let index = nl.index_of(host_if)?;
    nl.replace_address(index, host_address, prefix_len)
        .map_err(|e| context(e, &format!("address {host_if}")))
}

/// Sets the link `name` (in this namespace) up.
pub fn set_up(name: &str) -> io::Result<()> {
    let mut nl = Rtnl::open()?;
    let index = nl.index_of(name)?;
    nl.set_up(index)
        .map_err(|e| context(e, &format!("set {name} up")))
}

/// Deletes the link `name` (its veth peer goes with it); false if there was none.
pub fn delete(name: &str) -> io::Result<bool> {
    let mut nl = Rtnl::open()?;
    let index = match nl.index_of(name) {
        Ok(index) => index,
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return Ok(false),
        Err(e) => return Err(e),
    };
    let mut link = LinkMessage::default();
    link.header.index = index;
    match nl.request(RouteNetlinkMessage::DelLink(link), 0) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(false),
        Err(e) => Err(context(e, &format!("delete {name}"))),
    }
}

/// Inside the namespace mounted at `netns`: loopback and `ifname` up, `ifname` with
/// `address/prefix_len`, and the default route via `gateway` (each replacing what was).
pub fn configure_inside(
    netns: &Path,
    ifname: &str,
    address: Ipv4Addr,
    prefix_len: u8,
    gateway: Ipv4Addr,
) -> io::Result<()> {
    let namespace = File::open(netns).map_err(|e| context(e, &netns.display().to_string()))?;
    let ifname = ifname.to_string();
    let path: PathBuf = netns.to_path_buf();
    on_own_thread("netns-link", move || -> io::Result<()> {
        setns(&namespace, CloneFlags::CLONE_NEWNET)
            .map_err(|e| context(e.into(), &format!("join {}", path.display())))?;
        let mut nl = Rtnl::open()?;
        let lo = nl.index_of("lo")?;
        nl.set_up(lo)?;
        let index = nl.index_of(&ifname)?;
        nl.replace_address(index, address, prefix_len)
            .map_err(|e| context(e, &format!("address {ifname}")))?;
        nl.set_up(index)
            .map_err(|e| context(e, &format!("set {ifname} up")))?;
        let mut route = RouteMessage::default();
        route.header = RouteHeader {
            address_family: AddressFamily::Inet,
            table: RouteHeader::RT_TABLE_MAIN,
            protocol: RouteProtocol::Boot,
            scope: RouteScope::Universe,
            kind: RouteType::Unicast,
            ..Default::default()
        };
        route.attributes = vec![
            RouteAttribute::Gateway(RouteAddress::Inet(gateway)),
            RouteAttribute::Oif(index),
        ];
        nl.request(
            RouteNetlinkMessage::NewRoute(route),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map_err(|e| context(e, "default route"))
        .map(drop)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netns;

    #[test]
    #[ignore = "needs root; makes a namespace and a veth pair"]
    fn a_link_into_a_namespace_and_back() {
        let dir = std::env::temp_dir().join(format!("links-test-{}", std::process::id()));
        let name = "tt-links-test";
        netns::create(&dir, name).unwrap();
        let ns = dir.join(name);
        let host_if = "ttvlinktest";
        let result = (|| -> io::Result<()> {
            add_veth(host_if, "eth0", &ns, Ipv4Addr::new(10, 254, 254, 1), 30)?;
            // The name is taken now.
            let again = add_veth(host_if, "eth0", &ns, Ipv4Addr::new(10, 254, 254, 1), 30);
            assert_eq!(again.unwrap_err().kind(), io::ErrorKind::AlreadyExists);
            set_up(host_if)?;
            let gateway = Ipv4Addr::new(10, 254, 254, 1);
            configure_inside(&ns, "eth0", Ipv4Addr::new(10, 254, 254, 2), 30, gateway)?;
            // Twice: it replaces, so a restart of the sandbox can run it again.
            configure_inside(&ns, "eth0", Ipv4Addr::new(10, 254, 254, 2), 30, gateway)?;
            let missing = configure_inside(&ns, "eth9", Ipv4Addr::new(10, 0, 0, 1), 30, gateway);
            assert!(missing.is_err());
            Ok(())
        })();
        let deleted = delete(host_if);
        netns::remove(&dir, name).unwrap();
        let _ = nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&dir);
        result.unwrap();
        assert!(deleted.unwrap());
        assert!(!delete(host_if).unwrap());
    }
}
