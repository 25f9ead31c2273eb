//! The cap on connections that are not event streams, so that streams and everything else
//! together can never take the last file descriptors.
//!
//! Every accepted connection takes a [`Slot`] before anything is read from it: from the
//! room streams have left (`--max-clients` minus the streams open) while there is room,
//! since a connection that has not sent its head yet is most often a stream to be (a
//! reconnect storm brings thousands at once, and a browser's `EventSource` gives up for
//! good on a `503`), and since heads that arrive slowly or never (slowloris) then wait in
//! that room instead of taking the places requests need; else from the general cap
//! (`--max-other-connections`); else from a small reserve (see `server.rs`: a reserve connection may only ask for `/healthz`, `/readyz`
//! or `/metrics`, or open a stream). However the places are taken, streams and other
//! connections together stay within `--max-clients` + `--max-other-connections` + the
//! reserve. A connection that becomes an admitted stream gives its
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
    /// Connections beyond `other` held within the room streams have left.
    stream_room: Arc<Cap>,
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
            stream_room: Arc::new(Cap {
                open: Gauge::default(),
                max: usize::MAX,
            }),
            reserve: Arc::new(Cap {
                open: Gauge::default(),
                max: reserve,
            }),
        }
    }

    /// A slot for a new connection: from `stream_room` (the streams `--max-clients` still
    /// allows), else from the general cap, else from the reserve, else none (the
    /// connection must be turned away).
    pub fn take(&self, stream_room: usize) -> Option<Slot> {
        let cap = if self.stream_room.try_take(stream_room) {
            &self.stream_room
        } else if self.other.try_take(self.other.max) {
            &self.other
        } else if self.reserve.try_take(self.reserve.max) {
            &self.reserve
        } else {
            return None;
        };
        Some(Slot(Arc::new(Held {
            reserve: Arc::ptr_eq(cap, &self.reserve),
            stream_room: Arc::ptr_eq(cap, &self.stream_room),
            cap: Arc::clone(cap),
            held: AtomicBool::new(true),
        })))
    }

    /// A place under the general cap only: what a connection holding stream room needs
    /// once it turns out not to be a stream.
    pub fn take_other(&self) -> Option<Slot> {
        self.other.try_take(self.other.max).then(|| {
            Slot(Arc::new(Held {
                reserve: false,
                stream_room: false,
                cap: Arc::clone(&self.other),
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
    /// Takes a place if fewer than `max` are open.
    fn try_take(&self, max: usize) -> bool {
        let max = i64::try_from(max).unwrap_or(i64::MAX);
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
    stream_room: bool,
    held: AtomicBool,
}

impl Slot {
    /// Whether this slot comes from the reserve, so the connection may only ask for a
    /// health or metrics path (or open a stream).
    pub fn is_reserve(&self) -> bool {
        self.0.reserve
    }

    /// Whether this slot comes from the room streams have left: the connection must become
    /// a stream, ask for a health or metrics path, or trade it for a general place.
    pub fn is_stream_room(&self) -> bool {
        self.0.stream_room
    }

    /// Whether the connection may carry more than one request (its place is a general
    /// one).
    pub fn is_general(&self) -> bool {
        !self.0.reserve && !self.0.stream_room
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
        let a = caps.take(0).unwrap();
        let b = caps.take(0).unwrap();
        assert!(!a.is_reserve() && !b.is_reserve());
        assert_eq!(gauge.get(), 2);
        let c = caps.take(0).unwrap();
        assert!(c.is_reserve());
        assert!(caps.take(0).is_none(), "both caps are full");

        drop(a);
        assert_eq!(gauge.get(), 1);
        let d = caps.take(0).unwrap();
        assert!(!d.is_reserve(), "a freed general place is used first");

        drop(c);
        assert!(caps.take(0).unwrap().is_reserve());
    }

    #[test]
    fn new_connections_wait_in_the_room_streams_have_left_then_the_cap_then_the_reserve() {
        let gauge = Gauge::default();
        let caps = ConnectionCaps::new(1, 1, gauge.clone());
        let roomy: Vec<_> = (0..2).map(|_| caps.take(2).unwrap()).collect();
        assert!(
            roomy
                .iter()
                .all(|slot| slot.is_stream_room() && !slot.is_reserve())
        );
        assert_eq!(
            gauge.get(),
            0,
            "heads in the stream room leave the general cap free"
        );
        let general = caps.take(2).unwrap();
        assert!(general.is_general(), "no stream room left");
        assert!(caps.take_other().is_none());
        let reserve = caps.take(2).unwrap();
        assert!(reserve.is_reserve());
        assert!(caps.take(2).is_none());
        // Streams opened meanwhile shrink the room: a freed place is not reused past it.
        drop(roomy);
        assert!(caps.take(0).is_none(), "the streams took all their room");
        assert!(caps.take(1).unwrap().is_stream_room());
        drop((general, reserve));
    }

    #[test]
    fn a_released_slot_is_counted_once_whatever_its_clones_do() {
        let gauge = Gauge::default();
        let caps = ConnectionCaps::new(1, 0, gauge.clone());
        let slot = caps.take(0).unwrap();
        let clone = slot.clone();
        clone.release();
        assert_eq!(gauge.get(), 0);
        let other = caps.take(0).unwrap();
        drop(slot);
        drop(clone);
        assert_eq!(gauge.get(), 1, "the released place was given back twice");
        drop(other);
        assert_eq!(gauge.get(), 0);
    }
}
