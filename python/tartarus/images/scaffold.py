"""Writes new template files (`tartarus init template NAME --from ...`): every field
present or shown commented out, with a line saying what it does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import msgspec.yaml

from tartarus import codec
from tartarus.api.sandbox import OnTimeout
from tartarus.images.dockerfile import from_dockerfile
from tartarus.images.errors import TemplateDefinitionError
from tartarus.images.template import (
    Base,
    DebianBase,
    DockerArchiveBase,
    OciImageBase,
    OciLayoutBase,
    Template,
    builtin_templates,
    validate,
)

ORIGINS_HELP = (
    "a built-in template (base, python, python-ds, node), debian:SUITE, oci:IMAGE, "
    "oci-layout:DIR[:REF], docker-archive:FILE[:REF], or dockerfile:PATH"
)


def _yaml(value: Any) -> list[str]:
    text = msgspec.yaml.encode(msgspec.to_builtins(value, enc_hook=codec.enc_hook)).decode()
    return text.rstrip("\n").splitlines()


def _field(comment: str, key: str, value: Any, *, enabled: bool = True) -> list[str]:
    lines = [f"# {line}" for line in comment.splitlines()]
    if isinstance(value, str) and "\n" in value:
        # A literal block reads like the script it is.
        body = [f"{key}: |", *(f"  {line}".rstrip() for line in value.rstrip("\n").split("\n"))]
    else:
        body = _yaml({key: value})
    lines += body if enabled else [f"# {line}" for line in body]
    return [*lines, ""]


def _split_ref(value: str) -> tuple[str, str | None]:
    path, sep, ref = value.rpartition(":")
    return (path, ref) if sep and path and "/" not in ref else (value, None)


def origin_template(name: str, origin: str, output_dir: Path | None = None) -> Template:
    """The starting definition for `--from origin`, renamed to `name`. Paths in it are
    relative to `output_dir`, where the template file goes."""
    kind, _, value = origin.partition(":")
    base: Base
    if kind == "debian":
        template = Template(id=name, base=DebianBase(suite=value or "bookworm"))
    elif kind in ("oci", "oci-layout", "docker-archive") and value:
        if kind == "oci":
            base = OciImageBase(image=value)
        elif kind == "oci-layout":
            path, ref = _split_ref(value)
            base = OciLayoutBase(path=path, ref=ref)
        else:
            path, ref = _split_ref(value)
            base = DockerArchiveBase(path=path, ref=ref)
        template = Template(id=name, base=base)
    elif kind == "dockerfile" and value:
        template = from_dockerfile(name, Path(value), output_dir or Path.cwd())
    else:
        builtins = builtin_templates()
        if origin not in builtins:
            raise TemplateDefinitionError(f"unknown --from {origin!r}: use {ORIGINS_HELP}")
        template = msgspec.structs.replace(builtins[origin].template, id=name)
    try:
        template = msgspec.convert(
            msgspec.to_builtins(template, enc_hook=codec.enc_hook),
            Template,
            dec_hook=codec.dec_hook,
        )
    except msgspec.ValidationError as e:
        raise TemplateDefinitionError(f"template name {name!r}: {e}") from e
    validate(template, f"--from {origin}")
    return template


def render(template: Template, origin: str) -> str:
    t = template
    out = [
        f"# Tartarus template {t.id!r}, started from {origin}.",
        "# Build it:  tartarus template build <this file>",
        f"# Use it:    tartarus run --template {t.id} -- <command>",
        "",
    ]
    out += _field("Name: lowercase letters, digits, '.', '_' and '-'.", "id", t.id)
    out += _field("Shown by `tartarus template list`.", "description", t.description or t.id)
    out += _field(
        "What the root filesystem starts from (kind: debian | oci | oci-layout |\n"
        "docker-archive). debian variants: minbase (debootstrap, then apt) or none\n"
        "(exactly `packages`, unpacked). oci: `image: registry/name:tag`.",
        "base",
        t.base,
    )
    out += _field(
        "Debian packages: installed with apt (no recommends), or with variant none unpacked.",
        "packages",
        t.packages,
    )
    out += _field(
        "Files or directories to copy in; src is relative to this file, mode is optional\n"
        "(YAML octal: mode: 0755).",
        "files",
        t.files or [{"src": "./app", "dest": "/app"}],
        enabled=bool(t.files),
    )
    out += _field("Environment of every process in the sandbox.", "env", t.env)
    out += _field("Working directory of commands.", "workdir", t.workdir)
    out += _field("How the build and warm-up scripts are run.", "shell", t.shell)
    out += _field(
        "Runs once at build time, as root inside the new rootfs, with network.",
        "build",
        t.build or "set -e\necho building\n",
        enabled=t.build is not None,
    )
    out += _field(
        "Runs before a snapshot is taken, so restored sandboxes start warm\n"
        "(also run read-only at build time to check the template works).",
        "warmup",
        t.warmup or "true",
        enabled=t.warmup is not None,
    )
    out += _field("Default resources of a sandbox.", "resources", t.resources)
    out += _field(
        "The most a sandbox of this template may ask for.",
        "max_resources",
        t.max_resources or t.resources,
        enabled=t.max_resources is not None,
    )
    out += _field("Default lifetime of a sandbox, in seconds.", "timeout_s", t.timeout_s)
    out += _field(
        "What a sandbox's timeout does unless its create says: kill, or pause.",
        "on_timeout",
        (t.on_timeout or OnTimeout.KILL).value,
        enabled=t.on_timeout is not None,
    )
    out += _field(
        "Pause a sandbox after this many idle seconds unless its create says.",
        "auto_pause_after_s",
        t.auto_pause_after_s or 600.0,
        enabled=t.auto_pause_after_s is not None,
    )
    out += _field(
        "Seconds of SIGTERM before the kill when a stop does not say.",
        "stop_grace_s",
        t.stop_grace_s or 10.0,
        enabled=t.stop_grace_s is not None,
    )
    out += _field(
        "Backends allowed to run it (microvm, gvisor, jail); empty means any.",
        "backends",
        [b.value for b in t.backends],
    )
    return "\n".join(out).rstrip("\n") + "\n"
