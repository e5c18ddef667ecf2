//! Fees billed in advance (PRODUCT.md "Fees in advance", BILLING-EXAMPLES
//! example 9).
//!
//! A plan version with `fee_timing: in_advance` bills its flat and seat
//! fees at the start of the span they pay for; its usage is billed in
//! arrears like any other. The *fee state* at an instant is the plan
//! version, trial flag and seat count in force then; it is *paid in
//! advance* when the plan bills in advance and the instant is not in a
//! trial. Every second of paid in-advance fees is billed exactly once:
//!
//! - **Opening invoice.** Where paid in-advance fees *start* (the instant
//!   before had no subscription or a trial: a new subscription, a
//!   reactivation, a trial's end), an invoice is issued at once for the
//!   fees of the state there, from that instant to its period's end
//!   ([`opening`]).
//! - **Boundary invoice.** The invoice of period P carries P's usage (and
//!   the fees of P's in-arrears segments) as always, plus the next
//!   period's fees for the state in force at its start, for the whole
//!   period, unless they start there ([`next_fees`]).
//! - **Changes.** At every instant inside P where the paid in-advance state
//!   changes (a switch, seats up or down, a cancellation) other than a
//!   start, the fees in force before it are refunded for the rest of P (a
//!   negative line that names what it refunds) and those in force after it
//!   are charged for the rest of P, each prorated to the second and rounded
//!   once ([`changes`]); a flat fee only when the plan changes, a seat fee
//!   when the plan or the seats do. They are on P's invoice (the next one).
//!
//! An invoice's lines are then its period's own rating without the fees of
//! paid in-advance segments ([`arrears`]: what late usage is delta-rated
//! against), the change lines and the next period's fees ([`invoice`]).
//! Everything is computed from the plan history and seats alone, so
//! re-rating an invoice reproduces it. That holds because nothing may take
//! effect before an invoice of a customer billed in advance was issued
//! ([`check_issued`]): the state it billed from is settled by then.

use crate::rating::{
    rate, Advance, Line, LineKind, Period, Rated, RatingError, SeatInterval, Segment,
};
use crate::subscription::PeriodFinalized;
use chrono::{DateTime, Timelike, Utc};

/// The fees in force at an instant.
#[derive(Debug, Clone, Copy)]
struct FeeState<'a> {
    seg: &'a Segment,
    seats: u32,
}

impl<'a> FeeState<'a> {
    fn paid(&self) -> bool {
        !self.seg.trial && self.seg.plan.in_advance()
    }

    fn plan(self) -> (&'a str, u32) {
        (&self.seg.plan.plan, self.seg.plan.version)
    }
}

fn seats_where(seats: &[SeatInterval], inside: impl Fn(&SeatInterval) -> bool) -> u32 {
    seats.iter().find(|iv| inside(iv)).map_or(0, |iv| iv.seats)
}

/// The state in force at `t` (segments and seats cover `[start, end)`).
fn state_at<'a>(
    segs: &'a [Segment],
    seats: &[SeatInterval],
    t: DateTime<Utc>,
) -> Option<FeeState<'a>> {
    let seg = segs.iter().find(|s| s.start <= t && t < s.end)?;
    Some(FeeState {
        seg,
        seats: seats_where(seats, |iv| iv.start <= t && t < iv.end),
    })
}

/// The state in force just before `t`.
fn state_before<'a>(
    segs: &'a [Segment],
    seats: &[SeatInterval],
    t: DateTime<Utc>,
) -> Option<FeeState<'a>> {
    let seg = segs.iter().find(|s| s.start < t && t <= s.end)?;
    Some(FeeState {
        seg,
        seats: seats_where(seats, |iv| iv.start < t && t <= iv.end),
    })
}

/// Whether paid in-advance fees start at an instant with `before` and
/// `after` in force: nothing or a trial before it.
fn starts(before: Option<FeeState<'_>>, after: Option<FeeState<'_>>) -> bool {
    after.is_some_and(|a| a.paid()) && before.is_none_or(|b| b.seg.trial)
}

