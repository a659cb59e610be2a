//! The VM-entry checks of the Intel SDM (Vol. 3C, 27.2 "Checks on VMX Controls and
//! Host-State Area" and 27.3.1 "Checks on the Guest State Area"; 26.x in older editions)
//! for the fields Phalanx writes, against the features negotiated. Bochs is lenient where
//! hardware and KVM are strict: the image runs this on every VMCS before its first VM entry,
//! so a broken field is a partition fault naming it rather than an unexplained entry failure.
//!
//! Covered: reserved control bits against the allowed-0/allowed-1 settings, control
//! dependencies (VPID, EPT pointer, unrestricted guest, MSR areas, bitmaps, NMI/virtual NMI),
//! the whole host-state area for a 64-bit host, and the guest's control registers, EFER, PAT,
//! RFLAGS, RIP, segment registers (protected, IA-32e and, with unrestricted guest, real
//! mode), descriptor tables, activity and interruptibility state, the static pending-debug
//! rules and the link pointer. Not covered: fields Phalanx never writes (posted interrupts,
//! the TPR threshold rules without virtual-interrupt delivery, VM functions, PML, SMM dual-monitor, MPX, CET, PKRS, Intel PT),
//! the pending-debug rules that depend on RFLAGS.TF and RTM, EFER.NXE against CPUID, and
//! 57-bit canonical addresses (the 48-bit rule is used: stricter on LA57 CPUs).

use core::fmt;

use firmware::longmode::{Segment, VcpuState};
use x86::vmx::vmcs::control::{EntryControls, ExitControls, PinbasedControls, PrimaryControls, SecondaryControls};

use crate::caps::VmxCapabilities;
use crate::vmcs_image::InitialVmcs;

/// The first check a VMCS breaks: the field and the rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryCheckFailure {
    pub field: &'static str,
    pub rule: &'static str,
}

impl fmt::Display for EntryCheckFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VM-entry check failed on {}: {}", self.field, self.rule)
    }
}

type Check = Result<(), EntryCheckFailure>;

fn rule(holds: bool, field: &'static str, rule: &'static str) -> Check {
    if holds {
        Ok(())
    } else {
        Err(EntryCheckFailure { field, rule })
    }
}

const AR_UNUSABLE: u32 = 1 << 16;
const CR0_PE: u64 = 1;
const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_PCIDE: u64 = 1 << 17;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_RESERVED: u64 = !(1 | EFER_LME | EFER_LMA | 1 << 11);
const RFLAGS_IF: u64 = 1 << 9;
/// IA32_DEBUGCTL bits that may be set (LBR, BTF, TR, BTS, BTINT, BTS_OFF_OS/USR,
/// FREEZE_LBRS_ON_PMI, FREEZE_PERFMON_ON_PMI, FREEZE_WHILE_SMM, RTM_DEBUG).
const DEBUGCTL_DEFINED: u64 = 0b1101_1111_1100_0011;
const RFLAGS_VM: u64 = 1 << 17;

/// Checks every field of `vmcs` (controls, host state, guest state) in the SDM's order.
pub fn check(vmcs: &InitialVmcs) -> Check {
    check_controls(vmcs)?;
    check_host(vmcs)?;
    check_guest(vmcs)
}

fn within(value: u32, msr: u64) -> bool {
    let must_be_one = msr as u32;
    let may_be_one = (msr >> 32) as u32;
    value & must_be_one == must_be_one && value & !may_be_one == 0
}

/// Within the CPU's physical-address width (CPUID 0x80000008, in the image).
fn phys_ok(v: &InitialVmcs, addr: u64) -> bool {
    addr >> v.physical_address_bits.min(63) == 0
}

fn page_aligned_phys(v: &InitialVmcs, addr: u64) -> bool {
    addr & 0xFFF == 0 && phys_ok(v, addr)
}

/// Canonical for 48-bit linear addresses.
fn canonical(addr: u64) -> bool {
    let top = addr >> 47;
    top == 0 || top == (1 << 17) - 1
}

fn has(value: u32, bits: u32) -> bool {
    value & bits == bits
}

