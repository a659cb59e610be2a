//! Extended page tables (SDM Vol. 3C 29.3): one 4-level tree per partition that maps its
//! guest-physical memory, and nothing else, onto host-physical memory.
//!
//! The tables live in host-physical frames reached through [`PhysMemory`], so the same code
//! runs in the hypervisor (identity-mapped memory) and in host tests (a map-backed mock).

use alloc::vec::Vec;
use core::fmt;

use bitflags::bitflags;

/// Host-physical 4 KiB frames for table pages.
pub trait FrameAllocator {
    /// A 4 KiB-aligned frame whose 512 entries read as zero (not present), or `None`.
    fn allocate_zeroed_frame(&mut self) -> Option<u64>;
}

/// Access to host-physical memory holding table pages (identity-mapped in the hypervisor;
/// a map-backed mock in tests).
pub trait PhysMemory {
    fn read_u64(&self, phys: u64) -> u64;
    fn write_u64(&mut self, phys: u64, value: u64);
}

bitflags! {
    /// What a guest may do with a mapping: bits 2:0 of an EPT entry.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Access: u8 {
        const READ = 1;
        const WRITE = 2;
        const EXECUTE = 4;
    }
}

/// EPT memory types (SDM 29.3.7); the other encodings are reserved and misconfigure the entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemoryType {
    Uncacheable = 0,
    WriteCombining = 1,
    WriteThrough = 4,
    WriteProtected = 5,
    WriteBack = 6,
}

impl MemoryType {
    pub const fn from_bits(bits: u8) -> Option<Self> {
        match bits {
            0 => Some(Self::Uncacheable),
            1 => Some(Self::WriteCombining),
            4 => Some(Self::WriteThrough),
            5 => Some(Self::WriteProtected),
            6 => Some(Self::WriteBack),
            _ => None,
        }
    }
}

/// Large page sizes the CPU supports (IA32_VMX_EPT_VPID_CAP bits 16 and 17).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageSizes {
    pub huge_1g: bool,
    pub large_2m: bool,
}

impl PageSizes {
    pub const ALL: Self = Self { huge_1g: true, large_2m: true };
    pub const SMALL_ONLY: Self = Self { huge_1g: false, large_2m: false };
}

/// Size of the page a leaf entry maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageSize {
    Size4K,
    Size2M,
    Size1G,
}

impl PageSize {
    pub const fn bytes(self) -> u64 {
        level_span(self.level())
    }

    /// The table level holding leaves of this size (1 = page table ... 4 = PML4).
    const fn level(self) -> u8 {
        match self {
            Self::Size4K => 1,
            Self::Size2M => 2,
            Self::Size1G => 3,
        }
    }

    const fn at_level(level: u8) -> Self {
        match level {
            1 => Self::Size4K,
            2 => Self::Size2M,
            _ => Self::Size1G,
        }
    }
}

/// Where a guest-physical address goes, as a software walk of the tables finds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    pub hpa: u64,
    pub access: Access,
    pub memory_type: MemoryType,
    pub page_size: PageSize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EptError {
    /// Addresses and lengths must be multiples of 4 KiB.
    Misaligned { gpa: u64, hpa: u64, len: u64 },
    /// The range goes past what a 4-level walk translates (2^48) or an entry can hold (2^52).
    OutOfRange { gpa: u64, hpa: u64, len: u64 },
    /// No access at all, or write without read (SDM 29.3.3.1: an EPT misconfiguration).
    InvalidAccess { access: Access },
    /// `gpa` is already mapped.
    Overlap { gpa: u64 },
    /// The frame allocator is exhausted.
    OutOfFrames,
    /// `gpa` is not mapped (unmap covers only mapped memory).
    NotMapped { gpa: u64 },
}

impl fmt::Display for EptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Misaligned { gpa, hpa, len } => {
                write!(f, "EPT range not 4 KiB aligned: GPA {gpa:#x} HPA {hpa:#x} length {len:#x}")
            }
            Self::OutOfRange { gpa, hpa, len } => {
                write!(f, "EPT range out of addressable range: GPA {gpa:#x} HPA {hpa:#x} length {len:#x}")
            }
            Self::InvalidAccess { access } => {
                write!(f, "EPT access {} is invalid (needs some access, and read with write)", AccessText(access))
            }
            Self::Overlap { gpa } => write!(f, "GPA {gpa:#x} is already mapped"),
            Self::OutOfFrames => f.write_str("out of frames for EPT tables"),
            Self::NotMapped { gpa } => write!(f, "GPA {gpa:#x} is not mapped"),
        }
    }
}

/// `rwx` with `-` for what is missing, as in `r-x`.
pub(crate) struct AccessText(pub(crate) Access);

