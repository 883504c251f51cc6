"""Traffic router: which adapter version of a family serves a request.

Per family: a champion version, optionally a challenger taking `weight` of the traffic, and an optional fallback
("base" or a version) that takes the champion's share while set (the incident switch, and the drift fallback of
serving/fallback.py). A challenger under canary keeps its share, so a retrained version can pass its canary while
its family is on fallback (abort the rollout to send everything to the fallback). Pure Python, thread-safe.

    router = Router()
    router.set("support-assistant", champion="2", challenger="3", weight=0.05)
    version, route = router.choose("support-assistant", user_key="user-17")   # ("2", "champion") or ("3", "canary")

Sticky routing: with a user_key, the user's position u = hash(family, user_key) in [0, 1) is fixed, and the user gets
the challenger iff u < weight. Raising the weight therefore only ever moves users from champion to canary, never back.
"""

from __future__ import annotations

import hashlib
import random
import threading
from dataclasses import asdict, dataclass

BASE = "base"
"""Version name meaning "the base model, adapters disabled"."""

ROUTE_CHAMPION = "champion"
ROUTE_CANARY = "canary"
ROUTE_FALLBACK = "fallback"


class UnknownFamily(KeyError):
    """The family has no routing entry."""


@dataclass(frozen=True)
class Route:
    champion: str
    """Version that serves by default."""
    challenger: str | None = None
    """Version under canary, or None."""
    weight: float = 0.0
    """Share of traffic in [0, 1] that goes to the challenger."""
    fallback: str | None = None
    """While set ("base" or a version), it serves the champion's share of the family's requests."""

    def __post_init__(self):
        if not self.champion:
            raise ValueError("a route needs a champion version")
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"challenger weight must be in [0, 1], got {self.weight}")
        if self.challenger is None and self.weight > 0:
            raise ValueError(f"weight {self.weight} given without a challenger")

    def as_dict(self) -> dict:
        return asdict(self)


def sticky_position(family: str, user_key: str) -> float:
    """Deterministic position of a user in [0, 1) for a family (same on every replica and restart)."""
    digest = hashlib.sha256(f"{family}\x00{user_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


class Router:
    """Champion/challenger weights and fallbacks per family."""

    def __init__(self, seed: int | None = None):
        self._routes: dict[str, Route] = {}
        self._lock = threading.Lock()
        self._rng = random.Random(seed)

    def set(self, family: str, champion: str, challenger: str | None = None, weight: float = 0.0) -> Route:
        """Set champion/challenger/weight of a family; keeps its fallback."""
        with self._lock:
            old = self._routes.get(family)
            route = Route(champion, challenger, float(weight) if challenger else 0.0, old.fallback if old else None)
            self._routes[family] = route
            return route

    def set_fallback(self, family: str, fallback: str | None) -> Route:
        """Route the champion's share of a family to `fallback` ("base" or a version); None clears it."""
        with self._lock:
            old = self._get(family)
            route = Route(old.champion, old.challenger, old.weight, fallback)
            self._routes[family] = route
            return route

    def remove(self, family: str) -> None:
        with self._lock:
            self._routes.pop(family, None)

    def get(self, family: str) -> Route:
        with self._lock:
            return self._get(family)

    def families(self) -> dict[str, Route]:
        with self._lock:
            return dict(self._routes)

    def choose(self, family: str, user_key: str | None = None) -> tuple[str, str]:
        """(version, route) for one request; route is "champion", "canary" or "fallback"."""
        with self._lock:
            route = self._get(family)
            default = (route.champion, ROUTE_CHAMPION) if route.fallback is None else (route.fallback, ROUTE_FALLBACK)
            if route.challenger is None or route.weight <= 0.0:
                return default
            u = sticky_position(family, user_key) if user_key is not None else self._rng.random()
        if u < route.weight:
            return route.challenger, ROUTE_CANARY
        return default

    def _get(self, family: str) -> Route:
        try:
            return self._routes[family]
        except KeyError:
            raise UnknownFamily(family) from None
