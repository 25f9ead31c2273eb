//! One benchmark run: connect the clients, hold, publish, drain, stop, and add it all up.
//!
//! Phases (each bounded by the overall `--timeout-secs` deadline):
//! 1. sample the server(s); start the publisher thread and let it connect (fail fast);
//! 2. open `--clients` streams at most `--connect-rate` per second, round-robin over URLs
//!    and source addresses, and wait until every client connected or failed;
//! 3. hold for `--idle-secs` (memory mode) or `--warmup-secs`, then take the idle sample;
//! 4. publish, then wait up to `--drain-secs` until every client has every event;
//! 5. take the end sample, stop all clients and merge their results.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, sleep_until};

use crate::client::{self, ClientResult, Reconnect, Shared, Target};
use crate::config::Config;
use crate::procstat::{self, ProcSample};
use crate::publisher::{Outcome, Plan, Publisher};
use crate::report::{Report, round3};
use crate::sse::EventId;
use crate::stop::StopSignal;

/// How often the orchestrator polls the shared counters.
const POLL: Duration = Duration::from_millis(10);

/// Runs the benchmark described by `cfg`.
pub async fn run(cfg: Config) -> anyhow::Result<Report> {
    let args = &cfg.args;
    let deadline = Instant::now() + Duration::from_secs_f64(args.timeout_secs);
    let mut report = Report {
        clients: args.clients,
        ..Report::default()
    };

    let before = procstat::sample_all(&args.server_pids)?;
    let progress = Arc::new(AtomicU64::new(0));
    let publisher = if args.events > 0 {
        Some(
            Publisher::start(Plan {
                mode: args.publish,
                dest: cfg.dest.clone(),
                events: args.events,
                rate: args.rate,
                payload_bytes: args.payload_bytes,
                max_batch: args.publish_batch,
                progress: progress.clone(),
            })
            .await?,
        )
    } else {
        None
    };

    // Phase 2: connect.
    let mut stops: Vec<Arc<StopSignal>> = Vec::with_capacity(args.clients);
    let targets: Vec<Arc<Target>> = cfg
        .urls
        .iter()
        .map(|u| Arc::new(Target::new(u.clone(), args.last_event_id.as_deref())))
        .collect();
    let mut shared = Shared::new(args.events, cfg.connect_timeout());
    if args.reconnect {
        let initial = args
            .last_event_id
            .as_deref()
            .map_or(EventId::Empty, EventId::parse);
        shared.reconnect = Some(Reconnect::new(targets.clone(), initial, progress.clone()));
    }
    let shared = Arc::new(shared);
    let connect_start = Instant::now();
    let mut handles: Vec<JoinHandle<ClientResult>> = Vec::with_capacity(args.clients);
    for i in 0..args.clients {
        let due = connect_start + Duration::from_secs_f64(i as f64 / args.connect_rate);
        if due > deadline {
            break;
        }
        if due > Instant::now() {
            sleep_until(due).await;
        }
        let target = if args.initial_url_only {
            targets[0].clone()
        } else {
            targets[i % targets.len()].clone()
        };
        let source =
            (!args.source_ips.is_empty()).then(|| args.source_ips[i % args.source_ips.len()]);
        let stop = Arc::new(StopSignal::default());
        stops.push(stop.clone());
        handles.push(tokio::spawn(client::run(
            target,
            source,
            shared.clone(),
            stop,
            i,
        )));
    }
    let settled =
        || shared.connected.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed);
    while settled() < handles.len() && Instant::now() < deadline {
        sleep(POLL).await;
    }
    report.connect_secs = round3(connect_start.elapsed().as_secs_f64());
    report.connected = shared.connected.load(Ordering::Relaxed);
    eprintln!(
        "loadgen: {} of {} clients connected in {:.2} s",
        report.connected, args.clients, report.connect_secs
    );

    // Phase 3: hold, then the idle sample.
    let hold = if args.idle_secs > 0.0 {
        args.idle_secs
    } else {
        args.warmup_secs
    };
    sleep_until(deadline.min(Instant::now() + Duration::from_secs_f64(hold))).await;
    let idle = later_sample(&args.server_pids);
    let self_idle = procstat::sample("self").ok();
    let sampler = (args.rss_sample_secs > 0.0).then(|| {
        let pids = args.server_pids.clone();
        let every = Duration::from_secs_f64(args.rss_sample_secs);
        let stop = Arc::new(StopSignal::default());
        let task = tokio::spawn(sample_rss(
            pids,
            every,
            idle.map(|s| s.rss_kb),
            stop.clone(),
        ));
        (stop, task)
    });
    // Clients still up at publish start are the ones expected to receive everything.
    let expecting = report.connected - shared.closed.load(Ordering::Relaxed);

    // Phase 4: publish and drain.
    let mut outcome = Outcome::default();
    if let Some(p) = publisher {
        eprintln!(
            "loadgen: publishing {} events at {}/s to {} clients",
            args.events, args.rate, expecting
        );
        outcome = p.run_until(deadline).await;
        let drain_end = deadline.min(Instant::now() + Duration::from_secs_f64(args.drain_secs));
        while Instant::now() < drain_end {
            let done =
                shared.complete.load(Ordering::Relaxed) + shared.closed.load(Ordering::Relaxed);
            if done >= report.connected {
                break;
            }
            sleep(POLL).await;
        }
    }

    // Phase 5: end sample, stop, collect.
    let end = later_sample(&args.server_pids);
    if let Some((stop, task)) = sampler {
        stop.stop();
        if let Ok(mut series) = task.await {
            series.extend(end.map(|s| s.rss_kb));
            report.set_rss_series(series, args.rss_sample_secs);
        }
    }
    let self_end = procstat::sample("self").ok();
    report.timed_out = Instant::now() >= deadline || outcome.stopped;
    for s in &stops {
        s.stop();
    }
    let mut results = Vec::with_capacity(handles.len());
    let collect = async {
        for h in handles {
            if let Ok(r) = h.await {
                results.push(r);
            }
        }
    };
    // Stopped clients return at once; the bound only guards against a wedged task.
    if tokio::time::timeout(Duration::from_secs(10), collect)
        .await
        .is_err()
    {
        report.timed_out = true;
    }

    fill(&mut report, &cfg, &shared, &results, &outcome);
    if let Some(rc) = &shared.reconnect {
        fill_reconnect(&mut report, rc, &results);
    }
    report.set_latency(&shared.latency.merged());
    fill_proc(&mut report, before, idle, end);
    if let (Some(a), Some(b)) = (self_idle, self_end) {
        report.loadgen_cpu_s = round3(b.cpu_s - a.cpu_s);
    }
    Ok(report)
}

