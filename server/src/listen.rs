//! Accepting agent connections: TLS when configured, and plain TCP only on loopback.

use protocol::conn::Io;
use protocol::tls::{is_loopback, TlsServer};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

/// Time a peer has to finish TLS and the hello (or the NBD negotiation) after connecting.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A replication peer silent this long between requests is disconnected (its next request
/// dials again).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Connections served at once by one listener; more are refused (closed at once, logged).
pub const MAX_CONNECTIONS: usize = 256;

/// A slot among a listener's [`MAX_CONNECTIONS`], or `None` (logged) when all are taken.
pub fn admit(
    slots: &Arc<tokio::sync::Semaphore>,
    peer: &str,
    what: &str,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    let permit = slots.clone().try_acquire_owned().ok();
    if permit.is_none() {
        tracing::warn!(%peer, limit = MAX_CONNECTIONS,
            "refusing a {what} connection: the listener serves its limit already");
    }
    permit
}

/// Binds a unix socket that only this user can use (mode 0600), replacing a stale socket left
/// by a killed process. It is bound under a temporary name and restricted before it is renamed
/// into place, so it is never reachable with looser permissions.
pub fn bind_unix_private(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)?;
        }
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let l = tokio::net::UnixListener::bind(&tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&tmp, path)?;
    Ok(l)
}

/// The role of the client certificate of a TLS connection (none presented: an error).
pub fn peer_role<S>(
    conn: &tokio_rustls::server::TlsStream<S>,
) -> Result<protocol::pki::Role, String> {
    conn.get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| protocol::pki::role_of(c))
        .unwrap_or_else(|| Err("no client certificate".into()))
}

/// Why an agent cannot listen.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// Plain TCP on a reachable address.
    #[error("refusing to listen on {0} without --tls: plain TCP is only allowed on loopback (make certificates with `helio pki`)")]
    NeedsTls(String),
    /// Bind failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// A listening socket that yields authenticated byte streams.
pub struct Acceptor {
    listener: TcpListener,
    tls: Option<TlsServer>,
}

impl Acceptor {
    /// Binds `addr`; without `tls` only a loopback address is accepted.
    pub async fn bind(addr: &str, tls: Option<TlsServer>) -> Result<Acceptor, ListenError> {
        if tls.is_none() {
            if !is_loopback(addr) {
                return Err(ListenError::NeedsTls(addr.to_string()));
            }
            tracing::warn!(%addr, "listening without TLS: peers are not authenticated and data is not encrypted (loopback only)");
        }
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ListenError::Bind {
                addr: addr.to_string(),
                source,
            })?;
        Ok(Acceptor { listener, tls })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Waits for the next TCP connection (the TLS handshake is left to [`Acceptor::secure`], so
    /// that a slow peer cannot stall the accept loop).
    pub async fn accept(&self) -> std::io::Result<(TcpStream, SocketAddr)> {
        let (tcp, peer) = self.listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        Ok((tcp, peer))
    }

    /// Runs TLS on an accepted connection when configured; a refused peer is logged with the reason.
    pub async fn secure(&self, tcp: TcpStream, peer: SocketAddr) -> Option<Box<dyn Io>> {
        match &self.tls {
            None => Some(Box::new(tcp)),
            Some(tls) => match tls.accept(tcp).await {
                Ok(s) => {
                    // Replication reads disk data: agents and operators only.
                    let role = peer_role(&s);
                    match role {
                        Ok(protocol::pki::Role::Agent | protocol::pki::Role::Operator) => {
                            Some(Box::new(s))
                        }
                        Ok(r) => {
                            tracing::warn!(%peer, role = r.as_str(), "rejected peer: its certificate's role may not use the replication protocol");
                            None
                        }
                        Err(e) => {
                            tracing::warn!(%peer, error = %e, "rejected peer");
                            None
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "rejected peer: TLS handshake failed");
                    None
                }
            },
        }
    }

    /// A clone of the TLS configuration, for tasks that secure connections themselves.
    pub fn tls(&self) -> Option<TlsServer> {
        self.tls.clone()
    }
}
