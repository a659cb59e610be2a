//! VMX mechanics. This crate holds the pure parts, host-tested against the capability values
//! Bochs' CPU models and nested KVM report: capability decoding, the control set negotiated
//! against the allowed-0/allowed-1 MSRs (with a fallback for each optional feature), the
//! initial VMCS contents and the SDM's VM-entry checks on them, exit decoding, and the device
//! models partitions see. The instructions themselves are issued by the hypervisor.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

pub mod caps;
pub mod control_set;
pub mod controls;
pub mod cpuid;
pub mod devices;
pub mod emulate;
pub mod entry_check;
pub mod exit;
pub mod fixtures;
pub mod mmio;
pub mod msr;
pub mod pci;
pub mod platform;
pub mod spin_sample;
pub mod vcpu_access;
pub mod vioapic;
pub mod vlapic;
pub mod vmcs_image;
pub mod vuart;

#[cfg(test)]
mod fuzz_tests;

pub use caps::{Features, VmxCapabilities};
pub use control_set::{ControlSet, Paths, SpinExits, Unsupported, Wants};
pub use controls::{negotiate, ControlError, ControlKind};
pub use exit::{ExitReason, Handler, IoAccess};
