//! The edge under hostile, slow and oversized traffic: the real binary, real
//! Python workers, attackers on raw sockets from 127.0.0.2 (another loopback
//! address), and an ordinary client on 127.0.0.1 that must keep being
//! served all along.
//!
//! Each attack is bounded in count and time and stops by itself.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use infergate_e2e::Gateway;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

/// Where attacks come from; the ordinary client is on 127.0.0.1.
const ATTACKER: &str = "127.0.0.2";

const ECHO: &str = "infergate_worker.examples.echo:Echo";

/// Small caps so attacks are quick: every bound here is one the README documents.
fn config(extra: &str) -> String {
    format!(
        "[http]\nmax_connections = 256\nmax_connections_per_client = 128\nhandshake_timeout = \"1s\"\n\
         header_timeout = \"1s\"\nbody_timeout = \"2s\"\nmax_in_flight = 16\n\
         [grpc]\nmax_connections = 256\nmax_connections_per_client = 128\nhandshake_timeout = \"1s\"\n\
         header_timeout = \"1s\"\nbody_timeout = \"2s\"\nmax_in_flight = 16\n\
         [[pools]]\nname = \"echo\"\nclass = \"{ECHO}\"\nworkers = 1\n{extra}"
    )
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

async fn connect_from(ip: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(format!("{ip}:0").parse().unwrap())?;
    socket.connect(to).await
}

/// How long until the peer closes `conn` (reading and dropping what it sends), if within `within`.
async fn closed_within(conn: &mut TcpStream, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0; 4096];
    loop {
        match tokio::time::timeout_at(started + within, conn.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

/// The ordinary client: OIP calls to echo over one keep-alive connection,
/// each with other data (so the cache does not answer), one every `pace`.
struct Ordinary {
    client: reqwest::Client,
    url: String,
    sent: std::sync::atomic::AtomicU64,
    /// Its API key, when auth is on.
    key: Option<String>,
}

/// What the ordinary client saw over a run.
#[derive(Debug)]
struct Seen {
    latencies: Vec<Duration>,
    errors: Vec<String>,
}

impl Seen {
    fn p99(&self) -> Duration {
        let mut l = self.latencies.clone();
        l.sort();
        l.get((l.len() * 99).div_ceil(100).saturating_sub(1)).copied().unwrap_or_default()
    }
}

impl Ordinary {
    fn new(gw: &Gateway) -> Self {
        Self {
            client: reqwest::Client::new(),
            url: gw.url("/v2/models/echo/infer"),
            sent: Default::default(),
            key: None,
        }
    }

    fn with_key(gw: &Gateway, key: &str) -> Self {
        Self { key: Some(key.to_owned()), ..Self::new(gw) }
    }

    async fn call(&self) -> Result<Duration, String> {
        let i = self.sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let body = json!({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [i as f64]}]});
        let started = Instant::now();
        let mut req = self.client.post(&self.url).json(&body);
        if let Some(key) = &self.key {
            req = req.header("x-api-key", key);
        }
        let resp = req.send().await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| e.to_string())?;
        if status != 200 {
            return Err(format!("{status}: {text}"));
        }
        Ok(started.elapsed())
    }

    /// `n` calls, one every `pace`.
    async fn run(&self, n: usize, pace: Duration) -> Seen {
        let mut seen = Seen { latencies: Vec::new(), errors: Vec::new() };
        let mut tick = tokio::time::interval(pace);
        for _ in 0..n {
            tick.tick().await;
            match self.call().await {
                Ok(took) => seen.latencies.push(took),
                Err(e) => seen.errors.push(e),
            }
        }
        seen
    }
}

/// No error, and a p99 within 2x of the unattacked one. Runs are 100 calls
/// at least: in 50 the p99 is the slowest call, and one stall of a
/// neighbouring process (a CI build) decides it. The 10 ms of slack
/// is the scheduling noise of a loaded 2-core machine on a ~2 ms call.
fn assert_unharmed(attack: &str, before: &Seen, during: &Seen) {
    eprintln!(
        "{attack}: ordinary p99 {:?} before, {:?} during ({} calls, {} errors)",
        before.p99(),
        during.p99(),
        during.latencies.len(),
        during.errors.len()
    );
    assert!(during.errors.is_empty(), "{attack}: the ordinary client saw errors: {:?}", during.errors);
    assert!(before.errors.is_empty(), "unattacked errors: {:?}", before.errors);
    let bound = before.p99() * 2 + Duration::from_millis(10);
    assert!(during.p99() <= bound, "{attack}: p99 {:?} > {bound:?}", during.p99());
}

/// The ordinary client's calls before `attack`, then while `attackers`
/// threads run it over and over, each at most once per [`ATTACK_PACE`] (it
/// stops when the ordinary run ends); asserts the client was unharmed.
/// Returns how many attacks ran. An attacker's own CPU is not on the
/// gateway's box in the world: here the attacking threads share the cores
/// with the gateway and the ordinary client, so they run at nice +10 and
/// paced, and what the client measures is the gateway's answer to them.
fn beside(gw: &Gateway, what: &str, attackers: usize, attack: impl Fn() + Sync) -> usize {
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    let rt = rt();
    let ordinary = Ordinary::new(gw);
    let before = rt.block_on(ordinary.run(100, Duration::from_millis(20)));
    let stop = AtomicBool::new(false);
    let (during, rounds) = std::thread::scope(|s| {
        let threads: Vec<_> = (0..attackers)
            .map(|_| {
                s.spawn(|| {
                    let nice = rustix::process::getpriority_process(None).unwrap();
                    rustix::process::setpriority_process(None, (nice + 10).min(19)).unwrap();
                    let mut rounds = 0;
                    while !stop.load(Relaxed) {
                        let next = std::time::Instant::now() + ATTACK_PACE;
                        attack();
                        rounds += 1;
                        std::thread::sleep(next.saturating_duration_since(std::time::Instant::now()));
                    }
                    rounds
                })
            })
            .collect();
        let during = rt.block_on(ordinary.run(100, Duration::from_millis(20)));
        stop.store(true, Relaxed);
        (during, threads.into_iter().map(|t| t.join().unwrap()).sum::<usize>())
    });
    assert!(rounds > 0, "{what}: no attack ran");
    assert_unharmed(what, &before, &during);
    rounds
}

/// How often one attacking thread of [`beside`] repeats its attack.
const ATTACK_PACE: Duration = Duration::from_millis(25);