impl fmt::Display for AccessText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (flag, letter) in [(Access::READ, 'r'), (Access::WRITE, 'w'), (Access::EXECUTE, 'x')] {
            fmt::Write::write_char(f, if self.0.contains(flag) { letter } else { '-' })?;
        }
        Ok(())
    }
}

const FRAME_SIZE: u64 = 4096;
const ENTRY_SIZE: u64 = 8;
const ENTRIES_PER_TABLE: u64 = 512;
const ACCESS_MASK: u64 = 0b111;
const MEMORY_TYPE_SHIFT: u32 = 3;
const MEMORY_TYPE_MASK: u64 = 0b111 << MEMORY_TYPE_SHIFT;
const LARGE_PAGE: u64 = 1 << 7;
const ADDRESS_MASK: u64 = 0x000F_FFFF_FFFF_F000;
/// A 4-level walk translates 48 bits of guest-physical address.
const GPA_LIMIT: u64 = 1 << 48;
/// Entries hold host-physical addresses up to bit 51.
const HPA_LIMIT: u64 = 1 << 52;
/// EPTP bits 5:3 hold the page-walk length minus one.
const EPTP_FOUR_LEVEL_WALK: u64 = 3 << 3;
const EPTP_ACCESSED_DIRTY: u64 = 1 << 6;

/// Bytes covered by one entry of a table at `level` (1 = page table ... 4 = PML4).
const fn level_span(level: u8) -> u64 {
    1 << (12 + 9 * (level as u32 - 1))
}

fn table_index(gpa: u64, level: u8) -> u64 {
    (gpa / level_span(level)) % ENTRIES_PER_TABLE
}

fn is_present(entry: u64) -> bool {
    entry & ACCESS_MASK != 0
}

/// Whether a present entry at `level` maps memory rather than pointing at the next table.
fn is_leaf(entry: u64, level: u8) -> bool {
    level == 1 || (level <= 3 && entry & LARGE_PAGE != 0)
}

fn leaf_entry(hpa: u64, access: Access, memory_type: MemoryType, size: PageSize) -> u64 {
    // Ignore-PAT stays clear: the guest's PAT then combines with the EPT type as it would
    // with the MTRRs on bare metal (SDM 29.3.7.2), so a guest's UC mapping stays UC.
    let large = if size == PageSize::Size4K { 0 } else { LARGE_PAGE };
    hpa | u64::from(access.bits()) | (memory_type as u64) << MEMORY_TYPE_SHIFT | large
}

/// Non-leaf entries allow everything: the leaf alone decides the access.
fn table_entry(table: u64) -> u64 {
    table | ACCESS_MASK
}

/// What a walk for one guest-physical address ends on.
enum Walk {
    /// A not-present entry at `level`: the whole `level_span(level)` around the address is
    /// unmapped.
    Hole { level: u8 },
    /// A leaf entry at `level`, stored at host-physical `entry_phys`.
    Leaf { level: u8, entry: u64, entry_phys: u64 },
}

/// One partition's extended page tables.
#[derive(Debug)]
pub struct Ept {
    root: u64,
    frames: Vec<u64>,
}

impl Ept {
    /// An empty tree: a zeroed PML4 maps nothing.
    pub fn new(alloc: &mut impl FrameAllocator) -> Result<Ept, EptError> {
        let mut ept = Ept { root: 0, frames: Vec::new() };
        ept.root = ept.allocate_table(alloc)?;
        Ok(ept)
    }

    /// Host-physical address of the PML4.
    pub fn root(&self) -> u64 {
        self.root
    }

    /// Every table page it owns, the root first (for accounting / freeing).
    pub fn table_frames(&self) -> &[u64] {
        &self.frames
    }

    /// EPTP for the VMCS (SDM 25.6.11): the structures are write-back, the walk has 4
    /// levels, and accessed/dirty flags are kept by the CPU if requested.
    pub fn eptp(&self, accessed_dirty: bool) -> u64 {
        let ad = if accessed_dirty { EPTP_ACCESSED_DIRTY } else { 0 };
        self.root | MemoryType::WriteBack as u64 | EPTP_FOUR_LEVEL_WALK | ad
    }

