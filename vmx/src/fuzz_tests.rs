//! Fuzzing the paths a guest drives with its own bytes and registers (`fuzz::run`; a short
//! run in every test run, longer with `scripts/fuzz`): device accesses decoded from random
//! instruction bytes through random or real page tables and applied to the xAPIC and IO-APIC,
//! port I/O from random exit qualifications, hypercalls with every number, and spin-wait
//! samples of random code. Whatever the guest put there, a handler returns (an emulation, or
//! an error that stops the partition cleanly) and never panics; an emulated access moves RIP
//! past one instruction, a refused one leaves it alone.

use crate::devices::{PartitionDevices, IOAPIC_PAGE, LAPIC_PAGE};
use crate::emulate::{hypercall, Hypercall};
use crate::exit::IoAccess;
use crate::spin_sample::{self, Sample, SampleCache};
use crate::vcpu_access::{gpr, MockVcpu, VcpuAccess};
use crate::vlapic::VirtualLapic;
use fuzz::{assert_clean, run, Rng};

/// Guest memory of every input: page tables, code and data fit in 2 MiB.
const MEMORY: usize = 2 << 20;
const PAGE_TABLES: u64 = 0x10_0000;
/// A second of fuzzing per target in the test command.
const SECONDS: f64 = 1.0;

/// Device-access instructions Linux and the test guest use, as starting points for mutation:
/// mov stores and loads of each width, immediates, movzx, xchg, and what must be refused
/// (string moves, a lock prefix on a plain mov, a read-modify-write).
const SEEDS: &[&[u8]] = &[
    &[0x89, 0x08],                                     // mov [rax], ecx
    &[0x8B, 0x82, 0x00, 0x03, 0x00, 0x00],             // mov eax, [rdx+0x300]
    &[0xC7, 0x00, 0x00, 0x40, 0x00, 0x00],             // mov dword [rax], 0x4000
    &[0x0F, 0xB7, 0x08],                               // movzx ecx, word [rax]
    &[0x87, 0x08],                                     // xchg [rax], ecx
    &[0x48, 0x89, 0x08],                               // mov [rax], rcx
    &[0x88, 0x08],                                     // mov [rax], cl
    &[0xA5],                                           // movsd
    &[0xF3, 0xAB],                                     // rep stosd
    &[0xF0, 0x89, 0x08],                               // lock mov (invalid)
    &[0x83, 0x00, 0x01],                               // add dword [rax], 1
    &[0x44, 0x89, 0x3C, 0x25, 0xB0, 0x00, 0xE0, 0xFE], // mov [0xfee000b0], r15d
];

/// A vCPU whose memory, page tables, RIP and registers come from `rng`: half the inputs run
/// under identity paging with a mutated seed instruction at RIP (they reach the devices),
/// the rest on random page tables and bytes (they exercise the walk and the decoder).
fn random_vcpu(rng: &mut Rng) -> MockVcpu {
    let mut cpu = MockVcpu::with_memory(MEMORY);
    if rng.chance(50) {
        cpu.identity_paging(PAGE_TABLES);
        cpu.rip = rng.below(PAGE_TABLES - 16);
        // Near a page end now and then: the instruction may straddle into the next page.
        if rng.chance(20) {
            cpu.rip = (cpu.rip | 0xFFF) - rng.below(8);
        }
        let mut code = rng.pick(SEEDS).to_vec();
        for _ in 0..rng.below(4) {
            match rng.below(3) {
                0 if !code.is_empty() => {
                    let at = rng.index(code.len());
                    code[at] = rng.u64() as u8;
                }
                1 => code.insert(rng.index(code.len() + 1), rng.u64() as u8),
                _ => code.truncate(rng.index(code.len() + 1)),
            }
        }
        cpu.poke(cpu.rip, &code);
    } else {
        let mut noise = [0u8; 4096];
        for _ in 0..8 {
            rng.fill(&mut noise);
            let page = rng.below(MEMORY as u64 / 4096) * 4096;
            cpu.poke(page, &noise);
        }
        cpu.fields.insert(x86::vmx::vmcs::guest::CR3, rng.u64() & 0x1F_F000);
        cpu.rip = rng.u64();
    }
    for r in cpu.gprs.iter_mut() {
        *r = if rng.chance(30) { rng.u64() & 0xFF } else { rng.u64() };
    }
    cpu
}

