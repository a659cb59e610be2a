//! Phalanx: a Type-1 VT-x hypervisor that gang-schedules each partition's vCPUs with
//! phase-locked timers. This is the bare-metal image's boot sequence: platform bring-up, the
//! config check, VMX root on every pCPU, then the machine built (`machine`) and every pCPU
//! released into its slot loop (`slot_loop`) until the run ends (`report`).
//! docs/architecture.md has the map of the rooms.
#![no_std]
#![no_main]

extern crate alloc;

mod apic;
mod boot;
mod boot_config;
mod console;
mod control;
mod cpu;
mod delegation;
mod device_irq;
mod exits;
mod freestanding;
mod guest_entry;
mod host_irq;
mod host_pci;
mod interrupts;
mod json;
mod machine;
mod memory;
mod pacing;
mod partition;
mod pcpu;
mod percpu;
mod phase;
mod phases;
mod platform;
mod power;
mod report;
mod serial;
mod shared_memory;
mod slot_loop;
mod smp;
mod trace;
mod tsc;
mod vcpu;
mod vectors;
mod vmcs;
mod vmx_root;

use alloc::vec::Vec;
use console::Record;

/// Period of the phase-locked tick test, in microseconds.
const PHASE_PERIOD_US: u64 = 1_000;
/// How far ahead of "now" the BSP publishes the release time `t0`.
const PHASE_LEAD_US: u64 = 20_000;
const TSC_CALIBRATION_MS: u64 = 10;

/// Reports a fatal boot error (human line + record) and ends the run.
fn fatal(stage: &str, message: &str) -> ! {
    log::error!("{stage}: {message}");
    Record::new("error").str("stage", stage).str("message", message).emit();
    power::end_run(true)
}

