//! A local, stateful stand-in for the slice of Stripe's API Tally uses:
//! customers, invoice items, invoices (create, finalize, retrieve, list
//! lines with pagination), with Stripe's idempotency semantics and fault
//! injection. For tests and demos; it keeps everything in memory.
//!
//! Idempotency, as Stripe documents it: a `POST` with an `Idempotency-Key`
//! header is executed once; a later request with the same key and the same
//! parameters gets the saved response (same status, same body); the same key
//! with other parameters (or another path) is refused with 400
//! `idempotency_error`. Keys are kept for the stand-in's lifetime (Stripe
//! keeps them 24 hours). Successful responses are saved; a request that
//! failed validation is not (it can be retried with the same key).
//!
//! Faults ([`Fault`]) apply to the next `POST`s in order (replays of a
//! saved key do not consume one; [`Fault::Pass`] is a request without fault):
//! [`Fault::RateLimit`] and [`Fault::ServerError`] answer 429/500 without
//! executing anything (not saved under the key, like Stripe's 429s);
//! [`Fault::LoseResponse`] executes and saves the request, then answers 500
//! as if the response had been lost on the way back; [`Fault::Hang`]
//! executes and saves it, then never answers (the caller is expected to be
//! killed, as in a crash test).

// Handlers return ready-made error responses; their size does not matter here.
#![allow(clippy::result_large_err)]

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// No fault for this request (to place a fault further down the queue).
    Pass,
    RateLimit,
    ServerError,
    LoseResponse,
    Hang,
}

/// An invoice as the stand-in holds it.
#[derive(Debug, Clone)]
pub struct Invoice {
    pub id: String,
    pub customer: String,
    pub currency: String,
    pub status: String,
    pub number: Option<String>,
    pub metadata: BTreeMap<String, String>,
    /// Invoice item ids, in creation order.
    pub lines: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Item {
    pub id: String,
    pub customer: String,
    pub invoice: Option<String>,
    pub amount: i64,
    pub currency: String,
    pub description: String,
    pub metadata: BTreeMap<String, String>,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    customers: BTreeMap<String, Value>,
    invoices: BTreeMap<String, Invoice>,
    items: BTreeMap<String, Item>,
    /// key → (fingerprint, status, body)
    idempotency: HashMap<String, (String, u16, Value)>,
    faults: VecDeque<Fault>,
    posts_executed: u64,
    hung: u64,
}

impl Inner {
    fn id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}_{:014}", self.next_id)
    }
}

/// A running stand-in; stops when dropped.
#[derive(Clone)]
pub struct StandIn {
    inner: Arc<Mutex<Inner>>,
    addr: SocketAddr,
    _stop: Arc<tokio::sync::oneshot::Sender<()>>,
}

impl StandIn {
    /// Starts on `127.0.0.1` with a free port (or `port`).
    pub async fn start(port: u16) -> std::io::Result<StandIn> {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let app = Router::new()
            .route("/v1/customers", post(create_customer))
            .route("/v1/invoiceitems", post(create_item))
            .route("/v1/invoices", post(create_invoice))
            .route("/v1/invoices/{id}", get(get_invoice))
            .route("/v1/invoices/{id}/finalize", post(finalize_invoice))
            .route("/v1/invoices/{id}/lines", get(list_lines))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        Ok(StandIn {
            inner,
            addr,
            _stop: Arc::new(tx),
        })
    }

    /// Base URL to give a Stripe client (`http://127.0.0.1:port/`).
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    pub fn inject(&self, faults: impl IntoIterator<Item = Fault>) {
        self.inner.lock().unwrap().faults.extend(faults);
    }

    pub fn clear_faults(&self) {
        self.inner.lock().unwrap().faults.clear();
    }

    pub fn invoices(&self) -> Vec<Invoice> {
        self.inner
            .lock()
            .unwrap()
            .invoices
            .values()
            .cloned()
            .collect()
    }

    pub fn items(&self) -> Vec<Item> {
        self.inner.lock().unwrap().items.values().cloned().collect()
    }

    pub fn customers(&self) -> Vec<Value> {
        self.inner
            .lock()
            .unwrap()
            .customers
            .values()
            .cloned()
            .collect()
    }

    /// Sum of the invoice's line amounts, in minor units.
    pub fn invoice_total(&self, id: &str) -> Option<i64> {
        let g = self.inner.lock().unwrap();
        let inv = g.invoices.get(id)?;
        Some(inv.lines.iter().map(|l| g.items[l].amount).sum())
    }

    /// POSTs executed so far (replays of a saved key not counted).
    pub fn posts_executed(&self) -> u64 {
        self.inner.lock().unwrap().posts_executed
    }

    /// Requests currently held by [`Fault::Hang`].
    pub fn hung(&self) -> u64 {
        self.inner.lock().unwrap().hung
    }
}

type Shared = Arc<Mutex<Inner>>;
type Params = Vec<(String, String)>;

fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"type": kind, "message": message}})),
    )
        .into_response()
}

fn authorized(h: &HeaderMap) -> bool {
    h.get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("Bearer sk_"))
}

fn param<'a>(p: &'a Params, k: &str) -> Option<&'a str> {
    p.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str())
}

fn metadata(p: &Params) -> BTreeMap<String, String> {
    p.iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("metadata[")
                .and_then(|r| r.strip_suffix(']'))
                .map(|k| (k.to_owned(), v.clone()))
        })
        .collect()
}

/// Runs a POST under Stripe's idempotency rules and the fault queue.
async fn post_with(
    st: &Shared,
    h: &HeaderMap,
    path: String,
    params: Params,
    exec: impl FnOnce(&mut Inner, &Params) -> Result<Value, Response>,
) -> Response {
    if !authorized(h) {
        return error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "Invalid API Key provided",
        );
    }
    let key = h
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut sorted = params.clone();
    sorted.sort();
    let fingerprint = format!("POST {path} {sorted:?}");
    let fault;
    let result = {
        let mut g = st.lock().unwrap();
        if let Some(k) = &key {
            if let Some((fp, status, body)) = g.idempotency.get(k) {
                if *fp != fingerprint {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "idempotency_error",
                        &format!("Keys for idempotent requests can only be used with the same parameters they were first used with. Try using a key other than '{k}' if you meant to execute a different request."),
                    );
                }
                return (StatusCode::from_u16(*status).unwrap(), Json(body.clone()))
                    .into_response();
            }
        }
        fault = g.faults.pop_front();
        match fault {
            Some(Fault::RateLimit) => {
                return error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    "Too many requests",
                )
            }
            Some(Fault::ServerError) => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "api_error",
                    "injected server error",
                )
            }
            _ => {}
        }
        let r = exec(&mut g, &params);
        g.posts_executed += 1;
        if let (Some(k), Ok(body)) = (&key, &r) {
            g.idempotency
                .insert(k.clone(), (fingerprint, 200, body.clone()));
        }
        if fault == Some(Fault::Hang) {
            g.hung += 1;
        }
        r
    };
    match fault {
        Some(Fault::LoseResponse) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "api_error",
            "injected: response lost after the write",
        ),
        Some(Fault::Hang) => {
            std::future::pending::<()>().await;
            unreachable!()
        }
        _ => match result {
            Ok(v) => Json(v).into_response(),
            Err(r) => r,
        },
    }
}

fn missing(name: &str) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        &format!("Missing required param: {name}."),
    )
}

fn invoice_json(g: &Inner, inv: &Invoice) -> Value {
    let total: i64 = inv.lines.iter().map(|l| g.items[l].amount).sum();
    json!({
        "id": inv.id, "object": "invoice", "customer": inv.customer, "currency": inv.currency,
        "status": inv.status, "number": inv.number, "metadata": inv.metadata,
        "subtotal": total, "total": total, "amount_due": total, "livemode": false,
        "lines": {"object": "list", "data": [], "has_more": !inv.lines.is_empty(), "url": format!("/v1/invoices/{}/lines", inv.id)},
    })
}

fn item_json(i: &Item) -> Value {
    json!({
        "id": i.id, "object": "invoiceitem", "customer": i.customer, "invoice": i.invoice,
        "amount": i.amount, "currency": i.currency, "description": i.description,
        "metadata": i.metadata, "livemode": false, "discountable": true, "proration": false,
    })
}

async fn create_customer(
    State(st): State<Shared>,
    h: HeaderMap,
    Form(p): Form<Params>,
) -> Response {
    post_with(&st, &h, "/v1/customers".into(), p, |g, p| {
        let id = g.id("cus");
        let c = json!({
            "id": id, "object": "customer", "name": param(p, "name"), "email": param(p, "email"),
            "metadata": metadata(p), "livemode": false,
        });
        g.customers.insert(id, c.clone());
        Ok(c)
    })
    .await
}

async fn create_invoice(State(st): State<Shared>, h: HeaderMap, Form(p): Form<Params>) -> Response {
    post_with(&st, &h, "/v1/invoices".into(), p, |g, p| {
        let customer = param(p, "customer").ok_or_else(|| missing("customer"))?;
        if !g.customers.contains_key(customer) {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                &format!("No such customer: '{customer}'"),
            ));
        }
        let id = g.id("in");
        let inv = Invoice {
            id: id.clone(),
            customer: customer.to_owned(),
            currency: param(p, "currency").unwrap_or("usd").to_owned(),
            status: "draft".into(),
            number: None,
            metadata: metadata(p),
            lines: vec![],
        };
        let v = invoice_json(g, &inv);
        g.invoices.insert(id, inv);
        Ok(v)
    })
    .await
}

