//! The `collector serve` process at its HTTP edge (issue 11 item 9): a head
//! hyper cannot parse (a 100 kB path: 414) is answered with the
//! `{code, message}` envelope like every other error, and normal requests
//! on the same server still work.

use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use testkit::http::read_one;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_uri_over_the_limit_gets_the_envelope_from_the_real_server() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let brokers = std::env::var("TALLY_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:19092".into());
    let config = dir.path().join("collector.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\n\
             checkpoint_dir = {checkpoints:?}\n\
             shutdown_timeout_secs = 5\n\
             [kafka]\nbrokers = \"{brokers}\"\ntopic = \"http-edges-{port}\"\npartitions = 1\ndelivery_timeout_ms = 2000\n\
             [spool]\ndir = {spool:?}\n\
             [auth]\nkey_sha256 = [\"6aeb24d354f739abe684aa49a3f80e49886a9afe984d9f52e4d1a77292073c53\"]\n",
            checkpoints = dir.path().join("checkpoints").display().to_string(),
            spool = dir.path().join("spool").display().to_string(),
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_collector"))
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while http.get(format!("{base}/healthz")).send().await.is_err() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "collector exited at start"
        );
        assert!(Instant::now() < deadline, "collector did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    // A normal request first, on the kept-alive connection.
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let (status, _, body) = read_one(&mut s).await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    let long = format!(
        "POST /v1/events/{} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer dev-collector-key\r\ncontent-length: 2\r\n\r\n[]",
        "e".repeat(100_000)
    );
    // The server may answer and close before it has read all of it.
    let _ = s.write_all(long.as_bytes()).await;
    let (status, head, body) = tokio::time::timeout(Duration::from_secs(10), read_one(&mut s))
        .await
        .expect("an answer to the long path");
    assert_eq!(status, 414, "{head}");
    assert!(head.contains("content-type: application/json"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["code"], "uri_too_long", "{v}");
    assert!(
        v["message"].as_str().is_some_and(|m| m.contains("longer")),
        "{v}"
    );
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .expect("the connection closes after the 414")
        .unwrap();
    assert!(rest.is_empty());

    // The same server still answers, errors in the envelope as before.
    let r = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = http.get(format!("{base}/nowhere")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["code"], "not_found", "{v}");
    let r = http
        .post(format!("{base}/v1/events"))
        .bearer_auth("dev-collector-key")
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(v["code"].is_string(), "{v}");

    // SIGTERM still stops it cleanly.
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status}");
}
