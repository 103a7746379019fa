//! What one connection is doing, as its deadlines need to know: whether it
//! has finished its handshake, how many requests it has in flight, since
//! when it has been idle, and when the head it is reading began.
//!
//! The socket wrapper (`socket::Watched`, through [`Follow`]) and the per-request token
//! ([`InFlight`]) write it; the connection's task ([`ConnState::next`])
//! reads it to decide when to close.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::ConnLimits;

/// `head_started` when no head is being read.
const NONE: u64 = u64::MAX;

/// HTTP/2 stream resets (RST_STREAM frames) a client may send per second on
/// one connection before it gets GOAWAY, counting only quick ones (below).
/// h2 itself only bounds resets of streams not yet accepted *at once*,
/// which a fast server never reaches while a rapid-reset client makes it
/// parse and drop streams without end.
pub const MAX_RESETS_PER_SECOND: u32 = 200;

/// A reset counts against [`MAX_RESETS_PER_SECOND`] when it comes within
/// this many milliseconds of its stream's opening: rapid reset cancels a
/// stream as soon as it opens, to open the next. A client that gives up on
/// a slow answer when its deadline passes is not attacking; counting those
/// closed an honest client's connection, with every call on it, whenever
/// the gateway was overloaded (seen at 2x a model's capacity).
///
/// An attacker who waits out the window before each reset holds at most
/// `max_concurrent_streams` streams for 100 ms each: a bounded rate of real
/// requests. What this cannot tell apart: under deep overload the gateway
/// may read a stream's opening and its late reset together, and a client
/// whose streams waited for a free slot on its side opens them just before
/// its deadline; both look quick, and such a connection still gets GOAWAY
/// (its open calls finish). Counting streams opened in between instead was
/// tried and dropped: refused HEADERS let an attacker pad that count.
const QUICK_RESET_MS: u64 = 100;

/// How long an HTTP/1.1 connection must have been idle between requests
/// before it gives hyper's buffers back (see `socket`). A client that keeps
/// its connection busy never pays for setting one up again; one that sends
/// a request now and then pays a few microseconds each time.
pub const PARK_AFTER: Duration = Duration::from_millis(PARK_AFTER_MS);
const PARK_AFTER_MS: u64 = 50;

/// Streams remembered per connection at most (h2 allows 256 open at once).
const MAX_TRACKED_STREAMS: usize = 1024;

/// Shared by a connection's socket, its requests and its task.
pub struct ConnState {
    opened: Instant,
    /// Requests started on the connection.
    requests: AtomicU64,
    /// Requests whose answer has not ended.
    active: AtomicU32,
    /// Milliseconds since `opened` when `active` last fell to zero.
    idle_since: AtomicU64,
    /// Milliseconds since `opened` of the first byte read while idle: a
    /// request head on its way (HTTP/1.1).
    head_started: AtomicU64,
    /// The HTTP/2 preface and first SETTINGS frame have arrived.
    h2_ready: AtomicBool,
    /// A request body stalled or resets flooded in: close the connection.
    doomed: AtomicBool,
    /// Resets in the current one-second window, and the window's start (ms).
    resets: AtomicU32,
    reset_window: AtomicU64,
    /// The first HTTP/1.1 request (counted from 0) whose head had both
    /// `Content-Length` and `Transfer-Encoding`, if any.
    ambiguous_head: AtomicU64,
    /// The connection switched protocols (a WebSocket): its bytes are no
    /// longer HTTP's, and it lives as long as its upgraded socket.
    upgraded: AtomicBool,
    /// The socket was dropped (closed) by whoever held it last.
    socket_gone: AtomicBool,
    /// Woken when the connection turns idle, starts reading a head, is
    /// doomed, or its upgraded socket closes.
    changed: Notify,
}

