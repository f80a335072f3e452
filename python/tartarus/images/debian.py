"""Debian root filesystems from Debian's archive.

Two ways in:
- `minbase`: `debootstrap --variant=minbase` (foreign stage, then the second stage in
  a chroot, both in a private mount and PID namespace so an interrupted build leaves no
  mounts or processes), then packages with apt inside bubblewrap;
- `none`: exactly the listed packages, fetched and unpacked by this module: the
  `InRelease` signature is checked with gpgv against Debian's keyring, the package
  index and every `.deb` against the digests it signs. For tiny rootfs (`base`).
"""

from __future__ import annotations

import lzma
import os
import platform
import re
import secrets
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import aiohttp
import anyio
import anyio.to_thread
import msgspec

from tartarus.images import download, fsutil
from tartarus.images.errors import ImageError, InvalidArchiveError
from tartarus.images.progress import Progress, ProgressCallback
from tartarus.images.steps import require_tool, run_in_rootfs, run_logged
from tartarus.images.tar import open_decompressed
from tartarus.images.template import DebianBase
from tartarus.images.unpack import unpack
from tartarus.runtime.types import SANDBOX_HOSTNAME

KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
MAX_RELEASE_BYTES = 16 << 20
PACKAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9+.-]+(=[A-Za-z0-9.+~:-]+)?$")
_ARCHES = {
    "x86_64": "amd64",
    "aarch64": "arm64",
    "armv7l": "armhf",
    "ppc64le": "ppc64el",
    "s390x": "s390x",
    "riscv64": "riscv64",
    "i686": "i386",
}
APT_ENV = {"DEBIAN_FRONTEND": "noninteractive", "LANG": "C.UTF-8"}
DPKG_SLIM = """\
# Written by Tartarus: sandboxes do not read manuals. Copyright files stay.
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/lintian/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
"""
APT_CONF = """\
// Written by Tartarus.
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
Dpkg::Use-Pty "false";
"""
UNSAFE_IO = "etc/dpkg/dpkg.cfg.d/tartarus-unsafe-io"


def debian_arch() -> str:
    machine = platform.machine()
    try:
        return _ARCHES[machine]
    except KeyError:
        raise ImageError(f"no Debian architecture known for machine {machine!r}") from None


def check_package_names(names: Iterable[str]) -> list[str]:
    out = list(names)
    for name in out:
        if not PACKAGE_NAME.fullmatch(name):
            raise ImageError(f"{name!r} is not a Debian package name (optionally =version)")
    return out


