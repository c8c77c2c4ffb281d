//! `helio pki`: a CA for agents, and certificates issued from it.

use std::path::{Path, PathBuf};

/// `helio pki` subcommands.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Create a CA in DIR (ca.pem, ca-key.pem).
    Init {
        /// Directory for the CA.
        dir: PathBuf,
    },
    /// Issue an agent certificate (cert.pem, key.pem, ca.pem) into --out.
    Issue {
        /// The CA directory.
        #[arg(long)]
        ca: PathBuf,
        /// The agent's name (also a DNS name in the certificate).
        #[arg(long)]
        name: String,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Extra host names or IP addresses the certificate is valid for.
        #[arg(long)]
        san: Vec<String>,
        /// What the holder may do: `agent` (the replication protocol only), `scheduler` (read
        /// the control API, create and cancel jobs) or `operator` (anything).
        #[arg(long, default_value = "agent")]
        role: protocol::pki::Role,
    },
}

pub fn run(c: Command) -> anyhow::Result<i32> {
    match c {
        Command::Init { dir } => {
            protocol::pki::init_ca(&dir)?;
            println!("CA created in {}", dir.display());
        }
        Command::Issue {
            ca,
            name,
            out,
            san,
            role,
        } => {
            protocol::pki::issue_with_role(&ca, &name, &out, &san, role)?;
            println!(
                "certificate for {name} (role {}) written to {}",
                role.as_str(),
                out.display()
            );
        }
    }
    Ok(0)
}

/// The demos' certificates: a CA in `DIR/ca` (kept if there), `DIR/source` and
/// `DIR/destination` (both also named localhost, where the demos' agents meet).
pub fn demo_pki(dir: &Path) -> anyhow::Result<()> {
    let ca = dir.join("ca");
    if !ca.join("ca-key.pem").exists() {
        protocol::pki::init_ca(&ca)?;
    }
    protocol::pki::issue(&ca, "source", &dir.join("source"), &[])?;
    protocol::pki::issue(&ca, "destination", &dir.join("destination"), &[])?;
    Ok(())
}
