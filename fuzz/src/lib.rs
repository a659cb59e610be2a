//! A bounded fuzzing driver for the pure crates' host tests: deterministic inputs from a seed,
//! a time budget, every input run under `catch_unwind`, and one line of figures at the end.
//! A structural fuzzer written here rather than cargo-fuzz, which needs the nightly toolchain
//! and a sanitizer runtime the CI machine and the bare-metal crates do without; the inputs
//! are built from the shapes the code under test expects (configs, instructions, page
//! tables), which coverage guidance would take far longer to find.
//!
//! `PHALANX_FUZZ_SECONDS` sets the budget of every fuzzer (`scripts/fuzz` runs them for
//! longer) and `PHALANX_FUZZ_SEED` the base seed; input `i` is generated from `seed ^ i`,
//! so a failure names the seed that reproduces it.
#![forbid(unsafe_code)]

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use sched::rng::SplitMix64;

/// The random source of one input, with the helpers the generators need.
pub struct Rng(SplitMix64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(SplitMix64::new(seed))
    }

    pub fn u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in `0..bound` (`bound` > 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.0.below(bound)
    }

    /// Uniform in `0..bound` as an index.
    pub fn index(&mut self, bound: usize) -> usize {
        self.below(bound as u64) as usize
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.index(items.len())]
    }

    pub fn fill(&mut self, bytes: &mut [u8]) {
        for b in bytes {
            *b = self.u64() as u8;
        }
    }
}

/// What a fuzzer run did.
#[derive(Debug, Clone)]
pub struct Report {
    pub name: String,
    pub inputs: u64,
    pub seconds: f64,
    /// Inputs whose handling panicked.
    pub crashes: u64,
    /// Inputs that broke a property the fuzzer checks (the handler returned `Err`).
    pub violations: u64,
    /// The first failures: seed and what happened.
    pub failures: Vec<(u64, String)>,
}

impl Report {
    pub fn line(&self) -> String {
        format!(
            "fuzz {}: {} inputs in {:.1} s ({:.0} inputs/s), {} crashes, {} property violations",
            self.name,
            self.inputs,
            self.seconds,
            self.inputs as f64 / self.seconds.max(1e-9),
            self.crashes,
            self.violations
        )
    }
}

fn env_f64(name: &str) -> Option<f64> {
    std::env::var(name).ok()?.parse().ok()
}

fn env_u64(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// Runs `one` on fresh inputs for `PHALANX_FUZZ_SECONDS` (else `default_seconds`), at least
/// `min_inputs` of them, prints the report's line and returns it. `one` gets the input's
/// random source and returns `Err` when a checked property does not hold.
pub fn run(
    name: &str,
    default_seconds: f64,
    min_inputs: u64,
    mut one: impl FnMut(&mut Rng) -> Result<(), String>,
) -> Report {
    let budget = Duration::from_secs_f64(env_f64("PHALANX_FUZZ_SECONDS").unwrap_or(default_seconds).max(0.0));
    let base = env_u64("PHALANX_FUZZ_SEED").unwrap_or(0x5EED_F022);
    let start = Instant::now();
    let mut report =
        Report { name: name.into(), inputs: 0, seconds: 0.0, crashes: 0, violations: 0, failures: Vec::new() };
    while report.inputs < min_inputs || start.elapsed() < budget {
        let seed = base ^ report.inputs;
        let outcome = catch_unwind(AssertUnwindSafe(|| one(&mut Rng::new(seed))));
        let failure = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(why)) => {
                report.violations += 1;
                Some(why)
            }
            Err(panic) => {
                report.crashes += 1;
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                Some(format!("panicked: {message}"))
            }
        };
        if let Some(why) = failure.filter(|_| report.failures.len() < 5) {
            report.failures.push((seed, why));
        }
        report.inputs += 1;
    }
    report.seconds = start.elapsed().as_secs_f64();
    println!("{}", report.line());
    report
}

/// Fails the calling test with the report's failures (each with the seed that reproduces it).
pub fn assert_clean(report: &Report) {
    if report.crashes + report.violations > 0 {
        let list: Vec<String> = report
            .failures
            .iter()
            .map(|(seed, why)| format!("  PHALANX_FUZZ_SEED={:#x} (input 0 of that seed): {why}", seed))
            .collect();
        panic!("{}\n{}", report.line(), list.join("\n"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_driver_counts_crashes_and_violations_and_names_their_seeds() {
        let report = run("self-test", 0.0, 300, |rng| match rng.below(3) {
            0 => Ok(()),
            1 => Err("a broken property".into()),
            _ => panic!("a crash"),
        });
        assert_eq!(report.inputs, 300);
        assert!(report.crashes > 50 && report.violations > 50, "{report:?}");
        assert_eq!(report.failures.len(), 5);
        // The seed reproduces the input: the same first draw.
        let (seed, why) = &report.failures[0];
        let first = Rng::new(*seed).below(3);
        assert_eq!(why.starts_with("panicked"), first == 2, "{why}");
        assert!(std::panic::catch_unwind(|| assert_clean(&report)).is_err());
    }
}
