//! One client's session: replay from history, then live frames from the hub, filtered,
//! de-duplicated by id and batched.
//!
//! The hub subscription is taken before history is read, so an event published during the
//! replay is either in the replayed pages or waiting in the subscription; ids decide which
//! copy is sent, so the seam has neither a gap nor a duplicate.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio_util::sync::CancellationToken;

use super::StreamParams;
use crate::broker::{Broker, REPLAY_PAGE};
use crate::event::EventId;
use crate::hub::{ClientSlot, Delivery, Frame, Subscription};
use crate::metrics::Metrics;
use crate::sse;
use crate::state::AppState;

/// Most frames handed to the socket in one write.
pub const MAX_BATCH: usize = 32;

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The client fell too far behind.
    Slow,
    /// The gateway is shutting down.
    Shutdown,
    /// History could not be read; the client should retry shortly.
    BrokerUnavailable,
    /// The client closed its connection or a write failed.
    ClientGone,
}

/// The state of one connected client.
#[derive(Debug)]
pub struct Session {
    subscription: Subscription,
    params: StreamParams,
    broker: Broker,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    /// Newest id sent; anything not newer is a duplicate.
    last_sent: Option<EventId>,
    /// Still replaying history after this id.
    replay_after: Option<EventId>,
}

impl Session {
    /// Registers the client with the hub. `kill` is cancelled by the hub if the client has
    /// to go.
    pub fn open(state: &AppState, params: StreamParams, kill: CancellationToken) -> Self {
        let subscription = state.hub.subscribe(kill);
        if params.last_event_id.is_some() {
            state.metrics.resumes.inc();
        }
        Self {
            subscription,
            replay_after: params.last_event_id,
            last_sent: params.last_event_id,
            params,
            broker: state.broker.clone(),
            metrics: Arc::clone(&state.metrics),
            shutdown: state.shutdown.clone(),
        }
    }

    /// The hub's view of this client.
    pub fn slot(&self) -> &ClientSlot {
        &self.subscription.slot
    }

    /// Waits for the next frames and appends them to `out` (never returns an empty batch).
    /// Returns how many of them are events, as opposed to heartbeats or notices.
    pub async fn next_batch(&mut self, out: &mut Vec<Bytes>) -> Result<u64, End> {
        loop {
            if let Some(after) = self.replay_after {
                let events = self.replay_step(after, out).await?;
                if !out.is_empty() {
                    return Ok(events);
                }
                continue;
            }
            let first = tokio::select! {
                biased;
                _ = self.subscription.slot.kill_token().cancelled() => return Err(End::Slow),
                _ = self.shutdown.cancelled() => return Err(End::Shutdown),
                received = self.subscription.receiver.recv() => received,
            };
            let mut events = match first {
                Ok(delivery) => self.accept(delivery, out),
                Err(RecvError::Lagged(_)) => return Err(End::Slow),
                Err(RecvError::Closed) => return Err(End::Shutdown),
            };
            while out.len() < MAX_BATCH {
                match self.subscription.receiver.try_recv() {
                    Ok(delivery) => events += self.accept(delivery, out),
                    Err(TryRecvError::Lagged(_)) => return Err(End::Slow),
                    Err(TryRecvError::Empty | TryRecvError::Closed) => break,
                }
            }
            if !out.is_empty() {
                return Ok(events);
            }
        }
    }

    /// Takes one delivery from the hub; returns 1 if it added an event to `out`.
    fn accept(&mut self, delivery: Delivery, out: &mut Vec<Bytes>) -> u64 {
        self.subscription.slot.mark_taken(delivery.seq);
        self.push(&delivery.frame, out)
    }

    fn push(&mut self, frame: &Frame, out: &mut Vec<Bytes>) -> u64 {
        if let Some(id) = frame.id {
            if self.last_sent.is_some_and(|last| id <= last) {
                return 0;
            }
            self.last_sent = Some(id);
        }
        match &frame.event_type {
            Some(event_type) if !self.params.wants(event_type) => 0,
            Some(_) => {
                out.push(frame.bytes.clone());
                1
            }
            None => {
                out.push(frame.bytes.clone());
                0
            }
        }
    }

    /// Reads one page of history after `after` into `out`.
    async fn replay_step(&mut self, after: EventId, out: &mut Vec<Bytes>) -> Result<u64, End> {
        let page = tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => return Err(End::Shutdown),
            // Boxed: the Redis call's future is several KB, and it would otherwise be
            // part of every idle client's task for the client's whole life.
            page = Box::pin(self.broker.replay(after, REPLAY_PAGE)) => page,
        };
        let page = page.map_err(|error| {
            tracing::warn!(%error, "cannot replay history");
            End::BrokerUnavailable
        })?;
        if page.truncated && Some(after) == self.params.last_event_id {
            // The client missed events we no longer have: tell it to reload, then go live.
            self.metrics.history_truncated.inc();
            out.push(sse::history_truncated(after));
            self.replay_after = None;
            return Ok(0);
        }
        let mut events = 0;
        for frame in &page.frames {
            events += self.push(frame, out);
        }
        self.replay_after = match page.frames.last().and_then(|f| f.id) {
            Some(last) if page.more => Some(last),
            _ => None,
        };
        Ok(events)
    }
}
