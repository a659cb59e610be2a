//! The Linux x86 boot protocol (Documentation/arch/x86/boot.rst), 64-bit entry: what a
//! partition's memory must hold for a bzImage to start at `startup_64` — the protected-mode
//! kernel at its preferred address, a zero page (`struct boot_params`) with the setup header,
//! an e820 memory map and the command line, identity page tables and a GDT with `__BOOT_CS`
//! (0x10) / `__BOOT_DS` (0x18) — and the register state for the boot vCPU.
//!
//! Written by hand: the boot protocol is a fixed byte layout, and no maintained no_std crate
//! writes it for a hypervisor's loader.

use crate::longmode::{
    write_identity_map, GuestMemory, GuestMemoryError, Segment, VcpuState, CR0_ET, CR0_MP, CR0_NE, CR0_PE, GDT_GPA,
    IDENTITY_MAP_SIZE, PAGE_TABLES_GPA, TSS_GPA, TSS_SIZE,
};
use core::fmt;

/// Where the zero page goes (below the page tables, above the real-mode IVT/BDA).
pub const ZERO_PAGE_GPA: u64 = 0x7000;
/// Where the command line goes.
pub const CMDLINE_GPA: u64 = 0x2_0000;
/// Longest command line written (the kernel's own limit, `cmdline_size`, may be lower).
pub const CMDLINE_MAX: usize = 4095;
/// Linux's boot selectors (arch/x86/include/asm/segment.h).
pub const BOOT_CS: u16 = 0x10;
pub const BOOT_DS: u16 = 0x18;
const BOOT_TSS: u16 = 0x20;
/// The 640 KiB of conventional memory the e820 map reports as RAM below the EBDA.
const LOW_RAM_END: u64 = 0x9_FC00;
/// Legacy ROM/BIOS area, reported reserved: the firmware tables go here (ACPI from 0xE0000,
/// the MP table from 0xF0000).
const BIOS_AREA: core::ops::Range<u64> = crate::acpi::ACPI_AREA_GPA..0x10_0000;
const MIB: u64 = 1 << 20;

// Setup-header offsets within the bzImage file and within `boot_params` (same offsets).
const SETUP_SECTS: usize = 0x1F1;
const BOOT_FLAG: usize = 0x1FE;
const JUMP: usize = 0x200;
const HEADER_MAGIC: usize = 0x202;
const VERSION: usize = 0x206;
const TYPE_OF_LOADER: usize = 0x210;
const LOADFLAGS: usize = 0x211;
const RAMDISK_IMAGE: usize = 0x218;
const RAMDISK_SIZE: usize = 0x21C;
const HEAP_END_PTR: usize = 0x224;
const CMD_LINE_PTR: usize = 0x228;
const INITRD_ADDR_MAX: usize = 0x22C;
const KERNEL_ALIGNMENT: usize = 0x230;
const RELOCATABLE: usize = 0x234;
const XLOADFLAGS: usize = 0x236;
const CMDLINE_SIZE: usize = 0x238;
const PREF_ADDRESS: usize = 0x258;
const INIT_SIZE: usize = 0x260;
// boot_params fields outside the setup header.
const ACPI_RSDP_ADDR: usize = 0x070;
const EXT_RAMDISK_IMAGE: usize = 0x0C0;
const EXT_RAMDISK_SIZE: usize = 0x0C4;
const EXT_CMD_LINE_PTR: usize = 0x0C8;
const E820_ENTRIES: usize = 0x1E8;
const E820_TABLE: usize = 0x2D0;
const E820_MAX: usize = 128;

const LOADED_HIGH: u8 = 1 << 0;
const CAN_USE_HEAP: u8 = 1 << 7;
const XLF_KERNEL_64: u16 = 1 << 0;
/// The 64-bit entry is 0x200 bytes into the protected-mode kernel.
const STARTUP_64_OFFSET: u64 = 0x200;
/// Oldest protocol with `pref_address`/`init_size` and the 64-bit entry (2.12 adds xloadflags).
const MIN_VERSION: u16 = 0x020C;

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinuxError {
    TooShort { len: usize },
    NotABzImage,
    ProtocolTooOld { version: u16 },
    No64BitEntry,
    CmdlineTooLong { len: usize, max: usize },
    MemoryTooSmall { needed: u64, size: u64 },
    InitrdDoesNotFit { len: usize },
    Memory(GuestMemoryError),
}

