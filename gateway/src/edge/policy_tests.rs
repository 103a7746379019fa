//! Auth, limits and client addressing at the edge, against the fake upstream:
//! every refusal is checked to happen before the upstream is called.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use base64::Engine;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use sha2::Digest;
use tower::ServiceExt;

use super::EdgeState;
use super::tests::Fake;
use crate::config::{Config, RawConfig};
use crate::policy::{PeerAddr, Policy};

const KEY: &str = "ig_test-key-0123456789abcdefghijklmnopqrstuv";
/// The HS256 key's secret, as `secret_file` holds it.
const HS_SECRET: &str = include_str!("../policy/testdata/hs256.secret");
const TESTDATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/policy/testdata");

fn sha256(s: &str) -> String {
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

/// A config with auth on: one key (models `m` only), HS256/RS256/ES256 JWT keys.
fn config(extra: &str) -> Config {
    let text = format!(
        r#"
[auth]
enabled = true
[[auth.keys]]
id = "k1"
sha256 = "{}"
tenant = "acme"
tier = "vip"
models = ["m"]
[auth.jwt]
issuer = "https://issuer.test"
audience = "infergate"
leeway = "30s"
[[auth.jwt.keys]]
kid = "hs"
alg = "HS256"
secret_file = "{TESTDATA}/hs256.secret"
[[auth.jwt.keys]]
kid = "rs"
alg = "RS256"
public_key_file = "{TESTDATA}/rs256-public.pem"
[[auth.jwt.keys]]
kid = "es"
alg = "ES256"
public_key_file = "{TESTDATA}/es256-public.pem"
{extra}
[[pools]]
name = "p"
class = "x:Y"
"#,
        sha256(KEY),
    );
    let raw: RawConfig = toml::from_str(&text).unwrap();
    Config::from_raw(raw).unwrap()
}

fn app(config: &Config, fake: Fake) -> (axum::Router, Arc<Fake>) {
    let (state, fake) = state(config, fake);
    (super::rest::router(state), fake)
}

fn state(config: &Config, fake: Fake) -> (Arc<EdgeState>, Arc<Fake>) {
    let fake = Arc::new(fake);
    let core = crate::service::Core::new(
        fake.clone(),
        crate::service::Live {
            policy: Policy::new(config).unwrap(),
            routes: Arc::new(crate::route::Routes::new(&config.aliases)),
            cache: crate::cache::ResponseCache::disabled(),
            prices: Arc::default(),
            streams: Default::default(),
        },
    );
    let state = Arc::new(EdgeState {
        conversations: crate::conversations::Conversations::in_memory(),
        queue: None,
        core: Arc::new(core),
        default_deadline: Duration::from_secs(30),
        max_body_bytes: 1024,
        max_message_bytes: 1024,
        http_max_in_flight: 64,
        grpc_max_in_flight: 64,
        buffered: super::gate::Buffered::new(1 << 30),
        sse_keep_alive: std::time::Duration::from_secs(15),
        image: super::convert::ImageBounds { pixels: 1 << 24, bytes: 1 << 28 },
        draining: tokio_util::sync::CancellationToken::new(),
    });
    (state, fake)
}

fn ready() -> Fake {
    Fake { ready: true, ..Default::default() }
}

fn embed(auth: Option<(&str, &str)>) -> Request<Body> {
    let mut req = Request::post("/v1/embeddings").header("content-type", "application/json");
    if let Some((name, value)) = auth {
        req = req.header(name, value);
    }
    req.body(Body::from(json!({"model": "m", "input": "x"}).to_string())).unwrap()
}

fn bearer(token: &str) -> Request<Body> {
    embed(Some(("authorization", &format!("Bearer {token}"))))
}

async fn send(app: &axum::Router, req: Request<Body>) -> (StatusCode, http::HeaderMap, Vec<u8>) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    (parts.status, parts.headers, body.collect().await.unwrap().to_bytes().to_vec())
}