/// `t` as a line's description writes it: the day, with the time when it
/// is not midnight.
fn day(t: DateTime<Utc>) -> String {
    if t.num_seconds_from_midnight() == 0 && t.nanosecond() == 0 {
        t.format("%Y-%m-%d").to_string()
    } else {
        t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
    }
}

/// The flat and seat fee lines of `st` for `[from, to)` of `period`, with
/// its seats throughout, rated (and rounded once) as the rating engine
/// rates a segment.
fn fees(
    period: Period,
    st: FeeState<'_>,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    why: Advance,
) -> Result<Vec<Line>, RatingError> {
    let seg = Segment {
        plan: st.seg.plan.clone(),
        start: from,
        end: to,
        usage: vec![],
        trial: false,
    };
    let seats = [SeatInterval {
        start: from,
        end: to,
        seats: st.seats,
    }];
    let span = format!("{} – {}", day(from), day(to));
    Ok(rate(&period, &[seg], &seats)?
        .lines
        .into_iter()
        .filter(|l| matches!(l.kind, LineKind::FlatFee | LineKind::SeatFee))
        .map(|l| match why {
            Advance::Credit => Line {
                description: format!("Refund of {}, {span}", l.description),
                amount_exact: -l.amount_exact,
                amount: -l.amount,
                advance: Some(why),
                ..l
            },
            _ => Line {
                description: format!("{}, {span}", l.description),
                advance: Some(why),
                ..l
            },
        })
        .collect())
}

/// Which fee lines an instant with `before` and `after` in force changes:
/// (flat fee, seat fee).
fn changed(before: Option<FeeState<'_>>, after: Option<FeeState<'_>>) -> (bool, bool) {
    let (b, a) = (before.filter(|s| s.paid()), after.filter(|s| s.paid()));
    let flat = b.map(|s| s.plan()) != a.map(|s| s.plan());
    (flat, flat || b.map(|s| s.seats) != a.map(|s| s.seats))
}

fn keep(l: &Line, (flat, seat): (bool, bool)) -> bool {
    match l.kind {
        LineKind::FlatFee => flat,
        LineKind::SeatFee => seat,
        _ => false,
    }
}

/// The refunds and charges of every change of the paid in-advance state
/// strictly inside `period` that is not a start, in time order.
pub fn changes(
    period: Period,
    segs: &[Segment],
    seats: &[SeatInterval],
) -> Result<Vec<Line>, RatingError> {
    let mut at: Vec<DateTime<Utc>> = segs
        .iter()
        .flat_map(|s| [s.start, s.end])
        .chain(seats.iter().flat_map(|iv| [iv.start, iv.end]))
        .filter(|t| period.start < *t && *t < period.end)
        .collect();
    at.sort();
    at.dedup();
    let mut out = Vec::new();
    for t in at {
        let (before, after) = (state_before(segs, seats, t), state_at(segs, seats, t));
        if starts(before, after) {
            continue;
        }
        let which = changed(before, after);
        if let Some(b) = before.filter(|s| s.paid()) {
            out.extend(
                fees(period, b, t, period.end, Advance::Credit)?
                    .into_iter()
                    .filter(|l| keep(l, which)),
            );
        }
        if let Some(a) = after.filter(|s| s.paid()) {
            out.extend(
                fees(period, a, t, period.end, Advance::Charge)?
                    .into_iter()
                    .filter(|l| keep(l, which)),
            );
        }
    }
    Ok(out)
}

