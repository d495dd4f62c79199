//! Users of an account and their API keys (the Gateway API's Users and API keys operations).
//!
//! A key is shown once, in the answer to its creation; the store keeps its SHA-256 and the
//! metadata the API lists (display name, prefix, expiry, annotations), never the key.

use std::collections::BTreeMap;

use base64::Engine;
use chrono::Utc;
use hearth_api::resources::{ApiKey, CreateApiKeyRequest, User};
use hearth_store::KeyRecord;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::auth::{hash_key, Principal, Role};
use crate::error::{ControlError, Result};
use crate::listing::{paginate, render, ListPage, ListRequest, Listable};
use crate::records::user::{view, UserRecord};
use crate::records::Doc;
use crate::ControlPlane;

const USER_FIELDS: Listable = Listable {
    fields: &["name", "displayName", "email", "role", "serviceAccount", "state", "createTime", "updateTime"],
    default_order: "name",
};

const KEY_FIELDS: Listable =
    Listable { fields: &["keyId", "displayName", "prefix", "createTime", "expireTime"], default_order: "createTime" };

/// What every key starts with, so that a leaked one is recognised (and `prefix` says whose).
const KEY_PREFIX: &str = "hth_";
/// How much of a key its `prefix` shows: `hth_` and four characters of its 43 random ones.
const SHOWN_PREFIX_LEN: usize = 8;

/// A key's metadata as the store keeps it beside the hash.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct KeyMeta {
    display_name: String,
    prefix: String,
    annotations: BTreeMap<String, String>,
}

/// The role named on the wire: the two hearth implements, or a clear refusal.
fn parse_role(role: Option<&str>) -> Result<Role> {
    match role {
        Some("admin") => Ok(Role::Admin),
        Some("user") => Ok(Role::User),
        Some(r @ ("contributor" | "inference-user" | "custom")) => Err(ControlError::Unimplemented(format!(
            "role {r:?} is not implemented: hearth has the roles \"admin\" (manages users and keys, uses \
             resources) and \"user\" (uses resources, manages its own keys)"
        ))),
        Some(other) => Err(ControlError::InvalidArgument(format!("unknown role {other:?}: use \"admin\" or \"user\""))),
        None => Err(ControlError::InvalidArgument("role is required: \"admin\" or \"user\"".to_string())),
    }
}

fn check_user_fields(user: &User) -> Result<()> {
    if user.permission_preset.is_some() {
        return Err(ControlError::Unimplemented(
            "permissionPreset is not implemented: it applies to the role \"custom\", which hearth does not have"
                .to_string(),
        ));
    }
    if let Some(name) = &user.display_name {
        if name.chars().count() >= 64 {
            return Err(ControlError::InvalidArgument(format!(
                "displayName must be fewer than 64 characters, got {}",
                name.chars().count()
            )));
        }
    }
    if let Some(email) = &user.email {
        let valid = matches!(email.split_once('@'), Some((local, domain))
            if !local.is_empty() && !domain.is_empty() && !domain.contains('@') && !email.contains(char::is_whitespace));
        if !valid {
            return Err(ControlError::InvalidArgument(format!("email {email:?} is not an email address")));
        }
    }
    Ok(())
}

/// A user id from an email address, as the spec says a missing `userId` is made: its local
/// part, lowercased, other characters as dashes.
fn id_from_email(email: &str) -> String {
    let local = email.split('@').next().unwrap_or_default().to_ascii_lowercase();
    let mut id: String =
        local.chars().map(|c| if c.is_ascii_lowercase() || c.is_ascii_digit() { c } else { '-' }).collect();
    id = id.trim_matches('-').to_string();
    if !id.starts_with(|c: char| c.is_ascii_lowercase()) {
        id = format!("u-{id}");
    }
    id.truncate(63);
    id.trim_end_matches('-').to_string()
}

