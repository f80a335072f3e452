"""OCI images end to end against a real registry (Debian's docker-registry, started
per test module on a loopback port): push, pull with negotiation and platform
selection, digest verification, resumed downloads, bearer-token auth, local layouts and
docker-archive tarballs, hostile layers, and garbage collection of shared layers."""

from __future__ import annotations

import functools
import json
import os
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import anyio
import anyio.to_thread
import pytest

from tartarus.images import digest as digests
from tartarus.images.errors import (
    DigestMismatchError,
    DiskFullError,
    HostileArchiveError,
    ManifestError,
    RegistryError,
)
from tartarus.images.oci import manifest as m
from tartarus.images.oci.auth import Credentials
from tartarus.images.oci.reference import parse_reference
from tartarus.images.oci.registry import RegistryClient
from tartarus.images.progress import Progress
from tartarus.images.scaffold import origin_template, render
from tartarus.images.store import TemplateStore
from tests.conftest import require_binary, require_root
from tests.support.archives import directory, file, make_tar, symlink
from tests.support.images import run_in_gvisor, tmp_store
from tests.support.registry import (
    BuiltImage,
    Registry,
    local_registry,
    make_image,
    push_image,
    token_service,
    write_layout,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with local_registry(tmp_path_factory.mktemp("registry")) as r:
        yield r


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def busybox_layer() -> bytes:
    """A layer with the host's static busybox as /bin/busybox and /bin/sh."""
    require_binary("busybox")
    data = Path("/bin/busybox").read_bytes()
    return make_tar(
        [
            directory("bin"),
            file("bin/busybox", data, mode=0o755),
            symlink("bin/sh", "busybox"),
            symlink("bin/cat", "busybox"),
            symlink("bin/ls", "busybox"),
            symlink("bin/mkdir", "busybox"),
            directory("etc"),
            file("etc/remove-me", b"lower layer\n"),
            directory("opt/dir"),
            file("opt/dir/old", b"old\n"),
        ]
    )


def top_layer(greeting: bytes) -> bytes:
    return make_tar(
        [
            file("etc/greeting", greeting),
            file("etc/.wh.remove-me"),
            file("opt/dir/.wh..wh..opq"),
            file("opt/dir/new", b"new\n"),
        ]
    )


def busybox_image(greeting: bytes = b"hello from the registry\n") -> BuiltImage:
    return make_image([busybox_layer(), top_layer(greeting)], env=["PATH=/bin", "FROM_IMAGE=1"])


def template_file(directory: Path, name: str, base: str, extra: str = "") -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(f"id: {name}\nbase: {base}\nshell: [/bin/sh, -c]\n{textwrap.dedent(extra)}")
    return path


async def test_pushed_image_is_pulled_verified_and_runs(
    tmp_path: Path, registry: Registry, session: aiohttp.ClientSession
) -> None:
    """Acceptance: an image pushed to the local registry is pulled, verified and runs."""
    require_root()
    image = busybox_image()
    await push_image(session, f"{registry.host}/test/busybox:1", image, tmp_path / "push")
    path = template_file(
        tmp_path, "bb", f"{{kind: oci, image: '{registry.host}/test/busybox:1'}}", "env: {A: b}\n"
    )
    events: list[Progress] = []
    store = tmp_store(tmp_path / "store")
    t = await store.build(path, progress=events.append)
    root = t.rootfs
    assert (root / "etc/greeting").read_bytes() == b"hello from the registry\n"
    assert not (root / "etc/remove-me").exists()
    assert sorted(p.name for p in (root / "opt/dir").iterdir()) == ["new"]
    assert t.manifest.layers == image.layer_digests()
    assert t.manifest.base == f"{registry.host}/test/busybox@{image.digest}"
    assert t.manifest.env == {"PATH": "/bin", "FROM_IMAGE": "1", "A": "b"}
    assert t.manifest.cmd == ["/bin/sh"]
    downloaded = {e.item for e in events if e.step == "download"}
    assert set(image.layer_digests()) <= downloaded
    result = run_in_gvisor(root, ["/bin/sh", "-c", "cat /etc/greeting"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello from the registry\n"


async def test_zstd_image_is_pulled_and_unpacked(
    tmp_path: Path, registry: Registry, session: aiohttp.ClientSession
) -> None:
    require_root()
    image = make_image([busybox_layer(), top_layer(b"zstd\n")], zstd=True)
    ref = f"{registry.host}/test/zstd:1"
    await push_image(session, ref, image, tmp_path / "push")
    path = template_file(tmp_path, "zstd", f"{{kind: oci, image: '{ref}'}}")
    t = await tmp_store(tmp_path / "store").build(path, ext4=False)
    assert (t.rootfs / "etc/greeting").read_bytes() == b"zstd\n"
    assert not (t.rootfs / "etc/remove-me").exists()


async def test_tag_is_pinned_until_pull(
    tmp_path: Path, registry: Registry, session: aiohttp.ClientSession
) -> None:
    require_root()
    ref = f"{registry.host}/test/pinned:latest"
    first = busybox_image(b"first\n")
    await push_image(session, ref, first, tmp_path / "push")
    path = template_file(tmp_path, "pinned", f"{{kind: oci, image: '{ref}'}}")
    store = tmp_store(tmp_path / "store")
    t1 = await store.build(path, ext4=False)
    second = busybox_image(b"second\n")
    await push_image(session, ref, second, tmp_path / "push")
    t2 = await store.resolve("pinned", ext4=False)
    assert t2.manifest.key == t1.manifest.key  # the pinned digest, no lookup
    t3 = await store.resolve("pinned", ext4=False, pull=True)
    assert (t3.rootfs / "etc/greeting").read_bytes() == b"second\n"
    assert t3.manifest.base.endswith(second.digest)


async def test_tampered_blob_is_rejected(
    tmp_path: Path, registry: Registry, session: aiohttp.ClientSession
) -> None:
    require_root()
    image = busybox_image(b"tamper me\n")
    ref = f"{registry.host}/test/tampered:1"
    await push_image(session, ref, image, tmp_path / "push")
    top = image.layer_digests()[1]
    data = registry.blob_data(top)
    data.write_bytes(data.read_bytes()[:-8] + b"\0" * 8)
    store = tmp_store(tmp_path / "store")
    path = template_file(tmp_path, "tampered", f"{{kind: oci, image: '{ref}'}}")
    with pytest.raises(DigestMismatchError, match=top):
        await store.build(path)
    assert not await store.blobs.has(top)
    assert list((tmp_path / "store/state/images/trees/sha256").iterdir()) == []
    # The tampered download is dropped (another layer cut short may stay, to resume).
    downloads = tmp_path / "store/cache/images/downloads"
    assert not (downloads / f"{digests.hex_of(top)}.partial").exists()
    assert not (downloads / digests.hex_of(top)).exists()


async def test_cut_download_resumes(
    tmp_path: Path, registry: Registry, session: aiohttp.ClientSession
) -> None:
    require_root()
    image = busybox_image(b"resume\n")
    ref = f"{registry.host}/test/resume:1"
    await push_image(session, ref, image, tmp_path / "push")
    base_layer = image.layers[0]
    digest = digests.of_bytes(base_layer)
    downloads = tmp_path / "store/cache/images/downloads"
    downloads.mkdir(parents=True)
    half = len(base_layer) // 2
    (downloads / f"{digests.hex_of(digest)}.partial").write_bytes(base_layer[:half])
    # A partial file that is not a prefix of the blob: detected, fetched again.
    top = image.layer_digests()[1]
    (downloads / f"{digests.hex_of(top)}.partial").write_bytes(b"garbage")
    events: list[Progress] = []
    store = tmp_store(tmp_path / "store")
    path = template_file(tmp_path, "resume", f"{{kind: oci, image: '{ref}'}}")
    t = await store.build(path, ext4=False, progress=events.append)
    first = next(e for e in events if e.step == "download" and e.item == digest)
    assert first.done is not None and first.done > half  # went on from the partial file
    assert (t.rootfs / "etc/greeting").read_bytes() == b"resume\n"
    assert (await store.blobs.stat(digest)).size == len(base_layer)


async def test_index_selects_this_hosts_platform(
    tmp_path: Path, registry: Registry, session: aiohttp.ClientSession
) -> None:
    require_root()
    native = busybox_image(b"native\n")
    other = make_image([make_tar([file("etc/greeting", b"foreign\n")])])
    ref = parse_reference(f"{registry.host}/test/multi:1")
    client = RegistryClient(session)
    for img, tag in ((native, "native"), (other, "other")):
        await push_image(session, f"{registry.host}/test/multi:{tag}", img, tmp_path / "push")
    host = m.host_platform_default()
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": m.OCI_INDEX,
            "manifests": [
                {
                    "mediaType": m.OCI_MANIFEST,
                    "digest": other.digest,
                    "size": len(other.manifest),
                    "platform": {"os": "linux", "architecture": "s390x"},
                },
                {
                    "mediaType": m.OCI_MANIFEST,
                    "digest": native.digest,
                    "size": len(native.manifest),
                    "platform": {"os": host.os, "architecture": host.architecture},
                },
            ],
        }
    ).encode()
    await client.push_manifest(ref, index, m.OCI_INDEX)
    pulled = await client.resolve(ref, host)
    assert pulled.digest == native.digest
    s390x = await client.resolve(ref, m.parse_platform("linux/s390x"))
    assert s390x.digest == other.digest
    with pytest.raises(ManifestError, match="linux/s390x"):
        await client.resolve(ref, m.parse_platform("linux/riscv64"))
    store = tmp_store(tmp_path / "store")
    path = template_file(tmp_path, "multi", f"{{kind: oci, image: '{ref}'}}")
    t = await store.build(path, ext4=False)
    assert (t.rootfs / "etc/greeting").read_bytes() == b"native\n"


async def test_bearer_token_auth(
    tmp_path: Path, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_root()
    async with token_service(tmp_path) as auth:
        with local_registry(tmp_path / "registry", auth) as reg:
            creds = Credentials(auth.username, auth.password)
            ref = parse_reference(f"{reg.host}/private/busybox:1")
            image = busybox_image(b"behind auth\n")
            pusher = RegistryClient(session, credentials={reg.host: creds})
            for blob in [image.config, *image.layers]:
                blob_path = tmp_path / digests.hex_of(digests.of_bytes(blob))
                blob_path.write_bytes(blob)
                await pusher.push_blob(ref, blob_path, digests.of_bytes(blob))
            await pusher.push_manifest(ref, image.manifest, m.OCI_MANIFEST)
            assert auth.issued >= 1

            anonymous = RegistryClient(session)
            monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))
            with pytest.raises(RegistryError, match="token service"):
                await anonymous.resolve(ref, m.host_platform_default())

            # Credentials from Docker's config.json, as `docker login` writes them.
            docker_config = tmp_path / "docker"
            docker_config.mkdir()
            (docker_config / "config.json").write_text(
                json.dumps({"auths": {reg.host: {"auth": creds.basic().removeprefix("Basic ")}}})
            )
            monkeypatch.setenv("DOCKER_CONFIG", str(docker_config))
            store = tmp_store(tmp_path / "store")
            path = template_file(tmp_path, "private", f"{{kind: oci, image: '{ref}'}}")
            t = await store.build(path, ext4=False)
            assert (t.rootfs / "etc/greeting").read_bytes() == b"behind auth\n"
            assert auth.password not in repr(creds)