impl From<GuestMemoryError> for LinuxError {
    fn from(e: GuestMemoryError) -> Self {
        LinuxError::Memory(e)
    }
}

impl fmt::Display for LinuxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinuxError::TooShort { len } => write!(f, "{len} bytes is too short for a bzImage"),
            LinuxError::NotABzImage => write!(f, "not a Linux bzImage (no 0xAA55 boot flag / \"HdrS\" setup header)"),
            LinuxError::ProtocolTooOld { version } => {
                write!(f, "boot protocol {}.{:02} is older than 2.12 (no 64-bit entry)", version >> 8, version & 0xFF)
            }
            LinuxError::No64BitEntry => write!(f, "the kernel has no 64-bit entry point (XLF_KERNEL_64 clear)"),
            LinuxError::CmdlineTooLong { len, max } => {
                write!(f, "the command line is {len} bytes, the kernel takes at most {max}")
            }
            LinuxError::MemoryTooSmall { needed, size } => {
                write!(
                    f,
                    "the kernel needs {} MiB of guest memory, the partition has {} MiB",
                    needed.div_ceil(MIB),
                    size / MIB
                )
            }
            LinuxError::InitrdDoesNotFit { len } => {
                write!(f, "an initrd of {len} bytes does not fit below the kernel's limit")
            }
            LinuxError::Memory(e) => write!(f, "{e}"),
        }
    }
}

/// The parts of a bzImage's setup header a loader needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BzImage<'a> {
    pub bytes: &'a [u8],
    pub version: u16,
    pub setup_sects: u8,
    pub relocatable: bool,
    pub kernel_alignment: u32,
    pub pref_address: u64,
    /// Bytes the kernel needs from its load address while it decompresses and starts.
    pub init_size: u32,
    pub cmdline_size: u32,
    pub initrd_addr_max: u32,
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

impl<'a> BzImage<'a> {
    pub fn parse(bytes: &'a [u8]) -> Result<Self, LinuxError> {
        // Everything up to `init_size` (0x264) must be there to read the header.
        if bytes.len() < INIT_SIZE + 4 {
            return Err(LinuxError::TooShort { len: bytes.len() });
        }
        if u16_at(bytes, BOOT_FLAG) != 0xAA55 || &bytes[HEADER_MAGIC..HEADER_MAGIC + 4] != b"HdrS" {
            return Err(LinuxError::NotABzImage);
        }
        let version = u16_at(bytes, VERSION);
        if version < MIN_VERSION {
            return Err(LinuxError::ProtocolTooOld { version });
        }
        if u16_at(bytes, XLOADFLAGS) & XLF_KERNEL_64 == 0 {
            return Err(LinuxError::No64BitEntry);
        }
        let setup_sects = match bytes[SETUP_SECTS] {
            0 => 4, // the protocol's "0 means 4"
            n => n,
        };
        let image = BzImage {
            bytes,
            version,
            setup_sects,
            relocatable: bytes[RELOCATABLE] != 0,
            kernel_alignment: u32_at(bytes, KERNEL_ALIGNMENT),
            pref_address: u64_at(bytes, PREF_ADDRESS),
            init_size: u32_at(bytes, INIT_SIZE),
            cmdline_size: u32_at(bytes, CMDLINE_SIZE),
            initrd_addr_max: u32_at(bytes, INITRD_ADDR_MAX),
        };
        if image.kernel_offset() >= bytes.len() {
            return Err(LinuxError::TooShort { len: bytes.len() });
        }
        Ok(image)
    }

    /// File offset of the protected-mode kernel (after the real-mode setup sectors).
    pub fn kernel_offset(&self) -> usize {
        (self.setup_sects as usize + 1) * 512
    }

