//! The devices a partition's vCPUs share, and the exits that reach them: its COM1
//! (`vuart`) with the interrupt line into its IO-APIC (`vioapic`), the PC platform devices
//! (`platform`: PICs, RTC, PCI host bridge, ACPI power and reset), the IO-APIC's MMIO window,
//! each vCPU's xAPIC MMIO page (`vlapic`, decoded with `mmio`), and the routing of IPIs and
//! start-ups between sibling vCPUs. Shared between the pCPUs that run the siblings: each
//! sibling's pending IPIs and start-up vector are lock-free sets its own pCPU takes before it
//! next enters the guest; the UART and IO-APIC are behind spin locks.
//!
//! What the hypervisor must do on another pCPU's behalf (look at a sibling now) comes back as
//! [`DeviceEffects`]; nothing here touches hardware.

extern crate alloc;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use spin::Mutex;

use crate::exit::IoAccess;
use crate::mmio::{self, MmioAccess, MmioOperation};
use crate::platform::{PlatformDevices, PowerRequest, WallClock};
use crate::vcpu_access::{gpr, VcpuAccess};
use crate::vioapic::{Assertion, VirtualIoApic, IOAPIC_BASE_ADDRESS};
use crate::vlapic::{reg, Destination, IcrCommand, VirtualLapic};
use crate::vuart::VirtualUart;

/// Guest-physical page of every vCPU's xAPIC (not mapped in the EPT: accesses exit).
pub const LAPIC_PAGE: u64 = crate::msr::APIC_BASE_ADDRESS;
/// Guest-physical page of the partition's IO-APIC (not mapped: accesses exit).
pub const IOAPIC_PAGE: u64 = IOAPIC_BASE_ADDRESS;
pub const COM1: u16 = 0x3F8;
/// COM1's line into the IO-APIC (the MP table's ISA IRQ 4).
pub const COM1_IRQ: usize = 4;

/// Sibling vCPUs (by index, below 256) whose pCPU must look at them now: they were posted an
/// IPI or a start-up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Kicks([u64; 4]);

impl Kicks {
    fn add(&mut self, vcpu: u32) {
        self.0[vcpu as usize / 64 % 4] |= 1 << (vcpu % 64);
    }

    pub fn is_empty(&self) -> bool {
        self.0 == [0; 4]
    }

    /// The vCPUs in the set, lowest first (only the set bits are visited).
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().enumerate().flat_map(|(word, &bits)| {
            let mut rest = bits;
            core::iter::from_fn(move || {
                (rest != 0).then(|| {
                    let bit = rest.trailing_zeros();
                    rest &= rest - 1;
                    word as u32 * 64 + bit
                })
            })
        })
    }
}

/// Where a raised IO-APIC pin went (as the guest routed it: masked, an edge lost as on
/// hardware; a level line still in service; or delivered) and the vCPUs that must look at it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RaisedIrq {
    pub assertion: Assertion,
    pub kicks: Kicks,
}

/// What a device exit leaves for the hypervisor to do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceEffects {
    pub kicks: Kicks,
    /// A byte the guest wrote to its COM1 (for the console).
    pub console: Option<u8>,
    /// An IPI Phalanx does not deliver (NMI, SMI, ...), for a warning.
    pub unsupported_ipi: Option<IcrCommand>,
    /// The guest asked for a reset or a power-off.
    pub power: Option<PowerRequest>,
    /// IO-APIC pins (bit N: pin N) whose level-triggered line may be taken again: the guest
    /// EOIed its interrupt, or unmasked the pin. The hypervisor unmasks the physical lines
    /// behind them (a line still asserted then interrupts again).
    pub level_pins_free: u32,
}

pub struct PartitionDevices {
    vcpus: u32,
    uart: Mutex<VirtualUart>,
    platform: Mutex<PlatformDevices>,
    ioapic: Mutex<VirtualIoApic>,
    /// The UART's interrupt line as last seen (interrupts are its rising edges).
    uart_line: AtomicBool,
    /// IPIs sent to each vCPU by its siblings (256-bit vector sets).
    pending_ipis: Vec<[AtomicU64; 4]>,
    /// Which of those are level-triggered device interrupts (noted in the TMR when taken).
    pending_level: Vec<[AtomicU64; 4]>,
    /// Each vCPU's logical APIC ID (its LDR), for logical-destination IPIs.
    logical_ids: Vec<AtomicU8>,
    /// A start-up IPI's vector for each vCPU (0x100 | vector), until its pCPU takes it.
    startup_vectors: Vec<AtomicU32>,
    /// Whether each vCPU runs (a Linux partition's application processors wait for their
    /// start-up IPI; the test guest starts on every vCPU at once).
    started: Vec<AtomicBool>,
}

