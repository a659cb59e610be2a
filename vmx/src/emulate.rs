//! Handlers for the instruction exits that need nothing but the vCPU's own state: RDMSR and
//! WRMSR, CPUID, VMCALL (the hypercalls), and I/O to ports no device answers. Each works on
//! any [`VcpuAccess`]; the image passes the current VMCS, the tests a mock.

use crate::cpuid::{self, CpuidResult};
use crate::exit::IoAccess;
use crate::msr::{self, MsrAccess, EFER_LMA, IA32_EFER};
use crate::vcpu_access::{gpr, VcpuAccess};
use crate::vlapic::VirtualLapic;

const EXCEPTION_GP: u8 = 13;

/// RDMSR/WRMSR of an MSR the bitmap does not pass through (`vmx::msr` decides which) by vCPU
/// `vcpu`; `tsc` is the time stamp counter now. A refused access gets #GP and RIP stays.
pub fn msr_access(cpu: &mut impl VcpuAccess, write: bool, vcpu: u32, tsc: u64, lapic: &mut VirtualLapic) {
    let index = cpu.gpr(gpr::RCX) as u32;
    let value = (cpu.gpr(gpr::RDX) << 32) | (cpu.gpr(gpr::RAX) & 0xFFFF_FFFF);
    let read = match (msr::access(index, vcpu), write) {
        (MsrAccess::Refused, _) | (MsrAccess::TimeStampCounter, true) => {
            cpu.inject_exception(EXCEPTION_GP, Some(0));
            return;
        }
        (MsrAccess::Fixed(fixed), true) if value != fixed => {
            cpu.inject_exception(EXCEPTION_GP, Some(0));
            return;
        }
        (MsrAccess::Constant(v) | MsrAccess::Fixed(v), false) => v,
        (MsrAccess::Fixed(_), true) => 0,
        (MsrAccess::Constant(_), true) => 0,
        (MsrAccess::TimeStampCounter, false) => tsc,
        (MsrAccess::TscDeadline, false) => lapic.tsc_deadline(),
        (MsrAccess::TscDeadline, true) => {
            lapic.set_tsc_deadline(value);
            0
        }
        (MsrAccess::VmcsField(field), false) => cpu.read_field(field),
        (MsrAccess::VmcsField(field), true) => {
            let paging = cpu.read_field(x86::vmx::vmcs::guest::CR0) & (1 << 31) != 0;
            if !msr::write_allowed(index, value, cpu.read_field(field), paging) {
                cpu.inject_exception(EXCEPTION_GP, Some(0));
                return;
            }
            // EFER.LMA is the CPU's to set (it must match the "IA-32e mode guest" control).
            let value =
                if index == IA32_EFER { (value & !EFER_LMA) | (cpu.read_field(field) & EFER_LMA) } else { value };
            cpu.write_field(field, value);
            0
        }
    };
    if !write {
        cpu.set_gpr(gpr::RAX, read & 0xFFFF_FFFF);
        cpu.set_gpr(gpr::RDX, read >> 32);
    }
    cpu.skip_instruction();
}

/// CPUID: the host's answer (`host(leaf, subleaf)`) filtered for the guest (`vmx::cpuid`).
pub fn cpuid(cpu: &mut impl VcpuAccess, guest: &cpuid::GuestCpu, host: impl Fn(u32, u32) -> CpuidResult) {
    let (leaf, subleaf) = (cpu.gpr(gpr::RAX) as u32, cpu.gpr(gpr::RCX) as u32);
    let r = cpuid::filter(leaf, subleaf, host(leaf, subleaf), guest);
    cpu.set_gpr(gpr::RAX, r.eax as u64);
    cpu.set_gpr(gpr::RBX, r.ebx as u64);
    cpu.set_gpr(gpr::RCX, r.ecx as u64);
    cpu.set_gpr(gpr::RDX, r.edx as u64);
    cpu.skip_instruction();
}

