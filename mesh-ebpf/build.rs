//! Rebuild the kernel object when the linker changes.
fn main() {
    // bpf-linker is found on PATH; a new linker means a new object.
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
