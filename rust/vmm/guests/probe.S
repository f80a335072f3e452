/*
 * Tartarus probe guest: a freestanding x86_64 program that exercises a VMM without
 * taking a single exception (emulated KVM cannot deliver them).
 *
 * Entry points:
 *   _start      64-bit Linux boot protocol: long mode, paging on, rsi = boot_params
 *   pvh_start   PVH (XEN_ELFNOTE_PHYS32_ENTRY note): 32-bit protected mode, ebx = start_info
 *
 * The kernel command line picks the program (first word):
 *   hello          print a greeting, reset
 *   mem            write then verify a pattern in every 4 KiB page of RAM above the image
 *   compute [N]    N rounds of xorshift64 (default 200000), a '.' every 16384 rounds
 *   gen [N]        compute N, then print what the generation device (clone identity)
 *                  says: generation, clone index, VM id and entropy (first 8 bytes)
 *   walk [N]       N rounds adding the round number to the next page of RAM above the
 *                  image (a '.' every 4096 rounds), then print a weighted sum of pages
 *   ports          unclaimed port and MMIO reads and writes, report what came back
 *   spin           print, then loop forever
 *   int3           execute int3 (an exception)
 * Results go to COM1 (0x3f8); the run ends with an i8042 CPU reset (out 0x64, 0xfe).
 */
    .intel_syntax noprefix

    .set COM1, 0x3f8
    .set BOOT_CMDLINE_PTR, 0x228
    .set BOOT_E820_COUNT, 0x1e8
    .set BOOT_E820_TABLE, 0x2d0
    .set PVH_CMDLINE, 24
    .set PVH_MEMMAP, 40             /* hvm_start_info.memmap_paddr */
    .set PVH_MEMMAP_COUNT, 48
    .set GAP_START, 0xd0000000
    .set GENERATION_PAGE, 0xfebff000

    .section .note.Xen, "a", @note
    .balign 4
    .long 4                 /* name size: "Xen\0" */
    .long 4                 /* descriptor size */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long pvh_start

    .text
    .code32
    .globl pvh_start
pvh_start:
    cli
    mov esp, offset stack_top
    mov edi, ebx                    /* keep start_info across the mode switch */
    /* Identity-map 4 GiB with 2 MiB pages: PML4 -> PDPT -> 4 page directories. */
    mov eax, offset pvh_pdpt
    or eax, 3
    mov [pvh_pml4], eax
    xor ecx, ecx
1:  mov eax, ecx
    shl eax, 12
    add eax, offset pvh_pd
    or eax, 3
    mov [pvh_pdpt + ecx * 8], eax
    inc ecx
    cmp ecx, 4
    jne 1b
    xor ecx, ecx
2:  mov eax, ecx
    shl eax, 21
    or eax, 0x83
    mov [pvh_pd + ecx * 8], eax
    mov eax, ecx
    shr eax, 11
    mov [pvh_pd + ecx * 8 + 4], eax
    inc ecx
    cmp ecx, 2048
    jne 2b
    mov eax, cr4
    or eax, 0x20                    /* PAE */
    mov cr4, eax
    mov eax, offset pvh_pml4
    mov cr3, eax
    mov ecx, 0xc0000080             /* EFER */
    rdmsr
    or eax, 0x100                   /* LME */
    wrmsr
    mov eax, cr0
    or eax, 0x80000001              /* PG | PE */
    mov cr0, eax
    lgdt [pvh_gdt_desc]
    .byte 0xea                      /* ljmp 0x08:pvh_long */
    .long pvh_long
    .word 0x08

    .code64
pvh_long:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov ebx, edi
    mov r12, [rbx + PVH_CMDLINE]
    /* RAM top: the end of the highest memmap entry of type 1 below 4 GiB. */
    mov rsi, [rbx + PVH_MEMMAP]
    mov ecx, [rbx + PVH_MEMMAP_COUNT]
    xor r13, r13
3:  test ecx, ecx
    jz main
    cmp dword ptr [rsi + 16], 1
    jne 4f
    mov rax, [rsi]
    add rax, [rsi + 8]
    call take_top
4:  add rsi, 24
    dec ecx
    jmp 3b

    .globl _start
_start:
    cli
    mov eax, [rsi + BOOT_CMDLINE_PTR]
    mov r12, rax
    movzx ecx, byte ptr [rsi + BOOT_E820_COUNT]
    lea rdi, [rsi + BOOT_E820_TABLE]
    xor r13, r13
