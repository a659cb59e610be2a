//! The Linux guest on its own (no hypervisor): boots build/guest/bzImage in QEMU TCG and in
//! Bochs, and judges the JSON records /init and the workloads print on the serial console.
//!
//! The guest is built first by `scripts/build-guest` (a no-op when it is up to date); a
//! failed build fails every test loudly. Every emulator run has a wall-clock limit: a guest
//! that hangs is a failure, never a skip.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// Emulators share two host cores with everything else: run one guest at a time.
fn emulator_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Builds the guest once per test binary (scripts/build-guest caches by input hash).
fn ensure_guest_built() {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let result = BUILT.get_or_init(|| {
        let script = repo_root().join("scripts/build-guest");
        let out = Command::new(&script)
            .current_dir(repo_root())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{} failed ({}):\n{}\n{}",
                script.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    });
    if let Err(message) = result {
        panic!("the Linux guest could not be built, so it cannot be tested:\n{message}");
    }
}

#[derive(Clone, Copy, Debug)]
enum Emulator {
    Qemu,
    Bochs,
}

impl Emulator {
    fn name(self) -> &'static str {
        match self {
            Emulator::Qemu => "qemu",
            Emulator::Bochs => "bochs",
        }
    }
    /// Generous wall-clock limits: Bochs boots in ~5 s with 2 CPUs and runs 2-4 guest
    /// seconds per wall second, but the host's two cores are shared.
    fn limit(self) -> Duration {
        match self {
            Emulator::Qemu => Duration::from_secs(90),
            Emulator::Bochs => Duration::from_secs(240),
        }
    }
}

struct GuestRun {
    what: String,
    exit_code: Option<i32>,
    console: String,
    records: Vec<Value>,
}

impl GuestRun {
    fn of_type<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.records.iter().filter(move |r| r["type"] == kind)
    }

    fn fail(&self, why: &str) -> ! {
        panic!("{}: {why}\n---- console ----\n{}", self.what, self.console)
    }

    /// The machine ended by itself (exit 0 from run-guest: the guest reset it) and the last
    /// record is the end record with the given status.
    fn assert_clean_end(&self, status: &str) {
        if self.exit_code != Some(0) {
            self.fail(&format!("the emulator did not end cleanly: run-guest exit {:?} (124: timeout)", self.exit_code));
        }
        match self.records.last() {
            Some(r) if r["type"] == "end" && r["status"] == status => {}
            other => {
                self.fail(&format!("last record should be {{\"type\":\"end\",\"status\":\"{status}\"}}, got {other:?}"))
            }
        }
    }
}

/// Boots the guest with `args` on the kernel command line and collects its records.
fn run_guest(emulator: Emulator, cpus: u32, args: &str) -> GuestRun {
    ensure_guest_built();
    let _one_at_a_time = emulator_lock();
    let what = format!("{} with {cpus} CPUs, '{args}'", emulator.name());
    let limit = emulator.limit();
    let mut child = Command::new(repo_root().join("guests/linux/run-guest"))
        .arg(emulator.name())
        .arg(cpus.to_string())
        .arg(limit.as_secs().to_string())
        .args(args.split_whitespace())
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot start guests/linux/run-guest: {e}"));
    // run-guest enforces `limit` itself; this is the backstop should the script hang.
    let mut stdout = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stdout.read_to_end(&mut bytes);
        bytes
    });
    let deadline = Instant::now() + limit + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for run-guest") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let console = String::from_utf8_lossy(&reader.join().expect("reader thread")).into_owned();
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    let Some(status) = status else {
        panic!("{what}: run-guest did not return within {:?}; console:\n{console}", limit + Duration::from_secs(30));
    };
    let records = parse_records(&what, &console);
    GuestRun {
        what,
        exit_code: status.code(),
        console: format!("{console}\n---- run-guest stderr ----\n{stderr}"),
        records,
    }
}

/// Every console line carrying `{"type":` must be one whole JSON object (kernel lines,
/// without it, are skipped). A garbled record is a failure, not noise.
fn parse_records(what: &str, console: &str) -> Vec<Value> {
    console
        .lines()
        .filter_map(|line| line.find("{\"type\":").map(|at| &line[at..]))
        .map(|text| {
            let text = text.trim_end_matches('\r');
            serde_json::from_str::<Value>(text)
                .unwrap_or_else(|e| panic!("{what}: malformed record ({e}): {text}\n---- console ----\n{console}"))
        })
        .collect()
}