/// This thread's blocking HTTP client on the attacker's address (its I/O
/// thread is started by, and as nice as, the first caller).
fn attacker() -> reqwest::blocking::Client {
    thread_local! {
        static CLIENT: reqwest::blocking::Client = reqwest::blocking::Client::builder()
            .local_address(ATTACKER.parse::<std::net::IpAddr>().unwrap())
            .build()
            .unwrap();
    }
    CLIENT.with(Clone::clone)
}

#[test]
fn silent_sockets_over_the_cap_on_both_ports_are_closed_within_the_handshake_timeout() {
    // A flood from many addresses that fills the whole cap of each listener.
    let extra = "";
    let text = config(extra).replace(
        "max_connections = 256\nmax_connections_per_client = 128",
        "max_connections = 64\nmax_connections_per_client = 64",
    );
    let gw = Gateway::start(&text).unwrap();
    rt().block_on(async {
        let ordinary = Ordinary::new(&gw);
        ordinary.run(5, Duration::from_millis(10)).await;
        for port in [gw.http, gw.grpc] {
            let mut silent = Vec::new();
            for i in 0..80 {
                let ip = format!("127.0.0.{}", 10 + i % 8);
                if let Ok(conn) = connect_from(&ip, port).await {
                    silent.push((Instant::now(), conn));
                }
            }
            assert!(silent.len() >= 64, "only {} connections opened to {port}", silent.len());
            // The keep-alive connection opened before the flood is still served.
            let during = ordinary.run(10, Duration::from_millis(50)).await;
            assert!(during.errors.is_empty(), "{:?}", during.errors);
            // Every silent socket is closed within the handshake timeout + 1 s.
            let mut last = Instant::now();
            for (opened, conn) in &mut silent {
                let left = (*opened + Duration::from_secs(2)).saturating_duration_since(Instant::now());
                assert!(closed_within(conn, left).await.is_some(), "a silent socket on {port} outlived 2 s");
                last = last.max(Instant::now());
            }
            // A new client is served within 1 s after.
            tokio::time::sleep_until(last).await;
            let fresh = async {
                if port == gw.http {
                    let resp = reqwest::get(gw.url("/v2/health/ready")).await.map_err(|e| e.to_string())?;
                    if resp.status() == 200 { Ok(()) } else { Err(resp.status().to_string()) }
                } else {
                    let channel = tonic::transport::Endpoint::from_shared(gw.grpc_url())
                        .map_err(|e| e.to_string())?
                        .connect()
                        .await
                        .map_err(|e| e.to_string())?;
                    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
                    health
                        .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                }
            };
            let started = Instant::now();
            tokio::time::timeout(Duration::from_secs(1), fresh)
                .await
                .unwrap_or_else(|_| panic!("no answer on {port} within 1 s after the flood"))
                .unwrap();
            eprintln!("{port}: served a new client {:?} after the last silent socket closed", started.elapsed());
        }
    });
}

#[test]
fn slowloris_heads_are_cut_at_the_header_timeout_while_others_are_served() {
    let gw = Gateway::start(&config("")).unwrap();
    rt().block_on(async {
        let ordinary = Ordinary::new(&gw);
        let before = ordinary.run(100, Duration::from_millis(20)).await;
        let http = gw.http;
        let attack = tokio::spawn(async move {
            let mut lasted = Vec::new();
            let mut tasks = Vec::new();
            for _ in 0..60 {
                tasks.push(tokio::spawn(async move {
                    let mut conn = connect_from(ATTACKER, http).await.unwrap();
                    let started = Instant::now();
                    let head = b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: localhost\r\nX-Pad: ";
                    for b in head.iter().chain(std::iter::repeat_n(&b'a', 100)) {
                        if conn.write_all(&[*b]).await.is_err() {
                            return started.elapsed();
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    started.elapsed()
                }));
            }
            for t in tasks {
                lasted.push(t.await.unwrap());
            }
            lasted
        });
        let during = ordinary.run(100, Duration::from_millis(20)).await;
        let lasted = attack.await.unwrap();
        assert!(lasted.iter().all(|d| *d < Duration::from_millis(2500)), "a slow head lasted: {lasted:?}");
        assert_unharmed("slowloris", &before, &during);
    });
}

#[test]
fn stalled_and_trickled_bodies_get_408_and_hold_no_permit() {
    let gw = Gateway::start(&config("")).unwrap();
    rt().block_on(async {
        let ordinary = Ordinary::new(&gw);
        let before = ordinary.run(100, Duration::from_millis(20)).await;
        let http = gw.http;
        // More stalled bodies than the listener has in-flight permits (16).
        // (Pacing a burst of connections is tested in edge/conn and measured
        // by the hostile bench on the release build: 120 here, all cut in
        // the same 140 ms by a debug build beside a CI build, read 156 ms
        // against a 103 ms bound once in 12 rounds.)
        let attack = tokio::spawn(async move {
            let mut tasks = Vec::new();
            for i in 0..40 {
                tasks.push(tokio::spawn(async move {
                    let mut conn = connect_from(ATTACKER, http).await.unwrap();
                    let head = "POST /v2/models/echo/infer HTTP/1.1\r\nHost: localhost\r\n\
                                Content-Type: application/json\r\nContent-Length: 99\r\n\r\n{";
                    conn.write_all(head.as_bytes()).await.unwrap();
                    let started = Instant::now();
                    if i % 4 == 0 {
                        // Trickled: a byte every 300 ms, under the time bound's pace.
                        for _ in 0..20 {
                            if conn.write_all(b" ").await.is_err() {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(300)).await;
                        }
                    }
                    let mut answer = Vec::new();
                    let _ = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut answer)).await;
                    (started.elapsed(), String::from_utf8_lossy(&answer).into_owned())
                }));
            }
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        });
        let during = ordinary.run(100, Duration::from_millis(20)).await;
        for (took, answer) in attack.await.unwrap() {
            assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
            assert!(answer.contains("request-body-timeout"), "{answer}");
            // read_to_end returned: the connection was closed after the 408.
            assert!(took < Duration::from_millis(3500), "answered after {took:?}");
        }
        assert_unharmed("stalled bodies", &before, &during);
    });
}

#[test]
fn one_address_cannot_hold_more_than_its_share_of_connections() {
    let text = config("").replace("max_connections_per_client = 128", "max_connections_per_client = 16");
    let gw = Gateway::start(&text).unwrap();
    rt().block_on(async {
        let ordinary = Ordinary::new(&gw);
        let before = ordinary.run(100, Duration::from_millis(20)).await;
        let mut held = Vec::new();
        let mut refused = 0;
        for _ in 0..40 {
            let mut conn = connect_from(ATTACKER, gw.http).await.unwrap();
            conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
            let mut buf = [0; 512];
            match tokio::time::timeout(Duration::from_secs(2), conn.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => held.push(conn),
                _ => refused += 1,
            }
        }
        assert_eq!((held.len(), refused), (16, 24));
        let during = ordinary.run(100, Duration::from_millis(20)).await;
        assert_unharmed("connections from one address", &before, &during);
    });
}

