/*
 * Tartarus virtio probe guest: a freestanding x86_64 virtio-mmio driver that polls its
 * rings (no interrupts, no exceptions: emulated KVM delivers neither), so virtio-blk and
 * virtio-vsock can be exercised through a real tartarus-vmm on any host.
 *
 * Entry: 64-bit Linux boot protocol (long mode, identity paging, rsi = boot_params).
 * The first character of the kernel command line picks the program:
 *   b   virtio-blk: read the whole disk, print the 64-bit wrapping sum of its
 *       little-endian quadwords; on a writable disk also write a pattern to sectors
 *       0..7, flush, read it back and compare
 *   B   virtio-blk bench: read the whole disk in 512 KiB requests, N passes
 *       (N = the digit after "B ", default 1), no checksum
 *   v   virtio-vsock: accept one stream on port 1024 (refusing other ports) and echo
 *       every byte back until the host shuts it down; print the byte count
 * Devices are found by scanning the 4 KiB MMIO windows from 0xd0000000 for the
 * virtio magic. Results go to COM1; the run ends with an i8042 reset (out 0x64, 0xfe).
 */
    .intel_syntax noprefix

    .set COM1, 0x3f8
    .set BOOT_CMDLINE_PTR, 0x228
    .set GAP_START, 0xd0000000
    .set WINDOWS, 32

    /* virtio-mmio registers */
    .set R_MAGIC, 0x000
    .set R_DEVICE_ID, 0x008
    .set R_DEV_FEATURES, 0x010
    .set R_DEV_FEATURES_SEL, 0x014
    .set R_DRV_FEATURES, 0x020
    .set R_DRV_FEATURES_SEL, 0x024
    .set R_QUEUE_SEL, 0x030
    .set R_QUEUE_NUM, 0x038
    .set R_QUEUE_READY, 0x044
    .set R_QUEUE_NOTIFY, 0x050
    .set R_STATUS, 0x070
    .set R_DESC_LO, 0x080
    .set R_DESC_HI, 0x084
    .set R_AVAIL_LO, 0x090
    .set R_AVAIL_HI, 0x094
    .set R_USED_LO, 0x0a0
    .set R_USED_HI, 0x0a4
    .set R_CONFIG, 0x100

    .set F_NEXT, 1
    .set F_WRITE, 2

    /* Guest-physical layout (identity mapped); the guest needs 8 MiB of RAM. */
    .set BLK_Q, 0x200000            /* desc table; avail at +0x80, used at +0x1000 */
    .set BLK_HDR, 0x202000
    .set BLK_STATUS, 0x202100
    .set BLK_DATA, 0x300000         /* 512 KiB read buffer */
    .set BLK_CHECK, 0x380000        /* 4 KiB pattern, then 4 KiB read back */
    .set RX_Q, 0x210000             /* 16 entries; avail at +0x100, used at +0x1000 */
    .set TX_Q, 0x212000
    .set TX_HDR, 0x214000
    .set RX_BUFS, 0x400000          /* 16 buffers of 44 + 64 KiB, 0x11000 apart */
    .set RX_STRIDE, 0x11000
    .set RX_LEN, 44 + 65536
    .set NQ, 16

    .set BENCH_REQ_SECTORS, 1024    /* 512 KiB per request in the bench */
    .set SUM_REQ_SECTORS, 128       /* 64 KiB per request when checksumming */

    .set GUEST_CID, 3
    .set AGENT_PORT, 1024

    .text
    .code64
    .globl _start
_start:
    cli
    mov rsp, offset stack_top
    mov eax, [rsi + BOOT_CMDLINE_PTR]
    mov r12, rax
    movzx eax, byte ptr [r12]
    cmp al, 'b'
    je prog_blk
    cmp al, 'B'
    je prog_blk_bench
    cmp al, 'v'
    je prog_vsock
    lea rsi, [rip + msg_unknown]
    call puts
    jmp reset

/* ---------------------------------------------------------------- common ---- */

/* find_device: edi = virtio device id -> rbx = MMIO base, or prints and resets. */
find_device:
    mov rbx, GAP_START
    mov ecx, WINDOWS
1:  cmp dword ptr [rbx + R_MAGIC], 0x74726976
    jne 2f
    cmp dword ptr [rbx + R_DEVICE_ID], edi
    je 3f
2:  add rbx, 0x1000
    dec ecx
    jnz 1b
    lea rsi, [rip + msg_nodev]
    call puts
    jmp reset
3:  ret

/* init_device: rbx = base. Reset, ACK, DRIVER, accept VERSION_1 only, FEATURES_OK.
   Returns eax = the device's low feature word. */
