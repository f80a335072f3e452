"""The egress rule model (`tartarus.network.egress`): parsing policy entries, the order
of the compiled rules, and where a sandbox's entries come from in a policy; and the
address pool's leases. No root, no kernel."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

from tartarus.network.egress import (
    ALWAYS_DENIED,
    EgressError,
    PortRange,
    Verdict,
    compile_rules,
    parse_entry,
)
from tartarus.network.leases import Pool, PoolExhaustedError
from tartarus.policy.documents import PolicyError, to_spec
from tartarus.policy.judges import egress_for


@pytest.mark.parametrize(
    ("entry", "network", "host", "ports"),
    [
        ("203.0.113.7", "203.0.113.7/32", None, None),
        ("203.0.113.0/24:8000-8100", "203.0.113.0/24", None, PortRange(8000, 8100)),
        ("[2001:db8::/32]:443", "2001:db8::/32", None, PortRange(443, 443)),
        ("2001:db8::/32", "2001:db8::/32", None, None),
        ("PyPI.org.", None, "pypi.org", None),
        ("pypi.org:443", None, "pypi.org", PortRange(443, 443)),
    ],
)
def test_entries_parse(
    entry: str, network: str | None, host: str | None, ports: PortRange | None
) -> None:
    parsed = parse_entry(entry)
    assert (parsed.network, parsed.host, parsed.ports) == (network, host, ports)


@pytest.mark.parametrize(
    "entry", ["10.0.0.300", "x/3", "a:b", "[::1]x", "1.2.3.4:0", "1.2.3.4:9-8", "foo bar", ""]
)
def test_bad_entries_are_refused(entry: str) -> None:
    with pytest.raises(EgressError):
        parse_entry(entry)


def test_an_empty_list_allows_public_destinations_only() -> None:
    rules = compile_rules([])
    assert [r.network for r in rules.rules] == [str(n) for n in ALWAYS_DENIED]
    assert all(r.verdict is Verdict.DROP for r in rules.rules)
    assert rules.otherwise is Verdict.ACCEPT


def test_a_cidr_inside_a_denied_range_opens_it_a_wider_one_does_not() -> None:
    rules = compile_rules(["10.1.2.0/24", "0.0.0.0/0:443", "169.254.169.254/32:80"])
    order = [(r.network, r.verdict) for r in rules.rules]
    first_drop = next(i for i, (_, v) in enumerate(order) if v is Verdict.DROP)
    assert order[:first_drop] == [
        ("10.1.2.0/24", Verdict.ACCEPT),
        ("169.254.169.254/32", Verdict.ACCEPT),
    ]
    assert order[-1] == ("0.0.0.0/0", Verdict.ACCEPT)
    assert rules.rules[-1].ports == PortRange(443, 443)
    assert rules.otherwise is Verdict.DROP


def test_a_name_never_opens_a_denied_range() -> None:
    rules = compile_rules(["localhost:80"])
    accepted = [r for r in rules.rules if r.verdict is Verdict.ACCEPT]
    assert accepted and all(rules.rules.index(r) > len(ALWAYS_DENIED) - 1 for r in accepted)


def test_an_unresolved_name_allows_nothing() -> None:
    rules = compile_rules(["pypi.org"], resolve=False)
    assert all(r.verdict is Verdict.DROP for r in rules.rules)
    assert rules.otherwise is Verdict.DROP


def test_policy_validates_entries_and_templates_override() -> None:
    with pytest.raises(PolicyError, match="not an address"):
        to_spec({"network": {"egress": ["not a host"]}}, "test")
    with pytest.raises(PolicyError, match="ports"):
        to_spec({"templates": {"defaults": {"py": {"egress": ["1.2.3.4:0"]}}}}, "test")
    spec = to_spec(
        {
            "network": {"egress": ["203.0.113.0/24"]},
            "templates": {"defaults": {"py": {"egress": ["pypi.org:443"]}, "go": {}}},
        },
        "test",
    )
    assert egress_for(spec, "py") == ["pypi.org:443"]
    assert egress_for(spec, "go") == ["203.0.113.0/24"]
    assert egress_for(spec, "other") == ["203.0.113.0/24"]


def test_the_pool_leases_each_link_once_and_gives_it_back(tmp_path: Path) -> None:
    pool = Pool(ipaddress.IPv4Network("10.9.0.0/29"), tmp_path / "leases")
    first = pool.take("s1", "a", "tt-s1-a", "ttv")
    second = pool.take("s1", "b", "tt-s1-b", "ttv")
    assert (first.host_if, first.host_address, first.sandbox_address) == (
        "ttv0",
        "10.9.0.1",
        "10.9.0.2",
    )
    assert (second.host_address, second.sandbox_address) == ("10.9.0.5", "10.9.0.6")
    with pytest.raises(PoolExhaustedError, match="all 2 sandbox links"):
        pool.take("s1", "c", "tt-s1-c", "ttv")
    assert sorted(lease.sandbox_id for lease in pool.leases()) == ["a", "b"]
    pool.give_back(first)
    assert pool.take("s2", "d", "tt-s2-d", "ttv").index == 0


def test_lease_files_a_crash_left_empty_are_dropped(tmp_path: Path) -> None:
    pool = Pool(ipaddress.IPv4Network("10.9.0.0/29"), tmp_path / "leases")
    kept = pool.take("s1", "a", "tt-s1-a", "ttv")
    (pool.dir / "1").touch()
    assert pool.drop_unwritten(60.0) == []  # too young: maybe being written
    old = 1_000_000_000.0
    os.utime(pool.dir / "1", (old, old))
    os.utime(pool.dir / "0", (old, old))
    assert pool.drop_unwritten(60.0) == [1]
    assert [lease.index for lease in pool.leases()] == [kept.index]


def test_giving_back_a_lease_leaves_a_newer_one_alone(tmp_path: Path) -> None:
    pool = Pool(ipaddress.IPv4Network("10.9.0.0/29"), tmp_path / "leases")
    old = pool.take("s1", "a", "tt-s1-a", "ttv")
    pool.give_back(old)
    new = pool.take("s2", "b", "tt-s2-b", "ttv")
    assert new.index == old.index
    pool.give_back(old)  # late, from whoever held the old one: the new one stays
    assert list(pool.leases()) == [new]
    assert not pool.aged(new, 60.0)


def test_names_and_wildcards_become_name_rules() -> None:
    rules = compile_rules(["*.pythonhosted.org:443", "pypi.org"], resolve=False)
    assert [(n.pattern, n.ports) for n in rules.names] == [
        ("*.pythonhosted.org", PortRange(443, 443)),
        ("pypi.org", None),
    ]
    assert not rules.any_name
    assert compile_rules([]).any_name
    with pytest.raises(EgressError):
        parse_entry("*.")
    with pytest.raises(EgressError):
        parse_entry("a.*.org")
