//! Server-Sent Events wire format: turns ids, JSON payloads and control hints into the
//! exact bytes written to clients.
//!
//! This is the one place an event becomes bytes: both brokers build every [`Frame`] with
//! [`Frame::event`], whether the event was just published, read back from a stream or
//! received from a channel. Every frame is encoded once and shared by all clients as
//! [`Bytes`], so the fan-out path never formats anything per client.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::value::RawValue;

use crate::event::{self, EventId};

/// One encoded SSE frame, shared by every client that receives it.
#[derive(Debug)]
pub(crate) struct Frame {
    /// The event id, for events that can be replayed; `None` for heartbeats, notices and
    /// fire-and-forget events that were never stored.
    pub id: Option<EventId>,
    /// The event type, used by per-client type filters; `None` for control frames.
    pub event_type: Option<Box<str>>,
    /// The bytes written to the socket.
    pub bytes: Bytes,
}

impl Frame {
    /// Encodes an event: the JSON envelope clients parse, framed as one SSE message.
    /// `event_type` must have passed [`event::validate_type`]; `ts` is its time in Unix ms.
    pub fn event(event_type: &str, data: &RawValue, id: Option<EventId>, ts: u64) -> Arc<Self> {
        let json = event::envelope_json(event_type, data, id, ts);
        Arc::new(Self {
            id,
            event_type: Some(event_type.into()),
            bytes: message(id, &json),
        })
    }

    /// Wraps a control frame (heartbeat, notice) that every client gets, filters aside.
    pub fn control(bytes: Bytes) -> Arc<Self> {
        Arc::new(Self {
            id: None,
            event_type: None,
            bytes,
        })
    }

    /// A frame with arbitrary bytes, for tests of the machinery that moves frames.
    #[cfg(test)]
    pub fn with_bytes(id: Option<EventId>, event_type: &str, bytes: Bytes) -> Arc<Self> {
        Arc::new(Self {
            id,
            event_type: Some(event_type.into()),
            bytes,
        })
    }
}

/// The shared heartbeat comment, sent on one tick to every client.
pub const HEARTBEAT: &[u8] = b": heartbeat\n\n";

/// Encodes one message: an optional `id:` line and one `data:` line per line of `data`.
///
/// Line breaks inside `data` (`\n`, `\r\n` or a lone `\r`) each start a new `data:` line,
/// which is how the SSE format carries multi-line payloads; the browser joins them with
/// `\n`. No `event:` field is written, so `EventSource.onmessage` receives every frame.
pub fn message(id: Option<EventId>, data: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(data.len() + 40);
    if let Some(id) = id {
        out.put_slice(b"id: ");
        out.put_slice(id.to_string().as_bytes());
        out.put_u8(b'\n');
    }
    for line in split_lines(data) {
        out.put_slice(b"data: ");
        out.put_slice(line.as_bytes());
        out.put_u8(b'\n');
    }
    out.put_u8(b'\n');
    out.freeze()
}

/// Encodes a reconnection-delay hint (`retry: <ms>`).
pub fn retry(ms: u64) -> Bytes {
    Bytes::from(format!("retry: {ms}\n\n"))
}

/// The message telling a client that events after `last_event_id` are no longer kept, so
/// it should reload current state. It carries no `id:`, so the client's position is kept.
pub fn history_truncated(last_event_id: EventId) -> Bytes {
    let json = format!(
        r#"{{"type":"history_truncated","data":{{"last_event_id":"{last_event_id}","reason":"events after this id are no longer retained; reload current state"}},"ts":{}}}"#,
        crate::event::unix_ms()
    );
    message(None, &json)
}

/// Splits on `\r\n`, `\n` and `\r`, as the SSE parser does; always yields at least one line.
fn split_lines(data: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(data);
    std::iter::from_fn(move || {
        let text = rest?;
        match text.find(['\r', '\n']) {
            Some(at) => {
                let skip = if text[at..].starts_with("\r\n") { 2 } else { 1 };
                rest = Some(&text[at + skip..]);
                Some(&text[..at])
            }
            None => {
                rest = None;
                Some(text)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_has_id_and_data_and_no_event_field() {
        let frame = message(Some(EventId::new(17, 3)), r#"{"type":"a"}"#);
        assert_eq!(&frame[..], b"id: 17-3\ndata: {\"type\":\"a\"}\n\n");
    }

    #[test]
    fn message_without_id_has_only_data() {
        assert_eq!(&message(None, "x")[..], b"data: x\n\n");
    }

    #[test]
    fn every_kind_of_line_break_starts_a_new_data_line() {
        let frame = message(None, "a\nb\r\nc\rd");
        assert_eq!(&frame[..], b"data: a\ndata: b\ndata: c\ndata: d\n\n");
    }

    #[test]
    fn trailing_and_empty_lines_are_kept() {
        assert_eq!(&message(None, "a\n")[..], b"data: a\ndata: \n\n");
        assert_eq!(&message(None, "")[..], b"data: \n\n");
    }

    #[test]
    fn retry_hint_is_a_field_of_its_own() {
        assert_eq!(&retry(5000)[..], b"retry: 5000\n\n");
    }
}
