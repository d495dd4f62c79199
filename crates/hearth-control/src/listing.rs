//! List semantics shared by every collection (AIP-132, AIP-158, AIP-160): filter, order,
//! page with opaque tokens, and read masks.

use base64::Engine;
use hearth_api::query::{apply_read_mask, Filter, OrderBy};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::{ControlError, Result};

pub const DEFAULT_PAGE_SIZE: usize = 50;
pub const MAX_PAGE_SIZE: usize = 200;

/// The query parameters of a list call.
#[derive(Debug, Clone, Default)]
pub struct ListRequest {
    pub page_size: Option<i32>,
    pub page_token: Option<String>,
    pub filter: Option<String>,
    pub order_by: Option<String>,
    pub read_mask: Option<String>,
    pub show_deleted: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ListPage {
    pub items: Vec<Value>,
    pub next_page_token: Option<String>,
    pub total_size: i32,
}

/// What a collection allows to be listed by.
pub(crate) struct Listable {
    pub fields: &'static [&'static str],
    pub default_order: &'static str,
}

/// The fingerprint ties a page token to the query that produced it: AIP-158 requires the
/// other parameters to match, and silently mixing two queries would skip or repeat items.
fn fingerprint(req: &ListRequest) -> String {
    let mut h = Sha256::new();
    for part in [req.filter.as_deref(), req.order_by.as_deref()] {
        h.update(part.unwrap_or("").as_bytes());
        h.update([0]);
    }
    h.update([req.show_deleted as u8]);
    hex::encode(&h.finalize()[..8])
}

fn encode_token(offset: usize, req: &ListRequest) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{offset}:{}", fingerprint(req)))
}

fn decode_token(token: &str, req: &ListRequest) -> Result<usize> {
    let bad = || ControlError::InvalidArgument("invalid pageToken: pass back a nextPageToken unchanged".to_string());
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
    let text = String::from_utf8(raw).map_err(|_| bad())?;
    let (offset, fp) = text.split_once(':').ok_or_else(bad)?;
    if fp != fingerprint(req) {
        return Err(ControlError::InvalidArgument(
            "pageToken was issued for a different filter, orderBy or showDeleted; repeat the original query"
                .to_string(),
        ));
    }
    offset.parse().map_err(|_| bad())
}

/// Filters, sorts and pages resources already rendered as JSON.
pub(crate) fn paginate(mut items: Vec<Value>, req: &ListRequest, what: &Listable) -> Result<ListPage> {
    let page_size = match req.page_size {
        None | Some(0) => DEFAULT_PAGE_SIZE,
        Some(n) if n < 0 => {
            return Err(ControlError::InvalidArgument(format!("pageSize must not be negative, got {n}")))
        }
        Some(n) => (n as usize).min(MAX_PAGE_SIZE),
    };
    let filter = Filter::parse(req.filter.as_deref().unwrap_or(""), what.fields)
        .map_err(|e| ControlError::InvalidArgument(e.to_string()))?;
    let order = OrderBy::parse(req.order_by.as_deref().unwrap_or(""), what.fields, what.default_order)
        .map_err(|e| ControlError::InvalidArgument(e.to_string()))?;
    let offset = match req.page_token.as_deref() {
        None | Some("") => 0,
        Some(t) => decode_token(t, req)?,
    };
    items.retain(|v| filter.matches(v));
    items.sort_by(|a, b| order.compare(a, b));
    let total = items.len();
    let end = offset.saturating_add(page_size).min(total);
    let mut page: Vec<Value> = if offset < total { items.drain(offset..end).collect() } else { Vec::new() };
    if let Some(mask) = req.read_mask.as_deref() {
        for item in &mut page {
            apply_read_mask(item, mask).map_err(|e| ControlError::InvalidArgument(e.to_string()))?;
        }
    }
    Ok(ListPage {
        items: page,
        next_page_token: (end < total).then(|| encode_token(end, req)),
        total_size: i32::try_from(total).unwrap_or(i32::MAX),
    })
}

/// Renders one resource for a get, honouring `readMask`.
pub(crate) fn render<T: serde::Serialize>(resource: &T, read_mask: Option<&str>) -> Result<Value> {
    let mut v = serde_json::to_value(resource).map_err(ControlError::internal)?;
    if let Some(mask) = read_mask {
        apply_read_mask(&mut v, mask).map_err(|e| ControlError::InvalidArgument(e.to_string()))?;
    }
    Ok(v)
}
