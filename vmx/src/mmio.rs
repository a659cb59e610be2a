//! Emulating a guest's access to an emulated device page (the xAPIC): find the instruction
//! (a walk of the guest's own page tables from its CR3), decode it with `iced-x86`, and say
//! which register or immediate moves how many bytes in which direction.

use iced_x86::{Code, Decoder, DecoderOptions, Instruction, OpKind, Register};

/// A general-purpose register by its index in the hypervisor's saved-register order
/// (rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8..r15: the x86 encoding order).
pub type GprIndex = u8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmioOperation {
    /// Load `size` bytes into a register (zero-extended as the instruction defines).
    Read { register: GprIndex },
    /// Store `size` bytes of a register.
    Write { register: GprIndex },
    /// Store an immediate.
    WriteImmediate { value: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioAccess {
    pub operation: MmioOperation,
    /// Access width in bytes.
    pub size: u8,
    /// Instruction length, to advance RIP.
    pub length: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmioError {
    /// The bytes are not a valid instruction.
    Undecodable,
    /// A valid instruction Phalanx does not emulate on device memory (named by its mnemonic
    /// code, for the fault record).
    Unsupported(Code),
}

fn gpr_index(register: Register) -> Option<GprIndex> {
    let full = register.full_register();
    let index = (full as u32).checked_sub(Register::RAX as u32)?;
    (index < 16).then_some(index as u8)
}

/// Decodes the instruction at the start of `bytes` (64-bit mode) as an MMIO access.
pub fn decode(bytes: &[u8], rip: u64) -> Result<MmioAccess, MmioError> {
    let mut decoder = Decoder::with_ip(64, bytes, rip, DecoderOptions::NONE);
    let instruction: Instruction = decoder.decode();
    if instruction.is_invalid() {
        return Err(MmioError::Undecodable);
    }
    let length = instruction.len() as u8;
    let size = instruction.memory_size().size() as u8;
    let unsupported = || MmioError::Unsupported(instruction.code());
    let memory_operand =
        (0..instruction.op_count()).find(|&i| instruction.op_kind(i) == OpKind::Memory).ok_or_else(unsupported)?;
    let operation = match (instruction.mnemonic(), memory_operand) {
        (iced_x86::Mnemonic::Mov, 0) => match instruction.op_kind(1) {
            OpKind::Register => {
                MmioOperation::Write { register: gpr_index(instruction.op1_register()).ok_or_else(unsupported)? }
            }
            OpKind::Immediate8 | OpKind::Immediate16 | OpKind::Immediate32 | OpKind::Immediate32to64 => {
                MmioOperation::WriteImmediate { value: instruction.immediate(1) }
            }
            _ => return Err(unsupported()),
        },
        (iced_x86::Mnemonic::Mov | iced_x86::Mnemonic::Movzx, 1) => {
            MmioOperation::Read { register: gpr_index(instruction.op0_register()).ok_or_else(unsupported)? }
        }
        // `xchg [mem], reg` stores reg (Linux uses it for xAPIC writes on some CPUs); the old
        // value it would load is not meaningful for the write-only registers it is used on.
        (iced_x86::Mnemonic::Xchg, _) => {
            let other = 1 - memory_operand;
            MmioOperation::Write { register: gpr_index(instruction.op_register(other)).ok_or_else(unsupported)? }
        }
        _ => return Err(unsupported()),
    };
    if !matches!(size, 1 | 2 | 4 | 8) {
        return Err(unsupported());
    }
    Ok(MmioAccess { operation, size, length })
}

/// Translates a guest-linear address through the guest's 4-level page tables (CR3 as the
/// guest set it; 1 GiB, 2 MiB and 4 KiB pages). `read` returns the 8 bytes at a guest-physical
/// address, or `None` outside the partition's memory.
pub fn translate(cr3: u64, linear: u64, read: impl Fn(u64) -> Option<u64>) -> Option<u64> {
    const PRESENT: u64 = 1;
    const LARGE: u64 = 1 << 7;
    const ADDRESS: u64 = 0x000F_FFFF_FFFF_F000;
    let mut table = cr3 & ADDRESS;
    for level in (0..4).rev() {
        let shift = 12 + 9 * level;
        let index = (linear >> shift) & 0x1FF;
        let entry = read(table + index * 8)?;
        if entry & PRESENT == 0 {
            return None;
        }
        if level == 0 || (level <= 2 && entry & LARGE != 0) {
            let page_mask = (1u64 << shift) - 1;
            return Some((entry & ADDRESS & !page_mask) | (linear & page_mask));
        }
        table = entry & ADDRESS;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux_xapic_accessors_decode() {
        // mov eax, [rax]   (native_apic_mem_read)
        let a = decode(&[0x8B, 0x00], 0).unwrap();
        assert_eq!(a, MmioAccess { operation: MmioOperation::Read { register: 0 }, size: 4, length: 2 });
        // mov [rdi+0xb0], esi  (EOI write with a displacement)
        let a = decode(&[0x89, 0xB7, 0xB0, 0x00, 0x00, 0x00], 0).unwrap();
        assert_eq!(a, MmioAccess { operation: MmioOperation::Write { register: 6 }, size: 4, length: 6 });
        // mov dword [rax+0xb0], 0
        let a = decode(&[0xC7, 0x80, 0xB0, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], 0).unwrap();
        assert_eq!(a.operation, MmioOperation::WriteImmediate { value: 0 });
        assert_eq!((a.size, a.length), (4, 10));
        // xchg [rdx], eax
        let a = decode(&[0x87, 0x02], 0).unwrap();
        assert_eq!(a.operation, MmioOperation::Write { register: 0 });
        // mov r9d, [r8+0x20]
        let a = decode(&[0x45, 0x8B, 0x48, 0x20], 0).unwrap();
        assert_eq!(a.operation, MmioOperation::Read { register: 9 });
    }

    #[test]
    fn other_instructions_are_refused_by_name() {
        // add [rax], eax
        assert!(matches!(decode(&[0x01, 0x00], 0), Err(MmioError::Unsupported(_))));
        assert_eq!(decode(&[0x0F, 0xFF], 0), Err(MmioError::Undecodable));
    }

    #[test]
    fn page_walk_handles_4k_2m_and_1g_pages() {
        use std::collections::HashMap;
        let mut mem: HashMap<u64, u64> = HashMap::new();
        // linear 0xffff_ffff_8100_0123 -> PML4[511] -> PDPT[510] -> PD[8] (2 MiB page at 16 MiB)
        mem.insert(0x1000 + 511 * 8, 0x2000 | 1);
        mem.insert(0x2000 + 510 * 8, 0x3000 | 1);
        mem.insert(0x3000 + 8 * 8, 0x100_0000 | 1 | (1 << 7));
        let read = |a: u64| mem.get(&a).copied().or(Some(0));
        assert_eq!(translate(0x1000, 0xFFFF_FFFF_8100_0123, read), Some(0x100_0123));
        // A 1 GiB page and a 4 KiB page.
        mem.insert(0x1000, 0x4000 | 1);
        mem.insert(0x4000 + 8, 0x4000_0000 | 1 | (1 << 7));
        mem.insert(0x4000, 0x5000 | 1);
        mem.insert(0x5000, 0x6000 | 1);
        mem.insert(0x6000 + 3 * 8, 0xABC_D000 | 1);
        let read = |a: u64| mem.get(&a).copied().or(Some(0));
        assert_eq!(translate(0x1000, 0x4123_4567, read), Some(0x4123_4567));
        assert_eq!(translate(0x1000, 0x3010, read), Some(0xABC_D010));
        assert_eq!(translate(0x1000, 0x7000, read), None, "not present");
    }
}
