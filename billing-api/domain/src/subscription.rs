//! Subscription rules: a customer's plan history as rows, and what a
//! switch or a withdrawal writes, decided from that history before anything
//! is written (the state store applies the writes in its transaction).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Why a change of plan history is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("invalid: {0}")]
    Invalid(String),
}

/// A row of a customer's plan history as stored, not clipped to a period:
/// the plan runs from `start` (inclusive) to `end` (exclusive; none while it
/// runs until changed). A row whose start is still ahead is a scheduled
/// change (a switch at the period end), which can be withdrawn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Subscription {
    /// The change's id (for withdrawing it while it is scheduled).
    pub id: i64,
    pub plan: String,
    pub version: u32,
    pub start: DateTime<Utc>,
    pub end: Option<DateTime<Utc>>,
    /// The end of the row's trial (absent: no trial), decided when the
    /// subscription started ([`trial_end`]); the trial also ends where the
    /// row does (a switch or a cancellation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trial_end: Option<DateTime<Utc>>,
    /// The billing anchor day (1 to 31): the customer's periods run from
    /// one anchor to the next (`invoice::period_of`). Every row of a
    /// customer's history has the same.
    #[serde(default = "first_day")]
    pub anchor_day: u32,
}

fn first_day() -> u32 {
    1
}

/// What `subscribe` is asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSubscription {
    pub plan: String,
    pub version: u32,
    pub start: DateTime<Utc>,
    /// Instead of the plan version's `trial_days` ([`trial_end`]).
    pub trial_days: Option<u32>,
    /// Default: 1 for a first subscription, the customer's anchor after a
    /// cancellation ([`anchor_for`]).
    pub anchor_day: Option<u32>,
}

impl NewSubscription {
    /// The plan version from `start`, with the plan's trial and the
    /// default anchor.
    pub fn new(plan: &str, version: u32, start: DateTime<Utc>) -> Self {
        Self {
            plan: plan.to_owned(),
            version,
            start,
            trial_days: None,
            anchor_day: None,
        }
    }
}

/// A customer's billing anchor day: its history's (every row has the
/// same), 1 without a history.
pub fn anchor_of_history(rows: &[Subscription]) -> u32 {
    rows.last().map_or(1, |s| s.anchor_day)
}

/// Customers on anchor days other than 1 (as `StateStore::anchors` lists
/// them): all of them, and grouped by day, each group a walk of its own.
pub fn anchor_groups(
    anchors: std::collections::HashMap<String, u32>,
) -> (
    std::collections::BTreeSet<String>,
    std::collections::BTreeMap<u32, std::collections::BTreeSet<String>>,
) {
    let mut groups: std::collections::BTreeMap<u32, std::collections::BTreeSet<String>> =
        Default::default();
    for (c, a) in &anchors {
        groups.entry(*a).or_default().insert(c.clone());
    }
    (anchors.into_keys().collect(), groups)
}

/// The anchor day of a new subscription: the requested one (1 to 31,
/// default 1) for a customer's first; after a cancellation the customer's
/// own, which a request may repeat but not change (the periods already
/// invoiced are cut with it).
pub fn anchor_for(
    rows: &[Subscription],
    customer: &str,
    requested: Option<u32>,
) -> Result<u32, RuleError> {
    if let Some(a) = requested.filter(|a| !crate::invoice::ANCHOR_DAYS.contains(a)) {
        return Err(RuleError::Invalid(format!(
            "anchor_day: 1 to 31 (a day past a month's end means its last day), got {a}"
        )));
    }
    match rows.last() {
        None => Ok(requested.unwrap_or(1)),
        Some(r) => match requested {
            Some(a) if a != r.anchor_day => Err(RuleError::Invalid(format!(
                "anchor_day: customer {customer} is billed from day {} of each month; its anchor stays for its whole history",
                r.anchor_day
            ))),
            _ => Ok(r.anchor_day),
        },
    }
}

impl Subscription {
    /// The spans the row is rated in: `(start, end, trial)`, the trial part
    /// first. `end` None: until changed.
    pub fn spans(&self) -> Vec<(DateTime<Utc>, Option<DateTime<Utc>>, bool)> {
        match self.trial_end {
            Some(t) if t > self.start => {
                let trial_until = self.end.map_or(t, |e| e.min(t));
                let mut out = vec![(self.start, Some(trial_until), true)];
                if self.end.is_none_or(|e| e > t) {
                    out.push((t, self.end, false));
                }
                out
            }
            _ => vec![(self.start, self.end, false)],
        }
    }
}

