//! `billing-api admin …`: the staff command line for plan switching. It
//! talks to a running billing-api over its `/v1` API with an admin key, so
//! every change is authorized and audited exactly as API calls are (the
//! actor is the key, plus `--as`, default `$USER`).
//!
//! ```text
//! billing-api admin find <id or external id>
//! billing-api admin preview <customer> <plan> [--version N] [--at-period-end]
//! billing-api admin switch  <customer> <plan> [--version N] [--at-period-end | --at T] --yes
//! billing-api admin cancel  <customer> [--at-period-end | --at T] --yes
//! billing-api admin uncancel <customer>
//! billing-api admin audit   <customer>
//! billing-api admin scheduled-changes list     --customer <customer>
//! billing-api admin scheduled-changes withdraw --customer <customer> --change <id>
//! billing-api admin credit grant  --customer <c> --amount 5.00 [--kind promotional|purchased]
//!                                 [--currency USD] [--effective T] [--expires T] [--priority N]
//!                                 [--reason TEXT] [--top-up] [--key IDEMPOTENCY-KEY]
//! billing-api admin credit void   --customer <c> --grant <id>
//! billing-api admin credit paid   --customer <c> --grant <id>
//! billing-api admin credit ledger --customer <c>
//! ```
//!
//! `switch` without `--yes` only previews; `cancel` without `--yes` only
//! says what it would do (the final invoice covers the period up to the
//! cancellation and is finalized at it plus grace); `uncancel` withdraws a
//! cancellation that has not taken effect. `scheduled-changes` lists the
//! switches that start later (`--at-period-end`), each with its id, and
//! withdraws one by id: the plan before it runs on (the API's
//! `/v1/customers/{id}/scheduled-changes`; withdrawing again answers the
//! same change, one already in effect is refused). Output is text for people;
//! `--json` prints the API's JSON instead.

use clap::{Args, Subcommand};
use serde_json::{json, Value};
use std::fmt::Write;

#[derive(Args, Debug, Clone)]
pub struct AdminArgs {
    /// Base URL of billing-api.
    #[arg(
        long,
        env = "TALLY_BILLING_URL",
        default_value = "http://127.0.0.1:8090"
    )]
    pub url: String,
    /// An admin API key.
    #[arg(long, env = "TALLY_ADMIN_KEY", hide_env_values = true)]
    pub key: String,
    /// Who is acting (recorded in the audit log); default $USER.
    #[arg(long = "as", env = "USER", default_value = "staff")]
    pub actor: String,
    /// Print the API's JSON instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Subcommand, Debug, Clone)]
pub enum AdminCommand {
    /// Find a customer by Tally id or external (PaaS) id; shows its plan.
    Find { query: String },
    /// Show this period's lines now and with a switch.
    Preview(SwitchArgs),
    /// Switch plans (previews unless --yes).
    Switch {
        #[command(flatten)]
        switch: SwitchArgs,
        /// Confirm the switch.
        #[arg(long)]
        yes: bool,
    },
    /// Cancel the subscription now, at the period end or at an instant
    /// (says what it would do unless --yes).
    Cancel {
        customer: String,
        #[command(flatten)]
        when: When,
        /// Confirm the cancellation.
        #[arg(long)]
        yes: bool,
    },
    /// Withdraw a cancellation that has not taken effect.
    Uncancel { customer: String },
    /// The customer's audit log.
    Audit { customer: String },
    /// List or withdraw plan switches scheduled for later.
    #[command(subcommand)]
    ScheduledChanges(ScheduledCommand),
    /// Grant, void or mark paid credit; read the ledger.
    #[command(subcommand)]
    Credit(CreditCommand),
}

