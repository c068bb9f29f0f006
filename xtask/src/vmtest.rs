//! The demo and the privileged integration tests, per kernel: the host's own, and Debian 12's
//! 6.1 LTS (the kernel most users' nodes run) booted with virtme-ng over this machine's
//! filesystem. Everything is built once on the host; the VM runs it read-only and is the node,
//! so nothing there touches the host's interfaces or cgroups.

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{cargo, run, workspace_root};

/// Debian 12's kernel, installed by `setup` (`linux-image-<this>`, with its modules).
pub const VM_KERNEL: &str = "6.1.0-57-amd64";

/// The VM is killed after this, which keeps CI (the host's part takes about 15 minutes) within
/// its 90. nextest bounds each test; the whole suite takes 15 to 50 minutes under emulation,
/// depending on how much of the machine's 2 cores it gets.
const VM_TIMEOUT: Duration = Duration::from_secs(60 * 60);

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kernel {
    /// This machine's running kernel, no VM.
    Host,
    /// Debian 12's 6.1 LTS in a VM.
    #[value(name = "6.1")]
    Lts,
    /// Both, host first.
    All,
}

/// What one kernel's run showed.
struct Report {
    kernel: String,
    place: &'static str,
    demo_ok: bool,
    tests_ok: bool,
    /// nextest's closing counts, e.g. `52 tests run: 7 passed, 45 failed, 0 skipped`.
    counts: Option<String>,
    took: Duration,
    /// VM only: time from starting vng to the guest script, and its shutdown after.
    overhead: Option<Duration>,
}

impl Report {
    fn ok(&self) -> bool {
        self.demo_ok && self.tests_ok
    }
}

/// nextest's summary line, from `N tests run` on: `Summary [ 9.1s] 3 tests run: 3 passed, 0
/// skipped` gives `3 tests run: 3 passed, 0 skipped`. A run cut short (the VM killed) has no
/// summary: then the results it did print are counted.
fn summary_counts(log: &str) -> Option<String> {
    let summary = log
        .lines()
        .rev()
        .filter(|line| line.trim_start().starts_with("Summary ["))
        .find_map(|line| Some(line.split_once("] ")?.1.trim().to_string()));
    if summary.is_some() {
        return summary;
    }
    let count = |status: &str| {
        log.lines()
            .filter(|l| l.trim_start().starts_with(&format!("{status} [")))
            .count()
    };
    let (passed, failed, timed_out) = (count("PASS"), count("FAIL"), count("TIMEOUT"));
    (passed + failed + timed_out > 0)
        .then(|| format!("cut short after {passed} passed, {failed} failed, {timed_out} timed out"))
}

/// Runs the demo and the integration tests on `kernel`, prints one line per kernel, and fails
/// if anything failed there. `args` go to nextest (e.g. a `-E` filter).
pub fn run_suite(kernel: Kernel, args: &[String]) -> anyhow::Result<()> {
    let root = workspace_root();
    let results = root.join("target/vmtest");
    let mut reports = Vec::new();
    if matches!(kernel, Kernel::Host | Kernel::All) {
        reports.push(on_host(&root, &results.join("host"), args)?);
    }
    if matches!(kernel, Kernel::Lts | Kernel::All) {
        reports.push(in_vm(&root, &results.join(VM_KERNEL), args)?);
    }
    println!("\nvmtest: per kernel (logs in {})", results.display());
    for r in &reports {
        let mut line = format!(
            "  {:<18} {:<4}  demo {:<6}  tests {:<6}  {}  in {}s",
            r.kernel,
            r.place,
            verdict(r.demo_ok),
            verdict(r.tests_ok),
            r.counts.as_deref().unwrap_or("(no nextest summary)"),
            r.took.as_secs()
        );
        if let Some(overhead) = r.overhead {
            write!(line, " (boot + shutdown {}s)", overhead.as_secs())?;
        }
        println!("{line}");
    }
    let failed: Vec<&str> = reports
        .iter()
        .filter(|r| !r.ok())
        .map(|r| r.kernel.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("vmtest failed on {}", failed.join(", "));
    }
    Ok(())
}

fn verdict(ok: bool) -> &'static str {
    if ok { "ok" } else { "FAILED" }
}

