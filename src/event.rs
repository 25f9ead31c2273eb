//! Event ids, event types and the JSON envelope every client receives.
//!
//! Ids have the shape of Redis stream ids (`<unix ms>-<seq>`) in both brokers, so a client
//! can resume with the same `Last-Event-ID` whichever backend or replica serves it.

use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::value::RawValue;

/// Longest accepted event type, in bytes.
pub const MAX_TYPE_LEN: usize = 128;

/// Longest idempotency key accepted, in bytes.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 200;

/// Position of an event in the shared history, ordered like a Redis stream id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct EventId {
    /// Milliseconds since the Unix epoch when the event was stored.
    pub ms: u64,
    /// Sequence number within that millisecond.
    pub seq: u64,
}

impl EventId {
    /// Builds an id from its two parts.
    pub const fn new(ms: u64, seq: u64) -> Self {
        Self { ms, seq }
    }

    /// The smallest id that is strictly greater than `self`.
    pub fn successor(self) -> Self {
        match self.seq.checked_add(1) {
            Some(seq) => Self::new(self.ms, seq),
            None => Self::new(self.ms.saturating_add(1), 0),
        }
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// Why a string is not an [`EventId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("event ids look like <ms>-<seq>, both decimal integers")]
pub struct InvalidEventId;

impl FromStr for EventId {
    type Err = InvalidEventId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ms, seq) = s.trim().split_once('-').ok_or(InvalidEventId)?;
        let digits = |part: &str| -> Result<u64, InvalidEventId> {
            if part.is_empty() || part.len() > 20 || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(InvalidEventId);
            }
            part.parse().map_err(|_| InvalidEventId)
        };
        Ok(Self::new(digits(ms)?, digits(seq)?))
    }
}

/// Hands out strictly increasing ids from the wall clock, the way `XADD *` does.
#[derive(Debug, Default)]
pub struct IdGenerator {
    last: EventId,
}

