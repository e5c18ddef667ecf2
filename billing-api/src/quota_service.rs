//! Quota checks served from memory, with usage kept current from the
//! write path.
//!
//! For every customer with a plan now, the service keeps what
//! [`billing_domain::quota::decide`] needs: the current plan version, the
//! usage of the open period on each of the period's plan segments (so the
//! month to date is the draft's), seats, what runs now (instances and
//! volumes of the last complete hour: instance-seconds ÷ 3600, rounded up;
//! GB-seconds ÷ 3600), the suspension flag, the spending cap and the credit.
//!
//! **Usage is followed, not re-read.** An entry is read from the stores
//! once (on start, and again only when that customer changes), covering its
//! plan in force from where it started to the period end; from then on
//! every batch the usage writer commits arrives as an
//! [`aggregator::delta::UsageDelta`] (in-process in the embedded mode, from
//! the `usage-deltas` topic in the distributed one) and is added to the
//! entries of the customers it touches ([`QuotaService::apply`]): the cost
//! of keeping the state current grows with new usage, not with the month
//! or the number of customers.
//!
//! **Exactly the store's.** Each entry records the store's rollup version
//! of that customer its read stands at, taken before and after the read
//! ([`UsageStore::versions`]; a read between two equal answers holds
//! exactly the batches up to it), and takes a delta's cells only when the
//! delta is newer. Deltas that arrive while an entry is being read are
//! kept and replayed onto it when it is installed. A partition's deltas
//! chain by version ([`aggregator::delta::step`]): a missed one (a writer
//! killed between its write and the delta's publication, a follower that
//! fell behind) makes the service re-read every customer.
//!
//! **What a delta cannot be added to** makes its customer's entry re-read:
//! usage timed before the plan in force started (an earlier segment), in
//! the hour a plan change splits when it holds events from before the
//! change, and meters whose aggregation does not add up (`latest`,
//! `unique_count`). Usage timed before the period or at or after its end
//! does not touch the open period's entry. An entry is re-read as well when
//! its plan segment or period ends (a trial end, a scheduled switch, the
//! month).
//!
//! Plan switches, cap changes and suspensions made through this process
//! reload that customer at once; made through another replica they apply
//! within one `refresh` (every customer re-read). Each customer's entry
//! carries a version, bumped when what the control plane caches changes
//! (plan, limits, cap, suspension), for the snapshot endpoint.

use crate::invoice::{month_of, period_of, PlanCache};
use crate::state::{DynStateStore, PlanSegment, StateError, StateStore};
use crate::usage::{segment_usage, PeriodUsage};
use aggregator::delta::{step, DeltaCell, Step, UsageDelta};
use aggregator::{DynUsageStore, Granularity, UsageQuery, UsageStore};
use billing_domain::catalog::{cap_in_force, price_groups, Limits, PlanVersion};
use billing_domain::quota::{decide, Ask, Decision, QuotaInput, Running};
use billing_domain::rating::{Period, SeatInterval, Segment, UsageItem};
use chrono::{DateTime, Duration, DurationRound, Utc};
use rust_decimal::Decimal;
use schemas::{Aggregation, MeterCatalog};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

/// One customer as quota checks see it.
#[derive(Debug, Clone)]
pub struct Entry {
    pub plan: Arc<PlanVersion>,
    pub period: Period,
    /// When the entry was last read or added to.
    pub as_of: DateTime<Utc>,
    /// Where the usage of the plan in force now starts: the period start,
    /// or a switch or trial end inside the period.
    pub since: DateTime<Utc>,
    /// Usage of the plan in force now, timed from `since` to the period
    /// end, as the store holds it at `usage_version`.
    pub usage_to_date: Vec<UsageItem>,
    /// The store's rollup version of this customer the usage stands at
    /// (see the module docs).
    pub usage_version: u64,
    /// When the entry must be read again: the end of the plan segment in
    /// force, or of the period.
    pub next_change: DateTime<Utc>,
    /// Instance-seconds and GB-seconds of the current and previous hours,
    /// by hour start (unix seconds): what runs now.
    pub gauges: BTreeMap<i64, HourGauges>,
    /// The period's plan segments before the plan in force now, with their
    /// usage (see [`QuotaInput::earlier`]).
    pub earlier: Vec<Segment>,
    /// Where the trial of the plan in force ends, while in one.
    pub trial_end: Option<DateTime<Utc>>,
    /// Where the subscription ends inside the period (a cancellation).
    pub ends: Option<DateTime<Utc>>,
    pub seats: Vec<SeatInterval>,
    /// What ran in the hour before `as_of`'s.
    pub running: Running,
    pub suspended: bool,
    pub spending_cap: Option<Decimal>,
    /// Credit the customer can spend (in the plan's currency) at `as_of`.
    pub credit: Decimal,
    pub version: u64,
}

/// What the control plane may cache about a customer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CustomerLimits {
    pub customer_id: String,
    pub plan: String,
    pub plan_version: u32,
    pub limits: Limits,
    pub suspended: bool,
    /// The customer's cap, else the plan's default.
    pub spending_cap: Option<Decimal>,
    pub version: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Snapshot {
    /// Pass as `since` next time to get only what changed.
    pub version: u64,
    pub customers: Vec<CustomerLimits>,
}

/// Gauge usage of one hour.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HourGauges {
    /// (app, instance type) → instance-seconds.
    pub instance_secs: BTreeMap<(String, String), Decimal>,
    /// (app, volume id) → GB-seconds.
    pub gb_secs: BTreeMap<(String, String), Decimal>,
}

const COMPUTE: &str = "compute";
const DISK: &str = "disk";

