//! `GET /v1/events`: the event log as Server-Sent Events. A client resumes with
//! `Last-Event-ID` (or `?since=ID`): stored events after that id come first, then live ones.

use super::problem::Problem;
use crate::agent::Agent;
use crate::model::Event;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{self, KeepAlive, Sse};
use futures::stream::{self, Stream};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;

/// Query parameters of the event stream.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct Since {
    /// Resume after this event id (as `Last-Event-ID`).
    pub since: Option<u64>,
}

/// Stored events replayed per database read.
const PAGE: usize = 256;

struct Cursor {
    agent: Arc<Agent>,
    live: broadcast::Receiver<Event>,
    queued: VecDeque<Event>,
    last: u64,
}

impl Cursor {
    /// The next event: stored ones first (also after falling behind the live channel).
    async fn next(mut self) -> Option<(Event, Cursor)> {
        loop {
            if let Some(e) = self.queued.pop_front() {
                if e.id > self.last {
                    self.last = e.id;
                    return Some((e, self));
                }
                continue;
            }
            let (agent, last) = (self.agent.clone(), self.last);
            let stored = tokio::task::spawn_blocking(move || agent.events.since(last, PAGE))
                .await
                .ok()
                .and_then(|r| r.ok())
                .unwrap_or_default();
            if !stored.is_empty() {
                self.queued.extend(stored);
                continue;
            }
            match self.live.recv().await {
                Ok(e) => self.queued.push_back(e),
                // Fell behind: the next round reads the missed ones from the database.
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

/// The event stream.
#[utoipa::path(get, path = "/v1/events", tag = "events", params(Since,
    ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this id")),
    responses((status = 200, description = "text/event-stream of Event objects", content_type = "text/event-stream", body = Event),
        (status = 422, body = Problem)))]
pub async fn events(
    State(agent): State<Arc<Agent>>,
    headers: HeaderMap,
    Query(q): Query<Since>,
) -> Result<Sse<impl Stream<Item = Result<sse::Event, std::convert::Infallible>>>, Problem> {
    let header = match headers
        .get("last-event-id")
        .map(|v| v.to_str().map(str::parse::<u64>))
    {
        None => None,
        Some(Ok(Ok(id))) => Some(id),
        Some(_) => {
            return Err(Problem::new(
                422,
                "invalid request",
                "Last-Event-ID must be an event id (a number)",
            ))
        }
    };
    // Subscribe before reading the stored events, so that nothing falls in between.
    let cursor = Cursor {
        live: agent.events.subscribe(),
        agent,
        queued: VecDeque::new(),
        last: header.or(q.since).unwrap_or(0),
    };
    let stream = stream::unfold(cursor, |c| c.next()).map(|e| {
        Ok(sse::Event::default()
            .id(e.id.to_string())
            .event(e.kind.clone())
            .json_data(&e)
            .unwrap_or_else(|_| sse::Event::default().comment("unencodable event")))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

use futures::StreamExt;
