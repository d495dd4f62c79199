//! Who is calling, and what may they do: API keys, the users they belong to, and roles.
//!
//! Keys are stored as SHA-256 hashes and looked up on every request, with no cache: a key
//! deleted or a role changed takes effect at once, on every gateway that shares the store.
//! (The price is two indexed lookups per request, by key hash and by user id.)

use chrono::Utc;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{ControlError, Result};
use crate::records::user::UserRecord;
use crate::ControlPlane;

/// The user that the keys given at start (`--api-key`) belong to: the account's first admin.
pub const BOOTSTRAP_USER: &str = "admin";

/// What a user may do in their account. The spec also names `contributor`,
/// `inference-user` and `custom`; hearth refuses those as unimplemented (see `users.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Manages the account's users and every user's keys, and uses its resources.
    Admin,
    /// Uses the account's resources and manages their own keys.
    #[default]
    User,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::User => "user",
        }
    }
}

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub account: String,
    pub user: String,
    pub role: Role,
}

impl Principal {
    /// The account's bootstrap admin: what the keys given at start act as, and what hearth's
    /// own work on an account's behalf runs as.
    pub fn admin(account: impl Into<String>) -> Principal {
        Principal { account: account.into(), user: BOOTSTRAP_USER.to_string(), role: Role::Admin }
    }
}

pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

impl ControlPlane {
    /// Resolves a bearer key to its user. Missing, unknown and expired keys, and keys whose
    /// user is gone, are UNAUTHENTICATED.
    pub async fn authenticate(&self, key: Option<&str>) -> Result<Principal> {
        let key = key.filter(|k| !k.is_empty()).ok_or_else(|| {
            ControlError::Unauthenticated("missing API key: send it as \"Authorization: Bearer <key>\"".to_string())
        })?;
        let record = self
            .store
            .api_key(&hash_key(key))
            .await?
            .ok_or_else(|| ControlError::Unauthenticated("invalid API key".to_string()))?;
        if let Some(expired) = record.expire_time.filter(|t| *t <= Utc::now()) {
            return Err(ControlError::Unauthenticated(format!(
                "this API key expired at {}; create a new one",
                expired.to_rfc3339()
            )));
        }
        let user = record.user.unwrap_or_else(|| BOOTSTRAP_USER.to_string());
        let role = match self.load::<UserRecord>(&record.account, &user).await? {
            Some(doc) => doc.value.role,
            // Keys given at start predate users in stores written by older versions; their
            // user is created at the next start.
            None if user == BOOTSTRAP_USER && record.key_id.is_none() => Role::Admin,
            None => {
                return Err(ControlError::Unauthenticated(format!(
                    "the user this API key belonged to, accounts/{}/users/{user}, no longer exists",
                    record.account
                )))
            }
        };
        Ok(Principal { account: record.account, user, role })
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

    /// Managing an account's users takes one of its admins.
    pub(crate) fn authorize_admin(&self, who: &Principal, account: &str) -> Result<()> {
        self.authorize(who, account)?;
        if who.role == Role::Admin {
            Ok(())
        } else {
            Err(ControlError::PermissionDenied(format!(
                "only an admin of account {account:?} may do this; accounts/{account}/users/{} is a {}",
                who.user,
                who.role.as_str()
            )))
        }
    }

    /// A user's keys are managed by that user and by the account's admins.
    pub(crate) fn authorize_keys_of(&self, who: &Principal, account: &str, user: &str) -> Result<()> {
        self.authorize(who, account)?;
        if who.role == Role::Admin || who.user == user {
            Ok(())
        } else {
            Err(ControlError::PermissionDenied(format!(
                "only accounts/{account}/users/{user} and the account's admins may manage that user's keys"
            )))
        }
    }

    /// Creates the account, its first admin and the key's binding to that admin, if they do
    /// not exist yet. Idempotent, so automation can pass the same pair at every start.
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
        if self.load::<UserRecord>(account, BOOTSTRAP_USER).await?.is_none() {
            let admin =
                UserRecord { role: Role::Admin, display_name: Some("Admin".to_string()), ..UserRecord::default() };
            match self.insert_doc(account, BOOTSTRAP_USER, &admin).await {
                Ok(_) | Err(ControlError::AlreadyExists(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
