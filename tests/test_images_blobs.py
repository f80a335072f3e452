"""The content-addressed blob store: dedup, references, garbage collection, and
crash/concurrency safety."""

from __future__ import annotations

import hashlib
import multiprocessing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio
import pytest

from tartarus.images.blobs import BlobKind, BlobStore, LocalBlobStore
from tartarus.images.errors import BlobNotFoundError, DigestMismatchError
from tartarus.images.fsutil import atomic_write, remove_tree

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def test_put_file_dedups_and_counts_references(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "store")
    assert isinstance(store, BlobStore)
    src = tmp_path / "a"
    src.write_bytes(b"hello")
    a = await store.put_file(src, owner="template:a")
    b = await store.put_file(src, owner="template:b", expected=sha(b"hello"))
    assert a.digest == b.digest == sha(b"hello")
    assert b.refs == 2
    path = await store.local_path(a.digest)
    assert path.read_bytes() == b"hello"
    assert path.stat().st_mode & 0o222 == 0
    assert src.exists()  # copied, not moved
    assert await store.owners(a.digest) == ["template:a", "template:b"]


async def test_digest_mismatch_stores_nothing(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "store")
    src = tmp_path / "a"
    src.write_bytes(b"tampered")
    with pytest.raises(DigestMismatchError):
        await store.put_file(src, owner="o", expected=sha(b"original"))
    assert await store.list_blobs() == []
    assert list((tmp_path / "store" / "tmp").iterdir()) == []


async def test_release_then_gc_deletes_only_unreferenced(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "store")
    shared, only_a = tmp_path / "shared", tmp_path / "only_a"
    shared.write_bytes(b"shared layer")
    only_a.write_bytes(b"a's layer")
    s = await store.put_file(shared, owner="template:a")
    await store.add_refs("template:b", [s.digest])
    a = await store.put_file(only_a, owner="template:a")
    staging = await store.new_staging("tree")
    (staging / "etc").mkdir()
    (staging / "etc" / "hostname").write_text("a")
    tree = await store.put_tree(staging, owner="template:a")
    assert tree.kind is BlobKind.TREE
    tree_path = await store.local_path(tree.digest)
    assert (tree_path / "etc" / "hostname").read_text() == "a"
    assert not staging.exists()

    assert await store.release("template:a") == 3
    report = await store.gc()
    assert sorted(report.removed) == sorted([a.digest, tree.digest])
    assert not tree_path.exists()
    assert not await store.has(a.digest)
    assert (await store.local_path(s.digest)).read_bytes() == b"shared layer"
    assert await store.refs("template:b") == [s.digest]


async def test_each_gc_that_releases_reports_what_its_owner_alone_held(tmp_path: Path) -> None:
    # A snapshot prune and a sandbox's release collect at once: each report names the
    # blobs its own owner freed, whichever gc runs first, and sweeping one trash from
    # two threads is not an error.
    store = LocalBlobStore(tmp_path / "store")
    owned: dict[str, str] = {}
    for i in range(12):
        staging = await store.new_staging("tree")
        for j in range(50):
            (staging / f"f{j}").write_text(f"{i}-{j}")
        owned[f"snapshot:{i}"] = (await store.put_tree(staging, owner=f"snapshot:{i}")).digest
    reports: dict[str, list[str]] = {}

    async def collect(owner: str) -> None:
        report = await store.gc(release=[owner])
        reports[owner] = report.removed
        assert report.freed_bytes > 0

    async with anyio.create_task_group() as tg:
        for owner in owned:
            tg.start_soon(collect, owner)
    assert reports == {owner: [digest] for owner, digest in owned.items()}
    assert await store.list_blobs() == []
    assert list((tmp_path / "store" / "trash").iterdir()) == []


