//! The client socket as hyper sees it ([`Watched`]), and how an idle
//! HTTP/1.1 connection gives hyper's buffers back.
//!
//! hyper holds two 8 KiB buffers per HTTP/1.1 connection for as long as it
//! serves it (a read buffer it reserves before every read, and a header
//! buffer allocated with the connection), idle or not: ~19 KiB per idle
//! keep-alive connection in all, 192 MiB for 10,000. Like nginx, which
//! frees an idle connection's buffers and waits for the socket to become
//! readable, a connection idle for [`PARK_AFTER`](super::watch::PARK_AFTER)
//! between two requests is
//! *parked*: its [`Watched`] socket reports end of file to hyper, which ends
//! that connection cleanly (nothing in its buffers, nothing unsent) without
//! shutting the socket, and hands the socket back through a [`Dock`]. The
//! connection's task then holds only the socket and its follower state
//! until the client speaks again, and serves it with a new hyper connection.
//!
//! Only HTTP/1.1 parks: an HTTP/2 connection's state (settings, header
//! tables, streams) lives in hyper and cannot be rebuilt.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::watch::{ConnState, Follow};

/// A client socket and what the watch has learnt from its bytes: what lasts
/// from one hyper connection to the next.
pub struct Socket<T> {
    io: T,
    follow: Follow,
}

impl<T> Socket<T> {
    pub fn new(io: T) -> Self {
        Self { io, follow: Follow::default() }
    }

    pub fn io(&self) -> &T {
        &self.io
    }
}

/// Where a parked socket is handed back when hyper drops it.
pub struct Dock<T>(Mutex<Option<Socket<T>>>);

impl<T> Default for Dock<T> {
    fn default() -> Self {
        Self(Mutex::new(None))
    }
}

impl<T> Dock<T> {
    /// The socket, if the hyper connection that ended had parked it.
    pub fn take(&self) -> Option<Socket<T>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()
    }
}

/// A client socket that reports reads to its [`ConnState`] and parks an
/// idle HTTP/1.1 connection (see the module's text).
pub struct Watched<T> {
    /// `Some` until dropped.
    socket: Option<Socket<T>>,
    state: Arc<ConnState>,
    dock: Arc<Dock<T>>,
    /// hyper wrote since it last flushed: it may still hold bytes to send.
    dirty: bool,
    /// End of file was reported to park the connection: hand the socket
    /// back instead of shutting it.
    parked: bool,
}

impl<T> Watched<T> {
    pub fn new(socket: Socket<T>, state: Arc<ConnState>, dock: Arc<Dock<T>>) -> Self {
        Self { socket: Some(socket), state, dock, dirty: false, parked: false }
    }

    fn socket(&mut self) -> io::Result<&mut Socket<T>> {
        self.socket.as_mut().ok_or_else(|| io::Error::other("socket already handed back"))
    }
}

impl<T> Drop for Watched<T> {
    fn drop(&mut self) {
        if self.parked
            && let Some(socket) = self.socket.take()
        {
            *self.dock.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(socket);
        } else {
            self.state.socket_closed();
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.parked {
            return Poll::Ready(Ok(()));
        }
        let state = this.state.clone();
        let dirty = this.dirty;
        let socket = this.socket()?;
        // An upgraded connection's bytes are another protocol's: nothing
        // to follow, and it never parks.
        if state.is_upgraded() {
            return Pin::new(&mut socket.io).poll_read(cx, buf);
        }
        let before = buf.filled().len();
        match Pin::new(&mut socket.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                socket.follow.read(&state, &buf.filled()[before..]);
                Poll::Ready(Ok(()))
            }
            // Nothing to read, hyper holds no part of a message and has
            // sent all it wrote, and the connection has been idle long
            // enough: end of file ends hyper's connection cleanly.
            Poll::Pending if !dirty && socket.follow.between_http1_messages() && state.may_park() => {
                this.parked = true;
                Poll::Ready(Ok(()))
            }
            polled => polled,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.dirty = true;
        Pin::new(&mut self.socket()?.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.dirty = true;
        Pin::new(&mut self.socket()?.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.socket.as_ref().is_some_and(|s| s.io.is_write_vectored())
    }

    /// hyper flushes the socket only once its own write buffer is empty.
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = Pin::new(&mut self.socket()?.io).poll_flush(cx);
        if let Poll::Ready(Ok(())) = flushed {
            self.dirty = false;
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.parked {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.socket()?.io).poll_shutdown(cx)
    }
}
