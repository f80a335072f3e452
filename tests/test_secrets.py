"""Secrets: the encrypted local store (envelope encryption), the Vault KV v2 provider
(against a minimal KV v2 endpoint, `tests/support/vault_kv2.py`, since Vault cannot be
installed here), env and file providers, exec-time injection, and redaction."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import cast

import msgspec
import pytest

from tartarus.api.types import CreateSandboxRequest
from tartarus.auth.principal import AuthMethod, Principal
from tartarus.auth.rbac import default_roles
from tartarus.errors import AdmissionDeniedError
from tartarus.node.store import SandboxRecord
from tartarus.policy.judges import Judges
from tartarus.runtime.base import Sandbox
from tartarus.runtime.types import Backend, ExecRequest, SandboxState
from tartarus.secrets.inject import SecretEnvSandbox, SecretInjector
from tartarus.secrets.judge import SecretsCheck
from tartarus.secrets.local_store import Keyring, LocalSecretStore
from tartarus.secrets.providers import EnvProvider, FileProvider, SecretError, SecretResolver
from tartarus.secrets.redaction import RedactingFilter, redact, register
from tartarus.secrets.settings import VaultSettings
from tartarus.secrets.vault import VaultProvider
from tests.support.vault_kv2 import running_vault

pytestmark = [pytest.mark.timeout(60), pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def store(tmp_path: Path) -> LocalSecretStore:
    Keyring.create(tmp_path / "secrets.key")
    return LocalSecretStore(tmp_path / "secrets.db", tmp_path / "secrets.key")


def test_local_store_round_trip_and_nothing_in_clear(
    tmp_path: Path, store: LocalSecretStore
) -> None:
    store.put("acme", "db/password", "correct horse battery staple")
    assert store.get("acme", "db/password") == "correct horse battery staple"
    assert [e.name for e in store.list("acme")] == ["db/password"]
    store.close()
    for f in tmp_path.iterdir():
        assert b"correct horse" not in f.read_bytes(), f
    assert (tmp_path / "secrets.key").stat().st_mode & 0o777 == 0o600


def test_tenants_cannot_read_each_others_secrets(store: LocalSecretStore) -> None:
    store.put("acme", "token", "acme-only-value")
    with pytest.raises(SecretError, match="tenant globex has no such secret"):
        store.get("globex", "token")


def test_moved_or_altered_ciphertext_does_not_decrypt(
    tmp_path: Path, store: LocalSecretStore
) -> None:
    store.put("acme", "a", "value-a")
    store.put("globex", "a", "value-b")
    db = sqlite3.connect(tmp_path / "secrets.db", isolation_level=None)
    # Move acme's row to globex: the associated data (tenant, name) no longer matches.
    db.execute("DELETE FROM secrets WHERE tenant = 'globex'")
    db.execute("UPDATE secrets SET tenant = 'globex' WHERE tenant = 'acme'")
    with pytest.raises(SecretError, match="does not decrypt"):
        store.get("globex", "a")
    store.put("acme", "b", "value-c")
    db.execute("UPDATE secrets SET ciphertext = zeroblob(length(ciphertext)) WHERE name = 'b'")
    with pytest.raises(SecretError, match="does not decrypt"):
        store.get("acme", "b")


def test_kek_rotation_rewraps_and_old_values_still_read(
    tmp_path: Path, store: LocalSecretStore
) -> None:
    store.put("acme", "a", "value-1")
    store.put("acme", "b", "value-2")
    old = store.keyring.primary
    new, count = store.rotate_kek()
    assert count == 2 and new != old
    assert {e.kek_id for e in store.list()} == {new}
    reopened = LocalSecretStore(tmp_path / "secrets.db", tmp_path / "secrets.key")
    assert reopened.get("acme", "a") == "value-1"


def test_key_file_problems_are_clear(tmp_path: Path) -> None:
    missing = LocalSecretStore(tmp_path / "s.db", tmp_path / "none.key")
    with pytest.raises(SecretError, match="tartarus secrets init"):
        missing.put("acme", "a", "v")
    Keyring.create(tmp_path / "k.key")
    with pytest.raises(SecretError, match="exists already"):
        Keyring.create(tmp_path / "k.key")
    (tmp_path / "k.key").chmod(0o644)
    with pytest.raises(SecretError, match="chmod 600"):
        Keyring(tmp_path / "k.key")


async def test_env_and_file_providers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TARTARUS_TEST_SECRET", "from-the-env")
    (tmp_path / "token").write_text("from-a-file\n")
    (tmp_path / "huge").write_bytes(b"x" * (65 * 1024))
    resolver = SecretResolver([EnvProvider(), FileProvider()])
    env = await resolver.environment(
        "acme", {"A": "env:TARTARUS_TEST_SECRET", "B": f"file:{tmp_path / 'token'}"}
    )
    assert env == {"A": "from-the-env", "B": "from-a-file"}
    for ref, message in [
        ("env:TARTARUS_NO_SUCH_VAR", "no such environment variable"),
        ("file:relative/path", "absolute"),
        (f"file:{tmp_path / 'missing'}", "No such file"),
        (f"file:{tmp_path / 'huge'}", "larger than"),
        ("s3:bucket/key", "unknown provider"),
    ]:
        with pytest.raises(SecretError, match=message):
            await resolver.resolve("acme", ref)


async def test_vault_kv2_provider() -> None:
    async with running_vault(token="s.vault-token-for-tests") as vault:
        vault.put("tartarus/acme/app/db", {"password": "vault-db-password", "user": "app"})
        vault.put("tartarus/globex/app/db", {"password": "globex-password"})
        settings = VaultSettings(address=vault.url)
        provider = VaultProvider(settings)
        try:
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("VAULT_TOKEN", "s.vault-token-for-tests")
                assert await provider.resolve("acme", "app/db#password") == "vault-db-password"
                assert await provider.resolve("acme", "app/db#user") == "app"
                vault.put("tartarus/acme/app/db", {"password": "rotated-password"})
                assert await provider.resolve("acme", "app/db#password") == "rotated-password"
                assert vault.requests[0] == ("GET", "/v1/secret/data/tartarus/acme/app/db")
                for name, message in [
                    ("app/missing#x", "no such secret"),
                    ("app/db#nope", "no field 'nope'"),
                    ("../globex/app/db#password", "not a valid path"),
                ]:
                    with pytest.raises(SecretError, match=message):
                        await provider.resolve("acme", name)
                mp.setenv("VAULT_TOKEN", "s.wrong")
                with pytest.raises(SecretError, match="refused the server's token") as e:
                    await provider.resolve("acme", "app/db#password")
                assert "s.wrong" not in str(e.value)
        finally:
            await provider.close()
    with pytest.raises(SecretError, match="https"):
        VaultProvider(VaultSettings(address="http://vault.example.com:8200"))


class RecordingSandbox:
    """Only `exec` matters here; the rest is delegated and not called."""

    def __init__(self) -> None:
        self.requests: list[ExecRequest] = []

    async def exec(self, request: ExecRequest) -> object:
        self.requests.append(request)
        return object()


async def test_injection_adds_secrets_at_each_exec(store: LocalSecretStore) -> None:
    store.put("acme", "api-token", "first-value")
    resolver = SecretResolver([store])
    inner = RecordingSandbox()
    sandbox = SecretEnvSandbox(
        cast(Sandbox, inner), resolver, "acme", {"API_TOKEN": "local:api-token"}
    )
    await sandbox.exec(ExecRequest(argv=["true"], env={"OTHER": "1"}))
    store.put("acme", "api-token", "rotated-value")
    await sandbox.exec(ExecRequest(argv=["true"], env={"API_TOKEN": "caller-wins"}))
    assert inner.requests[0].env == {"API_TOKEN": "first-value", "OTHER": "1"}
    assert inner.requests[1].env == {"API_TOKEN": "caller-wins"}
    record = SandboxRecord(
        id="sb-1",
        template="base",
        backend=Backend.JAIL,
        state=SandboxState.RUNNING,
        created_at=0.0,
        tenant="acme",
    )
    injector = SecretInjector(resolver)
    as_sandbox = cast(Sandbox, inner)
    assert injector(record, as_sandbox) is as_sandbox
    wrapped = injector(
        msgspec.structs.replace(record, secrets={"T": "local:api-token"}), as_sandbox
    )
    assert isinstance(wrapped, SecretEnvSandbox)


def test_redaction_of_text_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    register("s3cr3t-redaction-value")
    register("ab")  # too short to redact without mangling ordinary text
    assert redact("x s3cr3t-redaction-value y ab") == "x *** y ab"
    record = logging.LogRecord(
        "t", logging.ERROR, __file__, 1, "got %s", ("s3cr3t-redaction-value",), None
    )
    assert RedactingFilter().filter(record)
    assert record.getMessage() == "got ***"


class ProbeProvider:
    """Records which names were asked for."""

    scheme = "probe"

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def resolve(self, tenant: str, name: str) -> str:
        self.asked.append(name)
        return "probe-value"


async def test_admission_checks_references_resolve(store: LocalSecretStore) -> None:
    store.put("acme", "present", "a-value-that-exists")
    probe = ProbeProvider()
    resolver = SecretResolver([store, probe])
    judges = Judges(plugins=[SecretsCheck(resolver)])
    who = Principal(
        subject="key:acme",
        tenant="acme",
        roles=("developer",),
        grants=default_roles().grants(("developer",)),
        method=AuthMethod.API_KEY,
    )
    request = CreateSandboxRequest(secrets={"A": "local:present"})
    assert (await judges.admit(who, request)).request.secrets == {"A": "local:present"}
    with pytest.raises(AdmissionDeniedError) as missing:
        await judges.admit(who, CreateSandboxRequest(secrets={"A": "local:absent"}))
    assert missing.value.status == 422 and "local:absent" in missing.value.detail
    # A reference the security policy refuses is never looked up.
    with pytest.raises(AdmissionDeniedError) as refused:
        await judges.admit(who, CreateSandboxRequest(secrets={"P": "probe:anything"}))
    assert refused.value.status == 403 and probe.asked == []
