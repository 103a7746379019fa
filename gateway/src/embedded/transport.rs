//! In-process connections: a worker served inside the gateway is reached
//! through the same gRPC client as any other, over in-memory pipes instead
//! of sockets. Endpoints are registered by name (`WorkerAddr::InProcess`).

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{LazyLock, Mutex, PoisonError};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

/// Bytes buffered each way in one in-process connection.
const PIPE_BYTES: usize = 256 * 1024;

static ENDPOINTS: LazyLock<Mutex<HashMap<String, mpsc::UnboundedSender<DuplexStream>>>> = LazyLock::new(Mutex::default);

/// One in-process connection, server side.
pub struct Conn(DuplexStream);

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Serve `name`: the connections clients open to it, for
/// `tonic::transport::Server::serve_with_incoming`. A second listener for a
/// name replaces the first.
pub fn listen(name: &str) -> impl futures::Stream<Item = io::Result<Conn>> + use<> {
    let (tx, rx) = mpsc::unbounded_channel();
    ENDPOINTS.lock().unwrap_or_else(PoisonError::into_inner).insert(name.to_owned(), tx);
    futures::StreamExt::map(UnboundedReceiverStream::new(rx), |io| Ok(Conn(io)))
}

/// Open a connection to `name`.
pub fn connect(name: &str) -> io::Result<DuplexStream> {
    let endpoints = ENDPOINTS.lock().unwrap_or_else(PoisonError::into_inner);
    let server = endpoints
        .get(name)
        .ok_or_else(|| io::Error::new(io::ErrorKind::ConnectionRefused, format!("no in-process worker {name:?}")))?;
    let (client, served) = tokio::io::duplex(PIPE_BYTES);
    server
        .send(served)
        .map_err(|_| io::Error::new(io::ErrorKind::ConnectionRefused, format!("in-process worker {name:?} stopped")))?;
    Ok(client)
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn a_connection_reaches_the_listener_of_its_name() {
        assert_eq!(connect("nobody").unwrap_err().kind(), io::ErrorKind::ConnectionRefused);
        let mut incoming = Box::pin(listen("t-echo"));
        let mut client = connect("t-echo").unwrap();
        let mut served = incoming.next().await.unwrap().unwrap();
        client.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        served.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        drop(incoming);
        assert!(connect("t-echo").is_err(), "a stopped listener refuses");
    }
}