fn key_view(record: &KeyRecord, email: Option<String>) -> ApiKey {
    let meta: KeyMeta = record.body.as_deref().and_then(|b| serde_json::from_str(b).ok()).unwrap_or_default();
    ApiKey {
        key_id: record.key_id.clone(),
        display_name: Some(meta.display_name),
        key: None,
        create_time: Some(record.create_time),
        // hearth never keeps a key's text, only its hash.
        secure: Some(true),
        email,
        prefix: Some(meta.prefix),
        expire_time: record.expire_time,
        annotations: (!meta.annotations.is_empty()).then_some(meta.annotations),
        last_used: None,
    }
}

impl ControlPlane {
    async fn user_doc(&self, account: &str, id: &str) -> Result<Doc<UserRecord>> {
        self.load::<UserRecord>(account, id)
            .await?
            .ok_or_else(|| ControlError::NotFound(format!("user accounts/{account}/users/{id} not found")))
    }

    pub async fn create_user(&self, who: &Principal, account: &str, user_id: Option<&str>, user: User) -> Result<User> {
        self.authorize_admin(who, account)?;
        check_user_fields(&user)?;
        let role = parse_role(user.role.as_deref())?;
        let id = match (user_id.filter(|id| !id.is_empty()), user.email.as_deref()) {
            (Some(id), _) => id.to_string(),
            (None, Some(email)) => id_from_email(email),
            (None, None) => {
                return Err(ControlError::InvalidArgument(
                    "give the user an id (the userId parameter) or an email to make one from".to_string(),
                ))
            }
        };
        hearth_api::names::validate_id("user", &id).map_err(ControlError::InvalidArgument)?;
        let record = UserRecord {
            role,
            display_name: user.display_name,
            email: user.email,
            service_account: user.service_account,
        };
        let doc = self.insert_doc(account, &id, &record).await.map_err(|e| match e {
            ControlError::AlreadyExists(_) => {
                ControlError::AlreadyExists(format!("user accounts/{account}/users/{id} already exists"))
            }
            e => e,
        })?;
        Ok(view(account, &doc))
    }

    /// A user sees themself; admins see everyone in their account.
    pub async fn get_user(&self, who: &Principal, account: &str, id: &str, read_mask: Option<&str>) -> Result<Value> {
        self.authorize(who, account)?;
        if who.user != id {
            self.authorize_admin(who, account)?;
        }
        render(&view(account, &self.user_doc(account, id).await?), read_mask)
    }

    pub async fn list_users(&self, who: &Principal, account: &str, req: &ListRequest) -> Result<ListPage> {
        self.authorize_admin(who, account)?;
        let mut items = Vec::new();
        for doc in self.load_all::<UserRecord>(account).await? {
            items.push(serde_json::to_value(view(account, &doc)).map_err(ControlError::internal)?);
        }
        paginate(items, req, &USER_FIELDS)
    }

    /// Sets the fields the body gives (`role` is required by the spec). The last admin of an
    /// account cannot stop being one: nobody could manage its users after.
    pub async fn update_user(&self, who: &Principal, account: &str, id: &str, user: User) -> Result<User> {
        self.authorize_admin(who, account)?;
        check_user_fields(&user)?;
        let role = parse_role(user.role.as_deref())?;
        if role != Role::Admin {
            let other_admins = self
                .load_all::<UserRecord>(account)
                .await?
                .iter()
                .filter(|d| d.id != id && d.value.role == Role::Admin)
                .count();
            if other_admins == 0 {
                return Err(ControlError::FailedPrecondition(format!(
                    "accounts/{account}/users/{id} is the account's only admin; make another user an admin first"
                )));
            }
        }
        let not_found = || ControlError::NotFound(format!("user accounts/{account}/users/{id} not found"));
        let doc = self
            .modify::<UserRecord, _>(account, id, not_found, |doc| {
                doc.value.role = role;
                if let Some(name) = &user.display_name {
                    doc.value.display_name = Some(name.clone());
                }
                if let Some(email) = &user.email {
                    doc.value.email = Some(email.clone());
                }
                if let Some(service) = user.service_account {
                    doc.value.service_account = Some(service);
                }
                Ok(())
            })
            .await?;
        Ok(view(account, &doc))
    }

