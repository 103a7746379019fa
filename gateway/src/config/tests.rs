use super::*;

fn load(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let dir = std::env::temp_dir().join(format!("infergate-cfg-{}", fastrand::u64(..)));
    std::fs::create_dir_all(&dir).map_err(|source| ConfigError::Read { path: dir.clone(), source })?;
    let path = dir.join("c.toml");
    std::fs::write(&path, toml).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
    let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
    let result = Config::load(Some(&path), env);
    let _ = std::fs::remove_dir_all(dir);
    result
}

const POOL: &str = "[[pools]]\nname = \"echo\"\nclass = \"m:Echo\"\n";

fn err_key(result: Result<Config, ConfigError>) -> String {
    match result {
        Err(ConfigError::Invalid { key, .. }) => key,
        other => panic!("expected an invalid-key error, got {other:?}"),
    }
}

#[test]
fn embedded_default_is_valid() {
    let cfg = Config::load(None, std::iter::empty()).unwrap();
    assert_eq!(cfg.http_listen.to_string(), "127.0.0.1:8080");
    assert_eq!(cfg.grpc_listen.to_string(), "127.0.0.1:50051");
    assert_eq!(cfg.default_deadline, Duration::from_secs(30));
    assert_eq!(cfg.max_body_bytes, 10 * 1024 * 1024);
    let names: Vec<_> = cfg.pools.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["minilm", "echo", "rag", "sentiment", "tiny_cnn"]);
    match &cfg.pools[0].kind {
        PoolKind::Local { workers, .. } => assert_eq!(workers.get(), 2),
        other => panic!("minilm should be local, got {other:?}"),
    }
}

#[test]
fn unknown_keys_are_rejected_with_their_path() {
    let key = err_key(load(&format!("[http]\nlisten = \"127.0.0.1:1\"\nlisten_typo = 1\n{POOL}"), &[]));
    assert!(key.starts_with("http"), "{key}");
}

#[test]
fn bad_values_name_the_key() {
    assert_eq!(err_key(load(&format!("[deadlines]\ndefault = \"soon\"\n{POOL}"), &[])), "deadlines.default");
    assert_eq!(err_key(load(&format!("[http]\nlisten = \"nowhere\"\n{POOL}"), &[])), "http.listen");
    assert_eq!(err_key(load("[[pools]]\nname = \"x\"\n", &[])), "pools[0].class");
    assert_eq!(err_key(load("[[pools]]\nname = \"x\"\nclass = \"noclass\"\n", &[])), "pools[0].class");
    assert_eq!(err_key(load(&format!("{POOL}{POOL}"), &[])), "pools[1].name");
    assert_eq!(
        err_key(load("[[pools]]\nname = \"r\"\naddresses = [\"unix:rel/path\"]\n", &[])),
        "pools[0].addresses[0]"
    );
    assert_eq!(err_key(load("", &[])), "pools");
    assert_eq!(err_key(load(&format!("[http]\nmax_body_bytes = \"big\"\n{POOL}"), &[])), "http.max_body_bytes");
}