impl PartitionDevices {
    /// Devices for `vcpus` vCPUs; `all_started`: every vCPU runs from power-on (else only
    /// vCPU 0 does and the others wait for a start-up IPI); `clock`: the time of day.
    pub fn new(vcpus: u32, ioapic_id: u8, all_started: bool, clock: WallClock) -> Self {
        let devices = PartitionDevices {
            vcpus,
            uart: Mutex::new(VirtualUart::new()),
            platform: Mutex::new(PlatformDevices::new(clock)),
            ioapic: Mutex::new(VirtualIoApic::new(ioapic_id)),
            uart_line: AtomicBool::new(false),
            pending_ipis: (0..vcpus).map(|_| [const { AtomicU64::new(0) }; 4]).collect(),
            pending_level: (0..vcpus).map(|_| [const { AtomicU64::new(0) }; 4]).collect(),
            logical_ids: (0..vcpus).map(|_| AtomicU8::new(0)).collect(),
            startup_vectors: (0..vcpus).map(|_| AtomicU32::new(0)).collect(),
            started: (0..vcpus).map(|_| AtomicBool::new(false)).collect(),
        };
        devices.power_on(all_started);
        devices
    }

    /// Which vCPUs run after a reset (see `new`); the platform devices and the IO-APIC return
    /// to their power-on state (a reboot finds its PICs and pins masked, no level interrupt in
    /// service, its power control idle). The UART keeps what the guest last programmed: it
    /// reinitialises it when it boots.
    pub fn power_on(&self, all_started: bool) {
        self.ioapic.lock().reset();
        for (v, started) in self.started.iter().enumerate() {
            started.store(all_started || v == 0, Ordering::Release);
        }
        let mut platform = self.platform.lock();
        *platform = platform.after_reset();
    }

    /// Shows a PCI function the partition owns in its configuration space (at boot).
    pub fn pass_through(&self, function: crate::pci::PassedFunction) {
        self.platform.lock().pass_through(function);
    }

    pub fn is_started(&self, vcpu: u32) -> bool {
        self.started[vcpu as usize].load(Ordering::Acquire)
    }

    /// The start-up vector posted for `vcpu`, once.
    pub fn take_startup(&self, vcpu: u32) -> Option<u8> {
        let slot = &self.startup_vectors[vcpu as usize];
        if slot.load(Ordering::Acquire) == 0 {
            return None;
        }
        match slot.swap(0, Ordering::AcqRel) {
            0 => None,
            v => Some(v as u8),
        }
    }

    /// Takes the IPIs posted to `vcpu` into its virtual LAPIC.
    pub fn take_ipis(&self, vcpu: u32, lapic: &mut VirtualLapic) {
        for (word, bits) in self.pending_ipis[vcpu as usize].iter().enumerate() {
            if bits.load(Ordering::Acquire) == 0 {
                continue;
            }
            let mut set = bits.swap(0, Ordering::AcqRel);
            let level = &self.pending_level[vcpu as usize][word];
            while set != 0 {
                let bit = set.trailing_zeros();
                let vector = (word as u32 * 64 + bit) as u8;
                if level.load(Ordering::Acquire) & (1 << bit) != 0
                    && level.fetch_and(!(1 << bit), Ordering::AcqRel) & (1 << bit) != 0
                {
                    lapic.accept_level(vector);
                } else {
                    lapic.accept(vector);
                }
                set &= set - 1;
            }
        }
    }

