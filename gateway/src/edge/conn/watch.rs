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

/// Resets a client may send per second on one connection (requests it
/// abandons before their answer) before the connection is closed: the
/// per-second bound behind h2's pending-reset cap (rapid reset).
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
    /// Say goodbye (GOAWAY / no keep-alive) and let open requests finish.
    Goodbye(&'static str),
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
        InFlight { state: self.clone(), answered: false }
    }

    fn finish(&self, answered: bool) {
        if !answered {
            self.note_reset();
        }
        if self.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.head_started.store(NONE, Ordering::Relaxed);
            self.idle_since.store(self.now_ms(), Ordering::Release);
            self.changed.notify_one();
        }
    }

    /// A request abandoned by its client before its answer: counted per
    /// second; past [`MAX_RESETS_PER_SECOND`] the connection is doomed.
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
            return Next::Goodbye("doomed");
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
        due(self.at(self.idle_since.load(Ordering::Acquire)) + limits.idle_timeout, Next::Goodbye("idle timeout"))
    }
}

/// A request in flight; dropping it ends it (its answer was sent, or the
/// client left before it).
pub struct InFlight {
    state: Arc<ConnState>,
    answered: bool,
}

impl InFlight {
    /// The answer's head is ready: what follows is the answer's body.
    pub fn answered(&mut self) {
        self.answered = true;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.state.finish(self.answered);
    }
}

/// The client connection preface of HTTP/2.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Preface plus a frame header.
const SNIFF_LEN: usize = 24 + 9;
/// Frame type of SETTINGS.
const SETTINGS: u8 = 0x4;

/// Reads the first bytes to learn when an HTTP/2 client has sent its
/// preface and first SETTINGS frame.
enum Sniff {
    Head { buf: [u8; SNIFF_LEN], len: usize },
    Settings { remaining: usize },
    Done,
}

impl Sniff {
    /// Feed the next bytes read; true once the preface and SETTINGS are in.
    fn feed(&mut self, mut data: &[u8]) -> bool {
        if let Self::Head { buf, len } = self {
            let take = (SNIFF_LEN - *len).min(data.len());
            buf[*len..*len + take].copy_from_slice(&data[..take]);
            *len += take;
            data = &data[take..];
            let seen = (*len).min(H2_PREFACE.len());
            if buf[..seen] != H2_PREFACE[..seen] {
                *self = Self::Done;
                return false;
            }
            if *len < SNIFF_LEN {
                return false;
            }
            if buf[24 + 3] != SETTINGS {
                *self = Self::Done;
                return false;
            }
            let length = usize::from(buf[24]) << 16 | usize::from(buf[25]) << 8 | usize::from(buf[26]);
            *self = Self::Settings { remaining: length };
        }
        if let Self::Settings { remaining } = self {
            *remaining = remaining.saturating_sub(data.len());
            if *remaining == 0 {
                *self = Self::Done;
                return true;
            }
        }
        false
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
        Self { io, state, sniff: Sniff::Head { buf: [0; SNIFF_LEN], len: 0 } }
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
            if !matches!(this.sniff, Sniff::Done) && this.sniff.feed(&buf.filled()[before..]) {
                this.state.h2_ready.store(true, Ordering::Release);
            }
            this.state.on_read();
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

    #[test]
    fn sniff_sees_the_preface_and_the_whole_settings_frame_in_pieces() {
        let mut bytes = H2_PREFACE.to_vec();
        bytes.extend_from_slice(&[0, 0, 12, SETTINGS, 0, 0, 0, 0, 0]);
        bytes.extend_from_slice(&[0; 12]);
        for split in [1, 5, 24, 30, 33, 40] {
            let mut sniff = Sniff::Head { buf: [0; SNIFF_LEN], len: 0 };
            let ready: Vec<bool> = bytes.chunks(split).map(|c| sniff.feed(c)).collect();
            assert_eq!(ready.iter().filter(|r| **r).count(), 1, "split {split}");
            assert_eq!(ready.last(), Some(&true), "split {split}");
        }
        // One byte short of the frame: not ready.
        let mut sniff = Sniff::Head { buf: [0; SNIFF_LEN], len: 0 };
        assert!(!sniff.feed(&bytes[..bytes.len() - 1]));
    }

    #[test]
    fn sniff_gives_up_on_http1_and_on_a_preface_without_settings() {
        let mut sniff = Sniff::Head { buf: [0; SNIFF_LEN], len: 0 };
        assert!(!sniff.feed(b"GET / HTTP/1.1\r\n"));
        assert!(matches!(sniff, Sniff::Done));
        let mut bytes = H2_PREFACE.to_vec();
        bytes.extend_from_slice(&[0, 0, 0, 0x6, 0, 0, 0, 0, 0]);
        let mut sniff = Sniff::Head { buf: [0; SNIFF_LEN], len: 0 };
        assert!(!sniff.feed(&bytes));
        assert!(matches!(sniff, Sniff::Done));
    }
}