impl HourGauges {
    /// What ran in the hour: instances (rounded up) and volume sizes.
    fn running(&self) -> Running {
        let hour = Decimal::from(3600);
        let mut r = Running::default();
        for (k, secs) in &self.instance_secs {
            let n = (secs / hour).ceil();
            let n = u32::try_from(n.mantissa() / 10i128.pow(n.scale())).unwrap_or(u32::MAX);
            if n > 0 {
                r.instances.insert(k.clone(), n);
            }
        }
        for (k, gbs) in &self.gb_secs {
            r.volumes.insert(k.clone(), gbs / hour);
        }
        r
    }

    /// Adds a gauge meter's quantity; false for other meters.
    fn add(&mut self, meter: &str, app: &str, dims: &BTreeMap<String, String>, q: Decimal) -> bool {
        let (map, dim) = match meter {
            COMPUTE => (&mut self.instance_secs, "instance_type"),
            DISK => (&mut self.gb_secs, "volume_id"),
            _ => return false,
        };
        let k = (app.to_owned(), dims.get(dim).cloned().unwrap_or_default());
        *map.entry(k).or_default() += q;
        true
    }
}

/// What a delta's cell did to an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Added {
    Yes,
    /// Nothing in the entry counts it.
    NotHere,
    /// The entry cannot take it: read the customer again.
    Reread,
}

impl Entry {
    /// The decision for `ask` at `now`, the instant the usage is current
    /// to (the quota rules forecast the rest of the period from there).
    pub fn decide(&self, ask: &Ask) -> anyhow::Result<Decision> {
        self.decide_at(ask, self.as_of)
    }

    /// [`Entry::decide`] at a later instant: what runs is that of the
    /// hour before `now`'s.
    pub fn decide_at(&self, ask: &Ask, now: DateTime<Utc>) -> anyhow::Result<Decision> {
        let now = now.max(self.as_of);
        let mut input = self.input();
        input.now = now;
        if hour_floor(now) == hour_floor(self.as_of) {
            return decide(&input, ask);
        }
        let running = self.running_at(now);
        input.running = &running;
        decide(&input, ask)
    }

    /// What ran in the hour before `now`'s.
    pub fn running_at(&self, now: DateTime<Utc>) -> Running {
        if hour_floor(now) == hour_floor(self.as_of) {
            return self.running.clone();
        }
        let h = hour_floor(now).timestamp() - 3600;
        self.gauges
            .get(&h)
            .map(HourGauges::running)
            .unwrap_or_default()
    }

    /// The entry as the quota rules take it.
    pub fn input(&self) -> QuotaInput<'_> {
        QuotaInput {
            plan: &self.plan,
            period: self.period,
            now: self.as_of,
            usage_to_date: &self.usage_to_date,
            earlier: &self.earlier,
            trial_end: self.trial_end,
            ends: self.ends,
            seats: &self.seats,
            running: &self.running,
            suspended: self.suspended,
            spending_cap: self.spending_cap,
            credit: self.credit,
        }
    }

    /// Adds one cell of a delta (see the module docs for what is refused).
    #[cfg(test)]
    fn add(&mut self, c: &DeltaCell, meters: &MeterCatalog) -> Added {
        let groups = price_groups(&self.plan);
        self.add_grouped(c, meters, &groups)
    }

    /// [`Entry::add`] with the plan's price groups computed once for all
    /// of a delta's cells of this customer.
    fn add_grouped(
        &mut self,
        c: &DeltaCell,
        meters: &MeterCatalog,
        groups: &[(String, Vec<String>)],
    ) -> Added {
        let Some(def) = meters.get(&c.meter) else {
            return Added::NotHere;
        };
        let (start, end) = (self.period.start.timestamp(), self.period.end.timestamp());
        if c.last < start || c.first >= end {
            return Added::NotHere;
        }
        if c.first < self.since.timestamp() {
            // Timed before the plan in force: an earlier segment's usage.
            return Added::Reread;
        }
        let dims: BTreeMap<String, String> = serde_json::from_str(&c.dims).unwrap_or_default();
        let mut added = Added::NotHere;
        let now_hour = hour_floor(self.as_of).timestamp();
        if c.hour >= now_hour - 3600 {
            let g = self.gauges.entry(c.hour).or_default();
            if g.add(&c.meter, &c.app, &dims, c.sum) {
                added = Added::Yes;
            }
        }
        let Some((_, group_by)) = groups.iter().find(|(m, _)| *m == c.meter) else {
            return added;
        };
        let group: BTreeMap<String, String> = group_by
            .iter()
            .map(|k| {
                let v = if k == schemas::meter::APP_DIMENSION {
                    c.app.clone()
                } else {
                    dims.get(k).cloned().unwrap_or_default()
                };
                (k.clone(), v)
            })
            .collect();
        let item = match self
            .usage_to_date
            .iter_mut()
            .find(|i| i.meter == c.meter && i.dims == group)
        {
            Some(i) => i,
            None => {
                self.usage_to_date.push(UsageItem {
                    meter: c.meter.clone(),
                    dims: group,
                    quantity: Decimal::ZERO,
                    events: 0,
                });
                self.usage_to_date.last_mut().expect("just pushed")
            }
        };
        match def.aggregation {
            Aggregation::Sum => item.quantity += c.sum,
            Aggregation::Count => item.quantity += Decimal::from(c.events),
            Aggregation::Max if item.events == 0 => item.quantity = c.max,
            Aggregation::Max => item.quantity = item.quantity.max(c.max),
            Aggregation::Latest | Aggregation::UniqueCount => return Added::Reread,
        }
        item.events += c.events;
        Added::Yes
    }

    /// Moves `as_of` on to `at`, dropping gauges older than the hour
    /// before and taking what ran from them.
    fn advance(&mut self, at: DateTime<Utc>) {
        if at <= self.as_of {
            return;
        }
        self.as_of = at;
        let h = hour_floor(at).timestamp();
        self.gauges.retain(|k, _| *k >= h - 3600);
        self.running = self
            .gauges
            .get(&(h - 3600))
            .map(HourGauges::running)
            .unwrap_or_default();
    }
}