/// Samples the servers after the start; a server that died mid-run costs only its figures.
fn later_sample(pids: &[u32]) -> Option<ProcSample> {
    procstat::sample_all(pids).unwrap_or_else(|e| {
        eprintln!("loadgen: warning: {e:#}");
        None
    })
}

/// Adds up client results and the publisher outcome.
fn fill(report: &mut Report, cfg: &Config, shared: &Shared, results: &[ClientResult], o: &Outcome) {
    let events = cfg.args.events;
    report.failed = shared.failed.load(Ordering::Relaxed);
    let mut last_recv = 0;
    for r in results.iter().filter(|r| r.connected) {
        report.expected += events;
        report.delivered += r.in_range;
        report.dup += r.seq.dup;
        report.ooo += r.seq.ooo;
        report.stale += r.stale;
        report.other_msgs += r.other;
        report.disconnected += usize::from(r.closed_early);
        last_recv = last_recv.max(r.last_recv_us);
    }
    report.lost = report.expected.saturating_sub(report.delivered);
    report.published = o.published;
    report.publish_errors = o.errors;
    if o.first_us > 0 {
        report.publish_secs = round3(o.last_us.saturating_sub(o.first_us) as f64 / 1e6);
        if last_recv > o.first_us {
            let secs = (last_recv - o.first_us) as f64 / 1e6;
            report.deliveries_per_s = round3(report.delivered as f64 / secs);
        }
    }
    let errors = shared.errors.lock().unwrap_or_else(|e| e.into_inner());
    let mut errors = errors.clone();
    errors.sort_by_key(|e| std::cmp::Reverse(e.1));
    if let Some((msg, n)) = errors.first() {
        report.first_error = format!("{msg} (x{n})");
    }
    if let Some(e) = &o.first_error {
        if !report.first_error.is_empty() {
            report.first_error.push_str("; ");
        }
        report.first_error.push_str(&format!("publish: {e}"));
    }
}

