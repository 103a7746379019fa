//! Variant choice, stickiness, pins, tier rules, fallback plans and walks.

use std::collections::HashMap;
use std::sync::Arc;

use super::*;
use crate::config::{Config, RawConfig};
use crate::policy::{Caller, Principal};

fn routes(aliases: &str) -> Routes {
    let text = format!(
        "[[pools]]\nname = \"a\"\nclass = \"x:Y\"\n[[pools]]\nname = \"b\"\nclass = \"x:Y\"\n\
         [[pools]]\nname = \"vip\"\nclass = \"x:Y\"\n[[pools]]\nname = \"other\"\nclass = \"x:Y\"\n{aliases}"
    );
    let raw: RawConfig = toml::from_str(&text).unwrap();
    Routes::new(&Config::from_raw(raw).unwrap().aliases)
}

const CANARY: &str = r#"
[[aliases]]
name = "embed"
fallbacks = ["v1", "backup"]
tiers = { vip = "vip" }
pin_tiers = ["standard", "vip"]
[[aliases.variants]]
name = "v1"
pool = "a"
model = "minilm"
weight = 90
[[aliases.variants]]
name = "v2"
pool = "b"
model = "minilm"
weight = 10
[[aliases.variants]]
name = "vip"
pool = "vip"
model = "minilm"
[[aliases]]
name = "backup"
[[aliases.variants]]
name = "only"
pool = "other"
model = "minilm-small"
"#;

fn user(id: &str, tier: &str) -> Caller {
    Caller { principal: Principal::Key(id.into()), tier: tier.into(), ..Caller::anonymous([127, 0, 0, 1].into()) }
}

fn chosen(r: &Routes, caller: &Caller) -> String {
    r.plan("embed", caller, None).unwrap().targets[0].variant.as_deref().unwrap().to_owned()
}

#[test]
fn the_canary_split_is_close_to_its_weight_and_sticky_per_caller() {
    let r = routes(CANARY);
    let mut per_user: HashMap<String, String> = HashMap::new();
    let mut v2 = 0;
    // 2,000 requests from 200 users.
    for i in 0..2000 {
        let id = format!("user-{}", i % 200);
        let variant = chosen(&r, &user(&id, "standard"));
        if variant == "v2" {
            v2 += 1;
        }
        let first = per_user.entry(id.clone()).or_insert_with(|| variant.clone());
        assert_eq!(*first, variant, "{id} moved between variants");
    }
    let share = f64::from(v2) / 2000.0;
    assert!((0.07..=0.13).contains(&share), "v2 got {share:.3} of requests, want 0.10 +- 0.03");
}

#[test]
fn a_tier_rule_wins_over_the_canary_and_a_pin_over_both() {
    let r = routes(CANARY);
    for i in 0..50 {
        assert_eq!(chosen(&r, &user(&format!("v{i}"), "vip")), "vip");
    }
    let plan = r.plan("embed", &user("u", "vip"), Some("v2")).unwrap();
    assert_eq!(plan.targets[0].variant.as_deref(), Some("v2"));
    assert_eq!(plan.targets[0].pool.as_deref(), Some("b"));
    assert_eq!(&*plan.targets[0].model, "minilm");
}

#[test]
fn pins_are_checked() {
    let r = routes(CANARY);
    let err = r.plan("embed", &user("u", "free"), Some("v2")).unwrap_err();
    assert!(matches!(err, GatewayError::PinForbidden { .. }), "{err:?}");
    assert_eq!(err.http_status(), 403);
    let err = r.plan("embed", &user("u", "vip"), Some("v9")).unwrap_err();
    assert_eq!(err.http_status(), 400);
    let err = r.plan("plain-model", &user("u", "vip"), Some("v1")).unwrap_err();
    assert_eq!(err.http_status(), 400);
}