    /// Maps guest-physical [gpa, gpa+len) to host-physical [hpa, hpa+len), using the largest
    /// pages that alignment of both gpa and hpa and `sizes` allow (1 GiB, 2 MiB, else 4 KiB).
    /// Nothing changes on an error, except possibly empty tables left allocated.
    #[allow(clippy::too_many_arguments)]
    pub fn map(
        &mut self,
        mem: &mut impl PhysMemory,
        alloc: &mut impl FrameAllocator,
        gpa: u64,
        hpa: u64,
        len: u64,
        access: Access,
        memory_type: MemoryType,
        sizes: PageSizes,
    ) -> Result<(), EptError> {
        check_range(gpa, hpa, len)?;
        if access.is_empty() || (access.contains(Access::WRITE) && !access.contains(Access::READ)) {
            return Err(EptError::InvalidAccess { access });
        }
        let end = gpa + len;
        if let Some(mapped) = self.first_mapped(mem, gpa, end) {
            return Err(EptError::Overlap { gpa: mapped });
        }
        let mut offset = 0;
        while offset < len {
            let (guest, host, remaining) = (gpa + offset, hpa + offset, len - offset);
            let fits = |size: PageSize| {
                let bytes = size.bytes();
                guest.is_multiple_of(bytes) && host.is_multiple_of(bytes) && remaining >= bytes
            };
            let size = if sizes.huge_1g && fits(PageSize::Size1G) {
                PageSize::Size1G
            } else if sizes.large_2m && fits(PageSize::Size2M) {
                PageSize::Size2M
            } else {
                PageSize::Size4K
            };
            if let Err(error) = self.install_leaf(mem, alloc, guest, leaf_entry(host, access, memory_type, size), size)
            {
                // Whole pages were mapped up to `guest`, so clearing needs no splits.
                self.clear_leaves(mem, gpa, guest);
                return Err(error);
            }
            offset += size.bytes();
        }
        Ok(())
    }

    /// Removes mappings in [gpa, gpa+len), splitting large pages that straddle its ends; the
    /// caller then INVEPTs. All of the range must be mapped. Tables emptied stay allocated.
    pub fn unmap(
        &mut self,
        mem: &mut impl PhysMemory,
        alloc: &mut impl FrameAllocator,
        gpa: u64,
        len: u64,
    ) -> Result<(), EptError> {
        check_range(gpa, 0, len)?;
        let end = gpa + len;
        if let Some(hole) = self.first_hole(mem, gpa, end) {
            return Err(EptError::NotMapped { gpa: hole });
        }
        // Splitting changes no translation, so running out of frames here leaves the
        // mappings as they were.
        self.split_at(mem, alloc, gpa)?;
        if end < GPA_LIMIT {
            self.split_at(mem, alloc, end)?;
        }
        self.clear_leaves(mem, gpa, end);
        Ok(())
    }

    /// Software walk: where `gpa` goes and with what access (`None` if not mapped).
    pub fn translate(&self, mem: &impl PhysMemory, gpa: u64) -> Option<Translation> {
        if gpa >= GPA_LIMIT {
            return None;
        }
        match self.walk(mem, gpa) {
            Walk::Hole { .. } => None,
            Walk::Leaf { level, entry, .. } => {
                let page_size = PageSize::at_level(level);
                let page_base = entry & ADDRESS_MASK & !(page_size.bytes() - 1);
                Some(Translation {
                    hpa: page_base + gpa % page_size.bytes(),
                    access: Access::from_bits_truncate((entry & ACCESS_MASK) as u8),
                    memory_type: MemoryType::from_bits(((entry & MEMORY_TYPE_MASK) >> MEMORY_TYPE_SHIFT) as u8)?,
                    page_size,
                })
            }
        }
    }

    fn allocate_table(&mut self, alloc: &mut impl FrameAllocator) -> Result<u64, EptError> {
        let frame = alloc.allocate_zeroed_frame().ok_or(EptError::OutOfFrames)?;
        debug_assert!(frame.is_multiple_of(FRAME_SIZE) && frame < HPA_LIMIT, "bad table frame {frame:#x}");
        self.frames.push(frame);
        Ok(frame)
    }

    fn walk(&self, mem: &impl PhysMemory, gpa: u64) -> Walk {
        let mut table = self.root;
        let mut level = 4;
        loop {
            let entry_phys = table + table_index(gpa, level) * ENTRY_SIZE;
            let entry = mem.read_u64(entry_phys);
            if !is_present(entry) {
                return Walk::Hole { level };
            }
            if is_leaf(entry, level) {
                return Walk::Leaf { level, entry, entry_phys };
            }
            table = entry & ADDRESS_MASK;
            level -= 1;
        }
    }

    /// Writes `leaf` for the page of `size` at `gpa`, creating the tables above it.
    fn install_leaf(
        &mut self,
        mem: &mut impl PhysMemory,
        alloc: &mut impl FrameAllocator,
        gpa: u64,
        leaf: u64,
        size: PageSize,
    ) -> Result<(), EptError> {
        let mut table = self.root;
        for level in (size.level() + 1..=4).rev() {
            let entry_phys = table + table_index(gpa, level) * ENTRY_SIZE;
            let entry = mem.read_u64(entry_phys);
            table = if !is_present(entry) {
                let next = self.allocate_table(alloc)?;
                mem.write_u64(entry_phys, table_entry(next));
                next
            } else if is_leaf(entry, level) {
                return Err(EptError::Overlap { gpa });
            } else {
                entry & ADDRESS_MASK
            };
        }
        let entry_phys = table + table_index(gpa, size.level()) * ENTRY_SIZE;
        if is_present(mem.read_u64(entry_phys)) {
            return Err(EptError::Overlap { gpa });
        }
        mem.write_u64(entry_phys, leaf);
        Ok(())
    }

