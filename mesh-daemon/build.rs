//! Builds the kernel programs (`mesh-ebpf`, nightly + bpf-linker) and leaves the object in
//! OUT_DIR for `include_bytes_aligned!`. `cargo xtask setup` installs what this needs.
fn main() -> anyhow::Result<()> {
    // aya-build turns every line the inner cargo prints into a build warning, and cargo
    // replays those on every later build: without this each build showed ~35 "Compiling"
    // warnings that looked like the eBPF crate being rebuilt. Errors still come through.
    // SAFETY: the build script is single-threaded; nothing reads the environment meanwhile.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("CARGO_TERM_QUIET", "true")
    };
    let package = aya_build::Package {
        name: "mesh-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../mesh-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}
