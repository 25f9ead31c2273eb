//! Streaming `text/event-stream` parser that keeps no line buffer.
//!
//! A client only needs, per message, the first `"seq":<u64>` and `"t":<u64>` found anywhere
//! in its `data:` lines. Buffering whole lines would cost up to one payload per client when a
//! read splits a line (19,000 clients x 64 KiB), so the parser is a byte-level state machine
//! whose whole state is a few words: where it is in the current line, and where it is in
//! matching a `"seq":` / `"t":` token. Long runs inside a data line (the pad string) are
//! skipped with `memchr` to the next `"`. Input may be split at any byte.
//!
//! `id:` lines are parsed too (for `--reconnect`): the id is kept as numbers, not as a
//! string, in the shapes the servers under test use — `<ms>-<seq>` (eventfabric, Redis stream
//! ids), `<time>:<tag>` (Nchan) or one number — see [`EventId`]. Following the SSE spec, an
//! `id` field sets the "last event ID buffer" and every dispatch (blank line) copies the
//! buffer into the last event id, which is what a reconnect sends as `Last-Event-ID`.
//!
//! Lines end at `\n` (a `\r` before it is ignored); a lone `\r` line terminator, which the
//! SSE spec also allows, is not supported — no server under test emits one.

use memchr::memchr;

/// One dispatched SSE message that had at least one `data` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SseEvent {
    /// First `"seq":<u64>` found in the data, if any.
    pub seq: Option<u64>,
    /// First `"t":<u64>` (publish time, unix microseconds) found in the data, if any.
    pub t: Option<u64>,
}

/// An SSE event id stored in a few words: `<a>`, or `<a><sep><b>` where `a` and `b` are
/// decimal `u64`s and `sep` is one byte other than a digit (`-` for eventfabric's
/// `<ms>-<seq>`, `:` for Nchan's `<time>:<tag>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EventId {
    /// No id (never set, or reset by an empty `id:` field).
    #[default]
    Empty,
    /// A single number.
    Num(u64),
    /// Two numbers and the separator byte between them.
    Pair(u64, u8, u64),
    /// An id of another shape (or too large); it cannot be replayed as `Last-Event-ID`.
    Unsupported,
}

impl EventId {
    /// Parses a complete id value (the part after `id:` and its optional single space).
    pub fn parse(value: &str) -> Self {
        let mut acc = IdAcc::default();
        for &b in value.as_bytes() {
            acc.push(b);
        }
        acc.finish().unwrap_or(EventId::Unsupported)
    }

    /// The id as sent in `Last-Event-ID`; `None` for [`Empty`](Self::Empty) and
    /// [`Unsupported`](Self::Unsupported).
    pub fn header_value(&self) -> Option<String> {
        match *self {
            EventId::Empty | EventId::Unsupported => None,
            EventId::Num(a) => Some(a.to_string()),
            EventId::Pair(a, sep, b) => Some(format!("{a}{}{b}", char::from(sep))),
        }
    }
}

/// Where an id value is being read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum IdPart {
    /// Nothing read yet (a single leading space is still allowed).
    #[default]
    Start,
    /// Nothing read yet, the leading space already consumed.
    AfterSpace,
    /// Reading the first number.
    First,
    /// After the separator, reading the second number (`digits` seen so far).
    Second(bool),
    /// The value is of another shape.
    Bad,
    /// The value contains a NUL byte: the spec says to ignore the whole field.
    Ignore,
}

/// Accumulates one `id:` value byte by byte (input may be split anywhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct IdAcc {
    part: IdPart,
    first: u64,
    sep: u8,
    second: u64,
}

impl IdAcc {
    /// Appends digits to `v`; `None` on overflow.
    fn digit(v: u64, b: u8) -> Option<u64> {
        v.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    }