/// A row of the history that ends with nothing after it is cancelled
/// there: the instant, when `rows` (in order) end in a cancellation.
pub fn cancelled_at(rows: &[Subscription]) -> Option<DateTime<Utc>> {
    rows.last().and_then(|r| r.end)
}

/// What a plan switch did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchOutcome {
    /// When the requested plan takes effect: the switch's instant, or the
    /// start of the row that already runs that plan version from before it
    /// (a repeated switch changes nothing).
    pub effective_at: DateTime<Utc>,
    /// Changes that started at or after the switch's instant, replaced by
    /// it (withdrawn, each audited).
    pub withdrawn: Vec<Subscription>,
}

/// The history (in order, not empty) at instant `at`: the row in effect
/// (the last to start before it) and the rows that start at or after it;
/// `what` (a switch, a cancellation) must come after the first row starts.
fn cut_at(
    rows: Vec<Subscription>,
    at: DateTime<Utc>,
    what: &str,
) -> Result<(Subscription, Vec<Subscription>), RuleError> {
    let first = rows.first().expect("a history to cut").start;
    if at <= first {
        return Err(RuleError::Invalid(format!(
            "{what} at {at} must come after the customer's first plan starts ({first})"
        )));
    }
    let (mut earlier, later): (Vec<_>, Vec<_>) = rows.into_iter().partition(|r| r.start < at);
    let cut = earlier.pop().expect("the first row starts before at");
    Ok((cut, later))
}

/// `subscribe` starts a customer's first subscription, or a new one after
/// a cancellation (reactivation): refused while any row of the history
/// runs at or after `at`.
pub fn check_can_subscribe(
    rows: &[Subscription],
    customer: &str,
    at: DateTime<Utc>,
) -> Result<(), RuleError> {
    match rows.last() {
        Some(r) if r.end.is_none_or(|e| e > at) => {
            Err(RuleError::Conflict(format!(
            "customer {customer} already has a subscription ({} from {}{}); switch plans instead",
            r.plan,
            r.start,
            r.end.map(|e| format!(", cancelled at {e}")).unwrap_or_default()
        )))
        }
        _ => Ok(()),
    }
}

/// When the trial of a subscription to `plan` starting at `at` ends: a
/// customer's first subscription to a plan (by name, any version) starts
/// with the version's `trial_days` (or the `days` staff asked for, 0 for
/// none); a plan the customer had before, and every switch, start without.
pub fn trial_end(
    rows: &[Subscription],
    plan: &str,
    trial_days: u32,
    days: Option<u32>,
    at: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let days = days.unwrap_or(trial_days);
    if days == 0 || rows.iter().any(|r| r.plan == plan) {
        return None;
    }
    Some(at + chrono::Duration::days(days.into()))
}

/// The writes of a cancellation at `at`: delete `withdrawn` (changes
/// scheduled at or after it), end `cut` (the row in effect) at `at`.
#[derive(Debug)]
pub struct CancelWrites {
    pub withdrawn: Vec<Subscription>,
    pub cut: Subscription,
    pub at: DateTime<Utc>,
}

/// What a cancellation did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Cancellation {
    /// Where the last plan segment ends: usage timed at or after it is not
    /// billed.
    pub effective_at: DateTime<Utc>,
    /// Changes scheduled at or after it, withdrawn (each audited).
    pub withdrawn: Vec<Subscription>,
}

impl CancelWrites {
    /// `Ok(None)`: the subscription is cancelled at `at` already (a repeat
    /// changes nothing).
    pub fn plan(
        rows: Vec<Subscription>,
        customer: &str,
        at: DateTime<Utc>,
    ) -> Result<Option<Self>, RuleError> {
        if rows.is_empty() {
            return Err(RuleError::Conflict(format!(
                "customer {customer} has no subscription to cancel"
            )));
        }
        if cancelled_at(&rows) == Some(at) {
            return Ok(None);
        }
        let (cut, later) = cut_at(rows, at, "a cancellation")?;
        let continued = |e: DateTime<Utc>| later.first().is_some_and(|l| l.start == e);
        if let Some(e) = cut.end.filter(|e| *e < at || (*e == at && !continued(*e))) {
            return Err(RuleError::Conflict(format!(
                "customer {customer}'s subscription ended at {e}; there is nothing to cancel at {at}"
            )));
        }
        if let Some(e) = cut.end.filter(|e| !continued(*e)) {
            return Err(RuleError::Conflict(format!(
                "customer {customer}'s subscription is cancelled at {e} already; withdraw that cancellation first"
            )));
        }
        Ok(Some(Self {
            withdrawn: later,
            cut,
            at,
        }))
    }

