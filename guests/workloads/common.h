/* Shared pieces of the Phalanx guest workloads: option parsing, the compute step, CPU
 * pinning, the TSC, the run timer and single-line JSON output. */
#ifndef PHALANX_WORKLOAD_COMMON_H
#define PHALANX_WORKLOAD_COMMON_H

#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <cpuid.h>
#include <x86intrin.h>

#include "line.h"

#define MAX_THREADS 256

struct options {
    const char *name;       /* workload name, used in every record */
    unsigned threads;       /* worker threads, one per CPU (default: online CPUs) */
    unsigned seconds;       /* run for this many seconds of guest time ... */
    uint64_t iterations;    /* ... or this many iterations (exactly one of the two) */
    unsigned work;          /* xorshift rounds per compute step */
};

/* Prints one JSON record as a single write(2), so records from concurrent programs sharing
 * a console never interleave within a line. */
static void emit(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void emit(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    write_line(fmt, ap);
    va_end(ap);
}

static void __attribute__((noreturn)) fail(const char *name, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    for (char *p = msg; *p; p++) if (*p == '"' || *p == '\\' || (unsigned char)*p < 0x20) *p = '\'';
    emit("{\"type\":\"error\",\"source\":\"%s\",\"message\":\"%s\"}", name, msg);
    exit(2);
}

static unsigned online_cpus(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (unsigned)n : 1;
}

static uint64_t parse_positive(const char *name, const char *opt, const char *text)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(text, &end, 10);
    if (errno || *end || end == text || text[0] == '-' || v == 0)
        fail(name, "%s wants a positive integer, got '%s'", opt, text);
    return v;
}

static void usage(const char *name)
{
    fprintf(stderr,
            "usage: %s [--threads N] [--seconds S | --iterations N] [--work W]\n"
            "  --threads N     worker threads, pinned one per CPU (default: online CPUs)\n"
            "  --seconds S     run S seconds of guest time (default 5)\n"
            "  --iterations N  run N iterations instead\n"
            "  --work W        xorshift rounds per compute step (default 100)\n"
            "Prints single-line JSON records: one per thread, then a total.\n", name);
}

static struct options parse_options(const char *name, int argc, char **argv)
{
    struct options o = {.name = name, .threads = online_cpus(), .seconds = 0, .iterations = 0, .work = 100};
    static const struct option longopts[] = {
        {"threads", required_argument, 0, 't'}, {"seconds", required_argument, 0, 's'},
        {"iterations", required_argument, 0, 'i'}, {"work", required_argument, 0, 'w'},
        {"help", no_argument, 0, 'h'}, {0, 0, 0, 0}};
    opterr = 0;
    int c;
    while ((c = getopt_long(argc, argv, "t:s:i:w:h", longopts, NULL)) != -1) {
        switch (c) {
        case 't': o.threads = (unsigned)parse_positive(name, "--threads", optarg); break;
        case 's': o.seconds = (unsigned)parse_positive(name, "--seconds", optarg); break;
        case 'i': o.iterations = parse_positive(name, "--iterations", optarg); break;
        case 'w': o.work = (unsigned)parse_positive(name, "--work", optarg); break;
        case 'h': usage(name); exit(0);
        default: fail(name, "unknown or incomplete option '%s'", argv[optind - 1]);
        }
    }
    if (optind < argc) fail(name, "unexpected argument '%s'", argv[optind]);
    if (o.threads > MAX_THREADS) fail(name, "--threads %u exceeds the maximum of %d", o.threads, MAX_THREADS);
    if (o.seconds && o.iterations) fail(name, "--seconds and --iterations exclude each other");
    if (!o.seconds && !o.iterations) o.seconds = 5;
    return o;
}

/* The compute step every workload performs between barriers: a serial xorshift chain the
 * compiler cannot vectorise or drop (the result is kept). ~4 instructions per round. */