    /// Length of the setup header to copy into `boot_params` (the jump at 0x200 skips it).
    fn header_end(&self) -> usize {
        (JUMP + 2 + self.bytes[JUMP + 1] as usize).min(0x1000)
    }
}

/// One e820 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The memory map a partition of `size` bytes reports: conventional RAM, the EBDA/VGA/BIOS
/// hole, then RAM from 1 MiB to the end.
pub fn e820_map(size: u64) -> [E820Entry; 3] {
    [
        E820Entry { addr: 0, size: LOW_RAM_END, kind: E820_RAM },
        E820Entry { addr: BIOS_AREA.start, size: BIOS_AREA.end - BIOS_AREA.start, kind: E820_RESERVED },
        E820Entry { addr: MIB, size: size.saturating_sub(MIB), kind: E820_RAM },
    ]
}

pub struct LinuxParams<'a> {
    pub kernel: &'a BzImage<'a>,
    pub cmdline: &'a str,
    pub initrd: Option<&'a [u8]>,
    /// Guest-physical address of an ACPI RSDP the partition's firmware tables provide.
    pub acpi_rsdp: Option<u64>,
}

/// Where things went, for the loader's report and for the vCPU state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinuxLayout {
    pub kernel_gpa: u64,
    pub entry_gpa: u64,
    pub initrd_gpa: Option<u64>,
}

/// Where `kernel` (with an initrd of `initrd_len` bytes) goes in a partition of `size` bytes
/// with a command line of `cmdline_len` bytes, or why it cannot: every check `load_linux`
/// makes before it writes, so the config check can make them too.
pub fn place_linux(
    kernel: &BzImage,
    size: u64,
    cmdline_len: usize,
    initrd_len: Option<usize>,
) -> Result<LinuxLayout, LinuxError> {
    let k = kernel;
    let cmdline_max = (k.cmdline_size as usize).min(CMDLINE_MAX);
    if cmdline_len > cmdline_max {
        return Err(LinuxError::CmdlineTooLong { len: cmdline_len, max: cmdline_max });
    }
    // The preferred address, or the next alignment boundary above 16 MiB for a relocatable
    // kernel without one.
    let align = (k.kernel_alignment as u64).max(2 * MIB);
    let kernel_gpa = if k.pref_address != 0 { k.pref_address } else { (16 * MIB).div_ceil(align) * align };
    let protected_len = (k.bytes.len() - k.kernel_offset()) as u64;
    let kernel_end = kernel_gpa + (k.init_size as u64).max(protected_len);
    let mapped = size.min(IDENTITY_MAP_SIZE);
    if kernel_end > mapped {
        return Err(LinuxError::MemoryTooSmall { needed: kernel_end, size });
    }
    // The initrd goes at the top of memory, page-aligned, under the kernel's limit.
    let initrd_gpa = match initrd_len {
        None => None,
        Some(len) => {
            let top = mapped.min(k.initrd_addr_max as u64 + 1);
            let start = top.checked_sub(len as u64).map(|s| s & !0xFFF);
            match start {
                Some(s) if s >= kernel_end => Some(s),
                _ => return Err(LinuxError::InitrdDoesNotFit { len }),
            }
        }
    };
    Ok(LinuxLayout { kernel_gpa, entry_gpa: kernel_gpa + STARTUP_64_OFFSET, initrd_gpa })
}

