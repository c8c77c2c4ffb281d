//! Acting through an agent: `--agent URL` (or `HELIO_AGENT`) and the client it makes.

use agent::client::ApiClient;
use std::path::PathBuf;

/// How the CLI reaches an agent.
#[derive(clap::Args, Clone)]
pub struct AgentArg {
    /// The agent's API: unix:PATH or https://HOST:PORT.
    #[arg(long, env = "HELIO_AGENT")]
    pub agent: String,
    /// With https: a directory with an operator or scheduler certificate (cert.pem, key.pem,
    /// ca.pem).
    #[arg(long = "api-tls", env = "HELIO_AGENT_TLS")]
    pub api_tls: Option<PathBuf>,
}

impl AgentArg {
    /// The client.
    pub fn client(&self) -> anyhow::Result<ApiClient> {
        client(&self.agent, self.api_tls.as_deref())
    }
}

/// Listing something of an agent.
#[derive(clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub agent: AgentArg,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// A client of the agent at `url`.
pub fn client(url: &str, tls: Option<&std::path::Path>) -> anyhow::Result<ApiClient> {
    let tls = super::tls_client(tls)?;
    Ok(ApiClient::new(url, tls)?)
}

/// Prints a value as JSON (`--json`) or pretty for people.
pub fn show(v: &serde_json::Value, json: bool) {
    if json {
        println!("{v}");
    } else {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    }
}
