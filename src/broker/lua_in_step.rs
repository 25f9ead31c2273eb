//! The function library (`functions.lua`) repeats limits and key names the Rust side also
//! knows; Redis cannot import them from us. These tests read the Lua source and fail when
//! either side changes alone.

use std::collections::BTreeSet;

use super::keys::Keys;
use super::redis::{FUNCTION_LIBRARY, LIBRARY_VERSION};
use super::{IDEMPOTENCY_TTL_MS, MAX_IDEMPOTENCY_KEYS};
use crate::config::{DEFAULT_HISTORY, DEFAULT_MAX_EVENT_BYTES};
use crate::event::MAX_TYPE_LEN;
use crate::metrics::MAX_TRACKED_TYPES;

/// The number assigned by `local NAME = <number>` at the top of the library.
fn lua_constant(name: &str) -> i64 {
    let prefix = format!("local {name} = ");
    let line = FUNCTION_LIBRARY
        .lines()
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("functions.lua has no `local {name} = ...`"));
    line.trim()
        .parse()
        .unwrap_or_else(|_| panic!("`{name}` in functions.lua is not a number: {line}"))
}

/// The default given for `field` in `config_number(key[':config'], '<field>', <default>)`.
fn lua_config_default(field: &str) -> i64 {
    let call = format!("config_number(key[':config'], '{field}', ");
    let start = FUNCTION_LIBRARY
        .find(call.as_str())
        .unwrap_or_else(|| panic!("functions.lua never reads config field {field}"))
        + call.len();
    let rest = &FUNCTION_LIBRARY[start..];
    let end = rest.find(')').unwrap_or(rest.len());
    rest[..end]
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("default for {field} is not a number"))
}

/// Every key or channel the library derives: each `prefix .. ':<suffix>'`, with a
/// following `.. <variable>` shown as `<var>`, so `':idem:' .. idem` reads `:idem:<var>`.
fn lua_derived_names() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let marker = "prefix .. '";
    let mut rest = FUNCTION_LIBRARY;
    while let Some(at) = rest.find(marker) {
        rest = &rest[at + marker.len()..];
        let end = rest.find('\'').expect("unterminated Lua string");
        let suffix = &rest[..end];
        let variable = rest[end + 1..].trim_start().starts_with("..");
        names.insert(if variable {
            format!("{suffix}<var>")
        } else {
            suffix.to_owned()
        });
        rest = &rest[end..];
    }
    names
}

/// The strings of `local NAME = {'a', 'b'}` at the top of the library.
fn lua_list(name: &str) -> Vec<String> {
    let prefix = format!("local {name} = {{");
    let line = FUNCTION_LIBRARY
        .lines()
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("functions.lua has no `local {name} = {{...}}`"));
    let inner = line
        .strip_suffix('}')
        .unwrap_or_else(|| panic!("`{name}` in functions.lua is not a one-line list"));
    inner
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| {
            item.strip_prefix('\'')
                .and_then(|i| i.strip_suffix('\''))
                .unwrap_or_else(|| panic!("`{name}` holds {item}, not a quoted string"))
                .to_owned()
        })
        .collect()
}

#[test]
fn each_function_declares_the_keys_the_rust_side_passes() {
    use super::keys::{CANARY_KEYS, PUBLISH_KEYS, REPLICA_KEYS, STATS_KEYS};
    for (lua, rust) in [
        ("PUBLISH_KEYS", PUBLISH_KEYS),
        ("REPLICA_KEYS", REPLICA_KEYS),
        ("STATS_KEYS", STATS_KEYS),
        ("CANARY_KEYS", CANARY_KEYS),
    ] {
        assert_eq!(
            lua_list(lua),
            rust,
            "{lua} differs between functions.lua and keys.rs"
        );
        // Each list is used by the function it names: no list is dead in the library.
        assert!(
            FUNCTION_LIBRARY.contains(&format!("declared(keys, {lua})")),
            "functions.lua never calls declared(keys, {lua})"
        );
    }
    assert_eq!(lua_list("PUBLISH_KEYS").len(), 4);
}

#[test]
fn limits_match_the_rust_side() {
    assert_eq!(lua_constant("VERSION"), LIBRARY_VERSION);
    assert_eq!(lua_constant("MAX_TYPE_LEN"), MAX_TYPE_LEN as i64);
    assert_eq!(lua_constant("MAX_TRACKED_TYPES"), MAX_TRACKED_TYPES as i64);
    assert_eq!(
        lua_constant("IDEMPOTENCY_TTL_MS"),
        IDEMPOTENCY_TTL_MS as i64
    );
    assert_eq!(
        lua_constant("MAX_IDEMPOTENCY_KEYS"),
        MAX_IDEMPOTENCY_KEYS as i64
    );
    assert_eq!(
        lua_constant("MAX_IDEMPOTENCY_KEY_LEN"),
        crate::event::MAX_IDEMPOTENCY_KEY_LEN as i64
    );
    assert_eq!(lua_config_default("history"), DEFAULT_HISTORY as i64);
    assert_eq!(
        lua_config_default("max_event_bytes"),
        DEFAULT_MAX_EVENT_BYTES as i64
    );
}

#[test]
fn validation_errors_read_as_the_gateway_expects() {
    let prefix = format!("redis.error_reply('ERR {}' ..", super::redis::INVALID_EVENT);
    assert!(
        FUNCTION_LIBRARY.contains(&prefix),
        "functions.lua's bad_event() no longer starts its replies with {prefix}"
    );
}

#[test]
fn every_key_the_library_derives_is_listed_in_keys() {
    let keys = Keys::new("ns");
    let listed: BTreeSet<String> = keys
        .all()
        .iter()
        .map(|name| {
            let suffix = name
                .strip_prefix("{ns}")
                .expect("every key carries the hash tag");
            match suffix.find('<') {
                Some(variable) => format!("{}<var>", &suffix[..variable]),
                None => suffix.to_owned(),
            }
        })
        .collect();
    let mut derived = lua_derived_names();
    for list in ["PUBLISH_KEYS", "REPLICA_KEYS", "STATS_KEYS", "CANARY_KEYS"] {
        derived.extend(lua_list(list));
    }
    assert!(
        !derived.is_empty(),
        "the parser found no key in functions.lua"
    );
    let unlisted: Vec<_> = derived.difference(&listed).collect();
    assert!(
        unlisted.is_empty(),
        "functions.lua derives keys that keys.rs does not list: {unlisted:?}"
    );
    // The stream key is the one the library is called with; prefix_of() recognises it.
    assert!(FUNCTION_LIBRARY.contains("'^(.*):stream$'"));
    assert_eq!(keys.stream, "{ns}:stream");
}

#[test]
fn the_parsers_see_what_they_claim() {
    // Guards the guards: a parser that silently found nothing would pass the tests above.
    let names = lua_derived_names();
    for expected in [":events", ":canary:<var>"] {
        assert!(
            names.contains(expected),
            "{expected} not found in {names:?}"
        );
    }
    assert_eq!(lua_list("PUBLISH_KEYS").len(), 4);
}