async fn create_item(State(st): State<Shared>, h: HeaderMap, Form(p): Form<Params>) -> Response {
    post_with(&st, &h, "/v1/invoiceitems".into(), p, |g, p| {
        let customer = param(p, "customer").ok_or_else(|| missing("customer"))?;
        let amount: i64 = param(p, "amount")
            .ok_or_else(|| missing("amount"))?
            .parse()
            .map_err(|_| {
                error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "Invalid integer: amount",
                )
            })?;
        let invoice = param(p, "invoice").map(str::to_owned);
        if let Some(inv) = &invoice {
            match g.invoices.get(inv) {
                Some(i) if i.status == "draft" => {}
                Some(_) => {
                    return Err(error(
                        StatusCode::BAD_REQUEST,
                        "invalid_request_error",
                        "You can only add invoice items to draft invoices.",
                    ))
                }
                None => {
                    return Err(error(
                        StatusCode::NOT_FOUND,
                        "invalid_request_error",
                        &format!("No such invoice: '{inv}'"),
                    ))
                }
            }
        }
        let id = g.id("ii");
        let item = Item {
            id: id.clone(),
            customer: customer.to_owned(),
            invoice: invoice.clone(),
            amount,
            currency: param(p, "currency").unwrap_or("usd").to_owned(),
            description: param(p, "description").unwrap_or_default().to_owned(),
            metadata: metadata(p),
        };
        let v = item_json(&item);
        if let Some(inv) = &invoice {
            g.invoices.get_mut(inv).unwrap().lines.push(id.clone());
        }
        g.items.insert(id, item);
        Ok(v)
    })
    .await
}

async fn finalize_invoice(
    State(st): State<Shared>,
    Path(id): Path<String>,
    h: HeaderMap,
    Form(p): Form<Params>,
) -> Response {
    post_with(&st, &h, format!("/v1/invoices/{id}/finalize"), p, |g, _| {
        let n = g.invoices.values().filter(|i| i.number.is_some()).count() + 1;
        let inv = g.invoices.get_mut(&id).ok_or_else(|| {
            error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                &format!("No such invoice: '{id}'"),
            )
        })?;
        if inv.status != "draft" {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "This invoice is already finalized.",
            ));
        }
        inv.status = "open".into();
        inv.number = Some(format!("STANDIN-{n:04}"));
        let inv = inv.clone();
        Ok(invoice_json(g, &inv))
    })
    .await
}

async fn get_invoice(State(st): State<Shared>, Path(id): Path<String>, h: HeaderMap) -> Response {
    if !authorized(&h) {
        return error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "Invalid API Key provided",
        );
    }
    let g = st.lock().unwrap();
    match g.invoices.get(&id) {
        Some(inv) => Json(invoice_json(&g, inv)).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            &format!("No such invoice: '{id}'"),
        ),
    }
}

async fn list_lines(
    State(st): State<Shared>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    h: HeaderMap,
) -> Response {
    if !authorized(&h) {
        return error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "Invalid API Key provided",
        );
    }
    let limit: usize = q
        .get("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(10)
        .clamp(1, 100);
    let g = st.lock().unwrap();
    let Some(inv) = g.invoices.get(&id) else {
        return error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            &format!("No such invoice: '{id}'"),
        );
    };
    // Line ids are the item ids (`il_` in Stripe; the item id is enough here).
    let start = match q.get("starting_after") {
        Some(after) => match inv.lines.iter().position(|l| l == after) {
            Some(i) => i + 1,
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "starting_after is not a line of this invoice",
                )
            }
        },
        None => 0,
    };
    let page: Vec<Value> = inv.lines[start.min(inv.lines.len())..]
        .iter()
        .take(limit)
        .map(|l| {
            let i = &g.items[l];
            json!({
                "id": i.id, "object": "line_item", "amount": i.amount, "currency": i.currency,
                "description": i.description, "discountable": true, "livemode": false,
                "metadata": i.metadata, "proration": false, "type": "invoiceitem",
                "invoice_item": i.id,
            })
        })
        .collect();
    let has_more = start + page.len() < inv.lines.len();
    Json(json!({"object": "list", "data": page, "has_more": has_more, "url": format!("/v1/invoices/{id}/lines")}))
        .into_response()
}

/// A `Stripe-Signature` header for `payload` signed at unix time `t` with
/// the endpoint secret, as Stripe computes it: `t=<t>,v1=<hex HMAC-SHA256 of
/// "<t>.<payload>">`.
pub fn sign_webhook(secret: &str, payload: &str, t: i64) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("any key size");
    mac.update(format!("{t}.{payload}").as_bytes());
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// A webhook event body of `kind` (`invoice.paid`, …) for a stand-in invoice.
pub fn invoice_event(kind: &str, invoice_id: &str) -> String {
    json!({
        "id": format!("evt_{invoice_id}_{kind}"), "object": "event", "type": kind,
        "data": {"object": {"id": invoice_id, "object": "invoice"}},
    })
    .to_string()
}
