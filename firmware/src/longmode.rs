//! Everything a bare-metal 64-bit guest (guests/testguest) finds when it is entered directly in
//! long mode: its image, a boot info page, its command line, a zeroed stats area, identity-mapping
//! page tables and a GDT in guest memory, and the register state of each vCPU.
//!
//! Guest-physical layout (all below the image at 1 MiB):
//!
//! | GPA                | what                                                        |
//! |--------------------|-------------------------------------------------------------|
//! | 0x1000             | boot info ([`BootInfo`], 48 bytes)                          |
//! | 0x2000             | command line (ASCII, NUL-terminated, at most 4095 bytes)    |
//! | 0x3000             | stats: one 64-byte record per vCPU, written by the guest    |
//! | 0x10000            | PML4, then PDPT (0x11000), PD (0x12000)                     |
//! | 0x13000            | GDT: null, code64 0x08, data 0x10, busy TSS 0x18 (16 bytes) |
//! | 0x14000            | TSS (104 zero bytes; never used, VM entry needs a valid TR) |
//! | 0x20000..0x100000  | stacks, 16 KiB per vCPU growing down from 1 MiB             |
//! | 0x100000           | the flat image; its first byte is the entry point           |
//!
//! The page tables identity-map the whole first 1 GiB with 2 MiB pages, also beyond the
//! partition's memory, so that a guest access past its memory reaches EPT and is reported as an
//! EPT violation rather than dying of a guest page fault.

use core::fmt;

pub const GUEST_IMAGE_GPA: u64 = 0x10_0000;
pub const BOOT_INFO_GPA: u64 = 0x1000;
pub const CMDLINE_GPA: u64 = 0x2000;
/// The command line occupies one page, its NUL terminator included.
pub const CMDLINE_MAX_LEN: usize = 0x1000 - 1;
pub const STATS_GPA: u64 = 0x3000;
pub const STATS_RECORD_SIZE: u64 = 64;
pub const PAGE_TABLES_GPA: u64 = 0x1_0000;
pub const PML4_GPA: u64 = PAGE_TABLES_GPA;
pub const PDPT_GPA: u64 = PAGE_TABLES_GPA + 0x1000;
pub const PD_GPA: u64 = PAGE_TABLES_GPA + 0x2000;
pub const GDT_GPA: u64 = 0x1_3000;
pub const TSS_GPA: u64 = 0x1_4000;
/// A 64-bit TSS without an I/O permission bitmap.
pub const TSS_SIZE: u64 = 0x68;
pub const STACKS_TOP_GPA: u64 = 0x10_0000;
/// Lowest byte the stacks may use; everything below it is the fixed layout above.
pub const STACKS_BOTTOM_GPA: u64 = 0x2_0000;
pub const STACK_SIZE: u64 = 0x4000;
/// As many vCPUs as there are stacks between [`STACKS_BOTTOM_GPA`] and [`STACKS_TOP_GPA`].
pub const MAX_VCPUS: u32 = ((STACKS_TOP_GPA - STACKS_BOTTOM_GPA) / STACK_SIZE) as u32;
/// Reach of the guest's identity map.
pub const IDENTITY_MAP_SIZE: u64 = 1 << 30;
const LARGE_PAGE_SIZE: u64 = 2 << 20;

/// "PHALHX" in little-endian byte order.
pub const BOOT_INFO_MAGIC: u64 = 0x5848_4c41_4850;
pub const BOOT_INFO_SIZE: usize = 48;

pub const CODE_SELECTOR: u16 = 0x08;
pub const DATA_SELECTOR: u16 = 0x10;
pub const TSS_SELECTOR: u16 = 0x18;
/// Null, code, data, and the 16-byte TSS descriptor.
pub const GDT_SIZE: usize = 5 * 8;

// The stats of every vCPU must end before the page tables begin.
const _: () = assert!(STATS_GPA + MAX_VCPUS as u64 * STATS_RECORD_SIZE <= PAGE_TABLES_GPA);
const _: () = assert!(GDT_GPA + GDT_SIZE as u64 <= TSS_GPA && TSS_GPA + TSS_SIZE <= STACKS_BOTTOM_GPA);

pub const CR0_PE: u64 = 1 << 0;
pub const CR0_MP: u64 = 1 << 1;
pub const CR0_ET: u64 = 1 << 4;
pub const CR0_NE: u64 = 1 << 5;
pub const CR0_WP: u64 = 1 << 16;
pub const CR0_NW: u64 = 1 << 29;
pub const CR0_CD: u64 = 1 << 30;
pub const CR0_PG: u64 = 1 << 31;
pub const CR4_PAE: u64 = 1 << 5;
pub const CR4_OSFXSR: u64 = 1 << 9;
pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
pub const EFER_SCE: u64 = 1 << 0;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;
pub const EFER_NXE: u64 = 1 << 11;
pub const RFLAGS_FIXED: u64 = 1 << 1;

