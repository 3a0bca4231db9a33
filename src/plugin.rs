//! Docker's volume plugin protocol (v1) over HTTP on a unix socket.
//!
//! Docker calls `POST /Plugin.Activate` and `POST /VolumeDriver.<Method>`
//! with no Content-Type, sometimes an empty body, and `"Opts": null`; the
//! [`DockerRequest`] decoding here accepts exactly that. Handlers translate
//! to [`VolumeManager`] calls and back; errors become HTTP 500 with
//! `{"Err": "<cause chain>"}`, which Docker shows as
//! `VolumeDriver.<Method>: <Err>`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::volume::{inspect_status, PluginError, VolumeManager};
use vmdk_protocol::ErrorCode;

/// Content type of every response.
pub const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1.1+json";

/// The fields Docker sends to any VolumeDriver endpoint.
#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
pub struct DockerRequest {
    /// Volume name.
    #[serde(rename = "Name", default)]
    pub name: String,
    /// Create options; `null` and absent both mean none. A key given
    /// twice is refused (never "the last wins").
    #[serde(
        rename = "Opts",
        default,
        deserialize_with = "vmdk_protocol::options::unique_map_or_null"
    )]
    pub opts: Option<BTreeMap<String, String>>,
    /// Mount ID (Mount, Unmount).
    #[serde(rename = "ID", default)]
    pub id: String,
}

/// A volume in Get's answer; `S` is its `Status`. Keys in byte order, as
/// the `json!` maps before it had them.
#[derive(Debug, Serialize)]
struct DockerVolume<'a, S> {
    #[serde(rename = "CreatedAt", skip_serializing_if = "Option::is_none")]
    created_at: Option<&'a str>,
    #[serde(rename = "Mountpoint")]
    mountpoint: &'a str,
    #[serde(rename = "Name")]
    name: &'a str,
    #[serde(rename = "Status")]
    status: S,
}

fn reply(status: StatusCode, body: Value) -> Response {
    (status, [(header::CONTENT_TYPE, CONTENT_TYPE)], body.to_string()).into_response()
}

fn ok(body: Value) -> Response {
    reply(StatusCode::OK, body)
}

/// Get's answer, serialized straight from the volume (no tree of values in
/// between): keys in the order `json!` gave them, sorted.
#[derive(Serialize)]
struct GetReply<'a, S> {
    #[serde(rename = "Err")]
    err: &'a str,
    #[serde(rename = "Volume")]
    volume: &'a DockerVolume<'a, S>,
}

fn ok_volume<S: Serialize>(v: &DockerVolume<'_, S>) -> Response {
    match serde_json::to_vec(&GetReply { err: "", volume: v }) {
        Ok(body) => (StatusCode::OK, [(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response(),
        Err(e) => err("VolumeDriver.Get", format!("cannot encode the volume: {e}")),
    }
}

fn err(method: &str, msg: String) -> Response {
    tracing::warn!(method, error = %msg, "request failed");
    reply(StatusCode::INTERNAL_SERVER_ERROR, json!({ "Err": msg }))
}

/// Decodes the body of any `VolumeDriver.*` request as Docker sends it: no
/// body, whitespace, or a JSON object with `Name`, `Opts` (`null` allowed)
/// and `ID`; unknown fields are ignored, a key given twice is refused. A
/// pure function that never panics; the error text says what was wrong and
/// what is expected.
pub fn decode_request(body: &[u8]) -> Result<DockerRequest, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(DockerRequest::default());
    }
    serde_json::from_slice::<DockerRequest>(body)
        .map_err(|e| format!("{e}; expected JSON like {{\"Name\": \"vol\", \"Opts\": {{\"size\": \"10gb\"}}}}"))
}

/// Decodes a Docker request body. `needs_name`: an empty body or name is an
/// error (Create, Remove, Mount, Unmount), because a retried request may
/// arrive with its body already consumed.
fn decode(method: &str, body: &Bytes, needs_name: bool) -> Result<DockerRequest, Response> {
    let req = decode_request(body).map_err(|e| err(method, format!("malformed request body for {method}: {e}")))?;
    vmdk_common::logging::record_request(&req.name, &req.id);
    if needs_name && req.name.is_empty() {
        return Err(err(
            method,
            format!("{method} request has no volume name (empty body or \"Name\"); expected {{\"Name\": \"vol\"}}"),
        ));
    }
    Ok(req)
}

type Mgr = State<Arc<VolumeManager>>;

async fn activate() -> Response {
    ok(json!({"Implements": ["VolumeDriver"]}))
}

async fn capabilities() -> Response {
    ok(json!({"Capabilities": {"Scope": "global"}}))
}

async fn create(State(m): Mgr, body: Bytes) -> Response {
    const M: &str = "VolumeDriver.Create";
    let req = match decode(M, &body, true) {
        Ok(r) => r,
        Err(e) => return e,
    };
    tracing::info!(volume = %req.name, opts = ?req.opts, "{M}");
    let res = m.create(&req.name, req.opts.unwrap_or_default()).await;
    crate::obs::audit(M, &req.name, &res);
    match res {
        Ok(()) => ok(json!({"Err": ""})),
        Err(e) => err(M, crate::error_chain(&e)),
    }
}

async fn remove(State(m): Mgr, body: Bytes) -> Response {
    const M: &str = "VolumeDriver.Remove";
    let req = match decode(M, &body, true) {
        Ok(r) => r,
        Err(e) => return e,
    };
    tracing::info!(volume = %req.name, "{M}");
    let res = m.remove(&req.name).await;
    crate::obs::audit(M, &req.name, &res);
    match res {
        Ok(()) => ok(json!({"Err": ""})),
        Err(e) => err(M, crate::error_chain(&e)),
    }
}

async fn mount(State(m): Mgr, body: Bytes) -> Response {
    const M: &str = "VolumeDriver.Mount";
    let req = match decode(M, &body, true) {
        Ok(r) => r,
        Err(e) => return e,
    };
    if req.id.is_empty() {
        return err(M, "VolumeDriver.Mount request has no \"ID\"".into());
    }
    tracing::info!(volume = %req.name, id = %req.id, "{M}");
    let res = m.mount(&req.name, &req.id).await;
    crate::obs::audit(M, &req.name, &res);
    match res {
        Ok(mp) => ok(json!({"Mountpoint": mp, "Err": ""})),
        Err(e) => err(M, crate::error_chain(&e)),
    }
}

async fn unmount(State(m): Mgr, body: Bytes) -> Response {
    const M: &str = "VolumeDriver.Unmount";
    let req = match decode(M, &body, true) {
        Ok(r) => r,
        Err(e) => return e,
    };
    tracing::info!(volume = %req.name, id = %req.id, "{M}");
    let res = m.unmount(&req.name, &req.id).await;
    crate::obs::audit(M, &req.name, &res);
    match res {
        Ok(()) => ok(json!({"Err": ""})),
        Err(e) => err(M, crate::error_chain(&e)),
    }
}

async fn path(State(m): Mgr, body: Bytes) -> Response {
    const M: &str = "VolumeDriver.Path";
    let req = match decode(M, &body, false) {
        Ok(r) => r,
        Err(e) => return e,
    };
    if req.name.is_empty() {
        return ok(json!({"Mountpoint": "", "Err": ""}));
    }
    match m.path(&req.name).await {
        Ok(mp) => ok(json!({"Mountpoint": mp, "Err": ""})),
        Err(e) => err(M, crate::error_chain(&e)),
    }
}

async fn get(State(m): Mgr, body: Bytes) -> Response {
    const M: &str = "VolumeDriver.Get";
    let req = match decode(M, &body, false) {
        Ok(r) => r,
        Err(e) => return e,
    };
    if req.name.is_empty() {
        return ok(json!({"Volume": null, "Err": ""}));
    }
    match m.get(&req.name).await {
        Ok(Some(info)) => {
            let rec = m.record(&info.name);
            let mountpoint = match m.mountpoint(&info.name) {
                Ok(mp) => mp,
                Err(e) => return err(M, crate::error_chain(&e)),
            };
            let v = DockerVolume {
                name: &req.name,
                mountpoint: &mountpoint.to_string_lossy(),
                created_at: Some(&info.created),
                status: inspect_status(&info, rec.as_ref()),
            };
            ok_volume(&v)
        }
        Ok(None) => ok(json!({"Volume": null, "Err": ""})),
        Err(e) => {
            // Docker treats any Get error as "no such volume" and drops its
            // record. So a volume known to exist is reported with the
            // failure in its Status instead: one this VM has mounted (from
            // the local state), or one whose files the agent found but could
            // not read (a damaged sidecar or descriptor).
            let full = m.full_name_hint(&req.name).await;
            let rec = m.record(&full);
            let exists_but_damaged = matches!(
                &e,
                PluginError::Agent { source, .. } if matches!(source.code(), Some(ErrorCode::Io | ErrorCode::Backend))
            );
            let mountpoint = match m.mountpoint(&full) {
                Ok(mp) if rec.is_some() || exists_but_damaged => mp,
                _ => return err(M, crate::error_chain(&e)),
            };
            let mut status = serde_json::Map::new();
            status.insert("health".into(), json!("degraded"));
            status.insert("error".into(), json!(crate::error_chain(&e)));
            status.insert("mounts".into(), json!(rec.map_or(0, |r| r.ids.len())));
            let v = DockerVolume {
                name: &req.name,
                mountpoint: &mountpoint.to_string_lossy(),
                created_at: None,
                status,
            };
            ok_volume(&v)
        }
    }
}

/// The List answer, serialized from the manager's list as it is (800 KB of
/// JSON at 10,000 volumes, written into one buffer with no tree of values
/// in between). Keys in the order `json!` gave them: sorted.
#[derive(Serialize)]
struct ListReply<'a> {
    #[serde(rename = "Err")]
    err: &'a str,
    #[serde(rename = "Volumes")]
    volumes: Listed<'a>,
}

/// `[{"Mountpoint": ..., "Name": ...}, ...]` of `(name, mountpoint)` pairs.
struct Listed<'a>(&'a [(String, std::path::PathBuf)]);

