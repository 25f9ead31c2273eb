//! In-process broker, for the single-replica mode: ids from this process's clock, and the
//! delivery path's ring of recent events as the whole history.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde_json::value::RawValue;

use super::delivery::Delivery;
use super::{IDEMPOTENCY_TTL_MS, MAX_IDEMPOTENCY_KEYS, Page, Replay};
use crate::event::{EventId, IdGenerator};
use crate::sse::Frame;

/// Keeps the last `capacity` events and delivers each one as it is published.
#[derive(Debug)]
pub(crate) struct MemoryBroker {
    state: Mutex<State>,
    delivery: Arc<Delivery>,
    /// Ids below this were handed out by an earlier process, whose history is gone.
    epoch: EventId,
}

#[derive(Debug)]
struct State {
    ids: IdGenerator,
    /// Idempotency key → the id its first publish got.
    keys: HashMap<Box<str>, EventId>,
    /// Keys in the order they were first used, for expiry.
    key_order: VecDeque<(EventId, Box<str>)>,
}

impl State {
    /// Forgets keys older than the window, and the oldest beyond the cap.
    fn expire_keys(&mut self, now_ms: u64) {
        while let Some((id, key)) = self.key_order.front() {
            let expired = id.ms + IDEMPOTENCY_TTL_MS <= now_ms;
            if !expired && self.key_order.len() <= MAX_IDEMPOTENCY_KEYS {
                break;
            }
            self.keys.remove(key);
            self.key_order.pop_front();
        }
    }
}

impl MemoryBroker {
    /// A broker whose history is the ring of `delivery`.
    pub fn new(delivery: Arc<Delivery>) -> Self {
        let mut ids = IdGenerator::default();
        let epoch = ids.next_id();
        Self {
            state: Mutex::new(State {
                ids,
                keys: HashMap::new(),
                key_order: VecDeque::new(),
            }),
            delivery,
            epoch,
        }
    }

    /// Stores and delivers one event. Holding the lock while delivering keeps delivery
    /// order equal to id order, which resume relies on. A retry with the same
    /// `idempotency_key` within ten minutes gets the first id back and stores nothing.
    pub fn publish(
        &self,
        event_type: &str,
        data: &RawValue,
        idempotency_key: Option<&str>,
    ) -> EventId {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let id = state.ids.next_id();
        if let Some(key) = idempotency_key {
            state.expire_keys(id.ms);
            if let Some(first) = state.keys.get(key) {
                return *first;
            }
            state.keys.insert(key.into(), id);
            state.key_order.push_back((id, key.into()));
        }
        self.delivery
            .deliver(Frame::event(event_type, data, Some(id), id.ms));
        id
    }

    /// Retained events after `after`, oldest first, as many as fit in `page`. An id
    /// from before this process started, or newer than any it issued, is truncated: the
    /// client cannot be brought up to date from here.
    pub fn replay(&self, after: EventId, page: Page) -> Replay {
        self.delivery.with_recent(|history| {
            let slice = history.after(after, page);
            let unknown =
                after < self.epoch || history.newest().is_none_or(|newest| after > newest);
            Replay {
                next: slice
                    .more
                    .then(|| slice.frames.last().and_then(|f| f.id))
                    .flatten(),
                truncated: unknown || history.dropped_after(after),
                unknown_id: unknown,
                frames: slice.frames,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::Hub;
    use crate::metrics::Metrics;

    fn broker(capacity: usize) -> MemoryBroker {
        let hub = Hub::new(10, 1, Arc::new(Metrics::new()));
        MemoryBroker::new(Arc::new(Delivery::new(capacity, hub)))
    }

    fn data() -> Box<RawValue> {
        RawValue::from_string("{}".into()).unwrap()
    }

    #[test]
    fn replay_returns_exactly_the_events_after_the_id_in_order() {
        let broker = broker(100);
        let ids: Vec<_> = (0..10)
            .map(|_| broker.publish("t", &data(), None))
            .collect();
        let replay = broker.replay(ids[3], Page::events(100));
        let got: Vec<_> = replay.frames.iter().map(|f| f.id.unwrap()).collect();
        assert_eq!(got, ids[4..]);
        assert!(!replay.truncated && replay.next.is_none());
    }

    #[test]
    fn replay_pages_with_more() {
        let broker = broker(100);
        let ids: Vec<_> = (0..10)
            .map(|_| broker.publish("t", &data(), None))
            .collect();
        let replay = broker.replay(ids[0], Page::events(4));
        assert_eq!(replay.frames.len(), 4);
        assert_eq!(replay.next, Some(ids[4]));
        assert_eq!(replay.frames[0].id, Some(ids[1]));
    }

    #[test]
    fn replay_from_a_dropped_id_reports_truncation() {
        let broker = broker(5);
        let ids: Vec<_> = (0..20)
            .map(|_| broker.publish("t", &data(), None))
            .collect();
        assert!(broker.replay(ids[0], Page::events(100)).truncated);
        assert!(!broker.replay(ids[15], Page::events(100)).truncated);
        assert_eq!(broker.replay(ids[15], Page::events(100)).frames.len(), 4);
    }

    #[test]
    fn a_repeated_idempotency_key_returns_the_first_id_and_stores_nothing() {
        let broker = broker(100);
        let first = broker.publish("t", &data(), Some("k1"));
        let again = broker.publish("t", &data(), Some("k1"));
        let other = broker.publish("t", &data(), Some("k2"));
        assert_eq!(first, again);
        assert_ne!(first, other);
        assert_eq!(
            broker
                .replay(EventId::new(0, 0), Page::events(100))
                .frames
                .len(),
            2
        );
    }

    #[test]
    fn ids_from_before_this_process_are_truncated() {
        let broker = broker(5);
        assert!(
            broker
                .replay(EventId::new(1, 0), Page::events(100))
                .truncated
        );
    }

    #[test]
    fn ids_newer_than_any_issued_are_truncated() {
        let broker = broker(5);
        let forged = EventId::new(99_999_999_999_999, 0);
        assert!(
            broker.replay(forged, Page::events(100)).truncated,
            "before any event"
        );
        let newest = broker.publish("t", &data(), None);
        assert!(!broker.replay(newest, Page::events(100)).truncated);
        assert!(broker.replay(forged, Page::events(100)).truncated);
    }
}
