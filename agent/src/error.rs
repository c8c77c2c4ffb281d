//! What the agent's operations fail with; the API turns each into an RFC 9457 problem with the
//! matching HTTP status.

use crate::state::StateError;

/// An operation of the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The named object does not exist.
    #[error("{what} {name:?} does not exist on this agent{hint}")]
    NotFound {
        /// `disk`, `vm`, `job`, `peer`.
        what: &'static str,
        /// Its name.
        name: String,
        /// What to do (starts with "; " when present).
        hint: String,
    },
    /// The request conflicts with what exists (a name taken, a disk attached, a VM running).
    #[error("{0}")]
    Conflict(String),
    /// The request is malformed or names something invalid.
    #[error("{0}")]
    Invalid(String),
    /// QEMU failed (its stderr is in the message).
    #[error("{0}")]
    Qemu(String),
    /// A file or device failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, on which object.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The state database failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// Another subsystem failed (store, catalog, tracker).
    #[error("{0}")]
    Internal(String),
}

impl AgentError {
    /// A not-found error with a hint.
    pub fn not_found(what: &'static str, name: &str, hint: impl Into<String>) -> AgentError {
        let hint = hint.into();
        AgentError::NotFound {
            what,
            name: name.to_string(),
            hint: if hint.is_empty() {
                hint
            } else {
                format!("; {hint}")
            },
        }
    }

    /// An I/O error on `what`.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
        let what = what.into();
        move |source| AgentError::Io { what, source }
    }

    /// The HTTP status the API answers with.
    pub fn status(&self) -> u16 {
        match self {
            AgentError::NotFound { .. } => 404,
            AgentError::Conflict(_) => 409,
            AgentError::Invalid(_) => 422,
            AgentError::Qemu(_) => 502,
            AgentError::Io { .. } | AgentError::State(_) | AgentError::Internal(_) => 500,
        }
    }

    /// A short, fixed title for the problem type.
    pub fn title(&self) -> &'static str {
        match self {
            AgentError::NotFound { .. } => "not found",
            AgentError::Conflict(_) => "conflict",
            AgentError::Invalid(_) => "invalid request",
            AgentError::Qemu(_) => "QEMU failed",
            AgentError::Io { .. } => "I/O error",
            AgentError::State(_) => "agent state error",
            AgentError::Internal(_) => "internal error",
        }
    }
}

/// Results of the agent's operations.
pub type Result<T, E = AgentError> = std::result::Result<T, E>;

/// Checks a name, as an `Invalid` error.
pub fn check_name(what: &str, name: &str) -> Result<()> {
    protocol::check_name(what, name).map_err(AgentError::Invalid)
}
