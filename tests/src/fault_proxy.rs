//! A TCP fault proxy for the resilience tests: placed between the gateway
//! and a remote worker, it forwards bytes until told to add latency, reset
//! connections, or swallow everything (`tc netem` is not available here).
//!
//! The fault applies to connections already open as well as new ones: the
//! forwarding loops read it before every chunk.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// What the proxy does to traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward as is.
    None,
    /// Forward every chunk this long after it arrived.
    Latency(Duration),
    /// Abort every connection with a TCP reset, and reset new ones at once.
    Reset,
    /// Accept and read, never forward or answer (a hung peer or a dead link).
    Blackhole,
}

/// A running proxy; stops (closing every connection) when dropped.
pub struct FaultProxy {
    pub addr: SocketAddr,
    fault: watch::Sender<Fault>,
    runtime: Option<tokio::runtime::Runtime>,
    connections: Arc<Mutex<u64>>,
}

impl FaultProxy {
    /// Listen on a free loopback port and forward to `upstream`.
    pub fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        let (fault, watch) = watch::channel(Fault::None);
        let connections = Arc::new(Mutex::new(0));
        let count = connections.clone();
        runtime.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                *count.lock().unwrap_or_else(PoisonError::into_inner) += 1;
                tokio::spawn(proxy(client, upstream, watch.clone()));
            }
        });
        Ok(Self { addr, fault, runtime: Some(runtime), connections })
    }

    /// Change the fault; open connections see it at their next chunk.
    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        *self.connections.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// How a proxied connection ended.
#[derive(PartialEq, Eq)]
enum End {
    Closed,
    Reset,
}

async fn proxy(mut client: TcpStream, upstream: SocketAddr, mut fault: watch::Receiver<Fault>) {
    if *fault.borrow() == Fault::Reset {
        reset(client);
        return;
    }
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        reset(client);
        return;
    };
    let _ = (client.set_nodelay(true), server.set_nodelay(true));
    let end = {
        let (client_read, client_write) = client.split();
        let (server_read, server_write) = server.split();
        let (up, down) = (fault.clone(), fault.clone());
        let reset_ordered = async {
            loop {
                if fault.changed().await.is_err() {
                    return End::Closed;
                }
                if *fault.borrow() == Fault::Reset {
                    return End::Reset;
                }
            }
        };
        tokio::select! {
            end = pipe(client_read, server_write, up) => end,
            end = pipe(server_read, client_write, down) => end,
            end = reset_ordered => end,
        }
    };
    if end == End::Reset {
        reset(client);
        reset(server);
    }
}

/// Forward one direction as a delay line: every chunk leaves at its
/// arrival time plus the latency in force when it arrived, so added latency
/// delays traffic without throttling it. Ends when either side closes, after
/// forwarding what was already read.
async fn pipe(
    mut from: impl AsyncReadExt + Unpin,
    mut to: impl AsyncWriteExt + Unpin,
    fault: watch::Receiver<Fault>,
) -> End {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(1024);
    let read = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return End::Closed,
                Ok(n) => n,
            };
            let due = match *fault.borrow() {
                Fault::None => Instant::now(),
                Fault::Latency(d) => Instant::now() + d,
                Fault::Reset => return End::Reset,
                Fault::Blackhole => continue,
            };
            if tx.send((due, buf[..n].to_vec())).await.is_err() {
                return End::Closed;
            }
        }
    };
    let write = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                break;
            }
        }
    };
    let (end, ()) = tokio::join!(read, write);
    end
}

fn reset(stream: TcpStream) {
    // SO_LINGER 0: closing sends RST at once (the socket is not used after).
    let _ = stream.set_zero_linger();
    drop(stream);
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::time::Instant;

    use super::*;

    /// A TCP echo server on its own thread.
    fn echo_server() -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for mut conn in listener.incoming().map_while(Result::ok) {
                std::thread::spawn(move || {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = conn.read(&mut buf) {
                        if n == 0 || conn.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    fn round_trip(conn: &mut std::net::TcpStream) -> std::io::Result<Vec<u8>> {
        conn.write_all(b"ping")?;
        let mut buf = [0u8; 4];
        conn.read_exact(&mut buf)?;
        Ok(buf.to_vec())
    }

    fn connect(proxy: &FaultProxy) -> std::net::TcpStream {
        let conn = std::net::TcpStream::connect(proxy.addr).unwrap();
        conn.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        conn
    }

    #[test]
    fn forwards_then_delays_then_swallows_then_resets_open_and_new_connections() {
        let proxy = FaultProxy::start(echo_server()).unwrap();
        let mut conn = connect(&proxy);
        assert_eq!(round_trip(&mut conn).unwrap(), b"ping");

        proxy.set(Fault::Latency(Duration::from_millis(100)));
        let t = Instant::now();
        assert_eq!(round_trip(&mut conn).unwrap(), b"ping");
        assert!(t.elapsed() >= Duration::from_millis(200), "both directions delayed: {:?}", t.elapsed());
        // Delayed, not throttled: five pings sent 20 ms apart all come back
        // about 200 ms after each was sent, not one after another.
        let t = Instant::now();
        for _ in 0..5 {
            conn.write_all(b"ping").unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut five = [0u8; 20];
        conn.read_exact(&mut five).unwrap();
        assert_eq!(&five, b"pingpingpingpingping");
        assert!(t.elapsed() < Duration::from_millis(450), "chunks were serialised: {:?}", t.elapsed());

        proxy.set(Fault::Blackhole);
        let err = round_trip(&mut conn).unwrap_err();
        assert!(matches!(err.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut), "{err:?}");

        proxy.set(Fault::Reset);
        let mut buf = [0u8; 4];
        let reset = conn.read(&mut buf);
        assert!(
            matches!(&reset, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "an open connection is reset: {reset:?}"
        );
        let mut fresh = connect(&proxy);
        assert!(round_trip(&mut fresh).is_err(), "a new connection is reset too");

        proxy.set(Fault::None);
        let mut healed = connect(&proxy);
        assert_eq!(round_trip(&mut healed).unwrap(), b"ping");
        assert_eq!(proxy.connections(), 3);
    }
}
