//! Typed IPC probe: one worker, small messages.
//!
//! * one way: the primary asks for `N` messages; the worker sends them as fast as it can (a
//!   yield every 1024 sends, like the Node peer's `setImmediate`); the rate is `N` over the
//!   time from the request to the last message's `Event::Message` in the primary.
//! * round trip: the primary sends `Ping(i)`, waits for `Pong(i)`, `K` times; median and p99.
//!
//! Prints one line `RESULT {json}`. `IPC_N` and `IPC_K` override the counts.

use std::time::{Duration, Instant};

use cluster::Event;

#[cluster::message]
#[derive(Debug)]
enum ToPrimary {
    Tick(u32),
    Pong(u32),
}

#[cluster::message]
#[derive(Debug)]
enum ToWorker {
    Burst(u32),
    Ping(u32),
}

fn env_u32(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[cluster::main(workers = 1, messages(to_primary = ToPrimary, to_worker = ToWorker))]
async fn main() -> anyhow::Result<()> {
    #[primary(cluster)]
    {
        let n = env_u32("IPC_N", 2_000_000);
        let k = env_u32("IPC_K", 20_000);
        // The whole measurement is bounded by one timeout (a timer per message would cost more
        // than the message).
        let measure = async {
            let mut worker = None;
            while worker.is_none() {
                match cluster.next_event().await {
                    Some(Event::Online { worker: w }) => worker = Some(w),
                    Some(Event::Exit { .. }) | None => anyhow::bail!("the worker died"),
                    _ => {}
                }
            }
            let worker = worker.expect("online");
            let next_msg = || async {
                loop {
                    match cluster.next_event().await {
                        Some(Event::Message { msg, .. }) => return Ok(msg),
                        Some(Event::Exit { .. }) | None => anyhow::bail!("the worker died"),
                        Some(_) => {}
                    }
                }
            };
            // Warm-up: a short burst.
            worker.send(&ToWorker::Burst(10_000)).await?;
            for _ in 0..10_000 {
                next_msg().await?;
            }
            // One way, worker -> primary.
            let t0 = Instant::now();
            worker.send(&ToWorker::Burst(n)).await?;
            let mut last = 0;
            for _ in 0..n {
                if let ToPrimary::Tick(x) = next_msg().await? {
                    last = x;
                }
            }
            let one_way = t0.elapsed();
            anyhow::ensure!(last == n - 1, "lost messages");
            // Round trips.
            let mut rtts = Vec::with_capacity(k as usize);
            for i in 0..k {
                let t = Instant::now();
                worker.send(&ToWorker::Ping(i)).await?;
                match next_msg().await? {
                    ToPrimary::Pong(j) if j == i => {}
                    other => anyhow::bail!("expected Pong({i}), got {other:?}"),
                }
                rtts.push(t.elapsed().as_secs_f64() * 1e6);
            }
            anyhow::Ok((one_way, rtts))
        };
        let (one_way, mut rtts) = tokio::time::timeout(Duration::from_secs(60), measure)
            .await
            .map_err(|_| anyhow::anyhow!("timed out"))??;
        rtts.sort_by(f64::total_cmp);
        let pct = |p: f64| rtts[((rtts.len() - 1) as f64 * p) as usize];
        println!(
            "RESULT {{\"system\":\"cluster\",\"n\":{n},\"msgs_per_s\":{:.0},\"k\":{k},\"rtt_us_median\":{:.1},\"rtt_us_p99\":{:.1}}}",
            n as f64 / one_way.as_secs_f64(),
            pct(0.5),
            pct(0.99)
        );
        cluster.disconnect().await;
    }
    #[worker(worker)]
    {
        while let Some(msg) = worker.recv().await {
            match msg {
                ToWorker::Burst(n) => {
                    for i in 0..n {
                        worker.send(&ToPrimary::Tick(i)).await?;
                        if i % 1024 == 1023 {
                            tokio::task::yield_now().await;
                        }
                    }
                }
                ToWorker::Ping(i) => worker.send(&ToPrimary::Pong(i)).await?,
            }
        }
    }
    Ok(())
}
