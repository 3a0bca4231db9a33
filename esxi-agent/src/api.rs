//! The agent HTTP/JSON API v1 (axum). Handlers only extract, call the
//! [`VolumeService`] on a blocking thread, and map the result; status codes
//! come from one exhaustive match in [`status_of`].

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use vmdk_protocol::{CreateRequest, ErrorBody, ErrorCode, FormattedRequest, VolumeList, VM_ID_HEADER};

use crate::error::AgentError;
use crate::service::VolumeService;

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
        ErrorCode::AlreadyExists | ErrorCode::InUse | ErrorCode::AttachedElsewhere => StatusCode::CONFLICT,
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
        } else {
            tracing::info!(code = %self.0.code, message = %self.0.message, "request refused");
        }
        (status, Json(self.0)).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

fn vm_id(headers: &HeaderMap) -> Result<String, AgentError> {
    let v = headers
        .get(VM_ID_HEADER)
        .ok_or_else(|| AgentError::MissingVmId(format!("the {VM_ID_HEADER} header names the calling VM")))?;
    let v = v
        .to_str()
        .map_err(|_| AgentError::MissingVmId("the header is not valid ASCII".into()))?;
    crate::service::validate_vm_id(v)?;
    Ok(v.to_owned())
}

/// Decodes a JSON request body (empty means the default): a pure function
/// of the bytes that never panics.
pub fn json_body<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, AgentError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| AgentError::InvalidRequest(format!("malformed JSON body: {e}")))
}

async fn blocking<T: Send + 'static>(
    svc: &Arc<VolumeService>,
    f: impl FnOnce(&VolumeService) -> Result<T, AgentError> + Send + 'static,
) -> ApiResult<T> {
    let svc = svc.clone();
    tokio::task::spawn_blocking(move || f(&svc))
        .await
        .map_err(|e| ApiError::from(AgentError::Internal(format!("worker failed: {e}"))))?
        .map_err(ApiError::from)
}

async fn version(State(svc): State<Arc<VolumeService>>) -> impl IntoResponse {
    Json(svc.version())
}

async fn list(State(svc): State<Arc<VolumeService>>) -> ApiResult<impl IntoResponse> {
    let volumes = blocking(&svc, |s| s.list()).await?;
    Ok(Json(VolumeList { volumes }))
}

async fn create(
    State(svc): State<Arc<VolumeService>>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let vm = vm_id(&headers)?;
    let req: CreateRequest = json_body(&body)?;
    let info = blocking(&svc, move |s| s.create(&vm, &req)).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

async fn get_one(State(svc): State<Arc<VolumeService>>, Path(name): Path<String>) -> ApiResult<impl IntoResponse> {
    Ok(Json(blocking(&svc, move |s| s.get(&name)).await?))
}

async fn remove(
    State(svc): State<Arc<VolumeService>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let vm = vm_id(&headers)?;
    blocking(&svc, move |s| s.remove(&vm, &name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn attach(
    State(svc): State<Arc<VolumeService>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let vm = vm_id(&headers)?;
    Ok(Json(blocking(&svc, move |s| s.attach(&vm, &name)).await?))
}

async fn detach(
    State(svc): State<Arc<VolumeService>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let vm = vm_id(&headers)?;
    blocking(&svc, move |s| s.detach(&vm, &name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn formatted(
    State(svc): State<Arc<VolumeService>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let vm = vm_id(&headers)?;
    let req: FormattedRequest = json_body(&body)?;
    Ok(Json(
        blocking(&svc, move |s| s.mark_formatted(&vm, &name, &req.fstype)).await?,
    ))
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
}