fn u64_field(run: &GuestRun, record: &Value, field: &str) -> u64 {
    record[field].as_u64().unwrap_or_else(|| run.fail(&format!("record lacks integer field '{field}': {record}")))
}

fn f64_field(run: &GuestRun, record: &Value, field: &str) -> f64 {
    record[field].as_f64().unwrap_or_else(|| run.fail(&format!("record lacks number field '{field}': {record}")))
}

/// Checks one workload's records: a total with threads == CPUs and positive progress, one
/// record per thread, threads pinned one per CPU, and the workload's own invariants.
fn check_workload(run: &GuestRun, name: &str, cpus: u64) -> Value {
    let totals: Vec<&Value> = run.of_type("workload").filter(|r| r["name"] == name).collect();
    if totals.len() != 1 {
        run.fail(&format!("expected one total record for '{name}', found {}", totals.len()));
    }
    let total = totals[0];
    if u64_field(run, total, "threads") != cpus || u64_field(run, total, "cpus") != cpus {
        run.fail(&format!("'{name}' should run one thread per CPU on {cpus} CPUs: {total}"));
    }
    let iterations = u64_field(run, total, "iterations");
    if iterations == 0 || f64_field(run, total, "iterations_per_sec") <= 0.0 || f64_field(run, total, "seconds") <= 0.0
    {
        run.fail(&format!("'{name}' made no progress: {total}"));
    }
    let threads: Vec<&Value> = run.of_type("thread").filter(|r| r["workload"] == name).collect();
    if threads.len() as u64 != cpus {
        run.fail(&format!("'{name}': expected {cpus} thread records, found {}", threads.len()));
    }
    let indices: BTreeSet<u64> = threads.iter().map(|t| u64_field(run, t, "thread")).collect();
    let used_cpus: BTreeSet<u64> = threads.iter().map(|t| u64_field(run, t, "cpu")).collect();
    let expected: BTreeSet<u64> = (0..cpus).collect();
    if indices != expected || used_cpus != expected {
        run.fail(&format!("'{name}': threads {indices:?} should be pinned one per CPU, ran on CPUs {used_cpus:?}"));
    }
    for t in &threads {
        let thread_iterations = u64_field(run, t, "iterations");
        match name {
            // Every thread passes every barrier episode: all counts equal the total.
            "barrier" | "barrier-omp" if thread_iterations != iterations => run.fail(&format!(
                "'{name}': thread did {thread_iterations} iterations, the barrier total is {iterations}: {t}"
            )),
            _ if thread_iterations == 0 => run.fail(&format!("'{name}': thread made no progress: {t}")),
            _ => {}
        }
        let (cycles, fraction) = match name {
            "barrier" => ("spin_cycles", "spin_fraction"),
            "barrier-omp" => ("wait_cycles", "wait_fraction"),
            _ => continue,
        };
        let waited = u64_field(run, t, cycles) as f64 / f64_field(run, total, "tsc_hz");
        let f = f64_field(run, t, fraction);
        if !(0.0..=1.0).contains(&f) {
            run.fail(&format!("'{name}': {fraction} {f} outside [0, 1]: {t}"));
        }
        // Spinning on the CPU is CPU time: it cannot exceed what the scheduler gave the thread
        // (waits while the thread itself was preempted are counted apart).
        let cpu = f64_field(run, t, "cpu_seconds");
        if name == "barrier" && waited > cpu * 1.02 + 0.01 {
            run.fail(&format!("'{name}': {waited:.3} s spinning on the CPU but only {cpu:.3} s of CPU time: {t}"));
        }
    }
    total.clone()
}

fn check_boot_and_run(run: &GuestRun, cpus: u64, workloads: &[&str]) {
    let boots: Vec<&Value> = run.of_type("boot").collect();
    if boots.len() != 1 || u64_field(run, boots[0], "cpus") != cpus {
        run.fail(&format!("expected one boot record reporting {cpus} CPUs, got {boots:?}"));
    }
    let runs: Vec<&Value> = run.of_type("run").collect();
    let listed: Vec<&str> = runs
        .first()
        .and_then(|r| r["workloads"].as_array())
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if runs.len() != 1 || listed != workloads {
        run.fail(&format!("expected one run record listing {workloads:?}, got {runs:?}"));
    }
    if let Some(e) = run.of_type("error").next() {
        run.fail(&format!("unexpected error record: {e}"));
    }
}