def test_two_removers_of_one_tree_both_succeed(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for i in range(40):
        (tree / f"d{i}").mkdir(parents=True)
        for j in range(40):
            (tree / f"d{i}" / f"f{j}").write_bytes(b"x")
    (tree / "d0").chmod(0o500)  # read-only: the retry path runs too
    with ThreadPoolExecutor(4) as pool:
        for done in [pool.submit(remove_tree, tree) for _ in range(4)]:
            done.result()
    assert not tree.exists()


async def test_take_if_held_takes_all_or_nothing(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "store")
    blobs = []
    for name in ("layer", "rootfs", "ext4"):
        f = tmp_path / name
        f.write_bytes(name.encode())
        blobs.append((await store.put_file(f, owner="template:t")).digest)
    layer, rootfs, ext4 = blobs
    assert await store.take_if_held("sandbox:a", [rootfs], holder="template:t", held=blobs)
    assert await store.refs("sandbox:a") == [rootfs]
    # No owner: only the question.
    assert await store.take_if_held(None, [rootfs], holder="template:t", held=[layer, layer])
    # The template was rebuilt without the ext4 image: a sandbox takes nothing.
    await store.set_refs("template:t", [layer, rootfs])
    assert not await store.take_if_held("sandbox:b", [ext4], holder="template:t", held=blobs)
    assert await store.refs("sandbox:b") == []
    assert not await store.take_if_held(
        "sandbox:c", [rootfs], holder="template:gone", held=[rootfs]
    )
    assert await store.refs("sandbox:c") == []


async def test_set_refs_replaces_and_requires_existing_blobs(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "store")
    f = tmp_path / "f"
    f.write_bytes(b"x")
    info = await store.put_file(f, owner="lease:1")
    await store.set_refs("template:t", [info.digest])
    with pytest.raises(BlobNotFoundError):
        await store.set_refs("template:t", [sha(b"missing")])
    assert await store.refs("template:t") == [info.digest]  # unchanged by the failure
    await store.set_refs("template:t", [])
    assert await store.refs("template:t") == []


async def test_identical_trees_share_one_blob(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "store")
    digests = []
    for owner in ("a", "b"):
        staging = await store.new_staging("t")
        (staging / "f").write_text("same")
        digests.append((await store.put_tree(staging, owner=owner)).digest)
    assert digests[0] == digests[1]
    assert (await store.stat(digests[0])).refs == 2


async def test_lease_is_released_and_stale_leases_are_collected(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "store")
    f = tmp_path / "f"
    f.write_bytes(b"building")
    async with store.lease() as owner:
        info = await store.put_file(f, owner=owner)
        assert (await store.stat(info.digest)).refs == 1
    assert (await store.stat(info.digest)).refs == 0

    # A lease of a process that died (pid 2**22+1 does not exist) is stale.
    dead = "lease:4194305:deadbeef"
    await store.add_refs(dead, [info.digest])
    leftover = tmp_path / "store" / "tmp" / "4194305-abc-tree"
    leftover.mkdir()
    report = await store.gc()
    assert report.stale_leases == [dead]
    assert report.removed == [info.digest]
    assert not leftover.exists()


async def test_uncommitted_leftovers_are_invisible_and_swept(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "store")
    # As if a process died between rename and commit.
    orphan = tmp_path / "store" / "blobs" / "sha256" / ("ab" * 32)
    orphan.write_bytes(b"half")
    assert not await store.has("sha256:" + "ab" * 32)
    await store.gc()
    assert not orphan.exists()


def _put_many(root: str, n: int, seed: int) -> None:
    async def main() -> None:
        store = LocalBlobStore(Path(root))
        for i in range(n):
            p = Path(root).parent / f"src-{seed}-{i}"
            p.write_bytes(f"blob {i % 5}".encode())
            info = await store.put_file(p, owner=f"template:{seed}-{i}", move=True)
            assert (await store.local_path(info.digest)).read_bytes() == f"blob {i % 5}".encode()

    anyio.run(main)


def _gc_many(root: str, n: int) -> None:
    async def main() -> None:
        store = LocalBlobStore(Path(root))
        for _ in range(n):
            await store.gc()

    anyio.run(main)


@pytest.mark.timeout(120)
def test_concurrent_commits_and_gc_never_lose_referenced_blobs(tmp_path: Path) -> None:
    root = tmp_path / "store"
    LocalBlobStore(root)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_put_many, args=(str(root), 40, s)) for s in range(3)]
    procs.append(ctx.Process(target=_gc_many, args=(str(root), 40)))
    for p in procs:
        p.start()
    for p in procs:
        p.join(100)
        assert p.exitcode == 0

    async def check() -> None:
        store = LocalBlobStore(root)
        blobs = await store.list_blobs()
        assert len(blobs) == 5
        for b in blobs:
            assert b.refs == 24
            assert (await store.local_path(b.digest)).is_file()

    anyio.run(check)


async def test_concurrent_atomic_writes_of_one_file_all_land(tmp_path: Path) -> None:
    """Tasks of one process pinning the same template at once write one pin file through
    worker threads: each write needs a temp file of its own, or one renames another's
    away (FileNotFoundError) or publishes a half-written file."""
    target = tmp_path / "pins" / "template.json"
    contents = {bytes([65 + i]) * 4096 for i in range(8)}

    async def writer(data: bytes) -> None:
        for _ in range(25):
            await anyio.to_thread.run_sync(atomic_write, target, data)

    async with anyio.create_task_group() as tg:
        for data in contents:
            tg.start_soon(writer, data)
    assert target.read_bytes() in contents
    assert [p.name for p in target.parent.iterdir()] == ["template.json"]  # no temp files left
