use super::*;
use axum::routing::get;
use axum::Router;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const DATE: &[u8] = b"date: Wed, 02 Dec 2026 14:28:46 GMT";

#[test]
fn finds_the_canned_head_only_at_the_end() {
    let canned = b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\ndate: Wed, 02 Dec 2026 14:28:46 GMT\r\n\r\n";
    let (start, c) = canned_error(canned).unwrap();
    assert_eq!(start, 0);
    assert_eq!(c.status, 414);
    assert_eq!(c.date, Some(DATE));
    // After the end of an earlier response on the same connection.
    let mut both = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi".to_vec();
    let first = both.len();
    both.extend_from_slice(canned);
    assert_eq!(canned_error(&both).unwrap().0, first);
    for (head, status) in [
        (&b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n"[..], 400),
        (
            b"HTTP/1.0 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            431,
        ),
    ] {
        assert_eq!(canned_error(head).unwrap().1.status, status);
    }
    // Not canned: a body, a content type, another status, an unfinished head.
    for head in [
        &b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 0\r\n\r\n"
            [..],
        b"HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\n\r\n",
        b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\n",
        b"HTTP/1.1 4140 URI Too Long\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
    ] {
        assert_eq!(
            canned_error(head),
            None,
            "{}",
            String::from_utf8_lossy(head)
        );
    }
}

#[test]
fn the_replacement_is_an_envelope_with_its_length() {
    let c = parse_canned(b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\ndate: Wed, 02 Dec 2026 14:28:46 GMT\r\n\r\n").unwrap();
    let r = Response::parse(&c.envelope_response());
    assert_eq!(r.status, 414);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(r.header("date"), Some("Wed, 02 Dec 2026 14:28:46 GMT"));
    assert_eq!(r.json()["code"], "uri_too_long");
}

/// One HTTP/1.1 response read off the wire.
#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// The bytes after this response.
    rest: Vec<u8>,
}

impl Response {
    /// Parses the first response in `raw`, whose body has a content-length.
    fn parse(raw: &[u8]) -> Response {
        let end = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no head end in {:?}", String::from_utf8_lossy(raw)));
        let head = std::str::from_utf8(&raw[..end]).unwrap();
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap()[9..12].parse().unwrap();
        let headers: Vec<(String, String)> = lines
            .map(|l| {
                let (k, v) = l.split_once(':').unwrap();
                (k.to_ascii_lowercase(), v.trim().to_owned())
            })
            .collect();
        let len: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .map(|(_, v)| v.parse().unwrap())
            .expect("content-length");
        let body_end = end + 4 + len;
        assert!(
            raw.len() >= body_end,
            "short body: {:?}",
            String::from_utf8_lossy(raw)
        );
        Response {
            status,
            headers,
            body: raw[end + 4..body_end].to_vec(),
            rest: raw[body_end..].to_vec(),
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// Reads until the peer closes the connection.
async fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("the server should close the connection")
        .unwrap();
    out
}

/// Reads up to the end of the first response head (the blank line), or
/// what came before the peer closed.
async fn read_head(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
                out.truncate(end + 4);
                return;
            }
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), read)
        .await
        .expect("the server should answer");
    out
}

/// Reads one response with a content-length off a kept-alive connection.
async fn read_one(s: &mut TcpStream) -> Response {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&out[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .unwrap();
            if out.len() >= end + 4 + len {
                return Response::parse(&out);
            }
        }
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&out));
        out.extend_from_slice(&buf[..n]);
    }
}

fn app() -> Router {
    Router::new().route("/hello", get(|| async { "hi" }))
}

/// Serves `app()` through [`JsonErrors`] (or not) until `stop` fires.
async fn start(
    wrapped: bool,
) -> (
    std::net::SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let stop = async move {
        let _ = rx.await;
    };
    let task = tokio::spawn(async move {
        if wrapped {
            axum::serve(JsonErrors::new(listener), app())
                .with_graceful_shutdown(stop)
                .await
                .unwrap()
        } else {
            axum::serve(listener, app())
                .with_graceful_shutdown(stop)
                .await
                .unwrap()
        }
    });
    (addr, tx, task)
}

