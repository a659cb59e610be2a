//! VM-exit handling: one handler class per exit reason (`vmx::exit`), each returning an
//! [`ExitOutcome`] to the slot loop, which does the accounting. What needs no hardware (MSRs,
//! CPUID, hypercalls, ports, the xAPIC/IO-APIC/UART models and IPI routing) lives in the pure
//! `vmx` crate behind `vmx::vcpu_access::VcpuAccess`, implemented here over the current VMCS.

extern crate alloc;

use alloc::string::String;
use reservations::trace::EventKind;

use config::DispatchPolicy;
use vmx::devices::DeviceEffects;
use vmx::emulate::{self, Hypercall};
use vmx::vcpu_access::{gpr, VcpuAccess};
use vmx::{ExitReason, Handler, IoAccess};

use crate::guest_entry::GuestRegs;
use crate::machine::machine;
use crate::partition::{Fault, Partition};
use crate::pcpu::kick;
use crate::vcpu::Vcpu;
use crate::vectors::{BOUNDARY_VECTOR, CONSOLE_INPUT_VECTOR, CONTROL_INPUT_VECTOR, DISPATCH_VECTOR, KICK_VECTOR};
use crate::vmcs::{self, control, guest, ro};

/// What the slot loop does after an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitOutcome {
    /// Enter the guest again.
    Resume,
    /// A host interrupt (the slot timer, a sibling pCPU's kick) stopped the guest; enter it
    /// again. Its handling is the hypervisor's own time.
    HostInterrupt,
    /// A device interrupt `owner` owns stopped the guest (whoever's it is): latched, to be
    /// raised at the owner, whose work it is; enter the guest again.
    DeviceInterrupt { owner: usize },
    /// The VMX-preemption timer stopped the guest past its slot boundary (the guard).
    Guard,
    /// A spin exit (PAUSE-loop exit, or a PAUSE under PAUSE exiting); `yielded`: the policy
    /// gives the rest of the slot away.
    Spin { yielded: bool },
    /// The vCPU halted until its next interrupt.
    Halted,
    /// The partition was stopped (the fault is recorded on it).
    Stopped,
    /// The spin-wait sampling timer came due: the sample taken; enter the guest again.
    Sampled(vmx::spin_sample::Sample),
}

/// Unknown hypercalls a partition gets a log line for.
const LOGGED_UNKNOWN_HYPERCALLS: u64 = 8;