#[test]
fn env_overrides_win_over_the_file() {
    let cfg = load(
        POOL,
        &[
            ("INFERGATE__HTTP__LISTEN", "127.0.0.1:9999"),
            ("INFERGATE__POOLS__0__WORKERS", "3"),
            ("INFERGATE__DEADLINES__DEFAULT", "5s"),
            ("OTHER", "ignored"),
        ],
    )
    .unwrap();
    assert_eq!(cfg.http_listen.to_string(), "127.0.0.1:9999");
    assert_eq!(cfg.default_deadline, Duration::from_secs(5));
    match &cfg.pools[0].kind {
        PoolKind::Local { workers, .. } => assert_eq!(workers.get(), 3),
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_env_override_names_the_variable() {
    let key = err_key(load(POOL, &[("INFERGATE__POOLS__7__WORKERS", "3")]));
    assert!(key.contains("INFERGATE__POOLS__7__WORKERS"), "{key}");
}

#[test]
fn worker_addresses_parse() {
    assert_eq!(parse_worker_addr("unix:/tmp/w.sock"), Ok(WorkerAddr::Unix("/tmp/w.sock".into())));
    assert!(matches!(parse_worker_addr("10.0.0.1:50061"), Ok(WorkerAddr::Tcp(_))));
    assert!(matches!(parse_worker_addr("http://w.svc:50061"), Ok(WorkerAddr::Tcp(_))));
    assert!(parse_worker_addr("https://w:1").is_err());
    assert!(parse_worker_addr("w.svc").is_err());
}

#[test]
fn check_config_output_round_trips() {
    let cfg = Config::load(None, std::iter::empty()).unwrap();
    let again: RawConfig = toml::from_str(&cfg.to_toml()).unwrap();
    assert_eq!(again.pools.len(), 5);
}

#[test]
fn the_example_production_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/infergate.example.toml");
    let cfg = Config::load(Some(&path), std::iter::empty()).unwrap();
    assert!(cfg.auth.enabled);
    assert!(cfg.redis.is_some());
    assert_eq!(cfg.trusted_proxies.len(), 1);
    assert_eq!(cfg.limits.per_key.max_in_flight, Some(16));
}

#[test]
fn policy_settings_are_checked_with_their_key() {
    let bad = [
        ("[auth]\nenabled = true\n", "auth"),
        ("[limits]\nper_key = { burst = 3 }\n", "limits.per_key.burst"),
        ("[limits]\nper_key = { rate = -1.0 }\n", "limits.per_key.rate"),
        ("[limits.models.m]\ntokens_per_minute = 0\n", "limits.models.m.tokens_per_minute"),
        ("[redis]\nurl = \"http://x\"\n", "redis.url"),
        ("[redis]\nfallback = \"maybe\"\n", "redis.fallback"),
        ("[http]\ntrusted_proxies = [\"not-an-ip\"]\n", "http.trusted_proxies[0]"),
        ("[auth.jwt]\nissuer = \"i\"\naudience = \"a\"\n", "auth.jwt.keys"),
        ("[auth.jwt]\nissuer = \"i\"\naudience = \"a\"\n[[auth.jwt.keys]]\nalg = \"none\"\n", "auth.jwt.keys[0].alg"),
        (
            "[auth.jwt]\nissuer = \"i\"\naudience = \"a\"\n[[auth.jwt.keys]]\nalg = \"RS256\"\nsecret_env = \"S\"\n",
            "auth.jwt.keys[0].public_key_file",
        ),
        ("[[auth.keys]]\nid = \"k\"\nsha256 = \"abc\"\ntenant = \"t\"\n", "auth.keys[0].sha256"),
    ];
    for (toml, key) in bad {
        assert_eq!(err_key(load(&format!("{toml}{POOL}"), &[])), key, "{toml}");
    }
}

#[test]
fn discovered_pools_name_a_host_and_port_and_a_period() {
    let cfg = load(
        "[discovery]\nnameservers = [\"10.0.0.10:53\"]\n\
         [[pools]]\nname = \"w\"\ndiscover = { dns = \"workers.ns.svc.cluster.local:50051\", every = \"10s\" }\n",
        &[],
    )
    .unwrap();
    match &cfg.pools[0].kind {
        PoolKind::Discovered { host, port, every } => {
            assert_eq!(
                (host.as_str(), *port, *every),
                ("workers.ns.svc.cluster.local", 50051, Duration::from_secs(10))
            );
        }
        other => panic!("expected a discovered pool, got {other:?}"),
    }
    assert_eq!(cfg.nameservers, ["10.0.0.10:53".parse::<std::net::SocketAddr>().unwrap()]);
    let default_every = load("[[pools]]\nname = \"w\"\ndiscover = { dns = \"w:1\" }\n", &[]).unwrap();
    assert!(
        matches!(default_every.pools[0].kind, PoolKind::Discovered { every, .. } if every == Duration::from_secs(5))
    );
    let bad = |pool: &str| err_key(load(&format!("[[pools]]\nname = \"w\"\n{pool}\n"), &[]));
    assert_eq!(bad("discover = { dns = \"no-port\" }"), "pools[0].discover.dns");
    assert_eq!(bad("discover = { dns = \"w:0\" }"), "pools[0].discover.dns");
    assert_eq!(bad("discover = { dns = \"w:1\", every = \"0s\" }"), "pools[0].discover.every");
    assert_eq!(bad("discover = { dns = \"w:1\" }\naddresses = [\"127.0.0.1:1\"]"), "pools[0].class");
    assert_eq!(bad("discover = { dns = \"w:1\" }\nworkers = 2"), "pools[0].discover");
    let ns = err_key(load(&format!("[discovery]\nnameservers = [\"dns.local\"]\n{POOL}"), &[]));
    assert_eq!(ns, "discovery.nameservers[0]");
}

#[test]
fn prices_must_be_real_amounts() {
    let cfg = load(&format!("[prices.chat]\ninput_per_million = 0.5\noutput_per_million = 1.5\n{POOL}"), &[]).unwrap();
    assert_eq!(cfg.prices["chat"].output_per_million, 1.5);
    let key = err_key(load(&format!("[prices.chat]\ninput_per_million = -1.0\n{POOL}"), &[]));
    assert_eq!(key, "prices.\"chat\".input_per_million");
}

#[test]
fn otlp_export_is_off_unless_an_endpoint_is_given() {
    assert!(load(POOL, &[]).unwrap().otlp.is_none());
    let cfg = load(&format!("[tracing]\notlp_endpoint = \"http://collector:4317\"\n{POOL}"), &[]).unwrap();
    let otlp = cfg.otlp.unwrap();
    assert_eq!(
        (otlp.endpoint.to_string().as_str(), otlp.service_name.as_str()),
        ("http://collector:4317/", "infergate")
    );
    let key = err_key(load(&format!("[tracing]\notlp_endpoint = \"collector:4317\"\n{POOL}"), &[]));
    assert_eq!(key, "tracing.otlp_endpoint");
}

#[test]
fn embedded_pools_take_a_class_and_threads_only() {
    let cfg = load("[[pools]]\nname = \"e\"\nclass = \"m:Echo\"\nkind = \"embedded\"\nthreads = 3\n", &[]).unwrap();
    match &cfg.pools[0].kind {
        PoolKind::Embedded { class, threads } => assert_eq!((class.as_str(), threads.get()), ("m:Echo", 3)),
        other => panic!("expected an embedded pool, got {other:?}"),
    }
    let bad = |pool: &str| err_key(load(&format!("[[pools]]\nname = \"e\"\n{pool}\n"), &[]));
    // The refused key is named, with what to do instead.
    assert_eq!(bad("class = \"m:Echo\"\nkind = \"embedded\"\nworkers = 2"), "pools[0].workers");
    assert_eq!(bad("class = \"m:Echo\"\nkind = \"embedded\"\nenv = { A = \"1\" }"), "pools[0].env");
    let env = load("[[pools]]\nname = \"e\"\nclass = \"m:Echo\"\nkind = \"embedded\"\nenv = { A = \"1\" }\n", &[]);
    let advice = env.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(advice.contains("set the variables on the gateway"), "{advice}");
    assert_eq!(bad("class = \"m:Echo\"\nkind = \"elsewhere\""), "pools[0].kind");
    assert_eq!(bad("addresses = [\"127.0.0.1:1\"]\nkind = \"embedded\""), "pools[0].kind");
}

#[test]
fn durations_read_alike_in_files_environment_overrides_and_headers() {
    use std::time::Duration;
    // Bare seconds, whole or not, from a file or the environment.
    let from_env =
        load(POOL, &[("INFERGATE__DEADLINES__DEFAULT", "5"), ("INFERGATE__SHUTDOWN__GRACE", "2.5")]).unwrap();
    assert_eq!(from_env.default_deadline, Duration::from_secs(5));
    assert_eq!(from_env.shutdown_grace, Duration::from_millis(2500));
    let from_file = load(&format!("[deadlines]\ndefault = 7\n{POOL}"), &[]).unwrap();
    assert_eq!(from_file.default_deadline, Duration::from_secs(7));
    assert_eq!(
        load(&format!("[deadlines]\ndefault = \"750ms\"\n{POOL}"), &[]).unwrap().default_deadline,
        Duration::from_millis(750)
    );
    // Zero is refused saying so, with the key.
    let err = load(POOL, &[("INFERGATE__DEADLINES__DEFAULT", "0")]).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("deadlines.default") && err.contains("must be above zero"), "{err}");
    let err = load(&format!("[workers]\nstop_grace = \"soon\"\n{POOL}"), &[])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("workers.stop_grace") && err.contains("seconds (2.5) or with a unit"), "{err}");
}

#[test]
fn batching_delay_is_learned_unless_fixed_and_a_target_needs_it_learned() {
    let batching = |b: &str| load(&format!("{POOL}batching = {{ {b} }}\n"), &[]);
    let cfg = load(POOL, &[]).unwrap();
    assert_eq!((cfg.pools[0].batching.max_delay, cfg.pools[0].batching.target_latency), (None, None));
    let cfg = batching("target_latency = \"300ms\"").unwrap();
    assert_eq!(cfg.pools[0].batching.target_latency, Some(Duration::from_millis(300)));
    let cfg = batching("max_delay = \"0ms\"").unwrap();
    assert_eq!(cfg.pools[0].batching.max_delay, Some(Duration::ZERO));
    assert_eq!(err_key(batching("max_delay = \"soon\"")), "pools[0].batching.max_delay");
    assert_eq!(err_key(batching("max_delay = \"2ms\", target_latency = \"1s\"")), "pools[0].batching.target_latency");
    assert_eq!(err_key(batching("target_latency = \"0s\"")), "pools[0].batching.target_latency");
}