    /// IN/OUT by vCPU `vcpu` (whose LAPIC is `lapic`) at TSC `now`: COM1, the platform
    /// devices, or absent hardware elsewhere; INS/OUTS one element per exit (`string_io`).
    /// `Err` when a string instruction's memory cannot be reached.
    pub fn port_io(
        &self,
        cpu: &mut impl VcpuAccess,
        vcpu: u32,
        lapic: &mut VirtualLapic,
        access: IoAccess,
        now: u64,
    ) -> Result<DeviceEffects, String> {
        let mut effects = DeviceEffects::default();
        if access.string {
            self.string_io(cpu, vcpu, lapic, access, now, &mut effects)?;
            return Ok(effects);
        }
        if access.input {
            let value = self.port_read(vcpu, lapic, access.port, access.size, now, &mut effects);
            let rax = cpu.gpr(gpr::RAX);
            cpu.set_gpr(gpr::RAX, crate::emulate::in_result(rax, access.size, value as u64));
        } else {
            let value = cpu.gpr(gpr::RAX) as u32;
            self.port_write(vcpu, lapic, access.port, access.size, value, &mut effects);
        }
        cpu.skip_instruction();
        Ok(effects)
    }

    /// INS or OUTS, one element: it moves between the port and guest memory at the linear
    /// address the exit reports (through the guest's page tables), RSI or RDI steps by its
    /// size (down under RFLAGS.DF), and with REP, RCX counts down and RIP stays until the count
    /// is done, so the CPU executes the instruction again for the next element, interruptible
    /// in between as on the CPU. Slow (an exit per element), but a driver's probe or a
    /// `rep outsb` to a UART runs instead of stopping its partition.
    fn string_io(
        &self,
        cpu: &mut impl VcpuAccess,
        vcpu: u32,
        lapic: &mut VirtualLapic,
        access: IoAccess,
        now: u64,
        effects: &mut DeviceEffects,
    ) -> Result<(), String> {
        use x86::vmx::vmcs::{guest, ro};
        const RFLAGS_DF: u64 = 1 << 10;
        // VM-exit instruction information, bits 9:7: address size (16, 32 or 64 bits).
        let address_mask = match (cpu.read_field(ro::VMEXIT_INSTRUCTION_INFO) >> 7) & 0b111 {
            0 => 0xFFFF,
            1 => 0xFFFF_FFFF,
            _ => u64::MAX,
        };
        let count = cpu.gpr(gpr::RCX) & address_mask;
        if access.rep && count == 0 {
            cpu.skip_instruction();
            return Ok(());
        }
        let size = access.size.clamp(1, 4) as usize;
        let linear = cpu.read_field(ro::GUEST_LINEAR_ADDR);
        let mut element = [0u8; 4];
        // Byte by byte: an element may straddle a page boundary.
        let gpas = (0..size as u64)
            .map(|i| guest_physical(cpu, linear + i))
            .collect::<Option<Vec<u64>>>()
            .ok_or_else(|| format!("string I/O on port {:#x}: {linear:#x} is not mapped", access.port))?;
        let unreachable = || format!("string I/O on port {:#x}: {linear:#x} is outside the partition", access.port);
        let pointer = if access.input {
            let value = self.port_read(vcpu, lapic, access.port, access.size, now, effects);
            element = value.to_le_bytes();
            for (i, &gpa) in gpas.iter().enumerate() {
                cpu.write_physical(gpa, &element[i..i + 1]).ok_or_else(unreachable)?;
            }
            gpr::RDI
        } else {
            for (i, &gpa) in gpas.iter().enumerate() {
                cpu.read_physical(gpa, &mut element[i..i + 1]).ok_or_else(unreachable)?;
            }
            self.port_write(vcpu, lapic, access.port, access.size, u32::from_le_bytes(element), effects);
            gpr::RSI
        };
        let step =
            if cpu.read_field(guest::RFLAGS) & RFLAGS_DF != 0 { (size as u64).wrapping_neg() } else { size as u64 };
        let advanced = |register: u64| (register & !address_mask) | (register.wrapping_add(step) & address_mask);
        cpu.set_gpr(pointer, advanced(cpu.gpr(pointer)));
        if access.rep {
            let rcx = cpu.gpr(gpr::RCX);
            cpu.set_gpr(gpr::RCX, (rcx & !address_mask) | ((count - 1) & address_mask));
            if count > 1 {
                return Ok(()); // RIP stays: the next element is the next exit
            }
        }
        cpu.skip_instruction();
        Ok(())
    }

