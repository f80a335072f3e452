"""Erebus: templates, root filesystem builds, image pulls and the blob store.

Erebus turns a template (a YAML/TOML file: a Debian or OCI base, packages, files,
scripts, resources) into the root filesystem every sandbox boots from: a directory for
gVisor and the jail, an ext4 image for the microVM, each stored by content digest in a
reference-counted blob store with garbage collection.

Entry point for other components: `TemplateStore` (`store.resolve("python")`).
"""

from tartarus.images.blobs import BlobInfo, BlobKind, BlobStore, GcReport, LocalBlobStore
from tartarus.images.errors import (
    BuildError,
    HostileArchiveError,
    ImageError,
    TemplateNotFoundError,
)
from tartarus.images.progress import Progress, ProgressCallback
from tartarus.images.rootfs import AGENT_PATH, INIT_PATH, RUN_DIR
from tartarus.images.store import (
    ResolvedTemplate,
    TemplateInfo,
    TemplateManifest,
    TemplateStore,
    template_owner,
)
from tartarus.images.template import Template, load_template

__all__ = [
    "AGENT_PATH",
    "INIT_PATH",
    "RUN_DIR",
    "BlobInfo",
    "BlobKind",
    "BlobStore",
    "BuildError",
    "GcReport",
    "HostileArchiveError",
    "ImageError",
    "LocalBlobStore",
    "Progress",
    "ProgressCallback",
    "ResolvedTemplate",
    "Template",
    "TemplateInfo",
    "TemplateManifest",
    "TemplateNotFoundError",
    "TemplateStore",
    "load_template",
    "template_owner",
]