/// What the connection's task should do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Nothing is due before this instant (or before a change, if `None`).
    Wait(Option<Instant>),
    /// Close at once: the peer is too slow or silent.
    Close(&'static str),
    /// Say goodbye (GOAWAY / no keep-alive) and let open requests finish
    /// (`idle`: there are none, only the goodbye itself to wait for).
    Goodbye { why: &'static str, idle: bool },
}

impl ConnState {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            opened: Instant::now(),
            requests: AtomicU64::new(0),
            active: AtomicU32::new(0),
            idle_since: AtomicU64::new(0),
            head_started: AtomicU64::new(NONE),
            h2_ready: AtomicBool::new(false),
            doomed: AtomicBool::new(false),
            resets: AtomicU32::new(0),
            reset_window: AtomicU64::new(0),
            ambiguous_head: AtomicU64::new(NONE),
            upgraded: AtomicBool::new(false),
            socket_gone: AtomicBool::new(false),
            changed: Notify::new(),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }

    fn at(&self, ms: u64) -> Instant {
        self.opened + Duration::from_millis(ms)
    }

    /// Resolves when the connection turned idle, started reading a head, or was doomed.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Close the connection as soon as its current answers are sent.
    pub fn doom(&self) {
        self.doomed.store(true, Ordering::Release);
        self.changed.notify_one();
    }

    /// The connection is switching protocols (a `101` answer is on its way).
    pub fn upgrade(&self) {
        self.upgraded.store(true, Ordering::Release);
    }

    pub fn is_upgraded(&self) -> bool {
        self.upgraded.load(Ordering::Acquire)
    }

    /// The socket was closed (dropped without being parked).
    pub fn socket_closed(&self) {
        self.socket_gone.store(true, Ordering::Release);
        self.changed.notify_one();
    }

    pub fn is_socket_closed(&self) -> bool {
        self.socket_gone.load(Ordering::Acquire)
    }

    /// Bytes arrived from the peer.
    fn on_read(&self) {
        if self.active.load(Ordering::Acquire) == 0 && self.head_started.load(Ordering::Relaxed) == NONE {
            self.head_started.store(self.now_ms(), Ordering::Relaxed);
            // A head deadline now runs.
            self.changed.notify_one();
        }
    }

    /// A request's head has been read: it is in flight until its
    /// [`InFlight`] token is dropped.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::AcqRel);
        InFlight { state: self.clone() }
    }

    /// The request started last had both `Content-Length` and
    /// `Transfer-Encoding` in its head (HTTP/1.1: requests start in order).
    pub fn latest_head_ambiguous(&self) -> bool {
        self.requests.load(Ordering::Relaxed) > self.ambiguous_head.load(Ordering::Acquire)
    }

    fn finish(&self) {
        if self.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.head_started.store(NONE, Ordering::Relaxed);
            self.idle_since.store(self.now_ms(), Ordering::Release);
            self.changed.notify_one();
        }
    }

    /// The client reset a stream: counted per second; past
    /// [`MAX_RESETS_PER_SECOND`] the connection is doomed.
    fn note_reset(&self) {
        let now = self.now_ms();
        let window = self.reset_window.load(Ordering::Relaxed);
        if now.saturating_sub(window) >= 1000 {
            self.reset_window.store(now, Ordering::Relaxed);
            self.resets.store(1, Ordering::Relaxed);
        } else if self.resets.fetch_add(1, Ordering::Relaxed) + 1 > MAX_RESETS_PER_SECOND
            && !self.doomed.swap(true, Ordering::AcqRel)
        {
            tracing::warn!(
                "client reset more than {MAX_RESETS_PER_SECOND} requests in a second; closing its connection"
            );
            self.changed.notify_one();
        }
    }

    /// Whether an idle connection may give its buffers back now: it has
    /// served a request, none is in flight, no head has begun since, and it
    /// has been idle for [`PARK_AFTER`].
    pub fn may_park(&self) -> bool {
        self.requests.load(Ordering::Relaxed) > 0
            && self.active.load(Ordering::Acquire) == 0
            && self.head_started.load(Ordering::Relaxed) == NONE
            && !self.doomed.load(Ordering::Acquire)
            && self.now_ms().saturating_sub(self.idle_since.load(Ordering::Acquire)) >= PARK_AFTER_MS
    }

    /// The next thing due on this connection under `limits`, at `now`.
    pub fn next(&self, limits: &ConnLimits, now: Instant) -> Next {
        if self.doomed.load(Ordering::Acquire) {
            return Next::Goodbye { why: "doomed", idle: false };
        }
        let due = |at: Instant, verdict: Next| if now >= at { verdict } else { Next::Wait(Some(at)) };
        let h2 = self.h2_ready.load(Ordering::Acquire);
        let head = match self.head_started.load(Ordering::Relaxed) {
            NONE => None,
            started => Some(self.at(started) + limits.header_timeout),
        };
        if self.requests.load(Ordering::Relaxed) == 0 && !h2 {
            // Nothing useful yet: the handshake bound, and (HTTP/1.1) the
            // head bound once its first byte came, whichever is first.
            let handshake = self.opened + limits.handshake_timeout;
            return match head {
                Some(at) if at < handshake => due(at, Next::Close("header timeout")),
                _ => due(handshake, Next::Close("handshake timeout")),
            };
        }
        if self.active.load(Ordering::Acquire) > 0 {
            return Next::Wait(None);
        }
        // Idle. HTTP/2 reads pings and settings while idle: only streams count.
        if let Some(at) = head.filter(|_| !h2) {
            return due(at, Next::Close("header timeout"));
        }
        let idle_since = self.at(self.idle_since.load(Ordering::Acquire));
        match due(idle_since + limits.idle_timeout, Next::Goodbye { why: "idle timeout", idle: true }) {
            // An HTTP/1.1 connection is looked at once more when it may park.
            Next::Wait(Some(at)) if !h2 && idle_since + PARK_AFTER > now => {
                Next::Wait(Some(at.min(idle_since + PARK_AFTER)))
            }
            next => next,
        }
    }
}

