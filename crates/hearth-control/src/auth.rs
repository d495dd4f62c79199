//! API keys and accounts: who is calling, and may they touch this account.
//!
//! Keys are stored as SHA-256 hashes. Lookups are cached in memory for a short while because
//! every request authenticates and the answer almost never changes.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::error::{ControlError, Result};
use crate::ControlPlane;

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub account: String,
}

const CACHE_TTL: Duration = Duration::from_secs(30);
/// Beyond this many cached keys the cache starts over, bounding its memory.
const CACHE_CAP: usize = 10_000;

#[derive(Default)]
pub(crate) struct KeyCache {
    entries: Mutex<HashMap<String, (String, Instant)>>,
}

impl KeyCache {
    fn get(&self, hash: &str) -> Option<String> {
        let entries = self.entries.lock().ok()?;
        entries.get(hash).filter(|(_, at)| at.elapsed() < CACHE_TTL).map(|(a, _)| a.clone())
    }

    fn put(&self, hash: String, account: String) {
        if let Ok(mut entries) = self.entries.lock() {
            if entries.len() >= CACHE_CAP {
                entries.clear();
            }
            entries.insert(hash, (account, Instant::now()));
        }
    }
}

pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

impl ControlPlane {
    /// Resolves a bearer key to its account. Missing or unknown keys are UNAUTHENTICATED.
    pub async fn authenticate(&self, key: Option<&str>) -> Result<Principal> {
        let key = key.filter(|k| !k.is_empty()).ok_or_else(|| {
            ControlError::Unauthenticated("missing API key: send it as \"Authorization: Bearer <key>\"".to_string())
        })?;
        let hash = hash_key(key);
        if let Some(account) = self.auth_cache.get(&hash) {
            return Ok(Principal { account });
        }
        match self.store.account_for_key(&hash).await? {
            Some(account) => {
                self.auth_cache.put(hash, account.clone());
                Ok(Principal { account })
            }
            None => Err(ControlError::Unauthenticated("invalid API key".to_string())),
        }
    }

    /// A key may act only within its own account.
    pub fn authorize(&self, who: &Principal, account: &str) -> Result<()> {
        if who.account == account {
            Ok(())
        } else {
            Err(ControlError::PermissionDenied(format!(
                "this API key belongs to account {:?} and may not access account {account:?}",
                who.account
            )))
        }
    }

    /// Creates the account and binds the key to it, if they do not exist yet. Idempotent, so
    /// automation can pass the same pair at every start.
    pub async fn bootstrap_key(&self, account: &str, key: &str) -> Result<()> {
        hearth_api::names::validate_id("account", account).map_err(ControlError::InvalidArgument)?;
        if key.is_empty() || key.chars().any(char::is_whitespace) {
            return Err(ControlError::InvalidArgument(
                "an API key must be non-empty and contain no whitespace".to_string(),
            ));
        }
        self.store.ensure_account(account).await?;
        let bound = self.store.ensure_api_key(&hash_key(key), account).await?;
        if bound != account {
            return Err(ControlError::AlreadyExists(format!(
                "this API key already belongs to account {bound:?}; choose another key for {account:?}"
            )));
        }
        Ok(())
    }
}
