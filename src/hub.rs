//! The fan-out hub: one shared ring of pre-encoded frames that every client on this replica
//! reads from, plus the registry that lets the hub find and drop clients that fall behind.
//!
//! Design, and why:
//! - Frames are encoded once by the broker and shared as `Arc<Frame>`; a delivery to a
//!   client is a reference-count bump, never a copy or an allocation.
//! - The ring is a `tokio::sync::broadcast` channel. Its capacity is the memory bound for
//!   all clients together: a client that is not scheduled in time or not reading is
//!   overtaken by the ring, sees `Lagged` and is disconnected, never buffered without limit.
//! - Backpressure policy: a client whose socket has stopped taking data while it is more
//!   than `client_queue` events behind is disconnected by the sweeper within
//!   [`SWEEP_INTERVAL`]. It reconnects and resumes from history by `Last-Event-ID`, so
//!   nothing is lost; the publisher and every other client never wait for it.
//! - Heartbeats are one shared frame sent on one tick through the same ring, so there is
//!   no timer per client.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::event::EventId;
use crate::metrics::Metrics;
use crate::sse;

/// How often the sweeper looks for clients that are stuck behind a full socket.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(100);

/// The ring holds this many times `client_queue` frames, so that a client the scheduler
/// runs late is not mistaken for a slow reader; only blocked writers are held to the queue.
const RING_SLACK: usize = 8;

/// Smallest ring, whatever the queue setting.
const MIN_RING: usize = 256;

/// One encoded SSE frame, shared by every client that receives it.
#[derive(Debug)]
pub struct Frame {
    /// The event id, for events that can be replayed; `None` for heartbeats and for
    /// fire-and-forget events that were never stored.
    pub id: Option<EventId>,
    /// The event type, used by per-client type filters; `None` for control frames.
    pub event_type: Option<Box<str>>,
    /// The bytes written to the socket.
    pub bytes: Bytes,
}

impl Frame {
    /// Wraps an encoded event.
    pub fn event(id: Option<EventId>, event_type: &str, bytes: Bytes) -> Arc<Self> {
        Arc::new(Self {
            id,
            event_type: Some(event_type.into()),
            bytes,
        })
    }
}

/// A frame with its position in this hub's ring.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Local, gap-free sequence number of the frame in this hub.
    pub seq: u64,
    /// The shared frame.
    pub frame: Arc<Frame>,
}

/// Why the hub told a client to go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KickReason {
    /// Fell more than the queue limit behind while its socket was full.
    Slow,
}

/// What the hub knows about one connected client.
#[derive(Debug)]
pub struct ClientSlot {
    delivered: AtomicU64,
    writing: AtomicBool,
    kicked: AtomicBool,
    kill: CancellationToken,
}

impl ClientSlot {
    /// Records that the client has taken every frame up to `seq` from the ring.
    pub fn mark_taken(&self, seq: u64) {
        self.delivered.store(seq, Ordering::Relaxed);
    }

    /// Marks whether the client is blocked handing bytes to its socket.
    pub fn set_writing(&self, writing: bool) {
        self.writing.store(writing, Ordering::Relaxed);
    }

    /// Fires when the hub kicks this client out.
    pub fn kill_token(&self) -> &CancellationToken {
        &self.kill
    }

    /// Why the client was kicked, if it was.
    pub fn kick_reason(&self) -> Option<KickReason> {
        self.kicked
            .load(Ordering::Relaxed)
            .then_some(KickReason::Slow)
    }
}

/// A client's place in the hub; dropping it unregisters the client.
#[derive(Debug)]
pub struct Subscription {
    /// Frames published after the subscription was made.
    pub receiver: broadcast::Receiver<Delivery>,
    /// Shared progress and kill switch of this client.
    pub slot: Arc<ClientSlot>,
    key: u64,
    hub: Hub,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let remaining = {
            let mut clients = self.hub.clients();
            clients.remove(&self.key);
            clients.len()
        };
        self.hub
            .inner
            .metrics
            .clients_connected
            .set(remaining as i64);
    }
}

/// Handle to the replica's fan-out hub; cheap to clone.
#[derive(Debug, Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

#[derive(Debug)]
struct HubInner {
    /// The lock makes sequence numbers follow the ring's order.
    sender: Mutex<broadcast::Sender<Delivery>>,
    last_seq: AtomicU64,
    clients: Mutex<HashMap<u64, Arc<ClientSlot>>>,
    next_key: AtomicU64,
    client_queue: u64,
    heartbeat: Arc<Frame>,
    metrics: Arc<Metrics>,
}

impl Hub {
    /// Makes a hub whose clients may each fall `client_queue` frames behind.
    pub fn new(client_queue: usize, metrics: Arc<Metrics>) -> Self {
        let (sender, _) = broadcast::channel(ring_capacity(client_queue));
        let heartbeat = Arc::new(Frame {
            id: None,
            event_type: None,
            bytes: Bytes::from_static(sse::HEARTBEAT),
        });
        Self {
            inner: Arc::new(HubInner {
                sender: Mutex::new(sender),
                last_seq: AtomicU64::new(0),
                clients: Mutex::new(HashMap::new()),
                next_key: AtomicU64::new(0),
                client_queue: client_queue as u64,
                heartbeat,
                metrics,
            }),
        }
    }

    /// Registers a client. Frames broadcast from now on reach its receiver; `kill` is the
    /// token the hub cancels to make the client leave.
    pub fn subscribe(&self, kill: CancellationToken) -> Subscription {
        let (receiver, seq) = {
            let sender = lock(&self.inner.sender);
            (
                sender.subscribe(),
                self.inner.last_seq.load(Ordering::Relaxed),
            )
        };
        let slot = Arc::new(ClientSlot {
            delivered: AtomicU64::new(seq),
            writing: AtomicBool::new(false),
            kicked: AtomicBool::new(false),
            kill,
        });
        let key = self.inner.next_key.fetch_add(1, Ordering::Relaxed);
        let count = {
            let mut clients = self.clients();
            clients.insert(key, Arc::clone(&slot));
            clients.len()
        };
        self.inner.metrics.clients_connected.set(count as i64);
        Subscription {
            receiver,
            slot,
            key,
            hub: self.clone(),
        }
    }

