"""The microvm backend's device layout, run for real on this host.

Linux cannot boot on emulated KVM, so the virtio probe guest stands in for it: it
boots from the exact machine config the backend builds (root image from
`tartarus.images`, Lethe scratch disk, vsock) and drives those devices.
"""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import msgspec
import pytest

from tartarus.codec import enc_hook
from tartarus.config import Settings
from tartarus.host.doctor import DoctorReport
from tartarus.runtime.base import SandboxError
from tartarus.runtime.microvm import (
    AGENT_CMDLINE,
    MicroVmSandbox,
    make_scratch_disk,
    wait_for_agent,
)
from tartarus.runtime.types import Resources, SandboxSpec
from tartarus.runtime.vmm_api import BootProtocol, VmmProcess
from tests.guest_rootfs import busybox_rootfs
from tests.support.probe_guests import build_probe_guest, vmm_binary

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(180)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def guest() -> Path:
    return build_probe_guest("virtio_probe")


@pytest.fixture(scope="module")
def vmm_bin(doctor_report: DoctorReport) -> str:
    return vmm_binary(doctor_report)


def _sandbox(tmp_path: Path, guest: Path) -> MicroVmSandbox:
    spec = SandboxSpec(
        id="layout",
        rootfs=busybox_rootfs(tmp_path / "rootfs"),
        resources=Resources(memory_mib=32, disk_mib=16),
    )
    settings = Settings(runtime_dir=tmp_path / "run", cache_dir=tmp_path / "cache")
    return MicroVmSandbox(spec, guest, tmp_path / "sandbox", settings)


async def test_backend_config_boots_with_root_scratch_and_vsock(
    vmm_bin: str, guest: Path, tmp_path: Path
) -> None:
    sb = _sandbox(tmp_path, guest)
    sb.run_dir.mkdir(parents=True)
    root = await sb.root_image()
    scratch = await make_scratch_disk(sb.run_dir / "scratch.ext4", 16)
    config = sb.machine_config(root, scratch)
    assert AGENT_CMDLINE in config.cmdline
    assert [d.read_only for d in config.drives] == [True, False]
    # The probe guest's bench program reads the first disk (the root image) end to end.
    probe = msgspec.structs.replace(config, cmdline="B 1", boot_protocol=BootProtocol.LINUX64)
    path = tmp_path / "config.json"
    path.write_bytes(msgspec.json.encode(probe, enc_hook=enc_hook))
    with anyio.fail_after(150):
        proc = await anyio.run_process([vmm_bin, "run", "--config", str(path)], check=False)
    assert json.loads(proc.stdout)["exit"] == {"reason": "reset"}, proc.stderr
    serial = (sb.run_dir / "console.log").read_text()
    assert serial == f"blk bench done capacity={root.stat().st_size // 512:016x}\n"
    # Lethe took the scratch disk with it; the vsock socket is gone too.
    assert not scratch.exists()
    assert not sb.vsock_path.exists()
    assert root.exists(), "the root image is only read"


async def test_start_waits_until_the_guest_accepts_on_the_agent_port(
    vmm_bin: str, guest: Path, tmp_path: Path
) -> None:
    sb = _sandbox(tmp_path, guest)
    sb.run_dir.mkdir(parents=True)
    root = await sb.root_image()
    scratch = await make_scratch_disk(sb.run_dir / "scratch.ext4", 16)
    config = msgspec.structs.replace(
        sb.machine_config(root, scratch), cmdline="v", boot_protocol=BootProtocol.LINUX64
    )
    vmm = await VmmProcess.launch(sb.workdir)
    try:
        await vmm.configure(config)
        await vmm.start()
        # The probe guest accepts port 1024 exactly as the agent would.
        await wait_for_agent(sb.vsock_path, timeout_s=60)
    finally:
        await vmm.kill()


async def test_no_agent_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SandboxError, match="did not answer on vsock port 1024"):
        await wait_for_agent(tmp_path / "nothing.sock", timeout_s=0.3)


async def test_scratch_disk_is_formatted_and_never_reused(tmp_path: Path) -> None:
    disk = await make_scratch_disk(tmp_path / "scratch.ext4", 8)
    assert disk.stat().st_size == 8 << 20
    assert disk.stat().st_blocks * 512 < 8 << 20, "sparse"
    fsck = await anyio.run_process(["e2fsck", "-fn", str(disk)], check=False)
    assert fsck.returncode == 0
    with pytest.raises(FileExistsError):
        await make_scratch_disk(disk, 8)
