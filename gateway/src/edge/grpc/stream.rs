//! `Inference/InferStream`: messages to [`Frame`]s and [`FrameResult`]s to
//! messages; the stream itself runs in the core (`service::stream`).

use std::time::Duration;

use futures::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::super::EdgeState;
use super::super::frames::FrameReader;
use super::call::{ask, fail, respond};
use crate::error::GatewayError;
use crate::proto::stream_request::Kind;
use crate::proto::stream_result::Outcome as Wire;
use crate::proto::{
    StreamDropped, StreamError, StreamOpen, StreamOrder, StreamOutputs, StreamOverflow, StreamRequest, StreamResult,
};
use crate::service::stream::{Frame, FrameResult, Order, Outcome, Overflow, StreamSpec};

pub type Results = futures::stream::BoxStream<'static, Result<StreamResult, Status>>;

/// Open a stream for `req` and run it.
pub(super) async fn open(
    state: &EdgeState,
    req: Request<Streaming<StreamRequest>>,
) -> Result<Response<Results>, Status> {
    let mut ask = ask(state, &req)?;
    let rid = ask.request_id.clone();
    let deadline = super::call::requested_timeout(&req)?;
    let mut incoming = req.into_inner();
    let core = state.core.clone();
    let idle = core.live().streams.idle_timeout;
    let open = match tokio::time::timeout(idle, incoming.message()).await {
        Err(_) => return Err(fail(GatewayError::StreamIdle { after: idle }, &rid)),
        Ok(Err(status)) => return Err(status),
        Ok(Ok(None)) => return Err(Status::invalid_argument("the stream ended before it was opened")),
        Ok(Ok(Some(StreamRequest { kind: Some(Kind::Open(open)) }))) => open,
        Ok(Ok(Some(_))) => {
            let e = GatewayError::invalid("open", "the first message opens the stream (StreamOpen)");
            return Err(fail(e, &rid));
        }
    };
    let StreamOpen { model, parameters, outputs, max_in_flight, order, overflow, frame_timeout_ms } = open;
    let spec = StreamSpec {
        parameters,
        outputs,
        max_in_flight,
        order: match StreamOrder::try_from(order) {
            Ok(StreamOrder::InOrder) => Order::InOrder,
            Ok(StreamOrder::AsReady) => Order::AsReady,
            Err(_) => return Err(fail(GatewayError::invalid("order", format!("unknown order {order}")), &rid)),
        },
        overflow: match StreamOverflow::try_from(overflow) {
            Ok(StreamOverflow::Block) => Overflow::Block,
            Ok(StreamOverflow::DropOldest) => Overflow::DropOldest,
            Ok(StreamOverflow::DropNewest) => Overflow::DropNewest,
            Err(_) => {
                return Err(fail(GatewayError::invalid("overflow", format!("unknown overflow {overflow}")), &rid));
            }
        },
        frame_timeout: (frame_timeout_ms > 0).then(|| Duration::from_millis(frame_timeout_ms.into())),
        deadline,
    };
    ask.model = model;
    let opened = core.open_stream(ask, spec, "grpc").await.map_err(|e| fail(e, &rid))?;
    let reader = FrameReader::new(&opened.entry, state.image);
    let served = opened.served();
    let frames = incoming
        .map(move |msg| match msg {
            Ok(StreamRequest { kind: Some(Kind::Frame(f)) }) => Ok(Frame {
                seq: f.seq,
                timestamp: f.timestamp,
                inputs: reader.inputs(f.inputs, f.image.into()),
                parameters: f.parameters,
            }),
            Ok(_) => Err(GatewayError::invalid("open", "only the first message opens the stream")),
            // The client's side of the call broke: nobody reads on.
            Err(_) => Err(GatewayError::Cancelled),
        })
        .take_until(state.draining.clone().cancelled_owned());
    let results = {
        let rid = rid.clone();
        opened.run(core, frames).map(move |r| r.map(encode).map_err(|e| fail(e, &rid)))
    };
    Ok(respond(results.boxed(), &rid, &served))
}

/// A frame's result as its message.
fn encode(r: FrameResult) -> StreamResult {
    let outcome = match r.outcome {
        Outcome::Answered { version, outputs, parameters } => {
            Wire::Outputs(StreamOutputs { model_version: version, outputs, parameters })
        }
        Outcome::Dropped(reason) => Wire::Dropped(StreamDropped { reason: reason.as_str().to_owned() }),
        Outcome::Failed(e) => {
            let status = Status::from(e.clone());
            Wire::Error(StreamError {
                code: status.code() as i32,
                message: status.message().to_owned(),
                r#type: e.slug().to_owned(),
            })
        }
    };
    StreamResult {
        seq: r.seq,
        timestamp: r.timestamp,
        latency_us: u64::try_from(r.latency.as_micros()).unwrap_or(u64::MAX),
        outcome: Some(outcome),
    }
}
