//! Pushing finalized invoices to Stripe (async-stripe).
//!
//! For each invoice waiting to be sent, in number order:
//!
//! 1. the Stripe customer (created once per Tally customer, id stored);
//! 2. a draft Stripe invoice that takes no pending items
//!    (`pending_invoice_items_behavior=exclude`), id stored;
//! 3. one invoice item per line, attached to that invoice, skipping lines
//!    already there (read back with paginated `GET /invoices/{id}/lines`);
//! 4. finalize the Stripe invoice;
//! 5. read the lines back again and check their sum equals the Tally total
//!    to the cent; only then is the invoice marked `synced`.
//!
//! Every POST carries an idempotency key derived from stable ids
//! (`tally-customer-<customer>`, `tally-invoice-<invoice>`,
//! `tally-item-<invoice>-<line>`, `tally-finalize-<invoice>`; all built by
//! [`idempotency_key`]), so a process
//! killed at any point and restarted re-sends the same requests and Stripe
//! returns the objects it already created instead of creating new ones; the
//! stored ids and the line read-back make a retry safe even after Stripe
//! has forgotten a key (24 hours). 429, 409 (a concurrent request with the
//! same key) and 5xx answers and transport errors are retried with
//! exponential backoff; other 4xx answers stop the invoice, which stays
//! `pending` and is retried on the next run.
//!
//! Invoices below the minimum charge never get here: finalization marks
//! them `carried_forward` and adds their total to the next invoice.
//!
//! Against real Stripe: set `STRIPE_SECRET_KEY=sk_test_…` (and leave
//! `--stripe-api-base` at its default); see `billing-api/README.md`.

use crate::metrics::Metrics;
use crate::state::{DynStateStore, Invoice, StateStore, SyncStatus};
use billing_domain::catalog::currency_digits;
use rust_decimal::Decimal;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use stripe::{
    Client, CreateCustomer, CreateInvoice, CreateInvoiceItem, Currency, CustomerId,
    FinalizeInvoiceParams, InvoiceId, InvoiceLineItem, InvoicePendingInvoiceItemsBehavior, List,
    RequestStrategy, StripeError,
};

#[derive(Debug, Clone)]
pub struct StripeConfig {
    pub api_base: String,
    pub secret_key: serving::Secret,
    /// Attempts per call (the first included).
    pub max_attempts: u32,
    /// First backoff; doubles per attempt.
    pub backoff: Duration,
    /// Page size when reading invoice lines back (Stripe allows 1..=100).
    pub page_size: u32,
}

impl StripeConfig {
    pub fn new(api_base: impl Into<String>, secret_key: impl Into<serving::Secret>) -> Self {
        Self {
            api_base: api_base.into(),
            secret_key: secret_key.into(),
            max_attempts: 6,
            backoff: Duration::from_millis(200),
            page_size: 100,
        }
    }
}

pub struct StripeSync {
    client: Client,
    config: StripeConfig,
    state: Arc<DynStateStore<'static>>,
    metrics: Metrics,
}

/// An amount in the currency's minor unit (cents for USD, yen for JPY, fils
/// for KWD; [`currency_digits`], the rule catalog validation holds plans
/// to). Amounts on invoices are already rounded to the plan's minor unit,
/// which is never finer; anything else is an error. (Stripe also wants the
/// last of a three-digit currency's digits to be 0; such an invoice is
/// refused by Stripe and stays `pending` with the error.)
pub fn minor_units(amount: Decimal, currency: &str) -> anyhow::Result<i64> {
    let dp = currency_digits(currency);
    let scaled = amount * Decimal::from(10i64.pow(dp));
    anyhow::ensure!(
        scaled.fract().is_zero(),
        "{amount} {currency} is not a whole number of minor units"
    );
    use rust_decimal::prelude::ToPrimitive;
    scaled
        .to_i64()
        .ok_or_else(|| anyhow::anyhow!("{amount} {currency} is out of range"))
}

/// A POST to Stripe, named by the stable ids its idempotency key is made of.
#[derive(Debug, Clone, Copy)]
pub enum Request<'a> {
    CreateCustomer {
        customer: &'a str,
    },
    CreateInvoice {
        invoice: &'a str,
    },
    /// One of [`stripe_lines`], by its stable line key.
    CreateItem {
        invoice: &'a str,
        line: &'a str,
    },
    Finalize {
        invoice: &'a str,
    },
}

