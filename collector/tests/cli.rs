//! The collector binary's command line: key hashing, config errors that
//! name the field, and the simulator's ground truth.

use std::process::Command;

fn collector() -> Command {
    Command::new(env!("CARGO_BIN_EXE_collector"))
}

#[test]
fn hash_key_prints_sha256() {
    let out = collector()
        .args(["hash-key", "dev-collector-key"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        "6aeb24d354f739abe684aa49a3f80e49886a9afe984d9f52e4d1a77292073c53"
    );
}

#[test]
fn bad_config_is_an_error_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "listen = \"nowhere\"\n[kafka]\nbrokers = \"x:1\"\npartitions = 0\n[spool]\ndir = \"/tmp/s\"\n[auth]\nkey_sha256 = [\"zz\"]\n").unwrap();
    let out = collector()
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for field in ["listen:", "kafka.partitions:", "auth.key_sha256[0]"] {
        assert!(err.contains(field), "error should name {field}: {err}");
    }
}

#[test]
fn simulate_prints_ground_truth() {
    let out = collector()
        .args([
            "simulate",
            "--customers",
            "2",
            "--apps",
            "2",
            "--minutes",
            "5",
            "--from",
            "2026-11-10T00:00:00Z",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let truth: std::collections::BTreeMap<String, String> =
        serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        truth.keys().any(|k| k.starts_with("sim-c0001/app-1/")),
        "{truth:?}"
    );
    assert!(truth
        .values()
        .all(|v| v.parse::<rust_decimal::Decimal>().is_ok()));
}