/// A request in flight; dropping it ends it (its answer was sent, or the
/// client left before it).
pub struct InFlight {
    state: Arc<ConnState>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.state.finish();
    }
}

/// The client connection preface of HTTP/2.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Length of an HTTP/2 frame header.
const FRAME_HEADER: usize = 9;
/// Frame types the watch cares about.
const SETTINGS: u8 = 0x4;
const RST_STREAM: u8 = 0x3;
const HEADERS: u8 = 0x1;

/// Follows the frames a client sends, without keeping them: when an HTTP/2
/// client has sent its preface and first SETTINGS frame, and each stream
/// reset it sends. Anything that is not HTTP/2 is left alone at once.
enum Sniff {
    /// Matching the preface; `seen` bytes so far.
    Preface { seen: usize },
    /// Between frames: `have` bytes of the next header, or `skip` bytes of
    /// the current payload left. `first`: the SETTINGS that must open.
    Frames { header: [u8; FRAME_HEADER], have: usize, skip: usize, first: bool },
    /// HTTP/1.1: following each request's framing to find its head.
    Http1(Http1),
    /// A first frame that is not SETTINGS (hyper answers it), or framing
    /// the follower lost (hyper refuses it and closes).
    Done,
}

/// What the frames said.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// The preface and the first SETTINGS frame are in.
    Ready,
    /// HEADERS for stream `n`: it opened (or, for an older one, trailers).
    Headers(u32),
    /// RST_STREAM for stream `n`.
    Reset(u32),
    /// An HTTP/1.1 request head carried both `Content-Length` and
    /// `Transfer-Encoding`; it was the connection's `n`th head (from 0).
    Ambiguous(u64),
}

impl Sniff {
    fn new() -> Self {
        Self::Preface { seen: 0 }
    }

