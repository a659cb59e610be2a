/* A tiny bare-metal multi-vCPU guest for Phalanx: every vCPU runs the same loop
 * (barrier, cpubound, oob or idle, from the command line), keeps its counters in its
 * stats record for the hypervisor, and vCPU 0 reports on COM1. See docs/testguest.md. */
#include "abi.h"
#include "cmdline.h"
#include "cpu.h"
#include "hostile.h"

#define COM1 0x3F8
#define COM1_LSR (COM1 + 5)
#define LSR_THR_EMPTY 0x20

#define PROGRESS_EVERY_BARRIER 1000
#define PROGRESS_EVERY_CPUBOUND 10000
#define REPORT_EVERY 10000

static void __attribute__((noreturn)) halt_forever(void)
{
    for (;;)
        __asm__ volatile("hlt" : : : "memory");
}

/* gcc may emit calls to these even when freestanding. rep movsb/stosb, because a plain
 * loop can be turned back into a call to the function itself. */
void *memcpy(void *dst, const void *src, size_t n)
{
    void *d = dst;
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(n) : : "memory");
    return dst;
}

void *memset(void *dst, int c, size_t n)
{
    void *d = dst;
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return dst;
}

/* ---- console: one line at a time, built first so the port writes are back to back ---- */

struct line {
    char buf[160];
    size_t len;
};

static void put_str(struct line *l, const char *s)
{
    while (*s && l->len < sizeof l->buf - 1)
        l->buf[l->len++] = *s++;
}

