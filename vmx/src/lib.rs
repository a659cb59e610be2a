//! VMX mechanics. This crate holds the pure parts (capability decoding, control-bit
//! negotiation against the allowed-0/allowed-1 MSRs), host-tested against the values real
//! CPUs and Bochs report; the instructions themselves are issued by the hypervisor.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

pub mod caps;
pub mod controls;
pub mod cpuid;
pub mod exit;
pub mod mmio;
pub mod msr;
pub mod vioapic;
pub mod vlapic;
pub mod vuart;

pub use caps::{Features, VmxCapabilities};
pub use controls::{negotiate, ControlError, ControlKind};
pub use exit::{ExitReason, Handler, IoAccess};
