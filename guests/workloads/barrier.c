/* barrier: N threads, one pinned per CPU, each doing a compute step and then meeting at a
 * sense-reversing barrier where waiters spin with PAUSE. Reports iterations per second of
 * guest time and, per thread, the TSC cycles spent spinning: the guest-side measure of
 * spin-wait waste when a sibling is descheduled. Each thread keeps a running clock: the TSC
 * read after every piece of compute (at most COMPUTE_CHUNK rounds) and every spin pass; a gap
 * longer than DESCHEDULED_GAP_SECONDS between two reads is time the thread itself was not
 * running (preempted by Linux or descheduled by a hypervisor). The spin fraction is spinning
 * over running time, so a hypervisor's sampled figure (which sees only running time) measures
 * the same thing. In a Phalanx partition each thread opens its vCPU's spin-wait measurement
 * window for the measured stretch (phalanx_spin_window). */
#include "common.h"

struct spin_barrier {
    _Alignas(64) atomic_uint remaining;  /* threads yet to arrive in this episode */
    _Alignas(64) atomic_int sense;       /* flipped by the last arriver to release the rest */
    atomic_int stop;                     /* decided by the last arriver, read after release */
    unsigned threads;
};

/* A thread's time between its TSC reads, split into running and descheduled. */
struct run_clock {
    uint64_t last;               /* the latest TSC read */
    uint64_t running_cycles;     /* gaps up to gap_cycles */
    uint64_t descheduled_cycles; /* longer gaps */
};

struct spin_account {
    uint64_t spin_cycles;        /* waiting while running */
    uint64_t descheduled_cycles; /* waiting while preempted */
};

struct worker {
    _Alignas(64) unsigned index, cpu;
    uint64_t iterations, tsc_start, tsc_end, checksum;
    struct run_clock clock;
    struct spin_account wait;
    double t_start, t_end, cpu_start, cpu_end;
};

/* The compute step is cut into pieces of at most this many rounds (~1000 instructions) with
 * a TSC read after each, so a long --work still tells running from descheduled time. */
#define COMPUTE_CHUNK 256u

static struct options opt;
static struct spin_barrier bar;
static struct run_timer timer;
static struct worker workers[MAX_THREADS];
static uint64_t gap_cycles; /* DESCHEDULED_GAP_SECONDS in TSC cycles */
static int in_phalanx;      /* in a Phalanx partition: open its spin-wait measurement windows */

/* Reads the TSC: returns the cycles since the previous read if the thread ran all along,
 * 0 if the gap says it was descheduled (the gap is then counted as descheduled time). */
static inline uint64_t run_clock_tick(struct run_clock *c)
{
    uint64_t now = tsc(), gap = now - c->last;
    c->last = now;
    if (gap > gap_cycles) {
        c->descheduled_cycles += gap;
        return 0;
    }
    c->running_cycles += gap;
    return gap;
}

/* Returns the stop decision of this episode. `decide` runs on the last arriver only, before
 * the release, so every thread sees the same decision and leaves after the same iteration.
 * A waiter's running time in the barrier is spinning; `clock` is 0 for the untimed start. */
static int barrier_wait(int *local_sense, struct run_clock *clock, struct spin_account *acct, uint64_t episode)
{
    int s = !*local_sense;
    *local_sense = s;
    if (atomic_fetch_sub_explicit(&bar.remaining, 1, memory_order_acq_rel) == 1) {
        atomic_store_explicit(&bar.remaining, bar.threads, memory_order_relaxed);
        int stop = opt.iterations ? episode >= opt.iterations : atomic_load(&timer.time_up);
        atomic_store_explicit(&bar.stop, stop, memory_order_relaxed);
        atomic_store_explicit(&bar.sense, s, memory_order_release);
    } else if (clock) {
        for (;;) {
            int released = atomic_load_explicit(&bar.sense, memory_order_acquire) == s;
            uint64_t descheduled_before = clock->descheduled_cycles;
            acct->spin_cycles += run_clock_tick(clock);
            acct->descheduled_cycles += clock->descheduled_cycles - descheduled_before;
            if (released) break;
            _mm_pause();
        }
    } else {
        while (atomic_load_explicit(&bar.sense, memory_order_acquire) != s) _mm_pause();
    }
    return atomic_load_explicit(&bar.stop, memory_order_relaxed);
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    w->cpu = pin_self(opt.name, w->index);
    int local_sense = 0;
    uint64_t x = 0x9E3779B97F4A7C15ull + w->index;
    barrier_wait(&local_sense, NULL, NULL, 0); /* start together; episode 0 is not counted */
    if (w->index == 0) atomic_store(&timer.started, 1);
    if (in_phalanx) phalanx_spin_window(1);
    w->t_start = monotonic_seconds();
    w->cpu_start = thread_cpu_seconds();
    w->tsc_start = w->clock.last = tsc();
    for (;;) {
        for (unsigned done = 0; done < opt.work; done += COMPUTE_CHUNK) {
            unsigned rounds = opt.work - done < COMPUTE_CHUNK ? opt.work - done : COMPUTE_CHUNK;
            x = compute_step(x, rounds); /* the same chain as one step of opt.work rounds */
            run_clock_tick(&w->clock);
        }
        w->iterations++;
        if (barrier_wait(&local_sense, &w->clock, &w->wait, w->iterations)) break;
    }
    w->tsc_end = w->clock.last;
    if (in_phalanx) phalanx_spin_window(0);
    w->cpu_end = thread_cpu_seconds();
    w->t_end = monotonic_seconds();
    w->checksum = x;
    w->cpu = (unsigned)sched_getcpu();
    return NULL;
}

