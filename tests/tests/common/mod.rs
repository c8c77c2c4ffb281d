//! Helpers for end-to-end tests: run the real `helio` binary, start agents, read their reports.
#![allow(dead_code)]

pub mod agent;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The `helio` binary next to this test executable (built by `cargo build --bins`).
pub fn helio_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile> directory");
    let bin = dir.join("helio");
    assert!(
        bin.exists(),
        "{} not found: run `cargo build --workspace --bins` before the tests",
        bin.display()
    );
    bin
}

/// Runs `helio ARGS` to completion.
pub fn helio(args: &[&str]) -> Output {
    Command::new(helio_bin())
        .args(args)
        .env("HELIO_LOG", "info")
        .output()
        .expect("run helio")
}

/// Runs `helio ARGS`, requiring success; returns stdout.
pub fn helio_ok(args: &[&str]) -> String {
    let out = helio(args);
    assert!(
        out.status.success(),
        "helio {args:?} failed with {}:\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The JSON object on the last line of stdout.
pub fn last_json(stdout: &str) -> serde_json::Value {
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {line:?}"))
}

/// Reads a u64 field of a JSON report.
pub fn field(v: &serde_json::Value, name: &str) -> u64 {
    v[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no numeric field {name} in {v}"))
}

/// A helio process that listens (source, wan-proxy, export), killed when dropped.
pub struct Agent {
    child: Option<Child>,
    /// The address it printed.
    pub addr: String,
    log: PathBuf,
}

impl Agent {
    /// Starts `helio ARGS` and waits (up to 120 s) for its `listening on ADDR` line.
    pub fn start(args: &[&str], log: &Path) -> Agent {
        let stderr = std::fs::File::create(log).expect("log file");
        let mut child = Command::new(helio_bin())
            .args(args)
            .env("HELIO_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn helio");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("listening on ") {
                    let _ = tx.send(addr.trim().to_string());
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(addr) => Agent {
                child: Some(child),
                addr,
                log: log.to_path_buf(),
            },
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "helio {args:?} did not start listening:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
        }
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// Stops it with SIGTERM and returns its log.
    pub fn stop(mut self) -> String {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills it with SIGKILL.
    pub fn kill9(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits up to `secs` for it to exit by itself; its exit status, if it did.
    pub fn wait_exit(&mut self, secs: u64) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + Duration::from_secs(secs);
        while std::time::Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    return Some(status);
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A sample image: `helio sample-image` (random, zero and text regions).
pub fn sample_image(path: &Path, size: &str, seed: u64) {
    helio_ok(&[
        "sample-image",
        "--out",
        path.to_str().unwrap(),
        "--size",
        size,
        "--seed",
        &seed.to_string(),
    ]);
}

/// A copy of `base` with `replace` of its regions rewritten.
pub fn derived_image(base: &Path, path: &Path, replace: f64, seed: u64) {
    helio_ok(&[
        "sample-image",
        "--out",
        path.to_str().unwrap(),
        "--base",
        base.to_str().unwrap(),
        "--replace",
        &replace.to_string(),
        "--seed",
        &seed.to_string(),
    ]);
}

/// Starts a source agent on loopback serving `disks` (path, name).
pub fn source(dir: &Path, disks: &[(&Path, &str)], extra: &[&str]) -> Agent {
    let state = dir.join(format!("state-{}", rand::random::<u32>()));
    let mut args: Vec<String> = vec![
        "source".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--state".into(),
        state.display().to_string(),
    ];
    for (p, n) in disks {
        args.extend([
            "--image".into(),
            p.display().to_string(),
            "--name".into(),
            n.to_string(),
        ]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Agent::start(
        &refs,
        &dir.join(format!("source-{}.log", rand::random::<u32>())),
    )
}

/// True when two files have equal contents, by the system's `cmp`.
pub fn cmp(a: &Path, b: &Path) -> bool {
    Command::new("cmp")
        .arg("-s")
        .arg(a)
        .arg(b)
        .status()
        .expect("run cmp")
        .success()
}

/// Sum of `key=N` fields over the lines of a log.
pub fn sum_log_field(log: &str, key: &str) -> u64 {
    let pat = format!("{key}=");
    log.lines()
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix(&pat)))
        .filter_map(|v| v.trim_matches('"').parse::<u64>().ok())
        .sum()
}

/// The NBD URI of export `name` on unix socket `sock`.
pub fn nbd_uri(sock: &Path, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={}", sock.display())
}

/// Starts `helio export` on a unix socket in `dir`; returns the agent and the socket path.
pub fn export(dir: &Path, store: &Path, name: &str, extra: &[&str]) -> (Agent, PathBuf) {
    let sock = dir.join(format!("{name}-{}.sock", rand::random::<u32>()));
    let nbd = format!("unix:{}", sock.display());
    let mut args = vec![
        "export",
        "--store",
        store.to_str().unwrap(),
        "--name",
        name,
        "--nbd",
        &nbd,
    ];
    args.extend_from_slice(extra);
    let log = dir.join(format!("export-{}.log", rand::random::<u32>()));
    (Agent::start(&args, &log), sock)
}

/// Runs `qemu-io -f raw` with commands against `uri`; returns (success, combined output).
/// qemu-io reports failed commands in its output, so callers check both.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> (bool, String) {
    qemu_io_with(uri, &[], cmds)
}

/// [`qemu_io`] with more of qemu-io's options (e.g. `-d unmap`, without which it sends no
/// TRIM and no WRITE_ZEROES that may unmap).
pub fn qemu_io_with(uri: &str, opts: &[&str], cmds: &[&str]) -> (bool, String) {
    let mut c = Command::new("qemu-io");
    c.arg("-f").arg("raw").args(opts);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    let out = c
        .arg(uri)
        .output()
        .expect("run qemu-io (apt-get install qemu-utils)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let failed = text.contains("failed") || text.contains("error") || text.contains("Error");
    (out.status.success() && !failed, text)
}

/// Runs a command, requiring success; returns stdout.
pub fn run_ok(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `helio status --json` of a running export.
pub fn status(store: &Path, name: &str) -> serde_json::Value {
    last_json(&helio_ok(&[
        "status",
        "--store",
        store.to_str().unwrap(),
        "--name",
        name,
        "--json",
    ]))
}

/// Polls until `helio status` says complete (panics after `secs`).
pub fn wait_complete(store: &Path, name: &str, secs: u64) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Ok(raw) = std::fs::read(store.join("status").join(format!("{name}.json"))) {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&raw) {
                if v["complete"] == serde_json::Value::Bool(true) {
                    return v;
                }
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "export of {name} not complete after {secs} s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A free loopback port (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A source agent that also serves its disk to "the VM" on a unix socket, tracking writes.
/// Returns the agent and the NBD URI. `state` is reused across restarts.
pub fn tracking_source(dir: &Path, img: &Path, state: &Path, listen: &str) -> (Agent, String) {
    let sock = dir.join(format!("vm-{}.sock", rand::random::<u32>()));
    let nbd = format!("unix:{}", sock.display());
    let agent = Agent::start(
        &[
            "source",
            "--listen",
            listen,
            "--state",
            state.to_str().unwrap(),
            "--image",
            img.to_str().unwrap(),
            "--name",
            "a",
            "--nbd",
            &nbd,
        ],
        &dir.join(format!("tsrc-{}.log", rand::random::<u32>())),
    );
    (agent, nbd_uri(&sock, "a"))
}

/// The arguments of `helio seed` of disk `name` from `from` into `store`, then `extra`.
pub fn seed_args<'a>(
    from: &'a str,
    name: &'a str,
    store: &'a Path,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "seed",
        "--from",
        from,
        "--name",
        name,
        "--store",
        store.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    args
}

/// `helio seed --json` with `extra` arguments, required to succeed; returns the report.
pub fn seed_json(from: &str, name: &str, store: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = seed_args(from, name, store, extra);
    args.push("--json");
    last_json(&helio_ok(&args))
}

/// A temporary directory with a sample image `a.img` of `size`, served as disk `a` by a
/// source agent: the setup most tests start from. (Drop order: the agent, then the directory.)
pub fn served_sample(size: &str, seed: u64) -> (tempfile::TempDir, PathBuf, Agent) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.img");
    sample_image(&img, size, seed);
    let src = source(dir.path(), &[(&img, "a")], &[]);
    (dir, img, src)
}

/// `helio seed --json` of disk `name` from `from` into `store`; returns the report.
pub fn seed_into(from: &str, name: &str, store: &Path) -> serde_json::Value {
    seed_json(from, name, store, &[])
}

/// `helio wan-proxy` in front of `to`, with link options `extra` (`--rtt`, `--bandwidth`,
/// `--corrupt-every`); logs to `log`.
pub fn wan_proxy(to: &str, extra: &[&str], log: &Path) -> Agent {
    let mut args = vec!["wan-proxy", "--listen", "127.0.0.1:0", "--to", to];
    args.extend_from_slice(extra);
    Agent::start(&args, log)
}

/// `helio materialize` of disk `name` of `store` into `out`.
pub fn materialize(store: &Path, name: &str, out: &Path) {
    helio_ok(&[
        "materialize",
        "--store",
        store.to_str().unwrap(),
        "--name",
        name,
        "--out",
        out.to_str().unwrap(),
    ]);
}

/// Reads a whole NBD export into a raw file with qemu-img (a client we did not write).
pub fn read_export(uri: &str, out: &Path) {
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            uri,
            out.to_str().unwrap(),
        ],
    );
}

/// `helio verify --image`: disk `name` of `store` must equal `img`, byte for byte.
pub fn verify_equal(store: &Path, name: &str, img: &Path) {
    helio_ok(&[
        "verify",
        "--store",
        store.to_str().unwrap(),
        "--name",
        name,
        "--image",
        img.to_str().unwrap(),
    ]);
}

/// A tmpfs mounted for a test, unmounted when dropped.
pub struct Mount(pub PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Mounts a tmpfs of `size` (e.g. `56M`) at `dir/small`; `None` (after saying that `test` is
/// skipped) where mounting needs privileges this process lacks.
pub fn small_volume(dir: &Path, size: &str, test: &str) -> Option<Mount> {
    let mnt = dir.join("small");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("SKIPPED {test}: cannot mount a tmpfs here (needs root)");
        return None;
    }
    Some(Mount(mnt))
}

/// Chunks of disk `name` in `store` recorded with data.
pub fn data_chunks(store: &Path, name: &str) -> usize {
    let s = blockstore::Store::open(store).unwrap();
    let states = s.replica(name).unwrap().states().unwrap();
    states
        .iter()
        .filter(|st| matches!(st, Some(blockstore::ChunkState::Data(_))))
        .count()
}
