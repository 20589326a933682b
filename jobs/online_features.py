"""The ETL's features, computed one event at a time for online scoring.

:mod:`jobs.etl` computes every feature from the whole table with Spark windows; a server
sees events one request at a time. :class:`OnlineFeatures` keeps per-entity state in a
:class:`FeatureStore` and returns, for each event, exactly what ``build_features`` would
have written for it had the same events been in one table:

* events are ordered by the ETL's key ``(floor(click_time in ms), rank)``, where the rank
  counts the events already seen in the same millisecond (the ETL ranks them by event
  id; a request's events are sorted by ``(ms, event_id)`` before they touch the state,
  so events of one millisecond agree with the ETL when they arrive in event-id order);
* windowed counts are the number of events of the entity whose key lies in
  ``[key - W s, key]``, the event itself included (the boundary millisecond counts only
  the events whose rank is not below the current one, as in the ETL's ``rangeBetween``);
* gaps are seconds between the event and the entity's previous event by that order, or
  :data:`~jobs.common.features.NO_PREVIOUS_CLICK_S` without one;
* distinct devices and apps per IP count the values seen so far, the current one included;
* ``hour_of_day`` is the UTC hour, ``ip_subnet`` the first three dot-separated parts of
  the IP string, and categoricals are cast to strings the way Spark casts them.

Late and repeated events. An event older than an entity's newest one is still scored:
its features are computed as of its own key against the state held (so they match the
ETL provided it is at most :data:`DEFAULT_LATENESS_S` late), and it is inserted at its
place, so later events count it as the ETL would. Events already scored in the past are
not rescored. An event whose id was already seen in the same millisecond (a retried
request) is scored again from the state without being counted twice.

Two stores hold the state: :class:`MemoryFeatureStore` in the serving process (the
default) and :class:`RedisFeatureStore`, shared by every replica, when
``ADFRAUD_REDIS_URL`` is set.
"""

from __future__ import annotations

import bisect
import datetime as dt
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from jobs.common import features
from jobs.common.datasets import DatasetSpec
from jobs.common.features import Preprocessor

logger = logging.getLogger(__name__)

# Redis server for the shared feature store, e.g. redis://127.0.0.1:6379/0; unset keeps
# the state in the serving process.
REDIS_URL_ENV_VAR = "ADFRAUD_REDIS_URL"

# Prefix of every Redis key the feature store writes.
REDIS_PREFIX_ENV_VAR = "ADFRAUD_REDIS_PREFIX"
DEFAULT_REDIS_PREFIX = "adfraud:features"

# How late (in event time) an event may arrive and still get the ETL's exact features:
# histories keep this much beyond their longest window, tie ranks this long.
LATENESS_S_ENV_VAR = "ADFRAUD_ONLINE_LATENESS_S"
DEFAULT_LATENESS_S = 600

# Idle time after which an entity's whole state is dropped (event time in memory, wall
# time in Redis). 0 keeps it forever, as the ETL does ("distinct so far", gaps of any
# length); production should bound it, e.g. NO_PREVIOUS_CLICK_S + 1 day.
STATE_TTL_S_ENV_VAR = "ADFRAUD_ONLINE_STATE_TTL_S"
DEFAULT_STATE_TTL_S = 0

# Must match jobs.etl: order key = time in ms * TIE_SLOTS + rank within the millisecond.
TIE_SLOTS = 1 << 20
MS_PER_S = 1_000
US_PER_MS = 1_000
US_PER_HOUR = 3_600_000_000

# Histories are compacted once this many entries have fallen out of their retention.
_COMPACT_AFTER = 64
# The memory store looks for idle entities every this many events (with a state TTL).
_SWEEP_EVERY = 4_096


# ---------------------------------------------------------------------------------------
# What is computed, from jobs.common.features


@dataclass(frozen=True)
class EntityGroup:
    """One entity kind (a tuple of roles) with the windows and gap computed over it.

    :param roles: spec roles that make up the entity, e.g. ``("ip", "device")``.
    :param windows: ``(feature name, window seconds)`` counted over the entity's history.
    :param gap_feature: the seconds-since-previous feature of this entity, if any.
    :param retention_ms: how much history (event time) the store keeps per entity.
    """

    roles: tuple[str, ...]
    windows: tuple[tuple[str, int], ...]
    gap_feature: str | None
    retention_ms: int

    @property
    def name(self) -> str:
        return "-".join(self.roles)