#[derive(Subcommand, Debug, Clone)]
pub enum CreditCommand {
    /// Grant credit (`--key` makes a repeat answer the first grant).
    Grant {
        #[arg(long)]
        customer: String,
        /// A decimal amount in whole minor units, e.g. 5.00.
        #[arg(long)]
        amount: String,
        /// promotional or purchased.
        #[arg(long, default_value = "promotional")]
        kind: String,
        #[arg(long, default_value = "USD")]
        currency: String,
        /// From this instant (RFC 3339; default now).
        #[arg(long, value_name = "INSTANT", value_parser = parse_instant)]
        effective: Option<chrono::DateTime<chrono::Utc>>,
        /// Expires at this instant (RFC 3339).
        #[arg(long, value_name = "INSTANT", value_parser = parse_instant)]
        expires: Option<chrono::DateTime<chrono::Utc>>,
        /// Lower is consumed first (after the earliest expiry).
        #[arg(long)]
        priority: Option<u32>,
        #[arg(long)]
        reason: Option<String>,
        /// A purchased grant usable once its top-up is paid.
        #[arg(long)]
        top_up: bool,
        /// An idempotency key for the grant.
        #[arg(long)]
        key: Option<String>,
    },
    /// Void a grant's unused remainder.
    Void {
        #[arg(long)]
        customer: String,
        #[arg(long)]
        grant: String,
    },
    /// Mark a top-up grant paid (usable from now on).
    Paid {
        #[arg(long)]
        customer: String,
        #[arg(long)]
        grant: String,
    },
    /// The customer's credit ledger and balances.
    Ledger {
        #[arg(long)]
        customer: String,
    },
}

#[derive(Subcommand, Debug, Clone)]
pub enum ScheduledCommand {
    /// The customer's scheduled plan switches, in order, with their ids.
    List {
        /// The customer's Tally id.
        #[arg(long)]
        customer: String,
    },
    /// Withdraw a scheduled switch: the plan before it runs on.
    Withdraw {
        /// The customer's Tally id.
        #[arg(long)]
        customer: String,
        /// The scheduled change's id (from `scheduled-changes list`).
        #[arg(long, value_name = "ID")]
        change: i64,
    },
}

#[derive(Args, Debug, Clone)]
pub struct SwitchArgs {
    pub customer: String,
    pub plan: String,
    #[arg(long)]
    pub version: Option<u32>,
    #[command(flatten)]
    pub when: When,
}

/// When a change takes effect: now (default), at the end of the current
/// period, or at an instant.
#[derive(Args, Debug, Clone)]
pub struct When {
    /// At the end of the current period instead of now.
    #[arg(long, conflicts_with = "at")]
    pub at_period_end: bool,
    /// At this instant (RFC 3339, e.g. 2026-12-10T00:00:00Z), inside the
    /// open period or later.
    #[arg(long, value_name = "INSTANT", value_parser = parse_instant)]
    pub at: Option<chrono::DateTime<chrono::Utc>>,
}

fn parse_instant(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| format!("an RFC 3339 instant like 2026-12-10T00:00:00Z ({e})"))
}

impl When {
    /// The API's `effective` / `at` fields.
    fn fields(&self, body: &mut Value) {
        match (self.at, self.at_period_end) {
            (Some(at), _) => body["at"] = json!(at),
            (None, true) => body["effective"] = json!("period_end"),
            (None, false) => body["effective"] = json!("now"),
        }
    }
}

struct Client<'a> {
    http: reqwest::Client,
    args: &'a AdminArgs,
}

impl Client<'_> {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        self.call_keyed(method, path, body, None).await
    }

    /// [`call`](Self::call) with an `Idempotency-Key`.
    async fn call_keyed(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        key: Option<&str>,
    ) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.args.url.trim_end_matches('/'));
        let mut r = self
            .http
            .request(method, &url)
            .bearer_auth(&self.args.key)
            .header("X-Tally-Actor", &self.args.actor);
        if let Some(k) = key {
            r = r.header("Idempotency-Key", k);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("--url {}: {e}", self.args.url))?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            anyhow::bail!(
                "{} {}: {}",
                status.as_u16(),
                v["code"].as_str().unwrap_or("error"),
                v["message"].as_str().unwrap_or("")
            );
        }
        Ok(v)
    }
}

fn switch_body(s: &SwitchArgs) -> Value {
    let mut body = json!({"plan": s.plan, "version": s.version});
    s.when.fields(&mut body);
    body
}

fn lines(out: &mut String, title: &str, rated: &Value) {
    let _ = writeln!(
        out,
        "{title}: {} {}",
        rated["total"].as_str().unwrap_or("?"),
        rated["currency"].as_str().unwrap_or("")
    );
    for l in rated["lines"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  {:>12}  {}",
            l["amount"].as_str().unwrap_or("?"),
            l["description"].as_str().unwrap_or("")
        );
    }
}

