//! The one path by which an event reaches this replica's clients, whichever backend
//! produced it: into the ring of recent events (so resumes are answered from memory) and
//! then to the hub (so live clients get it).
//!
//! Invariant: events with an id are delivered in strictly increasing id order, and the
//! ring and the hub see the same sequence. `deliver` holds the ring's lock while it hands
//! the frame to the hub, so two callers cannot interleave; an id not newer than the last
//! one delivered is refused, which is how a gap fill that overlaps live traffic stays free
//! of duplicates. Frames without an id (fire-and-forget events) go to the hub only.

use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use super::history::HistoryRing;
use crate::event::EventId;
use crate::hub::Hub;
use crate::sse::Frame;

/// The ring of recent events and the hub, behind one lock.
#[derive(Debug)]
pub(crate) struct Delivery {
    ring: Mutex<Ring>,
    hub: Hub,
}

#[derive(Debug)]
struct Ring {
    events: HistoryRing,
    /// Newest id delivered, kept even when the ring is emptied or holds nothing.
    last: Option<EventId>,
}

impl Delivery {
    /// A delivery path keeping `capacity` recent events for `hub`.
    pub fn new(capacity: usize, hub: Hub) -> Self {
        Self {
            ring: Mutex::new(Ring {
                events: HistoryRing::new(capacity),
                last: None,
            }),
            hub,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands an event to the ring and the hub. Returns false, delivering nothing, when the
    /// event has an id that is not newer than the last one delivered.
    pub fn deliver(&self, frame: Arc<Frame>) -> bool {
        let mut ring = self.lock();
        if let Some(id) = frame.id {
            if ring.last.is_some_and(|last| id <= last) {
                return false;
            }
            ring.last = Some(id);
            ring.events.push(&frame);
        }
        self.hub.broadcast(frame);
        true
    }

    /// Sends a notice (a control frame, no id) to every client.
    pub fn notice(&self, bytes: Bytes) {
        self.hub.broadcast(Frame::control(bytes));
    }

    /// The newest id delivered so far.
    pub fn last_delivered(&self) -> Option<EventId> {
        self.lock().last
    }

    /// Starts counting from `id` without delivering anything: events up to it count as
    /// delivered (a replica joining the fabric starts from the newest stored event).
    pub fn start_after(&self, id: Option<EventId>) {
        let mut ring = self.lock();
        if ring.last.is_none() {
            ring.last = id;
        }
    }

    /// Starts again from `id`, forgetting what was delivered: the backend went back in time
    /// (it lost its history), so ids it issues next may be older than the last one here.
    pub fn restart_after(&self, id: EventId) {
        let mut ring = self.lock();
        ring.events.clear();
        ring.last = Some(id);
    }

    /// Forgets the recent events: there is a gap after them that cannot be filled.
    pub fn forget_recent(&self) {
        self.lock().events.clear();
    }

    /// Runs `read` on the ring of recent events.
    pub fn with_recent<T>(&self, read: impl FnOnce(&HistoryRing) -> T) -> T {
        read(&self.lock().events)
    }

    /// The hub this path delivers to.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn frame(ms: u64) -> Arc<Frame> {
        Frame::with_bytes(Some(EventId::new(ms, 0)), "t", Bytes::new())
    }

    #[test]
    fn ids_not_newer_than_the_last_delivered_are_refused() {
        let delivery = Delivery::new(10, Hub::new(10, 0, Arc::new(Metrics::new())));
        assert!(delivery.deliver(frame(2)));
        assert!(!delivery.deliver(frame(2)));
        assert!(!delivery.deliver(frame(1)));
        assert!(delivery.deliver(frame(3)));
        assert_eq!(delivery.last_delivered(), Some(EventId::new(3, 0)));
        let held = delivery.with_recent(|ring| {
            ring.after(EventId::new(0, 0), crate::broker::Page::events(10))
                .frames
                .len()
        });
        assert_eq!(held, 2);
    }

    #[test]
    fn forgetting_keeps_the_position() {
        let delivery = Delivery::new(10, Hub::new(10, 0, Arc::new(Metrics::new())));
        delivery.start_after(Some(EventId::new(5, 0)));
        assert!(!delivery.deliver(frame(4)));
        assert!(delivery.deliver(frame(6)));
        delivery.forget_recent();
        assert!(!delivery.with_recent(|ring| ring.covers(EventId::new(6, 0))));
        assert!(!delivery.deliver(frame(6)));
    }
}
