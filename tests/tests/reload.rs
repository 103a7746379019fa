//! Changing a running gateway: the config file reloaded under load (an
//! alias added, a canary weight moved, a limit lowered, a pool resized,
//! rolled to a new env and removed) without failing a request the new
//! config does not refuse by design; a broken file and a listener change
//! refused with the running config kept; the admin API's credentials,
//! actions and log. Real gateway, real echo workers.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use infergate_e2e::Gateway;
use serde_json::{Value, json};

const ECHO: &str = "infergate_worker.examples.echo:Echo";
/// An admin key (`[admin] keys = ["ops"]`) and a client key.
const ADMIN_KEY: &str = "ig_reload_e2e_admin_key_0123456789";
const CLIENT_KEY: &str = "ig_reload_e2e_client_key_0123456789";

fn digest(key: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(key.as_bytes()))
}

/// Admin and client keys; the config file watched or not.
fn keys(watch: bool) -> String {
    format!(
        "[admin]\nkeys = [\"ops\"]\nwatch_config = {watch}\n\
         [[auth.keys]]\nid = \"ops\"\nsha256 = \"{}\"\ntenant = \"ops\"\n\
         [[auth.keys]]\nid = \"app\"\nsha256 = \"{}\"\ntenant = \"app\"\n",
        digest(ADMIN_KEY),
        digest(CLIENT_KEY)
    )
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().timeout(Duration::from_secs(30)).build().unwrap()
}

fn admin(gw: &Gateway, method: reqwest::Method, path: &str, key: Option<&str>) -> (u16, Value) {
    let mut req = client().request(method, gw.admin_url(path));
    if let Some(k) = key {
        req = req.header("x-api-key", k);
    }
    let resp = req.send().unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().unwrap_or(Value::Null))
}

fn reload(gw: &Gateway) -> (u16, Value) {
    admin(gw, reqwest::Method::POST, "/admin/reload", Some(ADMIN_KEY))
}

/// A chat call to `model`: the status and the variant that answered.
fn chat(gw: &Gateway, model: &str) -> (u16, String) {
    chat_at(&gw.url("/v1/chat/completions"), model)
}

fn chat_at(url: &str, model: &str) -> (u16, String) {
    let body = json!({"model": model, "messages": [{"role": "user", "content": "hello there"}]});
    let resp = client().post(url).json(&body).send().unwrap();
    let variant = resp.headers().get("x-infergate-variant").map(|v| v.to_str().unwrap().to_owned());
    (resp.status().as_u16(), variant.unwrap_or_default())
}

/// The pools as `/admin/pools` lists them: worker ids and states by pool.
fn pools(gw: &Gateway) -> BTreeMap<String, Vec<(String, String)>> {
    let (status, body) = admin(gw, reqwest::Method::GET, "/admin/pools", Some(ADMIN_KEY));
    assert_eq!(status, 200, "{body}");
    body["pools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let workers = p["workers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|w| (w["id"].as_str().unwrap().to_owned(), w["state"].as_str().unwrap().to_owned()))
                .collect();
            (p["name"].as_str().unwrap().to_owned(), workers)
        })
        .collect()
}

/// Wait until `check` holds, up to `within`; how long it took.
fn observe(what: &str, within: Duration, check: impl Fn() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < within, "{what}: not observed within {within:?}");
        std::thread::sleep(Duration::from_millis(25));
    }
    let took = start.elapsed();
    eprintln!("{what}: observed after {took:?}");
    took
}

/// The config of one step of the reload test.
struct Step {
    /// `spare`'s variant weight in the `canary` alias (0: stable only).
    canary_weight: u32,
    /// The `limited` model's rate a second.
    limited_rate: u32,
    echo_workers: u32,
    /// The second release of the echo class (tests/workers/echo_v2.py).
    echo_v2: bool,
    /// The `spare` pool and the alias's variant on it exist.
    spare: bool,
    talk2: bool,
}

