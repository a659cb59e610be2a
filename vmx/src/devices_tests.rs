//! Device exits driven through a mock vCPU: real instruction bytes in guest memory, decoded
//! through identity page tables, applied to the partition's devices.

use super::*;
use crate::vcpu_access::{gpr, MockVcpu};

const CODE: u64 = 0x8000;
/// The time of day every test partition starts from.
pub(crate) const CLOCK: WallClock = WallClock { unix_seconds_at_tsc_zero: 0, tsc_hz: 10_000_000 };
const PAGE_TABLES: u64 = 0x10_0000;

/// A vCPU of a partition with 2 MiB of memory, paging on, and `code` at RIP.
fn vcpu_running(code: &[u8]) -> MockVcpu {
    let mut cpu = MockVcpu::with_memory(2 << 20);
    cpu.identity_paging(PAGE_TABLES);
    cpu.poke(CODE, code);
    cpu.rip = CODE;
    cpu
}

/// `n` software-enabled LAPICs (as the guest sets them up before it takes interrupts).
fn lapics(n: u8) -> Vec<VirtualLapic> {
    (0..n)
        .map(|id| {
            let mut lapic = VirtualLapic::new(id);
            lapic.write(reg::SVR, 0x1FF, 0);
            lapic
        })
        .collect()
}

/// `mov [rax], ecx` (2 bytes) storing `value` to `gpa` on vCPU `vcpu`.
fn store(devices: &PartitionDevices, lapic: &mut VirtualLapic, vcpu: u32, gpa: u64, value: u32) -> DeviceEffects {
    let mut cpu = vcpu_running(&[0x89, 0x08]);
    cpu.gprs[gpr::RCX as usize] = value as u64;
    let effects = devices.mmio(&mut cpu, vcpu, lapic, gpa, 0).expect("a device page").expect("emulated");
    assert_eq!(cpu.rip, CODE + 2, "RIP moves past the decoded instruction");
    effects
}

/// IO-APIC pin 4 (COM1) -> `vector`, physical destination `vcpu`, as Linux programs it (by
/// vCPU 0).
fn route_com1(devices: &PartitionDevices, lapic: &mut VirtualLapic, vector: u32, vcpu: u32) {
    store(devices, lapic, 0, IOAPIC_PAGE, 0x10 + 2 * COM1_IRQ as u32);
    store(devices, lapic, 0, IOAPIC_PAGE + 0x10, vector);
    store(devices, lapic, 0, IOAPIC_PAGE, 0x11 + 2 * COM1_IRQ as u32);
    store(devices, lapic, 0, IOAPIC_PAGE + 0x10, vcpu << 24);
}

fn out(devices: &PartitionDevices, lapic: &mut VirtualLapic, port: u16, value: u8) -> DeviceEffects {
    let mut cpu = MockVcpu { instruction_length: 1, ..MockVcpu::default() };
    cpu.gprs[gpr::RAX as usize] = value as u64;
    let access = IoAccess { port, size: 1, input: false, string: false, rep: false };
    devices.port_io(&mut cpu, 0, lapic, access, 0).unwrap()
}

#[test]
fn a_com1_byte_reaches_the_console_and_its_interrupt_the_routed_sibling() {
    let devices = PartitionDevices::new(2, 2, true, CLOCK);
    let mut l = lapics(2);
    route_com1(&devices, &mut l[0], 0x24, 1);
    // IER: transmit-holding-register-empty interrupt on; the THR is empty: a rising edge.
    let effects = out(&devices, &mut l[0], COM1 + 1, 0x02);
    assert_eq!(effects.kicks.iter().collect::<Vec<_>>(), [1], "vCPU 1's pCPU must look at it");
    let (first, rest) = l.split_at_mut(1);
    devices.take_ipis(1, &mut rest[0]);
    assert_eq!(rest[0].deliverable(), Some(0x24));
    assert_eq!(first[0].deliverable(), None, "not delivered to the sender");
    // A byte for the console; the line stays high (no new edge) until IIR is read.
    let effects = out(&devices, &mut l[0], COM1, b'x');
    assert_eq!(effects.console, Some(b'x'));
}