init_device:
    mov dword ptr [rbx + R_STATUS], 0
    mov dword ptr [rbx + R_STATUS], 1
    mov dword ptr [rbx + R_STATUS], 3
    mov dword ptr [rbx + R_DEV_FEATURES_SEL], 0
    mov r8d, [rbx + R_DEV_FEATURES]
    mov dword ptr [rbx + R_DRV_FEATURES_SEL], 0
    mov dword ptr [rbx + R_DRV_FEATURES], 0
    mov dword ptr [rbx + R_DRV_FEATURES_SEL], 1
    mov dword ptr [rbx + R_DRV_FEATURES], 1         /* VIRTIO_F_VERSION_1 (bit 32) */
    mov dword ptr [rbx + R_STATUS], 11
    test dword ptr [rbx + R_STATUS], 8
    jnz 1f
    lea rsi, [rip + msg_features]
    call puts
    jmp reset
1:  mov eax, r8d
    ret

/* setup_queue: rbx = base, ecx = queue index, edx = size, rdi = ring area
   (desc at rdi, avail at rdi + 0x100, used at rdi + 0x1000). */
setup_queue:
    mov [rbx + R_QUEUE_SEL], ecx
    mov [rbx + R_QUEUE_NUM], edx
    mov eax, edi
    mov [rbx + R_DESC_LO], eax
    mov dword ptr [rbx + R_DESC_HI], 0
    add eax, 0x100
    mov [rbx + R_AVAIL_LO], eax
    mov dword ptr [rbx + R_AVAIL_HI], 0
    lea eax, [rdi + 0x1000]
    mov [rbx + R_USED_LO], eax
    mov dword ptr [rbx + R_USED_HI], 0
    mov dword ptr [rbx + R_QUEUE_READY], 1
    ret

/* set_desc: rdi = table, ecx = index, rax = addr, edx = len, r8w = flags, r9w = next */
set_desc:
    push rcx
    shl ecx, 4
    mov [rdi + rcx], rax
    mov [rdi + rcx + 8], edx
    mov [rdi + rcx + 12], r8w
    mov [rdi + rcx + 14], r9w
    pop rcx
    ret

/* ----------------------------------------------------------- virtio-blk ---- */

/* blk_request: one request on queue 0 (size 8, descriptors 0..2, synchronous).
   eax = type, r14 = sector, r15d = data length (0: header + status only),
   r10 = data buffer, r11b = 1 if the device writes the data. Returns al = status. */
blk_request:
    mov [BLK_HDR], eax
    mov dword ptr [BLK_HDR + 4], 0
    mov [BLK_HDR + 8], r14
    mov byte ptr [BLK_STATUS], 0xff
    mov rdi, BLK_Q
    xor ecx, ecx
    mov rax, BLK_HDR
    mov edx, 16
    mov r8w, F_NEXT
    mov r9w, 1
    call set_desc
    mov ecx, 1
    test r15d, r15d
    jz 1f
    mov rax, r10
    mov edx, r15d
    mov r8w, F_NEXT
    test r11b, r11b
    jz 2f
    or r8w, F_WRITE
2:  mov r9w, 2
    call set_desc
    mov ecx, 2
1:  mov rax, BLK_STATUS
    mov edx, 1
    mov r8w, F_WRITE
    xor r9w, r9w
    call set_desc
    /* avail ring: ring[idx % 8] = 0; idx++ */
    movzx eax, word ptr [BLK_Q + 0x102]
    mov ecx, eax
    and ecx, 7
    mov word ptr [BLK_Q + 0x104 + rcx * 2], 0
    inc eax
    mov [BLK_Q + 0x102], ax
    mov dword ptr [rbx + R_QUEUE_NOTIFY], 0
    /* The device completes during the notify; poll anyway (the VMM may use a thread). */
3:  cmp ax, word ptr [BLK_Q + 0x1002]
    jne 3b
    movzx eax, byte ptr [BLK_STATUS]
    ret

blk_init:
    mov edi, 2
    call find_device
    call init_device
    mov r13d, eax                   /* low features: bit 5 = read-only */
    xor ecx, ecx
    mov edx, 8
    mov rdi, BLK_Q
    call setup_queue
    mov dword ptr [rbx + R_STATUS], 15
    mov rbp, [rbx + R_CONFIG]       /* capacity in sectors */
    ret

/* Reads sectors [0, rbp) in requests of at most ecx sectors into BLK_DATA; if r12b
   is set, adds every quadword into rsi. Prints and resets on an error status. */
blk_read_all:
    push rcx
    xor r14, r14
1:  cmp r14, rbp
    jae 9f
    mov rax, rbp
    sub rax, r14
    mov rcx, [rsp]
    cmp rax, rcx
    jbe 2f
    mov rax, rcx
