//! The distributed mode's usage feed (the `kafka` feature): every replica
//! reads the whole deltas topic the aggregators publish (no consumer group,
//! nothing committed: each replica reads the store on start and follows
//! from the topic's end as it was just before that read, see
//! `quota_service`).

use crate::quota_service::Feed;
use aggregator::delta::UsageDelta;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// A consumer of `topic` positioned at its end now. Call it before the
/// quota state is read: every delta published after the read is then
/// followed, and those from before it are recognised by their versions.
pub async fn subscribe(brokers: &str, topic: &str) -> anyhow::Result<StreamConsumer> {
    aggregator::kafka::ensure_topic(brokers, topic, aggregator::kafka::DELTA_PARTITIONS).await?;
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        // Required by librdkafka; nothing is ever committed under it.
        .set("group.id", "tally-billing-usage-follower")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("fetch.wait.max.ms", "50")
        .create()?;
    let (b, t) = (brokers.to_owned(), topic.to_owned());
    let ends = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<(i32, i64)>> {
        let c: rdkafka::consumer::BaseConsumer =
            ClientConfig::new().set("bootstrap.servers", &b).create()?;
        let mut out = Vec::new();
        for p in 0..aggregator::kafka::DELTA_PARTITIONS {
            let (_, high) = c.fetch_watermarks(&t, p, Duration::from_secs(10))?;
            out.push((p, high));
        }
        Ok(out)
    })
    .await??;
    let mut tpl = TopicPartitionList::new();
    for (p, high) in &ends {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*high))?;
    }
    consumer.assign(&tpl)?;
    tracing::info!(topic, ends = ?ends, "following usage deltas");
    Ok(consumer)
}

/// Turns the consumer's messages into the quota state's feed.
pub fn feed(consumer: StreamConsumer) -> mpsc::Receiver<Feed> {
    let (tx, rx) = mpsc::channel(4096);
    tokio::spawn(async move {
        loop {
            let item = match consumer.recv().await {
                Ok(m) => match m.payload().map(UsageDelta::from_json) {
                    Some(Ok(d)) => Feed::Delta(Arc::new(d)),
                    Some(Err(e)) => {
                        // Not ours to judge: the state re-reads the store.
                        tracing::warn!(offset = m.offset(), error = %e, "unreadable usage delta");
                        Feed::Lost
                    }
                    None => continue,
                },
                Err(e) => {
                    tracing::warn!(error = %e, "usage delta consume error");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            if tx.send(item).await.is_err() {
                return;
            }
        }
    });
    rx
}
