"""Themis (versioned policy documents) and the Judges (Rhadamanthus, Minos, plugins)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import anyio.lowlevel
import msgspec
import pytest

from tartarus.api.types import CreateSandboxRequest
from tartarus.auth.principal import AuthMethod, Principal
from tartarus.auth.rbac import default_roles
from tartarus.errors import AdmissionDeniedError, ConfigError
from tartarus.node.admission import AdmitAll, TemplateDefaults
from tartarus.node.store import SandboxRecord
from tartarus.policy.audit_log import AuditLog
from tartarus.policy.documents import PolicyError, PolicySpec
from tartarus.policy.judges import Judges, load_plugins, with_template_defaults
from tartarus.policy.store import PolicyStore, VersionConflictError
from tartarus.runtime.types import Backend, Resources, SandboxState
from tests.support.auth import call, make_key
from tests.support.server import running_server, server_env

pytestmark = [pytest.mark.timeout(120), pytest.mark.anyio]

GLOBAL = """
name: global
description: the baseline
spec:
  resources: {max_sandboxes: 10, max_vcpus: 8, max_memory_mib: 4096, per_template: {big: 1}}
  network: {allow: false}
  templates:
    allowed: ["base", "python*", "big"]
    defaults:
      python: {resources: {memory_mib: 1024}, timeout_s: 900}
  security: {backends: [gvisor, jail], allow_trusted: false, allow_untrusted_jail: false}
  audit: {tags: [soc2]}
"""
ACME = """
name: acme
tenant: acme
spec:
  resources: {max_sandboxes: 3}
  network: {allow: true}
  templates:
    defaults:
      python: {resources: {memory_mib: 2048}}
"""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def principal(tenant: str = "acme", roles: tuple[str, ...] = ("developer",)) -> Principal:
    return Principal(
        subject=f"key:{tenant}",
        tenant=tenant,
        roles=roles,
        grants=default_roles().grants(roles),
        method=AuthMethod.API_KEY,
    )


def create(**fields: object) -> CreateSandboxRequest:
    return msgspec.convert(fields, CreateSandboxRequest)


def test_versions_conflicts_rollback_diff_delete(tmp_path: Path) -> None:
    store = PolicyStore(tmp_path / "policy.db")
    v1 = store.apply(GLOBAL, author="op", if_version=0)
    assert v1.version == 1
    with pytest.raises(VersionConflictError, match="at version 1, not 0"):
        store.apply(GLOBAL, author="op", if_version=0)
    v2 = store.apply(
        GLOBAL.replace("max_sandboxes: 10", "max_sandboxes: 20"), author="op", if_version=1
    )
    assert store.effective("x").spec.resources.max_sandboxes == 20
    diff = store.diff("global", 1, 2)
    assert "-    max_sandboxes: 10" in diff and "+    max_sandboxes: 20" in diff
    v3 = store.rollback("global", 1, author="op", if_version=v2.version)
    assert v3.version == 3 and v3.comment == "rollback to version 1"
    assert store.effective("x").spec.resources.max_sandboxes == 10
    store.delete("global", author="op")
    assert store.effective("x").spec == PolicySpec()
    assert [v.version for v in store.history("global")] == [1, 2, 3, 4]
    store.rollback("global", 3, author="op")
    assert store.effective("x").spec.resources.max_sandboxes == 10


def test_tenant_overrides_merge_over_the_global_policy(tmp_path: Path) -> None:
    store = PolicyStore(tmp_path / "policy.db")
    store.apply(GLOBAL, author="op")
    store.apply(ACME, author="op")
    acme, other = store.effective("acme"), store.effective("globex")
    assert acme.spec.resources.max_sandboxes == 3 and other.spec.resources.max_sandboxes == 10
    assert acme.spec.resources.max_vcpus == 8  # inherited
    assert acme.spec.network.allow and not other.spec.network.allow
    assert acme.spec.templates.defaults["python"].resources.memory_mib == 2048
    assert acme.spec.templates.defaults["python"].timeout_s == 900  # merged key by key
    assert acme.versions == {"global": 1, "acme": 1}
    with pytest.raises(PolicyError, match="already covers tenant 'acme'"):
        store.apply(ACME.replace("name: acme", "name: acme-2"), author="op")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: x\nspec: {resources: {max_sandbox: 3}}", "max_sandbox"),
        ("name: x\nspec: {security: {backends: [docker]}}", "docker"),
        ("name: BAD NAME\n", "name"),
        ("name: x\ntenant: ../etc\n", "tenant"),
        ("name: x\nspec: [1, 2]", "spec"),
        (": not yaml : [", "YAML"),
        ("name: x\nspec: {enforcement: {on_timeout: explode}}", "explode"),
    ],
)
def test_invalid_documents_are_refused(tmp_path: Path, text: str, message: str) -> None:
    store = PolicyStore(tmp_path / "policy.db")
    with pytest.raises(PolicyError, match=message):
        store.apply(text, author="op")
    assert store.documents() == []


def test_template_defaults_fill_only_what_the_request_left_alone() -> None:
    spec = msgspec.convert(
        {
            "templates": {
                "defaults": {
                    "python": {
                        "resources": {"memory_mib": 1024, "vcpus": 2},
                        "timeout_s": 900,
                        "backend": "gvisor",
                    }
                }
            }
        },
        PolicySpec,
    )
    filled = with_template_defaults(spec, create(template="python"))
    assert filled.resources.memory_mib == 1024 and filled.resources.vcpus == 2
    assert filled.timeout_s == 900 and filled.backend is Backend.GVISOR
    own = with_template_defaults(
        spec, create(template="python", resources={"memory_mib": 256}, backend="jail")
    )
    assert own.resources.memory_mib == 256 and own.resources.vcpus == 2
    assert own.backend is Backend.JAIL
    # No defaults for the template: the server's.
    base = with_template_defaults(spec, create(template="base"))
    assert base.resources.to_runtime() == Resources() and base.timeout_s == 300
    assert base.backend is Backend.AUTO
    # What the request sets is kept, even where it equals the server's default.
    explicit = with_template_defaults(
        spec, create(template="python", resources={"memory_mib": 512}, timeout_s=300)
    )
    assert explicit.resources.memory_mib == 512 and explicit.timeout_s == 300


def judges_with(tmp_path: Path, *docs: str) -> Judges:
    store = PolicyStore(tmp_path / "policy.db")
    for doc in docs:
        store.apply(doc, author="op")
    return Judges(policies=store, audit=AuditLog(tmp_path / "audit.db"))


async def refusal(
    judges: Judges,
    who: Principal,
    request: CreateSandboxRequest,
    defaults: TemplateDefaults | None = None,
) -> AdmissionDeniedError:
    with pytest.raises(AdmissionDeniedError) as caught:
        await judges.admit(who, request, defaults)
    return caught.value


async def test_rhadamanthus_rules(tmp_path: Path) -> None:
    judges = judges_with(tmp_path, GLOBAL)
    who = principal("globex")
    cases = {
        "template 'ubuntu' is not allowed": create(template="ubuntu"),
        "backend microvm is not allowed": create(backend="microvm"),
        "may not have a network": create(network=True),
        "trust=trusted is not allowed": create(trust="trusted"),
        "may not run on the jail backend": create(backend="jail"),
        "secret reference 'env:HOME'": create(secrets={"H": "env:HOME"}),
    }
    for reason, request in cases.items():
        e = await refusal(judges, who, request)
        assert e.status == 403 and e.slug == "admission-denied" and reason in e.detail, e.detail
    admitted = await judges.admit(who, create(template="python3.12", backend="gvisor"))
    assert admitted.request.template == "python3.12"
    # Operators may reference the server's own environment; tenants may not.
    operator = principal("globex", ("admin",))
    await judges.admit(operator, create(secrets={"H": "env:HOME"}))
    # Every decision is in the audit log with its verdicts and the tenant's tags.
    entries = [e for e, _ in judges.audit.entries(limit=1000)[0]]  # type: ignore[union-attr]
    assert [e.outcome for e in entries].count("denied") == len(cases)
    assert all(e.tags == ["soc2"] for e in entries)
    assert {v["judge"] for v in entries[-1].verdicts} == {"rhadamanthus", "minos"}


async def test_untrusted_jail_with_network_is_refused_even_when_jail_is_allowed(
    tmp_path: Path,
) -> None:
    judges = judges_with(tmp_path)  # defaults: permissive, but not this combination
    e = await refusal(judges, principal(), create(backend="jail", network=True))
    assert "too dangerous" in e.detail
    await judges.admit(principal(), create(backend="jail"))
    await judges.admit(principal(), create(backend="jail", network=True, trust="trusted"))


async def test_minos_holds_under_50_concurrent_admissions(tmp_path: Path) -> None:
    judges = judges_with(tmp_path, GLOBAL, ACME)  # acme may hold 3 sandboxes
    admitted: list[object] = []
    refused: list[AdmissionDeniedError] = []

    async def one(i: int) -> None:
        await anyio.lowlevel.checkpoint()
        try:
            admitted.append(await judges.admit(principal(), create(template="base")))
        except AdmissionDeniedError as e:
            refused.append(e)

    async with anyio.create_task_group() as tg:
        for i in range(50):
            tg.start_soon(one, i)
    assert len(admitted) == 3 and len(refused) == 47
    assert all(e.status == 429 and "3 of its 3" in e.detail for e in refused)
    # A failed creation gives its share back; so does a sandbox that ends.
    first, second = admitted[0], admitted[1]
    first.release()  # type: ignore[attr-defined]
    record = SandboxRecord(
        id="sb-1",
        template="base",
        backend=Backend.GVISOR,
        state=SandboxState.RUNNING,
        created_at=0.0,
        tenant="acme",
    )
    second.bind(record, sandbox=None)  # type: ignore[attr-defined]
    judges.ended(record)
    await judges.admit(principal(), create())
    await judges.admit(principal(), create())
    await refusal(judges, principal(), create())


async def test_minos_cpu_memory_and_per_template_limits(tmp_path: Path) -> None:
    judges = judges_with(tmp_path, GLOBAL)
    who = principal("globex")
    await judges.admit(who, create(resources={"vcpus": 6}))
    e = await refusal(judges, who, create(resources={"vcpus": 3}))
    assert e.status == 429 and "vCPUs" in e.detail
    await judges.admit(who, create(resources={"vcpus": 1, "memory_mib": 3000}))
    e = await refusal(judges, who, create(resources={"vcpus": 1, "memory_mib": 600}))
    assert "MiB of memory" in e.detail
    await judges.admit(who, create(template="big", resources={"vcpus": 0.5, "memory_mib": 64}))
    e = await refusal(
        judges, who, create(template="big", resources={"vcpus": 0.1, "memory_mib": 16})
    )
    assert "template 'big'" in e.detail
    # Quotas are per tenant.
    await judges.admit(principal("acme"), create(resources={"vcpus": 6}))


async def test_a_templates_own_defaults_count_in_admission(tmp_path: Path) -> None:
    """The template's own resources and timeout are filled in before the judges sit
    (after the policy's defaults for it), so quotas judge what the sandbox will get."""
    judges = judges_with(tmp_path, GLOBAL)
    big = TemplateDefaults(
        resources=Resources(vcpus=1, memory_mib=3000, disk_mib=256, pids=128), timeout_s=60
    )
    who = principal("globex")
    admitted = await judges.admit(who, create(), big)
    assert admitted.request.resources.memory_mib == 3000 and admitted.request.timeout_s == 60
    # 3000 MiB are held now: a second one would pass 4096 (with the API's 512 it would not).
    e = await refusal(judges, who, create(), big)
    assert e.status == 429 and "MiB of memory" in e.detail
    # The request's own numbers win; so do the policy's defaults for the template.
    mine = await judges.admit(principal("hooli"), create(resources={"memory_mib": 100}), big)
    assert mine.request.resources.memory_mib == 100 and mine.request.resources.disk_mib == 256
    python = await judges.admit(principal("initech"), create(template="python"), big)
    assert python.request.resources.memory_mib == 1024 and python.request.timeout_s == 900
    assert python.request.resources.pids == 128
    # Without judges the template's defaults still apply.
    plain = await AdmitAll().admit(who, create(), big)
    assert plain.request.resources.memory_mib == 3000 and plain.request.timeout_s == 60


def write_plugin(root: Path, body: str, name: str = "veto") -> None:
    """An installed distribution with a `tartarus.judges` entry point (dist-info on
    sys.path is how importlib.metadata finds installed packages)."""
    (root / f"{name}_judge.py").write_text(textwrap.dedent(body))
    info = root / f"{name}_judge-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}-judge\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[tartarus.judges]\n{name} = {name}_judge:Veto\n")


