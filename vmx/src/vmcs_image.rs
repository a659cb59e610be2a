//! What a vCPU's VMCS holds before its first VM entry, computed from the negotiated control
//! set, the partition's structures, the host's registers and the power-on state `firmware`
//! gives. The image writes exactly [`InitialVmcs::fields`] and runs the entry checker on the
//! same value first, so what is checked is what is written; a field whose feature the CPU
//! lacks (PLE_GAP without PAUSE-loop exiting, VPID without VPID) is never in the list.

extern crate alloc;

use alloc::vec::Vec;
use firmware::longmode::{Segment, VcpuState};
use x86::vmx::vmcs::control::EntryControls;
use x86::vmx::vmcs::{control, guest, host};

use crate::control_set::{ControlSet, PLE_GAP, PLE_WINDOW};

pub const RFLAGS_IF: u64 = 1 << 9;
/// IA32_PAT after reset: WB, WT, UC-, UC, repeated.
pub const PAT_POWER_ON: u64 = 0x0007_0406_0007_0406;
const CR0_PE: u64 = 1;
const CR0_PG: u64 = 1 << 31;
const EFER_LMA: u64 = 1 << 10;

/// Where a partition's shared structures are (host-physical).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionContext {
    pub eptp: u64,
    pub io_bitmap_a: u64,
    pub io_bitmap_b: u64,
    pub msr_bitmap: u64,
    /// The APIC-access page the partition's EPT maps at the xAPIC's guest-physical address
    /// (written only with APIC virtualization; never read or written by anyone).
    pub apic_access_page: u64,
}

/// The executing pCPU's own state, which VM exits return to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostState {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub code_selector: u16,
    /// SS, DS and ES.
    pub data_selector: u16,
    pub tr_selector: u16,
    pub tr_base: u64,
    pub gdtr_base: u64,
    pub idtr_base: u64,
    pub efer: u64,
    pub pat: u64,
    /// The VM-exit entry point.
    pub rip: u64,
}

/// The VMCS guest-state fields that are not in `VcpuState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestState {
    /// CR0/CR4 as the VMCS holds them (the VMX fixed bits applied).
    pub cr0: u64,
    pub cr4: u64,
    pub rflags: u64,
    pub state: VcpuState,
    pub dr7: u64,
    pub debugctl: u64,
    pub pat: u64,
    pub activity: u32,
    pub interruptibility: u32,
    pub pending_debug: u64,
    pub link_pointer: u64,
}

/// Per-vCPU control fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuContext {
    /// Non-zero; written only when the control set has VPID.
    pub vpid: u16,
    /// The VM-entry MSR-load / VM-exit MSR-store area (host-physical) and its entry count.
    pub msr_area: u64,
    pub msr_count: u32,
    /// The vCPU's virtual-APIC page: its `VirtualLapic` register page (written only with
    /// APIC virtualization).
    pub virtual_apic_page: u64,
}

/// Every field the hypervisor writes before a vCPU's first VM entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitialVmcs {
    pub controls: ControlSet,
    /// The VM-entry controls for this vCPU ("IA-32e mode guest" follows EFER.LMA).
    pub entry: u32,
    pub partition: PartitionContext,
    pub vcpu: VcpuContext,
    pub cr0_mask: u64,
    pub cr4_mask: u64,
    pub host: HostState,
    pub guest: GuestState,
    /// The CPU's physical-address width (CPUID 0x80000008 EAX[7:0]), for the entry checks.
    pub physical_address_bits: u8,
}

