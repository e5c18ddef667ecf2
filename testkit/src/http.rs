//! HTTP read off a raw connection, for tests of what the servers write on
//! the wire (hyper's own answers, kept-alive connections).

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Reads one response whose body has a content-length; `(status, head, body)`.
pub async fn read_one(s: &mut TcpStream) -> (u16, String, String) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let lower = head.to_ascii_lowercase();
            let len: usize = lower
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .expect("content-length");
            if body.len() >= len {
                assert_eq!(body.len(), len, "nothing after the body: {text}");
                return (head[9..12].parse().unwrap(), lower, body.to_owned());
            }
        }
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed early: {text}");
        got.extend_from_slice(&buf[..n]);
    }
}
