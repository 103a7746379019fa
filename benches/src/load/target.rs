//! Where requests go: HTTP/1.1 or HTTP/2 (h2c) with a pooled hyper client,
//! or gRPC with a tonic client; every outcome is classified for the report.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use infergate::proto::inference_client::InferenceClient;
use infergate::proto::oip::grpc_inference_service_client::GrpcInferenceServiceClient;
use infergate::proto::worker_client::WorkerClient;
use infergate::proto::{EmbedBatchRequest, InferBatchRequest, InferItem};
use tonic::transport::Channel;

use super::bodies::Payload;

/// Wire protocol of a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Protocol {
    Http1,
    Http2,
    /// The gateway's public `Inference` service.
    Grpc,
    /// A worker's `Worker` service directly (batches of one), to measure
    /// what the gateway adds in front of the same worker.
    GrpcWorker,
    /// Open Inference Protocol v2 over gRPC (`ModelInfer`, raw contents).
    GrpcOip,
}

/// How one request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// An HTTP status other than 2xx, or a gRPC code name.
    Status(String),
    /// No answer within the request timeout.
    Timeout,
    /// Connection or protocol failure.
    Transport,
}

impl Outcome {
    /// The key under which the report counts this outcome.
    pub fn key(&self) -> String {
        match self {
            Self::Ok => "ok".into(),
            Self::Status(s) => s.clone(),
            Self::Timeout => "timeout".into(),
            Self::Transport => "transport".into(),
        }
    }
}

/// A configured target.
#[expect(clippy::large_enum_variant, reason = "built once per run and shared behind an Arc")]
pub enum Target {
    Http {
        client: Client<HttpConnector, Full<Bytes>>,
        uri: http::Uri,
        headers: http::HeaderMap,
        /// A status to count as a success (e.g. 401 when measuring refusals).
        expect: Option<http::StatusCode>,
    },
    Grpc {
        client: InferenceClient<Channel>,
    },
    GrpcWorker {
        client: WorkerClient<Channel>,
    },
    GrpcOip {
        client: GrpcInferenceServiceClient<Channel>,
    },
}

impl Target {
    /// Build a client for `url`; gRPC connects lazily over one HTTP/2 connection.
    pub fn new(protocol: Protocol, url: &str) -> anyhow::Result<Self> {
        let uri: http::Uri = url.parse()?;
        Ok(match protocol {
            Protocol::Http1 | Protocol::Http2 => {
                let mut connector = HttpConnector::new();
                connector.set_nodelay(true);
                let client = Client::builder(TokioExecutor::new())
                    .http2_only(protocol == Protocol::Http2)
                    .pool_max_idle_per_host(usize::MAX)
                    .build(connector);
                Self::Http { client, uri, headers: http::HeaderMap::new(), expect: None }
            }
            Protocol::Grpc | Protocol::GrpcWorker | Protocol::GrpcOip => {
                let channel = tonic::transport::Endpoint::from(uri).tcp_nodelay(true).connect_lazy();
                match protocol {
                    Protocol::Grpc => {
                        Self::Grpc { client: InferenceClient::new(channel).max_decoding_message_size(64 << 20) }
                    }
                    Protocol::GrpcWorker => {
                        Self::GrpcWorker { client: WorkerClient::new(channel).max_decoding_message_size(64 << 20) }
                    }
                    _ => Self::GrpcOip {
                        client: GrpcInferenceServiceClient::new(channel)
                            .max_decoding_message_size(64 << 20)
                            .max_encoding_message_size(64 << 20),
                    },
                }
            }
        })
    }

    /// Send `headers` with every HTTP request (e.g. credentials); gRPC
    /// targets refuse them.
    pub fn with_headers(mut self, extra: http::HeaderMap) -> anyhow::Result<Self> {
        match &mut self {
            Self::Http { headers, .. } => headers.extend(extra),
            _ if extra.is_empty() => {}
            _ => anyhow::bail!("--header is supported for HTTP targets only"),
        }
        Ok(self)
    }

    /// Count answers with `status` as successes: the latency of refusals is
    /// what a rejection benchmark measures. HTTP targets only.
    pub fn expecting(mut self, status: http::StatusCode) -> anyhow::Result<Self> {
        match &mut self {
            Self::Http { expect, .. } => *expect = Some(status),
            _ => anyhow::bail!("--expect-status is supported for HTTP targets only"),
        }
        Ok(self)
    }

    /// Send request number `i` and wait for the whole answer.
    pub async fn send(&self, payload: &Payload, i: u64, timeout: Duration) -> Outcome {
        match tokio::time::timeout(timeout, self.send_inner(payload, i)).await {
            Ok(outcome) => outcome,
            Err(_) => Outcome::Timeout,
        }
    }

    async fn send_inner(&self, payload: &Payload, i: u64) -> Outcome {
        match self {
            Self::Http { client, uri, headers, expect } => {
                let Ok(mut req) = http::Request::post(uri.clone())
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(Full::new(payload.http_body(i)))
                else {
                    return Outcome::Transport;
                };
                req.headers_mut().extend(headers.clone());
                match client.request(req).await {
                    Ok(resp) => {
                        let status = resp.status();
                        // Read the whole body: the latency is the full answer's.
                        if resp.into_body().collect().await.is_err() {
                            return Outcome::Transport;
                        }
                        if status.is_success() || Some(status) == *expect {
                            Outcome::Ok
                        } else {
                            Outcome::Status(status.as_u16().to_string())
                        }
                    }
                    Err(_) => Outcome::Transport,
                }
            }
            Self::Grpc { client } => {
                let mut client = client.clone();
                let result = if let Some(req) = payload.grpc_embed(i) {
                    client.embed(req).await.map(|_| ())
                } else if let Some(req) = payload.grpc_infer() {
                    client.infer(req.clone()).await.map(|_| ())
                } else {
                    return Outcome::Status("no-grpc-payload".into());
                };
                grpc_outcome(result)
            }
            Self::GrpcWorker { client } => {
                let mut client = client.clone();
                let result = if let Some(req) = payload.grpc_embed(i) {
                    let req = EmbedBatchRequest { model: req.model, texts: req.inputs };
                    client.embed(req).await.map(|_| ())
                } else if let Some(req) = payload.grpc_infer() {
                    let item = InferItem {
                        id: req.id.clone(),
                        inputs: req.inputs.clone(),
                        outputs: req.outputs.clone(),
                        parameters: req.parameters.clone(),
                    };
                    client.infer(InferBatchRequest { model: req.model.clone(), items: vec![item] }).await.map(|_| ())
                } else {
                    return Outcome::Status("no-grpc-payload".into());
                };
                grpc_outcome(result)
            }
            Self::GrpcOip { client } => {
                let Some(req) = payload.oip_infer() else {
                    return Outcome::Status("no-grpc-payload".into());
                };
                grpc_outcome(client.clone().model_infer(req.clone()).await.map(|_| ()))
            }
        }
    }
}

fn grpc_outcome(result: Result<(), tonic::Status>) -> Outcome {
    match result {
        Ok(()) => Outcome::Ok,
        Err(s) if s.code() == tonic::Code::Unavailable && s.message().contains("transport") => Outcome::Transport,
        Err(s) => Outcome::Status(format!("grpc:{:?}", s.code())),
    }
}
