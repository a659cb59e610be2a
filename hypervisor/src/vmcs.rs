//! VMCS access: VMREAD/VMWRITE (encodings from the `x86` crate), VMCLEAR/VMPTRLD, INVEPT.
//! A failing VMREAD/VMWRITE means Phalanx used a field the CPU does not have: a bug, reported
//! with the field's encoding.

use x86::bits64::vmx;

pub use x86::vmx::vmcs::{control, guest, ro};

pub fn write(field: u32, value: u64) {
    // SAFETY: a VMCS is current on this CPU (every caller runs after `load`), and the value
    // is what the field's owner computed; a failure is reported, not ignored.
    if let Err(e) = unsafe { vmx::vmwrite(field, value) } {
        panic!("VMWRITE {field:#x} = {value:#x} failed: {e:?} (VM-instruction error {})", instruction_error());
    }
}

pub fn read(field: u32) -> u64 {
    // SAFETY: as in `write`.
    match unsafe { vmx::vmread(field) } {
        Ok(v) => v,
        Err(e) => panic!("VMREAD {field:#x} failed: {e:?}"),
    }
}

/// The VM-instruction error number of the last failed VMX instruction (SDM 30.4).
pub fn instruction_error() -> u64 {
    // SAFETY: reading a read-only field of the current VMCS.
    unsafe { vmx::vmread(ro::VM_INSTRUCTION_ERROR).unwrap_or(0) }
}

/// Makes the VMCS at `phys` current on this CPU (VMCLEAR first when it is new or moved here).
pub fn load(phys: u64, clear_first: bool) {
    // SAFETY: `phys` is a 4 KiB-aligned VMCS region carrying the revision ID, owned by the
    // vCPU being loaded; this CPU is in VMX root operation.
    unsafe {
        if clear_first {
            vmx::vmclear(phys).expect("VMCLEAR of a vCPU's own region");
        }
        vmx::vmptrld(phys).expect("VMPTRLD of a vCPU's own region");
    }
}

/// INVEPT: drops cached translations of one EPT (single-context) after a mapping change, or
/// of every EPT (all-context) on a CPU without the single-context type.
pub fn invept(eptp: u64, single_context: bool) {
    let descriptor: [u64; 2] = [eptp, 0];
    let kind: u64 = if single_context { 1 } else { 2 };
    // SAFETY: a valid EPTP in a 16-byte descriptor; the type is one the CPU supports (the
    // control set requires INVEPT with single- or all-context).
    unsafe {
        core::arch::asm!("invept {}, [{}]", in(reg) kind, in(reg) descriptor.as_ptr(), options(nostack));
    }
}
