//! Host tests: good configs load into the expected model, placement and tree; every bad one
//! is rejected with the right kind, subject, field, line and column.

use crate::*;
use reservations::{EffectiveReservation, Reservation};

const DEFAULT: &str = include_str!("../../guests/configs/default.toml");
const FOUR: &str = include_str!("../../guests/configs/four-pcpus.toml");
const OVERCOMMIT: &str = include_str!("../../guests/configs/invalid-overcommit.toml");

/// Two partitions on pCPUs 0-1 at 40% each; cases below edit it.
const BASE: &str = r#"[hypervisor]
major_frame_us = 10000
policy = "gang"

[[partition]]
name = "web"
vcpus = 2
pcpus = [0, 1]
memory_mb = 64
reservation = { budget_us = 4000, period_us = 10000 }
guest = { module = "bzImage", cmdline = "console=ttyS0" }

[[partition]]
name = "db"
vcpus = 2
pcpus = [0, 1]
memory_mb = 64
reservation = { budget_us = 4000, period_us = 10000 }
guest = { module = "bzImage" }
"#;

fn platform(pcpus: u32, memory_mb: u64) -> Platform {
    Platform {
        pcpus,
        usable_memory: core::iter::once(16 * MIB..memory_mb * MIB).collect(),
        modules: vec!["bzImage".into(), "initrd.cpio".into(), "testguest".into()],
        module_images: Vec::new(),
    }
}

fn ok(text: &str, platform: Option<&Platform>) -> Validated {
    load("partitions.toml", text, platform).unwrap_or_else(|e| panic!("expected a valid config, got: {e}"))
}

fn bad(text: &str, platform: Option<&Platform>) -> ConfigError {
    match load("partitions.toml", text, platform) {
        Ok(_) => panic!("expected a rejection of:\n{text}"),
        Err(e) => e,
    }
}

/// Replaces exactly one occurrence of `from`.
fn edit(text: &str, from: &str, to: &str) -> String {
    assert_eq!(text.matches(from).count(), 1, "`{from}` must occur exactly once");
    text.replacen(from, to, 1)
}

/// Line and column (1-based, characters) of the `nth` occurrence of `needle`, found by
/// walking the lines (independently of the crate's own offset arithmetic).
fn position(text: &str, needle: &str, nth: usize) -> (u32, u32) {
    let mut seen = 0;
    for (l, line) in text.lines().enumerate() {
        let mut from = 0;
        while let Some(i) = line[from..].find(needle) {
            if seen == nth {
                return (l as u32 + 1, line[..from + i].chars().count() as u32 + 1);
            }
            seen += 1;
            from += i + needle.len();
        }
    }
    panic!("`{needle}` #{nth} not in text");
}

#[track_caller]
fn assert_error(e: &ConfigError, kind: ErrorKind, subject: Option<&str>, field: &str, at: (u32, u32), words: &str) {
    assert_eq!(e.kind, kind, "{e}");
    assert_eq!(e.subject.as_deref(), subject, "{e}");
    assert_eq!(e.field.as_deref(), Some(field), "{e}");
    assert_eq!((e.line, e.column), at, "{e}");
    assert!(e.message.contains(words), "message lacks `{words}`: {e}");
    let text = e.to_string();
    assert!(text.starts_with(&format!("partitions.toml:{}:{}: ", at.0, at.1)), "{text}");
    assert!(text.contains(&format!("field `{field}`")), "{text}");
}

// ------------------------------------------------------------------ good configs

#[test]
fn the_default_config_places_memory_and_admits_two_hard_halves() {
    let v = ok(DEFAULT, Some(&platform(2, 256)));
    let c = &v.config;
    assert_eq!(c.hypervisor.major_frame_us, 10_000);
    assert_eq!(c.hypervisor.policy, DispatchPolicy::Gang);
    assert_eq!(c.hypervisor.run_ms, Some(2_000));
    assert_eq!(c.partitions.len(), 2);
    assert_eq!(c.partitions[0].pcpus, vec![0, 1]);
    assert_eq!(c.partitions[0].memory, MemoryRequest::Allocate { size: 16 * MIB });
    assert_eq!(c.partitions[0].reservation, Reservation::Hard { budget_us: 5_000, period_us: 10_000 });
    assert_eq!(c.partitions[0].guest.module, "testguest");
    assert!(c.partitions[0].guest.cmdline.contains("mode=barrier"));
    assert_eq!(v.memory, vec![Placement::At(16 * MIB..32 * MIB), Placement::At(32 * MIB..48 * MIB)]);
    let flat = v.tree.flatten();
    assert!(flat
        .iter()
        .all(|p| p.gang && p.reservation == EffectiveReservation::Hard { budget: 5_000, period: 10_000 }));
    assert_eq!(v.tree.pcpu_load_us(0), 10_000);
}

#[test]
fn the_four_pcpu_example_builds_its_hierarchy() {
    let v = ok(FOUR, Some(&platform(4, 1024)));
    let c = &v.config;
    assert_eq!(c.groups.len(), 2);
    assert_eq!(c.groups[0].policy, ChildPolicy::BudgetPeriod);
    assert_eq!(c.hypervisor.run_ms, Some(2_000));
    let control = c.partitions.iter().position(|p| p.name == "control").unwrap();
    assert_eq!(v.memory[control], Placement::At(0x1000_0000..0x1000_0000 + 32 * MIB));
    let barrier = &c.partitions[0];
    assert_eq!(barrier.devices.ioports, vec![0x2f8..=0x2ff]);
    assert_eq!(barrier.on_fault, OnFault::Reset);
    let crunch = c.partitions.iter().find(|p| p.name == "crunch").unwrap();
    assert_eq!(crunch.policy, NestedPolicy::RoundRobinGang);
    // batch holds 25% of each pCPU; on pCPU 1 crunch (weight 3) and logger (weight 1) split it.
    let flat = v.tree.flatten();
    assert_eq!(flat[2].reservation, EffectiveReservation::Soft { share_ppm: 187_500 });
    assert_eq!(flat[3].reservation, EffectiveReservation::Soft { share_ppm: 62_500 });
    assert_eq!(flat[2].depth, 2);
    // No two placements overlap, all are 2 MiB aligned and inside usable memory.
    let ranges: Vec<_> = v.memory.iter().map(|p| p.range().unwrap()).collect();
    for (i, a) in ranges.iter().enumerate() {
        assert_eq!(a.start % MEMORY_ALIGN, 0);
        assert!(a.start >= 16 * MIB && a.end <= 1024 * MIB);
        for b in &ranges[i + 1..] {
            assert!(a.end <= b.start || b.end <= a.start, "{a:?} overlaps {b:?}");
        }
    }
}

/// docs/config.md's annotated example must stay a valid config.
#[test]
fn the_documented_example_is_valid() {
    let doc = include_str!("../../docs/config.md");
    let start = doc.find("## Annotated example").expect("section exists");
    let block = &doc[start..];
    let body = &block[block.find("```toml\n").expect("toml block") + 8..];
    let example = &body[..body.find("```").expect("block ends")];
    let v = ok(example, Some(&platform(4, 1024)));
    assert_eq!((v.config.groups.len(), v.config.partitions.len()), (2, 3));
}

#[test]
fn defaults_apply_when_keys_are_left_out() {
    let text = edit(BASE, "[hypervisor]\nmajor_frame_us = 10000\npolicy = \"gang\"\n", "");
    let v = ok(&text, None);
    let hv = &v.config.hypervisor;
    assert_eq!(
        (hv.major_frame_us, hv.policy, hv.stats_interval_ms, hv.skew_bound_us, hv.spin_sample_us, hv.trace_events),
        (10_000, DispatchPolicy::Gang, 1_000, None, 0, 0)
    );
    let db = &v.config.partitions[1];
    assert_eq!((db.policy, db.on_fault, db.guest.cmdline.as_str()), (NestedPolicy::Gang, OnFault::Stop, ""));
    assert_eq!((db.on_reboot, db.on_poweroff), (OnReboot::Reset, OnPoweroff::Stop), "a PC reboots; S5 stops");
    assert_eq!(db.devices, Devices::default());
    assert_eq!(v.memory, vec![Placement::Deferred { size: 64 * MIB }; 2], "no machine: placed at boot");
}

