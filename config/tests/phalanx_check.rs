//! The `phalanx-check` command: exit codes and output on the shipped example configs.

use std::process::Command;

fn check(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_phalanx-check"))
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .expect("phalanx-check runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().expect("exited"), text)
}

#[test]
fn a_valid_config_prints_ok_and_a_summary() {
    let (code, out) = check(&["guests/configs/default.toml"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("guests/configs/default.toml: ok (2 partitions, 0 groups, pCPUs [0, 1]"), "{out}");
    assert!(
        out.contains(
            "barrier      2 vCPUs on pCPUs [0, 1] (gang), hard 5000/10000 us = 50.0% per pCPU, 16 MiB (placed at boot)"
        ),
        "{out}"
    );
    assert!(out.contains("planned load per pCPU: 0: 100.0%, 1: 100.0%"), "{out}");
}

#[test]
fn machine_options_place_memory_and_check_pcpus() {
    let (code, out) = check(&["guests/configs/four-pcpus.toml", "--pcpus", "4", "--memory-mb", "1024"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("checked against 4 pCPUs"), "{out}");
    assert!(out.contains("32 MiB at 0x10000000-0x12000000"), "{out}");
    assert!(out.contains("128 MiB at 0x1000000-0x9000000"), "first fit starts at 16 MiB: {out}");

    let (code, out) = check(&["guests/configs/four-pcpus.toml", "--pcpus", "2"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("group \"rt\": field `pcpus`: pCPU 2 does not exist (the machine has 2 pCPUs)"), "{out}");

    let (code, out) = check(&["guests/configs/default.toml", "--memory-mb", "40"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("partition \"hog\": field `memory_mb`: 16 MiB does not fit"), "{out}");
}

#[test]
fn an_invalid_config_prints_one_located_error_and_exits_1() {
    let (code, out) = check(&["guests/configs/invalid-overcommit.toml"]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.starts_with("guests/configs/invalid-overcommit.toml:21:15: partition \"second\": field `reservation`: pCPU 0 is over-admitted"), "{out}");
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(check(&[]).0, 2);
    assert_eq!(check(&["a.toml", "--pcpus"]).0, 2);
    assert_eq!(check(&["a.toml", "--bogus"]).0, 2);
    let (code, out) = check(&["does-not-exist.toml"]);
    assert_eq!(code, 1);
    assert!(out.contains("does-not-exist.toml: cannot read"), "{out}");
}

#[test]
fn invalid_utf8_is_located_huge_flags_are_refused_and_a_closed_pipe_is_no_panic() {
    let dir = std::env::temp_dir().join(format!("phalanx-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, b"[hypervisor]\nmajor_frame_us = 10000\n# caf\xe9\n").unwrap();
    let (code, out) = check(&[bad.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("bad.toml:3:6: invalid UTF-8 (byte 0xe9)"), "{out}");

    let (code, out) = check(&["guests/configs/default.toml", "--memory-mb", "17592186044416"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("--memory-mb: too large"), "{out}");

    // A reader that closes the pipe after 10 bytes: no panic, the check's own exit status.
    let mut child = Command::new(env!("CARGO_BIN_EXE_phalanx-check"))
        .arg("guests/configs/four-pcpus.toml")
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
}
