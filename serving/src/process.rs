//! What every Tally binary does the same way at start and stop: logs, the
//! shutdown signal, and an ordered shutdown with a time limit.
//!
//! # Ordered shutdown
//!
//! On the signal a binary stops in stages, in order: stop accepting
//! connections and let open requests finish ([`serve`]), then stop the
//! background work (the batch, finalization run or flush in hand is
//! finished), then release what is left. One time limit (`--shutdown-
//! timeout-secs`, 30 s by default) covers all stages together: a
//! [`Deadline`] is fixed when the signal arrives and every stage waits at
//! most until it ([`Deadline::stage`]); a stage still running then is
//! abandoned with a warning naming it, and the next one starts. Nothing
//! that was acknowledged is lost by abandoning a stage: each binary only
//! acknowledges work it has made durable, so what is cut short is redone
//! at the next start (a batch consumed again, a finalization resumed).

use std::future::{Future, IntoFuture};
use std::time::Duration;

/// Structured logs on stderr through `tracing`: the filter from `RUST_LOG`
/// (default `info`), one JSON object per line when `TALLY_LOG_FORMAT=json`,
/// human-readable lines otherwise. Call once, first thing in `main`.
pub fn init_tracing() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json_logs(std::env::var("TALLY_LOG_FORMAT").ok().as_deref()) {
        b.json().init()
    } else {
        b.init()
    }
}

/// Whether `TALLY_LOG_FORMAT` asks for JSON lines.
fn json_logs(format: Option<&str>) -> bool {
    format == Some("json")
}

/// Completes on SIGTERM or Ctrl-C (SIGINT): where a binary starts its
/// ordered shutdown.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("signal handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// The instant by which an ordered shutdown must be over.
#[derive(Debug, Clone, Copy)]
pub struct Deadline(tokio::time::Instant);

impl Deadline {
    /// `limit` from now: call when the shutdown signal arrives.
    pub fn after(limit: Duration) -> Self {
        Deadline(tokio::time::Instant::now() + limit)
    }

    /// Waits for one stage of the shutdown until the deadline. `None`: the
    /// stage was still running at the deadline and is abandoned (dropped),
    /// with a warning naming it.
    pub async fn stage<T>(self, name: &str, work: impl Future<Output = T>) -> Option<T> {
        match tokio::time::timeout_at(self.0, work).await {
            Ok(v) => Some(v),
            Err(_) => {
                tracing::warn!(
                    stage = name,
                    "shutdown time limit reached; abandoning this stage"
                );
                None
            }
        }
    }
}

/// Serves `router` on `listener` (its connections through
/// [`crate::JsonErrors`]) until `stop` completes, then stops accepting and
/// lets open requests finish for at most `limit`. A request still open
/// then is abandoned: `serve` returns, and its connection task (spawned by
/// hyper) ends with the process. Returns the deadline of the rest of the
/// shutdown, `limit` after `stop` completed, for the stages that follow.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    stop: impl Future<Output = ()> + Send + 'static,
    limit: Duration,
) -> std::io::Result<Deadline> {
    let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel::<Deadline>();
    let graceful = async move {
        stop.await;
        let _ = stopped_tx.send(Deadline::after(limit));
    };
    let server = axum::serve(crate::JsonErrors::new(listener), router)
        .with_graceful_shutdown(graceful)
        .into_future();
    tokio::pin!(server);
    let mut stopped_rx = stopped_rx;
    let deadline = tokio::select! {
        r = &mut server => {
            r?;
            return Ok(Deadline::after(limit));
        }
        d = &mut stopped_rx => d.unwrap_or_else(|_| Deadline::after(limit)),
    };
    if let Some(r) = deadline.stage("http", &mut server).await {
        r?
    }
    Ok(deadline)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_json_asks_for_json_lines() {
        assert!(json_logs(Some("json")));
        assert!(!json_logs(Some("text")));
        assert!(!json_logs(Some("JSON ")));
        assert!(!json_logs(None));
    }

    #[tokio::test]
    async fn sigterm_ends_the_wait() {
        let wait = tokio::spawn(shutdown_signal());
        // Let the handler install before the signal is sent.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let me = std::process::id() as i32;
        assert_eq!(unsafe { libc_kill(me, 15) }, 0);
        tokio::time::timeout(std::time::Duration::from_secs(10), wait)
            .await
            .expect("shutdown_signal returned after SIGTERM")
            .unwrap();
    }

    #[tokio::test]
    async fn a_stage_past_the_deadline_is_abandoned_and_the_next_still_runs() {
        let d = Deadline::after(Duration::from_millis(50));
        assert_eq!(d.stage("stuck", std::future::pending::<u8>()).await, None);
        // The deadline has passed: only work that is already done gets in.
        assert_eq!(d.stage("ready", async { 7 }).await, Some(7));
        let later = Deadline::after(Duration::from_secs(60));
        assert_eq!(later.stage("quick", async { 1 }).await, Some(1));
    }

    /// A request that never finishes does not hold the process: after the
    /// stop, `serve` waits for it only until the limit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serve_stops_within_the_limit_despite_a_hung_request() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (entered_tx, entered_rx) = tokio::sync::oneshot::channel::<()>();
        let entered = std::sync::Mutex::new(Some(entered_tx));
        let entered = std::sync::Arc::new(entered);
        let router = axum::Router::new()
            .route(
                "/hang",
                axum::routing::get(move || {
                    let entered = entered.clone();
                    async move {
                        if let Some(tx) = entered.lock().unwrap().take() {
                            let _ = tx.send(());
                        }
                        std::future::pending::<()>().await;
                        "never"
                    }
                }),
            )
            .route("/ok", axum::routing::get(|| async { "ok" }));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            listener,
            router,
            async move {
                let _ = stop_rx.await;
            },
            Duration::from_millis(300),
        ));
        // A normal request is answered.
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /ok HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut got = String::new();
        c.read_to_string(&mut got).await.unwrap();
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");
        // One that hangs is in its handler when the stop comes.
        let mut hung = tokio::net::TcpStream::connect(addr).await.unwrap();
        hung.write_all(b"GET /hang HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        entered_rx.await.unwrap();
        stop_tx.send(()).unwrap();
        // Generous: the assertion is that it ends at all, not how fast.
        tokio::time::timeout(Duration::from_secs(30), server)
            .await
            .expect("serve returned although a request was still open")
            .unwrap()
            .unwrap();
        drop(hung);
    }

    extern "C" {
        #[link_name = "kill"]
        fn libc_kill(pid: i32, sig: i32) -> i32;
    }
}
