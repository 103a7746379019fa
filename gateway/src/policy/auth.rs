//! Who is calling: API keys (stored as SHA-256 digests) and JWTs (keys from
//! config or a JWKS file, never from the token).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use http::HeaderMap;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::call::{Caller, Principal};
use crate::config::policy::{ApiKeyConfig, AuthConfig, JwtConfig, KeyMaterial, check_keys, parse_alg, valid_kid};

/// Prefix of keys made by `infergate keys new`; tells them apart from JWTs.
pub const KEY_PREFIX: &str = "ig_";

/// Why a request is not authenticated. Only logged: every failure answers
/// the client with the same 401 body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    Missing,
    BadScheme,
    UnknownKey,
    MalformedToken,
    UnknownKid,
    BadKid,
    AlgMismatch,
    InvalidToken,
    MissingClaim,
    /// A valid credential without the admin key id or role.
    NotAdmin,
}

impl AuthFailure {
    /// A stable name for logs and metrics.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::BadScheme => "bad_scheme",
            Self::UnknownKey => "unknown_key",
            Self::MalformedToken => "malformed_token",
            Self::UnknownKid => "unknown_kid",
            Self::BadKid => "bad_kid",
            Self::AlgMismatch => "alg_mismatch",
            Self::InvalidToken => "invalid_token",
            Self::MissingClaim => "missing_claim",
            Self::NotAdmin => "not_admin",
        }
    }
}

/// Why the configured key material cannot be used; stops the gateway at start.
#[derive(Debug, thiserror::Error)]
pub enum KeyLoadError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("environment variable {0} (auth.jwt secret_env) is not set")]
    MissingEnv(String),
    #[error("{what}: {message}")]
    Invalid { what: String, message: String },
}

fn read(path: &Path) -> Result<Vec<u8>, KeyLoadError> {
    std::fs::read(path).map_err(|source| KeyLoadError::Read { path: path.to_owned(), source })
}

/// API keys by digest. The lookup hashes what the client sent and looks the
/// digest up: the secret itself is never compared, and the final digest
/// comparison runs in constant time.
#[derive(Default)]
struct KeyTable {
    by_digest: HashMap<[u8; 32], Arc<ApiKeyConfig>>,
}

impl KeyTable {
    fn new(keys: impl IntoIterator<Item = ApiKeyConfig>) -> Self {
        Self { by_digest: keys.into_iter().map(|k| (k.sha256, Arc::new(k))).collect() }
    }

    fn find(&self, presented: &str) -> Option<&Arc<ApiKeyConfig>> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        self.by_digest.get(&digest).filter(|k| bool::from(k.sha256.ct_eq(&digest)))
    }
}

/// One usable JWT key.
struct JwtKey {
    alg: Algorithm,
    key: DecodingKey,
}

/// JWT keys by `kid` (`None`: the single key of a config without kids).
type JwtKeys = HashMap<Option<String>, Arc<JwtKey>>;

/// A file watched for changes, reloaded by [`Authenticator::reload_changed`].
struct Watched {
    path: PathBuf,
    modified: Option<SystemTime>,
}

impl Watched {
    fn new(path: &Path) -> Self {
        Self { path: path.to_owned(), modified: modified(path) }
    }

