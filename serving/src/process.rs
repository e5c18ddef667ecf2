//! What every Tally binary does the same way at start and stop: logs and
//! the shutdown signal.

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

    extern "C" {
        #[link_name = "kill"]
        fn libc_kill(pid: i32, sig: i32) -> i32;
    }
}