    /// Follow the next bytes read, telling `on` what they hold.
    fn feed(&mut self, mut data: &[u8], on: &mut impl FnMut(Seen)) {
        while !data.is_empty() {
            match self {
                Self::Done => return,
                Self::Http1(h1) => {
                    if !h1.feed(data, on) {
                        *self = Self::Done;
                    }
                    return;
                }
                Self::Preface { seen } => {
                    let take = (H2_PREFACE.len() - *seen).min(data.len());
                    if data[..take] != H2_PREFACE[*seen..*seen + take] {
                        // Not HTTP/2: what matched so far was the start of a request line.
                        let mut h1 = Http1::new();
                        if h1.feed(&H2_PREFACE[..*seen], on) && h1.feed(data, on) {
                            *self = Self::Http1(h1);
                        } else {
                            *self = Self::Done;
                        }
                        return;
                    }
                    *seen += take;
                    data = &data[take..];
                    if *seen == H2_PREFACE.len() {
                        *self = Self::Frames { header: [0; FRAME_HEADER], have: 0, skip: 0, first: true };
                    }
                }
                Self::Frames { skip, first, .. } if *skip > 0 => {
                    let take = (*skip).min(data.len());
                    *skip -= take;
                    data = &data[take..];
                    if *skip == 0 && std::mem::take(first) {
                        on(Seen::Ready);
                    }
                }
                Self::Frames { header, have, skip, first } => {
                    let take = (FRAME_HEADER - *have).min(data.len());
                    header[*have..*have + take].copy_from_slice(&data[..take]);
                    *have += take;
                    data = &data[take..];
                    if *have < FRAME_HEADER {
                        return;
                    }
                    *have = 0;
                    let kind = header[3];
                    *skip = usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
                    if *first && kind != SETTINGS {
                        *self = Self::Done;
                        return;
                    }
                    let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
                    match kind {
                        RST_STREAM => on(Seen::Reset(stream)),
                        HEADERS => on(Seen::Headers(stream)),
                        _ => {}
                    }
                    if *skip == 0 && std::mem::take(first) {
                        on(Seen::Ready);
                    }
                }
            }
        }
    }
}

/// Follows HTTP/1.1 request framing (heads, then `Content-Length` or
/// chunked bodies) without keeping the bytes, to see what hyper hides: a
/// head with both `Content-Length` and `Transfer-Encoding`, which hyper
/// reads by the latter alone after dropping the former, so the service
/// never learns that a proxy in front may have read the body otherwise.
/// Bodies are skipped in one step per read; only heads and chunk-size lines
/// are looked at byte by byte.
struct Http1 {
    /// Heads completed so far.
    heads: u64,
    at: At,
}

/// Header names the follower needs, lowercased, and the longest of them.
const CONTENT_LENGTH: &[u8] = b"content-length";
const TRANSFER_ENCODING: &[u8] = b"transfer-encoding";
const NAME: usize = TRANSFER_ENCODING.len();

#[derive(Clone, Copy, PartialEq, Eq)]
enum Field {
    /// Not known yet (no colon), or none the follower needs.
    Unknown,
    Other,
    ContentLength,
    TransferEncoding,
}

enum At {
    /// In a head. `name`: the current line's first bytes, lowercased, `len`
    /// its length (without CR); `lines`: lines so far, the request line
    /// included; `length`: the last `Content-Length` value.
    Head { name: [u8; NAME], len: usize, field: Field, value: u64, lines: u32, length: Option<u64>, chunked: bool },
    /// `left` bytes of a `Content-Length` body.
    Body { left: u64 },
    /// A chunk-size line; `ext` once past the digits (extensions).
    ChunkSize { size: u64, digits: bool, ext: bool },
    /// A chunk's data and the CRLF after it.
    ChunkData { left: u64 },
    /// Trailer lines after the last chunk, until an empty one.
    Trailers { len: usize },
}

