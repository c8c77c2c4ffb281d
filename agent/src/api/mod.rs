//! The control API: HTTP/1.1 + JSON (axum) on a unix socket (0600) and, with `--tls`, on TCP
//! with mutual TLS from the agents' CA.
//!
//! - [`routes`]: the handlers; [`sse`]: the event stream; [`problem`]: RFC 9457 errors and the
//!   JSON body extractor; [`auth`]: roles.
//! - Every listener caps its connections, the time to send a request's headers, and the time a
//!   request may take (the event stream excepted); bodies are capped at 1 MiB.

pub mod auth;
pub mod problem;
pub mod routes;
pub mod sse;

use crate::agent::Agent;
use auth::Caller;
use axum::extract::{MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use problem::Problem;
use protocol::pki::Role;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tower::ServiceExt;
use utoipa::OpenApi;

/// Time a client has to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a request may take (creating a VM waits for QEMU's monitor: 20 s at most).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest request body.
pub const MAX_BODY: usize = 1 << 20;
/// Connections served at once by one API listener.
pub const MAX_CONNECTIONS: usize = 256;

/// The OpenAPI document, generated from the handlers and types.
#[derive(OpenApi)]
#[openapi(
    info(title = "heliotrope agent API", description = "Control API of a heliotrope agent: disks, VMs, jobs, events, metrics. Errors are RFC 9457 problem details."),
    paths(
        routes::agent_info, routes::list_disks, routes::create_disk, routes::show_disk,
        routes::delete_disk, routes::list_replicas, routes::list_vms, routes::create_vm,
        routes::show_vm, routes::start_vm, routes::stop_vm, routes::delete_vm,
        routes::list_jobs, routes::create_job, routes::show_job, routes::cancel_job,
        routes::list_peers, routes::add_peer, routes::metrics, sse::events, openapi,
        routes::list_migrations, routes::create_migration, routes::show_migration,
        routes::cancel_migration, routes::switchover_migration,
    ),
    components(schemas(Problem)),
    tags((name = "agent"), (name = "disks"), (name = "vms"), (name = "jobs"), (name = "migrations"), (name = "events")),
)]
pub struct ApiDoc;

/// This document (OpenAPI 3.1).
#[utoipa::path(get, path = "/v1/openapi.json", tag = "agent",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json")))]
pub async fn openapi() -> impl IntoResponse {
    axum::Json(ApiDoc::openapi())
}

/// The API's router.
pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/v1/agent", get(routes::agent_info))
        .route(
            "/v1/disks",
            get(routes::list_disks).post(routes::create_disk),
        )
        .route(
            "/v1/disks/{name}",
            get(routes::show_disk).delete(routes::delete_disk),
        )
        .route("/v1/replicas", get(routes::list_replicas))
        .route("/v1/vms", get(routes::list_vms).post(routes::create_vm))
        .route(
            "/v1/vms/{name}",
            get(routes::show_vm).delete(routes::delete_vm),
        )
        .route("/v1/vms/{name}/start", post(routes::start_vm))
        .route("/v1/vms/{name}/stop", post(routes::stop_vm))
        .route("/v1/jobs", get(routes::list_jobs).post(routes::create_job))
        .route("/v1/jobs/{id}", get(routes::show_job))
        .route("/v1/jobs/{id}/cancel", post(routes::cancel_job))
        .route("/v1/peers", get(routes::list_peers).post(routes::add_peer))
        .route(
            "/v1/migrations",
            get(routes::list_migrations).post(routes::create_migration),
        )
        .route(
            "/v1/migrations/{id}",
            get(routes::show_migration).delete(routes::cancel_migration),
        )
        .route(
            "/v1/migrations/{id}/switchover",
            post(routes::switchover_migration),
        )
        .route("/v1/events", get(sse::events))
        .route("/v1/openapi.json", get(openapi))
        .route("/metrics", get(routes::metrics))
        .fallback(|| async {
            Problem::new(404, "not found", "no such endpoint; see /v1/openapi.json")
        })
        .layer(middleware::from_fn(auth::authorize))
        .layer(middleware::from_fn_with_state(agent.clone(), observe))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(agent)
}

/// Times each request out (the event stream excepted) and records its latency.
async fn observe(
    axum::extract::State(agent): axum::extract::State<Arc<Agent>>,
    req: Request,
    next: Next,
) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().to_string();
    let started = Instant::now();
    let response = if route == "/v1/events" {
        next.run(req).await
    } else {
        match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
            Ok(r) => r,
            Err(_) => Problem::new(
                503,
                "timed out",
                format!("{method} {route} took more than {REQUEST_TIMEOUT:?}; it may still complete: read the object back before retrying"),
            )
            .into_response(),
        }
    };
    let labels = crate::metrics::RequestLabels {
        method,
        route,
        status: response.status().as_u16(),
    };
    agent.metrics.requests.get_or_create(&labels).inc();
    agent
        .metrics
        .latency
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    response
}

/// Serves one connection with the caller's role attached to every request.
async fn serve_conn<S>(io: S, app: Router, caller: Caller, peer: String)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(caller);
            app.clone().oneshot(req.map(axum::body::Body::new))
        });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(io), service);
    if let Err(e) = conn.await {
        tracing::debug!(%peer, error = %e, "API connection ended");
    }
}

/// Serves the API on a unix socket bound by [`bind_unix`] until the task is dropped.
pub async fn serve_unix(agent: Arc<Agent>, listener: UnixListener) {
    let app = router(agent);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "API accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(slot) = server::listen::admit(&slots, "unix", "API") else {
            continue;
        };
        let app = app.clone();
        tokio::spawn(async move {
            let _slot = slot;
            serve_conn(stream, app, Caller(Role::Operator), "unix".into()).await;
        });
    }
}

/// Binds the API's unix socket with mode 0600 (replacing a stale socket).
pub fn bind_unix(path: &Path) -> std::io::Result<UnixListener> {
    server::listen::bind_unix_private(path)
}

/// Serves the API on TCP with mutual TLS until the task is dropped; the client certificate's
/// role decides what it may do.
pub async fn serve_tls(agent: Arc<Agent>, listener: TcpListener, tls: protocol::tls::TlsServer) {
    let app = router(agent);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "API accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(slot) = server::listen::admit(&slots, &peer.to_string(), "API") else {
            continue;
        };
        let (app, tls) = (app.clone(), tls.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let stream = match tokio::time::timeout(HEADER_TIMEOUT, tls.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::warn!(%peer, error = %e, "API client refused: TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::warn!(%peer, "API client dropped: TLS not finished in time");
                    return;
                }
            };
            let role = server::listen::peer_role(&stream);
            let role = match role {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "API client refused");
                    return;
                }
            };
            serve_conn(stream, app, Caller(role), peer.to_string()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `docs/openapi.json` is the generated document; `HELIO_UPDATE_OPENAPI=1 cargo test -p
    /// helio-agent openapi` rewrites it after the API changes.
    #[test]
    fn the_committed_openapi_document_is_current() {
        let doc = ApiDoc::openapi().to_pretty_json().unwrap() + "\n";
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json");
        if std::env::var_os("HELIO_UPDATE_OPENAPI").is_some() {
            std::fs::write(&path, &doc).unwrap();
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == doc,
            "docs/openapi.json is stale: run HELIO_UPDATE_OPENAPI=1 cargo test -p helio-agent openapi"
        );
    }
}