    /// An IN of `size` bytes from `port` (all ones where nothing answers).
    fn port_read(
        &self,
        vcpu: u32,
        lapic: &mut VirtualLapic,
        port: u16,
        size: u8,
        now: u64,
        effects: &mut DeviceEffects,
    ) -> u32 {
        if (COM1..COM1 + 8).contains(&port) {
            let (value, interrupt) = {
                let mut uart = self.uart.lock();
                (uart.read(port - COM1) as u32, uart.interrupt())
            };
            self.uart_line_changed(vcpu, lapic, interrupt, effects);
            return value;
        }
        self.platform.lock().read(port, size, now).unwrap_or(u32::MAX)
    }

    /// An OUT of `size` bytes of `value` to `port` (dropped where nothing answers).
    fn port_write(
        &self,
        vcpu: u32,
        lapic: &mut VirtualLapic,
        port: u16,
        size: u8,
        value: u32,
        effects: &mut DeviceEffects,
    ) {
        if (COM1..COM1 + 8).contains(&port) {
            let interrupt = {
                let mut uart = self.uart.lock();
                effects.console = uart.write(port - COM1, value as u8);
                uart.interrupt()
            };
            self.uart_line_changed(vcpu, lapic, interrupt, effects);
            return;
        }
        if let Some(power) = self.platform.lock().write(port, size, value) {
            effects.power = power;
        }
    }

    /// The UART's line into its IO-APIC pin after an access: a rising edge is an interrupt.
    fn uart_line_changed(&self, vcpu: u32, lapic: &mut VirtualLapic, interrupt: bool, effects: &mut DeviceEffects) {
        if !self.uart_line.swap(interrupt, Ordering::AcqRel) && interrupt {
            let routed = self.ioapic.lock().assert_pin(COM1_IRQ);
            if let Assertion::Delivered { vector, destination, level } = routed {
                self.deliver(vcpu, lapic, IcrCommand::Fixed { vector, destination }, level, effects);
            }
        }
    }

    /// Bytes typed at the host's console for this partition, into its COM1's receiver: how
    /// many it took (the rest did not fit its queue) and which vCPUs must look at the
    /// interrupt it raised now.
    pub fn receive_console(&self, bytes: &[u8]) -> (usize, Kicks) {
        let (taken, interrupt) = {
            let mut uart = self.uart.lock();
            let taken = bytes.iter().take_while(|&&b| uart.receive(b)).count();
            (taken, uart.interrupt())
        };
        let kicks = if !self.uart_line.swap(interrupt, Ordering::AcqRel) && interrupt {
            self.raise_irq(COM1_IRQ).kicks
        } else {
            Kicks::default()
        };
        (taken, kicks)
    }

    /// An interrupt on the partition's IO-APIC pin `pin` from outside any vCPU (a device the
    /// partition owns, its console input): routed as the guest programmed the pin, into the
    /// pending set of every vCPU it addresses (their pCPUs take it before their next entry).
    pub fn raise_irq(&self, pin: usize) -> RaisedIrq {
        let mut effects = DeviceEffects::default();
        let assertion = self.ioapic.lock().assert_pin(pin);
        if let Assertion::Delivered { vector, destination, level } = assertion {
            let command = IcrCommand::Fixed { vector, destination };
            // No vCPU sends it: every target takes it from its pending set.
            for target in self.targets(u32::MAX, command) {
                self.post(target, vector, level, &mut effects);
            }
        }
        RaisedIrq { assertion, kicks: effects.kicks }
    }

    /// An access to guest-physical `gpa` the EPT does not map, by vCPU `vcpu`: `None` when no
    /// device is there, else the decoded instruction applied to the xAPIC or IO-APIC and RIP
    /// moved past it. `now` is the TSC (the LAPIC timer runs on it).
    pub fn mmio(
        &self,
        cpu: &mut impl VcpuAccess,
        vcpu: u32,
        lapic: &mut VirtualLapic,
        gpa: u64,
        now: u64,
    ) -> Option<Result<DeviceEffects, String>> {
        let page = gpa & !0xFFF;
        if page != LAPIC_PAGE && page != IOAPIC_PAGE {
            return None;
        }
        Some(decode_device_access(cpu, gpa).map(|access| {
            let offset = (gpa & 0xFFF) as u32;
            let mut effects = DeviceEffects::default();
            if page == LAPIC_PAGE {
                self.lapic_access(cpu, vcpu, lapic, offset & !0xF, access, now, &mut effects);
            } else {
                let mut ioapic = self.ioapic.lock();
                match access.operation {
                    MmioOperation::Read { register } => cpu.set_gpr(register, ioapic.read(offset) as u64),
                    MmioOperation::Write { register } => {
                        effects.level_pins_free |= ioapic.write(offset, cpu.gpr(register) as u32)
                    }
                    MmioOperation::WriteImmediate { value } => {
                        effects.level_pins_free |= ioapic.write(offset, value as u32)
                    }
                }
            }
            cpu.set_rip(cpu.rip() + access.length as u64);
            effects
        }))
    }