/// What a guest asked for with VMCALL (the test guest's protocol, `firmware::longmode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hypercall {
    /// Progress was written to the statistics page.
    Report,
    /// This vCPU finished its work.
    Done,
    /// The guest found an error and printed it: stop the partition.
    GuestError,
    /// Open (`true`) or close this vCPU's spin-wait measurement window.
    SpinWindow { open: bool },
    /// Delegation, from CPL 0: what the group the partition manages holds (the hypervisor
    /// writes the answer).
    GroupInfo,
    /// Delegation, from CPL 0: a new reservation for the group's `child`-th child, of `kind`
    /// with values `a`, `b` (`firmware::longmode::RESERVATION_*`; the hypervisor answers).
    SetChildReservation { child: u64, kind: u64, a: u64, b: u64 },
    /// From CPL 0: the caller revokes the shared region at guest-physical `gpa` that it owns
    /// (`child` 0) or that child `child - 1` of the group it manages owns (the hypervisor
    /// answers).
    RevokeShared { gpa: u64, child: u64 },
    /// A delegation call from outside the guest's kernel: RAX = `DELEGATION_NOT_PRIVILEGED`.
    Unprivileged(u64),
    /// A number Phalanx does not know; the guest gets RAX = all ones.
    Unknown(u64),
}

/// VMCALL: the call number in RAX; RAX = 0 on return (all ones for an unknown call).
pub fn hypercall(cpu: &mut impl VcpuAccess) -> Hypercall {
    use firmware::longmode::*;
    // The privilege level is SS's DPL (SDM 3A, 5.5): delegation is the guest kernel's.
    let kernel = (cpu.read_field(x86::vmx::vmcs::guest::SS_ACCESS_RIGHTS) >> 5) & 3 == 0;
    let call = match cpu.gpr(gpr::RAX) {
        HYPERCALL_REPORT => Hypercall::Report,
        HYPERCALL_DONE => Hypercall::Done,
        HYPERCALL_ERROR => Hypercall::GuestError,
        HYPERCALL_SPIN_WINDOW => Hypercall::SpinWindow { open: cpu.gpr(gpr::RBX) == 1 },
        call @ (HYPERCALL_GROUP_INFO | HYPERCALL_SET_CHILD_RESERVATION | HYPERCALL_REVOKE_SHARED) if !kernel => {
            Hypercall::Unprivileged(call)
        }
        HYPERCALL_REVOKE_SHARED => Hypercall::RevokeShared { gpa: cpu.gpr(gpr::RBX), child: cpu.gpr(gpr::RCX) },
        HYPERCALL_GROUP_INFO => Hypercall::GroupInfo,
        HYPERCALL_SET_CHILD_RESERVATION => Hypercall::SetChildReservation {
            child: cpu.gpr(gpr::RBX),
            kind: cpu.gpr(gpr::RCX),
            a: cpu.gpr(gpr::RDX),
            b: cpu.gpr(gpr::RSI),
        },
        other => Hypercall::Unknown(other),
    };
    let rax = match call {
        Hypercall::Unknown(_) => u64::MAX,
        Hypercall::Unprivileged(_) => DELEGATION_NOT_PRIVILEGED,
        _ => 0,
    };
    cpu.set_gpr(gpr::RAX, rax);
    cpu.skip_instruction();
    call
}

/// The low `size` bytes of a register (1, 2 or 4).
pub fn io_mask(size: u8) -> u64 {
    match size {
        1 => 0xFF,
        2 => 0xFFFF,
        _ => 0xFFFF_FFFF,
    }
}

/// The result of an IN of `size` bytes reading `value` into RAX: `IN EAX` zero-extends into
/// RAX like every 32-bit register write; `IN AL`/`IN AX` keep the rest of RAX.
pub fn in_result(rax: u64, size: u8, value: u64) -> u64 {
    match size {
        4 => value & 0xFFFF_FFFF,
        _ => (rax & !io_mask(size)) | (value & io_mask(size)),
    }
}

