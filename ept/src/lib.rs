//! EPT tables for memory delegation, and host-physical range bookkeeping.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod phys;
pub mod tables;
pub mod violation;

pub use tables::{Access, Ept, EptError, FrameAllocator, MemoryType, PageSize, PageSizes, PhysMemory, Translation};
pub use violation::EptViolation;
