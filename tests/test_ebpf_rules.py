"""The eBPF filter's rules: `lpm_rules` turns the ordered, first-match egress rules into
longest-prefix trie entries; for every address and port the trie must give the verdict
the ordered list gives. The kernel side of the same rules runs in
tests/test_sandbox_network.py (every reachability test, with the filter and again with
the nftables fallback)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tartarus.network.ebpf import MAX_RANGES, Ranges, lpm_rules
from tartarus.network.egress import (
    EgressError,
    EgressRules,
    PortRange,
    Rule,
    Verdict,
    compile_rules,
)

POOL = ipaddress.IPv4Network("10.213.0.0/16")
Entries = list[tuple[ipaddress.IPv4Network, Ranges]]


def first_match(rules: EgressRules, address: ipaddress.IPv4Address, port: int) -> Verdict | None:
    """The ordered list's verdict (the nftables chain's order): pools, then the rules."""
    ordered = [Rule(network=str(POOL), verdict=Verdict.DROP), *rules.rules]
    for rule in ordered:
        network = ipaddress.ip_network(rule.network)
        if network.version != 4 or address not in network:
            continue
        if rule.ports is None or (port and rule.ports.first <= port <= rule.ports.last):
            return rule.verdict
    return None


def trie_lookup(entries: Entries, address: ipaddress.IPv4Address, port: int) -> Verdict | None:
    """What the classifier does with the trie (egress.bpf.c): the longest prefix holding
    the address, its ranges in order; port 0 is a packet without ports."""
    found = [(n, r) for n, r in entries if address in n]
    if not found:
        return None
    _, ranges = max(found, key=lambda e: e[0].prefixlen)
    for first, last, accept in ranges:
        if first == 0 or (port and first <= port <= last):
            return Verdict.ACCEPT if accept else Verdict.DROP
    return None


# A small universe of networks, so they nest and overlap often.
networks = st.builds(
    lambda a, prefix: ipaddress.IPv4Network((a, prefix), strict=False),
    st.sampled_from([0x0A000000, 0x0AD50000, 0x0AD50100, 0xC6120000, 0xC6120100, 0xC6120105, 0]),
    st.integers(0, 32),
)
ports = st.one_of(
    st.none(),
    st.builds(
        lambda a, b: PortRange(min(a, b), max(a, b)),
        st.sampled_from([22, 53, 80, 443, 8000, 8100, 65535]),
        st.sampled_from([22, 53, 80, 443, 8000, 8100, 65535]),
    ),
)
rules_strategy = st.lists(
    st.builds(
        lambda n, p, v: Rule(network=str(n), ports=p, verdict=v),
        networks,
        ports,
        st.sampled_from(Verdict),
    ),
    max_size=10,
)
addresses = st.one_of(
    st.builds(
        ipaddress.IPv4Address,
        st.sampled_from([0x0A000001, 0x0AD50001, 0x0AD50105, 0xC6120105, 0xC6120001, 0x08080808]),
    ),
    st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1)),
)


@settings(max_examples=400)
@given(rules_strategy, addresses, st.sampled_from([0, 22, 53, 79, 80, 443, 8050, 65535]))
def test_the_trie_decides_as_the_ordered_list(
    rules: list[Rule], address: ipaddress.IPv4Address, port: int
) -> None:
    compiled = EgressRules(rules=rules, otherwise=Verdict.DROP)
    entries = lpm_rules(compiled, [POOL])
    assert trie_lookup(entries, address, port) == first_match(compiled, address, port)


@pytest.mark.parametrize(
    ("entries", "address", "port", "expected"),
    [
        ([], "8.8.8.8", 443, None),  # falls through to the default (accept)
        ([], "169.254.169.254", 80, Verdict.DROP),
        ([], "10.213.0.6", 9000, Verdict.DROP),  # another sandbox
        (["198.18.0.5:443"], "198.18.0.5", 443, Verdict.ACCEPT),
        (["198.18.0.5:443"], "198.18.0.5", 80, None),  # then the default (drop)
        (["10.1.2.0/24"], "10.1.2.9", 0, Verdict.ACCEPT),  # names a private range
        (["10.1.2.0/24"], "10.1.3.9", 0, Verdict.DROP),
        (["0.0.0.0/0"], "192.168.1.1", 80, Verdict.DROP),  # opens public addresses only
    ],
)
def test_policies_as_written(
    entries: list[str], address: str, port: int, expected: Verdict | None
) -> None:
    compiled = compile_rules(entries, resolve=False)
    trie = lpm_rules(compiled, [POOL])
    assert trie_lookup(trie, ipaddress.IPv4Address(address), port) == expected


def test_ipv6_rules_are_left_to_the_ipv6_drop() -> None:
    compiled = compile_rules(["[2001:db8::/32]:443", "198.18.0.0/15"], resolve=False)
    assert all(n.version == 4 for n, _ in lpm_rules(compiled, [POOL]))


def test_too_many_port_rules_on_one_network_is_a_clear_error() -> None:
    entries = [f"198.18.0.0/15:{port}" for port in range(1000, 1000 + MAX_RANGES + 1)]
    with pytest.raises(EgressError, match=r"198\.18\.0\.0/15: 33 port rules .*nftables"):
        lpm_rules(compile_rules(entries, resolve=False), [POOL])