/// One HTTP/2 frame.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK for a gRPC call's request headers, without Huffman or indexing.
fn call_headers(authority: SocketAddr) -> Vec<u8> {
    let literal = |block: &mut Vec<u8>, prefix: &[u8], value: &str| {
        block.extend_from_slice(prefix);
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    };
    // :method POST (static 3), :scheme http (static 6).
    let mut block = vec![0x83, 0x86];
    // :path and :authority, names from the static table (4, 1).
    literal(&mut block, &[0x04], "/infergate.v1.Inference/Infer");
    literal(&mut block, &[0x01], &authority.to_string());
    for (name, value) in [("content-type", "application/grpc"), ("te", "trailers")] {
        block.push(0x00);
        block.push(name.len() as u8);
        block.extend_from_slice(name.as_bytes());
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    block
}

/// The frame types in a server's HTTP/2 byte stream.
fn h2_frames(mut bytes: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    while bytes.len() >= 9 {
        let len = usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
        types.push(bytes[3]);
        bytes = &bytes[(9 + len).min(bytes.len())..];
    }
    types
}

#[test]
fn h2_rapid_reset_and_pings_without_streams_lose_their_connection() {
    let gw = Gateway::start(&config("").replace("[grpc]\n", "[grpc]\nidle_timeout = \"2s\"\n")).unwrap();
    rt().block_on(async {
        let ordinary = Ordinary::new(&gw);
        let before = ordinary.run(100, Duration::from_millis(20)).await;
        let grpc = gw.grpc;
        // Raw frames, so every stream really reaches the server: HEADERS
        // opening a call, then RST_STREAM cancelling it, as fast as the
        // socket takes them, for at most 5 s.
        let attack = tokio::spawn(async move {
            let conn = connect_from(ATTACKER, grpc).await.unwrap();
            let (mut rd, mut wr) = conn.into_split();
            let reader = tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0; 16 * 1024];
                while let Ok(n @ 1..) = rd.read(&mut buf).await {
                    seen.extend_from_slice(&buf[..n.min(16 * 1024)]);
                    seen.truncate(1 << 20);
                }
                seen
            });
            wr.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
            wr.write_all(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]).await.unwrap();
            let started = Instant::now();
            let mut sent = 0u32;
            let mut stream = 1u32;
            'attack: while started.elapsed() < Duration::from_secs(5) {
                let mut batch = Vec::new();
                for _ in 0..100 {
                    batch.extend(h2_frame(0x1, 0x4, stream, &call_headers(grpc)));
                    batch.extend(h2_frame(0x3, 0, stream, &8u32.to_be_bytes()));
                    stream += 2;
                }
                if wr.write_all(&batch).await.is_err() {
                    break 'attack;
                }
                sent += 100;
            }
            let took = started.elapsed();
            drop(wr);
            let seen = tokio::time::timeout(Duration::from_secs(3), reader).await;
            let goaway = seen.map(|s| h2_frames(&s.unwrap()).contains(&0x7)).unwrap_or(false);
            (sent, took, goaway)
        });
        let during = ordinary.run(100, Duration::from_millis(20)).await;
        let (sent, took, goaway) = attack.await.unwrap();
        eprintln!("rapid reset: {sent} streams opened and reset before the connection ended ({took:?})");
        assert!(goaway, "no GOAWAY for {sent} resets");
        assert!(took < Duration::from_secs(5), "rapid reset went on for {took:?} ({sent} resets)");
        assert_unharmed("rapid reset", &before, &during);

        // A connection that answers pings but opens no stream: GOAWAY, then closed.
        let conn = connect_from(ATTACKER, gw.grpc).await.unwrap();
        let (mut rd, mut wr) = conn.into_split();
        wr.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        wr.write_all(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]).await.unwrap();
        let pinger = tokio::spawn(async move {
            while wr.write_all(&[0, 0, 8, 0x6, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        let started = Instant::now();
        let mut seen = Vec::new();
        let mut buf = [0; 4096];
        while let Ok(Ok(n @ 1..)) = tokio::time::timeout(Duration::from_secs(6), rd.read(&mut buf)).await {
            seen.extend_from_slice(&buf[..n]);
        }
        let took = started.elapsed();
        pinger.abort();
        assert!(took >= Duration::from_millis(1500) && took < Duration::from_millis(3800), "closed after {took:?}");
        assert!(h2_frames(&seen).contains(&0x7), "no GOAWAY in {:?}", h2_frames(&seen));
    });
}

/// The series of the `infergate_*` families that carry a route, as written.
async fn route_series(gw: &Gateway) -> BTreeSet<String> {
    let text = reqwest::get(gw.url("/metrics")).await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with("infergate_") && l.contains("route=\""))
        .map(|l| l.rsplit_once(' ').map_or(l, |(series, _)| series).to_owned())
        .collect()
}

/// `n` calls to made-up REST paths and gRPC methods, with `key` or without.
async fn random_paths(gw: &Gateway, n: usize, key: Option<&str>) {
    let rest = reqwest::Client::new();
    let grpc = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    for i in 0..n {
        let word = format!("{:016x}", infergate_e2e::rand_u64());
        let (client, url, content_type) = match i % 4 {
            0 => (&rest, gw.url(&format!("/{word}")), "application/json"),
            1 => (&rest, gw.url(&format!("/v2/models/{word}/x/{i}")), "application/json"),
            2 => (&grpc, format!("{}/infergate.v1.Inference/{word}", gw.grpc_url()), "application/grpc"),
            _ => (&grpc, format!("{}/pkg{i}.Svc/{word}", gw.grpc_url()), "application/grpc"),
        };
        let mut req = client.post(url).header("content-type", content_type).header("te", "trailers").body("");
        if let Some(key) = key {
            req = req.header("x-api-key", key);
        }
        let status = req.send().await.unwrap().status();
        assert!(!status.is_server_error(), "{status}");
    }
}

