/* Runs the real flat test-guest image on the host, without a hypervisor: guest memory is
 * mapped at the same addresses in this process, each vCPU is a thread entered at 0x100000
 * with the guest's registers, and the instructions a hypervisor would intercept (out, in,
 * hlt, vmcall) trap to a signal handler that plays the hypervisor's part. An access beyond
 * the guest's memory faults like an EPT violation. Built and run by
 * scripts/build-testguest --selftest; prints "N passed, M failed". x86-64 Linux only. */
#define _GNU_SOURCE
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <ucontext.h>
#include <unistd.h>

#include "abi.h"

#define MEM_SIZE 0x800000ULL
#define MAX_VCPUS 4
#define IDLE_HALTS 5

struct vcpu {
    pthread_t thread;
    unsigned index;
    sigjmp_buf exit_env;
    atomic_int exited;
    int finished; /* after a done/error hypercall the next hlt ends the thread */
    unsigned halts;
    unsigned hypercalls[4];
    uint64_t fault_addr, fault_rip;
    char altstack[64 * 1024];
};

static struct vcpu vcpus[MAX_VCPUS];
static __thread struct vcpu *self;
static char console[8192];
static atomic_size_t console_len;

/* Shared with the parent across fork(). */
static struct { atomic_int passed, failed; } *results;

static void check(int ok, const char *scenario, const char *what)
{
    if (ok)
        atomic_fetch_add(&results->passed, 1);
    else {
        atomic_fetch_add(&results->failed, 1);
        printf("FAIL: %s: %s\n", scenario, what);
        fflush(stdout);
    }
}

static volatile struct stats_record *stats(unsigned vcpu)
{
    return (volatile struct stats_record *)(STATS_GPA + vcpu * STATS_RECORD_SIZE);
}

/* The hypervisor's side of every trapping instruction the guest uses. */
static void on_trap(int sig, siginfo_t *si, void *ctx)
{
    greg_t *g = ((ucontext_t *)ctx)->uc_mcontext.gregs;
    const uint8_t *ip = (const uint8_t *)g[REG_RIP];
    if (sig == SIGSEGV && ip[0] == 0xEE) { /* out %al,(%dx) */
        if ((g[REG_RDX] & 0xFFFF) == 0x3F8) {
            size_t at = atomic_fetch_add(&console_len, 1);
            if (at < sizeof console - 1)
                console[at] = (char)g[REG_RAX];
        }
        g[REG_RIP] += 1;
        return;
    }
    if (sig == SIGSEGV && ip[0] == 0xEC) { /* in (%dx),%al: an always-ready UART */
        uint8_t v = (g[REG_RDX] & 0xFFFF) == 0x3FD ? 0x60 : 0xFF;
        g[REG_RAX] = (g[REG_RAX] & ~0xFFLL) | v;
        g[REG_RIP] += 1;
        return;
    }
    if (sig == SIGSEGV && ip[0] == 0xF4) { /* hlt */
        self->halts++;
        if (self->finished || self->halts >= IDLE_HALTS)
            siglongjmp(self->exit_env, 1);
        g[REG_RIP] += 1;
        return;
    }
    /* vmcall: #UD (SIGILL) natively; some hosts (a KVM guest on AMD) report it as SIGSEGV. */
    if (ip[0] == 0x0F && ip[1] == 0x01 && ip[2] == 0xC1) {
        uint64_t nr = (uint64_t)g[REG_RAX];
        if (nr < 4 && (uint64_t)g[REG_RBX] == self->index)
            self->hypercalls[nr]++;
        else
            self->hypercalls[0]++; /* malformed: counted as "unknown" */
        if (nr == HYPERCALL_DONE || nr == HYPERCALL_ERROR)
            self->finished = 1;
        g[REG_RIP] += 3;
        return;
    }
    /* Anything else stops the vCPU, like an EPT violation or an exception would. */
    self->fault_addr = (uint64_t)si->si_addr;
    self->fault_rip = (uint64_t)g[REG_RIP];
    siglongjmp(self->exit_env, 2);
}

