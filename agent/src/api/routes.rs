//! The API's handlers, each documented for the OpenAPI document.

use super::problem::{Body, Problem};
use crate::agent::Agent;
use crate::model::{
    AgentInfo, Disk, DiskSpec, Job, JobSpec, Migration, MigrationSpec, PeerSpec, Replica, Vm,
    VmSpec,
};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use std::sync::Arc;

type Api = State<Arc<Agent>>;
type Answer<T> = Result<(StatusCode, Json<T>), Problem>;

fn created<T>(v: T, new: bool) -> (StatusCode, Json<T>) {
    (
        if new {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        },
        Json(v),
    )
}

fn ok<T>(v: T) -> (StatusCode, Json<T>) {
    (StatusCode::OK, Json(v))
}

/// Runs blocking work (RocksDB, image scans) off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> crate::error::Result<T> + Send + 'static,
) -> Result<T, Problem> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(Problem::from),
        Err(e) => Err(Problem::new(
            500,
            "internal error",
            format!("a worker failed: {e}"),
        )),
    }
}

/// The agent: name, version, accelerator, counts.
#[utoipa::path(get, path = "/v1/agent", tag = "agent",
    responses((status = 200, body = AgentInfo)))]
pub async fn agent_info(State(a): Api) -> Answer<AgentInfo> {
    blocking(move || a.info()).await.map(ok)
}

/// Every disk this agent serves.
#[utoipa::path(get, path = "/v1/disks", tag = "disks",
    responses((status = 200, body = Vec<Disk>)))]
pub async fn list_disks(State(a): Api) -> Answer<Vec<Disk>> {
    blocking(move || {
        let attached = a.vms.attachments()?;
        let mut disks = a.disks.list()?;
        for d in &mut disks {
            d.attached_to = attached.get(&d.spec.name).cloned();
        }
        Ok(disks)
    })
    .await
    .map(ok)
}

/// Creates a disk (an image file served by this agent, every write dirty-tracked). The same
/// spec again answers 200 with the disk; another spec under the name answers 409.
#[utoipa::path(post, path = "/v1/disks", tag = "disks", request_body = DiskSpec,
    responses((status = 201, body = Disk), (status = 200, body = Disk),
        (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn create_disk(State(a): Api, Body(spec): Body<DiskSpec>) -> Answer<Disk> {
    blocking(move || a.disks.create(spec))
        .await
        .map(|(d, new)| created(d, new))
}

/// One disk.
#[utoipa::path(get, path = "/v1/disks/{name}", tag = "disks",
    params(("name" = String, Path, description = "The disk")),
    responses((status = 200, body = Disk), (status = 404, body = Problem)))]
pub async fn show_disk(State(a): Api, Path(name): Path<String>) -> Answer<Disk> {
    blocking(move || {
        let mut d = a.disks.show(&name)?;
        d.attached_to = a.vms.attachments()?.get(&name).cloned();
        Ok(d)
    })
    .await
    .map(ok)
}

/// Forgets a disk (its image file is kept); refused while a VM has it.
#[utoipa::path(delete, path = "/v1/disks/{name}", tag = "disks",
    params(("name" = String, Path, description = "The disk")),
    responses((status = 200, body = DiskSpec), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn delete_disk(State(a): Api, Path(name): Path<String>) -> Answer<DiskSpec> {
    blocking(move || {
        if let Some(vm) = a.vms.attachments()?.get(&name) {
            return Err(crate::error::AgentError::Conflict(format!(
                "disk {name:?} is attached to VM {vm:?}; delete the VM first"
            )));
        }
        a.disks.delete(&name)
    })
    .await
    .map(ok)
}

/// The replicas in this agent's store (seeded from peers).
#[utoipa::path(get, path = "/v1/replicas", tag = "disks",
    responses((status = 200, body = Vec<Replica>)))]
pub async fn list_replicas(State(a): Api) -> Answer<Vec<Replica>> {
    blocking(move || a.disks.replicas()).await.map(ok)
}

/// Every VM.
#[utoipa::path(get, path = "/v1/vms", tag = "vms", responses((status = 200, body = Vec<Vm>)))]
pub async fn list_vms(State(a): Api) -> Answer<Vec<Vm>> {
    blocking(move || a.vms.list()).await.map(ok)
}

