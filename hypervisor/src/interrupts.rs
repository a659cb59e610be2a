//! Interrupt and exception entry: one stub per vector pushing a uniform frame, one Rust
//! dispatcher. (The `x86_64` crate's typed IDT entries need the unstable x86-interrupt ABI for
//! Rust handlers; with asm stubs for every vector a flat table of gates is all we need.)

use core::arch::global_asm;
use core::sync::atomic::{AtomicU64, Ordering};
use spin::Once;

use crate::vectors::{
    BOUNDARY_VECTOR, CONSOLE_INPUT_VECTOR, CONTROL_INPUT_VECTOR, DEVICE_VECTOR_FIRST, DEVICE_VECTOR_LAST,
    DISPATCH_VECTOR, IST_DOUBLE_FAULT, IST_MACHINE_CHECK, IST_NMI, KICK_VECTOR, PHASE_TEST_VECTOR, SPURIOUS_VECTOR,
};

/// Registered by the layers above at start-up, so this one never calls up by name.
static PHASE_TEST_TICK: Once<fn()> = Once::new();
static END_RUN_AFTER_BSP_EXCEPTION: Once<fn() -> !> = Once::new();
static DEVICE_INTERRUPT: Once<fn(u8)> = Once::new();

/// `arrived` runs for every device vector (`config::irq_plan`) taken in root mode, before the
/// EOI.
pub fn on_device_interrupt(arrived: fn(u8)) {
    DEVICE_INTERRUPT.call_once(|| arrived);
}

/// `tick` runs on every phase-test timer interrupt (before the EOI).
pub fn on_phase_test_tick(tick: fn()) {
    PHASE_TEST_TICK.call_once(|| tick);
}

/// `end_run` ends the machine's run after an exception on the BSP (which drives the run:
/// without it the machine could only hang).
pub fn on_bsp_exception(end_run: fn() -> !) {
    END_RUN_AFTER_BSP_EXCEPTION.call_once(|| end_run);
}

global_asm!(
    r#"
.section .text
.global isr_common
isr_common:
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    mov rbp, rsp
    sub rsp, 512
    and rsp, -64
    fxsave [rsp]
    mov rdi, rbp
    cld
    call interrupt_dispatch
    fxrstor [rsp]
    mov rsp, rbp
    pop r15
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rbp
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    pop rax
    add rsp, 16
    iretq

/* One 16-byte stub per vector: vectors that push no error code push a zero, so every frame
   has the same shape. */
.balign 16
.global isr_stubs
isr_stubs:
.set vector, 0
.rept 256
    .balign 16
    .if (vector == 8) || (vector == 10) || (vector == 11) || (vector == 12) || (vector == 13) || (vector == 14) || (vector == 17) || (vector == 21) || (vector == 29) || (vector == 30)
    .else
    push 0
    .endif
    push vector
    jmp isr_common
    .set vector, vector + 1
.endr
"#
);

/// The register frame every stub builds (lowest address first).
#[repr(C)]
#[derive(Debug)]
pub struct InterruptFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

extern "C" {
    static isr_stubs: u8;
}

const STUB_SIZE: u64 = 16;

#[repr(C, align(16))]
struct Idt([u64; 512]);

static mut IDT: Idt = Idt([0; 512]);

/// Interrupts taken per vector, for the statistics record.
pub static COUNTS: [AtomicU64; 256] = [const { AtomicU64::new(0) }; 256];

fn ist_for(vector: u8) -> u8 {
    match vector {
        2 => IST_NMI,
        8 => IST_DOUBLE_FAULT,
        18 => IST_MACHINE_CHECK,
        _ => 0,
    }
}

/// Fills the shared IDT (once, on the BSP, before any CPU loads it).
/// Takes an interrupt that is pending in the LAPIC now, in root mode (the handlers of the
/// hypervisor's own vectors only acknowledge them): `sti` takes effect after the next
/// instruction, so `sti; nop; cli` opens a window of one instruction.
pub fn take_pending() {
    x86_64::instructions::interrupts::enable();
    x86_64::instructions::nop();
    x86_64::instructions::interrupts::disable();
}