fn check_good_run(emulator: Emulator, cpus: u32, args: &str, workloads: &[&str]) -> GuestRun {
    let run = run_guest(emulator, cpus, args);
    check_boot_and_run(&run, cpus.into(), workloads);
    for w in workloads {
        check_workload(&run, w, cpus.into());
    }
    run.assert_clean_end("ok");
    run
}

fn check_rejected(emulator: Emulator, args: &str, expected_in_message: &str) {
    let run = run_guest(emulator, 2, args);
    let errors: Vec<&Value> = run.of_type("error").filter(|e| e["source"] == "init").collect();
    let Some(message) = errors.first().and_then(|e| e["message"].as_str()) else {
        run.fail("a bad command line should produce an error record from /init");
    };
    if !message.contains(expected_in_message) {
        run.fail(&format!("error message should name the problem ('{expected_in_message}'): {message}"));
    }
    if run.of_type("workload").next().is_some() {
        run.fail("no workload should run after a bad command line");
    }
    run.assert_clean_end("error");
}

#[test]
fn qemu_runs_each_workload_alone_on_2_cpus() {
    for w in ["barrier", "barrier-omp", "cpubound"] {
        check_good_run(Emulator::Qemu, 2, &format!("phalanx.workload={w} phalanx.seconds=1"), &[w]);
    }
}

#[test]
fn qemu_runs_barrier_and_cpubound_consolidated() {
    check_good_run(Emulator::Qemu, 2, "phalanx.workload=barrier+cpubound phalanx.seconds=1", &["barrier", "cpubound"]);
}

#[test]
fn qemu_barrier_stops_after_exactly_the_requested_iterations() {
    for w in ["barrier", "barrier-omp"] {
        let run = check_good_run(Emulator::Qemu, 2, &format!("phalanx.workload={w} phalanx.iterations=1234"), &[w]);
        let total = check_workload(&run, w, 2);
        if total["iterations"] != 1234 {
            run.fail(&format!("asked for 1234 iterations, got {}", total["iterations"]));
        }
    }
}

#[test]
fn qemu_rejects_bad_command_lines_clearly_and_ends() {
    check_rejected(Emulator::Qemu, "phalanx.workload=bogus", "unknown workload 'bogus'");
    check_rejected(Emulator::Qemu, "phalanx.workload=barrier+nope", "unknown workload 'nope'");
    check_rejected(Emulator::Qemu, "phalanx.workload=barrier phalanx.threads=0", "phalanx.threads=0");
    check_rejected(Emulator::Qemu, "phalanx.workload=barrier phalanx.seconds=abc", "phalanx.seconds=abc");
    check_rejected(
        Emulator::Qemu,
        "phalanx.workload=barrier phalanx.seconds=1 phalanx.iterations=5",
        "exclude each other",
    );
    check_rejected(
        Emulator::Qemu,
        "phalanx.workload=barrier phalanx.thread=2",
        "unknown kernel command line parameter 'phalanx.thread=2'",
    );
    check_rejected(Emulator::Qemu, "", "no phalanx.workload=");
}

#[test]
fn bochs_runs_barrier_on_2_cpus() {
    let run = check_good_run(Emulator::Bochs, 2, "phalanx.workload=barrier phalanx.seconds=1", &["barrier"]);
    // Bochs's TSC ticks once per emulated instruction (ips = 10 M): run-guest tells Linux so,
    // and the workload's own TSC calibration against guest time must agree.
    let total = check_workload(&run, "barrier", 2);
    let tsc_hz = f64_field(&run, &total, "tsc_hz");
    if !(9.0e6..=11.0e6).contains(&tsc_hz) {
        run.fail(&format!("guest TSC rate {tsc_hz} Hz, expected ~10 MHz (Bochs ips); guest time would be off"));
    }
}

#[test]
fn bochs_runs_barrier_omp_and_cpubound_consolidated_on_2_cpus() {
    check_good_run(
        Emulator::Bochs,
        2,
        "phalanx.workload=barrier-omp+cpubound phalanx.seconds=1",
        &["barrier-omp", "cpubound"],
    );
}

#[test]
fn bochs_rejects_zero_threads_and_ends() {
    check_rejected(Emulator::Bochs, "phalanx.workload=barrier phalanx.threads=0", "phalanx.threads=0");
}
