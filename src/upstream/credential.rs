//! The key embedcar holds and sends upstream in place of the caller's, if the config names one,
//! and its rotation: the key file is polled, and a new key is used by the next call.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, PoisonError, RwLock},
    time::Duration,
};

use http::{
    header::{self, HeaderName},
    HeaderMap, HeaderValue,
};
use sha2::{Digest, Sha256};

use super::Upstream;
use crate::config::{Config, CredentialHeader};

/// Who a call is for, upstream: the SHA-256 fingerprint of the credential headers it carries
/// (see [`credential_fingerprint`]). The rate gates, the breaker, batch keys and cache scopes
/// keep callers apart by it.
pub type CredentialId = [u8; 32];

const API_KEY: HeaderName = HeaderName::from_static("api-key");

/// SHA-256 over both credential headers, each with its name, so `Authorization: X` and
/// `api-key: X` differ. A request with neither gets the fingerprint of nothing: all
/// unauthenticated callers share one tenant, as they share one upstream answer (a 401).
pub fn credential_fingerprint(headers: &HeaderMap) -> [u8; 32] {
    let mut h = Sha256::new();
    for name in [header::AUTHORIZATION, API_KEY] {
        for v in headers.get_all(&name) {
            h.update(name.as_str().as_bytes());
            h.update([0]);
            h.update(v.as_bytes());
            h.update([0]);
        }
    }
    h.finalize().into()
}

/// A key embedcar holds and sends in place of whatever the caller sent.
#[derive(Clone)]
pub struct Credential {
    header: HeaderName,
    value: HeaderValue,
    /// SHA-256 of the key alone, to tell keys apart (and name them in logs) without
    /// comparing or printing them.
    digest: [u8; 32],
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credential({}: ***)", self.header)
    }
}

impl Credential {
    /// Loads the key named by the config, if one is. Errors say where it was looked for, never
    /// what was found.
    pub fn from_config(config: &Config) -> Result<Option<Credential>, String> {
        let c = &config.credentials;
        let key = if let Some(var) = &c.api_key_env {
            std::env::var(var)
                .map_err(|_| format!("credentials.api_key_env: variable {var} is not set"))?
        } else if let Some(path) = &c.api_key_file {
            std::fs::read_to_string(path)
                .map_err(|e| format!("credentials.api_key_file: cannot read {path}: {e}"))?
        } else {
            return Ok(None);
        };
        Credential::from_text(c.header, &key).map(Some)
    }

    /// A key as read from a variable or file: surrounding whitespace (a trailing newline from
    /// `echo` or an editor) is not part of it, and an empty one is refused rather than sent.
    fn from_text(header: CredentialHeader, text: &str) -> Result<Credential, String> {
        let key = text.trim();
        if key.is_empty() {
            return Err("credentials: the configured key is empty".into());
        }
        Credential::new(header, key)
    }

    pub fn new(header: CredentialHeader, key: &str) -> Result<Credential, String> {
        let (name, text) = match header {
            CredentialHeader::Authorization => (header::AUTHORIZATION, format!("Bearer {key}")),
            CredentialHeader::ApiKey => (HeaderName::from_static("api-key"), key.to_string()),
        };
        let mut value = HeaderValue::from_str(&text)
            .map_err(|_| "credentials: the key has characters not allowed in a header")?;
        value.set_sensitive(true);
        Ok(Credential {
            header: name,
            value,
            digest: Sha256::digest(key.as_bytes()).into(),
        })
    }

    /// Replaces the caller's credentials (both header kinds) with this one.
    pub fn apply(&self, headers: &mut HeaderMap) {
        headers.remove(header::AUTHORIZATION);
        headers.remove("api-key");
        headers.insert(self.header.clone(), self.value.clone());
    }
}

/// The key embedcar holds, replaceable while it runs: a mounted secret is rotated by the
/// platform (Kubernetes swaps a Secret volume's `..data` symlink), and a proxy that needed a
/// restart to follow would keep failing with the revoked key until someone restarted it.
///
/// Read on every upstream call (a read lock and two header clones), so a new key is used by
/// the next call, including calls of embeddings lanes created before the rotation.
pub struct HeldCredential {
    header: CredentialHeader,
    current: RwLock<Credential>,
    /// Who the upstream sees, for the rate gates, the breaker, batch keys and cache scopes:
    /// the fingerprint of the key held at start, kept across rotations. Every caller is the
    /// same tenant either way, and a rotated key belongs to the same account, with the same
    /// rate limits and quota; were the id to follow the key, a rotation would reopen shut
    /// gates, forget the breaker's view, split live lanes in two and make every cached vector
    /// a miss.
    id: CredentialId,
    /// The file the key came from, if it came from one: the only source that can change.
    file: Option<PathBuf>,
}

