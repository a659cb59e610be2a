//! Per-CPU state: GDT, TSS with IST stacks, the shared IDT, and which CPU this is.

extern crate alloc;

use alloc::boxed::Box;
use core::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use x86_64::instructions::segmentation::{Segment, CS, DS, ES, SS};
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::tss::TaskStateSegment;
use x86_64::VirtAddr;

use crate::vectors::{IST_DOUBLE_FAULT, IST_MACHINE_CHECK, IST_NMI};

pub use crate::percpu::MAX_CPUS;
const IST_STACK_SIZE: usize = 16 * 1024;
const UNKNOWN_CPU: u8 = 0xFF;

static APIC_ID_TO_INDEX: [AtomicU8; 256] = [const { AtomicU8::new(UNKNOWN_CPU) }; 256];
static LAPIC_READY: AtomicBool = AtomicBool::new(false);

/// The selectors of one CPU's GDT (the same slots on every CPU: `KERNEL_*_SELECTOR`).
struct Selectors {
    code: SegmentSelector,
    data: SegmentSelector,
    tss: SegmentSelector,
}

pub fn register_apic_id(apic_id: u32, index: usize) {
    if let Some(slot) = APIC_ID_TO_INDEX.get(apic_id as usize) {
        slot.store(index as u8, Ordering::Relaxed);
    }
    if index < MAX_CPUS {
        crate::percpu::of(index).apic_id.store(apic_id as u8, Ordering::Relaxed);
    }
}

/// The APIC ID of pCPU `index`.
pub fn apic_id_of(index: usize) -> u32 {
    crate::percpu::of(index).apic_id.load(Ordering::Relaxed) as u32
}

pub fn mark_lapic_ready() {
    LAPIC_READY.store(true, Ordering::Release);
}

/// Index of the executing CPU (0 = BSP); 0 until the LAPIC is mapped.
pub fn current_index() -> usize {
    if !LAPIC_READY.load(Ordering::Acquire) {
        return 0;
    }
    match APIC_ID_TO_INDEX[crate::apic::id() as usize & 0xFF].load(Ordering::Relaxed) {
        UNKNOWN_CPU => 0,
        index => index as usize,
    }
}

fn leak_stack(size: usize) -> VirtAddr {
    let stack: &'static mut [u8] = Box::leak(alloc::vec![0u8; size].into_boxed_slice());
    VirtAddr::new((stack.as_ptr() as u64 + size as u64) & !0xF)
}

/// Gives this CPU its own GDT and TSS (a TSS descriptor is marked busy by `ltr`, so it
/// cannot be shared) and reloads the segment registers. The caller loads the shared IDT.
pub fn init_this_cpu() {
    let mut tss = TaskStateSegment::new();
    for slot in [IST_DOUBLE_FAULT, IST_NMI, IST_MACHINE_CHECK] {
        tss.interrupt_stack_table[slot as usize - 1] = leak_stack(IST_STACK_SIZE);
    }
    let tss: &'static TaskStateSegment = Box::leak(Box::new(tss));
    let gdt: &'static mut GlobalDescriptorTable = Box::leak(Box::new(GlobalDescriptorTable::new()));
    let selectors = Selectors {
        code: gdt.append(Descriptor::kernel_code_segment()),
        data: gdt.append(Descriptor::kernel_data_segment()),
        tss: gdt.append(Descriptor::tss_segment(tss)),
    };
    gdt.load();
    // SAFETY: the selectors index the GDT just loaded, whose descriptors are valid 64-bit
    // code/data/TSS descriptors that live forever.
    unsafe {
        CS::set_reg(selectors.code);
        SS::set_reg(selectors.data);
        DS::set_reg(selectors.data);
        ES::set_reg(selectors.data);
        x86_64::instructions::tables::load_tss(selectors.tss);
    }
    debug_assert_eq!(
        (selectors.code.0, selectors.data.0),
        (KERNEL_CODE_SELECTOR, KERNEL_DATA_SELECTOR),
        "the VMCS host state assumes these slots"
    );
}

pub fn halt_forever() -> ! {
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}

/// Selectors every CPU's GDT has at the same slots (`init_this_cpu` appends in this order).
pub const KERNEL_CODE_SELECTOR: u16 = 0x08;
pub const KERNEL_DATA_SELECTOR: u16 = 0x10;

/// Base address of the TSS that `selector` names in the GDT at `gdt_base` (64-bit TSS
/// descriptors split the base over three fields and a second slot).
pub fn tss_base(gdt_base: u64, selector: u16) -> u64 {
    let index = (selector >> 3) as u64;
    // SAFETY: reading this CPU's own live GDT, which holds a 16-byte TSS descriptor at the
    // selector `ltr` loaded.
    let (low, high) = unsafe {
        let entry = (gdt_base + index * 8) as *const u64;
        (entry.read_volatile(), entry.add(1).read_volatile())
    };
    ((low >> 16) & 0xFF_FFFF) | (((low >> 56) & 0xFF) << 24) | ((high & 0xFFFF_FFFF) << 32)
}