    fn push(&mut self, b: u8) {
        if b == 0 {
            self.part = IdPart::Ignore;
            return;
        }
        self.part = match (self.part, b) {
            (IdPart::Ignore, _) => IdPart::Ignore,
            (IdPart::Bad, _) => IdPart::Bad,
            // A `\r` before the line's `\n` is part of the line ending, not of the value.
            (p, b'\r') => p,
            (IdPart::Start, b' ') => IdPart::AfterSpace,
            (IdPart::Start | IdPart::AfterSpace, b'0'..=b'9') => {
                self.first = u64::from(b - b'0');
                IdPart::First
            }
            (IdPart::First, b'0'..=b'9') => match Self::digit(self.first, b) {
                Some(v) => {
                    self.first = v;
                    IdPart::First
                }
                None => IdPart::Bad,
            },
            (IdPart::First, _) => {
                self.sep = b;
                IdPart::Second(false)
            }
            (IdPart::Second(_), b'0'..=b'9') => match Self::digit(self.second, b) {
                Some(v) => {
                    self.second = v;
                    IdPart::Second(true)
                }
                None => IdPart::Bad,
            },
            _ => IdPart::Bad,
        };
    }

    /// The id at the end of the line; `None` if the field is to be ignored (NUL).
    fn finish(self) -> Option<EventId> {
        Some(match self.part {
            IdPart::Ignore => return None,
            IdPart::Start | IdPart::AfterSpace => EventId::Empty,
            IdPart::First => EventId::Num(self.first),
            IdPart::Second(true) => EventId::Pair(self.first, self.sep, self.second),
            IdPart::Second(false) | IdPart::Bad => EventId::Unsupported,
        })
    }
}

/// Which of the two numeric fields a token is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Seq,
    T,
}

/// Position inside a `"seq":123` / `"t":123` token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// Not in a candidate token: skip to the next `"`.
    Idle,
    /// Just after a `"`.
    Quote,
    /// `"s`
    QS,
    /// `"se`
    QSe,
    /// `"seq`
    QSeq,
    /// `"t`
    QT,
    /// After the closing quote of a key, expecting `:`.
    AfterKey(Key),
    /// After the `:`, expecting digits.
    AfterColon(Key),
    /// Reading the number.
    Digits(Key, u64),
}

/// What kind of line the parser is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// At the start of a line; `n` bytes of it matched a prefix of `data:`.
    Start(u8),
    /// Inside the value of a `data:` line.
    Data,
    /// At the start of a line that so far matched this many bytes of `id`.
    IdName(u8),
    /// Inside the value of an `id:` line.
    Id(IdAcc),
    /// Inside any other line (comment, `id:`, `retry:`, ...), skipped.
    Skip,
}

const DATA_FIELD: &[u8; 5] = b"data:";

/// Incremental SSE parser; feed it body bytes, it calls back once per message.
#[derive(Debug, Clone)]
pub struct SseParser {
    line: Line,
    scan: Scan,
    current: SseEvent,
    has_data: bool,
    /// The spec's "last event ID buffer": set by `id` fields.
    id_buf: EventId,
    /// The last event id: the buffer as of the last dispatch.
    last_id: EventId,
}

impl Default for SseParser {
    fn default() -> Self {
        Self::with_last_id(EventId::Empty)
    }
}

impl SseParser {
    /// A parser for a new connection that resumes after `id`. Browsers seed a reconnected
    /// stream's id buffer with the last event id, so a message without an `id` field does
    /// not reset it.
    pub fn with_last_id(id: EventId) -> Self {
        Self {
            line: Line::Start(0),
            scan: Scan::Idle,
            current: SseEvent::default(),
            has_data: false,
            id_buf: id,
            last_id: id,
        }
    }

    /// The last event id (as of the last dispatched message).
    pub fn last_id(&self) -> EventId {
        self.last_id
    }

    /// Parses `input`, calling `on_event` for every message completed by a blank line.
    pub fn feed(&mut self, input: &[u8], on_event: &mut impl FnMut(SseEvent)) {
        let mut i = 0;
        while i < input.len() {
            match self.line {
                Line::Start(matched) => {
                    let b = input[i];
                    i += 1;
                    self.start_byte(matched, b, on_event);
                }
                Line::Data => {
                    let rest = &input[i..];
                    match memchr(b'\n', rest) {
                        Some(n) => {
                            self.scan_value(&rest[..n]);
                            self.end_data_line();
                            i += n + 1;
                        }
                        None => {
                            self.scan_value(rest);
                            i = input.len();
                        }
                    }
                }
                Line::IdName(matched) => {
                    let b = input[i];
                    i += 1;
                    self.line = match (matched, b) {
                        (1, b'd') => Line::IdName(2),
                        (2, b':') => Line::Id(IdAcc::default()),
                        (_, b'\r') => Line::IdName(matched),
                        // A bare `id` line is an `id` field with an empty value.
                        (2, b'\n') => {
                            self.id_buf = EventId::Empty;
                            Line::Start(0)
                        }
                        (_, b'\n') => Line::Start(0),
                        _ => Line::Skip,
                    };
                }
                Line::Id(mut acc) => {
                    let b = input[i];
                    i += 1;
                    if b == b'\n' {
                        if let Some(id) = acc.finish() {
                            self.id_buf = id;
                        }
                        self.line = Line::Start(0);
                    } else {
                        acc.push(b);
                        self.line = Line::Id(acc);
                    }
                }
                Line::Skip => match memchr(b'\n', &input[i..]) {
                    Some(n) => {
                        self.line = Line::Start(0);
                        i += n + 1;
                    }
                    None => i = input.len(),
                },
            }
        }
    }

    /// Handles one byte at the start of a line, deciding which kind of line it is.
    fn start_byte(&mut self, matched: u8, b: u8, on_event: &mut impl FnMut(SseEvent)) {
        match b {
            b'\n' => {
                match matched {
                    // Blank line: dispatch (the last event id is set even without data),
                    // and report the message if it had data.
                    0 => {
                        self.last_id = self.id_buf;
                        if std::mem::take(&mut self.has_data) {
                            on_event(std::mem::take(&mut self.current));
                        }
                        self.current = SseEvent::default();
                    }
                    // A bare `data` line is a data line with an empty value.
                    4 => self.has_data = true,
                    _ => {}
                }
                self.line = Line::Start(0);
            }
            b'\r' => {}
            b'i' if matched == 0 => self.line = Line::IdName(1),
            _ if b == DATA_FIELD[matched as usize] => {
                self.line = if matched == 4 {
                    self.has_data = true;
                    self.scan = Scan::Idle;
                    Line::Data
                } else {
                    Line::Start(matched + 1)
                };
            }
            _ => self.line = Line::Skip,
        }
    }

    /// Ends a data line: a number running to the line end is complete.
    fn end_data_line(&mut self) {
        if let Scan::Digits(key, v) = self.scan {
            self.found(key, v);
        }
        self.scan = Scan::Idle;
        self.line = Line::Start(0);
    }

    /// Runs the token matcher over part of a data line's value.
    fn scan_value(&mut self, bytes: &[u8]) {
        let mut i = 0;
        while i < bytes.len() {
            if self.scan == Scan::Idle {
                match memchr(b'"', &bytes[i..]) {
                    Some(n) => {
                        i += n + 1;
                        self.scan = Scan::Quote;
                        continue;
                    }
                    None => return,
                }
            }
            let b = bytes[i];
            i += 1;
            self.scan = self.next_scan(b);
        }
    }

    /// One step of the token matcher (never called in `Idle`).
    fn next_scan(&mut self, b: u8) -> Scan {
        let restart = if b == b'"' { Scan::Quote } else { Scan::Idle };
        match (self.scan, b) {
            (Scan::Quote, b's') => Scan::QS,
            (Scan::Quote, b't') => Scan::QT,
            (Scan::QS, b'e') => Scan::QSe,
            (Scan::QSe, b'q') => Scan::QSeq,
            (Scan::QSeq, b'"') => Scan::AfterKey(Key::Seq),
            (Scan::QT, b'"') => Scan::AfterKey(Key::T),
            (Scan::AfterKey(k), b':') => Scan::AfterColon(k),
            (s @ (Scan::AfterKey(_) | Scan::AfterColon(_)), b' ' | b'\t') => s,
            (Scan::AfterColon(k), b'0'..=b'9') => Scan::Digits(k, u64::from(b - b'0')),
            (Scan::Digits(k, v), b'0'..=b'9') => v
                .checked_mul(10)
                .and_then(|v| v.checked_add(u64::from(b - b'0')))
                .map_or(Scan::Idle, |v| Scan::Digits(k, v)),
            (Scan::Digits(k, v), _) => {
                self.found(k, v);
                restart
            }
            _ => restart,
        }
    }

