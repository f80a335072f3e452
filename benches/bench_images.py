"""Erebus: template cache hits, and pulling + unpacking a ~50 MB image from a local
registry, against skopeo and tar.

- cache hit: `TemplateStore.resolve("base")` of an already built, unchanged template
  (the API the backends call) and `tartarus template build base` (the CLI, process
  start included). Target: under 1 s.
- pull + unpack: an image of three gzip layers (~50 MB compressed: random data, which
  does not compress, and 3000 small files) pushed to Debian's docker-registry on
  loopback. Ours: manifest, parallel verified layer downloads into the blob store, and
  the hardened unpacker, into an empty store every run. Peer: `skopeo copy docker://...
  oci:DIR` (pull and verify), then `tar -xzf` of each layer (unpack). Also unpack alone:
  our unpacker against `tar -xzf` on the same layer files. MB/s of compressed bytes.

- cold builds: `base` and `python` from empty caches (what CI and a fresh machine pay).

Run: `python -m benches.bench_images` (as root: builds Debian templates).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import anyio
from tests.support.archives import directory, file, make_tar, symlink
from tests.support.images import tmp_store
from tests.support.registry import BuiltImage, local_registry, make_image, push_image

from benches.harness import Stats, measure, measure_async, ratio, report, write_result
from tartarus.images.blobs import LocalBlobStore
from tartarus.images.oci import manifest as m
from tartarus.images.oci.image import RegistrySource, lay_down, unpack_layer
from tartarus.images.oci.reference import parse_reference
from tartarus.images.oci.registry import RegistryClient
from tartarus.images.progress import ignore
from tartarus.images.tar import TarLimits

RUNS = 5
HIT_RUNS = 20
MB = 1_000_000


def bench_image() -> BuiltImage:
    rng = os.urandom
    base = make_tar(
        [
            directory("bin"),
            file("bin/busybox", Path("/bin/busybox").read_bytes(), mode=0o755),
            symlink("bin/sh", "busybox"),
            directory("data"),
            file("data/blob-a", rng(24 * MB)),
        ]
    )
    middle = make_tar([file("data/blob-b", rng(16 * MB)), file("data/.wh.blob-a")])
    small = make_tar([directory("srv"), *(file(f"srv/f{i:05}", rng(3000)) for i in range(3000))])
    return make_image([base, middle, small])


def stats_mbps(stats: Stats, size: int) -> float:
    return round(size / MB / (stats.p50_ms / 1000), 1)


async def cold_builds(work: Path) -> dict[str, float]:
    """First builds of `base` and `python` with empty caches, as on a fresh machine
    (packages come from Debian's mirror)."""
    out = {}
    for template in ("base", "python"):
        store = tmp_store(work / f"cold-{template}")
        started = time.perf_counter()
        await store.resolve(template)
        out[template] = round(time.perf_counter() - started, 1)
        shutil.rmtree(work / f"cold-{template}")
        print(f"cold build of {template}: {out[template]} s")
    return out


async def cache_hits(work: Path) -> dict[str, Any]:
    store = tmp_store(work / "hit-store")
    started = time.perf_counter()
    await store.resolve("base")
    first = time.perf_counter() - started
    api = await measure_async(functools.partial(store.resolve, "base"), runs=HIT_RUNS)
    env = {
        **os.environ,
        "TARTARUS_CACHE_DIR": str(work / "hit-store/cache"),
        "TARTARUS_STATE_DIR": str(work / "hit-store/state"),
    }
    cli = [str(Path(sys.executable).parent / "tartarus"), "template", "build", "base", "--json"]
    cli_stats = measure(
        lambda: subprocess.run(cli, env=env, check=True, capture_output=True), runs=5, warmup=1
    )
    print(f"cache hit: first build {first:.2f} s; resolve p50 {api.p50_ms:.1f} ms; "
          f"`tartarus template build base` p50 {cli_stats.p50_ms:.0f} ms")  # fmt: skip
    return {
        "first_build_s": round(first, 2),
        "resolve": api,
        "cli_build": cli_stats,
        "resolve_under_1s": api.max_ms < 1000,
        "cli_under_1s": cli_stats.max_ms < 1000,
    }


async def pull_and_unpack(work: Path, image: BuiltImage) -> dict[str, Any]:
    size = sum(len(layer) for layer in image.layers)
    print(f"image: {len(image.layers)} layers, {size / MB:.1f} MB compressed")
    with local_registry(work / "registry") as registry:
        ref_text = f"{registry.host}/bench/image:1"
        async with aiohttp.ClientSession() as session:
            await push_image(session, ref_text, image, work / "push")
            ref = parse_reference(ref_text)
            platform = m.host_platform_default()

            async def ours() -> None:
                run = Path(tempfile.mkdtemp(dir=work))
                try:
                    client = RegistryClient(session)
                    pulled = await client.resolve(ref, platform)
                    config = m.parse_config(await client.get_config(ref, pulled.manifest.config))
                    blobs = LocalBlobStore(run / "store")
                    source = RegistrySource(client, ref, pulled.manifest, config, run / "dl")
                    root = await blobs.new_staging("bench")
                    await lay_down(
                        source, blobs, root, owner="bench", progress=ignore, locks=run / "locks"
                    )
                finally:
                    shutil.rmtree(run)

            ours_stats = await measure_async(ours, runs=RUNS, warmup=1)

        skopeo = shutil.which("skopeo")
        assert skopeo is not None, "apt-get install skopeo"

        def peer() -> None:
            run = Path(tempfile.mkdtemp(dir=work))
            try:
                subprocess.run(
                    [skopeo, "copy", "--quiet", "--src-tls-verify=false",
                     f"docker://{ref_text}", f"oci:{run / 'oci'}:bench"],
                    check=True,
                )  # fmt: skip
                root = run / "root"
                root.mkdir()
                for digest in image.layer_digests():
                    blob = run / "oci/blobs/sha256" / digest.removeprefix("sha256:")
                    subprocess.run(["tar", "-xzf", str(blob), "-C", str(root)], check=True)
            finally:
                shutil.rmtree(run)

        peer_stats = measure(peer, runs=RUNS, warmup=1)

    report("pull+unpack", ours_stats, peer_stats, "skopeo copy + tar -x")
    return {
        "image_bytes": size,
        "layers": len(image.layers),
        "ours": ours_stats,
        "ours_mb_s": stats_mbps(ours_stats, size),
        "skopeo_copy_plus_tar": peer_stats,
        "skopeo_copy_plus_tar_mb_s": stats_mbps(peer_stats, size),
        "ratio": ratio(ours_stats, peer_stats),
    }


def unpack_only(work: Path, image: BuiltImage) -> dict[str, Any]:
    size = sum(len(layer) for layer in image.layers)
    layers_dir = work / "layers"
    layers_dir.mkdir()
    paths = []
    for i, layer in enumerate(image.layers):
        paths.append(layers_dir / f"{i}.tgz")
        paths[-1].write_bytes(layer)
    descriptors = [
        m.Descriptor(media_type=m.OCI_LAYER_GZIP, digest=d, size=len(b))
        for d, b in zip(image.layer_digests(), image.layers, strict=True)
    ]

    def unpack_ours() -> None:
        root = Path(tempfile.mkdtemp(dir=work))
        try:
            for path, d in zip(paths, descriptors, strict=True):
                unpack_layer(path, root, d, TarLimits(), ignore)
        finally:
            shutil.rmtree(root)

    def unpack_tar() -> None:
        root = Path(tempfile.mkdtemp(dir=work))
        try:
            for path in paths:
                subprocess.run(["tar", "-xzf", str(path), "-C", str(root)], check=True)
        finally:
            shutil.rmtree(root)

    unpack_stats = measure(unpack_ours, runs=RUNS, warmup=1)
    tar_stats = measure(unpack_tar, runs=RUNS, warmup=1)
    report("unpack only", unpack_stats, tar_stats, "tar -xzf")
    return {
        "ours": unpack_stats,
        "ours_mb_s": stats_mbps(unpack_stats, size),
        "tar_xzf": tar_stats,
        "tar_xzf_mb_s": stats_mbps(tar_stats, size),
        "ratio": ratio(unpack_stats, tar_stats),
    }


async def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-images-") as tmp:
        work = Path(tmp)
        image = bench_image()
        load_before = os.getloadavg()
        results: dict[str, Any] = {
            "cold_build_s": await cold_builds(work),
            "cache_hit": await cache_hits(work),
            "pull_unpack": await pull_and_unpack(work, image),
            "unpack_only": unpack_only(work, image),
        }
        # This host is shared: the load says how much the absolute numbers are worth.
        results["load_average"] = {"before": load_before, "after": os.getloadavg()}
    path = write_result("images", results)
    print(f"wrote {path}")


if __name__ == "__main__":
    anyio.run(main)
