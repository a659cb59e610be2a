/* smp-check: the SMP sanity check of the distro guest (scripts/build-distro-guest builds it
 * into build/distro/initrd.cpio.gz as /bin/smp-check).
 *
 * Starts one thread per online CPU (sysconf(_SC_NPROCESSORS_ONLN)), pins thread i to the
 * i-th CPU of the process's affinity mask, and runs ROUNDS rounds (default 2000) in which
 * every thread increments one shared atomic counter and then waits at a spinning barrier.
 * After each barrier a thread checks the counter (all threads have added this round's
 * increment; none can be more than one round ahead) and that sched_getcpu() still names the
 * CPU it was pinned to. Prints, each as a single write:
 *   smp-check: cpus_seen=0,1,... elapsed_ms=T      the CPUs the threads actually ran on
 *   smp-check: threads=N rounds=R ok               or  ... FAIL: <reason>
 * Exit status 0 on ok, 1 on FAIL, 2 on a usage error. A barrier wait longer than
 * BARRIER_TIMEOUT_S (a CPU that never runs its thread) is a FAIL, not a hang.
 *
 * Usage: smp-check [ROUNDS] */
#define _GNU_SOURCE
#include <errno.h>
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

#include "line.h"

#define DEFAULT_ROUNDS 2000u
#define MAX_THREADS CPU_SETSIZE
#define BARRIER_TIMEOUT_S 30
#define SPINS_PER_CLOCK_CHECK 4096u

struct barrier {
    _Alignas(64) atomic_uint arrived;    /* threads at the barrier in this generation */
    _Alignas(64) atomic_uint generation; /* bumped by the last arriver to release the rest */
};

struct worker {
    _Alignas(64) pthread_t tid;
    unsigned index;
    int cpu; /* the CPU this thread is pinned to */
};

static unsigned nthreads, rounds;
static struct barrier bar;
static _Alignas(64) atomic_ulong counter;
static _Alignas(64) atomic_int failed;   /* set once, by the first failure */
static char fail_reason[256];
static atomic_uchar cpu_seen[CPU_SETSIZE];
static struct worker workers[MAX_THREADS];

/* One line as a single write(2), so it cannot interleave with other console output. */
static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    write_line(fmt, ap);
    va_end(ap);
}