#[no_mangle]
extern "C" fn rust_entry(magic: u32, info: u64) -> ! {
    let entry_tsc = tsc::now();
    console::init();
    log::info!("Phalanx {} starting", env!("CARGO_PKG_VERSION"));

    let boot = memory::init(magic, info).unwrap_or_else(|e| fatal("memory", e));
    // The IDT is shared: built once here, before any CPU loads it.
    interrupts::build_idt(cpu::KERNEL_CODE_SELECTOR);
    interrupts::on_phase_test_tick(phase::on_timer_interrupt);
    interrupts::on_bsp_exception(|| power::end_run(true));
    cpu::init_this_cpu();
    interrupts::load_idt();
    apic::disable_legacy_pic();
    apic::init_this_cpu();

    let discovered = platform::discover(boot.acpi_root).unwrap_or_else(|e| fatal("acpi", &e));
    let mut platform = discovered.platform;
    if let Some(port) = discovered.pm1a_control_port {
        power::set_pm1a_control_port(port);
    }
    let bsp_apic_id = apic::id();
    if !platform.boot_cpu_first(bsp_apic_id) {
        fatal("acpi", "the boot CPU's APIC ID is not in the MADT");
    }
    platform.cpus.truncate(cpu::MAX_CPUS);
    let apic_ids: Vec<u32> = platform.cpus.iter().map(|c| c.apic_id).collect();
    for (index, &apic_id) in apic_ids.iter().enumerate() {
        cpu::register_apic_id(apic_id, index);
    }
    cpu::mark_lapic_ready();

    let tsc_hz = tsc::calibrate(TSC_CALIBRATION_MS);
    log::info!(
        "{} via {}: {} MiB usable, heap {:#x}..{:#x}, {} MiB for partitions, {} modules, TSC {} kHz",
        boot.cmdline,
        boot.loader,
        boot.usable_total >> 20,
        boot.heap.start,
        boot.heap.end,
        boot.partition_memory.total() >> 20,
        boot.modules.len(),
        tsc_hz / 1000
    );
    Record::new("boot")
        .str("loader", boot.loader)
        .str("cmdline", &boot.cmdline)
        .str("acpi", discovered.source)
        .u64("cpus", apic_ids.len() as u64)
        .u64_list("apic_ids", apic_ids.iter().map(|&a| a as u64))
        .u64("io_apics", platform.io_apics.len() as u64)
        .u64("irq_overrides", platform.overrides.len() as u64)
        .u64("usable_mib", boot.usable_total >> 20)
        .u64("partition_mib", boot.partition_memory.total() >> 20)
        .str_list("modules", boot.modules.iter().map(|m| m.name.as_str()))
        .u64("tsc_hz", tsc_hz)
        // What partitions must never receive: [start, end) pairs, flattened.
        .u64_list("image", [boot::image_range().start, boot::image_range().end])
        .u64_list("heap", [boot.heap.start, boot.heap.end])
        .u64_list("module_ranges", boot.modules.iter().flat_map(|m| [m.range.start, m.range.end]))
        .emit();

    // The config is validated against this machine before anything else starts: a rejected
    // config starts nothing.
    let check_start = tsc::now();
    let live = match boot_config::load(&boot, apic_ids.len() as u32) {
        Ok(live) => live,
        Err(error) => {
            boot_config::report_rejected(&error);
            power::end_run(true)
        }
    };
    boot_config::report_accepted(&live.validated, tsc::now() - check_start);

    // SMP: every AP sets up its own GDT/TSS/IDT and LAPIC and reports in.
    for ap in smp::start_aps(&apic_ids) {
        if ap.online {
            log::info!("cpu{} (APIC {}) online after {} us", ap.cpu, ap.apic_id, tsc::cycles_to_us(ap.cycles));
        } else {
            log::error!("cpu{} (APIC {}) did not start", ap.cpu, ap.apic_id);
        }
        Record::new("cpu_online")
            .u64("cpu", ap.cpu as u64)
            .u64("apic_id", ap.apic_id as u64)
            .bool("online", ap.online)
            .u64("startup_us", tsc::cycles_to_us(ap.cycles))
            .emit();
    }
    let cpus = smp::online_count();
    if cpus != apic_ids.len() {
        fatal("smp", "not every pCPU listed in the MADT started");
    }

    // TSC synchronisation: gang dispatch relies on one clock across pCPUs.
    let syncs: Vec<smp::TscSync> = (1..cpus).map(smp::check_tsc_sync).collect();
    let worst = syncs.iter().map(|s| s.offset.unsigned_abs()).max().unwrap_or(0);
    let in_sync = syncs.iter().all(|s| s.offset.unsigned_abs() <= s.round_trip / 2 + 1);
    Record::new("tsc_sync")
        .u64("cpus", cpus as u64)
        .bool("in_sync", in_sync)
        .u64("worst_skew_cycles", worst)
        .u64_list("round_trip_cycles", syncs.iter().map(|s| s.round_trip))
        .emit();
    for s in syncs.iter().filter(|s| s.offset.unsigned_abs() > s.round_trip / 2 + 1) {
        log::warn!(
            "cpu{}: TSC offset {} cycles exceeds the measurement's uncertainty ({} cycles round trip)",
            s.cpu,
            s.offset,
            s.round_trip
        );
    }

    let period = tsc::us_to_cycles(PHASE_PERIOD_US);
    let force_one_shot = boot_option(&boot.cmdline, "phalanx.timer") == Some("one-shot");
    let phase = phase::measure(cpus, period, tsc::us_to_cycles(PHASE_LEAD_US), force_one_shot);
    log::info!(
        "phase-locked timers ({}): {} ticks of {} cycles on {} pCPUs, skew min/median/max {}/{}/{} cycles",
        phase.mode.name(),
        phase::TICKS,
        phase.period,
        phase.cpus,
        phase.skew_min,
        phase.skew_median,
        phase.skew_max
    );
    Record::new("phase_lock")
        .u64("cpus", phase.cpus as u64)
        .str("timer_mode", phase.mode.name())
        .u64("ticks", phase::TICKS as u64)
        .u64("period_cycles", phase.period)
        .u64("skew_min_cycles", phase.skew_min)
        .u64("skew_median_cycles", phase.skew_median)
        .u64("skew_max_cycles", phase.skew_max)
        .u64("skew_median_ppm_of_period", phase.skew_median * 1_000_000 / phase.period.max(1))
        .u64("latency_median_cycles", phase.latency_median)
        .u64("latency_max_cycles", phase.latency_max)
        .emit();

    // A deliberate fault, to show (and test) that an exception is reported and stops only
    // the CPU it happened on.
    if let Some(cpu) = boot_option(&boot.cmdline, "phalanx.fault_on_cpu").and_then(|c| c.parse::<usize>().ok()) {
        log::warn!("phalanx.fault_on_cpu={cpu}: raising #UD on cpu{cpu} on purpose");
        if cpu == 0 {
            raise_invalid_opcode(0);
        } else if cpu < cpus {
            smp::post(cpu, raise_invalid_opcode);
            tsc::delay_us(1_000);
        }
    }

    // VMX root on every pCPU.
    let stopped = smp::run_on_all(cpus, vmx_root::enable_on_this_cpu);
    if !stopped.is_empty() {
        fatal(
            "vmx",
            &alloc::format!("pCPUs {stopped:?} stopped answering during VMX bring-up (see their exception records)"),
        );
    }
    report_vmx(cpus);

    let boot_cycles = tsc::now() - entry_tsc;
    Record::new("summary")
        .u64("cpus", cpus as u64)
        .u64("cpus_in_vmx_root", cpus as u64)
        .u64("boot_us", tsc::cycles_to_us(boot_cycles))
        .u64("tsc_skew_cycles", worst)
        .u64("phase_skew_median_cycles", phase.skew_median)
        .emit();
    log::info!("all {cpus} pCPUs in VMX root; boot took {} us", tsc::cycles_to_us(boot_cycles));

    let lead_us =
        boot_option(&boot.cmdline, "phalanx.dispatch_lead_us").and_then(|v| v.parse().ok()).unwrap_or(DISPATCH_LEAD_US);
    run_partitions(live, &boot, &platform, cpus, lead_us);
    power::end_run(false)
}