/// Handles one VM exit of `vcpu` (of `partition`, current on this pCPU) whose slot ends at
/// `deadline`, with its guard at `guard_at`.
pub fn handle_exit(
    vcpu: &mut Vcpu,
    partition: &Partition,
    reason: ExitReason,
    raw: u32,
    deadline: u64,
    guard_at: u64,
) -> ExitOutcome {
    let rip = vmcs::read(guest::RIP);
    vcpu.last_exit_rip = rip;
    vcpu.exits += 1;
    let vcpu_index = vcpu.index;
    let stop = |reason: &'static str, detail: String| {
        partition.stop(Fault { vcpu: vcpu_index, reason, detail, rip });
        ExitOutcome::Stopped
    };
    match reason.handler() {
        Handler::HostInterrupt => {
            let info = vmcs::read(ro::VMEXIT_INTERRUPTION_INFO) as u32;
            if let Some(vector) = vmx::exit::interrupt_vector(info) {
                crate::trace::record_here(EventKind::HostInterrupt, vcpu.partition, vcpu.index, vector as u32);
                let device = machine().device_irqs.arrive(vector, crate::tsc::now(), Some(partition.id));
                if vector == CONSOLE_INPUT_VECTOR {
                    crate::console::on_input();
                } else if vector == CONTROL_INPUT_VECTOR {
                    crate::serial::COM2_INPUT.on_interrupt();
                } else if device.is_none() && ![DISPATCH_VECTOR, KICK_VECTOR, BOUNDARY_VECTOR].contains(&vector) {
                    log::warn!("unexpected interrupt vector {vector:#x} while a guest ran");
                }
                crate::apic::eoi();
                if let Some(owner) = device {
                    return ExitOutcome::DeviceInterrupt { owner };
                }
            }
            ExitOutcome::HostInterrupt
        }
        // Either the boundary passed without the timer interrupt (or the timing pCPU's IPI)
        // stopping the guest (the guard), a spin-wait sample is due, or the guest's own LAPIC
        // timer came due (handled before the next entry).
        Handler::SlotGuard if crate::tsc::now() >= guard_at => ExitOutcome::Guard,
        Handler::SlotGuard if vcpu.sample_clock.take_due(crate::tsc::now()) => {
            let long_mode = vmcs::read(guest::IA32_EFER_FULL) & vmx::msr::EFER_LMA != 0;
            let cpu = CurrentVcpu { regs: &mut vcpu.regs, partition };
            ExitOutcome::Sampled(vcpu.sample_cache.sample(&cpu, long_mode))
        }
        Handler::SlotGuard | Handler::InterruptWindow => ExitOutcome::Resume,
        Handler::Halt => {
            CurrentVcpu::of(vcpu, partition).skip_instruction();
            if vcpu.interrupt_due(&partition.devices, crate::tsc::now()) {
                return ExitOutcome::Resume;
            }
            // Halted until its timer (within this slot: the pCPU waits for it) or an IPI.
            match vcpu.lapic.timer_deadline() {
                Some(wake) if wake < deadline => {
                    crate::tsc::spin_until(wake);
                    ExitOutcome::Resume
                }
                _ => {
                    vcpu.halted = true;
                    ExitOutcome::Halted
                }
            }
        }
        Handler::PauseLoop => {
            CurrentVcpu::of(vcpu, partition).skip_instruction();
            ExitOutcome::Spin { yielded: machine().policy == DispatchPolicy::IndependentYield }
        }
        Handler::Hypercall => {
            partition.hypercalls.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
            match emulate::hypercall(&mut CurrentVcpu::of(vcpu, partition)) {
                Hypercall::Report => ExitOutcome::Resume,
                Hypercall::Done => {
                    partition.done_vcpus.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
                    ExitOutcome::Resume
                }
                Hypercall::SpinWindow { open } => {
                    vcpu.in_spin_window = open;
                    ExitOutcome::Resume
                }
                Hypercall::GuestError => stop("guest-error", "the guest reported an error on its console".into()),
                // The registers beyond RAX are written only with an answer: a refused call
                // changes nothing else (a guest probing numbers keeps its registers).
                Hypercall::GroupInfo => {
                    let answer = crate::delegation::group_info(machine(), partition);
                    let written = if answer[0] == firmware::longmode::DELEGATION_OK { 4 } else { 1 };
                    let mut cpu = CurrentVcpu::of(vcpu, partition);
                    for (register, value) in
                        [gpr::RAX, gpr::RBX, gpr::RCX, gpr::RDX].into_iter().zip(answer).take(written)
                    {
                        cpu.set_gpr(register, value);
                    }
                    ExitOutcome::Resume
                }
                Hypercall::SetChildReservation { child, kind, a, b } => {
                    let answer = crate::delegation::set_child_reservation(machine(), partition, child, kind, a, b);
                    let written = if answer[0] == firmware::longmode::DELEGATION_OK { 2 } else { 1 };
                    let mut cpu = CurrentVcpu::of(vcpu, partition);
                    for (register, value) in [gpr::RAX, gpr::RBX].into_iter().zip(answer).take(written) {
                        cpu.set_gpr(register, value);
                    }
                    ExitOutcome::Resume
                }
                Hypercall::RevokeShared { gpa, child } => {
                    let result = crate::shared_memory::revoke_by_hypercall(machine(), partition, gpa, child);
                    CurrentVcpu::of(vcpu, partition).set_gpr(gpr::RAX, result);
                    ExitOutcome::Resume
                }
                refused @ (Hypercall::Unknown(call) | Hypercall::Unprivileged(call)) => {
                    // A few lines say what the guest does; a guest calling in a loop must not
                    // turn the hypervisor's console into its own (counted in partition_stats).
                    let seen = partition.unknown_hypercalls.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
                    if seen < LOGGED_UNKNOWN_HYPERCALLS {
                        let why = match refused {
                            Hypercall::Unprivileged(_) => "a delegation hypercall from outside the guest's kernel",
                            _ => "unknown hypercall",
                        };
                        log::warn!("[{}] {why} {call}", partition.name);
                    } else if seen == LOGGED_UNKNOWN_HYPERCALLS {
                        log::warn!("[{}] more unknown hypercalls: counted, no longer logged", partition.name);
                    }
                    ExitOutcome::Resume
                }
            }
        }
        Handler::PortIo => {
            let access = IoAccess::decode(vmcs::read(ro::EXIT_QUALIFICATION));
            let mut cpu = CurrentVcpu { regs: &mut vcpu.regs, partition };
            match partition.devices.port_io(&mut cpu, vcpu_index, &mut vcpu.lapic, access, crate::tsc::now()) {
                Ok(effects) => apply(partition, vcpu_index, effects, rip),
                Err(detail) => stop("refused", detail),
            }
        }
        Handler::Cpuid => {
            let paths = &machine().controls.paths;
            let guest = vmx::cpuid::GuestCpu {
                apic_id: vcpu.index as u8,
                tsc_hz: crate::tsc::hz(),
                rdtscp: paths.rdtscp,
                invpcid: paths.invpcid,
            };
            let host = |leaf, subleaf| {
                let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
                vmx::cpuid::CpuidResult { eax: r.eax, ebx: r.ebx, ecx: r.ecx, edx: r.edx }
            };
            emulate::cpuid(&mut CurrentVcpu::of(vcpu, partition), &guest, host);
            ExitOutcome::Resume
        }
        Handler::Msr => {
            let write = reason == ExitReason::Wrmsr;
            let mut cpu = CurrentVcpu { regs: &mut vcpu.regs, partition };
            emulate::msr_access(&mut cpu, write, vcpu_index, crate::tsc::now(), &mut vcpu.lapic);
            ExitOutcome::Resume
        }
        Handler::SkipInstruction => {
            CurrentVcpu::of(vcpu, partition).skip_instruction();
            ExitOutcome::Resume
        }
        Handler::InjectUndefined => {
            CurrentVcpu::of(vcpu, partition).inject_exception(6, None);
            ExitOutcome::Resume
        }
        Handler::ApicAccess => {
            let qualification = vmcs::read(ro::EXIT_QUALIFICATION);
            let Some(offset) = vmx::exit::apic_access_offset(qualification) else {
                let detail =
                    alloc::format!("an xAPIC access Phalanx does not emulate (qualification {qualification:#x})");
                return stop("refused", detail);
            };
            let mut cpu = CurrentVcpu { regs: &mut vcpu.regs, partition };
            let gpa = vmx::devices::LAPIC_PAGE + offset as u64;
            match partition.devices.mmio(&mut cpu, vcpu_index, &mut vcpu.lapic, gpa, crate::tsc::now()) {
                Some(Ok(effects)) => apply(partition, vcpu_index, effects, rip),
                Some(Err(detail)) => stop("refused", detail),
                None => unreachable!("the xAPIC page is a device page"),
            }
        }
        Handler::ApicWrite => {
            let offset = vmx::exit::apic_write_offset(vmcs::read(ro::EXIT_QUALIFICATION));
            let effects = partition.devices.apic_write(vcpu_index, &mut vcpu.lapic, offset, crate::tsc::now());
            apply(partition, vcpu_index, effects, rip)
        }
        Handler::MemoryFault => {
            let gpa = vmcs::read(ro::GUEST_PHYSICAL_ADDR_FULL);
            if reason == ExitReason::EptViolation {
                let mut cpu = CurrentVcpu { regs: &mut vcpu.regs, partition };
                match partition.devices.mmio(&mut cpu, vcpu_index, &mut vcpu.lapic, gpa, crate::tsc::now()) {
                    Some(Ok(effects)) => return apply(partition, vcpu_index, effects, rip),
                    Some(Err(detail)) => return stop("refused", detail),
                    None => {}
                }
            }
            let violation =
                ept::EptViolation::decode(vmcs::read(ro::EXIT_QUALIFICATION), gpa, vmcs::read(ro::GUEST_LINEAR_ADDR));
            stop(reason.name(), alloc::format!("{}", violation.describe()))
        }
        Handler::GuestFault => stop(reason.name(), "the guest shut itself down (triple fault)".into()),
        Handler::EntryFailure => stop(reason.name(), alloc::format!("VM entry failed (exit reason {raw:#x})")),
        Handler::Refused => stop(
            "refused",
            alloc::format!("exit reason {} ({}) is not allowed to partitions", reason.number(), reason.name()),
        ),
    }
}