async def test_oci_layout_and_docker_archive_give_the_same_rootfs(
    tmp_path: Path, registry: Registry, session: aiohttp.ClientSession
) -> None:
    require_root()
    skopeo = require_binary("skopeo")
    image = busybox_image(b"same everywhere\n")
    ref = f"{registry.host}/test/same:1"
    await push_image(session, ref, image, tmp_path / "push")
    write_layout(tmp_path / "layout", image, "v1")
    archive = tmp_path / "image.tar"
    await anyio.run_process(
        [
            skopeo, "copy", "--quiet", "--src-tls-verify=false", f"docker://{ref}",
            f"docker-archive:{archive}:test/same:1",
        ]
    )  # fmt: skip
    store = tmp_store(tmp_path / "store")
    trees = set()
    for name, base in (
        ("from-registry", f"{{kind: oci, image: '{ref}'}}"),
        ("from-layout", "{kind: oci-layout, path: layout, ref: v1}"),
        ("from-archive", "{kind: docker-archive, path: image.tar}"),
    ):
        t = await store.build(template_file(tmp_path, name, base), ext4=False)
        assert (t.rootfs / "etc/greeting").read_bytes() == b"same everywhere\n"
        record = json.loads(
            (tmp_path / "store/state/images/builds" / f"{t.manifest.key}.json").read_bytes()
        )
        trees.add(record["content"]["tree"])
    assert len(trees) == 1  # one content tree, stored once


