//! `cargo xtask fuzz`: the cargo-fuzz targets of `fuzz/`, each for a set time, starting from
//! the seeds in `fuzz/seeds/<target>` and what earlier runs here found (`fuzz/corpus/`).

use std::{fs, process::Command, time::Instant};

use anyhow::{Context as _, bail};

use crate::workspace_root;

pub const TARGETS: [&str; 4] = ["manifests", "translate", "planner", "config"];

/// libFuzzer's count of inputs run, from its final lines: `stat::number_of_executed_units: N`
/// (with `-print_final_stats=1`), else `Done N runs in S second(s)`.
pub fn executions(log: &str) -> Option<u64> {
    let stat = log.lines().rev().find_map(|line| {
        line.trim()
            .strip_prefix("stat::number_of_executed_units:")?
            .trim()
            .parse()
            .ok()
    });
    stat.or_else(|| {
        log.lines().rev().find_map(|line| {
            line.trim()
                .strip_prefix("Done ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
    })
}

fn cargo_fuzz() -> Command {
    let mut cmd = Command::new("cargo");
    // The code under test is safe Rust (its unsafe is at the BPF boundary, which no target
    // reaches): a panic is the crash to find, and without AddressSanitizer each input runs
    // about twice as fast.
    cmd.args(["+nightly", "fuzz"]);
    cmd.current_dir(workspace_root());
    cmd
}

/// Runs `targets` for `seconds` each; fails if any of them crashes (a panic, an invariant
/// broken, an input that takes over 30 s), naming the input libFuzzer saved.
pub fn run(seconds: u64, targets: &[&str]) -> anyhow::Result<()> {
    let root = workspace_root();
    let logs = root.join("target/fuzz");
    fs::create_dir_all(&logs)?;
    println!("fuzz: building {} (nightly, libFuzzer)", targets.join(", "));
    let built = cargo_fuzz()
        .args(["build", "--sanitizer", "none"])
        .status()
        .context("starting cargo +nightly fuzz build")?;
    if !built.success() {
        bail!("cargo +nightly fuzz build failed: {built}");
    }
    let mut crashed = Vec::new();
    for target in targets {
        let corpus = root.join("fuzz/corpus").join(target);
        fs::create_dir_all(&corpus)?;
        let log_path = logs.join(format!("{target}.log"));
        let log = fs::File::create(&log_path)?;
        let started = Instant::now();
        let mut cmd = cargo_fuzz();
        cmd.args(["run", "--sanitizer", "none", target]).arg(&corpus);
        let seeds = root.join("fuzz/seeds").join(target);
        if seeds.is_dir() {
            cmd.arg(seeds);
        }
        cmd.arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .args(["-timeout=30", "-print_final_stats=1"]);
        let dict = root.join("fuzz/seeds").join(format!("{target}.dict"));
        if dict.is_file() {
            cmd.arg(format!("-dict={}", dict.display()));
        }
        let status = cmd
            .stdout(log.try_clone()?)
            .stderr(log)
            .status()
            .context("starting cargo +nightly fuzz run")?;
        let text = fs::read_to_string(&log_path).unwrap_or_default();
        let runs = executions(&text).map_or_else(|| "?".into(), |n| n.to_string());
        let secs = started.elapsed().as_secs();
        if status.success() {
            println!("fuzz: {target}: {runs} executions in {secs} s, no crash");
        } else {
            println!(
                "fuzz: {target}: CRASHED after {runs} executions ({status}); log {}:",
                log_path.display()
            );
            print_tail(&text, 60);
            crashed.push(*target);
        }
    }
    if !crashed.is_empty() {
        bail!(
            "fuzz targets crashed: {} (inputs in fuzz/artifacts/, rerun one with `cargo +nightly fuzz run TARGET INPUT`)",
            crashed.join(", ")
        );
    }
    Ok(())
}

fn print_tail(text: &str, lines: usize) {
    let all: Vec<&str> = text.lines().collect();
    for line in &all[all.len().saturating_sub(lines)..] {
        println!("  {line}");
    }
}

/// Whether a target name is one of [`TARGETS`]; checked before the long build.
pub fn check_target(target: &str) -> anyhow::Result<()> {
    if !TARGETS.contains(&target) {
        bail!(
            "no fuzz target {target:?}: the targets are {}",
            TARGETS.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executions_are_read_from_the_final_stats_or_the_done_line() {
        let with_stats = "#65536\tpulse  cov: 1 ft: 2 corp: 3/4b exec/s: 5 rss: 6Mb\n\
                          Done 70000 runs in 21 second(s)\n\
                          stat::number_of_executed_units: 70012\n\
                          stat::average_exec_per_sec:     3333\n";
        assert_eq!(executions(with_stats), Some(70_012));
        assert_eq!(
            executions("INFO: seed\nDone 812 runs in 2 second(s)\n"),
            Some(812)
        );
        assert_eq!(executions("==1== ERROR: libFuzzer: deadly signal\n"), None);
    }
}