@dataclass(frozen=True)
class FeaturePlan:
    """Every stateful feature of :mod:`jobs.common.features`, grouped by entity.

    The first group is always ``("ip",)``: its history tells whether an event is the
    newest of its IP, which the distinct counts (kept per IP) need.
    """

    groups: tuple[EntityGroup, ...]
    distinct: tuple[tuple[str, str], ...]

    @classmethod
    def build(cls, lateness_s: int) -> FeaturePlan:
        """The plan of the current feature definitions, histories kept ``lateness_s`` past
        their longest window."""
        windows: dict[tuple[str, ...], list[tuple[str, int]]] = {("ip",): []}
        gaps: dict[tuple[str, ...], str] = {}
        for name, entity, window_s in features.WINDOW_COUNTS:
            windows.setdefault(tuple(entity), []).append((name, window_s))
        for name, entity in features.GAP_FEATURES:
            windows.setdefault(tuple(entity), [])
            gaps[tuple(entity)] = name
        groups = []
        for roles, wins in windows.items():
            longest = max((w for _, w in wins), default=0)
            groups.append(EntityGroup(roles, tuple(wins), gaps.get(roles), (longest + lateness_s) * MS_PER_S))
        return cls(tuple(groups), tuple(features.DISTINCT_FEATURES))


class Observation(NamedTuple):
    """One event as the store sees it.

    :param ms: event time in whole milliseconds (floored).
    :param ts_us: event time in microseconds.
    :param event_id: the event id (ranks ties, detects repeats).
    :param entities: per plan group, the tuple of the entity's role values.
    :param distinct: per distinct feature, the value of its role.
    """

    ms: int
    ts_us: int
    event_id: Any
    entities: tuple[tuple[Any, ...], ...]
    distinct: tuple[Any, ...]


class StoreResult(NamedTuple):
    """What the store returns for one observation.

    :param rank: the event's rank among the events of its millisecond.
    :param repeated: True when the event id had already been seen in that millisecond.
    :param counts: the window counts of every plan group, group after group, in order.
    :param previous_us: per plan group, the time of the entity's previous event, or None.
    :param distinct: per distinct feature, the number of distinct values so far.
    """

    rank: int
    repeated: bool
    counts: tuple[int, ...]
    previous_us: tuple[int | None, ...]
    distinct: tuple[int, ...]


class FeatureStore:
    """Per-entity state behind :class:`OnlineFeatures`.

    :meth:`observe` takes a batch of observations in event order, updates the state with
    each in turn and returns each one's :class:`StoreResult`.
    """

    name = "abstract"
    # True when observe() waits on the network: callers on an event loop hand it to a thread.
    blocking_io = False

    def observe(self, batch: Sequence[Observation]) -> list[StoreResult]:
        """Update the state with each observation in turn; one result per observation."""
        raise NotImplementedError

    def close(self) -> None:
        """Release connections, if any."""


# ---------------------------------------------------------------------------------------
# In-process store


class _History:
    """Order keys and times of one entity's retained events, ascending."""

    __slots__ = ("keys", "times")

    def __init__(self) -> None:
        self.keys: list[int] = []
        self.times: list[int] = []


