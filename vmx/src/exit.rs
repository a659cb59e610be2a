//! VM exits: basic exit reasons (SDM Vol. 3 Appendix C), the exit-qualification formats
//! Phalanx decodes, and the one table mapping each reason to the handler class that owns it.

/// Basic exit reasons Phalanx distinguishes; everything else is `Other(n)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    ExceptionOrNmi,
    ExternalInterrupt,
    TripleFault,
    InitSignal,
    StartupIpi,
    InterruptWindow,
    Cpuid,
    Hlt,
    Invlpg,
    Rdtsc,
    Vmcall,
    /// Any VMX instruction executed by the guest (VMCLEAR ... VMXON, INVEPT, INVVPID).
    VmxInstruction(u32),
    CrAccess,
    IoInstruction,
    Rdmsr,
    Wrmsr,
    InvalidGuestState,
    MsrLoading,
    MwaitOrMonitor(u32),
    MonitorTrapFlag,
    Pause,
    MachineCheck,
    /// An xAPIC access the CPU does not virtualize (fault-like: RIP is at the instruction).
    ApicAccess,
    /// A virtualized xAPIC write with effects beyond the register page (trap-like: done).
    ApicWrite,
    EptViolation,
    EptMisconfiguration,
    PreemptionTimer,
    Wbinvd,
    Xsetbv,
    Other(u32),
}

impl ExitReason {
    /// From the low 16 bits of the VM-exit reason field.
    pub fn from_raw(reason: u32) -> Self {
        match reason & 0xFFFF {
            0 => ExitReason::ExceptionOrNmi,
            1 => ExitReason::ExternalInterrupt,
            2 => ExitReason::TripleFault,
            3 => ExitReason::InitSignal,
            4 => ExitReason::StartupIpi,
            7 => ExitReason::InterruptWindow,
            10 => ExitReason::Cpuid,
            12 => ExitReason::Hlt,
            14 => ExitReason::Invlpg,
            16 => ExitReason::Rdtsc,
            18 => ExitReason::Vmcall,
            n @ (19..=27 | 50 | 53) => ExitReason::VmxInstruction(n),
            28 => ExitReason::CrAccess,
            30 => ExitReason::IoInstruction,
            31 => ExitReason::Rdmsr,
            32 => ExitReason::Wrmsr,
            33 => ExitReason::InvalidGuestState,
            34 => ExitReason::MsrLoading,
            n @ (36 | 39) => ExitReason::MwaitOrMonitor(n),
            37 => ExitReason::MonitorTrapFlag,
            40 => ExitReason::Pause,
            41 => ExitReason::MachineCheck,
            44 => ExitReason::ApicAccess,
            56 => ExitReason::ApicWrite,
            48 => ExitReason::EptViolation,
            49 => ExitReason::EptMisconfiguration,
            52 => ExitReason::PreemptionTimer,
            54 => ExitReason::Wbinvd,
            55 => ExitReason::Xsetbv,
            n => ExitReason::Other(n),
        }
    }

    /// The basic exit reason number (index for per-reason statistics).
    pub fn number(self) -> u32 {
        match self {
            ExitReason::ExceptionOrNmi => 0,
            ExitReason::ExternalInterrupt => 1,
            ExitReason::TripleFault => 2,
            ExitReason::InitSignal => 3,
            ExitReason::StartupIpi => 4,
            ExitReason::InterruptWindow => 7,
            ExitReason::Cpuid => 10,
            ExitReason::Hlt => 12,
            ExitReason::Invlpg => 14,
            ExitReason::Rdtsc => 16,
            ExitReason::Vmcall => 18,
            ExitReason::CrAccess => 28,
            ExitReason::IoInstruction => 30,
            ExitReason::Rdmsr => 31,
            ExitReason::Wrmsr => 32,
            ExitReason::InvalidGuestState => 33,
            ExitReason::MsrLoading => 34,
            ExitReason::MonitorTrapFlag => 37,
            ExitReason::Pause => 40,
            ExitReason::MachineCheck => 41,
            ExitReason::ApicAccess => 44,
            ExitReason::ApicWrite => 56,
            ExitReason::EptViolation => 48,
            ExitReason::EptMisconfiguration => 49,
            ExitReason::PreemptionTimer => 52,
            ExitReason::Wbinvd => 54,
            ExitReason::Xsetbv => 55,
            ExitReason::VmxInstruction(n) | ExitReason::MwaitOrMonitor(n) | ExitReason::Other(n) => n,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ExitReason::ExceptionOrNmi => "exception-or-nmi",
            ExitReason::ExternalInterrupt => "external-interrupt",
            ExitReason::TripleFault => "triple-fault",
            ExitReason::InitSignal => "init",
            ExitReason::StartupIpi => "sipi",
            ExitReason::InterruptWindow => "interrupt-window",
            ExitReason::Cpuid => "cpuid",
            ExitReason::Hlt => "hlt",
            ExitReason::Invlpg => "invlpg",
            ExitReason::Rdtsc => "rdtsc",
            ExitReason::Vmcall => "vmcall",
            ExitReason::VmxInstruction(_) => "vmx-instruction",
            ExitReason::CrAccess => "cr-access",
            ExitReason::IoInstruction => "io",
            ExitReason::Rdmsr => "rdmsr",
            ExitReason::Wrmsr => "wrmsr",
            ExitReason::InvalidGuestState => "invalid-guest-state",
            ExitReason::MsrLoading => "msr-loading",
            ExitReason::MwaitOrMonitor(_) => "mwait-monitor",
            ExitReason::MonitorTrapFlag => "monitor-trap-flag",
            ExitReason::Pause => "pause",
            ExitReason::MachineCheck => "machine-check",
            ExitReason::ApicAccess => "apic-access",
            ExitReason::ApicWrite => "apic-write",
            ExitReason::EptViolation => "ept-violation",
            ExitReason::EptMisconfiguration => "ept-misconfiguration",
            ExitReason::PreemptionTimer => "preemption-timer",
            ExitReason::Wbinvd => "wbinvd",
            ExitReason::Xsetbv => "xsetbv",
            ExitReason::Other(_) => "other",
        }
    }

