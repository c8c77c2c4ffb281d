//! A private certificate authority for agents: `helio pki init` and `helio pki issue`.
//!
//! Every agent certificate is valid both as a TLS server and as a TLS client, because the same
//! agent dials and listens. It names the agent plus `localhost`, `127.0.0.1` and `::1`, and any
//! extra host names or addresses the operator asks for.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Why a PKI operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// Refusing to overwrite a CA.
    #[error("{0} already holds a CA; refusing to overwrite it (agents issued from it would stop trusting each other)")]
    Exists(PathBuf),
}

fn write_file(path: &Path, data: &str, mode: u32) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.write_all(data.as_bytes()).map_err(io)
}

fn read_file(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn mkdir(dir: &Path) -> Result<(), PkiError> {
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        path: dir.to_path_buf(),
        source,
    })
}

/// Creates a CA in `dir`: `ca.pem` and `ca-key.pem` (mode 0600).
pub fn init_ca(dir: &Path) -> Result<(), PkiError> {
    mkdir(dir)?;
    if dir.join("ca-key.pem").exists() {
        return Err(PkiError::Exists(dir.to_path_buf()));
    }
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "heliotrope agent CA");
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    write_file(&dir.join("ca-key.pem"), &key.serialize_pem(), 0o600)?;
    write_file(&dir.join("ca.pem"), &cert.pem(), 0o644)
}

/// What a certificate's holder may do, carried in its subject's organizational unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Anything: the control API and the replication protocol.
    Operator,
    /// Read everything on the control API; create, cancel and steer jobs. Never the
    /// replication protocol (it cannot read disk data).
    Scheduler,
    /// The replication protocol only, never the control API (a peer agent).
    Agent,
}

impl Role {
    /// Its name in certificates and flags.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Operator => "operator",
            Role::Scheduler => "scheduler",
            Role::Agent => "agent",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "operator" => Ok(Role::Operator),
            "scheduler" => Ok(Role::Scheduler),
            "agent" => Ok(Role::Agent),
            _ => Err(format!("role {s:?}: use operator, scheduler or agent")),
        }
    }
}

/// The role of a (verified) certificate: its subject's OU; a certificate without one is an
/// agent's (certificates issued before roles existed).
pub fn role_of(cert_der: &[u8]) -> Result<Role, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| format!("cannot parse the peer's certificate: {e}"))?;
    let ou = cert
        .subject()
        .iter_organizational_unit()
        .next()
        .map(|a| a.as_str().map_err(|e| format!("certificate OU: {e}")))
        .transpose()?;
    match ou {
        None => Ok(Role::Agent),
        Some(r) => r.parse(),
    }
}

/// Issues an agent certificate named `name` from the CA in `ca_dir` into `out`:
/// `cert.pem`, `key.pem` (0600) and a copy of `ca.pem`.
pub fn issue(
    ca_dir: &Path,
    name: &str,
    out: &Path,
    extra_names: &[String],
) -> Result<(), PkiError> {
    issue_with_role(ca_dir, name, out, extra_names, Role::Agent)
}

/// [`issue`] with a role other than `agent`.
pub fn issue_with_role(
    ca_dir: &Path,
    name: &str,
    out: &Path,
    extra_names: &[String],
    role: Role,
) -> Result<(), PkiError> {
    let ca_pem = read_file(&ca_dir.join("ca.pem"))?;
    let ca_key = KeyPair::from_pem(&read_file(&ca_dir.join("ca-key.pem"))?)?;
    let ca = CertificateParams::from_ca_cert_pem(&ca_pem)?.self_signed(&ca_key)?;

    let mut names: Vec<String> = vec![name.to_string(), "localhost".into()];
    names.extend(extra_names.iter().cloned());
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    for n in &names {
        let san = match n.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(n.clone().try_into()?),
        };
        params.subject_alt_names.push(san);
    }
    for ip in ["127.0.0.1", "::1"] {
        // Invariant: literal addresses parse.
        params
            .subject_alt_names
            .push(SanType::IpAddress(ip.parse().expect("literal IP")));
    }
    params.distinguished_name.push(DnType::CommonName, name);
    params
        .distinguished_name
        .push(DnType::OrganizationalUnitName, role.as_str());
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca, &ca_key)?;
    mkdir(out)?;
    write_file(&out.join("key.pem"), &key.serialize_pem(), 0o600)?;
    write_file(&out.join("cert.pem"), &cert.pem(), 0o644)?;
    write_file(&out.join("ca.pem"), &ca_pem, 0o644)
}
