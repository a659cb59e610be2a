//! VMX capability MSRs (SDM Vol. 3 Appendix A) and the features they announce.

use x86::msr;

/// Raw capability MSR values, read once per CPU at VMXON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VmxCapabilities {
    pub basic: u64,
    /// The TRUE_* variants when IA32_VMX_BASIC[55] says they exist.
    pub pinbased: u64,
    pub procbased: u64,
    /// Zero when the CPU has no secondary controls.
    pub procbased2: u64,
    pub exit: u64,
    pub entry: u64,
    pub misc: u64,
    /// Zero when neither EPT nor VPID may be enabled.
    pub ept_vpid: u64,
    pub cr0_fixed0: u64,
    pub cr0_fixed1: u64,
    pub cr4_fixed0: u64,
    pub cr4_fixed1: u64,
}

/// Whether the control at `bit` may be set to 1 (its allowed-1 setting).
fn allowed1(msr: u64, bit: u32) -> bool {
    msr & (1u64 << (32 + bit)) != 0
}

impl VmxCapabilities {
    /// Reads every capability MSR through `read_msr`, which must only be called on a CPU
    /// that reports VMX in CPUID (QEMU TCG returns 0 for unknown MSRs instead of #GP).
    pub fn read(mut read_msr: impl FnMut(u32) -> u64) -> Self {
        let basic = read_msr(msr::IA32_VMX_BASIC);
        let true_controls = basic & (1 << 55) != 0;
        let pick = |plain: u32, true_variant: u32| if true_controls { true_variant } else { plain };
        let procbased = read_msr(pick(msr::IA32_VMX_PROCBASED_CTLS, msr::IA32_VMX_TRUE_PROCBASED_CTLS));
        let procbased2 = if allowed1(procbased, 31) { read_msr(msr::IA32_VMX_PROCBASED_CTLS2) } else { 0 };
        let ept_vpid =
            if allowed1(procbased2, 1) || allowed1(procbased2, 5) { read_msr(msr::IA32_VMX_EPT_VPID_CAP) } else { 0 };
        Self {
            basic,
            pinbased: read_msr(pick(msr::IA32_VMX_PINBASED_CTLS, msr::IA32_VMX_TRUE_PINBASED_CTLS)),
            procbased,
            procbased2,
            exit: read_msr(pick(msr::IA32_VMX_EXIT_CTLS, msr::IA32_VMX_TRUE_EXIT_CTLS)),
            entry: read_msr(pick(msr::IA32_VMX_ENTRY_CTLS, msr::IA32_VMX_TRUE_ENTRY_CTLS)),
            misc: read_msr(msr::IA32_VMX_MISC),
            ept_vpid,
            cr0_fixed0: read_msr(msr::IA32_VMX_CR0_FIXED0),
            cr0_fixed1: read_msr(msr::IA32_VMX_CR0_FIXED1),
            cr4_fixed0: read_msr(msr::IA32_VMX_CR4_FIXED0),
            cr4_fixed1: read_msr(msr::IA32_VMX_CR4_FIXED1),
        }
    }

    /// VMCS revision identifier written into VMXON and VMCS regions.
    pub fn revision_id(&self) -> u32 {
        self.basic as u32 & 0x7FFF_FFFF
    }

    /// Bytes to allocate for a VMXON/VMCS region.
    pub fn region_size(&self) -> u32 {
        ((self.basic >> 32) & 0x1FFF) as u32
    }

    /// CR0/CR4 values adjusted to what VMX operation requires (fixed-0 bits set, fixed-1
    /// clear bits cleared).
    pub fn adjust_cr0(&self, cr0: u64) -> u64 {
        (cr0 | self.cr0_fixed0) & self.cr0_fixed1
    }

    pub fn adjust_cr4(&self, cr4: u64) -> u64 {
        (cr4 | self.cr4_fixed0) & self.cr4_fixed1
    }