    /// One decoded instruction applied to the vCPU's xAPIC register at `offset`; IPIs go to
    /// the siblings' pending sets.
    #[allow(clippy::too_many_arguments)]
    fn lapic_access(
        &self,
        cpu: &mut impl VcpuAccess,
        vcpu: u32,
        lapic: &mut VirtualLapic,
        offset: u32,
        access: MmioAccess,
        now: u64,
        effects: &mut DeviceEffects,
    ) {
        let mask = if access.size >= 8 { u64::MAX } else { (1u64 << (access.size * 8)) - 1 };
        let value = match access.operation {
            MmioOperation::Read { register } => {
                let value = lapic.read(offset, now) as u64 & mask;
                // 32-bit loads zero-extend; narrower ones keep the upper bits (mov r8/r16).
                let merged = if access.size >= 4 { value } else { (cpu.gpr(register) & !mask) | value };
                cpu.set_gpr(register, merged);
                return;
            }
            MmioOperation::Write { register } => cpu.gpr(register) & mask,
            MmioOperation::WriteImmediate { value } => value & mask,
        };
        let command = lapic.write(offset, value as u32, now);
        self.lapic_written(vcpu, lapic, offset, command, effects);
    }

    /// An APIC-write VM exit of vCPU `vcpu` (APIC-register virtualization): the guest wrote
    /// the xAPIC register at `offset` and the CPU put the value in the vCPU's register page;
    /// what the write does (an IPI, the timer, a logical ID) is done here.
    pub fn apic_write(&self, vcpu: u32, lapic: &mut VirtualLapic, offset: u32, now: u64) -> DeviceEffects {
        let mut effects = DeviceEffects::default();
        let command = lapic.trapped_write(offset & !0xF, now);
        self.lapic_written(vcpu, lapic, offset & !0xF, command, &mut effects);
        effects
    }

    /// The effects of a write to the xAPIC register at `offset` beyond the register itself:
    /// the logical ID siblings address, the IPI an ICR write sends.
    fn lapic_written(
        &self,
        vcpu: u32,
        lapic: &mut VirtualLapic,
        offset: u32,
        command: Option<IcrCommand>,
        effects: &mut DeviceEffects,
    ) {
        if offset == reg::LDR {
            self.logical_ids[vcpu as usize].store(lapic.logical_id(), Ordering::Release);
        }
        if let Some(vector) = lapic.take_level_eoi() {
            effects.level_pins_free |= self.ioapic.lock().eoi(vector);
        }
        match command {
            None => {}
            Some(command @ IcrCommand::Fixed { .. }) => self.deliver(vcpu, lapic, command, false, effects),
            // The vCPUs wait for their start-up IPI from power-on: INIT changes nothing.
            Some(IcrCommand::Init { .. } | IcrCommand::Unsupported { icr: 0 }) => {}
            Some(command @ IcrCommand::Startup { vector, .. }) => {
                for target in self.targets(vcpu, command).filter(|&t| t != vcpu) {
                    if self.start(target, vector) {
                        effects.kicks.add(target);
                    }
                }
            }
            Some(other @ (IcrCommand::Nmi { .. } | IcrCommand::Unsupported { .. })) => {
                effects.unsupported_ipi = Some(other)
            }
        }
    }

    /// A fixed interrupt (`level`: a level-triggered one from the IO-APIC) to every vCPU
    /// `command` addresses: the sender's own LAPIC directly, siblings through their pending
    /// sets (and a kick).
    fn deliver(
        &self,
        sender: u32,
        lapic: &mut VirtualLapic,
        command: IcrCommand,
        level: bool,
        effects: &mut DeviceEffects,
    ) {
        let IcrCommand::Fixed { vector, .. } = command else { return };
        for target in self.targets(sender, command) {
            match (target == sender, level) {
                (true, false) => lapic.accept(vector),
                (true, true) => lapic.accept_level(vector),
                (false, _) => self.post(target, vector, level, effects),
            }
        }
    }