    /// Visits [start, end) page by page and hole by hole; `visit` stops the walk by
    /// returning `Some`.
    fn scan<T>(
        &self,
        mem: &impl PhysMemory,
        start: u64,
        end: u64,
        mut visit: impl FnMut(u64, &Walk) -> Option<T>,
    ) -> Option<T> {
        let mut addr = start;
        while addr < end {
            let walk = self.walk(mem, addr);
            if let Some(found) = visit(addr, &walk) {
                return Some(found);
            }
            let level = match walk {
                Walk::Hole { level } | Walk::Leaf { level, .. } => level,
            };
            let span = level_span(level);
            addr = (addr & !(span - 1)) + span;
        }
        None
    }

    fn first_mapped(&self, mem: &impl PhysMemory, start: u64, end: u64) -> Option<u64> {
        self.scan(mem, start, end, |addr, walk| matches!(walk, Walk::Leaf { .. }).then_some(addr))
    }

    fn first_hole(&self, mem: &impl PhysMemory, start: u64, end: u64) -> Option<u64> {
        self.scan(mem, start, end, |addr, walk| matches!(walk, Walk::Hole { .. }).then_some(addr))
    }

    /// Clears every leaf in [start, end); no leaf may straddle either end.
    fn clear_leaves(&self, mem: &mut impl PhysMemory, start: u64, end: u64) {
        let mut leaves = Vec::new();
        self.scan(mem, start, end, |addr, walk| {
            if let Walk::Leaf { level, entry_phys, .. } = *walk {
                debug_assert!(addr.is_multiple_of(level_span(level)) && addr + level_span(level) <= end);
                leaves.push(entry_phys);
            }
            None::<()>
        });
        for entry_phys in leaves {
            mem.write_u64(entry_phys, 0);
        }
    }

    /// Splits large pages until none straddles `boundary`.
    fn split_at(
        &mut self,
        mem: &mut impl PhysMemory,
        alloc: &mut impl FrameAllocator,
        boundary: u64,
    ) -> Result<(), EptError> {
        loop {
            match self.walk(mem, boundary) {
                Walk::Leaf { level, entry, entry_phys } if !boundary.is_multiple_of(level_span(level)) => {
                    self.split_leaf(mem, alloc, level, entry, entry_phys)?;
                }
                _ => return Ok(()),
            }
        }
    }

    /// Replaces a large leaf by a table of 512 leaves of the next size down, with the same
    /// access and memory type, so that no translation changes.
    fn split_leaf(
        &mut self,
        mem: &mut impl PhysMemory,
        alloc: &mut impl FrameAllocator,
        level: u8,
        entry: u64,
        entry_phys: u64,
    ) -> Result<(), EptError> {
        let table = self.allocate_table(alloc)?;
        let child_span = level_span(level - 1);
        let base = entry & ADDRESS_MASK & !(level_span(level) - 1);
        let child_large = if level - 1 > 1 { LARGE_PAGE } else { 0 };
        let attributes = entry & !ADDRESS_MASK & !LARGE_PAGE;
        for index in 0..ENTRIES_PER_TABLE {
            let child = (base + index * child_span) | attributes | child_large;
            mem.write_u64(table + index * ENTRY_SIZE, child);
        }
        // The children are complete before the parent points at them.
        mem.write_u64(entry_phys, table_entry(table));
        Ok(())
    }
}

