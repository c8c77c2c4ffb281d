//! Which accelerator QEMU gets: KVM where QEMU guests run, TCG elsewhere.
//!
//! `/dev/kvm` alone says little: on KVM-PVM hosts (module `kvm_pvm`, no VMX/SVM in the CPU
//! flags) it opens and accepts ioctls, but a normal QEMU guest hangs at "Booting from ROM".

use std::path::Path;

/// The accelerator and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accel {
    /// `kvm` or `tcg`.
    pub name: &'static str,
    /// Why, for the VM's status.
    pub reason: String,
}

/// Detects the accelerator on this host, reading `sys` (normally `/sys`), `cpuinfo` and `dev`.
pub fn detect_in(sys: &Path, cpuinfo: &str, dev: &Path) -> Accel {
    let tcg = |reason: &str| Accel {
        name: "tcg",
        reason: reason.to_string(),
    };
    if !dev.join("kvm").exists() {
        return tcg("no /dev/kvm on this host: QEMU emulates the CPU (TCG)");
    }
    if sys.join("module/kvm_pvm").exists() {
        return tcg("/dev/kvm is KVM-PVM (module kvm_pvm): QEMU guests hang there, so QEMU emulates the CPU (TCG)");
    }
    let virt = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if !virt {
        return tcg("the CPU has no VMX/SVM: QEMU emulates it (TCG)");
    }
    Accel {
        name: "kvm",
        reason: "/dev/kvm with hardware virtualization (VMX/SVM)".into(),
    }
}

/// Detects the accelerator of this host.
pub fn detect() -> Accel {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    detect_in(Path::new("/sys"), &cpuinfo, Path::new("/dev"))
}

/// The accelerator for a VM asking for `wanted` (`auto`, `kvm`, `tcg`).
pub fn choose(wanted: &str, host: &Accel) -> Result<Accel, String> {
    match wanted {
        "auto" => Ok(host.clone()),
        "tcg" => Ok(Accel {
            name: "tcg",
            reason: "asked for in the VM's spec".into(),
        }),
        "kvm" if host.name == "kvm" => Ok(host.clone()),
        "kvm" => Err(format!(
            "accel \"kvm\" is not usable on this host: {}; use \"auto\" or \"tcg\"",
            host.reason
        )),
        other => Err(format!("accel {other:?}: use \"auto\", \"kvm\" or \"tcg\"")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_and_missing_flags_mean_tcg_and_vmx_means_kvm() {
        let root = tempfile::tempdir().unwrap();
        let (sys, dev) = (root.path().join("sys"), root.path().join("dev"));
        std::fs::create_dir_all(sys.join("module")).unwrap();
        std::fs::create_dir_all(&dev).unwrap();
        let vmx = "flags\t: fpu vmx sse\n";
        assert_eq!(detect_in(&sys, vmx, &dev).name, "tcg", "no /dev/kvm");
        std::fs::write(dev.join("kvm"), b"").unwrap();
        assert_eq!(detect_in(&sys, vmx, &dev).name, "kvm");
        assert_eq!(detect_in(&sys, "flags\t: fpu sse\n", &dev).name, "tcg");
        std::fs::create_dir_all(sys.join("module/kvm_pvm")).unwrap();
        let pvm = detect_in(&sys, vmx, &dev);
        assert_eq!(pvm.name, "tcg");
        assert!(pvm.reason.contains("KVM-PVM"));
        assert!(choose("kvm", &pvm).is_err());
        assert_eq!(choose("auto", &pvm).unwrap().name, "tcg");
        assert!(choose("fast", &pvm).is_err());
    }
}
