//! The run summary: a human-readable block on stderr and one flat JSON line on stdout.

use hdrhistogram::Histogram;
use serde::Serialize;

/// Everything a run measured. Field names are the JSON keys.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Report {
    /// Clients requested.
    pub clients: usize,
    /// Clients that got a `200` stream.
    pub connected: usize,
    /// Clients that failed to connect.
    pub failed: usize,
    /// Connected clients whose stream ended before the run stopped it (or before complete).
    pub disconnected: usize,
    /// Seconds from the first connect to the last client settled.
    pub connect_secs: f64,
    /// Events published successfully.
    pub published: u64,
    /// Publish failures.
    pub publish_errors: u64,
    /// Seconds the publisher took for all events.
    pub publish_secs: f64,
    /// Connected clients x events.
    pub expected: u64,
    /// Distinct in-range events received, summed over clients.
    pub delivered: u64,
    /// `expected - delivered`.
    pub lost: u64,
    /// Duplicate deliveries.
    pub dup: u64,
    /// Deliveries of a sequence number lower than one already seen.
    pub ooo: u64,
    /// Messages from an earlier run (stamped before this run began), ignored.
    pub stale: u64,
    /// Data messages without a sequence number (e.g. `history_truncated`).
    pub other_msgs: u64,
    /// Latency samples.
    pub latency_samples: u64,
    /// Publish-to-receive latency percentiles, milliseconds.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Maximum.
    pub max_ms: f64,
    /// Delivered events per second, from the first publish to the last delivery.
    pub deliveries_per_s: f64,
    /// Server RSS before connecting, KiB (0 without --server-pid).
    pub rss_before_kb: u64,
    /// Server RSS with all clients connected and idle, KiB.
    pub rss_idle_kb: u64,
    /// Server RSS at the end, KiB.
    pub rss_end_kb: u64,
    /// (idle RSS - RSS before) / connected, KiB.
    pub rss_per_conn_kb: f64,
    /// Server CPU seconds from the idle sample to the end (publish + drain).
    pub server_cpu_s: f64,
    /// Server CPU per delivered event, microseconds.
    pub server_cpu_per_delivery_us: f64,
    /// This generator's CPU seconds over the same window.
    pub loadgen_cpu_s: f64,
    /// `--reconnect`: successful reconnections (new `200` head after a stream ended).
    pub reconnects: u64,
    /// `--reconnect`: failed reconnect attempts (refused, timed out, non-200).
    pub reconnect_failures: u64,
    /// `--reconnect`: stream ends whose last id could not be stored (no `Last-Event-ID` sent).
    pub unsupported_ids: u64,
    /// `--reconnect`: stream end to the new stream's response head, milliseconds.
    pub reconnect_p50_ms: f64,
    /// 90th percentile.
    pub reconnect_p90_ms: f64,
    /// 99th percentile.
    pub reconnect_p99_ms: f64,
    /// Maximum.
    pub reconnect_max_ms: f64,
    /// `--reconnect`: clients that reconnected at least once.
    pub reconnected_clients: u64,
    /// `--reconnect`: reconnected clients that never held every event acknowledged before
    /// their (latest) new response head.
    pub not_caught_up: u64,
    /// `--reconnect`: first stream end of the run to the moment the last reconnected client
    /// was caught up, milliseconds; `null` if none reconnected or any did not catch up.
    pub caught_up_ms: Option<f64>,
    /// `--rss-sample-secs`: summed server RSS, KiB, from the idle sample (every
    /// `rss_sample_secs`) to the end sample (last element).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rss_series_kb: Vec<u64>,
    /// `--rss-sample-secs`: the sampling interval.
    pub rss_sample_secs: f64,
    /// `--rss-sample-secs`: least-squares slope of the RSS series, KiB per minute.
    pub rss_slope_kb_per_min: f64,
    /// The overall deadline cut the run short.
    pub timed_out: bool,
    /// Most frequent connect error, if any.
    pub first_error: String,
}

/// Least-squares slope of `ys` against their index (units per sample); 0 for < 2 points.
pub fn slope(ys: &[u64]) -> f64 {
    let n = ys.len() as f64;
    if ys.len() < 2 {
        return 0.0;
    }
    let mean_x = (n - 1.0) / 2.0;
    let mean_y = ys.iter().map(|&y| y as f64).sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for (i, &y) in ys.iter().enumerate() {
        let dx = i as f64 - mean_x;
        num += dx * (y as f64 - mean_y);
        den += dx * dx;
    }
    num / den
}

/// Rounds to three decimals for readable JSON.
pub fn round3(v: f64) -> f64 {
    if v.is_finite() {
        (v * 1000.0).round() / 1000.0
    } else {
        0.0
    }
}

