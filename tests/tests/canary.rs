//! Canaries guarded by their SLO and pools guarded by adaptive admission,
//! end to end: a canary on a worker that fails half its calls is rolled
//! back within its window once it has `min_requests`, its sticky users move
//! to the stable variant and come back when an operator restores it; a
//! healthy canary ramps up step by step; a pool whose worker starts failing
//! half its calls sheds a share that grows and falls back when it heals,
//! beside the same pool without adaptive admission. Real gateway, real
//! worker processes (tests/workers/faulty.py).
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use infergate_e2e::{Gateway, RemoteWorker};
use serde_json::{Value, json};

/// The callers' HS256 secret, and the file the gateway reads it from.
const SECRET: &str = include_str!("../testdata/hs256.secret");
const SECRET_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/hs256.secret");
const ADMIN_KEY: &str = "ig_canary_e2e_admin_key_0123456789";

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().timeout(Duration::from_secs(30)).build().unwrap()
}

fn token(sub: &str) -> String {
    let exp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 600;
    let claims = json!({"iss": "e2e", "aud": "infergate", "sub": sub, "tenant": "t", "exp": exp});
    let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
    jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256), &claims, &key).unwrap()
}

/// Auth by JWT for callers (each user its own sticky caller), an admin key.
fn auth() -> String {
    use sha2::Digest;
    format!(
        "[auth]\nenabled = true\n[auth.jwt]\nissuer = \"e2e\"\naudience = \"infergate\"\n\
         [[auth.jwt.keys]]\nalg = \"HS256\"\nsecret_file = \"{SECRET_FILE}\"\n\
         [[auth.keys]]\nid = \"ops\"\nsha256 = \"{}\"\ntenant = \"ops\"\n\
         [admin]\nkeys = [\"ops\"]\nwatch_config = false\n",
        hex::encode(sha2::Sha256::digest(ADMIN_KEY.as_bytes()))
    )
}

fn rand() -> u64 {
    infergate_e2e::rand_u64()
}

/// A remote pool of one worker, called one by one and never retried, so
/// every failure of the worker is one the caller sees.
fn pool(name: &str, worker: &RemoteWorker, extra: &str) -> String {
    format!(
        "[[pools]]\nname = \"{name}\"\naddresses = [\"{}\"]\nbatching = {{ enabled = false }}\n\
         retries = {{ max = 0 }}\n{extra}",
        worker.addr()
    )
}

fn body() -> Value {
    json!({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1.5, 2.5]}]})
}

/// A tensor call to `model` as `user` (a JWT) or anonymous: status and variant.
fn call(gw: &Gateway, model: &str, bearer: Option<&str>) -> (u16, String) {
    let mut req = client().post(gw.url(&format!("/v2/models/{model}/infer"))).json(&body());
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    let resp = req.send().unwrap();
    let variant = resp.headers().get("x-infergate-variant").map(|v| v.to_str().unwrap().to_owned());
    (resp.status().as_u16(), variant.unwrap_or_default())
}

fn admin(gw: &Gateway, method: reqwest::Method, path: &str) -> Value {
    let resp = client().request(method, gw.admin_url(path)).header("x-api-key", ADMIN_KEY).send().unwrap();
    assert!(resp.status().is_success(), "{path}: {}", resp.status());
    resp.json().unwrap()
}

/// The canary state of `variant` of `alias` in /admin/config.
fn variant_state(gw: &Gateway, alias: &str, variant: &str) -> (String, f64) {
    let config = admin(gw, reqwest::Method::GET, "/admin/config");
    let a = config["aliases"].as_array().unwrap().iter().find(|a| a["alias"] == alias).unwrap().clone();
    let v = a["variants"].as_array().unwrap().iter().find(|v| v["name"] == variant).unwrap().clone();
    (v["state"].as_str().unwrap().to_owned(), v["effective_weight"].as_f64().unwrap())
}

