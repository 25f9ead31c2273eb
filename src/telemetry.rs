//! Logging set-up: `RUST_LOG` filtering, human or JSON lines on stderr; and the two guards
//! every log line a client or producer can trigger goes through: [`truncate_for_log`] for
//! what they send, [`RateLimit`] for how often.

use std::fmt;
use std::io::IsTerminal;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Filter used when `RUST_LOG` is unset.
pub const DEFAULT_FILTER: &str = "eventfabric=info";

/// Installs the global subscriber. Call once, from `main`.
pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
    if let Err(error) = result {
        eprintln!("eventfabric: logging was already initialised: {error}");
    }
}

/// Most characters of a client- or producer-controlled value that a log line shows.
pub(crate) const LOG_VALUE_CHARS: usize = 40;

/// A value that a client or producer controls, shown in a log line: at most
/// [`LOG_VALUE_CHARS`] characters, escaped (control characters, and bytes that are not
/// UTF-8 as `\xNN`), cut on a character boundary, and ending with the original length when
/// cut. Without this one request can write kilobytes of log (an 8 KB `Last-Event-ID` did).
pub(crate) fn truncate_for_log<T: AsRef<[u8]> + ?Sized>(value: &T) -> LogValue<'_> {
    LogValue(value.as_ref())
}

/// What [`truncate_for_log`] returns; formats lazily, so a line that is filtered out
/// costs nothing.
#[derive(Clone, Copy)]
pub(crate) struct LogValue<'a>(&'a [u8]);

impl fmt::Display for LogValue<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut budget = LOG_VALUE_CHARS;
        for chunk in self.0.utf8_chunks() {
            for c in chunk.valid().chars() {
                let escaped = c.escape_debug();
                if escaped.len() > budget {
                    return write!(f, "…({} bytes)", self.0.len());
                }
                budget -= escaped.len();
                write!(f, "{escaped}")?;
            }
            for byte in chunk.invalid() {
                if budget < 4 {
                    return write!(f, "…({} bytes)", self.0.len());
                }
                budget -= 4;
                write!(f, "\\x{byte:02X}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for LogValue<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Lets at most one log line through per interval from one call site, and counts the rest,
/// so a client repeating a mistake cannot flood the log. Meant as a `static` next to the
/// line it guards:
///
/// ```ignore
/// static LOG: RateLimit = RateLimit::per_second();
/// if let Some(suppressed) = LOG.allow() {
///     tracing::warn!(suppressed, "...");
/// }
/// ```
///
/// A `static` (not state in `AppState`) on purpose: the log it protects is process-wide
/// too, so two gateways in one test process sharing a call site's budget is correct.
/// Lock-free: one atomic load on the quiet path, and a compare-and-swap (never retried)
/// when a new interval opens.
#[derive(Debug)]
pub(crate) struct RateLimit {
    interval_ms: u64,
    /// When the next line may be written, in ms since [`process_ms`]'s epoch.
    next_ms: AtomicU64,
    /// Lines refused since the last one written.
    suppressed: AtomicU64,
}

impl RateLimit {
    /// One line per `interval`.
    pub const fn new(interval: Duration) -> Self {
        Self {
            interval_ms: interval.as_millis() as u64,
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// One line per second.
    pub const fn per_second() -> Self {
        Self::new(Duration::from_secs(1))
    }

    /// `Some(n)` when a line may be written now, `n` being how many were refused since the
    /// last one (log it as `suppressed`); `None` when this one is to be dropped.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(process_ms())
    }

    fn allow_at(&self, now_ms: u64) -> Option<u64> {
        let next = self.next_ms.load(Ordering::Relaxed);
        let open = now_ms >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now_ms.saturating_add(self.interval_ms),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok();
        if open {
            // A refusal counted concurrently with this swap lands in the next line's
            // count: late, never lost.
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            // Either too soon, or another thread opened this interval first.
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Milliseconds since this process first asked, from the monotonic clock (wall-clock
/// steps must not open or close a rate limit).
fn process_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(value: &(impl AsRef<[u8]> + ?Sized)) -> String {
        truncate_for_log(value).to_string()
    }

    #[test]
    fn short_values_are_shown_whole_and_escaped() {
        assert_eq!(shown("1700000000000-0"), "1700000000000-0");
        assert_eq!(shown(""), "");
        assert_eq!(shown("a\nb\"c"), "a\\nb\\\"c");
        assert_eq!(shown(b"\xff\xfeok".as_slice()), "\\xFF\\xFEok");
        let exactly = "x".repeat(LOG_VALUE_CHARS);
        assert_eq!(shown(&exactly), exactly);
    }

    #[test]
    fn long_values_are_cut_and_say_how_long_they_were() {
        let long = "x".repeat(8000);
        assert_eq!(
            shown(&long),
            format!("{}…(8000 bytes)", "x".repeat(LOG_VALUE_CHARS))
        );
        // Escapes count against the budget: 0xFF bytes take four characters each.
        let bytes = vec![0xFF; 8000];
        let text = shown(bytes.as_slice());
        assert_eq!(
            text,
            format!("{}…(8000 bytes)", "\\xFF".repeat(LOG_VALUE_CHARS / 4))
        );
        // Multi-byte characters are never split: 'é' is 2 bytes, one character.
        let accents = "é".repeat(100);
        assert_eq!(
            shown(&accents),
            format!("{}…(200 bytes)", "é".repeat(LOG_VALUE_CHARS))
        );
        // An escape that would not fit whole is left out whole.
        let almost = format!("{}\n", "x".repeat(LOG_VALUE_CHARS - 1));
        assert_eq!(
            shown(&almost),
            format!(
                "{}…({} bytes)",
                "x".repeat(LOG_VALUE_CHARS - 1),
                LOG_VALUE_CHARS
            )
        );
    }

    #[test]
    fn a_rate_limit_lets_one_line_per_interval_and_counts_the_rest() {
        let limit = RateLimit::per_second();
        assert_eq!(limit.allow_at(0), Some(0), "the first line passes");
        for t in 1..=5 {
            assert_eq!(limit.allow_at(t * 100), None);
        }
        assert_eq!(limit.allow_at(999), None);
        assert_eq!(limit.allow_at(1000), Some(6), "carries what was suppressed");
        assert_eq!(limit.allow_at(1500), None);
        assert_eq!(limit.allow_at(5000), Some(1));
        assert_eq!(limit.allow_at(5001), None);
    }

    #[test]
    fn a_rate_limit_shared_by_threads_writes_one_line_and_loses_no_count() {
        static LIMIT: RateLimit = RateLimit::new(Duration::from_secs(3600));
        let passed = AtomicU64::new(0);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..1000 {
                        if LIMIT.allow_at(7).is_some() {
                            passed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(passed.load(Ordering::Relaxed), 1);
        assert_eq!(LIMIT.allow_at(7 + 3_600_000), Some(3999));
    }
}
