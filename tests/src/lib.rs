//! End-to-end test harness: boots the Phalanx image in an emulator through
//! `scripts/phalanx boot` (the same path `scripts/phalanx run` takes) and parses the serial
//! log's JSON records.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Builds the hypervisor image once per test process (fails the test loudly on error).
pub fn ensure_image() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let status =
            Command::new(repo_root().join("scripts/phalanx")).arg("build").status().expect("run scripts/phalanx build");
        assert!(status.success(), "building the hypervisor image failed");
    });
}

pub struct Run {
    pub dir: PathBuf,
    pub log: String,
    pub records: Vec<Value>,
    pub timed_out: bool,
    /// QEMU's exit status (isa-debug-exit: 1 = clean success, 3 = clean failure).
    pub exit_status: Option<i32>,
}

pub struct Boot<'a> {
    pub name: &'a str,
    pub emulator: &'a str,
    pub cpus: u32,
    /// Path relative to the repo root.
    pub config: &'a str,
    pub timeout_s: u32,
    /// Extra words for the hypervisor's command line.
    pub cmdline: &'a str,
    /// Emulated RAM in MiB.
    pub megs: u32,
    /// The Bochs CPU model (`scripts/phalanx cpu-models`).
    pub cpu_model: &'a str,
    /// The machine has Bochs' PCI NIC on its vnet (`scripts/phalanx boot --nic`).
    pub nic: bool,
}

impl<'a> Boot<'a> {
    pub fn new(name: &'a str, emulator: &'a str, cpus: u32, config: &'a str) -> Self {
        Boot {
            name,
            emulator,
            cpus,
            config,
            timeout_s: 300,
            cmdline: "",
            megs: 256,
            cpu_model: "corei7_skylake_x",
            nic: false,
        }
    }

    /// With Bochs' RTL8029 at 00:02.0 on its virtual network.
    pub fn nic(self) -> Self {
        Boot { nic: true, ..self }
    }

    pub fn cmdline(self, cmdline: &'a str) -> Self {
        Boot { cmdline, ..self }
    }

    pub fn megs(self, megs: u32) -> Self {
        Boot { megs, ..self }
    }

    pub fn cpu_model(self, cpu_model: &'a str) -> Self {
        Boot { cpu_model, ..self }
    }

    /// Emulator wall-clock limit in seconds (300 unless set).
    pub fn timeout_s(self, timeout_s: u32) -> Self {
        Boot { timeout_s, ..self }
    }

    pub fn run(&self) -> Run {
        let status = self.command(None).status().expect("run scripts/phalanx boot");
        self.finish(status)
    }

    /// Boots with the console of `partition` open for input (`scripts/phalanx boot --console`)
    /// and runs `session` while the machine runs: it can wait for output and type lines.
    pub fn run_typing(&self, partition: &str, session: impl FnOnce(&Console)) -> Run {
        let mut command = self.command(Some(partition));
        let console = Console { dir: self.dir(), log: "serial.log", input: "console.in" };
        self.run_session(&mut command, &console, session)
    }

    /// Boots with the machine's second UART, COM2, connected (`scripts/phalanx boot --com2`)
    /// and runs `session` on it while the machine runs: what the machine sends there, and
    /// lines to send it.
    pub fn run_with_com2(&self, session: impl FnOnce(&Console)) -> Run {
        let mut command = self.command(None);
        command.arg("--com2");
        let com2 = Console { dir: self.dir(), log: "com2.log", input: "com2.in" };
        self.run_session(&mut command, &com2, session)
    }

    /// Boots with the hypervisor's control channel on COM2 (`scripts/phalanx boot --ctl`) and
    /// runs `session` while the machine runs: it sends commands through `scripts/phalanx ctl`.
    pub fn run_with_control(&self, session: impl FnOnce(&ControlChannel)) -> Run {
        let mut command = self.command(None);
        command.arg("--ctl");
        let port = Console { dir: self.dir(), log: "ctl.log", input: "ctl.in" };
        let control = ControlChannel { dir: self.dir() };
        self.run_session(&mut command, &port, |_| session(&control))
    }