/// VMX access rights (SDM 24.4.1): type 3:0, S 4, DPL 6:5, P 7, AVL 12, L 13, D/B 14, G 15,
/// unusable 16. The low byte and bits 15:12 are a GDT descriptor's access byte and flags.
pub const AR_CODE64: u32 = 0xA09B;
pub const AR_DATA: u32 = 0xC093;
pub const AR_TSS64_BUSY: u32 = 0x008B;
pub const AR_UNUSABLE: u32 = 1 << 16;

const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_LARGE: u64 = 1 << 7;

/// Guest-physical memory as the loader sees it: a range starting at GPA 0.
pub trait GuestMemory {
    fn write(&mut self, gpa: u64, bytes: &[u8]) -> Result<(), GuestMemoryError>;
    /// Bytes of guest-physical memory, from GPA 0.
    fn size(&self) -> u64;
}

/// A write that does not fall inside guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestMemoryError {
    pub gpa: u64,
    pub len: u64,
    pub size: u64,
}

impl fmt::Display for GuestMemoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "a write of {} bytes at GPA {:#x} ends beyond guest memory of {:#x} bytes",
            self.len, self.gpa, self.size
        )
    }
}

#[derive(Debug, Clone, Copy)]
pub struct BootParams<'a> {
    /// The flat image, entered at its first byte.
    pub image: &'a [u8],
    pub cmdline: &'a str,
    pub vcpus: u32,
    pub tsc_hz: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadError {
    EmptyImage,
    NoVcpus,
    TooManyVcpus {
        vcpus: u32,
        max: u32,
    },
    CmdlineTooLong {
        len: usize,
        max: usize,
    },
    /// The command line must be printable ASCII (the guest has no notion of anything else).
    CmdlineNotAscii {
        offset: usize,
    },
    /// The image, placed at [`GUEST_IMAGE_GPA`], would end at `needed`.
    MemoryTooSmall {
        size: u64,
        needed: u64,
        image_len: usize,
    },
    Memory(GuestMemoryError),
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::EmptyImage => write!(f, "the guest image is empty"),
            LoadError::NoVcpus => write!(f, "the guest needs at least one vCPU"),
            LoadError::TooManyVcpus { vcpus, max } => {
                write!(f, "{vcpus} vCPUs requested, the long-mode guest layout has stacks for at most {max}")
            }
            LoadError::CmdlineTooLong { len, max } => {
                write!(f, "command line of {len} bytes is longer than the {max} bytes at GPA {CMDLINE_GPA:#x}")
            }
            LoadError::CmdlineNotAscii { offset } => {
                write!(f, "command line byte {offset} is not printable ASCII")
            }
            LoadError::MemoryTooSmall { size, needed, image_len } => write!(
                f,
                "guest memory of {size:#x} bytes is too small: the {image_len}-byte image at GPA \
                 {GUEST_IMAGE_GPA:#x} needs {needed:#x} bytes"
            ),
            LoadError::Memory(e) => write!(f, "{e}"),
        }
    }
}

impl From<GuestMemoryError> for LoadError {
    fn from(e: GuestMemoryError) -> Self {
        LoadError::Memory(e)
    }
}

/// The boot info page as the guest reads it (`#[repr(C)]` layout, little endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootInfo {
    pub magic: u64,
    pub vcpus: u32,
    pub cmdline_len: u32,
    pub cmdline_gpa: u64,
    pub tsc_hz: u64,
    pub stats_gpa: u64,
    pub memory_size: u64,
}

impl BootInfo {
    pub fn to_bytes(&self) -> [u8; BOOT_INFO_SIZE] {
        let mut b = [0u8; BOOT_INFO_SIZE];
        b[0..8].copy_from_slice(&self.magic.to_le_bytes());
        b[8..12].copy_from_slice(&self.vcpus.to_le_bytes());
        b[12..16].copy_from_slice(&self.cmdline_len.to_le_bytes());
        b[16..24].copy_from_slice(&self.cmdline_gpa.to_le_bytes());
        b[24..32].copy_from_slice(&self.tsc_hz.to_le_bytes());
        b[32..40].copy_from_slice(&self.stats_gpa.to_le_bytes());
        b[40..48].copy_from_slice(&self.memory_size.to_le_bytes());
        b
    }

    pub fn from_bytes(b: &[u8; BOOT_INFO_SIZE]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        BootInfo {
            magic: u64_at(0),
            vcpus: u32_at(8),
            cmdline_len: u32_at(12),
            cmdline_gpa: u64_at(16),
            tsc_hz: u64_at(24),
            stats_gpa: u64_at(32),
            memory_size: u64_at(40),
        }
    }
}