impl At {
    fn head() -> Self {
        Self::Head { name: [0; NAME], len: 0, field: Field::Unknown, value: 0, lines: 0, length: None, chunked: false }
    }
}

impl Http1 {
    fn new() -> Self {
        Self { heads: 0, at: At::head() }
    }

    /// At the start of a request line, with none of it read (blank lines
    /// before one are skipped by hyper too).
    fn between_messages(&self) -> bool {
        matches!(self.at, At::Head { len: 0, lines: 0, .. })
    }

    /// Follow the next bytes; `false` once the framing is lost (hyper refuses
    /// such bytes and closes the connection itself).
    fn feed(&mut self, mut data: &[u8], on: &mut impl FnMut(Seen)) -> bool {
        while let Some((&byte, rest)) = data.split_first() {
            match &mut self.at {
                At::Body { left } | At::ChunkData { left } => {
                    let take = usize::try_from(*left).unwrap_or(usize::MAX).min(data.len());
                    *left -= take as u64;
                    data = &data[take..];
                    if *left == 0 {
                        self.at = match self.at {
                            At::Body { .. } => At::head(),
                            _ => At::ChunkSize { size: 0, digits: false, ext: false },
                        };
                    }
                    continue;
                }
                At::Head { name, len, field, value, lines, length, chunked } => match byte {
                    b'\r' => {}
                    b'\n' if *len == 0 && *lines == 0 => {} // blank lines before a request line
                    b'\n' if *len == 0 => {
                        let head = self.heads;
                        self.heads += 1;
                        if *chunked && length.is_some() {
                            on(Seen::Ambiguous(head));
                            return false;
                        }
                        self.at = match (*chunked, *length) {
                            (true, _) => At::ChunkSize { size: 0, digits: false, ext: false },
                            (false, Some(left)) if left > 0 => At::Body { left },
                            _ => At::head(),
                        };
                    }
                    b'\n' => {
                        match field {
                            Field::ContentLength => *length = Some(*value),
                            Field::TransferEncoding => *chunked = true,
                            Field::Unknown | Field::Other => {}
                        }
                        *lines += 1;
                        (*len, *field, *value) = (0, Field::Unknown, 0);
                    }
                    b':' if *field == Field::Unknown && *lines > 0 => {
                        *field = match &name[..(*len).min(NAME)] {
                            n if *len == CONTENT_LENGTH.len() && n == CONTENT_LENGTH => Field::ContentLength,
                            n if *len == NAME && n == TRANSFER_ENCODING => Field::TransferEncoding,
                            _ => Field::Other,
                        };
                        *len += 1;
                    }
                    _ => {
                        if *field == Field::Unknown && *len < NAME {
                            name[*len] = byte.to_ascii_lowercase();
                        }
                        if *field == Field::ContentLength && !matches!(byte, b' ' | b'\t') {
                            let Some(v) = byte
                                .is_ascii_digit()
                                .then(|| value.checked_mul(10)?.checked_add(u64::from(byte - b'0')))
                                .flatten()
                            else {
                                return false;
                            };
                            *value = v;
                        }
                        *len += 1;
                    }
                },
                At::ChunkSize { size, digits, ext } => match byte {
                    b'\r' => {}
                    b'\n' if !*digits => return false,
                    b'\n' if *size == 0 => self.at = At::Trailers { len: 0 },
                    b'\n' => self.at = At::ChunkData { left: *size + 2 },
                    _ if *ext => {}
                    _ => match (byte as char).to_digit(16) {
                        Some(d) => {
                            let Some(v) = size.checked_mul(16).and_then(|v| v.checked_add(u64::from(d))) else {
                                return false;
                            };
                            (*size, *digits) = (v, true);
                        }
                        None if *digits && matches!(byte, b';' | b' ' | b'\t') => *ext = true,
                        None => return false,
                    },
                },
                At::Trailers { len } => match byte {
                    b'\r' => {}
                    b'\n' if *len == 0 => self.at = At::head(),
                    b'\n' => *len = 0,
                    _ => *len += 1,
                },
            }
            data = rest;
        }
        true
    }
}

