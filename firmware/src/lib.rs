//! What a machine's firmware describes and what a guest finds at power-on: ACPI tables
//! (parsed for the host platform, built for each partition), and later the Linux boot
//! protocol and initial register state.
#![cfg_attr(not(test), no_std)]
// Unsafe is needed only in tests, to view built table bytes as the `acpi` crate's types.
#![cfg_attr(not(test), forbid(unsafe_code))]

extern crate alloc;

pub mod acpi;
pub mod aml;
pub mod linux;
pub mod longmode;
pub mod madt;
pub mod mptable;
pub mod payload;
pub mod platform;
