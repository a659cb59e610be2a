//! Entering VMX root operation on a pCPU: detect VT-x, make IA32_FEATURE_CONTROL allow it,
//! fix CR0/CR4 to what VMX requires, VMXON.

use core::sync::atomic::Ordering;
use vmx::VmxCapabilities;
use x86_64::registers::model_specific::Msr;

const IA32_FEATURE_CONTROL: u32 = 0x3A;
const FEATURE_CONTROL_LOCKED: u64 = 1 << 0;
const FEATURE_CONTROL_VMX_OUTSIDE_SMX: u64 = 1 << 2;
const CR4_VMXE: u64 = 1 << 13;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmxStatus {
    NotTried = 0,
    Root = 1,
    NoVmx = 2,
    DisabledByFirmware = 3,
    VmxonFailed = 4,
}

impl VmxStatus {
    pub fn describe(self) -> &'static str {
        match self {
            VmxStatus::NotTried => "not tried",
            VmxStatus::Root => "VMX root",
            VmxStatus::NoVmx => "the CPU does not offer VT-x (CPUID.1:ECX.VMX = 0)",
            VmxStatus::DisabledByFirmware => {
                "VT-x is disabled by the firmware (IA32_FEATURE_CONTROL locked without VMX)"
            }
            VmxStatus::VmxonFailed => "VMXON failed",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => VmxStatus::Root,
            2 => VmxStatus::NoVmx,
            3 => VmxStatus::DisabledByFirmware,
            4 => VmxStatus::VmxonFailed,
            _ => VmxStatus::NotTried,
        }
    }
}

pub fn status(cpu: usize) -> VmxStatus {
    VmxStatus::from_u8(crate::percpu::of(cpu).vmx_status.load(Ordering::Acquire))
}

pub fn capabilities(cpu: usize) -> Option<VmxCapabilities> {
    *crate::percpu::of(cpu).vmx_caps.lock()
}

pub fn cpu_has_vmx() -> bool {
    raw_cpuid::CpuId::new().get_feature_info().is_some_and(|f| f.has_vmx())
}

fn read_msr(index: u32) -> u64 {
    // SAFETY: only called for VMX capability MSRs after CPUID reported VMX.
    unsafe { Msr::new(index).read() }
}

/// Enters VMX root on the executing CPU (run on every pCPU through `smp::run_on_all`).
pub fn enable_on_this_cpu(cpu: usize) {
    let status = try_enable(cpu);
    crate::percpu::of(cpu).vmx_status.store(status as u8, Ordering::Release);
}

fn try_enable(cpu: usize) -> VmxStatus {
    if !cpu_has_vmx() {
        return VmxStatus::NoVmx;
    }
    let mut feature_control = Msr::new(IA32_FEATURE_CONTROL);
    // SAFETY: IA32_FEATURE_CONTROL exists when CPUID reports VMX.
    let value = unsafe { feature_control.read() };
    if value & FEATURE_CONTROL_LOCKED == 0 {
        // SAFETY: unlocked: we may enable VMX outside SMX and lock it, as firmware would.
        unsafe { feature_control.write(value | FEATURE_CONTROL_LOCKED | FEATURE_CONTROL_VMX_OUTSIDE_SMX) };
    } else if value & FEATURE_CONTROL_VMX_OUTSIDE_SMX == 0 {
        return VmxStatus::DisabledByFirmware;
    }
    let caps = VmxCapabilities::read(read_msr);
    *crate::percpu::of(cpu).vmx_caps.lock() = Some(caps);

    let region = crate::memory::alloc_zeroed_pages(1);
    region[..4].copy_from_slice(&caps.revision_id().to_le_bytes());
    // SAFETY: CR0/CR4 adjusted exactly as the VMX fixed-bit MSRs require; paging and
    // protection stay on (they are fixed-1).
    unsafe {
        let cr0 = x86_64::registers::control::Cr0::read_raw();
        x86_64::registers::control::Cr0::write_raw(caps.adjust_cr0(cr0));
        let cr4 = x86_64::registers::control::Cr4::read_raw();
        x86_64::registers::control::Cr4::write_raw(caps.adjust_cr4(cr4 | CR4_VMXE));
    }
    // SAFETY: a 4 KiB-aligned, zeroed region carrying the VMCS revision, owned by this CPU
    // forever; identity mapping makes its address physical.
    match unsafe { x86::bits64::vmx::vmxon(region.as_ptr() as u64) } {
        Ok(()) => VmxStatus::Root,
        Err(_) => VmxStatus::VmxonFailed,
    }
}
