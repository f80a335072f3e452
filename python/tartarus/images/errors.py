"""Errors raised by Erebus (templates, image pulls, rootfs builds and the blob store)."""

from __future__ import annotations

from tartarus.errors import TartarusError


class ImageError(TartarusError):
    """Base class of every Erebus error."""


class HostileArchiveError(ImageError):
    """An archive (image layer, .deb) tried something a well-formed one never does:
    an absolute path, `..`, a link out of the root, a device node, an absurd size."""

    def __init__(self, archive: str, member: str, problem: str) -> None:
        self.archive = archive
        self.member = member
        self.problem = problem
        super().__init__(f"{archive}: rejected member {member!r}: {problem}")


class InvalidArchiveError(ImageError):
    """An archive is corrupt, truncated, or uses a tar feature Tartarus does not unpack."""


class DigestMismatchError(ImageError):
    def __init__(self, what: str, expected: str, actual: str) -> None:
        super().__init__(
            f"{what}: content digest {actual} does not match the expected {expected}; "
            "the download is corrupt or the source was tampered with"
        )


class ImageReferenceError(ImageError):
    """An image reference (`registry/name:tag@digest`) is malformed."""


class RegistryError(ImageError):
    """An OCI registry refused or failed a request; the message has the status and URL."""


class ManifestError(ImageError):
    """An image manifest, index or config is malformed or has no usable platform."""


class BlobNotFoundError(ImageError):
    def __init__(self, digest: str) -> None:
        self.digest = digest
        super().__init__(f"blob {digest} is not in the store")


class TemplateNotFoundError(ImageError):
    def __init__(self, template_id: str, known: list[str]) -> None:
        self.template_id = template_id
        names = ", ".join(sorted(known)) or "none"
        super().__init__(
            f"no template named {template_id!r} (known: {names}); "
            "create one with `tartarus init template NAME`"
        )


class TemplateDefinitionError(ImageError):
    """A template file does not parse or fails validation; the message names the file."""


class DiskFullError(ImageError):
    """The disk holding the store or the cache filled up; nothing half-built is kept."""

    def __init__(self, where: str, path: str | None = None) -> None:
        place = f" ({path})" if path else ""
        super().__init__(
            f"no space left on the device while {where}{place}; free space, run "
            "`tartarus template gc`, or point state_dir/cache_dir at a larger disk"
        )


class BuildError(ImageError):
    """A build step failed; the message names the step and ends with its output."""