class PackageRecord(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    version: str
    filename: str
    sha256: str
    size: int
    depends: list[list[str]]


def parse_depends(value: str) -> list[list[str]]:
    """`a (>= 1), b | c:any` -> [["a"], ["b", "c"]] (names only)."""
    groups = []
    for group in value.split(","):
        names = [re.split(r"[\s(:\[<]", alt.strip(), maxsplit=1)[0] for alt in group.split("|")]
        names = [n for n in names if n]
        if names:
            groups.append(names)
    return groups


def parse_release(text: str) -> dict[str, tuple[str, int]]:
    """The `SHA256:` section of a Release file: path -> (hex digest, size)."""
    out: dict[str, tuple[str, int]] = {}
    in_section = False
    for line in text.splitlines():
        if not line.startswith(" "):
            in_section = line.rstrip() == "SHA256:"
            continue
        if in_section:
            parts = line.split()
            if len(parts) == 3 and re.fullmatch(r"[0-9a-f]{64}", parts[0]) and parts[1].isdigit():
                out[parts[2]] = (parts[0], int(parts[1]))
    return out


def scan_packages(lines: Iterable[str], wanted: set[str]) -> dict[str, PackageRecord]:
    """Finds `wanted` packages in a Packages index (one pass; other stanzas skipped)."""
    found: dict[str, PackageRecord] = {}
    fields: dict[str, str] = {}
    current: str | None = None

    def flush() -> None:
        if current is not None and current not in found:
            try:
                found[current] = PackageRecord(
                    name=current,
                    version=fields["Version"],
                    filename=fields["Filename"],
                    sha256=fields["SHA256"],
                    size=int(fields["Size"]),
                    depends=parse_depends(
                        ", ".join(v for k in ("Pre-Depends", "Depends") if (v := fields.get(k)))
                    ),
                )
            except (KeyError, ValueError) as e:
                raise ImageError(f"package index entry for {current} lacks {e}") from None

    for line in lines:
        if not line.strip():
            flush()
            current, fields = None, {}
        elif line.startswith("Package: "):
            name = line.removeprefix("Package: ").strip()
            current = name if name in wanted else None
        elif current is not None and not line.startswith(" "):
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    flush()
    return found


def verify_release(inrelease: Path) -> str:
    """Checks the InRelease signature with gpgv and returns only the signed text."""
    if not KEYRING.is_file():
        raise ImageError(f"{KEYRING} is missing: apt-get install debian-archive-keyring")
    proc = subprocess.run(
        ["gpgv", "--keyring", str(KEYRING), "--output", "-", str(inrelease)],
        capture_output=True,
        check=False,
        timeout=60,
    )
    if proc.returncode != 0:
        raise ImageError(
            f"{inrelease.name}: the Debian archive signature does not verify:\n"
            + proc.stderr.decode("utf-8", "replace")
        )
    return proc.stdout.decode("utf-8", "replace")


def read_ar_member(deb: Path, prefix: str) -> tuple[int, int, str]:
    """Finds the member of a .deb (an ar archive) whose name starts with `prefix`;
    returns its offset, size and name."""
    with deb.open("rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise InvalidArchiveError(f"{deb.name}: not a Debian package (no ar magic)")
        while header := f.read(60):
            if len(header) < 60 or header[58:60] != b"`\n":
                raise InvalidArchiveError(f"{deb.name}: corrupt ar header")
            name = header[:16].decode("ascii", "replace").strip().rstrip("/")
            try:
                size = int(header[48:58].decode("ascii").strip())
            except ValueError:
                raise InvalidArchiveError(f"{deb.name}: corrupt ar member size") from None
            if name.startswith(prefix):
                return f.tell(), size, name
            f.seek(size + (size & 1), os.SEEK_CUR)
    raise InvalidArchiveError(f"{deb.name}: no {prefix}* member")


class _Window:
    """Reads at most `size` bytes of a file from its current position."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self._f = f
        self._left = size

    def read(self, n: int = -1, /) -> bytes:
        if n < 0 or n > self._left:
            n = self._left
        data = self._f.read(n)
        self._left -= len(data)
        return data


def unpack_deb(deb: Path, root: Path) -> None:
    """Unpacks a package's files (its data.tar) into `root`, with the same hostile-input
    checks as image layers. No maintainer scripts run."""
    offset, size, name = read_ar_member(deb, "data.tar")
    with deb.open("rb") as f:
        f.seek(offset)
        window = _Window(f, size)
        stream = open_decompressed(window, f"{deb.name}:{name}")
        unpack(stream, str(root), archive=f"{deb.name}:{name}", whiteouts=False)


class DebianArchive:
    """Fetches packages from one suite of a Debian mirror, verified end to end."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base: DebianBase,
        cache: Path,
        progress: ProgressCallback,
    ) -> None:
        self.session = session
        self.base = base
        self.cache = cache
        self.arch = debian_arch()
        self.progress = progress

    def _url(self, path: str) -> str:
        return f"{self.base.mirror.rstrip('/')}/{path}"

    def _opener(self, url: str) -> download.Opener:
        def open_get(headers: object) -> aiohttp.client._RequestContextManager:
            return self.session.get(url, headers=headers)  # type: ignore[arg-type]

        return open_get

    async def release(self) -> dict[str, tuple[str, int]]:
        url = self._url(f"dists/{self.base.suite}/InRelease")
        self.progress(Progress(step="resolve", message=f"GET {url}"))
        async with self.session.get(url) as resp:
            if resp.status != 200:
                raise ImageError(f"GET {url}: HTTP {resp.status}; is the suite name right?")
            data = await download.read_bounded(resp, MAX_RELEASE_BYTES, f"GET {url}")
        tmp = self.cache / f"InRelease.{os.getpid()}.{secrets.token_hex(6)}.{self.base.suite}"
        await anyio.Path(self.cache).mkdir(parents=True, exist_ok=True)
        await anyio.Path(tmp).write_bytes(data)
        try:
            text = await anyio.to_thread.run_sync(verify_release, tmp)
        finally:
            await anyio.Path(tmp).unlink(missing_ok=True)
        return parse_release(text)

    async def _fetch(self, path: str, sha: str, size: int, dest: Path) -> Path:
        await download.download(
            self._opener(self._url(path)),
            dest,
            what=path.rsplit("/", 1)[-1],
            digest=f"sha256:{sha}",
            size=size,
            progress=self.progress,
        )
        return dest

    async def packages(self, names: list[str]) -> list[PackageRecord]:
        wanted = set(names)
        release = await self.release()
        found: dict[str, PackageRecord] = {}
        for component in self.base.components:
            index = f"{component}/binary-{self.arch}/Packages.xz"
            if index not in release:
                raise ImageError(f"{self.base.suite} has no {index}")
            sha, size = release[index]
            path = await self._fetch(
                f"dists/{self.base.suite}/{index}", sha, size, self.cache / "indices" / f"{sha}.xz"
            )

            def scan(p: Path = path) -> dict[str, PackageRecord]:
                with lzma.open(p, "rt", encoding="utf-8", errors="replace") as f:
                    return scan_packages(f, wanted - found.keys())

            found.update(await anyio.to_thread.run_sync(scan))
        missing = sorted(wanted - found.keys())
        if missing:
            raise ImageError(f"not in Debian {self.base.suite}: {', '.join(missing)}")
        unmet = [
            f"{r.name} needs {' | '.join(group)}"
            for r in found.values()
            for group in r.depends
            if not wanted.intersection(group)
        ]
        if unmet:
            raise ImageError(
                "variant 'none' installs exactly the listed packages and their dependencies "
                f"are not all listed: {'; '.join(unmet)}. Add them, or use variant 'minbase'."
            )
        return [found[n] for n in names]

    async def install(self, names: list[str], root: Path) -> None:
        for record in await self.packages(check_package_names(names)):
            deb = await self._fetch(
                record.filename,
                record.sha256,
                record.size,
                self.cache / "debs" / f"{record.sha256}.deb",
            )
            self.progress(Progress(step="unpack", item=record.name, message=record.version))
            await anyio.to_thread.run_sync(unpack_deb, deb, root)


# -- debootstrap ---------------------------------------------------------------------


def _unshared(argv: list[str]) -> list[str]:
    """Runs `argv` in a private mount and PID namespace: mounts debootstrap makes (proc,
    sys) and processes it starts cannot outlive it."""
    unshare = "/usr/bin/unshare"
    return [
        unshare,
        "--mount",
        "--propagation",
        "private",
        "--pid",
        "--fork",
        "--kill-child",
        *argv,
    ]


def sources_list(base: DebianBase) -> str:
    components = " ".join(base.components)
    lines = [f"deb {base.mirror} {base.suite} {components}"]
    if base.security_mirror and base.suite not in ("sid", "unstable"):
        lines.append(f"deb {base.mirror} {base.suite}-updates {components}")
        lines.append(f"deb {base.security_mirror} {base.suite}-security {components}")
    return "\n".join(lines) + "\n"


async def debootstrap(
    base: DebianBase, staging: Path, cache: Path, progress: ProgressCallback
) -> None:
    """A minbase Debian system in `staging`, with apt configured for slim installs."""
    if os.geteuid() != 0:
        raise ImageError(
            "building a Debian template needs root (debootstrap installs packages as root); "
            "run as root, or use an OCI image as the base"
        )
    for tool, package in (("debootstrap", "debootstrap"), ("gpgv", "gpgv")):
        require_tool(tool, package)
    debs = cache / "debootstrap" / f"{base.suite}-{debian_arch()}"
    await anyio.Path(debs).mkdir(parents=True, exist_ok=True)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **APT_ENV}
    await run_logged(
        _unshared(
            [
                "debootstrap",
                "--foreign",
                "--variant=minbase",
                f"--arch={debian_arch()}",
                f"--cache-dir={debs}",
                f"--keyring={KEYRING}",
                base.suite,
                str(staging),
                base.mirror,
            ]
        ),
        step="debootstrap",
        progress=progress,
        env=env,
    )
    await anyio.to_thread.run_sync(_configure_dpkg_apt, staging, base)
    await run_logged(
        _unshared(["chroot", str(staging), "/debootstrap/debootstrap", "--second-stage"]),
        step="debootstrap",
        progress=progress,
        env=env,
    )