static void *vcpu_thread(void *arg)
{
    struct vcpu *v = arg;
    self = v;
    stack_t ss = { .ss_sp = v->altstack, .ss_size = sizeof v->altstack };
    sigaltstack(&ss, NULL);
    if (sigsetjmp(v->exit_env, 1) == 0) {
        uint64_t rsp = STACKS_TOP_GPA - v->index * STACK_SIZE;
        __asm__ volatile("mov %0, %%rsp\n\tjmp *%1"
                         : : "r"(rsp), "r"(GUEST_IMAGE_GPA), "D"((uint64_t)v->index),
                           "S"(BOOT_INFO_GPA)
                         : "memory");
        __builtin_unreachable();
    }
    atomic_store(&v->exited, 1);
    return NULL;
}

/* Maps guest memory, writes what firmware::longmode::load_test_guest writes (minus the
 * page tables and GDT, which user mode does not use) and starts every vCPU. */
static void boot(const uint8_t *image, size_t image_len, unsigned n, const char *cmdline)
{
    void *mem = mmap((void *)BOOT_INFO_GPA, MEM_SIZE - BOOT_INFO_GPA, PROT_READ | PROT_WRITE | PROT_EXEC,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    if (mem != (void *)BOOT_INFO_GPA) {
        perror("userrun: mapping guest memory at 0x1000");
        _exit(100);
    }
    memcpy((void *)GUEST_IMAGE_GPA, image, image_len);
    struct boot_info info = {
        .magic = BOOT_INFO_MAGIC, .vcpus = n, .cmdline_len = (uint32_t)strlen(cmdline),
        .cmdline_gpa = CMDLINE_GPA, .tsc_hz = 1000000000, .stats_gpa = STATS_GPA,
        .memory_size = MEM_SIZE,
    };
    memcpy((void *)BOOT_INFO_GPA, &info, sizeof info);
    strcpy((char *)CMDLINE_GPA, cmdline);

    struct sigaction sa = { .sa_sigaction = on_trap, .sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER };
    sigaction(SIGSEGV, &sa, NULL);
    sigaction(SIGILL, &sa, NULL);
    for (unsigned i = 0; i < n; i++) {
        vcpus[i].index = i;
        pthread_create(&vcpus[i].thread, NULL, vcpu_thread, &vcpus[i]);
    }
}

static void wait_exited(unsigned i)
{
    while (!atomic_load(&vcpus[i].exited))
        usleep(1000);
}

static int console_has(const char *s)
{
    console[atomic_load(&console_len)] = 0;
    return strstr(console, s) != NULL;
}

static void scenario_barrier(const uint8_t *img, size_t len)
{
    const char *s = "barrier";
    boot(img, len, 2, "mode=barrier work=100 iters=2000");
    for (unsigned i = 0; i < 2; i++) {
        wait_exited(i);
        check(vcpus[i].hypercalls[HYPERCALL_DONE] == 1 && vcpus[i].hypercalls[HYPERCALL_ERROR] == 0 &&
                  vcpus[i].hypercalls[0] == 0 && vcpus[i].hypercalls[HYPERCALL_REPORT] == 0,
              s, "one done hypercall per vCPU, no report before 10000 iterations");
        check(stats(i)->iterations == 2000 && stats(i)->state == STATE_DONE, s, "stats: 2000 iterations, done");
        check(stats(i)->busy_cycles > 0 && stats(i)->last_tsc > 0, s, "stats: busy cycles and TSC");
        check(vcpus[i].fault_rip == 0, s, "no fault");
        if (vcpus[i].fault_rip) printf("  vcpu%u fault rip %#lx addr %#lx\n", i, (unsigned long)vcpus[i].fault_rip, (unsigned long)vcpus[i].fault_addr);
    }
    check(stats(0)->spin_cycles + stats(1)->spin_cycles > 0, s, "spin cycles measured");
    check(console_has("testguest: vcpu0 mode=barrier vcpus=2 iters=2000 work=100\n"), s, "start line");
    check(console_has("testguest: vcpu0 progress iterations=1000 spin_cycles="), s, "progress line at 1000");
    check(console_has("testguest: vcpu0 done iterations=2000 "), s, "done line");
}

static void scenario_cpubound(const uint8_t *img, size_t len)
{
    const char *s = "cpubound";
    boot(img, len, 3, "mode=cpubound work=10 iters=20000");
    for (unsigned i = 0; i < 3; i++) {
        wait_exited(i);
        check(vcpus[i].hypercalls[HYPERCALL_REPORT] == 2 && vcpus[i].hypercalls[HYPERCALL_DONE] == 1,
              s, "report hypercalls at 10000 and 20000, then done");
        check(stats(i)->iterations == 20000 && stats(i)->spin_cycles == 0, s, "stats: 20000 iterations, no spin");
    }
    check(console_has("testguest: vcpu0 progress iterations=10000 "), s, "progress line at 10000");
}

static void scenario_oob(const uint8_t *img, size_t len)
{
    const char *s = "oob";
    boot(img, len, 2, "mode=oob oob_after=50 work=10");
    wait_exited(0);
    check(vcpus[0].fault_addr == MEM_SIZE + OOB_OFFSET, s, "vCPU 0 faults at memory_size + 0x10000");
    check(vcpus[0].fault_rip >= GUEST_IMAGE_GPA && vcpus[0].fault_rip < GUEST_IMAGE_GPA + len, s, "fault RIP in the image");
    check(stats(0)->iterations == 50, s, "after oob_after iterations");
    check(console_has("testguest: vcpu0 oob: writing GPA 0x810000 beyond memory_size 0x800000\n"), s, "announcement");
    uint64_t before = stats(1)->iterations;
    usleep(20000);
    check(stats(1)->iterations > before && !atomic_load(&vcpus[1].exited), s, "vCPU 1 keeps computing");
}

static void scenario_error(const uint8_t *img, size_t len, const char *cmdline, const char *line)
{
    boot(img, len, 2, cmdline);
    for (unsigned i = 0; i < 2; i++) {
        wait_exited(i);
        check(vcpus[i].hypercalls[HYPERCALL_ERROR] == 1 && vcpus[i].fault_rip == 0, cmdline, "error hypercall, then hlt");
    }
    console[atomic_load(&console_len)] = 0;
    check(strcmp(console, line) == 0, cmdline, "exactly one error line from vCPU 0");
    if (strcmp(console, line) != 0)
        printf("  console was: %s", console);
}

static void scenario_idle(const uint8_t *img, size_t len)
{
    boot(img, len, 1, "mode=idle");
    wait_exited(0);
    check(vcpus[0].halts == IDLE_HALTS && stats(0)->iterations == IDLE_HALTS - 1 && stats(0)->state == STATE_RUNNING,
          "idle", "hlt in a loop, counting wake-ups");
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s FLAT_IMAGE\n", argv[0]);
        return 2;
    }
    FILE *f = fopen(argv[1], "rb");
    static uint8_t image[1 << 20];
    size_t len = f ? fread(image, 1, sizeof image, f) : 0;
    if (!len) {
        perror(argv[1]);
        return 2;
    }
    results = mmap(NULL, sizeof *results, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);

    /* Each scenario in its own process: fresh guest memory, and vCPUs that never stop
     * (oob's vCPU 1) end with it. */
    for (int sc = 0; sc < 6; sc++) {
        fflush(stdout);
        pid_t pid = fork();
        if (pid == 0) {
            alarm(120);
            switch (sc) {
            case 0: scenario_barrier(image, len); break;
            case 1: scenario_cpubound(image, len); break;
            case 2: scenario_oob(image, len); break;
            case 3:
                scenario_error(image, len, "mode=turbo",
                               "testguest: error: unknown mode (docs/testguest.md) in 'mode=turbo'\n");
                break;
            case 4:
                scenario_error(image, len, "mode=barrier work=2k",
                               "testguest: error: malformed number (decimal expected) in 'work=2k'\n");
                break;
            case 5: scenario_idle(image, len); break;
            }
            fflush(stdout);
            _exit(0);
        }
        int status;
        waitpid(pid, &status, 0);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            printf("FAIL: scenario %d ended abnormally (status %#x)\n", sc, status);
            atomic_fetch_add(&results->failed, 1);
        }
    }
    printf("%d passed, %d failed\n", atomic_load(&results->passed), atomic_load(&results->failed));
    return atomic_load(&results->failed) != 0;
}