    /// Records a complete number; the first occurrence in a message wins.
    fn found(&mut self, key: Key, v: u64) {
        let slot = match key {
            Key::Seq => &mut self.current.seq,
            Key::T => &mut self.current.t,
        };
        slot.get_or_insert(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        for c in chunks {
            p.feed(c, &mut |e| out.push(e));
        }
        out
    }

    const STREAM: &[u8] = b"retry: 5000\n\n\
: heartbeat\n\n\
id: 1-0\r\ndata: {\"type\":\"bench\",\"data\":{\"pad\":\"xx\\\"seq\\\":9\",\"seq\":1,\"t\":1700000000000001},\"id\":\"1-0\",\"ts\":17}\r\n\r\n\
id: 2-0\ndata: {\"seq\":2,\"t\": 42}\n\n\
data: {\"type\":\"history_truncated\",\"data\":{}}\n\n\
data:{\"seq\" : 3,\ndata: \"t\":7}\n\n\
data\n\n\
event: x\nid: 9\n\n\
data: {\"seq\":18446744073709551615,\"t\":99999999999999999999,\"sequence\":5,\"tt\":6}\n\n";

    fn expected() -> Vec<SseEvent> {
        vec![
            SseEvent {
                seq: Some(1),
                t: Some(1_700_000_000_000_001),
            },
            SseEvent {
                seq: Some(2),
                t: Some(42),
            },
            SseEvent { seq: None, t: None },
            SseEvent {
                seq: Some(3),
                t: Some(7),
            },
            SseEvent { seq: None, t: None },
            SseEvent {
                seq: Some(u64::MAX),
                t: None,
            },
        ]
    }

    #[test]
    fn parses_whole_stream() {
        assert_eq!(parse_all(&[STREAM]), expected());
    }

    #[test]
    fn parses_stream_split_at_every_position() {
        for a in 0..=STREAM.len() {
            let (x, y) = STREAM.split_at(a);
            assert_eq!(parse_all(&[x, y]), expected(), "split at {a}");
        }
    }

    #[test]
    fn parses_stream_split_in_three_everywhere() {
        for a in 0..=STREAM.len() {
            for b in a..=STREAM.len() {
                let got = parse_all(&[&STREAM[..a], &STREAM[a..b], &STREAM[b..]]);
                assert_eq!(got, expected(), "split at {a},{b}");
            }
        }
    }

    #[test]
    fn parses_byte_by_byte() {
        let chunks: Vec<&[u8]> = STREAM.chunks(1).collect();
        assert_eq!(parse_all(&chunks), expected());
    }

    #[test]
    fn incomplete_message_is_not_dispatched() {
        assert!(parse_all(&[b"data: {\"seq\":1,\"t\":2}\n"]).is_empty());
    }
}

#[cfg(test)]
mod id_tests {
    use super::*;

    #[test]
    fn parses_id_values() {
        assert_eq!(
            EventId::parse("1700000000000-5"),
            EventId::Pair(1_700_000_000_000, b'-', 5)
        );
        assert_eq!(
            EventId::parse("1545327011:0"),
            EventId::Pair(1_545_327_011, b':', 0)
        );
        assert_eq!(EventId::parse("42"), EventId::Num(42));
        assert_eq!(EventId::parse(" 42"), EventId::Num(42));
        assert_eq!(EventId::parse(""), EventId::Empty);
        assert_eq!(
            EventId::parse("18446744073709551615-18446744073709551615"),
            EventId::Pair(u64::MAX, b'-', u64::MAX)
        );
        for bad in [
            "abc",
            "1-2-3",
            "1-",
            "-1",
            "18446744073709551616-0",
            "1-18446744073709551616",
            "  1",
            "1:[0]",
        ] {
            assert_eq!(EventId::parse(bad), EventId::Unsupported, "{bad:?}");
        }
    }

