"""Virtual keys at request time: who is calling, may they, and what they spend.

Rules:
- Auth never touches the store: each process keeps the keys in memory by hash, and looks at
  the store's keys version every `[state] refresh_interval` (0.5 s): a revoked or changed key is
  seen by every worker and instance within that (plus one store round trip).
- admit (order KEYS: after cost tiers, so the routed model is reserved): 403 model_not_allowed;
  then, for a key with rpm/tpm/max_parallel or under any budget, ONE atomic reserve in the store
  (proxy/keys/store.py) of the worst case (prompt tokens x input price + output cap x output
  price; tokens = prompt + output cap): 429 rate_limit_exceeded / budget_exceeded with
  Retry-After, or the reservation and the x-ratelimit-* headers. A key with no limits under no
  budget costs no store round trip at admission.
- Leases (proxy/keys/leases.py): when the request's worst case fits in this process's leases of
  every budget it is under and of its key's rpm/tpm (and, for a stream of a key with
  max_parallel, a stream slot), admit takes it there, without the store. A request the leases
  cannot hold waits for one renewal, then takes the one atomic reserve above; only that refuses
  (a stream refused for max_parallel while other processes lease slots of its key is asked once
  more after REFUSED_RETRY: the slots they do not use are back by then). Its
  x-ratelimit-remaining-* are then this process's view:
  the key's window at the last lease plus what this process has not used of it (other
  processes' use since is not seen). Leases serve only while the store answered the refresh
  within the last second: a store that stops answering is failed closed (or open) as before,
  once a request's own reserve times out; until then up to ~1 s of requests are served from
  allowances already granted (never beyond them).
- settle: the real cost (the served deployment's model, from the provider's usage or what was
  relayed; $0 for a cache hit) goes to x.cost_usd and, without waiting, to the store, which
  releases the reservation in the same step. Runs for every request, refused ones included.
- Store down: 503 store_unavailable (fail closed), or with `fail_open = true` the known keys are
  served without limits or budgets (logged once per outage).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from typing import Any

import trio

from proxy.config import Config
from proxy.core.errors import (AuthenticationFailed, BudgetExceeded, ModelNotAllowed, RateLimitExceeded,
                               StoreUnavailable)
from proxy.keys.leases import REFUSED_RETRY, TICK, Leases, Ticket
from proxy.keys.records import KeyRecord
from proxy.keys.store import WINDOW, Budget, Reserve, Settle, Store, Verdict, period_key
from proxy.server.exchange import Exchange, Principal

log = logging.getLogger("proxy.keys")

DEFAULT_OUTPUT_TOKENS = 4096   # tokens reserved against tpm when neither the request nor the model caps output
MASTER_ID = "master"           # the master key's spend is recorded under this key id
MAX_REMEMBERED = 100_000       # keys whose last remaining budget is kept for the cost tiers


def make_store(config: Config) -> Store:
    if config.state.backend == "redis":
        from proxy.keys.redis_store import RedisStore
        return RedisStore(config.state.url or "")
    from proxy.keys.sqlite_store import SqliteStore
    return SqliteStore(config.state.path)


def _prices(config: Config) -> Any:
    from proxy.accounting.prices import Prices
    return Prices.from_config(config)


def ratelimit_reset(seconds: float) -> bytes:
    """OpenAI's format: "20ms", "1s", "6m0s"."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms".encode()
    whole = int(seconds + 0.999)
    return (f"{whole // 60}m{whole % 60}s" if whole >= 60 else f"{whole}s").encode()


