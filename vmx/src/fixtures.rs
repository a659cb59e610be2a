//! VMX capability fixtures: the allowed-0/allowed-1 control MSRs, EPT/VPID capabilities and
//! fixed CR bits of the CPUs Phalanx is tested against on the host. The Bochs values are the
//! `vmx_msrs` records of Phalanx boots on each Bochs 2.7 VMX model (`scripts/phalanx boot
//! --cpu-model NAME`); the nested-KVM values are derived from Linux's KVM source.

use crate::caps::VmxCapabilities;
use crate::control_set::{ControlSet, Wants};
use crate::vmcs_image::{HostState, InitialVmcs, PartitionContext, VcpuContext, PAT_POWER_ON};
use firmware::longmode::VcpuState;

/// Every Bochs 2.7 CPU model with VT-x, as its `vmx_msrs` record reports it.
pub const BOCHS_MODELS: [(&str, VmxCapabilities); 7] = [
    (
        "corei7_skylake_x",
        VmxCapabilities {
            basic: 0xd810000000002b,
            pinbased: 0x7f00000016,
            procbased: 0xf7f9fffe04006172,
            procbased2: 0x2177fff00000000,
            exit: 0x7fffff00036dfb,
            entry: 0xffff000011fb,
            misc: 0x600401e0,
            ept_vpid: 0xf0106334141,
            cr0_fixed0: 0x80000021,
            cr0_fixed1: 0xffffffff,
            cr4_fixed0: 0x2000,
            cr4_fixed1: 0x3727ff,
        },
    ),
    (
        "tigerlake",
        VmxCapabilities {
            basic: 0x1d8100000000004,
            pinbased: 0x7f00000016,
            procbased: 0xfff9fffe04006172,
            procbased2: 0x2977fff00000000,
            exit: 0x107fffff00036dfb,
            entry: 0x10ffff000011fb,
            misc: 0x600401e0,
            ept_vpid: 0xf0106b34141,
            cr0_fixed0: 0x80000021,
            cr0_fixed1: 0xffffffff,
            cr4_fixed0: 0x2000,
            cr4_fixed1: 0xf72fff,
        },
    ),
    (
        "corei7_icelake_u",
        VmxCapabilities {
            basic: 0xd8100000000004,
            pinbased: 0x7f00000016,
            procbased: 0xfff9fffe04006172,
            procbased2: 0x2977fff00000000,
            exit: 0x7fffff00036dfb,
            entry: 0xffff000011fb,
            misc: 0x600401e0,
            ept_vpid: 0xf0106334141,
            cr0_fixed0: 0x80000021,
            cr0_fixed1: 0xffffffff,
            cr4_fixed0: 0x2000,
            cr4_fixed1: 0x772fff,
        },
    ),
    (
        "corei3_cnl",
        VmxCapabilities {
            basic: 0xd810000000002b,
            pinbased: 0x7f00000016,
            procbased: 0xf7f9fffe04006172,
            procbased2: 0x2157cff00000000,
            exit: 0x7fffff00036dfb,
            entry: 0xffff000011fb,
            misc: 0x600401e0,
            ept_vpid: 0xf0106334141,
            cr0_fixed0: 0x80000021,
            cr0_fixed1: 0xffffffff,
            cr4_fixed0: 0x2000,
            cr4_fixed1: 0x772fff,
        },
    ),
    (
        "broadwell_ult",
        VmxCapabilities {
            basic: 0xd810000000002b,
            pinbased: 0x7f00000016,
            procbased: 0xf7f9fffe04006172,
            procbased2: 0x57fff00000000,
            exit: 0x7fffff00036dfb,
            entry: 0xffff000011fb,
            misc: 0x200401e0,
            ept_vpid: 0xf0106334141,
            cr0_fixed0: 0x80000021,
            cr0_fixed1: 0xffffffff,
            cr4_fixed0: 0x2000,
            cr4_fixed1: 0x3727ff,
        },
    ),
    (
        "corei7_haswell_4770",
        VmxCapabilities {
            basic: 0xd810000000002b,
            pinbased: 0x7f00000016,
            procbased: 0xf7f9fffe04006172,
            procbased2: 0x47fff00000000,
            exit: 0x7fffff00036dfb,
            entry: 0xffff000011fb,
            misc: 0x200401e0,
            ept_vpid: 0xf0106334141,
            cr0_fixed0: 0x80000021,
            cr0_fixed1: 0xffffffff,
            cr4_fixed0: 0x2000,
            cr4_fixed1: 0x1727ff,
        },
    ),
    (
        "corei7_sandy_bridge_2600k",
        VmxCapabilities {
            basic: 0xd810000000002b,
            pinbased: 0x7f00000016,
            procbased: 0xf7f9fffe04006172,
            procbased2: 0xff00000000,
            exit: 0x7fffff00036dfb,
            entry: 0xffff000011fb,
            misc: 0x401e0,
            ept_vpid: 0xf0106114141,
            cr0_fixed0: 0x80000021,
            cr0_fixed1: 0xffffffff,
            cr4_fixed0: 0x2000,
            cr4_fixed1: 0x627ff,
        },
    ),
];

