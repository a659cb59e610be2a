//! One vCPU's architectural state as exit handlers see it: general registers, RIP, the
//! VMCS-held fields, exception injection and guest-physical memory. The image implements it
//! over the current VMCS; host tests use [`MockVcpu`]. Exit handlers written against this trait
//! need no hardware, so they live in this crate and are tested here (the way cloud-hypervisor
//! tests its instruction emulator against a mock vCPU).

extern crate alloc;

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

/// General-register numbers in the x86 encoding (`vmx::mmio::GprIndex`).
pub mod gpr {
    pub const RAX: u8 = 0;
    pub const RCX: u8 = 1;
    pub const RDX: u8 = 2;
    pub const RBX: u8 = 3;
    pub const RSP: u8 = 4;
    pub const RSI: u8 = 6;
    pub const RDI: u8 = 7;
}

pub trait VcpuAccess {
    /// A general register by its x86 encoding number (0 = RAX ... 15 = R15).
    fn gpr(&self, index: u8) -> u64;
    /// Writes a register as a 64-bit mov does (the caller merges narrower values).
    fn set_gpr(&mut self, index: u8, value: u64);
    fn rip(&self) -> u64;
    fn set_rip(&mut self, rip: u64);
    /// The length of the instruction that exited (instruction exits only).
    fn instruction_length(&self) -> u64;
    /// A VMCS field the guest's state lives in (EFER, PAT, CR3, segment bases, ...).
    fn read_field(&self, field: u32) -> u64;
    fn write_field(&mut self, field: u32, value: u64);
    /// A hardware exception delivered at the next entry.
    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>);
    /// Guest-physical memory into `out`; `None` (nothing read) outside the partition.
    fn read_physical(&self, gpa: u64, out: &mut [u8]) -> Option<()>;
    /// `bytes` into guest-physical memory; `None` (nothing written) outside the partition.
    fn write_physical(&mut self, gpa: u64, bytes: &[u8]) -> Option<()>;

    /// Advances RIP past the instruction that exited.
    fn skip_instruction(&mut self) {
        let rip = self.rip() + self.instruction_length();
        self.set_rip(rip);
    }

    /// Eight bytes of guest-physical memory (page-table walks).
    fn read_physical_u64(&self, gpa: u64) -> Option<u64> {
        let mut bytes = [0u8; 8];
        self.read_physical(gpa, &mut bytes)?;
        Some(u64::from_le_bytes(bytes))
    }
}

/// A vCPU made of plain fields, for host tests: registers, a VMCS as a map of fields, and
/// guest memory as a byte vector from GPA 0.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MockVcpu {
    pub gprs: [u64; 16],
    pub rip: u64,
    pub instruction_length: u64,
    pub fields: BTreeMap<u32, u64>,
    /// Every exception injected, in order.
    pub injected: Vec<(u8, Option<u32>)>,
    pub memory: Vec<u8>,
}

impl MockVcpu {
    /// A vCPU with `memory_size` bytes of zeroed guest memory.
    pub fn with_memory(memory_size: usize) -> MockVcpu {
        MockVcpu { memory: alloc::vec![0; memory_size], ..MockVcpu::default() }
    }

    /// Test set-up: `bytes` at `gpa` (panics outside the memory).
    pub fn poke(&mut self, gpa: u64, bytes: &[u8]) {
        self.memory[gpa as usize..gpa as usize + bytes.len()].copy_from_slice(bytes);
    }

    /// Identity page tables for the first 1 GiB (2 MiB pages) at `at` (3 pages), with CR3
    /// pointing at them: what a 64-bit guest's device access walks through.
    pub fn identity_paging(&mut self, at: u64) {
        const PRESENT_WRITABLE: u64 = 0b11;
        const LARGE: u64 = 1 << 7;
        self.poke(at, &((at + 0x1000) | PRESENT_WRITABLE).to_le_bytes());
        self.poke(at + 0x1000, &((at + 0x2000) | PRESENT_WRITABLE).to_le_bytes());
        for i in 0..512u64 {
            self.poke(at + 0x2000 + i * 8, &((i << 21) | PRESENT_WRITABLE | LARGE).to_le_bytes());
        }
        self.fields.insert(x86::vmx::vmcs::guest::CR3, at);
    }
}

impl VcpuAccess for MockVcpu {
    fn gpr(&self, index: u8) -> u64 {
        self.gprs[index as usize & 15]
    }

    fn set_gpr(&mut self, index: u8, value: u64) {
        self.gprs[index as usize & 15] = value;
    }

    fn rip(&self) -> u64 {
        self.rip
    }

    fn set_rip(&mut self, rip: u64) {
        self.rip = rip;
    }

    fn instruction_length(&self) -> u64 {
        self.instruction_length
    }

    fn read_field(&self, field: u32) -> u64 {
        self.fields.get(&field).copied().unwrap_or(0)
    }

    fn write_field(&mut self, field: u32, value: u64) {
        self.fields.insert(field, value);
    }

    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) {
        self.injected.push((vector, error_code));
    }

    fn read_physical(&self, gpa: u64, out: &mut [u8]) -> Option<()> {
        let end = gpa.checked_add(out.len() as u64)?;
        out.copy_from_slice(self.memory.get(gpa as usize..end as usize)?);
        Some(())
    }

    fn write_physical(&mut self, gpa: u64, bytes: &[u8]) -> Option<()> {
        let end = gpa.checked_add(bytes.len() as u64)?;
        self.memory.get_mut(gpa as usize..end as usize)?.copy_from_slice(bytes);
        Some(())
    }
}