/// Runs one admin command; returns what to print.
pub async fn run(args: &AdminArgs) -> anyhow::Result<String> {
    use reqwest::Method as M;
    let c = Client {
        http: reqwest::Client::new(),
        args,
    };
    let mut out = String::new();
    match &args.command {
        AdminCommand::Find { query } => {
            let by_ext = c
                .call(
                    M::GET,
                    &format!("/v1/customers?external_id={}", urlencode(query)),
                    None,
                )
                .await?;
            let customer = match by_ext.as_array().and_then(|a| a.first()) {
                Some(cu) => cu.clone(),
                None => {
                    c.call(M::GET, &format!("/v1/customers/{}", urlencode(query)), None)
                        .await?
                }
            };
            let id = customer["id"].as_str().unwrap_or_default().to_owned();
            let sub = c
                .call(
                    M::GET,
                    &format!("/v1/customers/{}/subscription", urlencode(&id)),
                    None,
                )
                .await?;
            if args.json {
                return Ok(json!({"customer": customer, "subscription": sub}).to_string());
            }
            let _ = writeln!(
                out,
                "{id}  external id {}  name {}",
                customer["external_id"].as_str().unwrap_or(""),
                customer["name"].as_str().unwrap_or("")
            );
            match sub["current"].as_object() {
                Some(cur) => {
                    let _ = writeln!(
                        out,
                        "plan: {} v{} since {} (billed from day {} of each month)",
                        cur["plan"].as_str().unwrap_or(""),
                        cur["version"],
                        cur["start"].as_str().unwrap_or(""),
                        cur.get("anchor_day").and_then(Value::as_u64).unwrap_or(1)
                    );
                    if let Some(t) = cur.get("trial_end").and_then(Value::as_str) {
                        let _ = writeln!(out, "trial until {t}");
                    }
                    let plans = c.call(M::GET, "/v1/plans", None).await?;
                    let ahead = plans.as_array().into_iter().flatten().any(|p| {
                        p["plan"]["plan"] == cur["plan"]
                            && p["plan"]["version"] == cur["version"]
                            && p["plan"]["fee_timing"] == "in_advance"
                    });
                    if ahead {
                        let _ = writeln!(out, "fees billed in advance");
                    }
                }
                None => {
                    let _ = writeln!(out, "plan: none");
                }
            }
            if let Some(t) = sub["cancelled_at"].as_str() {
                let _ = writeln!(out, "cancelled at {t}");
            }
            for s in sub["scheduled"].as_array().into_iter().flatten() {
                let _ = writeln!(
                    out,
                    "scheduled: {} v{} from {}",
                    s["plan"].as_str().unwrap_or(""),
                    s["version"],
                    s["start"].as_str().unwrap_or("")
                );
            }
            // The latest invoices: an opening one (fees in advance) by the
            // instant its fees start, a period's by its month.
            let invoices = c
                .call(
                    M::GET,
                    &format!("/v1/customers/{}/invoices", urlencode(&id)),
                    None,
                )
                .await?;
            let list = invoices.as_array().map(Vec::as_slice).unwrap_or(&[]);
            for i in &list[list.len().saturating_sub(3)..] {
                let start = i["period"]["start"].as_str().unwrap_or("");
                let what = match i["kind"].as_str() {
                    Some("opening") => format!("fees in advance from {start}"),
                    _ => format!("period {}", start.get(..7).unwrap_or(start)),
                };
                let _ = writeln!(
                    out,
                    "invoice {} {what}: {} {} due {} {}",
                    i["number"].as_str().unwrap_or(""),
                    i["total"].as_str().unwrap_or(""),
                    i["currency"].as_str().unwrap_or(""),
                    i["amount_due"].as_str().unwrap_or(""),
                    i["sync_status"].as_str().unwrap_or("")
                );
            }
        }
        AdminCommand::Preview(s)
        | AdminCommand::Switch {
            switch: s,
            yes: false,
        } => {
            let v = c
                .call(
                    M::POST,
                    &format!(
                        "/v1/customers/{}/plan-switch/preview",
                        urlencode(&s.customer)
                    ),
                    Some(switch_body(s)),
                )
                .await?;
            if args.json {
                return Ok(v.to_string());
            }
            let _ = writeln!(
                out,
                "switch {} to {} effective {}",
                s.customer,
                s.plan,
                v["effective_at"].as_str().unwrap_or("")
            );
            lines(&mut out, "as things stand", &v["current"]);
            lines(&mut out, "with the switch", &v["with_switch"]);
            let _ = writeln!(
                out,
                "difference so far: {}",
                v["difference"].as_str().unwrap_or("?")
            );
            if matches!(args.command, AdminCommand::Switch { .. }) {
                let _ = writeln!(out, "not switched: add --yes to confirm");
            }
        }
        AdminCommand::Switch {
            switch: s,
            yes: true,
        } => {
            let v = c
                .call(
                    M::POST,
                    &format!("/v1/customers/{}/plan-switch", urlencode(&s.customer)),
                    Some(switch_body(s)),
                )
                .await?;
            if args.json {
                return Ok(v.to_string());
            }
            let _ = writeln!(
                out,
                "switched {} to {} v{} effective {}",
                s.customer,
                v["plan"].as_str().unwrap_or(""),
                v["version"],
                v["effective_at"].as_str().unwrap_or("")
            );
        }
        AdminCommand::Cancel {
            customer,
            when,
            yes,
        } => {
            let mut body = json!({});
            when.fields(&mut body);
            if !yes {
                let _ = writeln!(
                    out,
                    "would cancel {customer} {}: usage timed after it is not billed; \
                     the final invoice is finalized at it plus grace\nnot cancelled: add --yes to confirm",
                    when.at
                        .map(|t| format!("at {}", t.to_rfc3339()))
                        .unwrap_or_else(|| if when.at_period_end { "at the period end".into() } else { "now".into() })
                );
                return Ok(out);
            }
            let v = c
                .call(
                    M::POST,
                    &format!("/v1/customers/{}/cancellation", urlencode(customer)),
                    Some(body),
                )
                .await?;
            if args.json {
                return Ok(v.to_string());
            }
            let _ = writeln!(
                out,
                "cancelled {customer} effective {} ({} scheduled change(s) withdrawn)",
                v["effective_at"].as_str().unwrap_or(""),
                v["withdrawn"].as_array().map_or(0, Vec::len)
            );
        }
        AdminCommand::Uncancel { customer } => {
            let v = c
                .call(
                    M::DELETE,
                    &format!("/v1/customers/{}/cancellation", urlencode(customer)),
                    None,
                )
                .await?;
            if args.json {
                return Ok(v.to_string());
            }
            let _ = writeln!(
                out,
                "withdrew the cancellation of {customer}: {} v{} runs on",
                v["plan"].as_str().unwrap_or(""),
                v["version"]
            );
        }
        AdminCommand::Audit { customer } => {
            let v = c
                .call(
                    M::GET,
                    &format!("/v1/audit?subject=customer:{}", urlencode(customer)),
                    None,
                )
                .await?;
            if args.json {
                return Ok(v.to_string());
            }
            for e in v.as_array().into_iter().flatten() {
                let _ = writeln!(
                    out,
                    "{}  {:<20} {:<28} before {}  after {}",
                    e["at"].as_str().unwrap_or(""),
                    e["action"].as_str().unwrap_or(""),
                    e["actor"].as_str().unwrap_or(""),
                    e["before"],
                    e["after"]
                );
            }
        }
        AdminCommand::ScheduledChanges(ScheduledCommand::List { customer }) => {
            // The customer first, so that an unknown one is an error
            // naming the flag rather than an empty list.
            let path = format!("/v1/customers/{}", urlencode(customer));
            c.call(M::GET, &path, None)
                .await
                .map_err(|e| naming(&format!("--customer {customer}"), e))?;
            let v = c
                .call(M::GET, &format!("{path}/scheduled-changes"), None)
                .await
                .map_err(|e| naming(&format!("--customer {customer}"), e))?;
            if args.json {
                return Ok(v.to_string());
            }
            let changes = v.as_array().cloned().unwrap_or_default();
            if changes.is_empty() {
                let _ = writeln!(out, "no scheduled changes for {customer}");
            }
            for ch in &changes {
                let _ = writeln!(
                    out,
                    "change {}: {} v{} from {}",
                    ch["id"],
                    ch["plan"].as_str().unwrap_or(""),
                    ch["version"],
                    ch["start"].as_str().unwrap_or("")
                );
            }
        }
        AdminCommand::ScheduledChanges(ScheduledCommand::Withdraw { customer, change }) => {
            let v = c
                .call(
                    M::DELETE,
                    &format!(
                        "/v1/customers/{}/scheduled-changes/{change}",
                        urlencode(customer)
                    ),
                    None,
                )
                .await
                .map_err(|e| naming(&format!("--customer {customer} --change {change}"), e))?;
            if args.json {
                return Ok(v.to_string());
            }
            let _ = writeln!(
                out,
                "withdrew change {} of {customer}: {} v{} from {} (the plan before it runs on)",
                v["id"],
                v["plan"].as_str().unwrap_or(""),
                v["version"],
                v["start"].as_str().unwrap_or("")
            );
        }
        AdminCommand::Credit(cmd) => {
            let (v, customer) = match cmd {
                CreditCommand::Grant {
                    customer,
                    amount,
                    kind,
                    currency,
                    effective,
                    expires,
                    priority,
                    reason,
                    top_up,
                    key,
                } => {
                    let body = json!({"kind": kind, "amount": amount, "currency": currency,
                        "effective_at": effective, "expires_at": expires, "priority": priority,
                        "reason": reason, "top_up": top_up});
                    let v = c
                        .call_keyed(
                            M::POST,
                            &format!("/v1/customers/{}/credit-grants", urlencode(customer)),
                            Some(body),
                            key.as_deref(),
                        )
                        .await
                        .map_err(|e| naming(&format!("--customer {customer}"), e))?;
                    (v, customer)
                }
                CreditCommand::Void { customer, grant }
                | CreditCommand::Paid { customer, grant } => {
                    let what = if matches!(cmd, CreditCommand::Void { .. }) {
                        "void"
                    } else {
                        "paid"
                    };
                    let v = c
                        .call(
                            M::POST,
                            &format!(
                                "/v1/customers/{}/credit-grants/{}/{what}",
                                urlencode(customer),
                                urlencode(grant)
                            ),
                            None,
                        )
                        .await
                        .map_err(|e| {
                            naming(&format!("--customer {customer} --grant {grant}"), e)
                        })?;
                    (v, customer)
                }
                CreditCommand::Ledger { customer } => {
                    let v = c
                        .call(
                            M::GET,
                            &format!("/v1/customers/{}/credit-ledger", urlencode(customer)),
                            None,
                        )
                        .await
                        .map_err(|e| naming(&format!("--customer {customer}"), e))?;
                    if args.json {
                        return Ok(v.to_string());
                    }
                    for (cur, b) in v["balances"].as_object().into_iter().flatten() {
                        let _ = writeln!(out, "balance: {} {cur}", b.as_str().unwrap_or("?"));
                    }
                    for e in v["entries"].as_array().into_iter().flatten() {
                        let _ = writeln!(
                            out,
                            "{:>6}  {}  {:<11} {:>12} {}  grant {}{}",
                            e["seq"],
                            e["at"].as_str().unwrap_or(""),
                            e["kind"].as_str().unwrap_or(""),
                            e["amount"].as_str().unwrap_or(""),
                            e["currency"].as_str().unwrap_or(""),
                            e["grant_id"].as_str().unwrap_or(""),
                            e["invoice_id"]
                                .as_str()
                                .map(|i| format!("  invoice {i}"))
                                .unwrap_or_default()
                        );
                    }
                    return Ok(out);
                }
            };
            if args.json {
                return Ok(v.to_string());
            }
            let _ = writeln!(
                out,
                "grant {} of {customer}: {} {} {}, {} left{}{}",
                v["id"].as_str().unwrap_or(""),
                v["kind"].as_str().unwrap_or(""),
                v["amount"].as_str().unwrap_or(""),
                v["currency"].as_str().unwrap_or(""),
                v["remaining"].as_str().unwrap_or(""),
                if v["usable"] == json!(false) {
                    ", usable once paid"
                } else {
                    ""
                },
                v["voided_at"]
                    .as_str()
                    .map(|t| format!(", voided at {t}"))
                    .unwrap_or_default()
            );
        }
    }
    Ok(out)
}

/// An answer of the API refusing `flags`, prefixed with them (an error
/// reaching the API already names `--url`).
fn naming(flags: &str, e: anyhow::Error) -> anyhow::Error {
    if e.to_string().starts_with("--url") {
        e
    } else {
        anyhow::anyhow!("{flags}: {e}")
    }
}

/// Percent-encodes a path or query component.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