    /// True once per change of the file's modification time.
    fn changed(&mut self) -> bool {
        let now = modified(&self.path);
        let changed = now != self.modified;
        self.modified = now;
        changed
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Decides who a request comes from.
pub struct Authenticator {
    config: AuthConfig,
    keys: RwLock<Arc<KeyTable>>,
    jwt_keys: RwLock<Arc<JwtKeys>>,
    watched_keys: std::sync::Mutex<Option<Watched>>,
    watched_jwks: std::sync::Mutex<Option<Watched>>,
}

impl Authenticator {
    /// Load keys (config, keys file, JWT key material); any failure stops the start.
    pub fn new(config: AuthConfig) -> Result<Self, KeyLoadError> {
        let keys = load_key_table(&config)?;
        let jwt_keys = match &config.jwt {
            Some(jwt) => load_jwt_keys(jwt)?,
            None => JwtKeys::new(),
        };
        let watched_keys = config.keys_file.as_deref().map(Watched::new);
        let watched_jwks = config.jwt.as_ref().and_then(|j| j.jwks_file.as_deref()).map(Watched::new);
        Ok(Self {
            config,
            keys: RwLock::new(Arc::new(keys)),
            jwt_keys: RwLock::new(Arc::new(jwt_keys)),
            watched_keys: std::sync::Mutex::new(watched_keys),
            watched_jwks: std::sync::Mutex::new(watched_jwks),
        })
    }

    /// Auth off, no keys.
    pub fn disabled() -> Self {
        Self {
            config: AuthConfig::default(),
            keys: RwLock::default(),
            jwt_keys: RwLock::default(),
            watched_keys: std::sync::Mutex::new(None),
            watched_jwks: std::sync::Mutex::new(None),
        }
    }

    pub fn enabled(&self) -> bool {
        self.config.enabled
    }

    /// True for routes served without credentials.
    pub fn is_public(&self, path: &str) -> bool {
        self.config.public_routes.iter().any(|r| r.matches(path))
    }

    /// Re-read the keys file and the JWKS file if they changed. A file that
    /// no longer parses is reported and the previous keys stay in force.
    pub fn reload_changed(&self) {
        let keys_changed = self.watched_keys.lock().map(|mut w| w.as_mut().is_some_and(Watched::changed));
        if keys_changed.unwrap_or(false) {
            match load_key_table(&self.config) {
                Ok(table) => {
                    let n = table.by_digest.len();
                    if let Ok(mut keys) = self.keys.write() {
                        *keys = Arc::new(table);
                    }
                    tracing::info!(keys = n, "API keys reloaded");
                }
                Err(e) => tracing::error!(error = %e, "keys file not reloaded; the previous keys stay in force"),
            }
        }
        let jwks_changed = self.watched_jwks.lock().map(|mut w| w.as_mut().is_some_and(Watched::changed));
        if let (Ok(true), Some(jwt)) = (jwks_changed, &self.config.jwt) {
            match load_jwt_keys(jwt) {
                Ok(keys) => {
                    let n = keys.len();
                    if let Ok(mut current) = self.jwt_keys.write() {
                        *current = Arc::new(keys);
                    }
                    tracing::info!(keys = n, "JWT keys reloaded");
                }
                Err(e) => tracing::error!(error = %e, "JWKS file not reloaded; the previous keys stay in force"),
            }
        }
    }

    /// The caller behind `headers` (`Authorization: Bearer …` or `x-api-key`).
    pub fn authenticate(&self, headers: &HeaderMap, client: std::net::IpAddr) -> Result<Caller, AuthFailure> {
        let token = credential(headers)?;
        match &self.config.jwt {
            Some(jwt) if !token.starts_with(KEY_PREFIX) && token.bytes().filter(|b| *b == b'.').count() == 2 => {
                self.verify_jwt(jwt, token, client)
            }
            _ => {
                let keys = self.keys.read().map(|k| Arc::clone(&k)).map_err(|_| AuthFailure::UnknownKey)?;
                let key = keys.find(token).ok_or(AuthFailure::UnknownKey)?;
                Ok(Caller {
                    principal: Principal::Key(key.id.as_str().into()),
                    tenant: key.tenant.as_str().into(),
                    tier: key.tier.as_str().into(),
                    client,
                    models: key.models.clone().map(Arc::new),
                    limits: key.limits,
                })
            }
        }
    }

    /// Who is behind `headers` if they may use the admin API: an API key
    /// whose id is in `keys`, or a valid JWT whose `role_claim` (a string
    /// or an array of strings) holds `role`. Auth need not be enabled for
    /// the client listeners: admin calls always need a credential.
    pub fn admin(
        &self,
        headers: &HeaderMap,
        keys: &[String],
        role: Option<&crate::config::components::AdminRole>,
    ) -> Result<String, AuthFailure> {
        let token = credential(headers)?;
        match (&self.config.jwt, role) {
            (Some(jwt), Some(role))
                if !token.starts_with(KEY_PREFIX) && token.bytes().filter(|b| *b == b'.').count() == 2 =>
            {
                let claims = self.decode_jwt(jwt, token)?;
                let holds = match claims.get(&role.claim) {
                    Some(serde_json::Value::String(r)) => r == &role.role,
                    Some(serde_json::Value::Array(rs)) => rs.iter().any(|r| r.as_str() == Some(role.role.as_str())),
                    _ => false,
                };
                let user = claims.get(&jwt.user_claim).and_then(serde_json::Value::as_str).unwrap_or("?");
                if holds { Ok(format!("user:{user}")) } else { Err(AuthFailure::NotAdmin) }
            }
            _ => {
                let table = self.keys.read().map(|k| Arc::clone(&k)).map_err(|_| AuthFailure::UnknownKey)?;
                let key = table.find(token).ok_or(AuthFailure::UnknownKey)?;
                if keys.contains(&key.id) { Ok(format!("key:{}", key.id)) } else { Err(AuthFailure::NotAdmin) }
            }
        }
    }

    fn verify_jwt(&self, jwt: &JwtConfig, token: &str, client: std::net::IpAddr) -> Result<Caller, AuthFailure> {
        let claims = self.decode_jwt(jwt, token)?;
        let claim = |name: &str| claims.get(name).and_then(serde_json::Value::as_str).filter(|s| !s.is_empty());
        let user = claim(&jwt.user_claim).ok_or(AuthFailure::MissingClaim)?;
        let tenant = claim(&jwt.tenant_claim).ok_or(AuthFailure::MissingClaim)?;
        let tier = claim(&jwt.tier_claim).unwrap_or(&jwt.default_tier);
        Ok(Caller {
            principal: Principal::User(user.into()),
            tenant: tenant.into(),
            tier: tier.into(),
            client,
            models: None,
            limits: None,
        })
    }

    /// The claims of `token` once its signature, issuer, audience and times
    /// check out.
    fn decode_jwt(
        &self,
        jwt: &JwtConfig,
        token: &str,
    ) -> Result<serde_json::Map<String, serde_json::Value>, AuthFailure> {
        // Only alg, kid and typ are read from the header: a `jku`, `x5u`,
        // `jwk` or `x5c` in it is never fetched or trusted.
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthFailure::MalformedToken)?;
        let keys = self.jwt_keys.read().map(|k| Arc::clone(&k)).map_err(|_| AuthFailure::UnknownKid)?;
        let key = match &header.kid {
            Some(kid) if !valid_kid(kid) => return Err(AuthFailure::BadKid),
            Some(kid) => keys.get(&Some(kid.clone())).or_else(|| keys.get(&None)),
            None if keys.len() == 1 => keys.values().next(),
            None => None,
        }
        .ok_or(AuthFailure::UnknownKid)?;
        if header.alg != key.alg {
            return Err(AuthFailure::AlgMismatch);
        }
        let mut validation = Validation::new(key.alg);
        validation.leeway = jwt.leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = true;
        validation.set_issuer(&[&jwt.issuer]);
        validation.set_audience(&[&jwt.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, &key.key, &validation)
            .map_err(|_| AuthFailure::InvalidToken)?;
        Ok(data.claims)
    }
}

/// The presented secret: `Authorization: Bearer <token>`, else `x-api-key`.
fn credential(headers: &HeaderMap) -> Result<&str, AuthFailure> {
    if let Some(value) = headers.get(http::header::AUTHORIZATION) {
        let value = value.to_str().map_err(|_| AuthFailure::BadScheme)?;
        let (scheme, token) = value.split_once(' ').ok_or(AuthFailure::BadScheme)?;
        let token = token.trim();
        if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
            return Err(AuthFailure::BadScheme);
        }
        return Ok(token);
    }
    match headers.get("x-api-key") {
        Some(v) => v.to_str().ok().map(str::trim).filter(|t| !t.is_empty()).ok_or(AuthFailure::UnknownKey),
        None => Err(AuthFailure::Missing),
    }
}

/// `[[keys]]` of a keys file.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    keys: Vec<crate::config::raw::RawApiKey>,
}

