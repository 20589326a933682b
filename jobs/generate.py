"""Synthetic ad-click events whose fraud comes from behaviour: ``python -m jobs.generate``.

Every click is made by an *actor* of one *scenario*: a household of organic users, a
company behind a VPN, a botnet, a click farm, ... (see :data:`SCENARIOS`). An actor
produces *episodes* (a browsing session, a bot burst, a farm worker's shift on one
phone) at times drawn from its scenario's daily profile, and each episode is a few
clicks with gaps from the mechanism: lognormal for people, a fixed period with jitter
for bots. Who clicks (IP, device id, user agent) and on what (campaign, ad group) follow
from the actor, so the fraud shows in the traffic the ETL turns into features: click
counts per IP and per (IP, device) or (IP, campaign), seconds since the previous click,
distinct devices per IP, hour of day, cost, user agent and /24 subnet.

The label is not a coin flip per scenario: each actor has a fraud probability drawn
from its scenario's range, written per event as the oracle ``fraud_probability``, and
``is_fraud`` is drawn from it. Some fraud is built to be hard (residential-proxy bots
with common browser agents, slow farms spread over a /24) and some legitimate traffic
to look suspicious (power users clicking in bursts, offices behind datacenter VPNs), so
even the Bayes-optimal score (``fraud_probability`` itself) does not reach AUC 1.

Generation is vectorized with numpy and streamed: time is cut into slices of about
:data:`SLICE_EVENTS` events, each slice is generated from its own seeded stream, clicks
that spill past a slice's end are carried into the next, and finished events are cut
into parquet parts of ``--part-rows`` rows, in time order. Faker only builds the entity
pools (user agents, IP subnets) once per run. Actor attributes (home IP, devices, the
campaigns a bot targets) are hashes of the actor's index, not tables: what grows with
the row count is one fraud probability per actor and the per-actor counts the Bayes AUC
is computed from. Same seed and options give byte-identical parquet; the content does
not depend on ``--part-rows``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import posixpath
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.common import cli, storage
from jobs.common.datasets import SYNTHETIC

logger = logging.getLogger(__name__)

DEFAULT_ROWS = 200_000
DEFAULT_SEED = 7
DEFAULT_START = "2026-11-01T00:00:00Z"
DEFAULT_DAYS = 7.0
DEFAULT_PART_ROWS = 1_000_000
# Rows written by --smoke-test, whatever --rows says.
SMOKE_TEST_ROWS = 5_000
# Events per generation slice: bounds working memory; fixed so that --part-rows does not
# change what is generated, only how it is cut into files.
SLICE_EVENTS = 100_000
# Time-based split the Bayes AUC is broken down by: earliest 70 % train, then 15/15.
SPLIT_FRACTIONS = {"train": 0.70, "validation": 0.15, "test": 0.15}

KEYWORD_TYPES = ("brand", "generic", "competitor", "premium")
# Share of ad groups per keyword type, and the median cost per click of each, USD.
KEYWORD_SHARES = (0.25, 0.45, 0.15, 0.15)
KEYWORD_BASE_COST_USD = (0.35, 0.80, 1.90, 3.80)
BASE_CAMPAIGNS = 60
# First octets of the address space the datacenter subnets are drawn from (large clouds
# and hosters); residential and farm subnets avoid them.
DATACENTER_FIRST_OCTETS = (3, 13, 18, 20, 34, 35, 44, 52, 54, 104, 138, 139, 143, 157, 159, 165, 167, 178)
DATACENTER_SUBNETS = 48
FARM_SUBNETS = 40
CARRIER_SUBNETS = 24
# Browser agents from Faker's user_agent() (mostly desktop), and mobile ones built from
# Faker's platform tokens.
BROWSER_AGENTS = 2_000
MOBILE_AGENTS = 800

_US_PER_S = 1_000_000
_US_PER_MIN = 60 * _US_PER_S


# Scenarios ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """One traffic mechanism: who its actors are and how their clicks arrive.

    :param name: the ``scenario`` value written on each event.
    :param fraud: whether the mechanism is fraud (its actors' probabilities are high).
    :param share: fraction of all events; ``organic`` takes what the others leave.
    :param fraud_probability: range each actor's fraud probability is drawn from, uniformly.
    :param identity: how an actor's clicks get their IP, device, agent and ad group (one of
        the ``_identity_*`` functions).
    :param hours: daily activity profile, a key of :data:`_PROFILES`.
    :param events_per_actor_day: average clicks per actor per day; sets the actor count.
    :param min_actors: fewest actors, so that small runs keep the mechanism's shape.
    :param actor_skew: actors are drawn as ``floor(n * u**skew)``: >1 makes a few busy ones.
    :param clicks_median: median clicks per episode (lognormal, rounded).
    :param clicks_sigma: log-scale spread of the clicks per episode.
    :param clicks_max: most clicks in one episode.
    :param gap_median_s: median seconds between clicks of an episode (lognormal).
    :param gap_sigma: log-scale spread of the gaps.
    :param period_s: for scripted clickers, the range of each actor's fixed click period
        (seconds, log-uniform); ``None`` for people.
    :param period_jitter: relative jitter of a scripted period.
    :param description: the mechanism in words, for the docs and the result.
    """

    name: str
    fraud: bool
    share: float
    fraud_probability: tuple[float, float]
    identity: str
    hours: str
    events_per_actor_day: float
    min_actors: int
    actor_skew: float = 1.0
    clicks_median: float = 2.0
    clicks_sigma: float = 0.6
    clicks_max: int = 20
    gap_median_s: float = 30.0
    gap_sigma: float = 1.0
    period_s: tuple[float, float] | None = None
    period_jitter: float = 0.03
    description: str = ""

    @property
    def mean_clicks(self) -> float:
        return min(float(self.clicks_max), max(1.0, self.clicks_median * math.exp(self.clicks_sigma**2 / 2)))


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "organic", False, 0.0, (0.0, 0.006), "home", "diurnal", 2.5, 200, actor_skew=1.3,
        description="people at home: residential IP shared by a household, 1-3 devices each with a "
        "common browser agent, evening-peaked hours, short sessions on popular campaigns",
    ),
    Scenario(
        "power_user", False, 0.04, (0.005, 0.03), "home", "diurnal", 40.0, 20, actor_skew=1.2,
        clicks_median=14, clicks_sigma=0.5, clicks_max=60, gap_median_s=4.0, gap_sigma=0.8,
        description="legitimate heavy users clicking in bursts of seconds from one residential IP "
        "and device; irregular gaps, many campaigns (looks like a bot on click counts)",
    ),
    Scenario(
        "corporate_vpn", False, 0.07, (0.005, 0.03), "office", "office", 150.0, 10, actor_skew=1.2,
        gap_median_s=60.0,
        description="employees behind a company VPN or NAT egress in datacenter ranges: many "
        "devices per IP, a standard browser build, weekday office hours, diverse campaigns "
        "(looks like a click farm on devices per IP)",
    ),
    Scenario(
        "bot_burst", True, 0.016, (0.93, 0.995), "bot", "flat", 3000.0, 3,
        clicks_median=50, clicks_sigma=0.6, clicks_max=400, period_s=(0.8, 8.0),
        description="scripted bots on datacenter IPs (1-4 per botnet) with headless or HTTP-library "
        "agents, clicking one targeted campaign per burst at a fixed period, at any hour",
    ),
    Scenario(
        "click_farm", True, 0.013, (0.80, 0.97), "farm", "farm", 800.0, 3,
        clicks_median=6, clicks_sigma=0.4, clicks_max=20, gap_median_s=25.0, gap_sigma=0.5,
        description="click farms: 30-300 phones of a few models behind 1-3 NAT addresses of the "
        "farm's own /24, the same 2-5 campaigns, the farm's local working hours",
    ),
    Scenario(
        "device_reset", True, 0.009, (0.85, 0.97), "reset", "mixed", 200.0, 3,
        clicks_median=12, clicks_sigma=0.5, clicks_max=40, gap_median_s=15.0, gap_sigma=0.6,
        description="one residential IP and one agent resetting its advertising id before every "
        "click: a new device id per click, few campaigns",
    ),
    Scenario(
        "odd_hour_premium", True, 0.007, (0.60, 0.90), "odd_hour", "night", 25.0, 5,
        clicks_median=4, clicks_sigma=0.4, clicks_max=12, gap_median_s=12.0, gap_sigma=0.6,
        description="competitors draining budgets: clicks at 00-05 UTC on 1-3 expensive premium or "
        "competitor ad groups, from residential IPs with ordinary browsers",
    ),
    Scenario(
        "stealth_bot", True, 0.011, (0.45, 0.75), "stealth", "diurnal", 2000.0, 3,
        clicks_median=1, clicks_sigma=0.4, clicks_max=3, gap_median_s=60.0,
        description="hard: bots behind a residential proxy network (a random home IP and a fresh "
        "device per click) with a handful of popular browser agents, diurnal; only the "
        "targeted campaigns and the agent mix give them away",
    ),
    Scenario(
        "slow_farm", True, 0.009, (0.50, 0.80), "slow_farm", "farm", 150.0, 3,
        clicks_median=2, clicks_sigma=0.5, clicks_max=6, gap_median_s=120.0,
        description="hard: slow farms, every phone on its own address of one /24 (dedicated or in a "
        "residential ISP range), a few clicks per hour on 2-4 campaigns",
    ),
)

# The scenario the new_bot drift adds.
NEW_BOT = Scenario(
    "new_bot", True, 0.02, (0.90, 0.99), "sdk_bot", "flat", 1500.0, 3,
    clicks_median=12, clicks_sigma=0.6, clicks_max=60, period_s=(15.0, 45.0), period_jitter=0.05,
    description="a bot not seen before: spoofed in-app SDK agents (Dalvik) on mobile-carrier "
    "subnets, a fresh device per session, clicking every 15-45 s around the clock",
)

DRIFTS = ("none", "new_campaigns", "fraud_mix", "cost_inflation", "new_bot", "all")
# fraud_mix: multipliers on the fraud scenarios' shares (organic takes up the difference).
FRAUD_MIX_MULTIPLIERS = {
    "bot_burst": 0.5,
    "click_farm": 1.8,
    "device_reset": 1.5,
    "odd_hour_premium": 1.5,
    "stealth_bot": 2.5,
    "slow_farm": 2.0,
}
# cost_inflation: every click's cost times this, premium and competitor keywords again.
COST_INFLATION = 1.4
COST_INFLATION_EXPENSIVE = 1.25
# new_campaigns: campaigns added and the share of campaign-popularity they take.
NEW_CAMPAIGNS = 15
NEW_CAMPAIGNS_SHARE = 0.30


@dataclass(frozen=True)
class Drift:
    """What a ``--drift`` option changes, relative to ``none``."""

    name: str
    new_campaigns: bool = False
    fraud_mix: bool = False
    cost_inflation: bool = False
    new_bot: bool = False

    @classmethod
    def parse(cls, name: str) -> Drift:
        if name not in DRIFTS:
            raise ValueError(f"unknown drift {name!r}; known: {', '.join(DRIFTS)}")
        every = name == "all"
        return cls(
            name=name,
            new_campaigns=every or name == "new_campaigns",
            fraud_mix=every or name == "fraud_mix",
            cost_inflation=every or name == "cost_inflation",
            new_bot=every or name == "new_bot",
        )

    def changes(self) -> list[str]:
        out = []
        if self.new_campaigns:
            out.append(
                f"{NEW_CAMPAIGNS} new campaigns (cmp-{BASE_CAMPAIGNS:04d} on) take "
                f"{NEW_CAMPAIGNS_SHARE:.0%} of campaign popularity; bots and farms also target them"
            )
        if self.fraud_mix:
            mix = ", ".join(f"{k} x{v:g}" for k, v in FRAUD_MIX_MULTIPLIERS.items())
            out.append(f"fraud scenario shares changed ({mix}); organic takes up the difference")
        if self.cost_inflation:
            out.append(
                f"click_cost x{COST_INFLATION:g}, premium and competitor keywords "
                f"x{COST_INFLATION * COST_INFLATION_EXPENSIVE:g}"
            )
        if self.new_bot:
            out.append(f"new scenario new_bot ({NEW_BOT.share:.0%} of events): {NEW_BOT.description}")
        return out

    def describe(self) -> dict[str, Any]:
        changes = self.changes()
        return {
            "name": self.name,
            "description": "; ".join(changes) if changes else "no drift: the reference traffic mix",
            "changes": changes,
        }


def scenarios_for(drift: Drift) -> tuple[Scenario, ...]:
    """The scenarios of a run and their shares, organic last-filled to sum to 1."""
    out = list(SCENARIOS)
    if drift.fraud_mix:
        out = [replace(s, share=s.share * FRAUD_MIX_MULTIPLIERS.get(s.name, 1.0)) for s in out]
    if drift.new_bot:
        out.append(NEW_BOT)
    rest = sum(s.share for s in out if s.name != "organic")
    if rest >= 1.0:
        raise ValueError("scenario shares leave nothing for organic traffic")
    return tuple(replace(s, share=1.0 - rest) if s.name == "organic" else s for s in out)


# Config -------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerateConfig:
    """Options of one generator run (the CLI flags).

    :param output: URI of the parquet dataset directory to write.
    :param rows: number of events.
    :param seed: seed of every random choice.
    :param start: start of the event window, UTC.
    :param days: length of the event window in days.
    :param part_rows: rows per parquet part.
    :param drift: a name from :data:`DRIFTS`.
    """

    output: str
    rows: int = DEFAULT_ROWS
    seed: int = DEFAULT_SEED
    start: datetime = field(default_factory=lambda: parse_start(DEFAULT_START))
    days: float = DEFAULT_DAYS
    part_rows: int = DEFAULT_PART_ROWS
    drift: str = "none"

    def __post_init__(self) -> None:
        if self.rows < 1:
            raise ValueError(f"rows must be at least 1, got {self.rows}")
        if self.part_rows < 1:
            raise ValueError(f"part_rows must be at least 1, got {self.part_rows}")
        if not self.days > 0:
            raise ValueError(f"days must be positive, got {self.days}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        Drift.parse(self.drift)

    @property
    def end(self) -> datetime:
        return self.start + timedelta(days=self.days)


def parse_start(value: str) -> datetime:
    """An ISO date or date-time as an aware UTC datetime; naive values are taken as UTC."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise ValueError(f"--start {value!r} is not an ISO date or date-time") from exc
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def _iso(moment: datetime) -> str:
    """``2026-11-01T00:00:00Z``; microseconds only when there are some."""
    moment = moment.astimezone(UTC)
    spec = "microseconds" if moment.microsecond else "seconds"
    return moment.isoformat(timespec=spec).replace("+00:00", "Z")


