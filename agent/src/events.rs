//! The event log: every job phase change, round figure and VM state change, persisted with an
//! increasing id (so a client resumes a Server-Sent-Events stream with `Last-Event-ID`) and
//! broadcast to live subscribers.

use crate::model::Event;
use crate::state::{State, StateError};
use std::sync::{Arc, Mutex};
use tokio::sync::broadcast;

/// Events kept in the database; older ones are pruned (a client that fell further behind
/// starts again from the oldest kept, and is told so by the gap in ids).
pub const KEPT: u64 = 20_000;
const KIND: &str = "event";

/// The log.
pub struct Events {
    state: Arc<State>,
    next: Mutex<u64>,
    tx: broadcast::Sender<Event>,
}

/// Database key of event `id`: zero-padded so keys sort as numbers.
fn key(id: u64) -> String {
    format!("{id:020}")
}

/// Now, RFC 3339 with milliseconds.
pub fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

impl Events {
    /// Opens the log, continuing after the last stored id.
    pub fn open(state: Arc<State>) -> Result<Events, StateError> {
        let last: Option<u64> = state.get("meta", "event_next")?;
        let (tx, _) = broadcast::channel(4096);
        Ok(Events {
            state,
            next: Mutex::new(last.unwrap_or(1)),
            tx,
        })
    }

    /// Records and broadcasts an event.
    pub fn emit(&self, kind: &str, object: &str, data: serde_json::Value) {
        // Poisoned only if a holder panicked between two integer updates; the counter is whole.
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        let id = *next;
        *next += 1;
        let event = Event {
            id,
            at: now(),
            kind: kind.to_string(),
            object: object.to_string(),
            data,
        };
        let stored = self
            .state
            .put(KIND, &key(id), &event, false)
            .and_then(|_| self.state.put("meta", "event_next", &(id + 1), false));
        if let Err(e) = stored {
            tracing::warn!(error = %e, kind, object, "cannot store an event; live subscribers still get it");
        }
        if id % 1000 == 0 && id > KEPT {
            let _ = self.state.delete_range(KIND, &key(0), &key(id - KEPT));
        }
        drop(next);
        let _ = self.tx.send(event);
    }

    /// Stored events after `after`, at most `limit`.
    pub fn since(&self, after: u64, limit: usize) -> Result<Vec<Event>, StateError> {
        Ok(self
            .state
            .list_after::<Event>(KIND, &key(after), limit)?
            .into_iter()
            .map(|(_, e)| e)
            .collect())
    }

    /// A live subscription (subscribe before reading `since`, then skip ids already seen).
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_continue_after_reopen_and_since_resumes() {
        let dir = tempfile::tempdir().unwrap();
        {
            let ev = Events::open(Arc::new(State::open(dir.path()).unwrap())).unwrap();
            ev.emit("a", "x", serde_json::json!({}));
            ev.emit("b", "x", serde_json::json!({}));
        }
        let ev = Events::open(Arc::new(State::open(dir.path()).unwrap())).unwrap();
        ev.emit("c", "x", serde_json::json!({}));
        let all = ev.since(0, 10).unwrap();
        assert_eq!(all.iter().map(|e| e.id).collect::<Vec<_>>(), vec![1, 2, 3]);
        let after = ev.since(1, 10).unwrap();
        assert_eq!(
            after.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
            vec!["b", "c"]
        );
    }
}
