// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//
// Styx's egress filter: a tc (clsact ingress) program on the host end of every sandbox
// link, so it sees each frame a sandbox sends, whichever backend sent it (a jail's
// sockets, gVisor's netstack, a microVM's TAP). Userspace (`tartarus-host::egress`) fills
// the maps; this file only decides and counts.
//
// Decision for one frame from link `ifindex` (first that applies):
//   no tt_links entry              -> drop (attached but not configured: fail closed)
//   ARP                            -> pass (the sandbox must find its gateway)
//   IPv6 to link-local multicast   -> drop, not counted (the sandbox's kernel sends these)
//   not IPv4, or IPv4 with options -> drop, denied (sandboxes are IPv4 only; no source
//                                     routes)
//   source != the sandbox address  -> drop, spoofed
//   to the host itself (FIB says not forwarded) -> pass only the resolver's port 53 and
//                                    TCP segments with ACK (nftables passes them only
//                                    when conntrack knows their connection)
//   tt_rules (LPM on ifindex+daddr): its port ranges in order, first match decides
//   tt_named (ifindex+daddr): a resolver answer still within its TTL, on its ports
//   otherwise                      -> the link's default
//
// A port range whose first port is 0 matches every packet (any protocol); otherwise it
// matches TCP and UDP destination ports in [first, last]. Dual-licensed so the kernel
// lets it call bpf_fib_lookup (a GPL-only helper).

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>

#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int(*name)[val]
#define __type(name, val) typeof(val) *name
#define LIBBPF_PIN_BY_NAME 1

#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define be16(x) __builtin_bswap16(x)
#else
#define be16(x) (x)
#endif

static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)BPF_FUNC_map_lookup_elem;
static long (*bpf_skb_load_bytes)(const void *skb, __u32 offset, void *to, __u32 len) =
	(void *)BPF_FUNC_skb_load_bytes;
static long (*bpf_fib_lookup)(void *ctx, struct bpf_fib_lookup *params, int plen, __u32 flags) =
	(void *)BPF_FUNC_fib_lookup;
static __u64 (*bpf_ktime_get_ns)(void) = (void *)BPF_FUNC_ktime_get_ns;

// Keep in step with rust/host/src/egress.rs.
#define MAX_RANGES 32
#define MAX_NAMED 8

struct link {
	__be32 saddr;
	__be32 resolver; // 0: none
	__u32 accept_otherwise;
	char ifname[16];
};

struct range {
	__u16 first;
	__u16 last;
};

struct rule_key {
	__u32 prefixlen; // 32 (the ifindex) + the network's prefix
	__u32 ifindex;
	__be32 addr;
};

struct rule {
	__u32 count;
	__u32 accept; // bit i: range i accepts (else it drops)
	struct range ranges[MAX_RANGES];
};

struct named_key {
	__u32 ifindex;
	__be32 addr;
};

struct named_range {
	__u16 first;
	__u16 last;
	__u32 pad;
	__u64 expires_ns; // CLOCK_MONOTONIC
};

struct named {
	__u32 count;
	__u32 pad;
	struct named_range ranges[MAX_NAMED];
};

struct drops {
	__u64 denied;
	__u64 spoofed;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, struct link);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tt_links SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 262144);
	__type(key, struct rule_key);
	__type(value, struct rule);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tt_rules SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__type(key, struct named_key);
	__type(value, struct named);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tt_named SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, struct drops);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tt_drops SEC(".maps");

static __always_inline int drop(__u32 ifindex, int spoofed)
{
	struct drops *d = bpf_map_lookup_elem(&tt_drops, &ifindex);
	if (d) {
		if (spoofed)
			__sync_fetch_and_add(&d->spoofed, 1);
		else
			__sync_fetch_and_add(&d->denied, 1);
	}
	return TC_ACT_SHOT;
}

static __always_inline int in_range(__u16 first, __u16 last, __u16 dport)
{
	return first == 0 || (dport != 0 && first <= dport && dport <= last);
}