/// The streams a client opened in the last [`QUICK_RESET_MS`], oldest (and
/// lowest: a client's new streams take rising ids) first, to tell a quick
/// reset from a late one.
#[derive(Default)]
struct Opened {
    streams: std::collections::VecDeque<(u32, u64)>,
}

impl Opened {
    /// HEADERS for `stream` at `now` (ms): a new stream, unless its id is
    /// not above the last one's (trailers of an open stream).
    fn headers(&mut self, stream: u32, now: u64) {
        self.forget(now);
        if self.streams.back().is_some_and(|(last, _)| stream <= *last) {
            return;
        }
        if self.streams.len() == MAX_TRACKED_STREAMS {
            self.streams.pop_front();
        }
        self.streams.push_back((stream, now));
    }

    /// Whether a reset of `stream` at `now` came quickly after its opening.
    fn quick_reset(&mut self, stream: u32, now: u64) -> bool {
        self.forget(now);
        self.streams.binary_search_by_key(&stream, |(s, _)| *s).is_ok()
    }

    fn forget(&mut self, now: u64) {
        while self.streams.front().is_some_and(|(_, at)| now.saturating_sub(*at) >= QUICK_RESET_MS) {
            self.streams.pop_front();
        }
    }
}

/// Follows what a client sends, without keeping it, and reports it to the
/// connection's [`ConnState`]; lasts as long as the socket.
pub struct Follow {
    sniff: Sniff,
    opened: Opened,
}

impl Default for Follow {
    fn default() -> Self {
        Self { sniff: Sniff::new(), opened: Opened::default() }
    }
}

impl Follow {
    /// Bytes were read from the peer.
    pub fn read(&mut self, state: &ConnState, data: &[u8]) {
        let opened = &mut self.opened;
        self.sniff.feed(data, &mut |seen| match seen {
            Seen::Ready => state.h2_ready.store(true, Ordering::Release),
            Seen::Headers(stream) => opened.headers(stream, state.now_ms()),
            Seen::Reset(stream) => {
                if opened.quick_reset(stream, state.now_ms()) {
                    state.note_reset();
                }
            }
            Seen::Ambiguous(head) => state.ambiguous_head.store(head, Ordering::Release),
        });
        state.on_read();
    }

    /// An HTTP/1.1 connection whose every byte read so far belongs to a
    /// whole message: nothing of the next one has come.
    pub fn between_http1_messages(&self) -> bool {
        matches!(&self.sniff, Sniff::Http1(h1) if h1.between_messages())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, payload: usize) -> Vec<u8> {
        let mut f = vec![(payload >> 16) as u8, (payload >> 8) as u8, payload as u8, kind, 0, 0, 0, 0, 1];
        f.resize(FRAME_HEADER + payload, 0);
        f
    }

    fn seen(bytes: &[u8], split: usize) -> Vec<Seen> {
        let mut sniff = Sniff::new();
        let mut seen = Vec::new();
        for chunk in bytes.chunks(split) {
            sniff.feed(chunk, &mut |s| seen.push(s));
        }
        seen
    }

    #[test]
    fn sniff_sees_the_preface_settings_and_every_reset_in_any_pieces() {
        let mut bytes = H2_PREFACE.to_vec();
        bytes.extend(frame(SETTINGS, 12));
        bytes.extend(frame(0x1, 40)); // HEADERS
        bytes.extend(frame(RST_STREAM, 4));
        bytes.extend(frame(0x0, 1000)); // DATA
        bytes.extend(frame(RST_STREAM, 4));
        let all = vec![Seen::Ready, Seen::Headers(1), Seen::Reset(1), Seen::Reset(1)];
        for split in [1, 5, 24, 30, 33, 40, 4096] {
            assert_eq!(seen(&bytes, split), all, "split {split}");
        }
        // One byte short of the SETTINGS frame: not ready.
        let mut short = H2_PREFACE.to_vec();
        short.extend(frame(SETTINGS, 6));
        short.pop();
        assert!(seen(&short, 7).is_empty());
        // An empty SETTINGS frame is ready at its header.
        let mut empty = H2_PREFACE.to_vec();
        empty.extend(frame(SETTINGS, 0));
        assert_eq!(seen(&empty, 3), vec![Seen::Ready]);
    }