/// Creates a VM and (unless `start` is false) starts QEMU; the same spec again answers 200.
#[utoipa::path(post, path = "/v1/vms", tag = "vms", request_body = VmSpec,
    responses((status = 201, body = Vm), (status = 200, body = Vm), (status = 404, body = Problem),
        (status = 409, body = Problem), (status = 422, body = Problem), (status = 502, body = Problem)))]
pub async fn create_vm(State(a): Api, Body(spec): Body<VmSpec>) -> Answer<Vm> {
    a.vms
        .create(spec)
        .await
        .map(|(v, new)| created(v, new))
        .map_err(Problem::from)
}

/// One VM.
#[utoipa::path(get, path = "/v1/vms/{name}", tag = "vms",
    params(("name" = String, Path, description = "The VM")),
    responses((status = 200, body = Vm), (status = 404, body = Problem)))]
pub async fn show_vm(State(a): Api, Path(name): Path<String>) -> Answer<Vm> {
    blocking(move || a.vms.show(&name)).await.map(ok)
}

/// Starts a VM (a running one is left as it is).
#[utoipa::path(post, path = "/v1/vms/{name}/start", tag = "vms",
    params(("name" = String, Path, description = "The VM")),
    responses((status = 200, body = Vm), (status = 404, body = Problem), (status = 502, body = Problem)))]
pub async fn start_vm(State(a): Api, Path(name): Path<String>) -> Answer<Vm> {
    a.vms.start(&name).await.map(ok).map_err(Problem::from)
}

/// Stops a VM (QMP `quit`, SIGKILL after 10 s).
#[utoipa::path(post, path = "/v1/vms/{name}/stop", tag = "vms",
    params(("name" = String, Path, description = "The VM")),
    responses((status = 200, body = Vm), (status = 404, body = Problem)))]
pub async fn stop_vm(State(a): Api, Path(name): Path<String>) -> Answer<Vm> {
    a.vms.stop(&name).await.map(ok).map_err(Problem::from)
}

/// Deletes a stopped VM (its disks stay).
#[utoipa::path(delete, path = "/v1/vms/{name}", tag = "vms",
    params(("name" = String, Path, description = "The VM")),
    responses((status = 204), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn delete_vm(State(a): Api, Path(name): Path<String>) -> Result<StatusCode, Problem> {
    a.vms
        .delete(&name)
        .await
        .map(|_| StatusCode::NO_CONTENT)
        .map_err(Problem::from)
}

/// Every job, oldest first.
#[utoipa::path(get, path = "/v1/jobs", tag = "jobs", responses((status = 200, body = Vec<Job>)))]
pub async fn list_jobs(State(a): Api) -> Answer<Vec<Job>> {
    blocking(move || a.jobs.list()).await.map(ok)
}

/// Creates a job. A job `name` or an `Idempotency-Key` header makes a retry return the job it
/// created (200) instead of creating another.
#[utoipa::path(post, path = "/v1/jobs", tag = "jobs", request_body = JobSpec,
    params(("Idempotency-Key" = Option<String>, Header, description = "Client-chosen key; a retry with it returns the same job")),
    responses((status = 201, body = Job), (status = 200, body = Job), (status = 404, body = Problem),
        (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn create_job(
    State(a): Api,
    headers: HeaderMap,
    Body(spec): Body<JobSpec>,
) -> Answer<Job> {
    let key = match headers.get("idempotency-key").map(|v| v.to_str()) {
        None => None,
        Some(Ok(k)) => Some(k.to_string()),
        Some(Err(_)) => {
            return Err(Problem::new(
                422,
                "invalid request",
                "Idempotency-Key must be visible ASCII",
            ))
        }
    };
    a.jobs
        .create(spec, key.as_deref())
        .await
        .map(|(j, new)| created(j, new))
        .map_err(Problem::from)
}

/// One job.
#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, description = "The job")),
    responses((status = 200, body = Job), (status = 404, body = Problem)))]
pub async fn show_job(State(a): Api, Path(id): Path<String>) -> Answer<Job> {
    blocking(move || a.jobs.show(&id)).await.map(ok)
}

/// Cancels a job (idempotent: an ended job is returned as it is).
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", tag = "jobs",
    params(("id" = String, Path, description = "The job")),
    responses((status = 200, body = Job), (status = 404, body = Problem)))]
