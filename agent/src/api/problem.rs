//! Errors as RFC 9457 problem details (`application/problem+json`), and a JSON body extractor
//! whose rejections (malformed JSON, unknown fields, wrong content type) are problems too.

use crate::error::AgentError;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// A problem (RFC 9457).
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// A URI naming the problem type (`about:blank`: the title says it).
    #[serde(rename = "type")]
    pub kind: String,
    /// Short and fixed per type.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What failed, on which object, and what to do.
    pub detail: String,
}

impl Problem {
    /// A problem with `status`, `title` and `detail`.
    pub fn new(status: u16, title: &str, detail: impl Into<String>) -> Problem {
        Problem {
            kind: "about:blank".into(),
            title: title.into(),
            status,
            detail: detail.into(),
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        // Invariant: Problem holds strings and a number, which serialise.
        let body = serde_json::to_vec(&self).expect("problem serialises");
        (
            status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            body,
        )
            .into_response()
    }
}

impl From<AgentError> for Problem {
    fn from(e: AgentError) -> Problem {
        if e.status() >= 500 {
            tracing::warn!(error = %e, "request failed");
        }
        Problem::new(e.status(), e.title(), e.to_string())
    }
}

impl IntoResponse for AgentError {
    fn into_response(self) -> Response {
        Problem::from(self).into_response()
    }
}

/// A JSON request body; unknown fields are refused by the types (`deny_unknown_fields`).
pub struct Body<T>(pub T);

impl<T, S> FromRequest<S> for Body<T>
where
    axum::Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Problem> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Body(v)),
            Err(r) => Err(rejection(r)),
        }
    }
}

fn rejection(r: JsonRejection) -> Problem {
    match r {
        JsonRejection::JsonDataError(e) => Problem::new(
            422,
            "invalid request",
            format!(
                "the body does not fit the resource: {} (see /v1/openapi.json)",
                e.body_text()
            ),
        ),
        JsonRejection::JsonSyntaxError(e) => Problem::new(
            400,
            "malformed JSON",
            format!("the body is not valid JSON: {}", e.body_text()),
        ),
        JsonRejection::MissingJsonContentType(_) => Problem::new(
            415,
            "unsupported media type",
            "send the body with Content-Type: application/json",
        ),
        other => Problem::new(400, "bad request", other.body_text()),
    }
}