/// The instants inside `period` where paid in-advance fees start, each due
/// an opening invoice. `segs` and `seats` may reach back before the period
/// (a read from a second before it) so that a start at its first instant
/// can be told from a state that runs on.
pub fn start_instants(
    segs: &[Segment],
    seats: &[SeatInterval],
    period: Period,
) -> Vec<DateTime<Utc>> {
    segs.iter()
        .map(|s| s.start)
        .filter(|t| period.start <= *t && *t < period.end)
        .filter(|t| starts(state_before(segs, seats, *t), state_at(segs, seats, *t)))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// The opening invoice's rating for a start at `t` in `period`: the fees
/// in force at `t` to the period's end (none when `t` is not in a paid
/// in-advance segment).
pub fn opening(
    period: Period,
    segs: &[Segment],
    seats: &[SeatInterval],
    t: DateTime<Utc>,
) -> Result<Rated, RatingError> {
    match state_at(segs, seats, t).filter(|s| s.paid()) {
        Some(st) => Ok(Rated::of_lines(
            st.seg.plan.currency.clone(),
            st.seg.plan.minor_units,
            fees(period, st, t, period.end, Advance::Fee)?,
        )),
        None => Ok(Rated::of_lines(
            String::new(),
            crate::rating::DEFAULT_MINOR_UNITS,
            vec![],
        )),
    }
}

/// The plan segments and seats of the period after an invoice's, from its
/// start (only what is in force at the start matters).
pub struct Next<'a> {
    pub period: Period,
    pub segs: &'a [Segment],
    pub seats: &'a [SeatInterval],
}

/// The next period's fees, charged on the invoice of the period before:
/// the state in force at its start for the whole period, when it is paid
/// in advance and does not start there (a start gets an opening invoice).
pub fn next_fees(
    period: Period,
    segs: &[Segment],
    seats: &[SeatInterval],
    next: &Next<'_>,
) -> Result<Vec<Line>, RatingError> {
    let before = state_before(segs, seats, period.end);
    match state_at(next.segs, next.seats, next.period.start) {
        Some(after) if after.paid() && !starts(before, Some(after)) => fees(
            next.period,
            after,
            next.period.start,
            next.period.end,
            Advance::Fee,
        ),
        _ => Ok(vec![]),
    }
}

/// A period's own rating without the fees of its paid in-advance segments
/// (billed ahead instead): usage, in-arrears fees, trial lines at zero.
pub fn arrears(full: Rated, segs: &[Segment]) -> Rated {
    let ahead = |l: &Line| {
        matches!(l.kind, LineKind::FlatFee | LineKind::SeatFee)
            && l.waived.is_none()
            && segs.iter().any(|s| {
                s.plan.in_advance() && s.plan.plan == l.plan && s.plan.version == l.plan_version
            })
    };
    let lines: Vec<Line> = full.lines.into_iter().filter(|l| !ahead(l)).collect();
    Rated::of_lines(full.currency, full.minor_units, lines)
}

/// What the invoice of `period` bills from its rating `full` (every segment
/// of the period rated with its fees): [`arrears`], then the [`changes`],
/// then the next period's fees ([`next_fees`], when `next` is given).
pub fn invoice(
    full: Rated,
    period: Period,
    segs: &[Segment],
    seats: &[SeatInterval],
    next: Option<&Next<'_>>,
) -> Result<Rated, RatingError> {
    let r = arrears(full, segs);
    let mut lines = r.lines;
    lines.extend(changes(period, segs, seats)?);
    if let Some(n) = next {
        lines.extend(next_fees(period, segs, seats, n)?);
    }
    Ok(Rated::of_lines(r.currency, r.minor_units, lines))
}

/// Whether a change at `at` may be made for a customer billed in advance
/// whose latest invoice (any kind) was issued at `issued`: not before it,
/// since that invoice billed fees from the state then in force.
pub fn check_issued(
    at: DateTime<Utc>,
    latest: Option<(&str, DateTime<Utc>)>,
) -> Result<(), PeriodFinalized> {
    match latest {
        Some((number, issued)) if at < issued => Err(PeriodFinalized {
            at,
            invoice: number.to_owned(),
            open_from: issued,
        }),
        _ => Ok(()),
    }
}
