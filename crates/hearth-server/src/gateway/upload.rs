//! The signed file routes: `PUT /upload/...` receives a model file as a stream, `GET
//! /download/...` sends one. The URL's signature is the authorisation.
//!
//! An upload is either the whole file in one body, or resumable in the manner of cloud
//! storage: each request carries `Content-Range: bytes START-END/TOTAL` and its bytes, and is
//! answered 308 with `Range: bytes=0-N` (what is stored so far) until the last part completes
//! the file (200). `Content-Range: bytes */TOTAL` with no body asks where the upload stands.
//! Either way `x-hearth-sha256: <hex>` (on the whole file or the last part) has the completed
//! file checked against that digest.

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use hearth_artifacts::store::{Sha256Digest, UploadPart, UploadProgress};
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
    // Downloads and manifests may leave the size out: theirs is 0.
    let size = match p.str("size") {
        None if !with_size => 0,
        v => number(v, "size")?,
    };
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
    let part = match headers.get("content-range") {
        None => UploadPart::Whole,
        Some(v) => parse_content_range(
            v.to_str().map_err(|_| ApiError::invalid("malformed Content-Range header: not ASCII"))?,
        )?,
    };
    let sha256 = match headers.get(SHA256_HEADER) {
        None => None,
        Some(v) => Some(parse_sha256(v.to_str().unwrap_or(""))?),
    };
    let stream = body.into_data_stream();
    let progress = s
        .control
        .upload_file(&account, &model, &file, sg.size, sg.expires, &sg.sig, declared, part, sha256, stream)
        .await?;
    Ok(match progress {
        UploadProgress::Complete => empty().into_response(),
        // 308 without a Location, as cloud storage answers: "resume incomplete". No Range
        // header means nothing is stored yet.
        UploadProgress::Incomplete { offset: 0 } => StatusCode::PERMANENT_REDIRECT.into_response(),
        UploadProgress::Incomplete { offset } => {
            (StatusCode::PERMANENT_REDIRECT, [("range", format!("bytes=0-{}", offset - 1))]).into_response()
        }
    })
}

/// The header a client puts the file's SHA-256 in (hex) to have the upload verified.
const SHA256_HEADER: &str = "x-hearth-sha256";

/// Parses `bytes START-END/TOTAL` (a part) or `bytes */TOTAL` (a status question).
fn parse_content_range(v: &str) -> ApiResult<UploadPart> {
    let bad = || {
        ApiError::invalid(format!(
            "malformed Content-Range {v:?}: expected \"bytes START-END/TOTAL\" or \"bytes */TOTAL\""
        ))
    };
    let number = |s: &str| -> ApiResult<u64> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        s.parse().map_err(|_| bad())
    };
    let rest = v.trim().strip_prefix("bytes ").ok_or_else(bad)?.trim_start();
    let (range, total) = rest.split_once('/').ok_or_else(bad)?;
    let total = number(total)?;
    if range == "*" {
        return Ok(UploadPart::Status { total });
    }
    let (start, end) = range.split_once('-').ok_or_else(bad)?;
    let (start, end) = (number(start)?, number(end)?);
    if start > end || end >= total {
        return Err(ApiError::invalid(format!(
            "Content-Range {v:?} is not a range of the file: START <= END < TOTAL must hold"
        )));
    }
    Ok(UploadPart::Range { start, end, total })
}

fn parse_sha256(v: &str) -> ApiResult<Sha256Digest> {
    let mut out = [0u8; 32];
    hex_decode(v.trim(), &mut out).ok_or_else(|| {
        ApiError::invalid(format!("{SHA256_HEADER} must be a SHA-256 digest as 64 hexadecimal digits, got {v:?}"))
    })?;
    Ok(out)
}

fn hex_decode(s: &str, out: &mut [u8; 32]) -> Option<()> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    for (i, o) in out.iter_mut().enumerate() {
        *o = digit(b[2 * i])? << 4 | digit(b[2 * i + 1])?;
    }
    Some(())
}

pub(super) async fn get(
    State(s): State<AppState>,
    Path((account, model, file)): Path<(String, String, String)>,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    let sg = signed(q.as_deref(), false)?;
    let (f, len) = s.control.download_file(&account, &model, &file, sg.expires, &sg.sig).await?;
    Ok(file_response(f, len))
}

/// A file's bytes, streamed.
fn file_response(f: tokio::fs::File, len: u64) -> Response {
    (
        [("content-type", "application/octet-stream".to_string()), ("content-length", len.to_string())],
        Body::from_stream(ReaderStream::new(f)),
    )
        .into_response()
}

/// `GET /replica-files/{account}/{model}`: a model's file manifest for a replica that fetches
/// the files itself. The URL's signature is the authorisation, as for downloads.
pub(super) async fn manifest(
    State(s): State<AppState>,
    Path((account, model)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    let sg = signed(q.as_deref(), false)?;
    Ok(axum::Json(s.control.replica_manifest(&account, &model, sg.expires, &sg.sig).await?).into_response())
}

/// `GET /replica-versions/{account}/{deployment}/{version}`: the manifest of a hot-load
/// version, for a replica that fetches it itself; signed as the model manifests are.
pub(super) async fn version_manifest(
    State(s): State<AppState>,
    Path((account, deployment, version)): Path<(String, String, String)>,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    let sg = signed(q.as_deref(), false)?;
    let manifest = s.control.replica_version_manifest(&account, &deployment, &version, sg.expires, &sg.sig).await?;
    Ok(axum::Json(manifest).into_response())
}

/// `GET /replica-versions/{account}/{deployment}/{version}/{file}`: one file of it.
pub(super) async fn version_file(
    State(s): State<AppState>,
    Path((account, deployment, version, file)): Path<(String, String, String, String)>,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    let sg = signed(q.as_deref(), false)?;
    let (f, len) = s.control.replica_version_file(&account, &deployment, &version, &file, sg.expires, &sg.sig).await?;
    Ok(file_response(f, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges_parse_or_are_refused_by_name() {
        assert_eq!(parse_content_range("bytes 0-9/10").unwrap(), UploadPart::Range { start: 0, end: 9, total: 10 });
        assert_eq!(parse_content_range("bytes 5-5/10").unwrap(), UploadPart::Range { start: 5, end: 5, total: 10 });
        assert_eq!(parse_content_range("bytes */10").unwrap(), UploadPart::Status { total: 10 });
        assert_eq!(parse_content_range("bytes */0").unwrap(), UploadPart::Status { total: 0 });
        for bad in
            ["bytes 0-10/10", "bytes 5-4/10", "bytes 0-9/*", "bytes -9/10", "0-9/10", "bytes 0-9", "bytes +1-2/3", ""]
        {
            let e = parse_content_range(bad).expect_err(bad);
            assert!(e.message.contains("Content-Range"), "{bad}: {}", e.message);
        }
    }

    #[test]
    fn digests_are_64_hex_digits() {
        let d = parse_sha256(&"ab".repeat(32)).unwrap();
        assert_eq!(d, [0xab; 32]);
        assert_eq!(parse_sha256(&"AB".repeat(32)).unwrap(), [0xab; 32]);
        assert!(parse_sha256("abc").is_err());
        assert!(parse_sha256(&"zz".repeat(32)).is_err());
    }
}
