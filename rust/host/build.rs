//! Compiles the egress filter (`bpf/egress.bpf.c`) with clang's BPF target; `egress.rs`
//! embeds the object. C rather than Rust for the program: Rust eBPF programs need a
//! nightly toolchain and bpf-linker. `CLANG` names another clang.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let source = "bpf/egress.bpf.c";
    println!("cargo:rerun-if-changed={source}");
    println!("cargo:rerun-if-env-changed=CLANG");
    let out =
        PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("egress.bpf.o");
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());
    // The multiarch include directory holds <asm/types.h>, which <linux/bpf.h> needs; the
    // BPF target does not look there by itself.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let multiarch = format!(
        "/usr/include/{}-linux-gnu",
        if arch == "x86_64" { "x86_64" } else { &arch }
    );
    let status = Command::new(&clang)
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
        .arg(format!("-I{multiarch}"))
        .args(["-c", source, "-o"])
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{clang} could not compile {source} ({s})"),
        Err(e) => panic!(
            "cannot run {clang} to compile {source}: {e}; install clang \
             (scripts/system-packages.txt) or set CLANG"
        ),
    }
}
