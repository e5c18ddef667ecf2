#![doc = include_str!("../README.md")]
//!
//! # What hyper answers by itself
//!
//! hyper answers a request head it cannot parse before any router sees the
//! request: `414 URI Too Long` for a request target over 65 534 bytes,
//! `431 Request Header Fields Too Large` for a head over its buffer limit
//! (about 400 KiB) or over 100 headers, `400 Bad Request` for a head that
//! is not HTTP/1.x. That answer is a bodiless head (`content-length: 0`,
//! `date`), written once, after which hyper closes the connection. No
//! router layer can change it, and hyper has no hook for it.
//!
//! # Decision
//!
//! [`JsonErrors`] wraps the listener given to `axum::serve`; its
//! connections ([`JsonErrorIo`]) pass reads through untouched and rewrite
//! exactly that canned head on the way out into the same status with a
//! JSON envelope body (`uri_too_long`, `headers_too_large`,
//! `malformed_request`), `content-type: application/json`, the right
//! `content-length` and `connection: close`. Everything else about serving
//! (keep-alive, pipelining, graceful shutdown, accept-error back-off) stays
//! axum's and hyper's, unchanged.
//!
//! Alternatives considered: an accept loop of our own over hyper_util and
//! hyper's http1 builder would reimplement graceful shutdown for no gain,
//! since hyper writes the canned answer in either case and only the bytes
//! on the wire can be changed; a pre-parse of request heads would have to
//! follow request framing (content-length, chunked bodies, pipelining) to
//! find every head on a kept-alive connection, duplicating hyper's parser.
//!
//! Why the rewrite is exact: the connection reports that it does not take
//! vectored writes, so hyper flattens its output into one buffer and each
//! `poll_write` receives everything still unwritten. The canned head is the
//! last thing hyper ever writes on a connection, so it is found only as the
//! very end of such a buffer: a status line `HTTP/1.x 400|414|431 ...`
//! followed by nothing but `content-length: 0`, `date` and `connection`
//! headers and the blank line. Bytes before it (the end of an earlier
//! response on the same connection) are written first, unchanged. A
//! response of a handler could only look like that if it were a bodiless
//! 400/414/431 without a content type; neither API answers one (billing-api
//! turns every non-JSON error into the envelope, the collector answers
//! errors with JSON only), and if one did it would be answered with the
//! envelope, which is still a correct error answer. The cost of flattening:
//! hyper copies response bodies into its write buffer instead of handing
//! them to `writev`, a memcpy of answers that are small JSON documents and
//! assets.

pub mod config;
mod envelope;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod process;
mod secret;

pub use envelope::{error_response, Envelope};
pub use secret::Secret;

use axum::serve::Listener;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A listener whose connections answer hyper's parse-error responses with
/// the JSON error envelope (see the [crate docs](crate)).
///
/// `axum::serve(JsonErrors::new(listener), router)`.
pub struct JsonErrors<L>(L);

impl<L> JsonErrors<L> {
    pub fn new(listener: L) -> Self {
        JsonErrors(listener)
    }
}

