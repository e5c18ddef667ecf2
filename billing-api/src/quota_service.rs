//! Quota checks served from memory.
//!
//! For every customer with a plan now, the service keeps what
//! [`billing_domain::quota::decide`] needs: the current plan version, usage of the
//! open period through the last complete hour (rollups) on each of the
//! period's plan segments (so the month to date is the draft's), seats, what runs
//! now (instances and volumes seen in the last complete hour: instance-
//! seconds ÷ 3600, rounded up; GB-seconds ÷ 3600), the suspension flag and
//! the spending cap.
//!
//! Staleness: everything is reloaded every `refresh` (default 60 s, one
//! usage read for all customers, as finalization does); usage is that of
//! complete hours, so a check sees usage at most one hour plus one refresh
//! old. Plan switches, cap changes and suspensions made through this process
//! reload that customer at once; made through another replica they apply
//! within one refresh. Each customer's entry carries a version, bumped when
//! what the control plane caches changes (plan, limits, cap, suspension), for
//! the snapshot endpoint.

use crate::invoice::{month_of, period_of, PlanCache};
use crate::state::{DynStateStore, PlanSegment, StateError, StateStore};
use crate::usage::{segment_usage, PeriodUsage};
use aggregator::{DynUsageStore, UsageQuery, UsageStore};
use billing_domain::catalog::{cap_in_force, Limits, PlanVersion};
use billing_domain::quota::{decide, Ask, Decision, QuotaInput, Running};
use billing_domain::rating::{Period, SeatInterval, Segment, UsageItem};
use chrono::{DateTime, Duration, DurationRound, Utc};
use rust_decimal::Decimal;
use schemas::MeterCatalog;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

/// One customer as quota checks see it.
#[derive(Debug, Clone)]
pub struct Entry {
    pub plan: PlanVersion,
    pub period: Period,
    /// Usage and gauges are through this instant (an hour boundary).
    pub as_of: DateTime<Utc>,
    /// Usage of the plan in force now, from where it started (the period
    /// start, or a switch inside the period) through `as_of`.
    pub usage_to_date: Vec<UsageItem>,
    /// The period's plan segments before the plan in force now, with their
    /// usage (see [`QuotaInput::earlier`]).
    pub earlier: Vec<Segment>,
    /// Where the trial of the plan in force ends, while in one.
    pub trial_end: Option<DateTime<Utc>>,
    /// Where the subscription ends inside the period (a cancellation).
    pub ends: Option<DateTime<Utc>>,
    pub seats: Vec<SeatInterval>,
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

impl Entry {
    /// The decision for `ask`. The forecast runs from `as_of`: the
    /// counters' rate is that of the usage the entry holds, and the rest of
    /// the period is counted from there (a little more than is left, so the
    /// forecast errs high).
    pub fn decide(&self, ask: &Ask) -> anyhow::Result<Decision> {
        decide(&self.input(), ask)
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
}

#[derive(Default)]
struct Inner {
    entries: HashMap<String, Arc<Entry>>,
    version: u64,
}

pub struct QuotaService {
    pub state: Arc<DynStateStore<'static>>,
    pub usage: Arc<DynUsageStore<'static>>,
    pub meters: Arc<MeterCatalog>,
    inner: RwLock<Inner>,
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
        }
    }

