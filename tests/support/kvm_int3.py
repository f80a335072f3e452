"""An independent KVM flavour check for the tests, written against raw ioctls.

It shares no code with the Rust probe: a 64-bit guest executes `int3` through its IDT.
Hardware KVM delivers it (the vCPU halts in the handler); an
emulated KVM cannot and ends the run in KVM_EXIT_INTERNAL_ERROR.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct

_KVMIO = 0xAE
_KVM_CREATE_VM = _KVMIO << 8 | 0x01
_KVM_GET_VCPU_MMAP_SIZE = _KVMIO << 8 | 0x04
_KVM_CREATE_VCPU = _KVMIO << 8 | 0x41
_KVM_RUN = _KVMIO << 8 | 0x80
_KVM_SET_USER_MEMORY_REGION = 1 << 30 | 32 << 16 | _KVMIO << 8 | 0x46
_REGS_SIZE = 144
_KVM_GET_REGS = 2 << 30 | _REGS_SIZE << 16 | _KVMIO << 8 | 0x81
_KVM_SET_REGS = 1 << 30 | _REGS_SIZE << 16 | _KVMIO << 8 | 0x82
_SREGS_SIZE = 312
_KVM_GET_SREGS = 2 << 30 | _SREGS_SIZE << 16 | _KVMIO << 8 | 0x83
_KVM_SET_SREGS = 1 << 30 | _SREGS_SIZE << 16 | _KVMIO << 8 | 0x84

EXIT_HLT = 5
EXIT_INTERNAL_ERROR = 17

_GDT = 0x500
_IDT = 0x1000
_PML4, _PDPT, _PD = 0x3000, 0x4000, 0x5000
_HANDLER = 0x6000
_CODE = 0x7000


def _segment(selector: int, type_: int, long_mode: int, db: int) -> bytes:
    # struct kvm_segment: base, limit, selector, type, present, dpl, db, s, l, g, avl,
    # unusable, padding.
    return struct.pack(
        "<QIHBBBBBBBBBB", 0, 0xFFFFF, selector, type_, 1, 0, db, 1, long_mode, 1, 0, 0, 0
    )


def int3_exit() -> tuple[int, int]:
    """Returns (KVM exit reason, guest rip) after a 64-bit guest runs `int3; hlt`.

    Long mode matters: Linux runs there, and an emulated KVM that still delivers
    real-mode exceptions through the IVT fails to deliver them through a 64-bit IDT.
    """
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        vm = fcntl.ioctl(kvm, _KVM_CREATE_VM, 0)
        mem = mmap.mmap(-1, 0x10000, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        struct.pack_into("<QQQ", mem, _GDT, 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF)
        struct.pack_into("<Q", mem, _PML4, _PDPT | 3)
        struct.pack_into("<Q", mem, _PDPT, _PD | 3)
        struct.pack_into("<Q", mem, _PD, 0x83)  # one 2 MiB identity page
        gate = struct.pack("<HHBBHII", _HANDLER & 0xFFFF, 8, 0, 0x8E, _HANDLER >> 16, 0, 0)
        mem[_IDT + 3 * 16 : _IDT + 4 * 16] = gate
        mem[_HANDLER] = 0xF4
        mem[_CODE : _CODE + 2] = b"\xcc\xf4"
        addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
        region = struct.pack("<IIQQQ", 0, 0, 0, len(mem), addr)
        fcntl.ioctl(vm, _KVM_SET_USER_MEMORY_REGION, region)
        vcpu = fcntl.ioctl(vm, _KVM_CREATE_VCPU, 0)
        run_size = fcntl.ioctl(kvm, _KVM_GET_VCPU_MMAP_SIZE, 0)
        run = mmap.mmap(vcpu, run_size, flags=mmap.MAP_SHARED)
        sregs = bytearray(_SREGS_SIZE)
        fcntl.ioctl(vcpu, _KVM_GET_SREGS, sregs)
        sregs[0:24] = _segment(8, 0xB, 1, 0)  # cs
        for i in range(1, 6):  # ds es fs gs ss
            sregs[i * 24 : (i + 1) * 24] = _segment(16, 0x3, 0, 1)
        struct.pack_into("<QH", sregs, 192, _GDT, 23)  # gdt
        struct.pack_into("<QH", sregs, 208, _IDT, 16 * 16 - 1)  # idt (16 vectors)
        # cr0 (PE|MP|ET|NE|PG), cr2, cr3, cr4 (PAE), cr8, efer (LME|LMA)
        struct.pack_into("<QQQQQQ", sregs, 224, 0x80000033, 0, _PML4, 0x20, 0, 0x500)
        fcntl.ioctl(vcpu, _KVM_SET_SREGS, bytes(sregs))
        regs = [0] * 18
        regs[6] = 0x9000  # rsp
        regs[16] = _CODE  # rip
        regs[17] = 0x2  # rflags
        fcntl.ioctl(vcpu, _KVM_SET_REGS, struct.pack("<18Q", *regs))
        fcntl.ioctl(vcpu, _KVM_RUN, 0)
        reason: int = struct.unpack_from("<I", run, 8)[0]
        out = bytearray(_REGS_SIZE)
        fcntl.ioctl(vcpu, _KVM_GET_REGS, out)
        rip: int = struct.unpack_from("<18Q", out)[16]
        os.close(vcpu)
        os.close(vm)
        return reason, rip
    finally:
        os.close(kvm)


def exceptions_delivered() -> bool:
    reason, rip = int3_exit()
    return reason == EXIT_HLT and rip == _HANDLER + 1


if __name__ == "__main__":
    print(int3_exit())