/// A fresh results directory: last run's logs must not pass for this run's.
fn fresh_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

fn on_host(root: &Path, results: &Path, args: &[String]) -> anyhow::Result<Report> {
    fresh_dir(results)?;
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")?
        .trim()
        .to_string();
    println!("vmtest: demo and integration tests on this machine's kernel {kernel}");
    let start = Instant::now();
    let demo_ok = run(Command::new(root.join("target/debug/bkp-sandbox")).arg("demo")).is_ok();
    let mut tests = cargo();
    tests
        .args([
            "nextest",
            "run",
            "--package",
            "integration-tests",
            "--no-fail-fast",
        ])
        .args(args)
        .current_dir(root);
    let (tests_ok, log) = tee_stderr(&mut tests, &results.join("tests.log"))?;
    Ok(Report {
        kernel,
        place: "host",
        demo_ok,
        tests_ok,
        counts: summary_counts(&log),
        took: start.elapsed(),
        overhead: None,
    })
}

/// Runs `cmd`, showing its stderr as it comes and keeping a copy in `log`; returns whether it
/// succeeded and what it wrote.
fn tee_stderr(cmd: &mut Command, log: &Path) -> anyhow::Result<(bool, String)> {
    let mut child = cmd
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let mut file = fs::File::create(log)?;
    let mut text = String::new();
    for line in BufReader::new(child.stderr.take().expect("piped")).lines() {
        let line = line?;
        eprintln!("{line}");
        writeln!(file, "{line}")?;
        text.push_str(&line);
        text.push('\n');
    }
    Ok((child.wait()?.success(), text))
}

/// Hardware virtualization only where it is the real thing: PVM hosts (`kvm_pvm`, no vmx/svm
/// flag) offer /dev/kvm but boot only PVM guest kernels, so there the VM is emulated.
fn kvm_usable() -> bool {
    let flags = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    Path::new("/dev/kvm").exists()
        && !Path::new("/sys/module/kvm_pvm").exists()
        && flags
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// How many times longer the harness waits in an emulated VM before calling something late
/// (a bash loop runs about 18 times slower there than on this machine; waits on the kernel
/// are less affected).
const EMULATION_TIMEOUT_SCALE: u32 = 5;

/// The test binary that touches neither BPF nor the network stack (the deploy manifests'
/// schema validation): the same on every kernel, and reading its inputs over the VM's 9p root
/// costs minutes, so without a filter of its own the VM leaves it out.
const KERNEL_INDEPENDENT: &str = "not binary(deploy)";

/// What the guest script needs from the host: its PATH (the guest's is reset), the binaries,
/// the timeout scale, and the arguments for nextest, as a file it sources (the kernel command
/// line that carries vng's `-e` is short).
fn guest_env(root: &Path, timeout_scale: u32, args: &[String]) -> String {
    let path = std::env::var("PATH").unwrap_or_default();
    let bin = |name: &str| shell_quote(&root.join("target/debug").join(name).to_string_lossy());
    let mut env = format!(
        "export PATH={}:/usr/sbin:/sbin\nexport BKP_BIN={}\nexport BKP_SANDBOX_BIN={}\n\
         export RUST_BACKTRACE={}\nexport BKP_TEST_TIMEOUT_SCALE={timeout_scale}\nset --",
        shell_quote(&path),
        bin("bpf-kube-proxy"),
        bin("bkp-sandbox"),
        shell_quote(&std::env::var("RUST_BACKTRACE").unwrap_or_else(|_| "0".into())),
    );
    for arg in args {
        env.push(' ');
        env.push_str(&shell_quote(arg));
    }
    env.push('\n');
    env
}

fn capture(cmd: &mut Command) -> anyhow::Result<Vec<u8>> {
    let out = cmd
        .current_dir(workspace_root())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", out.status);
    }
    Ok(out.stdout)
}