#[test]
fn fuzz_device_memory_accesses() {
    let devices = PartitionDevices::new(4, 4, true, crate::devices::tests::CLOCK);
    let mut lapics: Vec<VirtualLapic> = (0..4).map(VirtualLapic::new).collect();
    let (mut emulated, mut refused) = (0u64, 0u64);
    let report = run("mmio", SECONDS, 2_000, |rng| {
        let mut cpu = random_vcpu(rng);
        let elsewhere = rng.u64() & !0xFFF;
        let page = *rng.pick(&[LAPIC_PAGE, IOAPIC_PAGE, LAPIC_PAGE, elsewhere]);
        let gpa = page + rng.below(0x1000);
        let vcpu = rng.below(4) as u32;
        let rip = cpu.rip;
        let outcome = devices.mmio(&mut cpu, vcpu, &mut lapics[vcpu as usize], gpa, rng.u64() >> 8);
        match &outcome {
            Some(Ok(_)) => emulated += 1,
            Some(Err(_)) => refused += 1,
            None => {}
        }
        match outcome {
            None if page == LAPIC_PAGE || page == IOAPIC_PAGE => Err(format!("{gpa:#x} is a device page")),
            Some(Ok(_)) if !(1..=15).contains(&cpu.rip.wrapping_sub(rip)) => {
                Err(format!("emulated, but RIP moved from {rip:#x} to {:#x}", cpu.rip))
            }
            Some(Err(_)) if cpu.rip != rip => Err("refused, but RIP moved".into()),
            _ => Ok(()),
        }
    });
    assert_clean(&report);
    // The generator reaches both ends: accesses the devices emulate and ones they refuse.
    println!("fuzz mmio: {emulated} emulated, {refused} refused");
    assert!(emulated * 10 > report.inputs && refused * 10 > report.inputs, "{emulated} / {refused}");
}

#[test]
fn fuzz_port_io() {
    let devices = PartitionDevices::new(2, 2, true, crate::devices::tests::CLOCK);
    let mut lapics: Vec<VirtualLapic> = (0..2).map(VirtualLapic::new).collect();
    let report = run("port-io", SECONDS, 2_000, |rng| {
        // 64 KiB of memory, paging off: string I/O at a random address is mostly inside it.
        let mut cpu = MockVcpu { instruction_length: 1 + rng.below(3), ..MockVcpu::with_memory(0x1_0000) };
        cpu.gprs[gpr::RAX as usize] = rng.u64();
        cpu.gprs[gpr::RCX as usize] = rng.below(4);
        let linear = if rng.chance(80) { rng.below(0x1_0000) } else { rng.u64() };
        cpu.fields.insert(x86::vmx::vmcs::ro::GUEST_LINEAR_ADDR, linear);
        cpu.fields.insert(x86::vmx::vmcs::ro::VMEXIT_INSTRUCTION_INFO, rng.u64() & 0x3FF);
        // COM1's and the platform devices' ports often: that is where the state is.
        const PLATFORM: [u64; 16] =
            [0x20, 0x21, 0xA0, 0xA1, 0x4D0, 0x64, 0x70, 0x71, 0xCF8, 0xCF9, 0xCFC, 0xCFE, 0x600, 0x602, 0x604, 0x608];
        let qualification = rng.u64() & 0xFFFF_0000_003F;
        let port = match rng.below(4) {
            0 | 1 => Some(0x3F8 + rng.below(8)),
            2 => Some(PLATFORM[rng.below(PLATFORM.len() as u64) as usize]),
            _ => None,
        };
        let qualification = port.map_or(qualification, |port| (qualification & 0x3F) | port << 16);
        let access = IoAccess::decode(qualification);
        let vcpu = rng.below(2) as u32;
        match devices.port_io(&mut cpu, vcpu, &mut lapics[vcpu as usize], access, rng.u64()) {
            // A `rep` string instruction stays at its RIP until its count is done.
            Ok(_) if access.string && access.rep && cpu.rip == 0 => Ok(()),
            Ok(_) if cpu.rip != cpu.instruction_length => Err("emulated, but RIP did not move past it".into()),
            Err(_) if !access.string => Err(format!("{access:?} refused")),
            Err(e) if linear < 0xFFFC => Err(format!("{access:?} at {linear:#x}, inside memory, refused: {e}")),
            _ => Ok(()),
        }
    });
    assert_clean(&report);
}

#[test]
fn fuzz_hypercalls() {
    let report = run("hypercall", SECONDS, 2_000, |rng| {
        let mut cpu = MockVcpu { instruction_length: 3, ..MockVcpu::default() };
        cpu.gprs[gpr::RAX as usize] = if rng.chance(50) { rng.below(8) } else { rng.u64() };
        cpu.gprs[gpr::RBX as usize] = rng.u64();
        let call = hypercall(&mut cpu);
        let answer = cpu.gprs[gpr::RAX as usize];
        match (call, answer, cpu.rip) {
            (_, _, rip) if rip != 3 => Err("RIP not past the VMCALL".into()),
            (Hypercall::Unknown(_), u64::MAX, _) => Ok(()),
            (Hypercall::Unknown(n), _, _) => Err(format!("unknown call {n} answered {answer}")),
            (_, 0, _) => Ok(()),
            (known, _, _) => Err(format!("{known:?} answered {answer}")),
        }
    });
    assert_clean(&report);
}

#[test]
fn fuzz_spin_wait_samples() {
    let mut cache = SampleCache::default();
    let report = run("spin-sample", SECONDS, 2_000, |rng| {
        let cpu = random_vcpu(rng);
        let long_mode = rng.chance(90);
        let fresh = spin_sample::sample(&cpu, long_mode);
        let cached = cache.sample(&cpu, long_mode);
        if !long_mode && fresh != Sample::Unreadable {
            return Err("sampled outside long mode".into());
        }
        // The cache answers what a fresh look would (unreadable code is never cached).
        if cached != fresh {
            return Err(format!("cache said {cached:?}, a fresh sample {fresh:?} at {:#x}", cpu.rip()));
        }
        Ok(())
    });
    assert_clean(&report);
}
