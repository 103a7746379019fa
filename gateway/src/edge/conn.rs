//! The accept loop both listeners share: a cap on open connections, an idle
//! timeout for HTTP/1.1 keep-alive, HTTP/2 keepalive pings to find dead
//! peers, and a graceful drain on shutdown.
//!
//! `axum::serve` has none of these bounds, so the gateway serves its routers
//! through hyper-util's auto (HTTP/1.1 + h2c) connection builder directly.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use tower::ServiceExt;

use crate::config::ConnLimits;
use crate::policy::PeerAddr;

/// How often refused connections are reported, at most.
const REFUSED_LOG_EVERY: Duration = Duration::from_secs(5);
/// Pause after an accept error that is not the peer's fault (EMFILE, ENFILE,
/// ENOMEM) so the loop does not spin while the process is out of descriptors.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Serve `app` on `listener` until `stop` is cancelled, then stop accepting
/// and wait for open connections to finish their in-flight requests (HTTP/1.1
/// connections close after their current response; HTTP/2 ones get GOAWAY).
///
/// At most `limits.max_connections` connections are open at once; one more is
/// accepted and closed at once (the peer sees the connection reset rather
/// than a hung handshake) and counted in a periodic warning.
pub async fn serve(
    name: &'static str,
    listener: TcpListener,
    app: axum::Router,
    limits: ConnLimits,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let builder = builder(&limits);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut refused = Refused::default();
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
            refused.record(name, limits.max_connections);
            drop(stream);
            continue;
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(listener = name, error = %e, "cannot set TCP_NODELAY");
        }
        // Every request learns its TCP peer (client addressing, limits).
        let service = TowerToHyperService::new(app.clone().map_request(move |mut req: http::Request<_>| {
            req.extensions_mut().insert(PeerAddr(peer));
            req
        }));
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(listener = name, error = %e, "connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    tracing::debug!(listener = name, open = graceful.count(), "listener closed; draining connections");
    graceful.shutdown().await;
    Ok(())
}

fn builder(limits: &ConnLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Starts when the connection waits for a request head, so it is
        // both the idle keep-alive timeout and a slow-header (slowloris) bound.
        .header_read_timeout(limits.idle_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.keepalive_interval)
        .keep_alive_timeout(limits.keepalive_timeout)
        .enable_connect_protocol();
    builder
}

/// Errors that concern one peer, not the listener: try the next connection.
fn is_peer_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(e.kind(), ConnectionRefused | ConnectionAborted | ConnectionReset)
}

/// Counts connections refused over the cap and warns about them at most
/// every [`REFUSED_LOG_EVERY`], so a flood cannot flood the log too.
#[derive(Default)]
struct Refused {
    since_log: u64,
    last_log: Option<Instant>,
}

impl Refused {
    fn record(&mut self, name: &'static str, max: usize) {
        self.since_log += 1;
        let now = Instant::now();
        if self.last_log.is_none_or(|t| now.duration_since(t) >= REFUSED_LOG_EVERY) {
            tracing::warn!(
                listener = name,
                refused = self.since_log,
                max_connections = max,
                "connection limit reached; refusing new connections"
            );
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
        let app = axum::Router::new().route("/ok", axum::routing::get(|| async { "ok" }));
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve("test", listener, app, limits, stop.clone()));
        (addr, stop, task)
    }

    fn limits(max_connections: usize, idle_timeout: Duration) -> ConnLimits {
        ConnLimits {
            max_connections,
            idle_timeout,
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
}