impl IdGenerator {
    /// Next id: the current millisecond, or one past the last id if the clock stood still
    /// or went backwards.
    pub fn next_id(&mut self) -> EventId {
        let now = unix_ms();
        let id = if now > self.last.ms {
            EventId::new(now, 0)
        } else {
            self.last.successor()
        };
        self.last = id;
        id
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Why a string is not an acceptable event type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidEventType {
    /// The type is the empty string.
    #[error("`type` must not be empty")]
    Empty,
    /// The type is longer than [`MAX_TYPE_LEN`].
    #[error("`type` is longer than {MAX_TYPE_LEN} characters")]
    TooLong,
    /// The type contains a character outside the allowed set.
    #[error("`type` may contain only letters, digits, '_', '.', ':' and '-'")]
    BadCharacter,
}

/// Checks an event type: 1 to 128 characters from `[A-Za-z0-9_.:-]`.
pub fn validate_type(event_type: &str) -> Result<(), InvalidEventType> {
    if event_type.is_empty() {
        return Err(InvalidEventType::Empty);
    }
    if event_type.len() > MAX_TYPE_LEN {
        return Err(InvalidEventType::TooLong);
    }
    let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-');
    if !event_type.bytes().all(allowed) {
        return Err(InvalidEventType::BadCharacter);
    }
    Ok(())
}

/// Deepest nesting of arrays and objects accepted in `data` (`[[1]]` is 2 deep). Well below
/// the 1000 levels at which Redis's `cjson` decoder refuses an event, so what the gateway
/// accepts the Redis function accepts too; and with the envelope's one level on top, still
/// within the 127 levels serde_json's default limit lets a Rust client parse.
pub const MAX_DATA_DEPTH: usize = 100;

/// Why an event's `data` is refused although it parses as JSON.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidEventData {
    /// Arrays and objects nest deeper than [`MAX_DATA_DEPTH`].
    #[error("`data` nests arrays and objects deeper than {MAX_DATA_DEPTH} levels")]
    TooDeep,
    /// A `\uXXXX` escape names half of a UTF-16 surrogate pair without the other half,
    /// which is no character at all (Redis's decoder refuses it; many clients mangle it).
    #[error("`data` contains a lone surrogate escape \\u{0:04x}; strings must be valid Unicode")]
    LoneSurrogate(u16),
}

/// Checks what serde_json lets through but the Redis function (and many clients) would
/// not: nesting deeper than [`MAX_DATA_DEPTH`] and lone surrogate escapes. `json` is
/// already known to be JSON (a `RawValue`), so this is one pass over its bytes with no
/// allocation, not a second parse; anything malformed is left to the parser's verdict.
pub fn validate_data(json: &str) -> Result<(), InvalidEventData> {
    let bytes = json.as_bytes();
    let mut depth = 0usize;
    let mut at = 0;
    while let Some(&byte) = bytes.get(at) {
        match byte {
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DATA_DEPTH {
                    return Err(InvalidEventData::TooDeep);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b'"' => {
                at = skip_string(bytes, at + 1)?;
                continue;
            }
            _ => {}
        }
        at += 1;
    }
    Ok(())
}

/// Skips a string body starting at `at` (just after its opening quote), checking its
/// `\u` escapes; returns the index just after the closing quote.
fn skip_string(bytes: &[u8], mut at: usize) -> Result<usize, InvalidEventData> {
    // A high surrogate escape seen last, which the very next escape must complete.
    let mut high: Option<u16> = None;
    loop {
        let rest = bytes.get(at..).unwrap_or_default();
        let Some(offset) = rest.iter().position(|&b| b == b'"' || b == b'\\') else {
            return Ok(bytes.len());
        };
        if let Some(unit) = high.filter(|_| offset > 0 || rest[offset] == b'"') {
            return Err(InvalidEventData::LoneSurrogate(unit));
        }
        at += offset;
        if bytes[at] == b'"' {
            return Ok(at + 1);
        }
        // A backslash: `\uXXXX` or a one-character escape (`\\`, `\"`, `\n`, ...).
        if bytes.get(at + 1) != Some(&b'u') {
            if let Some(unit) = high {
                return Err(InvalidEventData::LoneSurrogate(unit));
            }
            at += 2;
            continue;
        }
        let unit = bytes
            .get(at + 2..at + 6)
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u16::from_str_radix(hex, 16).ok());
        at += 6;
        high = match (high, unit) {
            // Not four hex digits: not JSON, which the parser has already refused.
            (_, None) => None,
            (Some(_), Some(0xDC00..=0xDFFF)) => None,
            (Some(unit), Some(_)) => return Err(InvalidEventData::LoneSurrogate(unit)),
            (None, Some(unit @ 0xD800..=0xDBFF)) => Some(unit),
            (None, Some(unit @ 0xDC00..=0xDFFF)) => {
                return Err(InvalidEventData::LoneSurrogate(unit));
            }
            (None, Some(_)) => None,
        };
    }
}

/// Most patterns one filter or grant may hold: every event is matched against each of a
/// client's patterns, so the list is kept short.
pub const MAX_PATTERNS: usize = 64;

/// Which event types a client wants or may receive: every type, or those matching one of
/// its patterns. A pattern is an exact type (`order_created`) or a prefix ending in `*`
/// (`user:42:*`; `*` alone is every type). `*` cannot occur in a type ([`validate_type`]),
/// so the two never mix up. The list is shared: a grant's patterns (the anonymous ones,
/// say) are cloned into every stream that receives them, and a clone is a reference count.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TypeFilter(Option<std::sync::Arc<[Box<str>]>>);

impl TypeFilter {
    /// A filter passing only what `patterns` match; an empty list, or one holding `*`,
    /// passes everything.
    pub fn only(patterns: Vec<Box<str>>) -> Self {
        if patterns.iter().any(|p| &**p == "*") {
            return Self(None);
        }
        Self((!patterns.is_empty()).then(|| patterns.into()))
    }

    /// A filter passing nothing (a grant of no types).
    pub fn nothing() -> Self {
        Self(Some(std::sync::Arc::from(Vec::new())))
    }

    /// Whether it passes every type.
    pub fn is_everything(&self) -> bool {
        self.0.is_none()
    }

    /// Whether it passes no type at all.
    pub fn is_nothing(&self) -> bool {
        self.0.as_ref().is_some_and(|p| p.is_empty())
    }

    /// Whether an event of this type passes.
    pub fn wants(&self, event_type: &str) -> bool {
        match &self.0 {
            None => true,
            Some(patterns) => patterns.iter().any(|p| pattern_matches(p, event_type)),
        }
    }

    /// Whether everything `pattern` can match passes this filter: an exact type that
    /// passes, or a prefix pattern inside one of ours (`user:42:*` inside `user:*`).
    pub fn covers(&self, pattern: &str) -> bool {
        let Some(ours) = &self.0 else { return true };
        match pattern.strip_suffix('*') {
            None => self.wants(pattern),
            Some(prefix) => ours
                .iter()
                .filter_map(|p| p.strip_suffix('*'))
                .any(|ours| prefix.starts_with(ours)),
        }
    }