fn in_vm(root: &Path, results: &Path, args: &[String]) -> anyhow::Result<Report> {
    let image = PathBuf::from(format!("/boot/vmlinuz-{VM_KERNEL}"));
    if !image.is_file() {
        bail!(
            "{} missing: `cargo xtask setup` installs linux-image-{VM_KERNEL}",
            image.display()
        );
    }
    fresh_dir(results)?;
    // The test binaries as nextest sees them, so the guest runs exactly what the host built.
    let binaries = capture(cargo().args([
        "nextest",
        "list",
        "--package",
        "integration-tests",
        "--list-type",
        "binaries-only",
        "--message-format",
        "json",
    ]))?;
    fs::write(results.join("binaries.json"), binaries)?;
    let metadata = capture(cargo().args(["metadata", "--format-version", "1"]))?;
    fs::write(results.join("cargo-metadata.json"), metadata)?;
    let kvm = kvm_usable();
    let scale = if kvm { 1 } else { EMULATION_TIMEOUT_SCALE };
    let default_filter = ["-E".to_string(), KERNEL_INDEPENDENT.to_string()];
    let args = if args.is_empty() {
        &default_filter[..]
    } else {
        args
    };
    fs::write(results.join("env.sh"), guest_env(root, scale, args))?;
    println!(
        "vmtest: booting {VM_KERNEL} ({}), demo and integration tests inside",
        if kvm { "KVM" } else { "emulated, no usable KVM" }
    );
    let script = root.join("xtask/vm/guest.sh");
    let mut vng = Command::new("vng");
    vng.arg("--run").arg(&image);
    if !kvm {
        vng.arg("--disable-kvm");
    }
    vng.args(["--cpus", "2", "--memory", "8G"])
        .arg(format!("--rwdir={}", results.display()))
        .arg("--cwd")
        .arg(root)
        .arg("-e")
        .arg(format!(
            "bash {} {}",
            shell_quote(&script.to_string_lossy()),
            shell_quote(&results.to_string_lossy())
        ))
        .stdin(Stdio::null())
        // Its own process group, so a timeout ends vng and the qemu under it, and nothing else.
        .process_group(0);
    let start = Instant::now();
    let mut child = vng.spawn().context("starting vng (virtme-ng)")?;
    while child.try_wait()?.is_none() {
        if start.elapsed() > VM_TIMEOUT {
            println!("vmtest: the VM ran for {VM_TIMEOUT:?}, killing it");
            run(Command::new("kill").args(["-KILL", "--", &format!("-{}", child.id())]))?;
            child.wait()?;
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let took = start.elapsed();

    let read = |name: &str| fs::read_to_string(results.join(name)).unwrap_or_default();
    let status_ok = |name: &str| read(name).trim() == "0";
    let seconds = |name: &str| read(name).trim().parse::<f64>().ok();
    // The guest's clock starts with its kernel: what the script took is exact, the rest of
    // the wall time is qemu, boot and shutdown.
    let overhead = match (seconds("boot-seconds"), seconds("done-seconds")) {
        (Some(booted), Some(done)) if done >= booted => {
            Some(took.saturating_sub(Duration::from_secs_f64(done - booted)))
        }
        _ => None,
    };
    let kernel = match read("kernel").trim() {
        "" => format!("{VM_KERNEL} (no word from the guest)"),
        k => k.to_string(),
    };
    Ok(Report {
        kernel,
        place: "VM",
        demo_ok: status_ok("demo.status"),
        tests_ok: status_ok("tests.status"),
        counts: summary_counts(&read("tests.log")),
        took,
        overhead,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_counts_come_from_nextests_closing_summary() {
        let log = "        PASS [   1.2s] integration-tests::deploy a\n\
                   ------------\n     Summary [  12.345s] 52 tests run: 7 passed, 45 failed, 0 skipped\n\
                   \x20       FAIL [   3.0s] integration-tests::clusterip b\n\
                   error: test run failed\n";
        assert_eq!(
            summary_counts(log).as_deref(),
            Some("52 tests run: 7 passed, 45 failed, 0 skipped")
        );
        assert_eq!(summary_counts("error: no tests to run\n"), None);
        let cut = "        PASS [   1.2s] (1/52) integration-tests::deploy a\n\
                   \x20    TIMEOUT [ 360.6s] (2/52) integration-tests::nodeport b\n\
                   \x20       FAIL [ 268.8s] (3/52) integration-tests::nodeport c\n\
                   \x20       SLOW [>120.000s] (───) integration-tests::nodeport d\n";
        assert_eq!(
            summary_counts(cut).as_deref(),
            Some("cut short after 1 passed, 1 failed, 1 timed out")
        );
    }
}
