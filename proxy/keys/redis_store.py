"""The store for several instances: Redis, every check-and-write one Lua script (atomic there).

Rules:
- reserve and settle are each one EVALSHA: Redis runs a script alone, so the check and the write
  of a reservation are one step for every worker of every instance. The decision mirrors
  `proxy.keys.store.judge` line for line (the SQLite store runs that one).
- Lua returns numbers as integers: every fraction travels as a string.
- The client lives in a task (coredis clients are async context managers) that reconnects with
  backoff; while Redis is away every call raises StoreUnavailable (fail closed, see policy.py).
- Settles go through a bounded channel (MAX_PENDING, ~300 bytes each) to one task, in order,
  which sends what is queued (up to SETTLE_BATCH) in one script call; a full channel drops the
  settle with an error line rather than block the request's end.
- Keys (all under PREFIX): keys (hash id -> JSON), version, res (hash id -> JSON reservation),
  par:<key> and own:<owner> (sets of reservation ids), pl:<key> (hash slot lease id -> its stream
  slots; the lease's res entry has `slots` set), reserved (hash scope -> USD),
  wr:<key>/wt:<key> (hash second -> requests/tokens, expiring), spend (hash "scope|period" ->
  USD), sd:<day> (hash "key\\x1fteam\\x1fmodel\\x1fmetric" -> sum), days (set), owners (hash).
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
import trio

from proxy.core.errors import StoreUnavailable
from proxy.keys.records import KeyRecord
from proxy.keys.store import (LEASE_SHARE, SLOT_SHARE, WINDOW, BudgetAsk, Grant, RateAsk, Reserve, Settle, SlotAsk,
                              SpendRow, Verdict, day_of, seconds_to_period_end, spend_periods)

log = logging.getLogger("proxy.keys.redis")

PREFIX = "gw:"
MAX_PENDING = 10_000
SETTLE_BATCH = 256  # settles per script call
TIMEOUT = 2.0  # seconds for one command before the store counts as unavailable

_RESERVE = """
local p, id, owner, key = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local now, tokens, usd, kill_at = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local rpm, tpm, maxpar, stream, nb = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11]), ARGV[12] == '1', tonumber(ARGV[13])
local W = tonumber(ARGV[14])
local now_s = math.floor(now)
local req, tok, buckets = 0, 0, {}
if rpm > 0 or tpm > 0 then
  local wr = redis.call('HGETALL', p .. 'wr:' .. key)
  for i = 1, #wr, 2 do
    local s = tonumber(wr[i])
    if s <= now_s - W then
      redis.call('HDEL', p .. 'wr:' .. key, wr[i]); redis.call('HDEL', p .. 'wt:' .. key, wr[i])
    else
      local t = tonumber(redis.call('HGET', p .. 'wt:' .. key, wr[i]) or '0')
      local r = tonumber(wr[i + 1])
      table.insert(buckets, {s, r, t}); req = req + r; tok = tok + t
    end
  end
  table.sort(buckets, function(a, b) return a[1] < b[1] end)
end
local function reset(index)
  for _, b in ipairs(buckets) do if b[index] > 0 then return math.max(0, b[1] + W - now) end end
  return 0
end
local function free_after(index, used, need, limit)
  for _, b in ipairs(buckets) do
    if used + need <= limit then break end
    used = used - b[index]
    if used + need <= limit then return math.max(b[1] + W - now, 0.001) end
  end
  if used + need <= limit then return 0 end
  return W
end
local function refuse(code, reason, wait)
  return {0, code, reason, tostring(wait), req, tok, tostring(reset(2)), tostring(reset(3)), ''}
