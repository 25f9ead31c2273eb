//! Serving a stream straight on the TCP socket once its request head has been read.
//!
//! The response is a fixed head with `Connection: close` (the body ends when the
//! connection does, which is valid HTTP/1.1 and passes through proxies). This task writes
//! the head, the replayed history and whatever the client's queue holds, in vectored
//! writes; events for a caught-up client are written by the hub's fan-out thread instead.
//! Per connection this keeps only the socket, the session and a small batch vector: no
//! HTTP library buffers.

use std::io::{self, IoSlice};
use std::sync::Arc;

use bytes::{Buf, Bytes};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::contract::{self, Refusal};
use super::{Session, StreamParams};
use crate::hub::{End, MAX_BATCH};
use crate::state::AppState;
use crate::telemetry::RateLimit;

/// A batch vector that grew past this many slots is released after the write, so a burst
/// does not leave every client holding a large allocation.
const KEEP_BATCH_CAPACITY: usize = 4;

/// How long the final `retry:` hint or a refusal may take to write.
const FAREWELL_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(200);

/// Serves one stream on `stream`, whose request head has already been consumed.
pub(crate) async fn serve_raw(stream: TcpStream, params: StreamParams, state: AppState) {
    let peer = stream.peer_addr().ok().map(|addr| addr.ip());
    let mut params = params;
    // Boxed: checking a token may fetch a key set, a large future this task would
    // otherwise carry for the stream's whole life.
    let admitted = match Box::pin(contract::admit(&state, peer, &mut params)).await {
        Ok(admitted) => admitted,
        Err(refusal) => {
            refuse(stream, refusal).await;
            return;
        }
    };
    let preamble = contract::raw_preamble_for(&state, params.origin.take().as_deref());
    let socket = Arc::new(stream);
    let mut session = Session::open(
        &state,
        params,
        Some(Arc::clone(&socket)),
        CancellationToken::new(),
        admitted,
    );
    let mut batch = vec![preamble];
    let mut events = 0;
    let end = loop {
        let written = tokio::select! {
            biased;
            _ = state.shutdown.cancelled() => Err(End::Shutdown),
            end = session.ended() => Err(end),
            written = write_batch(&socket, &mut batch) => written.map_err(|_| End::ClientGone),
        };
        if let Err(end) = written {
            break end;
        }
        state.metrics.events_delivered.inc_by(events);
        batch.clear();
        if batch.capacity() > KEEP_BATCH_CAPACITY {
            batch = Vec::new();
        }
        let next = tokio::select! {
            next = session.next_batch(&mut batch) => next,
            () = closed_by_peer(&socket) => Err(End::ClientGone),
        };
        events = match next {
            Ok(events) => events,
            Err(end) => break end,
        };
    };
    if end == End::Slow {
        // A client that stops reading decides this: at most one line a second (the
        // slow-client counter in /metrics has the exact figure).
        static LOG: RateLimit = RateLimit::per_second();
        if let Some(suppressed) = LOG.allow() {
            tracing::debug!(suppressed, "disconnected a client that fell behind");
        }
    }
    drop(session);
    if let Some(hint) = contract::farewell(end, state.config.retry_ms) {
        let _ = tokio::time::timeout(FAREWELL_TIMEOUT, write_batch(&socket, &mut [hint])).await;
    }
    // The fan-out thread may hold the socket a moment longer; end the connection now.
    let _ = socket2::SockRef::from(&*socket).shutdown(std::net::Shutdown::Both);
}

/// Answers a request that may not open a stream, then closes the connection.
async fn refuse(mut stream: TcpStream, refusal: Refusal) {
    let answer = async {
        stream.write_all(&refusal.to_raw()).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(FAREWELL_TIMEOUT, answer).await;
}

/// Resolves when the client closes its side. Bytes it sends are read and ignored.
async fn closed_by_peer(stream: &TcpStream) {
    let mut scratch = [0u8; 32];
    loop {
        if stream.readable().await.is_err() {
            return;
        }
        match stream.try_read(&mut scratch) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => return,
        }
    }
}

/// Writes every frame of `batch`, using vectored writes; frames are consumed as written.
async fn write_batch(stream: &TcpStream, batch: &mut [Bytes]) -> io::Result<()> {
    let mut start = 0;
    while start < batch.len() {
        let result = {
            let mut slices = [IoSlice::new(&[]); MAX_BATCH];
            let count = (batch.len() - start).min(MAX_BATCH);
            for (slice, frame) in slices.iter_mut().zip(&batch[start..start + count]) {
                *slice = IoSlice::new(frame);
            }
            stream.try_write_vectored(&slices[..count])
        };
        match result {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(mut written) => {
                while written > 0 {
                    let frame = &mut batch[start];
                    if written >= frame.len() {
                        written -= frame.len();
                        start += 1;
                    } else {
                        frame.advance(written);
                        written = 0;
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => stream.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod size_tests {
    use crate::stream::Session;

    /// Every idle client holds one of these futures for its whole life, so its size is
    /// most of the per-connection memory budget (2 KB); keep large futures boxed.
    #[tokio::test]
    async fn an_idle_stream_task_stays_small() {
        let gateway = crate::Gateway::build(crate::Config::default_for_tests())
            .await
            .unwrap();
        let state = gateway.state().clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let serving = super::serve_raw(stream, Default::default(), state.clone());
        assert!(
            std::mem::size_of_val(&serving) <= 1024,
            "{}",
            std::mem::size_of_val(&serving)
        );
        let mut session = Session::open(
            &state,
            Default::default(),
            None,
            Default::default(),
            crate::stream::contract::Admitted {
                address: None,
                expires: Some(std::time::SystemTime::now() + std::time::Duration::from_secs(60)),
            },
        );
        let mut out = Vec::new();
        let waiting = session.next_batch(&mut out);
        assert!(
            std::mem::size_of_val(&waiting) <= 512,
            "{}",
            std::mem::size_of_val(&waiting)
        );
    }
}