#[test]
fn first_fit_skips_explicit_regions_and_aligns_to_2_mib() {
    let text = edit(BASE, "memory_mb = 64\nreservation = { budget_us = 4000, period_us = 10000 }\nguest = { module = \"bzImage\", cmdline",
        "memory = { base = 0x2000000, size_mb = 16 }\nreservation = { budget_us = 4000, period_us = 10000 }\nguest = { module = \"bzImage\", cmdline");
    // Usable: [17 MiB, 56 MiB) and [64 MiB, 256 MiB). web is fixed at 32..48 MiB; db (64 MiB)
    // fits neither the aligned 18..32 MiB gap nor 48..56 MiB, so it lands at 64 MiB.
    let machine = Platform {
        pcpus: 2,
        usable_memory: vec![64 * MIB..256 * MIB, 17 * MIB..56 * MIB],
        modules: vec!["bzImage".into()],
        module_images: Vec::new(),
    };
    let v = ok(&text, Some(&machine));
    assert_eq!(v.memory, vec![Placement::At(32 * MIB..48 * MIB), Placement::At(64 * MIB..128 * MIB)]);
    // A small one goes into the aligned gap below the explicit region.
    let small = edit(
        &text,
        "memory_mb = 64\nreservation = { budget_us = 4000, period_us = 10000 }\nguest = { module = \"bzImage\" }",
        "memory_mb = 8\nreservation = { budget_us = 4000, period_us = 10000 }\nguest = { module = \"bzImage\" }",
    );
    assert_eq!(ok(&small, Some(&machine)).memory[1], Placement::At(18 * MIB..26 * MIB));
}

#[test]
fn independent_dispatch_flattens_without_gang_alignment() {
    let text = edit(BASE, "policy = \"gang\"", "policy = \"independent-yield\"");
    let v = ok(&text, None);
    assert_eq!(v.config.hypervisor.policy, DispatchPolicy::IndependentYield);
    assert!(v.tree.flatten().iter().all(|p| !p.gang));
    let relaxed = edit(BASE, "policy = \"gang\"", "policy = \"relaxed-co\"\nskew_bound_us = 500");
    let v = ok(&relaxed, None);
    assert_eq!(v.config.hypervisor.skew_bound_us, Some(500));
    assert!(v.tree.flatten().iter().all(|p| !p.gang), "relaxed co-scheduling starts from the independent tables");
}

#[test]
fn ipi_gang_runs_the_gang_tables() {
    let gang = ok(BASE, None);
    let text = edit(BASE, "policy = \"gang\"", "policy = \"ipi-gang\"");
    let v = ok(&text, None);
    assert_eq!(v.config.hypervisor.policy, DispatchPolicy::IpiGang);
    assert!(v.tree.flatten().iter().all(|p| p.gang));
    assert_eq!(v.dispatch, gang.dispatch, "only how boundaries are signalled differs");
}

#[test]
fn line_and_column_count_characters() {
    assert_eq!(line_column("a = 1\nb = 2", 6), (2, 1));
    assert_eq!(line_column("# é\nname = 3", 9), (2, 5));
    assert_eq!(line_column("é = 1", 5), (1, 5), "é is one column, two bytes");
}

#[test]
fn port_ranges_parse_hex_decimal_and_single_ports() {
    assert_eq!(parse_port_range("0x2f8-0x2ff"), Ok(0x2f8..=0x2ff));
    assert_eq!(parse_port_range("0x60"), Ok(0x60..=0x60));
    assert_eq!(parse_port_range("96 - 100"), Ok(96..=100));
    assert!(parse_port_range("0x2ff-0x2f8").unwrap_err().contains("ends before it starts"));
    assert!(parse_port_range("0x10000").is_err());
    assert!(parse_port_range("com2").is_err());
}

// ------------------------------------------------------------------ bad configs

#[test]
fn the_shipped_overcommit_example_is_rejected_at_the_second_reservation() {
    let e = load("partitions.toml", OVERCOMMIT, None).unwrap_err();
    assert_error(
        &e,
        ErrorKind::Admission,
        Some("partition \"second\""),
        "reservation",
        position(OVERCOMMIT, "{ budget_us = 5000", 0),
        "over-admitted",
    );
}

#[test]
fn pcpu_that_does_not_exist_is_pointed_at_exactly() {
    let text = edit(BASE, "pcpus = [0, 1]\nmemory_mb = 64\nreservation = { budget_us = 4000, period_us = 10000 }\nguest = { module = \"bzImage\", ",
        "pcpus = [0, 7]\nmemory_mb = 64\nreservation = { budget_us = 4000, period_us = 10000 }\nguest = { module = \"bzImage\", ");
    let e = bad(&text, Some(&platform(4, 256)));
    assert_eq!(
        e.to_string(),
        "partitions.toml:8:13: partition \"web\": field `pcpus`: pCPU 7 does not exist (the machine has 4 pCPUs)"
    );
    assert_eq!(e.kind, ErrorKind::InvalidValue);
    // The host check without a machine description accepts it.
    ok(&text, None);
}

#[test]
fn syntax_errors_give_the_position() {
    let text = edit(BASE, "pcpus = [0, 1]\nmemory_mb = 64\nreservation = { budget_us = 4000, period_us = 10000 }\nguest = { module = \"bzImage\" }",
        "pcpus = [0, 1\nmemory_mb = 64\nreservation = { budget_us = 4000, period_us = 10000 }\nguest = { module = \"bzImage\" }");
    let e = bad(&text, None);
    assert_eq!(e.kind, ErrorKind::Syntax);
    // The parser notices the missing `,`/`]` at the next token: the start of line 17.
    assert_eq!((e.line, e.column), (17, 1), "{e}");
    assert!(e.to_string().starts_with("partitions.toml:17:1: "), "{e}");
    assert!(e.message.contains("expected `,`"), "{e}");
}

#[test]
fn unknown_keys_are_rejected_with_their_table() {
    let text = edit(BASE, "vcpus = 2\npcpus = [0, 1]\nmemory_mb = 64\nreservation = { budget_us = 4000, period_us = 10000 }\nguest = { module = \"bzImage\" }",
        "vcpus = 2\ncpus = [0, 1]\nmemory_mb = 64\nreservation = { budget_us = 4000, period_us = 10000 }\nguest = { module = \"bzImage\" }");
    let e = bad(&text, None);
    assert_error(
        &e,
        ErrorKind::Schema,
        Some("partition \"db\""),
        "cpus",
        position(&text, "cpus = [0, 1]", 1),
        "unknown field `cpus`",
    );

    let text = edit(BASE, "policy = \"gang\"", "policy = \"gang\"\nframe_us = 5");
    let e = bad(&text, None);
    assert_error(&e, ErrorKind::Schema, Some("[hypervisor]"), "frame_us", (4, 1), "unknown field");

    let text = format!("{BASE}\n[hypervsor]\nrun_ms = 5\n");
    let e = bad(&text, None);
    assert_eq!((e.kind, e.subject.as_deref(), e.field.as_deref()), (ErrorKind::Schema, None, Some("hypervsor")), "{e}");
    assert_eq!((e.line, e.column), position(&text, "hypervsor", 0));
}

#[test]
fn unknown_keys_inside_inline_tables_name_the_path() {
    let text = edit(
        BASE,
        "reservation = { budget_us = 4000, period_us = 10000 }\nguest = { module = \"bzImage\" }",
        "reservation = { budget = 4000, period_us = 10000 }\nguest = { module = \"bzImage\" }",
    );
    let e = bad(&text, None);
    assert_error(
        &e,
        ErrorKind::Schema,
        Some("partition \"db\""),
        "reservation.budget",
        position(&text, "budget =", 0),
        "unknown field `budget`",
    );
}