#[test]
fn ten_thousand_random_paths_add_no_metric_series_with_or_without_auth() {
    use sha2::Digest;
    let key = "ig_hostile-test-key-0123456789abcdefghijkl";
    let auth = format!(
        "[auth]\nenabled = true\n[[auth.keys]]\nid = \"k\"\nsha256 = \"{}\"\ntenant = \"t\"\n",
        hex::encode(sha2::Sha256::digest(key.as_bytes()))
    );
    for (extra, keys) in [(auth.as_str(), vec![None, Some(key)]), ("", vec![None])] {
        let gw = Gateway::start(&config(extra)).unwrap();
        rt().block_on(async {
            // Each kind of refusal once, so its `unmatched` series exists,
            // and one scrape, so the scrape's own series exist (below).
            for key in &keys {
                random_paths(&gw, 8, *key).await;
            }
            // The ordinary client's own series exist before the snapshot too.
            let ordinary = Ordinary::with_key(&gw, key);
            let calm = ordinary.run(100, Duration::from_millis(20)).await;
            route_series(&gw).await;
            let before = route_series(&gw).await;
            let flood = async {
                for key in &keys {
                    random_paths(&gw, 10_000 / keys.len(), *key).await;
                }
            };
            let ((), during) = tokio::join!(flood, ordinary.run(100, Duration::from_millis(20)));
            assert_unharmed("random paths", &calm, &during);
            let after = route_series(&gw).await;
            let new: Vec<_> = after.difference(&before).collect();
            assert!(new.is_empty(), "new series after 10,000 random paths: {new:?}");
            eprintln!("{} route series before and after 10,000 random paths (auth: {})", before.len(), keys.len() > 1);
        });
    }
}

/// An echo call that asks for `delay_ms` of work, with an optional deadline.
/// A call to `model` (echo, or echo by another name) for `delay_ms` of
/// work, sent by `client`.
fn slow_call(
    client: &reqwest::blocking::Client,
    gw: &Gateway,
    model: &str,
    delay_ms: u64,
    timeout: Option<&str>,
) -> (u16, Value) {
    let mut req = client.post(gw.url(&format!("/v2/models/{model}/infer"))).json(&json!({
        "parameters": {"delay_ms": delay_ms},
        "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [infergate_e2e::rand_u64() as f64]}],
    }));
    if let Some(t) = timeout {
        req = req.header("x-request-timeout", t);
    }
    let resp = req.send().unwrap();
    (resp.status().as_u16(), resp.json().unwrap_or(Value::Null))
}

#[test]
fn short_deadlines_on_a_slow_model_blame_no_one_while_a_hung_worker_is_still_ejected() {
    // The slow model is echo under another name, in a pool of its own.
    let slow = format!(
        "[[pools]]\nname = \"slow\"\nclass = \"slow:Slow\"\nthreads = 4\n\
         circuit = {{ failures = 5 }}\noutlier = {{ consecutive = 2 }}\nenv = {{ PYTHONPATH = \"{}\" }}\n",
        infergate_e2e::root().join("benches/models").display()
    );
    let gw = Gateway::start(&config(&slow)).unwrap();
    // The model takes 2 s; a patient caller shows it.
    assert_eq!(slow_call(&attacker(), &gw, "slow", 2000, None).0, 200);
    // Ten at a time with 300 ms deadlines (the listener admits 16), while
    // the ordinary client calls echo.
    let calls = beside(&gw, "short deadlines", 10, || {
        let (status, body) = slow_call(&attacker(), &gw, "slow", 2000, Some("300ms"));
        assert_eq!(status, 504, "{body}");
    });
    assert!(calls >= 20, "only {calls} short calls");
    // The circuit stayed closed and the worker in rotation: a patient call is answered.
    let (status, body) = slow_call(&attacker(), &gw, "slow", 2000, None);
    assert_eq!(status, 200, "{body}");
    let log = gw.log_text();
    assert!(!log.contains("circuit opened") && !log.contains("worker ejected"), "{log}");
    drop(gw);

    // A worker that hangs is still taken out by calls that time out on it.
    let gw = Gateway::start(
        &config("outlier = { consecutive = 1, base_ejection = \"5s\" }\n").replace("workers = 1", "workers = 2"),
    )
    .unwrap();
    // The gateway is ready with one worker serving: wait for both, or the
    // one stopped below may be one that never had a call.
    gw.wait_ready_workers("echo", 2, Duration::from_secs(30)).unwrap();
    for _ in 0..20 {
        assert_eq!(slow_call(&reqwest::blocking::Client::new(), &gw, "echo", 0, None).0, 200);
    }
    let hung = gw.worker_pid("echo-1").unwrap();
    let mark = gw.log().len();
    kill(Pid::from_raw(hung), Signal::SIGSTOP).unwrap();
    // After a timeout the balancer avoids the worker until its latency
    // estimate decays (seconds), so keep calling for a while.
    let until = std::time::Instant::now() + Duration::from_secs(20);
    let mut ejected = false;
    while !ejected && std::time::Instant::now() < until {
        let (status, _) = slow_call(&reqwest::blocking::Client::new(), &gw, "echo", 0, Some("300ms"));
        assert!(status == 200 || status == 504, "{status}");
        ejected = gw.log().iter().skip(mark).any(|v| v["message"] == "worker ejected" && v["worker"] == "echo-1");
    }
    kill(Pid::from_raw(hung), Signal::SIGCONT).unwrap();
    assert!(ejected, "the hung worker was never ejected:\n{}", gw.log_text());
}

