//! What the hub knows about one connected client: its socket (for direct writes), its
//! type filter, and the small queue of frames that could not be written at once.
//!
//! Who writes, and when: while the queue is empty and the client's own task is idle, the
//! fan-out thread writes new frames straight to the socket with one non-blocking vectored
//! write, so a healthy client costs one syscall per batch of events and no task wake-up.
//! Anything the socket does not take goes to the queue, and the client's task (woken once)
//! writes it out when the socket drains; until the queue is empty again, new frames queue
//! behind it, so order is kept. A queue longer than `client_queue` frames means the client
//! is not reading: it is disconnected, and resumes from history when it reconnects.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Buf, Bytes};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::event::{EventId, TypeFilter};
use crate::sse::Frame;

/// Most frames handed to the socket in one write.
pub const MAX_BATCH: usize = 32;

/// Why a client's stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The client fell more than its queue behind.
    Slow,
    /// The gateway is shutting down.
    Shutdown,
    /// History could not be read; the client should retry shortly.
    BrokerUnavailable,
    /// The client closed its connection or a write failed.
    ClientGone,
    /// The client's token expired; it should come back with a fresh one.
    Expired,
}

/// What offering frames to a client did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Offered {
    /// Events written straight to the socket.
    pub written: u64,
    /// The client's queue overflowed and it was dropped. Counted here, where it is
    /// decided: a client whose writer is stuck (a hyper body nobody polls) never reports.
    pub dropped_as_slow: bool,
}

/// A frame waiting in a client's queue.
#[derive(Debug)]
struct Queued {
    bytes: Bytes,
    /// Id to de-duplicate on; `None` when already accounted for.
    id: Option<EventId>,
    /// Counts as a delivered event (not a heartbeat or notice).
    event: bool,
}

#[derive(Debug, Default)]
struct ClientState {
    queue: VecDeque<Queued>,
    /// The client's task owns writing (replaying, or draining the queue).
    task_writing: bool,
    /// Newest event id written or handed over for writing.
    last_sent: Option<EventId>,
    /// Set when the client must go.
    end: Option<End>,
}

/// One connected client, shared by its task and the fan-out thread that serves it.
#[derive(Debug)]
pub struct Client {
    /// The socket, when the stream is written on it directly; `None` for streams that
    /// go through hyper, which always take the queue.
    socket: Option<Arc<TcpStream>>,
    types: TypeFilter,
    state: Mutex<ClientState>,
    wake: Notify,
    /// Cancelled when the client is dropped for being slow, for owners that cannot be
    /// woken (a hyper connection whose body is not being polled).
    kill: CancellationToken,
    closed: AtomicBool,
}

impl Client {
    /// A client that starts with its task writing (it replays history first) and
    /// `last_sent` as the id it resumes after.
    pub fn new(
        socket: Option<Arc<TcpStream>>,
        types: TypeFilter,
        last_sent: Option<EventId>,
        kill: CancellationToken,
    ) -> Self {
        Self {
            socket,
            types,
            state: Mutex::new(ClientState {
                task_writing: true,
                last_sent,
                ..ClientState::default()
            }),
            wake: Notify::new(),
            kill,
            closed: AtomicBool::new(false),
        }
    }

    fn state(&self) -> MutexGuard<'_, ClientState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the client has gone (the fan-out thread drops such clients).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    /// Ends the client's stream for `reason` (the first reason given wins) and wakes its
    /// task.
    pub fn close(&self, reason: End) {
        {
            let mut state = self.state();
            if state.end.is_none() {
                state.end = Some(reason);
            }
        }
        self.closed.store(true, Ordering::Relaxed);
        if reason == End::Slow {
            self.kill.cancel();
        }
        self.wake.notify_one();
    }

    /// Why the client must go, if it must.
    pub fn end(&self) -> Option<End> {
        self.state().end
    }

    /// Waits until the fan-out thread queued frames or closed the client.
    pub async fn woken(&self) {
        self.wake.notified().await;
    }

    /// Whether an event of this type passes the client's filter.
    pub fn wants(&self, event_type: &str) -> bool {
        self.types.wants(event_type)
    }

    /// Records that the client's task sends `frame` (during replay); false if the client
    /// already has it or does not want it.
    pub fn take_replayed(&self, frame: &Frame) -> bool {
        if let Some(event_type) = &frame.event_type
            && !self.wants(event_type)
        {
            return false;
        }
        let Some(id) = frame.id else { return true };
        let mut state = self.state();
        if state.last_sent.is_some_and(|last| id <= last) {
            return false;
        }
        state.last_sent = Some(id);
        true
    }

    /// Stops de-duplicating against the id the client resumed after: that id turned out
    /// not to be one this fabric knows, so it says nothing about what the client has.
    pub fn forget_last_sent(&self) {
        self.state().last_sent = None;
    }

