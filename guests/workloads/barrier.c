/* barrier: N threads, one pinned per CPU, each doing a compute step and then meeting at a
 * sense-reversing barrier where waiters spin with PAUSE. Reports iterations per second of
 * guest time and, per thread, the TSC cycles spent spinning: the guest-side measure of
 * spin-wait waste when a sibling is descheduled. */
#include "common.h"

struct spin_barrier {
    _Alignas(64) atomic_uint remaining;  /* threads yet to arrive in this episode */
    _Alignas(64) atomic_int sense;       /* flipped by the last arriver to release the rest */
    atomic_int stop;                     /* decided by the last arriver, read after release */
    unsigned threads;
};

struct worker {
    _Alignas(64) unsigned index, cpu;
    uint64_t iterations, spin_cycles, tsc_start, tsc_end, checksum;
    double t_start, t_end;
};

static struct options opt;
static struct spin_barrier bar;
static struct run_timer timer;
static struct worker workers[MAX_THREADS];

/* Returns the stop decision of this episode. `decide` runs on the last arriver only, before
 * the release, so every thread sees the same decision and leaves after the same iteration. */
static int barrier_wait(int *local_sense, uint64_t *spin_cycles, uint64_t episode)
{
    int s = !*local_sense;
    *local_sense = s;
    if (atomic_fetch_sub_explicit(&bar.remaining, 1, memory_order_acq_rel) == 1) {
        atomic_store_explicit(&bar.remaining, bar.threads, memory_order_relaxed);
        int stop = opt.iterations ? episode >= opt.iterations : atomic_load(&timer.time_up);
        atomic_store_explicit(&bar.stop, stop, memory_order_relaxed);
        atomic_store_explicit(&bar.sense, s, memory_order_release);
    } else {
        uint64_t t0 = tsc();
        while (atomic_load_explicit(&bar.sense, memory_order_acquire) != s) _mm_pause();
        *spin_cycles += tsc() - t0;
    }
    return atomic_load_explicit(&bar.stop, memory_order_relaxed);
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    w->cpu = pin_self(opt.name, w->index);
    int local_sense = 0;
    uint64_t unused = 0, x = 0x9E3779B97F4A7C15ull + w->index;
    barrier_wait(&local_sense, &unused, 0); /* start together; episode 0 is not counted */
    if (w->index == 0) atomic_store(&timer.started, 1);
    w->t_start = monotonic_seconds();
    w->tsc_start = tsc();
    for (;;) {
        x = compute_step(x, opt.work);
        w->iterations++;
        if (barrier_wait(&local_sense, &w->spin_cycles, w->iterations)) break;
    }
    w->tsc_end = tsc();
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
    double tsc_hz = (double)(workers[0].tsc_end - workers[0].tsc_start) / elapsed;
    double spin_sum = 0, frac_sum = 0;
    for (unsigned i = 0; i < opt.threads; i++) {
        struct worker *w = &workers[i];
        double span = (double)(w->tsc_end - w->tsc_start);
        double frac = span > 0 ? (double)w->spin_cycles / span : 0;
        spin_sum += (double)w->spin_cycles;
        frac_sum += frac;
        emit("{\"type\":\"thread\",\"workload\":\"barrier\",\"thread\":%u,\"cpu\":%u,\"iterations\":%llu,"
             "\"spin_cycles\":%llu,\"spin_seconds\":%.6f,\"spin_fraction\":%.4f,\"checksum\":\"%016llx\"}",
             i, w->cpu, (unsigned long long)w->iterations, (unsigned long long)w->spin_cycles,
             (double)w->spin_cycles / tsc_hz, frac, (unsigned long long)w->checksum);
    }
    emit("{\"type\":\"workload\",\"name\":\"barrier\",\"threads\":%u,\"cpus\":%u,\"work\":%u,"
         "\"seconds\":%.6f,\"iterations\":%llu,\"iterations_per_sec\":%.1f,\"tsc_hz\":%.0f,"
         "\"spin_cycles_per_thread\":%.0f,\"spin_seconds_per_thread\":%.6f,\"spin_fraction\":%.4f}",
         opt.threads, online_cpus(), opt.work, elapsed, (unsigned long long)workers[0].iterations,
         (double)workers[0].iterations / elapsed, tsc_hz, spin_sum / opt.threads,
         spin_sum / opt.threads / tsc_hz, frac_sum / opt.threads);
    return 0;
}
