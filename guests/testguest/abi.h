/* The guest side of the long-mode test guest ABI. The hypervisor side is
 * firmware/src/longmode.rs; a firmware test checks these values against it. */
#ifndef TESTGUEST_ABI_H
#define TESTGUEST_ABI_H

#include <stdint.h>

#define BOOT_INFO_MAGIC 0x58484c414850ULL /* "PHALHX" little endian */
#define STATS_RECORD_SIZE 64
#define GUEST_IMAGE_GPA 0x100000ULL
/* Where the loader puts things. The guest itself finds them through RSI and the boot
 * info; they are here for the host harness (userrun.c). */
#define BOOT_INFO_GPA 0x1000ULL
#define CMDLINE_GPA 0x2000ULL
#define STATS_GPA 0x3000ULL
#define STACKS_TOP_GPA 0x100000ULL
#define STACK_SIZE 0x4000ULL
/* Reach of the identity map the loader builds; the OOB target must lie inside it. */
#define IDENTITY_MAP_SIZE 0x40000000ULL
/* Distance of the out-of-bounds write beyond the end of guest memory. */
#define OOB_OFFSET 0x10000ULL

#define STATE_RUNNING 1
#define STATE_DONE 2

#define HYPERCALL_REPORT 1
#define HYPERCALL_DONE 2
#define HYPERCALL_ERROR 3
/* Delegation (docs/control.md; firmware/src/longmode.rs has the registers). */
#define HYPERCALL_GROUP_INFO 5
#define HYPERCALL_SET_CHILD_RESERVATION 6
#define HYPERCALL_REVOKE_SHARED 7
#define RESERVATION_HARD 1
#define DELEGATION_OK 0
#define DELEGATION_BUSY 4

struct boot_info {
    uint64_t magic;
    uint32_t vcpus;
    uint32_t cmdline_len;
    uint64_t cmdline_gpa;
    uint64_t tsc_hz;
    uint64_t stats_gpa;
    uint64_t memory_size;
};
_Static_assert(sizeof(struct boot_info) == 48, "boot info layout");

/* Written with plain stores; the hypervisor reads it at any time. */
struct stats_record {
    uint64_t iterations;
    uint64_t spin_cycles; /* TSC cycles spinning in the barrier */
    uint64_t busy_cycles; /* TSC cycles in the compute step */
    uint64_t last_tsc;
    uint64_t state;       /* STATE_RUNNING or STATE_DONE */
    uint64_t reserved[3];
};
_Static_assert(sizeof(struct stats_record) == STATS_RECORD_SIZE, "stats record layout");

#endif