    fn run_session(&self, command: &mut Command, port: &Console, session: impl FnOnce(&Console)) -> Run {
        // Logs (and the input FIFO) left by an earlier run must not answer the session.
        for file in ["serial.log", port.log, port.input] {
            let _ = std::fs::remove_file(self.dir().join(file));
        }
        let mut child = command.spawn().expect("run scripts/phalanx boot");
        // A session that fails must not leave the emulator running until its timeout: the
        // boot script goes first (it starts nothing more), then what it started.
        if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| session(port))) {
            let _ = child.kill();
            let _ = child.wait();
            let _ = Command::new("pkill").arg("-f").arg(self.dir()).status();
            std::panic::resume_unwind(panic);
        }
        let status = child.wait().expect("wait for scripts/phalanx boot");
        self.finish(status)
    }

    fn dir(&self) -> PathBuf {
        repo_root().join("target/e2e").join(self.name)
    }

    fn command(&self, console: Option<&str>) -> Command {
        ensure_image();
        let root = repo_root();
        let dir = self.dir();
        std::fs::create_dir_all(&dir).unwrap();
        let mut command = Command::new(root.join("scripts/phalanx"));
        command
            .args(["boot", "--emulator", self.emulator, "--cpus", &self.cpus.to_string()])
            .args(["--timeout", &self.timeout_s.to_string(), "--out"])
            .arg(&dir)
            .arg("--config")
            .arg(root.join(self.config))
            .args(["--cmdline", self.cmdline])
            .args(["--megs", &self.megs.to_string()])
            .args(["--cpu-model", self.cpu_model]);
        if let Some(partition) = console {
            command.args(["--console", partition]);
        }
        if self.nic {
            command.arg("--nic");
        }
        command
    }

    fn finish(&self, status: std::process::ExitStatus) -> Run {
        let dir = self.dir();
        let timed_out = dir.join("timed_out").exists();
        assert!(status.success() || timed_out, "scripts/phalanx boot failed for {}", self.name);
        let log = std::fs::read_to_string(dir.join("serial.log")).unwrap_or_default();
        if log.is_empty() {
            panic!(
                "{}: the emulator produced no serial log; the end of its own output:\n{}",
                self.name,
                emulator_output_tail(&dir)
            );
        }
        let records = parse_records(&log);
        let exit_status = std::fs::read_to_string(dir.join("exit_status")).ok().and_then(|s| s.trim().parse().ok());
        Run { dir, log, records, timed_out, exit_status }
    }
}

/// A running machine's serial port (its console, `Boot::run_typing`, or COM2,
/// `Boot::run_with_com2`): what it sent so far, and its input.
pub struct Console {
    dir: PathBuf,
    log: &'static str,
    input: &'static str,
}

impl Console {
    /// Everything the port sent so far.
    pub fn output(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(self.dir.join(self.log)).unwrap_or_default()).into_owned()
    }

    /// Waits until the serial log holds `text`; false after `timeout`.
    pub fn wait_for(&self, text: &str, timeout: std::time::Duration) -> bool {
        self.wait_for_count(text, 1, timeout)
    }

    /// Waits until the serial log holds `text` at least `count` times; false after `timeout`.
    pub fn wait_for_count(&self, text: &str, count: usize, timeout: std::time::Duration) -> bool {
        let start = std::time::Instant::now();
        while start.elapsed() < timeout {
            if self.output().matches(text).count() >= count {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
        false
    }

    /// Types `line` and Enter into the port.
    pub fn type_line(&self, line: &str) {
        use std::io::Write;
        let mut input =
            std::fs::OpenOptions::new().write(true).open(self.dir.join(self.input)).expect("the relay's input FIFO");
        input.write_all(format!("{line}\n").as_bytes()).expect("type into the console");
    }
}

/// A running machine's control channel, driven as a user drives it: `scripts/phalanx ctl`.
pub struct ControlChannel {
    dir: PathBuf,
}

impl ControlChannel {
    /// Sends `command` and returns the reply (`"ok"` true or false); panics when none comes.
    pub fn send(&self, command: &str) -> Value {
        let output = Command::new(repo_root().join("scripts/phalanx"))
            .arg("ctl")
            .arg("--dir")
            .arg(&self.dir)
            .args(["--timeout", "600"])
            .args(command.split_whitespace())
            .output()
            .expect("run scripts/phalanx ctl");
        let text = String::from_utf8_lossy(&output.stdout);
        let reply: Value = serde_json::from_str(text.trim()).unwrap_or_else(|_| {
            panic!("`ctl {command}`: no JSON reply: {text}{}", String::from_utf8_lossy(&output.stderr))
        });
        let ok = reply["ok"].as_bool() == Some(true);
        assert_eq!(output.status.code(), Some(if ok { 0 } else { 1 }), "`ctl {command}`'s exit status: {reply}");
        reply
    }
}

/// The last lines of what the emulator itself printed (Bochs aborts before the firmware runs,
/// for one, leave only that).
pub fn emulator_output_tail(dir: &Path) -> String {
    let mut tail = String::new();
    for name in ["bochs.out", "qemu.out"] {
        if let Ok(text) = std::fs::read_to_string(dir.join(name)) {
            let lines: Vec<&str> = text.lines().collect();
            tail += &format!("--- {name}\n{}\n", lines[lines.len().saturating_sub(20)..].join("\n"));
        }
    }
    if tail.is_empty() {
        tail = format!("(no bochs.out or qemu.out in {})", dir.display());
    }
    tail
}

/// Every line that is a JSON object with a "type" field.
pub fn parse_records(log: &str) -> Vec<Value> {
    log.lines()
        .map(str::trim)
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("type").is_some())
        .collect()
}

