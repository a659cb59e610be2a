//! The VMX control set Phalanx runs partitions with, negotiated once per machine against the
//! capability MSRs: hard requirements (no partition can run without them) and optional
//! features, each with the fallback used when the CPU lacks it. Nested KVM, for one, offers
//! no PAUSE-loop exiting to the hypervisor it hosts; see `fixtures` for the CPUs this is
//! tested against.

use core::fmt;

use x86::vmx::vmcs::control::{EntryControls, ExitControls, PinbasedControls, PrimaryControls, SecondaryControls};

use crate::caps::{Features, VmxCapabilities};
use crate::controls::{negotiate, ControlError, ControlKind};

/// PAUSE-loop exiting: a PAUSE less than `PLE_GAP` cycles after the previous one belongs to
/// the same spin loop; a loop longer than `PLE_WINDOW` cycles exits. 4096 cycles is long
/// enough that ordinary lock hand-offs never exit and short enough to see real spinning.
pub const PLE_GAP: u64 = 128;
pub const PLE_WINDOW: u64 = 4096;

/// What the dispatch policy asks of the control set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Wants {
    /// A spinning vCPU gives its pCPU away (the `independent-yield` policy): it needs a VM
    /// exit on spinning, from PAUSE-loop exiting or else from every PAUSE.
    pub yield_on_spin: bool,
}

/// How the hypervisor sees a guest spin (PAUSE in a loop).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpinExits {
    /// PAUSE-loop exiting: one exit per `PLE_WINDOW` cycles of spinning (spin waste is
    /// measured from them).
    PauseLoop,
    /// PAUSE exiting: every PAUSE exits (used only to yield; spin waste is not measured).
    EveryPause,
    /// No exit on spinning: spin waste is not measured by the hypervisor.
    None,
}

impl SpinExits {
    pub fn name(self) -> &'static str {
        match self {
            SpinExits::PauseLoop => "pause-loop-exiting",
            SpinExits::EveryPause => "pause-exiting",
            SpinExits::None => "none",
        }
    }
}

/// Which path each optional feature takes on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Paths {
    pub spin_exits: SpinExits,
    /// VPID tags each vCPU's TLB entries; without it every VM entry and exit flushes them.
    pub vpid: bool,
    /// Unrestricted guest lets a vCPU run in real mode (Linux application processors start
    /// there after INIT/SIPI). Without it, SMP Linux partitions are refused.
    pub unrestricted_guest: bool,
    /// INVEPT single-context; otherwise all-context INVEPT drops every EPT's translations.
    pub invept_single_context: bool,
    /// RDTSCP and INVPCID enabled for guests (CPUID hides them otherwise).
    pub rdtscp: bool,
    pub invpcid: bool,
    /// The CPU virtualizes each vCPU's xAPIC (TPR shadow, APIC-access page, APIC-register
    /// virtualization): reads and TPR writes happen in the guest without an exit; other writes
    /// (EOI, ICR, LVT, ...) exit trap-like with the offset (no instruction decode). Otherwise
    /// every xAPIC access is an EPT violation and a decoded instruction. Either way interrupts
    /// are injected at entry.
    pub apic_virtualization: bool,
}

impl Paths {
    /// Each path as (feature, the path in use), in a stable order, for the capability record.
    pub fn named(&self) -> [(&'static str, &'static str); 7] {
        let apic = if self.apic_virtualization {
            "apic-register virtualization (writes trap, no decode)"
        } else {
            "emulated (EPT violation + decode)"
        };
        [
            ("spin_exits", self.spin_exits.name()),
            (
                "spin_waste_hv",
                if self.spin_exits == SpinExits::PauseLoop { "pause-loop-exits" } else { "not measured" },
            ),
            ("vpid", if self.vpid { "vpid" } else { "flush on every entry and exit" }),
            ("real_mode_vcpus", if self.unrestricted_guest { "unrestricted guest" } else { "refused (no SMP Linux)" }),
            ("invept", if self.invept_single_context { "single-context" } else { "all-context" }),
            // Never used, whatever the CPU offers: listed so the record says so.
            ("ept_accessed_dirty", "not used"),
            ("apic_virtualization", apic),
        ]
    }
}

