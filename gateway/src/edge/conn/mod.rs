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
pub mod watch;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
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
use self::watch::{ConnState, InFlight, Next, Watched};
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
        let conn = Connection { builder: builder.clone(), limits: limits.clone(), app: app.clone(), peer };
        let stop = stop.clone();
        tokio::spawn(async move {
            // A paced connection waits unread (its deadlines start once it
            // is served), holding its slots.
            tokio::select! {
                () = tokio::time::sleep_until(start_at) => conn.run(name, stream, stop).await,
                () = stop.cancelled() => {}
            }
            drop((slot, client));
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
}

impl Connection {
    /// Serve the connection until it ends, closing it when a deadline passes
    /// and saying goodbye when the listener stops.
    async fn run(self, name: &'static str, stream: TcpStream, stop: CancellationToken) {
        let state = ConnState::new();
        let body = BodyLimits { timeout: self.limits.body_timeout, min_rate: self.limits.min_body_rate };
        let service = Tracked { app: self.app, peer: self.peer, state: state.clone(), body };
        let io = TokioIo::new(Watched::new(stream, state.clone()));
        let conn =
            self.builder.serve_connection_with_upgrades(io, hyper_util::service::TowerToHyperService::new(service));
        let mut conn = std::pin::pin!(conn);
        let mut stopping = false;
        // Set once the connection was told to end: it closes by then at the latest.
        let mut closing_by: Option<Instant> = None;
        loop {
            let wait = match state.next(&self.limits, Instant::now()) {
                Next::Close(why) => {
                    tracing::debug!(listener = name, peer = %self.peer, why, "closing connection");
                    return;
                }
                Next::Goodbye { why, idle } => {
                    if closing_by.is_none() {
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
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(listener = name, error = %e, "connection ended with an error");
                    }
                    return;
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
        let mut req = req.map(|b| TimedBody::new(b, self.body, self.state.clone()));
        req.extensions_mut().insert(PeerAddr(self.peer));
        let answer = tower::Service::call(&mut self.app, req);
        Box::pin(async move {
            let resp = answer.await?;
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

/// Open connections and connection pacing by client address.
#[derive(Default)]
struct PerClient(Mutex<Clients>);

#[derive(Default)]
struct Clients {
    by_ip: HashMap<IpAddr, Client>,
    /// Takes since addresses with nothing open or due were last swept out.
    since_sweep: u32,
}

struct Client {
    open: usize,
    /// When the address's next connection is due at the sustained rate (the
    /// theoretical arrival time of GCRA); later than now while it is paced.
    due: Instant,
}

/// Sweep idle addresses out of [`Clients`] every this many takes.
const SWEEP_EVERY: u32 = 1024;

/// How fast one address may start connections.
#[derive(Clone, Copy)]
struct Pace {
    every: Duration,
    /// How far ahead of the sustained rate a burst may run: a tenth of a
    /// second's worth of connections, at most 8 (a browser opens 6). Forty
    /// connections let in at once are also cut at once by their deadlines,
    /// and that burst of answers and closes is what others wait behind.
    burst: Duration,
}

impl Pace {
    fn new(per_second: u32) -> Option<Self> {
        let every = Duration::from_secs(1).checked_div(per_second)?;
        Some(Self { every, burst: every * (per_second / 10).clamp(1, 8) })
    }
}

impl PerClient {
    /// A slot for one more connection from `ip`, and when it may be served;
    /// `None` when `ip` holds `max` already.
    fn try_take(
        self: Arc<Self>,
        ip: IpAddr,
        max: usize,
        pace: Option<Pace>,
        now: Instant,
    ) -> Option<(ClientSlot, Instant)> {
        let mut clients = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        clients.since_sweep += 1;
        if clients.since_sweep >= SWEEP_EVERY {
            clients.since_sweep = 0;
            clients.by_ip.retain(|_, c| c.open > 0 || c.due > now);
        }
        let client = clients.by_ip.entry(ip).or_insert(Client { open: 0, due: now });
        if client.open >= max {
            return None;
        }
        client.open += 1;
        let start_at = match pace {
            Some(pace) => {
                let due = client.due.max(now);
                client.due = due + pace.every;
                due.checked_sub(pace.burst).map_or(now, |at| at.max(now))
            }
            None => now,
        };
        drop(clients);
        Some((ClientSlot { clients: self, ip }, start_at))
    }
}

/// One connection of a client; dropping it frees the client's slot.
struct ClientSlot {
    clients: Arc<PerClient>,
    ip: IpAddr,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut clients = self.clients.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = clients.by_ip.get_mut(&self.ip) {
            c.open -= 1;
            // Its pacing outlives its connections while it is ahead of the rate.
            if c.open == 0 && c.due <= Instant::now() {
                clients.by_ip.remove(&self.ip);
            }
        }
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

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    const GET: &[u8] = b"GET /ok HTTP/1.1\r\nHost: t\r\n\r\n";

    async fn start(
        limits: ConnLimits,
    ) -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<std::io::Result<()>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .route("/ok", axum::routing::get(|| async { "ok" }))
            .route("/body", axum::routing::post(read_body));
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve("test", listener, app, limits, stop.clone()));
        (addr, stop, task)
    }

    /// Reads the whole body: 200 with its length, or 408 when it stalled.
    async fn read_body(body: Body) -> (http::StatusCode, String) {
        use http_body_util::BodyExt;
        match body.collect().await {
            Ok(b) => (http::StatusCode::OK, b.to_bytes().len().to_string()),
            Err(e) => match body::timed_out(e.into_inner().as_ref()) {
                Some(t) => (http::StatusCode::REQUEST_TIMEOUT, t.received.to_string()),
                None => (http::StatusCode::BAD_REQUEST, String::new()),
            },
        }
    }

    fn limits(max_connections: usize, idle_timeout: Duration) -> ConnLimits {
        ConnLimits {
            max_connections,
            max_connections_per_client: max_connections,
            connection_rate_per_client: 0,
            trusted_proxies: Vec::new(),
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            idle_timeout,
            body_timeout: Duration::from_secs(30),
            min_body_rate: 1024,
            max_concurrent_streams: 16,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
        }
    }

    /// Send one request and read its (small) response.
    async fn request(conn: &mut TcpStream) -> String {
        conn.write_all(GET).await.unwrap();
        let mut buf = vec![0; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await.unwrap().unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// True when the peer closed (EOF or reset) within `within`.
    async fn closed_within(conn: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0; 64];
        matches!(tokio::time::timeout(within, conn.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_closed_and_slots_are_reused() {
        let (addr, stop, task) = start(limits(1, Duration::from_secs(30))).await;
        let mut first = TcpStream::connect(addr).await.unwrap();
        assert!(request(&mut first).await.starts_with("HTTP/1.1 200"));

        let mut second = TcpStream::connect(addr).await.unwrap();
        assert!(closed_within(&mut second, Duration::from_secs(5)).await, "second connection was not refused");
        // The first keeps working ...
        assert!(request(&mut first).await.starts_with("HTTP/1.1 200"));
        // ... and its slot is free again once it closes.
        drop(first);
        let mut third = None;
        for _ in 0..50 {
            let mut conn = TcpStream::connect(addr).await.unwrap();
            conn.write_all(GET).await.unwrap();
            let mut buf = vec![0; 1024];
            if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(1), conn.read(&mut buf)).await
                && n > 0
            {
                third = Some(String::from_utf8_lossy(&buf[..n]).into_owned());
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(third.is_some_and(|r| r.starts_with("HTTP/1.1 200")), "the freed slot was not reused");
        stop.cancel();
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn idle_keep_alive_connections_are_closed_after_the_idle_timeout() {
        let (addr, stop, task) = start(limits(8, Duration::from_millis(300))).await;
        let mut conn = TcpStream::connect(addr).await.unwrap();
        assert!(request(&mut conn).await.starts_with("HTTP/1.1 200"));
        let idle = Instant::now();
        assert!(closed_within(&mut conn, Duration::from_secs(5)).await, "idle connection stayed open");
        assert!(idle.elapsed() >= Duration::from_millis(250), "closed before the idle timeout: {:?}", idle.elapsed());
        stop.cancel();
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn stopping_closes_the_listener_and_returns_once_connections_finish() {
        let (addr, stop, task) = start(limits(8, Duration::from_secs(30))).await;
        let mut conn = TcpStream::connect(addr).await.unwrap();
        assert!(request(&mut conn).await.starts_with("HTTP/1.1 200"));
        stop.cancel();
        // The idle keep-alive connection is closed by the drain, not left to time out.
        assert!(closed_within(&mut conn, Duration::from_secs(5)).await);
        tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap().unwrap();
        assert!(TcpStream::connect(addr).await.is_err(), "listener still accepting after stop");
    }

    /// Time until the peer closes, reading (and dropping) whatever it sends.
    async fn time_to_close(conn: &mut TcpStream, within: Duration) -> Option<Duration> {
        let started = Instant::now();
        let mut buf = [0; 1024];
        loop {
            match tokio::time::timeout_at(started + within, conn.read(&mut buf)).await {
                Err(_) => return None,
                Ok(Ok(0) | Err(_)) => return Some(started.elapsed()),
                Ok(Ok(_)) => {}
            }
        }
    }

    #[tokio::test]
    async fn a_silent_connection_is_closed_after_the_handshake_timeout() {
        let mut l = limits(8, Duration::from_secs(30));
        l.handshake_timeout = Duration::from_millis(300);
        let (addr, stop, task) = start(l).await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let closed = time_to_close(&mut silent, Duration::from_secs(5)).await.expect("silent connection stayed open");
        assert!(closed >= Duration::from_millis(250), "closed before the handshake timeout: {closed:?}");
        // A client that speaks at once is unaffected.
        let mut conn = TcpStream::connect(addr).await.unwrap();
        assert!(request(&mut conn).await.starts_with("HTTP/1.1 200"));
        stop.cancel();
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_trickled_request_head_is_closed_after_the_header_timeout() {
        let mut l = limits(8, Duration::from_secs(30));
        l.header_timeout = Duration::from_millis(400);
        let (addr, stop, task) = start(l).await;
        let mut slow = TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        // A byte every 100 ms: never a whole head.
        let mut closed = false;
        for b in b"GET /ok HTTP/1.1\r\nHost: t\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
            if slow.write_all(&[*b]).await.is_err() {
                closed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(closed || time_to_close(&mut slow, Duration::from_secs(1)).await.is_some(), "slow head kept open");
        assert!(started.elapsed() < Duration::from_secs(3), "closed late: {:?}", started.elapsed());
        stop.cancel();
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn keep_alive_waits_idle_timeout_not_header_timeout_and_a_later_slow_head_is_bounded() {
        let mut l = limits(8, Duration::from_millis(800));
        l.header_timeout = Duration::from_millis(200);
        let (addr, stop, task) = start(l).await;
        let mut conn = TcpStream::connect(addr).await.unwrap();
        assert!(request(&mut conn).await.starts_with("HTTP/1.1 200"));
        // Idle longer than the header timeout: still served.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(request(&mut conn).await.starts_with("HTTP/1.1 200"));
        // The start of a head and then nothing: closed by the header timeout.
        conn.write_all(b"GET /ok HT").await.unwrap();
        let closed = time_to_close(&mut conn, Duration::from_secs(5)).await.expect("half a head kept the connection");
        assert!(closed < Duration::from_millis(700), "closed by the idle timeout, not the header timeout: {closed:?}");
        stop.cancel();
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_stalled_body_is_answered_408_and_the_connection_closed() {
        let mut l = limits(8, Duration::from_secs(30));
        l.body_timeout = Duration::from_millis(300);
        let (addr, stop, task) = start(l).await;
        let mut conn = TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"POST /body HTTP/1.1\r\nHost: t\r\nContent-Length: 99\r\n\r\nx").await.unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut answer)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(read.is_ok(), "connection not closed after the 408: {answer}");
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.ends_with("\r\n\r\n1"), "the handler saw 1 byte: {answer}");
        stop.cancel();
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_trickled_body_below_the_rate_floor_is_cut_after_the_grace() {
        let mut l = limits(8, Duration::from_secs(30));
        l.min_body_rate = 1_000_000;
        let (addr, stop, task) = start(l).await;
        let mut conn = TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"POST /body HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n").await.unwrap();
        let started = Instant::now();
        let writer = tokio::spawn(async move {
            // 10 bytes every 100 ms: 100 B/s, far below the floor.
            let (mut rd, mut wr) = conn.into_split();
            for _ in 0..200 {
                if wr.write_all(&[b'x'; 10]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let mut answer = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), rd.read_to_end(&mut answer)).await;
            String::from_utf8_lossy(&answer).into_owned()
        });
        let answer = tokio::time::timeout(Duration::from_secs(15), writer).await.unwrap().unwrap();
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        let took = started.elapsed();
        assert!(took >= body::MIN_RATE_AFTER && took < body::MIN_RATE_AFTER + Duration::from_secs(3), "{took:?}");
        stop.cancel();
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn one_client_cannot_take_more_than_its_share_of_connections() {
        let mut l = limits(8, Duration::from_secs(30));
        l.max_connections_per_client = 2;
        let (addr, stop, task) = start(l).await;
        let mut a = TcpStream::connect(addr).await.unwrap();
        let mut b = TcpStream::connect(addr).await.unwrap();
        assert!(request(&mut a).await.starts_with("HTTP/1.1 200"));
        assert!(request(&mut b).await.starts_with("HTTP/1.1 200"));
        let mut c = TcpStream::connect(addr).await.unwrap();
        assert!(time_to_close(&mut c, Duration::from_secs(5)).await.is_some(), "third connection was kept");
        // Another address is still served (127.0.0.2 is loopback too).
        let other = tokio::net::TcpSocket::new_v4().unwrap();
        other.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut other = other.connect(addr).await.unwrap();
        assert!(request(&mut other).await.starts_with("HTTP/1.1 200"));
        stop.cancel();
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_burst_of_connections_from_one_address_waits_its_turn_while_another_is_served() {
        let mut l = limits(64, Duration::from_secs(30));
        // One every 100 ms after a burst of one; the handshake deadline is
        // shorter than the wait of the last ones, so it must start when a
        // connection is served, not when it was accepted.
        l.connection_rate_per_client = 10;
        l.handshake_timeout = Duration::from_millis(300);
        let (addr, stop, task) = start(l).await;
        let started = Instant::now();
        let mut burst = tokio::task::JoinSet::new();
        for _ in 0..12 {
            let mut conn = TcpStream::connect(addr).await.unwrap();
            burst.spawn(async move {
                let answer = request(&mut conn).await;
                (started.elapsed(), answer)
            });
        }
        let other = tokio::net::TcpSocket::new_v4().unwrap();
        other.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut other = other.connect(addr).await.unwrap();
        assert!(request(&mut other).await.starts_with("HTTP/1.1 200"));
        let other_at = started.elapsed();
        let mut served = Vec::new();
        while let Some(done) = burst.join_next().await {
            let (at, answer) = done.unwrap();
            assert!(answer.starts_with("HTTP/1.1 200"), "a paced connection was not served: {answer:?}");
            served.push(at);
        }
        served.sort();
        // The 12th was due 11 intervals after the first, less the burst.
        assert!(served[11] >= Duration::from_millis(950), "not paced: {served:?}");
        assert!(other_at < served[11], "the other address waited for the burst: {other_at:?} vs {served:?}");
        stop.cancel();
        task.await.unwrap().unwrap();
    }

    const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    const EMPTY_SETTINGS: [u8; 9] = [0, 0, 0, 0x4, 0, 0, 0, 0, 0];
    const PING: [u8; 17] = [0, 0, 8, 0x6, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];

    #[tokio::test]
    async fn an_h2_connection_that_pings_but_opens_no_stream_gets_goaway_after_the_idle_timeout() {
        let mut l = limits(8, Duration::from_millis(600));
        l.handshake_timeout = Duration::from_millis(200);
        let (addr, stop, task) = start(l).await;
        let conn = TcpStream::connect(addr).await.unwrap();
        let (mut rd, mut wr) = conn.into_split();
        wr.write_all(H2_PREFACE).await.unwrap();
        wr.write_all(&EMPTY_SETTINGS).await.unwrap();
        let pinger = tokio::spawn(async move {
            // Past the handshake timeout, pinging all along.
            for _ in 0..40 {
                if wr.write_all(&PING).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let started = Instant::now();
        let mut seen = Vec::new();
        let mut buf = [0; 1024];
        while let Ok(Ok(n @ 1..)) = tokio::time::timeout(Duration::from_secs(5), rd.read(&mut buf)).await {
            seen.extend_from_slice(&buf[..n]);
        }
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(500), "closed before the idle timeout (handshake done): {took:?}");
        assert!(took < Duration::from_secs(3), "pings kept an idle h2 connection open: {took:?}");
        // Some frame of type GOAWAY (0x7) was sent.
        assert!(frames(&seen).contains(&0x7), "no GOAWAY among {:?}", frames(&seen));
        pinger.abort();
        stop.cancel();
        task.await.unwrap().unwrap();
    }

    /// The frame types in a server's h2 byte stream.
    fn frames(mut bytes: &[u8]) -> Vec<u8> {
        let mut types = Vec::new();
        while bytes.len() >= 9 {
            let len = usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
            types.push(bytes[3]);
            bytes = &bytes[(9 + len).min(bytes.len())..];
        }
        types
    }
}
