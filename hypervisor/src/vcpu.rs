//! A vCPU: its VMCS, general registers and FPU/SSE state, set up from the initial state
//! `firmware` computes and the controls negotiated once for the machine.

extern crate alloc;

use vmx::{negotiate, ControlError, ControlKind, VmxCapabilities};
use x86::vmx::vmcs::control::{EntryControls, ExitControls, PinbasedControls, PrimaryControls, SecondaryControls};

use crate::guest_entry::{self, GuestRegs};
use crate::vmcs::{self, control, guest, host};

/// The control values every vCPU on this machine uses (negotiated once at boot).
#[derive(Debug, Clone, Copy)]
pub struct Controls {
    pub pinbased: u32,
    pub primary: u32,
    pub secondary: u32,
    pub exit: u32,
    pub entry: u32,
    pub caps: VmxCapabilities,
}

/// PAUSE-loop exiting: a PAUSE less than `PLE_GAP` cycles after the previous one belongs to
/// the same spin loop; a loop longer than `PLE_WINDOW` cycles exits. 4096 cycles is long
/// enough that ordinary lock hand-offs never exit and short enough to see real spinning.
pub const PLE_GAP: u64 = 128;
pub const PLE_WINDOW: u64 = 4096;

impl Controls {
    pub fn negotiate(caps: &VmxCapabilities) -> Result<Controls, ControlError> {
        let pinbased = negotiate(
            ControlKind::PinBased,
            caps.pinbased,
            (PinbasedControls::EXTERNAL_INTERRUPT_EXITING
                | PinbasedControls::NMI_EXITING
                | PinbasedControls::VMX_PREEMPTION_TIMER)
                .bits(),
            0,
        )?;
        let primary = negotiate(
            ControlKind::PrimaryProcessorBased,
            caps.procbased,
            (PrimaryControls::HLT_EXITING
                | PrimaryControls::USE_IO_BITMAPS
                | PrimaryControls::USE_MSR_BITMAPS
                | PrimaryControls::MWAIT_EXITING
                | PrimaryControls::MONITOR_EXITING
                | PrimaryControls::RDPMC_EXITING
                | PrimaryControls::SECONDARY_CONTROLS)
                .bits(),
            0,
        )?;
        let secondary = negotiate(
            ControlKind::SecondaryProcessorBased,
            caps.procbased2,
            (SecondaryControls::ENABLE_EPT | SecondaryControls::ENABLE_VPID | SecondaryControls::PAUSE_LOOP_EXITING)
                .bits(),
            (SecondaryControls::UNRESTRICTED_GUEST
                | SecondaryControls::ENABLE_RDTSCP
                | SecondaryControls::ENABLE_INVPCID)
                .bits(),
        )?;
        let exit = negotiate(
            ControlKind::VmExit,
            caps.exit,
            (ExitControls::HOST_ADDRESS_SPACE_SIZE
                | ExitControls::ACK_INTERRUPT_ON_EXIT
                | ExitControls::SAVE_IA32_EFER
                | ExitControls::LOAD_IA32_EFER
                | ExitControls::SAVE_IA32_PAT
                | ExitControls::LOAD_IA32_PAT)
                .bits(),
            0,
        )?;
        let entry = negotiate(
            ControlKind::VmEntry,
            caps.entry,
            (EntryControls::IA32E_MODE_GUEST | EntryControls::LOAD_IA32_EFER | EntryControls::LOAD_IA32_PAT).bits(),
            0,
        )?;
        Ok(Controls { pinbased, primary, secondary, exit, entry, caps: *caps })
    }
}

/// Where a vCPU's partition-wide structures are (host-physical).
#[derive(Debug, Clone, Copy)]
pub struct PartitionContext {
    pub eptp: u64,
    pub io_bitmap_a: u64,
    pub io_bitmap_b: u64,
    pub msr_bitmap: u64,
}

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
}

