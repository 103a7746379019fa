//! `infergate-video`: cameras sending 224×224 JPEG frames at a fixed rate
//! to an image model, as one gRPC `InferStream` per camera or as one REST
//! request per frame, from the same process; prints (and writes) frames
//! answered a second, latency percentiles measured at the client from a
//! frame's capture (its send time) to its result, and frames dropped.
//!
//! REST clients come in two kinds: `rest` sends a camera's next frame once
//! the last is answered (frames captured meanwhile are skipped, as a
//! real-time client does), `rest-pipelined` sends every frame at once, up to
//! `--max-in-flight` unanswered (past it, skipped). A stream keeps at most
//! `--max-in-flight` frames at the model and drops the oldest waiting frame
//! when behind (`drop_oldest`), reported by the gateway.
//!
//! `--rtt` puts the cameras at the far end of a network link: both
//! connections go through a delay line (the e2e tests' TCP fault proxy,
//! half the round trip each way, never throttled; `tc netem` does not work
//! on these machines), as a camera on a city network or a cellular uplink is.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use infergate::proto::inference_client::InferenceClient;
use infergate::proto::stream_request::Kind;
use infergate::proto::stream_result::Outcome;
use infergate::proto::{StreamFrame, StreamOpen, StreamOverflow, StreamRequest};
use infergate_e2e::fault_proxy::{Fault, FaultProxy};
use serde_json::json;
use tokio::sync::Mutex;

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Mode {
    /// One gRPC InferStream per camera.
    Stream,
    /// One REST request per frame, the next when the last is answered.
    Rest,
    /// One REST request per frame, up to --max-in-flight at once.
    RestPipelined,
}

#[derive(Parser, Debug)]
#[command(name = "infergate-video", about = "Cameras at a fixed frame rate against an image model")]
struct Args {
    #[arg(long, value_enum)]
    mode: Mode,
    /// The gateway's REST base URL, e.g. `http://127.0.0.1:8080`.
    #[arg(long)]
    http: String,
    /// The gateway's gRPC URL, e.g. `http://127.0.0.1:50051`.
    #[arg(long)]
    grpc: String,
    #[arg(long, default_value = "tiny_cnn")]
    model: String,
    /// Concurrent cameras.
    #[arg(long, default_value_t = 1)]
    streams: usize,
    #[arg(long, default_value_t = 30.0)]
    fps: f64,
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Frames at the model (or unanswered) per camera at once.
    #[arg(long, default_value_t = 8)]
    max_in_flight: u32,
    /// Name of this run in the results.
    #[arg(long, default_value = "video")]
    label: String,
    #[arg(long)]
    json: Option<PathBuf>,
    /// Round-trip time of the cameras' link to the gateway.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    rtt: Duration,
}

/// What every camera adds to.
#[derive(Default)]
struct Tally {
    offered: AtomicU64,
    answered: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
}

/// Distinct frames, JPEG-encoded once: a camera sends them in turn.
fn frames() -> anyhow::Result<Vec<Bytes>> {
    (0..30u32)
        .map(|i| {
            let img = image::RgbImage::from_fn(224, 224, |x, y| {
                image::Rgb([((x + 5 * i) % 256) as u8, ((y + 3 * i) % 256) as u8, ((x * y + i) % 256) as u8])
            });
            let mut out = std::io::Cursor::new(Vec::new());
            img.write_to(&mut out, image::ImageFormat::Jpeg)?;
            Ok(Bytes::from(out.into_inner()))
        })
        .collect()
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    // Started before this runtime: each runs its own.
    let _link = if args.rtt.is_zero() {
        None
    } else {
        let http = through_link(&args.http, args.rtt)?;
        let grpc = through_link(&args.grpc, args.rtt)?;
        args.http = format!("http://{}", http.addr);
        args.grpc = format!("http://{}", grpc.addr);
        Some((http, grpc))
    };
    tokio::runtime::Runtime::new()?.block_on(run(Arc::new(args)))
}

/// A delay line to the server at `url` (`http://host:port`), `rtt / 2` each way.
fn through_link(url: &str, rtt: Duration) -> anyhow::Result<FaultProxy> {
    use std::net::ToSocketAddrs;
    let uri: http::Uri = url.parse()?;
    let authority = uri.authority().context("a URL with host:port")?.as_str();
    let upstream = authority.to_socket_addrs()?.next().context("the server's address")?;
    let proxy = FaultProxy::start(upstream)?;
    proxy.set(Fault::Latency(rtt / 2));
    Ok(proxy)
}

