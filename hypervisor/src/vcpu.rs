//! A vCPU: its VMCS, general registers and FPU/SSE state, set up from the initial state
//! `firmware` computes and the controls negotiated once for the machine.

extern crate alloc;

use reservations::trace::EventKind;
use vmx::entry_check::EntryCheckFailure;
use vmx::spin_sample::{SampleCache, SampleClock};
use vmx::vmcs_image::{HostState, InitialVmcs, PartitionContext, VcpuContext, RFLAGS_IF};
use vmx::{ControlSet, VmxCapabilities};

use crate::guest_entry::{self, GuestRegs};
use crate::vmcs::{self, control, guest};

pub struct Vcpu {
    pub partition: usize,
    pub index: u32,
    pub vpid: u16,
    vmcs: u64,
    /// VM-entry MSR-load and VM-exit MSR-store area for `vmx::msr::SWITCHED` (one list:
    /// the values the guest last had).
    switched_msrs: u64,
    launched: bool,
    pub regs: GuestRegs,
    pub halted: bool,
    pub lapic: vmx::vlapic::VirtualLapic,
    /// Interrupt-window exiting is on in the VMCS.
    interrupt_window: bool,
    /// The partition generation this vCPU's VMCS was set up for (see `Partition::generation`).
    pub generation: u64,
    /// The generation + 1 in which this vCPU parked for a pending reset (0: never).
    pub parked_generation: u64,
    /// When its next spin-wait sample is due, in its own guest time.
    pub sample_clock: SampleClock,
    /// What its recent samples found, by address (a repeated address costs no decoding).
    pub sample_cache: SampleCache,
    /// The guest opened its spin-wait measurement window (`HYPERCALL_SPIN_WINDOW`).
    pub in_spin_window: bool,
    /// Guest RIP at its last exit and how many exits it has had: where it is at the end of
    /// a run (the `vcpu_end` record), for a guest that hangs.
    pub last_exit_rip: u64,
    pub exits: u64,
}

const FXSAVE_SIZE: usize = 512;
const FCW_DEFAULT: u16 = 0x37F;
const MXCSR_DEFAULT: u32 = 0x1F80;

impl Vcpu {
    pub fn new(partition: usize, index: u32, vpid: u16, caps: &VmxCapabilities) -> Vcpu {
        let region = crate::memory::alloc_zeroed_pages(1);
        region[..4].copy_from_slice(&caps.revision_id().to_le_bytes());
        // Both FXSAVE areas in one page: guest at 0, host scratch at 512 (set up in `setup`).
        let fx = crate::memory::alloc_zeroed_pages(1);
        let regs = GuestRegs {
            guest_fx: fx.as_ptr() as u64,
            host_fx: fx.as_ptr() as u64 + FXSAVE_SIZE as u64,
            ..Default::default()
        };
        let switched_msrs = crate::memory::alloc_zeroed_pages(1).as_ptr() as u64;
        Vcpu {
            partition,
            index,
            vpid,
            vmcs: region.as_ptr() as u64,
            switched_msrs,
            launched: false,
            regs,
            halted: false,
            lapic: vmx::vlapic::VirtualLapic::new(index as u8),
            interrupt_window: false,
            generation: 0,
            parked_generation: 0,
            sample_clock: SampleClock::new(0, 0, 0),
            sample_cache: SampleCache::default(),
            in_spin_window: false,
            last_exit_rip: 0,
            exits: 0,
        }
    }

    /// Makes this vCPU's VMCS current on the executing pCPU.
    pub fn load(&self) {
        vmcs::load(self.vmcs, false);
    }

    /// Writes the whole VMCS on the pCPU the vCPU will run on, after checking it against the
    /// SDM's VM-entry checks (a failure names the field; nothing is written then).
    /// `force_interrupts_on`: see [`InitialVmcs::new`] (Bochs runs only).
    pub fn setup(
        &mut self,
        controls: &ControlSet,
        context: &PartitionContext,
        state: &firmware::longmode::VcpuState,
        force_interrupts_on: bool,
    ) -> Result<(), EntryCheckFailure> {
        // SAFETY: the vCPU's own page, 16 bytes per entry (index, reserved, value).
        let area =
            unsafe { core::slice::from_raw_parts_mut(self.switched_msrs as *mut u64, vmx::msr::SWITCHED.len() * 2) };
        for (entry, msr) in area.chunks_exact_mut(2).zip(vmx::msr::SWITCHED) {
            entry[0] = msr as u64;
            entry[1] = 0;
        }
        // The syscall MSRs and KERNEL_GS_BASE: loaded at entry, stored at exit, so each vCPU
        // keeps its own while sharing the pCPU (the hypervisor never uses them).
        let vcpu = VcpuContext {
            vpid: self.vpid,
            msr_area: self.switched_msrs,
            msr_count: vmx::msr::SWITCHED.len() as u32,
            virtual_apic_page: self.lapic.page_address(),
        };
        let image = InitialVmcs::new(
            controls,
            *context,
            vcpu,
            host_state(),
            state,
            physical_address_bits(),
            force_interrupts_on,
        );
        vmx::entry_check::check(&image)?;
        vmcs::load(self.vmcs, true);
        self.launched = false;
        for (field, value) in image.fields() {
            vmcs::write(field, value);
        }

        // The EPT may have been used with other mappings on this CPU: drop stale translations.
        vmcs::invept(context.eptp, controls.paths.invept_single_context);
        // In place: its register page is the virtual-APIC page the VMCS now names.
        self.lapic.reset();
        self.interrupt_window = false;
        let fx = (self.regs.guest_fx, self.regs.host_fx);
        self.regs = GuestRegs { guest_fx: fx.0, host_fx: fx.1, rdi: state.rdi, rsi: state.rsi, ..Default::default() };
        // SAFETY: the vCPU's own FXSAVE page; reset to the power-on x87/SSE state.
        let area = unsafe { core::slice::from_raw_parts_mut(fx.0 as *mut u8, FXSAVE_SIZE) };
        area.fill(0);
        area[0..2].copy_from_slice(&FCW_DEFAULT.to_le_bytes());
        area[24..28].copy_from_slice(&MXCSR_DEFAULT.to_le_bytes());
        self.halted = false;
        self.in_spin_window = false;
        Ok(())
    }

