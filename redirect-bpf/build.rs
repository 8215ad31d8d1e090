//! Embeds the eBPF object that `cargo xtask build-ebpf` (stable-side build: nightly is
//! used only there) wrote under `target/bpf`. When it is missing, an empty object is
//! embedded so that the stable workspace still checks and builds; loading then fails with
//! `Error::ObjectMissing`, which names the command to run.

use std::path::PathBuf;
use std::{env, fs};

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let object = env::var_os("WARD_BPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../target/bpf/bpfel-unknown-none/release/ward-redirect"));
    println!("cargo:rerun-if-env-changed=WARD_BPF_OBJECT");
    println!("cargo:rerun-if-changed={}", object.display());
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap_or_default()).join("ward-redirect.o");
    let bytes = fs::read(&object).unwrap_or_default();
    if let Err(e) = fs::write(&out, bytes) {
        panic!("cannot write {}: {e}", out.display());
    }
}
