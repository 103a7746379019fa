//! The accept loop both listeners share, and the bounds every client
//! connection lives under: a cap on open connections (in all and per client
//! address), a handshake deadline, a request-head deadline, an idle timeout
//! that HTTP/2 pings do not reset, body deadlines, HTTP/2 stream and reset
//! caps, keepalive pings to find dead peers, and a graceful drain.
//!
//! `axum::serve` has none of these bounds, so the gateway serves its routers
//! through hyper-util's auto (HTTP/1.1 + h2c) connection builder directly,
//! with one task per connection that closes it when a deadline passes
//! ([`watch::ConnState::next`]).

pub mod body;
mod clients;
mod socket;
#[cfg(test)]
mod tests;
mod trim;
pub mod watch;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::body::{BodyLimits, TimedBody};
use self::clients::{Pace, PerClient};
use self::socket::{Dock, Socket, Watched};
use self::watch::{ConnState, InFlight, Next};
use crate::config::ConnLimits;
use crate::policy::PeerAddr;

/// How often refused connections are reported, at most.
const REFUSED_LOG_EVERY: Duration = Duration::from_secs(5);
/// Pause after an accept error that is not the peer's fault (EMFILE, ENFILE,
/// ENOMEM) so the loop does not spin while the process is out of descriptors.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// How long an idle connection told goodbye may take to close: HTTP/2's
/// GOAWAY waits for the client's ping acknowledgement, which a hostile
/// client never sends.
const IDLE_GOODBYE: Duration = Duration::from_secs(1);
/// HTTP/2 streams a client may reset before the server has accepted them
/// (h2's rapid-reset bound; past it the connection gets GOAWAY).
const MAX_PENDING_RESETS: usize = 20;
/// HTTP/2 streams the server may reset for a client's protocol errors
/// before the connection is closed (h2's "made you reset" bound).
const MAX_LOCAL_RESETS: usize = 1024;

/// Serve `app` on `listener` until `stop` is cancelled, then stop accepting
/// and wait for open connections to finish their in-flight requests (HTTP/1.1
/// connections close after their current response; HTTP/2 ones get GOAWAY).
///
/// At most `limits.max_connections` connections are open at once, and at
/// most `limits.max_connections_per_client` from one address; one more is
/// accepted and closed at once (the peer sees the connection reset rather
/// than a hung handshake) and counted in a periodic warning. One address's
/// new connections are served at most `limits.connection_rate_per_client` a
/// second after a short burst: a client that opens hundreds at once (or has
/// hundreds cut at the same deadline and reconnects) waits its turn instead
/// of taking the CPU from everyone else's requests for their set-up.
pub async fn serve(
    name: &'static str,
    listener: TcpListener,
    app: axum::Router,
    limits: ConnLimits,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let limits = Arc::new(limits);
    let builder = Arc::new(builder(&limits));
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let clients = Arc::new(PerClient::default());
    let pace = Pace::new(limits.connection_rate_per_client);
    let mut refused = AtBound::new("connection limit reached; refusing new connections");
    let mut paced = AtBound::new("a client opens connections faster than its rate; pacing them");
    let gauges = Gauges::new(name);
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) if is_peer_error(&e) => continue,
            Err(e) => {
                tracing::error!(listener = name, error = %e, "accept failed; pausing");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refused.record(name, "max_connections", limits.max_connections);
            drop(stream);
            continue;
        };
        let now = Instant::now();
        let (client, start_at) = if limits.trusted_proxies.iter().any(|net| net.contains(&peer.ip())) {
            (None, now)
        } else {
            match clients.clone().try_take(peer.ip(), limits.max_connections_per_client, pace, now) {
                Some((client, start_at)) => (Some(client), start_at),
                None => {
                    refused.record(name, "max_connections_per_client", limits.max_connections_per_client);
                    drop(stream);
                    continue;
                }
            }
        };
        if start_at > now {
            paced.record(name, "connection_rate_per_client", limits.connection_rate_per_client as usize);
        }
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(listener = name, error = %e, "cannot set TCP_NODELAY");
        }
        let conn = Connection {
            builder: builder.clone(),
            limits: limits.clone(),
            app: app.clone(),
            peer,
            parked: gauges.parked.clone(),
        };
        let open = Counted::new(&gauges.open);
        let stop = stop.clone();
        tokio::spawn(async move {
            // A paced connection waits unread (its deadlines start once it
            // is served), holding its slots.
            tokio::select! {
                () = tokio::time::sleep_until(start_at) => conn.run(name, stream, stop).await,
                () = stop.cancelled() => {}
            }
            drop((slot, client, open));
        });
    }
    drop(listener);
    let open = limits.max_connections - slots.available_permits();
    tracing::debug!(listener = name, open, "listener closed; draining connections");
    // Every connection holds a slot until it has closed.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = slots.acquire_many(all).await;
    Ok(())
}