    /// Which handler owns this exit: the one place that decides it.
    pub fn handler(self) -> Handler {
        match self {
            ExitReason::ExternalInterrupt => Handler::HostInterrupt,
            ExitReason::PreemptionTimer => Handler::SlotGuard,
            ExitReason::Hlt => Handler::Halt,
            ExitReason::Pause => Handler::PauseLoop,
            ExitReason::Vmcall => Handler::Hypercall,
            ExitReason::IoInstruction => Handler::PortIo,
            ExitReason::Cpuid => Handler::Cpuid,
            ExitReason::Rdmsr | ExitReason::Wrmsr => Handler::Msr,
            ExitReason::Rdtsc | ExitReason::Wbinvd | ExitReason::Invlpg => Handler::SkipInstruction,
            ExitReason::Xsetbv | ExitReason::MwaitOrMonitor(_) | ExitReason::VmxInstruction(_) => {
                Handler::InjectUndefined
            }
            ExitReason::EptViolation | ExitReason::EptMisconfiguration => Handler::MemoryFault,
            ExitReason::TripleFault => Handler::GuestFault,
            ExitReason::InvalidGuestState | ExitReason::MsrLoading | ExitReason::MachineCheck => Handler::EntryFailure,
            ExitReason::InterruptWindow => Handler::InterruptWindow,
            ExitReason::ApicAccess => Handler::ApicAccess,
            ExitReason::ApicWrite => Handler::ApicWrite,
            ExitReason::ExceptionOrNmi
            | ExitReason::InitSignal
            | ExitReason::StartupIpi
            | ExitReason::CrAccess
            | ExitReason::MonitorTrapFlag
            | ExitReason::Other(_) => Handler::Refused,
        }
    }
}

/// Handler classes (one module of the hypervisor each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handler {
    /// An interrupt for the host (the slot timer, a device IRQ): acknowledged on exit.
    HostInterrupt,
    /// The VMX-preemption timer: a guest overran its slot boundary (or its virtual LAPIC
    /// timer is due).
    SlotGuard,
    /// The guest can take an interrupt now: the pending one is injected at the next entry.
    InterruptWindow,
    Halt,
    /// An xAPIC access under APIC virtualization that the CPU left to the hypervisor: the
    /// instruction is decoded and emulated, as without APIC virtualization.
    ApicAccess,
    /// A guest write the CPU put in the virtual-APIC page: its effects (an IPI, the timer).
    ApicWrite,
    /// PAUSE-loop exiting: a vCPU is spinning.
    PauseLoop,
    Hypercall,
    PortIo,
    Cpuid,
    Msr,
    /// Emulated by advancing RIP past the instruction (no effect needed).
    SkipInstruction,
    /// The guest may not use it: #UD is injected.
    InjectUndefined,
    /// An access outside the partition's memory: the partition is stopped.
    MemoryFault,
    /// The guest shut itself down (triple fault): stopped or reset per its config.
    GuestFault,
    /// VM entry failed: the state Phalanx built is wrong for this CPU.
    EntryFailure,
    /// Something Phalanx does not allow a partition to do: the partition is stopped.
    Refused,
}

/// Exit qualification of an I/O instruction (SDM Table 28-5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoAccess {
    pub port: u16,
    /// 1, 2 or 4 bytes.
    pub size: u8,
    pub input: bool,
    pub string: bool,
    pub rep: bool,
}