fn metric(gw: &Gateway, line_start: &str) -> Option<f64> {
    let text = client().get(gw.url("/metrics")).send().unwrap().text().unwrap();
    text.lines().find(|l| l.starts_with(line_start)).and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn a_failing_canary_is_rolled_back_within_its_window_and_its_users_move_to_stable() {
    let flag = std::env::temp_dir().join(format!("infergate-canary-flag-{:x}", rand()));
    let flag_env = flag.to_str().unwrap();
    let stable = RemoteWorker::start("faulty:Flaky").unwrap();
    let canary =
        RemoteWorker::start_with("faulty:Flaky", &[("FAULTY_FLAG", flag_env), ("FAULTY_RATE", "0.5")]).unwrap();
    let config = format!(
        "{}[cache]\nenabled = false\n{}{}\
         [[aliases]]\nname = \"tensors\"\n\
         [[aliases.variants]]\nname = \"v1\"\npool = \"stable\"\nmodel = \"flaky\"\nweight = 80\n\
         [[aliases.variants]]\nname = \"v2\"\npool = \"canary\"\nmodel = \"flaky\"\nweight = 20\n\
         slo = {{ error_rate = 0.1, min_requests = 20, window = \"30s\" }}\n",
        auth(),
        pool("stable", &stable, ""),
        pool("canary", &canary, "")
    );
    let gw = Gateway::start(&config).unwrap();
    let tokens: Vec<String> = (0..200).map(|u| token(&format!("user-{u}"))).collect();
    assert_eq!(variant_state(&gw, "tensors", "v2"), ("steady".to_owned(), 20.0));

    // Each user's variant while the canary is healthy: sticky.
    let first: Vec<String> = tokens
        .iter()
        .map(|t| call(&gw, "tensors", Some(t)))
        .map(|(s, v)| {
            assert_eq!(s, 200);
            v
        })
        .collect();
    let on_canary: Vec<usize> = (0..200).filter(|u| first[*u] == "v2").collect();
    assert!((20..=60).contains(&on_canary.len()), "{} of 200 users on a 20% canary", on_canary.len());

    // The canary's worker fails every other call from now on. Round robin
    // over the users until the canary is out.
    std::fs::write(&flag, "failing").unwrap();
    let started = Instant::now();
    let (mut canary_calls, mut canary_failures, mut stable_failures, mut i) = (0, 0, 0, 0);
    while variant_state(&gw, "tensors", "v2").0 != "rolled-back" {
        assert!(started.elapsed() < Duration::from_secs(30), "not rolled back within its window");
        for _ in 0..20 {
            let user = i % 200;
            i += 1;
            let (status, variant) = call(&gw, "tensors", Some(&tokens[user]));
            if first[user] == "v2" {
                canary_calls += 1;
                canary_failures += u32::from(status != 200);
            } else {
                assert_eq!(variant, "v1", "a stable user is never moved");
                stable_failures += u32::from(status != 200);
            }
        }
    }
    eprintln!(
        "rolled back after {:?}: {canary_calls} canary calls ({canary_failures} failed), {i} calls in all",
        started.elapsed()
    );
    // The window holds the healthy calls too: judged once it held 20, and
    // rolled back once more than 10% of them failed.
    let in_window = on_canary.len() + canary_calls;
    assert!(in_window >= 20, "judged with min_requests: {in_window}");
    assert!(f64::from(canary_failures) / in_window as f64 > 0.1, "{canary_failures} of {in_window} failed");
    assert_eq!(stable_failures, 0, "the stable variant is unaffected");
    assert_eq!(variant_state(&gw, "tensors", "v2").1, 0.0);
    assert_eq!(metric(&gw, "infergate_canary_rollbacks_total{alias=\"tensors\",variant=\"v2\"}"), Some(1.0));
    assert!(gw.log().iter().any(|l| l["message"].as_str().is_some_and(|m| m.starts_with("canary rolled back"))));

    // Every user, the canary's included, is served by the stable variant now.
    for (user, t) in tokens.iter().enumerate() {
        assert_eq!(call(&gw, "tensors", Some(t)), (200, "v1".to_owned()), "user-{user}");
    }
    // It stays out until restored; then its users are back on it.
    std::fs::remove_file(&flag).unwrap();
    admin(&gw, reqwest::Method::POST, "/admin/aliases/tensors/variants/v2/restore");
    assert_eq!(variant_state(&gw, "tensors", "v2").0, "steady");
    for user in &on_canary {
        assert_eq!(call(&gw, "tensors", Some(&tokens[*user])), (200, "v2".to_owned()), "user-{user}");
    }
}

#[test]
fn a_healthy_canary_ramps_up_a_step_after_each_window_within_its_slo() {
    let stable = RemoteWorker::start("faulty:Flaky").unwrap();
    let canary = RemoteWorker::start("faulty:Flaky").unwrap();
    let config = format!(
        "{}[cache]\nenabled = false\n{}{}\
         [[aliases]]\nname = \"tensors\"\n\
         [[aliases.variants]]\nname = \"v1\"\npool = \"stable\"\nmodel = \"flaky\"\n\
         [[aliases.variants]]\nname = \"v2\"\npool = \"canary\"\nmodel = \"flaky\"\nramp = [10, 50]\n\
         slo = {{ error_rate = 0.1, min_requests = 5, window = \"10s\" }}\n",
        auth(),
        pool("stable", &stable, ""),
        pool("canary", &canary, "")
    );
    let gw = Gateway::start(&config).unwrap();
    let tokens: Vec<String> = (0..200).map(|u| token(&format!("user-{u}"))).collect();
    let on_canary =
        |gw: &Gateway| tokens.iter().filter(|t| call(gw, "tensors", Some(t)) == (200, "v2".to_owned())).count();
    assert_eq!(variant_state(&gw, "tensors", "v2"), ("ramping".to_owned(), 10.0));
    let at_10 = on_canary(&gw);
    assert_eq!(variant_state(&gw, "tensors", "v2").1, 10.0, "counted within the first window");
    // Calls through a whole window with the canary's min_requests met.
    let started = Instant::now();
    while variant_state(&gw, "tensors", "v2").1 < 50.0 {
        assert!(started.elapsed() < Duration::from_secs(40), "never ramped up");
        on_canary(&gw);
    }
    let at_50 = on_canary(&gw);
    eprintln!("users on the canary: {at_10} at 10%, {at_50} at 50% (ramped after {:?})", started.elapsed());
    assert!((8..=35).contains(&at_10) && (75..=125).contains(&at_50), "{at_10} then {at_50}");
}

#[test]
fn a_failing_pool_sheds_a_growing_share_and_recovers_where_one_without_adaptive_admission_does_not_shed() {
    let flag = std::env::temp_dir().join(format!("infergate-adaptive-flag-{:x}", rand()));
    let flag_env = flag.to_str().unwrap();
    let faulty = [("FAULTY_FLAG", flag_env), ("FAULTY_RATE", "0.5")];
    let guarded = RemoteWorker::start_with("faulty:Flaky", &faulty).unwrap();
    let unguarded = RemoteWorker::start_with("faulty:Flaky", &faulty).unwrap();
    let backup = RemoteWorker::start("faulty:Flaky").unwrap();
    let config = format!(
        "{}[cache]\nenabled = false\n{}{}{}\
         [[aliases]]\nname = \"guarded\"\nfallbacks = [\"backup\"]\nvariants = [{{ name = \"v1\", pool = \"on\", model = \"flaky\" }}]\n\
         [[aliases]]\nname = \"unguarded\"\nfallbacks = [\"backup\"]\nvariants = [{{ name = \"v1\", pool = \"off\", model = \"flaky\" }}]\n\
         [[aliases]]\nname = \"backup\"\nvariants = [{{ name = \"v1\", pool = \"backup\", model = \"flaky\" }}]\n",
        auth().replace("[auth]\nenabled = true\n", ""),
        pool("on", &guarded, "adaptive = { window = \"2s\", threshold = 0.1, min_requests = 10 }\n"),
        pool("off", &unguarded, ""),
        pool("backup", &backup, "")
    );
    let gw = Gateway::start(&config).unwrap();
    let admitted = |gw: &Gateway, pool: &str| {
        let pools = admin(gw, reqwest::Method::GET, "/admin/pools");
        pools["pools"].as_array().unwrap().iter().find(|p| p["name"] == pool).unwrap()["admitted_share"]
            .as_f64()
            .unwrap()
    };
    // Calls to both aliases for `for`, sampling the guarded pool's share:
    // the samples, and per alias the failures and the calls answered by
    // the backup (shed calls fall back).
    let run = |gw: &Gateway, r#for: Duration| {
        let start = Instant::now();
        let mut samples = Vec::new();
        let mut seen: HashMap<&str, (u32, u32, u32)> = HashMap::new();
        while start.elapsed() < r#for {
            for alias in ["guarded", "unguarded"] {
                for _ in 0..5 {
                    let (status, variant) = call(gw, alias, None);
                    let e = seen.entry(alias).or_default();
                    e.0 += 1;
                    e.1 += u32::from(status != 200);
                    e.2 += u32::from(variant.starts_with("backup"));
                }
            }
            samples.push(admitted(gw, "on"));
        }
        (samples, seen)
    };

    let (healthy, seen) = run(&gw, Duration::from_secs(2));
    assert!(healthy.iter().all(|s| *s == 1.0), "nothing shed while healthy: {healthy:?}");
    assert_eq!(seen["guarded"].1 + seen["unguarded"].1, 0);

    std::fs::write(&flag, "failing").unwrap();
    let (failing, seen) = run(&gw, Duration::from_secs(6));
    eprintln!("admitted share while failing: {failing:.2?}; calls, failed, by backup: {seen:?}");
    let shed_at_end = 1.0 - failing[failing.len() - 1];
    assert!(shed_at_end > 0.25 && shed_at_end < 0.7, "sheds 1 - 0.5·K = 0.44 or so: {failing:.2?}");
    assert!(failing.windows(2).all(|w| (w[1] - w[0]).abs() < 0.35), "no flapping: {failing:.2?}");
    let (g, u) = (seen["guarded"], seen["unguarded"]);
    assert!(g.2 > 0 && u.2 == 0, "shed calls took the fallback; the unguarded pool shed nothing: {seen:?}");
    let (g_failed, u_failed) = (f64::from(g.1) / f64::from(g.0), f64::from(u.1) / f64::from(u.0));
    assert!(u_failed > 0.4, "without adaptive admission half the calls fail: {u_failed:.2}");
    assert!(g_failed < u_failed - 0.1, "with it, fewer: {g_failed:.2} vs {u_failed:.2}");
    assert!(admitted(&gw, "off") == 1.0);

    std::fs::remove_file(&flag).unwrap();
    let healed_at = Instant::now();
    let (healed, seen) = run(&gw, Duration::from_secs(4));
    eprintln!("admitted share after healing: {healed:.2?}; {seen:?}");
    let back = healed.iter().position(|s| *s == 1.0).expect("recovers");
    assert!(healed[back..].iter().all(|s| *s == 1.0), "and stays recovered: {healed:.2?}");
    assert!(healed_at.elapsed() >= Duration::from_secs(4));
    assert!(metric(&gw, "infergate_pool_admitted_share{pool=\"on\"}") == Some(1.0));
}