/// How far ahead of "now" the BSP publishes the dispatch release time.
const DISPATCH_LEAD_US: u64 = 20_000;
/// How long the BSP waits for the other pCPUs to leave their slot loops after its own.
const FINISH_TIMEOUT_US: u64 = 2_000_000;

/// Builds the machine (partitions loaded, the checked plan in TSC cycles), releases every
/// pCPU into dispatch at a common `t0`, and prints the results when the run ends.
fn run_partitions(
    live: config::LiveConfig,
    boot: &memory::BootInfo,
    platform: &firmware::platform::Platform,
    cpus: usize,
    lead_us: u64,
) {
    if live.validated.config.partitions.is_empty() {
        log::info!("the config has no partitions: nothing to run");
        return;
    }
    let hv = live.validated.config.hypervisor.clone();
    let controls = negotiate_controls(hv.policy, boot_option(&boot.cmdline, "phalanx.debug.vmx_without"));
    let force_interrupts_on = boot_option(&boot.cmdline, "phalanx.bochs") == Some("1");

    let debug_cycles = |option: &str| match boot_option(&boot.cmdline, option) {
        None => 0,
        Some(value) => value
            .parse()
            .unwrap_or_else(|_| fatal("debug", &alloc::format!("{option}={value}: not a number of cycles"))),
    };
    let length = machine::RunLength {
        lead: tsc::us_to_cycles(lead_us),
        run: hv.run_ms.map(|ms| tsc::us_to_cycles(ms * 1000)),
        progress_interval: tsc::us_to_cycles(hv.stats_interval_ms * 1000),
        debug_uncharged_cycles: debug_cycles("phalanx.debug.uncharged_cycles"),
        debug_switch_in_cycles: debug_cycles("phalanx.debug.switch_in_cycles"),
        debug_phase_switch_cycles: debug_cycles("phalanx.debug.phase_switch_cycles"),
        debug_irq_raise_delay_cycles: debug_cycles("phalanx.debug.irq_raise_delay_cycles"),
    };
    let console_input = boot_option(&boot.cmdline, "phalanx.console");
    control::start(hv.control, platform, apic::id() as u8, hv.run_ms).unwrap_or_else(|e| fatal("control", &e));
    // From here the console is buffered (drained as the UART has room): the records printed
    // between the build, which sets `t0`, and dispatch must not eat the lead before it (at
    // 115,200 baud a byte takes 87 us).
    console::start_buffering();
    let machine = machine::build(live, boot, controls, force_interrupts_on, length, console_input)
        .unwrap_or_else(|e| fatal("partitions", &e));
    if machine.console_input.is_some() {
        // Typed bytes are taken as they arrive, by the BSP (pCPU 0, which hands them on).
        host_irq::route_isa_irq(platform, serial::COM1_IRQ, vectors::CONSOLE_INPUT_VECTOR, apic::id() as u8)
            .unwrap_or_else(|e| fatal("console", &e));
        console::enable_input_interrupt();
    }
    device_irq::route(platform, machine);
    let schedule = machine.schedule;
    for p in &machine.partitions {
        Record::new("partition_start")
            .str("partition", &p.name)
            .str("payload", p.payload.name())
            .u64("vcpus", p.vcpus as u64)
            .emit();
    }
    let how_long = hv.run_ms.map_or("until `scripts/phalanx ctl end`".into(), |ms| alloc::format!("for {ms} ms"));
    log::info!(
        "dispatching {} partitions ({} policy, {} us frame) on {cpus} pCPUs {how_long}",
        machine.partitions.len(),
        machine.policy.as_str(),
        tsc::cycles_to_us(machine.frame_cycles)
    );
    trace::allocate(cpus, hv.trace_events as usize);
    let stuck = smp::run_on_all_within(cpus, slot_loop::run_pcpu, FINISH_TIMEOUT_US);
    if !stuck.is_empty() {
        fatal("dispatch", &alloc::format!("pCPUs {stuck:?} did not finish the run"));
    }
    console::stop_buffering();
    report::final_records(cpus, machine.run_end() - schedule.t0);
    trace::dump(cpus, schedule.t0);
    let ended_early = machine.run_end() < schedule.end;
    let ran_ms = tsc::cycles_to_us(machine.run_end() - schedule.t0) / 1000;
    Record::new("run_end")
        .u64("run_ms", hv.run_ms.filter(|_| !ended_early).unwrap_or(ran_ms))
        .bool("ended_early", ended_early)
        .str("ended_by", machine.end_cause().as_str())
        .str("policy", machine.policy.as_str())
        .emit();
}