end
if maxpar > 0 and stream then
  local parallel = redis.call('SCARD', p .. 'par:' .. key)
  for _, n in ipairs(redis.call('HVALS', p .. 'pl:' .. key)) do parallel = parallel + tonumber(n) end
  if parallel >= maxpar then
    local mine, others, leased = 's' .. owner, 0, redis.call('HGETALL', p .. 'pl:' .. key)
    for i = 1, #leased, 2 do
      if string.sub(leased[i], 1, #mine) ~= mine then others = others + tonumber(leased[i + 1]) end
    end
    local refused = refuse('rate_limit_exceeded', 'max_parallel (' .. maxpar .. ' streams) reached', 1)
    refused[10] = others
    return refused
  end
end
if rpm > 0 and req + 1 > rpm then
  return refuse('rate_limit_exceeded', 'rpm limit (' .. rpm .. ' requests per minute) reached', free_after(2, req, 1, rpm))
end
if tpm > 0 and tok + tokens > tpm then
  return refuse('rate_limit_exceeded', 'tpm limit (' .. tpm .. ' tokens per minute) reached: this request reserves '
    .. tokens .. ' tokens', free_after(3, tok, tokens, tpm))
end
local remaining, scopes = '', {}
for i = 0, nb - 1 do
  local scope, period, limit = ARGV[15 + 3 * i], ARGV[16 + 3 * i], tonumber(ARGV[17 + 3 * i])
  local spend = tonumber(redis.call('HGET', p .. 'spend', scope .. '|' .. period) or '0')
  local reserved = math.max(0, tonumber(redis.call('HGET', p .. 'reserved', scope) or '0'))
  if spend >= kill_at * limit or spend + reserved + usd > limit then
    return {0, 'budget_exceeded', scope .. '|' .. period .. '|' .. limit .. '|' .. string.format('%.6f', spend) .. '|'
      .. string.format('%.6f', reserved), '0', req, tok, tostring(reset(2)), tostring(reset(3)), ''}
  end
  if string.sub(scope, 1, 4) == 'key:' then remaining = tostring(limit - spend - reserved - usd) end
  table.insert(scopes, scope)
end
local r_reset, t_reset = reset(2), reset(3)
if req == 0 then r_reset = W end
if tok == 0 then t_reset = W end
redis.call('HSET', p .. 'res', id, cjson.encode({owner = owner, key = key, second = now_s, tokens = tokens,
  usd = usd, stream = stream, scopes = scopes}))
redis.call('SADD', p .. 'own:' .. owner, id)
if stream then redis.call('SADD', p .. 'par:' .. key, id) end
if rpm > 0 or tpm > 0 then
  redis.call('HINCRBY', p .. 'wr:' .. key, now_s, 1); redis.call('HINCRBY', p .. 'wt:' .. key, now_s, tokens)
  redis.call('EXPIRE', p .. 'wr:' .. key, 2 * W); redis.call('EXPIRE', p .. 'wt:' .. key, 2 * W)
end
for _, scope in ipairs(scopes) do redis.call('HINCRBYFLOAT', p .. 'reserved', scope, usd) end
return {1, '', '', '0', req + 1, tok + tokens, tostring(r_reset), tostring(t_reset), remaining}
"""

# Drops a reservation (by id) and its hold; returns the reservation's JSON or false. Shared by settle and sweep.
_RELEASE = """
local function release(p, id)
  local raw = redis.call('HGET', p .. 'res', id)
  if not raw then return false end
  local res = cjson.decode(raw)
  redis.call('HDEL', p .. 'res', id)
  redis.call('SREM', p .. 'par:' .. res.key, id)
  if res.slots then redis.call('HDEL', p .. 'pl:' .. res.key, id) end
  redis.call('SREM', p .. 'own:' .. res.owner, id)
  for _, scope in ipairs(res.scopes) do redis.call('HINCRBYFLOAT', p .. 'reserved', scope, -res.usd) end
  return res
end
"""

# Settles, many per call (the settle task takes what is queued, up to SETTLE_BATCH): one round trip.
_SETTLE = _RELEASE + """
local p = ARGV[1]
local all = cjson.decode(ARGV[2])
for _, s in ipairs(all) do
  local id, key, team, model, cost, day = s[1], s[2], s[3], s[4], s[5], s[6]
  local input, output, scopes, periods, wsec, wres, leases = s[7], s[8], s[9], s[10], s[11], s[12], s[13]
  if id ~= '' then
    local res = release(p, id)
    if res and redis.call('HEXISTS', p .. 'wt:' .. key, res.second) == 1 then
      local now_t = tonumber(redis.call('HGET', p .. 'wt:' .. key, res.second))
      redis.call('HSET', p .. 'wt:' .. key, res.second, math.max(0, now_t + input + output - res.tokens))
    end
  elseif wsec ~= '' and redis.call('HEXISTS', p .. 'wt:' .. key, wsec) == 1 then
    local now_t = tonumber(redis.call('HGET', p .. 'wt:' .. key, wsec))
    redis.call('HSET', p .. 'wt:' .. key, wsec, math.max(0, now_t + input + output - wres))
  end
  for _, scope in ipairs(scopes) do
    for _, period in ipairs(periods) do redis.call('HINCRBYFLOAT', p .. 'spend', scope .. '|' .. period, cost) end
  end
  for _, lid in ipairs(leases) do
    local raw = redis.call('HGET', p .. 'res', lid)
    if raw and tonumber(cost) > 0 then
      local res = cjson.decode(raw)
      local take = math.min(res.usd, tonumber(cost))
      res.usd = res.usd - take
      redis.call('HSET', p .. 'res', lid, cjson.encode(res))
      redis.call('HINCRBYFLOAT', p .. 'reserved', res.scopes[1], -take)
    end
  end
  local f = key .. '\\31' .. team .. '\\31' .. model .. '\\31'
  redis.call('HINCRBYFLOAT', p .. 'sd:' .. day, f .. 'usd', cost)
  redis.call('HINCRBY', p .. 'sd:' .. day, f .. 'requests', 1)
  redis.call('HINCRBY', p .. 'sd:' .. day, f .. 'input', input)
  redis.call('HINCRBY', p .. 'sd:' .. day, f .. 'output', output)
  redis.call('SADD', p .. 'days', day)
end
return #all
"""

_HEARTBEAT = _RELEASE + """
local p, owner, now, stale = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('HSET', p .. 'owners', owner, ARGV[3])
local seen, released = redis.call('HGETALL', p .. 'owners'), 0
for i = 1, #seen, 2 do
  if tonumber(seen[i + 1]) < now - stale then
    for _, id in ipairs(redis.call('SMEMBERS', p .. 'own:' .. seen[i])) do
      if release(p, id) then released = released + 1 end
    end
    redis.call('DEL', p .. 'own:' .. seen[i]); redis.call('HDEL', p .. 'owners', seen[i])
  end
end
return released
"""

# Budget and rate leases (proxy/keys/leases.py): the same decisions as store.budget_grant/rate_grant.
_LEASE = """
local p, owner, now, W, share = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local asks = cjson.decode(ARGV[6])
local now_s = math.floor(now)
local out = {}
for _, a in ipairs(asks) do
  if a.kind == 'usd' then
    local raw = redis.call('HGET', p .. 'res', a.id)
    local res = nil
    if raw then res = cjson.decode(raw) end
    if res and (a.back > 0 or a.close) then
      local back = res.usd
      if not a.close then back = math.min(a.back, res.usd) end
      redis.call('HINCRBYFLOAT', p .. 'reserved', a.scope, -back)
      if a.close then
        redis.call('HDEL', p .. 'res', a.id); redis.call('SREM', p .. 'own:' .. res.owner, a.id); res = nil
      else
        res.usd = res.usd - back; redis.call('HSET', p .. 'res', a.id, cjson.encode(res))
      end
    end
    if not res and not a.fresh and not a.close then
      table.insert(out, {'0', '0', '0', 1})
    else
      local spend = tonumber(redis.call('HGET', p .. 'spend', a.scope .. '|' .. a.period) or '0')
      local reserved = math.max(0, tonumber(redis.call('HGET', p .. 'reserved', a.scope) or '0'))
      local grant = 0
      if a.want > 0 then
        grant = math.min(a.want, (math.min(a.kill_at, 1) * a.limit - spend - reserved) / share)
        if grant < a.least or grant <= 0 then grant = 0 end
      end
      if grant > 0 then
        if not res then
          res = {owner = owner, key = a.scope, second = 0, tokens = 0, usd = 0, stream = false, scopes = {a.scope}}
          redis.call('SADD', p .. 'own:' .. owner, a.id)
        end
        res.usd = res.usd + grant
        redis.call('HSET', p .. 'res', a.id, cjson.encode(res))
        redis.call('HINCRBYFLOAT', p .. 'reserved', a.scope, grant)
      end
      table.insert(out, {tostring(grant), tostring(spend), tostring(reserved + grant), 0})
    end
  elseif a.kind == 'slot' then
    local pl = p .. 'pl:' .. a.key
    local held = redis.call('HGET', pl, a.id)
    if held and a.close then
      redis.call('HDEL', pl, a.id); redis.call('HDEL', p .. 'res', a.id); redis.call('SREM', p .. 'own:' .. owner, a.id)
      table.insert(out, {'0', 0})
    elseif not held and not a.fresh and not a.close then
      table.insert(out, {'0', 1})
    elseif a.close or a.want <= 0 then
      if held and a.back > 0 then redis.call('HSET', pl, a.id, math.max(0, tonumber(held) - a.back)) end
      table.insert(out, {'0', 0})
    else
      if held and a.back > 0 then
        held = math.max(0, tonumber(held) - a.back); redis.call('HSET', pl, a.id, held)
      end
      local in_use = redis.call('SCARD', p .. 'par:' .. a.key)
      for _, n in ipairs(redis.call('HVALS', pl)) do in_use = in_use + tonumber(n) end
      local grant = math.min(a.want, math.floor((a.max_parallel - in_use) / a.share))
      if grant < a.least or grant <= 0 then grant = 0 end
      if grant > 0 then
        if not held then
          redis.call('HSET', p .. 'res', a.id, cjson.encode({owner = owner, key = a.key, second = 0, tokens = 0,
            usd = 0, stream = false, scopes = {}, slots = true}))
          redis.call('SADD', p .. 'own:' .. owner, a.id)
        end
        redis.call('HINCRBY', pl, a.id, grant)
      end
      table.insert(out, {tostring(grant), 0})
    end
  else
    local wr, wt = p .. 'wr:' .. a.key, p .. 'wt:' .. a.key
    if (a.back_requests > 0 or a.back_tokens > 0) and redis.call('HEXISTS', wr, a.back_second) == 1 then
      local r = tonumber(redis.call('HGET', wr, a.back_second))
      local t = tonumber(redis.call('HGET', wt, a.back_second) or '0')
      redis.call('HSET', wr, a.back_second, math.max(0, r - a.back_requests))
      redis.call('HSET', wt, a.back_second, math.max(0, t - a.back_tokens))
    end
    local req, tok = 0, 0
    local all = redis.call('HGETALL', wr)
    for i = 1, #all, 2 do
      if tonumber(all[i]) <= now_s - W then
        redis.call('HDEL', wr, all[i]); redis.call('HDEL', wt, all[i])
      else
        req = req + tonumber(all[i + 1]); tok = tok + tonumber(redis.call('HGET', wt, all[i]) or '0')
      end
    end
    local gr, gt = a.want_requests, a.want_tokens
    if a.rpm > 0 then gr = math.min(gr, math.floor((a.rpm - req) / share)) end
    if a.tpm > 0 then gt = math.min(gt, math.floor((a.tpm - tok) / share)) end
    if gr < a.least_requests or gt < a.least_tokens or gr <= 0 then gr, gt = 0, 0 end
    if gr > 0 then
      redis.call('HINCRBY', wr, a.second, gr); redis.call('HINCRBY', wt, a.second, gt)
      redis.call('EXPIRE', wr, 2 * W); redis.call('EXPIRE', wt, 2 * W)
    end
    table.insert(out, {tostring(gr), tostring(gt), tostring(req + gr), tostring(tok + gt)})
  end
end
return cjson.encode(out)
"""

_PUT_KEY = """
redis.call('HSET', ARGV[1] .. 'keys', ARGV[2], ARGV[3])
return redis.call('INCR', ARGV[1] .. 'version')
"""


class RedisStore:
    def __init__(self, url: str, prefix: str = PREFIX):
        self.url = url
        self.prefix = prefix
        self._client: Any = None
        self._ready = trio.Event()
        self._up = False
        self._scope: trio.CancelScope | None = None
        self._send: trio.MemorySendChannel | None = None
        self._scripts: dict[str, Any] = {}

    async def open(self) -> None:
        import coredis

        self._client = coredis.Redis.from_url(self.url, decode_responses=True, connect_timeout=1.0,
                                              stream_timeout=TIMEOUT)
        self._scripts = {name: self._client.register_script(source) for name, source in
                         (("reserve", _RESERVE), ("settle", _SETTLE), ("heartbeat", _HEARTBEAT),
                          ("put_key", _PUT_KEY), ("lease", _LEASE))}
        self._scope = trio.CancelScope()
        self._send, receive = trio.open_memory_channel(MAX_PENDING)
        trio.lowlevel.spawn_system_task(self._run, receive, name="keys-redis")
        with trio.move_on_after(TIMEOUT):
            await self._ready.wait()

    async def aclose(self) -> None:
        if self._send is not None:
            await self.flush()
        if self._scope is not None:
            self._scope.cancel()

    async def _run(self, receive: trio.MemoryReceiveChannel) -> None:
        """Hold the client open (reconnect with backoff 0.5 .. 10 s) and apply the queued settles."""
        assert self._scope is not None
        delay = 0.5
        with self._scope:
            while True:
                try:
                    async with self._client:
                        await self._client.ping()
                        self._up, delay = True, 0.5
                        self._ready.set()
                        async for item in receive:
                            batch = [item]
                            while len(batch) < SETTLE_BATCH:
                                try:
                                    batch.append(receive.receive_nowait())
                                except trio.WouldBlock:
                                    break
                            settles: list[Settle] = []
                            for item in batch:  # in order: a flush marker is set once what precedes it is in
                                if isinstance(item, trio.Event):
                                    if settles:
                                        await self._settle(settles)
                                        settles = []
                                    item.set()
                                else:
                                    settles.append(item)
                            if settles:
                                await self._settle(settles)
                except Exception as e:  # noqa: BLE001 - any driver failure: reconnect later
                    if self._up:
                        log.error("state store: redis connection lost (%s)", type(e).__name__)
                self._up = False
                self._ready.set()
                await trio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _eval(self, name: str, args: list[Any]) -> Any:
        if not self._up:
            raise StoreUnavailable("the key and spend store (redis) is unavailable")
        try:
            with trio.fail_after(TIMEOUT):
                return await self._scripts[name](args=[self.prefix, *args])
        except StoreUnavailable:
            raise
        except Exception as e:  # noqa: BLE001 - driver, timeout, script errors: all mean unavailable
            raise StoreUnavailable(f"the key and spend store (redis) is unavailable ({type(e).__name__})") from None

    async def _command(self, call: Any) -> Any:
        if not self._up:
            raise StoreUnavailable("the key and spend store (redis) is unavailable")
        try:
            with trio.fail_after(TIMEOUT):
                return await call()
        except Exception as e:  # noqa: BLE001
            raise StoreUnavailable(f"the key and spend store (redis) is unavailable ({type(e).__name__})") from None

    # -- keys --

    async def version(self) -> int:
        return int(await self._command(lambda: self._client.get(self.prefix + "version")) or 0)

    async def load_keys(self) -> tuple[int, list[KeyRecord]]:
        version = await self.version()
        rows = await self._command(lambda: self._client.hgetall(self.prefix + "keys"))
        return version, [KeyRecord.from_row(orjson.loads(raw)) for raw in rows.values()]

    async def get_key(self, key_id: str) -> KeyRecord | None:
        raw = await self._command(lambda: self._client.hget(self.prefix + "keys", key_id))
        return None if raw is None else KeyRecord.from_row(orjson.loads(raw))

    async def put_key(self, record: KeyRecord) -> None:
        await self._eval("put_key", [record.id, orjson.dumps(record.to_row()).decode()])

    # -- requests --

    async def reserve(self, request: Reserve) -> Verdict:
        args: list[Any] = [request.id, request.owner, request.key_id, repr(request.now), request.tokens,
                           f"{request.usd:.12f}", repr(request.kill_at), request.rpm or 0, request.tpm or 0,
                           request.max_parallel or 0, int(request.stream), len(request.budgets), WINDOW]
        for budget in request.budgets:
            args += [budget.scope, budget.period, f"{budget.limit_usd:.12f}"]
        answer = await self._eval("reserve", args)
        ok, code, reason, wait, requests, tokens, r_reset, t_reset, remaining = answer[:9]
        verdict = Verdict(ok=bool(ok), code=code or None, reason=reason, retry_after=float(wait),
                          requests=int(requests), tokens=int(tokens), requests_reset=float(r_reset),
                          tokens_reset=float(t_reset), remaining_usd=float(remaining) if remaining else None,
                          leased_elsewhere=int(answer[9]) if len(answer) > 9 else 0)
        if code == "budget_exceeded":  # the same words as the SQLite store's judge
            scope, period, limit, spend, reserved = reason.split("|")
            what = "the global" if scope == "global" else scope.replace(":", " ", 1) + "'s"
            name = {"d": "day", "m": "month"}.get(period[:1], "all time")
            verdict.reason = (f"{what} budget ({float(limit):g} USD per {name}) is spent up to its limit "
                              f"(spent {spend}, reserved {reserved}, this request needs up to {request.usd:.6f})")
            verdict.retry_after = seconds_to_period_end(period, request.now)
        return verdict

    def settle_nowait(self, settle: Settle) -> None:
        try:
            assert self._send is not None
            self._send.send_nowait(settle)
        except (trio.WouldBlock, trio.ClosedResourceError, AssertionError):
            log.error("state store queue full: spend of %.6f USD for %s not recorded", settle.cost_usd, settle.key_id)

    async def _settle(self, settles: list[Settle]) -> None:
        rows = [[settle.reservation or "", settle.key_id, settle.team or "", settle.model, f"{settle.cost_usd:.12f}",
                 day_of(settle.now), settle.input_tokens, settle.output_tokens, list(settle.scopes),
                 list(spend_periods(settle.now)), str(settle.window[0]) if settle.window else "",
                 settle.window[1] if settle.window else 0, list(settle.leases)] for settle in settles]
        try:
            await self._eval("settle", [orjson.dumps(rows).decode()])
        except StoreUnavailable:
            log.error("state store: spend of %.6f USD for %d requests not recorded (redis unavailable)",
                      sum(settle.cost_usd for settle in settles), len(settles))
            raise

    async def flush(self) -> None:
        if self._send is None or not self._up:
            return
        marker = trio.Event()
        try:
            self._send.send_nowait(marker)
        except trio.WouldBlock:
            return
        with trio.move_on_after(TIMEOUT * 2):
            await marker.wait()

    # -- reading spend, liveness --

    async def spend(self, group_by: str, first_day: str, last_day: str) -> list[SpendRow]:
        days = await self._command(lambda: self._client.smembers(self.prefix + "days"))
        index = {"key": 0, "team": 1, "model": 2}[group_by]
        rows: dict[str, SpendRow] = {}
        for day in sorted(d for d in days if first_day <= d <= last_day):
            fields = await self._command(lambda: self._client.hgetall(f"{self.prefix}sd:{day}"))
            for name, value in fields.items():
                *parts, metric = name.split("\x1f")
                group = parts[index] or None
                row = rows.setdefault(group, SpendRow(group))  # type: ignore[arg-type]
                if metric == "usd":
                    row.spend_usd += float(value)
                elif metric == "requests":
                    row.requests += int(value)
                elif metric == "input":
                    row.input_tokens += int(value)
                else:
                    row.output_tokens += int(value)
        return sorted(rows.values(), key=lambda r: -r.spend_usd)

    async def scope_spend(self, scope: str, period: str) -> float:
        value = await self._command(lambda: self._client.hget(self.prefix + "spend", f"{scope}|{period}"))
        return float(value) if value else 0.0

    async def lease(self, owner: str, now: float, asks: list[BudgetAsk | RateAsk | SlotAsk]) -> list[Grant]:
        encoded = []
        for ask in asks:
            if isinstance(ask, SlotAsk):
                encoded.append({"kind": "slot", "id": ask.id, "key": ask.key_id, "max_parallel": ask.max_parallel,
                                "back": ask.back, "want": ask.want, "least": ask.least, "share": SLOT_SHARE,
                                "fresh": ask.fresh, "close": ask.close})
            elif isinstance(ask, BudgetAsk):
                encoded.append({"kind": "usd", "id": ask.id, "scope": ask.budget.scope, "period": ask.budget.period,
                                "limit": ask.budget.limit_usd, "kill_at": ask.kill_at, "back": ask.back,
                                "want": ask.want, "least": ask.least, "fresh": ask.fresh, "close": ask.close})
            else:
                encoded.append({"kind": "rate", "key": ask.key_id, "rpm": ask.rpm or 0, "tpm": ask.tpm or 0,
                                "second": ask.second, "want_requests": ask.want_requests,
                                "want_tokens": ask.want_tokens, "least_requests": ask.least_requests,
                                "least_tokens": ask.least_tokens, "back_second": ask.back_second,
                                "back_requests": ask.back_requests, "back_tokens": ask.back_tokens})
        answer = orjson.loads(await self._eval("lease", [owner, repr(now), WINDOW, LEASE_SHARE,
                                                         orjson.dumps(encoded).decode()]))
        grants = []
        for ask, row in zip(asks, answer):
            if isinstance(ask, SlotAsk):
                grants.append(Grant(slots=int(float(row[0])), lost=bool(row[1])))
            elif isinstance(ask, BudgetAsk):
                grants.append(Grant(usd=float(row[0]), spend=float(row[1]), reserved=float(row[2]), lost=bool(row[3])))
            else:
                grants.append(Grant(requests=int(float(row[0])), tokens=int(float(row[1])),
                                    window_requests=int(float(row[2])), window_tokens=int(float(row[3]))))
        return grants

    async def heartbeat(self, owner: str, now: float, stale_after: float) -> int:
        released = int(await self._eval("heartbeat", [owner, repr(now), repr(stale_after)]))
        if released:
            log.warning("state store: released %d reservations of processes not seen for %.0f s",
                        released, stale_after)
        return released

