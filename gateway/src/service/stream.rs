//! Streams of frames: one stream opened once (planned, admitted, counted
//! against `streams.max_open`), then every frame sent on its own through
//! the same path as a single tensor call, so the pools spread a stream's
//! frames over their workers and the batcher batches them with other
//! streams' frames and other calls.
//!
//! Each frame gets exactly one result: the model's answer, its failure
//! (the same error a single call gets; the stream goes on), or a drop with
//! its reason. Everything a stream holds is bounded by its `max_in_flight`:
//! frames at the model, frames waiting to go (as many again), results held
//! back for order. When the window is full the stream stops reading
//! (`block`: the client's writes stall) or drops a waiting frame
//! (`drop_oldest`, `drop_newest`). The gRPC and WebSocket edges only turn
//! messages into [`Frame`]s and [`FrameResult`]s into messages.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::open_streams::OpenSlot;
use super::{Ask, Core, Live, Served};
use crate::call::Deadline;
use crate::error::GatewayError;
use crate::policy::{Admission, FrameLimit};
use crate::proto::{InferItem, ModelEntry, ParamValue, Tensor, TensorSpec};
use crate::route::Plan;
use crate::telemetry::metrics as m;

/// Frames at the model at once when a stream does not say.
pub const DEFAULT_MAX_IN_FLIGHT: u32 = 4;

/// How results come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Order {
    /// In frame order: a result waits for every earlier frame's.
    #[default]
    InOrder,
    /// As soon as each frame is answered.
    AsReady,
}

/// What happens to a frame that arrives while the stream's window is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overflow {
    /// Stop reading until there is room; nothing is dropped.
    #[default]
    Block,
    /// Drop the oldest waiting frame, keep the new one.
    DropOldest,
    /// Drop the new frame.
    DropNewest,
}

/// Why a frame was not sent to the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The overflow policy dropped it.
    Overflow,
    /// The caller's `frames_per_second` was spent.
    RateLimited,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Overflow => "overflow",
            Self::RateLimited => "rate_limited",
        }
    }
}

/// A stream's settings as its client opened it.
#[derive(Debug, Clone, Default)]
pub struct StreamSpec {
    /// Sent with every frame.
    pub parameters: HashMap<String, ParamValue>,
    /// Outputs wanted; empty: all.
    pub outputs: Vec<String>,
    /// 0: [`DEFAULT_MAX_IN_FLIGHT`].
    pub max_in_flight: u32,
    pub order: Order,
    pub overflow: Overflow,
    /// `None`: `streams.frame_timeout`.
    pub frame_timeout: Option<Duration>,
    /// The client's deadline for the whole stream (`grpc-timeout`), within
    /// `streams.max_duration`.
    pub deadline: Option<Duration>,
}

/// A frame's tensors as its edge makes them, or why it cannot (the frame
/// then fails alone). Made only when the frame goes to the model: an image
/// is decoded then, so a frame dropped while it waits costs no more than
/// reading it, and a stream behind its model falls behind by dropping,
/// not by decoding frames it will never send.
pub type Inputs = futures::future::BoxFuture<'static, Result<Vec<Tensor>, GatewayError>>;

/// One frame as an edge read it.
pub struct Frame {
    pub seq: u64,
    pub timestamp: i64,
    pub inputs: Inputs,
    /// This frame's parameters, over the stream's.
    pub parameters: HashMap<String, ParamValue>,
}

/// What became of one frame.
#[derive(Debug)]
pub enum Outcome {
    Answered { version: String, outputs: Vec<Tensor>, parameters: HashMap<String, ParamValue> },
    Failed(GatewayError),
    Dropped(DropReason),
}

/// One frame's result.
#[derive(Debug)]
pub struct FrameResult {
    pub seq: u64,
    pub timestamp: i64,
    /// From the frame's arrival to its result.
    pub latency: Duration,
    pub outcome: Outcome,
}

/// A stream that was planned and admitted: the edge reads [`entry`]
/// (the model's inputs, to convert images) and then [`Opened::run`]s it.
///
/// [`entry`]: Opened::entry
pub struct Opened {
    pub entry: ModelEntry,
    session: Session,
}

