//! Telling HTTP/1 from HTTP/2 by a connection's first bytes, and handing those bytes back to
//! the protocol chosen.
//!
//! hyper-util's automatic detection reads them without a timer and cannot pass hyper's HTTP/1
//! head size limit on; reading them here lets the caller bound the wait and pick each
//! protocol's own builder.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The start of every HTTP/2 connection with prior knowledge (RFC 9113 section 3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Protocol {
    Http1,
    Http2,
}

/// Reads until the bytes so far tell the protocol: the HTTP/2 preface, or anything that is not
/// its beginning. `None` when the peer closes first.
pub(super) async fn detect<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> io::Result<Option<(Protocol, Vec<u8>)>> {
    let mut read = Vec::with_capacity(1024);
    loop {
        if read.len() >= PREFACE.len() && read.starts_with(PREFACE) {
            return Ok(Some((Protocol::Http2, read)));
        }
        if !PREFACE.starts_with(&read[..read.len().min(PREFACE.len())]) {
            return Ok(Some((Protocol::Http1, read)));
        }
        if stream.read_buf(&mut read).await? == 0 {
            return Ok(None);
        }
    }
}

/// A stream whose first bytes were already read: they are read again first.
#[derive(Debug)]
pub(super) struct Replayed<S> {
    read: Vec<u8>,
    at: usize,
    stream: S,
}

impl<S> Replayed<S> {
    pub(super) fn new(read: Vec<u8>, stream: S) -> Self {
        Self {
            read,
            at: 0,
            stream,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replayed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.at < this.read.len() {
            let n = buf.remaining().min(this.read.len() - this.at);
            buf.put_slice(&this.read[this.at..this.at + n]);
            this.at += n;
            if this.at == this.read.len() {
                this.read = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replayed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    #[tokio::test]
    async fn the_preface_is_http2_anything_else_http1_and_both_are_read_again() {
        for (sent, expected) in [
            (
                &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04"[..],
                Protocol::Http2,
            ),
            (&b"GET / HTTP/1.1\r\n\r\n"[..], Protocol::Http1),
            (&b"PRI * HTTP/1.1\r\n\r\n"[..], Protocol::Http1),
        ] {
            let (mut client, mut server) = tokio::io::duplex(1024);
            // A byte at a time, as a slow client sends it.
            let writer = tokio::spawn(async move {
                for byte in sent {
                    tokio::io::AsyncWriteExt::write_all(&mut client, &[*byte])
                        .await
                        .unwrap();
                }
            });
            let (protocol, read) = detect(&mut server).await.unwrap().unwrap();
            assert_eq!(protocol, expected, "{sent:?}");
            writer.await.unwrap();
            let mut replayed = Replayed::new(read, server);
            let mut again = vec![0; sent.len()];
            replayed.read_exact(&mut again).await.unwrap();
            assert_eq!(again, sent);
        }
    }

    #[tokio::test]
    async fn a_peer_that_closes_early_is_no_protocol() {
        let (client, mut server) = tokio::io::duplex(64);
        drop(client);
        assert!(detect(&mut server).await.unwrap().is_none());
    }
}