5:  test ecx, ecx
    jz main
    cmp dword ptr [rdi + 16], 1
    jne 6f
    mov rax, [rdi]
    add rax, [rdi + 8]
    call take_top
6:  add rdi, 20
    dec ecx
    jmp 5b

/* r13 = max(r13, rax) for RAM ends below the MMIO gap. */
take_top:
    mov rdx, GAP_START
    cmp rax, rdx
    ja 7f
    cmp rax, r13
    jbe 7f
    mov r13, rax
7:  ret

/* ---- dispatch on the first character of the command line ---- */
main:
    mov rsp, offset stack_top
    movzx eax, byte ptr [r12]
    cmp al, 'h'
    je prog_hello
    cmp al, 'm'
    je prog_mem
    cmp al, 'c'
    je prog_compute
    cmp al, 'p'
    je prog_ports
    cmp al, 's'
    je prog_spin
    cmp al, 'i'
    je prog_int3
    cmp al, 'g'
    je prog_gen
    cmp al, 'w'
    je prog_walk
    lea rsi, [rip + msg_unknown]
    call puts
    jmp reset

prog_hello:
    lea rsi, [rip + msg_hello]
    call puts
    jmp reset

/* Pattern every page from the first 2 MiB boundary after the image to the RAM top,
   plus the last quadword of RAM; then read all of it back. */
prog_mem:
    lea rsi, [rip + msg_mem]
    call puts
    mov r14, offset _end
    add r14, 0x1fffff
    and r14, ~0x1fffff
    mov r15, 0x5a5a5a5a5a5a5a5a
    mov rdi, r14
10: cmp rdi, r13
    jae 11f
    mov rax, rdi
    xor rax, r15
    mov [rdi], rax
    add rdi, 4096
    jmp 10b
11: mov rax, r13
    sub rax, 8
    mov rdx, rax
    xor rdx, r15
    mov [rax], rdx
    xor r8, r8                      /* pages checked */
    xor r9, r9                      /* mismatches */
    mov rdi, r14
12: cmp rdi, r13
    jae 13f
    mov rax, rdi
    xor rax, r15
    cmp [rdi], rax
    je 14f
    inc r9
14: inc r8
    add rdi, 4096
    jmp 12b
13: mov rax, r13
    sub rax, 8
    mov rdx, rax
    xor rdx, r15
    cmp [rax], rdx
    je 15f
    inc r9
15: lea rsi, [rip + msg_pages]
    call puts
    mov rax, r8
    call puthex
    lea rsi, [rip + msg_errors]
    call puts
    mov rax, r9
    call puthex
    lea rsi, [rip + msg_top]
    call puts
    mov rax, r13
    call puthex
    call newline
    jmp reset

/* compute [N]: xorshift64, printing a progress dot every 16384 rounds. */
prog_compute:
    lea rsi, [r12 + 7]
    call parse_count
    call compute
    mov r10, rax
    call newline
    lea rsi, [rip + msg_compute]
    call puts
    mov rax, r10
    call puthex
    call newline
    jmp reset

/* gen [N]: compute, then report the clone identity from the generation device. */
prog_gen:
    lea rsi, [r12 + 3]
    call parse_count
    call compute
    mov r10, rax
    call newline
    lea rsi, [rip + msg_compute]
    call puts
    mov rax, r10
    call puthex
    mov rbx, GENERATION_PAGE
    lea rsi, [rip + msg_gen_magic]
    call puts
    mov eax, dword ptr [rbx]
    call puthex
    lea rsi, [rip + msg_gen_generation]
    call puts
    mov rax, [rbx + 8]
    call puthex
    lea rsi, [rip + msg_gen_clone]
    call puts
    mov rax, [rbx + 16]
    call puthex
    lea rsi, [rip + msg_gen_vmid]
    call puts
    mov rax, [rbx + 24]
    call puthex
    lea rsi, [rip + msg_gen_entropy]
    call puts
    mov rax, [rbx + 48]
    call puthex
    call newline
    jmp reset

/* walk [N]: memory that changes as the guest runs (for diff snapshots). */
prog_walk:
    lea rsi, [r12 + 4]
    call parse_count
    mov r14, offset _end
    add r14, 0x1fffff
    and r14, ~0x1fffff              /* first page */
    mov r15, r13
    sub r15, r14
    shr r15, 12                     /* page count */
    xor r8, r8                      /* round */
    xor r9, r9                      /* page index */
60: cmp r8, rcx
    jae 62f
    mov rax, r9
    shl rax, 12
    add [r14 + rax], r8
    inc r8
    inc r9
    cmp r9, r15
    jb 61f
    xor r9, r9