/// The fixture of Bochs model `name`.
///
/// # Panics
/// If `name` is not a Bochs VMX model.
pub fn bochs(name: &str) -> VmxCapabilities {
    BOCHS_MODELS.iter().find(|(model, _)| *model == name).map(|(_, caps)| *caps).expect("a Bochs VMX model")
}

/// A 64-bit host state like the image's (flat GDT, a TSS, paging with PAE and PGE).
pub fn host_state(caps: &VmxCapabilities) -> HostState {
    HostState {
        cr0: caps.adjust_cr0(0x8000_0033),
        cr3: 0x1000,
        cr4: caps.adjust_cr4(0x6A0),
        code_selector: 0x08,
        data_selector: 0x10,
        tr_selector: 0x18,
        tr_base: 0x20_0000,
        gdtr_base: 0x20_1000,
        idtr_base: 0x20_2000,
        efer: 0xD01,
        pat: PAT_POWER_ON,
        rip: 0x10_1000,
    }
}

/// The physical-address width host tests assume (a Skylake server's).
pub const PHYSICAL_ADDRESS_BITS: u8 = 46;

/// The VMCS a vCPU in `state` gets on a CPU with `caps` (gang policies' control set), with
/// the partition structures at page-aligned addresses as the image allocates them.
///
/// # Panics
/// If `caps` cannot run partitions.
pub fn initial_vmcs(caps: &VmxCapabilities, state: &VcpuState, bochs: bool) -> InitialVmcs {
    let controls = ControlSet::negotiate(caps, Wants::default()).expect("a CPU that runs partitions");
    let eptp = 0x30_0000 | 6 | 3 << 3;
    let partition = PartitionContext {
        eptp,
        io_bitmap_a: 0x31_0000,
        io_bitmap_b: 0x31_1000,
        msr_bitmap: 0x31_2000,
        apic_access_page: 0x31_3000,
    };
    let vcpu = VcpuContext { vpid: 1, msr_area: 0x32_0000, msr_count: 5, virtual_apic_page: 0x32_1000 };
    InitialVmcs::new(&controls, partition, vcpu, host_state(caps), state, PHYSICAL_ADDRESS_BITS, bochs)
}

/// The least a CPU can offer and still run partitions: EPT (4-level, write-back, all-context
/// INVEPT only), external-interrupt exiting with acknowledge, the preemption timer, MSR and
/// I/O bitmaps, and the exit/entry controls for a 64-bit host and guest. No VPID, no
/// unrestricted guest, no PAUSE or PAUSE-loop exiting, no APIC virtualization, no large
/// EPT pages, no A/D bits. Built by hand from the SDM's bit positions; the default1 controls
/// (CR3-load/store exiting, the debug-control load and save) may be 1, as on every CPU.
pub const MINIMAL_VTX: VmxCapabilities = VmxCapabilities {
    basic: 0xd8100000000001,
    pinbased: 0x5f00000016,
    procbased: 0xb601edf604006172,
    procbased2: 0x200000000,
    exit: 0x3fefff00036dfb,
    entry: 0xd3ff000011fb,
    misc: 0x45,
    ept_vpid: 0x4104040,
    cr0_fixed0: 0x80000021,
    cr0_fixed1: 0xffffffff,
    cr4_fixed0: 0x2000,
    cr4_fixed1: 0x3727ff,
};