/// One vCPU's record at `STATS_GPA + vcpu * STATS_RECORD_SIZE`, written by the guest with
/// plain stores and read by the hypervisor at any time (so fields may be mutually stale).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GuestStats {
    pub iterations: u64,
    /// TSC cycles spent spinning in the barrier.
    pub spin_cycles: u64,
    /// TSC cycles spent in the compute step.
    pub busy_cycles: u64,
    pub last_tsc: u64,
    pub state: u64,
}

pub const GUEST_STATE_RUNNING: u64 = 1;
pub const GUEST_STATE_DONE: u64 = 2;

/// Every check `load_test_guest` makes before it writes, for an image of `image_len` bytes in
/// a partition of `size` bytes (the config check makes them too).
pub fn check_test_guest(image_len: usize, vcpus: u32, cmdline: &str, size: u64) -> Result<(), LoadError> {
    if image_len == 0 {
        return Err(LoadError::EmptyImage);
    }
    if vcpus == 0 {
        return Err(LoadError::NoVcpus);
    }
    if vcpus > MAX_VCPUS {
        return Err(LoadError::TooManyVcpus { vcpus, max: MAX_VCPUS });
    }
    if cmdline.len() > CMDLINE_MAX_LEN {
        return Err(LoadError::CmdlineTooLong { len: cmdline.len(), max: CMDLINE_MAX_LEN });
    }
    if let Some(offset) = cmdline.bytes().position(|c| !(0x20..0x7f).contains(&c)) {
        return Err(LoadError::CmdlineNotAscii { offset });
    }
    let needed = GUEST_IMAGE_GPA + image_len as u64;
    if needed > size {
        return Err(LoadError::MemoryTooSmall { size, needed, image_len });
    }
    Ok(())
}

/// Hypercalls (`vmcall`, RAX = number, RBX = vCPU index).
pub const HYPERCALL_REPORT: u64 = 1;
pub const HYPERCALL_DONE: u64 = 2;
pub const HYPERCALL_ERROR: u64 = 3;
/// Any guest, at any privilege level (the Linux BARRIER workload from user space): RBX = 1
/// opens this vCPU's spin-wait measurement window, 0 closes it. Spin-wait samples taken while
/// it is open are counted apart, so the hypervisor's figure covers the same stretch of the
/// guest's run as the guest's own (docs/records.md, `partition_stats.spin_window_*`).
pub const HYPERCALL_SPIN_WINDOW: u64 = 4;
/// Delegation (docs/control.md), from the guest's kernel (CPL 0) of a partition that manages a
/// group: returns RAX = a `DELEGATION_*` result; on success RBX = the microseconds of every
/// major frame the group holds on each of its pCPUs, RCX = how many children it has (they are
/// numbered partitions first, then groups, each in the config file's order), RDX = the major
/// frame in microseconds.
pub const HYPERCALL_GROUP_INFO: u64 = 5;
/// Delegation: RBX = the child's number, RCX = the kind of reservation (`RESERVATION_*`), RDX
/// and RSI its values (hard: budget_us, period_us; fixed share: percent; weight: weight).
/// Checked as the config check would check the file with it (the group cannot give out more
/// than it holds); on success RAX = `DELEGATION_OK` and RBX = the number of the epoch of
/// dispatch tables it starts, at the first major-frame boundary at least 2 ms ahead.
pub const HYPERCALL_SET_CHILD_RESERVATION: u64 = 6;
/// Shared memory (docs/control.md): revokes the `[[shared]]` region at guest-physical RBX that
/// the caller owns (RCX = 0) or, from a group's manager, that its child number RCX - 1 owns
/// (numbered as for `HYPERCALL_SET_CHILD_RESERVATION`): unmapped from every partition but the
/// owner, every pCPU's cached translations dropped before it returns RAX = `DELEGATION_OK` (or
/// `DELEGATION_NOT_OWNER`, `DELEGATION_ALREADY_REVOKED`, `DELEGATION_NOT_A_MANAGER`,
/// `DELEGATION_NO_SUCH_CHILD`).
pub const HYPERCALL_REVOKE_SHARED: u64 = 7;
pub const RESERVATION_HARD: u64 = 1;
pub const RESERVATION_FIXED_SHARE: u64 = 2;
pub const RESERVATION_WEIGHT: u64 = 3;
/// Results of the delegation hypercalls (RAX). A refusal's reason is a `delegation` record on
/// the hypervisor's console.
pub const DELEGATION_OK: u64 = 0;
pub const DELEGATION_NOT_A_MANAGER: u64 = 1;
pub const DELEGATION_NO_SUCH_CHILD: u64 = 2;
/// The check refused it (over-admission, a period that does not divide the frame, ...).
pub const DELEGATION_REFUSED: u64 = 3;
/// Another change is on its way in: call again.
pub const DELEGATION_BUSY: u64 = 4;
pub const DELEGATION_BAD_KIND: u64 = 5;
/// Called from outside the guest's kernel (CPL > 0).
pub const DELEGATION_NOT_PRIVILEGED: u64 = 6;
/// No shared region the caller (or the child it names) owns is at that address.
pub const DELEGATION_NOT_OWNER: u64 = 7;
pub const DELEGATION_ALREADY_REVOKED: u64 = 8;

