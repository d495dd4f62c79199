//! The signed file routes: `PUT /upload/...` receives a model file as a stream, `GET
//! /download/...` sends one. The URL's signature is the authorisation.

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use tokio_util::io::ReaderStream;

use super::{empty, AppState};
use crate::error::{ApiError, ApiResult};
use crate::params::Params;

struct Signed {
    size: u64,
    expires: i64,
    sig: String,
}

fn signed(q: Option<&str>, with_size: bool) -> ApiResult<Signed> {
    let mut p = Params::parse(q)?;
    let sig = p
        .str("sig")
        .ok_or_else(|| ApiError::new(hearth_api::Code::PermissionDenied, "the URL has no signature (sig)"))?;
    let number = |v: Option<String>, name: &str| -> ApiResult<i64> {
        v.ok_or_else(|| ApiError::invalid(format!("the URL has no {name}")))?
            .parse()
            .map_err(|_| ApiError::invalid(format!("the URL's {name} is not a number")))
    };
    let size = number(p.str("size"), "size")?;
    let expires = number(p.str("expires"), "expires")?;
    p.finish()?;
    if size < 0 || (!with_size && size != 0) {
        return Err(ApiError::invalid("the URL's size is invalid"));
    }
    Ok(Signed { size: size as u64, expires, sig })
}

pub(super) async fn put(
    State(s): State<AppState>,
    Path((account, model, file)): Path<(String, String, String)>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let sg = signed(q.as_deref(), true)?;
    let declared = match headers.get("content-length") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| ApiError::invalid("malformed Content-Length header"))?,
        ),
    };
    let stream = body.into_data_stream();
    s.control.upload_file(&account, &model, &file, sg.size, sg.expires, &sg.sig, declared, stream).await?;
    Ok(empty().into_response())
}

pub(super) async fn get(
    State(s): State<AppState>,
    Path((account, model, file)): Path<(String, String, String)>,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    let sg = signed(q.as_deref(), false)?;
    let (f, len) = s.control.download_file(&account, &model, &file, sg.expires, &sg.sig).await?;
    Ok((
        [("content-type", "application/octet-stream".to_string()), ("content-length", len.to_string())],
        Body::from_stream(ReaderStream::new(f)),
    )
        .into_response())
}