fn calls(fake: &Fake) -> usize {
    fake.budgets.lock().unwrap().len()
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn claims() -> serde_json::Map<String, Value> {
    let c =
        json!({"iss": "https://issuer.test", "aud": "infergate", "sub": "u1", "tenant": "acme", "exp": now() + 300});
    c.as_object().unwrap().clone()
}

fn jwt(alg: Algorithm, kid: &str, claims: &serde_json::Map<String, Value>) -> String {
    let mut header = Header::new(alg);
    header.kid = Some(kid.into());
    let key = match alg {
        Algorithm::HS256 => EncodingKey::from_secret(HS_SECRET.as_bytes()),
        Algorithm::RS256 => {
            EncodingKey::from_rsa_pem(&std::fs::read(format!("{TESTDATA}/rs256-private.pem")).unwrap()).unwrap()
        }
        _ => EncodingKey::from_ec_pem(&std::fs::read(format!("{TESTDATA}/es256-private.pem")).unwrap()).unwrap(),
    };
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

fn b64(v: &Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

#[tokio::test]
async fn no_credentials_is_401_before_any_work_and_public_routes_stay_open() {
    let (app, fake) = app(&config(""), ready());
    let (status, headers, body) = send(&app, embed(None)).await;
    assert_eq!(status, 401);
    assert_eq!(headers["www-authenticate"], "Bearer");
    assert_eq!(headers["content-type"], "application/problem+json");
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["type"], "urn:infergate:error:unauthenticated");
    // Unknown routes are not revealed to strangers either.
    let (status, _, _) = send(&app, Request::get("/nope").body(Body::empty()).unwrap()).await;
    assert_eq!(status, 401);
    let (status, _, _) = send(&app, Request::get("/healthz").body(Body::empty()).unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(calls(&fake), 0);
}

#[tokio::test]
async fn api_keys_work_as_bearer_or_x_api_key_and_bad_ones_get_identical_401s() {
    let (app, fake) = app(&config(""), ready());
    assert_eq!(send(&app, bearer(KEY)).await.0, 200);
    assert_eq!(send(&app, embed(Some(("x-api-key", KEY)))).await.0, 200);
    assert_eq!(calls(&fake), 2);

    let unknown = send(&app, bearer("ig_somebody-elses-key-that-does-not-exist")).await;
    let mut wrong = KEY.to_owned();
    wrong.pop();
    wrong.push('!');
    let wrong = send(&app, bearer(&wrong)).await;
    let basic = send(&app, embed(Some(("authorization", "Basic dXNlcjpwYXNz")))).await;
    assert_eq!(unknown.0, 401);
    assert_eq!(unknown.2, wrong.2, "unknown and wrong keys must be indistinguishable");
    assert_eq!(unknown.2, basic.2);
    assert_eq!(calls(&fake), 2, "no refused request reached the upstream");
}

#[tokio::test]
async fn a_key_may_only_use_its_models() {
    let policy = Policy::new(&config("")).unwrap();
    let caller = policy.identify("/v1/embeddings", bearer(KEY).headers(), None).unwrap();
    assert_eq!(&*caller.tenant, "acme");
    assert_eq!(&*caller.tier, "vip");
    assert!(policy.admit(&caller, "m", crate::policy::Tokens::NONE).await.is_ok());
    let refusal = policy.admit(&caller, "other", crate::policy::Tokens::NONE).await.err().unwrap();
    assert_eq!(refusal.http_status(), 403);
    assert_eq!(refusal.grpc_code(), tonic::Code::PermissionDenied);
}

#[tokio::test]
async fn valid_jwts_of_each_algorithm_are_accepted() {
    let (app, fake) = app(&config(""), ready());
    for (alg, kid) in [(Algorithm::HS256, "hs"), (Algorithm::RS256, "rs"), (Algorithm::ES256, "es")] {
        let (status, _, body) = send(&app, bearer(&jwt(alg, kid, &claims()))).await;
        assert_eq!(status, 200, "{alg:?}: {}", String::from_utf8_lossy(&body));
    }
    // Within the leeway, an expired token still passes.
    let mut c = claims();
    c.insert("exp".into(), json!(now() - 10));
    assert_eq!(send(&app, bearer(&jwt(Algorithm::HS256, "hs", &c))).await.0, 200);
    assert_eq!(calls(&fake), 4);
}

#[tokio::test]
async fn forged_and_invalid_jwts_are_refused_before_any_work() {
    let (app, fake) = app(&config(""), ready());
    let rs_public = std::fs::read(format!("{TESTDATA}/rs256-public.pem")).unwrap();
    let with = |k: &str, v: Value| {
        let mut c = claims();
        c.insert(k.into(), v);
        c
    };
    let without = |k: &str| {
        let mut c = claims();
        c.remove(k);
        c
    };
    let mut attacks: Vec<(&str, String)> = vec![
        (
            "alg none",
            format!("{}.{}.", b64(&json!({"alg": "none", "typ": "JWT", "kid": "hs"})), b64(&Value::Object(claims()))),
        ),
        ("expired beyond leeway", jwt(Algorithm::HS256, "hs", &with("exp", json!(now() - 120)))),
        ("nbf in the future", jwt(Algorithm::HS256, "hs", &with("nbf", json!(now() + 120)))),
        ("wrong aud", jwt(Algorithm::HS256, "hs", &with("aud", json!("someone-else")))),
        ("wrong iss", jwt(Algorithm::HS256, "hs", &with("iss", json!("https://evil.test")))),
        ("missing exp", jwt(Algorithm::HS256, "hs", &without("exp"))),
        ("kid with path characters", jwt(Algorithm::HS256, "../../etc/passwd", &claims())),
        ("unknown kid", jwt(Algorithm::HS256, "nope", &claims())),
        ("RS256 token under the HS256 kid", jwt(Algorithm::RS256, "hs", &claims())),
        ("tampered payload", {
            let t = jwt(Algorithm::HS256, "hs", &claims());
            let parts: Vec<&str> = t.split('.').collect();
            format!("{}.{}.{}", parts[0], b64(&Value::Object(with("tenant", json!("other")))), parts[2])
        }),
    ];
    // HS256 signed with the RS256 *public* key, presented under the RS256 kid.
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("rs".into());
    attacks.push((
        "HS256 signed with the RS256 public key",
        jsonwebtoken::encode(&header, &claims(), &EncodingKey::from_secret(&rs_public)).unwrap(),
    ));
    for (name, token) in &attacks {
        let (status, _, body) = send(&app, bearer(token)).await;
        assert_eq!(status, 401, "{name}: {}", String::from_utf8_lossy(&body));
    }
    assert_eq!(calls(&fake), 0, "no forged token reached the upstream");
}

#[tokio::test]
async fn jku_and_x5u_headers_are_never_fetched() {
    // A listener that would serve the attacker's keys: it must see no connection.
    let trap = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks.json", trap.local_addr().unwrap());
    let (app, fake) = app(&config(""), ready());
    let attacker = EncodingKey::from_secret(b"the attacker's own secret, which their jku serves");
    for field in ["jku", "x5u"] {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("attacker".into());
        match field {
            "jku" => header.jku = Some(url.clone()),
            _ => header.x5u = Some(url.clone()),
        }
        let token = jsonwebtoken::encode(&header, &claims(), &attacker).unwrap();
        assert_eq!(send(&app, bearer(&token)).await.0, 401, "{field}");
    }
    let accepted = tokio::time::timeout(Duration::from_millis(200), trap.accept()).await;
    assert!(accepted.is_err(), "the gateway fetched a key from a token header");
    assert_eq!(calls(&fake), 0);
}

fn limited_config(limits: &str) -> Config {
    config(&format!("[limits]\n{limits}"))
}

#[tokio::test]
async fn the_request_rate_refuses_past_the_burst_with_back_off_headers() {
    let (app, fake) = app(&limited_config("per_key = { rate = 1, burst = 2 }"), ready());
    assert_eq!(send(&app, bearer(KEY)).await.0, 200);
    assert_eq!(send(&app, bearer(KEY)).await.0, 200);
    let (status, headers, body) = send(&app, bearer(KEY)).await;
    assert_eq!(status, 429);
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(headers["ratelimit-limit"], "2");
    assert_eq!(headers["ratelimit-remaining"], "0");
    assert_eq!(headers["ratelimit-reset"], "1");
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["type"], "urn:infergate:error:rate-limited");
    assert_eq!(body["field"], "key.rate");
    assert_eq!(calls(&fake), 2);
}

#[tokio::test]
async fn a_key_whose_rate_is_spent_is_refused_before_its_body_is_read() {
    let (app, fake) = app(&limited_config("per_key = { rate = 1, burst = 1 }"), ready());
    assert_eq!(send(&app, bearer(KEY)).await.0, 200);
    assert_eq!(send(&app, bearer(KEY)).await.0, 429, "refused after its body was read");
    // A body that never comes: only a refusal that does not wait for it answers.
    let stalled = Request::post("/v1/embeddings")
        .header("authorization", format!("Bearer {KEY}"))
        .header("content-type", "application/json")
        .body(Body::from_stream(futures::stream::pending::<Result<bytes::Bytes, std::io::Error>>()))
        .unwrap();
    let (status, headers, body) = tokio::time::timeout(Duration::from_secs(30), send(&app, stalled))
        .await
        .expect("a spent key waited for its body");
    assert_eq!(status, 429);
    assert_eq!(headers["ratelimit-limit"], "1");
    assert!(headers.contains_key("retry-after") && headers.contains_key("x-request-id"));
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["field"], "key.rate");
    // Another caller's allowance is its own.
    assert_eq!(send(&app, bearer(&jwt(Algorithm::HS256, "hs", &claims()))).await.0, 200);
    assert_eq!(calls(&fake), 2);
}

#[tokio::test]
async fn token_limits_reconcile_with_the_reported_usage() {
    // Each request is estimated at 1 token; the fake reports 7 used.
    let (app, fake) = app(&limited_config("per_key = { tokens_per_minute = 20 }"), ready());
    for _ in 0..3 {
        assert_eq!(send(&app, bearer(KEY)).await.0, 200);
    }
    // 21 tokens used; without reconciliation 20 requests would have passed.
    let (status, _, body) = send(&app, bearer(KEY)).await;
    assert_eq!(status, 429, "{}", String::from_utf8_lossy(&body));
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["field"], "key.tokens_per_minute");
    assert_eq!(calls(&fake), 3);
}