/// The control values every vCPU on this machine uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlSet {
    pub pinbased: u32,
    pub primary: u32,
    /// Secondary controls (always present: EPT needs them).
    pub secondary: u32,
    pub exit: u32,
    pub entry: u32,
    pub caps: VmxCapabilities,
    pub paths: Paths,
}

/// Why a CPU cannot run partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsupported {
    /// A feature Phalanx cannot do without, by name.
    Missing(&'static str),
    /// A control the capability MSRs refuse.
    Control(ControlError),
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unsupported::Missing(what) => write!(f, "the CPU's VMX lacks {what}, which Phalanx requires"),
            Unsupported::Control(e) => e.fmt(f),
        }
    }
}

impl From<ControlError> for Unsupported {
    fn from(e: ControlError) -> Self {
        Unsupported::Control(e)
    }
}

/// Hard requirements checked by feature before any control is negotiated, so the error names
/// the feature rather than a bit.
fn required_features(f: &Features) -> [(&'static str, bool); 6] {
    [
        ("EPT (4-level, write-back)", f.ept && f.ept_4_level && f.ept_write_back),
        ("INVEPT", f.invept_single_context || f.invept_all_context),
        (
            "external-interrupt exiting with acknowledge on exit",
            f.external_interrupt_exiting && f.ack_interrupt_on_exit,
        ),
        // The guard that ends a slot even when the guest blocks the timer interrupt.
        ("the VMX-preemption timer", f.preemption_timer),
        ("MSR bitmaps", f.msr_bitmaps),
        ("I/O bitmaps", f.io_bitmaps),
    ]
}

impl ControlSet {
    /// Negotiates the control set for `caps`, given what the dispatch policy `wants`.
    pub fn negotiate(caps: &VmxCapabilities, wants: Wants) -> Result<ControlSet, Unsupported> {
        let f = caps.features();
        if let Some((name, _)) = required_features(&f).into_iter().find(|(_, present)| !present) {
            return Err(Unsupported::Missing(name));
        }
        let spin_exits = if f.pause_loop_exiting {
            SpinExits::PauseLoop
        } else if wants.yield_on_spin && f.pause_exiting {
            SpinExits::EveryPause
        } else if wants.yield_on_spin {
            return Err(Unsupported::Missing("PAUSE-loop exiting or PAUSE exiting (the independent-yield policy)"));
        } else {
            SpinExits::None
        };

        // The three together (SDM 26.2.1.1). Virtual-interrupt delivery, which would also take
        // the EOI exits away, is not used: under Bochs 2.7 Linux guests hang with it (3 of 18
        // boots; docs/benchmarks.md), and nothing here could show it working elsewhere.
        let apic_virtualization = f.tpr_shadow && f.apic_access && f.apic_register_virtualization;
        let pinbased = negotiate(
            ControlKind::PinBased,
            caps.pinbased,
            (PinbasedControls::EXTERNAL_INTERRUPT_EXITING
                | PinbasedControls::NMI_EXITING
                | PinbasedControls::VMX_PREEMPTION_TIMER)
                .bits(),
            0,
        )?;
        let pause = if spin_exits == SpinExits::EveryPause { PrimaryControls::PAUSE_EXITING.bits() } else { 0 };
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
                .bits()
                | pause
                | if apic_virtualization { PrimaryControls::USE_TPR_SHADOW.bits() } else { 0 },
            0,
        )?;
        let pause_loop =
            if spin_exits == SpinExits::PauseLoop { SecondaryControls::PAUSE_LOOP_EXITING.bits() } else { 0 };
        let apic_secondary = if apic_virtualization {
            (SecondaryControls::VIRTUALIZE_APIC | SecondaryControls::VIRTUALIZE_APIC_REGISTER).bits()
        } else {
            0
        };
        let secondary = negotiate(
            ControlKind::SecondaryProcessorBased,
            caps.procbased2,
            SecondaryControls::ENABLE_EPT.bits() | pause_loop | apic_secondary,
            (SecondaryControls::ENABLE_VPID
                | SecondaryControls::UNRESTRICTED_GUEST
                | SecondaryControls::ENABLE_RDTSCP
                | SecondaryControls::ENABLE_INVPCID)
                .bits(),
        )?;
        let exit = negotiate(
            ControlKind::VmExit,
            caps.exit,
            (ExitControls::HOST_ADDRESS_SPACE_SIZE
                | ExitControls::SAVE_DEBUG_CONTROLS
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
            // DR7 and IA32_DEBUGCTL are the guest's: loaded at entry, saved at exit (a default1
            // control every CPU allows, but the TRUE MSRs let it be 0).
            (EntryControls::IA32E_MODE_GUEST
                | EntryControls::LOAD_DEBUG_CONTROLS
                | EntryControls::LOAD_IA32_EFER
                | EntryControls::LOAD_IA32_PAT)
                .bits(),
            0,
        )?;
        let paths = Paths {
            spin_exits,
            vpid: secondary & SecondaryControls::ENABLE_VPID.bits() != 0,
            unrestricted_guest: secondary & SecondaryControls::UNRESTRICTED_GUEST.bits() != 0,
            invept_single_context: f.invept_single_context,
            rdtscp: secondary & SecondaryControls::ENABLE_RDTSCP.bits() != 0,
            invpcid: secondary & SecondaryControls::ENABLE_INVPCID.bits() != 0,
            apic_virtualization,
        };
        Ok(ControlSet { pinbased, primary, secondary, exit, entry, caps: *caps, paths })
    }

    /// The PLE_GAP and PLE_WINDOW fields exist (and are written) only with PAUSE-loop exiting.
    pub fn pause_loop_exiting(&self) -> bool {
        self.paths.spin_exits == SpinExits::PauseLoop
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{self, BOCHS_MODELS, MINIMAL_VTX, NESTED_KVM_SKYLAKE};

    fn bit(value: u32, mask: u32) -> bool {
        value & mask != 0
    }

    #[test]
    fn every_bochs_model_runs_partitions() {
        for (model, caps) in &BOCHS_MODELS {
            let set = ControlSet::negotiate(caps, Wants::default()).unwrap_or_else(|e| panic!("{model}: {e}"));
            assert!(bit(set.secondary, SecondaryControls::ENABLE_EPT.bits()), "{model}");
            assert!(set.paths.vpid && set.paths.unrestricted_guest, "{model}: every Bochs model has both");
            let yielding = ControlSet::negotiate(caps, Wants { yield_on_spin: true }).unwrap();
            assert_ne!(yielding.paths.spin_exits, SpinExits::None, "{model}");
        }
    }

    #[test]
    fn the_apic_is_virtualized_where_the_cpu_offers_the_three_controls() {
        let skylake = fixtures::bochs("corei7_skylake_x");
        let set = ControlSet::negotiate(&skylake, Wants::default()).unwrap();
        assert!(set.paths.apic_virtualization);
        assert!(bit(set.primary, PrimaryControls::USE_TPR_SHADOW.bits()));
        let apic = SecondaryControls::VIRTUALIZE_APIC | SecondaryControls::VIRTUALIZE_APIC_REGISTER;
        assert_eq!(set.secondary & apic.bits(), apic.bits());
        assert!(!bit(set.secondary, SecondaryControls::VIRTUAL_INTERRUPT_DELIVERY.bits()), "not used");
        assert!(!bit(set.secondary, SecondaryControls::VIRTUALIZE_X2APIC.bits()));
        // corei3_cnl lacks APIC-register virtualization; a debug option can take it away: the
        // xAPIC is then emulated.
        let without = [fixtures::bochs("corei3_cnl"), skylake.without("apic_register_virtualization").unwrap()];
        for caps in without.iter().chain([&MINIMAL_VTX]) {
            let set = ControlSet::negotiate(caps, Wants::default()).unwrap();
            assert!(!set.paths.apic_virtualization);
            assert!(!bit(set.primary, PrimaryControls::USE_TPR_SHADOW.bits()));
            assert_eq!(set.secondary & apic.bits(), 0);
            assert!(set.paths.named().contains(&("apic_virtualization", "emulated (EPT violation + decode)")));
        }
    }

    #[test]
    fn sandy_bridge_runs_without_pause_loop_exiting() {
        let caps = fixtures::bochs("corei7_sandy_bridge_2600k");
        assert!(!caps.features().pause_loop_exiting && !caps.features().ept_accessed_dirty);
        let set = ControlSet::negotiate(&caps, Wants::default()).unwrap();
        assert_eq!(set.paths.spin_exits, SpinExits::None);
        assert!(!set.pause_loop_exiting());
        assert!(!bit(set.secondary, SecondaryControls::PAUSE_LOOP_EXITING.bits()));
        assert!(!bit(set.primary, PrimaryControls::PAUSE_EXITING.bits()), "gang policies leave PAUSE alone");
        let yielding = ControlSet::negotiate(&caps, Wants { yield_on_spin: true }).unwrap();
        assert_eq!(yielding.paths.spin_exits, SpinExits::EveryPause);
        assert!(bit(yielding.primary, PrimaryControls::PAUSE_EXITING.bits()));
    }

    #[test]
    fn skylake_uses_pause_loop_exiting_for_both_measure_and_yield() {
        let caps = fixtures::bochs("corei7_skylake_x");
        for wants in [Wants::default(), Wants { yield_on_spin: true }] {
            let set = ControlSet::negotiate(&caps, wants).unwrap();
            assert_eq!(set.paths.spin_exits, SpinExits::PauseLoop);
            assert!(bit(set.secondary, SecondaryControls::PAUSE_LOOP_EXITING.bits()));
            assert!(!bit(set.primary, PrimaryControls::PAUSE_EXITING.bits()), "PLE, not an exit per PAUSE");
        }
    }

    #[test]
    fn nested_kvm_negotiates_a_working_set_with_its_fallbacks() {
        let set = ControlSet::negotiate(&NESTED_KVM_SKYLAKE, Wants::default()).unwrap();
        assert_eq!(set.paths.spin_exits, SpinExits::None, "KVM offers L1 no PAUSE-loop exiting");
        assert!(set.paths.vpid && set.paths.unrestricted_guest && set.paths.invept_single_context);
        assert!(bit(set.pinbased, PinbasedControls::VMX_PREEMPTION_TIMER.bits()));
        // Every bit set is allowed, every must-be-1 bit is set.
        for (value, msr) in [
            (set.pinbased, NESTED_KVM_SKYLAKE.pinbased),
            (set.primary, NESTED_KVM_SKYLAKE.procbased),
            (set.secondary, NESTED_KVM_SKYLAKE.procbased2),
            (set.exit, NESTED_KVM_SKYLAKE.exit),
            (set.entry, NESTED_KVM_SKYLAKE.entry),
        ] {
            assert_eq!(value & !(msr >> 32) as u32, 0, "a bit KVM does not allow");
            assert_eq!(value & msr as u32, msr as u32, "a must-be-1 bit left clear");
        }
        let yielding = ControlSet::negotiate(&NESTED_KVM_SKYLAKE, Wants { yield_on_spin: true }).unwrap();
        assert_eq!(yielding.paths.spin_exits, SpinExits::EveryPause, "independent-yield falls back to PAUSE exiting");
    }

    #[test]
    fn a_minimal_vtx_cpu_falls_back_everywhere_it_can() {
        let set = ControlSet::negotiate(&MINIMAL_VTX, Wants::default()).unwrap();
        let p = set.paths;
        assert_eq!(p.spin_exits, SpinExits::None);
        assert!(!p.vpid && !p.unrestricted_guest && !p.invept_single_context);
        assert!(!bit(set.secondary, SecondaryControls::ENABLE_VPID.bits()));
        let named = p.named();
        assert!(named.contains(&("spin_waste_hv", "not measured")), "{named:?}");
        assert!(named.contains(&("real_mode_vcpus", "refused (no SMP Linux)")), "{named:?}");
        let err = ControlSet::negotiate(&MINIMAL_VTX, Wants { yield_on_spin: true }).unwrap_err();
        assert!(err.to_string().contains("PAUSE"), "{err}");
    }

    #[test]
    fn a_missing_hard_requirement_is_named() {
        let mut no_preemption_timer = MINIMAL_VTX;
        no_preemption_timer.pinbased &= !(1 << (32 + 6));
        let err = ControlSet::negotiate(&no_preemption_timer, Wants::default()).unwrap_err();
        assert_eq!(err, Unsupported::Missing("the VMX-preemption timer"));
        let mut no_ept = MINIMAL_VTX;
        no_ept.procbased2 &= !(1 << (32 + 1));
        let err = ControlSet::negotiate(&no_ept, Wants::default()).unwrap_err();
        assert!(err.to_string().contains("EPT"), "{err}");
    }
}
