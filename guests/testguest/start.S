/* Entry point, placed first in the image at GPA 0x100000. The hypervisor enters every
 * vCPU here in 64-bit mode with RDI = vCPU index, RSI = boot info GPA, RSP = a 16-byte
 * aligned stack top: exactly the C calling convention's arguments, so just call. */
    .section .text.start, "ax"
    .globl _start
    .type _start, @function
_start:
    cld
    xor %ebp, %ebp
    call testguest_main
1:  hlt
    jmp 1b
    .size _start, . - _start
