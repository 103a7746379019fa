use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;

const GET: &[u8] = b"GET /ok HTTP/1.1\r\nHost: t\r\n\r\n";
/// A body larger than what the socket buffers hold.
const BIG: usize = 8 << 20;

async fn start(limits: ConnLimits) -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<std::io::Result<()>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .route("/ok", axum::routing::get(|| async { "ok" }))
        .route("/body", axum::routing::post(read_body))
        .route("/big", axum::routing::get(|| async { vec![b'x'; BIG] }));
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

/// Read until `count` whole answers of `body_len` bytes each have come.
async fn answers(conn: &mut TcpStream, count: usize, body_len: usize) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buf = vec![0; 64 * 1024];
    let whole = |seen: &[u8]| {
        let mut rest = seen;
        for _ in 0..count {
            let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") else { return false };
            if rest.len() < end + 4 + body_len {
                return false;
            }
            rest = &rest[end + 4 + body_len..];
        }
        true
    };
    while !whole(&seen) {
        match tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await {
            Ok(Ok(n @ 1..)) => seen.extend_from_slice(&buf[..n]),
            other => panic!("{count} answers never came ({other:?}); got {} bytes", seen.len()),
        }
    }
    seen
}

#[tokio::test]
async fn an_idle_keep_alive_connection_parks_and_is_served_whenever_it_speaks_again() {
    let (addr, stop, task) = start(limits(8, Duration::from_secs(30))).await;
    let mut conn = TcpStream::connect(addr).await.unwrap();
    assert!(request(&mut conn).await.starts_with("HTTP/1.1 200"));
    // Parked: two pipelined requests in one write are both answered.
    tokio::time::sleep(watch::PARK_AFTER * 2).await;
    conn.write_all(&[GET, GET].concat()).await.unwrap();
    let seen = answers(&mut conn, 2, 2).await;
    assert_eq!(String::from_utf8_lossy(&seen).matches("HTTP/1.1 200 OK").count(), 2);
    // Parked again: a body sent in pieces after its head is read whole.
    tokio::time::sleep(watch::PARK_AFTER * 2).await;
    conn.write_all(b"POST /body HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n01234").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    conn.write_all(b"56789").await.unwrap();
    let seen = String::from_utf8_lossy(&answers(&mut conn, 1, 2).await).into_owned();
    assert!(seen.starts_with("HTTP/1.1 200") && seen.ends_with("10"), "{seen}");
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_head_begun_before_the_connection_could_park_is_read_to_its_end() {
    let (addr, stop, task) = start(limits(8, Duration::from_secs(30))).await;
    let mut conn = TcpStream::connect(addr).await.unwrap();
    assert!(request(&mut conn).await.starts_with("HTTP/1.1 200"));
    tokio::time::sleep(watch::PARK_AFTER / 2).await;
    // Half a head, then a pause past the time the idle connection would
    // have parked: hyper holds the half, so it must not be told "end of file".
    conn.write_all(&GET[..10]).await.unwrap();
    tokio::time::sleep(watch::PARK_AFTER * 2).await;
    conn.write_all(&GET[10..]).await.unwrap();
    let seen = String::from_utf8_lossy(&answers(&mut conn, 1, 2).await).into_owned();
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn an_answer_the_client_has_not_read_yet_is_never_cut_by_parking() {
    let (addr, stop, task) = start(limits(8, Duration::from_secs(30))).await;
    let mut conn = TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
    // The answer fills the socket buffers and waits in hyper's while the
    // client reads nothing, past the time an idle connection parks.
    tokio::time::sleep(watch::PARK_AFTER * 3).await;
    let seen = answers(&mut conn, 1, BIG).await;
    assert!(seen.starts_with(b"HTTP/1.1 200"));
    assert!(request(&mut conn).await.starts_with("HTTP/1.1 200"), "the connection did not serve on");
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_parked_connection_still_closes_at_its_idle_timeout_and_at_once_on_stop() {
    let idle_timeout = watch::PARK_AFTER * 3;
    let (addr, stop, task) = start(limits(8, idle_timeout)).await;
    let mut conn = TcpStream::connect(addr).await.unwrap();
    assert!(request(&mut conn).await.starts_with("HTTP/1.1 200"));
    let idle = Instant::now();
    let closed = time_to_close(&mut conn, Duration::from_secs(10)).await.expect("parked connection stayed open");
    assert!(closed >= idle_timeout - Duration::from_millis(50), "closed before the idle timeout: {closed:?}");
    assert!(idle.elapsed() < idle_timeout + Duration::from_secs(2), "closed late: {:?}", idle.elapsed());

    let mut conn = TcpStream::connect(addr).await.unwrap();
    assert!(request(&mut conn).await.starts_with("HTTP/1.1 200"));
    tokio::time::sleep(watch::PARK_AFTER * 2).await;
    stop.cancel();
    assert!(time_to_close(&mut conn, Duration::from_secs(1)).await.is_some(), "a parked connection outlived the stop");
    tokio::time::timeout(Duration::from_secs(2), task).await.unwrap().unwrap().unwrap();
}

#[tokio::test]
async fn a_pipelined_head_cut_in_two_across_an_idle_pause_is_read_to_its_end() {
    let (addr, stop, task) = start(limits(8, Duration::from_secs(30))).await;
    let mut conn = TcpStream::connect(addr).await.unwrap();
    // The second head's first bytes come with the first request: hyper holds
    // them once the first is answered, and the connection looks idle.
    conn.write_all(&[GET, &GET[..10]].concat()).await.unwrap();
    answers(&mut conn, 1, 2).await;
    tokio::time::sleep(watch::PARK_AFTER * 2).await;
    conn.write_all(&GET[10..]).await.unwrap();
    let seen = String::from_utf8_lossy(&answers(&mut conn, 1, 2).await).into_owned();
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// An HTTP/2 HEADERS frame for `GET /ok` on `stream`, ending it (HPACK
/// literals without indexing or Huffman coding).
fn h2_get(stream: u32) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in [(":method", "GET"), (":scheme", "http"), (":path", "/ok"), (":authority", "t")] {
        block.push(0);
        block.push(name.len() as u8);
        block.extend_from_slice(name.as_bytes());
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    let mut frame = vec![0, 0, block.len() as u8, 0x1, 0x4 | 0x1];
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(&block);
    frame
}

#[tokio::test]
async fn an_idle_h2_connection_is_never_parked() {
    let mut l = limits(8, Duration::from_secs(30));
    // The server's own ping makes hyper read again, finding nothing more,
    // after the connection has been idle long enough to park.
    l.keepalive_interval = watch::PARK_AFTER * 3 / 2;
    let (addr, stop, task) = start(l).await;
    let mut conn = TcpStream::connect(addr).await.unwrap();
    conn.write_all(&[H2_PREFACE, &EMPTY_SETTINGS, &h2_get(1)].concat()).await.unwrap();
    // Reads until the server sent a HEADERS frame (0x1) for the request.
    async fn answered(conn: &mut TcpStream) -> Vec<u8> {
        let mut seen = Vec::new();
        let mut buf = [0; 4096];
        while !frames(&seen).contains(&0x1) {
            match tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await {
                Ok(Ok(n @ 1..)) => seen.extend_from_slice(&buf[..n]),
                other => panic!("no answer ({other:?}); frames {:?}", frames(&seen)),
            }
        }
        seen
    }
    answered(&mut conn).await;
    // Idle past the time an HTTP/1.1 connection parks: HTTP/2's state
    // lives in hyper, and "end of file" would end the connection.
    tokio::time::sleep(watch::PARK_AFTER * 2).await;
    conn.write_all(&h2_get(3)).await.unwrap();
    let seen = answered(&mut conn).await;
    assert!(!frames(&seen).contains(&0x7), "GOAWAY among {:?}", frames(&seen));
    drop(conn);
    stop.cancel();
    task.await.unwrap().unwrap();
}
