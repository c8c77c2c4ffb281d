//! One module per subcommand.

pub mod agent;
pub mod args;
pub mod demo;
mod demo_vm;
mod demo_watch;
mod execute;
pub mod export;
pub mod job;
pub mod materialize;
pub mod memory;
pub mod migrate;
pub mod pki;
pub mod plan;
pub mod predict;
pub mod remote;
pub mod sample_image;
pub mod seed;
pub mod simulate;
pub mod source;
pub mod status;
pub mod sync;
pub mod verify;
pub mod vm;
pub mod wan_proxy;

use std::path::Path;

/// Loads TLS client material from `--tls DIR`, if given.
pub fn tls_client(dir: Option<&Path>) -> anyhow::Result<Option<protocol::tls::TlsClient>> {
    dir.map(protocol::tls::TlsClient::load)
        .transpose()
        .map_err(Into::into)
}

/// Loads TLS server material from `--tls DIR`, if given.
pub fn tls_server(dir: Option<&Path>) -> anyhow::Result<Option<protocol::tls::TlsServer>> {
    dir.map(protocol::tls::TlsServer::load)
        .transpose()
        .map_err(Into::into)
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn interrupted() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// A token cancelled on Ctrl-C or SIGTERM, and the task watching for them (abort it when done).
pub fn cancel_on_interrupt() -> (
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let cancel = tokio_util::sync::CancellationToken::new();
    let watcher = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            interrupted().await;
            cancel.cancel();
        })
    };
    (cancel, watcher)
}

/// Prints a report: one JSON object as the last line of stdout with `--json`, else for people.
pub fn print<T: serde::Serialize>(
    json: bool,
    report: &T,
    human: impl Fn(&T),
) -> anyhow::Result<i32> {
    if json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        human(report);
    }
    Ok(0)
}
