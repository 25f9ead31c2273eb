//! What a stream request asks for: a type filter and where to resume.

use crate::event::{EventId, TypeFilter};

/// Most types one `?types=` filter may list; more are ignored.
const MAX_FILTER_TYPES: usize = 64;

/// The options of one `GET /api/events/stream`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct StreamParams {
    /// The event types asked for.
    pub types: TypeFilter,
    /// Resume after this id, when set and valid.
    pub last_event_id: Option<EventId>,
}

impl StreamParams {
    /// Reads `?types=a,b` and `?lastEventId=` from the query and the `Last-Event-ID`
    /// header, which wins when both are present (browsers send the header on reconnect,
    /// with a fresher id than the one in the URL). Invalid ids are logged and ignored.
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
                _ => {}
            }
        }
        let header_id = last_event_id_header.map(|raw| String::from_utf8_lossy(raw).into_owned());
        let chosen = header_id.filter(|id| !id.trim().is_empty()).or(query_id);
        if let Some(raw) = chosen.filter(|id| !id.trim().is_empty()) {
            match raw.parse::<EventId>() {
                Ok(id) => params.last_event_id = Some(id),
                Err(_) => {
                    tracing::warn!(last_event_id = %raw.escape_debug(), "ignoring invalid Last-Event-ID")
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
    }
}
