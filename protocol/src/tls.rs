//! Mutual TLS 1.3 between agents: each side presents a certificate issued by the operator's CA
//! (see [`crate::pki`]) and rejects a peer whose certificate the CA did not sign.
//!
//! A TLS directory holds `cert.pem`, `key.pem` and `ca.pem`, as `helio pki issue` writes them.

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// A TLS directory that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file is missing or unreadable.
    #[error("cannot read {path}: {source} (make it with `helio pki issue`)")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A file holds no usable PEM item.
    #[error("{path} holds no {what}")]
    Empty {
        /// The file.
        path: PathBuf,
        /// What was expected.
        what: &'static str,
    },
    /// rustls rejected the material.
    #[error("TLS material in {dir} is not usable: {detail}")]
    Config {
        /// The directory.
        dir: PathBuf,
        /// rustls's reason.
        detail: String,
    },
}

struct Material {
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: RootCertStore,
}

fn read_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_pem(path)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            path: path.to_path_buf(),
            what: "certificate",
        });
    }
    Ok(certs)
}

fn load(dir: &Path) -> Result<Material, TlsError> {
    let certs_ = certs(&dir.join("cert.pem"))?;
    let key_path = dir.join("key.pem");
    let key_pem = read_pem(&key_path)?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|source| TlsError::Read {
            path: key_path.clone(),
            source,
        })?
        .ok_or(TlsError::Empty {
            path: key_path,
            what: "private key",
        })?;
    let mut roots = RootCertStore::empty();
    for ca in certs(&dir.join("ca.pem"))? {
        roots.add(ca).map_err(|e| TlsError::Config {
            dir: dir.to_path_buf(),
            detail: format!("ca.pem: {e}"),
        })?;
    }
    Ok(Material {
        certs: certs_,
        key,
        roots,
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn config_error(dir: &Path) -> impl Fn(rustls::Error) -> TlsError + '_ {
    move |e| TlsError::Config {
        dir: dir.to_path_buf(),
        detail: e.to_string(),
    }
}

/// The accepting side: requires a client certificate from the CA.
#[derive(Clone)]
pub struct TlsServer {
    acceptor: TlsAcceptor,
}

impl TlsServer {
    /// Loads `cert.pem`, `key.pem`, `ca.pem` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let m = load(dir)?;
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(m.roots), provider())
            .build()
            .map_err(|e| TlsError::Config {
                dir: dir.to_path_buf(),
                detail: e.to_string(),
            })?;
        let config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_error(dir))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(m.certs, m.key)
            .map_err(config_error(dir))?;
        Ok(TlsServer {
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// Runs the server handshake over an already-open stream (NBD's STARTTLS).
    pub async fn accept_io(
        &self,
        io: Box<dyn crate::conn::Io>,
    ) -> io::Result<tokio_rustls::server::TlsStream<Box<dyn crate::conn::Io>>> {
        self.acceptor.accept(io).await
    }

    /// Runs the server handshake; an error names rustls's reason (e.g. an unknown issuer).
    pub async fn accept(
        &self,
        tcp: TcpStream,
    ) -> io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
        self.acceptor.accept(tcp).await
    }
}

/// The connecting side: presents our certificate, trusts only the CA.
#[derive(Clone)]
pub struct TlsClient {
    connector: TlsConnector,
}

impl TlsClient {
    /// Loads `cert.pem`, `key.pem`, `ca.pem` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let m = load(dir)?;
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_error(dir))?
            .with_root_certificates(m.roots)
            .with_client_auth_cert(m.certs, m.key)
            .map_err(config_error(dir))?;
        Ok(TlsClient {
            connector: TlsConnector::from(Arc::new(config)),
        })
    }

    /// Runs the client handshake against `addr` (`HOST:PORT`); the certificate must name HOST.
    pub async fn connect(
        &self,
        addr: &str,
        tcp: TcpStream,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let host = host_of(addr);
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{host}: {e}")))?;
        self.connector.connect(name, tcp).await
    }
}

/// The host part of `HOST:PORT` or `[V6]:PORT`.
pub fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// True when `addr` (`HOST:PORT`) names this machine's loopback, where plain TCP is allowed.
pub fn is_loopback(addr: &str) -> bool {
    let host = host_of(addr);
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_recognised() {
        assert!(is_loopback("127.0.0.1:80"));
        assert!(is_loopback("[::1]:80"));
        assert!(is_loopback("localhost:1"));
        assert!(!is_loopback("0.0.0.0:80"));
        assert!(!is_loopback("10.1.2.3:80"));
        assert_eq!(host_of("[::1]:9"), "::1");
    }
}