61: test r8d, 0xfff
    jnz 60b
    mov al, '.'
    mov dx, COM1
    out dx, al
    jmp 60b
62: xor r10, r10                    /* sum of page value * (page index + 1) */
    xor r9, r9
63: cmp r9, r15
    jae 64f
    mov rax, r9
    shl rax, 12
    mov rax, [r14 + rax]
    lea rdx, [r9 + 1]
    imul rax, rdx
    add r10, rax
    inc r9
    jmp 63b
64: call newline
    lea rsi, [rip + msg_walk]
    call puts
    mov rax, r10
    call puthex
    call newline
    jmp reset

/* rsi: the byte after a program name; " N" gives rcx = N, anything else 200000. */
parse_count:
    mov rcx, 200000
    cmp byte ptr [rsi], ' '
    jne 21f
    xor rcx, rcx
    inc rsi
20: movzx eax, byte ptr [rsi]
    sub eax, '0'
    cmp eax, 9
    ja 21f
    imul rcx, rcx, 10
    add rcx, rax
    inc rsi
    jmp 20b
21: ret

/* rcx rounds of xorshift64; returns rax = x ^ (sum of every x). */
compute:
    mov r8, 0x2545f4914f6cdd1d
    xor r9, r9
22: test rcx, rcx
    jz 23f
    mov rax, r8
    shl rax, 13
    xor r8, rax
    mov rax, r8
    shr rax, 7
    xor r8, rax
    mov rax, r8
    shl rax, 17
    xor r8, rax
    add r9, r8
    dec rcx
    test ecx, 0x3fff
    jnz 22b
    mov al, '.'
    mov dx, COM1
    out dx, al
    jmp 22b
23: mov rax, r8
    xor rax, r9
    ret

/* ports: accesses nobody claims must be answered like an empty bus. */
prog_ports:
    mov al, 0x11
    out 0x80, al
    out 0x80, al
    out 0x80, al
    mov dx, 0xffff
    out dx, al
    in al, 0x81
    movzx r8, al                    /* expect 0xff */
    mov rax, GAP_START
    mov dword ptr [rax], 0x12345678
    mov r9d, dword ptr [rax]        /* expect 0xffffffff */
    mov rax, 0xfffff000
    mov r10, [rax]                  /* top of the 4 GiB map: expect all ones */
    mov dx, COM1
    mov eax, 0x0a4b4f               /* a 32-bit write to a byte register: "O" */
    out dx, eax
    lea rsi, [rip + msg_ports_in]
    call puts
    mov rax, r8
    call puthex
    lea rsi, [rip + msg_ports_mmio]
    call puts
    mov rax, r9
    call puthex
    lea rsi, [rip + msg_ports_top]
    call puts
    mov rax, r10
    call puthex
    call newline
    jmp reset

prog_spin:
    lea rsi, [rip + msg_spin]
    call puts
30: jmp 30b

prog_int3:
    lea rsi, [rip + msg_int3]
    call puts
    int3
    lea rsi, [rip + msg_survived]
    call puts
    jmp reset

/* ---- helpers ---- */
    .include "console.inc"

    .section .rodata
msg_hello:      .asciz "hello from the probe guest\n"
msg_unknown:    .asciz "unknown program\n"
msg_mem:        .asciz "mem:"
msg_pages:      .asciz " pages="
msg_errors:     .asciz " errors="
msg_top:        .asciz " top="
msg_compute:    .asciz "compute="
msg_walk:       .asciz "walk="
msg_gen_magic:  .asciz " magic="
msg_gen_generation: .asciz " generation="
msg_gen_clone:  .asciz " clone="
msg_gen_vmid:   .asciz " vmid="
msg_gen_entropy: .asciz " entropy="
msg_ports_in:   .asciz "\nports in="
msg_ports_mmio: .asciz " mmio="
msg_ports_top:  .asciz " top="
msg_spin:       .asciz "spin\n"
msg_int3:       .asciz "int3\n"
msg_survived:   .asciz "survived int3\n"

    .data
    .balign 8
pvh_gdt:
    .quad 0
    .quad 0x00af9b000000ffff        /* 64-bit code */
    .quad 0x00cf93000000ffff        /* data */
pvh_gdt_desc:
    .word 23
    .long pvh_gdt

    .bss
    .balign 4096
pvh_pml4:   .skip 4096
pvh_pdpt:   .skip 4096
pvh_pd:     .skip 4 * 4096
stack:      .skip 16384
stack_top:
