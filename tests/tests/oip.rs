//! The Open Inference Protocol v2 surface end to end: every datatype round
//! trips through a real worker, shapes are checked, requested outputs and
//! request ids are honoured, versions resolve, errors carry `error`.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use infergate_e2e::Gateway;
use serde_json::{Value, json};

const POOLS: &str = "[[pools]]\nname = \"echo\"\nclass = \"infergate_worker.examples.echo:Echo\"\n\
                     [[pools]]\nname = \"sentiment\"\nclass = \"infergate_worker.examples.sentiment:Sentiment\"\n";

fn post(gw: &Gateway, path: &str, body: &Value) -> (u16, Value) {
    let resp = reqwest::blocking::Client::new().post(gw.url(path)).json(body).send().unwrap();
    (resp.status().as_u16(), resp.json().unwrap())
}

fn get(gw: &Gateway, path: &str) -> (u16, Value) {
    let resp = reqwest::blocking::get(gw.url(path)).unwrap();
    (resp.status().as_u16(), resp.json().unwrap())
}

#[test]
fn oip_v2_round_trips_every_datatype_and_honours_shapes_outputs_ids_and_versions() {
    let gw = Gateway::start(POOLS).unwrap();
    let inputs = json!([
        {"name": "bool", "datatype": "BOOL", "shape": [2], "data": [true, false]},
        {"name": "int8", "datatype": "INT8", "shape": [2], "data": [-128, 127]},
        {"name": "int16", "datatype": "INT16", "shape": [2], "data": [-32768, 32767]},
        {"name": "int32", "datatype": "INT32", "shape": [2], "data": [-2147483648i64, 2147483647]},
        {"name": "int64", "datatype": "INT64", "shape": [2], "data": [i64::MIN, i64::MAX]},
        {"name": "uint8", "datatype": "UINT8", "shape": [2], "data": [0, 255]},
        {"name": "uint16", "datatype": "UINT16", "shape": [2], "data": [0, 65535]},
        {"name": "uint32", "datatype": "UINT32", "shape": [2], "data": [0, 4294967295u64]},
        {"name": "uint64", "datatype": "UINT64", "shape": [2], "data": [0, u64::MAX]},
        {"name": "fp16", "datatype": "FP16", "shape": [2], "data": [1.5, -2.25]},
        {"name": "fp32", "datatype": "FP32", "shape": [2, 2], "data": [0.5, -3.5, 1e-3, 65504.0]},
        {"name": "fp64", "datatype": "FP64", "shape": [2], "data": [0.1, 1e300]},
        {"name": "bytes", "datatype": "BYTES", "shape": [2], "data": ["hi", "thére"]},
    ]);
    let (status, out) = post(&gw, "/v2/models/echo/infer", &json!({"id": "req-42", "inputs": inputs}));
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["id"], "req-42");
    assert_eq!(out["model_name"], "echo");
    let outputs = out["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 13);
    for input in inputs.as_array().unwrap() {
        let output = outputs.iter().find(|o| o["name"] == input["name"]).unwrap();
        assert_eq!(output["datatype"], input["datatype"]);
        assert_eq!(output["shape"], input["shape"]);
        if input["datatype"] == "FP32" || input["datatype"] == "FP16" {
            let as_f32 =
                |v: &Value| v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect::<Vec<_>>();
            assert_eq!(as_f32(&output["data"]), as_f32(&input["data"]), "{}", input["name"]);
        } else {
            assert_eq!(output["data"], input["data"], "{}", input["name"]);
        }
    }

    // Only the outputs asked for; an output that does not exist is the caller's error.
    let one = json!({"inputs": [inputs[0].clone(), inputs[1].clone()], "outputs": [{"name": "int8"}]});
    let (status, out) = post(&gw, "/v2/models/echo/infer", &one);
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["outputs"].as_array().unwrap().len(), 1);
    assert_eq!(out["outputs"][0]["name"], "int8");
    let (status, out) =
        post(&gw, "/v2/models/echo/infer", &json!({"inputs": [inputs[0].clone()], "outputs": [{"name": "nope"}]}));
    assert_eq!(status, 400);
    assert!(out["error"].as_str().unwrap().contains("nope"), "{out}");

    // Bad tensors never reach the worker, and the error is OIP's string.
    let bad = [
        json!({"name": "x", "datatype": "FP32", "shape": [3], "data": [1.0, 2.0]}),
        json!({"name": "x", "datatype": "FP8", "shape": [1], "data": [1.0]}),
        json!({"name": "x", "datatype": "UINT8", "shape": [1], "data": [256]}),
        json!({"name": "x", "datatype": "BOOL", "shape": [1], "data": [1]}),
    ];
    for tensor in bad {
        let (status, out) = post(&gw, "/v2/models/echo/infer", &json!({"inputs": [tensor]}));
        assert_eq!(status, 400, "{tensor} -> {out}");
        assert!(out["error"].is_string() && out["error"] == out["detail"], "{out}");
    }

    // Versions: the worker's own version resolves, any other is 404.
    let (status, meta) = get(&gw, "/v2/models/echo/versions/1");
    assert_eq!((status, meta["name"].clone(), meta["versions"].clone()), (200, json!("echo"), json!(["1"])));
    assert_eq!(get(&gw, "/v2/models/echo/versions/1/ready").0, 200);
    let (status, out) = get(&gw, "/v2/models/echo/versions/7");
    assert_eq!(status, 404);
    assert!(out["error"].as_str().unwrap().contains("no version \"7\""), "{out}");
    let (status, out) = post(&gw, "/v2/models/echo/versions/1/infer", &json!({"inputs": [inputs[4].clone()]}));
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["outputs"][0]["data"], inputs[4]["data"]);
    assert_eq!(post(&gw, "/v2/models/echo/versions/7/infer", &json!({"inputs": [inputs[4].clone()]})).0, 404);

    // Server metadata and health.
    let (status, server) = get(&gw, "/v2");
    assert_eq!((status, server["name"].clone()), (200, json!("infergate")));
    assert_eq!(get(&gw, "/v2/health/live").0, 200);
    assert_eq!(get(&gw, "/v2/health/ready").0, 200);
}

#[test]
fn the_sentiment_model_declares_its_tensors_and_classifies_over_oip() {
    let gw = Gateway::start(POOLS).unwrap();
    let (status, meta) = get(&gw, "/v2/models/sentiment");
    assert_eq!(status, 200);
    assert_eq!(meta["platform"], "pytorch");
    assert_eq!(meta["inputs"], json!([{"name": "text", "datatype": "BYTES", "shape": [-1]}]));
    assert_eq!(meta["outputs"][1], json!({"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]}));
    let texts = ["I love this, it works perfectly!", "This is broken and I am angry."];
    let body = json!({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": texts}]});
    let (status, out) = post(&gw, "/v2/models/sentiment/infer", &body);
    assert_eq!(status, 200, "{out}");
    let label = out["outputs"].as_array().unwrap().iter().find(|o| o["name"] == "label").unwrap();
    assert_eq!(label["data"], json!(["positive", "negative"]));
    let probs = out["outputs"].as_array().unwrap().iter().find(|o| o["name"] == "probabilities").unwrap();
    assert_eq!(probs["shape"], json!([2, 2]));
    let p: Vec<f64> = probs["data"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert!((p[0] + p[1] - 1.0).abs() < 1e-4 && p[1] > 0.5 && p[2] > 0.5, "{p:?}");
    // The wrong input name is refused at the edge against the declared inputs.
    let wrong = json!({"inputs": [{"name": "txt", "datatype": "BYTES", "shape": [1], "data": ["x"]}]});
    let (status, out) = post(&gw, "/v2/models/sentiment/infer", &wrong);
    assert_eq!(status, 400);
    assert!(out["error"].as_str().unwrap().contains("has no input \"txt\"; it takes text"), "{out}");
}

fn encode(img: &image::RgbImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

fn send(gw: &Gateway, path: &str, content_type: &str, body: Vec<u8>) -> reqwest::blocking::Response {
    reqwest::blocking::Client::new().post(gw.url(path)).header("content-type", content_type).body(body).send().unwrap()
}

#[test]
fn images_protobuf_and_raw_bodies_are_converted_at_the_edge() {
    use prost::Message;

    let pools = "[[pools]]\nname = \"echo\"\nclass = \"infergate_worker.examples.echo:Echo\"\n\
                 [[pools]]\nname = \"tiny_cnn\"\nclass = \"infergate_worker.examples.tiny_cnn:TinyCNN\"\n\
                 [http]\nmax_image_pixels = 4000000\n";
    let gw = Gateway::start(pools).unwrap();
    let gradient = image::RgbImage::from_fn(300, 200, |x, y| image::Rgb([(x % 256) as u8, (y % 256) as u8, 128]));
    for (format, content_type) in [(image::ImageFormat::Png, "image/png"), (image::ImageFormat::Jpeg, "image/jpeg")] {
        let resp = send(&gw, "/v2/models/tiny_cnn/infer", content_type, encode(&gradient, format));
        assert_eq!(resp.status(), 200, "{content_type}");
        let out: Value = resp.json().unwrap();
        let output =
            |name: &str| out["outputs"].as_array().unwrap().iter().find(|o| o["name"] == name).unwrap().clone();
        // The model saw the tensor its metadata declares, whatever the image's size.
        assert_eq!(output("input_shape")["data"], json!([1, 3, 64, 64]), "{content_type}");
        assert_eq!(output("probabilities")["shape"], json!([1, 10]));
    }
    // Corrupt, oversized (by header) and misdirected images never reach a worker.
    let resp = send(&gw, "/v2/models/tiny_cnn/infer", "image/jpeg", b"not a jpeg".to_vec());
    assert_eq!(resp.status(), 400);
    let big = image::RgbImage::new(2001, 2000); // 4,002,000 pixels > 4,000,000
    let resp = send(&gw, "/v2/models/tiny_cnn/infer", "image/png", encode(&big, image::ImageFormat::Png));
    assert_eq!(resp.status(), 413);
    let problem: Value = resp.json().unwrap();
    assert_eq!(problem["type"], "urn:infergate:error:image-too-large");
    let resp = send(&gw, "/v2/models/echo/infer", "image/png", encode(&gradient, image::ImageFormat::Png));
    assert_eq!(resp.status(), 400, "echo declares no image input");
    assert_eq!(send(&gw, "/v2/models/echo/infer", "text/plain", b"x".to_vec()).status(), 415);

    // The public proto message as a body; the answer comes back in kind.
    let req = infergate::proto::InferRequest {
        id: "pb-1".into(),
        inputs: vec![infergate::proto::Tensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![2],
            fp32_contents: vec![1.5, 2.5],
            ..Default::default()
        }],
        ..Default::default()
    };
    let resp = send(&gw, "/v2/models/echo/infer", "application/x-protobuf", req.encode_to_vec());
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/x-protobuf");
    let answer = infergate::proto::InferResponse::decode(resp.bytes().unwrap()).unwrap();
    assert_eq!((answer.id.as_str(), answer.outputs[0].fp32_contents.as_slice()), ("pb-1", &[1.5, 2.5][..]));
    // Raw contents (little-endian values) are read like typed ones; the answer is typed.
    let mut raw = req.clone();
    raw.inputs[0] = infergate::proto::Tensor {
        name: "x".into(),
        datatype: "INT16".into(),
        shape: vec![3],
        raw_contents: [1i16, -2, 300].iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    };
    let resp = send(&gw, "/v2/models/echo/infer", "application/x-protobuf", raw.encode_to_vec());
    assert_eq!(resp.status(), 200);
    let answer = infergate::proto::InferResponse::decode(resp.bytes().unwrap()).unwrap();
    assert_eq!(
        (answer.outputs[0].int64_contents.as_slice(), answer.outputs[0].raw_contents.len()),
        (&[1, -2, 300][..], 0)
    );
    raw.inputs[0].raw_contents.pop();
    let resp = send(&gw, "/v2/models/echo/infer", "application/x-protobuf", raw.encode_to_vec());
    assert_eq!(resp.status(), 400);
    let problem: Value = resp.json().unwrap();
    assert!(problem["detail"].as_str().unwrap().contains("not a whole number of 2-byte INT16 values"), "{problem}");

    // Raw bytes pass through as one BYTES element.
    let resp = send(&gw, "/v2/models/echo/infer", "application/octet-stream", b"raw bytes here".to_vec());
    assert_eq!(resp.status(), 200);
    let out: Value = resp.json().unwrap();
    assert_eq!(out["outputs"][0]["datatype"], "BYTES");
    assert_eq!(out["outputs"][0]["data"], json!(["raw bytes here"]));
}

#[test]
fn openapi_json_is_a_valid_openapi_3_1_document_of_the_running_gateway() {
    let gw = Gateway::start("[[pools]]\nname = \"echo\"\nclass = \"infergate_worker.examples.echo:Echo\"\n").unwrap();
    let resp = reqwest::blocking::get(gw.url("/openapi.json")).unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let doc = resp.text().unwrap();
    // Checked by openapi-spec-validator against the OpenAPI 3.1 schema.
    let check = "import json, sys\nfrom openapi_spec_validator import validate\n\
                 doc = json.load(sys.stdin)\nvalidate(doc)\nprint(doc['openapi'], len(doc['paths']))";
    let mut child = std::process::Command::new(infergate_e2e::python())
        .args(["-c", check])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), doc.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "invalid OpenAPI document:\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.starts_with("3.1"), "{stdout}");
}

/// Run one of the `tests/clients` scripts against `gw` with `args`; it
/// prints `ok` when every check in it held.
fn client_script(gw: &Gateway, script: &str, args: &[&str]) {
    gw.wait_ready(std::time::Duration::from_secs(120)).unwrap();
    let out = std::process::Command::new(infergate_e2e::python())
        .arg(infergate_e2e::root().join("tests/clients").join(script))
        .args(args)
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    assert!(out.status.success(), "{}\n{}\n{}", text(&out.stdout), text(&out.stderr), gw.log_text());
    assert_eq!(text(&out.stdout).trim(), "ok");
}

/// `tritonclient.http` as its users run it: binary tensors both ways by
/// default, JSON when asked, every datatype compared with numpy.
#[test]
fn tritonclient_http_works_with_its_defaults_binary_both_ways_and_with_json() {
    let gw = Gateway::start(POOLS).unwrap();
    let authority = gw.url("").trim_start_matches("http://").trim_end_matches('/').to_owned();
    client_script(&gw, "triton_http.py", &[&authority]);
}

/// `tritonclient.grpc` (OIP v2 over gRPC) as its users run it: health and
/// metadata, raw tensors of every datatype both ways, typed contents,
/// requested outputs, an unknown model and a deadline with their codes.
#[test]
fn tritonclient_grpc_works_with_raw_and_typed_tensors_and_gets_the_right_codes() {
    let gw = Gateway::start(POOLS).unwrap();
    let authority = gw.grpc_url().trim_start_matches("http://").to_owned();
    client_script(&gw, "triton_grpc.py", &["open", &authority]);
}

/// OIP over gRPC is held to the same auth and limits as every other call:
/// liveness is public, inference needs a key and counts against its limit.
#[test]
fn tritonclient_grpc_is_held_to_auth_and_limits() {
    use sha2::Digest;
    let key = "ig_e2e-oip-grpc-key-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    let digest = hex::encode(sha2::Sha256::digest(key.as_bytes()));
    let gw = Gateway::start(&format!(
        "[auth]\nenabled = true\n[[auth.keys]]\nid = \"k\"\nsha256 = \"{digest}\"\ntenant = \"t\"\n\
         [limits]\nper_key = {{ rate = 0.001, burst = 3 }}\n{POOLS}"
    ))
    .unwrap();
    let authority = gw.grpc_url().trim_start_matches("http://").to_owned();
    client_script(&gw, "triton_grpc.py", &["guarded", &authority, key, "3"]);
}

/// POST an OIP binary-extension body: `header` as JSON, then `binary`.
fn post_binary(gw: &Gateway, header: &Value, binary: &[u8]) -> reqwest::blocking::Response {
    let head = header.to_string();
    let mut body = head.clone().into_bytes();
    body.extend_from_slice(binary);
    reqwest::blocking::Client::new()
        .post(gw.url("/v2/models/echo/infer"))
        .header("inference-header-content-length", head.len().to_string())
        .body(body)
        .send()
        .unwrap()
}

/// A binary body whose sizes disagree with its shapes is a 400 naming the
/// input, before anything reaches the worker.
#[test]
fn binary_tensors_whose_sizes_disagree_with_their_shape_are_refused_naming_the_input() {
    let gw = Gateway::start(POOLS).unwrap();
    let send = |header: &Value, binary: &[u8]| {
        let resp = post_binary(&gw, header, binary);
        (resp.status().as_u16(), resp.json::<Value>().unwrap_or_default())
    };
    let input = |shape: Value, datatype: &str, size: usize| {
        json!({"inputs": [{"name": "x", "shape": shape, "datatype": datatype,
                           "parameters": {"binary_data_size": size}}]})
    };
    // 3 FP32 values are 12 bytes, not 8.
    let (status, p) = send(&input(json!([3]), "FP32", 8), &[0; 8]);
    assert_eq!(status, 400, "{p}");
    assert_eq!(p["field"], "inputs[0].parameters.binary_data_size", "{p}");
    assert!(p["detail"].as_str().unwrap().contains("input \"x\": shape [3] of FP32 needs 12 bytes"), "{p}");
    // A size past the end of the body.
    let (status, p) = send(&input(json!([1_000_000]), "FP32", 4_000_000), &[0; 16]);
    assert_eq!(status, 400, "{p}");
    assert!(p["detail"].as_str().unwrap().contains("says 4000000 bytes; 16 are left"), "{p}");
    // BYTES elements whose lengths run past their data.
    let mut bytes = 2u32.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"hi");
    bytes.extend_from_slice(&1000u32.to_le_bytes());
    let (status, p) = send(&input(json!([2]), "BYTES", bytes.len()), &bytes);
    assert_eq!(status, 400, "{p}");
    assert!(p["detail"].as_str().unwrap().contains("element 1 says 1000 bytes"), "{p}");
    // Bytes left over after every input took its share.
    let (status, p) = send(&input(json!([1]), "FP32", 4), &[0; 12]);
    assert_eq!(status, 400, "{p}");
    assert!(p["detail"].as_str().unwrap().contains("8 bytes follow the inputs' binary data"), "{p}");
    // A header length past the body.
    let resp = reqwest::blocking::Client::new()
        .post(gw.url("/v2/models/echo/infer"))
        .header("inference-header-content-length", "999")
        .body("{}")
        .send()
        .unwrap();
    assert_eq!(resp.status(), 400);
    // And a good one answers, in binary when asked.
    let mut good = input(json!([2]), "FP32", 8);
    good["parameters"] = json!({"binary_data_output": true});
    let resp = post_binary(&gw, &good, &[0, 0, 0x80, 0x3f, 0, 0, 0, 0x40]);
    assert_eq!(resp.status(), 200);
    let length: usize = resp.headers()["inference-header-content-length"].to_str().unwrap().parse().unwrap();
    let answer = resp.bytes().unwrap();
    let (json_part, binary) = answer.split_at(length);
    let header: Value = serde_json::from_slice(json_part).unwrap();
    assert_eq!(header["outputs"][0]["parameters"]["binary_data_size"], 8, "{header}");
    assert!(header["outputs"][0].get("data").is_none(), "{header}");
    assert_eq!(binary, [0, 0, 0x80, 0x3f, 0, 0, 0, 0x40]);
}