#[tokio::test]
async fn in_flight_per_key_is_bounded() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (app, fake) =
        app(&limited_config("per_key = { max_in_flight = 1 }"), Fake { gate: Some(gate.clone()), ..ready() });
    let held = tokio::spawn({
        let app = app.clone();
        async move { send(&app, bearer(KEY)).await.0 }
    });
    while calls(&fake) == 0 {
        tokio::task::yield_now().await;
    }
    let (status, _, body) = send(&app, bearer(KEY)).await;
    assert_eq!(status, 429);
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap()["field"], "key.max_in_flight");
    gate.add_permits(1);
    assert_eq!(held.await.unwrap(), 200);
    assert_eq!(send(&app, bearer(KEY)).await.0, 200, "the permit was returned");
}

fn from_peer(peer: &str, forwarded_for: Option<&str>) -> Request<Body> {
    let mut req = embed(None);
    req.extensions_mut().insert(PeerAddr(peer.parse::<SocketAddr>().unwrap()));
    if let Some(xff) = forwarded_for {
        req.headers_mut().insert("x-forwarded-for", xff.parse().unwrap());
    }
    req
}

#[tokio::test]
async fn x_forwarded_for_is_believed_only_from_trusted_proxies() {
    let text = "[auth]\nenabled = false\n[http]\ntrusted_proxies = [\"10.0.0.0/8\"]\n\
                [limits]\nper_key = { rate = 0.001, burst = 1 }\n[[pools]]\nname = \"p\"\nclass = \"x:Y\"\n";
    let config = Config::from_raw(toml::from_str(text).unwrap()).unwrap();
    let (app, fake) = app(&config, ready());
    // An untrusted peer cannot escape its limit by claiming other addresses.
    assert_eq!(send(&app, from_peer("192.0.2.7:5000", Some("1.1.1.1"))).await.0, 200);
    assert_eq!(send(&app, from_peer("192.0.2.7:5001", Some("2.2.2.2"))).await.0, 429);
    // Through a trusted proxy, each forwarded client has its own allowance ...
    assert_eq!(send(&app, from_peer("10.1.2.3:6000", Some("3.3.3.3"))).await.0, 200);
    assert_eq!(send(&app, from_peer("10.1.2.3:6001", Some("4.4.4.4"))).await.0, 200);
    // ... and a client-supplied entry left of the proxy's own is not believed.
    assert_eq!(send(&app, from_peer("10.1.2.3:6002", Some("5.5.5.5, 3.3.3.3"))).await.0, 429);
    assert_eq!(calls(&fake), 3);

    let policy = Policy::new(&config).unwrap();
    let headers = |v: &str| {
        let mut h = http::HeaderMap::new();
        h.insert("x-forwarded-for", v.parse().unwrap());
        h
    };
    let addr = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    assert_eq!(policy.client_addr(addr("10.0.0.1"), &headers("9.9.9.9, 10.0.0.2")), addr("9.9.9.9"));
    assert_eq!(policy.client_addr(addr("10.0.0.1"), &headers("garbage")), addr("10.0.0.1"));
    assert_eq!(policy.client_addr(addr("8.8.8.8"), &headers("9.9.9.9")), addr("8.8.8.8"));
}

