//! Boot entry: multiboot headers, 32-bit protected mode -> long mode, and the AP trampoline.
//!
//! Hand-written because no crate provides a multiboot entry for a freestanding image built
//! for the host triple; everything after the jump to `rust_entry` is Rust.

use core::arch::global_asm;

/// Where the AP trampoline is copied: below 1 MiB so the SIPI vector (page number) reaches it.
pub const AP_TRAMPOLINE_BASE: u64 = 0x8000;

global_asm!(
    r#"
.set AP_BASE, 0x8000
.set MB2_MAGIC, 0xE85250D6
.set MB1_MAGIC, 0x1BADB002
.set MB1_FLAGS, 0x00010002

.section .multiboot_header, "a"
.balign 8
mb2_header_start:
    .long MB2_MAGIC
    .long 0
    .long mb2_header_end - mb2_header_start
    .long 0x100000000 - MB2_MAGIC - (mb2_header_end - mb2_header_start)
    .balign 8
    .word 0
    .word 0
    .long 8
mb2_header_end:

/* multiboot1 with the a.out kludge, so that `qemu -kernel` accepts the ELF64 image */
.balign 4
mb1_header:
    .long MB1_MAGIC
    .long MB1_FLAGS
    .long 0x100000000 - MB1_MAGIC - MB1_FLAGS
    .long mb1_header
    .long __image_start
    .long __data_end
    .long __image_end
    .long _start32

.section .text.boot, "ax"
.code32
.global _start32
_start32:
    cli
    cld
    mov edi, eax
    mov esi, ebx
    mov esp, offset boot_stack_top

    /* Bochs hands over with caches disabled (CR0.CD/NW) after GRUB */
    mov eax, cr0
    and eax, 0x9FFFFFFF
    mov cr0, eax

    /* PML4[0] -> PDPT, PDPT[0..4] -> 4 page directories of 2 MiB pages: identity map 0..4 GiB.
       The top GiB (LAPIC, IO-APIC, MMIO) is mapped uncached. */
    mov eax, offset boot_pdpt
    or eax, 3
    mov dword ptr [boot_pml4], eax
    xor ecx, ecx
1:
    mov eax, ecx
    shl eax, 12
    add eax, offset boot_pd
    or eax, 3
    mov dword ptr [boot_pdpt + ecx * 8], eax
    inc ecx
    cmp ecx, 4
    jne 1b

    xor ecx, ecx
2:
    mov eax, ecx
    shl eax, 21
    or eax, 0x83
    cmp ecx, 1536
    jb 3f
    or eax, 0x18
3:
    mov dword ptr [boot_pd + ecx * 8], eax
    mov dword ptr [boot_pd + ecx * 8 + 4], 0
    inc ecx
    cmp ecx, 2048
    jne 2b

    mov eax, offset boot_pml4
    mov cr3, eax
    /* CR4: PAE | OSFXSR | OSXMMEXCPT (core uses SSE) */
    mov eax, cr4
    or eax, 0x620
    mov cr4, eax
    /* EFER.LME */
    mov ecx, 0xC0000080
    rdmsr
    or eax, 0x100
    wrmsr
    /* CR0: PG | NE | MP | PE, EM clear */
    mov eax, cr0
    and eax, 0xFFFFFFFB
    or eax, 0x80000023
    mov cr0, eax

    lgdt [boot_gdt_ptr]
    .byte 0xEA
    .long long_mode_entry
    .word 0x08

.code64
long_mode_entry:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    mov rsp, offset boot_stack_top
    mov edi, edi
    mov esi, esi
    call rust_entry
4:
    cli
    hlt
    jmp 4b

/* ---- AP trampoline: copied to AP_BASE, entered in real mode by SIPI ---- */
.global ap_trampoline_start
.global ap_trampoline_end
.global ap_trampoline_params
.code16
ap_trampoline_start:
    cli
    cld
    xor ax, ax
    mov ds, ax
    lgdt [AP_GDT_PTR_ADDR]
    mov eax, cr0
    or eax, 1
    mov cr0, eax
    .byte 0x66, 0xEA
    .long AP_BASE + ap_protected - ap_trampoline_start
    .word 0x18
.code32
ap_protected:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov eax, cr4
    or eax, 0x620
    mov cr4, eax
    mov eax, dword ptr [AP_PARAMS_ADDR]
    mov cr3, eax
    mov ecx, 0xC0000080
    rdmsr
    or eax, 0x100
    wrmsr
    mov eax, cr0
    and eax, 0x9FFFFFFB
    or eax, 0x80000023
    mov cr0, eax
    .byte 0xEA
    .long AP_BASE + ap_long - ap_trampoline_start
    .word 0x08
.code64
ap_long:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    mov rsp, qword ptr [AP_PARAMS_ADDR + 8]
    mov rax, qword ptr [AP_PARAMS_ADDR + 16]
    mov rdi, qword ptr [AP_PARAMS_ADDR + 24]
    call rax
5:
    cli
    hlt
    jmp 5b

.balign 8
ap_gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF
    .quad 0x00CF92000000FFFF
    .quad 0x00CF9A000000FFFF
ap_gdt_ptr:
    .word 31
    .quad AP_BASE + ap_gdt - ap_trampoline_start
.balign 8
/* cr3, stack top, entry, argument: written by the BSP before each SIPI */
ap_trampoline_params:
    .quad 0, 0, 0, 0
ap_trampoline_end:
.set AP_GDT_PTR_ADDR, AP_BASE + ap_gdt_ptr - ap_trampoline_start
.set AP_PARAMS_ADDR, AP_BASE + ap_trampoline_params - ap_trampoline_start

.section .rodata
.balign 8
boot_gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF
    .quad 0x00CF92000000FFFF
    .quad 0x00CF9A000000FFFF
boot_gdt_ptr:
    .word 31
    .quad boot_gdt

.section .bss
.balign 4096
.global boot_pml4
boot_pml4:
    .skip 4096
boot_pdpt:
    .skip 4096
boot_pd:
    .skip 4096 * 4
boot_stack:
    .skip 65536
boot_stack_top:
"#
);

extern "C" {
    static ap_trampoline_start: u8;
    static ap_trampoline_end: u8;
    static ap_trampoline_params: u8;
    static boot_pml4: u8;
    static __image_start: u8;
    static __image_end: u8;
}

/// Host-physical range occupied by the image, bss included.
pub fn image_range() -> core::ops::Range<u64> {
    // SAFETY: linker-defined symbols; only their addresses are taken.
    unsafe { (&__image_start as *const u8 as u64)..(&__image_end as *const u8 as u64) }
}

/// Physical address of the boot PML4 (identity map 0..4 GiB), shared by all CPUs.
pub fn boot_page_table() -> u64 {
    // SAFETY: address of a linker-placed static.
    unsafe { &boot_pml4 as *const u8 as u64 }
}

/// The trampoline code bytes and the offset of its parameter block within them.
pub fn ap_trampoline() -> (&'static [u8], usize) {
    // SAFETY: both symbols delimit one contiguous block in .text.boot.
    unsafe {
        let start = &ap_trampoline_start as *const u8;
        let end = &ap_trampoline_end as *const u8;
        let params = &ap_trampoline_params as *const u8;
        (core::slice::from_raw_parts(start, end as usize - start as usize), params as usize - start as usize)
    }
}