impl Serialize for Listed<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Item<'a> {
            #[serde(rename = "Mountpoint", serialize_with = "shown")]
            mountpoint: &'a std::path::Path,
            #[serde(rename = "Name")]
            name: &'a str,
        }
        s.collect_seq(self.0.iter().map(|(name, mp)| Item { mountpoint: mp, name }))
    }
}

/// A path as `Path::display` shows it (what the answer always carried).
fn shown<S: serde::Serializer>(p: &&std::path::Path, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&p.display())
}

/// The List answer's JSON for `vols`.
fn encode_list(vols: &[(String, std::path::PathBuf)]) -> Result<Vec<u8>, serde_json::Error> {
    let size = 32
        + vols
            .iter()
            .map(|(n, mp)| n.len() + mp.as_os_str().len() + 32)
            .sum::<usize>();
    let mut body = Vec::with_capacity(size);
    let reply = ListReply {
        err: "",
        volumes: Listed(vols),
    };
    serde_json::to_writer(&mut body, &reply)?;
    Ok(body)
}

async fn list(State(m): Mgr) -> Response {
    const M: &str = "VolumeDriver.List";
    match m.list_answer(encode_list).await {
        Ok(Ok(body)) => (StatusCode::OK, [(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response(),
        Ok(Err(e)) => err(M, format!("cannot encode the volume list: {e}")),
        Err(e) => err(M, crate::error_chain(&e)),
    }
}

/// `GET /v1/version`, the agent API's version call, answered for the
/// embedded agent so that `vmdk-agent status` can tell it serves (see
/// docs/admin-cli.md). Docker never calls it.
async fn agent_version(State(m): Mgr) -> Response {
    match m.embedded_agent() {
        Some(svc) => {
            let mut v = svc.version();
            v.embedded_in = Some("vmdk-plugin".into());
            reply(StatusCode::OK, json!(v))
        }
        None => reply(
            StatusCode::NOT_FOUND,
            json!({"Err": "this plugin uses a separate vmdk-agent (--agent); ask that agent"}),
        ),
    }
}

/// `GET /v1/volumes`, the agent API's list, answered for the embedded
/// agent so that `vmdk-agent ls` on this host reads its catalog instead of
/// every volume's files (see docs/admin-cli.md). Docker never calls it.
async fn agent_list(State(m): Mgr) -> Response {
    let Some(svc) = m.embedded_agent() else {
        return reply(
            StatusCode::NOT_FOUND,
            json!({"Err": "this plugin uses a separate vmdk-agent (--agent); ask that agent"}),
        );
    };
    match svc.list(&vmdk_agent::service::Caller::Admin).await {
        Ok(volumes) => reply(StatusCode::OK, json!(vmdk_protocol::VolumeList { volumes })),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"Err": vmdk_agent::error::error_chain(&e)}),
        ),
    }
}

async fn unknown(uri: axum::http::Uri) -> Response {
    reply(
        StatusCode::NOT_FOUND,
        json!({"Err": format!("{} is not a Docker volume plugin endpoint", uri.path())}),
    )
}

/// The plugin router.
pub fn router(manager: Arc<VolumeManager>) -> Router {
    Router::new()
        .route("/Plugin.Activate", post(activate))
        .route("/VolumeDriver.Capabilities", post(capabilities))
        .route("/VolumeDriver.Create", post(create))
        .route("/VolumeDriver.Remove", post(remove))
        .route("/VolumeDriver.Mount", post(mount))
        .route("/VolumeDriver.Unmount", post(unmount))
        .route("/VolumeDriver.Path", post(path))
        .route("/VolumeDriver.Get", post(get))
        .route("/VolumeDriver.List", post(list))
        .route(vmdk_protocol::PATH_VERSION, axum::routing::get(agent_version))
        .route(vmdk_protocol::PATH_VOLUMES, axum::routing::get(agent_list))
        .fallback(unknown)
        .with_state(manager)
        .layer(axum::middleware::from_fn(crate::obs::track))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_what_docker_sends() {
        let r = decode("x", &Bytes::from_static(b"{\"Name\":\"v\",\"Opts\":null}\n"), true).unwrap();
        assert_eq!(r.name, "v");
        assert_eq!(r.opts, None);
        let r = decode("x", &Bytes::from_static(b""), false).unwrap();
        assert_eq!(r, DockerRequest::default());
        assert!(decode("x", &Bytes::from_static(b""), true).is_err());
        assert!(decode("x", &Bytes::from_static(b"{\"Name\": 5}"), false).is_err());
        let r = decode(
            "x",
            &Bytes::from_static(b"{\"Name\":\"v\",\"ID\":\"abc\",\"Extra\":1}"),
            true,
        )
        .unwrap();
        assert_eq!(r.id, "abc");
        // A key given twice has no single meaning (it once meant the last).
        let e = decode_request(br#"{"Name":"v","Opts":{"size":"1gb","size":"100gb"}}"#).unwrap_err();
        assert!(e.contains("option \"size\" is given more than once"), "{e}");
        assert!(decode_request(br#"{"Name":"v","Name":"w"}"#).is_err());
    }
}
