/* cpubound: the barrier workloads' compute step with no barrier, N threads pinned one per
 * CPU. The competing load in the consolidation baseline; reports iterations per second. */
#include "common.h"

struct worker {
    _Alignas(64) unsigned index, cpu;
    uint64_t iterations, checksum;
    double t_start, t_end, cpu_start, cpu_end;
};

static struct options opt;
static struct run_timer timer;
static struct worker workers[MAX_THREADS];
static atomic_uint ready;

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    w->cpu = pin_self(opt.name, w->index);
    if (atomic_fetch_add(&ready, 1) + 1 == opt.threads) atomic_store(&timer.started, 1);
    uint64_t x = 0x9E3779B97F4A7C15ull + w->index;
    w->t_start = monotonic_seconds();
    w->cpu_start = thread_cpu_seconds();
    for (;;) {
        x = compute_step(x, opt.work);
        w->iterations++;
        if (opt.iterations ? w->iterations >= opt.iterations
                           : atomic_load_explicit(&timer.time_up, memory_order_relaxed)) break;
    }
    w->cpu_end = thread_cpu_seconds();
    w->t_end = monotonic_seconds();
    w->checksum = x;
    w->cpu = (unsigned)sched_getcpu();
    return NULL;
}

int main(int argc, char **argv)
{
    opt = parse_options("cpubound", argc, argv);
    pthread_t tids[MAX_THREADS];
    run_timer_start(opt.name, &timer, opt.seconds);
    for (unsigned i = 0; i < opt.threads; i++) {
        workers[i].index = i;
        if (pthread_create(&tids[i], NULL, worker_main, &workers[i]) != 0)
            fail(opt.name, "cannot create worker thread %u", i);
    }
    for (unsigned i = 0; i < opt.threads; i++) pthread_join(tids[i], NULL);
    run_timer_join(&timer);

    uint64_t total = 0;
    double cpu_sum = 0;
    double first = workers[0].t_start, last = workers[0].t_end;
    for (unsigned i = 0; i < opt.threads; i++) {
        struct worker *w = &workers[i];
        double elapsed = w->t_end - w->t_start;
        total += w->iterations;
        cpu_sum += w->cpu_end - w->cpu_start;
        if (w->t_start < first) first = w->t_start;
        if (w->t_end > last) last = w->t_end;
        emit("{\"type\":\"thread\",\"workload\":\"cpubound\",\"thread\":%u,\"cpu\":%u,\"iterations\":%llu,"
             "\"seconds\":%.6f,\"iterations_per_sec\":%.1f,\"cpu_seconds\":%.6f,\"checksum\":\"%016llx\"}",
             i, w->cpu, (unsigned long long)w->iterations, elapsed, (double)w->iterations / elapsed,
             w->cpu_end - w->cpu_start, (unsigned long long)w->checksum);
    }
    double elapsed = last - first;
    emit("{\"type\":\"workload\",\"name\":\"cpubound\",\"threads\":%u,\"cpus\":%u,\"work\":%u,"
         "\"seconds\":%.6f,\"iterations\":%llu,\"iterations_per_sec\":%.1f,\"cpu_seconds_per_thread\":%.6f}",
         opt.threads, online_cpus(), opt.work, elapsed, (unsigned long long)total, (double)total / elapsed,
         cpu_sum / opt.threads);
    return 0;
}
