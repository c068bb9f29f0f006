//! The eBPF build links with `bpf-linker`, a tool cargo does not know about: rebuild when it
//! changes (it is reinstalled when nightly's LLVM moves).
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(err) => println!("cargo:warning=bpf-linker not found ({err}); run `cargo xtask setup`"),
    }
}