/// Where the usage state stands, for the control plane and for tests to
/// wait on (`GET /v1/quota/state`).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StateProgress {
    /// Per usage partition, the rollup version applied through and when
    /// that batch was written.
    pub partitions: Vec<PartitionProgress>,
    /// Customers waiting to be read again.
    pub pending_rereads: usize,
    /// Entries in the state.
    pub customers: usize,
    /// Deltas applied since start, and re-reads of every customer.
    pub deltas_applied: u64,
    pub full_rereads: u64,
    /// The customer asked about, if it has an entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer: Option<CustomerProgress>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CustomerProgress {
    pub customer_id: String,
    /// The store's rollup version of the customer its usage stands at.
    pub usage_version: u64,
    /// When the entry was last read or added to.
    pub as_of: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PartitionProgress {
    pub partition: u32,
    pub version: u64,
    pub written_at: DateTime<Utc>,
}

/// What the service follows: deltas, or word that some were lost.
#[derive(Debug, Clone)]
pub enum Feed {
    Delta(Arc<UsageDelta>),
    /// The follower fell behind its source: re-read everyone.
    Lost,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<String, Arc<Entry>>,
    version: u64,
    /// Per partition: the version applied through, and when it was written.
    applied: HashMap<u32, (u64, DateTime<Utc>)>,
    /// Reads in flight: while any is, every delta is kept in `kept` to be
    /// replayed onto the entries they install.
    reading: usize,
    kept: Vec<Arc<UsageDelta>>,
    /// Customers to read again, and when each entry must be.
    stale: BTreeSet<String>,
    timers: BTreeSet<(DateTime<Utc>, String)>,
    reread_all: bool,
    deltas_applied: u64,
    full_rereads: u64,
    /// Entries changed since [`QuotaService::take_changed`] last ran.
    changed: BTreeSet<String>,
    /// The audit log read through this id (None: not yet positioned), and
    /// the ids seen within the overlap re-read each time.
    audit_at: Option<i64>,
    audit_seen: BTreeSet<i64>,
}

/// How often a follower reads the audit log for changes made elsewhere.
pub const CHANGE_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// Audit ids re-read behind the last one seen: a transaction that took an
/// id before another but committed after it is still noticed.
const AUDIT_OVERLAP: i64 = 256;

pub struct QuotaService {
    pub state: Arc<DynStateStore<'static>>,
    pub usage: Arc<DynUsageStore<'static>>,
    pub meters: Arc<MeterCatalog>,
    inner: RwLock<Inner>,
    following: std::sync::atomic::AtomicBool,
    /// Whether anyone takes [`QuotaService::take_changed`] (usage alerts).
    tracking: std::sync::atomic::AtomicBool,
}

fn hour_floor(t: DateTime<Utc>) -> DateTime<Utc> {
    t.duration_trunc(Duration::hours(1)).unwrap_or(t)
}

/// Same plan, limits, cap and suspension: nothing the control plane caches changed.
fn same_limits(a: &Entry, b: &Entry) -> bool {
    a.plan.plan == b.plan.plan
        && a.plan.version == b.plan.version
        && a.suspended == b.suspended
        && a.spending_cap == b.spending_cap
}

/// Adds `d`'s cells of customers with an entry to their entries (those
/// newer than what each stands at); returns the customers to read again
/// and those changed.
fn add_delta(
    entries: &mut HashMap<String, Arc<Entry>>,
    d: &UsageDelta,
    meters: &MeterCatalog,
    only: Option<&str>,
) -> (Vec<String>, Vec<String>) {
    let mut reread = Vec::new();
    let mut touched = Vec::new();
    let mut i = 0;
    while i < d.cells.len() {
        let customer = d.cells[i].customer.as_str();
        let n = d.cells[i..]
            .iter()
            .take_while(|c| c.customer == customer)
            .count();
        let cells = &d.cells[i..i + n];
        i += n;
        if only.is_some_and(|o| o != customer) {
            continue;
        }
        let Some(e) = entries.get_mut(customer) else {
            continue;
        };
        if d.version <= e.usage_version {
            continue;
        }
        let e = Arc::make_mut(e);
        e.advance(d.written_at);
        e.usage_version = d.version;
        touched.push(customer.to_owned());
        let groups = price_groups(&e.plan);
        if cells
            .iter()
            .map(|c| e.add_grouped(c, meters, &groups))
            .fold(false, |r, a| r | (a == Added::Reread))
        {
            reread.push(customer.to_owned());
        }
    }
    (reread, touched)
}

impl QuotaService {
    pub fn new(
        state: Arc<DynStateStore<'static>>,
        usage: Arc<DynUsageStore<'static>>,
        meters: Arc<MeterCatalog>,
    ) -> Self {
        Self {
            state,
            usage,
            meters,
            inner: RwLock::new(Inner::default()),
            following: Default::default(),
            tracking: Default::default(),
        }
    }

