//! The agent HTTP/JSON API v1 (axum). Handlers only extract (the caller
//! comes from [`Caller`]'s extractor), call the [`VolumeService`], and map
//! the result; status codes come from one exhaustive match in
//! [`status_of`].

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use vmdk_protocol::{CreateRequest, ErrorBody, ErrorCode, FormattedRequest, VolumeList, VM_ID_HEADER};

use crate::error::AgentError;
use crate::service::{Caller, VolumeService};

/// The HTTP status for each wire code.
pub fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::InvalidRequest
        | ErrorCode::InvalidName
        | ErrorCode::InvalidOption
        | ErrorCode::UnknownDatastore
        | ErrorCode::InvalidPolicy
        | ErrorCode::MissingVmId => StatusCode::BAD_REQUEST,
        ErrorCode::NotFound | ErrorCode::UnknownRoute => StatusCode::NOT_FOUND,
        ErrorCode::AlreadyExists | ErrorCode::InUse | ErrorCode::AttachedElsewhere | ErrorCode::NoFreeSlot => {
            StatusCode::CONFLICT
        }
        ErrorCode::Timeout => StatusCode::GATEWAY_TIMEOUT,
        ErrorCode::Backend | ErrorCode::Io | ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// An error on its way to the wire.
#[derive(Debug)]
pub struct ApiError(pub ErrorBody);

impl From<AgentError> for ApiError {
    fn from(e: AgentError) -> Self {
        Self(e.to_body())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = status_of(self.0.code);
        if status.is_server_error() {
            tracing::error!(code = %self.0.code, message = %self.0.message, "request failed");
        } else if self.0.code == ErrorCode::NotFound {
            // Docker looks up every volume before creating it: "no such
            // volume" is the expected answer there, not a refusal.
            tracing::debug!(code = %self.0.code, message = %self.0.message, "not found");
        } else {
            tracing::info!(code = %self.0.code, message = %self.0.message, "request refused");
        }
        (status, Json(self.0)).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// The caller of an API request: the VM the `VM-Id` header names. The one
/// place the API decides who calls (the tenancy issue derives it from the
/// guest's credentials instead).
impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let v = parts
            .headers
            .get(VM_ID_HEADER)
            .ok_or_else(|| AgentError::MissingVmId(format!("the {VM_ID_HEADER} header names the calling VM")))?;
        let v = v
            .to_str()
            .map_err(|_| AgentError::MissingVmId("the header is not valid ASCII".into()))?;
        Ok(Caller::vm(v)?)
    }
}

/// Decodes a JSON request body (empty means the default): a pure function
/// of the bytes that never panics.
pub fn json_body<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, AgentError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| AgentError::InvalidRequest(format!("malformed JSON body: {e}")))
}

type Svc = State<Arc<VolumeService>>;

async fn version(State(svc): Svc, headers: HeaderMap) -> ApiResult<impl IntoResponse> {
    let caller = reader(&headers)?;
    Ok(Json(svc.version_for(&caller).await))
}

/// Reads name no VM: they are answered for any caller (a `VM-Id` is
/// optional), as Docker's Get and List are.
fn reader(headers: &HeaderMap) -> Result<Caller, ApiError> {
    match headers.get(VM_ID_HEADER) {
        None => Ok(Caller::Admin),
        Some(v) => {
            Ok(Caller::vm(v.to_str().map_err(|_| {
                AgentError::MissingVmId("the header is not valid ASCII".into())
            })?)?)
        }
    }
}

async fn list(State(svc): Svc, headers: HeaderMap, uri: axum::http::Uri) -> ApiResult<impl IntoResponse> {
    let caller = reader(&headers)?;
    let attached_here = uri
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == vmdk_protocol::agent::QUERY_ATTACHED_HERE));
    let volumes = if attached_here {
        svc.list_attached(&caller).await?
    } else {
        svc.list(&caller).await?
    };
    let big = volumes.len() >= vmdk_common::memory::TRIM_VOLUMES;
    // Serialized (and the list freed) here, so the trim finds it free.
    let resp = Json(VolumeList { volumes }).into_response();
    if big {
        vmdk_common::memory::trim();
    }
    Ok(resp)
}

async fn create(State(svc): Svc, caller: Caller, body: Bytes) -> ApiResult<impl IntoResponse> {
    let req: CreateRequest = json_body(&body)?;
    vmdk_common::logging::record_request(&req.name, "");
    let res = svc.create(&caller, &req).await;
    crate::obs::audit(&caller, "create", &req.name, &res);
    Ok((StatusCode::CREATED, Json(res?)))
}

async fn get_one(State(svc): Svc, headers: HeaderMap, Path(name): Path<String>) -> ApiResult<impl IntoResponse> {
    vmdk_common::logging::record_request(&name, "");
    let caller = reader(&headers)?;
    Ok(Json(svc.get(&caller, &name).await?))
}

async fn remove(State(svc): Svc, caller: Caller, Path(name): Path<String>) -> ApiResult<impl IntoResponse> {
    vmdk_common::logging::record_request(&name, "");
    let res = svc.remove(&caller, &name).await;
    crate::obs::audit(&caller, "remove", &name, &res);
    res?;
    Ok(StatusCode::NO_CONTENT)
}

async fn attach(State(svc): Svc, caller: Caller, Path(name): Path<String>) -> ApiResult<impl IntoResponse> {
    vmdk_common::logging::record_request(&name, "");
    let res = svc.attach(&caller, &name).await;
    crate::obs::audit(&caller, "attach", &name, &res);
    Ok(Json(res?))
}

async fn detach(State(svc): Svc, caller: Caller, Path(name): Path<String>) -> ApiResult<impl IntoResponse> {
    vmdk_common::logging::record_request(&name, "");
    let res = svc.detach(&caller, &name).await;
    crate::obs::audit(&caller, "detach", &name, &res);
    res?;
    Ok(StatusCode::NO_CONTENT)
}

async fn formatted(
    State(svc): Svc,
    caller: Caller,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    vmdk_common::logging::record_request(&name, "");
    let req: FormattedRequest = json_body(&body)?;
    let res = svc.mark_formatted(&caller, &name, &req.fstype).await;
    crate::obs::audit(&caller, "formatted", &name, &res);
    Ok(Json(res?))
}

async fn no_route() -> ApiError {
    ApiError(ErrorBody::new(
        ErrorCode::UnknownRoute,
        "no such route; see docs/agent-api.md (routes live under /v1)",
    ))
}

/// The `/v1` router.
pub fn router(svc: Arc<VolumeService>) -> Router {
    Router::new()
        .route("/v1/version", get(version))
        .route("/v1/volumes", get(list).post(create))
        .route("/v1/volumes/{name}", get(get_one).delete(remove))
        .route("/v1/volumes/{name}/attach", post(attach))
        .route("/v1/volumes/{name}/detach", post(detach))
        .route("/v1/volumes/{name}/formatted", post(formatted))
        .fallback(no_route)
        .with_state(svc)
        .layer(axum::middleware::from_fn(crate::obs::track))
}
