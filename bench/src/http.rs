//! Raw HTTP/1.1 response framing: the response head and the chunked transfer coding.
//!
//! Both work on byte slices handed in by the caller, so a client keeps no buffer of its own
//! once its head is parsed: the chunked decoder is a small state machine that hands back
//! sub-slices of its input, and a chunk may be split across reads at any byte.

use anyhow::{anyhow, bail};

/// Largest response head accepted (status line plus headers).
pub const MAX_HEAD: usize = 16 * 1024;

/// How the end of a response body is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// `Content-Length: n`.
    Length(u64),
    /// Neither: the body runs until the server closes the connection.
    UntilClose,
}

/// The parts of a response head the generator cares about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHead {
    /// Status code.
    pub status: u16,
    /// Body framing.
    pub body: BodyKind,
    /// Whether the server said `Connection: close`.
    pub close: bool,
    /// Bytes taken by the head including the final blank line.
    pub len: usize,
}

/// Parses a response head at the start of `buf`; `Ok(None)` means "need more bytes".
pub fn parse_response_head(buf: &[u8]) -> anyhow::Result<Option<ResponseHead>> {
    let Some(end) = memchr::memmem::find(buf, b"\r\n\r\n") else {
        if buf.len() > MAX_HEAD {
            bail!("response head larger than {MAX_HEAD} bytes");
        }
        return Ok(None);
    };
    let text = std::str::from_utf8(&buf[..end]).map_err(|_| anyhow!("non-UTF-8 head"))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        bail!("not an HTTP/1.x response: {status_line:?}");
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line {status_line:?}"))?;
    let mut body = BodyKind::UntilClose;
    let mut close = version == "HTTP/1.0";
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            bail!("bad header line {line:?}");
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            if value.to_ascii_lowercase().contains("chunked") {
                body = BodyKind::Chunked;
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            if body != BodyKind::Chunked {
                body = BodyKind::Length(value.parse().map_err(|_| anyhow!("bad content-length"))?);
            }
        } else if name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        }
    }
    // Responses that never carry a body, whatever the headers say.
    if status == 204 || status == 304 || (100..200).contains(&status) {
        body = BodyKind::Length(0);
    }
    Ok(Some(ResponseHead {
        status,
        body,
        close,
        len: end + 4,
    }))
}

/// Where the chunked decoder is inside the coding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Reading hex digits of a chunk size.
    Size,
    /// Skipping a chunk extension (`;name=value`) up to the line end.
    Ext,
    /// Saw `\r` after the size line, expecting `\n`.
    SizeLf,
    /// Inside chunk data, with this many bytes still to come.
    Data(u64),
    /// Expecting the `\r` after chunk data.
    DataCr,
    /// Expecting the `\n` after chunk data.
    DataLf,
    /// At the start of a trailer line (after the last, zero-size chunk).
    TrailerStart,
    /// Inside a trailer header line.
    TrailerLine,
    /// Saw `\r` on an empty trailer line, expecting the final `\n`.
    TrailerLf,
    /// The terminating empty line was read; the body is complete.
    Done,
}

/// Incremental decoder for `Transfer-Encoding: chunked`.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: ChunkState,
    size: u64,
    digits: u8,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self {
            state: ChunkState::Size,
            size: 0,
            digits: 0,
        }
    }
}