impl Step {
    fn config(&self) -> String {
        let mut c = format!(
            "[cache]\nenabled = false\n\
             [limits.models.limited]\nrate = {rate}\nburst = {rate}\n\
             [[pools]]\nname = \"echo\"\nclass = \"{class}\"\nworkers = {workers}\n\
             env = {{ PYTHONPATH = \"{workers_dir}\" }}\n",
            rate = self.limited_rate,
            workers = self.echo_workers,
            class = if self.echo_v2 { "echo_v2:Echo" } else { ECHO },
            workers_dir = infergate_e2e::root().join("tests/workers").display(),
        );
        if self.spare {
            c += &format!("[[pools]]\nname = \"spare\"\nclass = \"{ECHO}\"\n");
        }
        c += "[[aliases]]\nname = \"talk\"\nvariants = [{ name = \"v1\", pool = \"echo\", model = \"echo\" }]\n";
        c += "[[aliases]]\nname = \"limited\"\nvariants = [{ name = \"v1\", pool = \"echo\", model = \"echo\" }]\n";
        c += "[[aliases]]\nname = \"canary\"\n";
        c += &format!(
            "[[aliases.variants]]\nname = \"stable\"\npool = \"echo\"\nmodel = \"echo\"\nweight = {}\n",
            100 - self.canary_weight
        );
        if self.spare {
            c += &format!(
                "[[aliases.variants]]\nname = \"next\"\npool = \"spare\"\nmodel = \"echo\"\nweight = {}\n",
                self.canary_weight
            );
        }
        if self.talk2 {
            c += "[[aliases]]\nname = \"talk2\"\nvariants = [{ name = \"v1\", pool = \"echo\", model = \"echo\" }]\n";
        }
        c
    }
}

/// What the clients saw, by model: statuses and their counts.
type Seen = Arc<Mutex<BTreeMap<String, BTreeMap<u16, u64>>>>;

