#!lua name=eventfabric
-- eventfabric's Redis Function library: the producer API and the replica bookkeeping.
-- Every key of a namespace shares the hash tag of its stream key ("{ns}:stream"), so the
-- library also works on Redis Cluster. Loaded by every replica at start-up (on every
-- primary of a cluster) and again whenever Redis comes back without it.
--
-- Keys: every function is called with the namespace's stream key first. On a single Redis
-- (or Sentinel) that key alone will do: the function derives the others from it (the
-- short form). A cluster, and a managed Redis that checks keys, needs every key a function
-- touches declared: the stream key followed by the keys in the function's list below, in
-- that order (the declared form). A declared key must be exactly the derived one.

local VERSION = 3
local MAX_TYPE_LEN = 128
local MAX_TRACKED_TYPES = 1000
local IDEMPOTENCY_TTL_MS = 600000
local MAX_IDEMPOTENCY_KEYS = 100000
local MAX_IDEMPOTENCY_KEY_LEN = 200
-- Expired or surplus idempotency keys forgotten per publish; more than one, so the set
-- shrinks faster than a publish can grow it.
local IDEMPOTENCY_SWEEP = 100

-- The keys each function touches besides the stream key, in the order the declared form
-- names them after it.
local PUBLISH_KEYS = {':config', ':stats', ':idem', ':idem:order'}
local REPLICA_KEYS = {':replicas', ':replicas:expiry'}
local STATS_KEYS = {':stats', ':replicas', ':replicas:expiry'}
local CANARY_KEYS = {':config'}

-- Validation failures read "ERR invalid event: ...": the gateway answers them with 400,
-- and every other error means "not stored, try again".
local function bad_event(message)
  return redis.error_reply('ERR invalid event: ' .. message)
end

-- Whether s is well-formed UTF-8 (no overlong forms, no surrogates, nothing past U+10FFFF).
-- ASCII runs are skipped by string.find, which runs in C.
local function valid_utf8(s)
  local i = string.find(s, '[\128-\255]')
  local n = #s
  while i do
    local c, c2, c3, c4 = string.byte(s, i, i + 3)
    local len, lo, hi
    if c >= 0xC2 and c <= 0xDF then len, lo, hi = 2, 0x80, 0xBF
    elseif c == 0xE0 then len, lo, hi = 3, 0xA0, 0xBF
    elseif c == 0xED then len, lo, hi = 3, 0x80, 0x9F
    elseif c >= 0xE1 and c <= 0xEF then len, lo, hi = 3, 0x80, 0xBF
    elseif c == 0xF0 then len, lo, hi = 4, 0x90, 0xBF
    elseif c >= 0xF1 and c <= 0xF3 then len, lo, hi = 4, 0x80, 0xBF
    elseif c == 0xF4 then len, lo, hi = 4, 0x80, 0x8F
    else return false end
    if i + len - 1 > n or c2 < lo or c2 > hi then return false end
    if len >= 3 and (c3 < 0x80 or c3 > 0xBF) then return false end
    if len == 4 and (c4 < 0x80 or c4 > 0xBF) then return false end
    i = string.find(s, '[\128-\255]', i + len)
  end
  return true
end

-- Redis's clock, in Unix milliseconds.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- "{ns}:stream" -> "{ns}"
local function prefix_of(stream_key)
  local prefix = string.match(stream_key, '^(.*):stream$')
  if not prefix then
    error('ERR the key must be the namespace stream key, like {eventfabric}:stream')
  end
  return prefix
end

