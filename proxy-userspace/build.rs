//! Builds the eBPF programs (`proxy-ebpf`, for bpfel-unknown-none with nightly and bpf-linker)
//! into OUT_DIR, where `datapath::loader` embeds them.

fn main() -> anyhow::Result<()> {
    let root_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../proxy-ebpf");
    let root_dir = root_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {root_dir:?}"))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "proxy-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
