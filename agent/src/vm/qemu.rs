//! Starting QEMU for a VM: its command line, its files, and whether its process lives.
//!
//! QEMU runs in its own session (it survives the agent), with a pidfile, a QMP socket and a
//! serial log in the VM's directory, and its stderr in `qemu.log` (its last words if it dies).
//! Each disk is an NBD client of the agent's tracking export with `reconnect-delay`: while the
//! agent restarts, the guest's I/O waits instead of failing.

use crate::model::VmSpec;
use std::path::{Path, PathBuf};
use std::process::Stdio;

/// Seconds QEMU holds a disk's I/O while the agent's NBD export is away (an agent restart).
pub const RECONNECT_DELAY_S: u32 = 300;
/// The QEMU binary, overridable for tests (`HELIO_QEMU`).
pub fn binary() -> String {
    std::env::var("HELIO_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into())
}

/// A VM's files.
#[derive(Debug, Clone)]
pub struct VmDir {
    /// The directory.
    pub dir: PathBuf,
}

impl VmDir {
    /// The QMP socket.
    pub fn qmp(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    /// The serial console log.
    pub fn serial(&self) -> PathBuf {
        self.dir.join("serial.log")
    }
    /// QEMU's stderr.
    pub fn log(&self) -> PathBuf {
        self.dir.join("qemu.log")
    }
    /// QEMU's pidfile.
    pub fn pidfile(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }
}

/// QEMU's arguments for `spec` with accelerator `accel`, disk `i` on the NBD socket `nbd[i]`
/// (the export named as the disk).
pub fn args(spec: &VmSpec, accel: &str, dir: &VmDir, nbd: &[PathBuf]) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "-name".into(),
        format!("{},process=helio-vm-{}", spec.name, spec.name),
        "-machine".into(),
        "q35".into(),
        "-accel".into(),
        accel.into(),
        "-m".into(),
        spec.memory_mib.to_string(),
        "-smp".into(),
        spec.vcpus.to_string(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-chardev".into(),
        format!(
            "socket,id=qmp,path={},server=on,wait=off",
            dir.qmp().display()
        ),
        "-mon".into(),
        "chardev=qmp,mode=control".into(),
        "-chardev".into(),
        format!("file,id=serial0,path={},append=on", dir.serial().display()),
        "-serial".into(),
        "chardev:serial0".into(),
        "-pidfile".into(),
        dir.pidfile().display().to_string(),
    ];
    if let Some(k) = &spec.boot.kernel {
        a.extend(["-kernel".into(), k.clone()]);
        if let Some(i) = &spec.boot.initrd {
            a.extend(["-initrd".into(), i.clone()]);
        }
        if let Some(c) = &spec.boot.cmdline {
            a.extend(["-append".into(), c.clone()]);
        }
    }
    for ((i, disk), nbd) in spec.disks.iter().enumerate().zip(nbd) {
        let node = serde_json::json!({
            "driver": "nbd",
            "node-name": format!("disk{i}"),
            "server": {"type": "unix", "path": nbd.display().to_string()},
            "export": disk,
            "reconnect-delay": RECONNECT_DELAY_S,
        });
        a.extend(["-blockdev".into(), node.to_string()]);
        a.extend([
            "-device".into(),
            format!("virtio-blk-pci,drive=disk{i},id=vd{i},serial={disk}"),
        ]);
    }
    for (i, nic) in spec.nics.iter().enumerate() {
        let netdev = match nic.network.strip_prefix("tap:") {
            Some(ifname) => format!("tap,id=net{i},ifname={ifname},script=no,downscript=no"),
            None => format!("user,id=net{i}"),
        };
        a.extend(["-netdev".into(), netdev]);
        let mut dev = format!("virtio-net-pci,netdev=net{i},id=nic{i}");
        if let Some(mac) = &nic.mac {
            dev.push_str(&format!(",mac={mac}"));
        }
        a.extend(["-device".into(), dev]);
    }
    a.extend(spec.qemu_args.iter().cloned());
    a
}

/// Checks a NIC's network and MAC before QEMU sees them (QEMU's own message would name an
/// option the client never wrote).
pub fn check_nic(nic: &crate::model::NicSpec) -> Result<(), String> {
    let net_ok = nic.network == "user"
        || nic
            .network
            .strip_prefix("tap:")
            .is_some_and(|i| protocol::check_name("interface", i).is_ok() && i.len() < 16);
    if !net_ok {
        return Err(format!(
            "network {:?}: use \"user\" or \"tap:IFNAME\" (an existing TAP device)",
            nic.network
        ));
    }
    if let Some(mac) = &nic.mac {
        let parts: Vec<&str> = mac.split(':').collect();
        let ok = parts.len() == 6
            && parts
                .iter()
                .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()));
        if !ok {
            return Err(format!(
                "mac {mac:?}: use six hex pairs, e.g. 52:54:00:12:34:56"
            ));
        }
    }
    Ok(())
}