impl GuestStats {
    pub fn gpa(vcpu: u32) -> u64 {
        STATS_GPA + vcpu as u64 * STATS_RECORD_SIZE
    }

    pub fn from_bytes(b: &[u8; STATS_RECORD_SIZE as usize]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        GuestStats {
            iterations: u64_at(0),
            spin_cycles: u64_at(8),
            busy_cycles: u64_at(16),
            last_tsc: u64_at(24),
            state: u64_at(32),
        }
    }
}

/// Writes the image, boot info, command line, zeroed stats, page tables (PML4 at
/// [`PAGE_TABLES_GPA`], one PDPT, one PD: identity map of the first 1 GiB with 2 MiB pages),
/// the GDT and the TSS. Checks everything fits before writing anything.
pub fn load_test_guest(mem: &mut impl GuestMemory, p: &BootParams) -> Result<(), LoadError> {
    let size = mem.size();
    check_test_guest(p.image.len(), p.vcpus, p.cmdline, size)?;

    mem.write(GUEST_IMAGE_GPA, p.image)?;

    let info = BootInfo {
        magic: BOOT_INFO_MAGIC,
        vcpus: p.vcpus,
        cmdline_len: p.cmdline.len() as u32,
        cmdline_gpa: CMDLINE_GPA,
        tsc_hz: p.tsc_hz,
        stats_gpa: STATS_GPA,
        memory_size: size,
    };
    mem.write(BOOT_INFO_GPA, &info.to_bytes())?;

    // The whole page, so the string is NUL-terminated and no stale bytes follow it.
    let mut cmdline = [0u8; CMDLINE_MAX_LEN + 1];
    cmdline[..p.cmdline.len()].copy_from_slice(p.cmdline.as_bytes());
    mem.write(CMDLINE_GPA, &cmdline)?;

    let zero_record = [0u8; STATS_RECORD_SIZE as usize];
    for vcpu in 0..p.vcpus {
        mem.write(GuestStats::gpa(vcpu), &zero_record)?;
    }

    write_identity_map(mem)?;
    mem.write(GDT_GPA, &gdt_bytes())?;
    mem.write(TSS_GPA, &[0u8; TSS_SIZE as usize])?;
    Ok(())
}

/// Page tables at [`PAGE_TABLES_GPA`] (PML4, one PDPT, one PD) identity-mapping the first
/// [`IDENTITY_MAP_SIZE`] of guest-physical memory with 2 MiB pages: what a 64-bit entry point
/// (the test guest's, Linux's) needs to find.
pub fn write_identity_map(mem: &mut impl GuestMemory) -> Result<(), GuestMemoryError> {
    let mut table = [0u8; 4096];
    table[0..8].copy_from_slice(&(PDPT_GPA | PTE_PRESENT | PTE_WRITABLE).to_le_bytes());
    mem.write(PML4_GPA, &table)?;
    table[0..8].copy_from_slice(&(PD_GPA | PTE_PRESENT | PTE_WRITABLE).to_le_bytes());
    mem.write(PDPT_GPA, &table)?;
    for (i, entry) in table.chunks_exact_mut(8).enumerate() {
        let pde = (i as u64 * LARGE_PAGE_SIZE) | PTE_PRESENT | PTE_WRITABLE | PTE_LARGE;
        entry.copy_from_slice(&pde.to_le_bytes());
    }
    mem.write(PD_GPA, &table)
}

/// A segment register as the VMCS guest-state area holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub selector: u16,
    pub base: u64,
    pub limit: u32,
    /// VMX access-rights format (see [`AR_CODE64`]).
    pub access_rights: u32,
}

impl Segment {
    pub const fn unusable() -> Self {
        Segment { selector: 0, base: 0, limit: 0, access_rights: AR_UNUSABLE }
    }
    pub const fn code64() -> Self {
        Segment { selector: CODE_SELECTOR, base: 0, limit: 0xFFFF_FFFF, access_rights: AR_CODE64 }
    }
    pub const fn data() -> Self {
        Segment { selector: DATA_SELECTOR, base: 0, limit: 0xFFFF_FFFF, access_rights: AR_DATA }
    }
    pub const fn tss() -> Self {
        Segment { selector: TSS_SELECTOR, base: TSS_GPA, limit: TSS_SIZE as u32 - 1, access_rights: AR_TSS64_BUSY }
    }