const FXSAVE_SIZE: usize = 512;
const RFLAGS_IF: u64 = 1 << 9;
/// IA32_PAT after reset: WB, WT, UC-, UC, repeated.
const PAT_POWER_ON: u64 = 0x0007_0406_0007_0406;
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
        }
    }

    /// Makes this vCPU's VMCS current on the executing pCPU.
    pub fn load(&self) {
        vmcs::load(self.vmcs, false);
    }

    /// Writes the whole VMCS on the pCPU the vCPU will run on.
    pub fn setup(&mut self, controls: &Controls, context: &PartitionContext, state: &firmware::longmode::VcpuState) {
        vmcs::load(self.vmcs, true);
        self.launched = false;
        let caps = &controls.caps;

        vmcs::write(control::PINBASED_EXEC_CONTROLS, controls.pinbased as u64);
        vmcs::write(control::PRIMARY_PROCBASED_EXEC_CONTROLS, controls.primary as u64);
        vmcs::write(control::SECONDARY_PROCBASED_EXEC_CONTROLS, controls.secondary as u64);
        vmcs::write(control::VMEXIT_CONTROLS, controls.exit as u64);
        // A vCPU that starts outside long mode (an AP in real mode) enters without "IA-32e
        // mode guest"; VM exits keep that control in step with EFER.LMA from then on.
        let long_mode = state.efer & (1 << 10) != 0;
        let entry = if long_mode { controls.entry } else { controls.entry & !EntryControls::IA32E_MODE_GUEST.bits() };
        vmcs::write(control::VMENTRY_CONTROLS, entry as u64);
        vmcs::write(control::EXCEPTION_BITMAP, 0);
        vmcs::write(control::IO_BITMAP_A_ADDR_FULL, context.io_bitmap_a);
        vmcs::write(control::IO_BITMAP_B_ADDR_FULL, context.io_bitmap_b);
        vmcs::write(control::MSR_BITMAPS_ADDR_FULL, context.msr_bitmap);
        vmcs::write(control::EPTP_FULL, context.eptp);
        vmcs::write(control::VPID, self.vpid as u64);
        vmcs::write(control::PLE_GAP, PLE_GAP);
        vmcs::write(control::PLE_WINDOW, PLE_WINDOW);
        vmcs::write(control::CR3_TARGET_COUNT, 0);
        // The syscall MSRs and KERNEL_GS_BASE: loaded at entry, stored at exit, so each
        // vCPU keeps its own while sharing the pCPU (the hypervisor never uses them).
        // SAFETY: the vCPU's own page, 16 bytes per entry (index, reserved, value).
        let area =
            unsafe { core::slice::from_raw_parts_mut(self.switched_msrs as *mut u64, vmx::msr::SWITCHED.len() * 2) };
        for (entry, msr) in area.chunks_exact_mut(2).zip(vmx::msr::SWITCHED) {
            entry[0] = msr as u64;
            entry[1] = 0;
        }
        let count = vmx::msr::SWITCHED.len() as u64;
        vmcs::write(control::VMEXIT_MSR_STORE_ADDR_FULL, self.switched_msrs);
        vmcs::write(control::VMEXIT_MSR_STORE_COUNT, count);
        vmcs::write(control::VMENTRY_MSR_LOAD_ADDR_FULL, self.switched_msrs);
        vmcs::write(control::VMENTRY_MSR_LOAD_COUNT, count);
        vmcs::write(control::VMEXIT_MSR_LOAD_COUNT, 0);
        vmcs::write(control::VMENTRY_INTERRUPTION_INFO_FIELD, 0);
        // The guest owns CR0/CR4 except the bits VMX operation fixes: those read back as the
        // guest wrote them (shadow) and a write changing them exits.
        let cr0_fixed = caps.cr0_fixed0 & !(1 | (1 << 31)) | !caps.cr0_fixed1;
        let cr4_fixed = caps.cr4_fixed0 | !caps.cr4_fixed1;
        vmcs::write(control::CR0_GUEST_HOST_MASK, cr0_fixed);
        vmcs::write(control::CR0_READ_SHADOW, state.cr0);
        vmcs::write(control::CR4_GUEST_HOST_MASK, cr4_fixed);
        vmcs::write(control::CR4_READ_SHADOW, state.cr4);

        write_host_state();

        // With "unrestricted guest" a vCPU may run with paging or protection off.
        let unrestricted = controls.secondary & SecondaryControls::UNRESTRICTED_GUEST.bits() != 0;
        let cr0 = if unrestricted {
            (state.cr0 | (caps.cr0_fixed0 & !(1 | (1 << 31)))) & caps.cr0_fixed1
        } else {
            caps.adjust_cr0(state.cr0)
        };
        vmcs::write(guest::CR0, cr0);
        vmcs::write(guest::CR3, state.cr3);
        vmcs::write(guest::CR4, caps.adjust_cr4(state.cr4));
        vmcs::write(guest::IA32_EFER_FULL, state.efer);
        vmcs::write(guest::RIP, state.rip);
        vmcs::write(guest::RSP, state.rsp);
        // IF set: Bochs 2.7 takes external-interrupt exits only while the guest has IF=1
        // (hardware takes them regardless). Interrupts are never injected into the test
        // guest, so IF=1 changes nothing for it; a guest that clears IF is still stopped at
        // its slot end by the preemption-timer guard.
        vmcs::write(guest::RFLAGS, state.rflags | RFLAGS_IF);
        vmcs::write(guest::DR7, 0x400);
        vmcs::write(guest::LINK_PTR_FULL, u64::MAX);
        vmcs::write(guest::INTERRUPTIBILITY_STATE, 0);
        vmcs::write(guest::ACTIVITY_STATE, 0);
        vmcs::write(guest::PENDING_DBG_EXCEPTIONS, 0);
        vmcs::write(guest::IA32_SYSENTER_CS, 0);
        vmcs::write(guest::IA32_SYSENTER_ESP, 0);
        vmcs::write(guest::IA32_SYSENTER_EIP, 0);
        vmcs::write(guest::IA32_DEBUGCTL_FULL, 0);
        vmcs::write(guest::IA32_PAT_FULL, PAT_POWER_ON);
        let segments = [
            (&state.es, guest::ES_SELECTOR, guest::ES_BASE, guest::ES_LIMIT, guest::ES_ACCESS_RIGHTS),
            (&state.cs, guest::CS_SELECTOR, guest::CS_BASE, guest::CS_LIMIT, guest::CS_ACCESS_RIGHTS),
            (&state.ss, guest::SS_SELECTOR, guest::SS_BASE, guest::SS_LIMIT, guest::SS_ACCESS_RIGHTS),
            (&state.ds, guest::DS_SELECTOR, guest::DS_BASE, guest::DS_LIMIT, guest::DS_ACCESS_RIGHTS),
            (&state.fs, guest::FS_SELECTOR, guest::FS_BASE, guest::FS_LIMIT, guest::FS_ACCESS_RIGHTS),
            (&state.gs, guest::GS_SELECTOR, guest::GS_BASE, guest::GS_LIMIT, guest::GS_ACCESS_RIGHTS),
            (&state.tr, guest::TR_SELECTOR, guest::TR_BASE, guest::TR_LIMIT, guest::TR_ACCESS_RIGHTS),
            (&state.ldtr, guest::LDTR_SELECTOR, guest::LDTR_BASE, guest::LDTR_LIMIT, guest::LDTR_ACCESS_RIGHTS),
        ];
        for (seg, selector, base, limit, rights) in segments {
            vmcs::write(selector, seg.selector as u64);
            vmcs::write(base, seg.base);
            vmcs::write(limit, seg.limit as u64);
            vmcs::write(rights, seg.access_rights as u64);
        }
        vmcs::write(guest::GDTR_BASE, state.gdtr_base);
        vmcs::write(guest::GDTR_LIMIT, state.gdtr_limit as u64);
        vmcs::write(guest::IDTR_BASE, state.idtr_base);
        vmcs::write(guest::IDTR_LIMIT, state.idtr_limit as u64);

        // The EPT may have been used with other mappings on this CPU: drop stale translations.
        vmcs::invept_single_context(context.eptp);
        self.lapic = vmx::vlapic::VirtualLapic::new(self.index as u8);
        self.interrupt_window = false;
        let fx = (self.regs.guest_fx, self.regs.host_fx);
        self.regs = GuestRegs { guest_fx: fx.0, host_fx: fx.1, rdi: state.rdi, rsi: state.rsi, ..Default::default() };
        // SAFETY: the vCPU's own FXSAVE page; reset to the power-on x87/SSE state.
        let area = unsafe { core::slice::from_raw_parts_mut(fx.0 as *mut u8, FXSAVE_SIZE) };
        area.fill(0);
        area[0..2].copy_from_slice(&FCW_DEFAULT.to_le_bytes());
        area[24..28].copy_from_slice(&MXCSR_DEFAULT.to_le_bytes());
        self.halted = false;
    }

    /// Runs the guest until its next VM exit (the VMCS must be current).
    pub fn enter(&mut self) -> Result<(), u64> {
        let result = guest_entry::enter(&mut self.regs, self.launched);
        if result.is_ok() {
            self.launched = true;
        }
        result
    }

    /// Advances the guest past the instruction that exited.
    pub fn skip_instruction(&self) {
        let rip = vmcs::read(guest::RIP);
        let len = vmcs::read(vmcs::ro::VMEXIT_INSTRUCTION_LEN);
        vmcs::write(guest::RIP, rip + len);
    }

    /// A general-purpose register by its x86 encoding number (`vmx::mmio::GprIndex`); RSP
    /// lives in the VMCS.
    pub fn gpr(&mut self, index: u8) -> u64 {
        match index {
            4 => vmcs::read(guest::RSP),
            i => *self.gpr_slot_mut(i),
        }
    }

    /// Writes a register as a 64-bit mov does (the caller zero-extends narrower values).
    pub fn set_gpr(&mut self, index: u8, value: u64) {
        match index {
            4 => vmcs::write(guest::RSP, value),
            i => *self.gpr_slot_mut(i) = value,
        }
    }

    fn gpr_slot_mut(&mut self, index: u8) -> &mut u64 {
        let r = &mut self.regs;
        match index {
            0 => &mut r.rax,
            1 => &mut r.rcx,
            2 => &mut r.rdx,
            3 => &mut r.rbx,
            5 => &mut r.rbp,
            6 => &mut r.rsi,
            7 => &mut r.rdi,
            8 => &mut r.r8,
            9 => &mut r.r9,
            10 => &mut r.r10,
            11 => &mut r.r11,
            12 => &mut r.r12,
            13 => &mut r.r13,
            14 => &mut r.r14,
            _ => &mut r.r15,
        }
    }

    /// Before an entry: if the virtual LAPIC has a deliverable interrupt, inject it when the
    /// guest can take it, else ask for an exit as soon as it can (interrupt-window exiting).
    pub fn deliver_interrupts(&mut self, controls: &Controls) {
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

    /// Injects a hardware exception at the next entry.
    pub fn inject_exception(&self, vector: u8, error_code: Option<u32>) {
        const VALID: u64 = 1 << 31;
        const HARDWARE_EXCEPTION: u64 = 3 << 8;
        let mut info = VALID | HARDWARE_EXCEPTION | vector as u64;
        if let Some(code) = error_code {
            info |= 1 << 11;
            vmcs::write(control::VMENTRY_EXCEPTION_ERR_CODE, code as u64);
        }
        vmcs::write(control::VMENTRY_INTERRUPTION_INFO_FIELD, info);
    }
}