    pub fn outcome(&self) -> Cancellation {
        Cancellation {
            effective_at: self.at,
            withdrawn: self.withdrawn.clone(),
        }
    }
}

/// A scheduled cancellation withdrawn: the row to run on until changed.
/// `Ok(None)`: no cancellation is scheduled (look for an earlier
/// withdrawal: a retry answers it again).
pub fn reopen(
    rows: &[Subscription],
    customer: &str,
    now: DateTime<Utc>,
) -> Result<Option<Subscription>, RuleError> {
    match rows.last() {
        None => Err(RuleError::NotFound(format!(
            "subscription of customer {customer}"
        ))),
        Some(r) => match r.end {
            None => Ok(None),
            Some(e) if e <= now => Err(RuleError::Conflict(format!(
                "customer {customer}'s cancellation took effect at {e}; subscribe again instead"
            ))),
            Some(_) => Ok(Some(r.clone())),
        },
    }
}

/// The writes of a switch, decided from the customer's history (ordered by
/// start) before anything is written. Applied in this order, which keeps
/// one open row per customer at every step: delete `withdrawn`, set the
/// end of `cut` to `cut_end`, insert the new row when `insert`.
#[derive(Debug)]
pub struct SwitchWrites {
    pub withdrawn: Vec<Subscription>,
    /// The row in effect at the switch's instant (before the change).
    pub cut: Subscription,
    pub cut_end: Option<DateTime<Utc>>,
    pub insert: bool,
    pub effective_at: DateTime<Utc>,
}

impl SwitchWrites {
    pub fn plan(
        rows: Vec<Subscription>,
        customer: &str,
        plan: &str,
        version: u32,
        at: DateTime<Utc>,
    ) -> Result<Self, RuleError> {
        if rows.is_empty() {
            return Err(RuleError::Invalid(format!(
                "customer {customer} has no subscription to switch from"
            )));
        }
        let (cut, later) = cut_at(rows, at, "a switch")?;
        // The row in effect ends with nothing after it: a cancellation.
        if let Some(e) = cut
            .end
            .filter(|e| later.first().is_none_or(|l| l.start != *e))
        {
            return Err(if e <= at {
                RuleError::Invalid(format!(
                    "customer {customer} has no plan in effect at {at}: the subscription ended at {e}; subscribe again instead"
                ))
            } else {
                RuleError::Conflict(format!(
                    "customer {customer}'s subscription is cancelled at {e}; withdraw the cancellation before switching"
                ))
            });
        }
        let same = |r: &Subscription| r.plan == plan && r.version == version;
        // The same switch again: the change it made is there already.
        if let [only] = later.as_slice() {
            if only.start == at && only.end.is_none() && same(only) {
                return Ok(Self {
                    effective_at: at,
                    cut_end: cut.end,
                    cut,
                    withdrawn: vec![],
                    insert: false,
                });
            }
        }
        if same(&cut) {
            // Already on that plan at `at`: it runs on, and what was
            // scheduled after it is withdrawn.
            let cut_end = if later.is_empty() { cut.end } else { None };
            return Ok(Self {
                effective_at: cut.start,
                cut_end,
                cut,
                withdrawn: later,
                insert: false,
            });
        }
        Ok(Self {
            effective_at: at,
            cut_end: Some(at),
            cut,
            withdrawn: later,
            insert: true,
        })
    }

    /// Whether anything is written (a switch repeated writes nothing, not
    /// even an audit entry).
    pub fn changes(&self) -> bool {
        self.insert || !self.withdrawn.is_empty() || self.cut_end != self.cut.end
    }

    pub fn outcome(self) -> SwitchOutcome {
        SwitchOutcome {
            effective_at: self.effective_at,
            withdrawn: self.withdrawn,
        }
    }
}

/// The writes of a withdrawal: delete `withdrawn`, give `previous` its end.
#[derive(Debug)]
pub struct WithdrawWrites {
    pub withdrawn: Subscription,
    pub previous: Subscription,
}

