//! Builds the kernel programs (`mesh-ebpf`) with Debian's rustc-web and
//! bpf-linker, so a plain `cargo build` embeds the object in the agent.
//! `cargo xtask setup` installs the toolchain (xtask/src/setup.rs).
use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("mesh-agent has no parent directory"))?
        .join("mesh-ebpf");
    let root_dir = root.to_str().context("non-UTF-8 path to mesh-ebpf")?;
    // aya-ebpf uses `asm_experimental_arch`; scope RUSTC_BOOTSTRAP to it
    // (the value `1` would make aya-build ask for build-std).
    std::env::set_var("RUSTC_BOOTSTRAP", "aya_ebpf");
    aya_build::build_ebpf(
        [Package {
            name: "mesh-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::Custom("/usr"),
    )
    .context("building the kernel programs (run `cargo xtask setup` if the toolchain is missing)")
}