impl std::fmt::Debug for HeldCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HeldCredential({:?}: ***)", self.header)
    }
}

/// What a look at the key file found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyReload {
    /// The file holds the key already in use.
    Unchanged,
    /// A new key is in use; its fingerprint (never the key) for the log.
    Rotated { fingerprint: String },
    /// The file could not be used; the key in use stays. The reason names the file, never
    /// what it holds.
    Refused { reason: String },
}

impl HeldCredential {
    /// The key named by the config, if one is (see [`Credential::from_config`]).
    pub fn from_config(config: &Config) -> Result<Option<HeldCredential>, String> {
        let c = &config.credentials;
        let Some(credential) = Credential::from_config(config)? else {
            return Ok(None);
        };
        let file = match (&c.api_key_env, &c.api_key_file) {
            (None, Some(path)) => Some(PathBuf::from(path)),
            _ => None,
        };
        Ok(Some(HeldCredential::new(c.header, credential, file)))
    }

    fn new(header: CredentialHeader, credential: Credential, file: Option<PathBuf>) -> Self {
        let mut h = HeaderMap::new();
        credential.apply(&mut h);
        HeldCredential {
            header,
            current: RwLock::new(credential),
            id: credential_fingerprint(&h),
            file,
        }
    }

    /// Replaces the caller's credentials (both header kinds) with the key in use now.
    pub fn apply(&self, headers: &mut HeaderMap) {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .apply(headers);
    }

    /// The stable identity of the held key (see the field's comment).
    pub fn id(&self) -> CredentialId {
        self.id
    }

    /// The file to watch for a new key, if the key came from one.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// Takes the key in `read` (the key file's content, or why it could not be read) if it is
    /// usable and new. Anything unusable leaves the key in use alone: a half-written or empty
    /// file must not turn every call into a 401.
    pub fn consider(&self, read: std::io::Result<String>) -> KeyReload {
        let path = self
            .file
            .as_deref()
            .map_or_else(|| "the key file".to_string(), |p| p.display().to_string());
        let text = match read {
            Ok(t) => t,
            Err(e) => {
                return KeyReload::Refused {
                    reason: format!("credentials.api_key_file: cannot read {path}: {e}"),
                }
            }
        };
        let credential = match Credential::from_text(self.header, &text) {
            Ok(c) => c,
            Err(e) => {
                let why = e.strip_prefix("credentials: ").unwrap_or(&e);
                return KeyReload::Refused {
                    reason: format!("credentials.api_key_file: {path}: {why}"),
                };
            }
        };
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        if current.digest == credential.digest {
            return KeyReload::Unchanged;
        }
        let fingerprint = short_fingerprint(&credential.digest);
        *current = credential;
        KeyReload::Rotated { fingerprint }
    }

    /// The fingerprint of the key in use, as logged.
    pub fn fingerprint(&self) -> String {
        short_fingerprint(
            &self
                .current
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .digest,
        )
    }
}

