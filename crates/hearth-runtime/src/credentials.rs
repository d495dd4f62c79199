//! The credential each replica requires from its gateway.
//!
//! A replica's token is an HMAC of its endpoint under a key kept in the store, so every gateway
//! on one store computes the same token for a replica (any of them may route to it) and
//! nothing else can: the key never leaves the gateways, and a replica learns only its own
//! token. Without it a replica answers 401 on every route but `/health`.

use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use hearth_control::ControlPlane;

use crate::error::{Result, RuntimeError};

/// The store's secret the tokens derive from.
const KEY_NAME: &str = "replica-token-key";

#[derive(Clone)]
pub struct ReplicaCredentials {
    key: Arc<[u8]>,
}

impl ReplicaCredentials {
    /// The key of this store: made by the first gateway, read by the others.
    pub async fn from_store(control: &ControlPlane) -> Result<ReplicaCredentials> {
        let candidate: [u8; 32] = rand::random();
        let key = control.store().secret_or_init(KEY_NAME, &candidate).await.map_err(RuntimeError::backend)?;
        Ok(ReplicaCredentials::new(key))
    }

    pub fn new(key: impl Into<Arc<[u8]>>) -> ReplicaCredentials {
        ReplicaCredentials { key: key.into() }
    }

    /// The key itself, in hexadecimal: for replicas that derive their own token from the
    /// address they are given (pods, whose address is not known when they are made). Such a
    /// replica could derive another replica's token too; replicas are hearth's own engines,
    /// and the key keeps out everything else on the network.
    pub fn key_hex(&self) -> String {
        hex::encode(&self.key)
    }

    /// The token of the replica at `endpoint` (its base URL, as the fleet knows it).
    pub fn token(&self, endpoint: &str) -> String {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.key) else {
            unreachable!("HMAC takes keys of any length")
        };
        mac.update(b"hearth replica\n");
        mac.update(endpoint.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// The `Authorization` header value for calls to the replica at `endpoint`.
    pub fn bearer(&self, endpoint: &str) -> String {
        format!("Bearer {}", self.token(endpoint))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_endpoint_has_its_own_token_and_each_key_its_own_tokens() {
        let a = ReplicaCredentials::new(vec![1u8; 32]);
        let b = ReplicaCredentials::new(vec![2u8; 32]);
        let (one, two) = ("http://127.0.0.1:1000", "http://127.0.0.1:1001");
        assert_eq!(a.token(one), a.clone().token(one));
        assert_ne!(a.token(one), a.token(two));
        assert_ne!(a.token(one), b.token(one));
        assert_eq!(a.token(one).len(), 64);
    }
}