/// What every frame of one stream shares.
struct Session {
    ask: Ask,
    /// The inputs the model declares, checked on every frame.
    declared: Arc<[TensorSpec]>,
    plan: Plan,
    live: Arc<Live>,
    spec: StreamSpec,
    window: usize,
    frame_timeout: Duration,
    idle_timeout: Duration,
    /// How long the stream may last, and when that is.
    lasts: Duration,
    ends_at: Instant,
    frames: FrameLimit,
    edge: &'static str,
    /// Held while the stream is open.
    _admission: Admission,
    _slot: OpenSlot,
}

impl Core {
    /// Open a stream of frames to `ask.model` for `edge` (`grpc`,
    /// `websocket`): plan it, admit it as one request (its in-flight limits
    /// count the stream while it is open), and count it against
    /// `streams.max_open`.
    pub async fn open_stream(&self, ask: Ask, spec: StreamSpec, edge: &'static str) -> Result<Opened, GatewayError> {
        let live = self.live();
        let limits = live.streams;
        let window = match spec.max_in_flight {
            0 => DEFAULT_MAX_IN_FLIGHT.min(limits.max_in_flight),
            n if n > limits.max_in_flight => {
                return Err(GatewayError::invalid(
                    "max_in_flight",
                    format!("at most {} frames in flight per stream (streams.max_in_flight)", limits.max_in_flight),
                ));
            }
            n => n,
        } as usize;
        let (plan, entry) = self.plan(&live, &ask)?;
        if entry.info.as_ref().is_some_and(|i| i.kind != crate::proto::ModelKind::Infer as i32) {
            return Err(GatewayError::UnsupportedOperation {
                model: ask.model.clone(),
                operation: "streams of frames",
            });
        }
        let slot = self.open_streams.take(limits.max_open)?;
        let admission = live.policy.admit(&ask.caller, &ask.model, crate::policy::Tokens::NONE).await?;
        let frames = live.policy.frame_limit(&ask.caller, &ask.model);
        let lasts = spec.deadline.map_or(limits.max_duration, |d| d.min(limits.max_duration));
        let declared = entry.info.as_ref().map_or_else(|| Arc::from([]), |i| Arc::from(&i.inputs[..]));
        let session = Session {
            declared,
            frame_timeout: spec.frame_timeout.unwrap_or(limits.frame_timeout),
            idle_timeout: limits.idle_timeout,
            lasts,
            ends_at: Instant::now() + lasts,
            window,
            frames,
            edge,
            ask,
            plan,
            live,
            spec,
            _admission: admission,
            _slot: slot,
        };
        Ok(Opened { entry, session })
    }
}

/// One unit of a gauge while it lives.
struct Counted(metrics::Gauge);