#[test]
fn wrong_types_and_enum_values_are_schema_errors() {
    let text = edit(BASE, "vcpus = 2\npcpus = [0, 1]\nmemory_mb = 64\nreservation = { budget_us = 4000, period_us = 10000 }\nguest = { module = \"bzImage\", ",
        "vcpus = \"two\"\npcpus = [0, 1]\nmemory_mb = 64\nreservation = { budget_us = 4000, period_us = 10000 }\nguest = { module = \"bzImage\", ");
    let e = bad(&text, None);
    assert_error(
        &e,
        ErrorKind::Schema,
        Some("partition \"web\""),
        "vcpus",
        position(&text, "\"two\"", 0),
        "invalid type",
    );

    let text = edit(BASE, "guest = { module = \"bzImage\" }", "guest = \"bzImage\"");
    let e = bad(&text, None);
    assert_error(
        &e,
        ErrorKind::Schema,
        Some("partition \"db\""),
        "guest",
        position(&text, "\"bzImage\"", 1),
        "expected a table: { module = ",
    );

    let db = "guest = { module = \"bzImage\" }";
    let text = edit(BASE, db, &format!("{db}\non_reboot = \"stop\"\non_poweroff = \"end-run\""));
    let p = &ok(&text, None).config.partitions[1];
    assert_eq!((p.on_reboot, p.on_poweroff), (OnReboot::Stop, OnPoweroff::EndRun));
    let text = edit(BASE, db, &format!("{db}\non_poweroff = \"halt\""));
    let e = bad(&text, None);
    let at = position(&text, "\"halt\"", 0);
    assert_error(&e, ErrorKind::Schema, Some("partition \"db\""), "on_poweroff", at, "unknown variant `halt`");

    let text = edit(BASE, "policy = \"gang\"", "policy = \"gangs\"");
    let e = bad(&text, None);
    assert_error(&e, ErrorKind::Schema, Some("[hypervisor]"), "policy", (3, 10), "unknown variant `gangs`");

    let text = edit(BASE, "pcpus = [0, 1]\nmemory_mb = 64\nreservation = { budget_us = 4000, period_us = 10000 }\nguest = { module = \"bzImage\" }",
        "pcpus = [0, -1]\nmemory_mb = 64\nreservation = { budget_us = 4000, period_us = 10000 }\nguest = { module = \"bzImage\" }");
    let e = bad(&text, None);
    assert_error(&e, ErrorKind::Schema, Some("partition \"db\""), "pcpus", position(&text, "-1", 0), "-1");
}

#[test]
fn missing_keys_name_the_key_at_the_table_header() {
    let text = edit(BASE, "name = \"db\"\nvcpus = 2\n", "name = \"db\"\n");
    let e = bad(&text, None);
    assert_error(
        &e,
        ErrorKind::Schema,
        Some("partition \"db\""),
        "vcpus",
        position(&text, "[[partition]]", 1),
        "missing field `vcpus`",
    );
}

#[test]
fn duplicate_names_point_at_the_second_and_cite_the_first() {
    let text = edit(BASE, "name = \"db\"", "name = \"web\"");
    let e = bad(&text, None);
    assert_error(
        &e,
        ErrorKind::DuplicateName,
        Some("partition \"web\""),
        "name",
        position(&text, "\"web\"", 1),
        "partition on line 6",
    );
    // A group written after a partition of the same name: the group is the second.
    let text = format!("{BASE}\n[[group]]\nname = \"db\"\nreservation = {{ weight = 1 }}\n");
    let e = bad(&text, None);
    assert_error(
        &e,
        ErrorKind::DuplicateName,
        Some("group \"db\""),
        "name",
        position(&text, "\"db\"", 1),
        "partition on line 14",
    );
}

#[test]
fn unknown_groups_and_parents_are_named() {
    let text = edit(BASE, "name = \"db\"\n", "name = \"db\"\ngroup = \"batch\"\n");
    let e = bad(&text, None);
    assert_error(
        &e,
        ErrorKind::UnknownName,
        Some("partition \"db\""),
        "group",
        position(&text, "\"batch\"", 0),
        "no [[group]] is named \"batch\"",
    );

    let text = format!("{BASE}\n[[group]]\nname = \"g\"\nparent = \"web\"\nreservation = {{ weight = 1 }}\n");
    let e = bad(&text, None);
    assert_error(
        &e,
        ErrorKind::UnknownName,
        Some("group \"g\""),
        "parent",
        position(&text, "\"web\"", 1),
        "is a partition",
    );
}

#[test]
fn group_cycles_are_rejected() {
    let text = format!(
        "{}\n[[group]]\nname = \"a\"\nparent = \"b\"\nreservation = {{ share_percent = 50 }}\n\n[[group]]\nname = \"b\"\nparent = \"a\"\nreservation = {{ share_percent = 50 }}\n",
        edit(BASE, "name = \"db\"\n", "name = \"db\"\ngroup = \"b\"\n")
    );
    let e = bad(&text, None);
    assert_error(&e, ErrorKind::Admission, Some("group \"a\""), "parent", position(&text, "\"b\"", 1), "cycle");
}

#[test]
fn zero_vcpus_and_duplicate_pcpus_are_invalid_values() {
    let text = edit(BASE, "vcpus = 2\npcpus = [0, 1]\nmemory_mb = 64\nreservation = { budget_us = 4000, period_us = 10000 }\nguest = { module = \"bzImage\" }",
        "vcpus = 0\npcpus = [0, 1]\nmemory_mb = 64\nreservation = { budget_us = 4000, period_us = 10000 }\nguest = { module = \"bzImage\" }");
    let e = bad(&text, None);
    assert_error(&e, ErrorKind::InvalidValue, Some("partition \"db\""), "vcpus", (15, 9), "at least 1 vCPU");

    let text = edit(BASE, "pcpus = [0, 1]\nmemory_mb = 64\nreservation = { budget_us = 4000, period_us = 10000 }\nguest = { module = \"bzImage\", ",
        "pcpus = [1, 1]\nmemory_mb = 64\nreservation = { budget_us = 4000, period_us = 10000 }\nguest = { module = \"bzImage\", ");
    let e = bad(&text, None);
    assert_error(&e, ErrorKind::InvalidValue, Some("partition \"web\""), "pcpus", (8, 13), "listed twice");
}

#[test]
fn gang_with_more_vcpus_than_pcpus_suggests_round_robin_gang() {
    let text = edit(BASE, "vcpus = 2\npcpus = [0, 1]\nmemory_mb = 64\nreservation = { budget_us = 4000, period_us = 10000 }\nguest = { module = \"bzImage\" }",
        "vcpus = 4\npcpus = [0, 1]\nmemory_mb = 64\nreservation = { budget_us = 4000, period_us = 10000 }\nguest = { module = \"bzImage\" }");
    let e = bad(&text, None);
    assert_error(&e, ErrorKind::InvalidValue, Some("partition \"db\""), "policy", (15, 9), "round-robin-gang");
    ok(&edit(&text, "vcpus = 4", "vcpus = 4\npolicy = \"round-robin-gang\""), None);
}

#[test]
fn memory_that_does_not_fit_the_machine_is_rejected() {
    let e = bad(BASE, Some(&platform(2, 128)));
    assert_error(
        &e,
        ErrorKind::Memory,
        Some("partition \"db\""),
        "memory_mb",
        position(BASE, "64", 1),
        "64 MiB does not fit",
    );
    assert!(e.message.contains("largest free 2 MiB-aligned block left is 48 MiB"), "{e}");
    ok(BASE, Some(&platform(2, 144)));
}

#[test]
fn explicit_memory_must_be_aligned_usable_and_unshared() {
    let fixed = |text: &str, nth_from: &str, base: &str| -> String {
        edit(
            text,
            nth_from,
            &nth_from.replace("memory_mb = 64", &format!("memory = {{ base = {base}, size_mb = 64 }}")),
        )
    };
    let web = "memory_mb = 64\nreservation = { budget_us = 4000, period_us = 10000 }\nguest = { module = \"bzImage\", ";
    let db = "memory_mb = 64\nreservation = { budget_us = 4000, period_us = 10000 }\nguest = { module = \"bzImage\" }";

    let text = fixed(BASE, web, "0x2100000");
    let e = bad(&text, None);
    assert_error(
        &e,
        ErrorKind::InvalidValue,
        Some("partition \"web\""),
        "memory.base",
        position(&text, "0x2100000", 0),
        "not 2 MiB aligned",
    );

    let text = fixed(&fixed(BASE, web, "0x4000000"), db, "0x6000000");
    let e = bad(&text, None);
    assert_error(
        &e,
        ErrorKind::Memory,
        Some("partition \"db\""),
        "memory",
        position(&text, "{ base = 0x6000000", 0),
        "overlaps partition \"web\"",
    );

    let text = fixed(BASE, web, "0x40000000");
    let e = bad(&text, Some(&platform(2, 512)));
    assert_error(
        &e,
        ErrorKind::Memory,
        Some("partition \"web\""),
        "memory",
        position(&text, "{ base = 0x40000000", 0),
        "not inside usable memory",
    );

    let text = edit(BASE, "memory_mb = 64\nreservation = { budget_us = 4000, period_us = 10000 }\nguest = { module = \"bzImage\" }",
        "memory_mb = 64\nmemory = { base = 0x4000000, size_mb = 64 }\nreservation = { budget_us = 4000, period_us = 10000 }\nguest = { module = \"bzImage\" }");
    let e = bad(&text, None);
    assert_error(
        &e,
        ErrorKind::InvalidValue,
        Some("partition \"db\""),
        "memory",
        position(&text, "{ base", 0),
        "not both",
    );
}