    /// The same segment under another selector (another GDT layout).
    pub const fn at(self, selector: u16) -> Self {
        Segment { selector, ..self }
    }

    /// The 8-byte GDT descriptor (for a system segment, the low half of the 16-byte one).
    /// The VMX limit is in bytes; the descriptor holds it in 4 KiB units when G is set.
    pub fn descriptor_low(&self) -> u64 {
        let g = self.access_rights & (1 << 15) != 0;
        let limit = if g { (self.limit >> 12) as u64 } else { self.limit as u64 };
        (limit & 0xFFFF)
            | (self.base & 0xFF_FFFF) << 16
            | ((self.access_rights & 0xFF) as u64) << 40
            | ((limit >> 16) & 0xF) << 48
            | (((self.access_rights >> 12) & 0xF) as u64) << 52
            | ((self.base >> 24) & 0xFF) << 56
    }
}

/// The GDT written at [`GDT_GPA`]: null, 64-bit code, data, busy 64-bit TSS. The descriptors
/// are encoded from the same [`Segment`]s the VMCS gets, so the two cannot disagree.
pub fn gdt_bytes() -> [u8; GDT_SIZE] {
    let tss = Segment::tss();
    let entries =
        [0, Segment::code64().descriptor_low(), Segment::data().descriptor_low(), tss.descriptor_low(), tss.base >> 32];
    let mut b = [0u8; GDT_SIZE];
    for (chunk, e) in b.chunks_exact_mut(8).zip(entries) {
        chunk.copy_from_slice(&e.to_le_bytes());
    }
    b
}

/// Everything the VMCS guest-state area needs for one vCPU of the long-mode guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuState {
    pub rip: u64,
    pub rsp: u64,
    pub rflags: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub ss: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub tr: Segment,
    pub ldtr: Segment,
    pub gdtr_base: u64,
    pub gdtr_limit: u32,
    pub idtr_base: u64,
    pub idtr_limit: u32,
}

/// Register state for vCPU `vcpu` (0-based, below [`MAX_VCPUS`]): entry at the image's first
/// byte with RDI = index, RSI = boot info GPA and its own stack. CR0/CR4 hold what the guest
/// needs; the hypervisor ORs in the VMX fixed bits. There is no IDT (limit 0): any exception
/// escalates to a triple fault, which the hypervisor reports.
///
/// # Panics
/// If `vcpu >= MAX_VCPUS` (there is no stack for it; [`load_test_guest`] rejects such counts).
pub fn initial_vcpu_state(vcpu: u32) -> VcpuState {
    assert!(vcpu < MAX_VCPUS, "vCPU {vcpu} has no stack: the long-mode guest supports {MAX_VCPUS} vCPUs");
    VcpuState {
        rip: GUEST_IMAGE_GPA,
        rsp: STACKS_TOP_GPA - vcpu as u64 * STACK_SIZE,
        rflags: RFLAGS_FIXED,
        rdi: vcpu as u64,
        rsi: BOOT_INFO_GPA,
        cr0: CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG,
        cr3: PAGE_TABLES_GPA,
        cr4: CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT,
        efer: EFER_LME | EFER_LMA,
        cs: Segment::code64(),
        ds: Segment::data(),
        es: Segment::data(),
        ss: Segment::data(),
        fs: Segment::data(),
        gs: Segment::data(),
        tr: Segment::tss(),
        ldtr: Segment::unusable(),
        gdtr_base: GDT_GPA,
        gdtr_limit: GDT_SIZE as u32 - 1,
        idtr_base: 0,
        idtr_limit: 0,
    }
}

/// Guest memory as a byte vector starting at GPA 0: for host tests and tools that load a
/// partition's memory without a machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VecGuestMemory(pub alloc::vec::Vec<u8>);

impl GuestMemory for VecGuestMemory {
    fn write(&mut self, gpa: u64, bytes: &[u8]) -> Result<(), GuestMemoryError> {
        let err = GuestMemoryError { gpa, len: bytes.len() as u64, size: self.size() };
        let end = gpa.checked_add(bytes.len() as u64).ok_or(err)?;
        if end > self.size() {
            return Err(err);
        }
        self.0[gpa as usize..end as usize].copy_from_slice(bytes);
        Ok(())
    }