    #[test]
    fn only_resets_that_come_quickly_after_a_stream_opened_count() {
        let mut opened = Opened::default();
        opened.headers(1, 0);
        opened.headers(3, 10);
        // A rapid reset: at once.
        assert!(opened.quick_reset(3, 10));
        // A client that gave up when its deadline passed.
        opened.headers(5, 20);
        assert!(!opened.quick_reset(1, 20 + QUICK_RESET_MS));
        assert!(!opened.quick_reset(5, 20 + QUICK_RESET_MS));
        // Trailers (HEADERS on an older stream) open nothing.
        opened.headers(7, 500);
        opened.headers(5, 501);
        assert!(!opened.quick_reset(5, 502) && opened.quick_reset(7, 502));
        // A flood of streams is remembered up to the bound, newest kept.
        for n in 0..(MAX_TRACKED_STREAMS as u32 + 10) {
            opened.headers(9 + 2 * n, 600);
        }
        assert_eq!(opened.streams.len(), MAX_TRACKED_STREAMS);
        assert!(opened.quick_reset(9 + 2 * (MAX_TRACKED_STREAMS as u32 + 9), 600));
    }

    #[test]
    fn http1_heads_with_both_lengths_are_found_past_any_body_in_any_pieces() {
        let fixed = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nab\r\n\r";
        let chunked = b"POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\nA\r\n0123456789\r\n0\r\nX-Trailer: 1\r\n\r\n";
        let get = b"\r\nGET /c HTTP/1.1\r\nhost: x\r\n\r\n";
        // Body bytes that look like a head must not count.
        let smuggled = b"POST /d HTTP/1.1\r\nTRANSFER-ENCODING: chunked\r\ncontent-length:  12\r\n\r\n0\r\n\r\n";
        let mut bytes = Vec::new();
        for part in [&fixed[..], chunked, get, smuggled] {
            bytes.extend_from_slice(part);
        }
        for split in [1, 2, 3, 7, 24, 100, 4096] {
            assert_eq!(seen(&bytes, split), vec![Seen::Ambiguous(3)], "split {split}");
        }
        // Content-Length first, then Transfer-Encoding: the same.
        let cl_first = b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(seen(cl_first, 5), vec![Seen::Ambiguous(0)]);
        // A body that spells out such a head is skipped as a body.
        let mut inside = format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", cl_first.len()).into_bytes();
        inside.extend_from_slice(cl_first);
        inside.extend_from_slice(get);
        assert!(seen(&inside, 9).is_empty());
        // Framing hyper refuses too is given up on, not guessed at.
        assert!(seen(b"POST / HTTP/1.1\r\nContent-Length: 1x\r\nTransfer-Encoding: chunked\r\n\r\n", 4).is_empty());
    }

    #[test]
    fn sniff_leaves_http1_and_a_preface_without_settings_alone() {
        let mut reset_looking = b"GET / HTTP/1.1\r\n".to_vec();
        reset_looking.extend(frame(RST_STREAM, 4));
        assert!(seen(&reset_looking, 3).is_empty());
        let mut bytes = H2_PREFACE.to_vec();
        bytes.extend(frame(0x6, 8)); // PING first
        bytes.extend(frame(RST_STREAM, 4));
        assert!(seen(&bytes, 5).is_empty());
    }
}
