//! The Kafka pieces both Kafka clients share (the collector's sink and the
//! aggregator's consumer): creating a topic and reading a header. Built
//! only with the `kafka` feature, so the embedded build links no
//! librdkafka.

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{BorrowedHeaders, Headers};
use std::time::Duration;

/// Creates `topic` with `partitions` partitions (replication factor 1) if
/// it is missing; a topic that exists already is left as it is, whatever
/// its partition count, so this is safe to call at every start.
pub async fn ensure_topic(brokers: &str, topic: &str, partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let t = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for r in admin.create_topics([&t], &options).await? {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => anyhow::bail!("creating topic {name}: {code}"),
        }
    }
    Ok(())
}

/// The value of the first header called `name`, if it is UTF-8.
pub fn header<'a>(headers: &'a BorrowedHeaders, name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}
