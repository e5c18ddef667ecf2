//! Rating engine throughput: a month for one customer on the business plan
//! (21 prices, 20 usage lines plus the flat fee) and a plan switch in the
//! middle (two segments), against a baseline of the irreducible arithmetic
//! for the same lines (one decimal multiply and one rounding per line),
//! measured in the same run.

use billing_api::catalog::Catalog;
use billing_api::rating::{rate, Period, Segment, UsageItem};
use chrono::{TimeZone, Utc};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use rust_decimal::Decimal;

fn usage() -> Vec<UsageItem> {
    let types = [
        "t4g.nano",
        "t4g.micro",
        "t4g.small",
        "t4g.medium",
        "c6g.large",
        "c6g.xlarge",
        "c6g.2xlarge",
    ];
    let mut u = Vec::new();
    for (i, t) in types.iter().enumerate() {
        for region in ["fra", "iad"] {
            u.push(UsageItem {
                meter: "compute".into(),
                dims: [
                    ("instance_type".to_string(), t.to_string()),
                    ("region".to_string(), region.to_string()),
                ]
                .into_iter()
                .collect(),
                quantity: Decimal::from(86_400 * (i as i64 + 3)),
                events: 1440,
            });
        }
    }
    for (m, q) in [
        ("disk", "777600000"),
        ("requests", "123456789"),
        ("egress", "2500000000000"),
    ] {
        for app in 0..2 {
            u.push(UsageItem {
                meter: m.into(),
                dims: [("app".to_string(), format!("a{app}"))]
                    .into_iter()
                    .collect(),
                quantity: q.parse().unwrap(),
                events: 100,
            });
        }
    }
    u
}

fn bench(c: &mut Criterion) {
    let cat = Catalog::default_catalog();
    let business = cat.latest("business").unwrap().clone();
    let payg = cat.latest("payg").unwrap().clone();
    let start = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap();
    let mid = Utc.with_ymd_and_hms(2026, 11, 16, 7, 30, 0).unwrap();
    let end = Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap();
    let period = Period { start, end };
    let one = vec![Segment {
        trial: false,
        plan: business.clone(),
        start,
        end,
        usage: usage(),
    }];
    let two = vec![
        Segment {
            trial: false,
            plan: payg,
            start,
            end: mid,
            usage: usage(),
        },
        Segment {
            trial: false,
            plan: business,
            start: mid,
            end,
            usage: usage(),
        },
    ];
    let lines_one = rate(&period, &one, &[]).unwrap().lines.len() as u64;
    let lines_two = rate(&period, &two, &[]).unwrap().lines.len() as u64;

    let mut g = c.benchmark_group("rating");
    g.throughput(Throughput::Elements(lines_one));
    g.bench_function("month_one_segment", |b| {
        b.iter(|| rate(black_box(&period), black_box(&one), &[]).unwrap())
    });
    g.throughput(Throughput::Elements(lines_two));
    g.bench_function("month_plan_switch", |b| {
        b.iter(|| rate(black_box(&period), black_box(&two), &[]).unwrap())
    });
    // Baseline: the arithmetic floor for the same number of lines.
    let items = usage();
    let price: Decimal = "0.0000004".parse().unwrap();
    g.throughput(Throughput::Elements(lines_one));
    g.bench_function("baseline_multiply_round", |b| {
        b.iter(|| {
            let mut total = Decimal::ZERO;
            for it in black_box(&items).iter().take(lines_one as usize) {
                total += (it.quantity * price).round_dp(2);
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