fn check_controls(v: &InitialVmcs) -> Check {
    let c = &v.controls;
    let caps: &VmxCapabilities = &c.caps;
    let f = caps.features();
    rule(
        within(c.pinbased, caps.pinbased),
        "pin-based controls",
        "reserved bits must match IA32_VMX_(TRUE_)PINBASED_CTLS",
    )?;
    rule(
        within(c.primary, caps.procbased),
        "primary processor-based controls",
        "reserved bits must match IA32_VMX_(TRUE_)PROCBASED_CTLS",
    )?;
    let secondary_on = has(c.primary, PrimaryControls::SECONDARY_CONTROLS.bits());
    let secondary = if secondary_on { c.secondary } else { 0 };
    rule(
        !secondary_on || within(secondary, caps.procbased2),
        "secondary processor-based controls",
        "reserved bits must match IA32_VMX_PROCBASED_CTLS2",
    )?;
    rule(within(c.exit, caps.exit), "VM-exit controls", "reserved bits must match IA32_VMX_(TRUE_)EXIT_CTLS")?;
    rule(within(v.entry, caps.entry), "VM-entry controls", "reserved bits must match IA32_VMX_(TRUE_)ENTRY_CTLS")?;

    if has(c.primary, PrimaryControls::USE_IO_BITMAPS.bits()) {
        rule(
            page_aligned_phys(v, v.partition.io_bitmap_a),
            "I/O bitmap A address",
            "must be 4 KiB aligned within the physical-address width",
        )?;
        rule(
            page_aligned_phys(v, v.partition.io_bitmap_b),
            "I/O bitmap B address",
            "must be 4 KiB aligned within the physical-address width",
        )?;
    }
    if has(c.primary, PrimaryControls::USE_MSR_BITMAPS.bits()) {
        rule(
            page_aligned_phys(v, v.partition.msr_bitmap),
            "MSR bitmap address",
            "must be 4 KiB aligned within the physical-address width",
        )?;
    }
    let tpr_shadow = has(c.primary, PrimaryControls::USE_TPR_SHADOW.bits());
    if tpr_shadow {
        rule(
            page_aligned_phys(v, v.vcpu.virtual_apic_page),
            "virtual-APIC address",
            "must be 4 KiB aligned within the physical-address width",
        )?;
    }
    let nmi_exiting = has(c.pinbased, PinbasedControls::NMI_EXITING.bits());
    let virtual_nmis = has(c.pinbased, PinbasedControls::VIRTUAL_NMIS.bits());
    rule(nmi_exiting || !virtual_nmis, "pin-based controls", "virtual NMIs require NMI exiting")?;
    rule(
        virtual_nmis || !has(c.primary, PrimaryControls::NMI_WINDOW_EXITING.bits()),
        "primary processor-based controls",
        "NMI-window exiting requires virtual NMIs",
    )?;
    rule(
        !has(c.pinbased, PinbasedControls::POSTED_INTERRUPTS.bits()),
        "pin-based controls",
        "posted interrupts need a descriptor, which Phalanx does not set up",
    )?;
    let needs_tpr_shadow = SecondaryControls::VIRTUALIZE_X2APIC
        | SecondaryControls::VIRTUALIZE_APIC_REGISTER
        | SecondaryControls::VIRTUAL_INTERRUPT_DELIVERY;
    rule(
        tpr_shadow || secondary & needs_tpr_shadow.bits() == 0,
        "secondary processor-based controls",
        "x2APIC virtualization, APIC-register virtualization and virtual-interrupt delivery require \"use TPR shadow\"",
    )?;
    let apic_accesses = has(secondary, SecondaryControls::VIRTUALIZE_APIC.bits());
    rule(
        !(apic_accesses && has(secondary, SecondaryControls::VIRTUALIZE_X2APIC.bits())),
        "secondary processor-based controls",
        "\"virtualize x2APIC mode\" and \"virtualize APIC accesses\" exclude each other",
    )?;
    rule(
        !has(secondary, SecondaryControls::VIRTUAL_INTERRUPT_DELIVERY.bits())
            || has(c.pinbased, PinbasedControls::EXTERNAL_INTERRUPT_EXITING.bits()),
        "secondary processor-based controls",
        "virtual-interrupt delivery requires external-interrupt exiting",
    )?;
    if apic_accesses {
        rule(
            page_aligned_phys(v, v.partition.apic_access_page),
            "APIC-access address",
            "must be 4 KiB aligned within the physical-address width",
        )?;
    }

    let ept = has(secondary, SecondaryControls::ENABLE_EPT.bits());
    if has(secondary, SecondaryControls::ENABLE_VPID.bits()) {
        rule(v.vcpu.vpid != 0, "VPID", "must not be 0 when \"enable VPID\" is set")?;
    }
    if ept {
        let eptp = v.partition.eptp;
        let memory_type = eptp & 7;
        rule(
            (memory_type == 0 && caps.ept_vpid & 1 << 8 != 0) || (memory_type == 6 && f.ept_write_back),
            "EPT pointer",
            "memory type must be one IA32_VMX_EPT_VPID_CAP allows (UC or WB)",
        )?;
        rule(
            (eptp >> 3) & 7 == 3 && f.ept_4_level,
            "EPT pointer",
            "page-walk length must be 4 (bits 5:3 = 3) and supported",
        )?;
        rule(
            eptp & 1 << 6 == 0 || f.ept_accessed_dirty,
            "EPT pointer",
            "accessed/dirty flags need IA32_VMX_EPT_VPID_CAP bit 21",
        )?;
        rule(
            eptp & 0xF80 == 0 && phys_ok(v, eptp),
            "EPT pointer",
            "bits 11:7 and those beyond the physical-address width must be 0",
        )?;
    }
    rule(
        !has(secondary, SecondaryControls::UNRESTRICTED_GUEST.bits()) || ept,
        "secondary processor-based controls",
        "unrestricted guest requires EPT",
    )?;
    rule(
        !has(secondary, SecondaryControls::PAUSE_LOOP_EXITING.bits()) || f.pause_loop_exiting,
        "secondary processor-based controls",
        "PAUSE-loop exiting is not offered",
    )?;

    // MSR areas: 16-byte aligned, inside the physical-address width, within the count the
    // CPU recommends (512 * (IA32_VMX_MISC[27:25] + 1)).
    let max_msrs = 512 * (((caps.misc >> 25) & 7) as u32 + 1);
    rule(v.vcpu.msr_count <= max_msrs, "VM-exit MSR-store count", "exceeds the maximum IA32_VMX_MISC recommends")?;
    if v.vcpu.msr_count > 0 {
        let area = v.vcpu.msr_area;
        let end = area + v.vcpu.msr_count as u64 * 16 - 1;
        rule(
            area & 0xF == 0 && phys_ok(v, end),
            "VM-exit MSR-store address",
            "must be 16-byte aligned within the physical-address width",
        )?;
        rule(
            area & 0xF == 0 && phys_ok(v, end),
            "VM-entry MSR-load address",
            "must be 16-byte aligned within the physical-address width",
        )?;
    }
    rule(
        !has(c.exit, ExitControls::SAVE_VMX_PREEMPTION_TIMER.bits())
            || has(c.pinbased, PinbasedControls::VMX_PREEMPTION_TIMER.bits()),
        "VM-exit controls",
        "saving the preemption timer requires it to be active",
    )?;
    rule(
        v.entry & (EntryControls::ENTRY_TO_SMM | EntryControls::DEACTIVATE_DUAL_MONITOR).bits() == 0,
        "VM-entry controls",
        "entry to SMM and deactivate dual-monitor must be 0 outside SMM",
    )?;
    Ok(())
}