class MemoryFeatureStore(FeatureStore):
    """State in this process: sorted key lists per entity, dicts of first sightings per IP.

    Thread-safe (one lock around each batch). The state of an entity is bounded by its
    longest window plus the lateness allowance; with a state TTL, entities idle longer
    than it (in event time) are dropped altogether.

    :param plan: the features to maintain.
    :param lateness_s: see :data:`DEFAULT_LATENESS_S`.
    :param state_ttl_s: see :data:`DEFAULT_STATE_TTL_S`.
    """

    name = "memory"

    def __init__(self, plan: FeaturePlan, lateness_s: int = DEFAULT_LATENESS_S, state_ttl_s: int = 0) -> None:
        self.plan = plan
        self._lateness_ms = lateness_s * MS_PER_S
        self._ttl_keys = state_ttl_s * MS_PER_S * TIE_SLOTS
        # Per group: window lengths and retention in order-key units.
        self._spans = [tuple(w * MS_PER_S * TIE_SLOTS for _, w in g.windows) for g in plan.groups]
        self._retention = [g.retention_ms * TIE_SLOTS for g in plan.groups]
        self._histories: list[OrderedDict[tuple, _History]] = [OrderedDict() for _ in plan.groups]
        self._first_seen: list[dict[Any, dict[Any, int]]] = [{} for _ in plan.distinct]
        self._ties: OrderedDict[int, dict[Any, int]] = OrderedDict()
        self._newest_ms: int | None = None
        self._since_sweep = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Number of IPs with state."""
        return len(self._histories[0])

    def observe(self, batch: Sequence[Observation]) -> list[StoreResult]:
        with self._lock:
            return [self._observe(obs) for obs in batch]

    def _rank(self, obs: Observation) -> tuple[int, bool]:
        tie = self._ties.get(obs.ms)
        if tie is None:
            tie = self._ties[obs.ms] = {}
        rank = tie.get(obs.event_id)
        if rank is not None:
            return rank, True
        rank = tie[obs.event_id] = len(tie)
        if rank >= TIE_SLOTS:
            raise ValueError(f"more than {TIE_SLOTS} events in the millisecond {obs.ms}")
        if self._newest_ms is None or obs.ms > self._newest_ms:
            self._newest_ms = obs.ms
            # Ranks are kept as long as an event may be late.
            while self._ties and next(iter(self._ties)) < obs.ms - self._lateness_ms:
                self._ties.popitem(last=False)
        return rank, False

    def _observe(self, obs: Observation) -> StoreResult:
        rank, repeated = self._rank(obs)
        okey = obs.ms * TIE_SLOTS + rank
        counts: list[int] = []
        previous: list[int | None] = []
        ip_is_newest = True
        bisect_left, bisect_right = bisect.bisect_left, bisect.bisect_right
        for index, entity in enumerate(obs.entities):
            histories = self._histories[index]
            hist = histories.get(entity)
            if hist is None:
                hist = histories[entity] = _History()
            keys, times = hist.keys, hist.times

            # Insert at its place (the end, unless late); a repeat is already there.
            if not repeated:
                if not keys or okey > keys[-1]:
                    keys.append(okey)
                    times.append(obs.ts_us)
                else:
                    at = bisect_left(keys, okey)
                    keys.insert(at, okey)
                    times.insert(at, obs.ts_us)
            newest = bool(keys) and keys[-1] == okey
            if newest and self._ttl_keys:
                histories.move_to_end(entity)
            if index == 0:
                ip_is_newest = newest

            # Counts over [key - W, key] and the previous event by key.
            at = len(keys) - 1 if newest else bisect_left(keys, okey)
            hi = at + 1 if newest else bisect_right(keys, okey)
            for span in self._spans[index]:
                counts.append(hi - bisect_left(keys, okey - span))
            previous.append(times[at - 1] if at > 0 else None)

            # Drop what no window (or allowed lateness) can reach any more.
            if newest:
                stale = bisect_left(keys, okey - self._retention[index])
                if stale >= _COMPACT_AFTER or (stale and 4 * stale >= len(keys)):
                    del keys[:stale]
                    del times[:stale]

        distinct: list[int] = []
        ip = obs.entities[0]
        for index, value in enumerate(obs.distinct):
            seen = self._first_seen[index].get(ip)
            if seen is None:
                seen = self._first_seen[index][ip] = {}
            first = seen.get(value)
            if first is None or okey < first:
                seen[value] = okey
            distinct.append(len(seen) if ip_is_newest else sum(1 for k in seen.values() if k <= okey))

        self._since_sweep += 1
        if self._ttl_keys and self._since_sweep >= _SWEEP_EVERY:
            self._sweep(okey)
        return StoreResult(rank, repeated, tuple(counts), tuple(previous), tuple(distinct))

    def _sweep(self, okey: int) -> None:
        """Drop the entities whose newest event is older than the state TTL."""
        self._since_sweep = 0
        horizon = okey - self._ttl_keys
        dropped = 0
        for index, histories in enumerate(self._histories):
            while histories:
                entity, hist = next(iter(histories.items()))
                if hist.keys and hist.keys[-1] >= horizon:
                    break
                histories.popitem(last=False)
                dropped += 1
                if index == 0:
                    for seen in self._first_seen:
                        seen.pop(entity, None)
        if dropped:
            logger.debug("dropped the state of %d idle entities", dropped)


# ---------------------------------------------------------------------------------------
# Redis store

# One event, atomically. Order keys never pass through Lua numbers (doubles): a member is
# "<ms, 15 digits><rank, 7 digits>:<time in us>", all scores are 0 and every range is
# lexicographic, which is the numeric order of (ms, rank) for ranks below 10**7.
#
# KEYS[1]            tie hash of the millisecond: "n" = events seen, "e:<id>" = an event's rank
# KEYS[2 .. 1+g]     entity histories (sorted sets), one per plan group
# KEYS[2+g .. ]      distinct-value hashes of the IP: value -> first order key
# ARGV               ms, ts_us, event id, tie ttl ms, state ttl ms (0 = none), g, then per
#                    group: n_windows, prune-below ms, window lower-bound ms ...; then the
#                    distinct values
# Returns            rank, repeated, per group: counts ..., previous member or ""; then the
#                    distinct counts.
_OBSERVE_LUA = """
local ms, ts, eid = ARGV[1], ARGV[2], ARGV[3]
local state_ttl = tonumber(ARGV[5])
local rank = redis.call('HGET', KEYS[1], 'e:' .. eid)
local repeated = 1
if not rank then
  repeated = 0
  rank = redis.call('HINCRBY', KEYS[1], 'n', 1) - 1
  redis.call('HSET', KEYS[1], 'e:' .. eid, rank)
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
rank = tonumber(rank)
local r7 = string.format('%07d', rank)
local okey = ms .. r7
local out = {rank, repeated}
local g = tonumber(ARGV[6])
local a = 7
local ip_is_newest = true
for i = 1, g do
  local key = KEYS[1 + i]
  local nw = tonumber(ARGV[a])
  local prune_below = ARGV[a + 1]
  a = a + 2
  if repeated == 0 then
    redis.call('ZADD', key, 0, okey .. ':' .. ts)
  end
  local top = redis.call('ZRANGE', key, -1, -1)[1]
  local newest = string.sub(top, 1, 22) == okey
  if i == 1 then ip_is_newest = newest end
  for w = 1, nw do
    out[#out + 1] = redis.call('ZLEXCOUNT', key, '[' .. ARGV[a] .. r7, '(' .. okey .. ';')
    a = a + 1
  end
  out[#out + 1] = redis.call('ZREVRANGEBYLEX', key, '(' .. okey, '-', 'LIMIT', 0, 1)[1] or ''
  if newest then
    redis.call('ZREMRANGEBYLEX', key, '-', '(' .. prune_below)
  end
  if state_ttl > 0 then redis.call('PEXPIRE', key, state_ttl) end
end
for j = 1, #KEYS - 1 - g do
  local h = KEYS[1 + g + j]
  local v = ARGV[a]
  a = a + 1
  local first = redis.call('HGET', h, v)
  if (not first) or okey < first then redis.call('HSET', h, v, okey) end
  if ip_is_newest then
    out[#out + 1] = redis.call('HLEN', h)
  else
    local n = 0
    for _, k in ipairs(redis.call('HVALS', h)) do
      if k <= okey then n = n + 1 end
    end
    out[#out + 1] = n
  end
  if state_ttl > 0 then redis.call('PEXPIRE', h, state_ttl) end
end
return out
"""

_MS_DIGITS = 15


def _encode(values: Iterable[Any]) -> str:
    """An unambiguous key fragment for a tuple of entity values."""
    parts = []
    for value in values:
        if value is None:
            parts.append("~")
        else:
            text = str(value)
            parts.append(f"{len(text)}#{text}")
    return ":".join(parts)


class RedisFeatureStore(FeatureStore):
    """State in Redis, shared by every serving replica.

    Per entity a sorted set of its retained events, per IP and role a hash of first
    sightings, per millisecond a hash of tie ranks. Each event is one Lua script run
    (atomic), a request's events one pipelined round trip. Needs one Redis server (or a
    cluster whose keys of one event share a slot, which this key layout does not ensure).

    :param url: ``redis://host:port/db``.
    :param plan: the features to maintain.
    :param namespace: the key prefix, which should include the feature spec hash.
    :param lateness_s: see :data:`DEFAULT_LATENESS_S`.
    :param state_ttl_s: see :data:`DEFAULT_STATE_TTL_S` (wall time here).
    """

    name = "redis"
    blocking_io = True

    def __init__(
        self,
        url: str,
        plan: FeaturePlan,
        namespace: str,
        lateness_s: int = DEFAULT_LATENESS_S,
        state_ttl_s: int = 0,
    ) -> None:
        import redis  # imported here: only the Redis store needs the client

        self.plan = plan
        self.namespace = namespace
        self._client = redis.Redis.from_url(url)
        self._script = self._client.register_script(_OBSERVE_LUA)
        self._tie_ttl_ms = max(lateness_s, 1) * MS_PER_S * 2
        self._state_ttl_ms = state_ttl_s * MS_PER_S
        where = self._client.connection_pool.connection_kwargs
        logger.info(
            "feature state in Redis at %s:%s/%s under %s",
            where.get("host"),
            where.get("port"),
            where.get("db"),
            namespace,
        )

    def ping(self) -> bool:
        """True when the server answers."""
        return bool(self._client.ping())

    def _call(self, obs: Observation, pipe) -> None:
        ns = self.namespace
        ms_text = f"{obs.ms:0{_MS_DIGITS}d}"
        if obs.ms < 0 or len(ms_text) > _MS_DIGITS:
            raise ValueError(f"event time {obs.ms} ms is outside what the Redis store can order")
        keys = [f"{ns}:tie:{obs.ms}"]
        args: list[Any] = [
            ms_text,
            obs.ts_us,
            _encode([obs.event_id]),
            self._tie_ttl_ms,
            self._state_ttl_ms,
            len(self.plan.groups),
        ]
        for group, entity in zip(self.plan.groups, obs.entities, strict=True):
            keys.append(f"{ns}:h:{group.name}:{_encode(entity)}")
            args += [len(group.windows), f"{max(obs.ms - group.retention_ms, 0):0{_MS_DIGITS}d}"]
            args += [f"{max(obs.ms - w * MS_PER_S, 0):0{_MS_DIGITS}d}" for _, w in group.windows]
        ip = _encode(obs.entities[0])
        for (_, role), value in zip(self.plan.distinct, obs.distinct, strict=True):
            keys.append(f"{ns}:d:{role}:{ip}")
            args.append(_encode([value]))
        self._script(keys=keys, args=args, client=pipe)

    def observe(self, batch: Sequence[Observation]) -> list[StoreResult]:
        if not batch:
            return []
        pipe = self._client.pipeline(transaction=False)
        for obs in batch:
            self._call(obs, pipe)
        replies = pipe.execute()
        return [self._parse(reply) for reply in replies]

    def _parse(self, reply: list[Any]) -> StoreResult:
        rank, repeated = int(reply[0]), bool(int(reply[1]))
        if rank >= TIE_SLOTS:
            raise ValueError(f"more than {TIE_SLOTS} events in one millisecond")
        at = 2
        counts: list[int] = []
        previous: list[int | None] = []
        for group in self.plan.groups:
            n = len(group.windows)
            counts.extend(int(x) for x in reply[at : at + n])
            member = reply[at + n]
            at += n + 1
            if isinstance(member, bytes):
                member = member.decode()
            previous.append(int(member.split(":", 1)[1]) if member else None)
        distinct = tuple(int(x) for x in reply[at:])
        return StoreResult(rank, repeated, tuple(counts), tuple(previous), distinct)

    def clear(self) -> int:
        """Delete every key of this namespace (tests and re-seeding); returns how many."""
        deleted = 0
        for key in self._client.scan_iter(match=f"{self.namespace}:*", count=1_000):
            deleted += self._client.delete(key)
        return deleted

    def close(self) -> None:
        self._client.close()


# ---------------------------------------------------------------------------------------
# Features of raw events


def to_micros(value: Any) -> int:
    """Microseconds since the epoch (UTC) of an int (already microseconds), a datetime,
    a pandas Timestamp or a numpy datetime64; naive datetimes are read as UTC."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, np.datetime64):
        return int(value.astype("datetime64[us]").astype(np.int64))
    if hasattr(value, "to_datetime64"):  # pandas Timestamp, nanosecond resolution
        return int(value.to_datetime64().astype("datetime64[us]").astype(np.int64))
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        delta = value - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
        return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    raise TypeError(f"not a timestamp: {value!r}")


def spark_string(value: Any) -> str | None:
    """``CAST(value AS STRING)`` as Spark writes it for the types the raw layouts hold."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return str(value)


def ip_subnet(ip: Any) -> str | None:
    """``substring_index(ip, '.', 3)``: everything before the third dot, or the whole string."""
    text = spark_string(ip)
    if text is None:
        return None
    parts = text.split(".", 3)
    return ".".join(parts[:3]) if len(parts) > 3 else text


def store_from_env(spec: DatasetSpec, plan: FeaturePlan | None = None) -> FeatureStore:
    """The Redis store when ``ADFRAUD_REDIS_URL`` is set, else an in-process one."""
    lateness_s = _int_env(LATENESS_S_ENV_VAR, DEFAULT_LATENESS_S)
    ttl_s = _int_env(STATE_TTL_S_ENV_VAR, DEFAULT_STATE_TTL_S)
    plan = plan or FeaturePlan.build(lateness_s)
    url = os.environ.get(REDIS_URL_ENV_VAR, "")
    if url:
        prefix = os.environ.get(REDIS_PREFIX_ENV_VAR, DEFAULT_REDIS_PREFIX)
        namespace = f"{prefix}:{spec.name}:{features.feature_spec_hash(spec)}"
        return RedisFeatureStore(url, plan, namespace, lateness_s, ttl_s)
    return MemoryFeatureStore(plan, lateness_s, ttl_s)


def _int_env(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


class OnlineFeatures:
    """The ETL's feature row for each raw event, from state kept across calls.

    Example::

        online = OnlineFeatures(datasets.TALKINGDATA)
        columns = online.compute([{"event_id": 1, "ip": 5, ..., "click_time": 1510047038000000}])

    :param spec: the dataset spec whose raw layout the events follow.
    :param store: where the state lives (default: :func:`store_from_env`).
    """

    def __init__(self, spec: DatasetSpec, store: FeatureStore | None = None) -> None:
        self.spec = spec
        self.store = store if store is not None else store_from_env(spec)
        self.plan: FeaturePlan = getattr(self.store, "plan", None) or FeaturePlan.build(DEFAULT_LATENESS_S)
        # A role names the spec attribute that holds its column (ip, device, app, ...).
        self._group_columns = [tuple(getattr(spec, r) for r in g.roles) for g in self.plan.groups]
        self._distinct_columns = [getattr(spec, role) for _, role in self.plan.distinct]
        self._raw_categorical = [c for c in spec.categorical if c != "ip_subnet"]
        self._window_names = [name for g in self.plan.groups for name, _ in g.windows]
        self.columns = [spec.event_id, *spec.categorical, *features.derived_numeric(spec), *spec.numeric]

    def _observation(self, event: dict[str, Any]) -> Observation:
        ts_us = event[self.spec.timestamp]
        if type(ts_us) is not int:
            ts_us = to_micros(ts_us)
        return Observation(
            ts_us // US_PER_MS,
            ts_us,
            event[self.spec.event_id],
            tuple([tuple([event[c] for c in cols]) for cols in self._group_columns]),
            tuple([event[c] for c in self._distinct_columns]),
        )

    def compute(self, events: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
        """Feature columns (name -> list, in the order of ``events``) of raw event dicts.

        Timestamps may be microseconds since the epoch or datetimes. The events update
        the state in the ETL's order, whatever their order in ``events``.
        """
        observations = [self._observation(e) for e in events]
        order = sorted(range(len(events)), key=lambda i: (observations[i].ms, observations[i].event_id))
        results = self.store.observe([observations[i] for i in order])
        spec = self.spec
        n = len(events)
        out: dict[str, list[Any]] = {name: [None] * n for name in self.columns}
        window_cols = [out[name] for name in self._window_names]
        gap_cols = [(gi, out[g.gap_feature]) for gi, g in enumerate(self.plan.groups) if g.gap_feature]
        distinct_cols = [out[name] for name, _ in self.plan.distinct]
        raw_cats = [(out[c], c) for c in self._raw_categorical]
        raw_nums = [(out[c], c) for c in spec.numeric]
        hours = out["hour_of_day"]
        subnets = out.get("ip_subnet") if "ip_subnet" in spec.categorical else None
        no_previous = float(features.NO_PREVIOUS_CLICK_S)
        ids = out[spec.event_id]
        for i, result in zip(order, results, strict=True):
            event, obs = events[i], observations[i]
            ids[i] = obs.event_id
            for column, name in raw_cats:
                value = event[name]
                column[i] = value if type(value) is str else spark_string(value)
            if subnets is not None:
                subnets[i] = ip_subnet(event[spec.ip])
            for column, count in zip(window_cols, result.counts, strict=True):
                column[i] = float(count)
            seconds = obs.ts_us / 1e6
            for gi, column in gap_cols:
                prev = result.previous_us[gi]
                # The ETL subtracts the two times as doubles of seconds; so does this.
                column[i] = no_previous if prev is None else seconds - prev / 1e6
            for column, count in zip(distinct_cols, result.distinct, strict=True):
                column[i] = float(count)
            hours[i] = float((obs.ts_us // US_PER_HOUR) % 24)
            for column, name in raw_nums:
                value = event[name]
                column[i] = None if value is None else float(value)
        return out

    def compute_frame(self, events: Sequence[dict[str, Any]]):
        """:meth:`compute` as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.compute(events), columns=self.columns)

    def replay(self, table, batch_rows: int = 4_096) -> dict[str, list[Any]]:
        """Feed a raw events table (pyarrow) through the state in the ETL's order.

        Returns the feature columns of every event, in the table's row order. Used to
        warm a server's state from recent history and by the parity tests.
        """
        import pyarrow as pa
        import pyarrow.compute as pc

        ts = self.spec.timestamp
        needed = [c for c in dict.fromkeys([self.spec.event_id, ts, *self._needed_columns()])]
        table = table.select(needed)
        micros = pc.cast(table.column(ts), pa.timestamp("us", tz="UTC")).cast(pa.int64())
        table = table.set_column(table.schema.get_field_index(ts), ts, micros)
        rows = table.to_pylist()
        order = sorted(
            range(len(rows)), key=lambda i: (rows[i][ts] // US_PER_MS, rows[i][self.spec.event_id])
        )
        out: dict[str, list[Any]] = {name: [None] * len(rows) for name in self.columns}
        for start in range(0, len(order), batch_rows):
            chunk = order[start : start + batch_rows]
            part = self.compute([rows[i] for i in chunk])
            for name, values in part.items():
                column = out[name]
                for i, value in zip(chunk, values, strict=True):
                    column[i] = value
        return out

    def _needed_columns(self) -> list[str]:
        roles = [c for cols in self._group_columns for c in cols] + self._distinct_columns
        return [*roles, *self._raw_categorical, *self.spec.numeric]

    def close(self) -> None:
        self.store.close()


class InputEncoder:
    """:meth:`Preprocessor.transform` for feature columns held as Python lists.

    The same vocabularies, the same float64 operations in the same order, column by
    column, so the model inputs are bit-identical to the batch path; without pandas,
    which costs more than the model on a single event.

    :param pre: the model's preprocessor.
    """

    def __init__(self, pre: Preprocessor) -> None:
        self.categorical = pre.categorical_columns
        self.numeric = pre.numeric_columns
        self._pre = pre
        self._lookups = [
            {value: i + 1 for i, value in enumerate(pre.categorical[c])} for c in self.categorical
        ]
        self._means = np.array([[pre.numeric[c]["mean"]] for c in self.numeric], dtype=np.float64)
        self._stds = np.array([[pre.numeric[c]["std"]] for c in self.numeric], dtype=np.float64)

    def encode(self, columns: dict[str, list[Any]]) -> tuple[np.ndarray, np.ndarray]:
        """Model inputs: int64 ``[n, n_categorical]`` and float32 ``[n, n_numeric]``."""
        missing = [c for c in [*self.categorical, *self.numeric] if c not in columns]
        if missing:
            raise KeyError(f"feature columns lack {missing}")
        n = len(columns[self.categorical[0] if self.categorical else self.numeric[0]])
        cats = np.empty((n, len(self.categorical)), dtype=np.int64)
        for j, (column, lookup) in enumerate(zip(self.categorical, self._lookups, strict=True)):
            strings = ["" if v is None else (v if isinstance(v, str) else spark_string(v)) for v in columns[column]]
            if self._pre.hash_buckets.get(column):
                cats[:, j] = [self._pre.category_id(column, v) for v in strings]
            else:
                cats[:, j] = [lookup.get(v, features.OOV_INDEX) for v in strings]
        # One row per column, so each column is contiguous as in the pandas path; the
        # float64 operations are Preprocessor.transform's, element by element.
        raw = np.array([columns[c] for c in self.numeric], dtype=np.float64).reshape(len(self.numeric), n)
        raw[np.isnan(raw)] = 0.0
        scaled = (np.log1p(np.clip(raw, 0.0, None)) - self._means) / self._stds
        return cats, np.ascontiguousarray(scaled.T, dtype=np.float32)
