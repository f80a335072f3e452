"""The subset of the OCI runtime specification (config.json) that Tartarus writes.

Field names follow the spec (camelCase on the wire); unset fields are omitted so the
runtime applies its own defaults.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

OCI_VERSION = "1.0.2"


class _Spec(msgspec.Struct, rename="camel", omit_defaults=True, kw_only=True):
    pass


class User(_Spec, kw_only=True):
    uid: int = 0
    gid: int = 0


class Rlimit(_Spec, kw_only=True):
    type: str
    hard: int
    soft: int


class Capabilities(_Spec, kw_only=True):
    bounding: list[str] = msgspec.field(default_factory=list)
    effective: list[str] = msgspec.field(default_factory=list)
    permitted: list[str] = msgspec.field(default_factory=list)


class Process(_Spec, kw_only=True):
    args: list[str]
    env: list[str] = msgspec.field(default_factory=lambda: ["PATH=/usr/bin:/bin"])
    # Required by the spec, so never omitted: current runsc rejects a config without it
    # ("cwd must not be empty"); runsc 2022 defaulted it to "/".
    cwd: str
    terminal: bool = False
    user: User = msgspec.field(default_factory=User)
    no_new_privileges: bool = True
    capabilities: Capabilities | None = None
    rlimits: list[Rlimit] = msgspec.field(default_factory=list)


class Root(_Spec, kw_only=True):
    path: str
    readonly: bool = True


class Mount(_Spec, kw_only=True):
    destination: str
    type: str | None = None
    source: str | None = None
    options: list[str] = msgspec.field(default_factory=list)


class Namespace(_Spec, kw_only=True):
    type: str
    path: str | None = None


class MemoryLimits(_Spec, kw_only=True):
    limit: int | None = None


class CpuLimits(_Spec, kw_only=True):
    quota: int | None = None
    period: int | None = None


class PidsLimits(_Spec, kw_only=True):
    limit: int


class Resources(_Spec, kw_only=True):
    memory: MemoryLimits | None = None
    cpu: CpuLimits | None = None
    pids: PidsLimits | None = None


class Linux(_Spec, kw_only=True):
    namespaces: list[Namespace] = msgspec.field(
        default_factory=lambda: [
            Namespace(type=t) for t in ("pid", "network", "ipc", "uts", "mount")
        ]
    )
    resources: Resources | None = None
    cgroups_path: str | None = None


class Spec(_Spec, kw_only=True):
    oci_version: str = OCI_VERSION
    process: Process
    root: Root
    # None leaves runsc's empty hostname; a default value here would be dropped from the
    # JSON by omit_defaults, so callers name it.
    hostname: str | None = None
    mounts: list[Mount] = msgspec.field(
        default_factory=lambda: [
            Mount(destination="/proc", type="proc", source="proc"),
            Mount(
                destination="/tmp",
                type="tmpfs",
                source="tmpfs",
                options=["nosuid", "nodev"],
            ),
        ]
    )
    linux: Linux = msgspec.field(default_factory=Linux)


def write_bundle_config(bundle: Path, spec: Spec) -> Path:
    """Writes `config.json` into an OCI bundle directory and returns its path."""
    path = bundle / "config.json"
    path.write_bytes(msgspec.json.encode(spec))
    return path
