//! What the fair queue adds to an upstream call that waits for its turn: queueing one call and
//! handing it the next slot, alone and behind 100 other principals' waiting calls, and the whole
//! turn (`UpstreamBudget::acquire`) when the pace has a slot free.
//!
//! A cache hit never reaches the queue: only a call that goes upstream takes a turn.

use std::collections::VecDeque;
use std::hint::black_box;
use std::time::Duration;

use billing_gateway::config::Rate;
use billing_gateway::upstream::{Caller, FairQueue, UpstreamBudget};
use criterion::{Criterion, criterion_group, criterion_main};

/// Far more than one principal's backlog here ever holds.
const BOUND: usize = 1000;

fn benches(c: &mut Criterion) {
    let queue = FairQueue::default();
    c.bench_function("fair/join+grant, 1 principal", |b| {
        b.iter(|| {
            let mut ticket = queue
                .join(black_box("report-script"), 1, false, BOUND)
                .expect("room");
            assert!(queue.grant_next());
            assert!(ticket.try_granted());
            ticket.used();
        })
    });

    // 100 principals with a call waiting each; every round one is served and its principal
    // queues its next call: the rotation stays 100 long.
    let queue = FairQueue::default();
    let names: Vec<String> = (0..100).map(|i| format!("principal-{i}")).collect();
    let mut waiting: VecDeque<_> = names
        .iter()
        .map(|n| (n, queue.join(n, 1, false, BOUND).expect("room")))
        .collect();
    c.bench_function("fair/join+grant, 100 principals waiting", |b| {
        b.iter(|| {
            assert!(queue.grant_next());
            let (name, mut ticket) = waiting.pop_front().expect("a waiting call");
            // Round robin: the oldest principal in the rotation had the turn.
            assert!(ticket.try_granted());
            ticket.used();
            waiting.push_back((name, queue.join(name, 1, false, BOUND).expect("room")));
        })
    });

    // The whole turn of an upstream call when a slot is free: queue, dispatch, pace.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let unbounded = Rate {
        count: u32::MAX,
        per: Duration::from_secs(1),
    };
    let budget = runtime.block_on(async { UpstreamBudget::new(unbounded, Duration::from_secs(2)) });
    let caller = Caller {
        id: "report-script",
        share: 1,
        class: "billing-read-only",
    };
    c.bench_function("budget/acquire, slot free", |b| {
        b.to_async(&runtime).iter(|| async {
            budget
                .acquire(black_box(caller), false, Duration::from_secs(2))
                .await
                .expect("a turn")
        })
    });
}

criterion_group!(fair, benches);
criterion_main!(fair);