fn check_host(v: &InitialVmcs) -> Check {
    let h = &v.host;
    let caps = &v.controls.caps;
    rule(caps.adjust_cr0(h.cr0) == h.cr0, "host CR0", "must have the IA32_VMX_CR0_FIXED0/1 bits")?;
    rule(caps.adjust_cr4(h.cr4) == h.cr4, "host CR4", "must have the IA32_VMX_CR4_FIXED0/1 bits")?;
    rule(phys_ok(v, h.cr3), "host CR3", "bits beyond the physical-address width must be 0")?;
    rule(canonical(h.rip), "host RIP", "must be canonical")?;
    let sixty_four = has(v.controls.exit, ExitControls::HOST_ADDRESS_SPACE_SIZE.bits());
    rule(sixty_four, "VM-exit controls", "Phalanx is a 64-bit host: \"host address-space size\" must be 1")?;
    rule(h.cr4 & CR4_PAE != 0, "host CR4", "PAE must be 1 with \"host address-space size\"")?;
    if has(v.controls.exit, ExitControls::LOAD_IA32_EFER.bits()) {
        rule(h.efer & EFER_RESERVED == 0, "host IA32_EFER", "reserved bits must be 0")?;
        rule(
            h.efer & EFER_LMA != 0 && h.efer & EFER_LME != 0,
            "host IA32_EFER",
            "LMA and LME must equal \"host address-space size\"",
        )?;
    }
    if has(v.controls.exit, ExitControls::LOAD_IA32_PAT.bits()) {
        rule(pat_valid(h.pat), "host IA32_PAT", "every entry must be a valid memory type (0, 1, 4, 5, 6, 7)")?;
    }
    for (field, selector) in [
        ("host CS selector", h.code_selector),
        ("host SS/DS/ES selector", h.data_selector),
        ("host TR selector", h.tr_selector),
    ] {
        rule(selector & 7 == 0, field, "RPL and TI must be 0")?;
    }
    rule(h.code_selector != 0, "host CS selector", "must not be 0")?;
    rule(h.tr_selector != 0, "host TR selector", "must not be 0")?;
    for (field, base) in [("host TR base", h.tr_base), ("host GDTR base", h.gdtr_base), ("host IDTR base", h.idtr_base)]
    {
        rule(canonical(base), field, "must be canonical")?;
    }
    Ok(())
}