impl InitialVmcs {
    /// `physical_address_bits`: the CPU's (CPUID 0x80000008). `force_interrupts_on` sets
    /// RFLAGS.IF at entry: a workaround for Bochs 2.7, which takes
    /// external-interrupt exits only while the guest has IF=1 (hardware and KVM take them
    /// regardless). It contradicts the Linux boot protocol, so only Bochs runs ask for it.
    pub fn new(
        controls: &ControlSet,
        partition: PartitionContext,
        vcpu: VcpuContext,
        host: HostState,
        state: &VcpuState,
        physical_address_bits: u8,
        force_interrupts_on: bool,
    ) -> InitialVmcs {
        let caps = &controls.caps;
        // A vCPU that starts outside long mode (an AP in real mode) enters without "IA-32e
        // mode guest"; VM exits keep that control in step with EFER.LMA from then on.
        let entry = if state.efer & EFER_LMA != 0 {
            controls.entry
        } else {
            controls.entry & !EntryControls::IA32E_MODE_GUEST.bits()
        };
        // With "unrestricted guest" a vCPU may run with paging or protection off.
        let cr0 = if controls.paths.unrestricted_guest {
            (state.cr0 | (caps.cr0_fixed0 & !(CR0_PE | CR0_PG))) & caps.cr0_fixed1
        } else {
            caps.adjust_cr0(state.cr0)
        };
        let guest = GuestState {
            cr0,
            cr4: caps.adjust_cr4(state.cr4),
            rflags: state.rflags | if force_interrupts_on { RFLAGS_IF } else { 0 },
            state: *state,
            dr7: 0x400,
            debugctl: 0,
            pat: PAT_POWER_ON,
            activity: 0,
            interruptibility: 0,
            pending_debug: 0,
            link_pointer: u64::MAX,
        };
        // The guest owns CR0/CR4 except the bits VMX operation fixes: those read back as the
        // guest wrote them (shadow) and a write changing them exits.
        let cr0_mask = caps.cr0_fixed0 & !(CR0_PE | CR0_PG) | !caps.cr0_fixed1;
        let cr4_mask = caps.cr4_fixed0 | !caps.cr4_fixed1;
        InitialVmcs {
            controls: *controls,
            entry,
            partition,
            vcpu,
            cr0_mask,
            cr4_mask,
            host,
            guest,
            physical_address_bits,
        }
    }