/* Records the first failure only; later ones are consequences. */
static void set_failed(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void set_failed(const char *fmt, ...)
{
    int expected = 0;
    if (!atomic_compare_exchange_strong(&failed, &expected, -1)) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(fail_reason, sizeof fail_reason, fmt, ap);
    va_end(ap);
    atomic_store(&failed, 1); /* reason written */
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void note_cpu(struct worker *w, unsigned round)
{
    int cpu = sched_getcpu();
    if (cpu < 0) {
        set_failed("thread %u: sched_getcpu failed: %s", w->index, strerror(errno));
        return;
    }
    if (cpu < CPU_SETSIZE) atomic_store_explicit(&cpu_seen[cpu], 1, memory_order_relaxed);
    if (cpu != w->cpu)
        set_failed("thread %u pinned to cpu %d ran on cpu %d (round %u)", w->index, w->cpu, cpu, round);
}

/* Returns 0 when every thread has arrived, -1 on a timeout or another thread's failure. */
static int barrier_wait(struct worker *w, unsigned round)
{
    unsigned gen = atomic_load_explicit(&bar.generation, memory_order_acquire);
    if (atomic_fetch_add_explicit(&bar.arrived, 1, memory_order_acq_rel) + 1 == nthreads) {
        atomic_store_explicit(&bar.arrived, 0, memory_order_relaxed);
        atomic_fetch_add_explicit(&bar.generation, 1, memory_order_release);
        return 0;
    }
    double deadline = 0;
    for (unsigned spins = 0; atomic_load_explicit(&bar.generation, memory_order_acquire) == gen; spins++) {
        __builtin_ia32_pause();
        if (spins % SPINS_PER_CLOCK_CHECK) continue;
        if (atomic_load_explicit(&failed, memory_order_relaxed)) return -1;
        double t = now_s();
        if (deadline == 0) {
            deadline = t + BARRIER_TIMEOUT_S;
        } else if (t > deadline) {
            set_failed("barrier timeout after %d s in round %u: thread %u waited, %u of %u arrived",
                       BARRIER_TIMEOUT_S, round, w->index,
                       atomic_load(&bar.arrived), nthreads);
            return -1;
        }
    }
    return 0;
}

static void *run(void *arg)
{
    struct worker *w = arg;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(w->cpu, &set);
    if (sched_setaffinity(0, sizeof set, &set) != 0) {
        set_failed("thread %u: sched_setaffinity(cpu %d) failed: %s", w->index, w->cpu, strerror(errno));
        return NULL;
    }
    note_cpu(w, 0);
    for (unsigned r = 0; r < rounds; r++) {
        atomic_fetch_add(&counter, 1);
        if (barrier_wait(w, r) != 0) return NULL;
        /* Everybody has added round r's increment; at most the other threads have added
         * round r+1's (they cannot pass the next barrier without this thread). */
        unsigned long v = atomic_load(&counter);
        unsigned long lo = (unsigned long)(r + 1) * nthreads, hi = lo + nthreads - 1;
        if (v < lo || v > hi) {
            set_failed("thread %u round %u: counter %lu outside [%lu, %lu]", w->index, r, v, lo, hi);
            return NULL;
        }
        note_cpu(w, r);
        if (atomic_load_explicit(&failed, memory_order_relaxed)) return NULL;
    }
    return NULL;
}

static void report(double elapsed)
{
    char list[4096];
    size_t len = 0;
    list[0] = 0;
    for (int c = 0; c < CPU_SETSIZE && len < sizeof list - 16; c++)
        if (atomic_load(&cpu_seen[c]))
            len += (size_t)snprintf(list + len, sizeof list - len, "%s%d", len ? "," : "", c);
    say("smp-check: cpus_seen=%s elapsed_ms=%.0f", len ? list : "none", elapsed * 1e3);
    if (atomic_load(&failed)) {
        while (atomic_load(&failed) < 0) ; /* the reason is being written */
        say("smp-check: threads=%u rounds=%u FAIL: %s", nthreads, rounds, fail_reason);
    } else {
        say("smp-check: threads=%u rounds=%u ok", nthreads, rounds);
    }
}

int main(int argc, char **argv)
{
    rounds = DEFAULT_ROUNDS;
    if (argc > 2 || (argc == 2 && !strcmp(argv[1], "--help"))) {
        fprintf(stderr, "usage: smp-check [ROUNDS]   (default %u)\n", DEFAULT_ROUNDS);
        return 2;
    }
    if (argc == 2) {
        char *end;
        errno = 0;
        unsigned long v = strtoul(argv[1], &end, 10);
        if (errno || *end || end == argv[1] || argv[1][0] == '-' || v == 0 || v > 100000000ul) {
            fprintf(stderr, "smp-check: ROUNDS must be a positive integer, got '%s'\n", argv[1]);
            return 2;
        }
        rounds = (unsigned)v;
    }

    long online = sysconf(_SC_NPROCESSORS_ONLN);
    nthreads = online > 0 ? (unsigned)online : 1;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;

    /* Thread i goes to the i-th CPU the process may run on. */
    cpu_set_t allowed;
    CPU_ZERO(&allowed);
    if (sched_getaffinity(0, sizeof allowed, &allowed) != 0) {
        set_failed("sched_getaffinity failed: %s", strerror(errno));
        report(0);
        return 1;
    }
    if ((unsigned)CPU_COUNT(&allowed) < nthreads) {
        set_failed("%ld CPUs online but the affinity mask allows only %d", online, CPU_COUNT(&allowed));
        report(0);
        return 1;
    }
    for (unsigned i = 0, c = 0; i < nthreads; c++)
        if (CPU_ISSET(c, &allowed)) { workers[i].index = i; workers[i].cpu = (int)c; i++; }

    double t0 = now_s();
    unsigned started = 0;
    for (unsigned i = 1; i < nthreads; i++, started++) {
        int e = pthread_create(&workers[i].tid, NULL, run, &workers[i]);
        if (e) {
            set_failed("pthread_create for thread %u failed: %s", i, strerror(e));
            break;
        }
    }
    if (!atomic_load(&failed)) run(&workers[0]); /* the main thread is thread 0 */
    if (atomic_load(&failed)) {
        /* Threads may still be spinning (or on a CPU that never runs): do not join them. */
        report(now_s() - t0);
        return 1;
    }
    for (unsigned i = 1; i <= started; i++) pthread_join(workers[i].tid, NULL);
    double elapsed = now_s() - t0;
    unsigned long expect = (unsigned long)rounds * nthreads;
    if (!atomic_load(&failed) && atomic_load(&counter) != expect)
        set_failed("final counter %lu, expected %lu", atomic_load(&counter), expect);
    report(elapsed);
    return atomic_load(&failed) ? 1 : 0;
}