fn builder(limits: &ConnLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // The connection's own task bounds heads (handshake and header
        // timeouts) and idle keep-alive separately; hyper has one timer for both.
        .header_read_timeout(None);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
        .max_local_error_reset_streams(MAX_LOCAL_RESETS)
        .keep_alive_interval(limits.keepalive_interval)
        .keep_alive_timeout(limits.keepalive_timeout)
        .enable_connect_protocol();
    builder
}

/// One accepted client connection.
struct Connection {
    builder: Arc<auto::Builder<TokioExecutor>>,
    limits: Arc<ConnLimits>,
    app: axum::Router,
    peer: SocketAddr,
    /// Counts the connection while it waits without hyper.
    parked: metrics::Gauge,
}

/// A listener's connection gauges.
struct Gauges {
    open: metrics::Gauge,
    parked: metrics::Gauge,
}

impl Gauges {
    fn new(listener: &'static str) -> Self {
        use crate::telemetry::metrics::{CONNECTIONS_OPEN, CONNECTIONS_PARKED};
        Self {
            open: metrics::gauge!(CONNECTIONS_OPEN, "listener" => listener),
            parked: metrics::gauge!(CONNECTIONS_PARKED, "listener" => listener),
        }
    }
}

/// One unit of a gauge while it lives.
struct Counted(metrics::Gauge);