pub fn build_idt(code_selector: u16) {
    for vector in 0..256usize {
        let handler = core::ptr::addr_of!(isr_stubs) as u64 + vector as u64 * STUB_SIZE;
        // 64-bit interrupt gate, present, DPL 0.
        let low = (handler & 0xFFFF)
            | ((code_selector as u64) << 16)
            | ((ist_for(vector as u8) as u64) << 32)
            | (0x8E << 40)
            | (((handler >> 16) & 0xFFFF) << 48);
        let high = handler >> 32;
        // SAFETY: single-threaded boot; no CPU has loaded the IDT yet.
        unsafe {
            let idt = &mut *core::ptr::addr_of_mut!(IDT);
            idt.0[vector * 2] = low;
            idt.0[vector * 2 + 1] = high;
        }
    }
}

/// Loads the shared IDT on this CPU.
pub fn load_idt() {
    let pointer = x86_64::structures::DescriptorTablePointer {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: x86_64::VirtAddr::new(core::ptr::addr_of!(IDT) as u64),
    };
    // SAFETY: the IDT is static, fully built before the first load, and never freed.
    unsafe { x86_64::instructions::tables::lidt(&pointer) };
}

const EXCEPTION_NAMES: [&str; 32] = [
    "divide error",
    "debug",
    "NMI",
    "breakpoint",
    "overflow",
    "bound range exceeded",
    "invalid opcode",
    "device not available",
    "double fault",
    "coprocessor segment overrun",
    "invalid TSS",
    "segment not present",
    "stack-segment fault",
    "general protection",
    "page fault",
    "reserved",
    "x87 floating point",
    "alignment check",
    "machine check",
    "SIMD floating point",
    "virtualization",
    "control protection",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "hypervisor injection",
    "VMM communication",
    "security",
    "reserved",
];

#[no_mangle]
extern "C" fn interrupt_dispatch(frame: &mut InterruptFrame) {
    let vector = frame.vector as u8;
    COUNTS[vector as usize].fetch_add(1, Ordering::Relaxed);
    match vector {
        0..=31 => exception(frame),
        PHASE_TEST_VECTOR => {
            if let Some(tick) = PHASE_TEST_TICK.get() {
                tick();
            }
            crate::apic::eoi();
        }
        // They exist to make a guest exit or wake `hlt`: acknowledging them is all.
        DISPATCH_VECTOR | KICK_VECTOR | BOUNDARY_VECTOR => crate::apic::eoi(),
        CONSOLE_INPUT_VECTOR => {
            crate::console::on_input();
            crate::apic::eoi();
        }
        CONTROL_INPUT_VECTOR => {
            crate::serial::COM2_INPUT.on_interrupt();
            crate::apic::eoi();
        }
        SPURIOUS_VECTOR => {}
        DEVICE_VECTOR_FIRST..=DEVICE_VECTOR_LAST if DEVICE_INTERRUPT.is_completed() => {
            (DEVICE_INTERRUPT.get().expect("registered"))(vector);
            crate::apic::eoi();
        }
        _ => {
            log::warn!("unexpected interrupt vector {vector:#x}");
            crate::apic::eoi();
        }
    }
}

/// Every exception in root mode is a hypervisor bug: report it clearly and stop this CPU.
fn exception(frame: &InterruptFrame) -> ! {
    let cr2 = x86_64::registers::control::Cr2::read_raw();
    let cpu = crate::cpu::current_index();
    let name = EXCEPTION_NAMES[frame.vector as usize];
    log::error!(
        "EXCEPTION {} ({name}) on cpu{cpu}: rip={:#x} error={:#x} cr2={cr2:#x} rsp={:#x} rflags={:#x}",
        frame.vector,
        frame.rip,
        frame.error_code,
        frame.rsp,
        frame.rflags
    );
    crate::console::Record::new("exception")
        .u64("cpu", cpu as u64)
        .u64("vector", frame.vector)
        .str("name", name)
        .fmt("rip", format_args!("{:#x}", frame.rip))
        .fmt("error_code", format_args!("{:#x}", frame.error_code))
        .fmt("cr2", format_args!("{cr2:#x}"))
        .emit();
    crate::console::flush();
    if cpu == 0 {
        if let Some(end_run) = END_RUN_AFTER_BSP_EXCEPTION.get() {
            end_run();
        }
    }
    crate::cpu::halt_forever()
}