-- The namespace prefix and the keys of a call: keys[1] is the stream key, then either
-- nothing (the short form: derived here) or exactly the keys in `suffixes`, in order (the
-- declared form). Returns the prefix and a table suffix -> key.
local function declared(keys, suffixes)
  local prefix = prefix_of(keys[1])
  if #keys ~= 1 and #keys ~= #suffixes + 1 then
    error('ERR give the stream key alone, or followed by all ' .. #suffixes .. ' keys this function touches')
  end
  local names = {}
  for i, suffix in ipairs(suffixes) do
    local name = prefix .. suffix
    if #keys > 1 and keys[i + 1] ~= name then
      error('ERR key ' .. (i + 1) .. ' must be ' .. name)
    end
    names[suffix] = name
  end
  return prefix, names
end

local function config_number(config, field, default)
  local value = tonumber(redis.call('HGET', config, field))
  if value and value >= 0 then return value end
  return default
end

-- Publishes on a channel the way the gateways listen: on a cluster they say so in the
-- config ("pubsub" = "sharded") and listen with SSUBSCRIBE, so the message stays within
-- the namespace's shard; otherwise a classic PUBLISH.
local function ring(config, channel, message)
  if redis.call('HGET', config, 'pubsub') == 'sharded' then
    redis.call('SPUBLISH', channel, message)
  else
    redis.call('PUBLISH', channel, message)
  end
end

-- Forgets idempotency keys older than IDEMPOTENCY_TTL_MS, and the oldest ones beyond
-- MAX_IDEMPOTENCY_KEYS, a bounded number per call. "{ns}:idem" maps key -> id and
-- "{ns}:idem:order" orders the keys by the ms of their id.
local function forget_idempotency_keys(idem_keys, idem_order)
  local now = now_ms()
  local old = redis.call('ZRANGEBYSCORE', idem_order, '-inf', now - IDEMPOTENCY_TTL_MS,
    'LIMIT', 0, IDEMPOTENCY_SWEEP)
  local surplus = redis.call('ZCARD', idem_order) - #old - MAX_IDEMPOTENCY_KEYS + 1
  if surplus > 0 then
    local popped = redis.call('ZRANGE', idem_order, #old, #old + math.min(surplus, IDEMPOTENCY_SWEEP) - 1)
    for _, key in ipairs(popped) do old[#old + 1] = key end
  end
  if #old > 0 then
    redis.call('HDEL', idem_keys, unpack(old))
    redis.call('ZREM', idem_order, unpack(old))
  end
end

-- FCALL eventfabric_publish 1 {ns}:stream <type> <data-json> [<idempotency-key>]
-- FCALL eventfabric_publish 5 {ns}:stream {ns}:config {ns}:stats {ns}:idem {ns}:idem:order
--   <type> <data-json> [<idempotency-key>]
-- Stores the event in the capped stream, counts it, publishes it live, returns its id.
local function publish(keys, args)
  local stream = keys[1]
  local prefix, key = declared(keys, PUBLISH_KEYS)
  local event_type, data, idem = args[1], args[2], args[3]
  if not event_type or event_type == '' then
    return bad_event('type must not be empty')
  end
  if #event_type > MAX_TYPE_LEN then
    return bad_event('type is longer than ' .. MAX_TYPE_LEN .. ' characters')
  end
  if not string.match(event_type, '^[%w_%.:%-]+$') then
    return bad_event("type may contain only letters, digits, '_', '.', ':' and '-'")
  end
  if data == nil or data == '' then data = 'null' end
  local max_bytes = config_number(key[':config'], 'max_event_bytes', 65536)
  if #data + #event_type > max_bytes then
    return bad_event('event exceeds ' .. max_bytes .. ' bytes')
  end
  cjson.decode_invalid_numbers(false)
  if not valid_utf8(data) or not pcall(cjson.decode, data) then
    return bad_event('data is not valid UTF-8 JSON')
  end
  local idem_keys, idem_order = nil, nil
  if idem and idem ~= '' then
    if #idem > MAX_IDEMPOTENCY_KEY_LEN then
      return bad_event('idempotency key is longer than ' .. MAX_IDEMPOTENCY_KEY_LEN .. ' bytes')
    end
    idem_keys, idem_order = key[':idem'], key[':idem:order']
    forget_idempotency_keys(idem_keys, idem_order)
    local earlier = redis.call('HGET', idem_keys, idem)
    if earlier then return earlier end
  end
  local history = config_number(key[':config'], 'history', 10000)
  local id = redis.call('XADD', stream, 'MAXLEN', '~', history, '*', 'type', event_type, 'data', data)
  local ms = string.match(id, '^(%d+)-')
  if idem_keys then
    redis.call('HSET', idem_keys, idem, id)
    redis.call('ZADD', idem_order, ms, idem)
  end
  local stats = key[':stats']
  redis.call('HINCRBY', stats, 'total', 1)
  local field = 'type:' .. event_type
  if redis.call('HEXISTS', stats, field) == 1 or redis.call('HLEN', stats) <= MAX_TRACKED_TYPES then
    redis.call('HINCRBY', stats, field, 1)
  else
    redis.call('HINCRBY', stats, 'type:_other', 1)
  end
  -- A doorbell, not the event: replicas read what is new from the stream, so an id comes
  -- only from the stream and no message on the channel can claim one.
  ring(key[':config'], prefix .. ':events', id)
  return id
end

local function id_less(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end

-- FCALL_RO eventfabric_position 1 {ns}:stream <after-id>
-- Whether a reader that has everything up to <after-id> can be brought up to date from the
-- stream: 0 when it can, 1 when events after <after-id> may have been trimmed away, 2 when
-- <after-id> is not an id this stream gave (newer than any it ever gave, or there is no
-- stream: Redis lost it). "0-0" is the start of any stream and always 0. The reader then
-- reads the entries with XRANGE itself: returning them through Lua would copy each one
-- twice more inside Redis.
local function position(keys, args)
  local stream, after = keys[1], args[1]
  if not after or not string.match(after, '^%d+%-%d+$') then
    return redis.error_reply('ERR invalid id')
  end
  local from_start = after == '0-0'
  if redis.call('EXISTS', stream) == 0 then
    if from_start then return 0 end
    return 2
  end
  local info = redis.call('XINFO', 'STREAM', stream)
  local fields = {}
  for i = 1, #info, 2 do fields[info[i]] = info[i + 1] end
  if not from_start and id_less(fields['last-generated-id'], after) then
    return 2
  end
  local first = fields['first-entry']
  -- Within what the stream holds but not in it: an id from a primary that died before
  -- its replica had it. Events after it may be missing too, so it is not a place to
  -- resume from.
  if not from_start and first and first ~= false and not id_less(after, first[1])
     and #redis.call('XRANGE', stream, after, after) == 0 then
    return 2
  end
  if first and first ~= false and id_less(after, first[1]) then
    -- Before the first entry: trimmed away if the stream ever dropped entries, else an
    -- id it never had.
    if tonumber(fields['entries-added']) > tonumber(fields['length']) then
      return 1
    end
    if not from_start then return 2 end
  end
  return 0
end

-- FCALL eventfabric_heartbeat 1 {ns}:stream <replica-id> <clients> <ttl-ms>
-- (declared: 3 {ns}:stream {ns}:replicas {ns}:replicas:expiry)
-- Records that a replica is alive and how many clients it has, on Redis's clock.
local function heartbeat(keys, args)
  local _, key = declared(keys, REPLICA_KEYS)
  local now = now_ms()
  local ttl = tonumber(args[3]) or 10000
  redis.call('HSET', key[':replicas'], args[1], args[2] .. ':' .. now)
  redis.call('ZADD', key[':replicas:expiry'], now + ttl, args[1])
  return now
end

-- FCALL eventfabric_leave 1 {ns}:stream <replica-id>
-- (declared: 3 {ns}:stream {ns}:replicas {ns}:replicas:expiry)
local function leave(keys, args)
  local _, key = declared(keys, REPLICA_KEYS)
  redis.call('HDEL', key[':replicas'], args[1])
  redis.call('ZREM', key[':replicas:expiry'], args[1])
  return 1
end

-- FCALL eventfabric_stats 1 {ns}:stream
-- (declared: 4 {ns}:stream {ns}:stats {ns}:replicas {ns}:replicas:expiry)
-- Returns {now-ms, counters (flat field/value list), replicas (flat id/"clients:last-seen")},
-- after dropping replicas whose heartbeat expired.
local function stats(keys, args)
  local _, key = declared(keys, STATS_KEYS)
  local now = now_ms()
  local expired = redis.call('ZRANGEBYSCORE', key[':replicas:expiry'], '-inf', now)
  for _, id in ipairs(expired) do
    redis.call('HDEL', key[':replicas'], id)
    redis.call('ZREM', key[':replicas:expiry'], id)
  end
  return {now, redis.call('HGETALL', key[':stats']), redis.call('HGETALL', key[':replicas'])}
end

-- FCALL eventfabric_canary 2 {ns}:stream {ns}:config <replica-id> <payload>
-- Sends a replica's readiness canary on its own channel, the way the gateways listen. Going
-- through the library, a canary that comes back also proves the library is loaded on the
-- primary that holds the namespace (on a cluster, after a failover or a slot move too).
local function canary(keys, args)
  local prefix, key = declared(keys, CANARY_KEYS)
  ring(key[':config'], prefix .. ':canary:' .. args[1], args[2])
  return 1
end

-- FCALL_RO eventfabric_version 0
local function version()
  return VERSION
end

redis.register_function('eventfabric_publish', publish)
redis.register_function{function_name = 'eventfabric_position', callback = position, flags = {'no-writes'}}
redis.register_function('eventfabric_heartbeat', heartbeat)
redis.register_function('eventfabric_leave', leave)
redis.register_function('eventfabric_stats', stats)
redis.register_function('eventfabric_canary', canary)
redis.register_function{function_name = 'eventfabric_version', callback = version, flags = {'no-writes'}}
