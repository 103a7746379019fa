//! Streams of frames end to end: gRPC `Inference/InferStream` and the
//! WebSocket `/v1/streams/{model}`, through the real gateway to real
//! Python workers (`tiny_cnn`, a PyTorch CNN; `echo` with delays).
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use infergate::proto::inference_client::InferenceClient;
use infergate::proto::stream_request::Kind;
use infergate::proto::stream_result::Outcome;
use infergate::proto::{
    ParamValue, StreamFrame, StreamOpen, StreamOrder, StreamOverflow, StreamRequest, StreamResult, Tensor, param_value,
};
use infergate_e2e::Gateway;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const ECHO: &str = "infergate_worker.examples.echo:Echo";
const TINY_CNN: &str = "infergate_worker.examples.tiny_cnn:TinyCNN";
/// The API key the auth test presents; the config holds its SHA-256.
const KEY: &str = "ig_e2e-streams-key-aaaaaaaaaaaaaaaaaaaaaaaaaaa";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// A 224×224 JPEG that differs with `i`.
fn jpeg(i: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(224, 224, |x, y| {
        image::Rgb([((x + 3 * i) % 256) as u8, ((y * 2 + i) % 256) as u8, ((x ^ y ^ i) % 256) as u8])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
    out.into_inner()
}

fn int_param(v: i64) -> ParamValue {
    ParamValue { value: Some(param_value::Value::Int64Param(v)) }
}

fn fp32(name: &str, values: &[f32]) -> Tensor {
    Tensor {
        name: name.into(),
        datatype: "FP32".into(),
        shape: vec![values.len() as i64],
        fp32_contents: values.to_vec(),
        ..Default::default()
    }
}

fn image_frame(seq: u64) -> StreamFrame {
    StreamFrame { seq, timestamp: seq as i64 * 33_333, image: jpeg(seq as u32), ..Default::default() }
}

fn tensor_frame(seq: u64, delay_ms: i64) -> StreamFrame {
    StreamFrame {
        seq,
        timestamp: seq as i64,
        inputs: vec![fp32("x", &[seq as f32])],
        parameters: if delay_ms > 0 { [("delay_ms".to_owned(), int_param(delay_ms))].into() } else { HashMap::new() },
        ..Default::default()
    }
}

/// An FP32 output's values, wherever the answer put them.
fn floats(t: &Tensor) -> Vec<f32> {
    if t.fp32_contents.is_empty() && !t.raw_contents.is_empty() {
        return t.raw_contents.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    }
    t.fp32_contents.clone()
}

/// What came back from one stream: the results, when the sender handed
/// its last frame over, and the status the stream ended with (`None`: OK).
struct Ran {
    results: Vec<StreamResult>,
    sent_all_after: Duration,
    ended: Option<tonic::Status>,
}

/// Run one gRPC stream: open it, send `frames` one every `pace` (as fast
/// as the gateway reads them when zero), half-close, read every result.
async fn grpc_stream(
    gw: &Gateway,
    open: StreamOpen,
    frames: Vec<StreamFrame>,
    pace: Duration,
    key: Option<&str>,
) -> Result<Ran, tonic::Status> {
    let mut client = InferenceClient::connect(gw.grpc_url()).await.unwrap().max_decoding_message_size(64 << 20);
    // Capacity 1: the sender waits whenever tonic does not take its frame.
    let (tx, rx) = tokio::sync::mpsc::channel::<StreamRequest>(1);
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    if let Some(key) = key {
        req.metadata_mut().insert("authorization", format!("Bearer {key}").parse().unwrap());
    }
    tx.send(StreamRequest { kind: Some(Kind::Open(open)) }).await.unwrap();
    let started = Instant::now();
    let sender = tokio::spawn(async move {
        let mut next = Instant::now();
        for frame in frames {
            if !pace.is_zero() {
                tokio::time::sleep_until(next.into()).await;
                next += pace;
            }
            if tx.send(StreamRequest { kind: Some(Kind::Frame(frame)) }).await.is_err() {
                break;
            }
        }
        started.elapsed()
    });
    let mut stream = client.infer_stream(req).await?.into_inner();
    let mut results = Vec::new();
    let ended = loop {
        match stream.message().await {
            Ok(Some(r)) => results.push(r),
            Ok(None) => break None,
            Err(status) => break Some(status),
        }
    };
    let sent_all_after = sender.await.unwrap();
    Ok(Ran { results, sent_all_after, ended })
}

fn open(model: &str) -> StreamOpen {
    StreamOpen { model: model.into(), ..Default::default() }
}

/// The WebSocket URL of a stream to `model` with `query`.
fn ws_url(gw: &Gateway, model: &str, query: &str) -> String {
    gw.url(&format!("/v1/streams/{model}?{query}")).replacen("http://", "ws://", 1)
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_connect(url: &str, protocols: Option<&str>) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let mut req = url.into_client_request().unwrap();
    if let Some(p) = protocols {
        req.headers_mut().insert("sec-websocket-protocol", p.parse().unwrap());
    }
    let (ws, resp) = tokio_tungstenite::connect_async(req).await?;
    if protocols.is_some() {
        assert_eq!(resp.headers()["sec-websocket-protocol"], "infergate.v1");
    }
    Ok(ws)
}

/// A binary WebSocket frame: sequence number, timestamp, image.
fn ws_image(seq: u64) -> Message {
    let mut bytes = seq.to_be_bytes().to_vec();
    bytes.extend_from_slice(&(seq as i64 * 33_333).to_be_bytes());
    bytes.extend_from_slice(&jpeg(seq as u32));
    Message::Binary(bytes.into())
}

/// Send `frames` one every `pace`, then the end; read every result until
/// the gateway closes. Returns the results and the close code.
async fn ws_stream(ws: Ws, frames: Vec<Message>, pace: Duration) -> (Vec<Value>, Option<u16>) {
    let (mut sink, mut source) = ws.split();
    let sender = tokio::spawn(async move {
        let mut next = Instant::now();
        for frame in frames {
            tokio::time::sleep_until(next.into()).await;
            next += pace;
            sink.send(frame).await.unwrap();
        }
        sink.send(Message::Text(r#"{"end": true}"#.into())).await.unwrap();
        sink
    });
    let mut results = Vec::new();
    let mut code = None;
    while let Some(msg) = source.next().await {
        match msg.unwrap() {
            Message::Text(t) => results.push(serde_json::from_str::<Value>(t.as_str()).unwrap()),
            Message::Close(frame) => {
                code = frame.map(|f| u16::from(f.code));
                break;
            }
            _ => {}
        }
    }
    drop(sender.await.unwrap());
    (results, code)
}

/// A tensor's values from its OIP JSON form.
fn json_floats(t: &Value) -> Vec<f32> {
    t["data"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect()
}

fn output<'a>(outputs: &'a [Value], name: &str) -> &'a Value {
    outputs.iter().find(|o| o["name"] == name).unwrap()
}

fn close_enough(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-5)
}

fn metric(gw: &Gateway, line_start: &str) -> f64 {
    let text = reqwest::blocking::get(gw.url("/metrics")).unwrap().text().unwrap();
    text.lines().filter(|l| l.starts_with(line_start)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

#[test]
fn frames_at_30_fps_come_back_in_order_each_equal_to_its_single_request_answer() {
    let config = format!(
        "[[pools]]\nname = \"tiny_cnn\"\nclass = \"{TINY_CNN}\"\nworkers = 2\n\
         [[pools]]\nname = \"echo\"\nclass = \"{ECHO}\"\nworkers = 2\n"
    );
    let gw = Gateway::start(&config).unwrap();
    const N: u64 = 300;
    // What one request per frame answers: the reference.
    let http = reqwest::blocking::Client::new();
    let single: Vec<Vec<f32>> = (0..N)
        .map(|i| {
            let resp = http
                .post(gw.url("/v2/models/tiny_cnn/infer"))
                .header("content-type", "image/jpeg")
                .body(jpeg(i as u32))
                .send()
                .unwrap();
            assert_eq!(resp.status(), 200);
            let out: Value = resp.json().unwrap();
            json_floats(output(out["outputs"].as_array().unwrap(), "probabilities"))
        })
        .collect();

    let rt = runtime();
    let pace = Duration::from_micros(33_333);
    // Both edges at once, 300 frames each at 30 fps.
    let (grpc, (ws, code)) = rt.block_on(async {
        let grpc = grpc_stream(&gw, open("tiny_cnn"), (0..N).map(image_frame).collect(), pace, None);
        let ws = async {
            let ws = ws_connect(&ws_url(&gw, "tiny_cnn", ""), None).await.unwrap();
            ws_stream(ws, (0..N).map(ws_image).collect(), pace).await
        };
        let (grpc, ws) = tokio::join!(grpc, ws);
        (grpc.unwrap(), ws)
    });
    assert!(grpc.ended.is_none(), "{:?}", grpc.ended);
    assert_eq!(grpc.results.len(), N as usize);
    for (i, r) in grpc.results.iter().enumerate() {
        assert_eq!(r.seq, i as u64, "gRPC results out of order");
        assert_eq!(r.timestamp, i as i64 * 33_333);
        let Some(Outcome::Outputs(out)) = &r.outcome else { panic!("frame {i}: {r:?}") };
        let probabilities = out.outputs.iter().find(|t| t.name == "probabilities").unwrap();
        assert!(close_enough(&floats(probabilities), &single[i]), "frame {i} differs from its single answer");
    }
    assert_eq!(code, Some(1000));
    assert_eq!(ws.len(), N as usize);
    for (i, r) in ws.iter().enumerate() {
        assert_eq!(r["seq"], i as u64, "WebSocket results out of order");
        let probabilities = json_floats(output(r["outputs"].as_array().unwrap(), "probabilities"));
        assert!(close_enough(&probabilities, &single[i]), "frame {i} differs from its single answer: {r}");
    }
    let latencies = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[v.len() * 99 / 100])
    };
    let grpc_ms = latencies(grpc.results.iter().map(|r| r.latency_us as f64 / 1000.0).collect());
    let ws_ms = latencies(ws.iter().map(|r| r["latency_ms"].as_f64().unwrap()).collect());
    eprintln!("frame latency p50/p99 (ms): gRPC {grpc_ms:?}, WebSocket {ws_ms:?}");
    assert_eq!(metric(&gw, "infergate_stream_frames_total{model=\"tiny_cnn\",outcome=\"answered\"}"), 2.0 * N as f64);

    // A corrupt image fails its frame alone.
    let corrupt = StreamFrame { seq: 1, image: b"not a jpeg".to_vec(), ..Default::default() };
    let ran = rt
        .block_on(grpc_stream(
            &gw,
            open("tiny_cnn"),
            vec![image_frame(0), corrupt, image_frame(2)],
            Duration::ZERO,
            None,
        ))
        .unwrap();
    assert!(ran.ended.is_none(), "{:?}", ran.ended);
    assert_eq!(ran.results.iter().map(|r| r.seq).collect::<Vec<_>>(), [0, 1, 2]);
    let Some(Outcome::Error(e)) = &ran.results[1].outcome else { panic!("{:?}", ran.results[1]) };
    assert_eq!((e.code, e.r#type.as_str()), (tonic::Code::InvalidArgument as i32, "invalid-request"), "{e:?}");
    assert!(e.message.contains("image: cannot decode"), "{e:?}");
    assert!(ran.results.iter().step_by(2).all(|r| matches!(r.outcome, Some(Outcome::Outputs(_)))));

    // as_ready: a slow first frame comes back after faster ones; in order, first. The
    // frames come 50 ms apart, so the batcher does not put them together,
    // and the slow one holds one of echo's two workers.
    let slow_first: Vec<StreamFrame> = (0..8).map(|i| tensor_frame(i, if i == 0 { 600 } else { 0 })).collect();
    let spaced = Duration::from_millis(50);
    let (ready, ordered) = rt.block_on(async {
        let as_ready = StreamOpen { order: StreamOrder::AsReady as i32, max_in_flight: 8, ..open("echo") };
        let in_order = StreamOpen { max_in_flight: 8, ..open("echo") };
        let ready = grpc_stream(&gw, as_ready, slow_first.clone(), spaced, None).await.unwrap();
        let ordered = grpc_stream(&gw, in_order, slow_first, spaced, None).await.unwrap();
        (ready, ordered)
    });
    let seqs = |r: &Ran| r.results.iter().map(|r| r.seq).collect::<Vec<_>>();
    assert_eq!(seqs(&ordered), (0..8).collect::<Vec<_>>());
    assert_eq!(ready.results.len(), 8);
    // Which of echo's workers each fast frame lands on is the balancer's
    // choice; those beside the slow one are answered before it.
    assert_ne!(ready.results[0].seq, 0, "as_ready held back later frames: {:?}", seqs(&ready));
    let ws_ready = rt.block_on(async {
        let ws = ws_connect(&ws_url(&gw, "echo", "order=as_ready&max_in_flight=8"), None).await.unwrap();
        // Other values than the gRPC frames' above: the cache would answer those.
        let frames = (0..8)
            .map(|i| {
                let delay = if i == 0 { 600 } else { 0 };
                let frame = json!({"seq": i, "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [i + 100]}],
                                   "parameters": {"delay_ms": delay}});
                Message::Text(frame.to_string().into())
            })
            .collect();
        ws_stream(ws, frames, spaced).await
    });
    // With auth off, a page of another site cannot open a stream; a local one can.
    rt.block_on(async {
        for (origin, refused) in [("https://evil.example", true), ("http://localhost:3000", false)] {
            let mut req = ws_url(&gw, "echo", "").into_client_request().unwrap();
            req.headers_mut().insert("origin", origin.parse().unwrap());
            match tokio_tungstenite::connect_async(req).await {
                Err(tokio_tungstenite::tungstenite::Error::Http(resp)) if refused => assert_eq!(resp.status(), 403),
                Ok(_) if !refused => {}
                other => panic!("{origin}: {:?}", other.map(|_| ())),
            }
        }
    });
    let order: Vec<u64> = ws_ready.0.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(order.len(), 8);
    assert_ne!(order[0], 0, "as_ready held back later frames: {order:?}");
}

#[test]
fn a_slow_model_behind_a_fast_sender_blocks_the_sender_or_drops_the_oldest_frames_and_says_so() {
    let gw = Gateway::start(&format!("[[pools]]\nname = \"echo\"\nclass = \"{ECHO}\"\n")).unwrap();
    let rt = runtime();
    // 100 ms a call, two frames at once: about 20 frames a second.
    let slow = |overflow: StreamOverflow| StreamOpen {
        max_in_flight: 2,
        overflow: overflow as i32,
        parameters: [("delay_ms".to_owned(), int_param(100))].into(),
        ..open("echo")
    };
    // 60 frames of 256 KiB each, sent as fast as the gateway takes them:
    // more than HTTP/2's windows hold, so the sender must wait.
    let big =
        |seq: u64| StreamFrame { seq, inputs: vec![fp32("x", &vec![seq as f32; 64 * 1024])], ..Default::default() };
    let blocked = rt
        .block_on(grpc_stream(&gw, slow(StreamOverflow::Block), (0..60).map(big).collect(), Duration::ZERO, None))
        .unwrap();
    assert!(blocked.ended.is_none(), "{:?}", blocked.ended);
    let seqs: Vec<u64> = blocked.results.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (0..60).collect::<Vec<_>>());
    assert!(
        blocked.results.iter().all(|r| matches!(r.outcome, Some(Outcome::Outputs(_)))),
        "block dropped or failed a frame"
    );
    eprintln!("block: the sender handed over its 60th frame after {:?}", blocked.sent_all_after);
    // At 20 frames a second, 60 frames take 3 s; a sender never held back
    // hands them all over in milliseconds.
    assert!(
        blocked.sent_all_after >= Duration::from_millis(1500),
        "the sender was not held back: {:?}",
        blocked.sent_all_after
    );

    let dropped_before = metric(&gw, "infergate_stream_frames_dropped_total{model=\"echo\",reason=\"overflow\"}");
    let fresh = rt
        .block_on(grpc_stream(
            &gw,
            slow(StreamOverflow::DropOldest),
            (0..60).map(|i| tensor_frame(i, 0)).collect(),
            Duration::ZERO,
            None,
        ))
        .unwrap();
    assert!(fresh.ended.is_none(), "{:?}", fresh.ended);
    let seqs: Vec<u64> = fresh.results.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (0..60).collect::<Vec<_>>(), "every frame reported once, in order");
    let answered: Vec<u64> =
        fresh.results.iter().filter(|r| matches!(r.outcome, Some(Outcome::Outputs(_)))).map(|r| r.seq).collect();
    let dropped: Vec<u64> = fresh
        .results
        .iter()
        .filter(|r| matches!(&r.outcome, Some(Outcome::Dropped(d)) if d.reason == "overflow"))
        .map(|r| r.seq)
        .collect();
    eprintln!("drop_oldest: {} answered, {} dropped", answered.len(), dropped.len());
    assert_eq!(answered.len() + dropped.len(), 60, "a frame neither answered nor dropped");
    assert!(!dropped.is_empty(), "nothing was dropped behind a slow model");
    assert!(answered.contains(&59), "the freshest frame was dropped: answered {answered:?}");
    assert!(answered.contains(&58), "the second freshest frame was dropped: answered {answered:?}");
    let dropped_after = metric(&gw, "infergate_stream_frames_dropped_total{model=\"echo\",reason=\"overflow\"}");
    assert_eq!(dropped_after - dropped_before, dropped.len() as f64);

    // A frame's deadline: frames slower than it fail alone; the stream goes
    // on. Values no earlier frame had, so that none is answered from the cache.
    let hasty = StreamOpen { frame_timeout_ms: 50, ..slow(StreamOverflow::Block) };
    let unseen = |seq: u64| StreamFrame { seq, inputs: vec![fp32("x", &[1000.0 + seq as f32])], ..Default::default() };
    let late = rt.block_on(grpc_stream(&gw, hasty, (0..4).map(unseen).collect(), Duration::ZERO, None)).unwrap();
    assert!(late.ended.is_none(), "{:?}", late.ended);
    assert_eq!(late.results.len(), 4);
    for r in &late.results {
        let Some(Outcome::Error(e)) = &r.outcome else { panic!("a 100 ms frame beat its 50 ms deadline: {r:?}") };
        assert_eq!((e.code, e.r#type.as_str()), (tonic::Code::DeadlineExceeded as i32, "deadline-exceeded"), "{e:?}");
    }

    // The stream's deadline (grpc-timeout): it ends with DEADLINE_EXCEEDED
    // then, whatever its frames.
    let ended = rt.block_on(async {
        let mut client = InferenceClient::connect(gw.grpc_url()).await.unwrap();
        let messages = std::iter::once(Kind::Open(open("echo")))
            .chain((0..1000).map(|i| Kind::Frame(tensor_frame(i, 0))))
            .map(|kind| StreamRequest { kind: Some(kind) });
        let paced = tokio_stream::StreamExt::throttle(futures::stream::iter(messages), Duration::from_millis(20));
        let mut req = tonic::Request::new(paced);
        req.metadata_mut().insert("grpc-timeout", "1500m".parse().unwrap());
        let started = Instant::now();
        let mut results = client.infer_stream(req).await.unwrap().into_inner();
        let mut answered = 0;
        let status = loop {
            match results.message().await {
                Ok(Some(_)) => answered += 1,
                Ok(None) => panic!("the stream outlived its deadline"),
                Err(status) => break status,
            }
        };
        (status, started.elapsed(), answered)
    });
    let (status, after, answered) = ended;
    eprintln!("a 1.5 s stream ended after {after:?} with {answered} results: {status:?}");
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(after >= Duration::from_millis(1400) && after < Duration::from_secs(4), "{after:?}");
    assert!(answered > 10, "{answered}");
}

#[test]
fn a_worker_killed_mid_stream_loses_no_frame_and_the_stream_goes_on() {
    let config = format!("[[pools]]\nname = \"echo\"\nclass = \"{ECHO}\"\nworkers = 2\nidempotent = true\n");
    let gw = Gateway::start(&config).unwrap();
    let victim = gw.worker_pid("echo-1").unwrap();
    let rt = runtime();
    let stream =
        StreamOpen { max_in_flight: 4, parameters: [("delay_ms".to_owned(), int_param(40))].into(), ..open("echo") };
    let ran = rt.block_on(async {
        let run = grpc_stream(
            &gw,
            stream,
            (0..150).map(|i| tensor_frame(i, 0)).collect(),
            Duration::from_micros(33_333),
            None,
        );
        let killer = async {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
        };
        tokio::join!(run, killer).0.unwrap()
    });
    assert!(ran.ended.is_none(), "the stream ended: {:?}", ran.ended);
    let seqs: Vec<u64> = ran.results.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (0..150).collect::<Vec<_>>(), "every frame reported once, in order");
    let failed: Vec<&StreamResult> =
        ran.results.iter().filter(|r| !matches!(r.outcome, Some(Outcome::Outputs(_)))).collect();
    eprintln!("{} of 150 frames failed around the SIGKILL: {failed:?}", failed.len());
    // Only frames in flight on the killed worker may fail (4 at most); the
    // idempotent pool retries them elsewhere.
    assert!(failed.len() <= 4, "{failed:?}");
    for r in &ran.results {
        if let Some(Outcome::Outputs(out)) = &r.outcome {
            assert_eq!(floats(&out.outputs[0]), vec![r.seq as f32], "frame {} got another frame's answer", r.seq);
        }
    }
    assert!(
        ran.results[100..].iter().all(|r| matches!(r.outcome, Some(Outcome::Outputs(_)))),
        "the stream did not go on"
    );
}

#[test]
fn a_client_that_leaves_cancels_its_frames_at_the_worker() {
    let gw = Gateway::start(&format!("[[pools]]\nname = \"echo\"\nclass = \"{ECHO}\"\n")).unwrap();
    let says_stopped = |v: &Value, rid: &str| {
        v["request_id"].as_str().is_some_and(|r| r.starts_with(rid))
            && v["message"].as_str().is_some_and(|m| m.contains("echo stopped early (cancelled)"))
    };
    let rt = runtime();
    rt.block_on(async {
        // gRPC: a frame of 5 s of work, then the client drops the call.
        let mut client = InferenceClient::connect(gw.grpc_url()).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel::<StreamRequest>(4);
        let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        req.metadata_mut().insert("x-request-id", "gone-stream-grpc".parse().unwrap());
        tx.send(StreamRequest { kind: Some(Kind::Open(open("echo"))) }).await.unwrap();
        tx.send(StreamRequest { kind: Some(Kind::Frame(tensor_frame(7, 5000))) }).await.unwrap();
        let results = client.infer_stream(req).await.unwrap().into_inner();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let left = Instant::now();
        drop((results, tx));
        while !gw.log().iter().any(|v| says_stopped(v, "gone-stream-grpc:7")) && left.elapsed() < Duration::from_secs(5)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            gw.log().iter().any(|v| says_stopped(v, "gone-stream-grpc:7")),
            "gRPC: not cancelled at the worker:\n{}",
            gw.log_text()
        );
        eprintln!("gRPC stream left: worker stopped {:?} later", left.elapsed());

        // WebSocket: the client closes the socket.
        let mut req = ws_url(&gw, "echo", "").into_client_request().unwrap();
        req.headers_mut().insert("x-request-id", "gone-stream-ws".parse().unwrap());
        let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        let frame = json!({"seq": 9, "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}],
                           "parameters": {"delay_ms": 5000}});
        ws.send(Message::Text(frame.to_string().into())).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let left = Instant::now();
        drop(ws);
        while !gw.log().iter().any(|v| says_stopped(v, "gone-stream-ws:9")) && left.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            gw.log().iter().any(|v| says_stopped(v, "gone-stream-ws:9")),
            "WebSocket: not cancelled at the worker:\n{}",
            gw.log_text()
        );
        eprintln!("WebSocket stream left: worker stopped {:?} later", left.elapsed());
    });
    // Both streams closed.
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&gw, "infergate_streams_open") > 0.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(metric(&gw, "infergate_streams_open"), 0.0);
}

