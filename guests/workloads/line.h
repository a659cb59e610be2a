/* One console line as a single write(2), so lines from threads and programs sharing a
 * console never interleave: shared by the workloads (common.h) and the distro guest's
 * smp-check. */
#ifndef PHALANX_WORKLOAD_LINE_H
#define PHALANX_WORKLOAD_LINE_H

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <unistd.h>

static inline void write_line(const char *fmt, va_list ap)
{
    char line[1024];
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    if (n < 0) return;
    if ((size_t)n > sizeof line - 2) n = sizeof line - 2;
    line[n++] = '\n';
    for (int off = 0; off < n;) {
        ssize_t w = write(STDOUT_FILENO, line + off, (size_t)(n - off));
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return;
        off += (int)w;
    }
}

#endif