/// A payload whose contents are known must load into its partition, with the loader's own
/// checks: refused at the check, naming the partition, not stopped at start.
#[test]
fn payloads_that_cannot_load_are_refused_at_the_check() {
    static TEST_GUEST: [u8; 3 << 20] = [0x90; 3 << 20]; // a 3 MiB flat image
    let mut machine = platform(4, 1024);
    machine.module_images = vec![("testguest".into(), &TEST_GUEST[..])];
    let db_block = "vcpus = 2\npcpus = [0, 1]\nmemory_mb = 64\nreservation = { budget_us = 4000, period_us = 10000 }\nguest = { module = \"bzImage\" }";
    let cases =
        [(60, 64, "mode=idle", "at most 56"), (2, 2, "mode=idle", "too small"), (2, 64, "mode=idle é", "ASCII")];
    for (vcpus, memory_mb, cmdline, words) in cases {
        let to = format!(
            "vcpus = {vcpus}\npcpus = [0, 1]\nmemory_mb = {memory_mb}\nreservation = {{ budget_us = 4000, period_us = 10000 }}\n\
             guest = {{ module = \"testguest\", cmdline = \"{cmdline}\" }}"
        );
        let text = edit(BASE, db_block, &to);
        let e = bad(&text, Some(&machine));
        let at = position(&text, "\"testguest\"", 0);
        assert_error(&e, ErrorKind::InvalidValue, Some("partition \"db\""), "guest.module", at, words);
    }
    let db = "guest = { module = \"bzImage\" }";
    // It fits: accepted; and without its contents (the host check without --module) the
    // payload is not looked at.
    let text = edit(BASE, db, "guest = { module = \"testguest\", cmdline = \"mode=idle\" }");
    ok(&text, Some(&machine));
    // An initrd is loaded for a Linux kernel; the flat test guest takes none.
    machine.module_images.push(("initrd.cpio".into(), &TEST_GUEST[..4096]));
    let text = edit(BASE, db, "guest = { module = \"testguest\", initrd = \"initrd.cpio\", cmdline = \"mode=idle\" }");
    let e = bad(&text, Some(&machine));
    assert_error(
        &e,
        ErrorKind::InvalidValue,
        Some("partition \"db\""),
        "guest.module",
        position(&text, "\"testguest\"", 0),
        "no initrd",
    );
    ok(&edit(BASE, db, "guest = { module = \"bzImage\", initrd = \"initrd.cpio\" }"), Some(&machine));
    let text = edit(BASE, db, "guest = { module = \"testguest\", cmdline = \"mode=idle é\" }");
    ok(&text, Some(&platform(4, 1024)));
}

/// The image's heap holds what the accepted partitions need: more vCPUs than it can hold are
/// refused at the partition that tips it over.
#[test]
fn partitions_the_heap_cannot_hold_are_refused() {
    let many = |name: &str| {
        format!(
            "[[partition]]\nname = \"{name}\"\nvcpus = 254\npcpus = [0, 1]\nmemory_mb = 16\nreservation = {{ weight = 1 }}\n\
             policy = \"round-robin-gang\"\nguest = {{ module = \"testguest\" }}\n\n"
        )
    };
    let three = format!("[hypervisor]\nmajor_frame_us = 10000\n\n{}{}{}", many("a"), many("b"), many("c"));
    let v = ok(&three, Some(&platform(2, 1024)));
    assert!(v.config.heap_estimate(2) <= HEAP_BYTES, "three fit");
    let four = format!("{three}{}", many("d"));
    let e = bad(&four, Some(&platform(2, 1024)));
    assert_error(&e, ErrorKind::Memory, Some("partition \"d\""), "vcpus", position(&four, "254", 3), "heap");
}

/// What the image would not act on is refused, each at its own key, not accepted and ignored.
#[test]
fn owned_irqs_are_planned_and_settings_the_image_does_not_enforce_are_refused() {
    let db = "guest = { module = \"bzImage\" }";
    // A PCI line (GSI 16 and up, level-triggered) is routed like an ISA IRQ, on its own pin of
    // the partition's 24-pin IO-APIC: beyond that there is none.
    let text = edit(BASE, db, &format!("{db}\ndevices = {{ irqs = [5, 24] }}"));
    let e = bad(&text, None);
    let at = position(&text, "24]", 0);
    assert_error(&e, ErrorKind::DeviceConflict, Some("partition \"db\""), "devices.irqs", at, "24 pins");
    let v = ok(&edit(BASE, db, &format!("{db}\ndevices = {{ irqs = [5, 17] }}")), None);
    assert_eq!(v.irqs.routes().iter().map(|r| r.irq).collect::<Vec<_>>(), [5, 17]);
    // COM1's IRQ is the console's, alone or through com3, which shares it.
    for (to, field, at, words) in [
        ("devices = { irqs = [4] }", "devices.irqs", "4]", "hypervisor's console"),
        ("devices = { serial = \"com3\" }", "devices.serial", "\"com3\"", "shares IRQ 4 with com1"),
    ] {
        let text = edit(BASE, db, &format!("{db}\n{to}"));
        let e = bad(&text, None);
        assert_error(&e, ErrorKind::DeviceConflict, Some("partition \"db\""), field, position(&text, at, 0), words);
    }
    let v = ok(&edit(BASE, db, &format!("{db}\ndevices = {{ serial = \"com2\", irqs = [5] }}")), None);
    let routes: Vec<(u32, usize, u8)> = v.irqs.routes().iter().map(|r| (r.irq, r.partition, r.vector)).collect();
    assert_eq!(routes, [(3, 1, 0x50), (5, 1, 0x51)], "com2's IRQ 3 and IRQ 5, one host vector each");
    // A partition's nested policy means something only under gang dispatch.
    let text =
        edit(&edit(BASE, "policy = \"gang\"", "policy = \"independent\""), db, &format!("{db}\npolicy = \"gang\""));
    let e = bad(&text, None);
    let at = position(&text, "\"gang\"", 0);
    assert_error(&e, ErrorKind::InvalidValue, Some("partition \"db\""), "policy", at, "applies only to gang dispatch");
    let text = edit(BASE, db, &format!("{db}\npolicy = \"round-robin-gang\""));
    assert_eq!(ok(&text, None).config.partitions[1].policy, NestedPolicy::RoundRobinGang);
}

#[test]
fn devices_owned_twice_are_rejected() {
    let web = "guest = { module = \"bzImage\", cmdline = \"console=ttyS0\" }";
    let db = "guest = { module = \"bzImage\" }";
    let text = edit(
        &edit(BASE, web, &format!("{web}\ndevices = {{ ioports = [\"0x2f8-0x2ff\"], irqs = [3] }}")),
        db,
        &format!("{db}\ndevices = {{ ioports = [\"0x2fc\"] }}"),
    );
    let e = bad(&text, None);
    assert_error(
        &e,
        ErrorKind::DeviceConflict,
        Some("partition \"db\""),
        "devices.ioports",
        position(&text, "\"0x2fc\"", 0),
        "already owned by partition \"web\"",
    );

    // A serial port brings its IRQ along.
    let text = edit(
        &edit(BASE, web, &format!("{web}\ndevices = {{ irqs = [3] }}")),
        db,
        &format!("{db}\ndevices = {{ serial = \"com4\" }}"),
    );
    let e = bad(&text, None);
    assert_error(
        &e,
        ErrorKind::DeviceConflict,
        Some("partition \"db\""),
        "devices.serial",
        position(&text, "\"com4\"", 0),
        "IRQ 3 is already owned",
    );

    let text = edit(BASE, db, &format!("{db}\ndevices = {{ serial = \"com1\" }}"));
    let e = bad(&text, None);
    assert_error(
        &e,
        ErrorKind::DeviceConflict,
        Some("partition \"db\""),
        "devices.serial",
        position(&text, "\"com1\"", 0),
        "hypervisor's console",
    );

    let text = edit(BASE, db, &format!("{db}\ndevices = {{ ioports = [\"0x40-0x47\"] }}"));
    let e = bad(&text, None);
    assert_error(
        &e,
        ErrorKind::DeviceConflict,
        Some("partition \"db\""),
        "devices.ioports",
        position(&text, "\"0x40-0x47\"", 0),
        "belong to the hypervisor",
    );

    let text = edit(BASE, db, &format!("{db}\ndevices = {{ irqs = [0] }}"));
    let e = bad(&text, None);
    assert_error(
        &e,
        ErrorKind::DeviceConflict,
        Some("partition \"db\""),
        "devices.irqs",
        position(&text, "0] }", 0),
        "PIT",
    );
}

