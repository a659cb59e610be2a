/* barrier-omp: the barrier workload's loop with an OpenMP `#pragma omp barrier` (libgomp's
 * spin-then-block barrier), as in the BARRIER program of the Barrelfish evaluation. Reports
 * iterations per second of guest time and, per thread, the TSC cycles spent in the barrier
 * (libgomp spins first, then blocks on a futex: this is wait time, not only spinning). */
#include "common.h"
#include <omp.h>

struct worker {
    _Alignas(64) unsigned cpu;
    uint64_t iterations, wait_cycles, tsc_start, tsc_end, checksum;
    double t_start, t_end, cpu_start, cpu_end;
};

static struct options opt;
static struct run_timer timer;
static struct worker workers[MAX_THREADS];
/* Stop decisions, double-buffered by iteration parity: thread 0 writes slot i&1 before
 * barrier i, everyone reads it after; slot i&1 is rewritten only before barrier i+2. */
static atomic_int stop_after[2];

int main(int argc, char **argv)
{
    opt = parse_options("barrier-omp", argc, argv);
    omp_set_dynamic(0);
    double tsc_hz = calibrate_tsc_hz();
    run_timer_start(opt.name, &timer, opt.seconds);
    unsigned team = 0;
#pragma omp parallel num_threads(opt.threads)
    {
        unsigned id = (unsigned)omp_get_thread_num();
        struct worker *w = &workers[id];
        w->cpu = pin_self(opt.name, id);
        uint64_t x = 0x9E3779B97F4A7C15ull + id;
#pragma omp barrier
        if (id == 0) {
            team = (unsigned)omp_get_num_threads();
            atomic_store(&timer.started, 1);
        }
        w->t_start = monotonic_seconds();
        w->cpu_start = thread_cpu_seconds();
        w->tsc_start = tsc();
        for (;;) {
            x = compute_step(x, opt.work);
            w->iterations++;
            if (id == 0) {
                int stop = opt.iterations ? w->iterations >= opt.iterations : atomic_load(&timer.time_up);
                atomic_store_explicit(&stop_after[w->iterations & 1], stop, memory_order_relaxed);
            }
            uint64_t t0 = tsc();
#pragma omp barrier
            w->wait_cycles += tsc() - t0;
            if (atomic_load_explicit(&stop_after[w->iterations & 1], memory_order_relaxed)) break;
        }
        w->tsc_end = tsc();
        w->cpu_end = thread_cpu_seconds();
        w->t_end = monotonic_seconds();
        w->checksum = x;
        w->cpu = (unsigned)sched_getcpu();
    }
    run_timer_join(&timer);
    if (team != opt.threads) fail(opt.name, "OpenMP gave a team of %u threads, %u were asked for", team, opt.threads);

    double elapsed = workers[0].t_end - workers[0].t_start;
    double wait_sum = 0, frac_sum = 0, cpu_sum = 0;
    for (unsigned i = 0; i < opt.threads; i++) {
        struct worker *w = &workers[i];
        double span = (double)(w->tsc_end - w->tsc_start);
        double frac = span > 0 ? (double)w->wait_cycles / span : 0;
        double cpu_s = w->cpu_end - w->cpu_start;
        wait_sum += (double)w->wait_cycles;
        frac_sum += frac;
        cpu_sum += cpu_s;
        emit("{\"type\":\"thread\",\"workload\":\"barrier-omp\",\"thread\":%u,\"cpu\":%u,\"iterations\":%llu,"
             "\"wait_cycles\":%llu,\"wait_seconds\":%.6f,\"wait_fraction\":%.4f,\"cpu_seconds\":%.6f,"
             "\"checksum\":\"%016llx\"}",
             i, w->cpu, (unsigned long long)w->iterations, (unsigned long long)w->wait_cycles,
             (double)w->wait_cycles / tsc_hz, frac, cpu_s, (unsigned long long)w->checksum);
    }
    emit("{\"type\":\"workload\",\"name\":\"barrier-omp\",\"threads\":%u,\"cpus\":%u,\"work\":%u,"
         "\"seconds\":%.6f,\"iterations\":%llu,\"iterations_per_sec\":%.1f,\"tsc_hz\":%.0f,"
         "\"wait_cycles_per_thread\":%.0f,\"wait_seconds_per_thread\":%.6f,\"wait_fraction\":%.4f,"
         "\"cpu_seconds_per_thread\":%.6f}",
         opt.threads, online_cpus(), opt.work, elapsed, (unsigned long long)workers[0].iterations,
         (double)workers[0].iterations / elapsed, tsc_hz, wait_sum / opt.threads,
         wait_sum / opt.threads / tsc_hz, frac_sum / opt.threads, cpu_sum / opt.threads);
    return 0;
}
