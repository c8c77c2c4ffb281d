//! A client of an agent's control API (what `helio --agent URL` uses): `unix:PATH` or
//! `https://HOST:PORT` (mutual TLS with a certificate from the agents' CA). One HTTP/1.1
//! connection per request, each with a deadline; the event stream is read as it arrives.

use crate::model::Event;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

/// Deadline of one request.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(90);

/// Why a call to an agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL is not one the client understands.
    #[error("agent URL {0:?}: use unix:PATH or https://HOST:PORT")]
    Url(String),
    /// Connecting failed.
    #[error("cannot reach agent {url}: {detail}")]
    Connect {
        /// The agent.
        url: String,
        /// Why.
        detail: String,
    },
    /// The agent answered with a problem.
    #[error("{title} ({status}): {detail}")]
    Problem {
        /// HTTP status.
        status: u16,
        /// The problem's title.
        title: String,
        /// What failed and what to do.
        detail: String,
    },
    /// The exchange failed or took too long.
    #[error("agent {url}: {detail}")]
    Exchange {
        /// The agent.
        url: String,
        /// Why.
        detail: String,
    },
}

#[derive(Clone)]
enum Target {
    Unix(PathBuf),
    Tls(String),
}

/// A client of one agent.
#[derive(Clone)]
pub struct ApiClient {
    url: String,
    target: Target,
    tls: Option<protocol::tls::TlsClient>,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl ApiClient {
    /// A client of the agent at `url`; `https://` needs `tls`.
    pub fn new(url: &str, tls: Option<protocol::tls::TlsClient>) -> Result<ApiClient, ClientError> {
        let target = if let Some(p) = url.strip_prefix("unix:") {
            Target::Unix(PathBuf::from(p))
        } else if let Some(h) = url.strip_prefix("https://") {
            if tls.is_none() {
                return Err(ClientError::Connect {
                    url: url.into(),
                    detail: "https needs --tls DIR with an operator or scheduler certificate"
                        .into(),
                });
            }
            Target::Tls(h.trim_end_matches('/').to_string())
        } else {
            return Err(ClientError::Url(url.into()));
        };
        Ok(ApiClient {
            url: url.into(),
            target,
            tls,
        })
    }

    async fn connect(&self) -> Result<Box<dyn Io>, ClientError> {
        let err = |detail: String| ClientError::Connect {
            url: self.url.clone(),
            detail,
        };
        match &self.target {
            Target::Unix(p) => tokio::net::UnixStream::connect(p)
                .await
                .map(|s| Box::new(s) as Box<dyn Io>)
                .map_err(|e| {
                    err(format!(
                        "{e} (is `helio agent` running with --api unix:{}?)",
                        p.display()
                    ))
                }),
            Target::Tls(addr) => {
                let tcp = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|e| err(e.to_string()))?;
                // Checked in new(): https has TLS material.
                let tls = self
                    .tls
                    .as_ref()
                    .ok_or_else(|| err("no TLS material".into()))?;
                let s = tls
                    .connect(addr, tcp)
                    .await
                    .map_err(|e| err(format!("TLS: {e}")))?;
                Ok(Box::new(s))
            }
        }
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
        headers: &[(&str, &str)],
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let exchange = |detail: String| ClientError::Exchange {
            url: self.url.clone(),
            detail,
        };
        let io = self.connect().await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| exchange(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "helio-agent");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let payload = match body {
            Some(b) => {
                req = req.header("content-type", "application/json");
                Bytes::from(serde_json::to_vec(b).unwrap_or_default())
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(payload))
            .map_err(|e| exchange(e.to_string()))?;
        sender
            .send_request(req)
            .await
            .map_err(|e| exchange(e.to_string()))
    }

    /// One request; a problem answer becomes [`ClientError::Problem`].
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
        headers: &[(&str, &str)],
    ) -> Result<(u16, serde_json::Value), ClientError> {
        let exchange = |detail: String| ClientError::Exchange {
            url: self.url.clone(),
            detail,
        };
        let run = async {
            let resp = self.send(method, path, body, headers).await?;
            let status = resp.status().as_u16();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| exchange(e.to_string()))?
                .to_bytes();
            let value: serde_json::Value = if bytes.is_empty() {
                serde_json::Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                    serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
                })
            };
            if status >= 400 {
                return Err(ClientError::Problem {
                    status,
                    title: value["title"].as_str().unwrap_or("error").into(),
                    detail: value["detail"]
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| value.to_string()),
                });
            }
            Ok((status, value))
        };
        tokio::time::timeout(REQUEST_DEADLINE, run)
            .await
            .map_err(|_| {
                exchange(format!(
                    "no answer to {method} {path} within {REQUEST_DEADLINE:?}"
                ))
            })?
    }

    /// GET returning JSON.
    pub async fn get(&self, path: &str) -> Result<serde_json::Value, ClientError> {
        self.call("GET", path, None, &[]).await.map(|(_, v)| v)
    }

    /// The event stream after `since`: calls `each` for every event until it returns false or
    /// the stream ends.
    pub async fn events(
        &self,
        since: u64,
        mut each: impl FnMut(Event) -> bool,
    ) -> Result<(), ClientError> {
        let exchange = |detail: String| ClientError::Exchange {
            url: self.url.clone(),
            detail,
        };
        let id = since.to_string();
        let resp = self
            .send(
                "GET",
                "/v1/events",
                None,
                &[("last-event-id", &id), ("accept", "text/event-stream")],
            )
            .await?;
        if resp.status().as_u16() != 200 {
            return Err(exchange(format!("event stream answered {}", resp.status())));
        }
        let mut body = resp.into_body();
        let mut buf = String::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| exchange(e.to_string()))?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            buf.push_str(&String::from_utf8_lossy(data));
            while let Some(end) = buf.find("\n\n") {
                let block: String = buf.drain(..end + 2).collect();
                let json: String = block
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(str::trim_start)
                    .collect();
                if json.is_empty() {
                    continue; // keep-alive comment
                }
                if let Ok(e) = serde_json::from_str::<Event>(&json) {
                    if !each(e) {
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    }
}
