#!lua name=eventfabric
-- eventfabric's Redis Function library: the producer API and the replica bookkeeping.
-- Every key of a namespace shares the hash tag of its stream key ("{ns}:stream"), so the
-- library also works on Redis Cluster. Loaded by every replica at start-up and again
-- whenever Redis comes back without it.

local VERSION = 1
local MAX_TYPE_LEN = 128
local MAX_TRACKED_TYPES = 1000
local IDEMPOTENCY_TTL_MS = 600000

-- "{ns}:stream" -> "{ns}"
local function prefix_of(stream_key)
  local prefix = string.match(stream_key, '^(.*):stream$')
  if not prefix then
    error('ERR the key must be the namespace stream key, like {eventfabric}:stream')
  end
  return prefix
end

local function config_number(prefix, field, default)
  local value = tonumber(redis.call('HGET', prefix .. ':config', field))
  if value and value >= 0 then return value end
  return default
end

-- FCALL eventfabric_publish 1 {ns}:stream <type> <data-json> [<idempotency-key>]
-- Stores the event in the capped stream, counts it, publishes it live, returns its id.
local function publish(keys, args)
  local stream = keys[1]
  local prefix = prefix_of(stream)
  local event_type, data, idem = args[1], args[2], args[3]
  if not event_type or event_type == '' then
    return redis.error_reply('ERR type must not be empty')
  end
  if #event_type > MAX_TYPE_LEN then
    return redis.error_reply('ERR type is longer than ' .. MAX_TYPE_LEN .. ' characters')
  end
  if not string.match(event_type, '^[%w_%.:%-]+$') then
    return redis.error_reply("ERR type may contain only letters, digits, '_', '.', ':' and '-'")
  end
  if data == nil or data == '' then data = 'null' end
  local max_bytes = config_number(prefix, 'max_event_bytes', 65536)
  if #data + #event_type > max_bytes then
    return redis.error_reply('ERR event exceeds ' .. max_bytes .. ' bytes')
  end
  cjson.decode_invalid_numbers(false)
  if not pcall(cjson.decode, data) then
    return redis.error_reply('ERR data is not valid JSON')
  end
  local idem_key = nil
  if idem and idem ~= '' then
    idem_key = prefix .. ':idem:' .. idem
    local earlier = redis.call('GET', idem_key)
    if earlier then return earlier end
  end
  local history = config_number(prefix, 'history', 10000)
  local id = redis.call('XADD', stream, 'MAXLEN', '~', history, '*', 'type', event_type, 'data', data)
  if idem_key then
    redis.call('SET', idem_key, id, 'PX', IDEMPOTENCY_TTL_MS)
  end
  local stats = prefix .. ':stats'
  redis.call('HINCRBY', stats, 'total', 1)
  local field = 'type:' .. event_type
  if redis.call('HEXISTS', stats, field) == 1 or redis.call('HLEN', stats) <= MAX_TRACKED_TYPES then
    redis.call('HINCRBY', stats, field, 1)
  else
    redis.call('HINCRBY', stats, 'type:_other', 1)
  end
  local ms = string.match(id, '^(%d+)-')
  redis.call('PUBLISH', prefix .. ':events',
    '{"type":"' .. event_type .. '","data":' .. data .. ',"id":"' .. id .. '","ts":' .. ms .. '}')
  return id
end

local function id_less(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end

-- FCALL_RO eventfabric_replay 1 {ns}:stream <after-id> <count>
-- Returns {truncated, entries}: entries after <after-id>; truncated is 1 when events after
-- <after-id> may have been trimmed away.
local function replay(keys, args)
  local stream, after, count = keys[1], args[1], tonumber(args[2]) or 100
  if not string.match(after, '^%d+%-%d+$') then
    return redis.error_reply('ERR invalid id')
  end
  if redis.call('EXISTS', stream) == 0 then
    return {0, {}}
  end
  local info = redis.call('XINFO', 'STREAM', stream)
  local fields = {}
  for i = 1, #info, 2 do fields[info[i]] = info[i + 1] end
  local truncated = 0
  local first = fields['first-entry']
  if first and first ~= false and id_less(after, first[1])
     and tonumber(fields['entries-added']) > tonumber(fields['length']) then
    truncated = 1
  end
  return {truncated, redis.call('XRANGE', stream, '(' .. after, '+', 'COUNT', count)}
end

-- FCALL eventfabric_heartbeat 1 {ns}:stream <replica-id> <clients> <ttl-ms>
-- Records that a replica is alive and how many clients it has, on Redis's clock.
local function heartbeat(keys, args)
  local prefix = prefix_of(keys[1])
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local ttl = tonumber(args[3]) or 10000
  redis.call('HSET', prefix .. ':replicas', args[1], args[2] .. ':' .. now)
  redis.call('ZADD', prefix .. ':replicas:expiry', now + ttl, args[1])
  return now
end

-- FCALL eventfabric_leave 1 {ns}:stream <replica-id>
local function leave(keys, args)
  local prefix = prefix_of(keys[1])
  redis.call('HDEL', prefix .. ':replicas', args[1])
  redis.call('ZREM', prefix .. ':replicas:expiry', args[1])
  return 1
end

-- FCALL eventfabric_stats 1 {ns}:stream
-- Returns {now-ms, counters (flat field/value list), replicas (flat id/"clients:last-seen")},
-- after dropping replicas whose heartbeat expired.
local function stats(keys, args)
  local prefix = prefix_of(keys[1])
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local expired = redis.call('ZRANGEBYSCORE', prefix .. ':replicas:expiry', '-inf', now)
  for _, id in ipairs(expired) do
    redis.call('HDEL', prefix .. ':replicas', id)
    redis.call('ZREM', prefix .. ':replicas:expiry', id)
  end
  return {now, redis.call('HGETALL', prefix .. ':stats'), redis.call('HGETALL', prefix .. ':replicas')}
end

-- FCALL_RO eventfabric_version 0
local function version()
  return VERSION
end

redis.register_function('eventfabric_publish', publish)
redis.register_function{function_name = 'eventfabric_replay', callback = replay, flags = {'no-writes'}}
redis.register_function('eventfabric_heartbeat', heartbeat)
redis.register_function('eventfabric_leave', leave)
redis.register_function('eventfabric_stats', stats)
redis.register_function{function_name = 'eventfabric_version', callback = version, flags = {'no-writes'}}
