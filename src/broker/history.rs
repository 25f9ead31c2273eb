//! A bounded, id-ordered ring of recent events, answering "what came after id X" from
//! memory. The in-process broker keeps its whole history here; the Redis broker keeps the
//! events its subscription delivered, so a reconnect storm is served without Redis.

use std::collections::VecDeque;
use std::sync::Arc;

use super::Page;
use crate::event::EventId;
use crate::sse::Frame;

/// Most bytes of encoded frames a ring keeps, whatever its event capacity: 10,000 events
/// of the largest allowed size would otherwise pin 640 MB.
pub const MAX_RING_BYTES: usize = 64 * 1024 * 1024;

/// Recent events with ids, oldest first, ids strictly increasing.
#[derive(Debug)]
pub struct HistoryRing {
    frames: VecDeque<Arc<Frame>>,
    capacity: usize,
    bytes: usize,
    max_bytes: usize,
    /// Newest id dropped from the ring, if any.
    newest_dropped: Option<EventId>,
}

/// Events after an id, as far as the ring holds them.
#[derive(Debug)]
pub struct RingSlice {
    /// Events after the requested id, oldest first.
    pub frames: Vec<Arc<Frame>>,
    /// More events follow the last one returned.
    pub more: bool,
}

impl HistoryRing {
    /// An empty ring holding at most `capacity` events and [`MAX_RING_BYTES`].
    pub fn new(capacity: usize) -> Self {
        Self::with_byte_limit(capacity, MAX_RING_BYTES)
    }

    /// An empty ring holding at most `capacity` events and `max_bytes` of frames.
    pub fn with_byte_limit(capacity: usize, max_bytes: usize) -> Self {
        Self {
            frames: VecDeque::with_capacity(capacity.min(4096)),
            capacity,
            bytes: 0,
            max_bytes,
            newest_dropped: None,
        }
    }

    /// Appends an event; frames without an id, or not newer than the newest, are ignored.
    pub fn push(&mut self, frame: &Arc<Frame>) {
        let Some(id) = frame.id else { return };
        if self.newest().is_some_and(|newest| id <= newest) {
            return;
        }
        if self.capacity == 0 {
            self.newest_dropped = Some(id);
            return;
        }
        self.bytes += frame.bytes.len();
        self.frames.push_back(Arc::clone(frame));
        while self.frames.len() > self.capacity || self.bytes > self.max_bytes {
            let Some(dropped) = self.frames.pop_front() else {
                break;
            };
            self.bytes -= dropped.bytes.len();
            self.newest_dropped = dropped.id;
        }
    }

    /// Forgets everything (the ring is no longer known to be gap-free).
    pub fn clear(&mut self) {
        self.frames.clear();
        self.bytes = 0;
        self.newest_dropped = None;
    }

    /// Id of the newest event held.
    pub fn newest(&self) -> Option<EventId> {
        self.frames.back().and_then(|f| f.id)
    }

    /// Whether some event newer than `after` has been dropped from the ring.
    pub fn dropped_after(&self, after: EventId) -> bool {
        self.newest_dropped.is_some_and(|dropped| dropped > after)
    }

    /// Whether the ring can answer for everything after `after`: it holds an event at or
    /// before `after`, so nothing between `after` and its first event is missing, and
    /// `after` is not newer than its newest event (an id from the future is not ours to
    /// vouch for).
    pub fn covers(&self, after: EventId) -> bool {
        let first = self.frames.front().and_then(|f| f.id);
        first.is_some_and(|first| first <= after)
            && self.newest().is_some_and(|newest| after <= newest)
            && self.holds(after)
    }

    /// Whether the ring holds the event with id `id`. Ids inside the ring's range that it
    /// does not hold were never delivered here (a forged id, or one the primary lost).
    pub fn holds(&self, id: EventId) -> bool {
        self.frames
            .binary_search_by(|f| f.id.unwrap_or_default().cmp(&id))
            .is_ok()
    }

