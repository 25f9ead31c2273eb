//! What a stream request asks for: a type filter and where to resume.

use crate::auth::Credentials;
use crate::event::{EventId, TypeFilter};
use crate::telemetry::{RateLimit, truncate_for_log};

/// Most types one `?types=` filter may list; more are ignored.
const MAX_FILTER_TYPES: usize = 64;

/// The options of one `GET /api/events/stream`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct StreamParams {
    /// The event types asked for.
    pub types: TypeFilter,
    /// Resume after this id, when set and valid.
    pub last_event_id: Option<EventId>,
    /// The `Origin` header, for the CORS headers of the response; dropped once they are
    /// written.
    pub origin: Option<Box<[u8]>>,
    /// The `X-Forwarded-For` header, for `--max-clients-per-ip` behind a trusted proxy;
    /// dropped once the stream is admitted.
    pub forwarded_for: Option<Box<[u8]>>,
    /// Where the client's token may be; dropped once the stream is admitted.
    pub credentials: Credentials,
}

impl StreamParams {
    /// Reads `?types=a,b` (types, or prefixes ending in `*`), `?access_token=` and
    /// `?lastEventId=` from the query and the `Last-Event-ID`
    /// header, which wins when both are present (browsers send the header on reconnect,
    /// with a fresher id than the one in the URL). Invalid ids are ignored, and logged at
    /// debug level, cut short and at most once a second: the client's mistake, which it
    /// may repeat on every reconnect, and which costs nothing (the client is served live).
    pub fn parse(query: Option<&str>, last_event_id_header: Option<&[u8]>) -> Self {
        let mut params = Self::default();
        let mut query_id = None;
        for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match &*key {
                "types" => {
                    let types: Vec<Box<str>> = value
                        .split(',')
                        .map(str::trim)
                        .filter(|t| !t.is_empty())
                        .take(MAX_FILTER_TYPES)
                        .map(Into::into)
                        .collect();
                    params.types = TypeFilter::only(types);
                }
                "lastEventId" => query_id = Some(value.into_owned()),
                "access_token" => params.credentials.query = Some(value.into()),
                _ => {}
            }
        }
        // Bytes, not a lossy copy: an id is ASCII, so anything else is invalid without
        // allocating, and the log shows the bytes the client really sent.
        let given = |raw: &&[u8]| !raw.trim_ascii().is_empty();
        let chosen = last_event_id_header
            .filter(given)
            .or(query_id.as_deref().map(str::as_bytes))
            .filter(given);
        if let Some(raw) = chosen {
            match std::str::from_utf8(raw).ok().map(str::parse::<EventId>) {
                Some(Ok(id)) => params.last_event_id = Some(id),
                _ => {
                    static LOG: RateLimit = RateLimit::per_second();
                    if let Some(suppressed) = LOG.allow() {
                        tracing::debug!(
                            last_event_id = %truncate_for_log(raw),
                            suppressed,
                            "ignoring invalid Last-Event-ID"
                        );
                    }
                }
            }
        }
        params
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_and_query_id_are_read() {
        let p = StreamParams::parse(Some("types=a,b%2Cc&lastEventId=5-1"), None);
        assert_eq!(p.last_event_id, Some(EventId::new(5, 1)));
        assert!(
            p.types.wants("a") && p.types.wants("b") && p.types.wants("c") && !p.types.wants("d")
        );
    }

    #[test]
    fn header_wins_over_query() {
        let p = StreamParams::parse(Some("lastEventId=5-1"), Some(b"7-0"));
        assert_eq!(p.last_event_id, Some(EventId::new(7, 0)));
    }

    #[test]
    fn invalid_ids_and_empty_filters_are_ignored() {
        let p = StreamParams::parse(Some("types=,&lastEventId=nope"), Some(b"\xff\xfe"));
        assert_eq!(p, StreamParams::default());
        assert!(p.types.wants("anything"));
        let long = vec![b'9'; 8000];
        assert_eq!(
            StreamParams::parse(None, Some(&long)),
            StreamParams::default()
        );
    }

    #[test]
    fn a_blank_header_leaves_the_query_id() {
        let p = StreamParams::parse(Some("lastEventId=5-1"), Some(b" \t"));
        assert_eq!(p.last_event_id, Some(EventId::new(5, 1)));
        let p = StreamParams::parse(Some("lastEventId=%20"), None);
        assert_eq!(p.last_event_id, None);
    }
}