/// The idempotency key of a request: the same request for the same Tally
/// object gets the same key in every run and every process, so a retry
/// after a crash gets back what the first attempt created.
pub fn idempotency_key(r: Request<'_>) -> String {
    match r {
        Request::CreateCustomer { customer } => format!("tally-customer-{customer}"),
        Request::CreateInvoice { invoice } => format!("tally-invoice-{invoice}"),
        Request::CreateItem { invoice, line } => format!("tally-item-{invoice}-{line}"),
        Request::Finalize { invoice } => format!("tally-finalize-{invoice}"),
    }
}

/// The lines an invoice sends to Stripe: (stable key, description, amount).
/// Zero lines are not sent.
pub fn stripe_lines(inv: &Invoice) -> Vec<(String, String, Decimal)> {
    let mut out = Vec::new();
    for (i, l) in inv.body.lines.iter().enumerate() {
        out.push((format!("l{i}"), l.description.clone(), l.amount));
    }
    for (i, a) in inv.body.adjustments.iter().enumerate() {
        out.push((format!("a{i}"), a.description.clone(), a.amount));
    }
    if let Some(s) = &inv.body.settlement {
        for (i, d) in s.discounts.iter().enumerate() {
            out.push((format!("d{i}"), d.description.clone(), d.amount));
        }
        // Inclusive tax is already in the lines: only exclusive tax is sent.
        for (i, t) in s.taxes.iter().enumerate().filter(|(_, t)| !t.inclusive) {
            out.push((format!("t{i}"), t.description.clone(), t.amount));
        }
    }
    for (i, c) in inv.body.carried.iter().enumerate() {
        out.push((
            format!("c{i}"),
            format!("Carried forward from invoice {}", c.invoice_number),
            c.total,
        ));
    }
    // Credits last, as on the invoice: Stripe's total is Tally's amount due.
    if let Some(s) = &inv.body.settlement {
        for (i, k) in s.credits.iter().enumerate() {
            out.push((format!("k{i}"), k.description.clone(), k.amount));
        }
    }
    out.retain(|l| !l.2.is_zero());
    out
}

#[derive(serde::Serialize)]
struct LinesPage<'a> {
    limit: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    starting_after: Option<&'a str>,
}

fn retryable(e: &StripeError) -> Option<&'static str> {
    match e {
        StripeError::Stripe(r) if r.http_status == 429 => Some("rate_limited"),
        StripeError::Stripe(r) if r.http_status == 409 => Some("conflict"),
        StripeError::Stripe(r) if r.http_status >= 500 || r.http_status == 0 => Some("server"),
        StripeError::ClientError(_) | StripeError::Timeout => Some("transport"),
        _ => None,
    }
}

impl StripeSync {
    pub fn new(config: StripeConfig, state: Arc<DynStateStore<'static>>, metrics: Metrics) -> Self {
        let client = Client::from_url(config.api_base.as_str(), config.secret_key.expose());
        Self {
            client,
            config,
            state,
            metrics,
        }
    }

