"""Erebus: templates, root filesystem builds, image pulls and the blob store.

Erebus turns a template (a YAML/TOML file: a Debian or OCI base, packages, files,
scripts, resources) into the root filesystem every sandbox boots from: a directory for
gVisor and the jail, an ext4 image for the microVM, each stored by content digest in a
reference-counted blob store with garbage collection.

Entry point for other components: `TemplateStore` (`store.resolve("python")`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tartarus.lazy_exports import lazy_exports

if TYPE_CHECKING:
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

# Loaded on first use: the server's error mapping needs `errors` alone, not the builders.
__getattr__ = lazy_exports(
    __name__,
    {
        "BlobInfo": "blobs",
        "BlobKind": "blobs",
        "BlobStore": "blobs",
        "GcReport": "blobs",
        "LocalBlobStore": "blobs",
        "BuildError": "errors",
        "HostileArchiveError": "errors",
        "ImageError": "errors",
        "TemplateNotFoundError": "errors",
        "Progress": "progress",
        "ProgressCallback": "progress",
        "AGENT_PATH": "rootfs",
        "INIT_PATH": "rootfs",
        "RUN_DIR": "rootfs",
        "ResolvedTemplate": "store",
        "TemplateInfo": "store",
        "TemplateManifest": "store",
        "TemplateStore": "store",
        "template_owner": "store",
        "Template": "template",
        "load_template": "template",
    },
)
