"""Routes: virtual models that send each request to one of their weighted variants (live A/B splits).

A sticky key (the request's ``user``, or its ``X-Session-Id`` header) always gets the same variant, on every replica
and after restarts, because the choice is a pure function of route name, key and weights: weighted rendezvous
hashing. Each variant ``v`` with weight ``w > 0`` scores ``-ln(u_v) / w`` with ``u_v`` a uniform point in (0, 1)
from sha256(route, key, v); the lowest score wins. ``P(v) = w_v / sum(w)`` exactly, and changing one variant's
weight only moves keys to it (raised) or away from it (lowered): every other variant's score for a key is unchanged,
so a key that did not sit on the changed variant stays where it was.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from gateway.errors import InvalidRequest
from gateway.settings import RouteConfig

SESSION_HEADER = "x-session-id"
VARIANT_HEADER = "x-gateway-variant"


def unit_point(*parts: str) -> float:
    """A uniform point in the open interval (0, 1), the same for the same parts everywhere."""
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    return (int.from_bytes(digest[:8], "big") + 0.5) / 2.0**64


def assign(route: str, key: str, weights: dict[str, float]) -> str:
    """The variant of ``route`` that sticky ``key`` gets under ``weights`` (weighted rendezvous hashing)."""
    scores = {v: -math.log(unit_point(route, key, v)) / w for v, w in weights.items() if w > 0}
    return min(scores, key=lambda v: (scores[v], v))


@dataclass(frozen=True)
class Resolution:
    """What a request's ``model`` turned into: the model to lease, and what the response may say about it."""

    requested: str
    model: str  # the served model (base or adapter) that runs the request
    route: str | None = None
    blind: bool = False

    @property
    def variant(self) -> str | None:
        return self.model if self.route is not None else None

    @property
    def public_model(self) -> str:
        """The response's ``model`` field: the variant, or the route's name when the route is blind."""
        if self.route is None:
            return self.requested
        return self.route if self.blind else self.model

    def headers(self) -> dict[str, str]:
        """``x-gateway-variant`` for a route that is not blind; nothing otherwise."""
        if self.route is None or self.blind:
            return {}
        return {VARIANT_HEADER: self.model}


class RouteTable:
    """The routes served now; ``put`` replaces one at runtime (in memory: a restart goes back to the config)."""

    def __init__(self, routes: dict[str, RouteConfig], *, rng: random.Random | None = None) -> None:
        self._routes = dict(routes)
        self._rng = rng or random.Random()

    def __contains__(self, name: object) -> bool:
        return name in self._routes

    def __iter__(self) -> Iterator[tuple[str, RouteConfig]]:
        return iter(sorted(self._routes.items()))

    def get(self, name: str) -> RouteConfig | None:
        return self._routes.get(name)

    def put(self, name: str, config: RouteConfig) -> None:
        self._routes[name] = config

    def resolve(self, model: str, *, user: str | None = None, session: str | None = None) -> Resolution:
        """The variant for a request naming ``model`` (``model`` itself when it is not a route)."""
        config = self._routes.get(model)
        if config is None:
            return Resolution(requested=model, model=model)
        key = {"user": user, "header": session, "none": None}[config.sticky]
        if key:
            variant = assign(model, key, config.variants)
        else:
            names = [v for v, w in config.variants.items() if w > 0]
            variant = self._rng.choices(names, weights=[config.variants[v] for v in names])[0]
        return Resolution(requested=model, model=variant, route=model, blind=config.blind)


def check_route(name: str, config: RouteConfig, *, is_model: Callable[[str], bool], is_route: Callable[[str], bool]
                ) -> None:
    """A route's name must not shadow a served model, and its variants must be served models (not routes)."""
    if is_model(name):
        raise InvalidRequest(f"route {name!r}: a served model already has that name", param="name")
    for variant in config.variants:
        if is_route(variant):
            raise InvalidRequest(f"route {name!r}: variant {variant!r} is a route; variants are served models",
                                 param="variants")
        if not is_model(variant):
            raise InvalidRequest(f"route {name!r}: variant {variant!r} is not a served model", param="variants")


def parse_route(text: str) -> tuple[str, RouteConfig]:
    """The command-line form ``NAME=VARIANT:WEIGHT,VARIANT:WEIGHT[;sticky=user|header|none][;blind]``.

    >>> parse_route("support-bot=pku-assistant:90,cat-assistant:10;sticky=header")[1].variants
    {'pku-assistant': 90.0, 'cat-assistant': 10.0}
    """
    name, sep, rest = text.partition("=")
    parts = rest.split(";")
    if not sep or not name.strip() or not parts[0].strip():
        raise ValueError(f"expected NAME=VARIANT:WEIGHT,...[;sticky=MODE][;blind], got {text!r}")
    variants: dict[str, float] = {}
    for item in parts[0].split(","):
        variant, colon, weight = item.strip().rpartition(":")
        if not colon or not variant:
            raise ValueError(f"route {name}: expected VARIANT:WEIGHT, got {item.strip()!r}")
        try:
            variants[variant] = float(weight)
        except ValueError:
            raise ValueError(f"route {name}: weight {weight!r} of {variant} is not a number") from None
    options: dict[str, object] = {"variants": variants}
    for option in (p.strip() for p in parts[1:]):
        key, _, value = option.partition("=")
        if key == "sticky":
            options["sticky"] = value
        elif key == "blind" and value in ("", "true", "false"):
            options["blind"] = value != "false"
        else:
            raise ValueError(f"route {name}: unknown option {option!r} (known: sticky=user|header|none, blind)")
    return name.strip(), RouteConfig.model_validate(options)