def _configure_dpkg_apt(root: Path, base: DebianBase) -> None:
    (root / "etc/dpkg/dpkg.cfg.d").mkdir(parents=True, exist_ok=True)
    # No fsync per file while building: the finished tree is flushed once (syncfs).
    (root / UNSAFE_IO).write_text("force-unsafe-io\n")
    (root / "etc/dpkg/dpkg.cfg.d/tartarus-slim").write_text(DPKG_SLIM)
    (root / "etc/apt/apt.conf.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/apt/apt.conf.d/90tartarus").write_text(APT_CONF)
    (root / "etc/apt/sources.list").write_text(sources_list(base))


async def apt_install(
    root: Path, packages: list[str], progress: ProgressCallback, *, upgrade: bool
) -> None:
    """`apt-get update`, optionally `upgrade` (security fixes), then install `packages`."""
    names = check_package_names(packages)
    if not (root / "usr/bin/apt-get").exists():
        raise ImageError(
            f"cannot install {', '.join(names)}: the base has no apt-get "
            "(use a Debian or Ubuntu based image, or add the files with `files:`)"
        )
    await anyio.to_thread.run_sync(_write_unsafe_io, root)
    quiet = ["-y", "-q", "-o", "Dpkg::Use-Pty=0"]
    commands = [["apt-get", "update", "-q"]]
    if upgrade:
        commands.append(["apt-get", *quiet, "upgrade"])
    if names:
        commands.append(["apt-get", *quiet, "install", "--no-install-recommends", *names])
    for argv in commands:
        await run_in_rootfs(root, argv, step="packages", progress=progress, env=APT_ENV)