/// Starts QEMU in its own session; returns its pid once its QMP socket exists, or its
/// stderr when it exits (or takes more than `wait` to come up).
pub async fn spawn(args: &[String], dir: &VmDir, wait: std::time::Duration) -> Result<u32, String> {
    let _ = std::fs::remove_file(dir.qmp());
    let _ = std::fs::remove_file(dir.pidfile());
    let log = std::fs::File::create(dir.log())
        .map_err(|e| format!("creating {}: {e}", dir.log().display()))?;
    let log2 = log
        .try_clone()
        .map_err(|e| format!("opening {}: {e}", dir.log().display()))?;
    let mut cmd = tokio::process::Command::new(binary());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0)
        .kill_on_drop(false);
    let mut child = cmd.spawn().map_err(|e| {
        format!(
            "cannot run {}: {e} (install it with scripts/install-deps --test)",
            binary()
        )
    })?;
    let pid = child.id().unwrap_or(0);
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "QEMU exited at start ({status}): {}",
                tail(&dir.log(), 2000).trim()
            ));
        }
        if dir.qmp().exists() {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            let _ = child.start_kill();
            return Err(format!(
                "QEMU did not open its monitor within {wait:?}; killed it. Its output: {}",
                tail(&dir.log(), 2000).trim()
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Reap it when it exits, so that it does not linger as a zombie the liveness check would
    // take for alive. If the agent dies first, init adopts and reaps it.
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    Ok(pid)
}

/// Kills QEMU `pid` at once (SIGKILL); the caller has checked with `alive` that it is this
/// VM's. A QEMU already gone is no error.
pub fn kill(pid: u32) -> std::io::Result<()> {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .map_err(std::io::Error::from)
}

/// Whether `pid` is a live QEMU of this VM (its command line names the VM's QMP socket, so a
/// reused pid is not mistaken for it).
pub fn alive(pid: u32, dir: &VmDir) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, r)| r.split_whitespace().next());
    if matches!(state, Some("Z") | Some("X")) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let qmp = dir.qmp().display().to_string();
    cmdline
        .split(|b| *b == 0)
        .any(|arg| std::str::from_utf8(arg).is_ok_and(|a| a.contains(&qmp)))
}

/// The pid in the VM's pidfile.
pub fn read_pid(dir: &VmDir) -> Option<u32> {
    std::fs::read_to_string(dir.pidfile())
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The last `max` bytes of a file (lossy UTF-8), or "" when it cannot be read.
pub fn tail(path: &Path, max: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = f.take(max).read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// What QEMU said before it died: the end of its stderr and of the serial console.
pub fn last_words(dir: &VmDir) -> String {
    let stderr = tail(&dir.log(), 1500);
    let console = tail(&dir.serial(), 600);
    let console: Vec<&str> = console.lines().rev().take(5).collect();
    format!(
        "QEMU stderr: {} | console: {}",
        if stderr.trim().is_empty() {
            "(nothing)"
        } else {
            stderr.trim()
        },
        console.into_iter().rev().collect::<Vec<_>>().join(" / ")
    )
}