2:  mov r15, rax                    /* sectors this request */
    shl r15d, 9
    mov eax, 0                      /* VIRTIO_BLK_T_IN */
    mov r10, BLK_DATA
    mov r11b, 1
    call blk_request
    test al, al
    jnz blk_failed
    test r12b, r12b
    jz 4f
    mov rdi, BLK_DATA
    mov ecx, r15d
    shr ecx, 3
3:  add rsi, [rdi]
    add rdi, 8
    dec ecx
    jnz 3b
4:  mov eax, r15d
    shr eax, 9
    add r14, rax
    jmp 1b
9:  pop rcx
    ret

blk_failed:
    movzx r8d, al                   /* puts clobbers al */
    lea rsi, [rip + msg_blk_err]
    call puts
    mov eax, r8d
    call puthex
    call newline
    jmp reset

prog_blk:
    call blk_init
    xor esi, esi
    mov r12b, 1
    mov ecx, SUM_REQ_SECTORS
    call blk_read_all
    mov r12, rsi                    /* keep the sum */
    lea rsi, [rip + msg_blk_cap]
    call puts
    mov rax, rbp
    call puthex
    lea rsi, [rip + msg_blk_sum]
    call puts
    mov rax, r12
    call puthex
    test r13d, 0x20
    jnz 8f
    /* Writable: pattern q[i] = i ^ 0x5441525441525553 into sectors 0..7. */
    mov rdi, BLK_CHECK
    xor ecx, ecx
    mov rdx, 0x5441525441525553
5:  mov rax, rcx
    xor rax, rdx
    mov [rdi + rcx * 8], rax
    inc ecx
    cmp ecx, 512
    jne 5b
    mov eax, 1                      /* VIRTIO_BLK_T_OUT */
    xor r14, r14
    mov r15d, 4096
    mov r10, BLK_CHECK
    xor r11b, r11b
    call blk_request
    test al, al
    jnz blk_failed
    mov eax, 4                      /* VIRTIO_BLK_T_FLUSH */
    xor r15d, r15d
    call blk_request
    test al, al
    jnz blk_failed
    xor eax, eax                    /* read back into BLK_CHECK + 4096 */
    mov r15d, 4096
    mov r10, BLK_CHECK + 4096
    mov r11b, 1
    call blk_request
    test al, al
    jnz blk_failed
    mov rdi, BLK_CHECK
    xor ecx, ecx
6:  mov rax, [rdi + rcx * 8]
    cmp rax, [rdi + rcx * 8 + 4096]
    jne 7f
    inc ecx
    cmp ecx, 512
    jne 6b
    lea rsi, [rip + msg_write_ok]
    call puts
    jmp 8f
7:  lea rsi, [rip + msg_write_bad]
    call puts
8:  call newline
    jmp reset

prog_blk_bench:
    call blk_init
    mov r9d, 1
    cmp byte ptr [r12 + 1], ' '
    jne 1f
    movzx r9d, byte ptr [r12 + 2]
    sub r9d, '0'
    cmp r9d, 9
    jbe 1f
    mov r9d, 1
1:  push r9
    xor r12b, r12b
    mov ecx, BENCH_REQ_SECTORS
    call blk_read_all
    pop r9
    dec r9d
    jnz 1b
    lea rsi, [rip + msg_bench]
    call puts
    mov rax, rbp
    call puthex
    call newline
    jmp reset

/* ---------------------------------------------------------- virtio-vsock ---- */
/* Registers while serving: rbx = base, r13w = last used index seen on rx,
   r14 = bytes echoed (also our fwd_cnt), r15d = host port, ebp = our port. */

prog_vsock:
    mov edi, 19
    call find_device
    call init_device
    xor ecx, ecx
    mov edx, NQ
    mov rdi, RX_Q
    call setup_queue
    mov ecx, 1
    mov edx, NQ
    mov rdi, TX_Q
    call setup_queue
    mov dword ptr [rbx + R_STATUS], 15
    /* Post NQ single-descriptor receive buffers. */
    xor ecx, ecx
1:  mov rdi, RX_Q
    mov eax, ecx
    imul rax, rax, RX_STRIDE
    add rax, RX_BUFS
    mov edx, RX_LEN
    mov r8w, F_WRITE
    xor r9w, r9w
    call set_desc
    mov [RX_Q + 0x104 + rcx * 2], cx
    inc ecx
    cmp ecx, NQ
    jne 1b
    mov word ptr [RX_Q + 0x102], NQ
    mov dword ptr [rbx + R_QUEUE_NOTIFY], 0
    lea rsi, [rip + msg_vsock_ready]
    call puts
    xor r13d, r13d
    xor r14d, r14d
    xor r15d, r15d
    xor ebp, ebp

