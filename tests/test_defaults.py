"""Defaults of a create request: unset is explicit (absent on the wire), a value the
caller sets is kept whatever it is, and what is unset comes from the first layer that
sets it, in the order docs/policy.md documents (request, policy, template, server)."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from tartarus import Sandbox
from tartarus.api.sandbox import OnTimeout
from tartarus.api.snapshots import RestoreBody
from tartarus.api.types import CreateSandboxRequest, ResourcesBody, SandboxInfo
from tartarus.auth.principal import AuthMethod, Principal
from tartarus.auth.rbac import default_roles
from tartarus.config import Settings
from tartarus.images import TemplateStore
from tartarus.images.errors import TemplateDefinitionError
from tartarus.images.template import load_template
from tartarus.node import defaults
from tartarus.node.admission import AdmitAll, TemplateDefaults
from tartarus.node.provider import HostRuntimes
from tartarus.runtime.types import Resources
from tests.conftest import REPO_ROOT
from tests.support.auth import call, make_key
from tests.support.server import Server, require_backend, running_server

pytestmark = [pytest.mark.timeout(300), pytest.mark.anyio]

# What each layer sets when it sets something: all different from each other, and the
# request's are the server's own numbers (an explicit 512 MiB / 300 s must stay).
VALUES = {
    "request": (512, 300.0),
    "policy": (2048, 900.0),
    "template": (128, 60.0),
    "server": (512, 300.0),
}


CALLER = Principal(
    subject="t",
    tenant="default",
    roles=("developer",),
    grants=default_roles().grants(("developer",)),
    method=AuthMethod.API_KEY,
)


def documented_order() -> list[str]:
    """The layers in the order docs/policy.md's "Defaults" table lists them."""
    text = (REPO_ROOT / "docs" / "policy.md").read_text()
    section = text.split("### Defaults", 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\|\s*(\d+)\s*\|\s*(\w+)\s*\|", section, re.MULTILINE)
    assert rows, "docs/policy.md has no table of default layers"
    return [name for _, name in sorted(rows, key=lambda row: int(row[0]))]


def test_the_documented_order_is_the_codes() -> None:
    assert documented_order() == list(defaults.ORDER)


LAYERS = ("request", "policy", "template")
CASES = [
    frozenset(chosen)
    for n in range(len(LAYERS) + 1)
    for chosen in itertools.combinations(LAYERS, n)
]


@pytest.mark.parametrize("setting", CASES, ids=lambda s: "+".join(sorted(s)) or "none")
def test_each_unset_field_takes_the_first_layer_that_sets_it(setting: frozenset[str]) -> None:
    def layer(name: str) -> defaults.Layer | None:
        if name not in setting:
            return None
        memory, timeout = VALUES[name]
        return defaults.Layer(memory_mib=memory, timeout_s=timeout)

    request = CreateSandboxRequest()
    if "request" in setting:
        memory, timeout = VALUES["request"]
        request = CreateSandboxRequest(
            resources=ResourcesBody(memory_mib=memory), timeout_s=timeout
        )
    resolved = defaults.resolve(request, policy=layer("policy"), template=layer("template"))
    winner = next(name for name in documented_order() if name in setting or name == "server")
    assert (resolved.resources.memory_mib, resolved.timeout_s) == VALUES[winner]
    # The fields no layer but the server sets come from the server.
    assert resolved.resources.to_runtime().pids == Resources().pids


def test_unset_is_absent_on_the_wire() -> None:
    assert msgspec.json.encode(CreateSandboxRequest()) == b'{"resources":{}}'
    assert msgspec.json.encode(RestoreBody()) == b"{}"
    sent = CreateSandboxRequest(resources=ResourcesBody(memory_mib=512), timeout_s=300)
    assert msgspec.json.decode(msgspec.json.encode(sent)) == {
        "resources": {"memory_mib": 512},
        "timeout_s": 300.0,
    }
    decoded = msgspec.json.decode(b'{"resources": {"vcpus": null}}', type=CreateSandboxRequest)
    assert decoded.resources.vcpus is None and decoded.timeout_s is None


async def test_a_template_snapshot_without_resources_gets_the_servers() -> None:
    assert defaults.resources(None) == Resources()
    assert defaults.resources(ResourcesBody(pids=64)) == Resources(pids=64)
    plain = await AdmitAll().admit(
        CALLER,
        CreateSandboxRequest(resources=ResourcesBody(memory_mib=512)),
        TemplateDefaults(resources=Resources(memory_mib=128, pids=64), timeout_s=60),
    )
    assert plain.request.resources.to_runtime() == Resources(memory_mib=512, pids=64)
    assert plain.request.timeout_s == 60


async def test_a_templates_lifecycle_applies_unless_the_request_says() -> None:
    lazy = TemplateDefaults(
        resources=Resources(), timeout_s=60, on_timeout=OnTimeout.PAUSE, auto_pause_after_s=30
    )
    unset = (await AdmitAll().admit(CALLER, CreateSandboxRequest(), lazy)).request
    assert (unset.on_timeout, unset.auto_pause_after_s) == (OnTimeout.PAUSE, 30)
    mine = CreateSandboxRequest(on_timeout=OnTimeout.KILL, auto_pause_after_s=5)
    asked = (await AdmitAll().admit(CALLER, mine, lazy)).request
    assert (asked.on_timeout, asked.auto_pause_after_s) == (OnTimeout.KILL, 5)
    plain = TemplateDefaults(resources=Resources(), timeout_s=60)
    bare = (await AdmitAll().admit(CALLER, CreateSandboxRequest(), plain)).request
    assert (bare.on_timeout, bare.auto_pause_after_s) == (OnTimeout.KILL, None)


LAZY = """
id: lazy
base: {kind: debian, suite: bookworm, variant: none}
packages: [busybox-static]
on_timeout: pause
auto_pause_after_s: 30
stop_grace_s: 5
"""


def test_a_template_file_says_what_its_sandboxes_timeout_and_idleness_do(
    tmp_path: Path,
) -> None:
    settings = Settings(state_dir=tmp_path / "state", runtime_dir=tmp_path / "run")
    path = tmp_path / "lazy.yaml"
    path.write_text(LAZY)
    TemplateStore(settings).register(path)
    found = HostRuntimes(settings).defaults_for(CreateSandboxRequest(template="lazy"))
    assert found is not None
    assert (found.on_timeout, found.auto_pause_after_s) == (OnTimeout.PAUSE, 30)
    assert found.stop_grace_s == 5
    for bad, message in [
        ("on_timeout: explode", "on_timeout"),
        ("auto_pause_after_s: 0", "auto_pause_after_s must be between 1 and"),
        ("auto_pause_after_s: 100000", "auto_pause_after_s must be between 1 and"),
        ("stop_grace_s: -1", "stop_grace_s must be between 0 and 300"),
    ]:
        path.write_text(LAZY.split("on_timeout", maxsplit=1)[0] + bad + "\n")
        with pytest.raises(TemplateDefinitionError, match=message):
            load_template(path)


POLICY = """
name: acme
tenant: acme
spec:
  templates:
    defaults:
      base: {resources: {memory_mib: 200}, timeout_s: 250}
"""
# The base template's own: 1 vCPU, 128 MiB, 256 MiB of disk, 128 processes, 300 s.
BASE = Resources(vcpus=1, memory_mib=128, disk_mib=256, pids=128)


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def backend() -> str:
    return require_backend()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, backend: str) -> Iterator[Server]:
    """A server where tenant acme's policy has defaults for the base template."""
    with running_server(tmp_path_factory.mktemp("defaults")) as s:
        applied = s.json("PUT", "/v1/policies/acme", {"document": POLICY})
        assert applied.status in (200, 201), applied.body
        yield s


@pytest.fixture(scope="module")
def acme(server: Server) -> str:
    return make_key(server, "acme", ["developer"])[1]


def lifetime(info: SandboxInfo) -> float:
    assert info.expires_at is not None
    return (info.expires_at - info.created_at).total_seconds()


async def test_the_server_keeps_what_is_asked_and_fills_the_rest(
    server: Server, backend: str, acme: str
) -> None:
    async def created(api_key: str | None = None, **asked: Any) -> SandboxInfo:
        # Over the unix socket the caller is the local operator (tenant default); an API
        # key is for TCP.
        url = server.url if api_key is None else server.tcp_url
        async with Sandbox.create(backend=backend, url=url, api_key=api_key, **asked) as sb:
            return sb.info

    # No policy defaults for this tenant: the template's.
    plain = await created()
    assert plain.resources == BASE and lifetime(plain) == pytest.approx(300, abs=20)
    # The tenant's policy's defaults for the template, then the template's for the rest.
    filled = await created(acme)
    assert filled.resources == msgspec.structs.replace(BASE, memory_mib=200)
    assert lifetime(filled) == pytest.approx(250, abs=20)
    # Asked for exactly the server's defaults: kept as asked, whatever the layers say.
    for key in (None, acme):
        asked = await created(key, memory_mib=512, timeout=300)
        assert asked.resources == msgspec.structs.replace(BASE, memory_mib=512)
        assert lifetime(asked) == pytest.approx(300, abs=20)


def test_the_cli_sends_nothing_unset(server: Server, backend: str, acme: str) -> None:
    def run(*args: str) -> SandboxInfo:
        out = subprocess.run(
            [sys.executable, "-m", "tartarus", "run", "--keep", "-q", "-b", backend, *args],
            env=dict(server.env, TARTARUS_URL=str(server.tcp_url), TARTARUS_API_KEY=acme),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        sandbox_id = out.stdout.strip()
        got = call(server, acme, "GET", f"/v1/sandboxes/{sandbox_id}")
        assert got.status == 200, got.body
        info = msgspec.convert(got.json(), SandboxInfo)
        assert call(server, acme, "DELETE", f"/v1/sandboxes/{sandbox_id}").status in (200, 204)
        return info

    filled = run("--", "true")
    assert filled.resources.memory_mib == 200 and lifetime(filled) == pytest.approx(250, abs=20)
    asked = run("--memory", "512", "--timeout", "300", "--", "true")
    assert asked.resources.memory_mib == 512 and lifetime(asked) == pytest.approx(300, abs=20)
