//! What one connection is doing, as its deadlines need to know: whether it
//! has finished its handshake, how many requests it has in flight, since
//! when it has been idle, and when the head it is reading began.
//!
//! The socket wrapper ([`Watched`]) and the per-request token
//! ([`InFlight`]) write it; the connection's task ([`ConnState::next`])
//! reads it to decide when to close.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::ConnLimits;

/// `head_started` when no head is being read.
const NONE: u64 = u64::MAX;

/// HTTP/2 stream resets (RST_STREAM frames) a client may send per second on
/// one connection before it gets GOAWAY. h2 itself only bounds resets of
/// streams not yet accepted *at once*, which a fast server never reaches
/// while a rapid-reset client makes it parse and drop streams without end.
pub const MAX_RESETS_PER_SECOND: u32 = 200;

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
    /// Woken when the connection turns idle, starts reading a head, or is doomed.
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
        due(
            self.at(self.idle_since.load(Ordering::Acquire)) + limits.idle_timeout,
            Next::Goodbye { why: "idle timeout", idle: true },
        )
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

/// Follows the frames a client sends, without keeping them: when an HTTP/2
/// client has sent its preface and first SETTINGS frame, and each stream
/// reset it sends. Anything that is not HTTP/2 is left alone at once.
enum Sniff {
    /// Matching the preface; `seen` bytes so far.
    Preface { seen: usize },
    /// Between frames: `have` bytes of the next header, or `skip` bytes of
    /// the current payload left. `first`: the SETTINGS that must open.
    Frames { header: [u8; FRAME_HEADER], have: usize, skip: usize, first: bool },
    /// Not HTTP/2, or a first frame that is not SETTINGS (hyper answers it).
    Done,
}

/// What the frames said.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// The preface and the first SETTINGS frame are in.
    Ready,
    Reset,
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
                Self::Preface { seen } => {
                    let take = (H2_PREFACE.len() - *seen).min(data.len());
                    if data[..take] != H2_PREFACE[*seen..*seen + take] {
                        *self = Self::Done;
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
                    if kind == RST_STREAM {
                        on(Seen::Reset);
                    }
                    if *skip == 0 && std::mem::take(first) {
                        on(Seen::Ready);
                    }
                }
            }
        }
    }
}

/// A client socket that reports reads to its [`ConnState`].
pub struct Watched<T> {
    io: T,
    state: Arc<ConnState>,
    sniff: Sniff,
}

impl<T> Watched<T> {
    pub fn new(io: T, state: Arc<ConnState>) -> Self {
        Self { io, state, sniff: Sniff::new() }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled
            && buf.filled().len() > before
        {
            let this = &mut *self;
            let state = &this.state;
            this.sniff.feed(&buf.filled()[before..], &mut |seen| match seen {
                Seen::Ready => state.h2_ready.store(true, Ordering::Release),
                Seen::Reset => state.note_reset(),
            });
            state.on_read();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
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
        for split in [1, 5, 24, 30, 33, 40, 4096] {
            assert_eq!(seen(&bytes, split), vec![Seen::Ready, Seen::Reset, Seen::Reset], "split {split}");
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