    /// Creates a key for `user`; the answer is the only time its text is shown.
    pub async fn create_api_key(
        &self,
        who: &Principal,
        account: &str,
        user: &str,
        req: CreateApiKeyRequest,
    ) -> Result<ApiKey> {
        self.authorize_keys_of(who, account, user)?;
        let owner = self.user_doc(account, user).await?;
        let wanted = req.api_key;
        if let Some(t) = wanted.expire_time.filter(|t| *t <= Utc::now()) {
            return Err(ControlError::InvalidArgument(format!("expireTime {} is not in the future", t.to_rfc3339())));
        }
        let display_name = wanted.display_name.filter(|n| !n.is_empty()).unwrap_or_else(|| "default".to_string());
        if display_name.chars().count() > 128 {
            return Err(ControlError::InvalidArgument("displayName must be at most 128 characters".to_string()));
        }
        let secret: [u8; 32] = rand::random();
        let key = format!("{KEY_PREFIX}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret));
        let meta = KeyMeta {
            display_name,
            prefix: key[..SHOWN_PREFIX_LEN].to_string(),
            annotations: wanted.annotations.unwrap_or_default(),
        };
        let record = KeyRecord {
            key_hash: hash_key(&key),
            account: account.to_string(),
            user: Some(user.to_string()),
            key_id: Some(format!("{:016x}", rand::random::<u64>())),
            expire_time: wanted.expire_time,
            body: Some(serde_json::to_string(&meta).map_err(ControlError::internal)?),
            create_time: Utc::now(),
        };
        let stored = self.store.insert_api_key(&record).await?;
        Ok(ApiKey { key: Some(key), ..key_view(&stored, owner.value.email) })
    }

    pub async fn list_api_keys(
        &self,
        who: &Principal,
        account: &str,
        user: &str,
        req: &ListRequest,
    ) -> Result<ListPage> {
        self.authorize_keys_of(who, account, user)?;
        let owner = self.user_doc(account, user).await?;
        let mut items = Vec::new();
        for record in self.store.list_api_keys(account, user).await? {
            items.push(
                serde_json::to_value(key_view(&record, owner.value.email.clone())).map_err(ControlError::internal)?,
            );
        }
        paginate(items, req, &KEY_FIELDS)
    }

    /// Deletes a key; it is refused from the next request on, on every gateway.
    pub async fn delete_api_key(&self, who: &Principal, account: &str, user: &str, key_id: &str) -> Result<()> {
        self.authorize_keys_of(who, account, user)?;
        if key_id.is_empty() {
            return Err(ControlError::InvalidArgument("keyId is required".to_string()));
        }
        if self.store.delete_api_key(account, user, key_id).await? {
            Ok(())
        } else {
            Err(ControlError::NotFound(format!("user accounts/{account}/users/{user} has no API key {key_id:?}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_from_emails_are_valid_ids() {
        for (email, id) in [
            ("Alice.Smith@example.com", "alice-smith"),
            ("9lives@example.com", "u-9lives"),
            ("__@example.com", "u"),
            ("bob@example.com", "bob"),
        ] {
            assert_eq!(id_from_email(email), id);
            hearth_api::names::validate_id("user", &id_from_email(email)).expect(email);
        }
    }

    #[test]
    fn roles_hearth_lacks_are_unimplemented_and_unknown_ones_invalid() {
        assert_eq!(parse_role(Some("admin")).unwrap(), Role::Admin);
        assert_eq!(parse_role(Some("user")).unwrap(), Role::User);
        assert!(matches!(parse_role(Some("inference-user")), Err(ControlError::Unimplemented(_))));
        assert!(matches!(parse_role(Some("root")), Err(ControlError::InvalidArgument(_))));
        assert!(matches!(parse_role(None), Err(ControlError::InvalidArgument(_))));
    }
}
