//! EPT tables for memory delegation, and host-physical range bookkeeping.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

pub mod phys;