int main(int argc, char **argv)
{
    opt = parse_options("barrier", argc, argv);
    bar.threads = opt.threads;
    atomic_store(&bar.remaining, opt.threads);
    double tsc_hz = calibrate_tsc_hz();
    gap_cycles = (uint64_t)(tsc_hz * DESCHEDULED_GAP_SECONDS);
    in_phalanx = in_phalanx_partition();
    pthread_t tids[MAX_THREADS];
    run_timer_start(opt.name, &timer, opt.seconds);
    for (unsigned i = 0; i < opt.threads; i++) {
        workers[i].index = i;
        if (pthread_create(&tids[i], NULL, worker_main, &workers[i]) != 0)
            fail(opt.name, "cannot create worker thread %u", i);
    }
    for (unsigned i = 0; i < opt.threads; i++) pthread_join(tids[i], NULL);
    run_timer_join(&timer);

    double elapsed = workers[0].t_end - workers[0].t_start;
    double spin_sum = 0, desched_sum = 0, frac_sum = 0, cpu_sum = 0;
    for (unsigned i = 0; i < opt.threads; i++) {
        struct worker *w = &workers[i];
        double running = (double)w->clock.running_cycles;
        double frac = running > 0 ? (double)w->wait.spin_cycles / running : 0;
        double cpu_s = w->cpu_end - w->cpu_start;
        spin_sum += (double)w->wait.spin_cycles;
        desched_sum += (double)w->wait.descheduled_cycles;
        frac_sum += frac;
        cpu_sum += cpu_s;
        emit("{\"type\":\"thread\",\"workload\":\"barrier\",\"thread\":%u,\"cpu\":%u,\"iterations\":%llu,"
             "\"spin_cycles\":%llu,\"spin_seconds\":%.6f,\"spin_fraction\":%.4f,"
             "\"running_cycles\":%llu,\"descheduled_cycles\":%llu,\"descheduled_in_barrier_cycles\":%llu,"
             "\"cpu_seconds\":%.6f,\"checksum\":\"%016llx\"}",
             i, w->cpu, (unsigned long long)w->iterations, (unsigned long long)w->wait.spin_cycles,
             (double)w->wait.spin_cycles / tsc_hz, frac, (unsigned long long)w->clock.running_cycles,
             (unsigned long long)w->clock.descheduled_cycles, (unsigned long long)w->wait.descheduled_cycles,
             cpu_s, (unsigned long long)w->checksum);
    }
    emit("{\"type\":\"workload\",\"name\":\"barrier\",\"threads\":%u,\"cpus\":%u,\"work\":%u,"
         "\"seconds\":%.6f,\"iterations\":%llu,\"iterations_per_sec\":%.1f,\"tsc_hz\":%.0f,"
         "\"spin_cycles_per_thread\":%.0f,\"spin_seconds_per_thread\":%.6f,\"spin_fraction\":%.4f,\"phalanx\":%s,"
         "\"descheduled_in_barrier_seconds_per_thread\":%.6f,\"cpu_seconds_per_thread\":%.6f}",
         opt.threads, online_cpus(), opt.work, elapsed, (unsigned long long)workers[0].iterations,
         (double)workers[0].iterations / elapsed, tsc_hz, spin_sum / opt.threads,
         spin_sum / opt.threads / tsc_hz, frac_sum / opt.threads, in_phalanx ? "true" : "false", desched_sum / opt.threads / tsc_hz,
         cpu_sum / opt.threads);
    return 0;
}
