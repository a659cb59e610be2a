/* The attacks of mode=hostile. Each goes at what a partition must not reach: the
 * hypervisor's own ports and MSRs, VMX itself, the slot timer, other vCPUs and partitions
 * through IPIs and the IO-APIC, memory it does not own, the hypercall interface. The test
 * guest runs at CPL 0 without an IDT: an exception the hypervisor injects is a triple fault,
 * which stops (or resets) the partition. */
#include "hostile.h"

#include "abi.h"
#include "cpu.h"

#define LAPIC_BASE 0xFEE00000ULL
#define IOAPIC_BASE 0xFEC00000ULL
#define LAPIC_TPR 0x080
#define LAPIC_ICR_LOW 0x300
#define LAPIC_ICR_HIGH 0x310
/* A free page below the stacks for the page directory of the 3-4 GiB range (the loader's
 * identity map covers only the first GiB). */
#define DEVICE_PD_GPA 0x15000ULL
#define PDPT_GPA 0x11000ULL
#define PTE_PRESENT_WRITABLE 0x3ULL
#define PDE_LARGE 0x80ULL
#define PTE_UNCACHED 0x18ULL /* PCD | PWT */

static inline void wrmsr(uint32_t msr, uint64_t value)
{
    __asm__ volatile("wrmsr" : : "c"(msr), "a"((uint32_t)value), "d"((uint32_t)(value >> 32)) : "memory");
}

static inline uint64_t rdmsr(uint32_t msr)
{
    uint32_t lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((uint64_t)hi << 32) | lo;
}

static inline void mmio_write32(uint64_t address, uint32_t value)
{
    *(volatile uint32_t *)address = value;
}

/* Maps the xAPIC and IO-APIC pages (2 MiB uncached pages at their physical addresses). */
static void map_devices(void)
{
    volatile uint64_t *pd = (volatile uint64_t *)DEVICE_PD_GPA;
    for (int i = 0; i < 512; i++)
        pd[i] = 0;
    pd[(IOAPIC_BASE >> 21) & 511] = (IOAPIC_BASE & ~0x1FFFFFULL) | PDE_LARGE | PTE_UNCACHED | PTE_PRESENT_WRITABLE;
    pd[(LAPIC_BASE >> 21) & 511] = (LAPIC_BASE & ~0x1FFFFFULL) | PDE_LARGE | PTE_UNCACHED | PTE_PRESENT_WRITABLE;
    ((volatile uint64_t *)PDPT_GPA)[3] = DEVICE_PD_GPA | PTE_PRESENT_WRITABLE;
    uint64_t cr3;
    __asm__ volatile("mov %%cr3, %0; mov %0, %%cr3" : "=r"(cr3) : : "memory");
}

static void send_ipi(uint32_t destination, uint32_t command)
{
    mmio_write32(LAPIC_BASE + LAPIC_ICR_HIGH, destination << 24);
    mmio_write32(LAPIC_BASE + LAPIC_ICR_LOW, command);
}

/* Everything a partition might poke at among the legacy ports: PICs, PIT, the speaker gate,
 * PCI configuration, Bochs' PIIX4 ACPI PM block (S5 there), port 0x92's reset line, Bochs'
 * shutdown port, QEMU's debug exit. On the real machine several of these would reset or power
 * it off. (The partition's own reset and power-off controls are the reboot-* and poweroff
 * attacks.) */
static void poke_ports(void)
{
    outb(0x21, 0xFF);
    outb(0xA1, 0xFF);
    outb(0x43, 0x34);
    outb(0x40, 0x00);
    outb(0x40, 0x00);
    outb(0x61, 0x03);
    outl(0xCF8, 0x80000000u);
    (void)inl(0xCFC);
    outl(0xCFC, 0xFFFFFFFFu);
    outw(0xB004, 0x2000);
    outb(0x92, 0x01);
    const char *shutdown = "Shutdown";
    for (const char *p = shutdown; *p; p++)
        outb(0x8900, (uint8_t)*p);
    outb(0xF4, 0x00);
    (void)inb(0x21);
    (void)inb(0x40);
}