fn pat_valid(pat: u64) -> bool {
    pat.to_le_bytes().iter().all(|&t| matches!(t, 0 | 1 | 4 | 5 | 6 | 7))
}

fn unusable(seg: &Segment) -> bool {
    seg.access_rights & AR_UNUSABLE != 0
}

fn dpl(ar: u32) -> u32 {
    (ar >> 5) & 3
}

fn check_guest(v: &InitialVmcs) -> Check {
    let g = &v.guest;
    let s: &VcpuState = &g.state;
    let caps = &v.controls.caps;
    let unrestricted =
        v.controls.paths.unrestricted_guest && has(v.controls.secondary, SecondaryControls::UNRESTRICTED_GUEST.bits());
    let ia32e = has(v.entry, EntryControls::IA32E_MODE_GUEST.bits());

    // Control registers: the fixed bits, of which unrestricted guest exempts PE and PG.
    let exempt = if unrestricted { CR0_PE | CR0_PG } else { 0 };
    let fixed0 = caps.cr0_fixed0 & !exempt;
    rule(
        g.cr0 & fixed0 == fixed0 && g.cr0 & !caps.cr0_fixed1 == 0,
        "guest CR0",
        "must have the IA32_VMX_CR0_FIXED0/1 bits",
    )?;
    rule(g.cr0 & CR0_PG == 0 || g.cr0 & CR0_PE != 0, "guest CR0", "PG requires PE")?;
    // Not an SDM rule but the reason for one: without unrestricted guest the fixed bits force
    // PE and PG on, and a vCPU meant to start in real mode would run something else.
    let mode_bits = CR0_PE | CR0_PG;
    rule(
        g.cr0 & mode_bits == s.cr0 & mode_bits,
        "guest CR0",
        "a vCPU starting with protection or paging off needs unrestricted guest",
    )?;
    rule(g.cr0 & CR0_NW == 0 || g.cr0 & CR0_CD != 0, "guest CR0", "NW requires CD")?;
    rule(g.cr0 >> 32 == 0, "guest CR0", "bits 63:32 must be 0")?;
    rule(caps.adjust_cr4(g.cr4) == g.cr4, "guest CR4", "must have the IA32_VMX_CR4_FIXED0/1 bits")?;
    rule(
        !ia32e || (g.cr0 & CR0_PG != 0 && g.cr4 & CR4_PAE != 0),
        "guest CR0/CR4",
        "IA-32e mode guest requires PG and PAE",
    )?;
    rule(ia32e || g.cr4 & CR4_PCIDE == 0, "guest CR4", "PCIDE must be 0 outside IA-32e mode")?;
    rule(phys_ok(v, s.cr3), "guest CR3", "bits beyond the physical-address width must be 0")?;
    if has(v.entry, EntryControls::LOAD_DEBUG_CONTROLS.bits()) {
        rule(g.dr7 >> 32 == 0, "guest DR7", "bits 63:32 must be 0")?;
        rule(g.debugctl & !DEBUGCTL_DEFINED == 0, "guest IA32_DEBUGCTL", "reserved bits must be 0")?;
    }
    if has(v.entry, EntryControls::LOAD_IA32_PAT.bits()) {
        rule(pat_valid(g.pat), "guest IA32_PAT", "every entry must be a valid memory type (0, 1, 4, 5, 6, 7)")?;
    }
    if has(v.entry, EntryControls::LOAD_IA32_EFER.bits()) {
        rule(s.efer & EFER_RESERVED == 0, "guest IA32_EFER", "reserved bits must be 0")?;
        rule((s.efer & EFER_LMA != 0) == ia32e, "guest IA32_EFER", "LMA must equal \"IA-32e mode guest\"")?;
        rule(
            g.cr0 & CR0_PG == 0 || (s.efer & EFER_LME != 0) == ia32e,
            "guest IA32_EFER",
            "with CR0.PG, LME must equal \"IA-32e mode guest\"",
        )?;
    }

    check_guest_segments(s, g.cr0 & CR0_PE != 0, unrestricted, ia32e)?;

    rule(canonical(s.gdtr_base) && canonical(s.idtr_base), "guest GDTR/IDTR base", "must be canonical")?;
    rule(s.gdtr_limit >> 16 == 0 && s.idtr_limit >> 16 == 0, "guest GDTR/IDTR limit", "bits 31:16 must be 0")?;
    let long_code = ia32e && s.cs.access_rights & 1 << 13 != 0;
    rule(
        if long_code { canonical(s.rip) } else { s.rip >> 32 == 0 },
        "guest RIP",
        "must be canonical in 64-bit code, else bits 63:32 must be 0",
    )?;
    rule(g.rflags & 2 != 0, "guest RFLAGS", "bit 1 must be 1")?;
    rule(
        g.rflags & (1 << 3 | 1 << 5 | 1 << 15) == 0 && g.rflags >> 22 == 0,
        "guest RFLAGS",
        "reserved bits must be 0",
    )?;
    rule(
        !(ia32e || g.cr0 & CR0_PE == 0) || g.rflags & RFLAGS_VM == 0,
        "guest RFLAGS",
        "VM must be 0 in IA-32e mode or with CR0.PE clear",
    )?;

    rule(g.activity <= 3, "guest activity state", "must be active, HLT, shutdown or wait-for-SIPI")?;
    // IA32_VMX_MISC bits 6-8 say which of HLT, shutdown and wait-for-SIPI may be entered.
    rule(
        g.activity == 0 || caps.misc & (1 << (5 + g.activity)) != 0,
        "guest activity state",
        "the CPU does not support entering this activity state",
    )?;
    rule(
        g.activity == 0 || g.interruptibility & 3 == 0,
        "guest activity state",
        "must be active while blocking by STI or MOV SS",
    )?;
    rule(g.activity != 1 || dpl(s.ss.access_rights) == 0, "guest activity state", "HLT requires SS.DPL 0")?;
    rule(g.interruptibility >> 5 == 0, "guest interruptibility state", "bits 31:5 must be 0")?;
    rule(g.interruptibility & 4 == 0, "guest interruptibility state", "blocking by SMI must be 0 outside SMM")?;
    rule(
        g.interruptibility & 3 != 3,
        "guest interruptibility state",
        "blocking by STI and by MOV SS cannot both be set",
    )?;
    rule(
        g.rflags & RFLAGS_IF != 0 || g.interruptibility & 1 == 0,
        "guest interruptibility state",
        "blocking by STI requires RFLAGS.IF",
    )?;
    rule(g.pending_debug & !0x1_500F == 0, "guest pending debug exceptions", "reserved bits must be 0")?;
    rule(g.link_pointer == u64::MAX, "VMCS link pointer", "must be all ones without VMCS shadowing")?;
    Ok(())
}

