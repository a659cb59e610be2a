//! Fuzzing the config loader (`fuzz::run`; a short run in every test run, longer with
//! `scripts/fuzz`): the shipped and test configs, mutated by bytes, lines, values and keys,
//! checked as the boot checks them (a 4-pCPU, 512 MiB machine with its modules). The loader
//! never panics; a rejection is one line `fuzz.toml:LINE:COLUMN: ...` inside the text, at most
//! a few hundred bytes; an accepted config can start: its test-guest payloads load (the
//! loader's checks run in the check), every vCPU has a home among its pCPUs,
//! memory is placed inside the machine's without overlaps, and the tables and durations scale
//! to the TSC cycles of any TSC below 100 GHz.

use crate::{load, Placement, Platform, MIB};
use fuzz::{assert_clean, run, Rng};

const SEEDS: &[&str] = &[
    include_str!("../../guests/configs/default.toml"),
    include_str!("../../guests/configs/four-pcpus.toml"),
    include_str!("../../guests/configs/linux-barrier.toml"),
    include_str!("../../guests/configs/invalid-overcommit.toml"),
    include_str!("../../tests/configs/independent-yield.toml"),
    include_str!("../../tests/configs/halt-gives-slack.toml"),
    include_str!("../../tests/configs/ipi-gang-traced.toml"),
    include_str!("../../tests/configs/oob-reset.toml"),
];

/// Values that sit on edges: zero, one, limits, powers of two, near-overflow, negative,
/// floats, dates, wrong types.
const VALUES: &[&str] = &[
    "0",
    "1",
    "2",
    "3",
    "7",
    "50",
    "99",
    "100",
    "101",
    "254",
    "255",
    "256",
    "1000",
    "1500",
    "2000",
    "3000",
    "4096",
    "5000",
    "6000",
    "9999",
    "10000",
    "10001",
    "20000",
    "65535",
    "1000000",
    "10000000",
    "4294967296",
    "2592000000",
    "2592000001",
    "9223372036854775807",
    "18446744073709551615",
    "18446744073709551616",
    "-1",
    "1.5",
    "1e9",
    "0x10000000",
    "0o7",
    "0b101",
    "1979-05-27",
    "true",
    "\"\"",
    "\"x\"",
    "[]",
    "[0]",
    "[0, 0]",
    "[0, 1, 2, 3]",
    "[3, 2]",
    "[0, 200]",
    "{}",
    "{ weight = 1 }",
    "{ share_percent = 100 }",
    "{ budget_us = 0, period_us = 0 }",
    "{ budget_us = 10000, period_us = 10000 }",
    "\"gang\"",
    "\"independent\"",
    "\"round-robin-gang\"",
    "\"relaxed-co\"",
    "\"com2\"",
    "\"com1\"",
    "\"0x2f8-0x2ff\"",
    "\"web\"",
    "\"barrier\"",
    "\"rt\"",
    "\"testguest\"",
    "\"bzImage\"",
    "\"\\u0000\"",
    "\"a\\nb\"",
    "\"é\"",
];

const KEYS: &[&str] = &[
    "name",
    "group",
    "parent",
    "vcpus",
    "pcpus",
    "memory_mb",
    "memory",
    "reservation",
    "policy",
    "guest",
    "devices",
    "on_fault",
    "on_reboot",
    "on_poweroff",
    "major_frame_us",
    "run_ms",
    "stats_interval_ms",
    "spin_sample_us",
    "trace_events",
    "skew_bound_us",
    "budget_us",
    "period_us",
    "share_percent",
    "weight",
    "module",
    "cmdline",
    "ioports",
    "irqs",
    "serial",
    "base",
    "size_mb",
    "[[partition]]",
    "[[group]]",
    "[hypervisor]",
];

/// Byte offsets of the tokens of `text` that look like values (numbers, strings, arrays up
/// to the line's end) or keys (a word before `=`).
fn tokens(text: &str, keys: bool) -> Vec<(usize, usize)> {
    let mut found = Vec::new();
    let mut line_start = 0;
    for line in text.split_inclusive('\n') {
        if let Some(eq) = line.find('=') {
            let (key, value) = (&line[..eq], &line[eq + 1..]);
            if keys {
                let start = key.len() - key.trim_start().len();
                found.push((line_start + start, line_start + key.trim_end().len()));
            } else {
                let body = value.split('#').next().unwrap_or("").trim_end();
                let lead = body.len() - body.trim_start().len();
                if !body.trim().is_empty() {
                    found.push((line_start + eq + 1 + lead, line_start + eq + 1 + body.len()));
                }
                // Numbers inside inline tables and arrays too.
                let bytes = value.as_bytes();
                let mut i = 0;
                while i < bytes.len() {
                    if bytes[i].is_ascii_digit() {
                        let start = i;
                        while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                            i += 1;
                        }
                        found.push((line_start + eq + 1 + start, line_start + eq + 1 + i));
                    }
                    i += 1;
                }
            }
        }
        line_start += line.len();
    }
    found
}