    #[test]
    fn id_header_values_round_trip() {
        for v in ["1700000000000-5", "1545327011:0", "7"] {
            let id = EventId::parse(v);
            assert_eq!(id.header_value().as_deref(), Some(v));
        }
        assert_eq!(EventId::Empty.header_value(), None);
        assert_eq!(EventId::Unsupported.header_value(), None);
    }

    /// (bytes to feed, last id expected after them)
    const STEPS: &[(&[u8], EventId)] = &[
        (b"retry: 5000\n\n", EventId::Empty),
        (b"id: 5-1\ndata: {\"seq\":1}\n\n", EventId::Pair(5, b'-', 1)),
        // No id field: the buffer keeps the previous id.
        (b"data: {\"seq\":2}\n\n", EventId::Pair(5, b'-', 1)),
        (b": heartbeat\n\n", EventId::Pair(5, b'-', 1)),
        // Not dispatched yet: the last id does not move.
        (b"id: 7-0\r\ndata: x\r\n", EventId::Pair(5, b'-', 1)),
        (b"\r\n", EventId::Pair(7, b'-', 0)),
        // Fields that only look like `id`.
        (b"idx: 3\ni: 4\nid 5\n\n", EventId::Pair(7, b'-', 0)),
        // A NUL makes the field ignored.
        (b"id: 1\x002\n\n", EventId::Pair(7, b'-', 0)),
        // Set by an id-only message (no data) too.
        (
            b"id:1545327011:12\n\n",
            EventId::Pair(1_545_327_011, b':', 12),
        ),
        (b"id: what\n\n", EventId::Unsupported),
        (b"id: 9\n\n", EventId::Num(9)),
        // A bare `id` line or an empty value resets it.
        (b"id\n\n", EventId::Empty),
        (b"id: 3-3\n\n", EventId::Pair(3, b'-', 3)),
        (b"id:\n\n", EventId::Empty),
    ];

    fn all_bytes() -> Vec<u8> {
        STEPS.iter().flat_map(|(b, _)| b.iter().copied()).collect()
    }

    #[test]
    fn tracks_last_id_per_dispatch() {
        let mut p = SseParser::default();
        let mut seqs = Vec::new();
        for (bytes, want) in STEPS {
            p.feed(bytes, &mut |e| seqs.push(e.seq));
            assert_eq!(
                p.last_id(),
                *want,
                "after {:?}",
                String::from_utf8_lossy(bytes)
            );
        }
        assert_eq!(seqs, vec![Some(1), Some(2), None]);
    }

    #[test]
    fn last_id_survives_any_split() {
        let wire = all_bytes();
        let final_id = STEPS.last().unwrap().1;
        for a in 0..=wire.len() {
            for b in a..=wire.len() {
                let mut p = SseParser::default();
                let mut n = 0;
                for part in [&wire[..a], &wire[a..b], &wire[b..]] {
                    p.feed(part, &mut |_| n += 1);
                }
                assert_eq!((p.last_id(), n), (final_id, 3), "split {a},{b}");
            }
        }
    }

    #[test]
    fn seeded_parser_keeps_the_id_until_the_server_sends_one() {
        let mut p = SseParser::with_last_id(EventId::Pair(10, b'-', 2));
        p.feed(b"retry: 100\n\ndata: {\"seq\":3}\n\n", &mut |_| {});
        assert_eq!(p.last_id(), EventId::Pair(10, b'-', 2));
        p.feed(b"id: 11-0\ndata: {}\n\n", &mut |_| {});
        assert_eq!(p.last_id(), EventId::Pair(11, b'-', 0));
    }
}
