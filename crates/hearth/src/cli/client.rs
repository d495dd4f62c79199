//! The client commands' HTTP client: the Gateway REST API as JSON, with the server's
//! google.rpc errors turned into [`ApiError`]s.

use std::time::Duration;

use anyhow::{anyhow, bail};
use hearth_api::Code;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tokio::sync::OnceCell;

use super::config::{Settings, DEFAULT_BASE_URL};

/// A google.rpc error from the server, printed `CODE_NAME: message`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: Option<Code>,
    pub http: u16,
    pub message: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.code {
            Some(c) => write!(f, "{}: {}", c.name(), self.message),
            None => write!(f, "HTTP {}: {}", self.http, self.message),
        }
    }
}

impl std::error::Error for ApiError {}

impl ApiError {
    /// Reads a google.rpc `Status` body (`code` as a number or a name); anything else is
    /// reported with its HTTP status and the start of its text.
    pub fn from_body(status: StatusCode, body: &[u8]) -> ApiError {
        let parsed: Option<Value> = serde_json::from_slice(body).ok();
        // A google.rpc Status has the code at the top; an inference route's OpenAI-shaped
        // error has its name at `error.code`.
        let code = parsed.as_ref().and_then(|v| match (&v["code"], &v["error"]["code"]) {
            (Value::Number(n), _) => n.as_u64().and_then(|n| Code::ALL.get(n as usize).copied()),
            (Value::String(s), _) | (_, Value::String(s)) => Code::from_name(s),
            _ => None,
        });
        let message = parsed
            .as_ref()
            .and_then(|v| v["message"].as_str().or_else(|| v["error"]["message"].as_str()))
            .map(str::to_string)
            .unwrap_or_else(|| {
                let text = String::from_utf8_lossy(body);
                let text = text.trim();
                if text.is_empty() {
                    status.canonical_reason().unwrap_or("no details").to_string()
                } else {
                    text.chars().take(300).collect()
                }
            });
        ApiError { code, http: status.as_u16(), message }
    }

    pub fn is(&self, code: Code) -> bool {
        self.code == Some(code)
    }
}

/// Whether `e` is the server saying `code`.
pub fn is_code(e: &anyhow::Error, code: Code) -> bool {
    e.downcast_ref::<ApiError>().is_some_and(|a| a.is(code))
}

/// Describes a transport error with its causes ("connection refused" is at the bottom).
pub fn transport_error(base: &str, e: &reqwest::Error) -> anyhow::Error {
    let mut msg = if e.is_timeout() {
        format!("no answer from hearth at {base} in time")
    } else {
        format!("cannot reach hearth at {base}")
    };
    let mut cause: Option<&dyn std::error::Error> = Some(e);
    let mut last = String::new();
    while let Some(c) = cause {
        last = c.to_string();
        cause = c.source();
    }
    if !last.is_empty() {
        msg.push_str(": ");
        msg.push_str(&last);
    }
    anyhow!(msg)
}

pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
    key: Option<String>,
    account: OnceCell<String>,
}

/// Control calls are short; validation of a large upload reads file headers only.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

impl Api {
    pub fn new(settings: Settings) -> anyhow::Result<Api> {
        let base = settings.base_url.unwrap_or_else(|| DEFAULT_BASE_URL.to_string());
        let base = base.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            bail!("the base URL must start with http:// or https://, got {base:?}");
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            // An upload's 308 "resume incomplete" is an answer, not a redirect to follow.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("hearth-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| anyhow!("building the HTTP client: {e}"))?;
        let account = OnceCell::new_with(settings.account);
        Ok(Api { http, base, key: settings.api_key, account })
    }

    pub fn key(&self) -> anyhow::Result<&str> {
        self.key
            .as_deref()
            .ok_or_else(|| anyhow!("no API key: pass --api-key, set HEARTH_API_KEY, or put api_key in the config file"))
    }

    /// The account to work in: configured, or the one the API key belongs to.
    pub async fn account(&self) -> anyhow::Result<&str> {
        let acct = self
            .account
            .get_or_try_init(|| async {
                let v = self.call(Method::GET, "/verifyApiKey", &[], None).await?;
                v["accountId"]
                    .as_str()
                    .map(str::to_string)
                    .ok_or_else(|| anyhow!("the server did not name the account of the API key"))
            })
            .await?;
        Ok(acct.as_str())
    }