#[test]
fn over_admitted_pcpu_points_at_the_reservation_that_tips_it() {
    let text = edit(
        BASE,
        "reservation = { budget_us = 4000, period_us = 10000 }\nguest = { module = \"bzImage\" }",
        "reservation = { budget_us = 7000, period_us = 10000 }\nguest = { module = \"bzImage\" }",
    );
    let e = bad(&text, None);
    assert_error(
        &e,
        ErrorKind::Admission,
        Some("partition \"db\""),
        "reservation",
        position(&text, "{ budget_us = 7000", 0),
        "pCPU 0 is over-admitted",
    );
    assert!(e.message.contains("110.0%"), "{e}");
}

#[test]
fn children_beyond_their_group_are_rejected() {
    let text = format!(
        "{}\n[[group]]\nname = \"g\"\nreservation = {{ share_percent = 50 }}\n",
        edit(BASE, "name = \"db\"\n", "name = \"db\"\ngroup = \"g\"\n").replacen(
            "reservation = { budget_us = 4000, period_us = 10000 }\nguest = { module = \"bzImage\" }",
            "reservation = { budget_us = 6000, period_us = 10000 }\nguest = { module = \"bzImage\" }",
            1
        )
    );
    let e = bad(&text, None);
    assert_error(
        &e,
        ErrorKind::Admission,
        Some("partition \"db\""),
        "reservation",
        position(&text, "{ budget_us = 6000", 0),
        "exceeds group \"g\"",
    );
}

#[test]
fn periods_must_divide_the_major_frame() {
    let text = edit(
        BASE,
        "reservation = { budget_us = 4000, period_us = 10000 }\nguest = { module = \"bzImage\" }",
        "reservation = { budget_us = 1000, period_us = 3000 }\nguest = { module = \"bzImage\" }",
    );
    let e = bad(&text, None);
    assert_error(
        &e,
        ErrorKind::Admission,
        Some("partition \"db\""),
        "reservation.period_us",
        position(&text, "3000", 0),
        "does not divide the major frame",
    );
}

#[test]
fn a_reservation_must_be_exactly_one_kind() {
    let text = edit(
        BASE,
        "reservation = { budget_us = 4000, period_us = 10000 }\nguest = { module = \"bzImage\" }",
        "reservation = { weight = 2, share_percent = 10 }\nguest = { module = \"bzImage\" }",
    );
    let e = bad(&text, None);
    assert_error(
        &e,
        ErrorKind::InvalidValue,
        Some("partition \"db\""),
        "reservation",
        position(&text, "{ weight", 0),
        "exactly one of",
    );
    let text = edit(
        BASE,
        "reservation = { budget_us = 4000, period_us = 10000 }\nguest = { module = \"bzImage\" }",
        "reservation = { budget_us = 4000 }\nguest = { module = \"bzImage\" }",
    );
    assert!(bad(&text, None).message.contains("needs a `period_us`"));
}

#[test]
fn hard_reservations_cannot_hang_below_a_soft_group() {
    let text = format!(
        "{}\n[[group]]\nname = \"soft\"\nreservation = {{ weight = 1 }}\n",
        edit(BASE, "name = \"db\"\n", "name = \"db\"\ngroup = \"soft\"\n")
    );
    let e = bad(&text, None);
    assert_error(
        &e,
        ErrorKind::Admission,
        Some("partition \"db\""),
        "reservation",
        position(&text, "{ budget_us", 1),
        "weighted (soft) share",
    );
}

#[test]
fn hypervisor_settings_are_checked() {
    let text = edit(BASE, "policy = \"gang\"", "policy = \"gang\"\nskew_bound_us = 100");
    let e = bad(&text, None);
    assert_error(
        &e,
        ErrorKind::InvalidValue,
        Some("[hypervisor]"),
        "skew_bound_us",
        (4, 17),
        "only policy \"relaxed-co\"",
    );
    let text = edit(BASE, "major_frame_us = 10000", "major_frame_us = 10");
    let e = bad(&text, None);
    assert_error(&e, ErrorKind::InvalidValue, Some("[hypervisor]"), "major_frame_us", (2, 18), "outside 20 us");
    let text = edit(BASE, "policy = \"gang\"", "policy = \"gang\"\nspin_sample_us = 5");
    let e = bad(&text, None);
    assert_error(&e, ErrorKind::InvalidValue, Some("[hypervisor]"), "spin_sample_us", (4, 18), "0 (no sampling) or 10");
    for (value, sample_us) in [("0", 0), ("250", 250)] {
        let text = edit(BASE, "policy = \"gang\"", &format!("policy = \"gang\"\nspin_sample_us = {value}"));
        assert_eq!(ok(&text, None).config.hypervisor.spin_sample_us, sample_us);
    }
    let text = edit(BASE, "policy = \"gang\"", "policy = \"gang\"\ntrace_events = 100");
    let e = bad(&text, None);
    assert_error(
        &e,
        ErrorKind::InvalidValue,
        Some("[hypervisor]"),
        "trace_events",
        (4, 16),
        "0 (no trace) or at least 1024",
    );
    // The buffers of every pCPU come from one heap: 4 pCPUs x 131072 x 16 bytes = 8 MiB fits,
    // one event more per pCPU does not (and the message says what would).
    let text = edit(BASE, "policy = \"gang\"", "policy = \"gang\"\ntrace_events = 131072");
    assert_eq!(ok(&text, Some(&platform(4, 1024))).config.hypervisor.trace_events, 131_072);
    let text = edit(BASE, "policy = \"gang\"", "policy = \"gang\"\ntrace_events = 131073");
    let e = bad(&text, Some(&platform(4, 1024)));
    assert_error(
        &e,
        ErrorKind::InvalidValue,
        Some("[hypervisor]"),
        "trace_events",
        (4, 16),
        "at most 131072 events per pCPU",
    );
    let text = edit(BASE, "policy = \"gang\"", "policy = \"gang\"\nrun_ms = 0");
    let e = bad(&text, None);
    assert_error(&e, ErrorKind::InvalidValue, Some("[hypervisor]"), "run_ms", (4, 10), "at least 1 ms");
}

#[test]
fn names_must_be_printable_identifiers_and_a_partition_must_exist() {
    let text = edit(BASE, "name = \"db\"", "name = \"d b\"");
    let e = bad(&text, None);
    assert_error(&e, ErrorKind::InvalidValue, Some("partition \"d b\""), "name", position(&text, "\"d b\"", 0), "A-Z");
    let e = bad("[hypervisor]\nrun_ms = 100\n", None);
    assert_eq!((e.kind, e.field.as_deref(), e.line), (ErrorKind::InvalidValue, Some("partition"), 1));
}

#[test]
fn a_guest_module_missing_from_the_boot_modules_is_rejected_at_boot_only() {
    let text = edit(BASE, "guest = { module = \"bzImage\" }", "guest = { module = \"vmlinuz-typo\" }");
    let e = bad(&text, Some(&platform(4, 512)));
    assert_error(
        &e,
        ErrorKind::InvalidValue,
        Some("partition \"db\""),
        "guest.module",
        position(&text, "\"vmlinuz-typo\"", 0),
        "no boot module named \"vmlinuz-typo\"",
    );
    assert!(e.to_string().contains("modules present: bzImage, initrd.cpio, testguest"), "{e}");
    // The host check without a machine description cannot know the modules.
    ok(&text, None);
}

