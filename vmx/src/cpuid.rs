//! What a partition sees through CPUID: the host's answers, minus what Phalanx does not give
//! guests (VMX, MONITOR/MWAIT, XSAVE/AVX state it does not switch, x2APIC it does not
//! virtualize), plus the hypervisor bit, the TSC-deadline timer (emulated by `vlapic`), a leaf naming Phalanx, the vCPU's own APIC
//! ID, an always-running APIC timer (ARAT), and the true TSC rate (leaves 0x15/0x16: emulators
//! report a model's nominal rate, and a guest that believes it keeps the wrong time). Every
//! feature bit left in stands for MSRs that work (`msr`): a bit whose MSRs Phalanx does not
//! give is taken out, so a distribution kernel never meets a #GP it did not expect.

/// CPUID.1:ECX bits.
/// 64-bit debug store (its MSRs, with DS).
const ECX_DTES64: u32 = 1 << 2;
const ECX_MONITOR: u32 = 1 << 3;
const ECX_VMX: u32 = 1 << 5;
const ECX_SMX: u32 = 1 << 6;
const ECX_EST: u32 = 1 << 7;
/// Thermal monitor 2 and direct cache access: their MSRs are the host's.
const ECX_TM2: u32 = 1 << 8;
const ECX_DCA: u32 = 1 << 18;
/// Perfmon and debug capability MSR (IA32_PERF_CAPABILITIES): no PMU is given to partitions.
const ECX_PDCM: u32 = 1 << 15;
const ECX_X2APIC: u32 = 1 << 21;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_XSAVE: u32 = 1 << 26;
const ECX_OSXSAVE: u32 = 1 << 27;
const ECX_AVX: u32 = 1 << 28;
const ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:EDX: machine-check exception and architecture (their MSRs, MCG_CAP/MCG_STATUS and
/// the banks, are not emulated: a kernel with MCE support panics on the #GP), debug store,
/// thermal-monitor MSRs (ACPI), TM: hardware Phalanx does not give.
const EDX_MCE: u32 = 1 << 7;
const EDX_MCA: u32 = 1 << 14;
const EDX_DS: u32 = 1 << 21;
const EDX_ACPI_THERMAL: u32 = 1 << 22;
const EDX_TM: u32 = 1 << 29;
/// CPUID.7.0:EBX: IA32_TSC_ADJUST (emulated, fixed at 0: `msr`), and bits needing XSAVE
/// state: AVX2, AVX-512F.
const EBX7_TSC_ADJUST: u32 = 1 << 1;
const EBX7_AVX2: u32 = 1 << 5;
const EBX7_AVX512F: u32 = 1 << 16;
/// CPUID.7.0: features whose MSRs are not emulated: SGX, MPX (BNDCFGS, and XSAVE state),
/// Intel PT (EBX); WAITPKG (UMWAIT_CONTROL), CET shadow stacks (ECX); CET IBT, and the
/// speculation controls (SPEC_CTRL, PRED_CMD, FLUSH_CMD, ARCH_CAPABILITIES,
/// CORE_CAPABILITIES, SSBD) (EDX). Linux then uses retpolines and software mitigations.
const EBX7_HIDDEN: u32 = (1 << 2) | (1 << 14) | (1 << 25);
const ECX7_HIDDEN: u32 = (1 << 5) | (1 << 7);
const EDX7_HIDDEN: u32 = (1 << 20) | (0b11_1111 << 26);

/// CPUID.6:EAX: the APIC timer always runs.
const EAX6_ARAT: u32 = 1 << 2;

/// Leaf 0x4000_0000: max hypervisor leaf and the 12-byte vendor signature.
pub const HYPERVISOR_LEAF: u32 = 0x4000_0000;
pub const SIGNATURE: &[u8; 12] = b"PhalanxHVisr";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuidResult {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// The vCPU asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestCpu {
    pub apic_id: u8,
    /// The TSC rate the hypervisor measured (the guest runs on the host TSC, not offset).
    pub tsc_hz: u64,
    /// RDTSCP and INVPCID work in the guest only when their secondary controls are on
    /// (otherwise they raise #UD): CPUID says so.
    pub rdtscp: bool,
    pub invpcid: bool,
}

/// The guest's view of `leaf`/`subleaf` for `cpu`, given the host's answer.
const EBX7_INVPCID: u32 = 1 << 10;
const EDX_EXT_RDTSCP: u32 = 1 << 27;

pub fn filter(leaf: u32, subleaf: u32, host: CpuidResult, cpu: &GuestCpu) -> CpuidResult {
    let apic_id = cpu.apic_id;
    let mut r = host;
    match leaf {
        // Max basic leaf: at least 0x16, so the TSC leaves below are looked at.
        0 => r.eax = r.eax.max(0x16),
        1 => {
            r.ecx &= !(ECX_VMX
                | ECX_DTES64
                | ECX_TM2
                | ECX_DCA
                | ECX_SMX
                | ECX_MONITOR
                | ECX_EST
                | ECX_PDCM
                | ECX_X2APIC
                | ECX_XSAVE
                | ECX_OSXSAVE
                | ECX_AVX);
            r.ecx |= ECX_HYPERVISOR | ECX_TSC_DEADLINE;
            r.edx &= !(EDX_MCE | EDX_MCA | EDX_DS | EDX_ACPI_THERMAL | EDX_TM);
            r.ebx = (r.ebx & 0x00FF_FFFF) | ((apic_id as u32) << 24);
        }
        // MONITOR/MWAIT and the architectural PMU: absent.
        5 | 0xA => r = CpuidResult::default(),
        // Power management: only ARAT, the LAPIC timer runs in every idle state (it is the
        // hypervisor's, on the TSC). With it and the frequencies of leaves 0x15/0x16, Linux
        // needs no PIT: it neither calibrates against one nor routes its timer through one.
        6 => r = CpuidResult { eax: EAX6_ARAT, ..CpuidResult::default() },
        7 if subleaf == 0 => {
            r.ebx &= !(EBX7_AVX2 | EBX7_AVX512F | EBX7_HIDDEN);
            r.ebx |= EBX7_TSC_ADJUST;
            r.ecx &= !ECX7_HIDDEN;
            r.edx &= !EDX7_HIDDEN;
            if !cpu.invpcid {
                r.ebx &= !EBX7_INVPCID;
            }
        }
        0x8000_0001 if !cpu.rdtscp => r.edx &= !EDX_EXT_RDTSCP,
        0xB | 0x1F => r.edx = apic_id as u32,
        // TSC = crystal x 1/1 with the crystal at the measured TSC rate.
        0x15 => r = CpuidResult { eax: 1, ebx: 1, ecx: cpu.tsc_hz.min(u32::MAX as u64) as u32, edx: 0 },
        0x16 => {
            // Rounded: a calibration a few ppm under 10 MHz is still 10 MHz.
            let mhz = ((cpu.tsc_hz + 500_000) / 1_000_000).max(1) as u32;
            r = CpuidResult { eax: mhz, ebx: mhz, ecx: 100, edx: 0 }
        }
        0xD => r = CpuidResult::default(), // no XSAVE state components
        HYPERVISOR_LEAF => {
            r = CpuidResult {
                eax: HYPERVISOR_LEAF,
                ebx: u32::from_le_bytes([SIGNATURE[0], SIGNATURE[1], SIGNATURE[2], SIGNATURE[3]]),
                ecx: u32::from_le_bytes([SIGNATURE[4], SIGNATURE[5], SIGNATURE[6], SIGNATURE[7]]),
                edx: u32::from_le_bytes([SIGNATURE[8], SIGNATURE[9], SIGNATURE[10], SIGNATURE[11]]),
            }
        }
        0x4000_0001..=0x4000_00FF => r = CpuidResult::default(),
        _ => {}
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu(apic_id: u8) -> GuestCpu {
        GuestCpu { apic_id, tsc_hz: 10_000_000, rdtscp: true, invpcid: true }
    }

    #[test]
    fn rdtscp_and_invpcid_are_hidden_when_their_controls_are_off() {
        let all = CpuidResult { eax: 0, ebx: u32::MAX, ecx: u32::MAX, edx: u32::MAX };
        let off = GuestCpu { rdtscp: false, invpcid: false, ..cpu(0) };
        assert_eq!(filter(0x8000_0001, 0, all, &off).edx & EDX_EXT_RDTSCP, 0);
        assert_eq!(filter(7, 0, all, &off).ebx & EBX7_INVPCID, 0);
        assert_ne!(filter(0x8000_0001, 0, all, &cpu(0)).edx & EDX_EXT_RDTSCP, 0);
        assert_ne!(filter(7, 0, all, &cpu(0)).ebx & EBX7_INVPCID, 0);
    }

    const HOST_LEAF1: CpuidResult = CpuidResult { eax: 0x50654, ebx: 0x0102_0800, ecx: 0xFFFB_FFFF, edx: 0xBFEB_FBFF };

    #[test]
    fn guests_never_see_vmx_and_always_see_the_hypervisor_bit() {
        let r = filter(1, 0, HOST_LEAF1, &cpu(3));
        assert_eq!(r.ecx & ECX_VMX, 0);
        assert_ne!(r.ecx & ECX_HYPERVISOR, 0);
        assert_eq!(r.ecx & (ECX_MONITOR | ECX_XSAVE | ECX_AVX | ECX_X2APIC), 0);
        let bare = filter(1, 0, CpuidResult::default(), &cpu(0));
        assert_ne!(bare.ecx & ECX_TSC_DEADLINE, 0, "the TSC-deadline timer is emulated, whatever the host has");
        assert_eq!(r.ebx >> 24, 3, "initial APIC ID is the vCPU's");
        assert_eq!(r.ebx & 0xFF_FFFF, HOST_LEAF1.ebx & 0xFF_FFFF);
        let hidden = EDX_MCE | EDX_MCA | EDX_DS | EDX_ACPI_THERMAL | EDX_TM;
        assert_eq!(r.edx, HOST_LEAF1.edx & !hidden, "no machine-check, thermal or debug-store MSRs");
    }

    #[test]
    fn the_hypervisor_leaf_names_phalanx() {
        let r = filter(HYPERVISOR_LEAF, 0, CpuidResult::default(), &cpu(0));
        let mut sig = [0u8; 12];
        sig[..4].copy_from_slice(&r.ebx.to_le_bytes());
        sig[4..8].copy_from_slice(&r.ecx.to_le_bytes());
        sig[8..].copy_from_slice(&r.edx.to_le_bytes());
        assert_eq!(&sig, SIGNATURE);
        assert!(r.eax >= HYPERVISOR_LEAF);
    }

    #[test]
    fn the_tsc_leaves_give_the_measured_rate() {
        let r = filter(0x15, 0, CpuidResult { eax: 2, ebx: 200, ecx: 25_000_000, edx: 0 }, &cpu(0));
        assert_eq!((r.eax, r.ebx, r.ecx), (1, 1, 10_000_000), "TSC Hz = ecx * ebx / eax");
        assert_eq!(filter(0x16, 0, CpuidResult::default(), &cpu(0)).eax, 10);
        let calibrated = GuestCpu { tsc_hz: 9_999_512, ..cpu(0) };
        assert_eq!(filter(0x16, 0, CpuidResult::default(), &calibrated).eax, 10, "rounded, not truncated");
        assert!(filter(0, 0, CpuidResult { eax: 0xD, ..Default::default() }, &cpu(0)).eax >= 0x16);
        let all = CpuidResult { eax: u32::MAX, ebx: u32::MAX, ecx: u32::MAX, edx: u32::MAX };
        let leaf6 = filter(6, 0, all, &cpu(0));
        assert_eq!(leaf6, CpuidResult { eax: EAX6_ARAT, ..Default::default() }, "ARAT only: no PIT needed");
        let leaf7 = filter(7, 0, CpuidResult { ebx: u32::MAX, ..Default::default() }, &cpu(0));
        assert_eq!(leaf7.ebx & (EBX7_AVX2 | EBX7_AVX512F), 0);
        let leaf7 = filter(7, 0, CpuidResult::default(), &cpu(0));
        assert_ne!(leaf7.ebx & EBX7_TSC_ADJUST, 0, "TSC_ADJUST, emulated, whatever the host says");
        let leaf7 = filter(7, 0, all, &cpu(0));
        assert_eq!(leaf7.edx & (1 << 29), 0, "no ARCH_CAPABILITIES MSR");
        assert_eq!(leaf7.edx & (1 << 26), 0, "no SPEC_CTRL / PRED_CMD MSRs");
        assert_eq!((leaf7.ebx & EBX7_HIDDEN, leaf7.ecx & ECX7_HIDDEN, leaf7.edx & EDX7_HIDDEN), (0, 0, 0));
        assert_ne!(leaf7.edx & (1 << 10), 0, "MD_CLEAR (VERW) needs no MSR: kept");
    }

    #[test]
    fn unlisted_leaves_pass_through_and_xsave_leaves_are_empty() {
        let host = CpuidResult { eax: 1, ebx: 2, ecx: 3, edx: 4 };
        assert_eq!(filter(0x8000_0001, 0, host, &cpu(0)), host);
        assert_eq!(filter(0xD, 0, host, &cpu(0)), CpuidResult::default());
        assert_eq!(filter(0xB, 1, host, &cpu(7)).edx, 7);
    }
}