/// Nested-VMX capability MSRs that Linux KVM (L0) shows to an L1 hypervisor.
///
/// Assumed setup: an Intel Skylake-SP / Xeon Scalable host (not client Skylake,
/// which lacks APICv). kvm_intel uses its defaults: ept=1, vpid=1, eptad=1,
/// unrestricted_guest=1, flexpriority=1, enable_apicv=1, nested=1, pml=1 and
/// preemption_timer=1. The guest is started with QEMU `-cpu host,+vmx`.
///
/// Sources read:
///   * torvalds/linux arch/x86/kvm/vmx/nested.c (v6.8-era file, stored at
///     commit 8ecb10bcbfa3)
///   * the same functions in a 2025 linux-next snapshot (ColinIanKing/linux-next
///     nested.c @16d18d8a97ea, which already uses rdmsrq and
///     vmx_basic_encode_vmcs_info)
///   * arch/x86/kvm/vmx/vmx.c: setup_vmcs_config(), hardware_setup(),
///     vmx_secondary_exec_control(), nested_vmx_cr_fixed1_bits_update()
///   * arch/x86/kvm/vmx/vmx.h: KVM_{REQUIRED,OPTIONAL}_VMX_* lists
///   * arch/x86/include/asm/vmx.h: bit definitions
///
/// How L1 reads these values:
///   * nested_vmx_setup_ctls_msrs() fills vmcs_config.nested.
///   * __vmx_vcpu_reset() copies that into vmx->nested.msrs.
///   * vmx_vcpu_after_set_cpuid() then adjusts a few fields per vCPU (see the
///     procbased2 and cr4_fixed1 notes).
///   * L1's RDMSR goes to vmx_get_vmx_msr(). For each control MSR it returns
///     vmx_control_msr(low, high) = low | (u64)high << 32, where low = allowed-0
///     ("must be 1") and high = allowed-1 ("may be 1").
///   * For TRUE_* the low half is returned unchanged. The non-TRUE MSRs also OR
///     in the *_ALWAYSON_WITHOUT_TRUE_MSR default1 bits.
///
/// QEMU `-cpu host` writes the same values back through KVM_SET_MSRS
/// (make_vmx_msr_value(): must_be_one | (features|default1) << 32). QEMU has a
/// name for every bit set below, so the values survive unchanged.
///
/// Anything not taken directly from code is marked ASSUMPTION / GUESS.
pub const NESTED_KVM_SKYLAKE: VmxCapabilities = VmxCapabilities {
    // nested_vmx_setup_basic():
    //   msrs->basic = vmx_basic_encode_vmcs_info(VMCS12_REVISION, VMCS12_SIZE, X86_MEMTYPE_WB)
    //                 | VMX_BASIC_TRUE_CTLS | (cpu_has_vmx_basic_inout() ? VMX_BASIC_INOUT : 0)
    //                 | (cpu_has_vmx_basic_no_hw_errcode_cc() ? VMX_BASIC_NO_HW_ERROR_CODE_CC : 0)
    //   [30:0] VMCS12_REVISION = 0x11e57ed0 (vmcs12.h). This is KVM's own ID, not the host's.
    //   [44:32] VMCS12_SIZE = 0x1000. [53:50] memtype = 6 (WB).
    //   PRESENT: bit 55 TRUE_CTLS. PRESENT: bit 54 INOUT (Skylake hardware reports it).
    //   ABSENT: bit 48 (32-bit phys-addr limit), bit 49 (dual-monitor/SMM).
    //   ABSENT: bit 56 NO_HW_ERROR_CODE_CC. Only CET-era CPUs report it, not Skylake.
    //     Inference from hardware generation, not from code.
    basic: 0x00d8_1000_11e5_7ed0,
    // nested_vmx_setup_pinbased_ctls():
    //   low  = PIN_BASED_ALWAYSON_WITHOUT_TRUE_MSR (0x16: bits 1,2,4 stay must-be-1 even in TRUE)
    //   high = vmcs_conf->pin_based_exec_ctrl & (EXT_INTR_MASK | NMI_EXITING | VIRTUAL_NMIS
    //          | (enable_apicv ? POSTED_INTR : 0))
    //          | PIN_BASED_ALWAYSON_WITHOUT_TRUE_MSR | PIN_BASED_VMX_PREEMPTION_TIMER
    //   PRESENT: 0 ext-int, 3 NMI, 5 vNMI, 7 posted interrupts (APICv on SKX-SP).
    //   PRESENT: 6 preemption timer. KVM ORs it in unconditionally and emulates it
    //     for L1 with an hrtimer.
    pinbased: 0x0000_00ff_0000_0016, // TRUE_PINBASED_CTLS
    // nested_vmx_setup_cpubased_ctls():
    //   low  = CPU_BASED_ALWAYSON_WITHOUT_TRUE_MSR (0x0401e172) & ~(CR3_LOAD_EXITING | CR3_STORE_EXITING)
    //        = 0x04006172, so bits 1,4,5,6,8,13,14,26 stay must-be-1.
    //   high = vmcs_conf->cpu_based_exec_ctrl & (INTR_WINDOW | NMI_WINDOW | USE_TSC_OFFSETTING | HLT |
    //          INVLPG | MWAIT | CR3_LOAD | CR3_STORE | CR8_LOAD | CR8_STORE | MOV_DR | UNCOND_IO |
    //          USE_IO_BITMAPS | MONITOR_TRAP_FLAG | MONITOR | RDPMC | RDTSC | PAUSE_EXITING |
    //          TPR_SHADOW | ACTIVATE_SECONDARY_CONTROLS)
    //          | CPU_BASED_ALWAYSON_WITHOUT_TRUE_MSR | CPU_BASED_USE_MSR_BITMAPS
    //   vmcs_conf comes from setup_vmcs_config() with KVM_{REQUIRED,OPTIONAL}_VMX_CPU_BASED_VM_EXEC_CONTROL.
    //   Both lists contain all the bits above, including CPU_BASED_PAUSE_EXITING.
    //   PRESENT: 2,3,7,9,10,11,12,15,16,19,20,21,22,23,24,25,27,28,29,31.
    //   PRESENT: 30 PAUSE exiting.
    //   ABSENT: 0 (reserved), 17 tertiary controls (not in the nested mask, and no
    //     Skylake support), 18 (reserved).
    procbased: 0xfff9_fffe_0400_6172, // TRUE_PROCBASED_CTLS
    // nested_vmx_setup_secondary_ctls():
    //   low = 0
    //   high = vmcs_conf->cpu_based_2nd_exec_ctrl & (DESC | ENABLE_RDTSCP | VIRTUALIZE_X2APIC_MODE |
    //          WBINVD_EXITING | APIC_REGISTER_VIRT | VIRTUAL_INTR_DELIVERY | RDRAND_EXITING |
    //          ENABLE_INVPCID | ENABLE_VMFUNC | RDSEED_EXITING | ENABLE_XSAVES | TSC_SCALING |
    //          ENABLE_USR_WAIT_PAUSE)
    //   Then, unconditionally: |= SHADOW_VMCS (emulated).
    //   Then, conditionally on module params:
    //     enable_ept               -> |= ENABLE_EPT
    //     enable_ept_ad_bits       -> |= ENABLE_PML (PML is emulated for L1)
    //     enable_vpid              -> |= ENABLE_VPID
    //     enable_unrestricted_guest -> |= UNRESTRICTED_GUEST
    //     flexpriority_enabled     -> |= VIRTUALIZE_APIC_ACCESSES
    //     enable_sgx               -> |= ENCLS_EXITING
    //   PRESENT: 0 APIC-access, 1 EPT, 2 desc-table, 3 RDTSCP, 4 x2APIC, 5 VPID,
    //     6 WBINVD, 7 UG, 8 APIC-reg-virt, 9 VID, 11 RDRAND, 12 INVPCID, 13 VMFUNC,
    //     14 VMCS shadowing, 16 RDSEED, 17 PML, 20 XSAVES, 25 TSC scaling.
    //   ABSENT: 10 PAUSE-loop exiting. It is not in the nested mask at all.
    //   ABSENT: 15 ENCLS (SKX-SP has no SGX). ABSENT: 18 EPT-#VE.
    //   ABSENT: 19/24 PT (not in the mask). ABSENT: 22 MBEC (not in the mask).
    //   ABSENT: 26 WAITPKG (not on Skylake).
    //   Per-vCPU: vmx_secondary_exec_control() -> vmx_adjust_secondary_exec_control()
    //     rewrites bits 3, 11, 12, 16, 20 and 26 of vmx->nested.msrs from guest CPUID.
    //     With -cpu host, CPUID shows RDTSCP/INVPCID/RDRAND/RDSEED/XSAVES and no
    //     WAITPKG, so the result does not change.
    //   ASSUMPTION: the SKX-SP part supports TSC scaling (bit 25). On a part without
    //     it, use 0x00137bff00000000.
    procbased2: 0x0213_7bff_0000_0000, // PROCBASED_CTLS2
    // nested_vmx_setup_exit_ctls():
    //   low  = VM_EXIT_ALWAYSON_WITHOUT_TRUE_MSR (0x36dff) & ~VM_EXIT_SAVE_DEBUG_CONTROLS
    //   high = vmcs_conf->vmexit_ctrl & (HOST_ADDR_SPACE_SIZE | LOAD_IA32_PAT | SAVE_IA32_PAT | CLEAR_BNDCFGS)
    //          | VM_EXIT_ALWAYSON_WITHOUT_TRUE_MSR | LOAD_IA32_EFER | SAVE_IA32_EFER
    //          | SAVE_VMX_PREEMPTION_TIMER | ACK_INTR_ON_EXIT | LOAD_IA32_PERF_GLOBAL_CTRL
    //   PRESENT: 2 save-debug (free choice), 9 host addr-space size, 12 PERF_GLOBAL_CTRL,
    //     15 ack-intr, 18/19 PAT, 20/21 EFER, 22 save preemption timer.
    //   PRESENT: 23 clear BNDCFGS. ASSUMPTION: the host has MPX, as Skylake does. Without MPX,
    //     or with QEMU `-mpx`, the value is 0x007fffff00036dfb.
    //   ABSENT: 24/25 PT, 28 CET (v6.18+ adds LOAD_CET_STATE only on CET hosts), 31 secondary exit ctls.
    exit: 0x00ff_ffff_0003_6dfb, // TRUE_EXIT_CTLS
    // nested_vmx_setup_entry_ctls():
    //   low  = VM_ENTRY_ALWAYSON_WITHOUT_TRUE_MSR (0x11ff) & ~VM_ENTRY_LOAD_DEBUG_CONTROLS
    //   high = vmcs_conf->vmentry_ctrl & (IA32E_MODE | LOAD_IA32_PAT | LOAD_BNDCFGS)
    //          | VM_ENTRY_ALWAYSON_WITHOUT_TRUE_MSR | LOAD_IA32_EFER | LOAD_IA32_PERF_GLOBAL_CTRL
    //   PRESENT: 2 load-debug (free choice), 9 IA-32e guest, 13 PERF_GLOBAL_CTRL, 14 PAT, 15 EFER.
    //   PRESENT: 16 load BNDCFGS. Same MPX ASSUMPTION as exit: without MPX the value is 0x0000f3ff000011fb.
    //   ABSENT: 10 entry-to-SMM, 11 deactivate dual-monitor, 17/18 PT, 20 CET.
    entry: 0x0001_f3ff_0000_11fb, // TRUE_ENTRY_CTLS
    // nested_vmx_setup_misc_data():
    //   misc_low = ((u32)vmcs_conf->misc & VMX_MISC_SAVE_EFER_LMA)
    //              | VMX_MISC_VMWRITE_SHADOW_RO_FIELDS | VMX_MISC_EMULATED_PREEMPTION_TIMER_RATE (5)
    //              | VMX_MISC_ACTIVITY_HLT | VMX_MISC_ACTIVITY_WAIT_SIPI
    //   misc_high = 0
    //   [4:0] = 5: the emulated timer ticks once every 2^5 TSC cycles.
    //   PRESENT: 5 store LMA (copied from Skylake hardware), 6 HLT, 8 wait-for-SIPI,
    //     29 VMWRITE to exit-info fields.
    //   ABSENT: 7 shutdown, 30 inject len 0, 14 PT-in-VMX, 15 SMM RDMSR, 28 VMXOFF-blocks-SMI.
    //   [24:16] CR3-target count = 0, so L1 must use CR3_TARGET_COUNT = 0.
    //   [27:25] = 0, so up to 512 MSR-list entries. MSEG revision = 0.
    misc: 0x0000_0000_2000_0165,
    // nested_vmx_setup_secondary_ctls(), under `if (enable_ept)`:
    //   ept_caps = (VMX_EPT_PAGE_WALK_4_BIT | PAGE_WALK_5_BIT | VMX_EPTP_WB_BIT | VMX_EPT_INVEPT_BIT
    //               | VMX_EPT_EXECUTE_ONLY_BIT) & hw_ept_caps
    //              | VMX_EPT_EXTENT_GLOBAL_BIT | VMX_EPT_EXTENT_CONTEXT_BIT | VMX_EPT_2MB_PAGE_BIT
    //              | VMX_EPT_1GB_PAGE_BIT
    //              | (enable_ept_ad_bits ? VMX_EPT_AD_BIT : 0)
    //   vpid_caps = VMX_VPID_INVVPID_BIT | VMX_VPID_EXTENT_SUPPORTED_MASK
    //     (the mask is individual-addr | single | all | single-non-global, which
    //     KVM advertises for Hyper-V).
    //   vmx_get_vmx_msr() returns ept_caps | (u64)vpid_caps << 32.
    //   PRESENT: 0 exec-only, 6 4-level walk, 14 WB, 16 2M, 17 1G, 20 INVEPT,
    //     21 A/D, 25 single-ctx INVEPT, 26 all-ctx INVEPT.
    //   PRESENT: 32 INVVPID, 40 indiv-addr, 41 single-ctx, 42 all-ctx,
    //     43 single-ctx-retaining-globals.
    //   ABSENT: 7 5-level walk (no 5-level EPT on Skylake). ABSENT: 8 UC
    //     (never advertised by KVM).
    //   ABSENT: 22 advanced EPT-violation exit info. ABSENT: 24 INVEPT
    //     individual-address (never advertised by KVM).
    //   A real KVM nested dump confirms 0x00000f0106334041.
    ept_vpid: 0x0000_0f01_0633_4041, // IA32_VMX_EPT_VPID_CAP
    // nested_vmx_setup_cr_fixed(): cr0_fixed0 = VMXON_CR0_ALWAYSON = X86_CR0_PE | X86_CR0_PG | X86_CR0_NE.
    //   Unrestricted guest lets L2 clear PE/PG only when L1 enables the UG control; the MSR is still 0x80000021.
    cr0_fixed0: 0x0000_0000_8000_0021,
    // nested_vmx_setup_cr_fixed() first does rdmsrq(MSR_IA32_VMX_CR0_FIXED1).
    //   Per vCPU, vmx_vcpu_after_set_cpuid() -> nested_vmx_cr_fixed1_bits_update()
    //   overwrites it with 0xffffffff, and that is the value L1 reads.
    cr0_fixed1: 0x0000_0000_ffff_ffff,
    // nested_vmx_setup_cr_fixed(): cr4_fixed0 = VMXON_CR4_ALWAYSON = X86_CR4_VMXE (bit 13).
    cr4_fixed0: 0x0000_0000_0000_2000,
    // nested_vmx_cr_fixed1_bits_update() (vmx.c, per vCPU) builds cr4_fixed1 from guest CPUID.
    //   It starts from X86_CR4_PCE and adds a bit for each feature present in CPUID:
    //   VME/PVI, TSD, DE, PSE, PAE, MCE, PGE, OSFXSR, OSXMMEXCPT, VMXE, PCIDE, OSXSAVE,
    //   FSGSBASE, SMEP, SMAP.
    //   PRESENT: PKE (bit 22). ASSUMPTION: SKX-SP with a host kernel that sets OSPKE,
    //     so KVM and QEMU expose PKU.
    //   PRESENT: UMIP (bit 11). KVM emulates UMIP through descriptor-table exiting
    //     (vmx_umip_emulated()), so `-cpu host` exposes it.
    //   ABSENT: 12 LA57, 14 SMXE (KVM never exposes SMX), 23 CET, 28 LAM.
    //   Without PKU (client Skylake) the value is 0x372fff.
    cr4_fixed1: 0x0000_0000_0077_2fff,
};
