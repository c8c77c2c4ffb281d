//! Assembles the built-in KVM guest (guest/workload.S) into a flat binary with binutils.

use std::path::PathBuf;
use std::process::Command;

fn run(cmd: &mut Command) {
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?} (binutils is needed to build the KVM guest): {e}")
    });
    assert!(status.success(), "{cmd:?} failed");
}

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let obj = out.join("workload.o");
    let bin = out.join("workload.bin");
    println!("cargo:rerun-if-changed=guest/workload.S");
    run(Command::new("as")
        .args(["--64", "-o"])
        .arg(&obj)
        .arg("guest/workload.S"));
    run(Command::new("objcopy")
        .args(["-O", "binary"])
        .arg(&obj)
        .arg(&bin));
}