    /// Runs the guest until its next VM exit (the VMCS must be current).
    pub fn enter(&mut self) -> Result<(), u64> {
        let result = guest_entry::enter(&mut self.regs, self.launched);
        if result.is_ok() {
            self.launched = true;
        }
        result
    }

    /// Brings the virtual LAPIC up to `now` (siblings' IPIs taken from the partition's
    /// `devices`, its timer run) and says whether it has an interrupt to deliver.
    pub fn interrupt_due(&mut self, devices: &vmx::devices::PartitionDevices, now: u64) -> bool {
        devices.take_ipis(self.index, &mut self.lapic);
        self.lapic.advance(now);
        self.lapic.deliverable().is_some()
    }

    /// Before an entry: if the virtual LAPIC has a deliverable interrupt, inject it when the
    /// guest can take it, else ask for an exit as soon as it can (interrupt-window exiting).
    /// Under APIC virtualization the same: the CPU virtualizes the registers, not delivery.
    pub fn deliver_interrupts(&mut self, controls: &ControlSet) {
        const VALID: u64 = 1 << 31;
        // The common case (nothing pending, no window asked for) costs no VMCS access.
        let want_window = match self.lapic.deliverable() {
            None => false,
            Some(_) if vmcs::read(control::VMENTRY_INTERRUPTION_INFO_FIELD) & VALID != 0 => false,
            Some(_) => {
                let interruptible =
                    vmcs::read(guest::RFLAGS) & RFLAGS_IF != 0 && vmcs::read(guest::INTERRUPTIBILITY_STATE) & 0b11 == 0;
                if interruptible {
                    if let Some(vector) = self.lapic.acknowledge() {
                        vmcs::write(control::VMENTRY_INTERRUPTION_INFO_FIELD, VALID | vector as u64);
                        crate::trace::record_here(EventKind::Inject, self.partition, self.index, vector as u32);
                    }
                }
                !interruptible
            }
        };
        if want_window != self.interrupt_window {
            const WINDOW: u64 = 1 << 2;
            let primary = controls.primary as u64 | if want_window { WINDOW } else { 0 };
            vmcs::write(control::PRIMARY_PROCBASED_EXEC_CONTROLS, primary);
            self.interrupt_window = want_window;
        }
    }
}

/// The CPU's physical-address width (CPUID 0x80000008 EAX[7:0]; 36 where the leaf is missing).
fn physical_address_bits() -> u8 {
    let max_extended = core::arch::x86_64::__cpuid(0x8000_0000).eax;
    if max_extended >= 0x8000_0008 {
        core::arch::x86_64::__cpuid(0x8000_0008).eax as u8
    } else {
        36
    }
}

/// Host state: the executing CPU's own control registers, segments and tables, so a VM exit
/// lands in `vmx_exit_entry` on this CPU's current stack.
fn host_state() -> HostState {
    use x86_64::instructions::tables::{sgdt, sidt};
    use x86_64::registers::control::{Cr0, Cr3, Cr4};
    let gdt = sgdt();
    let tr: u16;
    // SAFETY: STR only reads the task register.
    unsafe { core::arch::asm!("str {0:x}", out(reg) tr, options(nomem, nostack, preserves_flags)) };
    // SAFETY: IA32_EFER and IA32_PAT exist on every x86_64 CPU.
    let (efer, pat) = unsafe {
        (
            x86_64::registers::model_specific::Msr::new(0xC000_0080).read(),
            x86_64::registers::model_specific::Msr::new(0x277).read(),
        )
    };
    HostState {
        cr0: Cr0::read_raw(),
        cr3: Cr3::read_raw().0.start_address().as_u64(),
        cr4: Cr4::read_raw(),
        code_selector: crate::cpu::KERNEL_CODE_SELECTOR,
        data_selector: crate::cpu::KERNEL_DATA_SELECTOR,
        tr_selector: tr,
        tr_base: crate::cpu::tss_base(gdt.base.as_u64(), tr),
        gdtr_base: gdt.base.as_u64(),
        idtr_base: sidt().base.as_u64(),
        efer,
        pat,
        rip: guest_entry::exit_entry_address(),
    }
}