/// Does what a device exit (of the instruction at `rip`) left for the hypervisor: console
/// output, siblings to look at, a reset or power-off the guest asked for.
fn apply(partition: &Partition, vcpu: u32, effects: DeviceEffects, rip: u64) -> ExitOutcome {
    if effects.level_pins_free != 0 {
        machine().device_irqs.level_pins_free(partition.id, effects.level_pins_free);
    }
    if let Some(byte) = effects.console {
        partition.console_byte(byte);
    }
    for target in effects.kicks.iter() {
        kick(partition.id, target);
    }
    if let Some(ipi) = effects.unsupported_ipi {
        log::warn!("[{}] vCPU {vcpu}: IPI {ipi:?} is not supported yet", partition.name);
    }
    if let Some(request) = effects.power {
        partition.power_request(vcpu, request, rip);
        return ExitOutcome::Stopped;
    }
    ExitOutcome::Resume
}

/// The vCPU whose VMCS is current on this pCPU: registers saved by the entry stub, the rest
/// in the VMCS, memory in the partition.
struct CurrentVcpu<'a> {
    regs: &'a mut GuestRegs,
    partition: &'a Partition,
}

impl<'a> CurrentVcpu<'a> {
    fn of(vcpu: &'a mut Vcpu, partition: &'a Partition) -> CurrentVcpu<'a> {
        CurrentVcpu { regs: &mut vcpu.regs, partition }
    }
}