def _write_unsafe_io(root: Path) -> None:
    (root / UNSAFE_IO).parent.mkdir(parents=True, exist_ok=True)
    (root / UNSAFE_IO).write_text("force-unsafe-io\n")


def slim(root: Path) -> None:
    """Applies DPKG_SLIM's excludes to files debootstrap unpacked before they existed."""
    share = root / "usr/share"
    for name in ("man", "info", "lintian"):
        if (share / name).is_dir():
            for child in (share / name).iterdir():
                fsutil.remove_tree(child)
    if (share / "locale").is_dir():
        for child in (share / "locale").iterdir():
            if child.name != "locale.alias":
                fsutil.remove_tree(child)
    if (share / "doc").is_dir():
        for package in (share / "doc").iterdir():
            if package.is_dir() and not package.is_symlink():
                for child in package.iterdir():
                    if child.name != "copyright":
                        fsutil.remove_tree(child)


def clean_rootfs(root: Path) -> None:
    """Removes what a build leaves that a sandbox must not inherit: apt's lists and
    caches, logs, the build host's resolv.conf and hostname, device nodes, /tmp."""
    for rel in ("var/lib/apt/lists", "var/cache/apt", "var/log", "tmp", "var/tmp", "dev"):
        d = root / rel
        if d.is_dir() and not d.is_symlink():
            for child in d.iterdir():
                if child.name not in ("partial", "auxfiles", "lock"):
                    fsutil.remove_tree(child)
    for rel in (
        "var/cache/debconf/config.dat-old",
        "var/cache/debconf/templates.dat-old",
        "var/lib/dpkg/status-old",
        "var/lib/dpkg/diversions-old",
        UNSAFE_IO,
        "debootstrap",
    ):
        fsutil.remove_tree(root / rel)
    if (root / "etc/dpkg/dpkg.cfg.d/tartarus-slim").exists():
        slim(root)
    etc = root / "etc"
    if etc.is_dir() and not etc.is_symlink():
        for name, content in (("resolv.conf", ""), ("hostname", f"{SANDBOX_HOSTNAME}\n")):
            target = etc / name
            if target.is_symlink():
                target.unlink()
            target.write_text(content)