static void put_u64(struct line *l, uint64_t v)
{
    char digits[20];
    int n = 0;
    do {
        digits[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n && l->len < sizeof l->buf - 1)
        l->buf[l->len++] = digits[--n];
}

static void put_hex(struct line *l, uint64_t v)
{
    put_str(l, "0x");
    int shift = 60;
    while (shift > 0 && !(v >> shift))
        shift -= 4;
    for (; shift >= 0 && l->len < sizeof l->buf - 1; shift -= 4)
        l->buf[l->len++] = "0123456789abcdef"[(v >> shift) & 0xF];
}

static void line_start(struct line *l, uint64_t vcpu)
{
    l->len = 0;
    put_str(l, "testguest: vcpu");
    put_u64(l, vcpu);
    put_str(l, " ");
}

/* Polls LSR before each byte; every port access is a VM exit, so callers print rarely. */
static void line_send(struct line *l)
{
    l->buf[l->len++] = '\n';
    for (size_t i = 0; i < l->len; i++) {
        while (!(inb(COM1_LSR) & LSR_THR_EMPTY))
            cpu_pause();
        outb(COM1, (uint8_t)l->buf[i]);
    }
}

/* Prints "testguest: error: <what>" (only if `print`: vCPUs that all hit the same error
 * leave it to vCPU 0), tells the hypervisor, and stops this vCPU. */
static void __attribute__((noreturn)) fail(uint64_t vcpu, int print, const char *what)
{
    if (print) {
        struct line l = { .len = 0 };
        put_str(&l, "testguest: error: ");
        put_str(&l, what);
        line_send(&l);
    }
    hypercall(HYPERCALL_ERROR, vcpu);
    halt_forever();
}

/* ---- the workload ---- */

/* Time the vCPU ran, told apart from time it was descheduled: a gap longer than `gap`
 * between two reads of the TSC is the hypervisor running someone else (a slot lasts
 * milliseconds; an exit, even a spin-wait sample, far less). The guest's spin and busy
 * figures count running time only, like the hypervisor's samples. */
struct run_clock {
    uint64_t last, gap, descheduled;
};

static inline uint64_t run_clock_tick(struct run_clock *rc)
{
    uint64_t now = rdtsc();
    if (now - rc->last > rc->gap)
        rc->descheduled += now - rc->last;
    rc->last = now;
    return now;
}

/* Inner steps between two looks at the TSC in compute_step. */
#define STEPS_PER_TICK 256

/* N steps of a 64-bit LCG; the empty asm keeps the compiler from folding the loop. The
 * inner loop stays bare (under Bochs every instruction is a cycle): the clock is read
 * between runs of STEPS_PER_TICK steps. */
static uint64_t compute_step(uint64_t work, uint64_t x, struct run_clock *rc)
{
    for (uint64_t done = 0; done < work; done += STEPS_PER_TICK) {
        uint64_t steps = work - done < STEPS_PER_TICK ? work - done : STEPS_PER_TICK;
        for (uint64_t i = 0; i < steps; i++) {
            x = x * 6364136223846793005ULL + 1442695040888963407ULL;
            __asm__ volatile("" : "+r"(x));
        }
        run_clock_tick(rc);
    }
    return x;
}

/* Sense-reversing barrier; the counter and the release flag live on separate cache lines
 * so arrivals do not disturb the spinners. In the image (zeroed .bss), shared by all vCPUs. */
static struct {
    volatile uint32_t arrived;
} barrier_count __attribute__((aligned(64)));
static struct {
    volatile uint32_t sense;
} barrier_release __attribute__((aligned(64)));

static void barrier_wait(uint32_t vcpus, uint32_t *local_sense, struct run_clock *rc)
{
    uint32_t sense = !*local_sense;
    *local_sense = sense;
    if (__atomic_add_fetch(&barrier_count.arrived, 1, __ATOMIC_ACQ_REL) == vcpus) {
        /* Last to arrive: nobody can re-arrive before the release below. */
        __atomic_store_n(&barrier_count.arrived, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&barrier_release.sense, sense, __ATOMIC_RELEASE);
    } else {
        /* The PAUSE loop is what PAUSE-loop exiting is meant to see. */
        while (__atomic_load_n(&barrier_release.sense, __ATOMIC_ACQUIRE) != sense) {
            cpu_pause();
            run_clock_tick(rc);
        }
    }
}

struct vcpu_ctx {
    uint64_t vcpu;
    const volatile struct boot_info *info;
    struct testguest_options opt;
    volatile struct stats_record *rec;
    uint64_t iterations, spin_cycles, busy_cycles;
    struct run_clock clock;
};

static void publish(struct vcpu_ctx *c, uint64_t now)
{
    c->rec->iterations = c->iterations;
    c->rec->spin_cycles = c->spin_cycles;
    c->rec->busy_cycles = c->busy_cycles;
    c->rec->last_tsc = now;
}

static void progress_line(struct vcpu_ctx *c, const char *what)
{
    struct line l;
    line_start(&l, c->vcpu);
    put_str(&l, what);
    put_str(&l, " iterations=");
    put_u64(&l, c->iterations);
    put_str(&l, " spin_cycles=");
    put_u64(&l, c->spin_cycles);
    put_str(&l, " busy_cycles=");
    put_u64(&l, c->busy_cycles);
    line_send(&l);
}

/* After each iteration: vCPU 0's progress line, the periodic report, the end. */
static void after_iteration(struct vcpu_ctx *c, uint64_t progress_every)
{
    if (c->vcpu == 0 && c->iterations % progress_every == 0)
        progress_line(c, "progress");
    if (c->iterations % REPORT_EVERY == 0)
        hypercall(HYPERCALL_REPORT, c->vcpu);
    if (c->opt.iters && c->iterations == c->opt.iters) {
        c->rec->state = STATE_DONE;
        if (c->vcpu == 0)
            progress_line(c, "done");
        hypercall(HYPERCALL_DONE, c->vcpu);
        halt_forever();
    }
}

static void __attribute__((noreturn)) run_barrier(struct vcpu_ctx *c)
{
    uint32_t local_sense = 0;
    uint64_t x = c->vcpu;
    for (;;) {
        /* Descheduled time is read after each phase's first tick: a gap before it (the
         * progress line, the report) belongs to neither phase. */
        uint64_t t0 = run_clock_tick(&c->clock), d0 = c->clock.descheduled;
        x = compute_step(c->opt.work, x, &c->clock);
        uint64_t t1 = run_clock_tick(&c->clock), d1 = c->clock.descheduled;
        barrier_wait(c->info->vcpus, &local_sense, &c->clock);
        uint64_t t2 = run_clock_tick(&c->clock), d2 = c->clock.descheduled;
        c->busy_cycles += (t1 - t0) - (d1 - d0);
        c->spin_cycles += (t2 - t1) - (d2 - d1);
        c->iterations++;
        publish(c, t2);
        after_iteration(c, PROGRESS_EVERY_BARRIER);
    }
}

static void __attribute__((noreturn)) oob_write(struct vcpu_ctx *c)
{
    uint64_t target = c->info->memory_size + OOB_OFFSET;
    if (target >= IDENTITY_MAP_SIZE)
        fail(c->vcpu, 1, "mode=oob: memory_size + 0x10000 is beyond the 1 GiB identity map");
    struct line l;
    line_start(&l, c->vcpu);
    put_str(&l, "oob: writing GPA ");
    put_hex(&l, target);
    put_str(&l, " beyond memory_size ");
    put_hex(&l, c->info->memory_size);
    line_send(&l);
    *(volatile uint64_t *)target = 0x0BADC0DE0BADC0DEULL;
    fail(c->vcpu, 1, "mode=oob: the out-of-bounds write did not fault");
}

/* One delegation result on the console: "delegation: WHAT child=N value=V result=R[ epoch=E]". */
static void delegation_line(uint64_t vcpu, const char *what, uint64_t child, uint64_t value, const uint64_t out[4])
{
    struct line l;
    line_start(&l, vcpu);
    put_str(&l, "delegation: ");
    put_str(&l, what);
    put_str(&l, " child=");
    put_u64(&l, child);
    put_str(&l, " value=");
    put_u64(&l, value);
    put_str(&l, " result=");
    put_u64(&l, out[0]);
    /* RBX is the epoch only when the change was accepted (a refusal leaves it as it was). */
    if (out[0] == DELEGATION_OK) {
        put_str(&l, " epoch=");
        put_u64(&l, out[1]);
    }
    line_send(&l);
}

/* Gives child `child` a hard `budget_us` of every `frame_us`; a change still on its way in
 * (DELEGATION_BUSY) is waited out, computing. */
static void set_child(struct vcpu_ctx *c, uint64_t child, uint64_t budget_us, uint64_t frame_us, uint64_t out[4])
{
    uint64_t x = 0;
    for (;;) {
        delegation_call(HYPERCALL_SET_CHILD_RESERVATION, child, RESERVATION_HARD, budget_us, frame_us, out);
        if (out[0] != DELEGATION_BUSY)
            break;
        x = compute_step(c->opt.work, x, &c->clock);
    }
    delegation_line(c->vcpu, "set", child, budget_us, out);
}

/* mode=manager: the partition manages a group (its `manager`). It reads what the group holds
 * and re-divides it: a third to child 0, a half to child 1 (each a hard budget per frame),
 * then asks for more than the group holds (refused) and for a child it does not have. */
static void redivide(struct vcpu_ctx *c)
{
    uint64_t info[4], out[4];
    delegation_call(HYPERCALL_GROUP_INFO, 0, 0, 0, 0, info);
    struct line l;
    line_start(&l, c->vcpu);
    put_str(&l, "delegation: group result=");
    put_u64(&l, info[0]);
    put_str(&l, " capacity_us=");
    put_u64(&l, info[1]);
    put_str(&l, " children=");
    put_u64(&l, info[2]);
    put_str(&l, " frame_us=");
    put_u64(&l, info[3]);
    line_send(&l);
    if (info[0] != DELEGATION_OK || info[2] < 2)
        fail(c->vcpu, 1, "mode=manager: the partition manages no group of two children");
    uint64_t capacity = info[1], frame = info[3];
    set_child(c, 0, capacity / 3, frame, out);
    set_child(c, 1, capacity / 2, frame, out);
    set_child(c, 0, capacity - capacity / 2 + 1, frame, out);
    set_child(c, info[2], 1, frame, out);
    line_start(&l, c->vcpu);
    put_str(&l, "delegation: done");
    line_send(&l);
}

/* Revokes the shared region at `shared`: the caller's own (`child_plus_one` 0) or its group's
 * child's (RCX = child + 1), and says what came of it after `label`. */
static void revoke_shared(struct vcpu_ctx *c, uint64_t child_plus_one, const char *label)
{
    uint64_t out[4];
    delegation_call(HYPERCALL_REVOKE_SHARED, c->opt.shared, child_plus_one, 0, 0, out);
    struct line l;
    line_start(&l, c->vcpu);
    put_str(&l, label);
    put_u64(&l, out[0]);
    line_send(&l);
}

/* mode=writer and mode=reader: vCPU 0 writes its iteration count into the shared region at
 * `shared`, or reads it and prints what it read every 100 iterations; the writer (its owner)
 * revokes the region after `revoke_after` iterations. A reader's access after the revoke is
 * an EPT violation: its partition stops there. */
static void shared_step(struct vcpu_ctx *c)
{
    volatile uint64_t *cell = (volatile uint64_t *)c->opt.shared;
    if (c->opt.mode == MODE_WRITER) {
        *cell = c->iterations;
        if (c->opt.revoke_after && c->iterations == c->opt.revoke_after)
            revoke_shared(c, 0, "shared: revoked result=");
        return;
    }
    uint64_t value = *cell;
    if (c->iterations % 100 == 0) {
        struct line l;
        line_start(&l, c->vcpu);
        put_str(&l, "shared: value=");
        put_u64(&l, value);
        line_send(&l);
    }
}

/* cpubound, oob and hostile: the compute step only. In oob mode vCPU 0 writes beyond its
 * memory after oob_after iterations; in hostile mode it carries out its attack then (and
 * goes on computing if the attack returns); the others keep computing all along. */
static void __attribute__((noreturn)) run_cpubound(struct vcpu_ctx *c)
{
    uint64_t x = c->vcpu;
    int oob = c->opt.mode == MODE_OOB && c->vcpu == 0;
    int hostile = c->opt.mode == MODE_HOSTILE && c->vcpu == 0;
    int manager = c->opt.mode == MODE_MANAGER && c->vcpu == 0;
    int shared = (c->opt.mode == MODE_WRITER || c->opt.mode == MODE_READER) && c->vcpu == 0;
    if (shared && (c->opt.shared == 0 || c->opt.shared + 8 > IDENTITY_MAP_SIZE))
        fail(c->vcpu, 1, "mode=writer/reader: shared= needs the region's address, below the 1 GiB identity map");
    for (;;) {
        if (shared)
            shared_step(c);
        if (manager && !c->opt.shared && c->iterations == c->opt.oob_after)
            redivide(c);
        /* With shared=GPA the manager revokes, for its group's child 0, instead. */
        if (manager && c->opt.shared && c->iterations == c->opt.revoke_after)
            revoke_shared(c, 1, "shared: revoked for child 0 result=");
        if (oob && c->iterations == c->opt.oob_after)
            oob_write(c);
        if (hostile && c->iterations == c->opt.oob_after) {
            struct line l;
            line_start(&l, c->vcpu);
            put_str(&l, "attack ");
            put_str(&l, testguest_attack_name(c->opt.attack));
            line_send(&l);
            hostile_attack(c->opt.attack, c->info->vcpus, c->info->memory_size);
            line_start(&l, c->vcpu);
            put_str(&l, "survived ");
            put_str(&l, testguest_attack_name(c->opt.attack));
            line_send(&l);
        }
        uint64_t t0 = run_clock_tick(&c->clock), d0 = c->clock.descheduled;
        x = compute_step(c->opt.work, x, &c->clock);
        uint64_t t1 = run_clock_tick(&c->clock), d1 = c->clock.descheduled;
        c->busy_cycles += (t1 - t0) - (d1 - d0);
        c->iterations++;
        publish(c, t1);
        after_iteration(c, PROGRESS_EVERY_CPUBOUND);
    }
}

/* Interrupts are off: each HLT returns only when the hypervisor resumes the vCPU. */
static void __attribute__((noreturn)) run_idle(struct vcpu_ctx *c)
{
    for (;;) {
        __asm__ volatile("hlt" : : : "memory");
        c->iterations++;
        publish(c, rdtsc());
    }
}

void __attribute__((noreturn)) testguest_main(uint64_t vcpu, const volatile struct boot_info *info)
{
    char err[CMDLINE_ERROR_MAX];
    struct vcpu_ctx c = { .vcpu = vcpu, .info = info };

    if (info->magic != BOOT_INFO_MAGIC)
        fail(vcpu, vcpu == 0, "bad boot info magic at GPA 0x1000");
    if (vcpu >= info->vcpus)
        fail(vcpu, 1, "vCPU index is not below boot_info.vcpus");
    if (testguest_parse_cmdline((const char *)info->cmdline_gpa, info->cmdline_len, &c.opt, err) != 0)
        fail(vcpu, vcpu == 0, err);

    c.rec = (volatile struct stats_record *)(info->stats_gpa + vcpu * STATS_RECORD_SIZE);
    c.rec->state = STATE_RUNNING;
    c.rec->last_tsc = rdtsc();
    /* 500 us: far above an exit, far below a slot. Without a TSC rate, 500 us at 3 GHz. */
    c.clock = (struct run_clock){ .last = rdtsc(), .gap = info->tsc_hz ? info->tsc_hz / 2000 : 1500000 };

    if (vcpu == 0) {
        struct line l;
        line_start(&l, vcpu);
        put_str(&l, "mode=");
        put_str(&l, testguest_mode_name(c.opt.mode));
        put_str(&l, " vcpus=");
        put_u64(&l, info->vcpus);
        put_str(&l, " iters=");
        put_u64(&l, c.opt.iters);
        put_str(&l, " work=");
        put_u64(&l, c.opt.work);
        if (c.opt.mode == MODE_OOB || c.opt.mode == MODE_HOSTILE || c.opt.mode == MODE_MANAGER) {
            put_str(&l, " oob_after=");
            put_u64(&l, c.opt.oob_after);
        }
        if (c.opt.mode == MODE_HOSTILE) {
            put_str(&l, " attack=");
            put_str(&l, testguest_attack_name(c.opt.attack));
        }
        line_send(&l);
    }

    switch (c.opt.mode) {
    case MODE_BARRIER:
        run_barrier(&c);
    case MODE_CPUBOUND:
    case MODE_OOB:
    case MODE_HOSTILE:
    case MODE_MANAGER:
    case MODE_WRITER:
    case MODE_READER:
        run_cpubound(&c);
    case MODE_IDLE:
        run_idle(&c);
    }
    fail(vcpu, 1, "internal: unhandled mode");
}
