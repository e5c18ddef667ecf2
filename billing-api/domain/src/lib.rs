//! Tally's billing rules, free of I/O: access decisions ([`access`]), the catalog and its validation
//! ([`catalog`]), rating with allowances ([`rating`]), re-rating into
//! adjustment lines ([`adjust`]), invoice building, periods and numbering
//! ([`invoice`]), usage alerts: what raises one, thresholds, back-off and
//! their kinds and statuses ([`alert`]), the cost report and plan advisor
//! arithmetic ([`costs`]), credit grants and their consumption order
//! ([`credit`]), coupons, tax and the steps from rated lines to the amount
//! due ([`settle`]), quota decisions
//! ([`quota`]), subscription rules ([`subscription`]), status enums ([`names`]), webhook
//! signatures ([`webhook`]) and how decimals and instants are read from
//! request bodies and catalog files ([`wire`]).
//!
//! Nothing here reads a clock, a store or the network: callers pass the
//! instant, the usage and the plans in, and get amounts, lines and decisions
//! out. The billing API (`billing-api`) is the only caller that does I/O
//! with them; it re-exports these modules at their old paths
//! (`billing_api::rating`, …).

pub mod access;
pub mod adjust;
pub mod advance;
pub mod alert;
pub mod catalog;
pub mod costs;
pub mod credit;
pub mod invoice;
pub mod names;
pub mod quota;
pub mod rating;
pub mod settle;
pub mod subscription;
pub mod webhook;
pub mod wire;