    /// (encoding, value) of every field, in the order they are written.
    pub fn fields(&self) -> Vec<(u32, u64)> {
        let c = &self.controls;
        let mut f = Vec::with_capacity(96);
        f.extend([
            (control::PINBASED_EXEC_CONTROLS, c.pinbased as u64),
            (control::PRIMARY_PROCBASED_EXEC_CONTROLS, c.primary as u64),
            (control::SECONDARY_PROCBASED_EXEC_CONTROLS, c.secondary as u64),
            (control::VMEXIT_CONTROLS, c.exit as u64),
            (control::VMENTRY_CONTROLS, self.entry as u64),
            (control::EXCEPTION_BITMAP, 0),
            (control::IO_BITMAP_A_ADDR_FULL, self.partition.io_bitmap_a),
            (control::IO_BITMAP_B_ADDR_FULL, self.partition.io_bitmap_b),
            (control::MSR_BITMAPS_ADDR_FULL, self.partition.msr_bitmap),
            (control::EPTP_FULL, self.partition.eptp),
        ]);
        if c.paths.vpid {
            f.push((control::VPID, self.vcpu.vpid as u64));
        }
        if c.pause_loop_exiting() {
            f.extend([(control::PLE_GAP, PLE_GAP), (control::PLE_WINDOW, PLE_WINDOW)]);
        }
        if c.paths.apic_virtualization {
            f.extend([
                (control::VIRT_APIC_ADDR_FULL, self.vcpu.virtual_apic_page),
                (control::APIC_ACCESS_ADDR_FULL, self.partition.apic_access_page),
                // No TPR-below-threshold exits (an interrupt the TPR held back is injected at
                // the next exit; Linux keeps its TPR fixed).
                (control::TPR_THRESHOLD, 0),
            ]);
        }
        let (area, count) = (self.vcpu.msr_area, self.vcpu.msr_count as u64);
        f.extend([
            (control::CR3_TARGET_COUNT, 0),
            // One list: the values the guest last had, stored at exit and loaded at entry.
            (control::VMEXIT_MSR_STORE_ADDR_FULL, area),
            (control::VMEXIT_MSR_STORE_COUNT, count),
            (control::VMENTRY_MSR_LOAD_ADDR_FULL, area),
            (control::VMENTRY_MSR_LOAD_COUNT, count),
            (control::VMEXIT_MSR_LOAD_COUNT, 0),
            (control::VMENTRY_INTERRUPTION_INFO_FIELD, 0),
            (control::CR0_GUEST_HOST_MASK, self.cr0_mask),
            (control::CR0_READ_SHADOW, self.guest.state.cr0),
            (control::CR4_GUEST_HOST_MASK, self.cr4_mask),
            (control::CR4_READ_SHADOW, self.guest.state.cr4),
        ]);

        let h = &self.host;
        f.extend([
            (host::CR0, h.cr0),
            (host::CR3, h.cr3),
            (host::CR4, h.cr4),
            (host::CS_SELECTOR, h.code_selector as u64),
            (host::SS_SELECTOR, h.data_selector as u64),
            (host::DS_SELECTOR, h.data_selector as u64),
            (host::ES_SELECTOR, h.data_selector as u64),
            (host::FS_SELECTOR, 0),
            (host::GS_SELECTOR, 0),
            (host::TR_SELECTOR, h.tr_selector as u64),
            (host::FS_BASE, 0),
            (host::GS_BASE, 0),
            (host::TR_BASE, h.tr_base),
            (host::GDTR_BASE, h.gdtr_base),
            (host::IDTR_BASE, h.idtr_base),
            (host::IA32_SYSENTER_CS, 0),
            (host::IA32_SYSENTER_ESP, 0),
            (host::IA32_SYSENTER_EIP, 0),
            (host::IA32_EFER_FULL, h.efer),
            (host::IA32_PAT_FULL, h.pat),
            (host::RIP, h.rip),
        ]);

        let g = &self.guest;
        let s = &g.state;
        f.extend([
            (guest::CR0, g.cr0),
            (guest::CR3, s.cr3),
            (guest::CR4, g.cr4),
            (guest::IA32_EFER_FULL, s.efer),
            (guest::RIP, s.rip),
            (guest::RSP, s.rsp),
            (guest::RFLAGS, g.rflags),
            (guest::DR7, g.dr7),
            (guest::LINK_PTR_FULL, g.link_pointer),
            (guest::INTERRUPTIBILITY_STATE, g.interruptibility as u64),
            (guest::ACTIVITY_STATE, g.activity as u64),
            (guest::PENDING_DBG_EXCEPTIONS, g.pending_debug),
            (guest::IA32_SYSENTER_CS, 0),
            (guest::IA32_SYSENTER_ESP, 0),
            (guest::IA32_SYSENTER_EIP, 0),
            (guest::IA32_DEBUGCTL_FULL, g.debugctl),
            (guest::IA32_PAT_FULL, g.pat),
        ]);
        let segments: [(&Segment, [u32; 4]); 8] = [
            (&s.es, [guest::ES_SELECTOR, guest::ES_BASE, guest::ES_LIMIT, guest::ES_ACCESS_RIGHTS]),
            (&s.cs, [guest::CS_SELECTOR, guest::CS_BASE, guest::CS_LIMIT, guest::CS_ACCESS_RIGHTS]),
            (&s.ss, [guest::SS_SELECTOR, guest::SS_BASE, guest::SS_LIMIT, guest::SS_ACCESS_RIGHTS]),
            (&s.ds, [guest::DS_SELECTOR, guest::DS_BASE, guest::DS_LIMIT, guest::DS_ACCESS_RIGHTS]),
            (&s.fs, [guest::FS_SELECTOR, guest::FS_BASE, guest::FS_LIMIT, guest::FS_ACCESS_RIGHTS]),
            (&s.gs, [guest::GS_SELECTOR, guest::GS_BASE, guest::GS_LIMIT, guest::GS_ACCESS_RIGHTS]),
            (&s.tr, [guest::TR_SELECTOR, guest::TR_BASE, guest::TR_LIMIT, guest::TR_ACCESS_RIGHTS]),
            (&s.ldtr, [guest::LDTR_SELECTOR, guest::LDTR_BASE, guest::LDTR_LIMIT, guest::LDTR_ACCESS_RIGHTS]),
        ];
        for (seg, [selector, base, limit, rights]) in segments {
            f.extend([
                (selector, seg.selector as u64),
                (base, seg.base),
                (limit, seg.limit as u64),
                (rights, seg.access_rights as u64),
            ]);
        }
        f.extend([
            (guest::GDTR_BASE, s.gdtr_base),
            (guest::GDTR_LIMIT, s.gdtr_limit as u64),
            (guest::IDTR_BASE, s.idtr_base),
            (guest::IDTR_LIMIT, s.idtr_limit as u64),
        ]);
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{self, initial_vmcs as image, MINIMAL_VTX, NESTED_KVM_SKYLAKE};

    fn encodings(vmcs: &InitialVmcs) -> Vec<u32> {
        vmcs.fields().into_iter().map(|(e, _)| e).collect()
    }

    #[test]
    fn fields_exist_only_with_their_feature() {
        let state = firmware::longmode::initial_vcpu_state(0);
        let skylake = encodings(&image(&fixtures::bochs("corei7_skylake_x"), &state, true));
        assert!(skylake.contains(&control::PLE_GAP) && skylake.contains(&control::PLE_WINDOW));
        assert!(skylake.contains(&control::VPID));
        for caps in [fixtures::bochs("corei7_sandy_bridge_2600k"), NESTED_KVM_SKYLAKE] {
            let fields = encodings(&image(&caps, &state, false));
            assert!(!fields.contains(&control::PLE_GAP) && !fields.contains(&control::PLE_WINDOW));
            assert!(fields.contains(&control::VPID));
        }
        let minimal = encodings(&image(&MINIMAL_VTX, &state, false));
        assert!(!minimal.contains(&control::VPID) && !minimal.contains(&control::PLE_GAP));
        // The APIC pages only where the CPU virtualizes the APIC.
        assert!(skylake.contains(&control::VIRT_APIC_ADDR_FULL) && skylake.contains(&control::APIC_ACCESS_ADDR_FULL));
        for caps in [fixtures::bochs("corei3_cnl"), MINIMAL_VTX] {
            let fields = encodings(&image(&caps, &state, false));
            assert!(
                !fields.contains(&control::APIC_ACCESS_ADDR_FULL) && !fields.contains(&control::VIRT_APIC_ADDR_FULL)
            );
        }
    }

    #[test]
    fn interrupts_are_forced_on_only_for_bochs() {
        let state = firmware::linux::startup_ipi_state(0x9F);
        assert_eq!(state.rflags & RFLAGS_IF, 0);
        let caps = fixtures::bochs("corei7_skylake_x");
        assert_eq!(image(&caps, &state, false).guest.rflags & RFLAGS_IF, 0, "the boot protocol's IF=0 is kept");
        assert_ne!(image(&caps, &state, true).guest.rflags & RFLAGS_IF, 0);
    }

    #[test]
    fn a_real_mode_vcpu_enters_without_ia32e_mode_and_with_protection_off() {
        let caps = fixtures::bochs("corei7_skylake_x");
        let vmcs = image(&caps, &firmware::linux::startup_ipi_state(0x9F), false);
        assert_eq!(vmcs.entry & EntryControls::IA32E_MODE_GUEST.bits(), 0);
        assert_eq!(vmcs.guest.cr0 & (CR0_PE | CR0_PG), 0, "unrestricted guest keeps PE and PG off");
        let long = image(&caps, &firmware::longmode::initial_vcpu_state(0), false);
        assert_ne!(long.entry & EntryControls::IA32E_MODE_GUEST.bits(), 0);
    }
}
