//! Physical memory: what the boot loader reports, what must never be handed out, the
//! hypervisor's heap, and what is left for partitions.
//!
//! Multiboot2 (GRUB) is read with the `multiboot2` crate. Multiboot1 (QEMU `-kernel`) is
//! read by hand: its info block is a handful of fixed fields and no maintained no_std crate
//! covers it.

extern crate alloc;

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::ops::Range;
use ept::phys::RangeSet;
use linked_list_allocator::LockedHeap;
use multiboot2::{BootInformation, BootInformationHeader, MemoryAreaType};

pub const MULTIBOOT2_MAGIC: u32 = 0x36D7_6289;
pub const MULTIBOOT1_MAGIC: u32 = 0x2BAD_B002;

/// The hypervisor's own heap: per-CPU structures, VMCS/VMXON regions, EPT tables (the config
/// check refuses what would not fit), and room for the largest trace it accepts.
const HEAP_SIZE: u64 = config::HEAP_BYTES + config::MAX_TRACE_BYTES;
/// Real-mode IVT/BDA/EBDA, the AP trampoline and legacy ROMs: never handed out.
const LOW_MEMORY_END: u64 = 0x10_0000;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

pub type Ranges = RangeSet<64>;

/// A boot module: its name is the first word of its command line (e.g. `partitions.toml`).
#[derive(Debug, Clone)]
pub struct BootModule {
    pub name: String,
    pub range: Range<u64>,
}

impl BootModule {
    pub fn bytes(&self) -> &'static [u8] {
        // SAFETY: module memory is identity-mapped and excluded from every allocator for the
        // whole run, so it is never written.
        unsafe {
            core::slice::from_raw_parts(self.range.start as *const u8, (self.range.end - self.range.start) as usize)
        }
    }
}

#[derive(Debug)]
pub struct BootInfo {
    pub loader: &'static str,
    pub cmdline: String,
    pub modules: Vec<BootModule>,
    /// RSDP revision and RSDT/XSDT address, when the boot loader passed them.
    pub acpi_root: Option<(u8, u64)>,
    /// Usable RAM reported by the boot loader.
    pub usable_total: u64,
    /// Heap placement.
    pub heap: Range<u64>,
    /// Memory left for partitions: usable RAM minus everything reserved and the heap.
    pub partition_memory: Ranges,
}

/// What the early scan found, before any heap exists.
struct EarlyScan {
    usable: Ranges,
    reserved: Ranges,
}

fn read_u32(addr: u64) -> u32 {
    // SAFETY: callers pass addresses inside the multiboot1 info block, identity-mapped.
    unsafe { core::ptr::read_unaligned(addr as *const u32) }
}

fn read_u64(addr: u64) -> u64 {
    // SAFETY: as in `read_u32`.
    unsafe { core::ptr::read_unaligned(addr as *const u64) }
}