/// Host state: the executing CPU's own control registers, segments and tables, so a VM exit
/// lands in `vmx_exit_entry` on this CPU's current stack.
fn write_host_state() {
    use x86_64::instructions::tables::{sgdt, sidt};
    use x86_64::registers::control::{Cr0, Cr3, Cr4};
    let gdt = sgdt();
    let idt = sidt();
    let tr: u16;
    // SAFETY: STR only reads the task register.
    unsafe { core::arch::asm!("str {0:x}", out(reg) tr, options(nomem, nostack, preserves_flags)) };
    vmcs::write(host::CR0, Cr0::read_raw());
    vmcs::write(host::CR3, Cr3::read_raw().0.start_address().as_u64());
    vmcs::write(host::CR4, Cr4::read_raw());
    vmcs::write(host::CS_SELECTOR, crate::cpu::KERNEL_CODE_SELECTOR as u64);
    for field in [host::SS_SELECTOR, host::DS_SELECTOR, host::ES_SELECTOR] {
        vmcs::write(field, crate::cpu::KERNEL_DATA_SELECTOR as u64);
    }
    vmcs::write(host::FS_SELECTOR, 0);
    vmcs::write(host::GS_SELECTOR, 0);
    vmcs::write(host::TR_SELECTOR, tr as u64);
    vmcs::write(host::FS_BASE, 0);
    vmcs::write(host::GS_BASE, 0);
    vmcs::write(host::TR_BASE, crate::cpu::tss_base(gdt.base.as_u64(), tr));
    vmcs::write(host::GDTR_BASE, gdt.base.as_u64());
    vmcs::write(host::IDTR_BASE, idt.base.as_u64());
    vmcs::write(host::IA32_SYSENTER_CS, 0);
    vmcs::write(host::IA32_SYSENTER_ESP, 0);
    vmcs::write(host::IA32_SYSENTER_EIP, 0);
    // SAFETY: IA32_EFER and IA32_PAT exist on every x86_64 CPU.
    let (efer, pat) = unsafe {
        (
            x86_64::registers::model_specific::Msr::new(0xC000_0080).read(),
            x86_64::registers::model_specific::Msr::new(0x277).read(),
        )
    };
    vmcs::write(host::IA32_EFER_FULL, efer);
    vmcs::write(host::IA32_PAT_FULL, pat);
    vmcs::write(host::RIP, guest_entry::exit_entry_address());
}