    /// Instances and volumes seen in `[from, to)`, per customer.
    async fn running(
        &self,
        customer: Option<&str>,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> anyhow::Result<HashMap<String, Running>> {
        let mut out: HashMap<String, Running> = HashMap::new();
        let mut questions = Vec::new();
        for (meter, group_by) in [
            ("compute", ["app", "instance_type"]),
            ("disk", ["app", "volume_id"]),
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
                    granularity: None,
                    raw: false,
                },
            ));
        }
        let secs = Decimal::from(crate::rating::prorated_secs(from, to).max(1));
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
                let r = out.entry(c).or_default();
                for row in rows {
                    let g = |k: &str| row.group.get(k).cloned().unwrap_or_default();
                    if def.key == "compute" {
                        let n = (row.value / secs).ceil();
                        let n =
                            u32::try_from(n.mantissa() / 10i128.pow(n.scale())).unwrap_or(u32::MAX);
                        if n > 0 {
                            *r.instances
                                .entry((g("app"), g("instance_type")))
                                .or_default() += n;
                        }
                    } else {
                        r.volumes
                            .insert((g("app"), g("volume_id")), row.value / secs);
                    }
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
        // What runs now is read once for every group.
        let as_of = hour_floor(now);
        let running = self
            .running(None, as_of - Duration::hours(1), as_of)
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
    /// of (`false`) a set, in `period`; `running_all` is what runs, read
    /// for every customer, or None to read it here.
    async fn build_group(
        &self,
        only: Option<&str>,
        group: Option<(&BTreeSet<String>, bool)>,
        period: Period,
        now: DateTime<Utc>,
        running_all: Option<&HashMap<String, Running>>,
    ) -> anyhow::Result<HashMap<String, Entry>> {
        let as_of = hour_floor(now);
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
        let mut current: HashMap<String, PlanVersion> = HashMap::new();
        // Customers whose plan in force now started inside the period: the
        // segments before it, each rated with its own plan and usage (as
        // the draft rates them), and the current plan's usage from its
        // start. Everyone else is read in one pass below.
        let mut earlier: HashMap<String, Vec<Segment>> = HashMap::new();
        let mut trials: HashMap<String, DateTime<Utc>> = HashMap::new();
        let mut endings: HashMap<String, DateTime<Utc>> = HashMap::new();
        let mut usage: HashMap<String, Vec<UsageItem>> = HashMap::new();
        for (c, ss) in &segs {
            let Some(cur) = ss.iter().find(|s| s.start <= now && now < s.end) else {
                continue;
            };
            let plan = plans.get(st, &cur.plan, cur.version).await?.clone();
            if cur.trial {
                trials.insert(c.clone(), cur.end);
            }
            // Segments run back to back while subscribed: a last one that
            // ends inside the period ends the subscription there.
            if let Some(e) = ss.last().map(|s| s.end).filter(|e| *e < period.end) {
                endings.insert(c.clone(), e);
            }
            let since = cur.start.max(period.start);
            if since > period.start {
                let mut before = Vec::new();
                for s in ss.iter().filter(|s| s.end <= since && s.end > period.start) {
                    let p = plans.get(st, &s.plan, s.version).await?.clone();
                    let (start, end) = (s.start.max(period.start), s.end);
                    let u = if as_of > start {
                        segment_usage(
                            self.usage.as_ref(),
                            &self.meters,
                            &p,
                            c,
                            start,
                            end.min(as_of),
                        )
                        .await?
                    } else {
                        Vec::new()
                    };
                    before.push(Segment {
                        trial: s.trial,
                        plan: p,
                        start,
                        end,
                        usage: u,
                    });
                }
                let u = if as_of > since {
                    segment_usage(self.usage.as_ref(), &self.meters, &plan, c, since, as_of).await?
                } else {
                    Vec::new()
                };
                usage.insert(c.clone(), u);
                earlier.insert(c.clone(), before);
            }
            current.insert(c.clone(), plan);
        }
        let whole: HashMap<&String, &PlanVersion> = current
            .iter()
            .filter(|(c, _)| !earlier.contains_key(*c))
            .collect();
        if as_of > period.start && !whole.is_empty() {
            let to_date = Period {
                start: period.start,
                end: as_of,
            };
            match only {
                Some(c) => {
                    if let Some(plan) = current.get(c).filter(|_| !earlier.contains_key(c)) {
                        let u = segment_usage(
                            self.usage.as_ref(),
                            &self.meters,
                            plan,
                            c,
                            period.start,
                            as_of,
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
                            distinct.push((*p).clone());
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
        // What runs now does not depend on the month: the last complete
        // hour, even when it belongs to the previous period.
        let mut running = match running_all {
            _ if current.is_empty() => HashMap::new(),
            Some(all) => current
                .keys()
                .filter_map(|c| all.get(c).map(|r| (c.clone(), r.clone())))
                .collect(),
            None => {
                self.running(only, as_of - Duration::hours(1), as_of)
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
                let e = Entry {
                    plan,
                    period,
                    as_of,
                    usage_to_date: usage.remove(&c).unwrap_or_default(),
                    earlier: earlier.remove(&c).unwrap_or_default(),
                    trial_end: trials.remove(&c),
                    ends: endings.remove(&c),
                    seats: seats_all.get(&c).cloned().unwrap_or_default(),
                    running: running.remove(&c).unwrap_or_default(),
                    suspended,
                    spending_cap: cap,
                    credit,
                    version: 0,
                };
                (c, e)
            })
            .collect())
    }

    /// Installs new entries, bumping the version of those whose limits changed.
    fn install(&self, fresh: HashMap<String, Entry>, only: Option<&str>) {
        let mut g = self.inner.write().unwrap();
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
        match only {
            Some(c) => {
                let old = g.entries.get(c).cloned();
                match fresh.into_iter().next() {
                    Some((id, e)) => {
                        let e = next(old.as_ref(), e);
                        g.entries.insert(id, e);
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
                for (id, e) in fresh {
                    let old = g.entries.get(&id).cloned();
                    entries.insert(id, next(old.as_ref(), e));
                }
                g.entries = entries;
            }
        }
        g.version = version;
    }

    /// Reloads every customer.
    pub async fn refresh(&self, now: DateTime<Utc>) -> anyhow::Result<usize> {
        let fresh = self.build(None, now).await?;
        let n = fresh.len();
        self.install(fresh, None);
        Ok(n)
    }

    /// Reloads one customer (after a plan switch, cap change or suspension).
    pub async fn reload(&self, customer: &str, now: DateTime<Utc>) -> anyhow::Result<()> {
        let fresh = self.build(Some(customer), now).await?;
        self.install(fresh, Some(customer));
        Ok(())
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
