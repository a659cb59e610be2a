//! The project's Linux guest in a Phalanx partition under Bochs: loaded through the Linux
//! boot protocol, entered at startup_64, it boots with the hypervisor's CPUID (true TSC rate),
//! MSR emulation, e820 map and emulated xAPIC (its timer drives the kernel's clock) up to
//! starting /init, uniprocessor (no MP/ACPI tables yet).

use e2e::Boot;

#[test]
fn linux_boots_in_a_partition_up_to_init() {
    let run = Boot::new("linux-early-boot", "bochs", 2, "tests/configs/linux-early-boot.toml").run();
    run.assert_clean_end();
    let start = run.one("partition_start");
    assert_eq!(start["payload"], "linux", "{start}");
    let console: Vec<&str> = run.log.lines().filter_map(|l| l.split_once("[linux] ").map(|(_, rest)| rest)).collect();
    let has = |needle: &str| console.iter().any(|l| l.contains(needle));
    assert!(has("Linux version 6.1"), "the kernel banner on the partition's console:\n{}", run.log);
    assert!(has("Command line: console=ttyS0,115200"), "the config's command line reached the kernel");
    assert!(has("BIOS-e820: [mem 0x0000000000100000-0x0000000003ffffff] usable"), "the e820 map of a 64 MiB partition");
    assert!(has("tsc: Detected 10.000 MHz processor"), "the true TSC rate from CPUID 0x15, not the CPU model's");
    assert!(!has("unchecked MSR access"), "every MSR Linux touches this far is emulated or absent by CPUID");
    assert!(has("Using NULL legacy PIC"), "no 8259 is emulated");
    assert!(has("clocksource: Switched to clocksource tsc"), "time keeps running on the emulated LAPIC timer");
    assert!(has("Run /init as init process"), "the kernel reaches user space:\n{}", run.log);
    assert!(run.all("partition_fault").is_empty(), "no access the partition is refused: {:?}", run.all("partition_fault"));
}
