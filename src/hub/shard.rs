//! A fan-out thread: owns a share of the replica's clients and writes each batch of new
//! frames to all of them, in order, never waiting on any one of them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use super::client::{Client, End, MAX_BATCH};
use crate::metrics::Metrics;
use crate::sse::Frame;

/// Frames closer together than this mean the replica is busy: worth batching.
const BUSY_GAP: Duration = Duration::from_millis(5);

/// How long a busy thread waits for more frames before writing what it has. Bounded by
/// a small fraction of the latencies that matter to a browser, and only paid under load.
const LINGER: Duration = Duration::from_millis(2);

/// What a fan-out thread is told.
#[derive(Debug)]
pub(super) enum Message {
    /// Deliver this frame to every client.
    Frame(Arc<Frame>),
    /// Start serving this client; frames sent after this message reach it.
    Attach(Arc<Client>),
    /// Some client closed: drop closed clients soon, releasing their sockets.
    Detach,
}

/// Shared between a fan-out thread and the senders.
#[derive(Debug, Default)]
pub(super) struct ShardSignals {
    /// Set when a frame could not be queued because the thread is far behind.
    pub overflowed: AtomicBool,
}

/// Runs until every sender is gone.
pub(super) fn run(
    inbox: Receiver<Message>,
    signals: Arc<ShardSignals>,
    client_queue: usize,
    metrics: Arc<Metrics>,
) {
    let mut clients: Vec<Arc<Client>> = Vec::new();
    let mut batch: Vec<Arc<Frame>> = Vec::with_capacity(MAX_BATCH);
    let mut last_frame_at: Option<Instant> = None;
    while let Ok(first) = inbox.recv() {
        let woke = Instant::now();
        // Frames arriving close together: wait a moment for the next ones, so every
        // client gets them in one write (fewer syscalls exactly when load is high). An
        // isolated event is delivered at once.
        let linger_until = last_frame_at
            .filter(|last| woke.duration_since(*last) < BUSY_GAP)
            .map(|_| woke + LINGER);
        let mut sweep = false;
        let mut next = Some(first);
        while let Some(message) = next.take() {
            match message {
                Message::Frame(frame) => {
                    sweep |= frame.event_type.is_none() && frame.id.is_none();
                    batch.push(frame);
                    if batch.len() == MAX_BATCH {
                        deliver(&clients, &mut batch, client_queue, &metrics);
                    }
                }
                Message::Attach(client) => {
                    // Frames already taken belong to the clients attached before it.
                    deliver(&clients, &mut batch, client_queue, &metrics);
                    clients.push(client);
                }
                Message::Detach => sweep = true,
            }
            next = inbox.try_recv().ok();
            if next.is_none()
                && !batch.is_empty()
                && let Some(until) = linger_until
            {
                let left = until.saturating_duration_since(Instant::now());
                if !left.is_zero() {
                    next = inbox.recv_timeout(left).ok();
                }
            }
        }
        if !batch.is_empty() {
            last_frame_at = Some(woke);
        }
        deliver(&clients, &mut batch, client_queue, &metrics);
        if signals.overflowed.swap(false, Ordering::Relaxed) {
            // Frames were lost on the way to this thread: every client here missed them,
            // so send all of them away to resume from history.
            tracing::warn!(
                clients = clients.len(),
                "fan-out fell too far behind; clients resume from history"
            );
            for client in &clients {
                client.close(End::Slow);
            }
            metrics.slow_disconnects.inc_by(clients.len() as u64);
            sweep = true;
        }
        if sweep {
            clients.retain(|client| !client.is_closed());
        }
    }
}

fn deliver(
    clients: &[Arc<Client>],
    batch: &mut Vec<Arc<Frame>>,
    client_queue: usize,
    metrics: &Metrics,
) {
    if batch.is_empty() {
        return;
    }
    let (mut delivered, mut dropped) = (0, 0);
    for client in clients {
        if !client.is_closed() {
            let offered = client.offer(batch, client_queue);
            delivered += offered.written;
            dropped += u64::from(offered.dropped_as_slow);
        }
    }
    if delivered > 0 {
        metrics.events_delivered.inc_by(delivered);
    }
    if dropped > 0 {
        metrics.slow_disconnects.inc_by(dropped);
    }
    batch.clear();
}
