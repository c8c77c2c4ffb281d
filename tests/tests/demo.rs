//! The README's first command: `helio demo` tells the whole story on the sample guest (two
//! agents behind emulated WAN links, a VM pre-seeded, moved, and moved back) and exits 0 only
//! when the tick sequence ran on and no record was lost.

mod common;

use common::agent::{sample_guest, QemuReaper};
use common::helio_bin;

#[test]
fn the_demo_moves_the_sample_guest_there_and_back() {
    if sample_guest("the_demo").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _reapers = (
        QemuReaper(dir.path().join("a")),
        QemuReaper(dir.path().join("b")),
    );
    let out = std::process::Command::new(helio_bin())
        .args(["demo", "--dir", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the demo failed");
    for want in [
        "pre-seeded both disks to B",
        "running_at_destination",
        "tick sequence continuous",
        "the way back moved",
        "0 corrupt",
        "demo OK",
    ] {
        assert!(stdout.contains(want), "the demo did not say {want:?}");
    }
}
