//! Every interrupt vector and IST slot the hypervisor uses, in one place.

/// The phase-lock test's LAPIC timer (boot-time measurement of tick skew).
pub const PHASE_TEST_VECTOR: u8 = 0x40;
/// The dispatch timer: each pCPU's slot boundaries.
pub const DISPATCH_VECTOR: u8 = 0x41;
/// Sent to a pCPU to make its guest exit (or its idle loop wake) at once: a sibling vCPU
/// posted it an IPI or started it.
pub const KICK_VECTOR: u8 = 0x42;
/// `ipi-gang`: the timing pCPU's signal that a slot boundary has come.
pub const BOUNDARY_VECTOR: u8 = 0x43;
/// The console UART's receive interrupt (ISA IRQ 4 through the IO-APIC, to the BSP), while a
/// partition takes the console's input (`phalanx.console`).
pub const CONSOLE_INPUT_VECTOR: u8 = 0x44;
/// The control channel's receive interrupt (COM2, ISA IRQ 3, to the BSP; `control`).
pub const CONTROL_INPUT_VECTOR: u8 = 0x45;
/// Device interrupts partitions own, one vector per IRQ (`config::irq_plan`, `device_irq`).
pub use config::irq_plan::{DEVICE_VECTOR_FIRST, DEVICE_VECTOR_LAST};
/// Spurious-interrupt vector programmed into the LAPIC.
pub const SPURIOUS_VECTOR: u8 = 0xFF;

/// IST slots in every CPU's TSS: faults that must not run on a possibly broken stack.
pub const IST_DOUBLE_FAULT: u8 = 1;
pub const IST_NMI: u8 = 2;
pub const IST_MACHINE_CHECK: u8 = 3;