class KeysPolicy:
    def __init__(self, config: Config, store: Store | None = None, prices: Any = None):
        self.config = config
        self.store = store or make_store(config)
        self.prices = prices if prices is not None else _prices(config)
        self.owner = ""  # this process, named in its reservations: made in open (after a fork)
        self._by_hash: dict[str, KeyRecord] = {}
        self._version = -1
        self._loaded = False
        self._down_since: float | None = None
        self._scope: trio.CancelScope | None = None
        self._kill_logged: set[tuple[str, str]] = set()
        self._downgrade = config.budgets.downgrade if config.budgets.on_budget == "downgrade" else {}
        self._priced: dict[str, tuple[str, ...]] = {}
        self.use_leases = True  # False: every limited request reserves in the store (the bench compares)
        self.leases: Leases | None = None
        self._lease_scope: trio.CancelScope | None = None
        self._answered_at = -1e9  # monotonic: the store's last answer to the refresh
        # Each key's budget left after its last settled request: what the cost-tier router (which
        # runs before this policy) reads for its budget floor. Bounded: cleared when it is full.
        self._remaining: dict[str, float] = {}

    # -- life: open at the gateway's startup, in each worker (after the fork) --

    async def open(self) -> None:
        self.owner = "p" + os.urandom(8).hex()
        if self.use_leases:
            self.leases = Leases(self.store, self.owner, self.config.budgets.kill_at)
        try:
            await self.store.open()
            await self.store.heartbeat(self.owner, time.time(), self.config.state.stale_after)
            await self.refresh()
        except StoreUnavailable as e:
            self._store_down(e)
        self._scope = trio.CancelScope()
        trio.lowlevel.spawn_system_task(self._background, name="keys-refresh")
        if self.leases is not None:
            self._lease_scope = trio.CancelScope()
            trio.lowlevel.spawn_system_task(self._lease_loop, name="keys-leases")

    async def aclose(self) -> None:
        if self._scope is not None:
            self._scope.cancel()
        if self._lease_scope is not None:
            self._lease_scope.cancel()
        if self.leases is not None and self._down_since is None:
            await self.leases.release_all()
        try:
            await self.store.flush()
        except StoreUnavailable:
            pass
        await self.store.aclose()

    async def _background(self) -> None:
        assert self._scope is not None
        interval = self.config.state.refresh_interval
        beats = max(1, int(1.0 / interval))
        with self._scope:
            n = 0
            while True:
                await trio.sleep(interval)
                n += 1
                try:
                    await self.refresh()
                    if n % beats == 0:
                        await self.store.heartbeat(self.owner, time.time(), self.config.state.stale_after)
                    if self._down_since is not None:
                        log.warning("state store is back after %.1f s", time.monotonic() - self._down_since)
                        self._down_since = None
                except StoreUnavailable as e:
                    self._store_down(e)
                except Exception:
                    log.exception("keys refresh failed")

    async def _lease_loop(self) -> None:
        assert self._lease_scope is not None and self.leases is not None
        with self._lease_scope:
            while True:
                await trio.sleep(TICK)
                try:
                    await self.leases.tick()
                except StoreUnavailable as e:
                    self._store_down(e)
                except Exception:
                    log.exception("keys leases renewal failed")

    async def refresh(self, *, force: bool = False) -> None:
        version = await self.store.version()
        self._answered_at = time.monotonic()
        if version == self._version and not force:
            return
        version, records = await self.store.load_keys()
        before = self._by_hash
        self._by_hash = {r.hash: r for r in records if not r.revoked}
        if self.leases is not None:  # a revoked or changed key's leases take nothing more
            now = {r.id: r for r in self._by_hash.values()}
            for old in before.values():
                if now.get(old.id) != old:
                    self.leases.drop_key(old.id)
        self._version, self._loaded = version, True

    def _store_down(self, error: Exception) -> None:
        if self.leases is not None:
            self.leases.suspend()  # fail closed (or open) from now on, as without leases
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.error("state store unavailable (%s): %s", error,
                      "serving known keys without limits" if self.config.state.fail_open else "failing closed (503)")

    # -- auth (called by the app for every request on a client route) --

    def authenticate(self, token: bytes) -> Principal:
        if not self._loaded:
            raise StoreUnavailable("the key store is unavailable: virtual keys cannot be checked yet")
        record = self._by_hash.get(hashlib.sha256(token).hexdigest())
        if record is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        if record.expired(time.time()):
            raise AuthenticationFailed("This API key has expired.")
        return Principal("key", record.id, record.team, record)

    # -- the Policy --

    async def admit(self, x: Exchange, request: Any) -> None:
        principal = x.principal
        if principal.kind not in ("key", "master"):
            return
        record: KeyRecord | None = principal.record
        model = request.model if hasattr(request, "model") else request.get("model", x.model)
        note: dict[str, Any] = {"scopes": self._scopes(record)}
        x.notes["keys"] = note  # from here on the request is recorded in spend (refused: $0)
        if record is not None and not (record.allows(x.model) or record.allows(model)):
            raise ModelNotAllowed(f"this key may not use model '{x.model}'", param="model")
        budgets = self._budgets(record, x.principal.team)
        if not budgets and (record is None or not record.limited):
            return
        prompt = int(x.notes.get("prompt_tokens") or 0)
        max_tokens = x.notes.get("max_tokens")
        if max_tokens is None and hasattr(request, "body"):
            max_tokens = request.body.get("max_completion_tokens") or request.body.get("max_tokens")
        leased = (self.leases is not None and self._down_since is None
                  and time.monotonic() - self._answered_at < max(1.0, 2 * self.config.state.refresh_interval))
        if leased and await self._from_lease(x, record, model, budgets, prompt, max_tokens):
            return
        reserve, verdict = await self._reserve(x, record, model, budgets, prompt, max_tokens,
                                               self.config.budgets.kill_at)
        if leased and verdict is not None and not verdict.ok and verdict.leased_elsewhere:
            # Refused for max_parallel while other processes lease slots of the key: those they do
            # not use go back at their next ticks; ask once more then.
            await trio.sleep(REFUSED_RETRY)
            reserve, verdict = await self._reserve(x, record, model, budgets, prompt, max_tokens,
                                                   self.config.budgets.kill_at)
        cheaper = self._downgrade.get(model) if verdict is not None and verdict.code == "budget_exceeded" else None
        if cheaper is not None:
            # Past the kill switch a cheaper model serves until the budget itself is spent.
            first = verdict
            reserve, verdict = await self._reserve(x, record, cheaper, budgets, prompt, max_tokens, 1.0)
            if verdict is not None and verdict.ok:
                self._set_model(request, cheaper)
                x.response_headers.append((b"x-gateway-downgraded", f"{model} -> {cheaper}".encode()))
                note["downgraded"] = cheaper
                self._log_kill(reserve, first, f"downgraded {model} -> {cheaper}")
        if verdict is None:  # the store is down and fail_open
            return
        if record is not None:
            self._headers(x, record, verdict)
        if not verdict.ok:
            note.pop("reservation", None)
            note["refused"] = verdict.code  # metrics count the kill switch's refusals
            if verdict.code == "budget_exceeded":
                self._log_kill(reserve, verdict, "refused")
                raise BudgetExceeded(verdict.reason, retry_after=verdict.retry_after)
            raise RateLimitExceeded(verdict.reason, retry_after=verdict.retry_after)
        note["reserved_usd"] = reserve.usd
        if verdict.remaining_usd is not None:
            note["budget_remaining_usd"] = verdict.remaining_usd

    def _worst_case(self, model: str, budgets: tuple[Budget, ...], prompt: int,
                    max_tokens: int | None) -> tuple[float, int]:
        """(USD, tokens) a request may use at most."""
        usd = 0.0
        if budgets:
            upstream = self._upstream(model)
            usd = max(self.prices.worst_case_usd(m, prompt, max_tokens) for m in upstream)
            if max_tokens is None:
                max_tokens = max(self.prices.info(m).max_output_tokens or 0 for m in upstream) or None
        return usd, prompt + (max_tokens or DEFAULT_OUTPUT_TOKENS)

    async def _from_lease(self, x: Exchange, record: KeyRecord | None, model: str, budgets: tuple[Budget, ...],
                          prompt: int, max_tokens: int | None) -> bool:
        """Admit from this process's leases (True), after at most one renewal; False: ask the store."""
        leases = self.leases
        assert leases is not None
        usd, tokens = self._worst_case(model, budgets, prompt, max_tokens)
        key_id = record.id if record else MASTER_ID
        rpm, tpm = (record.rpm, record.tpm) if record else (None, None)
        parallel = record.max_parallel if record is not None and x.stream else None
        now = time.time()
        ticket = leases.take(budgets, usd, key_id, rpm, tpm, tokens, now, parallel)
        for _ in range(2):  # at most one renewal of its own (after waiting for another's)
            if ticket is not None or not leases.renewable(budgets, key_id, rpm, tpm, parallel):
                break
            try:
                renewed = await leases.renew_for(budgets, usd, key_id, rpm, tpm, tokens, now, parallel)
            except StoreUnavailable as e:
                self._store_down(e)
                return False
            now = time.time()
            ticket = leases.take(budgets, usd, key_id, rpm, tpm, tokens, now, parallel)
            if renewed:
                break
        if ticket is None:
            return False
        note = x.notes["keys"]
        note["lease"] = ticket
        note["reserved_usd"] = usd
        for lease in ticket.leases:
            if lease.budget.scope.startswith("key:"):
                note["budget_remaining_usd"] = lease.budget.limit_usd - lease.spend - lease.reserved + lease.free
        if record is not None and ticket.rate is not None:
            self._headers(x, record, self._lease_view(ticket, now))
        return True

    @staticmethod
    def _lease_view(ticket: Ticket, now: float) -> Verdict:
        """The rate headers' figures from this process's view (see the module's rules)."""
        rate = ticket.rate
        assert rate is not None
        reset = max(0.0, ticket.second + WINDOW - now)
        return Verdict(ok=True, requests=rate.window_requests - max(rate.free_requests, 0),
                       tokens=rate.window_tokens - (max(rate.free_tokens, 0) if rate.tpm else 0),
                       requests_reset=reset, tokens_reset=reset)

    async def _reserve(self, x: Exchange, record: KeyRecord | None, model: str, budgets: tuple[Budget, ...],
                       prompt: int, max_tokens: int | None, kill_at: float) -> tuple[Reserve, Verdict | None]:
        """One atomic reserve in the store; Verdict None = the store is down and fail_open says serve."""
        usd, tokens = self._worst_case(model, budgets, prompt, max_tokens)
        reserve = Reserve(id="r" + os.urandom(8).hex(), owner=self.owner,
                          key_id=record.id if record else MASTER_ID, now=time.time(),
                          tokens=tokens, usd=usd, budgets=budgets,
                          kill_at=kill_at, stream=x.stream,
                          rpm=record.rpm if record else None, tpm=record.tpm if record else None,
                          max_parallel=record.max_parallel if record else None)
        note = x.notes["keys"]
        note["reservation"] = reserve.id  # before the await: settle releases it even if admit is cancelled
        try:
            return reserve, await self.store.reserve(reserve)
        except StoreUnavailable as e:
            del note["reservation"]
            self._store_down(e)
            if self.config.state.fail_open:
                return reserve, None
            raise StoreUnavailable("the key and spend store is unavailable: requests are refused until it "
                                   "is back ([state] fail_open = true serves them unlimited)") from None

    @staticmethod
    def _set_model(request: Any, model: str) -> None:
        if isinstance(request, dict):
            request["model"] = model
        else:  # ChatRequest is frozen for everyone downstream; this is the one rewrite keys make
            object.__setattr__(request, "model", model)

    def last_remaining(self, principal: Principal) -> float | None:
        """The key's budget left after its last request in this process (None: not known yet)."""
        return self._remaining.get(principal.key_id) if principal.key_id is not None else None

    def settle(self, x: Exchange) -> None:
        note = x.notes.get("keys")
        if note is None:
            return
        principal = x.principal
        model = x.model
        served = x.served
        if served is not None and served.model not in ("-", ""):
            model = served.model
        usage = x.usage
        if x.cost_usd is not None:
            cost = x.cost_usd  # accounting (order 15) priced it: the served model, cut streams included
        elif x.cache in ("hit", "stale") or usage is None:
            cost = 0.0
        else:
            cost = self.prices.cost_usd(model, usage)
        x.cost_usd = cost
        if "budget_remaining_usd" in note:
            note["budget_remaining_usd"] += note.get("reserved_usd", 0.0) - cost
            if principal.key_id is not None:
                if len(self._remaining) >= MAX_REMEMBERED and principal.key_id not in self._remaining:
                    self._remaining.clear()
                self._remaining[principal.key_id] = note["budget_remaining_usd"]
        ticket: Ticket | None = note.get("lease")
        leases: tuple[str, ...] = ()
        window = None
        if ticket is not None:
            Leases.give(ticket, cost)
            leases = tuple(lease.id for lease in ticket.leases)
            if ticket.rate is not None and ticket.rate.tpm:
                window = (ticket.second, ticket.tokens)
        self.store.settle_nowait(Settle(
            reservation=note.get("reservation"), key_id=principal.key_id or MASTER_ID, team=principal.team,
            model=model, now=time.time(), cost_usd=cost,
            input_tokens=usage.prompt_tokens if usage and x.cache not in ("hit", "stale") else 0,
            output_tokens=usage.completion_tokens if usage and x.cache not in ("hit", "stale") else 0,
            scopes=note["scopes"], leases=leases, window=window))

    # -- helpers --

    def _upstream(self, model: str) -> tuple[str, ...]:
        """The models a reservation is priced at: every deployment of the route (the dearest one
        is the worst case: routing, retries and failover choose later)."""
        found = self._priced.get(model)
        if found is None:
            route = self.config.route(model)
            found = tuple(dict.fromkeys(d.model or model for d in route.deployments)) if route else (model,)
            if len(self._priced) >= 4096:  # glob routes forward client-chosen names: bounded
                self._priced.clear()
            self._priced[model] = found
        return found

    def _scopes(self, record: KeyRecord | None) -> tuple[str, ...]:
        scopes = ["global", f"key:{record.id if record else MASTER_ID}"]
        if record is not None and record.team:
            scopes.append(f"team:{record.team}")
        return tuple(scopes)

    def _budgets(self, record: KeyRecord | None, team: str | None) -> tuple[Budget, ...]:
        now = time.time()
        out = []
        if record is not None and record.budget_usd is not None:
            out.append(Budget(f"key:{record.id}", period_key(record.budget_period, now), record.budget_usd))
        team_config = self.config.teams.get(team) if team else None
        if team_config is not None and team_config.budget_usd is not None:
            out.append(Budget(f"team:{team}", period_key(team_config.budget_period, now), team_config.budget_usd))
        if self.config.budgets.monthly_usd is not None:
            out.append(Budget("global", period_key("month", now), self.config.budgets.monthly_usd))
        return tuple(out)

    @staticmethod
    def _headers(x: Exchange, record: KeyRecord, verdict: Verdict) -> None:
        headers = x.response_headers
        if record.rpm:
            headers += [(b"x-ratelimit-limit-requests", str(record.rpm).encode()),
                        (b"x-ratelimit-remaining-requests", str(max(0, record.rpm - verdict.requests)).encode()),
                        (b"x-ratelimit-reset-requests", ratelimit_reset(verdict.requests_reset))]
        if record.tpm:
            headers += [(b"x-ratelimit-limit-tokens", str(record.tpm).encode()),
                        (b"x-ratelimit-remaining-tokens", str(max(0, record.tpm - verdict.tokens)).encode()),
                        (b"x-ratelimit-reset-tokens", ratelimit_reset(verdict.tokens_reset))]

    def _log_kill(self, reserve: Reserve, verdict: Verdict, action: str) -> None:
        """One warning line per budget, period and action when its kill switch first acts (per process)."""
        mark = (verdict.reason.split(" (", 1)[0], action)
        if mark not in self._kill_logged and len(self._kill_logged) < 10_000:
            self._kill_logged.add(mark)
            log.warning("kill switch, %s: %s (key %s)", action, verdict.reason, reserve.key_id)