PLUGIN = """
from tartarus.policy.verdicts import Verdict

class Veto:
    name = "veto"

    async def judge(self, request):
        if request.request.metadata.get("team") == "red":
            return Verdict(judge=self.name, allowed=False, reason="the red team is on hold")
        return Verdict(judge=self.name, allowed=True, reason="fine")
"""


async def test_plugin_judges_from_entry_points(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_plugin(tmp_path, PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins = load_plugins()
    assert [p.name for p in plugins] == ["veto"]
    judges = Judges(plugins=plugins)
    e = await refusal(judges, principal(), create(metadata={"team": "red"}))
    assert "veto: the red team is on hold" in e.detail
    await judges.admit(principal(), create(metadata={"team": "blue"}))


def test_broken_plugin_stops_the_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_plugin(tmp_path, "raise RuntimeError('boom')\n", name="broken")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="broken"):
        load_plugins()


def test_policy_cli_and_api(tmp_path: Path) -> None:
    policy_file = tmp_path / "global.yaml"
    policy_file.write_text(GLOBAL)
    with running_server(tmp_path / "srv", env=server_env(tmp_path / "srv")) as server:

        def tartarus(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "tartarus", "policy", *args],
                env=dict(server.env, TARTARUS_URL=server.url),
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )

        assert tartarus("diff", str(policy_file)).returncode == 1  # not applied yet
        out = tartarus("apply", str(policy_file), "--if-version", "0", "--json")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["version"] == 1
        assert tartarus("diff", str(policy_file)).returncode == 0
        conflict = tartarus("apply", str(policy_file), "--if-version", "0")
        assert conflict.returncode == 4 and "version 1, not 0" in conflict.stderr
        policy_file.write_text(GLOBAL.replace("max_sandboxes: 10", "max_sandboxes: 12"))
        preview = tartarus("diff", str(policy_file))
        assert "+    max_sandboxes: 12" in preview.stdout
        assert tartarus("apply", str(policy_file), "--comment", "more room").returncode == 0
        listing = json.loads(tartarus("list", "--json").stdout)
        assert [(p["name"], p["version"]) for p in listing] == [("global", 2)]
        assert "max_sandboxes: 10" in tartarus("diff", "global").stdout
        assert tartarus("rollback", "global", "1").returncode == 0
        effective = json.loads(tartarus("effective", "--tenant", "acme", "--json").stdout)
        assert effective["spec"]["resources"]["max_sandboxes"] == 10
        history = json.loads(tartarus("history", "global", "--json").stdout)
        assert [v["comment"] for v in history] == ["", "more room", "rollback to version 1"]
        # What does not exist is 404, not a validation error.
        assert server.json("POST", "/v1/policies/global/rollback", {"version": 99}).status == 404
        assert server.raw("DELETE", "/v1/policies/no-such").status == 404
        bad = tmp_path / "bad.yaml"
        bad.write_text("name: global\nspec: {resources: {max_sandbox: 3}}\n")
        assert tartarus("apply", str(bad)).returncode == 1
        # Tenants see their own effective policy, not the documents.
        _, dev = make_key(server, "acme", ["developer"])
        mine = call(server, dev, "GET", "/v1/policy/effective").json()
        assert mine["tenant"] == "acme" and mine["spec"]["resources"]["max_sandboxes"] == 10
        assert call(server, dev, "GET", "/v1/policy/effective?tenant=globex").status == 404
        assert call(server, dev, "GET", "/v1/policies/global").status == 403
        # The admission path: a request the policy refuses is a 403 with the reason.
        refused = server.json("POST", "/v1/sandboxes", {"template": "ubuntu"})
        assert refused.status == 403 and "rhadamanthus" in refused.json()["detail"]


async def test_admission_hands_the_tenants_egress_to_the_sandbox(tmp_path: Path) -> None:
    """Styx enforces what the judges hand over: the tenant's `network.egress`, or the
    template's own list from `templates.defaults` (tests/test_egress_rules.py)."""
    judges = judges_with(
        tmp_path,
        textwrap.dedent(
            """
            name: acme
            tenant: acme
            spec:
              network: {egress: ["203.0.113.0/24:443"]}
              templates: {defaults: {pip: {egress: ["pypi.org:443"]}}}
            """
        ),
    )
    admitted = await judges.admit(principal("acme"), create(network=True))
    assert admitted.egress == ["203.0.113.0/24:443"]
    admitted = await judges.admit(principal("acme"), create(template="pip", network=True))
    assert admitted.egress == ["pypi.org:443"]
    assert (await judges.admit(principal("globex"), create(network=True))).egress == []
    assert (await AdmitAll().admit(principal("acme"), create(network=True))).egress == []