/// Enough of the key's SHA-256 for an operator to tell two keys apart in the log (the first 8
/// hex digits of `printf %s "$KEY" | sha256sum`), far too little to learn anything about it.
fn short_fingerprint(digest: &[u8; 32]) -> String {
    digest[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// Polls the held key's file every `interval` until `stop` resolves, and puts a new key in use
/// as soon as the file holds one.
///
/// Polling the content, not inotify on the path: Kubernetes updates a Secret volume by
/// pointing the `..data` symlink at a new directory, so the file's own inode never changes and
/// a watch on it sees nothing (and a watch on a deleted inode never fires again). Reading a
/// few bytes every couple of seconds costs nothing and follows every way a file can be
/// replaced. Each distinct problem is logged once, not every interval.
pub async fn watch_key_file(
    upstream: Arc<Upstream>,
    interval: Duration,
    stop: impl std::future::Future<Output = ()>,
) {
    let Some((credential, path)) = upstream
        .credential
        .as_ref()
        .and_then(|c| c.file().map(|p| (c, p.to_path_buf())))
    else {
        return;
    };
    tracing::info!(
        file = %path.display(),
        fingerprint = %credential.fingerprint(),
        every = ?interval,
        "watching the key file for a new key"
    );
    tokio::pin!(stop);
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_refusal: Option<String> = None;
    loop {
        // The read too is given up at shutdown: a file on a hung mount must not hold the exit.
        let read = tokio::select! {
            read = async {
                ticks.tick().await;
                tokio::fs::read_to_string(&path).await
            } => read,
            () = &mut stop => return,
        };
        match credential.consider(read) {
            KeyReload::Unchanged => last_refusal = None,
            KeyReload::Rotated { fingerprint } => {
                last_refusal = None;
                tracing::info!(file = %path.display(), %fingerprint, "new key in use for new upstream calls");
            }
            KeyReload::Refused { reason } => {
                if last_refusal.as_deref() != Some(reason.as_str()) {
                    tracing::error!(
                        fingerprint = %credential.fingerprint(),
                        "{reason}; keeping the key in use"
                    );
                    last_refusal = Some(reason);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_credential_replaces_both_kinds_of_caller_key_and_is_not_printed() {
        let c = Credential::new(CredentialHeader::Authorization, "sk-real").unwrap();
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer dummy"),
        );
        h.insert("api-key", HeaderValue::from_static("dummy"));
        c.apply(&mut h);
        assert_eq!(h[header::AUTHORIZATION], "Bearer sk-real");
        assert!(h[header::AUTHORIZATION].is_sensitive());
        assert!(!h.contains_key("api-key"));
        assert!(!format!("{c:?}").contains("sk-real"));
        let c = Credential::new(CredentialHeader::ApiKey, "azure-key").unwrap();
        c.apply(&mut h);
        assert_eq!(h["api-key"], "azure-key");
        assert!(!h.contains_key(header::AUTHORIZATION));
    }

    fn held(key: &str) -> HeldCredential {
        let c = Credential::new(CredentialHeader::Authorization, key).unwrap();
        HeldCredential::new(
            CredentialHeader::Authorization,
            c,
            Some(PathBuf::from("/secrets/key")),
        )
    }

    fn sent(h: &HeldCredential) -> String {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer dummy"),
        );
        h.apply(&mut headers);
        headers[header::AUTHORIZATION].to_str().unwrap().to_string()
    }

    #[test]
    fn a_new_key_in_the_file_is_used_from_then_on_under_the_same_identity() {
        let h = held("sk-old");
        let id = h.id();
        assert_eq!(h.consider(Ok("sk-old\n".into())), KeyReload::Unchanged);
        let KeyReload::Rotated { fingerprint } = h.consider(Ok("  sk-new\n".into())) else {
            panic!("not rotated");
        };
        // The first 8 hex digits of SHA-256("sk-new"), never the key.
        assert_eq!(fingerprint.len(), 8);
        assert_eq!(fingerprint, h.fingerprint());
        assert!(!fingerprint.contains("sk-new"));
        assert_eq!(sent(&h), "Bearer sk-new");
        assert!(h.id() == id, "the tenant does not change with its key");
        assert_eq!(h.consider(Ok("sk-new".into())), KeyReload::Unchanged);
    }

    #[test]
    fn an_empty_unreadable_or_unusable_file_keeps_the_key_in_use_and_does_not_echo_it() {
        let h = held("sk-good");
        for bad in [
            Ok(String::new()),
            Ok(" \n\t".into()),
            Ok("sk-bad\u{7f}HIDDEN".into()),
            Ok("sk-two\nlines-HIDDEN".into()),
            Err(std::io::Error::from(std::io::ErrorKind::NotFound)),
        ] {
            let shown = format!("{bad:?}");
            match h.consider(bad) {
                KeyReload::Refused { reason } => {
                    assert!(!reason.contains("HIDDEN"), "{reason}");
                    assert!(reason.contains("/secrets/key"), "{reason}");
                }
                other => panic!("{shown}: {other:?}"),
            }
            assert_eq!(sent(&h), "Bearer sk-good");
        }
    }
}