static inline uint64_t compute_step(uint64_t x, unsigned work)
{
    for (unsigned i = 0; i < work; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    return x;
}

static inline uint64_t tsc(void) { return __rdtsc(); }

static double monotonic_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* CPU time the calling thread has had (the scheduler's accounting, ns precision). */
static double thread_cpu_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* TSC ticks per second of guest time, measured over a 50 ms sleep before the run (Bochs:
 * exactly its ips; the TSC is the clock every cycle figure is given in). */
static __attribute__((unused)) double calibrate_tsc_hz(void)
{
    double t0 = monotonic_seconds();
    uint64_t c0 = tsc();
    struct timespec ts = {.tv_sec = 0, .tv_nsec = 50 * 1000 * 1000};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
    uint64_t c1 = tsc();
    double t1 = monotonic_seconds();
    return (double)(c1 - c0) / (t1 - t0);
}

/* A gap longer than this between two consecutive TSC reads of a thread (in a spin loop, or
 * around a short piece of compute) means the thread itself was not running (preempted by the
 * guest's scheduler or descheduled by a hypervisor): far above interrupt handling, below a
 * time slice. */
#define DESCHEDULED_GAP_SECONDS 0.001

/* Phalanx, when the workload runs in one of its partitions: CPUID leaf 0x40000000 carries
 * its signature (vmx::cpuid::SIGNATURE). */
static __attribute__((unused)) int in_phalanx_partition(void)
{
    unsigned eax, ebx, ecx, edx;
    __cpuid(0x40000000, eax, ebx, ecx, edx);
    char sig[13];
    memcpy(sig, &ebx, 4);
    memcpy(sig + 4, &ecx, 4);
    memcpy(sig + 8, &edx, 4);
    sig[12] = 0;
    return strcmp(sig, "PhalanxHVisr") == 0;
}

/* Opens (1) or closes (0) the calling vCPU's spin-wait measurement window in Phalanx
 * (HYPERCALL_SPIN_WINDOW, firmware::longmode): the hypervisor counts the spin-wait samples it
 * takes of this vCPU while the window is open apart, so its figure covers the stretch this
 * thread measures itself. VMCALL exits to the hypervisor at any privilege level; call it only
 * when in_phalanx_partition() (elsewhere it faults or means something else). */
static __attribute__((unused)) void phalanx_spin_window(int open)
{
    unsigned long rax = 4, rbx = (unsigned long)open;
    __asm__ volatile("vmcall" : "+a"(rax) : "b"(rbx) : "memory");
}

/* Pins the calling thread to CPU (index mod online CPUs): one thread per CPU. */
static unsigned pin_self(const char *name, unsigned index)
{
    unsigned cpu = index % online_cpus();
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof set, &set) != 0)
        fail(name, "sched_setaffinity(cpu %u) failed: %s", cpu, strerror(errno));
    return cpu;
}

/* Run timer: set once the run has started (by the workers), raises time_up after the
 * requested guest seconds. Runs on its own thread so it never competes with a worker's
 * position in a team (the OpenMP master is a worker). */
struct run_timer {
    atomic_int started;
    atomic_int time_up;
    unsigned seconds;
    pthread_t thread;
};

static void *run_timer_main(void *arg)
{
    struct run_timer *t = arg;
    while (!atomic_load(&t->started)) usleep(1000);
    struct timespec ts = {.tv_sec = t->seconds, .tv_nsec = 0};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
    atomic_store(&t->time_up, 1);
    return NULL;
}

static void run_timer_start(const char *name, struct run_timer *t, unsigned seconds)
{
    atomic_store(&t->started, 0);
    atomic_store(&t->time_up, 0);
    t->seconds = seconds;
    if (seconds && pthread_create(&t->thread, NULL, run_timer_main, t) != 0)
        fail(name, "cannot create the timer thread");
}

static void run_timer_join(struct run_timer *t)
{
    if (t->seconds) pthread_join(t->thread, NULL);
}

#endif