/// Segment rules (27.3.1.2), outside virtual-8086 mode (Phalanx never enters it). The
/// "unrestricted guest" control relaxes the RPL rules and lets CS be a read/write data
/// segment; with CR0.PE clear SS.DPL must be 0.
fn check_guest_segments(s: &VcpuState, protected: bool, unrestricted: bool, ia32e: bool) -> Check {
    rule(s.tr.selector & 4 == 0, "guest TR selector", "TI must be 0")?;
    rule(unusable(&s.ldtr) || s.ldtr.selector & 4 == 0, "guest LDTR selector", "TI must be 0")?;
    rule(unrestricted || s.ss.selector & 3 == s.cs.selector & 3, "guest SS selector", "RPL must equal CS.RPL")?;

    for (field, seg) in [("guest TR base", &s.tr), ("guest FS base", &s.fs), ("guest GS base", &s.gs)] {
        rule(canonical(seg.base), field, "must be canonical")?;
    }
    rule(unusable(&s.ldtr) || canonical(s.ldtr.base), "guest LDTR base", "must be canonical")?;
    rule(s.cs.base >> 32 == 0, "guest CS base", "bits 63:32 must be 0")?;
    for (field, seg) in [("guest SS base", &s.ss), ("guest DS base", &s.ds), ("guest ES base", &s.es)] {
        rule(unusable(seg) || seg.base >> 32 == 0, field, "bits 63:32 must be 0")?;
    }

    let cs = s.cs.access_rights;
    rule(!unusable(&s.cs), "guest CS access rights", "CS must be usable")?;
    let cs_type = cs & 0xF;
    rule(
        matches!(cs_type, 9 | 11 | 13 | 15) || (unrestricted && cs_type == 3),
        "guest CS access rights",
        "type must be an accessed code segment (or, with unrestricted guest, read/write accessed data)",
    )?;
    rule(cs & 1 << 4 != 0 && cs & 1 << 7 != 0, "guest CS access rights", "S and P must be 1")?;
    if cs_type == 3 {
        rule(dpl(cs) == 0, "guest CS access rights", "DPL must be 0 for a data-type CS")?;
    } else if matches!(cs_type, 9 | 11) {
        rule(
            dpl(cs) == dpl(s.ss.access_rights),
            "guest CS access rights",
            "DPL must equal SS.DPL for a non-conforming CS",
        )?;
    } else {
        rule(
            dpl(cs) <= dpl(s.ss.access_rights),
            "guest CS access rights",
            "DPL must not exceed SS.DPL for a conforming CS",
        )?;
    }
    rule(
        !ia32e || cs & 1 << 13 == 0 || cs & 1 << 14 == 0,
        "guest CS access rights",
        "L requires D/B clear in IA-32e mode",
    )?;
    if !unusable(&s.ss) {
        let ss = s.ss.access_rights;
        rule(matches!(ss & 0xF, 3 | 7), "guest SS access rights", "type must be read/write accessed data")?;
        rule(ss & 1 << 4 != 0 && ss & 1 << 7 != 0, "guest SS access rights", "S and P must be 1")?;
    }
    // Usable or not.
    rule(
        unrestricted || dpl(s.ss.access_rights) == (s.ss.selector & 3) as u32,
        "guest SS access rights",
        "DPL must equal SS.RPL",
    )?;
    rule(
        protected && cs_type != 3 || dpl(s.ss.access_rights) == 0,
        "guest SS access rights",
        "DPL must be 0 with CR0.PE clear or a data-type CS",
    )?;
    for (field, seg) in [
        ("guest DS access rights", &s.ds),
        ("guest ES access rights", &s.es),
        ("guest FS access rights", &s.fs),
        ("guest GS access rights", &s.gs),
    ] {
        if unusable(seg) {
            continue;
        }
        let ar = seg.access_rights;
        rule(ar & 1 != 0, field, "type must be accessed")?;
        rule(ar & 1 << 3 == 0 || ar & 1 << 1 != 0, field, "a code segment must be readable")?;
        rule(ar & 1 << 4 != 0 && ar & 1 << 7 != 0, field, "S and P must be 1")?;
        rule(
            unrestricted || ar & 0xF > 11 || dpl(ar) >= (seg.selector & 3) as u32,
            field,
            "DPL must not be below RPL",
        )?;
    }
    rule(!unusable(&s.tr), "guest TR access rights", "TR must be usable")?;
    let tr = s.tr.access_rights;
    rule(!ia32e || tr & 0xF == 11, "guest TR access rights", "type must be a busy 64-bit TSS in IA-32e mode")?;
    rule(ia32e || matches!(tr & 0xF, 3 | 11), "guest TR access rights", "type must be a busy TSS")?;
    rule(tr & 1 << 4 == 0 && tr & 1 << 7 != 0, "guest TR access rights", "S must be 0 and P 1")?;
    if !unusable(&s.ldtr) {
        let ldtr = s.ldtr.access_rights;
        rule(
            ldtr & 0xF == 2 && ldtr & 1 << 4 == 0 && ldtr & 1 << 7 != 0,
            "guest LDTR access rights",
            "must be a present LDT",
        )?;
    }
    for (field, seg) in [
        ("guest CS access rights", &s.cs),
        ("guest SS access rights", &s.ss),
        ("guest DS access rights", &s.ds),
        ("guest ES access rights", &s.es),
        ("guest FS access rights", &s.fs),
        ("guest GS access rights", &s.gs),
        ("guest TR access rights", &s.tr),
        ("guest LDTR access rights", &s.ldtr),
    ] {
        if unusable(seg) {
            continue;
        }
        let ar = seg.access_rights;
        rule(ar & 0xF00 == 0 && ar >> 17 == 0, field, "reserved bits must be 0")?;
        let g = ar & 1 << 15 != 0;
        rule(seg.limit & 0xFFF == 0xFFF || !g, field, "G must be 0 when limit bits 11:0 are not all 1")?;
        rule(seg.limit >> 20 == 0 || g, field, "G must be 1 when limit bits 31:20 are not all 0")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{self, initial_vmcs as image, BOCHS_MODELS, MINIMAL_VTX, NESTED_KVM_SKYLAKE};
    use firmware::linux::{boot_vcpu_state, startup_ipi_state};
    use firmware::longmode::{initial_vcpu_state, AR_UNUSABLE};

    fn linux_entry_state() -> VcpuState {
        // The 64-bit boot-protocol entry `firmware::linux` computes for a loaded kernel.
        boot_vcpu_state(&firmware::linux::LinuxLayout {
            kernel_gpa: 0x100_0000,
            entry_gpa: 0x100_0200,
            initrd_gpa: None,
        })
    }

    #[test]
    fn every_loader_state_passes_on_every_cpu_it_can_run_on() {
        let mut cpus: Vec<(&str, crate::VmxCapabilities)> = BOCHS_MODELS.to_vec();
        cpus.push(("nested KVM", NESTED_KVM_SKYLAKE));
        cpus.push(("minimal", MINIMAL_VTX));
        for (name, caps) in &cpus {
            for bochs in [false, true] {
                for v in [0, 1, firmware::longmode::MAX_VCPUS - 1] {
                    assert_eq!(check(&image(caps, &initial_vcpu_state(v), bochs)), Ok(()), "{name}: test guest");
                }
                assert_eq!(check(&image(caps, &linux_entry_state(), bochs)), Ok(()), "{name}: Linux entry");
            }
        }
        for (name, caps) in cpus.iter().filter(|(n, _)| *n != "minimal") {
            assert_eq!(check(&image(caps, &startup_ipi_state(0x9F), false)), Ok(()), "{name}: real-mode AP");
        }
    }

    #[test]
    fn a_real_mode_vcpu_fails_without_unrestricted_guest() {
        let err = check(&image(&MINIMAL_VTX, &startup_ipi_state(0x9F), false)).unwrap_err();
        assert_eq!(err.field, "guest CR0", "{err}");
    }

    #[test]
    fn broken_guest_states_are_caught_naming_the_field() {
        // Without unrestricted guest, where every segment rule applies.
        let caps = MINIMAL_VTX;
        type Breakage = (fn(&mut VcpuState), &'static str);
        let broken: [Breakage; 12] = [
            (|s| s.cr0 &= !1, "guest CR0"),
            (|s| s.cr4 &= !CR4_PAE, "guest CR0/CR4"),
            (|s| s.efer &= !EFER_LME, "guest IA32_EFER"),
            (|s| s.cs.access_rights |= 1 << 14, "guest CS access rights"),
            (|s| s.tr.access_rights = 0x89, "guest TR access rights"),
            (|s| s.tr.access_rights = AR_UNUSABLE, "guest TR access rights"),
            (|s| s.rflags = 0, "guest RFLAGS"),
            (|s| s.ss.selector = 0x13, "guest SS selector"),
            (|s| s.ds.access_rights = 0xC092, "guest DS access rights"),
            (|s| s.cs.limit = 0xFFFF_F000, "guest CS access rights"),
            (|s| s.rip = 0x0000_8000_0000_0000, "guest RIP"),
            (|s| s.ldtr.access_rights = 0x82 | 1 << 8, "guest LDTR access rights"),
        ];
        for (breaks, field) in broken {
            let mut s = initial_vcpu_state(0);
            breaks(&mut s);
            let err = check(&image(&caps, &s, false)).unwrap_err();
            assert_eq!(err.field, field, "{err}");
        }
    }

    #[test]
    fn unrestricted_guest_relaxes_the_rpl_rules_whatever_cr0_pe_says() {
        let mut s = initial_vcpu_state(0);
        s.ss.selector |= 3;
        s.ds.selector |= 3;
        let skylake = fixtures::bochs("corei7_skylake_x");
        assert_eq!(check(&image(&skylake, &s, false)), Ok(()), "accepted with the control, as hardware does");
        assert_eq!(check(&image(&MINIMAL_VTX, &s, false)).unwrap_err().field, "guest SS selector");
        // SS.DPL = SS.RPL holds for an unusable SS too.
        let mut s = initial_vcpu_state(0);
        s.ss = firmware::longmode::Segment { selector: 0x13, ..firmware::longmode::Segment::unusable() };
        s.cs.selector |= 3;
        assert_eq!(check(&image(&MINIMAL_VTX, &s, false)).unwrap_err().field, "guest SS access rights");
    }

    #[test]
    fn activity_and_interruptibility_follow_what_the_cpu_offers() {
        let caps = MINIMAL_VTX; // IA32_VMX_MISC offers HLT only
        let mut v = image(&caps, &initial_vcpu_state(0), true);
        v.guest.activity = 3; // wait-for-SIPI
        assert_eq!(check(&v).unwrap_err().field, "guest activity state");
        v.guest.activity = 1;
        assert_eq!(check(&v), Ok(()));
        v.guest.interruptibility = 1;
        assert_eq!(check(&v).unwrap_err().field, "guest activity state", "blocking by STI needs the active state");
        v.guest.activity = 0;
        v.guest.interruptibility = 4;
        assert_eq!(check(&v).unwrap_err().field, "guest interruptibility state", "no SMI blocking outside SMM");
    }

    #[test]
    fn debug_state_is_loaded_and_checked() {
        let v = image(&NESTED_KVM_SKYLAKE, &initial_vcpu_state(0), false);
        assert_ne!(v.entry & EntryControls::LOAD_DEBUG_CONTROLS.bits(), 0, "DR7 and DEBUGCTL are the guest's");
        let mut bad = v;
        bad.guest.dr7 = 1 << 40;
        assert_eq!(check(&bad).unwrap_err().field, "guest DR7");
        let mut bad = v;
        bad.guest.debugctl = 1 << 5;
        assert_eq!(check(&bad).unwrap_err().field, "guest IA32_DEBUGCTL");
    }

    #[test]
    fn addresses_beyond_the_physical_width_are_caught() {
        let mut v = image(&fixtures::bochs("corei7_skylake_x"), &initial_vcpu_state(0), false);
        v.physical_address_bits = 39;
        v.partition.msr_bitmap = 1 << 40;
        assert_eq!(check(&v).unwrap_err().field, "MSR bitmap address");
    }

    #[test]
    fn broken_controls_and_host_state_are_caught() {
        let caps = fixtures::bochs("corei7_sandy_bridge_2600k");
        let good = image(&caps, &initial_vcpu_state(0), false);
        assert_eq!(check(&good), Ok(()));
        type Breakage = (fn(&mut InitialVmcs), &'static str);
        let broken: [Breakage; 9] = [
            // What an unconditional PLE request would do on this CPU (and under nested KVM).
            (
                |v| v.controls.secondary |= SecondaryControls::PAUSE_LOOP_EXITING.bits(),
                "secondary processor-based controls",
            ),
            (|v| v.controls.pinbased &= !0x16, "pin-based controls"),
            (|v| v.vcpu.vpid = 0, "VPID"),
            (|v| v.partition.eptp |= 1 << 6, "EPT pointer"),
            (|v| v.partition.io_bitmap_b |= 0x10, "I/O bitmap B address"),
            (|v| v.vcpu.msr_area |= 8, "VM-exit MSR-store address"),
            (|v| v.host.tr_selector = 0, "host TR selector"),
            (|v| v.host.cr4 &= !(1 << 13), "host CR4"),
            (|v| v.guest.link_pointer = 0, "VMCS link pointer"),
        ];
        for (breaks, field) in broken {
            let mut v = good;
            breaks(&mut v);
            let err = check(&v).unwrap_err();
            assert_eq!(err.field, field, "{err}");
        }
    }

    #[test]
    fn apic_virtualization_rules_are_checked() {
        let good = image(&fixtures::bochs("corei7_skylake_x"), &initial_vcpu_state(0), false);
        assert!(good.controls.paths.apic_virtualization);
        assert_eq!(check(&good), Ok(()));
        type Breakage = (fn(&mut InitialVmcs), &'static str);
        let broken: [Breakage; 5] = [
            (|v| v.vcpu.virtual_apic_page |= 0x80, "virtual-APIC address"),
            (|v| v.partition.apic_access_page = 1 << 50, "APIC-access address"),
            (|v| v.controls.primary &= !PrimaryControls::USE_TPR_SHADOW.bits(), "secondary processor-based controls"),
            // Virtual-interrupt delivery without external-interrupt exiting (which Bochs allows).
            (
                |v| {
                    v.controls.secondary |= SecondaryControls::VIRTUAL_INTERRUPT_DELIVERY.bits();
                    v.controls.pinbased &= !PinbasedControls::EXTERNAL_INTERRUPT_EXITING.bits();
                },
                "secondary processor-based controls",
            ),
            (
                |v| v.controls.secondary |= SecondaryControls::VIRTUALIZE_X2APIC.bits(),
                "secondary processor-based controls",
            ),
        ];
        for (breaks, field) in broken {
            let mut v = good;
            breaks(&mut v);
            let err = check(&v).unwrap_err();
            assert_eq!(err.field, field, "{err}");
        }
    }

    #[test]
    fn bochs_interrupt_workaround_passes_and_sti_blocking_needs_if() {
        let caps = fixtures::bochs("corei7_skylake_x");
        let mut v = image(&caps, &initial_vcpu_state(0), false);
        v.guest.interruptibility = 1;
        assert_eq!(check(&v).unwrap_err().field, "guest interruptibility state");
        let mut v = image(&caps, &initial_vcpu_state(0), true);
        v.guest.interruptibility = 1;
        assert_eq!(check(&v), Ok(()));
    }
}