    /// `vector` into `target`'s pending set, for its pCPU to take (with a kick); a level one
    /// is marked so before it is posted.
    fn post(&self, target: u32, vector: u8, level: bool, effects: &mut DeviceEffects) {
        let (word, bit) = (vector as usize / 64, 1u64 << (vector % 64));
        if level {
            self.pending_level[target as usize][word].fetch_or(bit, Ordering::AcqRel);
        }
        self.pending_ipis[target as usize][word].fetch_or(bit, Ordering::AcqRel);
        effects.kicks.add(target);
    }

    /// The vCPUs `command` from `sender` addresses (APIC ID = vCPU index; logical IDs as each
    /// vCPU last wrote its LDR, flat model).
    fn targets(&self, sender: u32, command: IcrCommand) -> impl Iterator<Item = u32> + '_ {
        let destination = match command {
            IcrCommand::Fixed { destination, .. }
            | IcrCommand::Nmi { destination }
            | IcrCommand::Init { destination }
            | IcrCommand::Startup { destination, .. } => Some(destination),
            IcrCommand::Unsupported { .. } => None,
        };
        (0..self.vcpus).filter(move |&target| match destination {
            None => false,
            Some(Destination::Physical(id)) => id == 0xFF || id as u32 == target,
            Some(Destination::Logical(mask)) => self.logical_ids[target as usize].load(Ordering::Acquire) & mask != 0,
            Some(Destination::SelfOnly) => target == sender,
            Some(Destination::AllIncludingSelf) => true,
            Some(Destination::AllExcludingSelf) => target != sender,
        })
    }

    /// A start-up IPI for `vcpu`: true if it was waiting for one (it then starts in real mode
    /// at `vector * 4096`, set up by its own pCPU).
    fn start(&self, vcpu: u32, vector: u8) -> bool {
        let started = &self.started[vcpu as usize];
        if started.load(Ordering::Acquire) {
            return false;
        }
        self.startup_vectors[vcpu as usize].store(0x100 | vector as u32, Ordering::Release);
        started.store(true, Ordering::Release);
        true
    }
}

/// The guest-physical address of `linear` as the vCPU's paging has it: itself without
/// paging, through the 4-level tables in IA-32e mode; `None` when not mapped (or under 32-bit
/// paging, which no guest uses for string I/O).
fn guest_physical(cpu: &impl VcpuAccess, linear: u64) -> Option<u64> {
    use x86::vmx::vmcs::guest;
    const CR0_PG: u64 = 1 << 31;
    if cpu.read_field(guest::CR0) & CR0_PG == 0 {
        return Some(linear & 0xFFFF_FFFF);
    }
    if cpu.read_field(guest::IA32_EFER_FULL) & crate::msr::EFER_LMA == 0 {
        return None;
    }
    mmio::translate(cpu.read_field(guest::CR3), linear, |a| cpu.read_physical_u64(a))
}

/// The instruction at the guest's RIP that accessed device memory at `gpa`, decoded (fetched
/// through the guest's page tables; up to 16 bytes, which may continue on the next page).
fn decode_device_access(cpu: &impl VcpuAccess, gpa: u64) -> Result<MmioAccess, String> {
    let rip = cpu.rip();
    let cr3 = cpu.read_field(x86::vmx::vmcs::guest::CR3);
    let read = |a: u64| cpu.read_physical_u64(a);
    let mut bytes = [0u8; 16];
    let in_first_page = ((0x1000 - (rip & 0xFFF)) as usize).min(bytes.len());
    let unreadable = || format!("cannot read the instruction at {rip:#x}");
    let first = mmio::translate(cr3, rip, read).ok_or_else(unreadable)?;
    cpu.read_physical(first, &mut bytes[..in_first_page]).ok_or_else(unreadable)?;
    if in_first_page < bytes.len() {
        if let Some(next) = mmio::translate(cr3, rip + in_first_page as u64, read) {
            // A missing next page just leaves zeros: the decoder then fails if it needed them.
            let _ = cpu.read_physical(next, &mut bytes[in_first_page..]);
        }
    }
    mmio::decode(&bytes, rip)
        .map_err(|e| format!("device access at {gpa:#x} by an instruction Phalanx does not emulate ({e:?})"))
}

#[cfg(test)]
#[path = "devices_tests.rs"]
pub(crate) mod tests;