impl Counted {
    fn new(gauge: &metrics::Gauge) -> Self {
        gauge.increment(1.0);
        Self(gauge.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// hyper serving one connection, boxed so that a parked connection's task
/// does not keep room for it.
type Served<'a> = Pin<
    Box<
        auto::UpgradeableConnection<
            'a,
            TokioIo<Watched<TcpStream>>,
            hyper_util::service::TowerToHyperService<Tracked>,
            TokioExecutor,
        >,
    >,
>;

impl Connection {
    /// Serve the connection until it ends, closing it when a deadline passes
    /// and saying goodbye when the listener stops. A connection waits
    /// readable before hyper is given it, and an idle HTTP/1.1 one goes back
    /// to waiting (parked, see `socket`) without hyper's buffers.
    async fn run(self, name: &'static str, stream: TcpStream, stop: CancellationToken) {
        let state = ConnState::new();
        let dock = Arc::new(Dock::default());
        let mut parked = Some((Socket::new(stream), Counted::new(&self.parked)));
        let mut served: Option<Served<'_>> = None;
        let mut stopping = false;
        // Set once the connection was told to end: it closes by then at the latest.
        let mut closing_by: Option<Instant> = None;
        loop {
            let wait = match state.next(&self.limits, Instant::now()) {
                Next::Close(why) => {
                    tracing::debug!(listener = name, peer = %self.peer, why, "closing connection");
                    return;
                }
                // A parked connection has nothing in flight and nothing to say.
                Next::Goodbye { .. } if served.is_none() => return,
                Next::Goodbye { why, idle } => {
                    if closing_by.is_none()
                        && let Some(conn) = served.as_mut()
                    {
                        tracing::debug!(listener = name, peer = %self.peer, why, "ending connection");
                        conn.as_mut().graceful_shutdown();
                        // Requests in flight get a body's time to finish; an
                        // idle connection only the GOAWAY exchange.
                        let grace = if idle { IDLE_GOODBYE } else { self.limits.body_timeout };
                        closing_by = Some(Instant::now() + grace);
                    }
                    closing_by
                }
                Next::Wait(at) => at,
            };
            let sleep = async {
                match wait {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            if let Some((socket, _)) = parked.as_ref() {
                tokio::select! {
                    readable = socket.io().readable() => {
                        if readable.is_err() {
                            return;
                        }
                        if let Some((socket, _)) = parked.take() {
                            served = Some(self.serve(socket, &state, &dock));
                        }
                    }
                    () = sleep => {}
                    () = state.changed() => {}
                    () = stop.cancelled() => return,
                }
                continue;
            }
            let Some(conn) = served.as_mut() else { return };
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(listener = name, error = %e, "connection ended with an error");
                    }
                    // Dropping hyper's connection docks the socket if it parked.
                    served = None;
                    if state.is_upgraded() {
                        // The socket lives on in the upgraded protocol's
                        // handler (a WebSocket): the connection keeps its
                        // slots until that closes it.
                        while !state.is_socket_closed() {
                            tokio::select! {
                                () = state.changed() => {}
                                () = stop.cancelled() => return,
                            }
                        }
                        return;
                    }
                    parked = dock
                        .take()
                        .filter(|_| !stopping && closing_by.is_none())
                        .map(|socket| (socket, Counted::new(&self.parked)));
                    if parked.is_none() {
                        return;
                    }
                    trim::parked();
                }
                () = sleep => {
                    if closing_by.is_some_and(|by| Instant::now() >= by) {
                        tracing::debug!(listener = name, peer = %self.peer, "connection still busy after goodbye; closing");
                        return;
                    }
                }
                () = state.changed() => {}
                // Shutdown's own grace bounds how long the rest may take.
                () = stop.cancelled(), if !stopping => {
                    stopping = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }

    /// A new hyper connection for `socket`.
    fn serve(&self, socket: Socket<TcpStream>, state: &Arc<ConnState>, dock: &Arc<Dock<TcpStream>>) -> Served<'_> {
        let body = BodyLimits { timeout: self.limits.body_timeout, min_rate: self.limits.min_body_rate };
        let service = Tracked { app: self.app.clone(), peer: self.peer, state: state.clone(), body };
        let io = TokioIo::new(Watched::new(socket, state.clone(), dock.clone()));
        Box::pin(
            self.builder.serve_connection_with_upgrades(io, hyper_util::service::TowerToHyperService::new(service)),
        )
    }
}

/// The connection's service: the router, with each request marked in
/// flight until its answer ends, its body under [`BodyLimits`], and its
/// TCP peer in its extensions (client addressing, limits).
#[derive(Clone)]
struct Tracked {
    app: axum::Router,
    peer: SocketAddr,
    state: Arc<ConnState>,
    body: BodyLimits,
}

impl tower::Service<http::Request<Incoming>> for Tracked {
    type Response = http::Response<Answer>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Incoming>) -> Self::Future {
        let in_flight = self.state.start();
        let why = match self.state.latest_head_ambiguous() {
            true => Some("both Content-Length and Transfer-Encoding"),
            false => ambiguous_framing(&req),
        };
        if let Some(why) = why {
            // The connection cannot be trusted to be where the client thinks:
            // answer once and close it, reading nothing more from it.
            self.state.doom();
            let mut resp = crate::error::GatewayError::invalid("headers", why).into_http(None);
            resp.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
            return Box::pin(std::future::ready(Ok(resp.map(|body| Answer { body, _in_flight: in_flight }))));
        }
        let limits = match body::STREAMING_PATHS.contains(&req.uri().path()) {
            true => BodyLimits::UNBOUNDED,
            false => self.body,
        };
        let mut req = req.map(|b| TimedBody::new(b, limits, self.state.clone()));
        req.extensions_mut().insert(PeerAddr(self.peer));
        let answer = tower::Service::call(&mut self.app, req);
        let state = self.state.clone();
        Box::pin(async move {
            let resp = answer.await?;
            if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                state.upgrade();
            }
            Ok(resp.map(|body| Answer { body, _in_flight: in_flight }))
        })
    }
}

/// Why an HTTP/1.1 request's body framing could be read two ways (by a
/// proxy in front and by the gateway: request smuggling), if it could.
///
/// hyper already answers 400 to a `Transfer-Encoding` whose last coding is
/// not `chunked` and to differing `Content-Length`s. It reads a request
/// with both headers by its `Transfer-Encoding` alone, dropping the
/// `Content-Length` before the service sees it: the socket's watch
/// ([`ConnState::latest_head_ambiguous`]) sees those. What is left is a
/// chain of codings (`identity, chunked`, or `chunked` on two lines), which
/// a proxy may read otherwise: refused here.
fn ambiguous_framing<B>(req: &http::Request<B>) -> Option<&'static str> {
    if req.version() >= http::Version::HTTP_2 {
        return None;
    }
    let mut te = req.headers().get_all(http::header::TRANSFER_ENCODING).iter();
    match (te.next(), te.next()) {
        (Some(only), None) if only.as_bytes().eq_ignore_ascii_case(b"chunked") => None,
        (None, _) => None,
        _ => Some("Transfer-Encoding other than a single `chunked`"),
    }
}

/// A response body that keeps its request in flight until it ends.
pub struct Answer {
    body: Body,
    _in_flight: InFlight,
}

impl http_body::Body for Answer {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Errors that concern one peer, not the listener: try the next connection.
fn is_peer_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(e.kind(), ConnectionRefused | ConnectionAborted | ConnectionReset)
}

/// Counts connections refused (or paced) at a bound and warns about them at
/// most every [`REFUSED_LOG_EVERY`], so a flood cannot flood the log too.
struct AtBound {
    what: &'static str,
    since_log: u64,
    last_log: Option<Instant>,
}

impl AtBound {
    fn new(what: &'static str) -> Self {
        Self { what, since_log: 0, last_log: None }
    }

    fn record(&mut self, name: &'static str, bound: &'static str, max: usize) {
        self.since_log += 1;
        let now = Instant::now();
        if self.last_log.is_none_or(|t| now.duration_since(t) >= REFUSED_LOG_EVERY) {
            tracing::warn!(listener = name, connections = self.since_log, bound, max, "{}", self.what);
            self.since_log = 0;
            self.last_log = Some(now);
        }
    }
}