SEC("classifier")
int tt_egress(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ingress_ifindex;
	struct link *link = bpf_map_lookup_elem(&tt_links, &ifindex);
	if (!link)
		return TC_ACT_SHOT;

	__u16 proto = skb->protocol;
	if (proto == be16(ETH_P_ARP))
		return TC_ACT_OK;
	if (proto == be16(ETH_P_IPV6)) {
		// The sandbox's own kernel (or netstack) solicits routers and joins multicast
		// groups on its link (ff02::/16) by itself: dropped, not counted as its doing.
		__u8 dst[2];
		if (bpf_skb_load_bytes(skb, ETH_HLEN + 24, dst, sizeof(dst)) == 0 && dst[0] == 0xff &&
		    (dst[1] & 0x0f) == 0x02)
			return TC_ACT_SHOT;
	}
	if (proto != be16(ETH_P_IP))
		return drop(ifindex, 0);

	struct iphdr ip;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
		return drop(ifindex, 0);
	// No IP options: a source route would send a packet addressed to the host on to
	// somewhere else, past everything below.
	if (ip.version != 4 || ip.ihl != 5)
		return drop(ifindex, 0);
	if (ip.saddr != link->saddr)
		return drop(ifindex, 1);

	// Destination port of TCP and UDP (0 for other protocols), and whether a TCP segment
	// carries an ACK (it answers something). A later fragment carries no ports: it is
	// judged by the first range of its destination whatever the port (its first
	// fragment was judged by its port, and without it nothing can be reassembled).
	__u16 dport = 0;
	int acks = 0;
	int later_fragment = (ip.frag_off & be16(0x1fff)) != 0;
	if (!later_fragment && ip.protocol == IPPROTO_TCP) {
		__u8 head[14];
		if (bpf_skb_load_bytes(skb, ETH_HLEN + sizeof(ip), head, sizeof(head)) < 0)
			return drop(ifindex, 0);
		dport = ((__u16)head[2] << 8) | head[3];
		acks = (head[13] & 0x10) != 0;
	} else if (!later_fragment && ip.protocol == IPPROTO_UDP) {
		__u8 head[4];
		if (bpf_skb_load_bytes(skb, ETH_HLEN + sizeof(ip), head, sizeof(head)) < 0)
			return drop(ifindex, 0);
		dport = ((__u16)head[2] << 8) | head[3];
	}

	struct bpf_fib_lookup fib = {};
	fib.family = 2; // AF_INET
	fib.ifindex = ifindex;
	fib.l4_protocol = ip.protocol;
	fib.tot_len = be16(ip.tot_len);
	fib.tos = ip.tos;
	fib.ipv4_src = ip.saddr;
	fib.ipv4_dst = ip.daddr;
	long found = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (found < 0)
		return drop(ifindex, 0);
	if (found == BPF_FIB_LKUP_RET_NOT_FWDED || found == BPF_FIB_LKUP_RET_FWD_DISABLED) {
		// For the host itself (any of its addresses), or broadcast and multicast: the
		// resolver, and TCP answers to connections the host opened, which nftables'
		// conntrack then lets in only if they belong to one.
		if (link->resolver && ip.daddr == link->resolver && dport == 53)
			return TC_ACT_OK;
		if (acks)
			return TC_ACT_OK;
		return drop(ifindex, 0);
	}

	struct rule_key key = {.prefixlen = 64, .ifindex = ifindex, .addr = ip.daddr};
	struct rule *rule = bpf_map_lookup_elem(&tt_rules, &key);
	if (rule) {
		for (int i = 0; i < MAX_RANGES; i++) {
			if (i >= rule->count)
				break;
			if (later_fragment ||
			    in_range(rule->ranges[i].first, rule->ranges[i].last, dport))
				return (rule->accept >> i) & 1 ? TC_ACT_OK : drop(ifindex, 0);
		}
	}

	struct named_key nkey = {.ifindex = ifindex, .addr = ip.daddr};
	struct named *named = bpf_map_lookup_elem(&tt_named, &nkey);
	if (named) {
		__u64 now = bpf_ktime_get_ns();
		for (int i = 0; i < MAX_NAMED; i++) {
			if (i >= named->count)
				break;
			struct named_range *r = &named->ranges[i];
			if (r->expires_ns > now &&
			    (later_fragment || in_range(r->first, r->last, dport)))
				return TC_ACT_OK;
		}
	}

	return link->accept_otherwise ? TC_ACT_OK : drop(ifindex, 0);
}

char _license[] SEC("license") = "GPL";