#[test]
fn logical_fixed_ipis_fan_out_to_every_addressed_sibling_and_self() {
    let devices = PartitionDevices::new(3, 3, true, CLOCK);
    let mut l = lapics(3);
    for v in 0..3u32 {
        // Flat logical model: vCPU v answers to bit v.
        store(&devices, &mut l[v as usize], v, LAPIC_PAGE + reg::LDR as u64, 1 << (24 + v));
    }
    store(&devices, &mut l[0], 0, LAPIC_PAGE + reg::ICR_HIGH as u64, 0b111 << 24);
    let effects = store(&devices, &mut l[0], 0, LAPIC_PAGE + reg::ICR_LOW as u64, 0x0000_0830); // logical, fixed, 0x30
    assert_eq!(effects.kicks.iter().collect::<Vec<_>>(), [1, 2]);
    assert_eq!(l[0].deliverable(), Some(0x30), "the sender's own LAPIC gets it directly");
    for v in 1..3 {
        devices.take_ipis(v, &mut l[v as usize]);
        assert_eq!(l[v as usize].deliverable(), Some(0x30), "vCPU {v}");
    }
    // All-excluding-self reaches the others only.
    let effects = store(&devices, &mut l[1], 1, LAPIC_PAGE + reg::ICR_LOW as u64, 0x000C_0031);
    assert_eq!(effects.kicks.iter().collect::<Vec<_>>(), [0, 2]);
}

#[test]
fn apic_write_exits_send_the_ipi_and_track_the_logical_id_the_cpu_wrote() {
    // Under APIC-register virtualization the CPU writes the page and exits with the offset.
    let devices = PartitionDevices::new(2, 2, true, CLOCK);
    let mut l = lapics(2);
    l[1].cpu_writes(reg::LDR, 1 << 25);
    devices.apic_write(1, &mut l[1], reg::LDR, 0);
    l[0].cpu_writes(reg::ICR_HIGH, 0b10 << 24);
    assert!(devices.apic_write(0, &mut l[0], reg::ICR_HIGH, 0).kicks.iter().next().is_none());
    l[0].cpu_writes(reg::ICR_LOW, 0x0000_0840); // logical, fixed, 0x40
    let effects = devices.apic_write(0, &mut l[0], reg::ICR_LOW + 4, 0);
    assert_eq!(effects.kicks.iter().collect::<Vec<_>>(), [1], "the offset within the register is ignored");
    devices.take_ipis(1, &mut l[1]);
    assert_eq!(l[1].deliverable(), Some(0x40));
}

#[test]
fn a_startup_ipi_starts_a_waiting_sibling_once() {
    let devices = PartitionDevices::new(2, 2, false, CLOCK);
    assert!(devices.is_started(0) && !devices.is_started(1));
    let mut l = lapics(2);
    store(&devices, &mut l[0], 0, LAPIC_PAGE + reg::ICR_HIGH as u64, 1 << 24);
    let sipi = 0x0000_0600 | 0x9F;
    let effects = store(&devices, &mut l[0], 0, LAPIC_PAGE + reg::ICR_LOW as u64, sipi);
    assert_eq!(effects.kicks.iter().collect::<Vec<_>>(), [1]);
    assert!(devices.is_started(1));
    assert_eq!(devices.take_startup(1), Some(0x9F));
    assert_eq!(devices.take_startup(1), None, "taken once");
    // The second SIPI of INIT-SIPI-SIPI finds it running: nothing happens.
    assert!(store(&devices, &mut l[0], 0, LAPIC_PAGE + reg::ICR_LOW as u64, sipi).kicks.is_empty());
    devices.power_on(false);
    assert!(!devices.is_started(1), "a reset puts application processors back to waiting");
}