    fn size(&self) -> u64 {
        self.0.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use alloc::vec::Vec;

    use VecGuestMemory as VecMemory;

    impl VecGuestMemory {
        fn u64_at(&self, gpa: u64) -> u64 {
            u64::from_le_bytes(self.0[gpa as usize..gpa as usize + 8].try_into().unwrap())
        }
    }

    const IMAGE: &[u8] = &[0xF4, 0xEB, 0xFD, 0x90, 0x11, 0x22];
    const MEM: usize = 4 << 20;

    fn params(cmdline: &str, vcpus: u32) -> BootParams<'_> {
        BootParams { image: IMAGE, cmdline, vcpus, tsc_hz: 10_000_000 }
    }

    fn loaded(cmdline: &str, vcpus: u32) -> VecMemory {
        // Garbage everywhere, so the test sees what the loader clears.
        let mut mem = VecMemory(vec![0xAA; MEM]);
        load_test_guest(&mut mem, &params(cmdline, vcpus)).unwrap();
        mem
    }

    /// Walks the guest's 4-level tables like the CPU does; None for a non-present entry.
    fn translate(mem: &VecMemory, cr3: u64, va: u64) -> Option<u64> {
        let addr_mask = 0x000F_FFFF_FFFF_F000;
        let pml4e = mem.u64_at((cr3 & addr_mask) + ((va >> 39) & 511) * 8);
        if pml4e & PTE_PRESENT == 0 {
            return None;
        }
        assert!(pml4e & PTE_WRITABLE != 0);
        let pdpte = mem.u64_at((pml4e & addr_mask) + ((va >> 30) & 511) * 8);
        if pdpte & PTE_PRESENT == 0 {
            return None;
        }
        assert!(pdpte & PTE_LARGE == 0, "no 1 GiB pages");
        let pde = mem.u64_at((pdpte & addr_mask) + ((va >> 21) & 511) * 8);
        if pde & PTE_PRESENT == 0 {
            return None;
        }
        assert!(pde & PTE_LARGE != 0 && pde & PTE_WRITABLE != 0, "2 MiB writable pages");
        Some((pde & 0x000F_FFFF_FFE0_0000) + (va & (LARGE_PAGE_SIZE - 1)))
    }

    #[test]
    fn page_tables_identity_map_the_first_gib_only() {
        let mem = loaded("mode=barrier", 2);
        let cr3 = initial_vcpu_state(0).cr3;
        assert_eq!(cr3, PAGE_TABLES_GPA);
        for va in [0, 0x1000, 0x10_0000, 0x1F_FFFF, 0x20_0000, MEM as u64 + 0x10000, 0x3FFF_FFFF] {
            assert_eq!(translate(&mem, cr3, va), Some(va), "va {va:#x}");
        }
        for page in 0..512u64 {
            let va = page * LARGE_PAGE_SIZE + 0x1234;
            assert_eq!(translate(&mem, cr3, va), Some(va));
        }
        assert_eq!(translate(&mem, cr3, 0x4000_0000), None);
        assert_eq!(translate(&mem, cr3, 1 << 39), None);
        // Only entry 0 of the PML4 and PDPT is present.
        assert!((1..512).all(|i| mem.u64_at(PML4_GPA + i * 8) == 0 && mem.u64_at(PDPT_GPA + i * 8) == 0));
    }

    #[test]
    fn gdt_bytes_are_the_expected_descriptors() {
        let mem = loaded("", 1);
        let gdt: Vec<u64> = (0..5).map(|i| mem.u64_at(GDT_GPA + i * 8)).collect();
        assert_eq!(gdt[0], 0);
        assert_eq!(gdt[1], 0x00AF_9B00_0000_FFFF, "64-bit code, DPL 0");
        assert_eq!(gdt[2], 0x00CF_9300_0000_FFFF, "flat read/write data");
        assert_eq!(gdt[3], 0x0000_8B01_4000_0067, "busy 64-bit TSS at {TSS_GPA:#x}, limit 0x67");
        assert_eq!(gdt[4], 0, "TSS base bits 63:32");
        let s = initial_vcpu_state(0);
        assert_eq!(s.gdtr_base, GDT_GPA);
        assert_eq!(s.gdtr_limit as usize, GDT_SIZE - 1);
        assert_eq!(usize::from(s.tr.selector) / 8, 3);
        assert_eq!(usize::from(s.cs.selector) / 8, 1);
        assert!([s.ds, s.es, s.ss, s.fs, s.gs].iter().all(|d| d.selector / 8 == 2));
        assert!(mem.0[TSS_GPA as usize..(TSS_GPA + TSS_SIZE) as usize].iter().all(|&b| b == 0));
    }

