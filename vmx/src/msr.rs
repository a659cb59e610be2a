//! Which MSRs a partition may use, and how Phalanx answers the ones it emulates. Everything
//! not listed here gets #GP, as on a CPU that lacks the MSR.

/// MSRs the hardware switches for the guest through the VM-entry MSR-load / VM-exit
/// MSR-store area: the guest reads and writes them directly (the MSR bitmap lets them
/// through) and the hypervisor never uses them itself.
pub const SWITCHED: [u32; 6] = [
    0xC000_0081, // STAR
    0xC000_0082, // LSTAR
    0xC000_0083, // CSTAR
    0xC000_0084, // SFMASK
    0xC000_0102, // KERNEL_GS_BASE
    0xC000_0103, // TSC_AUX (RDTSCP/RDPID)
];

pub const IA32_TSC: u32 = 0x10;
pub const IA32_APIC_BASE: u32 = 0x1B;
pub const IA32_TSC_ADJUST: u32 = 0x3B;
pub const IA32_TSC_DEADLINE: u32 = 0x6E0;
/// Microcode signature: written with 0 before CPUID, then read back.
pub const IA32_BIOS_SIGN_ID: u32 = 0x8B;
pub const IA32_MTRRCAP: u32 = 0xFE;
pub const IA32_SYSENTER_CS: u32 = 0x174;
pub const IA32_SYSENTER_ESP: u32 = 0x175;
pub const IA32_SYSENTER_EIP: u32 = 0x176;
pub const IA32_MISC_ENABLE: u32 = 0x1A0;
pub const IA32_PAT: u32 = 0x277;
pub const IA32_MTRR_DEF_TYPE: u32 = 0x2FF;
pub const IA32_EFER: u32 = 0xC000_0080;
/// EFER.LMA: the guest runs in IA-32e (64-bit or compatibility) mode.
pub const EFER_LMA: u64 = 1 << 10;
pub const IA32_FS_BASE: u32 = 0xC000_0100;
pub const IA32_GS_BASE: u32 = 0xC000_0101;

/// The xAPIC base every partition's vCPUs see.
pub const APIC_BASE_ADDRESS: u64 = 0xFEE0_0000;
const APIC_BASE_BSP: u64 = 1 << 8;
const APIC_BASE_ENABLE: u64 = 1 << 11;
/// MISC_ENABLE: fast-strings enabled, nothing else (no thermal control, no MWAIT, no turbo).
const MISC_ENABLE_FAST_STRINGS: u64 = 1;

/// Where an emulated MSR's value lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsrAccess {
    /// A constant Phalanx reports; writes of that same value are accepted, others ignored.
    Constant(u64),
    /// A VMCS guest-state field (the VMCS encoding), read and written there.
    VmcsField(u32),
    /// A value the guest cannot change: writing it again is accepted, any other value is #GP.
    Fixed(u64),
    /// The time stamp counter (reads return RDTSC; writes are refused: no TSC offsetting).
    TimeStampCounter,
    /// The vCPU's LAPIC timer deadline (`vlapic`, TSC-deadline mode).
    TscDeadline,
    /// Not available to partitions: #GP.
    Refused,
}

/// How `msr` behaves for vCPU `vcpu` (vCPU 0 is the partition's boot processor).
pub fn access(msr: u32, vcpu: u32) -> MsrAccess {
    use x86::vmx::vmcs::guest;
    match msr {
        IA32_EFER => MsrAccess::VmcsField(guest::IA32_EFER_FULL),
        IA32_PAT => MsrAccess::VmcsField(guest::IA32_PAT_FULL),
        IA32_FS_BASE => MsrAccess::VmcsField(guest::FS_BASE),
        IA32_GS_BASE => MsrAccess::VmcsField(guest::GS_BASE),
        IA32_SYSENTER_CS => MsrAccess::VmcsField(guest::IA32_SYSENTER_CS),
        IA32_SYSENTER_ESP => MsrAccess::VmcsField(guest::IA32_SYSENTER_ESP),
        IA32_SYSENTER_EIP => MsrAccess::VmcsField(guest::IA32_SYSENTER_EIP),
        IA32_TSC => MsrAccess::TimeStampCounter,
        // Every guest TSC is the host's (no offsetting): its adjustment is 0 and stays 0. With
        // TSC_ADJUST in CPUID (and an invariant TSC), Linux trusts the TSC without a
        // clocksource watchdog, which would otherwise compare it with jiffies that lag while
        // the partition is off its pCPUs. Linux writes it only when it finds it non-zero.
        IA32_TSC_ADJUST => MsrAccess::Fixed(0),
        IA32_TSC_DEADLINE => MsrAccess::TscDeadline,
        IA32_APIC_BASE => {
            MsrAccess::Constant(APIC_BASE_ADDRESS | APIC_BASE_ENABLE | if vcpu == 0 { APIC_BASE_BSP } else { 0 })
        }
        IA32_MISC_ENABLE => MsrAccess::Constant(MISC_ENABLE_FAST_STRINGS),
        // No MTRRs: guests see memory as write-back through EPT and the PAT.
        IA32_MTRRCAP | IA32_MTRR_DEF_TYPE => MsrAccess::Constant(0),
        // No microcode revision to report.
        IA32_BIOS_SIGN_ID => MsrAccess::Constant(0),
        _ => MsrAccess::Refused,
    }
}