#[test]
fn a_reload_under_load_applies_every_change_without_failing_a_request() {
    let mut step =
        Step { canary_weight: 0, limited_rate: 10_000, echo_workers: 1, echo_v2: false, spare: true, talk2: false };
    let with_keys = |step: &Step| step.config() + &keys(true);
    let gw = Gateway::start(&with_keys(&step)).unwrap();
    gw.wait_ready_workers("echo", 1, Duration::from_secs(60)).unwrap();
    gw.wait_ready_workers("spare", 1, Duration::from_secs(60)).unwrap();

    // Four clients for the whole test: two on an alias of `echo`, one on
    // the canary, one on the limited model.
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Seen = Arc::default();
    let clients: Vec<_> = ["talk", "talk", "canary", "limited"]
        .into_iter()
        .map(|model| {
            let (url, stop, seen) = (gw.url("/v1/chat/completions"), stop.clone(), seen.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let (status, _) = chat_at(&url, model);
                    *seen.lock().unwrap().entry(model.to_owned()).or_default().entry(status).or_default() += 1;
                }
            })
        })
        .collect();
    let started = Instant::now();
    let within = Duration::from_secs(2);
    let reloads_applied = || -> u64 {
        let text = client().get(gw.url("/metrics")).send().unwrap().text().unwrap();
        text.lines()
            .find(|l| l.starts_with("infergate_config_reloads_total{result=\"applied\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    };

    // 1. An alias added: written to the file, picked up by the file watch.
    step.talk2 = true;
    gw.write_config(&with_keys(&step)).unwrap();
    observe("alias added (file watch)", within, || chat(&gw, "talk2").0 == 200);
    assert_eq!(reloads_applied(), 1);

    // 2. The canary's weight moved to the other variant (the admin API
    // from here on; the file watch may see a change first, and then the
    // API reload finds nothing left to change).
    step.canary_weight = 100;
    gw.write_config(&with_keys(&step)).unwrap();
    assert_eq!(reload(&gw).0, 200);
    observe("canary weight moved", within, || chat(&gw, "canary").1 == "next");

    // 3. A limit lowered: the admin API. From here `limited` may get 429s.
    let lowered = Instant::now();
    step.limited_rate = 1;
    gw.write_config(&with_keys(&step)).unwrap();
    let (status, body) = reload(&gw);
    assert_eq!(status, 200, "{body}");
    observe("limit lowered", within, || chat(&gw, "limited").0 == 429);

    // 4. A pool resized 1 -> 3 -> 1.
    step.echo_workers = 3;
    gw.write_config(&with_keys(&step)).unwrap();
    assert_eq!(reload(&gw).0, 200);
    observe("echo resized to 3 (listed)", within, || pools(&gw)["echo"].len() == 3);
    observe("echo's 3 workers serving", Duration::from_secs(60), || {
        pools(&gw)["echo"].iter().filter(|(_, s)| s == "serving").count() == 3
    });
    step.echo_workers = 1;
    gw.write_config(&with_keys(&step)).unwrap();
    assert_eq!(reload(&gw).0, 200);
    observe("echo resized to 1", within, || pools(&gw)["echo"].len() == 1);
    let before_roll = pools(&gw)["echo"][0].0.clone();

    // 5. The pool's class changed: its worker is rolled (new one first).
    step.echo_v2 = true;
    gw.write_config(&with_keys(&step)).unwrap();
    assert_eq!(reload(&gw).0, 200);
    observe("echo rolling (a new worker listed)", within, || {
        pools(&gw)["echo"].iter().any(|(id, _)| *id != before_roll)
    });
    observe("echo rolled (the old worker gone)", Duration::from_secs(60), || {
        let echo = &pools(&gw)["echo"];
        echo.len() == 1 && echo[0].0 != before_roll && echo[0].1 == "serving"
    });

    // 6. A pool removed (with the canary variant on it).
    step.spare = false;
    step.canary_weight = 0;
    gw.write_config(&with_keys(&step)).unwrap();
    assert_eq!(reload(&gw).0, 200);
    observe("spare removed", within, || !pools(&gw).contains_key("spare"));
    assert_eq!(chat(&gw, "canary").1, "stable");
    // `echo` is the rolled pool's model alone now: the new class's.
    let version = client().get(gw.url("/v2/models/echo")).send().unwrap().json::<Value>().unwrap();
    assert_eq!(version["versions"], json!(["2"]), "the new class serves: {version}");

    // The clients run 10 s in all, changes or not.
    std::thread::sleep(Duration::from_secs(10).saturating_sub(started.elapsed()).max(Duration::from_millis(500)));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let seen = seen.lock().unwrap().clone();
    eprintln!("statuses by model: {seen:?} (limit lowered {:?} before the end)", lowered.elapsed());
    for (model, statuses) in &seen {
        for (status, n) in statuses {
            let by_design = model == "limited" && *status == 429;
            assert!(*status == 200 || by_design, "{model}: {n} answers with status {status}");
        }
        assert!(statuses.values().sum::<u64>() > 20, "{model}: too few answers: {statuses:?}");
        assert!(statuses.get(&200).copied().unwrap_or(0) > 0, "{model}: never served: {statuses:?}");
    }
    assert!(seen["limited"].get(&429).copied().unwrap_or(0) > 0, "the lowered limit never refused");
    assert_eq!(reloads_applied(), 7, "one applied reload per change");
}

#[test]
fn a_broken_config_or_a_listener_change_is_refused_and_the_running_config_stays() {
    let base = format!("{}[auth]\nenabled = true\n[[pools]]\nname = \"echo\"\nclass = \"{ECHO}\"\n", keys(false));
    let gw = Gateway::start(&base).unwrap();
    assert_eq!(chat(&gw, "echo").0, 401, "auth is on for clients");
    let served = || {
        let body = json!({"model": "echo", "messages": [{"role": "user", "content": "hi"}]});
        let resp = client().post(gw.url("/v1/chat/completions")).header("x-api-key", CLIENT_KEY).json(&body).send();
        resp.unwrap().status().as_u16()
    };
    assert_eq!(served(), 200);
    let version = |gw: &Gateway| admin(gw, reqwest::Method::GET, "/admin/config", Some(ADMIN_KEY)).1["version"].clone();
    assert_eq!(version(&gw), 1);

    // SIGHUP reloads (the file is not watched here).
    gw.write_config(&format!(
        "{base}[[aliases]]\nname = \"hup\"\nvariants = [{{ name = \"v\", pool = \"echo\", model = \"echo\" }}]\n"
    ))
    .unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(gw.pid()), nix::sys::signal::Signal::SIGHUP).unwrap();
    observe("SIGHUP reload", Duration::from_secs(2), || version(&gw) == 2);
    gw.write_config(&base).unwrap();
    assert_eq!(reload(&gw).0, 200);
    assert_eq!(version(&gw), 3);

    // A syntax error, a value error (named by key), settings read once.
    let broken: [(&str, String, &str); 3] = [
        ("syntax", format!("{base}[[aliases]\n"), "TOML parse error"),
        (
            "a variant on no pool",
            format!("{base}[[aliases]]\nname = \"a\"\nvariants = [{{ name = \"v\", pool = \"nope\" }}]\n"),
            "aliases[0].variants[0].pool",
        ),
        (
            "a listener",
            format!("{base}[grpc]\nmax_message_bytes = 1024\n"),
            "grpc.max_message_bytes cannot change without a restart",
        ),
    ];
    for (what, text, expect) in broken {
        gw.write_config(&text).unwrap();
        let (status, body) = reload(&gw);
        assert_eq!(status, 400, "{what}: {body}");
        assert_eq!(body["type"], "urn:infergate:error:config-refused", "{what}: {body}");
        let errors = body["errors"].to_string();
        assert!(errors.contains(expect), "{what}: {expect:?} not in {errors}");
        assert_eq!(served(), 200, "{what}: still served");
        assert_eq!(version(&gw), 3, "{what}: the running config stays");
    }
    // A listen address.
    gw.write_config(&base).unwrap();
    let text = std::fs::read_to_string(gw.config_path()).unwrap();
    std::fs::write(gw.config_path(), text.replacen("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\"", 1)).unwrap();
    let (status, body) = reload(&gw);
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["errors"][0], "http.listen cannot change without a restart", "{body}");
    assert_eq!(served(), 200);
    let metrics = client().get(gw.url("/metrics")).send().unwrap().text().unwrap();
    assert!(metrics.contains("infergate_config_reloads_total{result=\"refused\"} 4"), "{metrics}");
    assert!(metrics.contains("infergate_config_reloads_total{result=\"applied\"} 2"), "{metrics}");
    // The log says why, each time.
    let refusals =
        gw.log().iter().filter(|l| l["message"] == "config reload refused; the running config stays").count();
    assert_eq!(refusals, 4);
}

