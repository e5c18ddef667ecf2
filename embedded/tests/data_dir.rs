//! The embedded data directory is private: created 0700 with every file in
//! it owner-only (the SQLite databases and their -wal/-shm files as much
//! as the keys), a looser existing directory is tightened, and no start
//! prints a key (keys stay in their files, out of logs).

use testkit::system as support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use support::pipeline::{bin, free_port, wait_http};

/// Starts `tally serve` on `dir` with keys of its own, lets it write (an
/// event through the ingest API), stops it; returns what it printed.
async fn run_once(dir: &Path) -> String {
    let (ip, bp) = (free_port(), free_port());
    let out = dir.with_extension(format!("out-{ip}"));
    let mut child = Command::new(bin("tally"))
        .arg("serve")
        .arg("--data-dir")
        .arg(dir)
        .args(["--listen", &format!("127.0.0.1:{bp}")])
        .args(["--ingest-listen", &format!("127.0.0.1:{ip}")])
        .env_remove("TALLY_ADMIN_KEY_SHA256")
        .env_remove("TALLY_SESSION_SECRET")
        .env("RUST_LOG", "info")
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(Stdio::from(
            std::fs::File::create(out.with_extension("err")).unwrap(),
        ))
        .spawn()
        .unwrap();
    wait_http(
        &format!("http://127.0.0.1:{ip}/healthz"),
        Duration::from_secs(60),
    );
    wait_http(
        &format!("http://127.0.0.1:{bp}/healthz"),
        Duration::from_secs(60),
    );
    let key = std::fs::read_to_string(dir.join("ingest.key")).unwrap();
    let now = chrono::Utc::now().to_rfc3339();
    let r = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{ip}/v1/events"))
        .bearer_auth(key.trim())
        .header("content-type", "application/cloudevents+json")
        .body(format!(
            r#"{{"specversion":"1.0","id":"p-{ip}","source":"t","type":"tally.requests","subject":"cus_p","time":"{now}","data":{{"app":"web","count":1}}}}"#
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    Command::new("kill")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
    std::fs::read_to_string(&out).unwrap()
        + &std::fs::read_to_string(out.with_extension("err")).unwrap()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_directory_is_private_and_keys_are_never_printed() {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("tally-data");
    let first = run_once(&dir).await;
    let second = run_once(&dir).await;
    let keys: Vec<String> = ["admin.key", "ingest.key", "session.secret"]
        .iter()
        .map(|k| {
            std::fs::read_to_string(dir.join(k))
                .unwrap()
                .trim()
                .to_owned()
        })
        .collect();
    for (i, out) in [first, second].iter().enumerate() {
        for k in &keys {
            assert!(
                !out.contains(k.as_str()),
                "start {} printed a key:\n{out}",
                i + 1
            );
        }
        assert!(
            out.contains("admin.key"),
            "start {} does not say where the key is:\n{out}",
            i + 1
        );
    }
    assert_eq!(mode(&dir), 0o700);
    let mut files = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            files += 1;
            assert_eq!(mode(&p), 0o600, "{} is {:o}", p.display(), mode(&p));
        }
    }
    assert!(
        dir.join("usage.db-wal").exists() || files >= 5,
        "the databases were written"
    );
    assert!(files >= 5, "keys and databases: {files} files");

    // A directory made readable by others (and a database file) is
    // tightened on the next start.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(dir.join("state.db"), std::fs::Permissions::from_mode(0o644)).unwrap();
    run_once(&dir).await;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("state.db")), 0o600);
}
