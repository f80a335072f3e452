"""Template definitions: what a sandbox's root filesystem is built from.

A template is a YAML or TOML file (msgspec-validated) naming a base (Debian packages,
an OCI image in a registry, a local OCI layout or a `docker save` tarball), extra
packages, files to copy, environment, a build script, a warm-up script, resources,
a default timeout and the backends allowed to run it. Built-in templates ship as files
beside this module.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import stat
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import msgspec.toml
import msgspec.yaml

from tartarus import codec
from tartarus.api.sandbox import OnTimeout
from tartarus.api.types import MAX_GRACE_S, MAX_TIMEOUT_S
from tartarus.images.errors import ImageError, TemplateDefinitionError
from tartarus.images.oci.manifest import parse_platform
from tartarus.images.oci.reference import parse_reference
from tartarus.runtime.types import Backend, Resources

BUILTIN_DIR = Path(__file__).resolve().parent / "templates"
TEMPLATE_SUFFIXES = (".yaml", ".yml", ".toml")
# Bumped when the build pipeline changes what it produces from the same inputs.
PIPELINE_VERSION = 1

TemplateId = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")]


class DebianBase(
    msgspec.Struct,
    kw_only=True,
    forbid_unknown_fields=True,
    frozen=True,
    tag="debian",
    tag_field="kind",
):
    """Debian from its archive. `minbase`: debootstrap's minimal system, then `packages`
    installed with apt. `none`: exactly `packages` unpacked, nothing else (no apt, no
    maintainer scripts; dependencies must be listed too): for tiny rootfs like `base`."""

    suite: str = "bookworm"
    variant: Literal["minbase", "none"] = "minbase"
    mirror: str = "http://deb.debian.org/debian"
    # Adds <suite>-updates and <suite>-security to apt's sources; "" turns it off.
    security_mirror: str = "http://deb.debian.org/debian-security"
    components: list[str] = msgspec.field(default_factory=lambda: ["main"])


class OciImageBase(
    msgspec.Struct,
    kw_only=True,
    forbid_unknown_fields=True,
    frozen=True,
    tag="oci",
    tag_field="kind",
):
    """An image in an OCI/Docker registry: `registry/name:tag` or `name@sha256:...`."""

    image: str
    # `os/arch[/variant]`; default: this host's.
    platform: str | None = None


class OciLayoutBase(
    msgspec.Struct,
    kw_only=True,
    forbid_unknown_fields=True,
    frozen=True,
    tag="oci-layout",
    tag_field="kind",
):
    """A local OCI image layout directory (`oci-layout`, `index.json`, `blobs/`)."""

    path: str
    # The `org.opencontainers.image.ref.name` annotation; optional with one image.
    ref: str | None = None
    platform: str | None = None


class DockerArchiveBase(
    msgspec.Struct,
    kw_only=True,
    forbid_unknown_fields=True,
    frozen=True,
    tag="docker-archive",
    tag_field="kind",
):
    """A tarball written by `docker save` (or `skopeo copy ... docker-archive:`)."""

    path: str
    # A repo tag inside the archive; optional with one image.
    ref: str | None = None


Base = DebianBase | OciImageBase | OciLayoutBase | DockerArchiveBase


class FileCopy(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """Copies `src` (relative to the template file; a file or a directory) to `dest`."""

    src: str
    dest: str
    mode: int | None = None


class Template(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    id: TemplateId
    description: str = ""
    base: Base
    # Installed with apt after the base (Debian bases, and images that have apt).
    packages: list[str] = msgspec.field(default_factory=list)
    files: list[FileCopy] = msgspec.field(default_factory=list)
    env: dict[str, str] = msgspec.field(default_factory=dict)
    workdir: str = "/"
    # How the build and warm-up scripts are run inside the rootfs.
    shell: list[str] = msgspec.field(default_factory=lambda: ["/bin/sh", "-c"])
    build: str | None = None
    # Run before a snapshot is taken (and at build time as a smoke test).
    warmup: str | None = None
    resources: Resources = msgspec.field(default_factory=Resources)
    max_resources: Resources | None = None
    timeout_s: float = 300.0
    # What a sandbox's timeout does, and the idle time after which it pauses itself,
    # unless its create request says (docs/lifecycle.md); unset: `kill`, never.
    on_timeout: OnTimeout | None = None
    auto_pause_after_s: float | None = None
    # Seconds of SIGTERM a stop that does not say gives a sandbox's processes.
    stop_grace_s: float | None = None
    # Empty: every backend that can run a rootfs.
    backends: list[Backend] = msgspec.field(default_factory=list)


class LoadedTemplate(msgspec.Struct, frozen=True, kw_only=True):
    """A template and where it came from; relative paths resolve against `source_dir`."""

    template: Template
    source: str
    source_dir: Path
    builtin: bool = False


def _decode(data: bytes, suffix: str) -> Template:
    if suffix == ".toml":
        return msgspec.toml.decode(data, type=Template, dec_hook=codec.dec_hook)
    return msgspec.yaml.decode(data, type=Template, dec_hook=codec.dec_hook)


def load_template(path: Path, *, builtin: bool = False) -> LoadedTemplate:
    if path.suffix not in TEMPLATE_SUFFIXES:
        raise TemplateDefinitionError(
            f"{path}: a template file ends in {', '.join(TEMPLATE_SUFFIXES)}"
        )
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TemplateDefinitionError(f"cannot read template {path}: {e}") from e
    try:
        template = _decode(data, path.suffix)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise TemplateDefinitionError(f"{path}: {e}") from e
    validate(template, str(path))
    return LoadedTemplate(
        template=template,
        source=str(path),
        source_dir=path.resolve().parent,
        builtin=builtin,
    )


def validate(template: Template, where: str) -> None:
    """Checks what the schema cannot: destinations, and resource bounds."""
    for f in template.files:
        if not f.dest.startswith("/") or ".." in f.dest.split("/"):
            raise TemplateDefinitionError(
                f"{where}: files: dest {f.dest!r} must be an absolute path without '..'"
            )
        if f.dest.split("/")[1:2] == [".tartarus"]:
            raise TemplateDefinitionError(f"{where}: files: /.tartarus is reserved for Tartarus")
    if not template.shell:
        raise TemplateDefinitionError(f"{where}: shell must name a program")
    if template.max_resources is not None:
        lo, hi = template.resources, template.max_resources
        for field in Resources.__struct_fields__:
            if getattr(lo, field) > getattr(hi, field):
                raise TemplateDefinitionError(
                    f"{where}: resources.{field} ({getattr(lo, field)}) exceeds "
                    f"max_resources.{field} ({getattr(hi, field)})"
                )
    if isinstance(template.base, DebianBase) and not re.fullmatch(
        r"[a-z0-9.-]+", template.base.suite
    ):
        raise TemplateDefinitionError(f"{where}: base.suite {template.base.suite!r} is not a suite")
    if isinstance(template.base, OciImageBase | OciLayoutBase):
        try:
            if isinstance(template.base, OciImageBase):
                parse_reference(template.base.image)
            parse_platform(template.base.platform)
        except ImageError as e:
            raise TemplateDefinitionError(f"{where}: base: {e}") from None
    _validate_lifetime(template, where)


def _validate_lifetime(template: Template, where: str) -> None:
    if template.timeout_s <= 0:
        raise TemplateDefinitionError(f"{where}: timeout_s must be positive")
    idle = template.auto_pause_after_s
    if idle is not None and not 1 <= idle <= MAX_TIMEOUT_S:
        raise TemplateDefinitionError(
            f"{where}: auto_pause_after_s must be between 1 and {MAX_TIMEOUT_S:g} seconds"
        )
    grace = template.stop_grace_s
    if grace is not None and not 0 <= grace <= MAX_GRACE_S:
        raise TemplateDefinitionError(
            f"{where}: stop_grace_s must be between 0 and {MAX_GRACE_S:g} seconds"
        )


def builtin_templates() -> dict[str, LoadedTemplate]:
    return dict(_builtin_templates())


@functools.cache
def _builtin_templates() -> dict[str, LoadedTemplate]:
    # Package files: read once per process.
    out = {}
    for path in sorted(BUILTIN_DIR.iterdir()):
        if path.suffix in TEMPLATE_SUFFIXES:
            loaded = load_template(path, builtin=True)
            out[loaded.template.id] = loaded
    return out


def to_yaml(template: Template) -> bytes:
    return msgspec.yaml.encode(template, enc_hook=codec.enc_hook)


def to_json(template: Template) -> bytes:
    return msgspec.json.encode(template, enc_hook=codec.enc_hook)


def from_json(data: bytes) -> Template:
    return msgspec.json.decode(data, type=Template, dec_hook=codec.dec_hook)


# -- input hashing ---------------------------------------------------------------------

# Fields that do not change the root filesystem: templates differing only in these
# share their build.
_METADATA_FIELDS = {
    "id",
    "description",
    "warmup",
    "resources",
    "max_resources",
    "timeout_s",
    "backends",
    "workdir",
}


def resolve_source(loaded: LoadedTemplate, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else loaded.source_dir / p


def _hash_path(h: Any, path: Path) -> None:
    """Feeds a file or directory tree (names, modes, contents, link targets) to `h`."""
    st = path.lstat()
    if stat.S_ISDIR(st.st_mode):
        h.update(f"dir {stat.S_IMODE(st.st_mode):o}\n".encode())
        for child in sorted(path.iterdir()):
            h.update(os.fsencode(child.name) + b"\0")
            _hash_path(h, child)
    elif stat.S_ISLNK(st.st_mode):
        h.update(b"link " + os.fsencode(str(path.readlink())) + b"\n")
    else:
        with path.open("rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        h.update(f"file {stat.S_IMODE(st.st_mode):o} {digest}\n".encode())


def content_key(loaded: LoadedTemplate, base_key: dict[str, Any]) -> str:
    """The hash of every input of the root filesystem (before the agent goes in):
    the definition's content fields, the resolved base, and every copied file."""
    definition = msgspec.to_builtins(loaded.template, enc_hook=codec.enc_hook)
    for name in _METADATA_FIELDS:
        definition.pop(name, None)
    h = hashlib.sha256()
    h.update(
        msgspec.json.encode(
            {"pipeline": PIPELINE_VERSION, "definition": definition, "base": base_key},
            order="sorted",
        )
    )
    for f in loaded.template.files:
        src = resolve_source(loaded, f.src)
        if not src.exists() and not src.is_symlink():
            raise TemplateDefinitionError(f"{loaded.source}: files: {src} does not exist")
        h.update(b"\0copy\0" + os.fsencode(f.src) + b"\0")
        _hash_path(h, src)
    return h.hexdigest()