#[test]
fn the_admin_api_needs_an_admin_credential_and_logs_who_did_what() {
    let config = format!(
        "{}[auth]\nenabled = true\n[[pools]]\nname = \"echo\"\nclass = \"{ECHO}\"\n\
         [[admin.repository]]\nname = \"later\"\nclass = \"{ECHO}\"\n",
        keys(false)
    );
    let gw = Gateway::start(&config).unwrap();
    use reqwest::Method as M;
    // No credential, a client's key: refused on every route.
    for (method, path) in [
        (M::POST, "/admin/reload"),
        (M::GET, "/admin/config"),
        (M::GET, "/admin/pools"),
        (M::POST, "/admin/pools/echo/workers/echo-0/drain"),
        (M::POST, "/v2/repository/index"),
        (M::POST, "/v2/repository/models/later/load"),
    ] {
        assert_eq!(admin(&gw, method.clone(), path, None).0, 401, "{path} without a key");
        assert_eq!(admin(&gw, method.clone(), path, Some("ig_not_a_key_at_all_0123456789")).0, 401, "{path}");
        assert_eq!(admin(&gw, method, path, Some(CLIENT_KEY)).0, 403, "{path} with a client key");
    }
    // The admin listener is not the client one, nor the other way round.
    let on_client_port = client().get(gw.url("/admin/pools")).header("x-api-key", ADMIN_KEY).send().unwrap();
    assert_eq!(on_client_port.status().as_u16(), 404);

    // The config, with its version and hash, secrets hidden.
    let (status, body) = admin(&gw, M::GET, "/admin/config", Some(ADMIN_KEY));
    assert_eq!(status, 200);
    assert_eq!(body["version"], 1);
    assert_eq!(body["hash"].as_str().unwrap().len(), 64);
    let text = body["config"].to_string();
    assert!(!text.contains(&digest(ADMIN_KEY)) && text.contains("[redacted]"), "{text}");

    // Drain the only worker: calls get 503; undrain: served again.
    let call = || {
        let body = json!({"model": "echo", "messages": [{"role": "user", "content": "hi"}]});
        let resp = client().post(gw.url("/v1/chat/completions")).header("x-api-key", CLIENT_KEY).json(&body).send();
        resp.unwrap().status().as_u16()
    };
    assert_eq!(call(), 200);
    assert_eq!(admin(&gw, M::POST, "/admin/pools/echo/workers/echo-0/drain", Some(ADMIN_KEY)).0, 200);
    assert_eq!(pools(&gw)["echo"], [("echo-0".to_owned(), "draining".to_owned())]);
    assert_eq!(call(), 503);
    assert_eq!(admin(&gw, M::POST, "/admin/pools/echo/workers/echo-0/undrain", Some(ADMIN_KEY)).0, 200);
    assert_eq!(call(), 200);
    assert_eq!(admin(&gw, M::POST, "/admin/pools/echo/workers/echo-9/drain", Some(ADMIN_KEY)).0, 404);

    // The model repository: an entry loaded as a pool, then unloaded.
    let state = |gw: &Gateway, name: &str| {
        let (_, index) = admin(gw, M::POST, "/v2/repository/index", Some(ADMIN_KEY));
        index.as_array().unwrap().iter().find(|m| m["name"] == name).map(|m| m["state"].as_str().unwrap().to_owned())
    };
    assert_eq!(state(&gw, "later").as_deref(), Some("UNAVAILABLE"));
    assert_eq!(state(&gw, "echo").as_deref(), Some("READY"));
    let (status, body) = admin(&gw, M::POST, "/v2/repository/models/later/load", Some(ADMIN_KEY));
    assert_eq!(status, 200, "{body}");
    observe("repository model loaded", Duration::from_secs(60), || state(&gw, "later").as_deref() == Some("READY"));
    let (status, body) = admin(&gw, M::POST, "/v2/repository/models/later/unload", Some(ADMIN_KEY));
    assert_eq!(status, 200, "{body}");
    observe("repository model unloaded", Duration::from_secs(10), || !pools(&gw).contains_key("later"));
    assert_eq!(state(&gw, "later").as_deref(), Some("UNAVAILABLE"));
    // Loaded again at once, while the old workers may still be stopping:
    // the new ones are others, and serve.
    assert_eq!(admin(&gw, M::POST, "/v2/repository/models/later/load", Some(ADMIN_KEY)).0, 200);
    observe("repository model loaded again", Duration::from_secs(60), || {
        state(&gw, "later").as_deref() == Some("READY")
    });
    assert_eq!(pools(&gw)["later"], [("later-1".to_owned(), "serving".to_owned())]);
    assert_eq!(admin(&gw, M::POST, "/v2/repository/models/later/unload", Some(ADMIN_KEY)).0, 200);
    assert_eq!(admin(&gw, M::POST, "/v2/repository/models/nothing/load", Some(ADMIN_KEY)).0, 400);

    // Every action was logged with who took it.
    let log = gw.log();
    let actions: Vec<&str> = log
        .iter()
        .filter(|l| l["message"] == "admin action" && l["admin"] == "key:ops")
        .filter_map(|l| l["action"].as_str())
        .collect();
    for action in ["config", "drain", "undrain", "repository index", "repository load", "repository unload"] {
        assert!(actions.contains(&action), "{action} not logged: {actions:?}");
    }
    let refused = log.iter().filter(|l| l["message"] == "admin request refused").count();
    assert!(refused >= 18, "refusals logged: {refused}");
}