    /// Instance-seconds and GB-seconds per hour in `[from, to)`, per customer.
    async fn gauges(
        &self,
        customer: Option<&str>,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> anyhow::Result<HashMap<String, BTreeMap<i64, HourGauges>>> {
        let mut out: HashMap<String, BTreeMap<i64, HourGauges>> = HashMap::new();
        let mut questions = Vec::new();
        for (meter, group_by) in [
            (COMPUTE, ["app", "instance_type"]),
            (DISK, ["app", "volume_id"]),
        ] {
            let Some(def) = self.meters.get(meter) else {
                continue;
            };
            questions.push((
                def.clone(),
                UsageQuery {
                    customer: customer.unwrap_or_default().to_owned(),
                    meter: meter.into(),
                    from,
                    to,
                    group_by: group_by.iter().map(|s| s.to_string()).collect(),
                    granularity: Some(Granularity::Hour),
                    raw: false,
                },
            ));
        }
        let answers = match customer {
            Some(c) => {
                let mut v = Vec::new();
                for (def, q) in &questions {
                    v.push(HashMap::from([(
                        c.to_owned(),
                        self.usage.query(def, q).await?,
                    )]));
                }
                v
            }
            None => self.usage.query_all(&questions, None).await?,
        };
        for ((def, _), per) in questions.iter().zip(answers) {
            for (c, rows) in per {
                let hours = out.entry(c).or_default();
                for row in rows {
                    let Some(b) = row.bucket else { continue };
                    let app = row.group.get("app").cloned().unwrap_or_default();
                    hours
                        .entry(b.timestamp())
                        .or_default()
                        .add(&def.key, &app, &row.group, row.value);
                }
            }
        }
        Ok(out)
    }

    /// Builds entries for `customers` (all when None) as of `now`, each in
    /// its own billing period: the customers of each anchor day together.
    async fn build(
        &self,
        only: Option<&str>,
        now: DateTime<Utc>,
    ) -> anyhow::Result<HashMap<String, Entry>> {
        let st = self.state.as_ref();
        if let Some(c) = only {
            let anchor = match st.subscriptions(c).await {
                Ok(h) => billing_domain::subscription::anchor_of_history(&h),
                Err(StateError::NotFound(_)) => 1,
                Err(e) => return Err(e.into()),
            };
            return self
                .build_group(Some(c), None, period_of(now, anchor), now, None)
                .await;
        }
        let (anchored, groups) = billing_domain::subscription::anchor_groups(st.anchors().await?);
        // What runs is read once for every group.
        let h = hour_floor(now);
        let running = self
            .gauges(None, h - Duration::hours(1), h + Duration::hours(1))
            .await?;
        let mut out = self
            .build_group(
                None,
                Some((&anchored, false)),
                month_of(now),
                now,
                Some(&running),
            )
            .await?;
        for (a, ids) in &groups {
            out.extend(
                self.build_group(
                    None,
                    Some((ids, true)),
                    period_of(now, *a),
                    now,
                    Some(&running),
                )
                .await?,
            );
        }
        Ok(out)
    }

    /// Entries of one customer (`only`), or of everyone in (`true`) or out
    /// of (`false`) a set, in `period`; `running_all` is the gauges of the
    /// current and previous hours, read for every customer, or None to read
    /// them here. Usage is read through the period end (whole hours from
    /// rollups), so deltas of any later batch add on to it.
    async fn build_group(
        &self,
        only: Option<&str>,
        group: Option<(&BTreeSet<String>, bool)>,
        period: Period,
        now: DateTime<Utc>,
        running_all: Option<&HashMap<String, BTreeMap<i64, HourGauges>>>,
    ) -> anyhow::Result<HashMap<String, Entry>> {
        let as_of = now;
        let st = self.state.as_ref();
        let mut segs: HashMap<String, Vec<PlanSegment>> = match only {
            Some(c) => HashMap::from([(c.to_owned(), st.plan_segments(c, period).await?)]),
            None => st.plan_segments_all(period).await?,
        };
        if let Some((set, inside)) = group {
            segs.retain(|c, _| set.contains(c) == inside);
        }
        let seats_all = match only {
            Some(c) => HashMap::from([(c.to_owned(), st.seat_intervals(c, period).await?)]),
            None => st.seat_intervals_all(period).await?,
        };
        let settings = st.quota_settings().await?;
        let grants = st.open_grants_all().await?;
        let mut plans = PlanCache::default();
        let mut current: HashMap<String, Arc<PlanVersion>> = HashMap::new();
        // One copy of each plan version for every entry on it.
        let mut shared: HashMap<(String, u32), Arc<PlanVersion>> = HashMap::new();
        // Customers whose plan in force now started inside the period: the
        // segments before it, each rated with its own plan and usage (as
        // the draft rates them), and the current plan's usage from its
        // start. Everyone else is read in one pass below.
        let mut earlier: HashMap<String, Vec<Segment>> = HashMap::new();
        let mut trials: HashMap<String, DateTime<Utc>> = HashMap::new();
        let mut endings: HashMap<String, DateTime<Utc>> = HashMap::new();
        let mut usage: HashMap<String, Vec<UsageItem>> = HashMap::new();
        let mut sinces: HashMap<String, (DateTime<Utc>, DateTime<Utc>)> = HashMap::new();
        for (c, ss) in &segs {
            let Some(cur) = ss.iter().find(|s| s.start <= now && now < s.end) else {
                continue;
            };
            let plan = match shared.get(&(cur.plan.clone(), cur.version)) {
                Some(p) => p.clone(),
                None => {
                    let p = Arc::new(plans.get(st, &cur.plan, cur.version).await?.clone());
                    shared.insert((cur.plan.clone(), cur.version), p.clone());
                    p
                }
            };
            if cur.trial {
                trials.insert(c.clone(), cur.end);
            }
            // Segments run back to back while subscribed: a last one that
            // ends inside the period ends the subscription there.
            if let Some(e) = ss.last().map(|s| s.end).filter(|e| *e < period.end) {
                endings.insert(c.clone(), e);
            }
            let since = cur.start.max(period.start);
            sinces.insert(c.clone(), (since, cur.end.min(period.end)));
            if since > period.start {
                let mut before = Vec::new();
                for s in ss.iter().filter(|s| s.end <= since && s.end > period.start) {
                    let p = plans.get(st, &s.plan, s.version).await?.clone();
                    let (start, end) = (s.start.max(period.start), s.end);
                    let u =
                        segment_usage(self.usage.as_ref(), &self.meters, &p, c, start, end).await?;
                    before.push(Segment {
                        trial: s.trial,
                        plan: p,
                        start,
                        end,
                        usage: u,
                    });
                }
                let u = segment_usage(
                    self.usage.as_ref(),
                    &self.meters,
                    &plan,
                    c,
                    since,
                    period.end,
                )
                .await?;
                usage.insert(c.clone(), u);
                earlier.insert(c.clone(), before);
            }
            current.insert(c.clone(), plan);
        }
        let whole: HashMap<&String, &PlanVersion> = current
            .iter()
            .filter(|(c, _)| !earlier.contains_key(*c))
            .map(|(c, p)| (c, p.as_ref()))
            .collect();
        if !whole.is_empty() {
            let to_date = period;
            match only {
                Some(c) => {
                    if let Some(plan) = current.get(c).filter(|_| !earlier.contains_key(c)) {
                        let u = segment_usage(
                            self.usage.as_ref(),
                            &self.meters,
                            plan,
                            c,
                            period.start,
                            period.end,
                        )
                        .await?;
                        usage.insert(c.to_owned(), u);
                    }
                }
                None => {
                    let mut ids: Vec<String> = whole.keys().map(|c| c.to_string()).collect();
                    ids.sort();
                    let mut distinct: Vec<PlanVersion> = Vec::new();
                    for p in whole.values() {
                        if !distinct
                            .iter()
                            .any(|d| d.plan == p.plan && d.version == p.version)
                        {
                            distinct.push(PlanVersion::clone(p));
                        }
                    }
                    let pu = PeriodUsage::fetch_by(
                        self.usage.as_ref(),
                        &self.meters,
                        &distinct,
                        to_date,
                        &ids,
                        group.is_some_and(|(_, inside)| inside),
                    )
                    .await?;
                    for (c, plan) in &whole {
                        usage.insert(c.to_string(), pu.items(plan, c)?);
                    }
                }
            }
        }
        // What runs does not depend on the month: the last complete hour,
        // even when it belongs to the previous period.
        let h = hour_floor(now);
        let mut gauges = match running_all {
            _ if current.is_empty() => HashMap::new(),
            Some(all) => current
                .keys()
                .filter_map(|c| all.get(c).map(|r| (c.clone(), r.clone())))
                .collect(),
            None => {
                self.gauges(only, h - Duration::hours(1), h + Duration::hours(1))
                    .await?
            }
        };
        Ok(current
            .into_iter()
            .map(|(c, plan)| {
                let (suspended, cap) = settings.get(&c).cloned().unwrap_or((false, None));
                let until = endings
                    .get(&c)
                    .copied()
                    .unwrap_or(period.end)
                    .min(period.end);
                let credit = grants.get(&c).map_or(Decimal::ZERO, |g| {
                    billing_domain::credit::spendable(g, &plan.currency, as_of, until)
                });
                let (since, segment_end) = sinces
                    .get(&c)
                    .copied()
                    .unwrap_or((period.start, period.end));
                let gauges = gauges.remove(&c).unwrap_or_default();
                let running = gauges
                    .get(&(h.timestamp() - 3600))
                    .map(HourGauges::running)
                    .unwrap_or_default();
                let e = Entry {
                    plan,
                    period,
                    as_of,
                    since,
                    usage_to_date: usage.remove(&c).unwrap_or_default(),
                    usage_version: 0,
                    next_change: segment_end,
                    gauges,
                    earlier: earlier.remove(&c).unwrap_or_default(),
                    trial_end: trials.remove(&c),
                    ends: endings.remove(&c),
                    seats: seats_all.get(&c).cloned().unwrap_or_default(),
                    running,
                    suspended,
                    spending_cap: cap,
                    credit,
                    version: 0,
                };
                (c, e)
            })
            .collect())
    }

    /// Installs new entries read at `versions` (customers absent there had
    /// no usage: version 0), bumping the version of those whose limits
    /// changed, and replays onto them the deltas kept while they were read.
    /// `only`: one customer's read (absent from `fresh`: no plan now);
    /// `keep`: customers of a full read to leave as they are (their read
    /// was not stable), read again one by one.
    fn install(
        &self,
        fresh: HashMap<String, Entry>,
        versions: &HashMap<String, u64>,
        only: Option<&str>,
        keep: &BTreeSet<String>,
    ) {
        let mut g = self.inner.write().unwrap();
        let g = &mut *g;
        let mut version = g.version;
        let mut next = |old: Option<&Arc<Entry>>, mut e: Entry| {
            match old {
                Some(o) if same_limits(o, &e) => e.version = o.version,
                _ => {
                    version += 1;
                    e.version = version;
                }
            }
            Arc::new(e)
        };
        let mut installed: HashMap<String, Arc<Entry>> = HashMap::new();
        match only {
            Some(c) => {
                let old = g.entries.get(c).cloned();
                match fresh.into_iter().next() {
                    Some((id, mut e)) => {
                        e.usage_version = versions.get(&id).copied().unwrap_or(0);
                        installed.insert(id, next(old.as_ref(), e));
                    }
                    None => {
                        if old.is_some() {
                            version += 1;
                        }
                        g.entries.remove(c);
                    }
                }
            }
            None => {
                let mut entries = HashMap::with_capacity(fresh.len());
                for (id, mut e) in fresh {
                    if keep.contains(&id) {
                        if let Some(old) = g.entries.get(&id) {
                            entries.insert(id, old.clone());
                        }
                        continue;
                    }
                    e.usage_version = versions.get(&id).copied().unwrap_or(0);
                    let old = g.entries.get(&id).cloned();
                    installed.insert(id, next(old.as_ref(), e));
                }
                g.timers.clear();
                for (id, e) in &entries {
                    g.timers.insert((e.next_change, id.clone()));
                }
                g.entries = entries;
            }
        }
        let mut reread = Vec::new();
        for d in &g.kept {
            reread.extend(add_delta(&mut installed, d, &self.meters, None).0);
        }
        let tracking = self.tracking.load(std::sync::atomic::Ordering::Relaxed);
        for (id, e) in installed {
            g.timers.insert((e.next_change, id.clone()));
            if tracking {
                g.changed.insert(id.clone());
            }
            g.entries.insert(id, e);
        }
        g.stale.extend(reread);
        g.version = version;
    }

    /// Starts keeping every delta that arrives until [`Self::end_read`].
    fn begin_read(&self) {
        self.inner.write().unwrap().reading += 1;
    }

    fn end_read(&self) {
        let mut g = self.inner.write().unwrap();
        g.reading -= 1;
        if g.reading == 0 {
            g.kept.clear();
        }
    }

    /// The hours every open period spans at `now` (a month either side).
    fn version_range(now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
        (now - Duration::days(32), now + Duration::days(32))
    }

    /// Re-reads every customer. Customers whose usage changed during the
    /// read (their store version moved) keep their entry and are read
    /// again one by one.
    pub async fn refresh(&self, now: DateTime<Utc>) -> anyhow::Result<usize> {
        self.begin_read();
        let r = self.refresh_inner(now).await;
        self.end_read();
        let keep = r?;
        let n = self.inner.read().unwrap().entries.len();
        for c in keep {
            self.reload(&c, now).await?;
        }
        Ok(n)
    }

    async fn refresh_inner(&self, now: DateTime<Utc>) -> anyhow::Result<BTreeSet<String>> {
        let (from, to) = Self::version_range(now);
        let before = self.usage.versions(from, to, None).await?;
        let fresh = self.build(None, now).await?;
        let after = self.usage.versions(from, to, None).await?;
        let moved: BTreeSet<String> = after
            .iter()
            .filter(|(c, v)| before.get(*c) != Some(v))
            .map(|(c, _)| c.clone())
            .filter(|c| fresh.contains_key(c))
            .collect();
        {
            let mut g = self.inner.write().unwrap();
            g.reread_all = false;
            g.full_rereads += 1;
        }
        self.install(fresh, &after, None, &moved);
        Ok(moved)
    }

    /// Reads one customer again (after a plan switch, cap change or
    /// suspension, or a delta its entry could not take), until two
    /// readings of its store version around the read agree.
    pub async fn reload(&self, customer: &str, now: DateTime<Utc>) -> anyhow::Result<()> {
        self.begin_read();
        let r = self.reload_inner(customer, now).await;
        self.end_read();
        r
    }

    async fn reload_inner(&self, customer: &str, now: DateTime<Utc>) -> anyhow::Result<()> {
        let (from, to) = Self::version_range(now);
        let ids = [customer.to_owned()];
        for attempt in 0.. {
            let before = self.usage.versions(from, to, Some(&ids)).await?;
            let fresh = self.build(Some(customer), now).await?;
            let after = self.usage.versions(from, to, Some(&ids)).await?;
            let stable = before == after;
            if stable || attempt >= 20 {
                self.install(fresh, &before, Some(customer), &BTreeSet::new());
                let mut g = self.inner.write().unwrap();
                if stable {
                    g.stale.remove(customer);
                } else {
                    // Still moving: take this read, and read it again shortly.
                    tracing::debug!(customer, "usage kept moving during the read; reading again");
                    g.stale.insert(customer.to_owned());
                }
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(5 * (attempt + 1))).await;
        }
        unreachable!()
    }

    /// Adds a committed batch to the state; what it cannot take is marked
    /// to be read again ([`Self::catch_up`]).
    pub fn apply(&self, d: Arc<UsageDelta>) {
        let mut g = self.inner.write().unwrap();
        let g = &mut *g;
        let applied = g.applied.get(&d.partition).map(|a| a.0);
        match step(applied, &d) {
            Step::Skip => return,
            Step::Gap => {
                tracing::warn!(partition = d.partition, applied = ?applied, prev = d.prev, version = d.version, "usage deltas missed; re-reading every customer");
                g.reread_all = true;
            }
            Step::Apply => {}
        }
        g.applied.insert(d.partition, (d.version, d.written_at));
        g.deltas_applied += 1;
        if d.cells.is_empty() {
            return;
        }
        let (reread, touched) = add_delta(&mut g.entries, &d, &self.meters, None);
        g.stale.extend(reread);
        if self.tracking.load(std::sync::atomic::Ordering::Relaxed) {
            g.changed.extend(touched);
        }
        if g.reading > 0 {
            g.kept.push(d);
        }
    }

    /// Reads again what must be: everyone after lost deltas, else each
    /// customer marked stale or whose plan segment or period has ended.
    pub async fn catch_up(&self, now: DateTime<Utc>) -> anyhow::Result<()> {
        let (all, due) = {
            let mut g = self.inner.write().unwrap();
            let g = &mut *g;
            while let Some((t, c)) = g.timers.first().cloned() {
                if t > now {
                    break;
                }
                g.timers.pop_first();
                g.stale.insert(c);
            }
            (g.reread_all, std::mem::take(&mut g.stale))
        };
        // At a period's end most customers of its anchor day are due at
        // once: one read of everyone is cheaper than thousands of single ones.
        if all || due.len() > 1000 {
            self.refresh(now).await?;
            return Ok(());
        }
        for c in due {
            if let Err(e) = self.reload(&c, now).await {
                self.inner.write().unwrap().stale.insert(c);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Follows `feed` until it closes or `stop` turns true: applies each
    /// delta and reads again what needs it.
    pub async fn follow(
        self: Arc<Self>,
        mut feed: tokio::sync::mpsc::Receiver<Feed>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        self.following
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_poll = std::time::Instant::now();
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                item = feed.recv() => match item {
                    None => return,
                    Some(Feed::Delta(d)) => {
                        self.apply(d);
                        // Apply what else is queued before reading anything.
                        while let Ok(item) = feed.try_recv() {
                            match item {
                                Feed::Delta(d) => self.apply(d),
                                Feed::Lost => self.inner.write().unwrap().reread_all = true,
                            }
                        }
                    }
                    Some(Feed::Lost) => {
                        tracing::warn!("usage feed fell behind; re-reading every customer");
                        self.inner.write().unwrap().reread_all = true;
                    }
                },
                _ = tick.tick() => {}
            }
            if last_poll.elapsed() >= CHANGE_POLL {
                last_poll = std::time::Instant::now();
                if let Err(e) = self.poll_changes().await {
                    tracing::warn!(error = %format!("{e:#}"), "reading the audit log for changes failed; retrying");
                }
            }
            let pending = {
                let g = self.inner.read().unwrap();
                g.reread_all
                    || !g.stale.is_empty()
                    || g.timers.first().is_some_and(|(t, _)| *t <= Utc::now())
            };
            if pending {
                if let Err(e) = self.catch_up(crate::wire::now()).await {
                    tracing::warn!(error = %format!("{e:#}"), "quota state re-read failed; retrying");
                }
            }
        }
    }

    /// Marks the customers named in audit entries written since the last
    /// call to be read again: changes made through another replica (a plan
    /// switch, cap, suspension, grant). The first call only positions the
    /// reader at the log's end (the state was just read).
    pub async fn poll_changes(&self) -> anyhow::Result<usize> {
        let at = self.inner.read().unwrap().audit_at;
        let Some(at) = at else {
            let head = self.state.audit_head().await?;
            let behind = self.state.audit_after(head - AUDIT_OVERLAP, 10_000).await?;
            let mut g = self.inner.write().unwrap();
            g.audit_at = Some(head);
            g.audit_seen.extend(behind.into_iter().map(|(id, _)| id));
            return Ok(0);
        };
        let rows = self.state.audit_after(at - AUDIT_OVERLAP, 10_000).await?;
        let mut g = self.inner.write().unwrap();
        let g = &mut *g;
        let mut n = 0;
        for (id, subject) in rows {
            if !g.audit_seen.insert(id) {
                continue;
            }
            g.audit_at = Some(g.audit_at.map_or(id, |a| a.max(id)));
            if let Some(c) = subject.strip_prefix("customer:") {
                g.stale.insert(c.to_owned());
                n += 1;
            }
        }
        let floor = g.audit_at.unwrap_or(0) - AUDIT_OVERLAP;
        g.audit_seen.retain(|id| *id > floor);
        Ok(n)
    }

    /// The entries changed (read, or added to) since the last call: what
    /// usage alerts evaluate. The first call starts the tracking (it costs
    /// a customer id per change, so it is off unless someone takes them)
    /// and returns every entry.
    pub fn take_changed(&self) -> Vec<(String, Arc<Entry>)> {
        if !self
            .tracking
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            return self.entries();
        }
        let mut g = self.inner.write().unwrap();
        let changed = std::mem::take(&mut g.changed);
        changed
            .into_iter()
            .filter_map(|c| g.entries.get(&c).map(|e| (c, e.clone())))
            .collect()
    }

    /// True once [`Self::follow`] runs: usage arrives as deltas, and the
    /// full re-read is only a backstop.
    pub fn following(&self) -> bool {
        self.following.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Where the state stands (and `customer`'s entry).
    pub fn progress(&self, customer: Option<&str>) -> StateProgress {
        let g = self.inner.read().unwrap();
        let mut partitions: Vec<PartitionProgress> = g
            .applied
            .iter()
            .map(|(p, (v, at))| PartitionProgress {
                partition: *p,
                version: *v,
                written_at: *at,
            })
            .collect();
        partitions.sort_by_key(|p| p.partition);
        StateProgress {
            partitions,
            pending_rereads: g.stale.len() + usize::from(g.reread_all),
            customers: g.entries.len(),
            deltas_applied: g.deltas_applied,
            full_rereads: g.full_rereads,
            customer: customer.and_then(|c| {
                g.entries.get(c).map(|e| CustomerProgress {
                    customer_id: c.to_owned(),
                    usage_version: e.usage_version,
                    as_of: e.as_of,
                })
            }),
        }
    }

    /// Every customer's entry.
    pub fn entries(&self) -> Vec<(String, Arc<Entry>)> {
        let g = self.inner.read().unwrap();
        g.entries
            .iter()
            .map(|(c, e)| (c.clone(), e.clone()))
            .collect()
    }

    pub fn entry(&self, customer: &str) -> Option<Arc<Entry>> {
        self.inner.read().unwrap().entries.get(customer).cloned()
    }

    /// Limits of every customer whose entry changed after `since`.
    pub fn snapshot(&self, since: u64) -> Snapshot {
        let g = self.inner.read().unwrap();
        let mut customers: Vec<CustomerLimits> = g
            .entries
            .iter()
            .filter(|(_, e)| e.version > since)
            .map(|(c, e)| CustomerLimits {
                customer_id: c.clone(),
                plan: e.plan.plan.clone(),
                plan_version: e.plan.version,
                limits: e.plan.limits.clone(),
                suspended: e.suspended,
                spending_cap: cap_in_force(&e.plan, e.spending_cap),
                version: e.version,
            })
            .collect();
        customers.sort_by(|a, b| a.customer_id.cmp(&b.customer_id));
        Snapshot {
            version: g.version,
            customers,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use billing_domain::catalog::Catalog;
    use chrono::TimeZone;

    fn at(d: u32, h: u32, m: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, d, h, m, 0).unwrap()
    }

    fn entry(since: DateTime<Utc>) -> Entry {
        let plan = Catalog::default_catalog()
            .plans
            .into_iter()
            .find(|p| p.plan == "payg")
            .unwrap();
        let period = Period {
            start: at(1, 0, 0),
            end: Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).unwrap(),
        };
        Entry {
            plan: Arc::new(plan),
            period,
            as_of: at(8, 10, 30),
            since,
            usage_to_date: vec![UsageItem {
                meter: "requests".into(),
                dims: BTreeMap::new(),
                quantity: Decimal::from(100),
                events: 1,
            }],
            usage_version: 5,
            next_change: period.end,
            gauges: BTreeMap::new(),
            earlier: vec![],
            trial_end: None,
            ends: None,
            seats: vec![],
            running: Running::default(),
            suspended: false,
            spending_cap: None,
            credit: Decimal::ZERO,
            version: 1,
        }
    }

    fn cell(meter: &str, dims: &str, first: DateTime<Utc>, q: i64) -> DeltaCell {
        let t = first.timestamp();
        DeltaCell {
            customer: "c".into(),
            meter: meter.into(),
            hour: t - t.rem_euclid(3600),
            app: "web".into(),
            dims: dims.into(),
            events: 2,
            sum: Decimal::from(q),
            max: Decimal::from(q),
            latest: (t, Decimal::from(q)),
            first: t,
            last: t,
        }
    }

    #[test]
    fn cells_add_to_the_plans_groups_and_the_hour_gauges() {
        let meters = MeterCatalog::default_catalog();
        let mut e = entry(at(1, 0, 0));
        assert_eq!(
            e.add(&cell("requests", "{}", at(8, 10, 5), 7), &meters),
            Added::Yes
        );
        assert_eq!(e.usage_to_date[0].quantity, Decimal::from(107));
        assert_eq!(e.usage_to_date[0].events, 3);
        // Compute is grouped by instance type, as the plan's prices filter.
        let dims = r#"{"instance_type":"t4g.small","region":"eu"}"#;
        assert_eq!(
            e.add(&cell("compute", dims, at(8, 9, 10), 3600), &meters),
            Added::Yes
        );
        let c = e
            .usage_to_date
            .iter()
            .find(|i| i.meter == "compute")
            .unwrap();
        assert_eq!(
            (c.dims.get("instance_type").map(String::as_str), c.quantity),
            (Some("t4g.small"), Decimal::from(3600))
        );
        // The previous hour's gauges are what runs now.
        e.advance(at(8, 10, 31));
        assert_eq!(
            e.running.instances.get(&("web".into(), "t4g.small".into())),
            Some(&1)
        );
        // An hour later they are no longer.
        assert!(e.running_at(at(8, 11, 1)).instances.is_empty());
    }

    #[test]
    fn what_an_entry_cannot_take_is_read_again() {
        let meters = MeterCatalog::default_catalog();
        // Plan in force since 10:20 (a switch): earlier usage, and usage of
        // the split hour from before the switch, are read again.
        let mut e = entry(at(8, 10, 20));
        assert_eq!(
            e.add(&cell("requests", "{}", at(8, 9, 0), 1), &meters),
            Added::Reread
        );
        assert_eq!(
            e.add(&cell("requests", "{}", at(8, 10, 10), 1), &meters),
            Added::Reread
        );
        assert_eq!(
            e.add(&cell("requests", "{}", at(8, 10, 25), 1), &meters),
            Added::Yes
        );
        // Outside the period: nothing of this entry.
        let old = Utc.with_ymd_and_hms(2026, 11, 30, 23, 0, 0).unwrap();
        assert_eq!(
            e.add(&cell("requests", "{}", old, 1), &meters),
            Added::NotHere
        );
        // A meter nobody prices, and a latest-value meter.
        assert_eq!(
            e.add(&cell("nope", "{}", at(8, 10, 25), 1), &meters),
            Added::NotHere
        );
        let mut plan = PlanVersion::clone(&e.plan);
        plan.prices.push(
            plan.prices
                .iter()
                .find(|p| p.meter == "requests")
                .unwrap()
                .clone(),
        );
        plan.prices.last_mut().unwrap().meter = "seats".into();
        e.plan = Arc::new(plan);
        assert_eq!(
            e.add(&cell("seats", "{}", at(8, 10, 25), 1), &meters),
            Added::Reread
        );
    }
}