# Hashing: actor attributes as pure functions of the actor's index ----------------------

_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_MIX1 = _U64(0xBF58476D1CE4E5B9)
_MIX2 = _U64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, elementwise on uint64 (wrapping arithmetic)."""
    z = x + _GOLDEN
    z ^= z >> _U64(30)
    z *= _MIX1
    z ^= z >> _U64(27)
    z *= _MIX2
    z ^= z >> _U64(31)
    return z


class _Hasher:
    """Seeded hashes of integer keys: ``h(scope, field, *keys)`` is uniform over uint64."""

    def __init__(self, seed: int) -> None:
        self._seed = seed
        self._salts: dict[tuple[str, str], np.ndarray] = {}

    def _salt(self, scope: str, name: str) -> np.ndarray:
        key = (scope, name)
        if key not in self._salts:
            digest = hashlib.sha256(f"{self._seed}/{scope}/{name}".encode()).digest()
            self._salts[key] = np.array([int.from_bytes(digest[:8], "little")], dtype=_U64)
        return self._salts[key]

    def __call__(self, scope: str, name: str, *keys: np.ndarray) -> np.ndarray:
        z = self._salt(scope, name)
        for key in keys:
            z = _mix(z ^ np.asarray(key).astype(_U64, copy=False))
        return z


def _unit(h: np.ndarray) -> np.ndarray:
    """A uint64 hash as a float in [0, 1)."""
    return (h >> _U64(11)).astype(np.float64) * (1.0 / 2**53)


def _skewed(u: np.ndarray, n: int, skew: float) -> np.ndarray:
    """Indices ``floor(n * u**skew)`` in [0, n): with skew > 1, low indices are the popular ones."""
    return np.minimum((n * u**skew).astype(np.int64), n - 1)


def _pick(h: np.ndarray, n: int | np.ndarray) -> np.ndarray:
    """A uint64 hash as an index in [0, n)."""
    return (h % np.asarray(n).astype(_U64)).astype(np.int64)


# Entity pools -------------------------------------------------------------------------


@dataclass
class Pools:
    """Everything drawn once per run: agents, subnets, campaigns and their ad groups."""

    agents: pa.Array
    browser_rank: np.ndarray  # indices into agents of browsers (all kinds), most popular first
    mobile: np.ndarray  # indices into agents of mobile browsers
    scripted: np.ndarray  # indices of headless browsers and HTTP libraries
    sdk: np.ndarray  # indices of in-app SDK agents (new_bot)
    residential: np.ndarray  # /24 base addresses, uint32
    datacenter: np.ndarray
    farm: np.ndarray
    carrier: np.ndarray
    campaigns: pa.Array
    campaign_cdf: np.ndarray  # popularity CDF over campaigns (organic choice)
    ad_groups: pa.Array
    ag_campaign: np.ndarray
    ag_keyword: np.ndarray
    ag_cost: np.ndarray  # median cost per click of each ad group (drift included), USD
    ag_start: np.ndarray  # first ad group of each campaign
    ag_count: np.ndarray  # ad groups of each campaign
    expensive: np.ndarray  # ad groups with premium or competitor keywords and a high cost
    keyword_cost_multiplier: np.ndarray
    keywords: pa.Array = field(default_factory=lambda: pa.array(KEYWORD_TYPES))


def _faker(seed: int, salt: int) -> Any:
    from faker import Faker

    fake = Faker("en_US")
    fake.seed_instance(seed * 1_000 + salt)
    return fake


def _agents(seed: int) -> tuple[list[str], int, int, int, int]:
    """Browser, mobile, scripted and SDK user agents; the size of each block."""
    fake = _faker(seed, 1)
    browsers = list(dict.fromkeys(fake.user_agent() for _ in range(BROWSER_AGENTS)))
    models = ("SM-A{}F", "SM-G{}B", "Redmi Note {}", "moto g({})", "Pixel {}", "CPH{}", "V{}", "TECNO KG{}")
    mobile: list[str] = []
    while len(mobile) < MOBILE_AGENTS:
        chrome = f"{fake.random_int(96, 131)}.0.{fake.random_int(4000, 6800)}.{fake.random_int(40, 220)}"
        if fake.random_int(0, 9) < 6:
            model = fake.random_element(models).format(fake.random_int(2, 999))
            mobile.append(
                f"Mozilla/5.0 (Linux; {fake.android_platform_token()}; {model}) AppleWebKit/537.36 "
                f"(KHTML, like Gecko) Chrome/{chrome} Mobile Safari/537.36"
            )
        else:
            mobile.append(
                f"Mozilla/5.0 ({fake.ios_platform_token()}) AppleWebKit/605.1.15 (KHTML, like Gecko) "
                f"Version/{fake.random_int(13, 18)}.{fake.random_int(0, 6)} Mobile/15E148 Safari/604.1"
            )
        mobile = list(dict.fromkeys(mobile))
    templates = (
        "python-requests/2.{a}.{b}",
        "curl/{c}.{a}.{b}",
        "Go-http-client/1.1",
        "Go-http-client/2.0",
        "Wget/1.{a}.{b}",
        "Scrapy/2.{a}.{b} (+https://scrapy.org)",
        "okhttp/4.{a}.{b}",
        "Java/17.0.{a}",
        "python-urllib3/2.{a}.{b}",
        "axios/1.{a}.{b}",
        "node-fetch/1.0 (+https://github.com/bitinn/node-fetch)",
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "HeadlessChrome/{m}.0.{d}.{b} Safari/537.36",
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "HeadlessChrome/{m}.0.{d}.{b} Safari/537.36",
        "Mozilla/5.0 (Unknown; Linux x86_64) AppleWebKit/538.1 (KHTML, like Gecko) "
        "PhantomJS/2.1.1 Safari/538.1",
    )
    scripted: list[str] = []
    for _ in range(120):
        template = fake.random_element(templates)
        scripted.append(
            template.format(
                a=fake.random_int(0, 32), b=fake.random_int(0, 9), c=fake.random_int(7, 8),
                m=fake.random_int(100, 131), d=fake.random_int(5000, 6800),
            )
        )
    scripted = list(dict.fromkeys(scripted))
    sdk: list[str] = []
    for _ in range(60):
        model = fake.random_element(models).format(fake.random_int(2, 999))
        build = fake.bothify("??##?.######.###").upper()
        sdk.append(f"Dalvik/2.1.0 (Linux; U; {fake.android_platform_token()}; {model} Build/{build})")
    sdk = list(dict.fromkeys(sdk))
    return browsers + mobile + scripted + sdk, len(browsers), len(mobile), len(scripted), len(sdk)


def _subnets(seed: int, residential: int) -> dict[str, np.ndarray]:
    """Disjoint pools of /24 subnets (base addresses as uint32)."""
    fake = _faker(seed, 2)
    rng = np.random.default_rng([seed, 2])
    dc_octets = np.array(DATACENTER_FIRST_OCTETS, dtype=np.uint32)
    datacenter = np.unique(
        (dc_octets[rng.integers(0, len(dc_octets), DATACENTER_SUBNETS * 2)] << 24)
        | (rng.integers(0, 256, DATACENTER_SUBNETS * 2, dtype=np.uint32) << 16)
        | (rng.integers(0, 256, DATACENTER_SUBNETS * 2, dtype=np.uint32) << 8)
    )
    datacenter = rng.permutation(datacenter)[:DATACENTER_SUBNETS]
    seen = set(int(s) for s in datacenter)
    excluded = set(DATACENTER_FIRST_OCTETS)
    wanted = residential + FARM_SUBNETS + CARRIER_SUBNETS
    public: list[int] = []
    while len(public) < wanted:
        octets = [int(o) for o in fake.ipv4_public().split(".")]
        base = (octets[0] << 24) | (octets[1] << 16) | (octets[2] << 8)
        if octets[0] in excluded or base in seen:
            continue
        seen.add(base)
        public.append(base)
    arr = np.array(public, dtype=np.uint32)
    return {
        "datacenter": datacenter.astype(np.uint32),
        "farm": arr[:FARM_SUBNETS],
        "carrier": arr[FARM_SUBNETS : FARM_SUBNETS + CARRIER_SUBNETS],
        "residential": arr[FARM_SUBNETS + CARRIER_SUBNETS :],
    }


def build_pools(seed: int, drift: Drift, residential_subnets: int) -> Pools:
    """Draw the run's entity pools; drift additions come from their own streams."""

    # Agents
    agents, n_faker, n_mobile, n_scripted, n_sdk = _agents(seed)
    rng = np.random.default_rng([seed, 3])
    n_browser = n_faker + n_mobile
    browser_rank = rng.permutation(n_browser)
    mobile = np.arange(n_faker, n_browser)
    scripted = np.arange(n_browser, n_browser + n_scripted)
    sdk = np.arange(n_browser + n_scripted, n_browser + n_scripted + n_sdk)

    # Campaigns and ad groups
    n_campaigns = BASE_CAMPAIGNS
    ag_per_campaign = rng.integers(2, 7, n_campaigns)
    popularity = 1.0 / np.arange(1, n_campaigns + 1) ** 1.1
    popularity = popularity[rng.permutation(n_campaigns)]
    if drift.new_campaigns:
        extra = np.random.default_rng([seed, 4])
        ag_per_campaign = np.concatenate([ag_per_campaign, extra.integers(2, 7, NEW_CAMPAIGNS)])
        fresh = 1.0 / np.arange(1, NEW_CAMPAIGNS + 1) ** 0.8
        fresh *= popularity.sum() * NEW_CAMPAIGNS_SHARE / (1 - NEW_CAMPAIGNS_SHARE) / fresh.sum()
        popularity = np.concatenate([popularity, fresh])
        n_campaigns += NEW_CAMPAIGNS
    else:
        extra = None
    n_ag = int(ag_per_campaign.sum())
    ag_campaign = np.repeat(np.arange(n_campaigns), ag_per_campaign).astype(np.int32)
    ag_start = np.concatenate([[0], np.cumsum(ag_per_campaign)[:-1]]).astype(np.int64)
    n_base_ag = int(ag_per_campaign[:BASE_CAMPAIGNS].sum())
    keyword = rng.choice(len(KEYWORD_TYPES), size=n_base_ag, p=KEYWORD_SHARES)
    cost = np.asarray(KEYWORD_BASE_COST_USD)[keyword] * np.exp(0.35 * rng.standard_normal(n_base_ag))
    if extra is not None:
        new_kw = extra.choice(len(KEYWORD_TYPES), size=n_ag - n_base_ag, p=KEYWORD_SHARES)
        keyword = np.concatenate([keyword, new_kw])
        new_cost = np.asarray(KEYWORD_BASE_COST_USD)[new_kw]
        new_cost = new_cost * np.exp(0.35 * extra.standard_normal(len(new_kw)))
        cost = np.concatenate([cost, new_cost])
    campaign_ids = [f"cmp-{c:04d}" for c in range(n_campaigns)]
    ad_groups = [f"{campaign_ids[c]}-ag{i - ag_start[c]:02d}" for i, c in enumerate(ag_campaign)]
    pricey = np.isin(keyword, (KEYWORD_TYPES.index("competitor"), KEYWORD_TYPES.index("premium")))
    expensive = np.flatnonzero(pricey & (cost >= np.median(cost[pricey])))
    multiplier = np.ones(len(KEYWORD_TYPES))
    if drift.cost_inflation:
        multiplier *= COST_INFLATION
        pricey_types = [KEYWORD_TYPES.index("competitor"), KEYWORD_TYPES.index("premium")]
        multiplier[pricey_types] *= COST_INFLATION_EXPENSIVE

    cost = cost * multiplier[keyword]

    # Subnets
    nets = _subnets(seed, residential_subnets)
    return Pools(
        agents=pa.array(agents, pa.string()),
        browser_rank=browser_rank,
        mobile=mobile,
        scripted=scripted,
        sdk=sdk,
        residential=nets["residential"],
        datacenter=nets["datacenter"],
        farm=nets["farm"],
        carrier=nets["carrier"],
        campaigns=pa.array(campaign_ids, pa.string()),
        campaign_cdf=np.cumsum(popularity) / popularity.sum(),
        ad_groups=pa.array(ad_groups, pa.string()),
        ag_campaign=ag_campaign,
        ag_keyword=keyword.astype(np.int8),
        ag_cost=cost,
        ag_start=ag_start,
        ag_count=ag_per_campaign.astype(np.int64),
        expensive=expensive,
        keyword_cost_multiplier=multiplier,
    )


