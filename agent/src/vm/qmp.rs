//! The agent's QMP client (the `qapi` crate's async client over the VM's unix socket), with a
//! deadline on every exchange so that a stuck monitor never blocks the agent.

use qapi::futures::{QapiService, QmpStreamTokio};
use std::path::Path;
use std::time::Duration;
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::UnixStream;

/// Time for one QMP exchange (connect + negotiate, or one command).
pub const QMP_TIMEOUT: Duration = Duration::from_secs(5);

type Service = QapiService<QmpStreamTokio<WriteHalf<UnixStream>>>;
type Negotiation = qapi::futures::QmpStreamNegotiation<
    QmpStreamTokio<ReadHalf<UnixStream>>,
    QmpStreamTokio<WriteHalf<UnixStream>>,
>;

/// A negotiated QMP connection.
pub struct Qmp {
    service: Service,
    reader: tokio::task::JoinHandle<()>,
    /// One command at a time: without QMP's out-of-band capability the `qapi` client gives
    /// every command the same id, and two in flight make it panic.
    one: tokio::sync::Mutex<()>,
    /// A command timed out: its answer may still come and would be taken for the next
    /// command's; the connection is not used again.
    broken: std::sync::atomic::AtomicBool,
}

/// Marks the connection broken when dropped: armed while a command is in flight and forgotten
/// once its answer (or its timeout) is in hand.
struct InFlight<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

fn timed_out(what: &str) -> String {
    format!("QMP {what} got no answer within {QMP_TIMEOUT:?}: the monitor is stuck or QEMU is gone")
}

/// Opens the monitor's socket. QEMU's monitor takes one client at a time and its listen
/// backlog is tiny: while an earlier connection is being closed (one dropped after a timeout)
/// a connect fails with `EAGAIN`; try again until [`QMP_TIMEOUT`] (the caller's deadline).
async fn open(socket: &Path) -> Result<Negotiation, String> {
    loop {
        match QmpStreamTokio::open_uds(socket).await {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Err(e) => {
                return Err(format!(
                    "connecting to QMP socket {}: {e}",
                    socket.display()
                ))
            }
        }
    }
}

