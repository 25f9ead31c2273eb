//! The cap on connections that are not event streams, so that streams and everything else
//! together can never take the last file descriptors.
//!
//! Every accepted connection takes a [`Slot`] before anything is read from it: from the
//! general cap (`--max-other-connections`) while there is room, else from a small reserve
//! (see `server.rs`: a reserve connection may only ask for `/healthz`, `/readyz` or
//! `/metrics`, or open a stream). A connection that becomes an admitted stream gives its
//! slot back at once; streams are capped by `--max-clients` instead. Requests, idle
//! keep-alive connections and connections still sending their head keep theirs until
//! they close. When both are full the connection is closed as soon as it is accepted, so
//! `accept` itself never runs out of files.
//!
//! Counting is one atomic per cap; no lock, no queue, nothing waits for a slot.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use prometheus_client::metrics::gauge::Gauge;

/// The two caps: the general one and the reserve behind it.
#[derive(Debug)]
pub(crate) struct ConnectionCaps {
    other: Arc<Cap>,
    reserve: Arc<Cap>,
}

impl ConnectionCaps {
    /// Caps of `max_other` and `reserve` connections. `open_other` is the gauge that
    /// reports the general cap's use (`eventfabric_other_connections`); it is also the
    /// counter itself, so the page can never disagree with the cap.
    pub fn new(max_other: usize, reserve: usize, open_other: Gauge) -> Self {
        Self {
            other: Arc::new(Cap {
                open: open_other,
                max: max_other,
            }),
            reserve: Arc::new(Cap {
                open: Gauge::default(),
                max: reserve,
            }),
        }
    }

    /// A slot for a new connection: from the general cap, else from the reserve, else
    /// none (the connection must be turned away).
    pub fn take(&self) -> Option<Slot> {
        [&self.other, &self.reserve]
            .into_iter()
            .find(|cap| cap.try_take())
            .map(|cap| {
                Slot(Arc::new(Held {
                    reserve: Arc::ptr_eq(cap, &self.reserve),
                    cap: Arc::clone(cap),
                    held: AtomicBool::new(true),
                }))
            })
    }
}

/// One cap: how many are open and how many may be.
#[derive(Debug)]
struct Cap {
    open: Gauge,
    max: usize,
}

impl Cap {
    fn try_take(&self) -> bool {
        let max = i64::try_from(self.max).unwrap_or(i64::MAX);
        self.open
            .inner()
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < max).then_some(open + 1)
            })
            .is_ok()
    }
}

/// A connection's place under a cap, given back when the last clone is dropped or when
/// [`Slot::release`] is called, whichever comes first. Clones share one place: hyper's
/// service hands one to each request so a stream can give the place back.
#[derive(Debug, Clone)]
pub(crate) struct Slot(Arc<Held>);

#[derive(Debug)]
struct Held {
    cap: Arc<Cap>,
    reserve: bool,
    held: AtomicBool,
}

impl Slot {
    /// Whether this slot comes from the reserve, so the connection may only ask for a
    /// health or metrics path (or open a stream).
    pub fn is_reserve(&self) -> bool {
        self.0.reserve
    }

    /// Gives the place back now (the connection has become a stream). Idempotent.
    pub fn release(&self) {
        self.0.release();
    }
}

impl Held {
    fn release(&self) {
        if self.held.swap(false, Ordering::AcqRel) {
            self.cap.open.dec();
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_is_used_only_when_the_cap_is_full_and_places_come_back() {
        let gauge = Gauge::default();
        let caps = ConnectionCaps::new(2, 1, gauge.clone());
        let a = caps.take().unwrap();
        let b = caps.take().unwrap();
        assert!(!a.is_reserve() && !b.is_reserve());
        assert_eq!(gauge.get(), 2);
        let c = caps.take().unwrap();
        assert!(c.is_reserve());
        assert!(caps.take().is_none(), "both caps are full");

        drop(a);
        assert_eq!(gauge.get(), 1);
        let d = caps.take().unwrap();
        assert!(!d.is_reserve(), "a freed general place is used first");

        drop(c);
        assert!(caps.take().unwrap().is_reserve());
    }

    #[test]
    fn a_released_slot_is_counted_once_whatever_its_clones_do() {
        let gauge = Gauge::default();
        let caps = ConnectionCaps::new(1, 0, gauge.clone());
        let slot = caps.take().unwrap();
        let clone = slot.clone();
        clone.release();
        assert_eq!(gauge.get(), 0);
        let other = caps.take().unwrap();
        drop(slot);
        drop(clone);
        assert_eq!(gauge.get(), 1, "the released place was given back twice");
        drop(other);
        assert_eq!(gauge.get(), 0);
    }
}
