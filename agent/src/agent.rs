//! One agent: its state, the roles it holds (replication source, destination store, NBD
//! exports for its VMs, VMs, jobs) and how they start and resume.

use crate::config::Config;
use crate::disks::Disks;
use crate::error::{AgentError, Result};
use crate::events::Events;
use crate::jobs::Jobs;
use crate::metrics::Metrics;
use crate::model::{AgentInfo, PeerSpec};
use crate::state::State;
use crate::vm::Vms;
use server::nbd::listener::{NbdAddr, NbdListener};
use server::{Acceptor, Source};
use std::path::PathBuf;
use std::sync::Arc;

/// How an agent is started (`helio agent`'s flags).
#[derive(Debug, Clone)]
pub struct Options {
    /// `--name`.
    pub name: String,
    /// `--state`.
    pub state: PathBuf,
    /// `--store` (default: STATE/store).
    pub store: Option<PathBuf>,
    /// `--listen`: the replication listener.
    pub listen: Option<String>,
    /// `--tls`: certificates for replication and the TCP API.
    pub tls: Option<PathBuf>,
    /// `--config`.
    pub config: Option<PathBuf>,
}

fn internal(what: &str, e: &dyn std::fmt::Display) -> AgentError {
    AgentError::Internal(format!("{what}: {e}"))
}

/// Creates and resolves the state directory.
fn state_dir(state: &std::path::Path) -> Result<PathBuf> {
    std::fs::create_dir_all(state)
        .map_err(io(format!("creating state directory {}", state.display())))?;
    state
        .canonicalize()
        .map_err(io(format!("resolving {}", state.display())))
}

/// TLS material for serving (replication, the TCP API) and dialing peers.
fn load_tls(
    dir: Option<&std::path::Path>,
) -> Result<(
    Option<protocol::tls::TlsServer>,
    Option<protocol::tls::TlsClient>,
)> {
    let Some(d) = dir else {
        return Ok((None, None));
    };
    let server = protocol::tls::TlsServer::load(d).map_err(|e| internal("loading --tls", &e))?;
    let client = protocol::tls::TlsClient::load(d).map_err(|e| internal("loading --tls", &e))?;
    Ok((Some(server), Some(client)))
}

/// Binds the replication listener (when asked for) and serves `source` on it; its address.
async fn serve_replication(
    listen: Option<&str>,
    tls: Option<protocol::tls::TlsServer>,
    source: &Arc<Source>,
) -> Result<Option<String>> {
    let Some(addr) = listen else {
        return Ok(None);
    };
    let acceptor = Acceptor::bind(addr, tls)
        .await
        .map_err(|e| AgentError::Conflict(format!("{e}")))?;
    let bound = acceptor
        .local_addr()
        .map_err(io(format!("reading the address of {addr}")))?;
    tokio::spawn(source.clone().serve(acceptor));
    Ok(Some(bound.to_string()))
}