async def test_dockerfile_like_template_builds_from_the_registry(
    tmp_path: Path, registry: Registry, session: aiohttp.ClientSession
) -> None:
    require_root()
    ref = f"{registry.host}/test/dockerfile:1"
    await push_image(session, ref, busybox_image(b"df\n"), tmp_path / "push")
    (tmp_path / "app.txt").write_text("app\n")
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(
        f"FROM {ref}\nENV MODE=test\nWORKDIR /srv\nRUN echo ran in $MODE > /ran\n"
        'COPY app.txt ./\nCMD ["/bin/sh"]\n'
    )
    path = tmp_path / "df.yaml"
    template = origin_template("df", f"dockerfile:{dockerfile}", tmp_path)
    path.write_text(render(template, "dockerfile"))
    t = await tmp_store(tmp_path / "store").build(path, ext4=False)
    assert (t.rootfs / "ran").read_text() == "ran in test\n"
    assert (t.rootfs / "srv/app.txt").read_text() == "app\n"
    assert t.manifest.workdir == "/srv"
    assert t.manifest.env["MODE"] == "test"


async def test_hostile_layer_from_a_registry_is_rejected(
    tmp_path: Path, registry: Registry, session: aiohttp.ClientSession
) -> None:
    require_root()
    evil = make_tar([directory("etc"), file("etc/../../../escaped", b"x")])
    image = make_image([busybox_layer(), evil])
    ref = f"{registry.host}/test/evil:1"
    await push_image(session, ref, image, tmp_path / "push")
    store = tmp_store(tmp_path / "store")
    path = template_file(tmp_path, "evil", f"{{kind: oci, image: '{ref}'}}")
    with pytest.raises(HostileArchiveError, match=r"'\.\.' in path"):
        await store.build(path)
    assert not await anyio.to_thread.run_sync(lambda: list(tmp_path.rglob("escaped")))
    assert list((tmp_path / "store/state/images/trees/sha256").iterdir()) == []