fn long_path() -> String {
    format!("/{}", "a".repeat(100_000))
}

/// What hyper writes by itself is what [`parse_canned`] recognises: fails
/// when a hyper upgrade changes its canned answers.
#[tokio::test]
async fn hypers_own_answers_are_recognised() {
    let (addr, stop, task) = start(false).await;
    let huge_header = format!("x-big: {}\r\n", "b".repeat(500_000));
    for (request, status) in [
        (
            format!("GET {} HTTP/1.1\r\nhost: x\r\n\r\n", long_path()),
            414,
        ),
        (format!("GET / HTTP/1.1\r\n{huge_header}\r\n"), 431),
        ("NOT HTTP AT ALL\r\n\r\n".to_owned(), 400),
    ] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        // The server may answer and close before it has read all of it.
        let _ = s.write_all(request.as_bytes()).await;
        // The canned answer is a bodiless head: read it, not to the close.
        // Hyper on its own (no `JsonErrors`) decides when to close a
        // connection it refused, and once under load (CI, 2026-12-04) that
        // outlasted a 10 s read to the close; when is not what this test
        // is about.
        let raw = read_head(&mut s).await;
        let c = parse_canned(&raw)
            .unwrap_or_else(|| panic!("not recognised: {:?}", String::from_utf8_lossy(&raw)));
        assert_eq!(c.status, status);
    }
    stop.send(()).unwrap();
    task.await.unwrap();
}

#[tokio::test]
async fn parse_errors_get_the_envelope_and_normal_requests_are_untouched() {
    let (addr, stop, task) = start(true).await;
    let huge_header = format!("x-big: {}\r\n", "b".repeat(500_000));
    let many_headers: String = (0..120).map(|i| format!("x-h{i}: v\r\n")).collect();
    for (request, status, code) in [
        (
            format!("GET {} HTTP/1.1\r\nhost: x\r\n\r\n", long_path()),
            414,
            "uri_too_long",
        ),
        (
            format!("GET /hello HTTP/1.1\r\n{huge_header}\r\n"),
            431,
            "headers_too_large",
        ),
        (
            format!("GET /hello HTTP/1.1\r\n{many_headers}\r\n"),
            431,
            "headers_too_large",
        ),
        (
            "NOT HTTP AT ALL\r\n\r\n".to_owned(),
            400,
            "malformed_request",
        ),
    ] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        // Kept alive: a normal request first, answered as usual.
        s.write_all(b"GET /hello HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let ok = read_one(&mut s).await;
        assert_eq!((ok.status, &ok.body[..]), (200, &b"hi"[..]));
        assert_eq!(ok.header("connection"), None);
        let _ = s.write_all(request.as_bytes()).await;
        let raw = read_to_close(&mut s).await;
        let r = Response::parse(&raw);
        assert_eq!(r.status, status, "{r:?}");
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.header("connection"), Some("close"));
        assert!(r.header("date").is_some());
        assert_eq!(r.json()["code"], code);
        assert!(r.json()["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert!(r.rest.is_empty(), "{r:?}");
    }

    // Pipelined: a normal request and a long one in one write; the first is
    // answered, then the envelope.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let both = format!(
        "GET /hello HTTP/1.1\r\nhost: x\r\n\r\nGET {} HTTP/1.1\r\nhost: x\r\n\r\n",
        long_path()
    );
    let _ = s.write_all(both.as_bytes()).await;
    let raw = read_to_close(&mut s).await;
    let first = Response::parse(&raw);
    assert_eq!((first.status, &first.body[..]), (200, &b"hi"[..]));
    let second = Response::parse(&first.rest);
    assert_eq!(second.status, 414);
    assert_eq!(second.json()["code"], "uri_too_long");

    // Graceful shutdown still ends the server, with a connection open.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /hello HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_one(&mut idle).await.status, 200);
    stop.send(()).unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(10), task)
        .await
        .expect("graceful shutdown")
        .unwrap();
}