fn mutate(rng: &mut Rng, text: &mut Vec<u8>) {
    match rng.below(8) {
        // A value or key replaced.
        0..=3 => {
            let keys = rng.chance(25);
            let s = String::from_utf8_lossy(text).into_owned();
            let spots = tokens(&s, keys);
            if spots.is_empty() {
                return;
            }
            let (start, end) = *rng.pick(&spots);
            let with = if keys { rng.pick(KEYS) } else { rng.pick(VALUES) };
            let mut out = s.as_bytes()[..start].to_vec();
            out.extend_from_slice(with.as_bytes());
            out.extend_from_slice(&s.as_bytes()[end..]);
            *text = out;
        }
        // Lines: duplicated (a second partition, a repeated key), dropped or swapped.
        4 => {
            let s = String::from_utf8_lossy(text).into_owned();
            let mut lines: Vec<&str> = s.split_inclusive('\n').collect();
            if lines.is_empty() {
                return;
            }
            let (a, b) = (rng.index(lines.len()), rng.index(lines.len()));
            match rng.below(3) {
                0 => lines.insert(b, lines[a]),
                1 => {
                    lines.remove(a);
                }
                _ => lines.swap(a, b),
            }
            *text = lines.concat().into_bytes();
        }
        // A whole partition or group repeated (more partitions, name clashes, over-admission).
        5 => {
            let s = String::from_utf8_lossy(text).into_owned();
            if let Some(at) = s.rfind("[[partition]]") {
                let block = s[at..].to_string();
                *text = (s + "\n" + &block).into_bytes();
            }
        }
        // Bytes: replaced, inserted or removed (syntax, UTF-8, control characters).
        _ => {
            const BYTES: &[u8] = b"0123456789\"'=[]{},.#\n\r\t \\-_xa\x00\x7f\xc3\xa9\xff";
            for _ in 0..1 + rng.below(3) {
                let at = rng.index(text.len() + 1);
                match rng.below(3) {
                    0 if at < text.len() => text[at] = *rng.pick(BYTES),
                    1 => text.insert(at, *rng.pick(BYTES)),
                    _ if at < text.len() => {
                        text.remove(at);
                    }
                    _ => {}
                }
            }
        }
    }
}

/// What the image does with an accepted config, checked without a machine.
fn starts(v: &crate::Validated, platform: &Platform) -> Result<(), String> {
    for (p, homes) in v.config.partitions.iter().zip(&v.dispatch.homes) {
        if homes.len() != p.vcpus as usize || homes.iter().any(|h| !p.pcpus.contains(&(*h as u32))) {
            return Err(format!("{}: vCPU homes {homes:?} outside pcpus {:?}", p.name, p.pcpus));
        }
    }
    let mut placed: Vec<core::ops::Range<u64>> = Vec::new();
    for (p, m) in v.config.partitions.iter().zip(&v.memory) {
        let Placement::At(range) = m else { return Err(format!("{}: memory not placed", p.name)) };
        if !platform.usable_memory.iter().any(|u| u.start <= range.start && range.end <= u.end) {
            return Err(format!("{}: memory {range:x?} outside the machine's", p.name));
        }
        if placed.iter().any(|o| o.start < range.end && range.start < o.end) {
            return Err(format!("{}: memory {range:x?} overlaps another partition's", p.name));
        }
        placed.push(range.clone());
    }
    // Any TSC below 100 GHz: 100,000 cycles per microsecond.
    let _ = v.dispatch.tables.scaled(100_000);
    let hv = &v.config.hypervisor;
    for ms in [hv.run_ms.unwrap_or(0), hv.stats_interval_ms] {
        ms.checked_mul(1000 * 100_000).ok_or_else(|| format!("{ms} ms wraps in TSC cycles"))?;
    }
    Ok(())
}

#[test]
fn fuzz_the_config_check() {
    let platform = Platform {
        pcpus: 4,
        usable_memory: core::iter::once(16 * MIB..512 * MIB).collect(),
        modules: vec!["testguest".into(), "bzImage".into()],
        // A flat image of the test guest's size: its payload checks run on every input.
        module_images: vec![("testguest".into(), &[0x90u8; 9000][..])],
    };
    let (mut accepted, mut rejected) = (0u64, 0u64);
    let report = run("config", 2.0, 2_000, |rng| {
        let mut text = rng.pick(SEEDS).as_bytes().to_vec();
        for _ in 0..1 + rng.below(4) {
            mutate(rng, &mut text);
        }
        let result = match crate::text_of("fuzz.toml", &text) {
            Ok(s) => load("fuzz.toml", s, Some(&platform)),
            Err(e) => Err(e),
        };
        match result {
            Ok(v) => {
                accepted += 1;
                starts(&v, &platform)
            }
            Err(e) => {
                rejected += 1;
                let line = e.to_string();
                let lines = text.split(|&b| b == b'\n').count() as u32;
                if line.contains(['\n', '\r']) || line.len() > 700 {
                    Err(format!("not one short line ({} bytes): {line:?}", line.len()))
                } else if !line.starts_with("fuzz.toml:") || e.line == 0 || e.line > lines + 1 || e.column == 0 {
                    Err(format!("position {}:{} outside the {lines}-line text: {line}", e.line, e.column))
                } else {
                    Ok(())
                }
            }
        }
    });
    assert_clean(&report);
    println!("fuzz config: {accepted} accepted, {rejected} rejected");
    assert!(accepted * 20 > report.inputs && rejected * 20 > report.inputs, "{accepted} / {rejected}");
}