impl VcpuAccess for CurrentVcpu<'_> {
    fn gpr(&self, index: u8) -> u64 {
        match index {
            4 => vmcs::read(guest::RSP),
            i => *self.regs.gpr(i),
        }
    }

    fn set_gpr(&mut self, index: u8, value: u64) {
        match index {
            4 => vmcs::write(guest::RSP, value),
            i => *self.regs.gpr_mut(i) = value,
        }
    }

    fn rip(&self) -> u64 {
        vmcs::read(guest::RIP)
    }

    fn set_rip(&mut self, rip: u64) {
        vmcs::write(guest::RIP, rip);
    }

    fn instruction_length(&self) -> u64 {
        vmcs::read(ro::VMEXIT_INSTRUCTION_LEN)
    }

    fn read_field(&self, field: u32) -> u64 {
        vmcs::read(field)
    }

    fn write_field(&mut self, field: u32, value: u64) {
        vmcs::write(field, value);
    }

    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) {
        const VALID: u64 = 1 << 31;
        const HARDWARE_EXCEPTION: u64 = 3 << 8;
        let mut info = VALID | HARDWARE_EXCEPTION | vector as u64;
        if let Some(code) = error_code {
            info |= 1 << 11;
            vmcs::write(control::VMENTRY_EXCEPTION_ERR_CODE, code as u64);
        }
        vmcs::write(control::VMENTRY_INTERRUPTION_INFO_FIELD, info);
    }

    fn read_physical(&self, gpa: u64, out: &mut [u8]) -> Option<()> {
        self.partition.read_guest_bytes(gpa, out)
    }

    fn write_physical(&mut self, gpa: u64, bytes: &[u8]) -> Option<()> {
        self.partition.write_guest_bytes(gpa, bytes)
    }
}