impl Run {
    pub fn all(&self, kind: &str) -> Vec<&Value> {
        self.records.iter().filter(|r| r["type"] == kind).collect()
    }

    /// The last record of `kind`; panics with the console log when there is none.
    pub fn one(&self, kind: &str) -> &Value {
        self.all(kind).pop().unwrap_or_else(|| panic!("no {kind:?} record in {}:\n{}", self.dir.display(), self.log))
    }

    /// Fails the test unless the run ended by itself, with no exception or panic.
    pub fn assert_clean_end(&self) {
        assert!(!self.timed_out, "the run hung until the timeout:\n{}", self.log);
        for kind in ["exception", "panic"] {
            assert!(self.all(kind).is_empty(), "{kind} during the run:\n{}", self.log);
        }
    }
}

/// A partition's `partition_stats` record.
pub fn stats<'a>(run: &'a Run, partition: &str) -> &'a Value {
    run.all("partition_stats")
        .into_iter()
        .find(|r| r["partition"] == partition)
        .unwrap_or_else(|| panic!("no partition_stats for {partition}:\n{}", run.log))
}

/// A percentage field (records print them as strings with two decimals).
pub fn pct(v: &Value) -> f64 {
    v.as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("not a percentage: {v}"))
}

/// The partition's CPU share is within `tolerance_pct` percent of its reservation, less what
/// the switches into its slots take: each of its turns starts `entry_latency_median_cycles`
/// after the boundary (the previous owner's switch-out and the decision happen in its slot's
/// time, charged to nobody in particular: docs/scheduling.md), 1.4% of a 4 ms slot under Bochs.
pub fn assert_share(run: &Run, partition: &str, reserved_pct: f64, tolerance_pct: f64) {
    let s = stats(run, partition);
    let share = pct(&s["cpu_share_pct"]);
    let charged = (s["guest_cycles"].as_u64().unwrap() + s["on_behalf_cycles"].as_u64().unwrap()) as f64;
    let capacity = charged * 100.0 / share;
    let switching = s["entry_latency_median_cycles"].as_u64().unwrap() as f64 * s["slots"].as_u64().unwrap() as f64;
    let switch_pct = switching * 100.0 / capacity;
    let tolerance = tolerance_pct / 100.0;
    let (low, high) = (reserved_pct * (1.0 - tolerance) - switch_pct, reserved_pct * (1.0 + tolerance));
    assert!(
        (low..=high).contains(&share),
        "{partition}: measured CPU share {share}% is outside {low:.2}% ..= {high:.2}% (its {reserved_pct}% reservation \
         +- {tolerance_pct}%, less {switch_pct:.2}% for switching into its slots): {s}"
    );
}

/// The config check's estimate of the heap the image needs (`Config::heap_estimate`, which
/// decides what it refuses) is not below what the run used.
pub fn assert_heap_within_estimate(run: &Run) {
    let accounting = run.one("accounting");
    let (used, estimate) =
        (accounting["heap_used_bytes"].as_u64().unwrap(), accounting["heap_estimate_bytes"].as_u64().unwrap());
    assert!(used > 0 && used <= estimate, "heap used {used} bytes, estimated {estimate}: {accounting}");
}

/// The partition is running at the end, and its periodic `progress` records (at least 3)
/// show its iterations growing all along.
pub fn assert_keeps_running(run: &Run, partition: &str) {
    assert_eq!(stats(run, partition)["state"], "running", "{partition}");
    let progress: Vec<u64> = run
        .all("progress")
        .iter()
        .filter(|r| r["partition"] == partition)
        .map(|r| r["iterations"].as_u64().unwrap())
        .collect();
    assert!(
        progress.len() >= 3 && progress.windows(2).all(|w| w[1] > w[0]),
        "{partition} keeps progressing: {progress:?}"
    );
}
