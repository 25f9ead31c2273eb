//! The fan-out hub: hands every frame to a few fan-out threads, each of which owns a share
//! of this replica's clients and writes to them directly.
//!
//! Design, and why:
//! - Frames are encoded once by the broker and shared as `Arc<Frame>`; a delivery is a
//!   reference-count bump and a vectored write of the shared bytes, never a copy.
//! - Delivery to a caught-up client is a non-blocking write from the fan-out thread: no
//!   task wake-up, no channel per client. Under load a thread takes every frame waiting
//!   in its inbox at once, so each client gets them in one write (fewer syscalls exactly
//!   when they matter).
//! - Backpressure is per client (see `client.rs`): what a full socket does not take waits
//!   in that client's queue of at most `client_queue` frames; beyond that the client is
//!   disconnected, counted, and resumes from history on reconnect. Nobody else waits.
//! - A fan-out thread's inbox is bounded too. If a thread ever falls that far behind, its
//!   clients are sent away to resume from history rather than lose events silently.
//! - Heartbeats are one shared frame sent on one tick, so there is no timer per client.

mod client;
mod shard;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

pub use client::{Client, End, MAX_BATCH};

use crate::metrics::Metrics;
use crate::sse::{self, Frame};
use shard::{Message, ShardSignals};

/// Frames (and attach messages) a fan-out thread may have waiting before it counts as
/// overwhelmed.
const INBOX_CAPACITY: usize = 16_384;

/// Handle to the replica's fan-out hub; cheap to clone.
#[derive(Debug, Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

#[derive(Debug)]
struct HubInner {
    /// The lock makes every fan-out thread see frames in the same order.
    shards: Mutex<Vec<SyncSender<Message>>>,
    signals: Vec<Arc<ShardSignals>>,
    next_shard: AtomicUsize,
    clients: AtomicUsize,
    heartbeat: Arc<Frame>,
    metrics: Arc<Metrics>,
}

/// A client's registration; dropping it takes the client out of the hub.
#[derive(Debug)]
pub struct Attachment {
    client: Arc<Client>,
    hub: Hub,
    shard: usize,
}

impl Attachment {
    /// The registered client.
    pub fn client(&self) -> &Arc<Client> {
        &self.client
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.client.close(End::ClientGone);
        let remaining = self.hub.inner.clients.fetch_sub(1, Ordering::Relaxed) - 1;
        self.hub
            .inner
            .metrics
            .clients_connected
            .set(remaining as i64);
        // Best effort: a full inbox is swept on the next heartbeat anyway.
        let shards = self
            .hub
            .inner
            .shards
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let _ = shards[self.shard].try_send(Message::Detach);
    }
}

impl Hub {
    /// Starts `threads` fan-out threads whose clients may each have `client_queue` frames
    /// waiting. A hub without threads turns every client away (a publisher that only
    /// writes to Redis needs no clients).
    pub fn new(client_queue: usize, threads: usize, metrics: Arc<Metrics>) -> Self {
        let mut senders = Vec::new();
        let mut signals = Vec::new();
        for index in 0..threads {
            let (sender, inbox) = std::sync::mpsc::sync_channel(INBOX_CAPACITY);
            let shard_signals = Arc::new(ShardSignals::default());
            let thread_signals = Arc::clone(&shard_signals);
            let thread_metrics = Arc::clone(&metrics);
            let spawned = std::thread::Builder::new()
                .name(format!("eventfabric-fanout-{index}"))
                .spawn(move || shard::run(inbox, thread_signals, client_queue, thread_metrics));
            if let Err(error) = spawned {
                tracing::error!(%error, "cannot start a fan-out thread");
                continue;
            }
            senders.push(sender);
            signals.push(shard_signals);
        }
        Self {
            inner: Arc::new(HubInner {
                shards: Mutex::new(senders),
                signals,
                next_shard: AtomicUsize::new(0),
                clients: AtomicUsize::new(0),
                heartbeat: Frame::control(Bytes::from_static(sse::HEARTBEAT)),
                metrics,
            }),
        }
    }

    /// Registers a client: every frame broadcast from now on is offered to it.
    pub fn attach(&self, client: Arc<Client>) -> Attachment {
        let count = self.inner.clients.fetch_add(1, Ordering::Relaxed) + 1;
        self.inner.metrics.clients_connected.set(count as i64);
        let shards = self.inner.shards.lock().unwrap_or_else(|p| p.into_inner());
        let shard = self.inner.next_shard.fetch_add(1, Ordering::Relaxed) % shards.len().max(1);
        let attached = shards.get(shard).is_some_and(|sender| {
            sender
                .try_send(Message::Attach(Arc::clone(&client)))
                .is_ok()
        });
        drop(shards);
        if !attached {
            // The thread is saturated: turn the client away to retry, rather than wait.
            client.close(End::Slow);
            self.inner.metrics.slow_disconnects.inc();
        }
        Attachment {
            client,
            hub: self.clone(),
            shard,
        }
    }