impl Qmp {
    /// Connects to the monitor at `socket` and negotiates capabilities.
    pub async fn connect(socket: &Path) -> Result<Qmp, String> {
        let connect = async {
            let negotiation = open(socket).await?;
            negotiation
                .negotiate()
                .await
                .map_err(|e| format!("negotiating QMP on {}: {e}", socket.display()))
        };
        let stream = tokio::time::timeout(QMP_TIMEOUT, connect)
            .await
            .map_err(|_| timed_out("connect"))??;
        let (service, reader) = stream.spawn_tokio();
        Ok(Qmp {
            service,
            reader,
            one: tokio::sync::Mutex::new(()),
            broken: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Runs `cmd` with the deadline; after a timeout the connection is broken for good.
    pub async fn run<C: qapi::qmp::QmpCommand>(&self, name: &str, cmd: C) -> Result<C::Ok, String> {
        self.run_within(name, cmd, QMP_TIMEOUT).await
    }

    /// [`Qmp::run`] with another deadline: during a migration's final stop-and-copy QEMU holds
    /// its main lock and answers only once the device state is sent (seconds, for a warm move
    /// of a large memory).
    pub async fn run_within<C: qapi::qmp::QmpCommand>(
        &self,
        name: &str,
        cmd: C,
        deadline: Duration,
    ) -> Result<C::Ok, String> {
        use std::sync::atomic::Ordering;
        let _one = self.one.lock().await;
        if self.broken.load(Ordering::SeqCst) {
            return Err(format!("QMP {name}: the monitor connection is broken (an earlier command timed out); reconnect"));
        }
        // Until the answer arrives the connection counts as broken: a caller that drops this
        // future (a cancelled migration's `select!`) leaves the command pending inside `qapi`,
        // and the next command, given the same id, would make `qapi` panic.
        let in_flight = InFlight(&self.broken);
        let answer = tokio::time::timeout(deadline, self.service.execute(cmd)).await;
        std::mem::forget(in_flight);
        match answer {
            Err(_) => {
                self.broken.store(true, Ordering::SeqCst);
                Err(format!("QMP {name} got no answer within {deadline:?}: the monitor is stuck or QEMU is gone"))
            }
            Ok(Err(e)) => Err(format!("QMP {name}: {e}")),
            Ok(Ok(v)) => Ok(v),
        }
    }

    /// Whether the connection may still be used.
    pub fn usable(&self) -> bool {
        !self.broken.load(std::sync::atomic::Ordering::SeqCst) && !self.reader.is_finished()
    }

    /// QEMU's run state (`running`, `paused`, `inmigrate`, `postmigrate`, ...).
    pub async fn status(&self) -> Result<String, String> {
        let info = self.run("query-status", qapi::qmp::query_status {}).await?;
        Ok(serde_json::to_value(info.status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_else(|| "unknown".into()))
    }

    /// Pauses the guest's vCPUs (QMP `stop`).
    pub async fn pause(&self) -> Result<(), String> {
        self.run("stop", qapi::qmp::stop {}).await.map(|_| ())
    }

    /// Resumes a paused guest (QMP `cont`).
    pub async fn resume(&self) -> Result<(), String> {
        self.run("cont", qapi::qmp::cont {}).await.map(|_| ())
    }

    /// Asks QEMU to exit (it flushes its block devices first).
    pub async fn quit(&self) -> Result<(), String> {
        self.run("quit", qapi::qmp::quit {}).await.map(|_| ())
    }
}

/// QMP commands whose arguments and answers the agent handles as JSON: the migration commands,
/// whose schema changed across QEMU releases more than `qapi-qmp`'s generated types follow
/// (QEMU 10's `query-migrate` answers with fields the 0.15 types do not have).
macro_rules! json_command {
    ($t:ident, $name:literal) => {
        #[doc = concat!("`", $name, "` with JSON arguments.")]
        #[derive(serde::Serialize)]
        #[serde(transparent)]
        pub struct $t(pub serde_json::Value);
        impl qapi::Command for $t {
            type Ok = serde_json::Value;
            const NAME: &'static str = $name;
            const ALLOW_OOB: bool = false;
        }
        impl qapi::qmp::QmpCommand for $t {}
    };
}

json_command!(MigrateSetCapabilities, "migrate-set-capabilities");
json_command!(MigrateSetParameters, "migrate-set-parameters");
json_command!(Migrate, "migrate");
json_command!(MigrateIncoming, "migrate-incoming");
json_command!(MigrateContinue, "migrate-continue");
json_command!(MigrateCancel, "migrate_cancel");
json_command!(MigrateStartPostcopy, "migrate-start-postcopy");
json_command!(QueryMigrate, "query-migrate");

/// Deadline of the commands a migration polls with (see [`Qmp::run_within`]).
pub const MIGRATION_QMP_TIMEOUT: Duration = Duration::from_secs(120);
json_command!(CalcDirtyRate, "calc-dirty-rate");
json_command!(QueryDirtyRate, "query-dirty-rate");

impl Qmp {
    /// Runs a JSON command (see [`json_command`]).
    pub async fn json<C: qapi::qmp::QmpCommand<Ok = serde_json::Value>>(
        &self,
        cmd: C,
    ) -> Result<serde_json::Value, String> {
        self.run(C::NAME, cmd).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    /// A monitor that negotiates, then reads commands and never answers them.
    async fn silent_monitor(socket: &Path) -> tokio::task::JoinHandle<()> {
        let listener = tokio::net::UnixListener::bind(socket).expect("bind the test QMP socket");
        tokio::spawn(async move {
            let Ok((conn, _)) = listener.accept().await else {
                return;
            };
            let (r, mut w) = tokio::io::split(conn);
            let greeting = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10}, "package": ""}, "capabilities": []}}"#;
            let _ = w.write_all(format!("{greeting}\n").as_bytes()).await;
            let mut lines = BufReader::new(r).lines();
            let _ = lines.next_line().await; // qmp_capabilities
            let _ = w.write_all(b"{\"return\": {}}\n").await;
            while let Ok(Some(_)) = lines.next_line().await {}
        })
    }

    #[tokio::test]
    async fn a_command_dropped_in_flight_breaks_the_connection_instead_of_panicking_the_next() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let socket = dir.path().join("qmp.sock");
        let server = silent_monitor(&socket).await;
        let qmp = Qmp::connect(&socket)
            .await
            .expect("negotiate with the test monitor");
        // The caller gives up (as a cancelled migration's `select!` does) before any answer.
        let dropped = tokio::time::timeout(Duration::from_millis(100), qmp.status()).await;
        assert!(dropped.is_err(), "the silent monitor answered");
        assert!(
            !qmp.usable(),
            "a connection with a command left pending must not be reused"
        );
        let next = qmp
            .status()
            .await
            .expect_err("a broken connection must refuse commands");
        assert!(next.contains("broken"), "{next}");
        server.abort();
    }
}
