//! A user of an account as stored, and its one conversion to the API's `User`.

use hearth_api::resources::{User, UserState};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{Doc, Record, USERS};
use crate::auth::Role;

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct UserRecord {
    pub role: Role,
    pub display_name: Option<String>,
    pub email: Option<String>,
    /// Kept and shown: hearth treats a service account as any other user of its role.
    pub service_account: Option<bool>,
}

impl Record for UserRecord {
    const KIND: &'static str = USERS;
    const SCHEMA: u32 = 1;

    fn upgrade(row: Map<String, Value>, _from: u32) -> Result<Map<String, Value>, String> {
        Ok(row)
    }
}

/// The API's view of a stored user.
pub(crate) fn view(account: &str, doc: &Doc<UserRecord>) -> User {
    User {
        name: Some(format!("accounts/{account}/users/{}", doc.id)),
        display_name: doc.value.display_name.clone(),
        service_account: doc.value.service_account,
        create_time: Some(doc.create_time),
        role: Some(doc.value.role.as_str().to_string()),
        email: doc.value.email.clone(),
        state: Some(UserState::Ready),
        status: None,
        update_time: Some(doc.update_time),
        permission_preset: None,
    }
}