impl ChunkedDecoder {
    /// True once the terminating zero-size chunk and trailer were read.
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Decodes `input`, handing each run of body bytes to `out`. Returns how many bytes of
    /// `input` belong to this body; it is less than `input.len()` only once done (the rest
    /// is the next response on a keep-alive connection).
    pub fn feed<'a>(
        &mut self,
        input: &'a [u8],
        out: &mut impl FnMut(&'a [u8]),
    ) -> anyhow::Result<usize> {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                ChunkState::Done => break,
                ChunkState::Data(remaining) => {
                    let avail = (input.len() - i) as u64;
                    let take = remaining.min(avail) as usize;
                    out(&input[i..i + take]);
                    i += take;
                    let left = remaining - take as u64;
                    self.state = if left == 0 {
                        ChunkState::DataCr
                    } else {
                        ChunkState::Data(left)
                    };
                }
                _ => {
                    self.step(input[i])?;
                    i += 1;
                }
            }
        }
        Ok(i)
    }

    /// Advances the framing state by one byte outside chunk data.
    fn step(&mut self, b: u8) -> anyhow::Result<()> {
        use ChunkState::*;
        self.state = match (self.state, b) {
            (Size, b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F') => {
                let d = (b as char).to_digit(16).unwrap_or(0) as u64;
                self.digits += 1;
                if self.digits > 15 {
                    bail!("chunk size too large");
                }
                self.size = self.size * 16 + d;
                Size
            }
            (Size, b';' | b' ' | b'\t') => Ext,
            (Size | Ext, b'\r') => SizeLf,
            (Size | Ext | SizeLf, b'\n') => self.end_size_line()?,
            (Ext, _) => Ext,
            (DataCr, b'\r') => DataLf,
            (DataCr | DataLf, b'\n') => Size,
            (TrailerStart, b'\r') => TrailerLf,
            (TrailerStart | TrailerLf, b'\n') => Done,
            (TrailerLine, b'\n') => TrailerStart,
            (TrailerStart | TrailerLine, _) => TrailerLine,
            (state, b) => bail!("bad chunked framing: byte {b:#04x} in state {state:?}"),
        };
        Ok(())
    }

    /// Finishes a chunk-size line: the next state is chunk data or, for size 0, the trailer.
    fn end_size_line(&mut self) -> anyhow::Result<ChunkState> {
        if self.digits == 0 {
            bail!("empty chunk size");
        }
        let size = std::mem::take(&mut self.size);
        self.digits = 0;
        Ok(if size == 0 {
            ChunkState::TrailerStart
        } else {
            ChunkState::Data(size)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_split(input: &[u8], split: usize) -> (Vec<u8>, usize, bool) {
        let mut dec = ChunkedDecoder::default();
        let mut body = Vec::new();
        let (a, b) = input.split_at(split);
        let mut used = dec.feed(a, &mut |s| body.extend_from_slice(s)).unwrap();
        if used == a.len() {
            used += dec.feed(b, &mut |s| body.extend_from_slice(s)).unwrap();
        }
        (body, used, dec.is_done())
    }

    #[test]
    fn decodes_chunks_split_at_every_byte() {
        let wire =
            b"5;ext=1\r\nhello\r\n1A\r\n abcdefghijklmnopqrstuvwxy\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        for split in 0..=wire.len() {
            let (body, used, done) = decode_split(wire, split);
            assert_eq!(body, b"hello abcdefghijklmnopqrstuvwxy", "split {split}");
            assert!(done);
            assert_eq!(&wire[used..], b"NEXT", "split {split}");
        }
    }

    #[test]
    fn decodes_byte_by_byte_and_tolerates_bare_lf() {
        let wire = b"3\nabc\n0\n\n";
        let mut dec = ChunkedDecoder::default();
        let mut body = Vec::new();
        for b in wire.chunks(1) {
            dec.feed(b, &mut |s| body.extend_from_slice(s)).unwrap();
        }
        assert_eq!(body, b"abc");
        assert!(dec.is_done());
    }

    #[test]
    fn rejects_bad_framing() {
        let mut dec = ChunkedDecoder::default();
        assert!(dec.feed(b"zz\r\n", &mut |_| {}).is_err());
        let mut dec = ChunkedDecoder::default();
        assert!(dec.feed(b"2\r\nabX", &mut |_| {}).is_err());
    }

    #[test]
    fn parses_heads() {
        let wire: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\nbody";
        let h = parse_response_head(wire).unwrap().unwrap();
        assert_eq!((h.status, h.body, h.close), (200, BodyKind::Chunked, false));
        assert_eq!(&wire[h.len..], b"body");

        let h = parse_response_head(
            b"HTTP/1.1 202 Accepted\r\ncontent-length: 12\r\nconnection: close\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (h.status, h.body, h.close),
            (202, BodyKind::Length(12), true)
        );

        let h = parse_response_head(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.body, BodyKind::UntilClose);

        assert!(
            parse_response_head(b"HTTP/1.1 200 OK\r\nA: b\r\n")
                .unwrap()
                .is_none()
        );
        assert!(parse_response_head(b"SSH-2.0-x\r\n\r\n").is_err());
    }
}