fn check_range(gpa: u64, hpa: u64, len: u64) -> Result<(), EptError> {
    if !gpa.is_multiple_of(FRAME_SIZE) || !hpa.is_multiple_of(FRAME_SIZE) || !len.is_multiple_of(FRAME_SIZE) {
        return Err(EptError::Misaligned { gpa, hpa, len });
    }
    let fits = |start: u64, limit: u64| start.checked_add(len).is_some_and(|end| end <= limit);
    if !fits(gpa, GPA_LIMIT) || !fits(hpa, HPA_LIMIT) {
        return Err(EptError::OutOfRange { gpa, hpa, len });
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashMap;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    const KIB4: u64 = 4096;

    /// Sparse physical memory: unwritten words read as zero.
    #[derive(Default)]
    pub(crate) struct MockMemory(HashMap<u64, u64>);

    impl PhysMemory for MockMemory {
        fn read_u64(&self, phys: u64) -> u64 {
            assert_eq!(phys % 8, 0, "unaligned table access at {phys:#x}");
            self.0.get(&phys).copied().unwrap_or(0)
        }
        fn write_u64(&mut self, phys: u64, value: u64) {
            assert_eq!(phys % 8, 0, "unaligned table access at {phys:#x}");
            self.0.insert(phys, value);
        }
    }

    /// Hands out distinct frames from a region no test maps, up to a limit.
    pub(crate) struct MockFrames {
        next: u64,
        left: usize,
    }

    impl MockFrames {
        pub(crate) fn new(limit: usize) -> Self {
            Self { next: 0x7_0000_0000, left: limit }
        }
    }

    impl FrameAllocator for MockFrames {
        fn allocate_zeroed_frame(&mut self) -> Option<u64> {
            self.left = self.left.checked_sub(1)?;
            let frame = self.next;
            self.next += KIB4;
            Some(frame)
        }
    }

    struct Fixture {
        mem: MockMemory,
        frames: MockFrames,
        ept: Ept,
    }

    impl Fixture {
        fn new() -> Self {
            let mut frames = MockFrames::new(10_000);
            let ept = Ept::new(&mut frames).unwrap();
            Self { mem: MockMemory::default(), frames, ept }
        }

        fn map(&mut self, gpa: u64, hpa: u64, len: u64, sizes: PageSizes) -> Result<(), EptError> {
            self.map_with(gpa, hpa, len, Access::all(), sizes)
        }

        fn map_with(&mut self, gpa: u64, hpa: u64, len: u64, access: Access, sizes: PageSizes) -> Result<(), EptError> {
            self.ept.map(&mut self.mem, &mut self.frames, gpa, hpa, len, access, MemoryType::WriteBack, sizes)
        }

        fn unmap(&mut self, gpa: u64, len: u64) -> Result<(), EptError> {
            self.ept.unmap(&mut self.mem, &mut self.frames, gpa, len)
        }

        fn translate(&self, gpa: u64) -> Option<Translation> {
            self.ept.translate(&self.mem, gpa)
        }

        fn hpa(&self, gpa: u64) -> Option<u64> {
            self.translate(gpa).map(|t| t.hpa)
        }

        /// Every present leaf, found by walking the raw tables from the root (independent of
        /// `walk`, so that it checks it): (level, raw entry).
        fn leaves(&self) -> Vec<(u8, u64)> {
            let mut found = Vec::new();
            let mut pending = vec![(self.ept.root(), 4u8)];
            while let Some((table, level)) = pending.pop() {
                for index in 0..ENTRIES_PER_TABLE {
                    let entry = self.mem.read_u64(table + index * 8);
                    if entry & 0b111 == 0 {
                        continue;
                    }
                    if level == 1 || (level < 4 && entry & (1 << 7) != 0) {
                        found.push((level, entry));
                    } else {
                        assert_eq!(entry & 0b111, 0b111, "non-leaf entries allow everything");
                        pending.push((entry & ADDRESS_MASK, level - 1));
                    }
                }
            }
            found
        }

        fn leaf_count(&self, level: u8) -> usize {
            self.leaves().iter().filter(|(l, _)| *l == level).count()
        }
    }

    #[test]
    fn partition_of_64_mib_uses_2_mib_pages_and_translates_base_plus_offset() {
        let mut f = Fixture::new();
        let base = 0x180_0000;
        f.map(0, base, 64 * MIB, PageSizes::ALL).unwrap();
        assert_eq!(f.leaf_count(2), 32);
        assert_eq!(f.leaves().len(), 32);
        for gpa in [0, 0x1234, 2 * MIB, 2 * MIB + 0xFFF, 33 * MIB + 0x10, 64 * MIB - 1] {
            assert_eq!(f.hpa(gpa), Some(base + gpa), "gpa {gpa:#x}");
        }
        assert_eq!(f.hpa(64 * MIB), None);
        assert_eq!(f.translate(5 * MIB).unwrap().page_size, PageSize::Size2M);
        // Root, one PDPT, one PD.
        assert_eq!(f.ept.table_frames().len(), 3);
        assert_eq!(f.ept.table_frames()[0], f.ept.root());
    }

    #[test]
    fn host_address_not_2_mib_aligned_falls_back_to_4_kib_pages() {
        let mut f = Fixture::new();
        let base = 0x180_1000;
        f.map(0, base, 4 * MIB, PageSizes::ALL).unwrap();
        assert_eq!(f.leaf_count(1), 1024);
        assert_eq!(f.leaves().len(), 1024);
        for gpa in [0, 0xFFF, 0x1000, 2 * MIB + 0x567, 4 * MIB - 8] {
            assert_eq!(f.hpa(gpa), Some(base + gpa), "gpa {gpa:#x}");
        }
        assert_eq!(f.hpa(4 * MIB), None);
    }

    #[test]
    fn unaligned_start_uses_small_pages_only_up_to_the_first_large_boundary() {
        let mut f = Fixture::new();
        // 1 MiB of 4 KiB pages, then 2 MiB pages, then a 4 KiB tail.
        f.map(MIB, 0x4010_0000, 5 * MIB + 2 * KIB4, PageSizes::ALL).unwrap();
        assert_eq!(f.leaf_count(1), 256 + 2);
        assert_eq!(f.leaf_count(2), 2);
        assert_eq!(f.hpa(MIB), Some(0x4010_0000));
        assert_eq!(f.hpa(6 * MIB + KIB4 + 1), Some(0x4010_0000 + 5 * MIB + KIB4 + 1));
        assert_eq!(f.hpa(6 * MIB + 2 * KIB4), None);
    }

    #[test]
    fn one_gib_pages_only_when_allowed_and_aligned() {
        let mut allowed = Fixture::new();
        allowed.map(GIB, 4 * GIB, 2 * GIB + 2 * MIB, PageSizes::ALL).unwrap();
        assert_eq!(allowed.leaf_count(3), 2);
        assert_eq!(allowed.leaf_count(2), 1);
        assert_eq!(allowed.translate(GIB + 5).unwrap().page_size, PageSize::Size1G);
        assert_eq!(allowed.hpa(2 * GIB + 0x1234_5678), Some(5 * GIB + 0x1234_5678));

        let mut not_allowed = Fixture::new();
        not_allowed.map(GIB, 4 * GIB, GIB, PageSizes { huge_1g: false, large_2m: true }).unwrap();
        assert_eq!(not_allowed.leaf_count(3), 0);
        assert_eq!(not_allowed.leaf_count(2), 512);

        let mut misaligned = Fixture::new();
        misaligned.map(GIB, 4 * GIB + 2 * MIB, GIB, PageSizes::ALL).unwrap();
        assert_eq!(misaligned.leaf_count(3), 0);
        assert_eq!(misaligned.leaf_count(2), 512);

        let mut small_only = Fixture::new();
        small_only.map(0, 2 * MIB, 2 * MIB, PageSizes::SMALL_ONLY).unwrap();
        assert_eq!(small_only.leaf_count(1), 512);
    }

    #[test]
    fn nothing_outside_the_mapped_ranges_translates() {
        let mut f = Fixture::new();
        f.map(0, 0x180_0000, 16 * MIB, PageSizes::ALL).unwrap();
        f.map(0xFEE0_0000 - 64 * MIB, 0x900_0000, 2 * MIB, PageSizes::ALL).unwrap();
        let probes = [
            16 * MIB,
            16 * MIB + KIB4,
            0x180_0000 + 16 * MIB, // the host frames themselves are not identity-mapped
            0xFEE0_0000,           // local APIC
            0xFEE0_0000 - 62 * MIB,
            GIB,
            0x7_0000_0000, // the table frames
            (1 << 48) - KIB4,
            1 << 48,
            u64::MAX,
        ];
        for gpa in probes {
            assert_eq!(f.translate(gpa), None, "gpa {gpa:#x}");
        }
        let mapped: u64 = f.leaves().iter().map(|(level, _)| level_span(*level)).sum();
        assert_eq!(mapped, 18 * MIB);
    }

    #[test]
    fn two_partitions_own_separate_tables() {
        let mut frames = MockFrames::new(100);
        let mut mem = MockMemory::default();
        let mut a = Ept::new(&mut frames).unwrap();
        let mut b = Ept::new(&mut frames).unwrap();
        let wb = MemoryType::WriteBack;
        a.map(&mut mem, &mut frames, 0, 0x100_0000, 4 * MIB, Access::all(), wb, PageSizes::ALL).unwrap();
        b.map(&mut mem, &mut frames, 0, 0x200_0000, 4 * MIB, Access::all(), wb, PageSizes::ALL).unwrap();
        assert_eq!(a.translate(&mem, 0x10).unwrap().hpa, 0x100_0010);
        assert_eq!(b.translate(&mem, 0x10).unwrap().hpa, 0x200_0010);
        assert!(a.table_frames().iter().all(|frame| !b.table_frames().contains(frame)));
    }

    #[test]
    fn overlap_is_rejected_and_changes_nothing() {
        let mut f = Fixture::new();
        f.map(4 * MIB, 0x100_0000, 4 * MIB, PageSizes::ALL).unwrap();
        let before = f.leaves();
        assert_eq!(f.map(2 * MIB, 0x200_0000, 4 * MIB, PageSizes::ALL), Err(EptError::Overlap { gpa: 4 * MIB }));
        assert_eq!(f.map(8 * MIB - KIB4, 0, KIB4, PageSizes::ALL), Err(EptError::Overlap { gpa: 8 * MIB - KIB4 }));
        assert_eq!(f.leaves(), before);
        assert_eq!(f.hpa(2 * MIB), None);
        // Adjacent on both sides is fine.
        f.map(2 * MIB, 0x200_0000, 2 * MIB, PageSizes::ALL).unwrap();
        f.map(8 * MIB, 0x300_0000, KIB4, PageSizes::ALL).unwrap();
    }

    #[test]
    fn unmap_inside_a_2_mib_page_splits_it_and_keeps_the_rest() {
        let mut f = Fixture::new();
        let base = 0x180_0000;
        f.map(0, base, 8 * MIB, PageSizes::ALL).unwrap();
        let hole = 2 * MIB + 0x5000;
        f.unmap(hole, KIB4).unwrap();
        assert_eq!(f.hpa(hole), None);
        assert_eq!(f.hpa(hole + KIB4 - 1), None);
        for gpa in [0, 2 * MIB, hole - 1, hole + KIB4, 4 * MIB - 1, 4 * MIB, 8 * MIB - 1] {
            assert_eq!(f.hpa(gpa), Some(base + gpa), "gpa {gpa:#x}");
        }
        assert_eq!(f.leaf_count(2), 3);
        assert_eq!(f.leaf_count(1), 511);
        assert_eq!(f.translate(hole + KIB4).unwrap().page_size, PageSize::Size4K);
        assert_eq!(f.translate(hole + KIB4).unwrap().memory_type, MemoryType::WriteBack);
        // Unmapping it again is an error; mapping something else there works.
        assert_eq!(f.unmap(hole, KIB4), Err(EptError::NotMapped { gpa: hole }));
        f.map(hole, 0x9000_0000, KIB4, PageSizes::ALL).unwrap();
        assert_eq!(f.hpa(hole + 8), Some(0x9000_0008));
    }

    #[test]
    fn unmap_across_1_gib_and_2_mib_pages_splits_both_ends() {
        let mut f = Fixture::new();
        f.map(0, 0, 2 * GIB, PageSizes::ALL).unwrap();
        let (start, end) = (GIB - 2 * MIB - KIB4, GIB + 4 * MIB + KIB4);
        f.unmap(start, end - start).unwrap();
        for gpa in [start, GIB, GIB + 4 * MIB, end - 1] {
            assert_eq!(f.hpa(gpa), None, "gpa {gpa:#x}");
        }
        for gpa in [0, start - 1, end, end + 2 * MIB, 2 * GIB - 1] {
            assert_eq!(f.hpa(gpa), Some(gpa), "gpa {gpa:#x}");
        }
        let mapped: u64 = f.leaves().iter().map(|(level, _)| level_span(*level)).sum();
        assert_eq!(mapped, 2 * GIB - (end - start));
        // The whole rest is removable, leaving nothing.
        f.unmap(0, start).unwrap();
        f.unmap(end, 2 * GIB - end).unwrap();
        assert!(f.leaves().is_empty());
    }

    #[test]
    fn unmap_of_a_partly_unmapped_range_fails_before_changing_anything() {
        let mut f = Fixture::new();
        f.map(0, 0x100_0000, 2 * MIB, PageSizes::ALL).unwrap();
        assert_eq!(f.unmap(MIB, 2 * MIB), Err(EptError::NotMapped { gpa: 2 * MIB }));
        assert_eq!(f.hpa(MIB), Some(0x110_0000));
        assert_eq!(f.leaf_count(2), 1);
    }

    #[test]
    fn leaves_carry_write_back_and_the_requested_access() {
        let mut f = Fixture::new();
        let read_execute = Access::READ | Access::EXECUTE;
        f.map_with(0, 0x20_0000, 2 * MIB, read_execute, PageSizes::ALL).unwrap();
        f.map_with(2 * MIB, 0x40_0000, KIB4, Access::READ | Access::WRITE, PageSizes::ALL).unwrap();
        let leaves = f.leaves();
        assert_eq!(leaves.len(), 2);
        for (level, entry) in leaves {
            assert_eq!((entry >> 3) & 0b111, 6, "WB memory type in {entry:#x}");
            assert_eq!(entry & (1 << 6), 0, "ignore-PAT clear in {entry:#x}");
            let expected = if level == 2 { 0x20_0000 | 0b101 | 1 << 7 } else { 0x40_0000 | 0b011 };
            assert_eq!(entry, expected | 6 << 3);
        }
        let t = f.translate(0x1000).unwrap();
        assert_eq!((t.access, t.memory_type), (read_execute, MemoryType::WriteBack));
        assert_eq!(f.translate(2 * MIB).unwrap().access, Access::READ | Access::WRITE);
    }

    #[test]
    fn other_memory_types_are_encoded() {
        let mut f = Fixture::new();
        let uc = MemoryType::Uncacheable;
        f.ept
            .map(&mut f.mem, &mut f.frames, 0, 0xFEB0_0000, KIB4, Access::READ | Access::WRITE, uc, PageSizes::ALL)
            .unwrap();
        assert_eq!(f.translate(0).unwrap().memory_type, uc);
        assert_eq!(f.leaves()[0].1 & MEMORY_TYPE_MASK, 0);
    }

    #[test]
    fn eptp_for_a_known_root() {
        let mut frames = MockFrames::new(1);
        let ept = Ept::new(&mut frames).unwrap();
        assert_eq!(ept.root(), 0x7_0000_0000);
        // WB (6) | walk length 4 - 1 = 3 in bits 5:3 | A/D in bit 6.
        assert_eq!(ept.eptp(false), 0x7_0000_001E);
        assert_eq!(ept.eptp(true), 0x7_0000_005E);
    }

    #[test]
    fn bad_arguments_are_rejected() {
        let mut f = Fixture::new();
        let all = PageSizes::ALL;
        assert!(matches!(f.map(0x800, 0, KIB4, all), Err(EptError::Misaligned { .. })));
        assert!(matches!(f.map(0, 0x10, KIB4, all), Err(EptError::Misaligned { .. })));
        assert!(matches!(f.map(0, 0, 100, all), Err(EptError::Misaligned { .. })));
        assert!(matches!(f.map(1 << 48, 0, KIB4, all), Err(EptError::OutOfRange { .. })));
        assert!(matches!(f.map(0, (1 << 52) - KIB4, 2 * KIB4, all), Err(EptError::OutOfRange { .. })));
        assert!(matches!(f.unmap(u64::MAX - 0xFFF, KIB4), Err(EptError::OutOfRange { .. })));
        assert_eq!(
            f.map_with(0, 0, KIB4, Access::empty(), all),
            Err(EptError::InvalidAccess { access: Access::empty() })
        );
        assert!(matches!(f.map_with(0, 0, KIB4, Access::WRITE, all), Err(EptError::InvalidAccess { .. })));
        f.map_with(0, 0, KIB4, Access::EXECUTE, all).unwrap();
        assert!(f.map(KIB4, 0, 0, all).is_ok());
        assert_eq!(f.leaves().len(), 1);
    }

    #[test]
    fn running_out_of_frames_is_an_error_and_leaves_nothing_half_mapped() {
        let mut mem = MockMemory::default();
        // Root, PDPT, PD, and one page table: not enough for a second page table.
        let mut frames = MockFrames::new(4);
        let mut ept = Ept::new(&mut frames).unwrap();
        let result =
            ept.map(&mut mem, &mut frames, 0, 0x1000, 4 * MIB, Access::all(), MemoryType::WriteBack, PageSizes::ALL);
        assert_eq!(result, Err(EptError::OutOfFrames));
        for gpa in [0, 2 * MIB - KIB4, 2 * MIB] {
            assert_eq!(ept.translate(&mem, gpa), None);
        }
        assert_eq!(ept.table_frames().len(), 4);
        assert!(Ept::new(&mut frames).is_err());
    }

    #[test]
    fn unmap_out_of_frames_keeps_every_mapping() {
        let mut mem = MockMemory::default();
        let mut frames = MockFrames::new(3);
        let mut ept = Ept::new(&mut frames).unwrap();
        ept.map(&mut mem, &mut frames, 0, 0, 2 * MIB, Access::all(), MemoryType::WriteBack, PageSizes::ALL).unwrap();
        assert_eq!(ept.unmap(&mut mem, &mut frames, KIB4, KIB4), Err(EptError::OutOfFrames));
        assert_eq!(ept.translate(&mem, KIB4).map(|t| t.hpa), Some(KIB4));
    }

    #[test]
    fn errors_display_the_addresses() {
        use alloc::string::ToString;
        assert_eq!(EptError::Overlap { gpa: 0x40_0000 }.to_string(), "GPA 0x400000 is already mapped");
        assert_eq!(EptError::NotMapped { gpa: 0x1000 }.to_string(), "GPA 0x1000 is not mapped");
        assert_eq!(
            EptError::InvalidAccess { access: Access::WRITE }.to_string(),
            "EPT access -w- is invalid (needs some access, and read with write)"
        );
        assert!(EptError::Misaligned { gpa: 0x800, hpa: 0, len: 0x1000 }.to_string().contains("GPA 0x800"));
    }
}