/// Writes the kernel, zero page, command line, optional initrd, page tables and GDT into the
/// partition's memory. Everything is checked (`place_linux`) before anything is written.
pub fn load_linux(mem: &mut impl GuestMemory, p: &LinuxParams) -> Result<LinuxLayout, LinuxError> {
    let k = p.kernel;
    let size = mem.size();
    let layout = place_linux(k, size, p.cmdline.len(), p.initrd.map(<[u8]>::len))?;
    let (kernel_gpa, initrd_gpa) = (layout.kernel_gpa, layout.initrd_gpa);
    let protected = &k.bytes[k.kernel_offset()..];

    mem.write(kernel_gpa, protected)?;
    if let (Some(gpa), Some(initrd)) = (initrd_gpa, p.initrd) {
        mem.write(gpa, initrd)?;
    }
    let mut cmdline = [0u8; CMDLINE_MAX + 1];
    cmdline[..p.cmdline.len()].copy_from_slice(p.cmdline.as_bytes());
    mem.write(CMDLINE_GPA, &cmdline)?;

    let mut zero_page = [0u8; 4096];
    let header_end = k.header_end();
    zero_page[SETUP_SECTS..header_end].copy_from_slice(&k.bytes[SETUP_SECTS..header_end]);
    zero_page[TYPE_OF_LOADER] = 0xFF; // "undefined" loader
    zero_page[LOADFLAGS] |= LOADED_HIGH | CAN_USE_HEAP;
    zero_page[HEAP_END_PTR..HEAP_END_PTR + 2].copy_from_slice(&0xFE00u16.to_le_bytes());
    zero_page[CMD_LINE_PTR..CMD_LINE_PTR + 4].copy_from_slice(&(CMDLINE_GPA as u32).to_le_bytes());
    zero_page[EXT_CMD_LINE_PTR..EXT_CMD_LINE_PTR + 4].copy_from_slice(&((CMDLINE_GPA >> 32) as u32).to_le_bytes());
    if let (Some(gpa), Some(initrd)) = (initrd_gpa, p.initrd) {
        zero_page[RAMDISK_IMAGE..RAMDISK_IMAGE + 4].copy_from_slice(&(gpa as u32).to_le_bytes());
        zero_page[RAMDISK_SIZE..RAMDISK_SIZE + 4].copy_from_slice(&(initrd.len() as u32).to_le_bytes());
        zero_page[EXT_RAMDISK_IMAGE..EXT_RAMDISK_IMAGE + 4].copy_from_slice(&((gpa >> 32) as u32).to_le_bytes());
        zero_page[EXT_RAMDISK_SIZE..EXT_RAMDISK_SIZE + 4]
            .copy_from_slice(&((initrd.len() as u64 >> 32) as u32).to_le_bytes());
    }
    if let Some(rsdp) = p.acpi_rsdp {
        zero_page[ACPI_RSDP_ADDR..ACPI_RSDP_ADDR + 8].copy_from_slice(&rsdp.to_le_bytes());
    }
    let map = e820_map(size);
    debug_assert!(map.len() <= E820_MAX);
    zero_page[E820_ENTRIES] = map.len() as u8;
    for (i, e) in map.iter().enumerate() {
        let o = E820_TABLE + i * 20;
        zero_page[o..o + 8].copy_from_slice(&e.addr.to_le_bytes());
        zero_page[o + 8..o + 16].copy_from_slice(&e.size.to_le_bytes());
        zero_page[o + 16..o + 20].copy_from_slice(&e.kind.to_le_bytes());
    }
    mem.write(ZERO_PAGE_GPA, &zero_page)?;

    write_identity_map(mem)?;
    mem.write(GDT_GPA, &gdt_bytes())?;
    mem.write(TSS_GPA, &[0u8; TSS_SIZE as usize])?;
    Ok(layout)
}

/// The GDT Linux's 64-bit entry requires: `__BOOT_CS` = 0x10 (64-bit code), `__BOOT_DS` =
/// 0x18 (data), plus the busy TSS VM entry needs at 0x20.
pub fn gdt_bytes() -> [u8; 6 * 8] {
    let tss = Segment::tss().at(BOOT_TSS);
    let entries = [
        0,
        0,
        Segment::code64().at(BOOT_CS).descriptor_low(),
        Segment::data().at(BOOT_DS).descriptor_low(),
        tss.descriptor_low(),
        tss.base >> 32,
    ];
    let mut b = [0u8; 6 * 8];
    for (chunk, e) in b.chunks_exact_mut(8).zip(entries) {
        chunk.copy_from_slice(&e.to_le_bytes());
    }
    b
}