#[test]
fn streams_are_authenticated_rate_limited_and_bounded_and_a_bad_frame_fails_alone() {
    use sha2::Digest;
    let digest = hex::encode(sha2::Sha256::digest(KEY.as_bytes()));
    let config = format!(
        "[auth]\nenabled = true\n[[auth.keys]]\nid = \"cam\"\nsha256 = \"{digest}\"\ntenant = \"t1\"\n\
         [limits.per_key]\nframes_per_second = 10\n\
         [streams]\nmax_open = 2\nidle_timeout = \"1s\"\nmax_in_flight = 8\n\
         [[pools]]\nname = \"echo\"\nclass = \"{ECHO}\"\n"
    );
    let gw = Gateway::start(&config).unwrap();
    let rt = runtime();
    rt.block_on(async {
        // Auth on open, over both edges.
        let refused = grpc_stream(&gw, open("echo"), vec![tensor_frame(0, 0)], Duration::ZERO, None).await;
        assert_eq!(refused.err().map(|s| s.code()), Some(tonic::Code::Unauthenticated));
        match ws_connect(&ws_url(&gw, "echo", ""), None).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
            other => panic!("a WebSocket without a key was not refused: {:?}", other.map(|_| ())),
        }
        let wrong = "infergate.v1, infergate.bearer.ig_wrong-key";
        assert!(ws_connect(&ws_url(&gw, "echo", ""), Some(wrong)).await.is_err());
        // A browser's key comes as a subprotocol.
        let ws =
            ws_connect(&ws_url(&gw, "echo", ""), Some(&format!("infergate.v1, infergate.bearer.{KEY}"))).await.unwrap();
        let one = json!({"seq": 1, "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]});
        let (results, code) = ws_stream(ws, vec![Message::Text(one.to_string().into())], Duration::ZERO).await;
        assert_eq!(code, Some(1000));
        assert_eq!(results.len(), 1);
        assert_eq!(results[0]["outputs"][0]["data"], json!([1.0]), "{results:?}");

        // A bad frame fails alone, with its sequence number.
        tokio::time::sleep(Duration::from_secs(1)).await; // the rate refills
        let mut bad = tensor_frame(1, 0);
        bad.inputs[0].shape = vec![2]; // one value for two elements
        let not_an_image = StreamFrame { seq: 2, image: b"not a jpeg".to_vec(), ..Default::default() };
        let frames = vec![tensor_frame(0, 0), bad, not_an_image, tensor_frame(3, 0)];
        let ran = grpc_stream(&gw, open("echo"), frames, Duration::ZERO, Some(KEY)).await.unwrap();
        assert!(ran.ended.is_none(), "{:?}", ran.ended);
        let outcome = |i: usize| ran.results[i].outcome.clone().unwrap();
        assert_eq!(ran.results.iter().map(|r| r.seq).collect::<Vec<_>>(), [0, 1, 2, 3]);
        assert!(matches!(outcome(0), Outcome::Outputs(_)));
        let Outcome::Error(e) = outcome(1) else { panic!("{:?}", outcome(1)) };
        assert_eq!(e.code, tonic::Code::InvalidArgument as i32);
        assert!(e.message.contains("inputs[0]"), "{e:?}");
        let Outcome::Error(e) = outcome(2) else { panic!("{:?}", outcome(2)) };
        assert_eq!(e.r#type, "unsupported-operation", "echo takes no image: {e:?}");
        assert!(matches!(outcome(3), Outcome::Outputs(_)));

        // 10 frames a second, 10 at once: 30 frames sent at once are answered
        // 10 or so, the rest dropped as rate limited, each reported.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let stream = StreamOpen { max_in_flight: 8, ..open("echo") };
        let ran = grpc_stream(&gw, stream, (0..30).map(|i| tensor_frame(i, 0)).collect(), Duration::ZERO, Some(KEY))
            .await
            .unwrap();
        assert_eq!(ran.results.len(), 30);
        let limited = ran
            .results
            .iter()
            .filter(|r| matches!(&r.outcome, Some(Outcome::Dropped(d)) if d.reason == "rate_limited"))
            .count();
        let answered = ran.results.iter().filter(|r| matches!(r.outcome, Some(Outcome::Outputs(_)))).count();
        eprintln!("frame rate 10/s: {answered} answered, {limited} rate limited of 30 sent at once");
        assert_eq!(answered + limited, 30);
        assert!((10..=12).contains(&answered), "{answered} answered");

        // More frames in flight than streams.max_in_flight allows.
        let greedy = StreamOpen { max_in_flight: 9, ..open("echo") };
        let refused = grpc_stream(&gw, greedy, vec![], Duration::ZERO, Some(KEY)).await;
        assert_eq!(refused.err().map(|s| s.code()), Some(tonic::Code::InvalidArgument));
    });

    // Streams that open and send nothing: two are held (streams.max_open),
    // a third is refused at once, and an ordinary call is served meanwhile;
    // the idle ones are ended after streams.idle_timeout.
    rt.block_on(async {
        let mut client = InferenceClient::connect(gw.grpc_url()).await.unwrap();
        let mut idle = Vec::new();
        for _ in 0..2 {
            let (tx, rx) = tokio::sync::mpsc::channel::<StreamRequest>(1);
            let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
            req.metadata_mut().insert("authorization", format!("Bearer {KEY}").parse().unwrap());
            tx.send(StreamRequest { kind: Some(Kind::Open(open("echo"))) }).await.unwrap();
            let results = client.infer_stream(req).await.unwrap().into_inner();
            idle.push((tx, results, Instant::now()));
        }
        let third = grpc_stream(&gw, open("echo"), vec![], Duration::ZERO, Some(KEY)).await;
        let status = third.err().unwrap();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(status.message().contains("open streams"), "{status:?}");
        let resp = reqwest::Client::new()
            .post(gw.url("/v2/models/echo/infer"))
            .bearer_auth(KEY)
            .json(&json!({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        for (_tx, mut results, opened) in idle {
            let end = results.message().await;
            let status = end.expect_err("an idle stream ended without an error");
            assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
            assert!(status.message().contains("idle"), "{status:?}");
            let after = opened.elapsed();
            assert!(after >= Duration::from_millis(900) && after < Duration::from_secs(5), "ended after {after:?}");
        }
        // A WebSocket that opens and says nothing is closed the same way.
        let ws =
            ws_connect(&ws_url(&gw, "echo", ""), Some(&format!("infergate.v1, infergate.bearer.{KEY}"))).await.unwrap();
        let (mut sink, mut source) = ws.split();
        let opened = Instant::now();
        let mut last_text = None;
        let mut code = None;
        while let Some(msg) = source.next().await {
            match msg.unwrap() {
                Message::Text(t) => last_text = Some(serde_json::from_str::<Value>(t.as_str()).unwrap()),
                Message::Close(f) => {
                    code = f.map(|f| u16::from(f.code));
                    break;
                }
                _ => {}
            }
        }
        let _ = sink.close().await;
        assert_eq!(code, Some(1008));
        assert_eq!(last_text.unwrap()["error"]["type"], "urn:infergate:error:stream-idle");
        assert!(opened.elapsed() < Duration::from_secs(5));
    });
}
