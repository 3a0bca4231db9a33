//! How the guest reaches the agent: in-process, or over its HTTP API.
//!
//! Both forms answer with the same [`ErrorBody`] codes, so the volume logic
//! above never knows which one it talks to.

use std::sync::Arc;
use std::time::Duration;

use hyper::{Method, StatusCode};
use serde::de::DeserializeOwned;
use vmdk_agent::service::{Caller, NameList, NamesKey};
use vmdk_agent::VolumeService;
use vmdk_protocol::{
    agent as paths, AttachInfo, CreateRequest, ErrorBody, ErrorCode, FormattedRequest, VersionInfo, VolumeInfo,
    VolumeList, VM_ID_HEADER,
};

use crate::http1::{self, Endpoint};

const QUERY_TIMEOUT: Duration = Duration::from_secs(60);
const MUTATE_TIMEOUT: Duration = Duration::from_secs(300);

/// A failed agent call.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AgentCallError {
    /// The agent answered with an error.
    #[error("{0}")]
    Api(ErrorBody),
    /// The agent could not be reached or answered garbage.
    #[error("cannot reach vmdk agent: {0}")]
    Transport(String),
}

impl AgentCallError {
    /// The agent's error code, if it answered.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Api(b) => Some(b.code),
            Self::Transport(_) => None,
        }
    }
}

/// The agent the plugin talks to.
#[derive(Debug, Clone)]
pub enum AgentClient {
    /// The agent runs in this process.
    Embedded(Arc<VolumeService>),
    /// A `vmdk-agent serve` reached over HTTP.
    Http(Endpoint),
}

impl AgentClient {
    /// The caller an embedded agent serves: this VM.
    fn caller(vm: &str) -> Result<Caller, AgentCallError> {
        Caller::vm(vm).map_err(Self::api)
    }

    fn api(e: vmdk_agent::AgentError) -> AgentCallError {
        AgentCallError::Api(e.to_body())
    }

    /// An embedded agent's operation, timed for
    /// `vmdk_agent_operation_duration_seconds` (a separate agent times its
    /// own).
    async fn timed<T>(
        op: &'static str,
        f: impl std::future::Future<Output = Result<T, vmdk_agent::AgentError>>,
    ) -> Result<T, AgentCallError> {
        let start = std::time::Instant::now();
        let r = f.await;
        vmdk_common::metrics::agent_operation(op, r.is_ok(), start.elapsed().as_secs_f64());
        r.map_err(Self::api)
    }

    async fn call<T: DeserializeOwned>(
        ep: &Endpoint,
        method: Method,
        path: &str,
        vm: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Option<T>, AgentCallError> {
        let (status, bytes) = http1::request(ep, method, path, &[(VM_ID_HEADER, vm)], body, timeout)
            .await
            .map_err(|e| AgentCallError::Transport(e.to_string()))?;
        if status.is_success() {
            if status == StatusCode::NO_CONTENT {
                return Ok(None);
            }
            return serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| AgentCallError::Transport(format!("bad response from {ep}{path}: {e}")));
        }
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(b) => Err(AgentCallError::Api(b)),
            Err(_) => Err(AgentCallError::Transport(format!(
                "{ep}{path} answered {status}: {}",
                String::from_utf8_lossy(&bytes)
            ))),
        }
    }

    fn must<T>(v: Option<T>, what: &str) -> Result<T, AgentCallError> {
        v.ok_or_else(|| AgentCallError::Transport(format!("empty response to {what}")))
    }

    /// `GET /v1/version`.
    pub async fn version(&self, vm: &str) -> Result<VersionInfo, AgentCallError> {
        match self {
            Self::Embedded(s) => Ok(s.version_for(&Self::caller(vm)?).await),
            Self::Http(ep) => Self::must(
                Self::call(ep, Method::GET, paths::PATH_VERSION, vm, None, QUERY_TIMEOUT).await?,
                "version",
            ),
        }
    }

    /// `GET /v1/volumes`.
    pub async fn list(&self, vm: &str) -> Result<Vec<VolumeInfo>, AgentCallError> {
        match self {
            Self::Embedded(s) => Self::timed("list", s.list(&Self::caller(vm)?)).await,
            Self::Http(ep) => Self::must(
                Self::call::<VolumeList>(ep, Method::GET, paths::PATH_VOLUMES, vm, None, QUERY_TIMEOUT).await?,
                "list",
            )
            .map(|l| l.volumes),
        }
    }

    /// The volumes attached to `vm` by the agent's live view and records
    /// (`GET /v1/volumes?attached=self`): the agent reads only those.
    pub async fn list_attached(&self, vm: &str) -> Result<Vec<VolumeInfo>, AgentCallError> {
        let all = match self {
            Self::Embedded(s) => return s.list_attached(&Self::caller(vm)?).await.map_err(Self::api),
            // An agent that predates the query lists every volume.
            Self::Http(ep) => {
                Self::must(
                    Self::call::<VolumeList>(
                        ep,
                        Method::GET,
                        &format!("{}?{}", paths::PATH_VOLUMES, paths::QUERY_ATTACHED_HERE),
                        vm,
                        None,
                        QUERY_TIMEOUT,
                    )
                    .await?,
                    "list",
                )?
                .volumes
            }
        };
        Ok(all
            .into_iter()
            .filter(|v| v.status == vmdk_protocol::AttachStatus::Attached && v.attached_to.as_deref() == Some(vm))
            .collect())
    }

    /// The names [`AgentClient::list`] lists, as `(vol@ds, vol, ds)`, or
    /// `None` when they are those of the list whose key was `known` (see
    /// [`vmdk_agent::service::VolumeService::list_names_since`]). An
    /// embedded agent answers from its catalog without building each
    /// volume's details; a separate agent sends every volume, and its lists
    /// have no key.
    pub async fn list_names_since(
        &self,
        vm: &str,
        known: Option<&NamesKey>,
    ) -> Result<Option<NameList>, AgentCallError> {
        match self {
            Self::Embedded(s) => s.list_names_since(&Self::caller(vm)?, known).await.map_err(Self::api),
            Self::Http(_) => Ok(Some(NameList {
                key: None,
                names: self
                    .list(vm)
                    .await?
                    .into_iter()
                    .map(|v| (v.name, v.volume, v.datastore))
                    .collect(),
            })),
        }
    }

    /// `GET /v1/volumes/{name}`.
    pub async fn get(&self, vm: &str, name: &str) -> Result<VolumeInfo, AgentCallError> {
        match self {
            Self::Embedded(s) => Self::timed("get", s.get(&Self::caller(vm)?, name)).await,
            Self::Http(ep) => Self::must(
                Self::call(ep, Method::GET, &paths::volume_path(name), vm, None, QUERY_TIMEOUT).await?,
                "get",
            ),
        }
    }

    /// `POST /v1/volumes`.
    pub async fn create(&self, vm: &str, req: CreateRequest) -> Result<VolumeInfo, AgentCallError> {
        match self {
            Self::Embedded(s) => Self::timed("create", s.create(&Self::caller(vm)?, &req)).await,
            Self::Http(ep) => {
                let body = serde_json::to_vec(&req).expect("request serializes");
                Self::must(
                    Self::call(ep, Method::POST, paths::PATH_VOLUMES, vm, Some(body), MUTATE_TIMEOUT).await?,
                    "create",
                )
            }
        }
    }

    /// `DELETE /v1/volumes/{name}`.
    pub async fn remove(&self, vm: &str, name: &str) -> Result<(), AgentCallError> {
        match self {
            Self::Embedded(s) => Self::timed("remove", s.remove(&Self::caller(vm)?, name)).await,
            Self::Http(ep) => {
                Self::call::<serde_json::Value>(ep, Method::DELETE, &paths::volume_path(name), vm, None, MUTATE_TIMEOUT)
                    .await
                    .map(|_| ())
            }
        }
    }

    /// `POST /v1/volumes/{name}/attach`.
    pub async fn attach(&self, vm: &str, name: &str) -> Result<AttachInfo, AgentCallError> {
        match self {
            Self::Embedded(s) => Self::timed("attach", s.attach(&Self::caller(vm)?, name)).await,
            Self::Http(ep) => Self::must(
                Self::call(
                    ep,
                    Method::POST,
                    &paths::volume_action_path(name, "attach"),
                    vm,
                    Some(b"{}".to_vec()),
                    MUTATE_TIMEOUT,
                )
                .await?,
                "attach",
            ),
        }
    }

    /// `POST /v1/volumes/{name}/detach`.
    pub async fn detach(&self, vm: &str, name: &str) -> Result<(), AgentCallError> {
        match self {
            Self::Embedded(s) => Self::timed("detach", s.detach(&Self::caller(vm)?, name)).await,
            Self::Http(ep) => Self::call::<serde_json::Value>(
                ep,
                Method::POST,
                &paths::volume_action_path(name, "detach"),
                vm,
                Some(b"{}".to_vec()),
                MUTATE_TIMEOUT,
            )
            .await
            .map(|_| ()),
        }
    }

    /// `POST /v1/volumes/{name}/formatted`: records that this VM made (or
    /// found) a filesystem of `fstype` on the attached disk.
    pub async fn mark_formatted(&self, vm: &str, name: &str, fstype: &str) -> Result<VolumeInfo, AgentCallError> {
        match self {
            Self::Embedded(s) => Self::timed("formatted", s.mark_formatted(&Self::caller(vm)?, name, fstype)).await,
            Self::Http(ep) => {
                let body = serde_json::to_vec(&FormattedRequest {
                    fstype: fstype.to_owned(),
                })
                .expect("request serializes");
                Self::must(
                    Self::call(
                        ep,
                        Method::POST,
                        &paths::volume_action_path(name, "formatted"),
                        vm,
                        Some(body),
                        MUTATE_TIMEOUT,
                    )
                    .await?,
                    "formatted",
                )
            }
        }
    }
}
