"""The long soak and chaos run (tests/support/soak.py): thousands of sandboxes through a
real server on the jail and gVisor at many concurrent clients, each fault once while
loaded. Throughput, p50/p99 per step, errors by kind, what was lost and what leaked.

    python -m benches.bench_soak                      # 2000 sandboxes, 32 clients
    python -m benches.bench_soak --sandboxes 200 --concurrency 8
    python -m benches.bench_soak --fleet --sandboxes 300 --concurrency 16
    python -m benches.bench_soak --minutes 30 --concurrency 32   # the 30-minute run

`--fleet`: a durable Redis, two API servers and three node agents on this host (the jail
and gVisor), with kill -9 of Redis, of an API server and of a node agent
(tests/support/fleet_soak.py); writes benches/results/soak-fleet.json.

Root only. Writes benches/results/soak.json (soak-30min.json for `--minutes 30`). The
peer is the same run without faults (`--no-faults`), which the ratio compares
throughput with when both are asked for (`--with-peer`).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import anyio
import msgspec
from tests.support.fleet_soak import FLEET_FAULTS, fleet_soak
from tests.support.server import sandbox_base
from tests.support.soak import FAULTS, SoakPlan, SoakReport, soak

from benches.harness import write_result
from tartarus.config import load_settings
from tartarus.host.doctor import run_doctor


def _run(plan: SoakPlan, *, fleet: bool = False) -> SoakReport:
    with sandbox_base() as base:
        return anyio.run(fleet_soak if fleet else soak, plan, base)


def _without_faults(plan: SoakPlan) -> SoakPlan:
    return dataclasses.replace(plan, faults=())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sandboxes", type=int, default=2000)
    parser.add_argument(
        "--minutes", type=float, default=0.0, help="run this long instead (faults spread over it)"
    )
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--no-faults", action="store_true")
    parser.add_argument("--with-peer", action="store_true", help="also run without faults")
    parser.add_argument("--fleet", action="store_true", help="on a fleet of this host's own")
    args = parser.parse_args()
    doctor = run_doctor(load_settings())
    wanted = ("jail", "gvisor")
    backends = tuple(b for b in wanted if doctor.backend(b).available)
    if not backends:
        raise SystemExit(f"{' nor '.join(wanted)} cannot run here (tartarus doctor)")
    faults = () if args.no_faults else FLEET_FAULTS if args.fleet else FAULTS
    plan = SoakPlan(
        sandboxes=args.sandboxes,
        concurrency=args.concurrency,
        backends=backends,
        faults=faults,
        max_sandboxes=args.concurrency * 2,
        networked_every=0 if args.fleet else 4,
        minutes=args.minutes,
    )
    report = _run(plan, fleet=args.fleet)
    result: dict[str, Any] = {"run": msgspec.to_builtins(report)}
    print(
        f"{report.plan['sandboxes']} sandboxes at {plan.concurrency} clients on "
        f"{', '.join(backends)} in {report.seconds:.0f} s: "
        f"{report.sandboxes_per_s}/s; errors {report.errors or 'none'}; lost "
        f"{len(report.lost)}; leaks {sum(len(v) for v in report.leaks.values())}"
    )
    if report.server_errors:
        print(f"  the servers' unhandled errors: {report.server_errors}")
    for step, stats in report.steps.items():
        print(f"  {step}: p50 {stats.p50_ms} ms, p99 {stats.p99_ms} ms ({stats.count})")
    if args.with_peer and faults:
        peer = _run(_without_faults(plan), fleet=args.fleet)
        result["without_faults"] = msgspec.to_builtins(peer)
        ratio = round(report.sandboxes_per_s / peer.sandboxes_per_s, 3)
        result["throughput_ratio_faults_to_none"] = ratio
        print(f"throughput with faults / without: {ratio}")
    name = "soak-fleet" if args.fleet else "soak"
    path = write_result(name + (f"-{args.minutes:g}min" if args.minutes else ""), result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
