//! Helpers for tests of `helio agent`: start one, call its API with curl (a client we did not
//! write), build the sample guest, and clean up QEMU whatever happens.
#![allow(dead_code)]

use super::{helio_bin, Agent};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// An agent under test: its process and its API socket.
pub struct TestAgent {
    /// The process (prints `listening on ADDR`: the replication listener).
    pub proc: Agent,
    /// The state directory.
    pub state: PathBuf,
    /// `unix:PATH` of its API.
    pub url: String,
}

impl TestAgent {
    /// Starts `helio agent --name NAME --state STATE --listen 127.0.0.1:0 EXTRA...`.
    pub fn start(name: &str, state: &Path, extra: &[&str]) -> TestAgent {
        let log = state.with_extension(format!("log{}", rand::random::<u16>()));
        std::fs::create_dir_all(state).unwrap();
        let mut args = vec!["agent", "--name", name, "--state", state.to_str().unwrap()];
        if !extra.contains(&"--listen") {
            args.extend(["--listen", "127.0.0.1:0"]);
        }
        args.extend_from_slice(extra);
        let proc = Agent::start(&args, &log);
        TestAgent {
            proc,
            state: state.to_path_buf(),
            url: format!("unix:{}", state.join("api.sock").display()),
        }
    }

    /// The API socket.
    pub fn sock(&self) -> PathBuf {
        self.state.join("api.sock")
    }

    /// `curl` METHOD PATH [BODY] on the unix socket: (status, JSON body or string).
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
        curl(
            &["--unix-socket", self.sock().to_str().unwrap()],
            "http://agent",
            method,
            path,
            body,
            &[],
        )
    }

    /// Like [`TestAgent::api`], requiring a status.
    pub fn api_ok(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        want: u16,
    ) -> serde_json::Value {
        let (status, v) = self.api(method, path, body);
        assert_eq!(
            status,
            want,
            "{method} {path} answered {status}: {v}\nagent log:\n{}",
            self.proc.log()
        );
        v
    }
}

/// Runs curl with `conn` options against `base` + `path`; returns (status, body).
pub fn curl(
    conn: &[&str],
    base: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[&str],
) -> (u16, serde_json::Value) {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "90",
        "-X",
        method,
        "-w",
        "\n%{http_code}",
    ])
    .args(conn);
    for h in headers {
        cmd.args(["-H", h]);
    }
    if let Some(b) = body {
        cmd.args(["-H", "content-type: application/json", "--data-binary", b]);
    }
    let out = cmd.arg(format!("{base}{path}")).output().expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
    let status: u16 = code.trim().parse().unwrap_or_else(|_| {
        panic!(
            "curl {method} {path}: no status ({}): {text}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let value =
        serde_json::from_str(body).unwrap_or_else(|_| serde_json::Value::String(body.to_string()));
    (status, value)
}

/// Waits up to `secs` for `cond`, polling every 100 ms; panics with `what`.
pub fn wait_for(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {secs} s waiting for {what}");
}

/// The sample guest (kernel, initrd), built once into target/sample-guest by
/// `scripts/sample-guest`; `None` (and a SKIPPED line) when QEMU or the build is unavailable.
pub fn sample_guest(test: &str) -> Option<(PathBuf, PathBuf)> {
    let qemu = std::env::var("HELIO_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
    if Command::new(&qemu).arg("--version").output().is_err() {
        eprintln!("SKIPPED {test}: {qemu} is not installed (scripts/install-deps --test installs QEMU 10)");
        return None;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let out = helio_bin()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("sample-guest");
    // One build at a time across the test binaries running in parallel.
    let lock = std::fs::File::create(helio_bin().with_file_name("sample-guest.lock")).unwrap();
    let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).ok();
    let built = Command::new("bash")
        .arg(root.join("scripts/sample-guest"))
        .arg(&out)
        .output()
        .expect("run scripts/sample-guest");
    if !built.status.success() {
        eprintln!(
            "SKIPPED {test}: the sample guest could not be built: {}",
            String::from_utf8_lossy(&built.stderr)
        );
        return None;
    }
    Some((out.join("vmlinuz"), out.join("initrd.img")))
}

/// The guest's kernel command line for `disk_rate` records a second.
pub fn guest_cmdline(disk_rate: u32) -> String {
    format!("console=ttyS0 quiet panic=-1 helio.disk=/dev/vda helio.disk_rate={disk_rate}")
}

/// Kills the QEMU of every VM under a state directory when dropped (a failed test must not
/// leave guests running).
pub struct QemuReaper(pub PathBuf);

impl Drop for QemuReaper {
    fn drop(&mut self) {
        let Ok(dirs) = std::fs::read_dir(self.0.join("vms")) else {
            return;
        };
        for d in dirs.flatten() {
            if let Some(pid) = std::fs::read_to_string(d.path().join("qemu.pid"))
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// The last "tick N" and "disk acked SEQ" numbers on a guest's console.
pub fn console(serial: &Path) -> (u64, u64) {
    let text = std::fs::read_to_string(serial).unwrap_or_default();
    let mut tick = 0;
    let mut acked = 0;
    for l in text.lines() {
        if let Some(n) = l
            .strip_prefix("tick ")
            .and_then(|r| r.split_whitespace().next())
        {
            tick = n.parse().unwrap_or(tick);
        }
        if let Some(n) = l.strip_prefix("disk acked ") {
            acked = n.trim().parse().unwrap_or(acked);
        }
    }
    (tick, acked)
}