    /// Moves up to [`MAX_BATCH`] queued frames into `out` for the client's task to write,
    /// skipping duplicates; returns how many are events. With nothing queued, hands
    /// writing back to the fan-out thread. Fails once the client must go.
    pub fn take_queued(&self, out: &mut Vec<Bytes>) -> Result<u64, End> {
        let mut state = self.state();
        if let Some(end) = state.end {
            return Err(end);
        }
        let mut events = 0;
        while out.len() < MAX_BATCH {
            let Some(queued) = state.queue.pop_front() else {
                break;
            };
            if let Some(id) = queued.id {
                if state.last_sent.is_some_and(|last| id <= last) {
                    continue;
                }
                state.last_sent = Some(id);
            }
            events += u64::from(queued.event);
            out.push(queued.bytes);
        }
        state.task_writing = !out.is_empty();
        Ok(events)
    }

    /// Offers frames from the fan-out thread: writes them straight to the socket when the
    /// client is idle and caught up, else queues them.
    pub(super) fn offer(&self, frames: &[Arc<Frame>], client_queue: usize) -> Offered {
        let mut state = self.state();
        if state.end.is_some() {
            return Offered::default();
        }
        let direct = !state.task_writing && state.queue.is_empty();
        match (&self.socket, direct) {
            (Some(socket), true) => Offered {
                written: self.write_direct(socket, &mut state, frames),
                dropped_as_slow: false,
            },
            _ => {
                for frame in frames {
                    if self.passes_filter(frame) {
                        state.queue.push_back(Queued {
                            bytes: frame.bytes.clone(),
                            id: frame.id,
                            event: frame.event_type.is_some(),
                        });
                    }
                }
                Offered {
                    written: 0,
                    dropped_as_slow: self.after_queueing(state, client_queue),
                }
            }
        }
    }

    fn passes_filter(&self, frame: &Frame) -> bool {
        frame.event_type.as_deref().is_none_or(|t| self.wants(t))
    }

    /// One non-blocking vectored write of the frames this client should get; the rest is
    /// queued for the client's task.
    fn write_direct(
        &self,
        socket: &TcpStream,
        state: &mut MutexGuard<'_, ClientState>,
        frames: &[Arc<Frame>],
    ) -> u64 {
        let mut chosen: [Option<&Frame>; MAX_BATCH] = [None; MAX_BATCH];
        let mut count = 0;
        for frame in frames.iter().take(MAX_BATCH) {
            if !self.passes_filter(frame) {
                continue;
            }
            if let Some(id) = frame.id {
                if state.last_sent.is_some_and(|last| id <= last) {
                    continue;
                }
                state.last_sent = Some(id);
            }
            chosen[count] = Some(frame);
            count += 1;
        }
        let chosen = &chosen[..count];
        if chosen.is_empty() {
            return 0;
        }
        let mut slices = [IoSlice::new(&[]); MAX_BATCH];
        let mut total = 0;
        for (slice, frame) in slices.iter_mut().zip(chosen.iter().flatten()) {
            *slice = IoSlice::new(&frame.bytes);
            total += frame.bytes.len();
        }
        // Straight to the descriptor, not through tokio's readiness bookkeeping: one less
        // shared cache line per client per event on the hot path. A stale "writable" flag
        // left behind only costs the client's task one extra `WouldBlock` later.
        let socket = socket2::SockRef::from(socket);
        let sent = if count == 1 {
            socket.send(&slices[0])
        } else {
            socket.send_vectored(&slices[..count])
        };
        let written = match sent {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(_) => {
                state.end = Some(End::ClientGone);
                self.closed.store(true, Ordering::Relaxed);
                self.wake.notify_one();
                return 0;
            }
        };
        let events_of = |frames: &[Option<&Frame>]| {
            frames
                .iter()
                .flatten()
                .filter(|f| f.event_type.is_some())
                .count() as u64
        };
        if written == total {
            return events_of(chosen);
        }
        // The socket is full: queue what it did not take (already de-duplicated).
        let mut skip = written;
        let mut delivered = 0;
        for frame in chosen.iter().flatten() {
            if skip >= frame.bytes.len() {
                skip -= frame.bytes.len();
                delivered += u64::from(frame.event_type.is_some());
                continue;
            }
            let mut bytes = frame.bytes.clone();
            bytes.advance(skip);
            skip = 0;
            state.queue.push_back(Queued {
                bytes,
                id: None,
                event: frame.event_type.is_some(),
            });
        }
        state.task_writing = true;
        self.wake.notify_one();
        delivered
    }

    /// Wakes the idle task, or drops the client if its queue is over the limit (returns
    /// whether it did).
    fn after_queueing(&self, mut state: MutexGuard<'_, ClientState>, client_queue: usize) -> bool {
        if state.queue.len() > client_queue {
            state.end = Some(End::Slow);
            state.queue.clear();
            drop(state);
            self.closed.store(true, Ordering::Relaxed);
            self.kill.cancel();
            self.wake.notify_one();
            true
        } else {
            if !state.task_writing {
                state.task_writing = true;
                drop(state);
                self.wake.notify_one();
            }
            false
        }
    }
}