/// `infergate serve` with `config`: it must refuse to start, saying `expected`.
fn refuses_to_start(config: &str, env: &[(&str, &str)], expected: &str) {
    let _serial = infergate_e2e::one_at_a_time();
    let dir = std::env::temp_dir().join(format!("infergate-refused-{:x}", infergate_e2e::rand_u64()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("infergate.toml");
    std::fs::write(&path, config).unwrap();
    let mut child = std::process::Command::new(infergate_e2e::gateway_bin())
        .args(["serve", "--config"])
        .arg(&path)
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let end = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > end {
            let _ = child.kill();
            panic!("the gateway started with {config}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "exit status {status}");
    assert!(stderr.contains(expected), "expected {expected:?} in:\n{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

const LOCAL: &str = "[http]\nlisten = \"127.0.0.1:0\"\n[grpc]\nlisten = \"127.0.0.1:0\"\n";

#[test]
fn a_short_hs256_secret_or_an_unsafe_socket_dir_stops_the_start() {
    let jwt = format!(
        "{LOCAL}[auth]\nenabled = true\n[auth.jwt]\nissuer = \"i\"\naudience = \"a\"\n\
         [[auth.jwt.keys]]\nalg = \"HS256\"\nsecret_env = \"HOSTILE_JWT_SECRET\"\n\
         [[pools]]\nname = \"echo\"\nclass = \"{ECHO}\"\n"
    );
    refuses_to_start(&jwt, &[("HOSTILE_JWT_SECRET", "")], "auth.jwt.keys[0].secret_env");
    refuses_to_start(&jwt, &[("HOSTILE_JWT_SECRET", "hunter2")], "at least 32 bytes");

    let theirs = std::env::temp_dir().join(format!("infergate-theirs-{:x}", infergate_e2e::rand_u64()));
    std::fs::create_dir_all(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    let sockets = format!(
        "{LOCAL}[workers]\nsocket_dir = \"{}\"\n[[pools]]\nname = \"echo\"\nclass = \"{ECHO}\"\n",
        theirs.display()
    );
    refuses_to_start(&sockets, &[], "is not safe: it belongs to uid 65534");
    let _ = std::fs::remove_dir_all(theirs);
}

/// The environment of process `pid`.
fn environ(pid: i32) -> Vec<(String, String)> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    raw.split(|b| *b == 0)
        .filter_map(|kv| String::from_utf8_lossy(kv).split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect()
}

#[test]
fn workers_never_see_the_gateways_secrets() {
    let secret = "a-32-byte-or-longer-jwt-secret-for-the-hostile-test";
    // The gateway reads the secret from its own environment.
    let config = config(
        "env = { POOL_VAR = \"pool\" }\n[auth]\nenabled = true\n[auth.jwt]\nissuer = \"i\"\naudience = \"a\"\n\
         [[auth.jwt.keys]]\nalg = \"HS256\"\nsecret_env = \"HOSTILE_WORKER_JWT_SECRET\"\n\
         [workers]\ninherit_env = [\"HOSTILE_PASSED\"]\n",
    );
    let gw = Gateway::start_with_env(
        &config,
        &[("HOSTILE_WORKER_JWT_SECRET", secret), ("HOSTILE_PASSED", "yes"), ("AWS_SECRET_ACCESS_KEY", "nope")],
    )
    .unwrap();
    let gateway_env = environ(gw.pid());
    assert!(gateway_env.iter().any(|(k, _)| k == "HOSTILE_WORKER_JWT_SECRET"), "the test did not set the secret");
    let worker = environ(gw.worker_pid("echo-0").unwrap());
    let names: BTreeSet<&str> = worker.iter().map(|(k, _)| k.as_str()).collect();
    assert!(!worker.iter().any(|(_, v)| v == secret), "the JWT secret reached a worker: {names:?}");
    assert!(!names.contains("AWS_SECRET_ACCESS_KEY"), "{names:?}");
    for needed in ["PATH", "POOL_VAR", "HOSTILE_PASSED", "INFERGATE_WORKER_ID"] {
        assert!(names.contains(needed), "{needed} missing from {names:?}");
    }
}

#[test]
fn with_auth_off_a_foreign_host_is_refused_and_smuggled_framing_closes_the_connection() {
    let gw = Gateway::start(&config("")).unwrap();
    rt().block_on(async {
        let ask = |request: String| async move {
            let mut conn = TcpStream::connect(gw.http).await.unwrap();
            conn.write_all(request.as_bytes()).await.unwrap();
            let mut answer = Vec::new();
            let closed = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut answer)).await.is_ok();
            (String::from_utf8_lossy(&answer).into_owned(), closed)
        };
        let body = r#"{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}"#;
        let post = |headers: &str, body: &str| {
            format!("POST /v2/models/echo/infer HTTP/1.1\r\nContent-Type: application/json\r\n{headers}\r\n{body}")
        };
        // DNS rebinding: the page's own name arrives as Host.
        let (answer, _) = ask(post(
            &format!("Host: rebound.evil.example:8080\r\nContent-Length: {}\r\nConnection: close\r\n", body.len()),
            body,
        ))
        .await;
        assert!(answer.starts_with("HTTP/1.1 421"), "{answer}");
        assert!(answer.contains("host-not-allowed"), "{answer}");
        // Framing a front proxy and the gateway could read differently:
        // one answer, then the connection is closed, so nothing smuggled
        // behind the body is ever read as a request.
        let smuggled = "GET /v2/models/echo HTTP/1.1\r\nHost: localhost\r\n\r\n";
        let chunked = format!("{:x}\r\n{body}\r\n0\r\n\r\n{smuggled}", body.len());
        for (case, request) in [
            // hyper reads these by their Transfer-Encoding alone (RFC 9112
            // §6.3); the socket's watch sees both lengths in the head.
            ("CL+TE", post("Host: localhost\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n", &chunked)),
            ("TE+CL", post("Host: localhost\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n", &chunked)),
            (
                "differing CLs",
                post("Host: localhost\r\nContent-Length: 4\r\nContent-Length: 40\r\n", &format!("{body}{smuggled}")),
            ),
            ("obfuscated TE", post("Host: localhost\r\nTransfer-Encoding: xchunked\r\n", &chunked)),
            ("TE chain", post("Host: localhost\r\nTransfer-Encoding: identity, chunked\r\n", &chunked)),
            (
                "TE twice",
                post("Host: localhost\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", &chunked),
            ),
        ] {
            let (answer, closed) = ask(request).await;
            assert!(answer.starts_with("HTTP/1.1 400"), "{case}: {answer}");
            assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{case}: more than one response: {answer}");
            assert!(closed, "{case}: the connection stayed open");
        }
    });
    // Both, over and over from the attacker's address, beside the ordinary client.
    let body = r#"{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}"#;
    let smuggle = format!(
        "POST /v2/models/echo/infer HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n\
         GET /v2/models/echo HTTP/1.1\r\nHost: localhost\r\n\r\n",
        body.len()
    );
    let rebind = format!(
        "POST /v2/models/echo/infer HTTP/1.1\r\nHost: rebound.evil.example\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    beside(&gw, "foreign hosts and smuggled framing", 2, || {
        // The I/O runs on this (nice) attacking thread.
        thread_local! {
            static NET: tokio::runtime::Runtime =
                tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        }
        for (request, status) in [(&smuggle, "HTTP/1.1 400"), (&rebind, "HTTP/1.1 421")] {
            let answer = NET.with(|net| {
                net.block_on(async {
                    let mut conn = connect_from(ATTACKER, gw.http).await.unwrap();
                    conn.write_all(request.as_bytes()).await.unwrap();
                    let mut answer = Vec::new();
                    conn.read_to_end(&mut answer).await.unwrap();
                    String::from_utf8_lossy(&answer).into_owned()
                })
            });
            assert!(answer.starts_with(status), "{answer}");
        }
    });
}

#[test]
fn in_the_default_config_sigkill_of_a_minilm_worker_under_8_clients_costs_no_request() {
    let gw = Gateway::start_default(Duration::from_secs(180)).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let url = gw.url("/v1/embeddings");
    let (answers, failures): (usize, Vec<String>) = std::thread::scope(|s| {
        let clients: Vec<_> = (0..8)
            .map(|c| {
                let (stop, url) = (&stop, &url);
                s.spawn(move || {
                    let client = reqwest::blocking::Client::new();
                    let (mut ok, mut failed) = (0, Vec::new());
                    let mut i = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        i += 1;
                        let body = json!({"model": "minilm", "input": format!("client {c} sentence {i}")});
                        match client.post(url).json(&body).send() {
                            Ok(r) if r.status() == 200 => ok += 1,
                            Ok(r) => failed.push(format!("{}: {}", r.status(), r.text().unwrap_or_default())),
                            Err(e) => failed.push(e.to_string()),
                        }
                    }
                    (ok, failed)
                })
            })
            .collect();
        std::thread::sleep(Duration::from_secs(2));
        let victim = gw.worker_pid("minilm-0").unwrap();
        kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
        std::thread::sleep(Duration::from_secs(4));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        clients.into_iter().map(|c| c.join().unwrap()).fold((0, Vec::new()), |(n, mut f), (ok, failed)| {
            f.extend(failed);
            (n + ok, f)
        })
    });
    eprintln!("{answers} embeddings answered around the SIGKILL, {} failed", failures.len());
    assert!(answers > 50, "only {answers} answers");
    assert!(failures.is_empty(), "requests lost to the SIGKILL: {failures:?}");
}

/// A /proc/<pid>/status field in kB (VmRSS, VmHWM).
fn status_kb(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.trim_start_matches(':').trim().strip_suffix(" kB")?.parse().ok())
        .unwrap()
}

/// Reset the process's peak RSS (VmHWM) to its current RSS.
fn reset_peak(pid: i32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
}

/// An OIP JSON request of `n` FP32 values, about 8 bytes of JSON each.
fn fp32_body(n: usize, seed: u64) -> String {
    let mut data = String::with_capacity(n * 9);
    for i in 0..n {
        if i > 0 {
            data.push(',');
        }
        data.push_str(&format!("{:.4}", ((i as u64 * 7919 + seed) % 10_000) as f64 / 10_000.0));
    }
    format!(r#"{{"inputs": [{{"name": "x", "shape": [{n}], "datatype": "FP32", "data": [{data}]}}]}}"#)
}

#[test]
fn concurrent_large_tensors_stay_within_3x_their_bodies_and_are_all_answered() {
    // Room for about four of the eight bodies at once: the rest are refused
    // with memory-full rather than buffered.
    // A 7 MB body may take seconds to send on a loaded machine, and its
    // head a while to be served: the default deadlines here, not the ones
    // the slow-client tests attack.
    let config = config("")
        .replacen(
            "max_in_flight = 16",
            "max_in_flight = 16\nmax_body_bytes = 16777216\nmax_buffered_bytes = 33554432",
            1,
        )
        .replace("body_timeout = \"2s\"", "body_timeout = \"30s\"")
        .replace("header_timeout = \"1s\"", "header_timeout = \"10s\"")
        .replace("handshake_timeout = \"1s\"", "handshake_timeout = \"10s\"");
    let gw = Gateway::start(&config).unwrap();
    let url = gw.url("/v2/models/echo/infer");
    // The blocking client's default 30 s timeout is for one call, not eight
    // 7 MB bodies through a debug build on a box running other suites (one
    // round of 20 beside two others took longer).
    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(120)).build().unwrap();
    // Warm: the first call sets up the worker connection and batcher.
    assert_eq!(
        client.post(&url).header("content-type", "application/json").body(fp32_body(10, 0)).send().unwrap().status(),
        200
    );
    let bodies: Vec<String> = (0..8).map(|i| fp32_body(1_000_000, i)).collect();
    let before = status_kb(gw.pid(), "VmRSS");
    reset_peak(gw.pid());
    let answers: Vec<(u16, String)> = std::thread::scope(|s| {
        let calls: Vec<_> = bodies
            .iter()
            .map(|body| {
                let (client, url) = (&client, &url);
                s.spawn(move || {
                    let sent = client.post(url).header("content-type", "application/json").body(body.clone()).send();
                    let resp = sent.unwrap_or_else(|e| panic!("a large tensor got no answer: {e:?}"));
                    let status = resp.status().as_u16();
                    let text = resp.text().unwrap();
                    (status, if status == 200 { String::new() } else { text })
                })
            })
            .collect();
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    });
    let peak = status_kb(gw.pid(), "VmHWM");
    let extra = (peak.saturating_sub(before)) * 1024;
    // Measured against the bodies the gateway took in.
    let total: usize = bodies.iter().zip(&answers).filter(|(_, (s, _))| *s == 200).map(|(b, _)| b.len()).sum();
    eprintln!(
        "8 tensors of {} MB: {:?}; peak extra RSS {} MB for {} MB of bodies taken ({:.2}x)",
        bodies[0].len() / 1_000_000,
        answers.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        extra / 1_000_000,
        total / 1_000_000,
        extra as f64 / total as f64
    );
    for (status, text) in &answers {
        assert!(*status == 200 || (*status == 503 && text.contains("memory-full")), "{status}: {text}");
    }
    assert!(answers.iter().any(|(s, _)| *s == 200), "none answered");
    assert!(extra <= 3 * total as u64, "peak extra RSS {extra} > 3 x {total}");

    // A shape far beyond its data is refused at once, with nothing reserved for it.
    reset_peak(gw.pid());
    let before = status_kb(gw.pid(), "VmRSS");
    let huge = r#"{"inputs": [{"name": "x", "shape": [268435456], "datatype": "FP64", "data": []}]}"#;
    let started = std::time::Instant::now();
    let resp = client.post(&url).header("content-type", "application/json").body(huge).send().unwrap();
    assert_eq!(resp.status(), 400);
    assert!(resp.text().unwrap().contains("inputs[0].data"));
    assert!(started.elapsed() < Duration::from_millis(500));
    let grew = status_kb(gw.pid(), "VmHWM").saturating_sub(before);
    assert!(grew < 16 * 1024, "a 2 GiB shape with no data grew the peak RSS by {grew} kB");
}

#[test]
fn a_batch_over_the_worker_message_limit_is_split_and_an_item_over_it_is_413() {
    // 1 MiB messages; each request ~400 kB of FP32 once encoded.
    let config = config("batching = { max_delay = \"50ms\" }\n[workers]\nmax_message_bytes = 1048576\n");
    let gw = Gateway::start(&config).unwrap();
    let url = gw.url("/v2/models/echo/infer");
    let client = reqwest::blocking::Client::new();
    let answers: Vec<u16> = std::thread::scope(|s| {
        let calls: Vec<_> = (0..8)
            .map(|i| {
                let (client, url) = (&client, &url);
                s.spawn(move || {
                    let body = fp32_body(100_000, i);
                    client
                        .post(url)
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .unwrap()
                        .status()
                        .as_u16()
                })
            })
            .collect();
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    });
    assert_eq!(answers, vec![200; 8], "{}", gw.log_text());
    // Such items over and over from another address, while the ordinary
    // client calls the same model: callers take turns in a batch, so its
    // one small item never waits behind the attacker's queue of large ones.
    let bodies: Vec<_> = (0..8).map(|i| fp32_body(100_000, i)).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    beside(&gw, "items near the message limit", 4, || {
        let body = bodies[next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % bodies.len()].clone();
        let resp = attacker().post(&url).header("content-type", "application/json").body(body).send().unwrap();
        assert_eq!(resp.status(), 200);
    });
    // Batched together (50 ms window), yet split to fit 1 MiB.
    let metrics = reqwest::blocking::get(gw.url("/metrics")).unwrap().text().unwrap();
    assert!(metrics.contains("infergate_batch_size_count"), "no batches recorded");
    // One item larger than a whole message: 413 before a worker sees it.
    let resp = client.post(&url).header("content-type", "application/json").body(fp32_body(400_000, 1)).send().unwrap();
    assert_eq!(resp.status(), 413);
    assert!(resp.text().unwrap().contains("message-too-large"));
    assert!(!gw.log_text().contains("worker ejected"));
    // And the worker still serves.
    assert_eq!(
        client.post(&url).header("content-type", "application/json").body(fp32_body(10, 3)).send().unwrap().status(),
        200
    );
}

#[test]
fn a_poisoned_redis_cache_value_is_a_logged_miss_not_an_allocation() {
    let redis = infergate_e2e::Redis::start().unwrap();
    let config = config(&format!("[redis]\nurl = \"{}\"\n", redis.url()));
    let a = Gateway::start(&config).unwrap();
    let body = json!({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [42.0]}]});
    let call = |gw: &Gateway| {
        let resp = reqwest::blocking::Client::new().post(gw.url("/v2/models/echo/infer")).json(&body).send().unwrap();
        let cache = resp.headers().get("x-cache").map(|v| v.to_str().unwrap().to_owned());
        (resp.status().as_u16(), cache)
    };
    assert_eq!(call(&a), (200, Some("miss".into())));
    // Mirrored to Redis; then someone with access to Redis rewrites it: a
    // size prefix of 4 GiB in front of junk.
    let until = std::time::Instant::now() + Duration::from_secs(5);
    let keys = loop {
        let keys = redis.keys("infergate:cache:*").unwrap();
        if !keys.is_empty() || std::time::Instant::now() > until {
            break keys;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(keys.len(), 1, "{keys:?}");
    let mut poison = b"o".to_vec();
    poison.extend_from_slice(&u32::MAX.to_le_bytes());
    poison.extend_from_slice(b"junk that inflates to nothing");
    redis.command(&[b"SET", keys[0].as_bytes(), &poison]).unwrap();
    // A replica with nothing in memory reads it from Redis: a miss, logged,
    // answered by its worker; its peak RSS does not move by gigabytes.
    let b = Gateway::start_beside(&a, &config).unwrap();
    reset_peak(b.pid());
    let before = status_kb(b.pid(), "VmRSS");
    assert_eq!(call(&b), (200, Some("miss".into())));
    assert!(status_kb(b.pid(), "VmHWM").saturating_sub(before) < 64 * 1024, "the poisoned value was inflated");
    let poisoned =
        |v: &serde_json::Value| v["message"].as_str().is_some_and(|m| m.contains("a value in redis cannot be read"));
    assert!(b.wait_log(0, Duration::from_secs(5), poisoned).is_some(), "{}", b.log_text());

    // Many poisoned values, read by b while an ordinary client calls it.
    const POISONED: usize = 200;
    let client = reqwest::blocking::Client::new();
    let body =
        |i: usize| json!({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [-1.0 - i as f64]}]});
    for i in 0..POISONED {
        let resp = client.post(a.url("/v2/models/echo/infer")).json(&body(i)).send().unwrap();
        assert_eq!(resp.status(), 200);
    }
    let until = std::time::Instant::now() + Duration::from_secs(10);
    let keys = loop {
        let keys = redis.keys("infergate:cache:*").unwrap();
        // The first key may be there too, or not: b's miss wrote it back
        // to Redis in the background.
        if keys.len() >= POISONED || std::time::Instant::now() > until {
            break keys;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(keys.len() >= POISONED, "{} keys mirrored", keys.len());
    for key in &keys {
        redis.command(&[b"SET", key.as_bytes(), &poison]).unwrap();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    beside(&b, "poisoned redis values", 2, || {
        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % POISONED;
        let resp = attacker().post(b.url("/v2/models/echo/infer")).json(&body(i)).send().unwrap();
        assert_eq!(resp.status(), 200, "a poisoned value was not a miss");
    });
    let read = b.log().iter().filter(|v| poisoned(v)).count();
    assert!(read > 10, "only {read} poisoned values were read");
}

#[test]
fn an_image_bomb_is_refused_by_its_decoded_size_and_the_model_keeps_serving() {
    let tiny_cnn = "[[pools]]\nname = \"tiny_cnn\"\nclass = \"infergate_worker.examples.tiny_cnn:TinyCNN\"\n";
    let config = config("").replacen("[http]\n", "[http]\nmax_image_bytes = 8388608\n", 1) + tiny_cnn;
    let gw = Gateway::start(&config).unwrap();
    let png = |img: image::DynamicImage| {
        let mut body = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut body), image::ImageFormat::Png).unwrap();
        body
    };
    // 1,200 x 1,200 16-bit RGBA: 1.4 MP, well under the pixel cap, but
    // 11.5 MB once decoded; a few kB compressed.
    let bomb =
        png(image::DynamicImage::ImageRgba16(image::ImageBuffer::from_pixel(1200, 1200, image::Rgba([7, 7, 7, 7]))));
    assert!(bomb.len() < 200_000, "{} bytes", bomb.len());
    let client = reqwest::blocking::Client::new();
    let send = |body: Vec<u8>| {
        let resp = client
            .post(gw.url("/v2/models/tiny_cnn/infer"))
            .header("content-type", "image/png")
            .body(body)
            .send()
            .unwrap();
        (resp.status().as_u16(), resp.text().unwrap())
    };
    reset_peak(gw.pid());
    let before = status_kb(gw.pid(), "VmRSS");
    let (status, text) = send(bomb.clone());
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("image-too-large") && text.contains("8388608"), "{text}");
    assert!(status_kb(gw.pid(), "VmHWM").saturating_sub(before) < 16 * 1024, "the bomb was decoded");
    // Bombs over and over, while the ordinary client calls echo.
    beside(&gw, "image bombs", 2, || {
        let resp = attacker()
            .post(gw.url("/v2/models/tiny_cnn/infer"))
            .header("content-type", "image/png")
            .body(bomb.clone())
            .send()
            .unwrap();
        assert_eq!(resp.status(), 413);
    });
    // An ordinary photo-sized image is still served.
    let ok = png(image::DynamicImage::ImageRgb8(image::ImageBuffer::from_pixel(320, 240, image::Rgb([10, 200, 30]))));
    let (status, text) = send(ok);
    assert_eq!(status, 200, "{text}");
}