fn load_key_table(config: &AuthConfig) -> Result<KeyTable, KeyLoadError> {
    let mut keys = config.keys.clone();
    if let Some(path) = &config.keys_file {
        let text = String::from_utf8_lossy(&read(path)?).into_owned();
        let file: KeysFile = toml::from_str(&text)
            .map_err(|e| KeyLoadError::Invalid { what: path.display().to_string(), message: e.to_string() })?;
        let from_file = check_keys(&path.display().to_string(), &file.keys)
            .map_err(|e| KeyLoadError::Invalid { what: path.display().to_string(), message: e.to_string() })?;
        for k in from_file {
            if keys.iter().any(|c| c.id == k.id || c.sha256 == k.sha256) {
                return Err(KeyLoadError::Invalid {
                    what: path.display().to_string(),
                    message: format!("key {:?} is also in auth.keys", k.id),
                });
            }
            keys.push(k);
        }
    }
    Ok(KeyTable::new(keys))
}

/// Shortest HS256 secret accepted: as long as the hash (RFC 7518 §3.2).
pub const MIN_HS256_SECRET: usize = 32;

/// `secret` if it is long enough to be an HS256 key.
fn long_enough(secret: &[u8], what: impl Fn() -> String) -> Result<&[u8], KeyLoadError> {
    if secret.len() < MIN_HS256_SECRET {
        return Err(KeyLoadError::Invalid {
            what: what(),
            message: format!(
                "an HS256 secret must be at least {MIN_HS256_SECRET} bytes, this one is {} (e.g. `openssl rand -hex 32`)",
                secret.len()
            ),
        });
    }
    Ok(secret)
}