/// IN/OUT on a port with no device behind it: reads float high, writes vanish.
pub fn absent_port(cpu: &mut impl VcpuAccess, access: IoAccess) {
    if access.input {
        cpu.set_gpr(gpr::RAX, in_result(cpu.gpr(gpr::RAX), access.size, u64::MAX));
    }
    cpu.skip_instruction();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vcpu_access::MockVcpu;
    use x86::vmx::vmcs::guest;

    fn cpu_at(rip: u64, length: u64) -> MockVcpu {
        MockVcpu { rip, instruction_length: length, ..MockVcpu::default() }
    }

    #[test]
    fn efer_writes_keep_the_cpus_lma() {
        let mut cpu = cpu_at(0x1000, 2);
        cpu.fields.insert(guest::IA32_EFER_FULL, 0x500); // LME | LMA
        cpu.gprs[gpr::RCX as usize] = IA32_EFER as u64;
        cpu.gprs[gpr::RAX as usize] = 0x901; // SCE | LME | NXE, LMA clear
        msr_access(&mut cpu, true, 0, 0, &mut VirtualLapic::new(0));
        assert_eq!(cpu.fields[&guest::IA32_EFER_FULL], 0xD01, "LMA stays as the CPU set it");
        assert_eq!(cpu.rip, 0x1002);
    }

    #[test]
    fn refused_msrs_and_tsc_writes_get_gp_and_do_not_advance() {
        for (msr, write) in [(0xC001_0000u32, false), (msr::IA32_TSC, true)] {
            let mut cpu = cpu_at(0x1000, 2);
            cpu.gprs[gpr::RCX as usize] = msr as u64;
            msr_access(&mut cpu, write, 0, 0, &mut VirtualLapic::new(0));
            assert_eq!(cpu.injected, [(EXCEPTION_GP, Some(0))], "{msr:#x}");
            assert_eq!(cpu.rip, 0x1000, "a faulting instruction is not skipped");
        }
    }

    #[test]
    fn tsc_adjust_reads_zero_and_only_zero_can_be_written() {
        let access = |write: bool, value: u64| {
            let mut cpu = cpu_at(0x1000, 2);
            cpu.gprs[gpr::RCX as usize] = msr::IA32_TSC_ADJUST as u64;
            cpu.gprs[gpr::RAX as usize] = value;
            cpu.gprs[gpr::RDX as usize] = if write { 0 } else { u64::MAX };
            msr_access(&mut cpu, write, 0, 0, &mut VirtualLapic::new(0));
            cpu
        };
        let read = access(false, u64::MAX);
        assert_eq!((read.gprs[gpr::RDX as usize], read.gprs[gpr::RAX as usize], read.rip), (0, 0, 0x1002));
        let write_zero = access(true, 0);
        assert!(write_zero.injected.is_empty() && write_zero.rip == 0x1002, "writing 0 again is fine");
        let adjust = access(true, 5);
        assert_eq!((adjust.injected.as_slice(), adjust.rip), (&[(EXCEPTION_GP, Some(0))][..], 0x1000), "no offsetting");
    }

    #[test]
    fn the_tsc_deadline_msr_arms_the_vcpus_lapic_timer() {
        let mut lapic = VirtualLapic::new(0);
        lapic.write(crate::vlapic::reg::SVR, 0x1FF, 0);
        lapic.write(crate::vlapic::reg::LVT_TIMER, (0b10 << 17) | 0xEC, 0);
        let mut cpu = cpu_at(0x1000, 2);
        cpu.gprs[gpr::RCX as usize] = msr::IA32_TSC_DEADLINE as u64;
        cpu.gprs[gpr::RDX as usize] = 1;
        cpu.gprs[gpr::RAX as usize] = 0x2345;
        msr_access(&mut cpu, true, 0, 0, &mut lapic);
        assert_eq!((lapic.timer_deadline(), cpu.rip), (Some(0x1_0000_2345), 0x1002));
        let mut cpu = cpu_at(0x1000, 2);
        cpu.gprs[gpr::RCX as usize] = msr::IA32_TSC_DEADLINE as u64;
        msr_access(&mut cpu, false, 0, 0, &mut lapic);
        assert_eq!((cpu.gprs[gpr::RDX as usize], cpu.gprs[gpr::RAX as usize]), (1, 0x2345));
    }

    #[test]
    fn reads_split_into_edx_eax() {
        let mut cpu = cpu_at(0, 2);
        cpu.gprs[gpr::RCX as usize] = msr::IA32_TSC as u64;
        cpu.gprs[gpr::RAX as usize] = u64::MAX;
        msr_access(&mut cpu, false, 0, 0x1234_5678_9ABC_DEF0, &mut VirtualLapic::new(0));
        assert_eq!((cpu.gprs[gpr::RDX as usize], cpu.gprs[gpr::RAX as usize]), (0x1234_5678, 0x9ABC_DEF0));
        // The APIC base says which vCPU is the boot processor.
        let bsp = |vcpu| {
            let mut cpu = cpu_at(0, 2);
            cpu.gprs[gpr::RCX as usize] = msr::IA32_APIC_BASE as u64;
            msr_access(&mut cpu, false, vcpu, 0, &mut VirtualLapic::new(0));
            cpu.gprs[gpr::RAX as usize] & (1 << 8) != 0
        };
        assert!(bsp(0) && !bsp(1));
    }

    #[test]
    fn cpuid_hides_vmx_and_names_the_vcpu() {
        let mut cpu = cpu_at(0x10, 2);
        cpu.gprs[gpr::RAX as usize] = 1;
        let host = |_, _| CpuidResult { eax: 0x906EA, ebx: 0xFF00_0000, ecx: 1 << 5, edx: 0 };
        cpuid(&mut cpu, &cpuid::GuestCpu { apic_id: 3, tsc_hz: 10_000_000, rdtscp: true, invpcid: true }, host);
        assert_eq!(cpu.gprs[gpr::RCX as usize] & (1 << 5), 0, "no VMX inside a partition");
        assert_eq!(cpu.gprs[gpr::RBX as usize] >> 24, 3, "initial APIC ID = vCPU index");
        assert_eq!(cpu.rip, 0x12);
    }

    #[test]
    fn hypercalls_decode_and_answer() {
        let call = |number| {
            let mut cpu = cpu_at(0, 3);
            cpu.gprs[gpr::RAX as usize] = number;
            (hypercall(&mut cpu), cpu.gprs[gpr::RAX as usize], cpu.rip)
        };
        assert_eq!(call(firmware::longmode::HYPERCALL_DONE), (Hypercall::Done, 0, 3));
        assert_eq!(call(firmware::longmode::HYPERCALL_ERROR).0, Hypercall::GuestError);
        assert_eq!(call(99), (Hypercall::Unknown(99), u64::MAX, 3));
        let window = |rbx| {
            let mut cpu = cpu_at(0, 3);
            cpu.gprs[gpr::RAX as usize] = firmware::longmode::HYPERCALL_SPIN_WINDOW;
            cpu.gprs[gpr::RBX as usize] = rbx;
            (hypercall(&mut cpu), cpu.gprs[gpr::RAX as usize])
        };
        assert_eq!(window(1), (Hypercall::SpinWindow { open: true }, 0));
        assert_eq!(window(0), (Hypercall::SpinWindow { open: false }, 0));
        assert_eq!(window(7).0, Hypercall::SpinWindow { open: false }, "only 1 opens");
    }

    #[test]
    fn delegation_hypercalls_carry_their_arguments_and_are_the_kernels_only() {
        use firmware::longmode::{DELEGATION_NOT_PRIVILEGED, HYPERCALL_GROUP_INFO, HYPERCALL_SET_CHILD_RESERVATION};
        let call = |number, dpl: u64| {
            let mut cpu = cpu_at(0, 3);
            cpu.fields.insert(guest::SS_ACCESS_RIGHTS, 0x93 | dpl << 5);
            let values = [number, 1, 1, 2000, 10000];
            for (register, value) in [gpr::RAX, gpr::RBX, gpr::RCX, gpr::RDX, gpr::RSI].into_iter().zip(values) {
                cpu.gprs[register as usize] = value;
            }
            (hypercall(&mut cpu), cpu.gprs[gpr::RAX as usize], cpu.rip)
        };
        assert_eq!(call(HYPERCALL_GROUP_INFO, 0), (Hypercall::GroupInfo, 0, 3));
        let set = Hypercall::SetChildReservation { child: 1, kind: 1, a: 2000, b: 10000 };
        assert_eq!(call(HYPERCALL_SET_CHILD_RESERVATION, 0), (set, 0, 3));
        let user = call(HYPERCALL_SET_CHILD_RESERVATION, 3);
        assert_eq!(user, (Hypercall::Unprivileged(HYPERCALL_SET_CHILD_RESERVATION), DELEGATION_NOT_PRIVILEGED, 3));
        assert_eq!(call(HYPERCALL_GROUP_INFO, 3).0, Hypercall::Unprivileged(HYPERCALL_GROUP_INFO));
        let revoke = firmware::longmode::HYPERCALL_REVOKE_SHARED;
        assert_eq!(call(revoke, 0).0, Hypercall::RevokeShared { gpa: 1, child: 1 });
        assert_eq!(call(revoke, 3).0, Hypercall::Unprivileged(revoke));
    }

    #[test]
    fn absent_ports_read_all_ones_in_the_operand_size_only() {
        let mut cpu = cpu_at(0, 1);
        cpu.gprs[gpr::RAX as usize] = 0x1234_5678_0000_0000;
        let access = IoAccess { port: 0x80, size: 2, input: true, string: false, rep: false };
        absent_port(&mut cpu, access);
        assert_eq!(cpu.gprs[gpr::RAX as usize], 0x1234_5678_0000_FFFF);
        assert_eq!(cpu.rip, 1);
        // IN EAX writes a 32-bit register: the upper half of RAX is cleared.
        absent_port(&mut cpu, IoAccess { size: 4, ..access });
        assert_eq!(cpu.gprs[gpr::RAX as usize], 0xFFFF_FFFF);
    }
}
