//! The domain crate does no I/O: no async runtime, database driver, HTTP
//! server or client is among its dependencies, direct or transitive.

use std::process::Command;

#[test]
fn no_runtime_database_or_http_crate_is_a_dependency() {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "--offline",
            "-p",
            "billing-domain",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8(out.stdout).unwrap();
    let names: Vec<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(names.contains(&"rust_decimal"), "{tree}");
    for banned in [
        "tokio",
        "sqlx",
        "axum",
        "hyper",
        "http",
        "reqwest",
        "rdkafka",
        "clickhouse",
        "tower",
    ] {
        assert!(
            !names.contains(&banned),
            "billing-domain depends on {banned}:\n{tree}"
        );
    }
}
