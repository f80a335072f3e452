"""Image references: `[registry[:port]/]repository[:tag][@sha256:digest]`, parsed by
the grammar of the OCI distribution reference (lowercase path components joined by
`.`, `_`, `__` or dashes; a first component is a registry if it has a `.` or `:` or is
`localhost`; Docker Hub names get `library/`)."""

from __future__ import annotations

import re

import msgspec

from tartarus.images.errors import ImageReferenceError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
MAX_NAME = 255

_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|-+)"
_PATH_COMPONENT = re.compile(rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(
    rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]{{1,5}})?"
)
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"sha256:[a-f0-9]{64}")


class ImageReference(msgspec.Struct, frozen=True, kw_only=True):
    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def api_host(self) -> str:
        """Host of the registry's HTTP API (Docker Hub serves from another name)."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def reference(self) -> str:
        """What to ask the registry for: the digest if pinned, else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    def with_digest(self, digest: str) -> ImageReference:
        return msgspec.structs.replace(self, digest=digest)

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def parse_reference(text: str) -> ImageReference:
    """Parses an image reference; a missing tag and digest means `latest`."""

    def bad(why: str) -> ImageReferenceError:
        return ImageReferenceError(f"invalid image reference {text!r}: {why}")

    if not text or text != text.strip():
        raise bad("empty or surrounded by whitespace")
    rest, at, digest = text.partition("@")
    if at and not _DIGEST.fullmatch(digest):
        raise bad("the digest must be sha256:<64 lowercase hex digits>")
    tag: str | None = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise bad(f"tag {tag!r} is not [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}")
    first, sep, remainder = rest.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        registry, path = first, remainder
        if not _DOMAIN.fullmatch(registry):
            raise bad(f"registry {registry!r} is not a host name")
    else:
        registry, path = DOCKER_HUB, rest
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    components = path.split("/")
    for component in components:
        if not _PATH_COMPONENT.fullmatch(component):
            raise bad(
                f"repository component {component!r} must be lowercase letters and digits "
                "joined by '.', '_', '__' or '-'"
            )
    if len(f"{registry}/{path}") > MAX_NAME:
        raise bad(f"name longer than {MAX_NAME} characters")
    return ImageReference(
        registry=registry,
        repository=path,
        tag=tag if tag is not None or at else "latest",
        digest=digest if at else None,
    )