/// The check runs the planner the image runs: three gang partitions, each on two of three
/// pCPUs at 50%, pass per-pCPU admission (100% on each pCPU) but have no common slot.
#[test]
fn a_gang_set_the_planner_cannot_place_is_rejected_at_the_check_naming_the_partition() {
    let mut text = String::from("[hypervisor]\nmajor_frame_us = 10000\npolicy = \"gang\"\n");
    for (name, pcpus) in [("a", "[0, 1]"), ("b", "[1, 2]"), ("c", "[0, 2]")] {
        text += &format!(
            "\n[[partition]]\nname = \"{name}\"\nvcpus = 2\npcpus = {pcpus}\nmemory_mb = 16\n\
             reservation = {{ budget_us = 5000, period_us = 10000 }}\nguest = {{ module = \"testguest\" }}\n"
        );
    }
    let e = bad(&text, Some(&platform(3, 512)));
    assert_eq!(e.kind, ErrorKind::Admission, "{e}");
    assert_eq!(e.subject.as_deref(), Some("partition \"c\""), "{e}");
    assert_eq!(e.field.as_deref(), Some("reservation"), "{e}");
    assert_eq!((e.line, e.column), position(&text, "{ budget_us", 2), "{e}");
    assert!(e.message.contains("planner cannot place") && e.message.contains("pCPUs [0, 2]"), "{e}");
    // The same on the host, without a machine: the pCPUs the config names are planned.
    assert_eq!(bad(&text, None).subject, e.subject);
    // Two of them fit.
    let two = text[..text.rfind("[[partition]]").unwrap()].to_string();
    let plan = ok(&two, Some(&platform(3, 512))).dispatch;
    assert_eq!(plan.homes, [vec![0, 1], vec![1, 2]]);
}

/// vCPUs do not migrate: a round-robin gang whose vCPUs are not a multiple of its pCPUs
/// would need one vCPU on two pCPUs.
#[test]
fn a_vcpu_that_would_need_two_home_pcpus_is_rejected_at_the_check() {
    let text = edit(BASE, "name = \"web\"\nvcpus = 2", "name = \"web\"\nvcpus = 3\npolicy = \"round-robin-gang\"");
    let e = bad(&text, Some(&platform(4, 512)));
    assert_eq!(e.subject.as_deref(), Some("partition \"web\""), "{e}");
    assert_eq!(e.field.as_deref(), Some("vcpus"), "{e}");
    assert_eq!((e.line, e.column), position(&text, "3", 0), "{e}");
    assert!(e.message.contains("vCPU 0 would run on pCPUs 0 and 1"), "{e}");
    let four = edit(BASE, "name = \"web\"\nvcpus = 2", "name = \"web\"\nvcpus = 4\npolicy = \"round-robin-gang\"");
    assert_eq!(ok(&four, Some(&platform(4, 512))).dispatch.homes[0], [0, 1, 0, 1]);
}

/// What the image runs is the checked plan in TSC cycles, exactly.
#[test]
fn the_plan_scales_exactly_to_tsc_cycles() {
    let plan = ok(DEFAULT, Some(&platform(2, 512))).dispatch;
    let cycles = plan.tables.scaled(2_500);
    assert_eq!(cycles.frame, plan.tables.frame * 2_500);
    for (us, tsc) in plan.tables.pcpus.iter().zip(&cycles.pcpus) {
        for (a, b) in us.entries.iter().zip(&tsc.entries) {
            assert_eq!((b.offset, b.end, b.run), (a.offset * 2_500, a.end * 2_500, a.run));
        }
    }
}

/// The image multiplies durations into TSC cycles: values that would wrap are rejected.
#[test]
fn durations_that_would_wrap_in_tsc_cycles_are_rejected() {
    for key in ["run_ms", "stats_interval_ms"] {
        let text = edit(BASE, "policy = \"gang\"\n", &format!("policy = \"gang\"\n{key} = 9223372036854775807\n"));
        let e = bad(&text, None);
        assert_eq!(e.field.as_deref(), Some(key), "{e}");
        assert!(e.message.contains("at most"), "{e}");
    }
}

/// An error is one line, whatever the input echoes into it, and never the whole of a huge value.
#[test]
fn errors_stay_on_one_line_and_short() {
    let text = edit(BASE, "name = \"db\"", "name = \"d\\nb\"");
    let e = bad(&text, None);
    assert!(!e.to_string().contains('\n'), "{e}");
    assert!(e.to_string().contains("d\\nb"), "the newline is shown escaped: {e}");
    let huge = "x".repeat(5 << 20);
    let text = edit(BASE, "policy = \"gang\"", &format!("policy = \"{huge}\""));
    let e = bad(&text, None).to_string();
    assert!(e.len() < 1_000 && !e.contains('\n'), "{} bytes", e.len());
}

/// pCPU numbers index xAPIC IDs: a huge one is rejected before anything is sized by it.
#[test]
fn a_pcpu_index_beyond_the_xapic_range_is_rejected() {
    for huge in ["255", "4294967295", "100000000"] {
        let text = edit(
            BASE,
            "name = \"web\"\nvcpus = 2\npcpus = [0, 1]",
            &format!("name = \"web\"\nvcpus = 2\npcpus = [0, {huge}]"),
        );
        let e = bad(&text, None);
        assert_eq!(e.field.as_deref(), Some("pcpus"), "{e}");
        assert!(e.message.contains("above 254"), "{e}");
    }
}

/// A missing key points at the partition's table, as serde's missing fields do.
#[test]
fn missing_memory_points_at_the_partition_table() {
    let text = edit(
        BASE,
        "memory_mb = 64\nreservation = { budget_us = 4000, period_us = 10000 }\nguest = { module = \"bzImage\" }",
        "reservation = { budget_us = 4000, period_us = 10000 }\nguest = { module = \"bzImage\" }",
    );
    let e = bad(&text, None);
    assert_eq!(e.field.as_deref(), Some("memory_mb"), "{e}");
    let missing_guest = bad(&edit(&text, "guest = { module = \"bzImage\" }\n", ""), None);
    assert_eq!(
        (e.line, e.column),
        (missing_guest.line, missing_guest.column),
        "same place as serde's: {e} / {missing_guest}"
    );
}

/// Type errors say what TOML calls the types, a date included.
#[test]
fn type_errors_name_the_types_in_tomls_words() {
    let cases = [
        (
            "major_frame_us = 10000",
            "major_frame_us = 1979-05-27",
            "expected an integer, found a date or time (1979-05-27)",
        ),
        ("major_frame_us = 10000", "major_frame_us = \"10\"", "expected an integer, found a string (\"10\")"),
        ("major_frame_us = 10000", "major_frame_us = 1.5", "expected an integer, found a float (1.5)"),
        ("major_frame_us = 10000", "major_frame_us = { a = 1 }", "expected an integer, found an inline table"),
    ];
    for (from, to, words) in cases {
        let e = bad(&edit(BASE, from, to), None);
        assert_eq!(e.field.as_deref(), Some("major_frame_us"), "{e}");
        assert!(e.message.contains(words), "{e}");
    }
    let e = bad(&BASE.replacen("[hypervisor]", "[[hypervisor]]", 1), None);
    assert!(e.message.contains("expected a table, found an array of tables"), "{e}");
}

/// A command line the loaders would refuse at start is refused at the check.
#[test]
fn command_lines_the_loaders_cannot_take_are_rejected() {
    let long = "x".repeat(4096);
    let e = bad(&edit(BASE, "cmdline = \"console=ttyS0\"", &format!("cmdline = \"{long}\"")), None);
    assert_eq!(e.field.as_deref(), Some("guest.cmdline"), "{e}");
    assert!(e.message.contains("4096 bytes"), "{e}");
    let e = bad(&edit(BASE, "cmdline = \"console=ttyS0\"", "cmdline = \"a\\u0000b\""), None);
    assert!(e.message.contains("control character"), "{e}");
    assert!(!e.to_string().contains('\0'), "{e}");
    ok(&edit(BASE, "cmdline = \"console=ttyS0\"", &format!("cmdline = \"{}\"", "x".repeat(4095))), None);
}