impl Report {
    /// Fills the latency fields from a microsecond histogram.
    pub fn set_latency(&mut self, h: &Histogram<u64>) {
        self.latency_samples = h.len();
        if h.is_empty() {
            return;
        }
        let ms = |us: u64| round3(us as f64 / 1000.0);
        self.p50_ms = ms(h.value_at_quantile(0.50));
        self.p90_ms = ms(h.value_at_quantile(0.90));
        self.p99_ms = ms(h.value_at_quantile(0.99));
        self.p999_ms = ms(h.value_at_quantile(0.999));
        self.max_ms = ms(h.max());
    }

    /// Stores an RSS series sampled every `every` seconds and its least-squares slope.
    /// The last element is the end sample, which may come sooner than `every` after the one
    /// before it; the slope treats it as one more interval (a small error for long runs).
    pub fn set_rss_series(&mut self, series: Vec<u64>, every: f64) {
        self.rss_sample_secs = every;
        self.rss_slope_kb_per_min = round3(slope(&series) * 60.0 / every);
        self.rss_series_kb = series;
    }

    /// The human summary (for stderr).
    pub fn human(&self) -> String {
        let mut s = String::new();
        let mut line = |l: String| {
            s.push_str(&l);
            s.push('\n');
        };
        line(format!(
            "clients     {} requested, {} connected, {} failed, {} disconnected ({:.2} s to connect)",
            self.clients, self.connected, self.failed, self.disconnected, self.connect_secs
        ));
        if !self.first_error.is_empty() {
            line(format!("errors      {}", self.first_error));
        }
        line(format!(
            "publish     {} ok, {} errors in {:.2} s",
            self.published, self.publish_errors, self.publish_secs
        ));
        line(format!(
            "delivery    {}/{} delivered, {} lost, {} dup, {} out-of-order, {} stale, {} other",
            self.delivered,
            self.expected,
            self.lost,
            self.dup,
            self.ooo,
            self.stale,
            self.other_msgs
        ));
        line(format!(
            "latency ms  p50 {} | p90 {} | p99 {} | p99.9 {} | max {}  ({} samples)",
            self.p50_ms, self.p90_ms, self.p99_ms, self.p999_ms, self.max_ms, self.latency_samples
        ));
        line(format!(
            "throughput  {:.0} deliveries/s",
            self.deliveries_per_s
        ));
        if self.rss_before_kb > 0 {
            line(format!(
                "server      RSS {} -> {} (idle) -> {} KiB, {:.2} KiB/conn; CPU {:.2} s ({:.2} µs/delivery)",
                self.rss_before_kb,
                self.rss_idle_kb,
                self.rss_end_kb,
                self.rss_per_conn_kb,
                self.server_cpu_s,
                self.server_cpu_per_delivery_us
            ));
        }
        if self.reconnects > 0 || self.reconnect_failures > 0 || self.reconnected_clients > 0 {
            let caught = self
                .caught_up_ms
                .map_or("never".to_string(), |ms| format!("{ms} ms"));
            line(format!(
                "reconnect   {} reconnects ({} clients), {} failed attempts; head after ms p50 {} | p90 {} | p99 {} | max {}; all caught up after {} ({} not caught up)",
                self.reconnects,
                self.reconnected_clients,
                self.reconnect_failures,
                self.reconnect_p50_ms,
                self.reconnect_p90_ms,
                self.reconnect_p99_ms,
                self.reconnect_max_ms,
                caught,
                self.not_caught_up
            ));
        }
        if !self.rss_series_kb.is_empty() {
            line(format!(
                "rss series  {} samples every {} s, slope {:.1} KiB/min: {:?}",
                self.rss_series_kb.len(),
                self.rss_sample_secs,
                self.rss_slope_kb_per_min,
                self.rss_series_kb
            ));
        }
        line(format!("loadgen     CPU {:.2} s", self.loadgen_cpu_s));
        if self.timed_out {
            line("TIMED OUT: the overall deadline cut the run short".into());
        }
        s
    }

    /// The single JSON line (for stdout).
    pub fn json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_of_a_line_and_of_noise() {
        assert_eq!(slope(&[]), 0.0);
        assert_eq!(slope(&[5]), 0.0);
        assert!((slope(&[10, 12, 14, 16]) - 2.0).abs() < 1e-9);
        assert!(slope(&[10, 11, 10, 11, 10, 11]).abs() < 0.2);
        let mut r = Report::default();
        r.set_rss_series(vec![1000, 1010, 1020], 30.0);
        assert!((r.rss_slope_kb_per_min - 20.0).abs() < 1e-9);
        assert!(r.json().contains("\"rss_series_kb\":[1000,1010,1020]"));
        assert!(!Report::default().json().contains("rss_series_kb"));
        assert!(Report::default().json().contains("\"caught_up_ms\":null"));
    }
}