    /// Sends a frame to every client. Never waits on a client or a thread.
    pub fn broadcast(&self, frame: Arc<Frame>) {
        if let Some(event_type) = &frame.event_type {
            self.inner.metrics.record_event(event_type);
        }
        let shards = self.inner.shards.lock().unwrap_or_else(|p| p.into_inner());
        for (sender, signals) in shards.iter().zip(&self.inner.signals) {
            match sender.try_send(Message::Frame(Arc::clone(&frame))) {
                Ok(()) | Err(TrySendError::Disconnected(_)) => {}
                Err(TrySendError::Full(_)) => signals.overflowed.store(true, Ordering::Relaxed),
            }
        }
    }

    /// Sends the shared heartbeat comment to every client.
    pub fn heartbeat(&self) {
        self.broadcast(Arc::clone(&self.inner.heartbeat));
    }

    /// Number of clients connected to this replica.
    pub fn client_count(&self) -> usize {
        self.inner.clients.load(Ordering::Relaxed)
    }

    /// Sends heartbeats every `every` until `shutdown` fires.
    pub async fn run(self, every: Duration, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate; streams open with `retry:`
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => self.heartbeat(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventId, TypeFilter};

    fn hub(queue: usize) -> Hub {
        Hub::new(queue, 2, Arc::new(Metrics::new()))
    }

    fn frame(n: u64) -> Arc<Frame> {
        Frame::with_bytes(
            Some(EventId::new(n, 0)),
            "t",
            Bytes::from(format!("data: {n}\n\n")),
        )
    }

    fn queued_client() -> Arc<Client> {
        Arc::new(Client::new(
            None,
            TypeFilter::default(),
            None,
            CancellationToken::new(),
        ))
    }

    async fn take_all(client: &Client, want: usize) -> Vec<Bytes> {
        let mut got = Vec::new();
        while got.len() < want {
            let mut batch = Vec::new();
            client.take_queued(&mut batch).unwrap();
            if batch.is_empty() {
                tokio::time::timeout(Duration::from_secs(5), client.woken())
                    .await
                    .unwrap();
            }
            got.extend(batch);
        }
        got
    }

    #[tokio::test]
    async fn clients_on_every_thread_receive_frames_in_order() {
        let hub = hub(100);
        let clients: Vec<_> = (0..4).map(|_| queued_client()).collect();
        let _attached: Vec<_> = clients.iter().map(|c| hub.attach(Arc::clone(c))).collect();
        for n in 1..=50 {
            hub.broadcast(frame(n));
        }
        for client in &clients {
            let got = take_all(client, 50).await;
            let expected: Vec<_> = (1..=50)
                .map(|n| Bytes::from(format!("data: {n}\n\n")))
                .collect();
            assert_eq!(got, expected);
        }
    }

    #[test]
    fn dropping_an_attachment_unregisters_the_client() {
        let hub = hub(10);
        let a = hub.attach(queued_client());
        let b = hub.attach(queued_client());
        assert_eq!(hub.client_count(), 2);
        drop(a);
        assert_eq!(hub.client_count(), 1);
        drop(b);
        assert_eq!(hub.client_count(), 0);
    }

    #[tokio::test]
    async fn a_client_that_never_takes_its_queue_is_dropped_past_the_limit() {
        let hub = hub(5);
        let slow = queued_client();
        let _attached = hub.attach(Arc::clone(&slow));
        {
            // Hand writing to the fan-out thread's queue, as an idle task would.
            let mut batch = Vec::new();
            slow.take_queued(&mut batch).unwrap();
        }
        for n in 1..=50 {
            hub.broadcast(frame(n));
        }
        tokio::time::timeout(Duration::from_secs(5), async {
            while slow.end().is_none() {
                slow.woken().await;
            }
        })
        .await
        .unwrap();
        assert_eq!(slow.end(), Some(End::Slow));
    }

    #[tokio::test]
    async fn filters_and_resume_ids_are_applied() {
        let hub = hub(100);
        let client = Arc::new(Client::new(
            None,
            TypeFilter::only(vec!["wanted".into()]),
            Some(EventId::new(2, 0)),
            CancellationToken::new(),
        ));
        let _attached = hub.attach(Arc::clone(&client));
        for n in 1..=4 {
            let kind = if n % 2 == 0 { "wanted" } else { "other" };
            hub.broadcast(Frame::with_bytes(
                Some(EventId::new(n, 0)),
                kind,
                Bytes::from(format!("{n}")),
            ));
        }
        hub.heartbeat();
        let got = take_all(&client, 2).await;
        assert_eq!(got, [Bytes::from("4"), Bytes::from_static(sse::HEARTBEAT)]);
    }
}
