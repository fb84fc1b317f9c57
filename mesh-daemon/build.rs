//! Builds the kernel programs (`mesh-ebpf`, nightly + bpf-linker) and leaves the object in
//! OUT_DIR for `include_bytes_aligned!`. `cargo xtask setup` installs what this needs.
fn main() -> anyhow::Result<()> {
    let package = aya_build::Package {
        name: "mesh-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../mesh-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}