impl WithdrawWrites {
    /// `Ok(None)`: no such row (look for an earlier withdrawal of it).
    pub fn plan(
        rows: &[Subscription],
        customer: &str,
        id: i64,
        now: DateTime<Utc>,
    ) -> Result<Option<Self>, RuleError> {
        let Some(i) = rows.iter().position(|r| r.id == id) else {
            return Ok(None);
        };
        let row = &rows[i];
        if row.start <= now {
            return Err(RuleError::Conflict(format!(
                "change {id} of customer {customer} took effect at {}; switch plans instead",
                row.start
            )));
        }
        if i == 0 || rows[i - 1].end != Some(row.start) {
            return Err(RuleError::Conflict(format!(
                "{id} is a subscription of customer {customer} starting {}, not a scheduled change",
                row.start
            )));
        }
        Ok(Some(Self {
            withdrawn: row.clone(),
            previous: rows[i - 1].clone(),
        }))
    }
}

/// The open-period rule: a change of plan or seats may not take effect
/// inside a period that is already invoiced (its invoice is immutable), only
/// from that period's end on. `last_invoiced` is the customer's latest
/// invoice, by number and period end.
pub fn check_open(
    at: DateTime<Utc>,
    last_invoiced: Option<(&str, DateTime<Utc>)>,
) -> Result<(), PeriodFinalized> {
    match last_invoiced {
        Some((number, end)) if at < end => Err(PeriodFinalized {
            at,
            invoice: number.to_owned(),
            open_from: end,
        }),
        _ => Ok(()),
    }
}

/// A change refused by [`check_open`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{at} falls in a period already invoiced ({invoice}); changes take effect from {open_from} on"
)]
pub struct PeriodFinalized {
    pub at: DateTime<Utc>,
    /// The number of the invoice of that period.
    pub invoice: String,
    /// The first instant a change may take effect.
    pub open_from: DateTime<Utc>,
}

/// Whether a customer may subscribe to a plan version: `retired` is `None`
/// when the version does not exist.
pub fn check_plan_usable(retired: Option<bool>, plan: &str, version: u32) -> Result<(), RuleError> {
    match retired {
        None => Err(RuleError::NotFound(format!(
            "plan {plan} version {version}"
        ))),
        Some(true) => Err(RuleError::Invalid(format!(
            "plan {plan} version {version} is retired"
        ))),
        Some(false) => Ok(()),
    }
}

/// A contract is subscribable only by its customer.
pub fn check_offered(plan: &crate::catalog::PlanVersion, customer: &str) -> Result<(), RuleError> {
    if plan.offered_to(customer) {
        Ok(())
    } else {
        Err(RuleError::Invalid(format!(
            "plan: {} version {} is another customer's contract",
            plan.plan, plan.version
        )))
    }
}

/// Why retiring a plan version changed nothing: it is retired already, or
/// does not exist.
pub fn retire_refused(exists: bool, plan: &str, version: u32) -> RuleError {
    if exists {
        RuleError::Conflict(format!("plan {plan} version {version} is already retired"))
    } else {
        RuleError::NotFound(format!("plan {plan} version {version}"))
    }
}