    /// Held events after `after`, as many as fit in `page`.
    pub fn after(&self, after: EventId, page: Page) -> RingSlice {
        let start = self
            .frames
            .partition_point(|f| f.id.is_some_and(|id| id <= after));
        let mut bytes = 0;
        let frames: Vec<_> = self
            .frames
            .iter()
            .skip(start)
            .take(page.events)
            .take_while(|frame| {
                bytes += frame.bytes.len();
                bytes <= page.bytes || bytes == frame.bytes.len()
            })
            .cloned()
            .collect();
        let more = self.frames.len() - start > frames.len();
        RingSlice { frames, more }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn frame(ms: u64) -> Arc<Frame> {
        Frame::with_bytes(Some(EventId::new(ms, 0)), "t", Bytes::new())
    }

    #[test]
    fn after_returns_newer_events_in_order_and_pages() {
        let mut ring = HistoryRing::new(10);
        for ms in 1..=5 {
            ring.push(&frame(ms));
        }
        let slice = ring.after(EventId::new(2, 0), Page::events(2));
        let ids: Vec<_> = slice.frames.iter().map(|f| f.id.unwrap().ms).collect();
        assert_eq!(ids, [3, 4]);
        assert!(slice.more);
        assert!(!ring.after(EventId::new(3, 0), Page::events(10)).more);
    }

    #[test]
    fn pages_are_bounded_in_bytes_but_always_make_progress() {
        let mut ring = HistoryRing::new(10);
        for ms in 1..=5 {
            ring.push(&Frame::with_bytes(
                Some(EventId::new(ms, 0)),
                "t",
                Bytes::from(vec![b'x'; 100]),
            ));
        }
        let page = |bytes| Page { events: 10, bytes };
        let ids = |slice: RingSlice| -> Vec<u64> {
            slice.frames.iter().map(|f| f.id.unwrap().ms).collect()
        };
        assert_eq!(ids(ring.after(EventId::new(0, 0), page(250))), [1, 2]);
        assert!(ring.after(EventId::new(0, 0), page(250)).more);
        // One event larger than the budget still goes out, alone.
        assert_eq!(ids(ring.after(EventId::new(0, 0), page(10))), [1]);
        assert_eq!(ids(ring.after(EventId::new(3, 0), page(1000))), [4, 5]);
    }

    #[test]
    fn coverage_and_drops_follow_the_capacity() {
        let mut ring = HistoryRing::new(3);
        for ms in 1..=5 {
            ring.push(&frame(ms));
        }
        assert!(!ring.covers(EventId::new(2, 0)));
        assert!(ring.covers(EventId::new(3, 0)));
        assert!(ring.covers(EventId::new(5, 0)));
        assert!(
            !ring.covers(EventId::new(9, 0)),
            "an id newer than any held"
        );
        assert!(ring.dropped_after(EventId::new(1, 0)));
        assert!(!ring.dropped_after(EventId::new(2, 0)));
    }

    #[test]
    fn the_byte_limit_drops_the_oldest_events() {
        let mut ring = HistoryRing::with_byte_limit(100, 10);
        for ms in 1..=5 {
            ring.push(&Frame::with_bytes(
                Some(EventId::new(ms, 0)),
                "t",
                Bytes::from_static(b"1234"),
            ));
        }
        let ids: Vec<_> = ring
            .after(EventId::new(0, 0), Page::events(10))
            .frames
            .iter()
            .map(|f| f.id.unwrap().ms)
            .collect();
        assert_eq!(ids, [4, 5]);
        assert!(ring.dropped_after(EventId::new(2, 0)));
    }

    #[test]
    fn stale_or_idless_frames_are_not_stored() {
        let mut ring = HistoryRing::new(3);
        ring.push(&frame(5));
        ring.push(&frame(4));
        ring.push(&Arc::new(Frame {
            id: None,
            event_type: None,
            bytes: Bytes::new(),
        }));
        assert_eq!(
            ring.after(EventId::new(0, 0), Page::events(10))
                .frames
                .len(),
            1
        );
        ring.clear();
        assert_eq!(ring.newest(), None);
    }
}