    /// Sends a frame to every client. Never waits on a client.
    pub fn broadcast(&self, frame: Arc<Frame>) {
        if let Some(event_type) = &frame.event_type {
            self.inner.metrics.record_event(event_type);
        }
        let sender = lock(&self.inner.sender);
        let seq = self.inner.last_seq.load(Ordering::Relaxed) + 1;
        self.inner.last_seq.store(seq, Ordering::Relaxed);
        // An error only means nobody is connected, which is fine.
        let _ = sender.send(Delivery { seq, frame });
    }

    /// Sends the shared heartbeat comment to every client.
    pub fn heartbeat(&self) {
        self.broadcast(Arc::clone(&self.inner.heartbeat));
    }

    /// Number of clients connected to this replica.
    pub fn client_count(&self) -> usize {
        self.clients().len()
    }

    /// Kicks every client that is blocked on a full socket while more than `client_queue`
    /// frames behind; returns how many were kicked.
    pub fn sweep(&self) -> usize {
        let head = self.inner.last_seq.load(Ordering::Relaxed);
        let limit = self.inner.client_queue;
        let clients = self.clients();
        let mut kicked = 0;
        for slot in clients.values() {
            let behind = head.saturating_sub(slot.delivered.load(Ordering::Relaxed));
            if behind > limit
                && slot.writing.load(Ordering::Relaxed)
                && !slot.kicked.swap(true, Ordering::Relaxed)
            {
                slot.kill.cancel();
                kicked += 1;
            }
        }
        kicked
    }

    /// Runs the heartbeat tick and the slow-client sweeper until `shutdown` fires.
    pub async fn run(self, heartbeat_every: Duration, shutdown: CancellationToken) {
        let mut heartbeat = tokio::time::interval(heartbeat_every);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        heartbeat.tick().await; // the first tick is immediate; streams open with `retry:`
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = heartbeat.tick() => self.heartbeat(),
                _ = sweep.tick() => {
                    let kicked = self.sweep();
                    if kicked > 0 {
                        tracing::debug!(kicked, "kicked clients stuck behind full sockets");
                    }
                }
            }
        }
    }

    fn clients(&self) -> MutexGuard<'_, HashMap<u64, Arc<ClientSlot>>> {
        lock(&self.inner.clients)
    }
}

/// Ring capacity for a given per-client queue limit.
fn ring_capacity(client_queue: usize) -> usize {
    client_queue.saturating_mul(RING_SLACK).max(MIN_RING)
}

/// Locks a mutex, carrying on if a panicking thread poisoned it: every critical section
/// here leaves the data consistent at each step.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(queue: usize) -> Hub {
        Hub::new(queue, Arc::new(Metrics::new()))
    }

    fn frame(n: u64) -> Arc<Frame> {
        Frame::event(
            Some(EventId::new(n, 0)),
            "t",
            Bytes::from(format!("data: {n}\n\n")),
        )
    }

    #[tokio::test]
    async fn subscribers_receive_frames_in_order_with_increasing_seq() {
        let hub = hub(10);
        let mut sub = hub.subscribe(CancellationToken::new());
        for n in 1..=3 {
            hub.broadcast(frame(n));
        }
        for n in 1..=3 {
            let d = sub.receiver.recv().await.unwrap();
            assert_eq!(d.seq, n);
            assert_eq!(d.frame.id, Some(EventId::new(n, 0)));
        }
    }

    #[test]
    fn dropping_a_subscription_unregisters_the_client() {
        let hub = hub(10);
        let a = hub.subscribe(CancellationToken::new());
        let b = hub.subscribe(CancellationToken::new());
        assert_eq!(hub.client_count(), 2);
        drop(a);
        assert_eq!(hub.client_count(), 1);
        drop(b);
        assert_eq!(hub.client_count(), 0);
    }

    #[test]
    fn sweeper_kicks_only_blocked_clients_beyond_the_queue() {
        let hub = hub(5);
        let blocked = hub.subscribe(CancellationToken::new());
        let late = hub.subscribe(CancellationToken::new());
        blocked.slot.set_writing(true);
        for n in 1..=6 {
            hub.broadcast(frame(n));
        }
        assert_eq!(hub.sweep(), 1);
        assert!(blocked.slot.kill_token().is_cancelled());
        assert_eq!(blocked.slot.kick_reason(), Some(KickReason::Slow));
        assert!(
            !late.slot.kill_token().is_cancelled(),
            "not writing, so not slow"
        );
        assert_eq!(hub.sweep(), 0, "a client is kicked once");
    }

    #[test]
    fn a_blocked_client_within_its_queue_stays() {
        let hub = hub(5);
        let sub = hub.subscribe(CancellationToken::new());
        sub.slot.set_writing(true);
        for n in 1..=5 {
            hub.broadcast(frame(n));
        }
        assert_eq!(hub.sweep(), 0);
    }

    #[tokio::test]
    async fn the_ring_bounds_memory_for_clients_that_never_read() {
        let hub = hub(1);
        let mut sub = hub.subscribe(CancellationToken::new());
        for n in 0..(MIN_RING as u64 + 10) {
            hub.broadcast(frame(n));
        }
        assert!(matches!(
            sub.receiver.recv().await,
            Err(broadcast::error::RecvError::Lagged(_))
        ));
    }
}