fn c_string(addr: u64) -> String {
    let mut bytes = Vec::new();
    let mut p = addr;
    loop {
        // SAFETY: a NUL-terminated string placed by the boot loader in identity-mapped memory.
        let b = unsafe { core::ptr::read(p as *const u8) };
        if b == 0 || bytes.len() > 4096 {
            break;
        }
        bytes.push(b);
        p += 1;
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

fn load_mb2(info: u64) -> Result<BootInformation<'static>, &'static str> {
    // SAFETY: GRUB passed this pointer in EBX with the multiboot2 magic; the block is
    // identity-mapped and reserved for the whole run.
    unsafe { BootInformation::load(info as *const BootInformationHeader) }
        .map_err(|_| "malformed multiboot2 information")
}

fn early_scan(magic: u32, info: u64) -> Result<EarlyScan, &'static str> {
    let mut usable = Ranges::new();
    let mut reserved = Ranges::new();
    let full = |_| "too many memory map fragments";
    reserved.insert(0..LOW_MEMORY_END).map_err(full)?;
    reserved.insert(crate::boot::image_range()).map_err(full)?;
    match magic {
        MULTIBOOT2_MAGIC => {
            let mbi = load_mb2(info)?;
            reserved.insert(mbi.start_address() as u64..mbi.end_address() as u64).map_err(full)?;
            let map = mbi.memory_map_tag().ok_or("the boot loader passed no memory map")?;
            for area in map.memory_areas() {
                if MemoryAreaType::from(area.typ()) == MemoryAreaType::Available {
                    usable.insert(area.start_address()..area.end_address()).map_err(full)?;
                }
            }
            for module in mbi.module_tags() {
                reserved.insert(module.start_address() as u64..module.end_address() as u64).map_err(full)?;
            }
        }
        MULTIBOOT1_MAGIC => {
            let flags = read_u32(info);
            reserved.insert(info..info + 0x80).map_err(full)?;
            if flags & (1 << 6) == 0 {
                return Err("the boot loader passed no memory map");
            }
            let (length, addr) = (read_u32(info + 44) as u64, read_u32(info + 48) as u64);
            let mut entry = addr;
            while entry < addr + length {
                let size = read_u32(entry) as u64;
                let (base, len, kind) = (read_u64(entry + 4), read_u64(entry + 12), read_u32(entry + 20));
                if kind == 1 {
                    usable.insert(base..base + len).map_err(full)?;
                }
                entry += size + 4;
            }
            if flags & (1 << 3) != 0 {
                let (count, mods) = (read_u32(info + 20) as u64, read_u32(info + 24) as u64);
                reserved.insert(mods..mods + count * 16).map_err(full)?;
                for i in 0..count {
                    let m = mods + i * 16;
                    reserved.insert(read_u32(m) as u64..read_u32(m + 4) as u64).map_err(full)?;
                    // Module strings live somewhere in low memory: reserve the page they are in.
                    let s = read_u32(m + 8) as u64 & !0xFFF;
                    reserved.insert(s..s + 0x2000).map_err(full)?;
                }
            }
            if flags & (1 << 2) != 0 {
                let s = read_u32(info + 16) as u64 & !0xFFF;
                reserved.insert(s..s + 0x2000).map_err(full)?;
            }
        }
        _ => return Err("not started by a multiboot boot loader (unknown magic)"),
    }
    Ok(EarlyScan { usable, reserved })
}

fn module_name(cmdline: &str) -> String {
    let first = cmdline.split_whitespace().next().unwrap_or("");
    // GRUB passes the path when no name is given: keep the file name.
    first.rsplit('/').next().unwrap_or(first).to_string()
}

/// Reads the boot information, reserves what must be kept, and starts the heap.
pub fn init(magic: u32, info: u64) -> Result<BootInfo, &'static str> {
    let scan = early_scan(magic, info)?;
    let mut free = scan.usable.clone();
    for r in scan.reserved.as_slice() {
        free.remove(r.clone()).map_err(|_| "too many memory map fragments")?;
    }
    let heap_start = free.take(HEAP_SIZE, 0x20_0000).ok_or("not enough memory for the hypervisor heap")?;
    // SAFETY: the range was just removed from the free set, is identity-mapped RAM, and is
    // used by nothing else.
    unsafe { HEAP.lock().init(heap_start as *mut u8, HEAP_SIZE as usize) };

    let mut boot = BootInfo {
        loader: "",
        cmdline: String::new(),
        modules: Vec::new(),
        acpi_root: None,
        usable_total: scan.usable.total(),
        heap: heap_start..heap_start + HEAP_SIZE,
        partition_memory: free,
    };
    if magic == MULTIBOOT2_MAGIC {
        let mbi = load_mb2(info)?;
        boot.loader = "multiboot2";
        boot.cmdline = mbi.command_line_tag().and_then(|t| t.cmdline().ok()).unwrap_or("").to_string();
        for m in mbi.module_tags() {
            boot.modules.push(BootModule {
                name: module_name(m.cmdline().unwrap_or("")),
                range: m.start_address() as u64..m.end_address() as u64,
            });
        }
        boot.acpi_root = match (mbi.rsdp_v2_tag(), mbi.rsdp_v1_tag()) {
            (Some(v2), _) if v2.xsdt_address() != 0 => Some((v2.revision(), v2.xsdt_address() as u64)),
            (_, Some(v1)) => Some((0, v1.rsdt_address() as u64)),
            _ => None,
        };
    } else {
        boot.loader = "multiboot1";
        let flags = read_u32(info);
        if flags & (1 << 2) != 0 {
            boot.cmdline = c_string(read_u32(info + 16) as u64);
        }
        if flags & (1 << 3) != 0 {
            let (count, mods) = (read_u32(info + 20) as u64, read_u32(info + 24) as u64);
            for i in 0..count {
                let m = mods + i * 16;
                boot.modules.push(BootModule {
                    name: module_name(&c_string(read_u32(m + 8) as u64)),
                    range: read_u32(m) as u64..read_u32(m + 4) as u64,
                });
            }
        }
    }
    Ok(boot)
}

/// Allocates zeroed, 4 KiB-aligned, never-freed memory from the heap (VMXON/VMCS regions,
/// tables); identity mapping makes its address physical.
/// Bytes of the heap in use now.
pub fn heap_used() -> u64 {
    HEAP.lock().used() as u64
}

pub fn alloc_zeroed_pages(pages: usize) -> &'static mut [u8] {
    let layout = core::alloc::Layout::from_size_align(pages * 4096, 4096).expect("page layout");
    // SAFETY: non-zero size layout; the memory is leaked on purpose.
    let ptr = unsafe { alloc::alloc::alloc_zeroed(layout) };
    assert!(!ptr.is_null(), "hypervisor heap exhausted");
    // SAFETY: freshly allocated, exclusively owned, `pages * 4096` bytes.
    unsafe { core::slice::from_raw_parts_mut(ptr, pages * 4096) }
}