/// A withdrawal repeated: the change `id` withdrawn earlier, found among
/// the `before` images of the customer's earlier withdrawals, is the
/// answer again; a change never scheduled is not found.
pub fn withdrawn_earlier<'a>(
    withdrawals: impl IntoIterator<Item = &'a serde_json::Value>,
    customer: &str,
    id: i64,
) -> Result<Subscription, RuleError> {
    withdrawals
        .into_iter()
        .filter_map(|b| serde_json::from_value::<Subscription>(b.clone()).ok())
        .find(|s| s.id == id)
        .ok_or_else(|| RuleError::NotFound(format!("scheduled change {id} of customer {customer}")))
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    #[test]
    fn changes_only_from_the_end_of_the_last_invoiced_period() {
        let end = Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap();
        let before = end - chrono::Duration::seconds(1);
        assert_eq!(check_open(before, None), Ok(()));
        assert_eq!(check_open(end, Some(("TLY-000007", end))), Ok(()));
        let e = check_open(before, Some(("TLY-000007", end))).unwrap_err();
        assert_eq!((e.invoice.as_str(), e.open_from), ("TLY-000007", end));
        assert!(
            e.to_string().contains("already invoiced (TLY-000007)"),
            "{e}"
        );
    }

    #[test]
    fn plan_usability_retirement_and_repeated_withdrawals() {
        assert_eq!(check_plan_usable(Some(false), "payg", 1), Ok(()));
        assert!(matches!(
            check_plan_usable(None, "payg", 9),
            Err(RuleError::NotFound(_))
        ));
        assert!(matches!(
            check_plan_usable(Some(true), "payg", 1),
            Err(RuleError::Invalid(_))
        ));
        assert!(matches!(
            retire_refused(true, "payg", 1),
            RuleError::Conflict(_)
        ));
        assert!(matches!(
            retire_refused(false, "payg", 1),
            RuleError::NotFound(_)
        ));
        let s = Subscription {
            id: 4,
            plan: "team".into(),
            version: 1,
            start: Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap(),
            end: None,
            trial_end: None,
            anchor_day: 1,
        };
        let images = [
            serde_json::json!({"unrelated": true}),
            serde_json::to_value(&s).unwrap(),
        ];
        assert_eq!(withdrawn_earlier(&images, "cus_1", 4), Ok(s));
        assert!(matches!(
            withdrawn_earlier(&images, "cus_1", 5),
            Err(RuleError::NotFound(_))
        ));
    }
    use super::*;

    fn t(day: u32) -> DateTime<Utc> {
        format!("2026-11-{day:02}T00:00:00Z").parse().unwrap()
    }

    fn row(id: i64, plan: &str, start: u32, end: Option<u32>) -> Subscription {
        Subscription {
            id,
            plan: plan.into(),
            version: 1,
            start: t(start),
            end: end.map(t),
            trial_end: None,
            anchor_day: 1,
        }
    }

    #[test]
    fn a_switch_cuts_the_row_in_effect_and_withdraws_what_was_scheduled_after() {
        let rows = vec![row(1, "payg", 1, Some(20)), row(2, "team", 20, None)];
        let w = SwitchWrites::plan(rows, "c", "business", 1, t(10)).unwrap();
        assert_eq!((w.cut.id, w.cut_end, w.insert), (1, Some(t(10)), true));
        assert_eq!(w.withdrawn, vec![row(2, "team", 20, None)]);
        assert!(w.changes());
        assert_eq!(w.outcome().effective_at, t(10));
    }

    #[test]
    fn the_same_switch_again_writes_nothing() {
        let rows = vec![row(1, "payg", 1, Some(10)), row(2, "team", 10, None)];
        let w = SwitchWrites::plan(rows, "c", "team", 1, t(10)).unwrap();
        assert!(!w.changes(), "{w:?}");
        // Switching to the plan already in effect keeps its start.
        let w = SwitchWrites::plan(vec![row(1, "payg", 1, None)], "c", "payg", 1, t(5)).unwrap();
        assert!(!w.changes());
        assert_eq!(w.outcome().effective_at, t(1));
    }

    #[test]
    fn refusals_say_why() {
        assert!(matches!(
            SwitchWrites::plan(vec![], "c", "payg", 1, t(5)),
            Err(RuleError::Invalid(_))
        ));
        assert!(matches!(
            SwitchWrites::plan(vec![row(1, "payg", 5, None)], "c", "team", 1, t(5)),
            Err(RuleError::Invalid(_))
        ));
        let rows = vec![row(1, "payg", 1, Some(20)), row(2, "team", 20, None)];
        // A change that took effect, or the first row, cannot be withdrawn.
        assert!(matches!(
            WithdrawWrites::plan(&rows, "c", 2, t(21)),
            Err(RuleError::Conflict(_))
        ));
        assert!(matches!(
            WithdrawWrites::plan(
                &[row(1, "payg", 5, Some(20)), row(2, "team", 20, None)],
                "c",
                1,
                t(1)
            ),
            Err(RuleError::Conflict(_))
        ));
        assert!(WithdrawWrites::plan(&rows, "c", 9, t(2)).unwrap().is_none());
        let w = WithdrawWrites::plan(&rows, "c", 2, t(2)).unwrap().unwrap();
        assert_eq!((w.withdrawn.id, w.previous.id), (2, 1));
        assert!(check_can_subscribe(&[], "c", t(1)).is_ok());
        let e = check_can_subscribe(&[row(1, "payg", 1, None)], "c", t(5)).unwrap_err();
        assert_eq!(
            e,
            RuleError::Conflict(
                "customer c already has a subscription (payg from 2026-11-01 00:00:00 UTC); switch plans instead".into()
            )
        );
    }

    #[test]
    fn cancellation_ends_the_row_in_effect_and_withdraws_what_follows() {
        let rows = vec![row(1, "payg", 1, Some(20)), row(2, "team", 20, None)];
        let w = CancelWrites::plan(rows.clone(), "c", t(13))
            .unwrap()
            .unwrap();
        assert_eq!((w.cut.id, w.at), (1, t(13)));
        assert_eq!(w.withdrawn, vec![row(2, "team", 20, None)]);
        // At the instant of the scheduled switch: the switch is withdrawn.
        let w = CancelWrites::plan(rows.clone(), "c", t(20))
            .unwrap()
            .unwrap();
        assert_eq!((w.cut.id, w.withdrawn.len()), (1, 1));
        // Later: the team row is cut.
        let w = CancelWrites::plan(rows, "c", t(25)).unwrap().unwrap();
        assert_eq!((w.cut.id, w.withdrawn.len()), (2, 0));
        // Repeated: nothing to write.
        let done = vec![row(1, "payg", 1, Some(13))];
        assert!(CancelWrites::plan(done.clone(), "c", t(13))
            .unwrap()
            .is_none());
        assert_eq!(cancelled_at(&done), Some(t(13)));
        // After it ended, before it starts, without a subscription.
        for (rows, at) in [
            (done.clone(), t(20)),
            (vec![row(1, "payg", 5, None)], t(5)),
            (vec![], t(5)),
        ] {
            assert!(CancelWrites::plan(rows, "c", at).is_err());
        }
        // Moving a scheduled cancellation earlier: withdraw it first.
        assert!(matches!(
            CancelWrites::plan(done.clone(), "c", t(10)),
            Err(RuleError::Conflict(_))
        ));
        // No switch across a cancellation, scheduled or done.
        assert!(matches!(
            SwitchWrites::plan(done.clone(), "c", "team", 1, t(10)),
            Err(RuleError::Conflict(_))
        ));
        assert!(matches!(
            SwitchWrites::plan(done.clone(), "c", "team", 1, t(14)),
            Err(RuleError::Invalid(_))
        ));
        // Reactivation after it ended; not while it runs.
        assert!(check_can_subscribe(&done, "c", t(13)).is_ok());
        assert!(check_can_subscribe(&done, "c", t(12)).is_err());
        // Withdrawing the cancellation before it takes effect reopens the row.
        assert_eq!(reopen(&done, "c", t(12)), Ok(Some(done[0].clone())));
        assert!(matches!(
            reopen(&done, "c", t(13)),
            Err(RuleError::Conflict(_))
        ));
        assert_eq!(reopen(&[row(1, "payg", 1, None)], "c", t(12)), Ok(None));
        // A reactivation after a gap is a subscription, not a change.
        let gap = vec![row(1, "payg", 1, Some(10)), row(2, "team", 20, None)];
        assert!(matches!(
            WithdrawWrites::plan(&gap, "c", 2, t(15)),
            Err(RuleError::Conflict(_))
        ));
        assert!(SwitchWrites::plan(gap, "c", "business", 1, t(5)).is_err());
    }

    #[test]
    fn the_anchor_day_is_chosen_once() {
        assert_eq!(anchor_for(&[], "c", None), Ok(1));
        assert_eq!(anchor_for(&[], "c", Some(31)), Ok(31));
        for bad in [0, 32] {
            let e = anchor_for(&[], "c", Some(bad)).unwrap_err();
            assert!(e.to_string().contains("anchor_day: 1 to 31"), "{e}");
        }
        let mut r = row(1, "payg", 1, Some(10));
        r.anchor_day = 15;
        assert_eq!(anchor_for(&[r.clone()], "c", None), Ok(15));
        assert_eq!(anchor_for(&[r.clone()], "c", Some(15)), Ok(15));
        assert!(matches!(
            anchor_for(&[r], "c", Some(1)),
            Err(RuleError::Invalid(_))
        ));
    }

    #[test]
    fn a_first_subscription_to_a_plan_starts_its_trial() {
        assert_eq!(trial_end(&[], "biz", 14, None, t(1)), Some(t(15)));
        assert_eq!(trial_end(&[], "biz", 14, Some(0), t(1)), None);
        assert_eq!(trial_end(&[], "biz", 0, Some(3), t(1)), Some(t(4)));
        assert_eq!(trial_end(&[], "biz", 0, None, t(1)), None);
        // The plan was had before (reactivation): no second trial.
        assert_eq!(
            trial_end(&[row(1, "biz", 1, Some(5))], "biz", 14, None, t(10)),
            None
        );
        let mut r = row(1, "biz", 1, None);
        r.trial_end = Some(t(15));
        assert_eq!(
            r.spans(),
            vec![(t(1), Some(t(15)), true), (t(15), None, false)]
        );
        // Cancelled inside the trial: the trial is all there is.
        r.end = Some(t(10));
        assert_eq!(r.spans(), vec![(t(1), Some(t(10)), true)]);
    }
}
