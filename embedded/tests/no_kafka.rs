//! The embedded build links no Kafka client: `tally` is built from the
//! collector and aggregator crates without their `kafka` feature, so
//! neither rdkafka nor librdkafka (rdkafka-sys) is among its dependencies,
//! direct or transitive, while the distributed crates keep theirs.

use std::process::Command;

fn normal_dependencies(package: &str) -> Vec<String> {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "--offline",
            "-p",
            package,
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
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

#[test]
fn tally_and_billing_api_build_without_librdkafka() {
    for package in ["embedded", "billing-api"] {
        let deps = normal_dependencies(package);
        assert!(
            deps.iter().any(|d| d == "aggregator"),
            "{package}: {deps:?}"
        );
        for banned in ["rdkafka", "rdkafka-sys"] {
            assert!(
                !deps.iter().any(|d| d == banned),
                "{package} depends on {banned}: {deps:?}"
            );
        }
    }
}

#[test]
fn the_distributed_binaries_keep_their_kafka_client() {
    for package in ["collector", "aggregator"] {
        let deps = normal_dependencies(package);
        assert!(
            deps.iter().any(|d| d == "rdkafka-sys"),
            "{package}: {deps:?}"
        );
    }
}
