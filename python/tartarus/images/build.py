"""The build pipeline: template -> root filesystem tree -> agent injected -> ext4.

Stage 1 ("content") builds what the template describes: the base (Debian or OCI),
packages, copied files, the build script. Its key is the hash of every input
(`template.content_key`). Stage 2 ("rootfs") hardlink-copies stage 1 and injects the
agent; its key adds the agent's digest, so a new agent never re-runs debootstrap. The
ext4 image is made from the stage-2 tree on demand.

Each stage is cached under `<state_dir>/images/builds/<key>.json` (pointing at blobs in
the store, beside them) and built under a lock file, so concurrent builds of the same inputs build
once. Everything is built in a staging directory and committed atomically by the blob
store: an interrupted build leaves nothing visible.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tarfile
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import aiohttp
import anyio
import anyio.to_thread
import msgspec

from tartarus.errors import is_disk_full
from tartarus.file_identity import FileIdentity, file_identity
from tartarus.images import debian, fsutil, rootfs
from tartarus.images.blobs import BlobStore
from tartarus.images.errors import BlobNotFoundError, DiskFullError
from tartarus.images.oci.image import (
    DockerArchiveSource,
    ImageSource,
    LayoutSource,
    RegistrySource,
    lay_down,
)
from tartarus.images.oci.layout import read_docker_archive, read_layout
from tartarus.images.oci.manifest import ImageConfigFile as ConfigFile
from tartarus.images.oci.manifest import Platform, env_dict, parse_config, parse_platform
from tartarus.images.oci.reference import ImageReference, parse_reference
from tartarus.images.oci.registry import RegistryClient
from tartarus.images.progress import Progress, ProgressCallback
from tartarus.images.steps import run_in_rootfs
from tartarus.images.template import (
    DebianBase,
    DockerArchiveBase,
    LoadedTemplate,
    OciImageBase,
    OciLayoutBase,
    content_key,
    resolve_source,
)
from tartarus.images.unpack import unpack

T = TypeVar("T")
EXT4_MEDIA_TYPE = "application/vnd.tartarus.rootfs.ext4"


class ImageConfig(msgspec.Struct, frozen=True, kw_only=True):
    """What a base contributes besides files (an OCI image's config)."""

    env: dict[str, str] = msgspec.field(default_factory=dict)
    workdir: str | None = None
    user: str | None = None
    entrypoint: list[str] = msgspec.field(default_factory=list)
    cmd: list[str] = msgspec.field(default_factory=list)


def image_config(config: ConfigFile) -> ImageConfig:
    c = config.config
    if c is None:
        return ImageConfig()
    return ImageConfig(
        env=env_dict(c.env),
        workdir=c.working_dir or None,
        user=c.user or None,
        entrypoint=c.entrypoint or [],
        cmd=c.cmd or [],
    )


class Pin(msgspec.Struct, frozen=True, kw_only=True):
    """The digest a registry tag named when a template was first built."""

    reference: str
    platform: str
    digest: str


class ContentRecord(msgspec.Struct, frozen=True, kw_only=True):
    """Stage 1: the template's content, without the agent."""

    key: str
    tree: str
    layers: list[str] = msgspec.field(default_factory=list)
    base: str
    config: ImageConfig = msgspec.field(default_factory=ImageConfig)
    built_at: float
    seconds: float


class BuildRecord(msgspec.Struct, frozen=True, kw_only=True):
    """Stage 2: the rootfs tree with the agent, and its ext4 image once made."""

    key: str
    content: ContentRecord
    rootfs: str
    ext4: str | None = None
    agent: str
    size: int
    files: int
    built_at: float
    seconds: float

    def digests(self) -> list[str]:
        """Everything the template holds: layers, content tree, rootfs, ext4."""
        out = [self.content.tree, *self.content.layers, self.rootfs]
        if self.ext4:
            out.append(self.ext4)
        return out

    def outputs(self, *, ext4: bool) -> list[str]:
        """What a sandbox uses: the rootfs, and the ext4 image if asked for."""
        return [self.rootfs, *([self.ext4] if ext4 and self.ext4 else [])]


# A base knows its contribution to the content key and how to lay itself down.
Populate = Callable[[Path, str], Awaitable[tuple[ImageConfig, list[str]]]]


@dataclass(frozen=True)
class PreparedBase:
    key: dict[str, Any]
    description: str
    populate: Populate
    # True when the base installs the template's packages itself.
    handles_packages: bool = False


_agent_digests: dict[FileIdentity, str] = {}


def agent_digest(path: Path) -> str:
    """sha256 of the agent binary, remembered per (path, inode, size, mtime)."""
    key = file_identity(path)
    if key not in _agent_digests:
        with path.open("rb") as f:
            _agent_digests[key] = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
    return _agent_digests[key]


async def agent_digest_async(path: Path) -> str:
    """`agent_digest`, hashing on a worker thread; a remembered digest costs one stat,
    done here (a thread hand-off would cost more than the stat, on every create)."""
    known = _agent_digests.get(file_identity(path))
    return known if known is not None else await anyio.to_thread.run_sync(agent_digest, path)


def ensure_mountpoints(root: Path) -> None:
    """Directories every runtime mounts over; an image without them cannot boot. The
    root itself is 0755 (staging directories start private)."""
    root.chmod(0o755)
    for name, mode in (("proc", 0o555), ("sys", 0o555), ("dev", 0o755), ("tmp", 0o1777)):
        path = root / name
        if not path.exists() and not path.is_symlink():
            path.mkdir()
            path.chmod(mode)


def copy_files(loaded: LoadedTemplate, root: Path) -> None:
    """Copies the template's `files` in, through the same checks as image layers (paths
    resolve inside the root; escaping symlinks are refused)."""
    if not loaded.template.files:
        return
    # Spooled: small file sets stay in memory, large ones go to a temporary file.
    with tempfile.SpooledTemporaryFile(max_size=64 << 20) as buf:
        _pack_files(loaded, buf)
        buf.seek(0)
        unpack(buf, str(root), archive=f"{loaded.source} files", whiteouts=False)


def _pack_files(loaded: LoadedTemplate, buf: IO[bytes]) -> None:
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for f in loaded.template.files:
            src = resolve_source(loaded, f.src)

            def owned_by_root(info: tarfile.TarInfo, mode: int | None = f.mode) -> tarfile.TarInfo:
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                if mode is not None and not info.issym():
                    info.mode = mode
                return info

            tar.add(src, arcname=f.dest.lstrip("/"), filter=owned_by_root)


class Builder:
    """Builds templates into the blob store. One per store; safe across processes."""

    def __init__(
        self, blobs: BlobStore, cache_dir: Path, progress: ProgressCallback, store_dir: Path
    ) -> None:
        self.blobs = blobs
        # Downloads, packages and pins: shared by every store on this host.
        self.cache_dir = cache_dir
        # The records point at this store's blobs, so they live (and are locked) with it:
        # in a shared cache, one store's build replaced the record another's blobs had.
        self.records = store_dir / "builds"
        self.locks = store_dir / "locks"
        self.progress = progress
        self._session: aiohttp.ClientSession | None = None
        self._prepared: tuple[PreparedBase, str] | None = None

    # -- plumbing ----------------------------------------------------------------------

    async def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120)
            self._session = aiohttp.ClientSession(timeout=timeout, trust_env=True)
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @contextlib.asynccontextmanager
    async def lock(self, key: str) -> AsyncIterator[None]:
        """An exclusive lock per build key, across processes."""

        def waiting() -> None:
            message = "another build of the same inputs is running; waiting for it"
            self.progress(Progress(step="wait", message=message))

        async with fsutil.file_lock(self.locks / f"{key}.lock", waiting):
            yield

    @contextlib.asynccontextmanager
    async def staging(self, label: str) -> AsyncIterator[Path]:
        """A staging directory in the store, removed afterwards whatever happens."""
        path = await self.blobs.new_staging(label)
        try:
            yield path
        finally:
            await anyio.to_thread.run_sync(fsutil.remove_tree, path)

    def _record_path(self, key: str) -> Path:
        return self.records / f"{key}.json"

    async def _read(self, key: str, type_: type[T]) -> T | None:
        # A record is a few hundred bytes in the local store: read here, not on a worker
        # thread (a hand-off costs 0.15-0.5 ms, and every create reads one).
        path = self._record_path(key)
        try:
            return msgspec.json.decode(path.read_bytes(), type=type_)
        except FileNotFoundError:
            return None
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None  # an old or damaged record: rebuild

    async def _write(self, key: str, record: object) -> None:
        data = msgspec.json.encode(record)
        await anyio.to_thread.run_sync(fsutil.atomic_write, self._record_path(key), data)

    async def _hold(self, owner: str, digests: list[str]) -> bool:
        """Takes references for `owner` on a cached record's blobs; False if any is gone."""
        try:
            await self.blobs.add_refs(owner, digests)
        except BlobNotFoundError:
            return False
        return True

    # -- bases -------------------------------------------------------------------------

    async def prepare_base(self, loaded: LoadedTemplate, pull: bool) -> PreparedBase:
        base = loaded.template.base
        if isinstance(base, DebianBase):
            return self._debian(loaded, base)
        if isinstance(base, OciImageBase):
            return await self._registry(base, pull)
        if isinstance(base, OciLayoutBase):
            return await self._layout(loaded, base)
        return await self._docker_archive(loaded, base)

    def _debian(self, loaded: LoadedTemplate, base: DebianBase) -> PreparedBase:
        packages = loaded.template.packages
        cache = self.cache_dir / "debian"

        async def populate(staging: Path, owner: str) -> tuple[ImageConfig, list[str]]:
            if base.variant == "none":
                archive = debian.DebianArchive(await self.session(), base, cache, self.progress)
                await archive.install(packages, staging)
            else:
                # One debootstrap per suite at a time: they share the .deb cache.
                async with self.lock(f"debootstrap-{base.suite}-{debian.debian_arch()}"):
                    await debian.debootstrap(base, staging, cache, self.progress)
                await debian.apt_install(staging, packages, self.progress, upgrade=True)
            return ImageConfig(), []

        return PreparedBase(
            key={"arch": debian.debian_arch()},
            description=f"debian {base.suite} ({base.variant})",
            populate=populate,
            handles_packages=True,
        )

    def _pin_path(self, ref: ImageReference, platform: Platform) -> Path:
        name = hashlib.sha256(f"{ref}|{platform}".encode()).hexdigest()
        return self.cache_dir / "pins" / f"{name}.json"

    async def _registry(self, base: OciImageBase, pull: bool) -> PreparedBase:
        """A registry image. A tag is looked up once and pinned to the digest it named
        (so a cache hit needs no network); `pull` looks it up again."""
        ref = parse_reference(base.image)
        platform = parse_platform(base.platform)
        client = RegistryClient(await self.session(), progress=self.progress)
        pin = anyio.Path(self._pin_path(ref, platform))
        digest = ref.digest
        if digest is None and not pull and await pin.exists():
            digest = msgspec.json.decode(await pin.read_bytes(), type=Pin).digest
        if digest is None:
            self.progress(Progress(step="resolve", message=f"looking up {ref}"))
            digest = (await client.resolve(ref, platform)).digest
            record = Pin(reference=str(ref), platform=str(platform), digest=digest)
            await anyio.to_thread.run_sync(
                fsutil.atomic_write, Path(pin), msgspec.json.encode(record)
            )
        pinned = ref.with_digest(digest)

        async def populate(staging: Path, owner: str) -> tuple[ImageConfig, list[str]]:
            pulled = await client.resolve(pinned, platform)
            config = parse_config(await client.get_config(pinned, pulled.manifest.config))
            source = RegistrySource(
                client, pinned, pulled.manifest, config, self.cache_dir / "downloads"
            )
            layers = await lay_down(
                source, self.blobs, staging, owner=owner, progress=self.progress, locks=self.locks
            )
            return image_config(config), layers

        return PreparedBase(
            key={"image": digest, "platform": str(platform)},
            description=f"{ref.name}@{digest}",
            populate=populate,
        )

    async def _layout(self, loaded: LoadedTemplate, base: OciLayoutBase) -> PreparedBase:
        path = resolve_source(loaded, base.path)
        image = await anyio.to_thread.run_sync(
            read_layout, path, base.ref, parse_platform(base.platform)
        )
        return self._local(LayoutSource(path, image), image.digest)

    async def _docker_archive(
        self, loaded: LoadedTemplate, base: DockerArchiveBase
    ) -> PreparedBase:
        path = resolve_source(loaded, base.path)
        archive, image, members = await anyio.to_thread.run_sync(
            read_docker_archive, path, base.ref
        )
        scratch = self.cache_dir / "downloads" / f"archive-{os.getpid()}-{image.digest[7:19]}"
        return self._local(DockerArchiveSource(archive, image, members, scratch), image.digest)

    def _local(self, source: ImageSource, digest: str) -> PreparedBase:
        async def populate(staging: Path, owner: str) -> tuple[ImageConfig, list[str]]:
            layers = await lay_down(
                source, self.blobs, staging, owner=owner, progress=self.progress, locks=self.locks
            )
            return image_config(source.config), layers

        return PreparedBase(
            key={"image": digest}, description=source.description, populate=populate
        )

    # -- stage 1: content --------------------------------------------------------------

    async def _content_key(self, loaded: LoadedTemplate, pull: bool) -> tuple[PreparedBase, str]:
        """The prepared base and the content key (computed once per builder)."""
        if self._prepared is None:
            prepared = await self.prepare_base(loaded, pull)
            key = await anyio.to_thread.run_sync(content_key, loaded, prepared.key)
            self._prepared = (prepared, key)
        return self._prepared

    async def _rootfs_key(self, content_key: str) -> tuple[Path, str, str]:
        agent = rootfs.agent_binary()
        agent_sha = await agent_digest_async(agent)
        key = f"{content_key}\0{agent_sha}\0{rootfs.LAYOUT_VERSION}"
        return agent, agent_sha, hashlib.sha256(key.encode()).hexdigest()

    async def lookup(self, loaded: LoadedTemplate, *, pull: bool) -> BuildRecord | None:
        """The cached rootfs record for these inputs, if any (takes no references)."""
        _, ckey = await self._content_key(loaded, pull)
        _, _, key = await self._rootfs_key(ckey)
        return await self._read(key, BuildRecord)

    async def content(self, loaded: LoadedTemplate, owner: str, *, pull: bool) -> ContentRecord:
        prepared, key = await self._content_key(loaded, pull)
        cached = await self._read(key, ContentRecord)
        if cached and await self._hold(owner, [cached.tree, *cached.layers]):
            return cached
        async with self.lock(key):
            cached = await self._read(key, ContentRecord)
            if cached and await self._hold(owner, [cached.tree, *cached.layers]):
                return cached
            started = time.monotonic()
            async with self.staging("content") as staging:
                config, layers = await self._lay_down(loaded, prepared, staging, owner)
                self.progress(Progress(step="commit", message="hashing and storing the tree"))
                tree = await self.blobs.put_tree(staging, owner=owner)
            record = ContentRecord(
                key=key,
                tree=tree.digest,
                layers=layers,
                base=prepared.description,
                config=config,
                built_at=time.time(),
                seconds=round(time.monotonic() - started, 3),
            )
            await self._write(key, record)
            return record

    async def _lay_down(
        self, loaded: LoadedTemplate, prepared: PreparedBase, staging: Path, owner: str
    ) -> tuple[ImageConfig, list[str]]:
        t = loaded.template
        self.progress(Progress(step="base", message=prepared.description))
        config, layers = await prepared.populate(staging, owner)
        if t.packages and not prepared.handles_packages:
            await debian.apt_install(staging, t.packages, self.progress, upgrade=False)
        await anyio.to_thread.run_sync(ensure_mountpoints, staging)
        if t.files:
            self.progress(Progress(step="files", message=f"copying {len(t.files)} entries"))
            await anyio.to_thread.run_sync(copy_files, loaded, staging)
        env = {**config.env, **t.env}
        if t.build:
            self.progress(Progress(step="build", message="running the build script"))
            await run_in_rootfs(
                staging, [*t.shell, t.build], step="build", progress=self.progress, env=env
            )
        await anyio.to_thread.run_sync(debian.clean_rootfs, staging)
        if t.warmup:
            self.progress(Progress(step="warmup", message="checking the warm-up script runs"))
            await run_in_rootfs(
                staging,
                [*t.shell, t.warmup],
                step="warmup",
                progress=self.progress,
                env=env,
                network=False,
                read_only=True,
            )
        return config, layers

    # -- stage 2: rootfs and ext4 ------------------------------------------------------

    async def rootfs(
        self, loaded: LoadedTemplate, owner: str, *, ext4: bool, pull: bool
    ) -> BuildRecord:
        """Builds what is missing of the template's rootfs (and ext4 image)."""
        try:
            return await self._rootfs(loaded, owner, ext4=ext4, pull=pull)
        except OSError as e:
            # Staging directories are gone by now; what was stored before is intact.
            if is_disk_full(e):
                raise DiskFullError(f"building {loaded.template.id}", e.filename) from e
            raise

    async def _rootfs(
        self, loaded: LoadedTemplate, owner: str, *, ext4: bool, pull: bool
    ) -> BuildRecord:
        content = await self.content(loaded, owner, pull=pull)
        agent, agent_sha, key = await self._rootfs_key(content.key)
        record = await self._cached_rootfs(key, owner)
        if record is None:
            async with self.lock(key):
                record = await self._cached_rootfs(key, owner) or await self._build_rootfs(
                    key, content, agent, agent_sha, owner
                )
        if ext4 and record.ext4 is None:
            async with self.lock(key):
                fresh = await self._cached_rootfs(key, owner) or record
                record = fresh if fresh.ext4 else await self._build_ext4(fresh, owner)
        return record

    async def _cached_rootfs(self, key: str, owner: str) -> BuildRecord | None:
        """The cached record with its blobs held for `owner` (ext4 None if it is gone)."""
        record = await self._read(key, BuildRecord)
        if record is None:
            return None
        if record.ext4 and not await self._hold(owner, [record.ext4]):
            record = msgspec.structs.replace(record, ext4=None)
        return record if await self._hold(owner, record.digests()) else None

    async def _build_rootfs(
        self, key: str, content: ContentRecord, agent: Path, agent_sha: str, owner: str
    ) -> BuildRecord:
        started = time.monotonic()
        self.progress(Progress(step="agent", message=f"injecting {agent}"))
        source = await self.blobs.local_path(content.tree)
        async with self.staging("rootfs") as staging:

            def prepare() -> int:
                fsutil.remove_tree(staging)
                fsutil.hardlink_copy(source, staging)
                rootfs.inject_agent(staging, agent)
                rootfs.ensure_etc_hosts(staging)
                return sum(1 for _ in fsutil.walk(staging))

            files = await anyio.to_thread.run_sync(prepare)
            self.progress(Progress(step="commit", message="storing the rootfs"))
            tree = await self.blobs.put_tree(staging, owner=owner)
        record = BuildRecord(
            key=key,
            content=content,
            rootfs=tree.digest,
            agent=agent_sha,
            size=tree.size,
            files=files,
            built_at=time.time(),
            seconds=round(time.monotonic() - started, 3),
        )
        await self._write(key, record)
        return record

    async def _build_ext4(self, record: BuildRecord, owner: str) -> BuildRecord:
        self.progress(Progress(step="ext4", message="making the ext4 image"))
        tree = await self.blobs.local_path(record.rootfs)
        async with self.staging("ext4") as staging:
            image = staging / "rootfs.ext4"
            await rootfs.make_ext4(tree, image, seed=record.key, progress=self.progress)
            info = await self.blobs.put_file(
                image, owner=owner, media_type=EXT4_MEDIA_TYPE, move=True
            )
        record = msgspec.structs.replace(record, ext4=info.digest)
        await self._write(record.key, record)
        return record
