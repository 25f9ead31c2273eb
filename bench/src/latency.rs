//! Latency histograms: one per worker thread, merged at the end.
//!
//! An HDR histogram covering 1 µs..1 h at 3 significant digits is a few hundred KiB, far too
//! much per client, and one shared histogram would be a lock every delivery on every thread.
//! So each thread lazily creates its own and registers it in a [`Recorder`]; a client locks
//! its thread's histogram once per socket read (uncontended: only the final merge touches
//! another thread's histogram). Values are microseconds.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use hdrhistogram::Histogram;

/// Highest latency tracked, in microseconds (one hour); larger values saturate.
const MAX_US: u64 = 3_600_000_000;

type Shared = Arc<Mutex<Histogram<u64>>>;

/// Collects the per-thread histograms of one run.
pub struct Recorder {
    id: u64,
    all: Mutex<Vec<Shared>>,
}

impl Default for Recorder {
    fn default() -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            all: Mutex::default(),
        }
    }
}

thread_local! {
    /// This thread's histogram and the id of the recorder it belongs to (so a second
    /// `Recorder` in the same process, as in tests, gets its own).
    static LOCAL: RefCell<Option<(u64, Shared)>> = const { RefCell::new(None) };
}

/// Creates an empty histogram with the generator's bounds.
pub fn new_histogram() -> Histogram<u64> {
    // The bounds are constants known to be valid.
    Histogram::new_with_bounds(1, MAX_US, 3).unwrap_or_else(|_| unreachable!())
}

impl Recorder {
    /// Runs `f` with the calling thread's histogram for this recorder (`f` must not call
    /// `with_local` again).
    pub fn with_local<R>(&self, f: impl FnOnce(&mut Histogram<u64>) -> R) -> R {
        LOCAL.with_borrow_mut(|slot| {
            let hist = match slot {
                Some((owner, h)) if *owner == self.id => h,
                _ => {
                    let h: Shared = Arc::new(Mutex::new(new_histogram()));
                    self.all
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(h.clone());
                    &mut slot.insert((self.id, h)).1
                }
            };
            let mut guard = hist.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut guard)
        })
    }

    /// Merges every thread's histogram into one.
    pub fn merged(&self) -> Histogram<u64> {
        let mut out = new_histogram();
        for h in self
            .all
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            let h = h.lock().unwrap_or_else(PoisonError::into_inner);
            // Same bounds everywhere, so adding cannot fail.
            let _ = out.add(&*h);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_histograms_from_several_threads() {
        let rec = Arc::new(Recorder::default());
        let handles: Vec<_> = (0..3)
            .map(|i| {
                let rec = rec.clone();
                std::thread::spawn(move || {
                    for v in 1..=100u64 {
                        rec.with_local(|h| h.saturating_record(v * 1000 + i));
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let m = rec.merged();
        assert_eq!(m.len(), 300);
        assert!(m.max() >= 100_000);
    }
}