/// The reset cap is for rapid reset, not for clients that give up: 300
/// calls a second on one connection, each abandoned by its client after
/// 150 ms (the model takes 1 s), reset far more than 200 streams a second,
/// yet the connection stays and the next call on it is answered. Counting
/// such resets closed an honest client's connection, with every call on it,
/// whenever the gateway was overloaded.
#[test]
fn a_client_abandoning_slow_calls_keeps_its_connection() {
    use infergate::proto::inference_client::InferenceClient;
    use infergate::proto::{InferRequest, ParamValue, Tensor, param_value};

    let gw = Gateway::start(&format!("[[pools]]\nname = \"echo\"\nclass = \"{ECHO}\"\n")).unwrap();
    rt().block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(gw.grpc_url()).unwrap().connect().await.unwrap();
        let client = InferenceClient::new(channel);
        let call = |delay_ms: i64| {
            let x = Tensor {
                name: "x".into(),
                datatype: "FP32".into(),
                shape: vec![1],
                fp32_contents: vec![1.0],
                ..Default::default()
            };
            let delay = ParamValue { value: Some(param_value::Value::Int64Param(delay_ms)) };
            let parameters = [("delay_ms".to_owned(), delay)].into();
            InferRequest { model: "echo".into(), inputs: vec![x], parameters, ..Default::default() }
        };
        // No grpc-timeout: the server waits on; the client's own timer
        // drops each call, which resets its stream.
        let started = Instant::now();
        let mut abandoned = Vec::new();
        for n in 0..600u32 {
            let mut client = client.clone();
            let req = call(1000);
            abandoned.push(tokio::spawn(async move {
                tokio::time::timeout(Duration::from_millis(150), client.infer(req)).await.is_err()
            }));
            tokio::time::sleep_until(started + Duration::from_millis(u64::from(n) * 10 / 3)).await;
        }
        let mut gave_up = 0;
        for a in abandoned {
            gave_up += u32::from(a.await.unwrap());
        }
        let took = started.elapsed();
        eprintln!("{gave_up} calls abandoned after 150 ms in {took:?}");
        assert!(f64::from(gave_up) / took.as_secs_f64() > 250.0, "{gave_up} in {took:?}: not enough resets to test");
        let answer = client.clone().infer(call(0)).await;
        assert!(answer.is_ok(), "the connection was lost: {answer:?}");
    });
    assert!(!gw.log_text().contains("client reset more than"), "{}", gw.log_text());
}