impl<L: Listener> Listener for JsonErrors<L> {
    type Io = JsonErrorIo<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, addr) = self.0.accept().await;
        (JsonErrorIo::new(io), addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// One connection of [`JsonErrors`]: reads pass through; hyper's canned
/// parse-error head is replaced by the same status with an envelope body.
pub struct JsonErrorIo<T> {
    inner: T,
    /// The replacement answer still to be written, from `written`.
    replacement: Vec<u8>,
    written: usize,
}

impl<T> JsonErrorIo<T> {
    pub fn new(inner: T) -> Self {
        JsonErrorIo {
            inner,
            replacement: Vec::new(),
            written: 0,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncWrite + Unpin> JsonErrorIo<T> {
    /// Writes what is left of the replacement answer.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.replacement.len() {
            let n = ready!(
                Pin::new(&mut self.inner).poll_write(cx, &self.replacement[self.written..])
            )?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for JsonErrorIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for JsonErrorIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_drain(cx))?;
        match canned_error(buf) {
            // Up to the canned head first, so that it starts a later write.
            Some((start, _)) if start > 0 => {
                Pin::new(&mut this.inner).poll_write(cx, &buf[..start])
            }
            Some((_, canned)) => {
                this.replacement = canned.envelope_response();
                this.written = 0;
                // The canned head counts as written; the replacement goes
                // out here and in the flush hyper always calls next.
                let _ = this.poll_drain(cx)?;
                Poll::Ready(Ok(buf.len()))
            }
            None => Pin::new(&mut this.inner).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    /// Not vectored: hyper then flattens its output, so the canned head
    /// always arrives whole, at the end of one write (see the crate docs).
    fn is_write_vectored(&self) -> bool {
        false
    }
}

/// hyper's canned answer to a request head it could not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Canned<'a> {
    /// `HTTP/1.1 414 URI Too Long`, without the line end.
    status_line: &'a [u8],
    status: u16,
    /// The `date` header line hyper wrote, without the line end.
    date: Option<&'a [u8]>,
}

/// The longest canned head looked for: a status line and three short
/// headers are about 130 bytes.
const MAX_CANNED: usize = 512;

/// Where hyper's canned parse-error head starts in `buf`, if `buf` ends
/// with one.
fn canned_error(buf: &[u8]) -> Option<(usize, Canned<'_>)> {
    if !buf.ends_with(b"\r\n\r\n") {
        return None;
    }
    let from = buf.len().saturating_sub(MAX_CANNED);
    // The head starts at the last status line: a canned head contains only
    // one, and header values of the allowed headers never hold "HTTP/1.".
    let start = from + rfind(&buf[from..], b"HTTP/1.")?;
    parse_canned(&buf[start..]).map(|c| (start, c))
}

fn rfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).rposition(|w| w == needle)
}

fn parse_canned(head: &[u8]) -> Option<Canned<'_>> {
    // The head without its blank line, each line ending in CRLF.
    let head = head.strip_suffix(b"\r\n")?;
    let mut lines = head
        .split_inclusive(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r\n"));
    let status_line = lines.next()??;
    // "HTTP/1.x SSS reason"
    if status_line.len() < 12
        || !(status_line.starts_with(b"HTTP/1.1 ") || status_line.starts_with(b"HTTP/1.0 "))
        || status_line.get(12).is_some_and(|&b| b != b' ')
    {
        return None;
    }
    let status = match &status_line[9..12] {
        b"400" => 400,
        b"414" => 414,
        b"431" => 431,
        _ => return None,
    };
    let mut date = None;
    let mut empty_length = false;
    for line in lines {
        let line = line?;
        let colon = line.iter().position(|&b| b == b':')?;
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"content-length") && value == b"0" && !empty_length {
            empty_length = true;
        } else if name.eq_ignore_ascii_case(b"date") && date.is_none() {
            date = Some(line);
        } else if name.eq_ignore_ascii_case(b"connection") {
        } else {
            return None;
        }
    }
    empty_length.then_some(Canned {
        status_line,
        status,
        date,
    })
}

impl Canned<'_> {
    /// `(code, message)` of the envelope for this status.
    fn code_and_message(&self) -> (&'static str, &'static str) {
        match self.status {
            414 => (
                "uri_too_long",
                "the request target (path and query) is longer than the server accepts (65534 bytes)",
            ),
            431 => (
                "headers_too_large",
                "the request's headers are larger than the server accepts (about 400 KiB in all, at most 100 headers)",
            ),
            _ => (
                "malformed_request",
                "the request could not be read as HTTP/1.1 (request line or headers malformed)",
            ),
        }
    }

    /// The whole answer: the same status and date, the envelope as body.
    fn envelope_response(&self) -> Vec<u8> {
        let (code, message) = self.code_and_message();
        let body = Envelope::new(code, message).to_json();
        let mut out = Vec::with_capacity(256 + body.len());
        out.extend_from_slice(self.status_line);
        out.extend_from_slice(b"\r\ncontent-type: application/json\r\ncontent-length: ");
        out.extend_from_slice(body.len().to_string().as_bytes());
        out.extend_from_slice(b"\r\nconnection: close\r\n");
        if let Some(date) = self.date {
            out.extend_from_slice(date);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&body);
        out
    }
}

#[cfg(test)]
mod tests;