    /// The same CPU without `feature` (a name from [`Features::named`] that the control set
    /// looks at): its allowed-1 bit (or capability bit) cleared, as on a CPU that lacks it.
    /// For testing each fallback on an emulator that has the feature
    /// (`phalanx.debug.vmx_without=`). `None` for a name it cannot take away.
    pub fn without(&self, feature: &str) -> Option<Self> {
        let mut c = *self;
        let allowed1 = |msr: &mut u64, bit: u32| *msr &= !(1u64 << (32 + bit));
        match feature {
            "pause_loop_exiting" => allowed1(&mut c.procbased2, 10),
            "pause_exiting" => allowed1(&mut c.procbased, 30),
            "vpid" => allowed1(&mut c.procbased2, 5),
            "unrestricted_guest" => allowed1(&mut c.procbased2, 7),
            "preemption_timer" => allowed1(&mut c.pinbased, 6),
            "ept" => allowed1(&mut c.procbased2, 1),
            "ept_accessed_dirty" => c.ept_vpid &= !(1 << 21),
            "invept_single_context" => c.ept_vpid &= !(1 << 25),
            "tpr_shadow" => allowed1(&mut c.procbased, 21),
            "apic_access" => allowed1(&mut c.procbased2, 0),
            "apic_register_virtualization" => allowed1(&mut c.procbased2, 8),
            "virtual_interrupt_delivery" => allowed1(&mut c.procbased2, 9),
            _ => return None,
        }
        Some(c)
    }

    pub fn features(&self) -> Features {
        let ev = self.ept_vpid;
        let ept = allowed1(self.procbased2, 1);
        let vpid = allowed1(self.procbased2, 5);
        Features {
            true_controls: self.basic & (1 << 55) != 0,
            vmcs_write_back: (self.basic >> 50) & 0xF == 6,
            ept,
            ept_4_level: ept && ev & (1 << 6) != 0,
            ept_write_back: ept && ev & (1 << 14) != 0,
            ept_2m_pages: ept && ev & (1 << 16) != 0,
            ept_1g_pages: ept && ev & (1 << 17) != 0,
            ept_accessed_dirty: ept && ev & (1 << 21) != 0,
            invept_single_context: ept && ev & (1 << 20) != 0 && ev & (1 << 25) != 0,
            invept_all_context: ept && ev & (1 << 20) != 0 && ev & (1 << 26) != 0,
            vpid,
            invvpid: vpid && ev & (1 << 32) != 0,
            unrestricted_guest: allowed1(self.procbased2, 7),
            pause_exiting: allowed1(self.procbased, 30),
            pause_loop_exiting: allowed1(self.procbased2, 10),
            preemption_timer: allowed1(self.pinbased, 6),
            preemption_timer_shift: (self.misc & 0x1F) as u8,
            external_interrupt_exiting: allowed1(self.pinbased, 0),
            ack_interrupt_on_exit: allowed1(self.exit, 15),
            posted_interrupts: allowed1(self.pinbased, 7),
            tsc_offsetting: allowed1(self.procbased, 3),
            msr_bitmaps: allowed1(self.procbased, 28),
            io_bitmaps: allowed1(self.procbased, 25),
            monitor_trap_flag: allowed1(self.procbased, 27),
            tpr_shadow: allowed1(self.procbased, 21),
            apic_access: allowed1(self.procbased2, 0),
            x2apic_virtualization: allowed1(self.procbased2, 4),
            apic_register_virtualization: allowed1(self.procbased2, 8),
            virtual_interrupt_delivery: allowed1(self.procbased2, 9),
            activity_hlt: self.misc & (1 << 6) != 0,
            activity_wait_for_sipi: self.misc & (1 << 8) != 0,
        }
    }
}