/// A gauge's value for one listener in the gateway's /metrics.
fn listener_gauge(gw: &Gateway, name: &str, listener: &str) -> f64 {
    let text = reqwest::blocking::get(gw.url("/metrics")).unwrap().text().unwrap();
    let series = format!("{name}{{listener=\"{listener}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&series)).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN)
}

#[test]
fn thousands_of_idle_keep_alive_connections_cost_a_few_kib_each_and_are_all_served_again() {
    const IDLE: usize = 4000;
    let text = config("").replacen(
        "max_connections = 256\nmax_connections_per_client = 128",
        "max_connections = 8192\nmax_connections_per_client = 8192\nconnection_rate_per_client = 0",
        1,
    );
    let gw = Gateway::start(&text).unwrap();
    let served = |conn: &mut std::net::TcpStream| {
        use std::io::{Read, Write};
        conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
        let mut buf = [0; 512];
        let n = conn.read(&mut buf).unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
    };
    let mut first = std::net::TcpStream::connect(gw.http).unwrap();
    served(&mut first);
    std::thread::sleep(Duration::from_millis(500));
    let before = status_kb(gw.pid(), "VmRSS");
    // Each sends a request at once, and waits for the answer after all sent.
    let mut idle = Vec::new();
    for _ in 0..IDLE {
        let mut conn = std::net::TcpStream::connect_timeout(&gw.http, Duration::from_secs(5)).unwrap();
        use std::io::Write;
        conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
        idle.push(conn);
    }
    for conn in &mut idle {
        use std::io::Read;
        let mut buf = [0; 512];
        let n = conn.read(&mut buf).unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    }
    // Every idle connection (and the first) parks within a few seconds.
    let until = std::time::Instant::now() + Duration::from_secs(20);
    while listener_gauge(&gw, "infergate_connections_parked", "http") < (IDLE + 1) as f64 {
        assert!(std::time::Instant::now() < until, "not all idle connections parked");
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = status_kb(gw.pid(), "VmRSS");
    let per_conn = after.saturating_sub(before) as f64 / IDLE as f64;
    eprintln!("RSS {before} kB -> {after} kB with {IDLE} idle connections: {per_conn:.2} KiB each");
    assert!(per_conn <= 6.0, "{per_conn:.2} KiB per idle connection");
    // Meanwhile an ordinary client is served, and every parked connection
    // answers its next request.
    rt().block_on(async {
        let seen = Ordinary::new(&gw).run(20, Duration::from_millis(10)).await;
        assert!(seen.errors.is_empty(), "{:?}", seen.errors);
    });
    for conn in &mut idle {
        served(conn);
    }
    assert!(listener_gauge(&gw, "infergate_connections_open", "http") >= (IDLE + 1) as f64);
}