    #[test]
    fn boot_info_cmdline_and_stats_are_written() {
        let cmdline = "mode=barrier work=500 iters=1000";
        let mem = loaded(cmdline, 3);
        let info = BootInfo::from_bytes(mem.0[BOOT_INFO_GPA as usize..][..BOOT_INFO_SIZE].try_into().unwrap());
        assert_eq!(
            info,
            BootInfo {
                magic: BOOT_INFO_MAGIC,
                vcpus: 3,
                cmdline_len: cmdline.len() as u32,
                cmdline_gpa: CMDLINE_GPA,
                tsc_hz: 10_000_000,
                stats_gpa: STATS_GPA,
                memory_size: MEM as u64,
            }
        );
        assert_eq!(&mem.0[BOOT_INFO_GPA as usize..][..6], b"PHALHX");
        let c = CMDLINE_GPA as usize;
        assert_eq!(&mem.0[c..c + cmdline.len()], cmdline.as_bytes());
        assert!(mem.0[c + cmdline.len()..c + 0x1000].iter().all(|&b| b == 0), "NUL-terminated, rest of page clear");
        for vcpu in 0..3 {
            let g = GuestStats::gpa(vcpu) as usize;
            assert_eq!(GuestStats::from_bytes(mem.0[g..g + 64].try_into().unwrap()), GuestStats::default());
        }
        // Records of vCPUs that do not exist are not touched.
        assert_eq!(mem.0[GuestStats::gpa(3) as usize], 0xAA);
    }

    #[test]
    fn image_is_placed_at_the_entry_point() {
        let mem = loaded("mode=idle", 1);
        assert_eq!(&mem.0[GUEST_IMAGE_GPA as usize..][..IMAGE.len()], IMAGE);
        assert_eq!(mem.0[GUEST_IMAGE_GPA as usize + IMAGE.len()], 0xAA, "nothing written after the image");
        assert_eq!(mem.0[GUEST_IMAGE_GPA as usize - 1], 0xAA, "stacks are left alone");
        assert_eq!(initial_vcpu_state(0).rip, GUEST_IMAGE_GPA);
    }

    #[test]
    fn errors_name_what_does_not_fit() {
        let image = vec![0x90; 0x2000];
        let mut mem = VecMemory(vec![0; 0x10_1000]);
        let e = load_test_guest(&mut mem, &BootParams { image: &image, cmdline: "", vcpus: 1, tsc_hz: 1 }).unwrap_err();
        assert_eq!(e, LoadError::MemoryTooSmall { size: 0x10_1000, needed: 0x10_2000, image_len: 0x2000 });
        assert_eq!(
            alloc::format!("{e}"),
            "guest memory of 0x101000 bytes is too small: the 8192-byte image at GPA 0x100000 needs 0x102000 bytes"
        );
        assert!(mem.0.iter().all(|&b| b == 0), "nothing written on error");

        let mut mem = VecMemory(vec![0; MEM]);
        let long = "x".repeat(CMDLINE_MAX_LEN + 1);
        let e = load_test_guest(&mut mem, &params(&long, 1)).unwrap_err();
        assert_eq!(e, LoadError::CmdlineTooLong { len: 4096, max: 4095 });
        assert!(alloc::format!("{e}").contains("4096 bytes is longer than the 4095"));
        load_test_guest(&mut mem, &params(&long[1..], 1)).expect("4095 bytes fit");

        assert_eq!(load_test_guest(&mut mem, &params("mode=idle\n", 1)), Err(LoadError::CmdlineNotAscii { offset: 9 }));
        assert_eq!(load_test_guest(&mut mem, &params("", 0)), Err(LoadError::NoVcpus));
        assert_eq!(
            load_test_guest(&mut mem, &params("", MAX_VCPUS + 1)),
            Err(LoadError::TooManyVcpus { vcpus: MAX_VCPUS + 1, max: MAX_VCPUS })
        );
        load_test_guest(&mut mem, &params("", MAX_VCPUS)).expect("MAX_VCPUS fit");
        let empty = BootParams { image: &[], cmdline: "", vcpus: 1, tsc_hz: 1 };
        assert_eq!(load_test_guest(&mut mem, &empty), Err(LoadError::EmptyImage));

        // An image that ends exactly at the end of memory fits.
        let mut mem = VecMemory(vec![0; 0x10_2000]);
        load_test_guest(&mut mem, &BootParams { image: &image, cmdline: "", vcpus: 1, tsc_hz: 1 }).unwrap();
    }

    #[test]
    fn vcpu_state_is_the_documented_long_mode_entry() {
        let s = initial_vcpu_state(1);
        assert_eq!(s.cr0, 0x8001_0033);
        assert_eq!(s.cr4, 0x620);
        assert_eq!(s.efer, 0x500);
        assert_eq!(s.rflags, 0x2);
        assert_eq!((s.rdi, s.rsi), (1, BOOT_INFO_GPA));
        assert_eq!(
            (s.cs.access_rights, s.ss.access_rights, s.tr.access_rights, s.ldtr.access_rights),
            (0xA09B, 0xC093, 0x8B, 0x10000)
        );
        assert_eq!((s.idtr_base, s.idtr_limit), (0, 0));
    }