#[tokio::test]
async fn grpc_refusals_are_unauthenticated_and_resource_exhausted_with_metadata() {
    let (state, fake) = state(&limited_config("per_key = { rate = 1, burst = 1 }"), ready());
    let (_, health) = tonic_health::server::health_reporter();
    let app = super::grpc::router(state, health).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut client = crate::proto::inference_client::InferenceClient::new(channel);
    let request = |key: Option<&str>| {
        let mut r = tonic::Request::new(crate::proto::EmbedRequest {
            model: "m".into(),
            inputs: vec!["x".into()],
            ..Default::default()
        });
        if let Some(k) = key {
            r.metadata_mut().insert("x-api-key", k.parse().unwrap());
        }
        r
    };
    let status = client.embed(request(None)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    client.embed(request(Some(KEY))).await.unwrap();
    let status = client.embed(request(Some(KEY))).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    let md = status.metadata();
    assert_eq!(md.get("infergate-limit").unwrap(), "key.rate");
    assert_eq!(md.get("ratelimit-limit").unwrap(), "1");
    assert_eq!(md.get("retry-after").unwrap(), "1");
    assert_eq!(calls(&fake), 1);
}

/// A web page can make a browser send a body without asking first when it
/// has no type (or a form's), and can reach a localhost gateway by
/// rebinding its own name: with auth off both are refused.
#[tokio::test]
async fn with_auth_off_foreign_hosts_and_untyped_bodies_are_refused() {
    let text = "[auth]\nenabled = false\n[http]\nallowed_hosts = [\"gw.internal\"]\n[[pools]]\nname = \"p\"\nclass = \"x:Y\"\n";
    let config = Config::from_raw(toml::from_str(text).unwrap()).unwrap();
    let (app, fake) = app(&config, ready());
    let with_host = |host: &str| {
        let mut req = embed(None);
        req.headers_mut().insert("host", host.parse().unwrap());
        req
    };
    let (status, headers, body) = send(&app, with_host("rebound.evil.example:8080")).await;
    assert_eq!(status, 421);
    assert_eq!(headers["content-type"], "application/problem+json");
    assert!(String::from_utf8_lossy(&body).contains("host-not-allowed"));
    // Even the metrics are not shown to a rebound page.
    let mut metrics = Request::get("/metrics").body(Body::empty()).unwrap();
    metrics.headers_mut().insert("host", "rebound.evil.example".parse().unwrap());
    assert_eq!(send(&app, metrics).await.0, 421);
    assert_eq!(send(&app, with_host("127.0.0.1:8080")).await.0, 200);
    assert_eq!(send(&app, with_host("localhost")).await.0, 200);
    assert_eq!(send(&app, with_host("gw.internal:8080")).await.0, 200);
    for content_type in [None, Some("text/plain"), Some("application/x-www-form-urlencoded")] {
        let mut req = embed(None);
        req.headers_mut().remove("content-type");
        if let Some(ct) = content_type {
            req.headers_mut().insert("content-type", ct.parse().unwrap());
        }
        assert_eq!(send(&app, req).await.0, 415, "{content_type:?}");
    }
    assert_eq!(calls(&fake), 3);

    // With auth on, credentials are the gate: any Host is served.
    let (app, _) = app_with_auth();
    let mut req = embed(Some(("x-api-key", KEY)));
    req.headers_mut().insert("host", "gateway.example.com".parse().unwrap());
    assert_eq!(send(&app, req).await.0, 200);
}

fn app_with_auth() -> (axum::Router, Arc<Fake>) {
    app(&config(""), ready())
}

/// A generation that sets no `max_tokens` reserves the configured default
/// output with its prompt, so concurrent ones cannot overshoot the limit.
#[tokio::test]
async fn generations_without_max_tokens_reserve_the_default_output_cap() {
    use crate::policy::Tokens;
    let text = "[auth]\nenabled = false\n[limits]\nper_key = { tokens_per_minute = 1500 }\ndefault_max_tokens = 1000\n\
                [[pools]]\nname = \"p\"\nclass = \"x:Y\"\n";
    let policy = Policy::new(&Config::from_raw(toml::from_str(text).unwrap()).unwrap()).unwrap();
    let caller = crate::policy::Caller::anonymous("192.0.2.1".parse().unwrap());
    let chat = Tokens { prompt: 10, output: None };
    let first = policy.admit(&caller, "m", chat).await.unwrap();
    // 1,010 held: a second uncapped generation does not fit in 1,500 ...
    let refused = policy.admit(&caller, "m", chat).await.err().unwrap();
    assert!(
        matches!(&refused, crate::error::GatewayError::RateLimited { limit, .. } if limit == "key.tokens_per_minute"),
        "{refused:?}"
    );
    // ... one capped at 100 does, and an embedding counts its input only.
    let capped = policy.admit(&caller, "m", Tokens { prompt: 10, output: Some(100) }).await.unwrap();
    drop(capped);
    // Settled with what it used, the first gives the rest back.
    first.settle(Some(20));
    assert!(policy.admit(&caller, "m", chat).await.is_ok());
}

/// A limit on an alias counts calls that name its variant's model
/// directly; with `direct = false` that name is not served at all.
#[tokio::test]
async fn alias_limits_count_calls_that_name_its_model_directly() {
    let text = |direct: bool| {
        format!(
            "[auth]\nenabled = false\n[limits.models.chat]\nrate = 0.001\nburst = 1\n\
             [[pools]]\nname = \"p\"\nclass = \"x:Y\"\n\
             [[aliases]]\nname = \"chat\"\ndirect = {direct}\nvariants = [{{ name = \"v1\", pool = \"p\", model = \"m\" }}]\n"
        )
    };
    let config = Config::from_raw(toml::from_str(&text(true)).unwrap()).unwrap();
    let policy = Policy::new(&config).unwrap();
    let caller = crate::policy::Caller::anonymous("192.0.2.1".parse().unwrap());
    assert!(policy.admit(&caller, "chat", crate::policy::Tokens::NONE).await.is_ok());
    let refused = policy.admit(&caller, "m", crate::policy::Tokens::NONE).await.err().unwrap();
    assert!(
        matches!(&refused, crate::error::GatewayError::RateLimited { limit, .. } if limit == "model.rate"),
        "{refused:?}"
    );

    let config = Config::from_raw(toml::from_str(&text(false)).unwrap()).unwrap();
    let routes = crate::route::Routes::new(&config.aliases);
    assert!(routes.plan("chat", &caller, None).is_ok());
    let closed = routes.plan("m", &caller, None).err().unwrap();
    assert!(matches!(closed, crate::error::GatewayError::ModelForbidden { .. }), "{closed:?}");
    // The pool's name is no way around it either.
    assert!(routes.plan("p", &caller, None).is_err());
}

#[tokio::test]
async fn a_reload_keeps_the_counts_of_unchanged_limits_and_applies_changed_ones() {
    let limited = |rate: u32| config(&format!("[limits.per_key]\nrate = {rate}\nburst = 1\n"));
    let policy = Policy::new(&limited(1)).unwrap();
    let caller = policy.identify("/v1/embeddings", bearer(KEY).headers(), None).unwrap();
    let admit = |p: &Arc<Policy>| {
        let (p, c) = (p.clone(), caller.clone());
        async move { p.admit(&c, "m", crate::policy::Tokens::NONE).await.map(drop).map_err(|e| e.http_status()) }
    };
    assert_eq!(admit(&policy).await, Ok(()));
    assert_eq!(admit(&policy).await, Err(StatusCode::TOO_MANY_REQUESTS));
    // The same limit after a reload: the key's allowance is still spent.
    let same = policy.reloaded(&limited(1)).unwrap();
    assert_eq!(admit(&same).await, Err(StatusCode::TOO_MANY_REQUESTS));
    // A changed limit counts afresh.
    let raised = same.reloaded(&limited(1000)).unwrap();
    assert_eq!(admit(&raised).await, Ok(()));
}

#[tokio::test]
async fn admin_credentials_are_admin_keys_or_jwts_with_the_admin_role() {
    use crate::config::components::{AdminConfig, AdminRole};
    let policy = Policy::new(&config("")).unwrap();
    let admin = |keys: &[&str], role: Option<&str>| AdminConfig {
        listen: None,
        keys: keys.iter().map(|k| (*k).to_owned()).collect(),
        role: role.map(|r| AdminRole { claim: "roles".into(), role: r.into() }),
        viewer_keys: Vec::new(),
        viewer_role: None,
        watch_config: false,
    };
    // An API key is an admin's only if admin.keys names it.
    assert_eq!(policy.admin(bearer(KEY).headers(), &admin(&["k1"], None)), Ok("key:k1".to_owned()));
    assert_eq!(policy.admin(bearer(KEY).headers(), &admin(&[], None)), Err("not_admin"));
    assert_eq!(policy.admin(bearer("ig_unknown-key-0123456789").headers(), &admin(&["k1"], None)), Err("unknown_key"));
    assert_eq!(policy.admin(Request::new(Body::empty()).headers(), &admin(&["k1"], None)), Err("missing"));
    // A JWT is an admin's if its roles hold the admin role.
    let mut claims = claims();
    claims.insert("roles".into(), serde_json::json!(["reader", "gateway-admin"]));
    let with_role = jwt(Algorithm::HS256, "hs", &claims);
    let role = admin(&[], Some("gateway-admin"));
    assert_eq!(policy.admin(bearer(&with_role).headers(), &role), Ok("user:u1".to_owned()));
    claims.insert("roles".into(), serde_json::json!("reader"));
    let without = jwt(Algorithm::HS256, "hs", &claims);
    assert_eq!(policy.admin(bearer(&without).headers(), &role), Err("not_admin"));
    // Without an admin role configured, no JWT is an admin's.
    assert_eq!(policy.admin(bearer(&with_role).headers(), &admin(&["k1"], None)), Err("unknown_key"));
}

#[tokio::test]
async fn the_console_is_open_only_without_auth_or_console_credentials_and_viewers_see_status_alone() {
    use crate::config::components::{AdminConfig, AdminRole};
    use crate::policy::ConsoleAccess;
    let console = |keys: &[&str], viewers: &[&str], viewer_role: Option<&str>| AdminConfig {
        listen: None,
        keys: keys.iter().map(|k| (*k).to_owned()).collect(),
        role: None,
        viewer_keys: viewers.iter().map(|k| (*k).to_owned()).collect(),
        viewer_role: viewer_role.map(|r| AdminRole { claim: "roles".into(), role: r.into() }),
        watch_config: false,
    };
    let none = Request::new(Body::empty());
    // Auth on (the test config): a credential is always needed.
    let on = Policy::new(&config("")).unwrap();
    assert_eq!(on.console(none.headers(), &console(&[], &[], None)), Err("missing"));
    assert_eq!(
        on.console(bearer(KEY).headers(), &console(&["k1"], &[], None)),
        Ok(ConsoleAccess::Admin("key:k1".into()))
    );
    assert_eq!(
        on.console(bearer(KEY).headers(), &console(&[], &["k1"], None)),
        Ok(ConsoleAccess::Viewer("key:k1".into()))
    );
    assert_eq!(on.console(bearer(KEY).headers(), &console(&["other"], &[], None)), Err("not_admin"));
    assert_eq!(
        on.console(bearer("ig_unknown-key-0123456789").headers(), &console(&["k1"], &[], None)),
        Err("unknown_key")
    );
    // A JWT holding the viewer role is a viewer.
    let mut claims = claims();
    claims.insert("roles".into(), serde_json::json!(["gateway-viewer"]));
    let viewer = jwt(Algorithm::HS256, "hs", &claims);
    assert_eq!(
        on.console(bearer(&viewer).headers(), &console(&[], &[], Some("gateway-viewer"))),
        Ok(ConsoleAccess::Viewer("user:u1".into()))
    );
    // Auth off and nothing configured: open, like the client listeners.
    let mut off = config("");
    off.auth.enabled = false;
    let off = Policy::new(&off).unwrap();
    assert_eq!(off.console(none.headers(), &console(&[], &[], None)), Ok(ConsoleAccess::Open));
    // Auth off with console credentials configured: they are needed.
    assert_eq!(off.console(none.headers(), &console(&["k1"], &[], None)), Err("missing"));
}