/// A running agent.
pub struct Agent {
    /// Its name.
    pub name: String,
    /// The state database.
    pub state: Arc<State>,
    /// The event log.
    pub events: Arc<Events>,
    /// Disks.
    pub disks: Arc<Disks>,
    /// VMs.
    pub vms: Arc<Vms>,
    /// Jobs.
    pub jobs: Arc<Jobs>,
    /// Migrations of this agent's VMs.
    pub migrations: Arc<crate::migrate::Migrations>,
    /// Metrics.
    pub metrics: Metrics,
    /// The replication source (this agent's disks, served to peers).
    pub source: Arc<Source>,
    /// The replication listener's bound address.
    pub listen: Option<String>,
    /// TLS server material, for the TCP API.
    pub tls: Option<protocol::tls::TlsServer>,
    /// The state directory.
    pub dir: PathBuf,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> AgentError {
    AgentError::io(what)
}

impl Agent {
    /// Opens the state, starts every role, re-adopts VMs and resumes jobs; returns once all
    /// listeners are bound.
    pub async fn start(opts: Options) -> Result<Arc<Agent>> {
        crate::error::check_name("agent", &opts.name)?;
        let dir = state_dir(&opts.state)?;
        let state = Arc::new(State::open(&dir.join("db"))?);
        let events = Arc::new(Events::open(state.clone())?);
        let catalog = Arc::new(
            blockstore::Catalog::open(&dir.join("catalog"))
                .map_err(|e| internal("opening the source catalog", &e))?,
        );
        let store_dir = opts.store.clone().unwrap_or_else(|| dir.join("store"));
        let store = blockstore::Store::open(&store_dir)
            .map_err(|e| internal(&format!("opening store {}", store_dir.display()), &e))?;
        let (tls_server, tls_client) = load_tls(opts.tls.as_deref())?;
        let source = Source::new(
            Vec::new(),
            opts.name.clone(),
            protocol::codec::DEFAULT_LEVEL,
        );
        let exports: server::nbd::listener::SharedExports<_> = Default::default();
        let nbd_path = dir.join("nbd.sock");
        let nbd = NbdListener::bind(&NbdAddr::Unix(nbd_path.clone()), false)
            .await
            .map_err(|e| internal("binding the VMs' NBD socket", &e))?;
        tokio::spawn(nbd.run_shared(exports.clone(), None));
        let metrics = Metrics::new();
        let disks = Arc::new(Disks::new(
            state.clone(),
            events.clone(),
            catalog,
            source.clone(),
            exports,
            store.clone(),
            metrics.clone(),
        ));
        disks.load()?;
        let vms = Arc::new(Vms::new(
            state.clone(),
            events.clone(),
            disks.clone(),
            dir.join("vms"),
            nbd_path,
        ));
        vms.adopt()?;
        let jobs = Arc::new(Jobs::new(
            state.clone(),
            events.clone(),
            store,
            tls_client.clone(),
            opts.name.clone(),
            metrics.clone(),
            dir.join("exports"),
        ));
        vms.set_jobs(jobs.clone());
        source.set_vm_peer(Arc::new(crate::migrate::Incoming {
            vms: vms.clone(),
            jobs: jobs.clone(),
            store_id: disks.store().id(),
            disks: disks.clone(),
        }));
        let listen = serve_replication(opts.listen.as_deref(), tls_server.clone(), &source).await?;
        let migrations = Arc::new(crate::migrate::Migrations::new(
            state.clone(),
            disks.clone(),
            listen.clone(),
            events.clone(),
            vms.clone(),
            jobs.clone(),
            tls_client.clone(),
            opts.name.clone(),
        ));
        let agent = Arc::new(Agent {
            name: opts.name.clone(),
            state,
            events,
            disks,
            vms,
            jobs,
            migrations,
            metrics,
            source,
            listen,
            tls: tls_server,
            dir,
        });
        if let Some(path) = &opts.config {
            agent
                .apply_config(&Config::load(path).map_err(AgentError::Invalid)?)
                .await?;
        }
        agent.jobs.resume()?;
        agent.migrations.resume()?;
        Ok(agent)
    }

    /// Creates what the config declares and the state lacks.
    async fn apply_config(&self, c: &Config) -> Result<()> {
        for p in &c.peer {
            self.add_peer(p.clone())?;
        }
        for d in &c.disk {
            if !self.disks.exists(&d.name) {
                self.disks.create(d.clone())?;
            }
        }
        for v in &c.vm {
            if self.vms.show(&v.name).is_err() {
                self.vms.create(v.clone()).await?;
            }
        }
        Ok(())
    }

    /// Records a peer agent (the same spec again changes nothing).
    pub fn add_peer(&self, p: PeerSpec) -> Result<(PeerSpec, bool)> {
        crate::error::check_name("peer", &p.name)?;
        if !p.addr.contains(':') {
            return Err(AgentError::Invalid(format!(
                "peer {:?}: addr {:?} must be HOST:PORT of its replication listener",
                p.name, p.addr
            )));
        }
        if let Some(old) = self.state.get::<PeerSpec>("peer", &p.name)? {
            if old == p {
                return Ok((p, false));
            }
        }
        self.state.put("peer", &p.name, &p, true)?;
        self.events
            .emit("peer.set", &p.name, serde_json::json!({"addr": p.addr}));
        Ok((p, true))
    }

    /// Every peer.
    pub fn peers(&self) -> Result<Vec<PeerSpec>> {
        Ok(self
            .state
            .list::<PeerSpec>("peer")?
            .into_iter()
            .map(|(_, p)| p)
            .collect())
    }

    /// What the agent is.
    pub fn info(&self) -> Result<AgentInfo> {
        let accel = self.vms.host_accel();
        Ok(AgentInfo {
            name: self.name.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            listen: self.listen.clone(),
            accel: accel.name.into(),
            accel_reason: accel.reason.clone(),
            disks: self.disks.list()?.len(),
            vms: self.vms.list()?.len(),
            jobs_active: self.jobs.active(),
        })
    }
}