async def test_remove_collects_unshared_blobs_and_keeps_shared_layers(
    tmp_path: Path, registry: Registry, session: aiohttp.ClientSession
) -> None:
    require_root()
    one, two = busybox_image(b"one\n"), busybox_image(b"two\n")
    shared = one.layer_digests()[0]
    assert shared == two.layer_digests()[0]
    for name, img in (("one", one), ("two", two)):
        await push_image(session, f"{registry.host}/test/{name}:1", img, tmp_path / "push")
    store = tmp_store(tmp_path / "store")
    built = {}
    for name in ("one", "two"):
        path = template_file(
            tmp_path, name, f"{{kind: oci, image: '{registry.host}/test/{name}:1'}}"
        )
        built[name] = await store.build(path)
    assert (await store.blobs.stat(shared)).refs == 2

    only_one = one.layer_digests()[1]
    one_files: list[Path | None] = [
        built["one"].rootfs,
        built["one"].ext4,
        await store.blobs.local_path(only_one),
    ]
    shared_path = await store.blobs.local_path(shared)
    report = await store.remove("one")
    assert report.unregistered
    assert only_one in report.gc.removed
    for gone in one_files:
        assert gone is not None and not gone.exists()
    assert shared_path.is_file()
    assert await store.blobs.owners(shared) == ["template:two"]
    assert built["two"].rootfs.is_dir()
    again = await store.resolve("two")
    assert again.rootfs == built["two"].rootfs
    assert "one" not in {i.id for i in await store.list()}


async def test_unreachable_registry_is_a_clear_error(tmp_path: Path) -> None:
    store: TemplateStore = tmp_store(tmp_path / "store")
    path = template_file(tmp_path, "gone", "{kind: oci, image: '127.0.0.1:9/none/such:1'}")
    with pytest.raises((RegistryError, aiohttp.ClientError, OSError)):
        await store.build(path)


@pytest.mark.timeout(120)
async def test_full_disk_is_a_clear_error_and_keeps_what_was_stored(tmp_path: Path) -> None:
    require_root()
    small = busybox_image(b"fits\n")
    big = make_image([busybox_layer(), make_tar([file("data/big", os.urandom(24 << 20))])])
    write_layout(tmp_path / "small", small, "v1")
    write_layout(tmp_path / "big", big, "v1")
    disk = tmp_path / "disk"
    disk.mkdir()
    await anyio.run_process(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(disk)])
    try:
        store = tmp_store(disk)
        fits = await store.build(
            template_file(tmp_path, "fits", "{kind: oci-layout, path: small, ref: v1}"), ext4=False
        )
        with pytest.raises(DiskFullError, match="no space left"):
            await store.build(
                template_file(tmp_path, "big", "{kind: oci-layout, path: big, ref: v1}"),
                ext4=False,
            )
        assert list((disk / "state/images/tmp").iterdir()) == []  # staging cleaned up
        again = await store.resolve("fits", ext4=False)
        assert again.rootfs == fits.rootfs
        assert (again.rootfs / "etc/greeting").read_bytes() == b"fits\n"
        store.close()
    finally:
        await anyio.run_process(["umount", str(disk)])


async def test_concurrent_pulls_of_one_image_fetch_each_layer_once(
    tmp_path: Path, registry: Registry, session: aiohttp.ClientSession
) -> None:
    require_root()
    image = busybox_image(b"together\n")
    ref = f"{registry.host}/test/together:1"
    await push_image(session, ref, image, tmp_path / "push")
    store = tmp_store(tmp_path / "store")
    events: list[Progress] = []
    paths = [
        template_file(tmp_path, name, f"{{kind: oci, image: '{ref}'}}", f"env: {{WHO: {name}}}\n")
        for name in ("left", "right")
    ]
    async with anyio.create_task_group() as tg:
        for path in paths:
            tg.start_soon(functools.partial(store.build, path, ext4=False, progress=events.append))
    for digest in image.layer_digests():
        assert (await store.blobs.stat(digest)).refs == 2
        finished = [
            e for e in events if e.step == "download" and e.item == digest and e.done == e.total
        ]
        assert len(finished) == 1  # fetched by one build, found in the store by the other