    /// `/v1/accounts/{account}/{rest}`.
    pub async fn path(&self, rest: &str) -> anyhow::Result<String> {
        Ok(format!("/v1/accounts/{}/{rest}", self.account().await?))
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends one API call and returns its JSON body (`{}` for an empty one).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let mut req = self.http.request(method, self.url(path)).bearer_auth(self.key()?).timeout(CALL_TIMEOUT);
        if !query.is_empty() {
            req = req.query(query);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| transport_error(&self.base, &e))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| transport_error(&self.base, &e))?;
        if !status.is_success() {
            return Err(ApiError::from_body(status, &bytes).into());
        }
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Value::Object(Default::default()));
        }
        serde_json::from_slice(&bytes).map_err(|e| anyhow!("the server answered {status} with invalid JSON: {e}"))
    }

    pub async fn get(&self, path: &str, query: &[(&str, String)]) -> anyhow::Result<Value> {
        self.call(Method::GET, path, query, None).await
    }

    pub async fn post(&self, path: &str, query: &[(&str, String)], body: &Value) -> anyhow::Result<Value> {
        self.call(Method::POST, path, query, Some(body)).await
    }

    pub async fn patch(&self, path: &str, query: &[(&str, String)], body: &Value) -> anyhow::Result<Value> {
        self.call(Method::PATCH, path, query, Some(body)).await
    }

    pub async fn delete(&self, path: &str, query: &[(&str, String)]) -> anyhow::Result<Value> {
        self.call(Method::DELETE, path, query, None).await
    }

    /// Every item of a collection, following page tokens.
    pub async fn list_all(&self, path: &str, key: &str, query: &[(&str, String)]) -> anyhow::Result<Vec<Value>> {
        let mut items = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut q: Vec<(&str, String)> = query.to_vec();
            q.push(("pageSize", "200".to_string()));
            if let Some(t) = &token {
                q.push(("pageToken", t.clone()));
            }
            let page = self.get(path, &q).await?;
            if let Some(a) = page[key].as_array() {
                items.extend(a.iter().cloned());
            }
            match page["nextPageToken"].as_str().filter(|t| !t.is_empty()) {
                Some(t) => token = Some(t.to_string()),
                None => return Ok(items),
            }
        }
    }
}

/// A resource reference as the user typed it: a bare id (in the configured account) or a
/// full name `accounts/{account}/{collection}/{id}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ref {
    pub account: Option<String>,
    pub id: String,
}

impl Ref {
    pub fn parse(input: &str, collection: &str) -> anyhow::Result<Ref> {
        // Ids go into URL paths: anything that could change the URL's meaning is refused here
        // (the server checks the exact rules).
        if !input.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/')) {
            bail!("{input:?} is not a valid {collection} id or name");
        }
        let parts: Vec<&str> = input.split('/').collect();
        match parts.as_slice() {
            [id] if !id.is_empty() => Ok(Ref { account: None, id: id.to_string() }),
            ["accounts", account, c, id] if *c == collection && !account.is_empty() && !id.is_empty() => {
                Ok(Ref { account: Some(account.to_string()), id: id.to_string() })
            }
            _ => bail!("{input:?} is neither an id nor a name of the form accounts/ACCOUNT/{collection}/ID"),
        }
    }

    /// The full resource name.
    pub async fn name(&self, api: &Api, collection: &str) -> anyhow::Result<String> {
        let account = match &self.account {
            Some(a) => a.clone(),
            None => api.account().await?.to_string(),
        };
        Ok(format!("accounts/{account}/{collection}/{}", self.id))
    }

    /// The REST path of the resource, with an optional `:verb`.
    pub async fn path(&self, api: &Api, collection: &str, verb: Option<&str>) -> anyhow::Result<String> {
        let name = self.name(api, collection).await?;
        Ok(match verb {
            Some(v) => format!("/v1/{name}:{v}"),
            None => format!("/v1/{name}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_read_as_code_names() {
        let e = ApiError::from_body(
            StatusCode::NOT_FOUND,
            br#"{"code": 5, "message": "model x not found", "details": []}"#,
        );
        assert_eq!(e.to_string(), "NOT_FOUND: model x not found");
        let e = ApiError::from_body(StatusCode::BAD_GATEWAY, b"<html>bad gateway</html>");
        assert_eq!(e.to_string(), "HTTP 502: <html>bad gateway</html>");
        let e = ApiError::from_body(StatusCode::BAD_REQUEST, br#"{"code": "INVALID_ARGUMENT", "message": "m"}"#);
        assert!(e.is(Code::InvalidArgument));
        let e = ApiError::from_body(
            StatusCode::NOT_FOUND,
            br#"{"error": {"message": "no model", "type": "not_found_error", "code": "NOT_FOUND"}}"#,
        );
        assert!(e.is(Code::NotFound) && e.message == "no model");
    }

    #[test]
    fn references_are_ids_or_full_names() {
        assert_eq!(Ref::parse("m", "models").unwrap(), Ref { account: None, id: "m".into() });
        let r = Ref::parse("accounts/a/models/m", "models").unwrap();
        assert_eq!(r, Ref { account: Some("a".into()), id: "m".into() });
        assert!(Ref::parse("accounts/a/deployments/m", "models").is_err());
        assert!(Ref::parse("a/b", "models").is_err());
        assert!(Ref::parse("", "models").is_err());
    }
}
