//! Installs what is missing, and only that.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::{is_root, run, vmtest::VM_KERNEL};

/// Debian packages, each with a command (or an absolute path) that shows it is installed.
const PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip"),
    ("bpftool", "bpftool"),
    ("dnsmasq-base", "dnsmasq"),
    ("dnsutils", "dig"),
    ("iptables", "iptables-restore"),
    ("nftables", "nft"),
    ("wrk", "wrk"),
    ("iperf3", "iperf3"),
    // The benchmark's plots draw their text with this font.
    (
        "fonts-dejavu-core",
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    ),
    // The VM of `cargo xtask vmtest` (with linux-image-VM_KERNEL, see `packages`): virtme-ng
    // runs qemu and builds the guest's initramfs around a static busybox.
    ("qemu-system-x86", "qemu-system-x86_64"),
    ("busybox-static", "busybox"),
];

/// PACKAGES and the VM's kernel, whose image (and modules) the package installs.
fn packages() -> Vec<(String, String)> {
    PACKAGES
        .iter()
        .map(|(p, probe)| (p.to_string(), probe.to_string()))
        .chain([(
            format!("linux-image-{VM_KERNEL}"),
            format!("/boot/vmlinuz-{VM_KERNEL}"),
        )])
        .collect()
}

fn has_command(name: &str) -> bool {
    let sbin = [
        "/usr/sbin",
        "/sbin",
        "/usr/bin",
        "/bin",
        "/usr/local/bin",
        "/usr/local/sbin",
    ];
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(sbin.iter().map(PathBuf::from))
        .any(|dir| dir.join(name).is_file())
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn debian_packages() -> anyhow::Result<()> {
    let missing: Vec<String> = packages()
        .into_iter()
        .filter(|(_, probe)| {
            if probe.starts_with('/') {
                !std::path::Path::new(probe).is_file()
            } else {
                !has_command(probe)
            }
        })
        .map(|(p, _)| p)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("setup: installing Debian packages {}", missing.join(" "));
    run(Command::new("apt-get").arg("update").arg("-qq"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn rust_src() -> anyhow::Result<PathBuf> {
    let sysroot =
        PathBuf::from(output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?.trim());
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        println!("setup: adding rust-src to the nightly toolchain");
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    Ok(sysroot)
}

/// nightly's own LLVM dylib, e.g. `LLVM-22-rust-1.97.0-nightly` and major 22.
fn nightly_llvm(sysroot: &std::path::Path) -> anyhow::Result<(String, String)> {
    let lib = sysroot.join("lib");
    let dylib = std::fs::read_dir(&lib)
        .with_context(|| format!("listing {}", lib.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .find_map(|name| {
            let stem = name.strip_prefix("lib")?.strip_suffix(".so")?;
            stem.starts_with("LLVM-").then(|| stem.to_string())
        })
        .with_context(|| format!("no libLLVM-*.so in {}", lib.display()))?;
    let major = dylib
        .strip_prefix("LLVM-")
        .and_then(|rest| rest.split('-').next())
        .context("unexpected LLVM dylib name")?
        .to_string();
    Ok((dylib, major))
}

/// bpf-linker must use the same LLVM as rustc nightly, so it is built against nightly's own
/// libLLVM. A stamp next to the binary records which one; a nightly update rebuilds it.
fn bpf_linker(sysroot: &std::path::Path) -> anyhow::Result<()> {
    let (dylib, major) = nightly_llvm(sysroot)?;
    let cargo_home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|_| std::env::var("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    let stamp = cargo_home.join("bin/.bpf-linker-llvm");
    let linked = std::fs::read_to_string(&stamp).unwrap_or_default();
    if has_command("bpf-linker") && linked.trim() == dylib {
        return Ok(());
    }
    println!("setup: building bpf-linker against {dylib} (about a minute)");
    let lib = sysroot.join("lib");
    let rustflags = format!(
        "-L {0} -l dylib={dylib} -C link-arg=-Wl,-rpath,{0}",
        lib.display()
    );
    run(Command::new("cargo")
        .args([
            "+nightly",
            "install",
            "bpf-linker",
            "--version",
            "^0.13",
            "--locked",
            "--force",
        ])
        .arg("--no-default-features")
        .args(["--features", &format!("llvm-{major},no-llvm-linking")])
        .env("RUSTFLAGS", rustflags))?;
    std::fs::write(&stamp, dylib)?;
    Ok(())
}

/// The Kubernetes schema validator the deploy tests use (its schemas ship in the package).
fn kubernetes_validate() -> anyhow::Result<()> {
    if !has_command("kubernetes-validate") {
        println!("setup: installing kubernetes-validate (PyPI)");
        run(Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "kubernetes-validate==1.37.0",
        ]))?;
    }
    Ok(())
}

/// virtme-ng, which boots a kernel over this machine's own filesystem for `cargo xtask vmtest`.
fn virtme_ng() -> anyhow::Result<()> {
    if !has_command("vng") {
        println!("setup: installing virtme-ng (PyPI)");
        run(Command::new("python3").args(["-m", "pip", "install", "--quiet", "virtme-ng==1.42"]))?;
        // Under pyenv a new command is on PATH only once its shim exists; elsewhere there is no
        // pyenv and nothing to do.
        let _ = Command::new("pyenv").arg("rehash").status();
    }
    Ok(())
}

fn nextest() -> anyhow::Result<()> {
    let installed = Command::new("cargo")
        .args(["nextest", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        println!("setup: installing cargo-nextest");
        run(Command::new("cargo").args(["install", "cargo-nextest", "--locked"]))?;
    }
    Ok(())
}

/// cargo-fuzz, which builds and runs the fuzz targets of `cargo xtask fuzz` with nightly.
fn cargo_fuzz() -> anyhow::Result<()> {
    let installed = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        println!("setup: installing cargo-fuzz");
        run(Command::new("cargo").args(["install", "cargo-fuzz", "--version", "^0.13", "--locked"]))?;
    }
    Ok(())
}

/// nightly's rust-src and a matching bpf-linker; returns nightly's sysroot.
pub fn toolchain() -> anyhow::Result<PathBuf> {
    let sysroot = rust_src()?;
    bpf_linker(&sysroot)?;
    Ok(sysroot)
}

pub fn all() -> anyhow::Result<()> {
    if is_root() {
        debian_packages()?;
    } else {
        println!(
            "setup: not root, skipping Debian packages ({})",
            packages().into_iter().map(|p| p.0).collect::<Vec<_>>().join(" ")
        );
    }
    toolchain()?;
    kubernetes_validate()?;
    virtme_ng()?;
    nextest()?;
    cargo_fuzz()
}
