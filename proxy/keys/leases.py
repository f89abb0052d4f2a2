"""Leases: each process takes allowances from the store in one atomic step and spends them in memory.

Rules:
- A budget lease is a reservation row of this process in the store (proxy/keys/store.py): USD held
  against one budget (key, team or global; one period). A request whose worst case fits in the
  local lease of every budget it is under takes it there (a few µs, no store); its settle gives
  the difference back to the lease and sends the cost to the store, which moves it from the
  lease's hold to the spend in the same step. So at any moment the store's spend + reserved
  counts every USD this process may spend: other processes can never lease or reserve it, and
  total spend never passes what was leased, which never passes the budget (x kill_at).
- A rate lease counts requests and tokens in the key's window in the bucket of its last usable
  second (`second`, at most RATE_SECONDS ahead): units are spent locally only before that second,
  so each leaves the sliding window no earlier than it would have one by one. Unused units are
  given back; a request's reserved tokens are corrected to the real ones by its settle, in the
  lease's bucket, as with a reservation.
- A lease takes at most 1/LEASE_SHARE of what is left, LEASE_REQUESTS requests' worth of the
  request that asked (or twice the requests it served since its last grant, if more: bursts).
  Where that would cover fewer than LEAST_REQUESTS such requests (the end of a budget, a small
  rpm/tpm) no lease is granted: requests go to the store one by one (today's exact reserve:
  nothing is stranded in another process's lease), and the lease is tried again after
  EXACT_RETRY. A request the local leases cannot hold first waits for one renewal (one at a time
  per process), then goes to the store's per-request reserve: only the store refuses.
- In the background (every TICK): leases running low are topped up (the rest given back and a
  new share taken in one step, so a lease shrinks with what is left of the budget), rate leases
  near their last second are renewed if in use, and idle (IDLE), dropped or stale leases give
  back what they do not hold for requests in flight (a budget lease's row is deleted once none
  is in flight).
- A crashed process's budget leases are its reservations: the heartbeat sweep (stale_after)
  releases them. Its rate units leave the window within WINDOW + RATE_SECONDS, as reserved ones do.
- A slot lease holds stream slots of a key with max_parallel (store: a row counting them, added to
  the key's open streams): a stream takes a free slot locally and gives it back at its settle.
  At most 1/SLOT_SHARE of the free slots per grant (max_parallel 1: no lease, per request). Each
  TICK a lease keeps as many slots as its streams used at once since the last tick (`peak`) and
  gives back the rest: a slot this process does not use is held at most two ticks, and a stream
  another process refused because of leased slots is asked once more after REFUSED_RETRY
  (policy.py), when they are back. A key whose streams come and go keeps its slots without a
  store round trip. Nothing is over-admitted: a lease's slots are counted by the store whether
  in use or not.
- Bound: one budget lease per (scope, period) and one rate lease per key in use (plus the closed
  ones until given back); past MAX_LEASES in a table, all of its leases are closed (given back
  and removed by the next ticks).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import trio

from proxy.core.errors import StoreUnavailable
from proxy.keys.store import SLOT_SHARE, WINDOW, Budget, BudgetAsk, Grant, RateAsk, SlotAsk, Store

log = logging.getLogger("proxy.keys.leases")

LEASE_REQUESTS = 64   # a lease holds up to this many worst cases of the request that asked for it
LEAST_REQUESTS = 4    # a lease that would hold fewer is not taken: per-request reserves instead
LOW_REQUESTS = 16     # topped up in the background below this many
RATE_SECONDS = 2      # a rate lease's units are usable until this many seconds after the grant
TICK = 0.2            # seconds between background renewals / returns
IDLE = 1.0            # seconds without use after which a lease is given back
EXACT_RETRY = 1.0     # seconds before a budget or window refused a lease is asked again
REFUSED_RETRY = 2.5 * TICK  # a stream refused for max_parallel while slots were leased asks once more
LEASE_SLOTS = 4       # stream slots a slot lease asks for (or twice the streams since its last grant)
MAX_LEASES = 10_000


@dataclass(slots=True)
class BudgetLease:
    id: str
    budget: Budget
    free: float = 0.0          # may still be taken by requests
    held: float = 0.0          # taken by requests in flight
    need: float = 0.0          # the last worst case asked of it (sizes the lease)
    used_at: float = 0.0       # monotonic
    exact_until: float = 0.0   # monotonic: refused a lease, per-request reserves until then
    spend: float = 0.0         # the store's figures at the last grant (rate headers, remaining budget)
    reserved: float = 0.0
    granted: bool = False      # the row exists in the store
    takes: int = 0             # requests since the last grant (a busy lease asks for more)
    closed: bool = False


@dataclass(slots=True)
class RateLease:
    key_id: str
    rpm: int | None
    tpm: int | None
    second: int = 0            # usable while time.time() < second; its units are counted in that bucket
    free_requests: int = 0
    free_tokens: int = 0
    need_tokens: int = 0
    used_at: float = 0.0
    exact_until: float = 0.0
    window_requests: int = 0   # the key's window at the last grant, this lease's units included
    window_tokens: int = 0
    takes: int = 0
    closed: bool = False


@dataclass(slots=True)
class SlotLease:
    id: str
    key_id: str
    max_parallel: int
    free: int = 0              # slots no stream of this process uses
    held: int = 0              # slots taken by streams in flight
    peak: int = 0              # the most held at once since the last tick
    used_at: float = 0.0
    exact_until: float = 0.0
    granted: bool = False      # the row exists in the store
    takes: int = 0
    closed: bool = False


@dataclass(slots=True)
class Ticket:
    """What one request took locally: given back (the difference) by its settle."""
    usd: float
    leases: list[BudgetLease] = field(default_factory=list)
    rate: RateLease | None = None
    tokens: int = 0
    second: int = 0            # the rate lease's bucket the tokens were counted in
    slot: SlotLease | None = None  # the stream slot it holds


class Leases:
    def __init__(self, store: Store, owner: str, kill_at: float):
        self.store = store
        self.owner = owner
        self.kill_at = kill_at
        self.budgets: dict[tuple[str, str], BudgetLease] = {}
        self.rates: dict[str, RateLease] = {}
        self.slots: dict[str, SlotLease] = {}
        self._renewing: trio.Event | None = None
        self.local = 0             # requests admitted from leases (for tests and the bench)
        self.renewals = 0          # store round trips for leases

    # -- the hot path: no store, no await --

    def take(self, budgets: tuple[Budget, ...], usd: float, key_id: str, rpm: int | None, tpm: int | None,
             tokens: int, now: float, parallel: int | None = None) -> Ticket | None:
        """The request's worst case from the local leases, all or nothing; None: ask the store.
        parallel: the key's max_parallel when the request is a stream (it takes a slot)."""
        mono = time.monotonic()
        slot = None
        if parallel:
            slot = self.slots.get(key_id)
            if slot is None or slot.closed or slot.max_parallel != parallel or slot.free < 1:
                return None
        rate = None
        if rpm or tpm:
            rate = self.rates.get(key_id)
            if (rate is None or rate.closed or rate.rpm != rpm or rate.tpm != tpm or now >= rate.second
                    or rate.free_requests < 1 or rate.free_tokens < tokens):
                if rate is not None:
                    rate.need_tokens = tokens
                return None
        leases = []
        for budget in budgets:
            lease = self.budgets.get((budget.scope, budget.period))
            if lease is None or lease.closed or lease.budget.limit_usd != budget.limit_usd or lease.free < usd:
                if lease is not None:
                    lease.need = usd
                return None
            leases.append(lease)
        for lease in leases:
            lease.free -= usd
            lease.held += usd
            lease.need, lease.used_at = usd, mono
            lease.takes += 1
        if rate is not None:
            rate.free_requests -= 1
            rate.free_tokens -= tokens
            rate.need_tokens, rate.used_at = tokens, mono
            rate.takes += 1
        if slot is not None:
            slot.free -= 1
            slot.held += 1
            slot.peak = max(slot.peak, slot.held)
            slot.used_at = mono
            slot.takes += 1
        self.local += 1
        return Ticket(usd, leases, rate, tokens, rate.second if rate is not None else 0, slot)

    @staticmethod
    def give(ticket: Ticket, cost: float) -> None:
        """The request is over: what it did not spend of its worst case goes back to its leases."""
        for lease in ticket.leases:
            lease.held -= ticket.usd
            lease.free += ticket.usd - cost
        if ticket.slot is not None:
            ticket.slot.held -= 1
            ticket.slot.free += 1

    def renewable(self, budgets: tuple[Budget, ...], key_id: str, rpm: int | None, tpm: int | None,
                  parallel: int | None = None) -> bool:
        """Would a renewal help this request (no lease refused in the last EXACT_RETRY)?"""
        mono = time.monotonic()
        if parallel:
            if parallel < SLOT_SHARE:
                return False
            slot = self.slots.get(key_id)
            if slot is not None and slot.exact_until > mono and slot.max_parallel == parallel:
                return False
        rate = self.rates.get(key_id) if (rpm or tpm) else None
        if rate is not None and rate.exact_until > mono and rate.rpm == rpm and rate.tpm == tpm:
            return False
        for budget in budgets:
            lease = self.budgets.get((budget.scope, budget.period))
            if lease is not None and lease.exact_until > mono and lease.budget.limit_usd == budget.limit_usd:
                return False
        return True

    # -- renewals: one at a time per process --

    async def renew_for(self, budgets: tuple[Budget, ...], usd: float, key_id: str, rpm: int | None,
                        tpm: int | None, tokens: int, now: float, parallel: int | None = None) -> bool:
        """One synchronous renewal of what this request lacks (True), or a wait for the one under
        way (False: the caller looks again, and may then renew once itself)."""
        if self._renewing is not None:
            await self._renewing.wait()
            return False
        asks: list[BudgetAsk | RateAsk] = []
        targets: list[BudgetLease | RateLease] = []
        for budget in budgets:
            lease = self._budget_lease(budget)
            lease.need = usd
            if lease.free < usd:
                asks.append(self._top_up(lease))
                targets.append(lease)
        if rpm or tpm:
            rate = self.rates.get(key_id)
            if rate is None or rate.rpm != rpm or rate.tpm != tpm:
                if rate is not None:
                    rate.closed = True  # limits changed: given back by the next tick
                    self.rates["~" + key_id] = rate
                rate = RateLease(key_id, rpm, tpm, used_at=time.monotonic())
                self._bounded(self.rates)
                self.rates[key_id] = rate
            rate.need_tokens = tokens
            if now >= rate.second or rate.free_requests < 1 or rate.free_tokens < tokens:
                asks.append(self._renew_rate(rate, now))
                targets.append(rate)
        if parallel:
            slot = self._slot_lease(key_id, parallel)
            if slot.free < 1:
                many = max(LEASE_SLOTS, 2 * slot.takes)
                slot.takes = 0
                asks.append(SlotAsk(slot.id, key_id, parallel, want=many, fresh=not slot.granted))
                targets.append(slot)
        await self._run(asks, targets)
        return True

    def _slot_lease(self, key_id: str, parallel: int) -> SlotLease:
        slot = self.slots.get(key_id)
        if slot is None or slot.closed or slot.max_parallel != parallel:
            if slot is not None:
                slot.closed = True
                self.slots["~" + slot.id] = slot  # still given back by the tick
            self._bounded(self.slots)
            # "s" + owner: the store tells a refused stream whether other processes lease slots
            slot = SlotLease(f"s{self.owner}.{os.urandom(6).hex()}", key_id, parallel, used_at=time.monotonic())
            self.slots[key_id] = slot
        return slot

    async def _run(self, asks: list, targets: list) -> None:
        if not asks:
            return
        self._renewing = done = trio.Event()
        try:
            self.renewals += 1
            grants = await self.store.lease(self.owner, time.time(), asks)
        except BaseException:
            # Applied or not (a timeout, a cancelled wait): what was given back is not taken
            # again locally (if the store still holds it, the lease's close releases it), a grant
            # not seen is not spent (held in the store until the close): never more than leased.
            for ask, target in zip(asks, targets):
                if isinstance(ask, BudgetAsk) and ask.close:  # closed next time
                    target.granted = True
                    self.budgets[("~" + target.id, target.budget.period)] = target
                elif isinstance(ask, SlotAsk) and ask.close:
                    target.granted = True
                    self.slots["~" + target.id] = target
            raise
        finally:
            self._renewing = None
            done.set()
        for ask, target, grant in zip(asks, targets, grants):
            if isinstance(ask, BudgetAsk):
                self._granted_budget(target, ask, grant)
            elif isinstance(ask, SlotAsk):
                self._granted_slots(target, ask, grant)
            else:
                self._granted_rate(target, ask, grant)

    def _budget_lease(self, budget: Budget) -> BudgetLease:
        lease = self.budgets.get((budget.scope, budget.period))
        if lease is None or lease.closed or lease.budget.limit_usd != budget.limit_usd:
            if lease is not None:
                lease.closed = True
                self.budgets[("~" + lease.id, budget.period)] = lease  # still given back by the tick
            self._bounded(self.budgets)
            lease = BudgetLease("l" + os.urandom(8).hex(), budget, used_at=time.monotonic())
            self.budgets[(budget.scope, budget.period)] = lease
        return lease

    def _top_up(self, lease: BudgetLease) -> BudgetAsk:
        """Give back what is left and take a new share in one step: near the end of a budget the
        share is refused and the rest is not stranded here (per-request reserves can use it)."""
        back = max(lease.free, 0.0)
        lease.free -= back
        many = max(LEASE_REQUESTS, 2 * lease.takes)  # the requests since the last grant, twice: bursts
        lease.takes = 0
        return BudgetAsk(lease.id, lease.budget, self.kill_at, back=back, want=lease.need * many,
                         least=lease.need * LEAST_REQUESTS, fresh=not lease.granted)

    def _renew_rate(self, rate: RateLease, now: float) -> RateAsk:
        """A new rate lease for the next RATE_SECONDS; the old one's unused units go back."""
        tokens = max(rate.need_tokens, 1)
        many = max(LEASE_REQUESTS, 2 * rate.takes)
        rate.takes = 0
        ask = RateAsk(rate.key_id, rate.rpm, rate.tpm, second=int(now) + RATE_SECONDS,
                      want_requests=many, want_tokens=tokens * many if rate.tpm else 0,
                      least_requests=LEAST_REQUESTS, least_tokens=tokens * LEAST_REQUESTS if rate.tpm else 0,
                      back_second=rate.second, back_requests=max(rate.free_requests, 0),
                      back_tokens=max(rate.free_tokens, 0) if rate.tpm else 0)
        rate.free_requests = rate.free_tokens = 0
        return ask

    def _granted_budget(self, lease: BudgetLease, ask: BudgetAsk, grant: Grant) -> None:
        if ask.close:
            return
        if grant.lost:  # the store released it (this process was taken for gone): start over
            lease.free, lease.granted, lease.closed = 0.0, False, True
            log.warning("budget lease of %s was released by the store; taking a new one", lease.budget.scope)
            return
        lease.spend, lease.reserved = grant.spend, grant.reserved
        if grant.usd > 0:
            lease.free += grant.usd
            lease.granted = True
        elif ask.want > 0:
            lease.exact_until = time.monotonic() + EXACT_RETRY

    @staticmethod
    def _granted_slots(slot: SlotLease, ask: SlotAsk, grant: Grant) -> None:
        if ask.close:
            return
        if grant.lost:  # released by the store: its streams in flight are no longer counted there
            slot.free, slot.granted, slot.closed = 0, False, True
            log.warning("stream slot lease of key %s was released by the store; taking a new one", slot.key_id)
            return
        if grant.slots > 0:
            slot.free += grant.slots
            slot.granted = True
        elif ask.want > 0:
            slot.exact_until = time.monotonic() + EXACT_RETRY

    @staticmethod
    def _granted_rate(rate: RateLease, ask: RateAsk, grant: Grant) -> None:
        rate.window_requests, rate.window_tokens = grant.window_requests, grant.window_tokens
        if grant.requests > 0:
            rate.second = ask.second
            rate.free_requests = grant.requests
            rate.free_tokens = grant.tokens if rate.tpm else 1 << 62
        else:
            rate.second = ask.second  # nothing counted there: nothing to give back
            rate.exact_until = time.monotonic() + EXACT_RETRY

    # -- the background: top up, renew, give back --

    async def tick(self) -> None:
        """Every TICK. Raises StoreUnavailable when the store does not answer."""
        if self._renewing is not None:
            return
        mono, now = time.monotonic(), time.time()
        asks: list[BudgetAsk | RateAsk] = []
        targets: list[BudgetLease | RateLease] = []
        for name, lease in list(self.budgets.items()):
            if lease.closed or mono - lease.used_at > IDLE:
                if not lease.granted:
                    if lease.held <= 0:
                        del self.budgets[name]
                elif lease.held <= 0:  # nothing in flight: drop the row and whatever it still holds
                    asks.append(BudgetAsk(lease.id, lease.budget, self.kill_at, close=True))
                    targets.append(lease)
                    del self.budgets[name]
                    lease.free, lease.granted, lease.closed = 0.0, False, True
                elif lease.free > 0:
                    asks.append(BudgetAsk(lease.id, lease.budget, self.kill_at, back=lease.free, fresh=False))
                    targets.append(lease)
                    lease.free = 0.0
            elif lease.free < lease.need * LOW_REQUESTS and lease.exact_until <= mono:
                asks.append(self._top_up(lease))
                targets.append(lease)
        for name, rate in list(self.rates.items()):
            if rate.closed or mono - rate.used_at > IDLE:
                if rate.free_requests > 0 and now < rate.second + WINDOW:
                    asks.append(RateAsk(rate.key_id, rate.rpm, rate.tpm, second=rate.second, back_second=rate.second,
                                        back_requests=rate.free_requests, back_tokens=max(rate.free_tokens, 0)
                                        if rate.tpm else 0))
                    targets.append(rate)
                del self.rates[name]
                rate.free_requests = rate.free_tokens = 0
            elif (now >= rate.second - 1 or rate.free_requests < LOW_REQUESTS
                  or (rate.tpm and rate.free_tokens < rate.need_tokens * LOW_REQUESTS)) and rate.exact_until <= mono:
                asks.append(self._renew_rate(rate, now))
                targets.append(rate)
        for name, slot in list(self.slots.items()):
            # Slots beyond what the streams used at once since the last tick go back (another
            # process may be waiting for them); a lease with no stream in flight, closed or idle,
            # is dropped with its row.
            back = slot.free if slot.closed else min(slot.free, slot.held + slot.free - slot.peak)
            slot.peak = slot.held
            if slot.held <= 0 and (slot.closed or mono - slot.used_at > IDLE):
                if slot.granted:
                    asks.append(SlotAsk(slot.id, slot.key_id, slot.max_parallel, close=True))
                    targets.append(slot)
                del self.slots[name]
                slot.free, slot.granted, slot.closed = 0, False, True
            elif back > 0 and slot.granted:
                asks.append(SlotAsk(slot.id, slot.key_id, slot.max_parallel, back=back, fresh=False))
                targets.append(slot)
                slot.free -= back
        await self._run(asks, targets)

    def drop_key(self, key_id: str) -> None:
        """The key was revoked or changed: its leases take nothing more and are given back by the tick."""
        for name, lease in self.budgets.items():
            if name[0] == f"key:{key_id}":
                lease.closed = True
        rate = self.rates.get(key_id)
        if rate is not None:
            rate.closed = True
        slot = self.slots.get(key_id)
        if slot is not None:
            slot.closed = True

    def suspend(self) -> None:
        """The store does not answer: nothing more is taken locally (requests fail closed as before);
        what the leases hold stays held in the store and is given back once it answers (tick)."""
        for lease in self.budgets.values():
            lease.closed = True
        for rate in self.rates.values():
            rate.closed = True
        for slot in self.slots.values():
            slot.closed = True

    async def release_all(self) -> None:
        """At shutdown: give back everything not in flight."""
        self.suspend()
        for lease in self.budgets.values():
            lease.used_at = -IDLE * 2
        with trio.move_on_after(2):
            try:
                await self.tick()
            except StoreUnavailable:
                pass

    def _bounded(self, table: dict) -> None:
        if len(table) >= MAX_LEASES:
            for lease in table.values():
                lease.closed = True
            log.warning("more than %d leases: all are given back", MAX_LEASES)