#[test]
fn lapic_reads_zero_extend_32_bit_and_merge_narrower_loads() {
    let devices = PartitionDevices::new(1, 1, true, CLOCK);
    let mut lapic = VirtualLapic::new(0);
    // mov eax, [rax]
    let mut cpu = vcpu_running(&[0x8B, 0x00]);
    cpu.gprs[gpr::RAX as usize] = u64::MAX;
    devices.mmio(&mut cpu, 0, &mut lapic, LAPIC_PAGE + reg::VERSION as u64, 0).unwrap().unwrap();
    assert_eq!(cpu.gprs[gpr::RAX as usize], 0x0005_0014);
    // mov ax, [rax]: the upper 48 bits stay.
    let mut cpu = vcpu_running(&[0x66, 0x8B, 0x00]);
    cpu.gprs[gpr::RAX as usize] = 0xAAAA_BBBB_CCCC_DDDD;
    devices.mmio(&mut cpu, 0, &mut lapic, LAPIC_PAGE + reg::VERSION as u64, 0).unwrap().unwrap();
    assert_eq!(cpu.gprs[gpr::RAX as usize], 0xAAAA_BBBB_CCCC_0014);
    assert_eq!(cpu.rip, CODE + 3);
}

#[test]
fn other_memory_is_no_device_and_undecodable_instructions_are_refused() {
    let devices = PartitionDevices::new(1, 1, true, CLOCK);
    let mut lapic = VirtualLapic::new(0);
    let mut cpu = vcpu_running(&[0x89, 0x08]);
    assert!(devices.mmio(&mut cpu, 0, &mut lapic, 0x4000_0000, 0).is_none());
    let mut cpu = vcpu_running(&[0x0F, 0x0B]); // ud2
    let err = devices.mmio(&mut cpu, 0, &mut lapic, LAPIC_PAGE, 0).unwrap().unwrap_err();
    assert!(err.contains("does not emulate"), "{err}");
    assert_eq!(cpu.rip, CODE, "nothing applied");
    let mut cpu = MockVcpu::with_memory(0x1000);
    cpu.rip = 0x10_0000; // not mapped
    let err = devices.mmio(&mut cpu, 0, &mut lapic, LAPIC_PAGE, 0).unwrap().unwrap_err();
    assert!(err.contains("cannot read the instruction"), "{err}");
}

#[test]
fn string_io_outside_the_partition_is_refused_and_absent_ports_float_high() {
    let devices = PartitionDevices::new(1, 1, true, CLOCK);
    let mut lapic = VirtualLapic::new(0);
    let mut cpu = MockVcpu { gprs: [1; 16], ..MockVcpu::default() };
    let string = IoAccess { port: COM1, size: 1, input: false, string: true, rep: true };
    let err = devices.port_io(&mut cpu, 0, &mut lapic, string, 0).unwrap_err();
    assert!(err.contains("outside the partition"), "{err}");
    let mut cpu = MockVcpu::default();
    let read = IoAccess { port: 0x61, size: 1, input: true, string: false, rep: false };
    devices.port_io(&mut cpu, 0, &mut lapic, read, 0).unwrap();
    assert_eq!(cpu.gprs[gpr::RAX as usize], 0xFF);
    // The UART's scratch register reads back what was written.
    out(&devices, &mut lapic, COM1 + 7, 0x5A);
    let scratch = IoAccess { port: COM1 + 7, size: 1, input: true, string: false, rep: false };
    devices.port_io(&mut cpu, 0, &mut lapic, scratch, 0).unwrap();
    assert_eq!(cpu.gprs[gpr::RAX as usize] & 0xFF, 0x5A);
}

#[test]
fn console_input_reaches_com1_and_its_interrupt_the_routed_vcpu() {
    let devices = PartitionDevices::new(2, 2, true, CLOCK);
    let mut l = lapics(2);
    route_com1(&devices, &mut l[0], 0x24, 1);
    // The guest enables the received-data interrupt.
    out(&devices, &mut l[0], COM1 + 1, 0x01);
    let (taken, kicks) = devices.receive_console(b"ls\n");
    assert_eq!((taken, kicks.iter().collect::<Vec<_>>()), (3, vec![1]), "vCPU 1's pCPU must look at it");
    devices.take_ipis(1, &mut l[1]);
    assert_eq!(l[1].deliverable(), Some(0x24));
    // More input while the line is up raises no second edge.
    assert!(devices.receive_console(b"x").1.is_empty());
    let mut cpu = MockVcpu { instruction_length: 1, ..MockVcpu::default() };
    let read = IoAccess { port: COM1, size: 1, input: true, string: false, rep: false };
    let typed: Vec<u8> = (0..4)
        .map(|_| {
            devices.port_io(&mut cpu, 1, &mut l[1], read, 0).unwrap();
            cpu.gprs[gpr::RAX as usize] as u8
        })
        .collect();
    assert_eq!(typed, b"ls\nx");
}

