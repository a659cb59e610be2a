/* Parser for the test guest's command line; freestanding, also built for the host
 * (selftest.c) so it is tested without a hypervisor. */
#ifndef TESTGUEST_CMDLINE_H
#define TESTGUEST_CMDLINE_H

#include <stddef.h>
#include <stdint.h>

enum testguest_mode { MODE_BARRIER, MODE_CPUBOUND, MODE_OOB, MODE_IDLE, MODE_HOSTILE, MODE_MANAGER, MODE_WRITER, MODE_READER };

/* mode=hostile: what vCPU 0 does after oob_after iterations (docs/testguest.md). */
enum testguest_attack {
    ATTACK_NONE,
    ATTACK_PORTS,
    ATTACK_STRING_IO,
    ATTACK_MSR_APIC_BASE,
    ATTACK_MSR_EFER,
    ATTACK_MSR_PAT,
    ATTACK_MSR_VMX,
    ATTACK_MSR_UNKNOWN,
    ATTACK_VMXON,
    ATTACK_VMREAD,
    ATTACK_INVEPT,
    ATTACK_XSETBV,
    ATTACK_CLI_HLT,
    ATTACK_CLI_SPIN,
    ATTACK_TRIPLE_FAULT,
    ATTACK_HYPERCALLS,
    ATTACK_IPI_FLOOD,
    ATTACK_SELF_IPI,
    ATTACK_INIT_SIPI,
    ATTACK_IOAPIC,
    ATTACK_LAPIC_ODD,
    ATTACK_STRING_MMIO,
    ATTACK_LOCKED_MMIO,
    ATTACK_GPA_HOLE,
    ATTACK_REBOOT_CF9,
    ATTACK_REBOOT_KBD,
    ATTACK_POWEROFF,
    ATTACK_IRQ_STORM,
    ATTACK_COUNT
};

struct testguest_options {
    enum testguest_mode mode;
    uint64_t work;      /* iterations of the compute loop per step */
    uint64_t iters;     /* 0 = forever */
    uint64_t oob_after; /* mode=oob/hostile/manager: iterations before the misbehaviour or the re-division */
    enum testguest_attack attack; /* mode=hostile: which */
    uint64_t shared;       /* mode=writer/reader: the shared region's guest-physical address */
    uint64_t revoke_after; /* mode=writer: iterations before it revokes the region (0: never) */
};

#define DEFAULT_WORK 2000
#define DEFAULT_ITERS 0
#define DEFAULT_OOB_AFTER 100
#define CMDLINE_ERROR_MAX 96

/* Parses `len` bytes of space-separated key=value words (a NUL ends the line early).
 * Returns 0 and fills *out, or returns -1 and writes a NUL-terminated description of
 * the first problem into err (at most CMDLINE_ERROR_MAX bytes). */
int testguest_parse_cmdline(const char *line, size_t len, struct testguest_options *out,
                            char err[CMDLINE_ERROR_MAX]);

const char *testguest_mode_name(enum testguest_mode mode);
const char *testguest_attack_name(enum testguest_attack attack);

#endif
