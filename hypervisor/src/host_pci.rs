//! The machine's PCI configuration space (mechanism #1, ports 0xCF8/0xCFC, which the
//! hypervisor keeps), read at boot for the functions partitions own (`devices.pci`): each
//! one's header and BAR sizes become the `vmx::pci::PassedFunction` its owner sees.

extern crate alloc;

use alloc::format;
use alloc::string::String;
use config::PciFunction;
use vmx::pci::{PassedFunction, Unsupported};

const ADDRESS_PORT: u16 = 0xCF8;
const DATA_PORT: u16 = 0xCFC;
const ENABLE: u32 = 1 << 31;
const BAR0: u8 = 0x10;

/// The address/data pair: one access at a time.
static CONFIG_SPACE: spin::Mutex<()> = spin::Mutex::new(());

fn address(function: PciFunction, register: u8) -> u32 {
    ENABLE | (function.device as u32) << 11 | (function.function as u32) << 8 | (register & 0xFC) as u32
}

fn read(function: PciFunction, register: u8) -> u32 {
    let _config = CONFIG_SPACE.lock();
    let mut address_port = x86_64::instructions::port::Port::<u32>::new(ADDRESS_PORT);
    let mut data_port = x86_64::instructions::port::Port::<u32>::new(DATA_PORT);
    // SAFETY: PCI configuration mechanism #1, which the hypervisor keeps (no partition's I/O
    // bitmap lets it through); the lock keeps the address/data pair together.
    unsafe {
        address_port.write(address(function, register));
        data_port.read()
    }
}

fn write(function: PciFunction, register: u8, value: u32) {
    let _config = CONFIG_SPACE.lock();
    let mut address_port = x86_64::instructions::port::Port::<u32>::new(ADDRESS_PORT);
    let mut data_port = x86_64::instructions::port::Port::<u32>::new(DATA_PORT);
    // SAFETY: as in `read`.
    unsafe {
        address_port.write(address(function, register));
        data_port.write(value);
    }
}

/// Reads `function`'s header and sizes its BARs (all ones written and read back, the BAR
/// then put back: the standard probe, done before any guest runs): what its owner will see.
pub fn probe(function: PciFunction) -> Result<PassedFunction, String> {
    let id = read(function, 0);
    if id as u16 == 0xFFFF {
        return Err(format!("devices.pci: there is no PCI function {function} on this machine"));
    }
    let mut header = [0u32; 16];
    for (i, dword) in header.iter_mut().enumerate() {
        *dword = read(function, i as u8 * 4);
    }
    let mut bar_masks = [0u32; 6];
    // A bridge has two BARs and no more; `PassedFunction::new` refuses it anyway.
    if (header[3] >> 16) as u8 & 0x7F == 0 {
        for (bar, mask) in bar_masks.iter_mut().enumerate() {
            let register = BAR0 + bar as u8 * 4;
            let original = header[register as usize / 4];
            write(function, register, u32::MAX);
            *mask = read(function, register);
            write(function, register, original);
        }
    }
    PassedFunction::new(function.device, function.function, header, bar_masks).map_err(|e| match e {
        Unsupported::NotAnEndpoint { header_type } => {
            format!("devices.pci: {function} is not an endpoint (header type {header_type}): bridges are not passed through")
        }
        Unsupported::MemoryBar { bar } => format!(
            "devices.pci: {function} ({:04x}:{:04x}) decodes memory (BAR {bar}): only functions with I/O BARs alone are passed through",
            id as u16,
            (id >> 16) as u16
        ),
    })
}