impl IoAccess {
    pub fn decode(qualification: u64) -> Self {
        IoAccess {
            size: (qualification & 0x7) as u8 + 1,
            input: qualification & (1 << 3) != 0,
            string: qualification & (1 << 4) != 0,
            rep: qualification & (1 << 5) != 0,
            port: (qualification >> 16) as u16,
        }
    }
}

/// The register offset of an APIC-access exit (SDM Table 28-6) when the access was a data
/// read or write by an instruction (access types 0 and 1): the only kinds the hypervisor
/// emulates; an instruction fetch from the xAPIC page or an access during event delivery is not.
pub fn apic_access_offset(qualification: u64) -> Option<u32> {
    let access_type = (qualification >> 12) & 0xF;
    (access_type <= 1).then_some((qualification & 0xFFF) as u32)
}

/// The register offset of an APIC-write exit (SDM 29.4.3.3).
pub fn apic_write_offset(qualification: u64) -> u32 {
    (qualification & 0xFFF) as u32
}

/// VM-exit interruption information (SDM Table 25-19) for external-interrupt exits with
/// "acknowledge interrupt on exit".
pub fn interrupt_vector(interruption_info: u32) -> Option<u8> {
    (interruption_info & (1 << 31) != 0).then_some(interruption_info as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_round_trips_through_its_number() {
        for n in 0..70 {
            assert_eq!(ExitReason::from_raw(n).number(), n, "reason {n}");
        }
        // High bits (entry failure flag, etc.) do not change the basic reason.
        assert_eq!(ExitReason::from_raw(0x8000_0021), ExitReason::InvalidGuestState);
    }

    #[test]
    fn dispatch_table_routes_the_exits_phalanx_relies_on() {
        assert_eq!(ExitReason::from_raw(1).handler(), Handler::HostInterrupt);
        assert_eq!(ExitReason::from_raw(52).handler(), Handler::SlotGuard);
        assert_eq!(ExitReason::from_raw(40).handler(), Handler::PauseLoop);
        assert_eq!(ExitReason::from_raw(48).handler(), Handler::MemoryFault);
        assert_eq!(ExitReason::from_raw(2).handler(), Handler::GuestFault);
        assert_eq!(ExitReason::from_raw(18).handler(), Handler::Hypercall);
        assert_eq!(ExitReason::from_raw(30).handler(), Handler::PortIo);
        assert_eq!(ExitReason::from_raw(10).handler(), Handler::Cpuid);
        assert_eq!(ExitReason::from_raw(33).handler(), Handler::EntryFailure);
        assert_eq!(ExitReason::from_raw(7).handler(), Handler::InterruptWindow);
        assert_eq!(ExitReason::from_raw(44).handler(), Handler::ApicAccess);
        assert_eq!(ExitReason::from_raw(56).handler(), Handler::ApicWrite);
        // EOI-induced exits never come (no EOI-exit bitmap bit is set): refused if they did.
        assert_eq!(ExitReason::from_raw(45).handler(), Handler::Refused);
        // A guest trying VMX itself gets #UD, not access to the hypervisor's VMX.
        for vmx in [19, 20, 24, 27, 50, 53] {
            assert_eq!(ExitReason::from_raw(vmx).handler(), Handler::InjectUndefined, "reason {vmx}");
        }
        // Anything unknown is refused, never silently resumed.
        assert_eq!(ExitReason::from_raw(66).handler(), Handler::Refused);
    }

    #[test]
    fn io_qualification_decodes_port_size_and_direction() {
        // `out dx, al` with dx = 0x3f8
        let q = (0x3F8u64 << 16) | 0;
        assert_eq!(IoAccess::decode(q), IoAccess { port: 0x3F8, size: 1, input: false, string: false, rep: false });
        // `in eax, dx` from 0xcfc
        let q = (0xCFCu64 << 16) | (1 << 3) | 3;
        assert_eq!(IoAccess::decode(q), IoAccess { port: 0xCFC, size: 4, input: true, string: false, rep: false });
        // `rep outsb`
        let q = (0x3F8u64 << 16) | (1 << 5) | (1 << 4);
        assert!(IoAccess::decode(q).rep && IoAccess::decode(q).string);
    }

    #[test]
    fn apic_exit_qualifications_give_the_offset() {
        assert_eq!(apic_access_offset(0x0390), Some(0x390), "a read of the current count");
        assert_eq!(apic_access_offset(0x1300), Some(0x300), "a write");
        assert_eq!(apic_access_offset(0x2080), None, "an instruction fetch");
        assert_eq!(apic_access_offset(0x3000), None, "during event delivery");
        assert_eq!(apic_write_offset(0x310), 0x310);
    }

    #[test]
    fn interrupt_vector_needs_the_valid_bit() {
        assert_eq!(interrupt_vector(0x8000_0040), Some(0x40));
        assert_eq!(interrupt_vector(0x0000_0040), None);
    }
}