/// The machine's VMX control set for `policy`, with one record saying which path each
/// optional feature takes; a CPU that lacks a hard requirement ends the run with an error
/// naming it. `without` (comma-separated feature names) takes features away first, to run
/// their fallbacks on an emulator that has them.
fn negotiate_controls(policy: config::DispatchPolicy, without: Option<&str>) -> vmx::ControlSet {
    let mut caps = vmx_root::capabilities(0).expect("BSP capabilities read at VMXON");
    for feature in without.unwrap_or("").split(',').filter(|f| !f.is_empty()) {
        caps = caps.without(feature).unwrap_or_else(|| {
            fatal("vmx", &alloc::format!("phalanx.debug.vmx_without: cannot take away {feature:?}"))
        });
    }
    let wants = vmx::Wants { yield_on_spin: policy == config::DispatchPolicy::IndependentYield };
    let controls = vmx::ControlSet::negotiate(&caps, wants).unwrap_or_else(|e| {
        let message = alloc::format!(
            "{e}: no partition can run on this CPU. Run Phalanx under Bochs (scripts/phalanx run), on an Intel CPU \
             with VT-x and EPT, or under nested KVM on one (docs: README, \"Running under QEMU + KVM\")"
        );
        fatal("vmx", &message)
    });
    let slot_timer = if apic::has_tsc_deadline() { "tsc-deadline" } else { "one-shot" };
    let mut record = Record::new("vmx_paths")
        .str("policy", policy.as_str())
        .str("debug_without", without.unwrap_or(""))
        .str("slot_timer", slot_timer);
    for (feature, path) in controls.paths.named() {
        record = record.str(feature, path);
    }
    record.emit();
    controls
}

/// `key=value` from the hypervisor's command line (the last one when it is given twice).
fn boot_option<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline.split_whitespace().filter_map(|word| word.strip_prefix(key)?.strip_prefix('=')).last()
}

fn raise_invalid_opcode(_cpu: usize) {
    // SAFETY: ud2 raises #UD, which the exception handler reports before halting this CPU.
    unsafe { core::arch::asm!("ud2") };
}

/// Prints one record per pCPU and the capability record; ends the run if a pCPU lacks VMX.
fn report_vmx(cpus: usize) {
    for cpu in 0..cpus {
        let status = vmx_root::status(cpu);
        Record::new("vmx")
            .u64("cpu", cpu as u64)
            .bool("root", status == vmx_root::VmxStatus::Root)
            .str("status", status.describe())
            .emit();
        if status != vmx_root::VmxStatus::Root {
            let message = alloc::format!(
                "pCPU {cpu}: {}. Phalanx needs Intel VT-x with EPT. Run it under Bochs (scripts/phalanx run), \
                 or under QEMU with nested KVM on an Intel host: qemu-system-x86_64 -accel kvm -cpu host,+vmx ...",
                status.describe()
            );
            fatal("vmx", &message);
        }
    }
    let caps = vmx_root::capabilities(0).expect("BSP capabilities read at VMXON");
    Record::new("vmx_msrs")
        .fmt("basic", format_args!("{:#x}", caps.basic))
        .fmt("pinbased", format_args!("{:#x}", caps.pinbased))
        .fmt("procbased", format_args!("{:#x}", caps.procbased))
        .fmt("procbased2", format_args!("{:#x}", caps.procbased2))
        .fmt("exit", format_args!("{:#x}", caps.exit))
        .fmt("entry", format_args!("{:#x}", caps.entry))
        .fmt("misc", format_args!("{:#x}", caps.misc))
        .fmt("ept_vpid", format_args!("{:#x}", caps.ept_vpid))
        .fmt("cr0_fixed0", format_args!("{:#x}", caps.cr0_fixed0))
        .fmt("cr0_fixed1", format_args!("{:#x}", caps.cr0_fixed1))
        .fmt("cr4_fixed0", format_args!("{:#x}", caps.cr4_fixed0))
        .fmt("cr4_fixed1", format_args!("{:#x}", caps.cr4_fixed1))
        .emit();
    let features = caps.features();
    let mut record = Record::new("vmx_caps").u64("revision", caps.revision_id() as u64);
    for (name, present) in features.named() {
        record = record.bool(name, present);
    }
    record.u64("preemption_timer_shift", features.preemption_timer_shift as u64).emit();
    let mismatched: Vec<usize> = (1..cpus).filter(|&c| vmx_root::capabilities(c) != Some(caps)).collect();
    if !mismatched.is_empty() {
        log::warn!("pCPUs {mismatched:?} report different VMX capabilities from the BSP");
    }
}
