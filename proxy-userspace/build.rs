//! Builds the eBPF programs (`proxy-ebpf`, for bpfel-unknown-none with nightly and bpf-linker)
//! into OUT_DIR, where `datapath::loader` embeds them.

fn main() -> anyhow::Result<()> {
    // Read when the script runs, not when it is compiled: a script built in another checkout
    // (a copied or shared target directory) would otherwise build that checkout's programs.
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let root_dir = std::path::Path::new(&manifest_dir).join("../proxy-ebpf");
    let root_dir = root_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", root_dir.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "proxy-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