# Identities: who clicks (IP, device, agent) and on what (ad group) ------------------------


@dataclass
class _Clicks:
    """The keys an identity function maps to entities.

    Identity functions return, per entity, either one value per episode (what stays fixed
    for a session: the address, the device) or one per click; :meth:`per_click` expands.
    """

    scenario: Scenario
    of: np.ndarray  # episode index of each click
    actor: np.ndarray  # actor index of each episode
    episode: np.ndarray  # random uint64 key of each episode
    click: np.ndarray  # random uint64 key of each click

    def per_click(self, values: np.ndarray) -> np.ndarray:
        return values if len(values) == len(self.of) else values[self.of]


def _bits(h: np.ndarray, low: int, width: int) -> np.ndarray:
    """``width`` bits of a hash from bit ``low`` on, as int64: several draws from one hash."""
    return ((h >> _U64(low)) & _U64((1 << width) - 1)).astype(np.int64)


class _World:
    """Pools plus the hashes that turn actor indices into entities."""

    def __init__(self, seed: int, pools: Pools) -> None:
        self.pools = pools
        self.h = _Hasher(seed)
        # Inverse CDF of campaign popularity on 2**16 steps: a lookup instead of a search.
        steps = (np.arange(1 << 16) + 0.5) / (1 << 16)
        self.campaign_table = np.minimum(
            np.searchsorted(pools.campaign_cdf, steps, side="right"), len(pools.ag_start) - 1
        ).astype(np.int64)

    def ip(self, subnets: np.ndarray, net_key: np.ndarray, host_key: np.ndarray) -> np.ndarray:
        """An address in one of ``subnets``: the subnet and the host (1-254) from two keys."""
        return subnets[_pick(net_key, len(subnets))] + (1 + _pick(host_key, 254)).astype(np.uint32)

    def home_ip(self, scope: str, key: np.ndarray) -> np.ndarray:
        home = self.h(scope, "home", key)
        return self.ip(self.pools.residential, home >> _U64(16), home & _U64(0xFFFF))

    def browser(self, h: np.ndarray, skew: float = 3.0) -> np.ndarray:
        """A browser agent, popular ones first: rank ``floor(n * u**skew)``."""
        rank = self.pools.browser_rank
        return rank[_skewed(_unit(h), len(rank), skew)]

    def popular_ad_group(self, key: np.ndarray) -> np.ndarray:
        """A campaign by popularity (high 16 bits of ``key``) and one of its ad groups."""
        p = self.pools
        campaign = self.campaign_table[(key >> _U64(48)).astype(np.int64)]
        return p.ag_start[campaign] + _pick(key & _U64(0xFFFFFFFF), p.ag_count[campaign])

    def targeted_ad_group(self, c: _Clicks, most: int, choice: np.ndarray) -> np.ndarray:
        """One of the actor's 1..``most`` target campaigns, picked by ``choice``, any ad group.

        ``choice`` is per episode (one campaign per burst) or per click.
        """
        s, p = c.scenario.name, self.pools
        actor = c.actor if len(choice) == len(c.actor) else c.per_click(c.actor)
        count = 1 + _pick(self.h(s, "targets", actor), most)
        target = _pick(choice >> _U64(40), count)
        campaign = c.per_click(_pick(self.h(s, "target", actor, target), len(p.ag_start)))
        return p.ag_start[campaign] + _pick(c.click & _U64(0xFFFFFFFF), p.ag_count[campaign])