/// The boot vCPU at `startup_64`: long mode, paging on the identity map, interrupts off,
/// RSI = the zero page (the protocol's only register argument).
pub fn boot_vcpu_state(layout: &LinuxLayout) -> VcpuState {
    let data = Segment::data().at(BOOT_DS);
    VcpuState {
        rip: layout.entry_gpa,
        rsp: 0, // startup_64 sets up its own stack
        rflags: 0x2,
        rdi: 0,
        rsi: ZERO_PAGE_GPA,
        cr0: CR0_PE | CR0_MP | CR0_ET | CR0_NE | (1 << 31),
        cr3: PAGE_TABLES_GPA,
        cr4: 1 << 5,                // PAE
        efer: (1 << 8) | (1 << 10), // LME | LMA
        cs: Segment::code64().at(BOOT_CS),
        ds: data,
        es: data,
        ss: data,
        fs: data,
        gs: data,
        tr: Segment::tss().at(BOOT_TSS),
        ldtr: Segment::unusable(),
        gdtr_base: GDT_GPA,
        gdtr_limit: 6 * 8 - 1,
        idtr_base: 0,
        idtr_limit: 0,
    }
}

/// An application processor after INIT and a start-up IPI with `vector` (SDM 9.4.4, 10.6.1):
/// real mode at `vector * 4096`, everything else in its reset state. Needs "unrestricted
/// guest" to enter.
pub fn startup_ipi_state(vector: u8) -> VcpuState {
    let real = |selector: u16, base: u64, access_rights: u32| Segment { selector, base, limit: 0xFFFF, access_rights };
    let data = real(0, 0, 0x93);
    VcpuState {
        rip: 0,
        rsp: 0,
        rflags: 0x2,
        rdi: 0,
        rsi: 0,
        cr0: CR0_ET | CR0_NE,
        cr3: 0,
        cr4: 0,
        efer: 0,
        cs: real((vector as u16) << 8, (vector as u64) << 12, 0x9B),
        ds: data,
        es: data,
        ss: data,
        fs: data,
        gs: data,
        tr: real(0, 0, 0x8B),
        ldtr: real(0, 0, 0x82),
        gdtr_base: 0,
        gdtr_limit: 0xFFFF,
        idtr_base: 0,
        idtr_limit: 0xFFFF,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::longmode::VecGuestMemory as Memory;
    use alloc::vec;
    use alloc::vec::Vec;

    /// A minimal bzImage: boot protocol 2.15 header, 64-bit, relocatable, `setup_sects` real
    /// mode sectors, then a recognisable protected-mode payload.
    fn bzimage(setup_sects: u8, payload: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; (setup_sects as usize + 1) * 512];
        b[SETUP_SECTS] = setup_sects;
        b[BOOT_FLAG..BOOT_FLAG + 2].copy_from_slice(&0xAA55u16.to_le_bytes());
        b[JUMP] = 0xEB;
        b[JUMP + 1] = 0x6A; // header runs to 0x26C
        b[HEADER_MAGIC..HEADER_MAGIC + 4].copy_from_slice(b"HdrS");
        b[VERSION..VERSION + 2].copy_from_slice(&0x020Fu16.to_le_bytes());
        b[LOADFLAGS] = LOADED_HIGH;
        b[INITRD_ADDR_MAX..INITRD_ADDR_MAX + 4].copy_from_slice(&0x7FFF_FFFFu32.to_le_bytes());
        b[KERNEL_ALIGNMENT..KERNEL_ALIGNMENT + 4].copy_from_slice(&0x20_0000u32.to_le_bytes());
        b[RELOCATABLE] = 1;
        b[XLOADFLAGS..XLOADFLAGS + 2].copy_from_slice(&0x7Fu16.to_le_bytes());
        b[CMDLINE_SIZE..CMDLINE_SIZE + 4].copy_from_slice(&2047u32.to_le_bytes());
        b[PREF_ADDRESS..PREF_ADDRESS + 8].copy_from_slice(&0x100_0000u64.to_le_bytes());
        b[INIT_SIZE..INIT_SIZE + 4].copy_from_slice(&(4 * MIB as u32).to_le_bytes());
        b.extend_from_slice(payload);
        b
    }

    #[test]
    fn parses_the_setup_header() {
        let image = bzimage(27, b"KERNEL");
        let k = BzImage::parse(&image).unwrap();
        assert_eq!(k.version, 0x020F);
        assert_eq!(k.kernel_offset(), 28 * 512);
        assert!(k.relocatable);
        assert_eq!(k.pref_address, 0x100_0000);
        assert_eq!(k.init_size, 4 << 20);
    }

    #[test]
    fn rejects_what_it_cannot_boot_with_the_reason() {
        assert_eq!(BzImage::parse(&[0u8; 100]), Err(LinuxError::TooShort { len: 100 }));
        let mut image = bzimage(4, &[0; 4096]);
        image[HEADER_MAGIC] = b'X';
        assert_eq!(BzImage::parse(&image), Err(LinuxError::NotABzImage));
        let mut image = bzimage(4, &[0; 4096]);
        image[VERSION..VERSION + 2].copy_from_slice(&0x0206u16.to_le_bytes());
        let e = BzImage::parse(&image).unwrap_err();
        assert_eq!(e, LinuxError::ProtocolTooOld { version: 0x0206 });
        assert!(e.to_string().contains("2.06"), "{e}");
        let mut image = bzimage(4, &[0; 4096]);
        image[XLOADFLAGS] = 0;
        assert_eq!(BzImage::parse(&image), Err(LinuxError::No64BitEntry));
    }

    #[test]
    fn loads_kernel_zero_page_cmdline_and_initrd() {
        let image = bzimage(4, b"\x90KERNEL-PAYLOAD");
        let k = BzImage::parse(&image).unwrap();
        let mut mem = Memory(vec![0; 64 << 20]);
        let initrd = vec![0xA5u8; 10_000];
        let layout = load_linux(
            &mut mem,
            &LinuxParams {
                kernel: &k,
                cmdline: "console=ttyS0 quiet",
                initrd: Some(&initrd),
                acpi_rsdp: Some(0xE0000),
            },
        )
        .unwrap();
        assert_eq!(layout.kernel_gpa, 0x100_0000);
        assert_eq!(layout.entry_gpa, 0x100_0200);
        assert_eq!(&mem.0[0x100_0000..0x100_000F], b"\x90KERNEL-PAYLOAD");
        let zp = &mem.0[ZERO_PAGE_GPA as usize..ZERO_PAGE_GPA as usize + 4096];
        assert_eq!(&zp[HEADER_MAGIC..HEADER_MAGIC + 4], b"HdrS", "setup header copied");
        assert_eq!(zp[TYPE_OF_LOADER], 0xFF);
        assert_eq!(zp[LOADFLAGS] & (LOADED_HIGH | CAN_USE_HEAP), LOADED_HIGH | CAN_USE_HEAP);
        assert_eq!(u32_at(zp, CMD_LINE_PTR) as u64, CMDLINE_GPA);
        assert_eq!(&mem.0[CMDLINE_GPA as usize..CMDLINE_GPA as usize + 20], b"console=ttyS0 quiet\0");
        let initrd_gpa = layout.initrd_gpa.unwrap();
        assert_eq!(initrd_gpa % 4096, 0);
        assert!(initrd_gpa + 10_000 <= 64 << 20 && initrd_gpa >= 0x100_0000 + (4 << 20));
        assert_eq!(u32_at(zp, RAMDISK_IMAGE) as u64, initrd_gpa);
        assert_eq!(u32_at(zp, RAMDISK_SIZE), 10_000);
        assert_eq!(u64_at(zp, ACPI_RSDP_ADDR), 0xE0000);
        assert_eq!(zp[E820_ENTRIES], 3);
        let last = E820_TABLE + 2 * 20;
        assert_eq!((u64_at(zp, last), u64_at(zp, last + 8), u32_at(zp, last + 16)), (MIB, 63 * MIB, E820_RAM));
        // The GDT holds __BOOT_CS / __BOOT_DS where Linux expects them.
        let gdt = &mem.0[GDT_GPA as usize..GDT_GPA as usize + 48];
        assert_eq!(u64::from_le_bytes(gdt[16..24].try_into().unwrap()), 0x00AF_9B00_0000_FFFF);
        assert_eq!(u64::from_le_bytes(gdt[24..32].try_into().unwrap()), 0x00CF_9300_0000_FFFF);
    }

    #[test]
    fn the_initrd_never_overlaps_the_kernel_the_zero_page_or_the_end_of_memory() {
        let image = bzimage(4, &[1; 64]);
        let mut k = BzImage::parse(&image).unwrap();
        let kernel_end = 0x100_0000 + (4 << 20);
        for initrd_addr_max in [u32::MAX, 0x37FF_FFFF, 0x17F_FFFF] {
            k.initrd_addr_max = initrd_addr_max;
            for size in [20 * MIB + 4096, 24 * MIB, 64 * MIB, 512 * MIB, 8192 * MIB] {
                for len in [1usize, 4095, 4096, 4097, 3 << 20, 5 << 20, 40 << 20, 600 << 20] {
                    match place_linux(&k, size, 10, Some(len)) {
                        Ok(layout) => {
                            let gpa = layout.initrd_gpa.unwrap();
                            assert_eq!(gpa % 4096, 0);
                            assert!(gpa >= kernel_end, "{gpa:#x} overlaps the kernel");
                            assert!(gpa > ZERO_PAGE_GPA + 4096 && gpa > CMDLINE_GPA + CMDLINE_MAX as u64);
                            let end = gpa + len as u64;
                            assert!(end <= size.min(IDENTITY_MAP_SIZE), "{end:#x} past memory {size:#x}");
                            assert!(end <= initrd_addr_max as u64 + 1, "{end:#x} past the kernel's limit");
                        }
                        Err(e) => {
                            assert_eq!(e, LinuxError::InitrdDoesNotFit { len });
                            let room = size.min(IDENTITY_MAP_SIZE).min(initrd_addr_max as u64 + 1) - kernel_end;
                            assert!(len as u64 > room - 4095, "{len} refused with {room} bytes free");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn too_little_memory_or_too_long_a_command_line_is_refused_before_writing() {
        let image = bzimage(4, &[1; 64]);
        let k = BzImage::parse(&image).unwrap();
        let mut mem = Memory(vec![0; 16 << 20]);
        let e =
            load_linux(&mut mem, &LinuxParams { kernel: &k, cmdline: "", initrd: None, acpi_rsdp: None }).unwrap_err();
        assert_eq!(e, LinuxError::MemoryTooSmall { needed: 0x100_0000 + (4 << 20), size: 16 << 20 });
        assert!(e.to_string().contains("needs 20 MiB"), "{e}");
        assert!(mem.0.iter().all(|&b| b == 0), "nothing written");
        let long = "x".repeat(3000);
        let mut mem = Memory(vec![0; 64 << 20]);
        let e = load_linux(&mut mem, &LinuxParams { kernel: &k, cmdline: &long, initrd: None, acpi_rsdp: None })
            .unwrap_err();
        assert_eq!(e, LinuxError::CmdlineTooLong { len: 3000, max: 2047 });
    }

    #[test]
    fn a_started_ap_is_in_real_mode_at_the_vector_page() {
        let s = startup_ipi_state(0x9A);
        assert_eq!((s.cs.selector, s.cs.base, s.rip), (0x9A00, 0x9A000, 0));
        assert_eq!(s.cr0 & CR0_PE, 0, "real mode");
        assert_eq!(s.efer, 0);
    }

    #[test]
    fn boot_vcpu_state_meets_the_protocol() {
        let layout = LinuxLayout { kernel_gpa: 0x100_0000, entry_gpa: 0x100_0200, initrd_gpa: None };
        let s = boot_vcpu_state(&layout);
        assert_eq!((s.cs.selector, s.ds.selector, s.ss.selector), (BOOT_CS, BOOT_DS, BOOT_DS));
        assert_eq!(s.rsi, ZERO_PAGE_GPA);
        assert_eq!(s.rflags & (1 << 9), 0, "interrupts off at entry");
    }
}
