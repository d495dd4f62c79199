//! Signed upload and download URLs. hearth hands out URLs that point at itself and carry an
//! HMAC over what they allow (method, file, size, expiry), so a PUT needs no API key and
//! cannot be reused for another file, another size or after it expires.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::{ArtifactError, Result};

type HmacSha256 = Hmac<Sha256>;

/// What a signed URL allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub method: &'static str,
    pub account: String,
    pub model: String,
    pub file: String,
    /// Exact byte count for uploads; 0 for downloads.
    pub size: u64,
    /// Unix seconds.
    pub expires: i64,
}

impl Grant {
    fn message(&self) -> String {
        format!("{}\n{}\n{}\n{}\n{}\n{}", self.method, self.account, self.model, self.file, self.size, self.expires)
    }
}

#[derive(Clone)]
pub struct UrlSigner {
    key: Vec<u8>,
    /// Where clients reach this server, e.g. `http://127.0.0.1:8080`.
    base_url: String,
}

impl UrlSigner {
    pub fn new(key: Vec<u8>, base_url: impl Into<String>) -> UrlSigner {
        UrlSigner { key, base_url: base_url.into().trim_end_matches('/').to_string() }
    }

    fn mac(&self, grant: &Grant) -> HmacSha256 {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = match HmacSha256::new_from_slice(&self.key) {
            Ok(m) => m,
            Err(_) => unreachable!("HMAC takes keys of any length"),
        };
        mac.update(grant.message().as_bytes());
        mac
    }

    pub fn sign(&self, grant: &Grant) -> String {
        hex::encode(self.mac(grant).finalize().into_bytes())
    }

    /// The full URL for a grant: `/upload/...` for PUT, `/download/...` for GET.
    pub fn url(&self, grant: &Grant) -> String {
        let route = if grant.method == "PUT" { "upload" } else { "download" };
        format!(
            "{}/{route}/{}/{}/{}?size={}&expires={}&sig={}",
            self.base_url,
            grant.account,
            grant.model,
            grant.file,
            grant.size,
            grant.expires,
            self.sign(grant)
        )
    }

    /// The URL of a model's file manifest for replicas (`GET /replica-files/...`), for a grant
    /// of method `LIST` and no file.
    pub fn manifest_url(&self, grant: &Grant) -> String {
        format!(
            "{}/replica-files/{}/{}?expires={}&sig={}",
            self.base_url,
            grant.account,
            grant.model,
            grant.expires,
            self.sign(grant)
        )
    }

    /// A URL under this server's base for any other grant: `{base}/{path}?expires=...&sig=...`.
    pub fn url_for(&self, path: &str, grant: &Grant) -> String {
        format!("{}/{path}?expires={}&sig={}", self.base_url, grant.expires, self.sign(grant))
    }

    /// Checks a presented signature in constant time, then the expiry.
    pub fn verify(&self, grant: &Grant, sig_hex: &str, now: i64) -> Result<()> {
        let sig = hex::decode(sig_hex)
            .map_err(|_| ArtifactError::PermissionDenied("the URL's signature is malformed".to_string()))?;
        self.mac(grant).verify_slice(&sig).map_err(|_| {
            ArtifactError::PermissionDenied(
                "the URL's signature does not match: ask for a new URL with :getUploadEndpoint or \
                 :getDownloadEndpoint"
                    .to_string(),
            )
        })?;
        if now > grant.expires {
            return Err(ArtifactError::PermissionDenied(format!(
                "the URL expired {} seconds ago; ask for a new one",
                now - grant.expires
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant() -> Grant {
        Grant {
            method: "PUT",
            account: "a".into(),
            model: "m".into(),
            file: "config.json".into(),
            size: 10,
            expires: 1000,
        }
    }

    #[test]
    fn a_signature_covers_every_field_and_the_expiry() {
        let s = UrlSigner::new(b"k".to_vec(), "http://h:1/");
        let g = grant();
        let sig = s.sign(&g);
        assert!(s.url(&g).starts_with("http://h:1/upload/a/m/config.json?size=10&expires=1000&sig="));
        s.verify(&g, &sig, 999).expect("valid");
        assert!(s.verify(&g, &sig, 1001).is_err(), "expired");
        for changed in [
            Grant { size: 11, ..grant() },
            Grant { file: "other.json".into(), ..grant() },
            Grant { model: "n".into(), ..grant() },
            Grant { method: "GET", ..grant() },
            Grant { expires: 2000, ..grant() },
        ] {
            assert!(s.verify(&changed, &sig, 0).is_err(), "{changed:?}");
        }
        assert!(s.verify(&g, "zz", 0).is_err());
        let other_key = UrlSigner::new(b"k2".to_vec(), "http://h:1");
        assert!(other_key.verify(&g, &sig, 0).is_err());
    }
}