    /// Whether every pattern of `other` is covered by this filter.
    pub fn covers_all(&self, other: &TypeFilter) -> bool {
        match &other.0 {
            None => self.is_everything(),
            Some(patterns) => patterns.iter().all(|p| self.covers(p)),
        }
    }
}

/// Whether `pattern` (exact, or a prefix ending in `*`) matches `event_type`.
pub fn pattern_matches(pattern: &str, event_type: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => event_type.starts_with(prefix),
        None => pattern == event_type,
    }
}

/// Checks a pattern: a valid type, or the start of one followed by `*`.
pub fn validate_pattern(pattern: &str) -> Result<(), InvalidEventType> {
    match pattern.strip_suffix('*') {
        Some("") => Ok(()),
        Some(prefix) => validate_type(prefix),
        None => validate_type(pattern),
    }
}

/// Writes the JSON envelope `{"type":…,"data":…,"id":…,"ts":…}` that clients parse.
///
/// `data` is inserted verbatim (it is already valid JSON), so numbers and key order
/// survive exactly as the producer wrote them. `event_type` must have passed
/// [`validate_type`], which guarantees it needs no JSON escaping.
pub fn envelope_json(event_type: &str, data: &RawValue, id: Option<EventId>, ts: u64) -> String {
    let data = data.get();
    let mut out = String::with_capacity(data.len() + event_type.len() + 64);
    out.push_str(r#"{"type":""#);
    out.push_str(event_type);
    out.push_str(r#"","data":"#);
    out.push_str(data);
    if let Some(id) = id {
        out.push_str(r#","id":""#);
        out.push_str(&id.to_string());
        out.push('"');
    }
    out.push_str(r#","ts":"#);
    out.push_str(&ts.to_string());
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_exact_types_and_prefixes() {
        let filter = TypeFilter::only(vec!["user:42:*".into(), "news".into()]);
        for (event_type, wanted) in [
            ("user:42:login", true),
            ("user:42:", true),
            ("user:421:login", false),
            ("user:4", false),
            ("news", true),
            ("newsletter", false),
            ("", false),
        ] {
            assert_eq!(filter.wants(event_type), wanted, "{event_type}");
        }
        assert!(TypeFilter::only(vec!["a".into(), "*".into()]).is_everything());
        assert!(TypeFilter::only(Vec::new()).wants("anything"));
        assert!(!TypeFilter::nothing().wants("anything") && TypeFilter::nothing().is_nothing());
    }

    #[test]
    fn a_grant_covers_only_what_lies_inside_it() {
        let grant = TypeFilter::only(vec!["user:42:*".into(), "news".into()]);
        for (asked, covered) in [
            ("news", true),
            ("user:42:login", true),
            ("user:42:*", true),
            ("user:42:a*", true),
            ("user:4*", false),
            ("user:*", false),
            ("*", false),
            ("news*", false),
            ("other", false),
        ] {
            assert_eq!(grant.covers(asked), covered, "{asked}");
        }
        assert!(TypeFilter::default().covers("*"));
        assert!(!TypeFilter::nothing().covers("news"));
        let everything = TypeFilter::default();
        assert!(everything.covers_all(&TypeFilter::default()));
        assert!(!grant.covers_all(&TypeFilter::default()));
        assert!(grant.covers_all(&TypeFilter::only(vec!["news".into()])));
        assert!(validate_pattern("*").is_ok() && validate_pattern("a:*").is_ok());
        assert!(validate_pattern("a*b").is_err() && validate_pattern("**").is_err());
    }

    #[test]
    fn ids_parse_display_and_order_like_redis_stream_ids() {
        let a: EventId = "1700000000000-0".parse().unwrap();
        let b: EventId = "1700000000000-1".parse().unwrap();
        let c: EventId = "1700000000001-0".parse().unwrap();
        assert!(a < b && b < c);
        assert_eq!(a.to_string(), "1700000000000-0");
        assert_eq!(a.successor(), b);
        assert_eq!(EventId::new(5, u64::MAX).successor(), EventId::new(6, 0));
    }

    #[test]
    fn malformed_ids_are_rejected() {
        for bad in [
            "",
            "-",
            "1-",
            "-1",
            "a-1",
            "1-b",
            "1",
            "1-2-3",
            "+1-2",
            "99999999999999999999999-0",
        ] {
            assert!(bad.parse::<EventId>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn generated_ids_strictly_increase_within_one_millisecond() {
        let mut ids = IdGenerator::default();
        let mut last = ids.next_id();
        for _ in 0..10_000 {
            let next = ids.next_id();
            assert!(next > last);
            last = next;
        }
    }

    #[test]
    fn type_validation_follows_the_documented_alphabet() {
        assert!(validate_type("cache_updated").is_ok());
        assert!(validate_type("a.b:c-d_9").is_ok());
        assert_eq!(validate_type(""), Err(InvalidEventType::Empty));
        assert_eq!(
            validate_type(&"x".repeat(129)),
            Err(InvalidEventType::TooLong)
        );
        assert!(validate_type(&"x".repeat(128)).is_ok());
        assert_eq!(validate_type("a b"), Err(InvalidEventType::BadCharacter));
        assert_eq!(validate_type("a/b"), Err(InvalidEventType::BadCharacter));
        assert_eq!(validate_type("é"), Err(InvalidEventType::BadCharacter));
    }

    #[test]
    fn envelope_keeps_data_verbatim() {
        let data =
            RawValue::from_string(r#"{"n":1.50,"big":123456789012345678901234567890}"#.into())
                .unwrap();
        let json = envelope_json("job_updated", &data, Some(EventId::new(1, 2)), 7);
        assert_eq!(
            json,
            r#"{"type":"job_updated","data":{"n":1.50,"big":123456789012345678901234567890},"id":"1-2","ts":7}"#
        );
        let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(parsed["type"], "job_updated");
    }

    #[test]
    fn data_checks_find_lone_surrogates_and_nothing_else() {
        let cases: &[(&str, Option<u16>)] = &[
            (r#""\ud800""#, Some(0xd800)),
            (r#""\udc00""#, Some(0xdc00)),
            (r#""\uDBFF""#, Some(0xdbff)),
            (r#""\ud800x""#, Some(0xd800)),
            (r#""x\ud800\n""#, Some(0xd800)),
            (r#""\ud800\u0041""#, Some(0xd800)),
            (r#""\ud800\ud800\udc00""#, Some(0xd800)),
            (r#""\ude00\ud83d""#, Some(0xde00)),
            (r#"{"k":"\ud83d"}"#, Some(0xd83d)),
            (r#"{"\udc00":1}"#, Some(0xdc00)),
            (r#""\ud83d\ude00""#, None),
            (r#""\uD83D\uDE00 and \u00e9 and \u0000""#, None),
            (r#""\\ud800""#, None),
            (r#""\\\ud83d\ude00""#, None),
            (r#""\"\ud800""#, Some(0xd800)),
            (r#""😀 é""#, None),
            (r#"[1,"a",{"b":null},true]"#, None),
            ("null", None),
            ("", None),
        ];
        for (json, lone) in cases {
            let expected = match lone {
                Some(unit) => Err(InvalidEventData::LoneSurrogate(*unit)),
                None => Ok(()),
            };
            assert_eq!(validate_data(json), expected, "{json}");
        }
    }

    #[test]
    fn data_checks_count_nesting_outside_strings_only() {
        let nested = |open: &str, close: &str, n: usize| open.repeat(n) + &close.repeat(n);
        assert_eq!(validate_data(&nested("[", "]", MAX_DATA_DEPTH)), Ok(()));
        assert_eq!(
            validate_data(&nested("[", "]", MAX_DATA_DEPTH + 1)),
            Err(InvalidEventData::TooDeep)
        );
        assert_eq!(
            validate_data(&nested(r#"{"a":"#, "}", MAX_DATA_DEPTH + 1)),
            Err(InvalidEventData::TooDeep)
        );
        // Siblings do not add up: depth is how deep, not how many.
        let wide = format!("[{}]", vec!["[[1]]"; 1000].join(","));
        assert_eq!(validate_data(&wide), Ok(()));
        // Brackets and escaped quotes inside strings are text.
        let text = format!(r#"["{}", "\"[[[", "\\"]"#, "[{".repeat(1000));
        assert_eq!(validate_data(&text), Ok(()));
        // Unbalanced or truncated input (not JSON) never panics.
        for junk in ["]]]]", "\"\\", "\"\\u12", "\"\\ud800\\u", "{\"a\":\"\\"] {
            let _ = validate_data(junk);
        }
    }
}
