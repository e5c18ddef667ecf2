//! The embedded mode's transport: the collector's [`EventSink`] feeding the
//! aggregator's [`Processor`] in the same process, with group commit.
//!
//! There is no Kafka to hold accepted events, so the usage store itself is
//! the durable log: one writer task takes every request waiting in its
//! queue (up to `max_batch` events), gives the messages consecutive offsets
//! of partition 0 and runs them through the same `Processor` as the
//! distributed aggregator (validation, deduplication by (`source`, `id`),
//! raw rows and versioned rollups, in one transaction). Each request is
//! answered only after that batch is committed to SQLite (WAL,
//! `synchronous=FULL`: fsynced), so an
//! acknowledged event survives SIGKILL and power loss. Requests that arrive
//! while a batch is being written wait for the next one, which is how
//! concurrent senders share one fsync.
//!
//! After each commit the batch's [`UsageDelta`]s go to `deltas` (a
//! broadcast channel), which billing's quota state follows: usage is in
//! quota decisions as soon as it is acknowledged.
//!
//! Offsets: on start the writer resumes one past the highest offset in the
//! store, exactly as a Kafka partition resumes. Offsets of batches that were
//! not written (duplicates only, or a failed write) are simply skipped.

use aggregator::delta::UsageDelta;
use aggregator::metrics::Metrics as AggMetrics;
use aggregator::pipeline::{Message, Processor};
use aggregator::store::sqlite::SqliteStore;
use collector::sink::{Delivery, Envelope, EventSink};
use schemas::MeterCatalog;
use std::sync::Arc;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

struct Request {
    batch: Vec<Envelope>,
    done: oneshot::Sender<Result<(), String>>,
}

/// The collector side: hands batches to the writer and waits for the commit.
pub struct StoreSink {
    tx: mpsc::Sender<Request>,
}

impl EventSink for StoreSink {
    async fn send(&self, batch: Vec<Envelope>) -> anyhow::Result<Delivery> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Request { batch, done })
            .await
            .map_err(|_| anyhow::anyhow!("the usage writer has stopped"))?;
        match wait.await {
            Ok(Ok(())) => Ok(Delivery::Store),
            Ok(Err(e)) => Err(anyhow::anyhow!("usage write failed: {e}")),
            Err(_) => Err(anyhow::anyhow!("the usage writer stopped before writing")),
        }
    }
}

/// Starts the writer over `store`; returns the sink and the writer task,
/// which ends once every sink is dropped and the queue is drained.
pub async fn start(
    store: Arc<SqliteStore>,
    meters: Arc<MeterCatalog>,
    metrics: AggMetrics,
    max_batch: usize,
    deltas: broadcast::Sender<Arc<UsageDelta>>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<(Arc<StoreSink>, tokio::task::JoinHandle<()>)> {
    let mut proc = Processor::new(store.clone(), meters, metrics);
    let mut next = proc
        .stored_max_offset(0, &stop)
        .await?
        .map_or(0, |o| o as i64 + 1);
    // No receiver yet is fine: followers read the store when they start.
    for d in proc.take_heads() {
        let _ = deltas.send(Arc::new(d));
    }
    tracing::info!(next_offset = next, "embedded usage writer resumed");
    let (tx, mut rx) = mpsc::channel::<Request>(1024);
    let task = tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut n = first.batch.len();
            let mut reqs = vec![first];
            while n < max_batch {
                match rx.try_recv() {
                    Ok(r) => {
                        n += r.batch.len();
                        reqs.push(r);
                    }
                    Err(_) => break,
                }
            }
            let mut msgs = Vec::with_capacity(n);
            for r in &mut reqs {
                for e in r.batch.drain(..) {
                    msgs.push(Message {
                        partition: 0,
                        offset: next,
                        key: Some(e.key.into_bytes()),
                        payload: Some(e.payload),
                    });
                    next += 1;
                }
            }
            let res = match proc.process_batch(msgs, store.as_ref(), &stop).await {
                Ok(done) => {
                    for d in done.deltas {
                        let _ = deltas.send(Arc::new(d));
                    }
                    Ok(())
                }
                Err(e) => Err(format!("{e:#}")),
            };
            if let Err(e) = &res {
                tracing::error!(error = %e, events = n, "embedded usage write failed; not acknowledged");
            }
            for r in reqs {
                let _ = r.done.send(res.clone());
            }
        }
        tracing::info!("embedded usage writer stopped");
    });
    Ok((Arc::new(StoreSink { tx }), task))
}