#[test]
fn platform_ports_are_emulated_and_a_reset_comes_back_as_a_power_request() {
    let devices = PartitionDevices::new(1, 1, true, CLOCK);
    let mut lapic = VirtualLapic::new(0);
    out(&devices, &mut lapic, 0x21, 0xFB);
    let mut cpu = MockVcpu { instruction_length: 1, ..MockVcpu::default() };
    let read = IoAccess { port: 0x21, size: 1, input: true, string: false, rep: false };
    devices.port_io(&mut cpu, 0, &mut lapic, read, 0).unwrap();
    assert_eq!(cpu.gprs[gpr::RAX as usize] & 0xFF, 0xFB, "the PIC keeps its mask");
    let effects = out(&devices, &mut lapic, 0xCF9, 0x06);
    assert!(matches!(effects.power, Some(PowerRequest::Reset { .. })), "{effects:?}");
    assert_eq!(out(&devices, &mut lapic, 0x21, 0x00).power, None);
    // A reset brings the platform back to power-on: the PICs masked again.
    devices.power_on(true);
    devices.port_io(&mut cpu, 0, &mut lapic, read, 0).unwrap();
    assert_eq!(cpu.gprs[gpr::RAX as usize] & 0xFF, 0xFF);
}

/// `rep outsb` and `rep insb` through the guest's page tables, one element per exit.
#[test]
fn string_io_moves_one_element_per_exit_until_the_count_is_done() {
    use x86::vmx::vmcs::{guest, ro};
    let devices = PartitionDevices::new(1, 1, true, CLOCK);
    let mut lapic = VirtualLapic::new(0);
    let mut cpu = vcpu_running(&[0xF3, 0x6E]); // rep outsb
    cpu.instruction_length = 2;
    cpu.fields.insert(guest::CR0, 1 << 31);
    cpu.fields.insert(guest::IA32_EFER_FULL, crate::msr::EFER_LMA);
    cpu.fields.insert(ro::VMEXIT_INSTRUCTION_INFO, 2 << 7); // 64-bit addresses
    cpu.poke(0x9000, b"ok\n");
    cpu.gprs[gpr::RSI as usize] = 0x9000;
    cpu.gprs[gpr::RCX as usize] = 3;
    let outsb = IoAccess { port: COM1, size: 1, input: false, string: true, rep: true };
    let mut sent = Vec::new();
    for exit in 0..3 {
        cpu.fields.insert(ro::GUEST_LINEAR_ADDR, cpu.gprs[gpr::RSI as usize]);
        let effects = devices.port_io(&mut cpu, 0, &mut lapic, outsb, 0).unwrap();
        sent.extend(effects.console);
        let done = exit == 2;
        assert_eq!(cpu.rip, if done { CODE + 2 } else { CODE }, "RIP moves on only after the last element");
    }
    assert_eq!(sent, b"ok\n");
    assert_eq!((cpu.gprs[gpr::RSI as usize], cpu.gprs[gpr::RCX as usize]), (0x9003, 0));
    // `rep insb` from the RTC's CMOS RAM, backwards (DF), with 32-bit addresses.
    out(&devices, &mut lapic, 0x70, 0x40);
    out(&devices, &mut lapic, 0x71, 0xA7);
    out(&devices, &mut lapic, 0x70, 0x40);
    let mut cpu = vcpu_running(&[0xF3, 0x6C]); // rep insb
    cpu.instruction_length = 2;
    cpu.fields.insert(guest::RFLAGS, 1 << 10);
    cpu.fields.insert(ro::VMEXIT_INSTRUCTION_INFO, 1 << 7);
    cpu.gprs[gpr::RDI as usize] = 0xFFFF_FFFF_0000_9001;
    cpu.gprs[gpr::RCX as usize] = 0xFFFF_FFFF_0000_0002;
    let insb = IoAccess { port: 0x71, size: 1, input: true, string: true, rep: true };
    for _ in 0..2 {
        cpu.fields.insert(ro::GUEST_LINEAR_ADDR, cpu.gprs[gpr::RDI as usize] & 0xFFFF_FFFF);
        devices.port_io(&mut cpu, 0, &mut lapic, insb, 0).unwrap();
    }
    assert_eq!(&cpu.memory[0x9000..0x9002], &[0xA7, 0xA7]);
    assert_eq!(cpu.gprs[gpr::RDI as usize], 0xFFFF_FFFF_0000_8FFF, "down by one each, within 32 bits");
    assert_eq!((cpu.gprs[gpr::RCX as usize], cpu.rip), (0xFFFF_FFFF_0000_0000, CODE + 2));
    // A count of zero does nothing but move on.
    let mut cpu = vcpu_running(&[0xF3, 0x6C]);
    cpu.instruction_length = 2;
    devices.port_io(&mut cpu, 0, &mut lapic, insb, 0).unwrap();
    assert_eq!(cpu.rip, CODE + 2);
}

