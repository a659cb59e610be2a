//! The project's Linux guest in a Phalanx partition under Bochs: loaded through the Linux
//! boot protocol, entered at startup_64, it boots with the hypervisor's CPUID (true TSC rate),
//! MSR emulation and e820 map until its first local-APIC access, which Phalanx does not
//! emulate yet: the partition is then stopped alone, with a record naming the access.

use e2e::Boot;

#[test]
fn linux_boots_in_a_partition_until_its_first_local_apic_access() {
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
    let fault = run.one("partition_fault");
    assert_eq!(fault["partition"], "linux");
    assert_eq!(fault["reason"], "ept-violation");
    assert!(fault["detail"].as_str().unwrap().contains("GPA 0xfee00"), "stopped at the local APIC: {fault}");
}