fn load_jwt_keys(jwt: &JwtConfig) -> Result<JwtKeys, KeyLoadError> {
    let mut keys = JwtKeys::new();
    for (i, k) in jwt.keys.iter().enumerate() {
        let what = || format!("auth.jwt.keys[{i}]");
        let bad = |e: jsonwebtoken::errors::Error| KeyLoadError::Invalid { what: what(), message: e.to_string() };
        let key = match (&k.material, k.alg) {
            (KeyMaterial::SecretEnv(var), _) => {
                let secret = std::env::var(var).map_err(|_| KeyLoadError::MissingEnv(var.clone()))?;
                DecodingKey::from_secret(long_enough(secret.trim_end().as_bytes(), || {
                    format!("{}.secret_env", what())
                })?)
            }
            (KeyMaterial::SecretFile(path), _) => {
                let secret = read(path)?;
                DecodingKey::from_secret(long_enough(secret.trim_ascii_end(), || format!("{}.secret_file", what()))?)
            }
            (KeyMaterial::PublicKeyFile(path), Algorithm::RS256) => {
                DecodingKey::from_rsa_pem(&read(path)?).map_err(bad)?
            }
            (KeyMaterial::PublicKeyFile(path), _) => DecodingKey::from_ec_pem(&read(path)?).map_err(bad)?,
        };
        keys.insert(k.kid.clone(), Arc::new(JwtKey { alg: k.alg, key }));
    }
    if let Some(path) = &jwt.jwks_file {
        let what = path.display().to_string();
        let set: jsonwebtoken::jwk::JwkSet = serde_json::from_slice(&read(path)?)
            .map_err(|e| KeyLoadError::Invalid { what: what.clone(), message: e.to_string() })?;
        for (i, jwk) in set.keys.iter().enumerate() {
            let bad = |message: String| KeyLoadError::Invalid { what: format!("{what}: keys[{i}]"), message };
            let alg = jwk
                .common
                .key_algorithm
                .and_then(|a| parse_alg(&a.to_string()))
                .ok_or_else(|| bad("needs \"alg\": HS256, RS256 or ES256".into()))?;
            let kid = jwk.common.key_id.clone();
            if kid.as_deref().is_some_and(|k| !valid_kid(k)) {
                return Err(bad("kid has characters other than letters, digits, '-', '_' and '.'".into()));
            }
            if let jsonwebtoken::jwk::AlgorithmParameters::OctetKey(oct) = &jwk.algorithm {
                use base64::Engine;
                let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(oct.value.trim_end_matches('='))
                    .map_err(|e| bad(format!("\"k\" is not base64url: {e}")))?;
                long_enough(&secret, || format!("{what}: keys[{i}].k"))?;
            }
            let key = DecodingKey::from_jwk(jwk).map_err(|e| bad(e.to_string()))?;
            keys.insert(kid, Arc::new(JwtKey { alg, key }));
        }
    }
    Ok(keys)
}