def _identity_home(w: _World, c: _Clicks) -> tuple[np.ndarray, ...]:
    # Households: about a third of users share their address with the neighbouring index.
    s, h, a = c.scenario.name, w.h, c.actor
    traits = h(s, "traits", a)
    household = np.where(_bits(traits, 0, 16) < 0.35 * 65536, a >> 1, a + (1 << 40))
    devices = 1 + (_bits(traits, 16, 16) < 0.35 * 65536) + (_bits(traits, 32, 16) < 0.10 * 65536)
    device = h(s, "device", a, _pick(c.episode, devices))
    return w.home_ip(s, household), device, w.browser(h(s, "agent", device)), w.popular_ad_group(c.click)


def _identity_office(w: _World, c: _Clicks) -> tuple[np.ndarray, ...]:
    s, h, a = c.scenario.name, w.h, c.actor
    traits = h(s, "traits", a)
    staff = 10 + _bits(traits, 0, 16) % 300
    device = h(s, "employee", a, _pick(c.episode, staff))
    egress = _bits(device, 0, 16) % (1 + _bits(traits, 16, 8) % 3)
    ip = w.ip(w.pools.datacenter, traits >> _U64(32), h(s, "host", a, egress))
    build = _bits(device, 16, 16) % (1 + _bits(traits, 24, 8) % 3)
    agent = w.browser(h(s, "agent", a, build), skew=4.0)
    return ip, device, agent, w.popular_ad_group(c.click)


