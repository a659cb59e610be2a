/* The instructions the test guest's C code needs, as inline functions (freestanding). */
#ifndef TESTGUEST_CPU_H
#define TESTGUEST_CPU_H

#include <stdint.h>

static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

static inline void outb(uint16_t port, uint8_t v)
{
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline uint8_t inb(uint16_t port)
{
    uint8_t v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static inline void cpu_pause(void)
{
    __asm__ volatile("pause" : : : "memory");
}

static inline void hypercall(uint64_t nr, uint64_t vcpu)
{
    __asm__ volatile("vmcall" : "+a"(nr) : "b"(vcpu) : "memory");
}

/* A delegation hypercall: RAX = nr, RBX/RCX/RDX/RSI the arguments; out[0..4] = RAX..RDX. */
static inline void delegation_call(uint64_t nr, uint64_t rbx, uint64_t rcx, uint64_t rdx, uint64_t rsi,
                                   uint64_t out[4])
{
    __asm__ volatile("vmcall" : "+a"(nr), "+b"(rbx), "+c"(rcx), "+d"(rdx) : "S"(rsi) : "memory");
    out[0] = nr;
    out[1] = rbx;
    out[2] = rcx;
    out[3] = rdx;
}

static inline void outw(uint16_t port, uint16_t v)
{
    __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port));
}

static inline void outl(uint16_t port, uint32_t v)
{
    __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port));
}

static inline uint32_t inl(uint16_t port)
{
    uint32_t v;
    __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

#endif
