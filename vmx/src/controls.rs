//! Control-bit negotiation (SDM Vol. 3 A.3-A.5): each VMX control MSR reports in its low
//! 32 bits the controls that must be 1 (allowed-0 settings) and in its high 32 bits the
//! controls that may be 1 (allowed-1 settings).

use core::fmt;

/// Which control field a negotiation is for (named in errors).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlKind {
    PinBased,
    PrimaryProcessorBased,
    SecondaryProcessorBased,
    VmExit,
    VmEntry,
}

impl ControlKind {
    pub fn name(self) -> &'static str {
        match self {
            ControlKind::PinBased => "pin-based VM-execution controls",
            ControlKind::PrimaryProcessorBased => "primary processor-based VM-execution controls",
            ControlKind::SecondaryProcessorBased => "secondary processor-based VM-execution controls",
            ControlKind::VmExit => "VM-exit controls",
            ControlKind::VmEntry => "VM-entry controls",
        }
    }
}

/// Required controls the CPU cannot set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlError {
    pub kind: ControlKind,
    /// Bits that were required but are not allowed to be 1.
    pub unsupported: u32,
}

impl fmt::Display for ControlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the CPU cannot enable required {} (bits {:#010x})", self.kind.name(), self.unsupported)
    }
}

/// The value to write into a control field: every must-be-1 bit, every `required` bit
/// (error if one cannot be set), and each `optional` bit the CPU allows.
pub fn negotiate(kind: ControlKind, capability_msr: u64, required: u32, optional: u32) -> Result<u32, ControlError> {
    let must_be_one = capability_msr as u32;
    let may_be_one = (capability_msr >> 32) as u32;
    let unsupported = required & !may_be_one;
    if unsupported != 0 {
        return Err(ControlError { kind, unsupported });
    }
    Ok(must_be_one | required | (optional & may_be_one))
}

#[cfg(test)]
mod tests {
    use super::*;
    use x86::vmx::vmcs::control::PinbasedControls;

    #[test]
    fn must_be_one_bits_are_always_set() {
        // allowed-0 says bits 1,2,4 must be 1 (the pin-based default1 class).
        let msr = (0x0000_007Fu64 << 32) | 0x16;
        let v = negotiate(ControlKind::PinBased, msr, 0, 0).unwrap();
        assert_eq!(v, 0x16);
    }

    #[test]
    fn optional_bits_are_taken_only_when_allowed() {
        let msr = (0x0000_0049u64 << 32) | 0x0;
        let v = negotiate(ControlKind::PinBased, msr, 0x1, 0x40 | 0x80).unwrap();
        assert_eq!(v, 0x41, "preemption timer (0x40) taken, posted interrupts (0x80) refused");
    }

    #[test]
    fn a_required_control_the_cpu_lacks_is_an_error_naming_it() {
        let msr = (0x0000_0049u64 << 32) | 0x0;
        let err = negotiate(ControlKind::PinBased, msr, PinbasedControls::POSTED_INTERRUPTS.bits(), 0).unwrap_err();
        assert_eq!(err.unsupported, PinbasedControls::POSTED_INTERRUPTS.bits());
        let text = err.to_string();
        assert!(text.contains("pin-based"), "{text}");
    }
}
