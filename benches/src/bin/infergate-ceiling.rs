//! The ceiling for the `tiny` scenario: a bare axum (hyper) server that
//! answers `POST /v2/models/{model}/infer` the way the echo model does
//! (outputs = inputs, as an Open Inference Protocol JSON answer), with no
//! worker, no policy, no limits and no metrics. What one core does with
//! HTTP/1.1 and JSON alone; the gateway's `tiny` knee is reported as a share
//! of it.
//!
//! `infergate-ceiling --listen 127.0.0.1:PORT`

use std::net::SocketAddr;

use axum::Json;
use axum::extract::Path;
use axum::http::StatusCode;
use axum::routing::{get, post};
use clap::Parser;
use serde_json::{Value, json};

#[derive(Parser)]
#[command(about = "A bare axum server answering OIP infer requests like the echo model")]
struct Cli {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
}

/// The echo model's answer: every input comes back as an output.
async fn infer(Path(model): Path<String>, Json(request): Json<Value>) -> Result<Json<Value>, StatusCode> {
    let inputs = request.get("inputs").and_then(Value::as_array).ok_or(StatusCode::BAD_REQUEST)?;
    let outputs: Vec<Value> = inputs
        .iter()
        .map(|t| json!({"name": t["name"], "datatype": t["datatype"], "shape": t["shape"], "data": t["data"]}))
        .collect();
    Ok(Json(json!({"model_name": model, "model_version": "1", "outputs": outputs})))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let app =
        axum::Router::new().route("/v2/models/{model}/infer", post(infer)).route("/healthz", get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind(cli.listen).await?;
    axum::serve(listener, app).await?;
    Ok(())
}