#[test]
fn plans_continue_with_fallbacks_in_order_without_repeats() {
    let r = routes(CANARY);
    // A caller on v1: the v1 fallback is already in the plan; then the other alias.
    let caller = (0..100).map(|i| user(&format!("f{i}"), "standard")).find(|c| chosen(&r, c) == "v1").unwrap();
    let plan = r.plan("embed", &caller, None).unwrap();
    let labels: Vec<_> = plan.targets.iter().map(|t| t.variant.as_deref().unwrap().to_owned()).collect();
    assert_eq!(labels, ["v1", "backup:only"]);
    let caller = (0..100).map(|i| user(&format!("g{i}"), "standard")).find(|c| chosen(&r, c) == "v2").unwrap();
    let plan = r.plan("embed", &caller, None).unwrap();
    let labels: Vec<_> = plan.targets.iter().map(|t| t.variant.as_deref().unwrap().to_owned()).collect();
    assert_eq!(labels, ["v2", "v1", "backup:only"]);
    // A plain model name is one target with no pool constraint.
    let plan = r.plan("minilm", &caller, None).unwrap();
    assert_eq!(plan.targets, [Target { variant: None, pool: None, model: "minilm".into() }]);
}

#[test]
fn alias_config_errors_name_their_key() {
    let bad = [
        ("[[aliases]]\nname = \"x\"\n", "aliases[0].variants"),
        (
            "[[aliases]]\nname = \"x\"\n[[aliases.variants]]\nname = \"v\"\npool = \"nope\"\n",
            "aliases[0].variants[0].pool",
        ),
        (
            "[[aliases]]\nname = \"x\"\nstable = \"w\"\n[[aliases.variants]]\nname = \"v\"\npool = \"a\"\n",
            "aliases[0].stable",
        ),
        (
            "[[aliases]]\nname = \"x\"\nfallbacks = [\"zz\"]\n[[aliases.variants]]\nname = \"v\"\npool = \"a\"\n",
            "aliases[0].fallbacks[0]",
        ),
        (
            "[[aliases]]\nname = \"x\"\nfallbacks = [\"y\"]\n[[aliases.variants]]\nname = \"v\"\npool = \"a\"\n\
             [[aliases]]\nname = \"y\"\nfallbacks = [\"x\"]\n[[aliases.variants]]\nname = \"v\"\npool = \"b\"\n",
            "aliases",
        ),
    ];
    for (toml, key) in bad {
        let text =
            format!("[[pools]]\nname = \"a\"\nclass = \"x:Y\"\n[[pools]]\nname = \"b\"\nclass = \"x:Y\"\n{toml}");
        let raw: RawConfig = toml::from_str(&text).unwrap();
        match Config::from_raw(raw) {
            Err(crate::config::ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{toml}"),
            other => panic!("{toml}: expected an error at {key}, got {other:?}"),
        }
    }
}

fn call() -> Call<u32> {
    Call {
        model: "embed".into(),
        payload: 7,
        deadline: crate::call::Deadline::after(std::time::Duration::from_secs(1)),
        request_id: "r".into(),
        caller: Arc::new(user("u", "standard")),
        pool: None,
        class: Default::default(),
    }
}

#[tokio::test]
async fn run_falls_back_only_when_a_target_could_not_take_the_call() {
    let plan = Plan::of(vec![
        Target { variant: Some("v1".into()), pool: Some("a".into()), model: "m".into() },
        Target { variant: Some("v2".into()), pool: Some("b".into()), model: "m2".into() },
    ]);
    // Pool `a` has no ready worker: the call goes to `b`, with b's model name.
    let (out, answered) = run(&plan, call(), |c: Call<u32>| async move {
        match c.pool.as_deref() {
            Some("a") => Err(GatewayError::NoReadyWorker { pool: "a".into() }),
            _ => Ok((c.model, c.payload)),
        }
    })
    .await
    .unwrap();
    assert_eq!(out, ("m2".to_owned(), 7));
    assert_eq!(answered.variant.as_deref(), Some("v2"));

    // A model failure is the answer: no fallback, no second attempt.
    let attempts = std::sync::atomic::AtomicUsize::new(0);
    let err = run(&plan, call(), |_c: Call<u32>| {
        attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        async { Err::<(), _>(GatewayError::WorkerFailed { worker: "a-0".into(), detail: "boom".into() }) }
    })
    .await
    .unwrap_err();
    assert!(matches!(err, GatewayError::WorkerFailed { .. }));
    assert_eq!(attempts.into_inner(), 1);

    // Every target shed: the last one's error is the answer.
    let err = run(&plan, call(), |c: Call<u32>| async move {
        Err::<(), _>(GatewayError::QueueFull { pool: c.pool.as_deref().unwrap_or_default().into(), limit: 1 })
    })
    .await
    .unwrap_err();
    assert!(matches!(err, GatewayError::QueueFull { ref pool, .. } if pool == "b"), "{err:?}");

    // A worker's admission refused it (shed): the fallback takes it.
    let (out, _) = run(&plan, call(), |c: Call<u32>| async move {
        match c.pool.as_deref() {
            Some("a") => Err(GatewayError::WorkerRefused { worker: "a-0".into(), detail: "full".into() }),
            _ => Ok(c.model),
        }
    })
    .await
    .unwrap();
    assert_eq!(out, "m2");
}

#[tokio::test]
async fn a_stream_falls_back_on_a_worker_failure_before_its_first_chunk() {
    let plan = Plan::of(vec![
        Target { variant: Some("v1".into()), pool: Some("a".into()), model: "m".into() },
        Target { variant: Some("v2".into()), pool: Some("b".into()), model: "m2".into() },
    ]);
    for failure in [
        GatewayError::WorkerUnavailable { worker: "a-0".into(), detail: "upstream 503".into() },
        GatewayError::WorkerFailed { worker: "a-0".into(), detail: "boom".into() },
    ] {
        let (out, answered) = run_stream(&plan, call(), |c: Call<u32>| {
            let failure = failure.clone();
            async move { if c.pool.as_deref() == Some("a") { Err(failure) } else { Ok(c.model) } }
        })
        .await
        .unwrap();
        assert_eq!((out.as_str(), answered.variant.as_deref()), ("m2", Some("v2")));
    }
    // A client error is the answer for streams too.
    let err = run_stream(&plan, call(), |_c: Call<u32>| async {
        Err::<(), _>(GatewayError::ModelRejected { detail: "bad".into() })
    })
    .await
    .unwrap_err();
    assert!(matches!(err, GatewayError::ModelRejected { .. }));
}

const GUARDED: &str = r#"
[[aliases]]
name = "embed"
[[aliases.variants]]
name = "v1"
pool = "a"
model = "minilm"
weight = 90
[[aliases.variants]]
name = "v2"
pool = "b"
model = "minilm"
weight = 10
slo = { error_rate = 0.1, p99 = "500ms", min_requests = 20, window = "60s" }
"#;

/// The users (of 200) on each variant.
fn split_of(r: &Routes) -> HashMap<String, String> {
    (0..200).map(|u| format!("user-{u}")).map(|id| (id.clone(), chosen(r, &user(&id, "standard")))).collect()
}

fn record(r: &Routes, variant: usize, n: usize, failed: bool, took_ms: u64) {
    let plan = r.plan("embed", &user("anyone", "standard"), Some(["v1", "v2"][variant])).unwrap();
    let (canary, v) = plan.watch[0].clone().unwrap();
    assert_eq!(v, variant);
    for _ in 0..n {
        canary.record(v, failed, std::time::Duration::from_millis(took_ms));
    }
}

fn state(r: &Routes, variant: &str) -> (String, f64) {
    let view = r.views().into_iter().find(|a| a.alias == "embed").unwrap();
    let v = view.variants.into_iter().find(|v| v.name == variant).unwrap();
    (v.state.to_owned(), v.effective_weight)
}

#[tokio::test(start_paused = true)]
async fn a_canary_that_breaches_its_slo_is_rolled_back_and_only_its_callers_move() {
    let r = routes(GUARDED);
    let before = split_of(&r);
    let on_canary = before.values().filter(|v| *v == "v2").count();
    assert!((10..=35).contains(&on_canary), "{on_canary} of 200 users on the canary");
    record(&r, 0, 200, false, 20);
    // 19 calls, half failed: too few to judge.
    record(&r, 1, 10, true, 20);
    record(&r, 1, 9, false, 20);
    assert_eq!(state(&r, "v2"), ("steady".to_owned(), 10.0));
    // The 20th: judged, 50% errors over 10% while the stable has none.
    record(&r, 1, 1, false, 20);
    assert_eq!(state(&r, "v2"), ("rolled-back".to_owned(), 0.0));
    let after = split_of(&r);
    for (user, variant) in &before {
        assert_eq!(after[user], "v1", "{user} was on {variant}");
    }
    // It stays out past the window, until restored.
    tokio::time::advance(std::time::Duration::from_secs(61)).await;
    record(&r, 0, 1, false, 20);
    assert_eq!(state(&r, "v2").0, "rolled-back");
    assert!(r.restore("embed", "v2"));
    assert_eq!(split_of(&r), before, "restored: everyone back where they were");
    assert!(!r.restore("embed", "nope") && !r.restore("other", "v2"));
}

#[tokio::test(start_paused = true)]
async fn a_slow_canary_is_rolled_back_but_not_while_the_stable_variant_is_as_bad() {
    let r = routes(GUARDED);
    // Stable as slow as the canary: the trouble is not the canary's.
    record(&r, 0, 50, false, 900);
    record(&r, 1, 30, false, 900);
    assert_eq!(state(&r, "v2").0, "steady");
    // A new window: the stable is fast again, the canary still slow.
    tokio::time::advance(std::time::Duration::from_secs(61)).await;
    record(&r, 0, 50, false, 20);
    record(&r, 1, 19, false, 900);
    assert_eq!(state(&r, "v2").0, "steady");
    record(&r, 1, 1, false, 900);
    assert_eq!(state(&r, "v2").0, "rolled-back");
}

#[tokio::test(start_paused = true)]
async fn a_healthy_canary_ramps_up_a_step_each_window_within_its_slo() {
    let ramp = GUARDED.replace("weight = 10\n", "ramp = [1, 5, 25, 50]\n");
    let r = routes(&ramp);
    let share = |r: &Routes| split_of(r).values().filter(|v| *v == "v2").count();
    assert_eq!(state(&r, "v2"), ("ramping".to_owned(), 1.0));
    assert_eq!(state(&r, "v1").1, 99.0);
    let mut shares = vec![share(&r)];
    for step in [5.0, 25.0, 50.0, 50.0] {
        record(&r, 1, 20, false, 20);
        tokio::time::advance(std::time::Duration::from_secs(61)).await;
        // The window closes with the next call.
        record(&r, 0, 1, false, 20);
        assert_eq!(state(&r, "v2").1, step);
        shares.push(share(&r));
    }
    eprintln!("users on the canary, step by step: {shares:?}");
    assert!(shares.windows(2).all(|w| w[0] <= w[1]), "{shares:?}");
    assert!((70..=130).contains(&shares[4]), "{shares:?}");
    // A window without enough calls is no step.
    tokio::time::advance(std::time::Duration::from_secs(61)).await;
    record(&r, 0, 1, false, 20);
    assert_eq!(state(&r, "v2").1, 50.0);
}

#[test]
fn slo_and_ramp_errors_name_their_key() {
    let err = |text: &str| {
        let raw: RawConfig = toml::from_str(&format!(
            "[[pools]]\nname = \"a\"\nclass = \"x:Y\"\n[[pools]]\nname = \"b\"\nclass = \"x:Y\"\n{text}"
        ))
        .unwrap();
        Config::from_raw(raw).err().map(|e| e.to_string()).unwrap_or_default()
    };
    let alias = |v2: &str| {
        format!(
            "[[aliases]]\nname = \"m\"\n[[aliases.variants]]\nname = \"v1\"\npool = \"a\"\n\
             [[aliases.variants]]\nname = \"v2\"\npool = \"b\"\n{v2}"
        )
    };
    assert!(err(&alias("ramp = [1, 5]\n")).contains("aliases[0].variants[1].ramp"));
    assert!(err(&alias("slo = { error_rate = 2.0 }\nramp = [5, 1]\n")).contains("variants[1].slo.error_rate"));
    assert!(err(&alias("slo = {}\nramp = [5, 1]\n")).contains("rising percentages"));
    assert!(err(&alias("slo = { min_requests = 0 }\n")).contains("slo.min_requests"));
    let on_stable = alias("").replace("pool = \"a\"\n", "pool = \"a\"\nslo = {}\n");
    assert!(err(&on_stable).contains("aliases[0].variants[0].slo"), "{}", err(&on_stable));
}