    /// One Stripe call with its idempotency key, retried on 429/409/5xx and
    /// transport errors with exponential backoff.
    async fn call<T, F, Fut>(
        &self,
        op: &'static str,
        key: Option<String>,
        f: F,
    ) -> anyhow::Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, StripeError>>,
    {
        let client = match &key {
            Some(k) => self
                .client
                .clone()
                .with_strategy(RequestStrategy::Idempotent(k.clone())),
            None => self.client.clone(),
        };
        let started = Instant::now();
        let mut delay = self.config.backoff;
        let mut attempt = 1;
        let result = loop {
            match f(client.clone()).await {
                Ok(v) => break Ok(v),
                Err(e) => {
                    let kind = retryable(&e);
                    self.metrics
                        .stripe_errors
                        .with_label_values(&[op, kind.unwrap_or("client")])
                        .inc();
                    if kind.is_none() || attempt >= self.config.max_attempts {
                        break Err(anyhow::anyhow!("stripe {op}: {e}"));
                    }
                    tracing::warn!(op, attempt, error = %e, "stripe call failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = delay.saturating_mul(2);
                    attempt += 1;
                }
            }
        };
        self.metrics
            .stripe_request_duration
            .with_label_values(&[op])
            .observe(started.elapsed().as_secs_f64());
        result
    }

    /// Every line of a Stripe invoice, page by page.
    async fn lines(&self, invoice: &str) -> anyhow::Result<Vec<InvoiceLineItem>> {
        let mut out: Vec<InvoiceLineItem> = Vec::new();
        loop {
            let after = out.last().map(|l| l.id.to_string());
            let path = format!("/invoices/{invoice}/lines");
            let limit = self.config.page_size;
            let page: List<InvoiceLineItem> = self
                .call("list_lines", None, |c| {
                    let path = path.clone();
                    let after = after.clone();
                    async move {
                        c.get_query(
                            &path,
                            LinesPage {
                                limit,
                                starting_after: after.as_deref(),
                            },
                        )
                        .await
                    }
                })
                .await?;
            let more = page.has_more && !page.data.is_empty();
            out.extend(page.data);
            if !more {
                return Ok(out);
            }
        }
    }

    async fn customer(&self, customer: &str) -> anyhow::Result<CustomerId> {
        if let Some(id) = self.state.stripe_customer(customer).await? {
            return Ok(CustomerId::from_str(&id)?);
        }
        let c = self.state.customer(customer).await?;
        let meta: HashMap<String, String> = [
            ("tally_customer".to_owned(), c.id.clone()),
            ("external_id".to_owned(), c.external_id.clone()),
        ]
        .into();
        let created = self
            .call(
                "create_customer",
                Some(idempotency_key(Request::CreateCustomer { customer })),
                |cl| {
                    let meta = meta.clone();
                    let name = c.name.clone();
                    async move {
                        let mut p = CreateCustomer::new();
                        p.name = Some(&name);
                        p.metadata = Some(meta);
                        stripe::Customer::create(&cl, p).await
                    }
                },
            )
            .await?;
        self.state
            .set_stripe_customer(customer, created.id.as_str())
            .await?;
        Ok(created.id)
    }

    /// Sends one invoice; returns the Stripe invoice id.
    pub async fn sync_invoice(&self, inv: &Invoice) -> anyhow::Result<String> {
        let customer = self.customer(&inv.customer_id).await?;
        let currency: Currency =
            serde_json::from_value(serde_json::Value::String(inv.currency.to_ascii_lowercase()))
                .map_err(|_| anyhow::anyhow!("currency {} unknown to Stripe", inv.currency))?;
        let meta: HashMap<String, String> = [
            ("tally_invoice".to_owned(), inv.id.clone()),
            ("tally_number".to_owned(), inv.number.clone()),
        ]
        .into();
        let stripe_id = match &inv.stripe_invoice_id {
            Some(id) => InvoiceId::from_str(id)?,
            None => {
                let created = self
                    .call(
                        "create_invoice",
                        Some(idempotency_key(Request::CreateInvoice { invoice: &inv.id })),
                        |cl| {
                            let (customer, meta) = (customer.clone(), meta.clone());
                            let desc = format!(
                                "Tally invoice {} for {}",
                                inv.number,
                                inv.period.start.format("%B %Y")
                            );
                            async move {
                                let mut p = CreateInvoice::new();
                                p.customer = Some(customer);
                                p.currency = Some(currency);
                                p.auto_advance = Some(false);
                                p.pending_invoice_items_behavior =
                                    Some(InvoicePendingInvoiceItemsBehavior::Exclude);
                                p.description = Some(&desc);
                                p.metadata = Some(meta);
                                stripe::Invoice::create(&cl, p).await
                            }
                        },
                    )
                    .await?;
                self.state
                    .set_stripe_invoice(&inv.id, created.id.as_str())
                    .await?;
                created.id
            }
        };
        let present: HashSet<String> = self
            .lines(stripe_id.as_str())
            .await?
            .into_iter()
            .filter_map(|l| l.metadata.get("tally_line").cloned())
            .collect();
        let current = self
            .call("retrieve_invoice", None, |cl| {
                let id = stripe_id.clone();
                async move { stripe::Invoice::retrieve(&cl, &id, &[]).await }
            })
            .await?;
        let is_draft = matches!(current.status, Some(stripe::InvoiceStatus::Draft));
        let lines = stripe_lines(inv);
        if is_draft {
            for (key, description, amount) in &lines {
                if present.contains(key) {
                    continue;
                }
                let cents = minor_units(*amount, &inv.currency)?;
                let meta: HashMap<String, String> = [
                    ("tally_invoice".to_owned(), inv.id.clone()),
                    ("tally_line".to_owned(), key.clone()),
                ]
                .into();
                self.call(
                    "create_invoice_item",
                    Some(idempotency_key(Request::CreateItem {
                        invoice: &inv.id,
                        line: key,
                    })),
                    |cl| {
                        let (customer, meta, invoice) =
                            (customer.clone(), meta.clone(), stripe_id.clone());
                        let description = description.clone();
                        async move {
                            let mut p = CreateInvoiceItem::new(customer);
                            p.amount = Some(cents);
                            p.currency = Some(currency);
                            p.description = Some(&description);
                            p.invoice = Some(invoice);
                            p.metadata = Some(meta);
                            stripe::InvoiceItem::create(&cl, p).await
                        }
                    },
                )
                .await?;
            }
            self.call(
                "finalize_invoice",
                Some(idempotency_key(Request::Finalize { invoice: &inv.id })),
                |cl| {
                    let id = stripe_id.clone();
                    async move {
                        stripe::Invoice::finalize(
                            &cl,
                            &id,
                            FinalizeInvoiceParams {
                                auto_advance: Some(true),
                            },
                        )
                        .await
                    }
                },
            )
            .await?;
        }
        // Read back: the Stripe invoice must carry exactly our lines.
        let back = self.lines(stripe_id.as_str()).await?;
        let sent: i64 = back.iter().map(|l| l.amount).sum();
        let want = minor_units(inv.amount_due, &inv.currency)?;
        let keys: HashSet<&str> = back
            .iter()
            .filter_map(|l| l.metadata.get("tally_line").map(String::as_str))
            .collect();
        if sent != want || back.len() != lines.len() || keys.len() != lines.len() {
            let msg = format!(
                "Stripe invoice {stripe_id} has {} lines totalling {sent}, Tally has {} lines totalling {want}",
                back.len(),
                lines.len()
            );
            self.state
                .set_sync_status(&inv.id, SyncStatus::Failed, Some(&msg))
                .await?;
            anyhow::bail!(msg);
        }
        self.state
            .set_sync_status(&inv.id, SyncStatus::Synced, None)
            .await?;
        self.metrics.invoices_synced.inc();
        Ok(stripe_id.to_string())
    }

    /// Sends every pending invoice once, in number order; returns (synced,
    /// failed). Failed ones stay pending for the next run.
    pub async fn run_once(&self) -> anyhow::Result<(usize, usize)> {
        let (mut ok, mut failed) = (0, 0);
        for inv in self.state.pending_sync(u32::MAX).await? {
            match self.sync_invoice(&inv).await {
                Ok(id) => {
                    ok += 1;
                    tracing::info!(invoice = %inv.number, stripe = %id, "invoice synced to Stripe");
                }
                Err(e) => {
                    failed += 1;
                    self.metrics.invoices_sync_failed.inc();
                    tracing::error!(invoice = %inv.number, error = %e, "Stripe sync failed");
                }
            }
        }
        Ok((ok, failed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    #[test]
    fn amounts_go_to_stripe_in_the_currencys_minor_unit() {
        assert_eq!(minor_units(dec("12.34"), "USD").unwrap(), 1234);
        assert_eq!(minor_units(dec("12"), "usd").unwrap(), 1200);
        assert_eq!(minor_units(dec("500"), "JPY").unwrap(), 500);
        // Three-digit currencies used to be converted as cents and fail.
        assert_eq!(minor_units(dec("1.234"), "KWD").unwrap(), 1234);
        assert!(minor_units(dec("0.005"), "USD").is_err());
        assert!(minor_units(dec("1.5"), "JPY").is_err());
    }

    #[test]
    fn each_request_has_one_stable_key() {
        let keys = [
            idempotency_key(Request::CreateCustomer { customer: "cus_a" }),
            idempotency_key(Request::CreateInvoice { invoice: "inv_1" }),
            idempotency_key(Request::CreateItem {
                invoice: "inv_1",
                line: "l0",
            }),
            idempotency_key(Request::CreateItem {
                invoice: "inv_1",
                line: "a0",
            }),
            idempotency_key(Request::Finalize { invoice: "inv_1" }),
        ];
        assert_eq!(
            keys,
            [
                "tally-customer-cus_a",
                "tally-invoice-inv_1",
                "tally-item-inv_1-l0",
                "tally-item-inv_1-a0",
                "tally-finalize-inv_1",
            ]
        );
        let again = idempotency_key(Request::CreateInvoice { invoice: "inv_1" });
        assert_eq!(again, keys[1]);
    }
}