/// A fresh API key and the config lines that admit it (`infergate keys new`).
pub fn new_key(id: &str, tenant: &str, tier: &str) -> Result<(String, String), getrandom::Error> {
    use base64::Engine;
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret)?;
    let key = format!("{KEY_PREFIX}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret));
    let digest = hex::encode(Sha256::digest(key.as_bytes()));
    let toml = format!(
        "[[auth.keys]]\nid = {id:?}\nsha256 = \"{digest}\"\ntenant = {tenant:?}\ntier = {tier:?}\n\
         # models = [\"minilm\"]                    # all models when left out\n\
         # limits = {{ rate = 10, burst = 20, tokens_per_minute = 100000, max_in_flight = 8 }}\n"
    );
    Ok((key, toml))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::policy::AuthConfig;

    fn headers(key: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-api-key", key.parse().unwrap());
        h
    }

    const LOCAL: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn a_new_key_is_admitted_by_the_lines_printed_for_it() {
        let (key, toml) = new_key("ci", "acme", "vip").unwrap();
        assert!(key.starts_with(KEY_PREFIX) && key.len() > 40, "{key}");
        assert!(!toml.contains(&key), "only the digest goes into config");
        let file: toml::Table = toml.parse().unwrap();
        let raw: crate::config::raw::RawConfig =
            toml::Value::Table(file).try_into().unwrap_or_else(|e| panic!("{toml}\n{e}"));
        let auth = Authenticator::new(AuthConfig::from_raw(&raw.auth).unwrap()).unwrap();
        let caller = auth.authenticate(&headers(&key), LOCAL).unwrap();
        assert_eq!(caller.principal, Principal::Key("ci".into()));
        assert_eq!((&*caller.tenant, &*caller.tier), ("acme", "vip"));
        let (other, _) = new_key("ci", "acme", "vip").unwrap();
        assert_ne!(key, other);
    }

    #[test]
    fn the_keys_file_is_reloaded_when_it_changes_and_kept_when_broken() {
        let dir = std::env::temp_dir().join(format!("infergate-keys-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys.toml");
        let entry = |id: &str, key: &str| {
            format!("[[keys]]\nid = \"{id}\"\nsha256 = \"{}\"\ntenant = \"t\"\n", hex::encode(Sha256::digest(key)))
        };
        std::fs::write(&path, entry("one", "ig_first")).unwrap();
        let config = AuthConfig { enabled: true, keys_file: Some(path.clone()), ..AuthConfig::default() };
        let auth = Authenticator::new(config).unwrap();
        assert!(auth.authenticate(&headers("ig_first"), LOCAL).is_ok());
        assert_eq!(auth.authenticate(&headers("ig_second"), LOCAL).unwrap_err(), AuthFailure::UnknownKey);

        // mtime resolution can be coarse: set distinct times explicitly.
        let touch = |secs: u64| {
            let t = SystemTime::now() + std::time::Duration::from_secs(secs);
            std::fs::File::options().write(true).open(&path).unwrap().set_modified(t).unwrap();
        };
        std::fs::write(&path, entry("two", "ig_second")).unwrap();
        touch(1);
        auth.reload_changed();
        assert!(auth.authenticate(&headers("ig_second"), LOCAL).is_ok());
        assert!(auth.authenticate(&headers("ig_first"), LOCAL).is_err(), "a removed key stops working");

        std::fs::write(&path, "[[keys]]\nid = ").unwrap();
        touch(3);
        auth.reload_changed();
        assert!(auth.authenticate(&headers("ig_second"), LOCAL).is_ok(), "a broken file keeps the previous keys");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn short_hs256_secrets_stop_the_start_with_the_key_named() {
        use crate::config::policy::{JwtKeyConfig, KeyMaterial};
        use base64::Engine;
        let dir = std::env::temp_dir().join(format!("infergate-hs-short-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let jwt = |keys: Vec<JwtKeyConfig>, jwks_file: Option<PathBuf>| JwtConfig {
            issuer: "i".into(),
            audience: "a".into(),
            leeway: std::time::Duration::from_secs(30),
            keys,
            jwks_file,
            tenant_claim: "tenant".into(),
            tier_claim: "tier".into(),
            user_claim: "sub".into(),
            default_tier: "standard".into(),
        };
        let start = |jwt: JwtConfig| {
            Authenticator::new(AuthConfig { enabled: true, jwt: Some(jwt), ..AuthConfig::default() }).err()
        };
        for secret in ["", "\n", "31 bytes: not quite long enough"] {
            let path = dir.join("secret");
            std::fs::write(&path, secret).unwrap();
            let key = JwtKeyConfig { kid: None, alg: Algorithm::HS256, material: KeyMaterial::SecretFile(path) };
            let err = start(jwt(vec![key], None)).map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains("auth.jwt.keys[0].secret_file") && err.contains("at least 32"), "{secret:?}: {err}");
        }
        let jwks = dir.join("jwks.json");
        let k = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b"short");
        std::fs::write(&jwks, serde_json::json!({"keys": [{"kty": "oct", "alg": "HS256", "k": k}]}).to_string())
            .unwrap();
        let err = start(jwt(Vec::new(), Some(jwks))).map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("keys[0].k") && err.contains("at least 32"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn jwks_keys_verify_tokens_and_must_name_their_alg() {
        use base64::Engine;
        use jsonwebtoken::{Algorithm, EncodingKey, Header};
        let secret = b"a jwks-held shared secret for the test, long enough";
        let k = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret);
        let dir = std::env::temp_dir().join(format!("infergate-jwks-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("jwks.json");
        let jwks = serde_json::json!({"keys": [{"kty": "oct", "kid": "j1", "alg": "HS256", "k": k}]});
        std::fs::write(&path, jwks.to_string()).unwrap();
        let jwt = JwtConfig {
            issuer: "i".into(),
            audience: "a".into(),
            leeway: std::time::Duration::from_secs(30),
            keys: Vec::new(),
            jwks_file: Some(path.clone()),
            tenant_claim: "tenant".into(),
            tier_claim: "tier".into(),
            user_claim: "sub".into(),
            default_tier: "standard".into(),
        };
        let auth =
            Authenticator::new(AuthConfig { enabled: true, jwt: Some(jwt.clone()), ..AuthConfig::default() }).unwrap();
        let exp = SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 60;
        let claims = serde_json::json!({"iss": "i", "aud": "a", "sub": "u7", "tenant": "t", "exp": exp});
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("j1".into());
        let token = jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(secret)).unwrap();
        let mut h = HeaderMap::new();
        h.insert("authorization", format!("Bearer {token}").parse().unwrap());
        let caller = auth.authenticate(&h, LOCAL).unwrap();
        assert_eq!(caller.principal, Principal::User("u7".into()));
        assert_eq!(&*caller.tier, "standard", "no tier claim: the default");

        // A JWKS key without "alg" would let the token choose: refused at load.
        let jwks = serde_json::json!({"keys": [{"kty": "oct", "kid": "j1", "k": k}]});
        std::fs::write(&path, jwks.to_string()).unwrap();
        let config = AuthConfig { enabled: true, jwt: Some(jwt), ..AuthConfig::default() };
        assert!(matches!(Authenticator::new(config), Err(KeyLoadError::Invalid { .. })));
        let _ = std::fs::remove_dir_all(dir);
    }
}
