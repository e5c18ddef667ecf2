//! The domain crate does no I/O: no async runtime, database driver, HTTP
//! server or client is among its dependencies, direct or transitive.

use testkit::deps::normal_dependencies;

#[test]
fn no_runtime_database_or_http_crate_is_a_dependency() {
    let names = normal_dependencies("billing-domain");
    assert!(names.iter().any(|n| n == "rust_decimal"), "{names:?}");
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
            !names.iter().any(|n| n == banned),
            "billing-domain depends on {banned}:\n{names:?}"
        );
    }
}