fn live(text: &str) -> LiveConfig {
    let machine = Machine { pcpus: Some(2), ..Machine::default() };
    LiveConfig::load("partitions.toml", text, &machine).unwrap_or_else(|e| panic!("{e}"))
}

const WEB_4000: &str = "reservation = { budget_us = 4000, period_us = 10000 }\nguest = { module = \"bzImage\", cmdline";

#[test]
fn a_live_reservation_change_is_planned_as_the_file_would_be() {
    let before = live(BASE);
    let hard = |budget_us| Reservation::Hard { budget_us, period_us: 10000 };
    let after = before.with_reservation("web", hard(2000)).unwrap_or_else(|e| panic!("{e}"));
    // Exactly what the check makes of a file that says so.
    let edited = edit(BASE, WEB_4000, &WEB_4000.replace("4000", "2000"));
    let machine = Machine { pcpus: Some(2), ..Machine::default() };
    let expected = load_for("partitions.toml", &edited, &machine).unwrap();
    assert_eq!(after.validated, expected);
    assert_ne!(after.validated.dispatch.tables, before.validated.dispatch.tables, "new tables");
    assert_eq!(after.validated.dispatch.homes, before.validated.dispatch.homes, "no vCPU moves");
    assert_eq!(after.validated.config.partitions[0].reservation, hard(2000));
    // Changes build on each other; the original is untouched.
    let again = after.with_reservation("db", hard(8000)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(again.validated.config.partitions[0].reservation, hard(2000));
    assert_eq!(before.validated.config.partitions[0].reservation, hard(4000));
}

#[test]
fn a_refused_live_change_prints_the_checks_own_error_at_the_reservations_line() {
    let before = live(BASE);
    let over = Reservation::Hard { budget_us: 7000, period_us: 10000 };
    let Err(ChangeError::Refused(e)) = before.with_reservation("web", over) else { panic!("over-admission accepted") };
    let edited = edit(BASE, WEB_4000, &WEB_4000.replace("4000", "7000"));
    let machine = Machine { pcpus: Some(2), ..Machine::default() };
    let from_file = load_for("partitions.toml", &edited, &machine).unwrap_err();
    assert_eq!(e.to_string(), from_file.to_string(), "the same one-line error");
    assert_error(
        &e,
        ErrorKind::Admission,
        Some("partition \"db\""),
        "reservation",
        position(BASE, "{ budget_us = 4000", 1),
        "pCPU 0 is over-admitted",
    );
    // A period that does not divide the frame: the field and the changed node's line.
    let odd = Reservation::Hard { budget_us: 1000, period_us: 3000 };
    let Err(ChangeError::Refused(e)) = before.with_reservation("web", odd) else { panic!("accepted") };
    assert_eq!((e.subject.as_deref(), e.field.as_deref()), (Some("partition \"web\""), Some("reservation.period_us")));
    assert_eq!(e.line, position(BASE, "{ budget_us = 4000", 0).0);
    let Err(ChangeError::UnknownNode(name)) = before.with_reservation("nobody", odd) else { panic!("accepted") };
    assert_eq!(name, "nobody");
}

/// The live check (parent, changed subtree, plan) gives what the whole check of the changed
/// file gives, acceptance and error alike, for every node of the test configs and a spread of
/// reservations, valid and not.
#[test]
fn a_live_change_is_checked_as_the_whole_file_would_be() {
    let hard = |budget_us, period_us| Reservation::Hard { budget_us, period_us };
    let changes = [
        hard(1000, 10000),
        hard(2500, 5000),
        hard(4000, 10000),
        hard(9000, 10000),
        hard(0, 10000),
        hard(1000, 3000),
        hard(20000, 10000),
        Reservation::FixedShare { percent: 10 },
        Reservation::FixedShare { percent: 45 },
        Reservation::FixedShare { percent: 100 },
        Reservation::FixedShare { percent: 0 },
        Reservation::Weight(1),
        Reservation::Weight(7),
        Reservation::Weight(0),
    ];
    let configs = [
        BASE.to_string(),
        managed(),
        include_str!("../../tests/configs/reconfig.toml").to_string(),
        include_str!("../../tests/configs/delegation.toml").to_string(),
        include_str!("../../tests/configs/delegation-depth8.toml").to_string(),
    ];
    let (mut accepted, mut refused) = (0, 0);
    for text in &configs {
        let first = live(text);
        // Also from a config already changed: the file then says what no longer runs.
        let name = first.validated.config.partitions[0].name.clone();
        let changed = changes.iter().find_map(|&c| first.with_reservation(&name, c).ok()).expect("one change taken");
        for before in [first, changed] {
            let config = &before.validated.config;
            let nodes =
                config.partitions.iter().map(|p| p.name.clone()).chain(config.groups.iter().map(|g| g.name.clone()));
            for node in nodes {
                for &change in &changes {
                    let whole = before.whole_check_with(&node, change);
                    match (before.with_reservation(&node, change), whole) {
                        (Ok(live), Ok(whole)) => {
                            assert_eq!(live.validated, whole, "{node} -> {change:?}");
                            accepted += 1;
                        }
                        (Err(ChangeError::NeedsRestart { .. }), Ok(_)) => accepted += 1,
                        (Err(ChangeError::Refused(live)), Err(whole)) => {
                            assert_eq!(live.to_string(), whole.to_string(), "{node} -> {change:?}");
                            refused += 1;
                        }
                        (live, whole) => panic!("{node} -> {change:?}: live {:?}, whole {whole:?}", live.err()),
                    }
                }
            }
        }
    }
    assert!(accepted > 30 && refused > 30, "{accepted} accepted, {refused} refused");
}

#[test]
fn a_group_can_be_changed_live_and_its_children_still_fit() {
    let text = format!(
        "{}\n[[group]]\nname = \"g\"\nreservation = {{ share_percent = 50 }}\n",
        edit(BASE, "name = \"db\"\n", "name = \"db\"\ngroup = \"g\"\n")
    );
    let before = live(&text);
    let after = before.with_reservation("g", Reservation::FixedShare { percent: 60 }).unwrap();
    assert_eq!(after.validated.config.groups[0].reservation, Reservation::FixedShare { percent: 60 });
    // Shrunk below its child's 40%, the group is refused with the child's error.
    let Err(ChangeError::Refused(e)) = before.with_reservation("g", Reservation::FixedShare { percent: 30 }) else {
        panic!("accepted")
    };
    assert_eq!(e.kind, ErrorKind::Admission, "{e}");
}

#[test]
fn com2_is_the_control_channel_unless_a_partition_owns_it() {
    assert_eq!(ok(BASE, None).config.hypervisor.control, ControlChannel::Com2);
    let web = "name = \"web\"";
    let owning = edit(BASE, web, &format!("{web}\ndevices = {{ serial = \"com2\" }}"));
    assert_eq!(ok(&owning, None).config.hypervisor.control, ControlChannel::None, "left out: none");
    let asked = edit(&owning, "policy = \"gang\"", "policy = \"gang\"\ncontrol = \"com2\"");
    let e = bad(&asked, None);
    assert_error(
        &e,
        ErrorKind::DeviceConflict,
        Some("partition \"web\""),
        "devices",
        position(&asked, "{ serial", 0),
        "control channel",
    );
    let by_irq = edit(BASE, web, &format!("{web}\ndevices = {{ irqs = [3] }}"));
    let asked = edit(&by_irq, "policy = \"gang\"", "policy = \"gang\"\ncontrol = \"com2\"");
    assert_eq!(bad(&asked, None).kind, ErrorKind::DeviceConflict);
    let none = edit(&owning, "policy = \"gang\"", "policy = \"gang\"\ncontrol = \"none\"");
    assert_eq!(ok(&none, None).config.hypervisor.control, ControlChannel::None);
}

/// BASE with web and db in group "g" (60% of each pCPU), managed by "boss" outside it.
fn managed() -> String {
    let grouped = edit(BASE, "name = \"db\"\n", "name = \"db\"\ngroup = \"g\"\n");
    let grouped = edit(&grouped, "name = \"web\"\n", "name = \"web\"\ngroup = \"g\"\n");
    format!(
        "{}\n[[partition]]\nname = \"boss\"\nvcpus = 1\npcpus = [0]\nmemory_mb = 16\nreservation = {{ budget_us = 1000, period_us = 10000 }}\nguest = {{ module = \"bzImage\" }}\n\n[[group]]\nname = \"g\"\nmanager = \"boss\"\nreservation = {{ share_percent = 90 }}\n",
        grouped.replace("budget_us = 4000", "budget_us = 3000")
    )
}

#[test]
fn a_manager_re_divides_its_group_and_nothing_else() {
    let before = live(&managed());
    let (group, children) = before.managed_by("boss").expect("boss manages g");
    assert_eq!(before.validated.config.groups[group].name, "g");
    assert_eq!(children, ["web", "db"]);
    assert_eq!(before.group_capacity_us(group), 9000, "90% of a 10 ms frame on each pCPU");
    assert!(before.managed_by("web").is_none());
    let hard = |budget_us| Reservation::Hard { budget_us, period_us: 10000 };
    // Within what the group holds: web 5 ms, db 3 ms of its 9.
    let after = before.with_child_reservation("boss", 0, hard(5000)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(after.validated.config.partitions[0].reservation, hard(5000));
    // Beyond it: the check's own error, at the group's child.
    let Err(ChangeError::Refused(e)) = after.with_child_reservation("boss", 1, hard(5000)) else { panic!("accepted") };
    assert_eq!(e.kind, ErrorKind::Admission, "{e}");
    assert!(e.message.contains("exceeds group \"g\""), "{e}");
    // Only the group's own children, only by its manager.
    assert!(matches!(
        before.with_child_reservation("boss", 2, hard(1000)),
        Err(ChangeError::NoSuchChild { index: 2, children: 2, .. })
    ));
    assert!(matches!(before.with_child_reservation("web", 0, hard(1000)), Err(ChangeError::NotAManager(_))));
}

#[test]
fn a_groups_manager_must_be_a_partition() {
    let text = managed().replace("manager = \"boss\"", "manager = \"nobody\"");
    let e = bad(&text, None);
    assert_error(
        &e,
        ErrorKind::UnknownName,
        Some("group \"g\""),
        "manager",
        position(&text, "\"nobody\"", 0),
        "no [[partition]]",
    );
    let text = managed().replace("manager = \"boss\"", "manager = \"g\"");
    assert!(bad(&text, None).message.contains("is a group"));
}

const RING: &str =
    "\n[[shared]]\nname = \"ring\"\nsize_mb = 2\nowner = \"web\"\ngpa = 0x20000000\nreaders = [\"db\"]\n";

#[test]
fn a_shared_region_is_placed_and_mapped_by_its_owner_and_readers() {
    let text = format!("{BASE}{RING}");
    let v = ok(&text, Some(&platform(2, 512)));
    let region = &v.config.shared[0];
    assert_eq!((region.name.as_str(), region.size, region.gpa), ("ring", 2 * MIB, 0x2000_0000));
    assert_eq!((region.owner, region.readers.as_slice(), region.writers.as_slice()), (0, &[1][..], &[][..]));
    assert_eq!(region.aliases().collect::<Vec<_>>(), [(1, false)]);
    let Placement::At(host) = &v.shared_memory[0] else { panic!("placed") };
    assert_eq!((host.end - host.start, host.start % MEMORY_ALIGN), (2 * MIB, 0));
    for p in &v.memory {
        let p = p.range().unwrap();
        assert!(host.end <= p.start || p.end <= host.start, "clear of every partition's memory");
    }
}

#[test]
fn shared_regions_that_cannot_be_mapped_are_refused_at_their_key() {
    let cases = [
        (RING.replace("owner = \"web\"", "owner = \"nobody\""), "owner", ErrorKind::UnknownName, "no [[partition]]"),
        (RING.replace("[\"db\"]", "[\"web\"]"), "readers", ErrorKind::InvalidValue, "named twice"),
        (RING.replace("0x20000000", "0x2100000"), "gpa", ErrorKind::InvalidValue, "2 MiB boundary"),
        (RING.replace("0x20000000", "0x2000000"), "gpa", ErrorKind::Memory, "inside partition"),
        (RING.replace("size_mb = 2", "size_mb = 0"), "size_mb", ErrorKind::InvalidValue, "1 to 1024 MiB"),
        (format!("{RING}{RING}"), "name", ErrorKind::DuplicateName, "another [[shared]]"),
    ];
    for (region, field, kind, words) in cases {
        let e = bad(&format!("{BASE}{region}"), None);
        assert_eq!(
            (e.kind, e.field.as_deref(), e.subject.as_deref()),
            (kind, Some(field), Some("shared \"ring\"")),
            "{e}"
        );
        assert!(e.message.contains(words), "{e}");
    }
}

/// A shared region is revoked by its owner, or by the manager of the owner's group naming the
/// owner as its child; nobody else, and nothing at another address.
#[test]
fn a_shared_region_is_revocable_by_its_owner_and_its_owners_manager() {
    let live = live(&format!("{}{RING}", managed()));
    let ring = 0x2000_0000;
    assert_eq!(live.revocable_region("web", ring, None), Ok(0));
    assert_eq!(live.revocable_region("boss", ring, Some(0)), Ok(0), "web is the first child of boss's group");
    let not_owner = |partition: &str, gpa| Err(ChangeError::NotOwner { partition: partition.into(), gpa });
    assert_eq!(live.revocable_region("db", ring, None), not_owner("db", ring), "a reader is no owner");
    assert_eq!(live.revocable_region("web", ring + 0x20_0000, None), not_owner("web", ring + 0x20_0000));
    assert_eq!(live.revocable_region("boss", ring, Some(1)), not_owner("db", ring));
    assert_eq!(live.revocable_region("boss", ring, None), not_owner("boss", ring));
    assert!(matches!(live.revocable_region("boss", ring, Some(2)), Err(ChangeError::NoSuchChild { index: 2, .. })));
    assert_eq!(live.revocable_region("web", ring, Some(0)), Err(ChangeError::NotAManager("web".into())));
    assert!(not_owner("db", ring).unwrap_err().to_string().contains("\"db\" owns no shared region at 0x20000000"));
}

/// `devices.pci` names PCI functions as lspci does; each has one owner.
#[test]
fn pci_functions_are_named_as_lspci_does_and_owned_once() {
    assert_eq!(PciFunction::parse("00:02.0"), Ok(PciFunction { device: 2, function: 0 }));
    assert_eq!(PciFunction::parse("00:1f.7").unwrap().to_string(), "00:1f.7");
    for (text, words) in [
        ("02.0", "lspci"),
        ("00:2.0", "lspci"),
        ("00:20.0", "lspci"),
        ("00:02.8", "lspci"),
        ("0g:02.0", "lspci"),
        ("01:02.0", "bus 0"),
        ("00:00.0", "host bridge"),
    ] {
        let e = PciFunction::parse(text).unwrap_err();
        assert!(e.contains(words), "{text}: {e}");
    }
    let db = "guest = { module = \"bzImage\" }";
    let nic = "devices = { pci = [\"00:02.0\"], irqs = [9] }";
    let v = ok(&edit(BASE, db, &format!("{db}\n{nic}")), None);
    assert_eq!(v.config.partitions[1].devices.pci, [PciFunction { device: 2, function: 0 }]);
    let text = edit(BASE, db, &format!("{db}\ndevices = {{ pci = [\"00:02\"] }}"));
    assert_error(
        &bad(&text, None),
        ErrorKind::InvalidValue,
        Some("partition \"db\""),
        "devices.pci",
        position(&text, "\"00:02\"", 0),
        "lspci",
    );
    let text = edit(BASE, db, &format!("{db}\ndevices = {{ pci = [\"00:02.0\", \"00:02.0\"] }}"));
    assert!(bad(&text, None).message.contains("named twice"));
    let web = "guest = { module = \"bzImage\", cmdline = \"console=ttyS0\" }";
    let text = edit(
        &edit(BASE, db, &format!("{db}\ndevices = {{ pci = [\"00:02.0\"] }}")),
        web,
        &format!("{web}\ndevices = {{ pci = [\"00:02.0\"] }}"),
    );
    let e = bad(&text, None);
    assert_eq!((e.kind, e.field.as_deref()), (ErrorKind::DeviceConflict, Some("devices.pci")), "{e}");
    assert!(e.message.contains("already owned by partition \"web\""), "{e}");
}