pub async fn cancel_job(State(a): Api, Path(id): Path<String>) -> Answer<Job> {
    blocking(move || a.jobs.cancel(&id)).await.map(ok)
}

/// Peer agents jobs may name.
#[utoipa::path(get, path = "/v1/peers", tag = "agent", responses((status = 200, body = Vec<PeerSpec>)))]
pub async fn list_peers(State(a): Api) -> Answer<Vec<PeerSpec>> {
    blocking(move || a.peers()).await.map(ok)
}

/// Declares (or changes) a peer agent.
#[utoipa::path(post, path = "/v1/peers", tag = "agent", request_body = PeerSpec,
    responses((status = 201, body = PeerSpec), (status = 200, body = PeerSpec), (status = 422, body = Problem)))]
pub async fn add_peer(State(a): Api, Body(p): Body<PeerSpec>) -> Answer<PeerSpec> {
    blocking(move || a.add_peer(p))
        .await
        .map(|(p, new)| created(p, new))
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(get, path = "/metrics", tag = "agent",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics(
    State(a): Api,
) -> Result<([(axum::http::HeaderName, &'static str); 1], String), Problem> {
    let a2 = a.clone();
    let (jobs, vms) = blocking(move || {
        let mut vms = std::collections::HashMap::new();
        for v in a2.vms.list()? {
            *vms.entry(v.state).or_insert(0u64) += 1;
        }
        Ok((a2.jobs.by_phase()?, vms))
    })
    .await?;
    let m = &a.metrics;
    m.set_sent(&a.source.sent());
    crate::metrics::Metrics::set_counts(
        &m.jobs,
        &jobs,
        &["queued", "transferring", "done", "failed", "cancelled"],
    );
    crate::metrics::Metrics::set_counts(&m.vms, &vms, &["running", "stopped", "died"]);
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        m.render(),
    ))
}

/// Every migration of this agent's VMs, oldest first.
#[utoipa::path(get, path = "/v1/migrations", tag = "migrations",
    responses((status = 200, body = Vec<Migration>)))]
pub async fn list_migrations(State(a): Api) -> Answer<Vec<Migration>> {
    blocking(move || a.migrations.list()).await.map(ok)
}

/// Moves a running VM to a peer agent (`disk: shared` in this build).
#[utoipa::path(post, path = "/v1/migrations", tag = "migrations", request_body = MigrationSpec,
    responses((status = 201, body = Migration), (status = 404, body = Problem),
        (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn create_migration(State(a): Api, Body(spec): Body<MigrationSpec>) -> Answer<Migration> {
    a.migrations
        .create(spec)
        .await
        .map(|m| created(m, true))
        .map_err(Problem::from)
}

/// One migration.
#[utoipa::path(get, path = "/v1/migrations/{id}", tag = "migrations",
    params(("id" = String, Path, description = "The migration")),
    responses((status = 200, body = Migration), (status = 404, body = Problem)))]
pub async fn show_migration(State(a): Api, Path(id): Path<String>) -> Answer<Migration> {
    blocking(move || a.migrations.show(&id)).await.map(ok)
}

/// Cancels a migration (idempotent); before the switchover the VM keeps running here.
#[utoipa::path(delete, path = "/v1/migrations/{id}", tag = "migrations",
    params(("id" = String, Path, description = "The migration")),
    responses((status = 200, body = Migration), (status = 404, body = Problem)))]
pub async fn cancel_migration(State(a): Api, Path(id): Path<String>) -> Answer<Migration> {
    blocking(move || a.migrations.cancel(&id)).await.map(ok)
}

/// Lets a manual switchover go (`switchover: manual`, waiting in `ready`): a last disk round,
/// then the VM's memory moves and the cut follows. 409 when there is no hold to end.
#[utoipa::path(post, path = "/v1/migrations/{id}/switchover", tag = "migrations",
    params(("id" = String, Path, description = "The migration")),
    responses((status = 200, body = Migration), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn switchover_migration(State(a): Api, Path(id): Path<String>) -> Answer<Migration> {
    blocking(move || a.migrations.switchover(&id)).await.map(ok)
}
