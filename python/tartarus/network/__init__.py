"""Styx: the sandboxes' network. Every jail and gVisor sandbox lives in its own network
namespace; one granted a network gets a routed veth link to the host, an address from
the pool, NAT out of the host, and an egress policy enforced in the kernel.

- `egress`: the rule model (what a sandbox may reach) and the `EgressEnforcer`
  interface its enforcers implement;
- `nftables`: the enforcer on nftables (one `tartarus` table);
- `leases`: the host-wide address pool (one lease file per link);
- `namespaces`: the lifecycle of each sandbox's namespace, link and rules;
- `drops`: dropped packets as metrics and policy-violation events.
"""
