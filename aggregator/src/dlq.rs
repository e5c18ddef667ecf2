//! Replaying the dead-letter topic after a fix (a meter added, a bug in a
//! source corrected): every dead letter's payload is produced back to the
//! usage topic with its original key, then the replay's own consumer group
//! commits. Messages still invalid go back to the dead-letter topic; events
//! already counted are dropped by deduplication, so a replay can be repeated.

use crate::kafka::{header, producer};
use crate::pipeline::DLQ_CODE;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::FutureRecord;
use std::time::Duration;

#[derive(Debug, Default, serde::Serialize)]
pub struct ReplayReport {
    pub replayed: u64,
    pub by_code: std::collections::BTreeMap<String, u64>,
}

/// Replays until no dead letter arrives for `idle`.
pub async fn replay(
    brokers: &str,
    dlq_topic: &str,
    topic: &str,
    group: &str,
    idle: Duration,
) -> anyhow::Result<ReplayReport> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[dlq_topic])?;
    let producer = producer(brokers)?;
    let mut report = ReplayReport::default();
    loop {
        let m = match tokio::time::timeout(idle, consumer.recv()).await {
            Err(_) => break,
            Ok(r) => r?,
        };
        let code = m
            .headers()
            .and_then(|h| header(h, DLQ_CODE))
            .unwrap_or("unknown")
            .to_owned();
        let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic);
        if let Some(k) = m.key() {
            rec = rec.key(k);
        }
        if let Some(p) = m.payload() {
            rec = rec.payload(p);
        }
        producer
            .send(rec, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| anyhow::anyhow!("replay produce failed: {e}"))?;
        consumer.commit_message(&m, CommitMode::Sync)?;
        report.replayed += 1;
        *report.by_code.entry(code).or_default() += 1;
    }
    Ok(report)
}
