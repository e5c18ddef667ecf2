//! The embedded build links no Kafka client: `tally` is built from the
//! collector, aggregator and billing-api crates without their `kafka` feature, so
//! neither rdkafka nor librdkafka (rdkafka-sys) is among its dependencies,
//! direct or transitive, while the distributed crates keep theirs.

use testkit::deps::normal_dependencies;

#[test]
fn tally_builds_without_librdkafka() {
    for package in ["embedded"] {
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
    for package in ["collector", "aggregator", "billing-api"] {
        let deps = normal_dependencies(package);
        assert!(
            deps.iter().any(|d| d == "rdkafka-sys"),
            "{package}: {deps:?}"
        );
    }
}
