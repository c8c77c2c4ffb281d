//! Where an NBD export listens: `unix:PATH` (created mode 0600) or `HOST:PORT`.

use super::device::Device;
use super::handshake::{negotiate, Export};
use super::transmission::serve;
use crate::listen::{self, ListenError};
use protocol::conn::Io;
use protocol::tls::{is_loopback, TlsServer};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::net::{TcpListener, UnixListener};

/// An NBD listening address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NbdAddr {
    /// A unix socket path.
    Unix(PathBuf),
    /// `HOST:PORT`.
    Tcp(String),
}

impl std::str::FromStr for NbdAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.strip_prefix("unix:") {
            Some("") => Err("unix: needs a socket path, e.g. unix:/run/helio/web-01.sock".into()),
            Some(p) => Ok(NbdAddr::Unix(PathBuf::from(p))),
            None if s.contains(':') => Ok(NbdAddr::Tcp(s.to_string())),
            None => Err(format!("{s:?}: expected unix:PATH or HOST:PORT")),
        }
    }
}

/// Exports that can change while a listener serves them.
pub type SharedExports<D> = Arc<std::sync::RwLock<Vec<Export<D>>>>;

/// A bound NBD listener.
pub enum NbdListener {
    /// Unix socket.
    Unix(UnixListener, PathBuf),
    /// TCP.
    Tcp(TcpListener),
}

impl NbdListener {
    /// Binds; a TCP address off loopback needs TLS (clients then use STARTTLS).
    pub async fn bind(addr: &NbdAddr, tls: bool) -> Result<NbdListener, ListenError> {
        let bind_err = |source| ListenError::Bind {
            addr: format!("{addr:?}"),
            source,
        };
        match addr {
            NbdAddr::Unix(path) => Ok(NbdListener::Unix(
                listen::bind_unix_private(path).map_err(bind_err)?,
                path.clone(),
            )),
            NbdAddr::Tcp(a) => {
                if !tls && !is_loopback(a) {
                    return Err(ListenError::NeedsTls(a.clone()));
                }
                Ok(NbdListener::Tcp(
                    TcpListener::bind(a).await.map_err(bind_err)?,
                ))
            }
        }
    }

    /// What clients dial: `unix:PATH` or the bound `HOST:PORT`.
    pub fn describe(&self) -> String {
        match self {
            NbdListener::Unix(_, p) => format!("unix:{}", p.display()),
            NbdListener::Tcp(l) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        }
    }

    async fn accept(&self) -> std::io::Result<(Box<dyn Io>, String)> {
        match self {
            NbdListener::Unix(l, p) => {
                let (s, _) = l.accept().await?;
                Ok((Box::new(s), format!("unix:{}", p.display())))
            }
            NbdListener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok((Box::new(s), peer.to_string()))
            }
        }
    }

    /// Serves `exports` until the task is dropped.
    pub async fn run<D: Device>(self, exports: Vec<Export<D>>, tls: Option<TlsServer>) {
        self.run_shared(Arc::new(std::sync::RwLock::new(exports)), tls)
            .await
    }

    /// Serves the exports in `exports`, which the caller may change while serving (a client
    /// negotiates against the list as it is when it connects).
    pub async fn run_shared<D: Device>(self, exports: SharedExports<D>, tls: Option<TlsServer>) {
        let tls = tls.map(Arc::new);
        let slots = Arc::new(tokio::sync::Semaphore::new(listen::MAX_CONNECTIONS));
        loop {
            let (io, peer) = match self.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "NBD accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(slot) = listen::admit(&slots, &peer, "NBD") else {
                continue;
            };
            // Poisoned only if a writer panicked mid-push; the list is still a list.
            let exports = exports.read().unwrap_or_else(|p| p.into_inner()).clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let _slot = slot;
                // A client has the handshake's time to negotiate; once transmitting it may stay
                // idle for as long as it likes (a VM's disk often is).
                let negotiated = tokio::time::timeout(
                    listen::HANDSHAKE_TIMEOUT,
                    negotiate(io, &exports, tls.as_deref(), &peer),
                );
                let Ok(negotiated) = negotiated.await else {
                    tracing::warn!(%peer, "dropped an NBD client that did not negotiate in time");
                    return;
                };
                match negotiated {
                    Ok(Some(neg)) => {
                        tracing::debug!(%peer, export = %neg.export.name, structured = neg.structured, "NBD client connected");
                        if let Err(e) = serve(neg, peer.clone()).await {
                            tracing::debug!(%peer, error = %e, "NBD connection ended");
                        }
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(%peer, error = %e, "NBD negotiation failed"),
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse() {
        assert_eq!(
            "unix:/tmp/x.sock".parse::<NbdAddr>(),
            Ok(NbdAddr::Unix("/tmp/x.sock".into()))
        );
        assert_eq!(
            "127.0.0.1:10809".parse::<NbdAddr>(),
            Ok(NbdAddr::Tcp("127.0.0.1:10809".into()))
        );
        assert!("unix:".parse::<NbdAddr>().is_err());
        assert!("nonsense".parse::<NbdAddr>().is_err());
    }
}