/// Samples the servers' RSS every `every` until stopped; starts with the idle sample.
async fn sample_rss(
    pids: Vec<u32>,
    every: Duration,
    first: Option<u64>,
    stop: Arc<StopSignal>,
) -> Vec<u64> {
    let mut series: Vec<u64> = first.into_iter().collect();
    let start = Instant::now();
    for k in 1u32.. {
        tokio::select! {
            _ = sleep_until(start + every * k) => {}
            _ = stop.stopped() => break,
        }
        match procstat::sample_all(&pids) {
            Ok(Some(s)) => series.push(s.rss_kb),
            _ => break,
        }
    }
    series
}

/// Reconnect counters, reconnect times and the caught-up time.
fn fill_reconnect(report: &mut Report, rc: &Reconnect, results: &[ClientResult]) {
    report.reconnects = rc.reconnects.load(Ordering::Relaxed);
    report.reconnect_failures = rc.failures.load(Ordering::Relaxed);
    report.unsupported_ids = rc.unsupported_ids.load(Ordering::Relaxed);
    {
        let h = rc.times.lock().unwrap_or_else(|e| e.into_inner());
        if !h.is_empty() {
            let ms = |us: u64| round3(us as f64 / 1000.0);
            report.reconnect_p50_ms = ms(h.value_at_quantile(0.50));
            report.reconnect_p90_ms = ms(h.value_at_quantile(0.90));
            report.reconnect_p99_ms = ms(h.value_at_quantile(0.99));
            report.reconnect_max_ms = ms(h.max());
        }
    }
    let mut last_caught_up = 0;
    for r in results.iter().filter(|r| r.reconnects > 0) {
        report.reconnected_clients += 1;
        if r.catchup_target.is_some() || r.caught_up_us == 0 {
            report.not_caught_up += 1;
        }
        last_caught_up = last_caught_up.max(r.caught_up_us);
    }
    let first_end = rc.first_end_us.load(Ordering::Relaxed);
    if report.reconnected_clients > 0 && report.not_caught_up == 0 && first_end != u64::MAX {
        report.caught_up_ms = Some(round3(
            last_caught_up.saturating_sub(first_end) as f64 / 1000.0,
        ));
    }
}

/// Derives memory and CPU figures from the three server samples.
fn fill_proc(
    report: &mut Report,
    before: Option<ProcSample>,
    idle: Option<ProcSample>,
    end: Option<ProcSample>,
) {
    let (Some(before), Some(idle), Some(end)) = (before, idle, end) else {
        return;
    };
    report.rss_before_kb = before.rss_kb;
    report.rss_idle_kb = idle.rss_kb;
    report.rss_end_kb = end.rss_kb;
    if report.connected > 0 {
        report.rss_per_conn_kb =
            round3((idle.rss_kb as f64 - before.rss_kb as f64) / report.connected as f64);
    }
    report.server_cpu_s = round3(end.cpu_s - idle.cpu_s);
    if report.delivered > 0 {
        report.server_cpu_per_delivery_us =
            round3(report.server_cpu_s * 1e6 / report.delivered as f64);
    }
}