def _identity_bot(w: _World, c: _Clicks) -> tuple[np.ndarray, ...]:
    s, h, a = c.scenario.name, w.h, c.actor
    traits = h(s, "traits", a)
    address = _bits(c.episode, 0, 16) % (1 + _bits(traits, 0, 8) % 4)
    ip = w.ip(w.pools.datacenter, traits >> _U64(32), h(s, "host", a, address))
    device = h(s, "device", a, _bits(c.episode, 16, 16) % (1 + _bits(traits, 8, 8) % 3))
    scripted = w.pools.scripted
    agent = scripted[_pick(h(s, "agent", a, _bits(c.episode, 32, 1)), len(scripted))]
    return ip, device, agent, w.targeted_ad_group(c, 3, c.episode)


def _identity_farm(w: _World, c: _Clicks) -> tuple[np.ndarray, ...]:
    s, h, a = c.scenario.name, w.h, c.actor
    traits = h(s, "traits", a)
    device = h(s, "device", a, _pick(c.episode, 30 + _bits(traits, 0, 16) % 270))
    nat = _bits(device, 0, 16) % (1 + _bits(traits, 16, 8) % 3)
    ip = w.ip(w.pools.farm, traits >> _U64(32), h(s, "host", a, nat))
    model = _bits(device, 16, 16) % (2 + _bits(traits, 24, 8) % 6)
    mobile = w.pools.mobile
    agent = mobile[_pick(h(s, "agent", a, model), len(mobile))]
    return ip, device, agent, w.targeted_ad_group(c, 5, c.click)


def _identity_reset(w: _World, c: _Clicks) -> tuple[np.ndarray, ...]:
    s, h, a = c.scenario.name, w.h, c.actor
    # The device key is the click's own random key: a new advertising id every click.
    agent = w.browser(h(s, "agent", a), skew=2.0)
    return w.home_ip(s, a), c.click, agent, w.targeted_ad_group(c, 3, c.click)


def _identity_odd_hour(w: _World, c: _Clicks) -> tuple[np.ndarray, ...]:
    s, h, a = c.scenario.name, w.h, c.actor
    actor = c.per_click(a)
    target = _pick(c.click >> _U64(40), 1 + _pick(h(s, "targets", actor), 3))
    expensive = w.pools.expensive
    group = expensive[_pick(h(s, "target", actor, target), len(expensive))]
    return w.home_ip(s, a), h(s, "device", a), w.browser(h(s, "agent", a)), group


def _identity_stealth(w: _World, c: _Clicks) -> tuple[np.ndarray, ...]:
    # A residential proxy network: each click leaves from some household's address.
    s, h = c.scenario.name, w.h
    actor = c.per_click(c.actor)
    ip = w.home_ip("organic", c.click >> _U64(24))
    which = _bits(c.click, 0, 8) % (3 + _pick(h(s, "agents", actor), 4))
    agent = w.browser(h(s, "agent", actor, which), skew=5.0)
    return ip, c.click, agent, w.targeted_ad_group(c, 5, c.click)


def _identity_slow_farm(w: _World, c: _Clicks) -> tuple[np.ndarray, ...]:
    s, h, a = c.scenario.name, w.h, c.actor
    pools = w.pools
    traits = h(s, "traits", a)
    device = h(s, "device", a, _pick(c.episode, 20 + _bits(traits, 0, 16) % 100))
    own = _bits(traits, 16, 16) < 0.5 * 65536
    net = np.where(
        own,
        pools.farm[_pick(traits >> _U64(32), len(pools.farm))],
        pools.residential[_pick(traits >> _U64(32), len(pools.residential))],
    )
    ip = net + (1 + _bits(device, 0, 16) % 254).astype(np.uint32)
    mobile = pools.mobile
    agent = mobile[_skewed(_unit(h(s, "agent", device)), len(mobile), 2.0)]
    return ip, device, agent, w.targeted_ad_group(c, 4, c.click)


def _identity_sdk_bot(w: _World, c: _Clicks) -> tuple[np.ndarray, ...]:
    s, h, a = c.scenario.name, w.h, c.actor
    traits = h(s, "traits", a)
    net = _bits(c.episode, 0, 16) % (2 + _bits(traits, 0, 8) % 3)
    ip = w.ip(w.pools.carrier, h(s, "carrier", a, net), c.episode >> _U64(16))
    sdk = w.pools.sdk
    agent = sdk[_pick(h(s, "agent", a, _bits(c.episode, 32, 8) % 3), len(sdk))]
    return ip, c.episode, agent, w.targeted_ad_group(c, 3, c.episode)


_IDENTITIES = {
    "home": _identity_home,
    "office": _identity_office,
    "bot": _identity_bot,
    "farm": _identity_farm,
    "reset": _identity_reset,
    "odd_hour": _identity_odd_hour,
    "stealth": _identity_stealth,
    "slow_farm": _identity_slow_farm,
    "sdk_bot": _identity_sdk_bot,
}


# Daily activity profiles ----------------------------------------------------------------


def _bump(hour: np.ndarray, centre: float, width: float) -> np.ndarray:
    distance = np.abs((hour - centre + 12.0) % 24.0 - 12.0)
    return np.exp(-0.5 * (distance / width) ** 2)


def _diurnal(hour: np.ndarray, weekday: np.ndarray) -> np.ndarray:
    weekend = np.where(weekday >= 5, 1.15, 1.0)
    return (0.12 + 0.55 * _bump(hour, 13.0, 3.5) + 1.0 * _bump(hour, 20.5, 2.5)) * weekend


_PROFILES = {
    "diurnal": _diurnal,
    "office": lambda hour, weekday: np.where(weekday < 5, 0.03 + _bump(hour, 13.0, 3.0), 0.04),
    "flat": lambda hour, weekday: np.ones_like(hour),
    "farm": lambda hour, weekday: (0.05 + _bump(hour, 5.5, 3.0)) * np.where(weekday == 6, 0.4, 1.0),
    "night": lambda hour, weekday: 0.005 + _bump(hour, 2.5, 1.2),
    "mixed": lambda hour, weekday: 0.5 + 0.4 * _diurnal(hour, weekday),
}


# Generation -----------------------------------------------------------------------------


