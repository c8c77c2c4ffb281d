//! The agent's QMP client (the `qapi` crate's async client over the VM's unix socket), with a
//! deadline on every exchange so that a stuck monitor never blocks the agent.

use qapi::futures::{QapiService, QmpStreamTokio};
use std::path::Path;
use std::time::Duration;
use tokio::io::WriteHalf;
use tokio::net::UnixStream;

/// Time for one QMP exchange (connect + negotiate, or one command).
pub const QMP_TIMEOUT: Duration = Duration::from_secs(5);

type Service = QapiService<QmpStreamTokio<WriteHalf<UnixStream>>>;

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

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

fn timed_out(what: &str) -> String {
    format!("QMP {what} got no answer within {QMP_TIMEOUT:?}: the monitor is stuck or QEMU is gone")
}

impl Qmp {
    /// Connects to the monitor at `socket` and negotiates capabilities.
    pub async fn connect(socket: &Path) -> Result<Qmp, String> {
        let connect = async {
            let negotiation = QmpStreamTokio::open_uds(socket)
                .await
                .map_err(|e| format!("connecting to QMP socket {}: {e}", socket.display()))?;
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
        match tokio::time::timeout(deadline, self.service.execute(cmd)).await {
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