void hostile_attack(enum testguest_attack attack, uint64_t vcpus, uint64_t memory_size)
{
    uint64_t scratch[2] = { 0, 0 };
    switch (attack) {
    case ATTACK_NONE:
    case ATTACK_COUNT:
        return;
    case ATTACK_PORTS:
        for (int round = 0; round < 100; round++)
            poke_ports();
        return;
    case ATTACK_STRING_IO: {
        uint64_t count = 16;
        const void *src = scratch;
        __asm__ volatile("rep outsb" : "+S"(src), "+c"(count) : "d"(0x80) : "memory");
        return;
    }
    case ATTACK_MSR_APIC_BASE:
        wrmsr(0x1B, 0xFED00900ULL); /* relocate the xAPIC */
        return;
    case ATTACK_MSR_EFER:
        wrmsr(0xC0000080, 0); /* leave long mode under running paging */
        return;
    case ATTACK_MSR_PAT:
        wrmsr(0x277, 0x0202020202020202ULL); /* memory type 2 is reserved */
        return;
    case ATTACK_MSR_VMX:
        scratch[0] = rdmsr(0x480); /* IA32_VMX_BASIC */
        wrmsr(0x3A, 0x5);          /* IA32_FEATURE_CONTROL: lock with VMX on */
        return;
    case ATTACK_MSR_UNKNOWN:
        wrmsr(0xC0011234, 0xDEADBEEF);
        return;
    case ATTACK_VMXON:
        __asm__ volatile("vmxon %0" : : "m"(scratch[0]) : "memory", "cc");
        return;
    case ATTACK_VMREAD: {
        uint64_t value, field = 0x6820; /* guest RFLAGS */
        __asm__ volatile("vmread %1, %0" : "=r"(value) : "r"(field) : "cc");
        scratch[0] = value;
        return;
    }
    case ATTACK_INVEPT: {
        uint64_t type = 2;
        __asm__ volatile("invept %0, %1" : : "m"(scratch), "r"(type) : "memory", "cc");
        return;
    }
    case ATTACK_XSETBV:
        /* XCR0 without x87 state is invalid. */
        __asm__ volatile("xsetbv" : : "c"(0), "a"(0), "d"(0));
        return;
    case ATTACK_CLI_HLT:
        for (;;)
            __asm__ volatile("cli; hlt" : : : "memory");
    case ATTACK_CLI_SPIN:
        __asm__ volatile("cli");
        for (;;)
            __asm__ volatile("" : : : "memory");
    /* The partition's own platform: the reset control port (the FADT's reset register), the
     * keyboard controller's reset line, ACPI S5 in its PM1a control block (SLP_TYP 5 from its
     * DSDT's _S5, SLP_EN). None of them returns. */
    case ATTACK_REBOOT_CF9:
        outb(0xCF9, 0x06);
        for (;;)
            cpu_pause();
    case ATTACK_REBOOT_KBD:
        outb(0x64, 0xFE);
        for (;;)
            cpu_pause();
    case ATTACK_POWEROFF:
        outw(0x604, (5 << 10) | (1 << 13));
        for (;;)
            cpu_pause();
    /* Owns COM2 (its ports pass through, its IRQ 3 is routed to the partition): loopback and
     * OUT2 (which gates a PC UART's interrupt line) on, then the transmit-empty interrupt
     * enabled and disabled as fast as it can: every enable is an edge on IRQ 3. Forever. */
    case ATTACK_IRQ_STORM:
        outb(0x2F8 + 4, 0x18);
        for (;;) {
            outb(0x2F8 + 1, 0x00);
            outb(0x2F8 + 1, 0x02);
        }
    case ATTACK_TRIPLE_FAULT: {
        struct __attribute__((packed)) {
            uint16_t limit;
            uint64_t base;
        } empty = { 0, 0 };
        __asm__ volatile("lidt %0; int3" : : "m"(empty) : "memory");
        for (;;)
            ;
    }
    case ATTACK_HYPERCALLS:
        /* Every number up to 1024 but 3 (a guest error, which ends the partition by design)
         * and some far beyond, with garbage arguments. */
        for (uint64_t n = 0; n < 1024; n++)
            if (n != HYPERCALL_ERROR)
                hypercall(n, n * 0x9E3779B97F4A7C15ULL);
        for (uint64_t n = 1; n; n <<= 1)
            hypercall(n | 0x8000000000000000ULL, ~n);
        return;
    case ATTACK_IPI_FLOOD:
        map_devices();
        for (int i = 0; i < 300; i++) {
            send_ipi((uint32_t)(i % (vcpus + 3)), 0x40 + (i & 0x3F)); /* fixed, to siblings and beyond */
            send_ipi(0xFF, 0x000C4000 | 0x41);                       /* all excluding self */
        }
        return;
    case ATTACK_SELF_IPI:
        map_devices();
        for (int i = 0; i < 500; i++)
            send_ipi(0, 0x00040000 | (0x20 + (i & 0xDF))); /* self shorthand, every vector */
        return;
    case ATTACK_INIT_SIPI:
        map_devices();
        send_ipi(7, 0x00004500);          /* INIT to a vCPU the partition does not have */
        send_ipi(7, 0x00004610);          /* start-up there */
        send_ipi(0, 0x00044500);          /* INIT to itself */
        send_ipi(0xFF, 0x000C4500);       /* INIT to everyone else */
        send_ipi(0xFF, 0x000C4620);       /* and start them in real mode at 0x20000 */
        return;
    case ATTACK_IOAPIC:
        map_devices();
        for (uint32_t pin = 0; pin < 64; pin++) {
            mmio_write32(IOAPIC_BASE, 0x10 + 2 * pin);
            mmio_write32(IOAPIC_BASE + 0x10, pin & 1 ? 0x0 : 0xFF); /* vectors 0 and 255 */
            mmio_write32(IOAPIC_BASE, 0x11 + 2 * pin);
            mmio_write32(IOAPIC_BASE + 0x10, 0xFF000000u); /* broadcast destination */
        }
        mmio_write32(IOAPIC_BASE, 0x00);
        mmio_write32(IOAPIC_BASE + 0x10, 0x0F000000u); /* its ID */
        mmio_write32(IOAPIC_BASE, 0xFFFFFFFFu);
        scratch[0] = *(volatile uint32_t *)(IOAPIC_BASE + 0x10);
        return;
    case ATTACK_LAPIC_ODD:
        map_devices();
        *(volatile uint8_t *)(LAPIC_BASE + LAPIC_TPR) = 0xF0;
        *(volatile uint16_t *)(LAPIC_BASE + LAPIC_TPR + 1) = 0xFFFF;
        *(volatile uint32_t *)(LAPIC_BASE + 0x081) = 0x12345678; /* unaligned */
        scratch[0] = *(volatile uint32_t *)(LAPIC_BASE + 0xFF0);   /* reserved */
        *(volatile uint32_t *)(LAPIC_BASE + 0xFFC) = 1;             /* last bytes of the page */
        *(volatile uint8_t *)(LAPIC_BASE + LAPIC_TPR) = 0;
        return;
    case ATTACK_STRING_MMIO: {
        map_devices();
        uint64_t count = 4;
        void *dst = (void *)(LAPIC_BASE + LAPIC_ICR_LOW);
        __asm__ volatile("rep stosl" : "+D"(dst), "+c"(count) : "a"(0x000C4041) : "memory");
        return;
    }
    case ATTACK_LOCKED_MMIO:
        map_devices();
        __asm__ volatile("lock addl $1, %0" : "+m"(*(volatile uint32_t *)(LAPIC_BASE + LAPIC_TPR)) : : "memory");
        return;
    case ATTACK_GPA_HOLE:
        /* Past its memory, within the identity map. */
        *(volatile uint32_t *)(memory_size + 0x1000) = 0xBAD;
        return;
    }
}
