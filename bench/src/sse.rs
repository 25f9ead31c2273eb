//! Streaming `text/event-stream` parser that keeps no line buffer.
//!
//! A client only needs, per message, the first `"seq":<u64>` and `"t":<u64>` found anywhere
//! in its `data:` lines. Buffering whole lines would cost up to one payload per client when a
//! read splits a line (19,000 clients x 64 KiB), so the parser is a byte-level state machine
//! whose whole state is a few words: where it is in the current line, and where it is in
//! matching a `"seq":` / `"t":` token. Long runs inside a data line (the pad string) are
//! skipped with `memchr` to the next `"`. Input may be split at any byte.
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
}

impl Default for SseParser {
    fn default() -> Self {
        Self {
            line: Line::Start(0),
            scan: Scan::Idle,
            current: SseEvent::default(),
            has_data: false,
        }
    }
}

impl SseParser {
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
                    // Blank line: dispatch the message if it had data.
                    0 => {
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