/// What the capability MSRs announce, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Features {
    pub true_controls: bool,
    pub vmcs_write_back: bool,
    pub ept: bool,
    pub ept_4_level: bool,
    pub ept_write_back: bool,
    pub ept_2m_pages: bool,
    pub ept_1g_pages: bool,
    pub ept_accessed_dirty: bool,
    pub invept_single_context: bool,
    pub invept_all_context: bool,
    pub vpid: bool,
    pub invvpid: bool,
    pub unrestricted_guest: bool,
    pub pause_exiting: bool,
    pub pause_loop_exiting: bool,
    pub preemption_timer: bool,
    /// The VMX-preemption timer counts down once every 2^shift TSC cycles.
    pub preemption_timer_shift: u8,
    pub external_interrupt_exiting: bool,
    pub ack_interrupt_on_exit: bool,
    pub posted_interrupts: bool,
    pub tsc_offsetting: bool,
    pub msr_bitmaps: bool,
    pub io_bitmaps: bool,
    pub monitor_trap_flag: bool,
    pub tpr_shadow: bool,
    pub apic_access: bool,
    pub x2apic_virtualization: bool,
    pub apic_register_virtualization: bool,
    pub virtual_interrupt_delivery: bool,
    pub activity_hlt: bool,
    pub activity_wait_for_sipi: bool,
}

impl Features {
    /// Each feature as (name, present), in a stable order, for records and reports.
    pub fn named(&self) -> [(&'static str, bool); 30] {
        [
            ("true_controls", self.true_controls),
            ("vmcs_write_back", self.vmcs_write_back),
            ("ept", self.ept),
            ("ept_4_level", self.ept_4_level),
            ("ept_write_back", self.ept_write_back),
            ("ept_2m_pages", self.ept_2m_pages),
            ("ept_1g_pages", self.ept_1g_pages),
            ("ept_accessed_dirty", self.ept_accessed_dirty),
            ("invept_single_context", self.invept_single_context),
            ("invept_all_context", self.invept_all_context),
            ("vpid", self.vpid),
            ("invvpid", self.invvpid),
            ("unrestricted_guest", self.unrestricted_guest),
            ("pause_exiting", self.pause_exiting),
            ("pause_loop_exiting", self.pause_loop_exiting),
            ("preemption_timer", self.preemption_timer),
            ("external_interrupt_exiting", self.external_interrupt_exiting),
            ("ack_interrupt_on_exit", self.ack_interrupt_on_exit),
            ("posted_interrupts", self.posted_interrupts),
            ("tsc_offsetting", self.tsc_offsetting),
            ("msr_bitmaps", self.msr_bitmaps),
            ("io_bitmaps", self.io_bitmaps),
            ("monitor_trap_flag", self.monitor_trap_flag),
            ("tpr_shadow", self.tpr_shadow),
            ("apic_access", self.apic_access),
            ("x2apic_virtualization", self.x2apic_virtualization),
            ("apic_register_virtualization", self.apic_register_virtualization),
            ("virtual_interrupt_delivery", self.virtual_interrupt_delivery),
            ("activity_hlt", self.activity_hlt),
            ("activity_wait_for_sipi", self.activity_wait_for_sipi),
        ]
    }
}

#[cfg(test)]
mod feature_tests {
    use super::*;
    use crate::fixtures::{self, NESTED_KVM_SKYLAKE};

    #[test]
    fn bochs_skylake_x_features_match_what_the_platform_notes_verified() {
        let skylake = fixtures::bochs("corei7_skylake_x");
        let f = skylake.features();
        assert_eq!(skylake.revision_id(), 0x2b);
        assert!(f.true_controls && f.vmcs_write_back);
        assert!(f.ept && f.ept_4_level && f.ept_write_back && f.ept_2m_pages && f.ept_1g_pages && f.ept_accessed_dirty);
        assert!(f.vpid && f.invvpid && f.invept_single_context);
        assert!(f.unrestricted_guest && f.pause_exiting && f.pause_loop_exiting);
        assert!(f.preemption_timer && f.external_interrupt_exiting && f.ack_interrupt_on_exit);
        assert_eq!(f.preemption_timer_shift, 0, "Bochs' preemption timer ticks at the TSC rate");
        assert!(f.apic_access && f.x2apic_virtualization && f.virtual_interrupt_delivery);
        assert!(!f.posted_interrupts, "no Bochs model has posted interrupts");
        assert!(!f.monitor_trap_flag, "MTF exists only on tigerlake/icelake_u");
        assert!(f.activity_wait_for_sipi);
    }

