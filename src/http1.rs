//! A minimal HTTP/1.1 client over unix sockets or TCP, used for the agent
//! API and the Docker Engine API. One connection per request keeps it
//! stateless: a restarted server is simply dialled again.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A unix socket path.
    Unix(PathBuf),
    /// `host:port`.
    Tcp(String),
}

impl Endpoint {
    /// Parses `unix:///path` or `http://host:port`.
    pub fn parse(url: &str) -> Result<Self, String> {
        if let Some(path) = url.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(format!(
                    "invalid agent URL {url:?}: unix:// needs an absolute path, e.g. unix:///run/vmdk/agent.sock"
                ));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = url.strip_prefix("http://") {
            let host = rest.trim_end_matches('/');
            if host.is_empty() || host.contains('/') {
                return Err(format!("invalid agent URL {url:?}: expected http://host:port"));
            }
            let host = if host.contains(':') {
                host.to_owned()
            } else {
                format!("{host}:80")
            };
            return Ok(Self::Tcp(host));
        }
        Err(format!(
            "invalid agent URL {url:?}: expected unix:///path or http://host:port"
        ))
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(p) => write!(f, "unix://{}", p.display()),
            Self::Tcp(h) => write!(f, "http://{h}"),
        }
    }
}

/// A transport failure: the server could not be reached or did not answer.
#[derive(Debug, thiserror::Error)]
#[error("{method} {endpoint}{path}: {reason}")]
pub struct TransportError {
    /// Method.
    pub method: Method,
    /// Server.
    pub endpoint: String,
    /// Path.
    pub path: String,
    /// What went wrong.
    pub reason: String,
}

/// Sends one request and returns status and body.
pub async fn request(
    endpoint: &Endpoint,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<(StatusCode, Bytes), TransportError> {
    let err = |reason: String| TransportError {
        method: method.clone(),
        endpoint: endpoint.to_string(),
        path: path.to_owned(),
        reason,
    };
    let fut = async {
        let (host, sender) = match endpoint {
            Endpoint::Unix(p) => {
                let s = tokio::net::UnixStream::connect(p)
                    .await
                    .map_err(|e| err(format!("connect: {e}")))?;
                (
                    "localhost".to_owned(),
                    handshake(s).await.map_err(|e| err(format!("handshake: {e}")))?,
                )
            }
            Endpoint::Tcp(h) => {
                let s = tokio::net::TcpStream::connect(h)
                    .await
                    .map_err(|e| err(format!("connect: {e}")))?;
                let _ = s.set_nodelay(true);
                (
                    h.clone(),
                    handshake(s).await.map_err(|e| err(format!("handshake: {e}")))?,
                )
            }
        };
        let mut sender = sender;
        let mut req = Request::builder().method(method.clone()).uri(path).header("Host", host);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let has_body = body.is_some();
        if has_body {
            req = req.header("Content-Type", "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| err(format!("build request: {e}")))?;
        let resp = sender.send_request(req).await.map_err(|e| err(format!("send: {e}")))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| err(format!("read body: {e}")))?
            .to_bytes();
        Ok((status, bytes))
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(err(format!("no answer within {}s", timeout.as_secs()))),
    }
}

async fn handshake<S>(stream: S) -> hyper::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        assert_eq!(
            Endpoint::parse("unix:///run/a.sock").unwrap(),
            Endpoint::Unix("/run/a.sock".into())
        );
        assert_eq!(
            Endpoint::parse("http://127.0.0.1:7981").unwrap(),
            Endpoint::Tcp("127.0.0.1:7981".into())
        );
        assert_eq!(
            Endpoint::parse("http://agent").unwrap(),
            Endpoint::Tcp("agent:80".into())
        );
        for bad in ["unix://rel", "ftp://x", "http://", "http://a/b", "/run/a.sock"] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }
}