async fn run(args: Arc<Args>) -> anyhow::Result<()> {
    let frames = Arc::new(frames()?);
    let tally = Arc::new(Tally::default());
    let latency = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?));
    let started = Instant::now();
    let mut cameras = Vec::new();
    for camera in 0..args.streams {
        let (args, frames, tally, latency) = (args.clone(), frames.clone(), tally.clone(), latency.clone());
        // Cameras are not phase-locked: each starts its frame clock at its own
        // offset within one frame interval, as independent cameras would.
        let phase = Duration::from_secs_f64(camera as f64 / args.streams as f64 / args.fps);
        cameras.push(tokio::spawn(async move {
            let start = started + phase;
            match args.mode {
                Mode::Stream => stream_camera(&args, camera, start, &frames, &tally, &latency).await,
                Mode::Rest | Mode::RestPipelined => rest_camera(&args, camera, start, &frames, &tally, &latency).await,
            }
        }));
    }
    for c in cameras {
        c.await.context("camera task")??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let h = latency.lock().await;
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let answered = tally.answered.load(Ordering::Relaxed);
    let report = json!({
        "label": args.label,
        "mode": format!("{:?}", args.mode),
        "streams": args.streams,
        "fps_per_stream": args.fps,
        "rtt_ms": args.rtt.as_secs_f64() * 1000.0,
        "duration_s": elapsed,
        "offered": tally.offered.load(Ordering::Relaxed),
        "answered": answered,
        "dropped": tally.dropped.load(Ordering::Relaxed),
        "failed": tally.failed.load(Ordering::Relaxed),
        "answered_fps": answered as f64 / args.duration.as_secs_f64(),
        "latency_ms": {"p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "max": h.max() as f64 / 1000.0},
    });
    #[expect(clippy::print_stdout, reason = "the report is this tool's output")]
    {
        println!("{report}");
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(())
}

/// When frame `i` of a camera is captured.
fn capture_at(start: Instant, fps: f64, i: u64) -> Instant {
    start + Duration::from_secs_f64(i as f64 / fps)
}

async fn stream_camera(
    args: &Args,
    camera: usize,
    start: Instant,
    frames: &[Bytes],
    tally: &Tally,
    latency: &Mutex<Histogram<u64>>,
) -> anyhow::Result<()> {
    let mut client = InferenceClient::connect(args.grpc.clone()).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<StreamRequest>(4);
    let open = StreamOpen {
        model: args.model.clone(),
        max_in_flight: args.max_in_flight,
        overflow: StreamOverflow::DropOldest as i32,
        ..Default::default()
    };
    tx.send(StreamRequest { kind: Some(Kind::Open(open)) }).await?;
    let total = (args.duration.as_secs_f64() * args.fps) as u64;
    let sent_at: Arc<std::sync::Mutex<Vec<Option<Instant>>>> =
        Arc::new(std::sync::Mutex::new(vec![None; total as usize]));
    let sender = {
        let (frames, sent_at, fps) = (frames.to_vec(), sent_at.clone(), args.fps);
        tokio::spawn(async move {
            for i in 0..total {
                tokio::time::sleep_until(capture_at(start, fps, i).into()).await;
                let frame = StreamFrame {
                    seq: i,
                    image: frames[(i as usize + camera) % frames.len()].to_vec(),
                    ..Default::default()
                };
                sent_at.lock().map_err(|_| anyhow::anyhow!("poisoned"))?[i as usize] = Some(Instant::now());
                if tx.send(StreamRequest { kind: Some(Kind::Frame(frame)) }).await.is_err() {
                    break;
                }
            }
            anyhow::Ok(())
        })
    };
    let mut results = client.infer_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
    // Every frame sent must come back exactly once: answered, failed or
    // reported dropped. A frame that never comes back is a silent drop.
    let mut reported = vec![false; total as usize];
    while let Some(r) = results.message().await? {
        let seen = reported.get_mut(r.seq as usize).context("a result for a frame never sent")?;
        anyhow::ensure!(!*seen, "frame {} reported twice", r.seq);
        *seen = true;
        if matches!(r.outcome, Some(Outcome::Dropped(_))) {
            tally.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let sent = sent_at.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.get(r.seq as usize).copied().flatten();
        let took = sent.context("a result for a frame never sent")?.elapsed();
        record((matches!(r.outcome, Some(Outcome::Outputs(_))), took), tally, latency).await;
    }
    sender.await??;
    let sent = sent_at.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.iter().filter(|s| s.is_some()).count();
    let silent = sent - reported.iter().filter(|r| **r).count();
    anyhow::ensure!(
        silent == 0,
        "camera {camera}: {silent} of {sent} frames sent were neither answered nor reported dropped"
    );
    tally.offered.fetch_add(sent as u64, Ordering::Relaxed);
    Ok(())
}

async fn rest_camera(
    args: &Args,
    camera: usize,
    start: Instant,
    frames: &[Bytes],
    tally: &Tally,
    latency: &Mutex<Histogram<u64>>,
) -> anyhow::Result<()> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<Bytes>>();
    let url: http::Uri = format!("{}/v2/models/{}/infer", args.http, args.model).parse()?;
    let window = match args.mode {
        Mode::Rest => 1,
        _ => args.max_in_flight as usize,
    };
    let permits = Arc::new(tokio::sync::Semaphore::new(window));
    let total = (args.duration.as_secs_f64() * args.fps) as u64;
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..total {
        tokio::time::sleep_until(capture_at(start, args.fps, i).into()).await;
        tally.offered.fetch_add(1, Ordering::Relaxed);
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            // The camera's last frames are still unanswered: this one is skipped.
            tally.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let req = http::Request::post(url.clone())
            .header(http::header::CONTENT_TYPE, "image/jpeg")
            .body(http_body_util::Full::new(frames[(i as usize + camera) % frames.len()].clone()))?;
        let client = client.clone();
        calls.spawn(async move {
            let sent = Instant::now();
            let ok = match client.request(req).await {
                Ok(resp) => {
                    let ok = resp.status().is_success();
                    use http_body_util::BodyExt;
                    ok && resp.into_body().collect().await.is_ok()
                }
                Err(_) => false,
            };
            drop(permit);
            (ok, sent.elapsed())
        });
        while let Some(done) = calls.try_join_next() {
            record(done?, tally, latency).await;
        }
    }
    while let Some(done) = calls.join_next().await {
        record(done?, tally, latency).await;
    }
    Ok(())
}

async fn record((ok, took): (bool, Duration), tally: &Tally, latency: &Mutex<Histogram<u64>>) {
    if ok {
        tally.answered.fetch_add(1, Ordering::Relaxed);
        latency.lock().await.saturating_record(u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1));
    } else {
        tally.failed.fetch_add(1, Ordering::Relaxed);
    }
}