/// A level-triggered device line (a PCI INTx): delivered once with its TMR bit, held while the
/// guest has not EOIed it, and the EOI (by MMIO write or by the APIC-write exit of the
/// virtualized APIC) names the pin, whose physical line the hypervisor then unmasks.
#[test]
fn a_level_triggered_line_is_held_until_the_guest_eois_it() {
    const PIN: usize = 11;
    let devices = PartitionDevices::new(2, 2, true, CLOCK);
    let mut l = lapics(2);
    // Pin 11 -> vector 0x3B, level, active low, physical destination vCPU 1.
    store(&devices, &mut l[0], 0, IOAPIC_PAGE, 0x10 + 2 * PIN as u32);
    store(&devices, &mut l[0], 0, IOAPIC_PAGE + 0x10, 0xA03B);
    store(&devices, &mut l[0], 0, IOAPIC_PAGE, 0x11 + 2 * PIN as u32);
    store(&devices, &mut l[0], 0, IOAPIC_PAGE + 0x10, 1 << 24);
    let raised = devices.raise_irq(PIN);
    let delivered = Assertion::Delivered { vector: 0x3B, destination: Destination::Physical(1), level: true };
    assert_eq!(raised.assertion, delivered);
    assert_eq!(raised.kicks.iter().collect::<Vec<_>>(), [1]);
    assert_eq!(devices.raise_irq(PIN).assertion, Assertion::InService, "held: nothing new until the EOI");
    devices.take_ipis(1, &mut l[1]);
    assert_eq!(l[1].acknowledge(), Some(0x3B));
    let effects = store(&devices, &mut l[1], 1, LAPIC_PAGE + reg::EOI as u64, 0);
    assert_eq!(effects.level_pins_free, 1 << PIN, "the level vector's EOI frees the pin");
    assert_eq!(devices.raise_irq(PIN).assertion, delivered, "the line, still asserted, comes again");
    devices.take_ipis(1, &mut l[1]);
    assert_eq!(l[1].acknowledge(), Some(0x3B));
    // Under APIC-register virtualization the CPU wrote EOI to the page and exited.
    l[1].cpu_writes(reg::EOI, 0);
    assert_eq!(devices.apic_write(1, &mut l[1], reg::EOI, 0).level_pins_free, 1 << PIN);
    // COM1's edge pin is not touched by any of it.
    route_com1(&devices, &mut l[0], 0x24, 0);
    assert_eq!(
        devices.raise_irq(COM1_IRQ).assertion,
        Assertion::Delivered { vector: 0x24, destination: Destination::Physical(0), level: false }
    );
    devices.take_ipis(0, &mut l[0]);
    assert_eq!(l[0].acknowledge(), Some(0x24));
    assert_eq!(store(&devices, &mut l[0], 0, LAPIC_PAGE + reg::EOI as u64, 0).level_pins_free, 0);
}