    #[test]
    fn stacks_are_disjoint_and_inside_their_region() {
        assert_eq!(MAX_VCPUS, 56);
        let tops: Vec<u64> = (0..MAX_VCPUS).map(|v| initial_vcpu_state(v).rsp).collect();
        assert_eq!(tops[0], GUEST_IMAGE_GPA, "vCPU 0's stack ends just below the image");
        for (v, &top) in tops.iter().enumerate() {
            assert_eq!(top % 16, 0, "16-byte aligned before the guest's first call");
            assert!(top - STACK_SIZE >= STACKS_BOTTOM_GPA, "vCPU {v}");
            assert!(v == 0 || tops[v - 1] - top == STACK_SIZE);
        }
    }

    #[test]
    #[should_panic(expected = "has no stack")]
    fn vcpu_without_a_stack_is_refused() {
        initial_vcpu_state(MAX_VCPUS);
    }

    /// The guest's C header (guests/testguest/abi.h) must agree with this module.
    #[test]
    fn guest_abi_header_matches() {
        let header = include_str!("../../guests/testguest/abi.h");
        let define = |name: &str| -> u64 {
            let line = header
                .lines()
                .find(|l| l.split_whitespace().nth(1) == Some(name) && l.starts_with("#define"))
                .unwrap_or_else(|| panic!("abi.h does not define {name}"));
            let value = line.split_whitespace().nth(2).unwrap().trim_end_matches("ULL");
            match value.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16).unwrap(),
                None => value.parse().unwrap(),
            }
        };
        assert_eq!(define("BOOT_INFO_MAGIC"), BOOT_INFO_MAGIC);
        assert_eq!(define("STATS_RECORD_SIZE"), STATS_RECORD_SIZE);
        assert_eq!(define("GUEST_IMAGE_GPA"), GUEST_IMAGE_GPA);
        assert_eq!(define("BOOT_INFO_GPA"), BOOT_INFO_GPA);
        assert_eq!(define("CMDLINE_GPA"), CMDLINE_GPA);
        assert_eq!(define("STATS_GPA"), STATS_GPA);
        assert_eq!(define("STACKS_TOP_GPA"), STACKS_TOP_GPA);
        assert_eq!(define("STACK_SIZE"), STACK_SIZE);
        assert_eq!(define("IDENTITY_MAP_SIZE"), IDENTITY_MAP_SIZE);
        assert_eq!(define("STATE_RUNNING"), GUEST_STATE_RUNNING);
        assert_eq!(define("STATE_DONE"), GUEST_STATE_DONE);
        assert_eq!(define("HYPERCALL_REPORT"), HYPERCALL_REPORT);
        assert_eq!(define("HYPERCALL_GROUP_INFO"), HYPERCALL_GROUP_INFO);
        assert_eq!(define("HYPERCALL_SET_CHILD_RESERVATION"), HYPERCALL_SET_CHILD_RESERVATION);
        assert_eq!(define("RESERVATION_HARD"), RESERVATION_HARD);
        assert_eq!(define("DELEGATION_OK"), DELEGATION_OK);
        assert_eq!(define("DELEGATION_BUSY"), DELEGATION_BUSY);
        assert_eq!(define("HYPERCALL_REVOKE_SHARED"), HYPERCALL_REVOKE_SHARED);
        assert_eq!(define("HYPERCALL_DONE"), HYPERCALL_DONE);
        assert_eq!(define("HYPERCALL_ERROR"), HYPERCALL_ERROR);
        // The struct fields, in order.
        let fields = |name: &str| -> Vec<&str> {
            let body = &header[header.find(&alloc::format!("struct {name} {{")).unwrap()..];
            body[..body.find("};").unwrap()]
                .lines()
                .skip(1)
                .filter_map(|l| l.trim().split(';').next().filter(|f| !f.is_empty()))
                .collect()
        };
        assert_eq!(
            fields("boot_info"),
            [
                "uint64_t magic",
                "uint32_t vcpus",
                "uint32_t cmdline_len",
                "uint64_t cmdline_gpa",
                "uint64_t tsc_hz",
                "uint64_t stats_gpa",
                "uint64_t memory_size"
            ]
        );
        assert_eq!(
            fields("stats_record"),
            [
                "uint64_t iterations",
                "uint64_t spin_cycles",
                "uint64_t busy_cycles",
                "uint64_t last_tsc",
                "uint64_t state",
                "uint64_t reserved[3]"
            ]
        );
    }
}