def _code(name: str) -> int:
    """A stable integer per scenario name, for seeding its random streams."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


def _allocate(total: int, shares: np.ndarray) -> np.ndarray:
    """Split ``total`` by ``shares`` exactly (largest remainder), at least 1 each if possible."""
    raw = total * shares / shares.sum()
    counts = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    if total >= len(shares):
        while (counts == 0).any():
            counts[np.argmax(counts)] -= 1
            counts[np.argmin(counts)] += 1
    return counts


class _Plan:
    """The run's shape: scenario event counts per time slice and actor tables."""

    def __init__(self, config: GenerateConfig) -> None:
        self.config = config
        self.drift = Drift.parse(config.drift)
        self.scenarios = scenarios_for(self.drift)
        self.scenario_names = pa.array([s.name for s in self.scenarios], pa.string())
        self.start_us = int(config.start.timestamp() * _US_PER_S)
        self.window_us = int(round(config.days * 86_400 * _US_PER_S))

        # Events per scenario, then actors per scenario
        shares = np.array([s.share for s in self.scenarios])
        self.events = _allocate(config.rows, shares)
        self.actors = np.array(
            [
                max(s.min_actors, round(n / (s.events_per_actor_day * config.days)))
                for s, n in zip(self.scenarios, self.events, strict=True)
            ],
            dtype=np.int64,
        )
        self.actor_offset = np.concatenate([[0], np.cumsum(self.actors)[:-1]])

        # Activity CDF per scenario on a minute grid
        minutes = max(1, math.ceil(self.window_us / _US_PER_MIN))
        self.grid_us = np.minimum(np.arange(minutes + 1, dtype=np.int64) * _US_PER_MIN, self.window_us)
        centres = self.start_us + (self.grid_us[:-1] + self.grid_us[1:]) // 2
        hour = (centres % (86_400 * _US_PER_S)) / (3_600 * _US_PER_S)
        weekday = ((centres // (86_400 * _US_PER_S)) + 3) % 7  # 1970-01-01 was a Thursday
        widths = np.diff(self.grid_us).astype(np.float64)
        self.cdf = []
        for s in self.scenarios:
            mass = np.maximum(_PROFILES[s.hours](hour, weekday), 1e-3) * widths
            self.cdf.append(np.concatenate([[0.0], np.cumsum(mass) / mass.sum()]))

        # Time slices and each scenario's exact event count per slice
        self.slices = max(1, math.ceil(config.rows / SLICE_EVENTS))
        self.bounds_us = np.linspace(0, self.window_us, self.slices + 1).round().astype(np.int64)
        self.slice_events = np.zeros((len(self.scenarios), self.slices), dtype=np.int64)
        for i, n in enumerate(self.events):
            at = np.interp(self.bounds_us, self.grid_us, self.cdf[i])
            at[-1] = 1.0
            self.slice_events[i] = np.diff(np.round(n * at).astype(np.int64))

    def fraud_probabilities(self, hasher: _Hasher) -> np.ndarray:
        """Each actor's fraud probability, indexed by global actor id."""
        out = []
        for s, n in zip(self.scenarios, self.actors, strict=True):
            low, high = s.fraud_probability
            out.append(low + (high - low) * _unit(hasher(s.name, "fraud-probability", np.arange(n))))
        return np.concatenate(out)


_COLUMNS = ("t", "scenario", "ip", "device", "agent", "group", "cost", "actor", "label")


def _episode_sizes(rng: np.random.Generator, s: Scenario, total: int) -> np.ndarray:
    """Clicks per episode, summing to exactly ``total`` (the last episode is cut short)."""
    drawn, have = [], 0
    while have < total:
        n = max(16, int((total - have) / s.mean_clicks * 1.1) + 8)
        sizes = np.rint(s.clicks_median * np.exp(s.clicks_sigma * rng.standard_normal(n)))
        sizes = np.clip(sizes, 1, s.clicks_max).astype(np.int64)
        drawn.append(sizes)
        have += int(sizes.sum())
    sizes = np.concatenate(drawn)
    ends = np.cumsum(sizes)
    last = int(np.searchsorted(ends, total))
    sizes = sizes[: last + 1]
    sizes[last] -= ends[last] - total
    return sizes


def _generate_scenario(
    plan: _Plan, world: _World, p_actor: np.ndarray, i: int, j: int
) -> dict[str, np.ndarray]:
    """The clicks of scenario ``i`` whose episodes start in slice ``j``."""
    s = plan.scenarios[i]
    total = int(plan.slice_events[i, j])
    rng = np.random.default_rng([plan.config.seed, j, _code(s.name)])
    lo_us, hi_us = int(plan.bounds_us[j]), int(plan.bounds_us[j + 1])

    # Episodes: size, start time from the daily profile, actor
    sizes = _episode_sizes(rng, s, total)
    episodes = len(sizes)
    cdf = plan.cdf[i]
    u = rng.uniform(np.interp(lo_us, plan.grid_us, cdf), np.interp(hi_us, plan.grid_us, cdf), episodes)
    start = np.clip(np.interp(u, cdf, plan.grid_us).astype(np.int64), lo_us, hi_us - 1)
    actor = _skewed(rng.random(episodes), int(plan.actors[i]), s.actor_skew)

    # Clicks: gaps inside each episode (a period for scripts, lognormal for people)
    of = np.repeat(np.arange(episodes), sizes)
    first = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    if s.period_s is not None:
        low, high = np.log(s.period_s[0]), np.log(s.period_s[1])
        period = np.exp(low + (high - low) * _unit(world.h(s.name, "period", actor)))
        gaps = period[of] * (1.0 + s.period_jitter * rng.standard_normal(total))
    else:
        gaps = s.gap_median_s * np.exp(s.gap_sigma * rng.standard_normal(total))
    gaps_us = np.maximum(gaps * _US_PER_S, 1.0).astype(np.int64)
    gaps_us[first] = 0
    offsets = np.cumsum(gaps_us)
    offsets -= np.repeat(offsets[first], sizes)

    # Episodes that would run past the window end end where they would have started
    # instead (never starting before their slice; clicks are capped at the window end)
    duration = offsets[first + sizes - 1]
    late = start + duration >= plan.window_us
    start[late] = np.maximum(start[late] - duration[late] - 1, lo_us)
    t = np.minimum(start[of] + offsets, plan.window_us - 1)

    # Entities, cost and label
    keys = rng.bit_generator.random_raw(episodes + total)
    clicks = _Clicks(s, of, actor, keys[:episodes], keys[episodes:])
    ip, device, agent, group = (clicks.per_click(v) for v in _IDENTITIES[s.identity](world, clicks))
    cost = np.round(world.pools.ag_cost[group] * np.exp(0.2 * rng.standard_normal(total)), 4)
    gid = (plan.actor_offset[i] + actor).astype(np.int32)[of]
    label = (rng.random(total) < p_actor[gid]).astype(np.int8)
    return {
        "t": t,
        "scenario": np.full(total, i, dtype=np.int8),
        "ip": ip.astype(np.uint32, copy=False),
        "device": device,
        "agent": agent.astype(np.int32, copy=False),
        "group": group.astype(np.int32, copy=False),
        "cost": cost,
        "actor": gid,
        "label": label,
    }


def _concat(chunks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(chunks) == 1:
        return chunks[0]
    return {k: np.concatenate([c[k] for c in chunks]) for k in _COLUMNS}


def _take(chunk: dict[str, np.ndarray], index: np.ndarray | slice) -> dict[str, np.ndarray]:
    return {k: chunk[k][index] for k in _COLUMNS}


def _slices(plan: _Plan, world: _World, p_actor: np.ndarray):
    """Finished events, slice by slice, each sorted by time and all in global time order."""
    carry: dict[str, np.ndarray] | None = None
    for j in range(plan.slices):
        chunks = [carry] if carry is not None else []
        chunks += [
            _generate_scenario(plan, world, p_actor, i, j)
            for i in range(len(plan.scenarios))
            if plan.slice_events[i, j] > 0
        ]
        if not chunks:
            continue
        merged = _concat(chunks)
        merged = _take(merged, np.argsort(merged["t"], kind="stable"))
        if j == plan.slices - 1:
            yield merged
            return
        cut = int(np.searchsorted(merged["t"], plan.bounds_us[j + 1], side="left"))
        carry = _take(merged, slice(cut, None))
        yield _take(merged, slice(0, cut))


# Columns: numeric events to arrow columns ------------------------------------------------

# Parquet layout of a part. Strings that repeat (campaign, ad group, keyword, agent,
# scenario, address, device) are handed to the writer as dictionary arrays, which skips
# both materializing them and hashing them again. The arrow schema is not stored, since it
# would record those dictionary types: readers then see plain strings, exactly
# SYNTHETIC.arrow_schema().
_PARQUET_OPTIONS: dict[str, Any] = {
    "store_schema": False,
    "use_dictionary": [
        "campaign_id", "ad_group", "keyword_type", "ip_address", "device_id", "user_agent", "is_fraud",
        "fraud_probability", "scenario",
    ],
    "column_encoding": {"event_id": "DELTA_BYTE_ARRAY", "click_time": "DELTA_BINARY_PACKED"},
    # Room for a part's distinct devices and addresses in one dictionary page.
    "dictionary_pagesize_limit": 32 << 20,
}


def _fixed_width_strings(chars: np.ndarray) -> pa.Array:
    """An arrow string array from an (n, width) uint8 array of ASCII characters."""
    n, width = chars.shape
    offsets = np.arange(0, (n + 1) * width, width, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(chars)))


class _Formatter:
    """Lookup tables that turn integer columns into their string forms, vectorized."""

    def __init__(self, seed: int) -> None:
        self.prefix = np.frombuffer(f"ev-{seed}-".encode(), dtype=np.uint8)
        digits = np.empty((1_000_000, 6), dtype=np.uint8)
        rest = np.arange(1_000_000)
        for k in range(5, -1, -1):
            rest, digit = np.divmod(rest, 10)
            digits[:, k] = digit + ord("0")
        self.six_digits = digits
        hex_chars = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
        pairs = np.stack([hex_chars[np.arange(256) >> 4], hex_chars[np.arange(256) & 15]], axis=1)
        self.hex_pairs = np.ascontiguousarray(pairs).view(np.uint16).ravel()
        self.octets = pa.array([str(i) for i in range(256)], pa.string())

    def event_ids(self, first: int, n: int) -> pa.Array:
        """``ev-<seed>-<index>``, the index zero-padded to 12 digits (string order = time order)."""
        if first + n > 10**12:
            raise ValueError("event index does not fit 12 digits")
        index = np.arange(first, first + n, dtype=np.int64)
        width = len(self.prefix)
        chars = np.empty((n, width + 12), dtype=np.uint8)
        chars[:, :width] = self.prefix
        chars[:, width : width + 6] = self.six_digits[index // 1_000_000]
        chars[:, width + 6 :] = self.six_digits[index % 1_000_000]
        return _fixed_width_strings(chars)

    def device_ids(self, key: np.ndarray) -> pa.Array:
        """UUID-shaped ids hashed from device keys, as a dictionary array: each key once."""
        encoded = pa.array(key).dictionary_encode()
        unique = encoded.dictionary.to_numpy()
        raw = np.empty((len(unique), 2), dtype=_U64)
        raw[:, 0] = _mix(unique)
        raw[:, 1] = _mix(unique ^ _GOLDEN)
        hexed = self.hex_pairs[raw.view(np.uint8)].view(np.uint8)
        chars = np.empty((len(unique), 36), dtype=np.uint8)
        chars[:, [8, 13, 18, 23]] = ord("-")
        chars[:, 0:8] = hexed[:, 0:8]
        chars[:, 9:13] = hexed[:, 8:12]
        chars[:, 14:18] = hexed[:, 12:16]
        chars[:, 19:23] = hexed[:, 16:20]
        chars[:, 24:36] = hexed[:, 20:32]
        return pa.DictionaryArray.from_arrays(encoded.indices, _fixed_width_strings(chars))

    def ip_addresses(self, ip: np.ndarray) -> pa.Array:
        """Dotted quads as a dictionary array: each distinct address formatted once."""
        encoded = pa.array(ip).dictionary_encode()
        unique = encoded.dictionary.to_numpy()
        octets = [self.octets.take(((unique >> shift) & 255).astype(np.int32)) for shift in (24, 16, 8, 0)]
        return pa.DictionaryArray.from_arrays(encoded.indices, pc.binary_join_element_wise(*octets, "."))


def _to_table(
    chunk: dict[str, np.ndarray], first: int, plan: _Plan, pools: Pools, fmt: _Formatter, p_actor: np.ndarray
) -> pa.Table:
    """One part as an arrow table with :data:`SYNTHETIC` columns (some dictionary-typed)."""
    group = chunk["group"]
    columns = {
        "event_id": fmt.event_ids(first, len(group)),
        "campaign_id": pa.DictionaryArray.from_arrays(pools.ag_campaign[group], pools.campaigns),
        "ad_group": pa.DictionaryArray.from_arrays(group, pools.ad_groups),
        "keyword_type": pa.DictionaryArray.from_arrays(pools.ag_keyword[group], pools.keywords),
        "click_time": pa.array(chunk["t"] + plan.start_us, pa.timestamp("us", tz="UTC")),
        "ip_address": fmt.ip_addresses(chunk["ip"]),
        "device_id": fmt.device_ids(chunk["device"]),
        "user_agent": pa.DictionaryArray.from_arrays(chunk["agent"], pools.agents),
        "click_cost": pa.array(chunk["cost"], pa.float64()),
        "is_fraud": pa.array(chunk["label"], pa.int8()),
        "fraud_probability": pa.array(p_actor[chunk["actor"]], pa.float64()),
        "scenario": pa.DictionaryArray.from_arrays(chunk["scenario"], plan.scenario_names),
    }
    names = SYNTHETIC.arrow_schema().names
    schema = pa.schema([pa.field(name, columns[name].type, nullable=False) for name in names])
    return pa.Table.from_arrays([columns[name] for name in names], schema=schema)


# Bookkeeping: the Bayes AUC without keeping every event -----------------------------------


def grouped_auc(score: np.ndarray, positives: np.ndarray, negatives: np.ndarray) -> float | None:
    """ROC AUC of a score from per-score-value counts; ties count one half, as in sklearn.

    ``None`` when there are no positives or no negatives (the AUC is undefined).

    :param score: score of each group (may repeat across groups).
    :param positives: label-1 events per group.
    :param negatives: label-0 events per group.
    """
    values, inverse = np.unique(score, return_inverse=True)
    pos = np.bincount(inverse, weights=positives, minlength=len(values))
    neg = np.bincount(inverse, weights=negatives, minlength=len(values))
    total_pos, total_neg = pos.sum(), neg.sum()
    if total_pos == 0 or total_neg == 0:
        return None
    below = np.cumsum(neg) - neg
    return float(np.sum(pos * (below + 0.5 * neg)) / (total_pos * total_neg))


class _Tally:
    """Per-actor event and fraud counts for each time split, and per-scenario totals."""

    def __init__(self, plan: _Plan) -> None:
        rows = plan.config.rows
        self.actors = int(plan.actors.sum())
        self.edges = [0, round(rows * SPLIT_FRACTIONS["train"])]
        self.edges.append(self.edges[1] + round(rows * SPLIT_FRACTIONS["validation"]))
        self.edges.append(rows)
        self.events = np.zeros((3, self.actors))
        self.frauds = np.zeros((3, self.actors))
        self.scenario_events = np.zeros(len(plan.scenarios), dtype=np.int64)
        self.scenario_frauds = np.zeros(len(plan.scenarios), dtype=np.int64)
        self.split_start_us: dict[int, int] = {}

    def add(self, chunk: dict[str, np.ndarray], first: int) -> None:
        n = len(chunk["t"])
        self.scenario_events += np.bincount(chunk["scenario"], minlength=len(self.scenario_events))
        self.scenario_frauds += np.bincount(
            chunk["scenario"], weights=chunk["label"], minlength=len(self.scenario_events)
        ).astype(np.int64)
        for k in range(3):
            lo, hi = max(self.edges[k], first), min(self.edges[k + 1], first + n)
            if lo >= hi:
                continue
            if lo == self.edges[k]:
                self.split_start_us[k] = int(chunk["t"][lo - first])
            actor, label = chunk["actor"][lo - first : hi - first], chunk["label"][lo - first : hi - first]
            self.events[k] += np.bincount(actor, minlength=self.actors)
            self.frauds[k] += np.bincount(actor, weights=label, minlength=self.actors)

    def auc(self, p_actor: np.ndarray, splits: list[int]) -> float | None:
        events = self.events[splits].sum(axis=0)
        frauds = self.frauds[splits].sum(axis=0)
        seen = events > 0
        return grouped_auc(p_actor[seen], frauds[seen], events[seen] - frauds[seen])


# The run ----------------------------------------------------------------------------------


def _parts(chunks, part_rows: int, rows: int):
    """Cut time-ordered chunks into parts of ``part_rows`` rows: ``(first index, part)``."""
    buffer: list[dict[str, np.ndarray]] = []
    buffered = first = 0
    for chunk in chunks:
        buffer.append(chunk)
        buffered += len(chunk["t"])
        while buffered >= part_rows or (buffered and first + buffered == rows):
            merged = _concat(buffer)
            size = min(part_rows, buffered)
            yield first, _take(merged, slice(0, size))
            first, buffered = first + size, buffered - size
            buffer = [_take(merged, slice(size, None))] if buffered else []


def generate(config: GenerateConfig) -> dict[str, Any]:
    """Generate ``config.rows`` events into a parquet dataset at ``config.output``.

    The dataset is written to a temporary sibling and published whole when complete.

    :param config: the run's options.
    :return: the stage result (rows, fraud rate, Bayes AUC overall and per time split,
        per-scenario counts, the window, the drift and the throughput).
    """
    began = time.perf_counter()

    # Plan and pools
    plan = _Plan(config)
    residential = max(512, int(plan.actors[0]) // 30)  # about 30 organic users per /24
    pools = build_pools(config.seed, plan.drift, residential)
    world = _World(config.seed, pools)
    p_actor = plan.fraud_probabilities(world.h)
    fmt = _Formatter(config.seed)
    tally = _Tally(plan)
    parts = math.ceil(config.rows / config.part_rows)
    logger.info(
        "generating %d events (%d parts, %d slices) from %s over %g days, seed %d, drift %s",
        config.rows, parts, plan.slices, _iso(config.start), config.days, config.seed, plan.drift.name,
    )

    # Parts: formatted and written in a background thread while the next is generated
    tmp = storage.temp_sibling(config.output)
    fs, tmp_path = storage.filesystem(tmp)
    fs.makedirs(tmp_path, exist_ok=True)
    written = 0

    def write(part: int, first: int, chunk: dict[str, np.ndarray]) -> None:
        nonlocal written
        table = _to_table(chunk, first, plan, pools, fmt, p_actor)
        path = posixpath.join(tmp_path, f"part-{part:05d}.parquet")
        pq.write_table(table, path, filesystem=fs, **_PARQUET_OPTIONS)
        written += table.num_rows
        logger.info(
            "part %d/%d written: %d rows, %d of %d so far, %.0f events/s",
            part + 1, parts, table.num_rows, written, config.rows,
            written / max(time.perf_counter() - began, 1e-9),
        )

    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate-writer") as writer:
            pending: Future | None = None
            chunks = _slices(plan, world, p_actor)
            for part, (first, chunk) in enumerate(_parts(chunks, config.part_rows, config.rows)):
                tally.add(chunk, first)
                if pending is not None:
                    pending.result()
                pending = writer.submit(write, part, first, chunk)
            if pending is not None:
                pending.result()
        if written != config.rows:
            raise RuntimeError(f"wrote {written} rows, expected {config.rows}")
        storage.replace_dir(tmp, config.output)
    except BaseException:
        if fs.exists(tmp_path):
            fs.rm(tmp_path, recursive=True)
        raise

    # Result
    elapsed = time.perf_counter() - began
    result = _result(config, plan, tally, p_actor, parts, elapsed)
    logger.info(
        "wrote %d events to %s in %.1f s (%.0f events/s): fraud rate %.4f, Bayes AUC %s",
        written, config.output, elapsed, result["events_per_s"], result["fraud_rate"], result["bayes_auc"],
    )
    return result


def _result(
    config: GenerateConfig, plan: _Plan, tally: _Tally, p_actor: np.ndarray, parts: int, elapsed: float
) -> dict[str, Any]:
    names = list(SPLIT_FRACTIONS)
    rows = int(tally.scenario_events.sum())
    starts = {names[k]: _iso(_from_us(plan.start_us + t)) for k, t in sorted(tally.split_start_us.items())}
    return {
        "dataset": SYNTHETIC.name,
        "schema_fingerprint": SYNTHETIC.fingerprint(),
        "raw_uri": config.output,
        "rows": rows,
        "parts": parts,
        "part_rows": config.part_rows,
        "fraud_rate": float(tally.scenario_frauds.sum() / rows),
        "bayes_auc": tally.auc(p_actor, [0, 1, 2]),
        "bayes_auc_by_split": {name: tally.auc(p_actor, [k]) for k, name in enumerate(names)},
        "split": {
            "by": "click_time quantiles (ties by event_id); train is the earliest",
            "fractions": SPLIT_FRACTIONS,
            "starts": starts,
        },
        "scenarios": {
            s.name: {
                "fraud_mechanism": s.fraud,
                "events": int(tally.scenario_events[i]),
                "fraud_rate": float(tally.scenario_frauds[i] / max(tally.scenario_events[i], 1)),
                "actors": int(plan.actors[i]),
                "description": s.description,
            }
            for i, s in enumerate(plan.scenarios)
        },
        "start": _iso(config.start),
        "end": _iso(config.end),
        "days": config.days,
        "seed": config.seed,
        "drift": plan.drift.describe(),
        "elapsed_s": round(elapsed, 3),
        "events_per_s": round(rows / max(elapsed, 1e-9), 1),
    }


def _from_us(us: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)


# CLI --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser("jobs.generate", "Generate synthetic ad-click events with behavioural fraud as parquet.")
    p.add_argument(
        "--output", required=True, help="URI of the parquet dataset directory to write (replaced whole)"
    )
    p.add_argument("--rows", type=int, default=DEFAULT_ROWS, help="number of events to generate")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed (same options, same bytes)")
    p.add_argument("--start", default=DEFAULT_START, help="window start: an ISO date or date-time, UTC")
    p.add_argument("--days", type=float, default=DEFAULT_DAYS, help="length of the event window in days")
    p.add_argument(
        "--part-rows", type=int, default=DEFAULT_PART_ROWS,
        help="rows per parquet part; parts are written as they fill, in time order",
    )
    p.add_argument(
        "--drift", choices=DRIFTS, default="none",
        help="shift the traffic: new campaigns, a different fraud mix, inflated costs, a new bot, or all",
    )
    p.add_argument(
        "--smoke-test", action="store_true", help=f"generate only {SMOKE_TEST_ROWS} rows (overrides --rows)"
    )
    return p


def config_from_args(args: argparse.Namespace) -> GenerateConfig:
    return GenerateConfig(
        output=args.output,
        rows=SMOKE_TEST_ROWS if args.smoke_test else args.rows,
        seed=args.seed,
        start=parse_start(args.start),
        days=args.days,
        part_rows=args.part_rows,
        drift=args.drift,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.configure_logging(args.verbose)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        cli.fail(str(exc))
    result = generate(config)
    cli.write_result(result, args.result_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