vsock_loop:
    cmp r13w, word ptr [RX_Q + 0x1002]
    je vsock_loop
    movzx ecx, r13w
    and ecx, NQ - 1
    mov r10d, [RX_Q + 0x1004 + rcx * 8]   /* used element id = buffer index */
    mov eax, r10d
    imul rax, rax, RX_STRIDE
    add rax, RX_BUFS
    mov r11, rax                          /* r11 = packet */
    movzx eax, word ptr [r11 + 30]        /* op */
    cmp eax, 1
    je 10f
    cmp eax, 5
    je 20f
    cmp eax, 4
    je 30f
    cmp eax, 3
    je 40f
    jmp 90f                               /* credit updates and the rest: nothing to do */
10: /* REQUEST: accept it if it is for our port, refuse it (RST) otherwise. */
    cmp dword ptr [r11 + 20], AGENT_PORT
    je 11f
    push rbp
    push r15
    mov ebp, [r11 + 20]
    mov r15d, [r11 + 16]
    mov eax, 3
    xor edx, edx
    call vsock_send
    pop r15
    pop rbp
    jmp 90f
11: mov r15d, [r11 + 16]
    mov ebp, AGENT_PORT
    mov eax, 2                            /* RESPONSE */
    xor edx, edx
    call vsock_send
    jmp 90f
20: /* RW: echo the payload straight from the receive buffer. */
    mov edx, [r11 + 24]
    lea rsi, [r11 + 44]
    add r14, rdx
    mov eax, 5
    call vsock_send
    jmp 90f
30: /* SHUTDOWN from the host: answer RST and report. */
    mov eax, 3
    xor edx, edx
    call vsock_send
    lea rsi, [rip + msg_vsock_done]
    call puts
    mov rax, r14
    call puthex
    call newline
    jmp reset
40: lea rsi, [rip + msg_vsock_rst]
    call puts
    jmp reset
90: /* Give the buffer back and tell the device. */
    inc r13w
    movzx eax, word ptr [RX_Q + 0x102]
    mov ecx, eax
    and ecx, NQ - 1
    mov [RX_Q + 0x104 + rcx * 2], r10w
    inc eax
    mov [RX_Q + 0x102], ax
    mov dword ptr [rbx + R_QUEUE_NOTIFY], 0
    jmp vsock_loop

/* vsock_send: eax = op, edx = payload length, rsi = payload. One chain on tx
   descriptors 0 (header) and 1 (payload); the device consumes it during the notify. */
vsock_send:
    mov rdi, TX_HDR
    mov qword ptr [rdi], GUEST_CID
    mov qword ptr [rdi + 8], 2
    mov [rdi + 16], ebp
    mov [rdi + 20], r15d
    mov [rdi + 24], edx
    mov word ptr [rdi + 28], 1
    mov [rdi + 30], ax
    mov dword ptr [rdi + 32], 0
    mov dword ptr [rdi + 36], 0x100000    /* buf_alloc: 1 MiB */
    mov [rdi + 40], r14d                  /* fwd_cnt */
    push rdx
    mov rdi, TX_Q
    xor ecx, ecx
    mov rax, TX_HDR
    mov r9w, 1
    xor r8w, r8w
    test edx, edx
    jz 1f
    mov r8w, F_NEXT
1:  mov edx, 44
    call set_desc
    pop rdx
    test edx, edx
    jz 2f
    mov ecx, 1
    mov rax, rsi
    xor r8w, r8w
    xor r9w, r9w
    call set_desc
2:  movzx eax, word ptr [TX_Q + 0x102]
    mov ecx, eax
    and ecx, NQ - 1
    mov word ptr [TX_Q + 0x104 + rcx * 2], 0
    inc eax
    mov [TX_Q + 0x102], ax
    mov dword ptr [rbx + R_QUEUE_NOTIFY], 1
3:  cmp ax, word ptr [TX_Q + 0x1002]
    jne 3b
    ret

/* ---------------------------------------------------------------- output ---- */

    .include "console.inc"

    .section .rodata
msg_unknown:     .asciz "virtio probe: unknown program\n"
msg_nodev:       .asciz "virtio probe: device not found\n"
msg_features:    .asciz "virtio probe: FEATURES_OK refused\n"
msg_blk_err:     .asciz "blk error status="
msg_blk_cap:     .asciz "blk capacity="
msg_blk_sum:     .asciz " sum="
msg_write_ok:    .asciz " write ok"
msg_write_bad:   .asciz " write MISMATCH"
msg_bench:       .asciz "blk bench done capacity="
msg_vsock_ready: .asciz "vsock ready\n"
msg_vsock_done:  .asciz "vsock done bytes="
msg_vsock_rst:   .asciz "vsock reset by host\n"

    .bss
    .balign 16
stack:
    .skip 8192
stack_top:
