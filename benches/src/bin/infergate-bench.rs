//! `infergate-bench`: open- and closed-loop load against HTTP/1.1, HTTP/2 or
//! gRPC targets, with HDR latency percentiles, JSON and Markdown results, and
//! a step mode that finds the knee (highest rate with p99 under an SLO).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use infergate_benches::load::{self, Mode, Payload, Protocol, Report, RunConfig, Target, Texts, Zipf};

#[derive(Parser, Debug)]
#[command(name = "infergate-bench", about = "Load generator for infergate and its baselines")]
struct Args {
    /// Full URL for HTTP (`http://127.0.0.1:8080/v1/embeddings`); `http://host:port` for gRPC.
    #[arg(long, required_unless_present = "print_texts")]
    url: Option<String>,
    /// Print the first N texts of the `unique` generator, one per line, and
    /// exit (the raw-model baseline embeds exactly these).
    #[arg(long, value_name = "N")]
    print_texts: Option<u64>,
    #[arg(long, value_enum, default_value = "http1")]
    protocol: Protocol,
    /// An extra HTTP header for every request, `Name: value` (repeatable).
    #[arg(long = "header", value_name = "NAME: VALUE")]
    headers: Vec<String>,
    /// Count this HTTP status as a success (its latency is recorded), e.g.
    /// 401 or 429 to measure refusals.
    #[arg(long, value_name = "STATUS")]
    expect_status: Option<u16>,
    /// A fixed JSON body to send every time (for gRPC: an OIP infer body, sent as Inference/Infer).
    #[arg(long, conflicts_with = "texts")]
    body_file: Option<PathBuf>,
    /// Generate embeddings requests: `unique` texts or `zipf`-repeated texts.
    #[arg(long, value_parser = ["unique", "zipf"])]
    texts: Option<String>,
    /// Texts per embeddings request.
    #[arg(long, default_value_t = 1)]
    inputs: usize,
    /// Model name in generated requests (and in gRPC infer requests).
    #[arg(long, default_value = "minilm")]
    model: String,
    /// Zipf exponent and number of distinct texts.
    #[arg(long, default_value_t = 1.1)]
    zipf_s: f64,
    #[arg(long, default_value_t = 1000)]
    zipf_n: usize,
    /// Open loop: requests per second.
    #[arg(long, conflicts_with_all = ["concurrency", "step_rates"])]
    rate: Option<f64>,
    /// Closed loop: concurrent clients.
    #[arg(long, conflicts_with = "step_rates")]
    concurrency: Option<usize>,
    /// Step mode: open-loop rates to sweep, e.g. `100,200,400,800`.
    #[arg(long, value_delimiter = ',')]
    step_rates: Vec<f64>,
    /// Step mode: the p99 SLO that defines the knee.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    slo_p99: Duration,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Open loop: most outstanding requests before sends are dropped (and counted).
    #[arg(long, default_value_t = 20_000)]
    max_in_flight: usize,
    /// Name of this run in results (e.g. `infergate`, `fastapi`).
    #[arg(long, default_value = "target")]
    label: String,
    /// Write results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write results as a Markdown table here.
    #[arg(long)]
    md: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

fn payload(args: &Args) -> anyhow::Result<Payload> {
    match (&args.body_file, args.texts.as_deref()) {
        (Some(path), _) => {
            let body = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            Ok(Payload::fixed(body.into(), &args.model))
        }
        (None, Some(kind)) => {
            let texts = if kind == "zipf" { Texts::Zipf(Zipf::new(args.zipf_n, args.zipf_s)) } else { Texts::Unique };
            Ok(Payload::Embed { model: args.model.clone(), inputs: args.inputs.max(1), texts })
        }
        (None, None) => bail!("give --body-file or --texts"),
    }
}

fn write_results(args: &Args, reports: &[Report], extra: Option<serde_json::Value>) -> anyhow::Result<()> {
    if let Some(path) = &args.json {
        let mut doc = serde_json::json!({ "reports": reports });
        if let Some(extra) = extra {
            doc["knee"] = extra;
        }
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)?;
    }
    if let Some(path) = &args.md {
        std::fs::write(path, load::markdown(reports))?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(n) = args.print_texts {
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        for i in 0..n {
            writeln!(out, "{}", load::unique_text(i))?;
        }
        out.flush()?;
        return Ok(());
    }
    let url = args.url.as_deref().context("--url is required")?;
    let mut headers = http::HeaderMap::new();
    for h in &args.headers {
        let (name, value) = h.split_once(':').with_context(|| format!("--header {h:?}: expected `Name: value`"))?;
        headers.append(http::HeaderName::try_from(name.trim())?, http::HeaderValue::try_from(value.trim())?);
    }
    let mut target = Target::new(args.protocol, url)?.with_headers(headers)?;
    if let Some(status) = args.expect_status {
        target = target.expecting(http::StatusCode::from_u16(status)?)?;
    }
    let target = Arc::new(target);
    let payload = Arc::new(payload(&args)?);
    let config = |label: String, mode| RunConfig {
        label,
        mode,
        warmup: args.warmup,
        duration: args.duration,
        timeout: args.timeout,
        max_in_flight: args.max_in_flight,
        progress: !args.quiet,
    };
    let mut reports = Vec::new();
    let mut knee = None;
    if !args.step_rates.is_empty() {
        for rate in &args.step_rates {
            let cfg = config(format!("{}@{rate}", args.label), Mode::Open { rate: *rate });
            let report = load::run(target.clone(), payload.clone(), &cfg).await?;
            eprint!(
                "{}",
                load::markdown(std::slice::from_ref(&report))
                    .lines()
                    .nth(2)
                    .map(|l| format!("{l}\n"))
                    .unwrap_or_default()
            );
            reports.push(report);
        }
        let slo_ms = args.slo_p99.as_secs_f64() * 1000.0;
        knee = Some(match load::knee(&reports, slo_ms) {
            Some(r) => serde_json::json!({ "slo_p99_ms": slo_ms, "rate": r.offered_rps, "p99_ms": r.latency_ms.p99 }),
            None => serde_json::json!({ "slo_p99_ms": slo_ms, "rate": null }),
        });
    } else {
        let mode = match (args.rate, args.concurrency) {
            (Some(rate), _) => Mode::Open { rate },
            (None, Some(concurrency)) => Mode::Closed { concurrency },
            (None, None) => bail!("give --rate (open loop), --concurrency (closed loop) or --step-rates"),
        };
        reports.push(load::run(target, payload, &config(args.label.clone(), mode)).await?);
    }
    write_results(&args, &reports, knee.clone())?;
    let table = load::markdown(&reports);
    #[expect(clippy::print_stdout, reason = "the results table is this tool's output")]
    {
        print!("{table}");
        if let Some(k) = knee {
            println!("\nknee: {k}");
        }
    }
    Ok(())
}