/// EFER bits a guest may hold: SCE, LME, LMA (the CPU's), NXE.
const EFER_ALLOWED: u64 = 1 | (1 << 8) | EFER_LMA | (1 << 11);
const EFER_LME: u64 = 1 << 8;

fn canonical(address: u64) -> bool {
    ((address as i64) << 16 >> 16) as u64 == address
}

/// Whether WRMSR of `value` to a VMCS-held `msr` is one the CPU would take (`current`: its
/// value now; `paging`: CR0.PG). A write the CPU would answer with #GP must get #GP here too:
/// written into the VMCS, it fails the next VM entry instead (a reserved PAT type, EFER
/// reserved bits or a change of LME under paging, a non-canonical base).
pub fn write_allowed(msr: u32, value: u64, current: u64, paging: bool) -> bool {
    match msr {
        // Memory types 0, 1, 4, 5, 6, 7 in each byte; 2, 3 and bits 3-7 are reserved.
        IA32_PAT => value.to_le_bytes().iter().all(|&t| matches!(t, 0 | 1 | 4..=7)),
        IA32_EFER => value & !EFER_ALLOWED == 0 && !(paging && (value ^ current) & EFER_LME != 0),
        IA32_FS_BASE | IA32_GS_BASE | IA32_SYSENTER_ESP | IA32_SYSENTER_EIP => canonical(value),
        _ => true,
    }
}

/// Byte offset and bit of `msr` in a 4 KiB VMX MSR bitmap (SDM 25.6.9), for reads; the write
/// bit is 2048 bytes further. `None` for MSRs outside the two ranges the bitmap covers
/// (those always exit).
pub fn bitmap_position(msr: u32) -> Option<(usize, u8)> {
    let (base, offset) = match msr {
        0..=0x1FFF => (0usize, msr),
        0xC000_0000..=0xC000_1FFF => (1024, msr - 0xC000_0000),
        _ => return None,
    };
    Some((base + offset as usize / 8, (offset % 8) as u8))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_cpu_would_refuse_are_refused() {
        assert!(write_allowed(IA32_PAT, 0x0007_0406_0007_0406, 0, true), "the power-on PAT");
        assert!(!write_allowed(IA32_PAT, 0x0202_0202_0202_0202, 0, true), "type 2 is reserved");
        assert!(!write_allowed(IA32_PAT, 0x0000_0000_0000_0008, 0, true), "bit 3 of a type");
        let long_mode = (1 << 8) | EFER_LMA | (1 << 11) | 1;
        assert!(write_allowed(IA32_EFER, long_mode, long_mode, true), "the same again");
        assert!(!write_allowed(IA32_EFER, 0, long_mode, true), "LME off under paging");
        assert!(write_allowed(IA32_EFER, 1 << 8, 0, false), "LME on before paging");
        assert!(!write_allowed(IA32_EFER, long_mode | (1 << 12), long_mode, true), "SVME is not Intel's");
        assert!(!write_allowed(IA32_FS_BASE, 0x0000_8000_0000_0000, 0, true), "non-canonical");
        assert!(write_allowed(IA32_GS_BASE, 0xFFFF_8000_0000_0000, 0, true));
        assert!(write_allowed(IA32_SYSENTER_CS, u64::MAX, 0, true));
    }

    #[test]
    fn linux_early_boot_msrs_have_answers() {
        assert_eq!(access(IA32_APIC_BASE, 0), MsrAccess::Constant(0xFEE0_0900));
        assert_eq!(access(IA32_APIC_BASE, 1), MsrAccess::Constant(0xFEE0_0800), "only vCPU 0 is the BSP");
        assert_eq!(access(IA32_EFER, 3), MsrAccess::VmcsField(x86::vmx::vmcs::guest::IA32_EFER_FULL));
        assert_eq!(access(IA32_PAT, 0), MsrAccess::VmcsField(x86::vmx::vmcs::guest::IA32_PAT_FULL));
        assert_eq!(access(IA32_MTRRCAP, 0), MsrAccess::Constant(0));
        assert_eq!(access(IA32_TSC, 0), MsrAccess::TimeStampCounter);
        assert_eq!(access(IA32_TSC_DEADLINE, 1), MsrAccess::TscDeadline);
        assert_eq!(access(IA32_TSC_ADJUST, 0), MsrAccess::Fixed(0));
        assert_eq!(access(IA32_BIOS_SIGN_ID, 0), MsrAccess::Constant(0));
    }

    #[test]
    fn everything_else_is_refused_including_vmx_and_the_hosts_own() {
        for msr in [0x3A, 0x480, 0x48D, 0x179, 0x17A, 0x48, 0x10A, 0x199, 0xE7, 0xE8] {
            assert_eq!(access(msr, 0), MsrAccess::Refused, "MSR {msr:#x}");
        }
    }

    #[test]
    fn bitmap_positions_follow_the_sdm_layout() {
        assert_eq!(bitmap_position(0x10), Some((2, 0)));
        assert_eq!(bitmap_position(0x277), Some((0x4E, 7)));
        assert_eq!(bitmap_position(0xC000_0082), Some((1024 + 16, 2)));
        assert_eq!(bitmap_position(0xC000_0102), Some((1024 + 32, 2)));
        assert_eq!(bitmap_position(0x4000_0000), None);
        for msr in SWITCHED {
            assert!(bitmap_position(msr).is_some(), "switched MSR {msr:#x} must be in the bitmap");
        }
    }
}
