//! One client's session: replay from history, then the frames the hub queued for it,
//! filtered, de-duplicated by id and batched for its task to write.
//!
//! The client is attached to the hub before history is read, so an event published during
//! the replay is either in the replayed pages or queued by the hub; ids decide which copy
//! is sent, so the seam has neither a gap nor a duplicate. Once the replay and the queue
//! are done, the hub writes new events to the socket itself (see `hub/client.rs`).

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use super::StreamParams;
use super::contract::Admitted;
use crate::address::AddressSlot;
use crate::auth::LEEWAY;
use crate::broker::REPLAY_PAGE;
use crate::event::EventId;
use crate::hub::{Attachment, Client, End};
use crate::sse;
use crate::state::AppState;
use crate::telemetry::RateLimit;

/// The state of one connected client.
#[derive(Debug)]
pub struct Session {
    attachment: Attachment,
    state: AppState,
    /// The id the client asked to resume after.
    resume_after: Option<EventId>,
    /// Still replaying history after this id.
    replay_after: Option<EventId>,
    /// The stream's place under `--max-clients-per-ip`, given back when the session ends.
    _address: Option<AddressSlot>,
    /// Fires when the client's token expires. Boxed, and only for clients with a token:
    /// a timer is larger than the rest of a session.
    expiry: Option<Pin<Box<Sleep>>>,
}

impl Session {
    /// Registers the client with the hub. With a `socket`, the hub writes caught-up events
    /// to it directly; `kill` is cancelled if the client is dropped for being slow. The
    /// stream ends when `admitted` expires.
    pub fn open(
        state: &AppState,
        params: StreamParams,
        socket: Option<Arc<TcpStream>>,
        kill: CancellationToken,
        admitted: Admitted,
    ) -> Self {
        let resume_after = params.last_event_id;
        let client = Client::new(socket, params.types, resume_after, kill);
        let attachment = state.hub.attach(Arc::new(client));
        if resume_after.is_some() {
            state.metrics.resumes.inc();
        }
        Self {
            attachment,
            state: state.clone(),
            resume_after,
            replay_after: resume_after,
            _address: admitted.address,
            expiry: admitted
                .expires
                .map(|at| Box::pin(tokio::time::sleep_until(deadline(at)))),
        }
    }

    /// The hub's view of this client.
    pub fn client(&self) -> &Client {
        self.attachment.client()
    }

    /// Resolves when the client must go (for example, dropped as slow while its task was
    /// blocked on a full socket).
    pub async fn ended(&self) -> End {
        loop {
            if let Some(end) = self.client().end() {
                return end;
            }
            self.client().woken().await;
        }
    }

    /// Waits for the next frames and appends them to `out` (never returns an empty batch).
    /// Returns how many of them are events, as opposed to heartbeats or notices.
    pub async fn next_batch(&mut self, out: &mut Vec<Bytes>) -> Result<u64, End> {
        loop {
            if self.expiry.as_ref().is_some_and(|sleep| sleep.is_elapsed()) {
                return Err(self.expire());
            }
            if let Some(after) = self.replay_after {
                if let Some(end) = self.client().end() {
                    return Err(end);
                }
                let events = self.replay_step(after, out).await?;
                if !out.is_empty() {
                    return Ok(events);
                }
                continue;
            }
            let events = self.client().take_queued(out)?;
            if !out.is_empty() {
                return Ok(events);
            }
            tokio::select! {
                biased;
                _ = self.state.shutdown.cancelled() => return Err(End::Shutdown),
                () = expired(&mut self.expiry) => return Err(self.expire()),
                _ = self.attachment.client().woken() => {}
            }
        }
    }

    /// Ends the stream because its token expired: the hub stops writing to it first, so
    /// the farewell is the last thing on the wire.
    fn expire(&self) -> End {
        self.client().close(End::Expired);
        self.client().end().unwrap_or(End::Expired)
    }

    /// Reads one page of history after `after` into `out`.
    async fn replay_step(&mut self, after: EventId, out: &mut Vec<Bytes>) -> Result<u64, End> {
        let page = tokio::select! {
            biased;
            _ = self.state.shutdown.cancelled() => return Err(End::Shutdown),
            // Boxed: the Redis call's future is several KB, and it would otherwise be
            // part of every idle client's task for the client's whole life.
            page = Box::pin(self.state.broker.replay(after, REPLAY_PAGE, Some(after) == self.resume_after)) => page,
        };
        let page = page.map_err(|error| {
            // Every resuming client hits this while Redis is down: one line a second.
            static LOG: RateLimit = RateLimit::per_second();
            if let Some(suppressed) = LOG.allow() {
                tracing::warn!(%error, suppressed, "cannot replay history");
            }
            End::BrokerUnavailable
        })?;
        if page.truncated && Some(after) == self.resume_after {
            // The client missed events we no longer have, or sent an id this fabric never
            // issued: tell it to reload, then go live. Its id is no guide to what it has
            // (a forged one is ahead of every real event), so nothing live is held back.
            self.state.metrics.history_truncated.inc();
            out.push(sse::history_truncated(after));
            self.client().forget_last_sent();
            self.replay_after = None;
            return Ok(0);
        }
        let mut events = 0;
        for frame in &page.frames {
            if self.client().take_replayed(frame) {
                events += u64::from(frame.event_type.is_some());
                out.push(frame.bytes.clone());
            }
        }
        self.replay_after = page.next;
        Ok(events)
    }
}

/// Resolves when `expiry` fires; never without one.
async fn expired(expiry: &mut Option<Pin<Box<Sleep>>>) {
    match expiry {
        Some(sleep) => sleep.as_mut().await,
        None => std::future::pending().await,
    }
}

/// When a stream whose token expires at `at` ends: then, or, for a token accepted within
/// the clock-skew allowance after its expiry, at the end of that allowance (ending it at
/// once would only bring the same token back at once).
fn deadline(at: SystemTime) -> Instant {
    let now = SystemTime::now();
    let left = match at.duration_since(now) {
        Ok(left) => left,
        Err(past) => LEEWAY.saturating_sub(past.duration()),
    };
    Instant::now() + left.max(Duration::from_millis(1))
}