impl Counted {
    fn new(gauge: metrics::Gauge) -> Self {
        gauge.increment(1.0);
        Self(gauge)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// A frame read and not yet sent.
struct Waiting {
    index: u64,
    seq: u64,
    timestamp: i64,
    arrived: Instant,
    inputs: Inputs,
    parameters: HashMap<String, ParamValue>,
}

/// A result waiting for its turn (in order), and whether its frame holds a
/// place in the window.
struct Held {
    result: FrameResult,
    sent: bool,
}

impl Opened {
    /// What the stream goes to first (for the access log and the variant
    /// header); a frame may still fall back to another target.
    pub fn served(&self) -> Served {
        Served::by(self.session.plan.targets[0].clone(), None)
    }

    /// Run the stream over `frames` until they end and every frame is
    /// answered, the client stops reading, or the stream's deadline or
    /// idle timeout passes (the last item is then that error). Results
    /// come out in the order the stream asked for; the returned stream is
    /// bounded, and while nobody reads it the stream stops reading frames.
    pub fn run<S>(self, core: Arc<Core>, frames: S) -> impl Stream<Item = Result<FrameResult, GatewayError>> + use<S>
    where
        S: Stream<Item = Result<Frame, GatewayError>> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(self.session.window.max(1));
        tokio::spawn(self.session.drive(core, frames, tx));
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}

type Out = mpsc::Sender<Result<FrameResult, GatewayError>>;

/// The stream's moving parts while it runs.
struct Flow {
    /// Frames read and not yet sent, oldest first.
    waiting: VecDeque<Waiting>,
    /// In order: results waiting for an earlier frame's, by arrival index.
    held: BTreeMap<u64, Held>,
    /// In order: the arrival index whose result goes out next.
    next_out: u64,
    /// Frames sent whose result has not gone out.
    in_window: usize,
    /// Frames read so far (the next arrival index).
    read: u64,
    /// Results sent out so far.
    answered: u64,
}

impl Session {
    async fn drive<S>(self, core: Arc<Core>, frames: S, tx: Out)
    where
        S: Stream<Item = Result<Frame, GatewayError>> + Send + 'static,
    {
        let model = self.ask.model.clone();
        let _open = Counted::new(metrics::gauge!(m::STREAMS_OPEN, "edge" => self.edge));
        let mut frames = std::pin::pin!(frames);
        let mut running = FuturesUnordered::new();
        let mut flow =
            Flow { waiting: VecDeque::new(), held: BTreeMap::new(), next_out: 0, in_window: 0, read: 0, answered: 0 };
        // Drops and failures held back for order: bounded too, or a client
        // could grow them behind one slow frame.
        let max_held = 4 * self.window + 16;
        let mut reading = true;
        let idle = tokio::time::sleep(self.idle_timeout);
        let ends = tokio::time::sleep_until(self.ends_at);
        tokio::pin!(idle, ends);
        loop {
            while flow.in_window < self.window
                && let Some(w) = flow.waiting.pop_front()
            {
                flow.in_window += 1;
                running.push(self.send(&core, w));
            }
            if !reading && flow.waiting.is_empty() && running.is_empty() && flow.held.is_empty() {
                return;
            }
            let room = match self.spec.overflow {
                Overflow::Block => flow.waiting.len() < self.window,
                Overflow::DropOldest | Overflow::DropNewest => true,
            };
            let can_read = reading && room && flow.held.len() < max_held;
            if !can_read {
                // A stream the gateway is not reading is not idle.
                idle.as_mut().reset(Instant::now() + self.idle_timeout);
            }
            tokio::select! {
                () = tx.closed() => return,
                Some((index, sent, result)) = running.next(), if !running.is_empty() => {
                    if !self.settle(&mut flow, index, sent, result, &tx).await {
                        return;
                    }
                }
                frame = frames.next(), if can_read => match frame {
                    None => reading = false,
                    Some(Err(e)) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                    Some(Ok(frame)) => {
                        idle.as_mut().reset(Instant::now() + self.idle_timeout);
                        metrics::counter!(m::STREAM_FRAMES_RECEIVED, "model" => model.clone()).increment(1);
                        if let Some((index, result)) = self.arrive(&mut flow, frame)
                            && !self.settle(&mut flow, index, false, result, &tx).await
                        {
                            return;
                        }
                    }
                },
                () = &mut idle, if can_read => {
                    let _ = tx.send(Err(GatewayError::StreamIdle { after: self.idle_timeout })).await;
                    return;
                }
                () = &mut ends => {
                    let _ = tx.send(Err(GatewayError::DeadlineExceeded { after: self.lasts })).await;
                    return;
                }
            }
        }
    }

    /// Take in one frame: queue it, or settle it at once (dropped). The
    /// frame, or the one the overflow policy dropped for it, is returned
    /// when settled.
    fn arrive(&self, flow: &mut Flow, frame: Frame) -> Option<(u64, FrameResult)> {
        let index = flow.read;
        flow.read += 1;
        let arrived = Instant::now();
        let settled = |outcome| {
            Some((
                index,
                FrameResult { seq: frame.seq, timestamp: frame.timestamp, latency: arrived.elapsed(), outcome },
            ))
        };
        if let Err(refused) = self.frames.take() {
            tracing::debug!(model = %self.ask.model, seq = frame.seq, error = %refused, "frame dropped");
            return settled(Outcome::Dropped(DropReason::RateLimited));
        }
        let waiting = Waiting {
            index,
            seq: frame.seq,
            timestamp: frame.timestamp,
            arrived,
            inputs: frame.inputs,
            parameters: frame.parameters,
        };
        if flow.waiting.len() < self.window || self.spec.overflow == Overflow::Block {
            flow.waiting.push_back(waiting);
            return None;
        }
        let dropped = match self.spec.overflow {
            Overflow::DropNewest => waiting,
            Overflow::DropOldest | Overflow::Block => {
                flow.waiting.push_back(waiting);
                flow.waiting.pop_front()?
            }
        };
        let result = FrameResult {
            seq: dropped.seq,
            timestamp: dropped.timestamp,
            latency: dropped.arrived.elapsed(),
            outcome: Outcome::Dropped(DropReason::Overflow),
        };
        Some((dropped.index, result))
    }

    /// Make one frame's tensors and send them through the routes, the
    /// cache and the pools, as a single tensor call, with the frame's own
    /// deadline.
    fn send(
        &self,
        core: &Arc<Core>,
        w: Waiting,
    ) -> impl std::future::Future<Output = (u64, bool, FrameResult)> + Send + 'static + use<> {
        let core = core.clone();
        let live = self.live.clone();
        let plan = self.plan.clone();
        let declared = self.declared.clone();
        let budget = (w.arrived + self.frame_timeout).min(self.ends_at).saturating_duration_since(Instant::now());
        let ask = Ask {
            deadline: Deadline::after(budget),
            request_id: format!("{}:{}", self.ask.request_id, w.seq),
            ..self.ask.clone()
        };
        let outputs = self.spec.outputs.clone();
        let parameters = if w.parameters.is_empty() {
            self.spec.parameters.clone()
        } else {
            let mut all = self.spec.parameters.clone();
            all.extend(w.parameters);
            all
        };
        async move {
            let sent = async {
                let inputs = tokio::time::timeout(ask.deadline.remaining(), w.inputs)
                    .await
                    .map_err(|_| GatewayError::DeadlineExceeded { after: ask.deadline.budget })??;
                let item = InferItem { id: String::new(), inputs, outputs, parameters };
                core.send_infer(&live, &plan, &ask, &declared, item).await
            };
            let outcome = match sent.await {
                Ok(((info, out), _, _)) => {
                    Outcome::Answered { version: info.version, outputs: out.tensors, parameters: out.parameters }
                }
                Err(e) => Outcome::Failed(e),
            };
            let result = FrameResult { seq: w.seq, timestamp: w.timestamp, latency: w.arrived.elapsed(), outcome };
            (w.index, true, result)
        }
    }

    /// Put a frame's result out, or hold it until its turn (in order).
    /// False when the client is gone.
    async fn settle(&self, flow: &mut Flow, index: u64, sent: bool, result: FrameResult, tx: &Out) -> bool {
        if self.spec.order == Order::AsReady {
            return self.emit(flow, sent, result, tx).await;
        }
        flow.held.insert(index, Held { result, sent });
        while let Some(held) = flow.held.remove(&flow.next_out) {
            flow.next_out += 1;
            if !self.emit(flow, held.sent, held.result, tx).await {
                return false;
            }
        }
        true
    }

    async fn emit(&self, flow: &mut Flow, sent: bool, result: FrameResult, tx: &Out) -> bool {
        if sent {
            flow.in_window -= 1;
        }
        flow.answered += 1;
        let model = self.ask.model.clone();
        let outcome = match &result.outcome {
            Outcome::Answered { .. } => "answered",
            Outcome::Failed(_) => "failed",
            Outcome::Dropped(reason) => {
                metrics::counter!(m::STREAM_FRAMES_DROPPED, "model" => model.clone(), "reason" => reason.as_str())
                    .increment(1);
                "dropped"
            }
        };
        metrics::counter!(m::STREAM_FRAMES, "model" => model.clone(), "outcome" => outcome).increment(1);
        if sent {
            metrics::histogram!(m::STREAM_FRAME_LATENCY, "model" => model.clone()).record(result.latency.as_secs_f64());
        }
        // Frames read and not yet answered when this result goes out.
        metrics::histogram!(m::STREAM_LAG, "model" => model).record((flow.read - flow.answered) as f64);
        tx.send(Ok(result)).await.is_ok()
    }
}
