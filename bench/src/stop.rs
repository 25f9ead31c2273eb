//! A per-client stop signal that costs nothing on the hot path.
//!
//! A client polls its stop signal on every wake-up (once per delivered event). Shared tokio
//! primitives (`watch`, `Notify`) take a mutex shared with other clients on each re-poll,
//! so each client instead owns a tiny cell: an atomic flag plus its own (uncontended) waker
//! slot. The orchestrator keeps every client's cell and flips them all at the end.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

/// Stop flag for one client.
#[derive(Debug, Default)]
pub struct StopSignal {
    stopped: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl StopSignal {
    /// Asks the client to stop and wakes it.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        let waker = self
            .waker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Ready once [`stop`](Self::stop) was called; otherwise registers `cx`'s waker.
    pub fn poll_stopped(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.stopped.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        {
            let mut slot = self.waker.lock().unwrap_or_else(PoisonError::into_inner);
            match &*slot {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => *slot = Some(cx.waker().clone()),
            }
        }
        // Re-check: a stop between the first check and the registration took no waker.
        if self.stopped.load(Ordering::Acquire) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Waits until stopped.
    pub async fn stopped(&self) {
        std::future::poll_fn(|cx| self.poll_stopped(cx)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn wakes_a_waiting_task() {
        let s = Arc::new(StopSignal::default());
        let s2 = s.clone();
        let h = tokio::spawn(async move { s2.stopped().await });
        tokio::task::yield_now().await;
        s.stop();
        tokio::time::timeout(std::time::Duration::from_secs(5), h)
            .await
            .unwrap()
            .unwrap();
        // Already stopped: ready at once.
        s.stopped().await;
    }
}
