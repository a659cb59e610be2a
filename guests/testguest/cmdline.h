/* Parser for the test guest's command line; freestanding, also built for the host
 * (selftest.c) so it is tested without a hypervisor. */
#ifndef TESTGUEST_CMDLINE_H
#define TESTGUEST_CMDLINE_H

#include <stddef.h>
#include <stdint.h>

enum testguest_mode { MODE_BARRIER, MODE_CPUBOUND, MODE_OOB, MODE_IDLE };

struct testguest_options {
    enum testguest_mode mode;
    uint64_t work;      /* iterations of the compute loop per step */
    uint64_t iters;     /* 0 = forever */
    uint64_t oob_after; /* mode=oob: iterations before the out-of-bounds write */
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

#endif