    #[test]
    fn bochs_models_differ_where_the_platform_notes_say() {
        for (model, caps) in fixtures::BOCHS_MODELS {
            let f = caps.features();
            let old = model == "corei7_sandy_bridge_2600k";
            assert_eq!(f.pause_loop_exiting, !old, "{model}: PLE");
            assert_eq!(f.ept_accessed_dirty, !old, "{model}: EPT A/D");
            assert!(f.pause_exiting && f.ept && f.vpid && f.unrestricted_guest && f.preemption_timer, "{model}");
            assert_eq!(f.monitor_trap_flag, matches!(model, "tigerlake" | "corei7_icelake_u"), "{model}: MTF");
            assert!(!f.posted_interrupts, "{model}");
        }
    }

    #[test]
    fn nested_kvm_offers_pause_exiting_but_not_pause_loop_exiting() {
        let f = NESTED_KVM_SKYLAKE.features();
        assert!(f.pause_exiting && !f.pause_loop_exiting);
        assert!(f.ept && f.ept_accessed_dirty && f.vpid && f.unrestricted_guest && f.posted_interrupts);
        assert_eq!(f.preemption_timer_shift, 5, "KVM emulates the preemption timer at TSC/32");
    }

    #[test]
    fn secondary_and_ept_msrs_are_not_read_when_the_cpu_lacks_them() {
        let mut asked = Vec::new();
        let caps = VmxCapabilities::read(|msr| {
            asked.push(msr);
            match msr {
                // basic without TRUE controls; primary controls without the secondary bit.
                0x480 => 0x0000_0000_0000_0010,
                0x482 => 0x7FFF_FFFF_0000_0000,
                _ => 0,
            }
        });
        assert_eq!(caps.procbased2, 0);
        assert_eq!(caps.ept_vpid, 0);
        assert!(!asked.contains(&0x48B) && !asked.contains(&0x48C));
        assert!(asked.contains(&0x482) && !asked.contains(&0x48E), "plain controls without BASIC[55]");
        assert!(!caps.features().ept && !caps.features().vpid);
    }

    #[test]
    fn a_feature_taken_away_is_gone_and_nothing_else_changes() {
        let skylake = fixtures::bochs("corei7_skylake_x");
        let full = skylake.features();
        for name in ["pause_loop_exiting", "pause_exiting", "vpid", "unrestricted_guest", "preemption_timer", "ept"] {
            let f = skylake.without(name).unwrap().features();
            for ((feature, before), (_, after)) in full.named().into_iter().zip(f.named()) {
                if feature == name {
                    assert!(before && !after, "{name} is gone");
                } else if !feature.starts_with("ept_") && !feature.starts_with("inv") {
                    // EPT's and VPID's capability details follow EPT and VPID themselves.
                    assert_eq!(before, after, "{name} leaves {feature} alone");
                }
            }
        }
        assert!(!skylake.without("invept_single_context").unwrap().features().invept_single_context);
        assert_eq!(skylake.without("posted_interrupts"), None, "only what the control set looks at");
    }

    #[test]
    fn cr_adjustment_sets_fixed0_and_clears_outside_fixed1() {
        let c = fixtures::bochs("corei7_skylake_x");
        assert_eq!(c.adjust_cr0(0x0000_0011), 0x8000_0031);
        assert_eq!(c.adjust_cr4(0x20), 0x2020);
        assert_eq!(c.adjust_cr4(0x20 | (1 << 30)) & (1 << 30), 0, "a bit outside CR4_FIXED1 is cleared");
    }
}
