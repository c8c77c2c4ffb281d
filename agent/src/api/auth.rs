//! Who may do what on the control API. Over TCP the client's certificate carries a role
//! (`helio pki issue --role`); over the unix socket access is the socket's file permission
//! (0600: the agent's user), and the caller is an operator.

use super::problem::Problem;
use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use protocol::pki::Role;

/// The caller's role, set by the listener on every request.
#[derive(Clone, Copy, Debug)]
pub struct Caller(pub Role);

/// Whether `role` may call `method` on the route `route`.
pub fn allowed(role: Role, method: &Method, route: &str) -> bool {
    match role {
        Role::Operator => true,
        Role::Agent => false,
        Role::Scheduler => {
            method == Method::GET
                || method == Method::HEAD
                || (method == Method::POST
                    && matches!(
                        route,
                        "/v1/jobs"
                            | "/v1/jobs/{id}/cancel"
                            | "/v1/migrations"
                            | "/v1/migrations/{id}/switchover"
                    ))
                || (method == Method::DELETE && route == "/v1/migrations/{id}")
        }
    }
}

/// The middleware: 403 with the reason when the role does not allow the request.
pub async fn authorize(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| req.uri().path().to_string());
    let Some(Caller(role)) = req.extensions().get::<Caller>().copied() else {
        return Problem::new(403, "forbidden", "the caller has no role").into_response();
    };
    if !allowed(role, req.method(), &route) {
        let why = match role {
            Role::Agent => "agent certificates may use only the replication protocol, never the control API; issue an operator or scheduler certificate (helio pki issue --role)".to_string(),
            _ => format!(
                "a {} certificate may not {} {route}: schedulers read everything and create or cancel jobs; use an operator certificate",
                role.as_str(),
                req.method()
            ),
        };
        return Problem::new(403, "forbidden", why).into_response();
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_allow_what_the_issue_says() {
        let post = Method::POST;
        assert!(allowed(Role::Operator, &Method::DELETE, "/v1/vms/{name}"));
        assert!(allowed(Role::Scheduler, &Method::GET, "/v1/disks"));
        assert!(allowed(Role::Scheduler, &post, "/v1/jobs"));
        assert!(allowed(Role::Scheduler, &post, "/v1/jobs/{id}/cancel"));
        assert!(!allowed(Role::Scheduler, &post, "/v1/vms"));
        assert!(allowed(Role::Scheduler, &post, "/v1/migrations"));
        assert!(allowed(
            Role::Scheduler,
            &Method::DELETE,
            "/v1/migrations/{id}"
        ));
        assert!(!allowed(
            Role::Scheduler,
            &Method::DELETE,
            "/v1/disks/{name}"
        ));
        assert!(!allowed(Role::Agent, &Method::GET, "/v1/disks"));
    }
}
