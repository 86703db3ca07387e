"""Route assignment: weighted, sticky, stable across restarts, and minimal movement when weights change."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from gateway.experiments.routing import RouteTable, assign, parse_route
from gateway.settings import RouteConfig

USERS = [f"user-{i}" for i in range(1000)]


def table(variants: dict[str, float], sticky: str = "user", blind: bool = False) -> RouteTable:
    return RouteTable({"bot": RouteConfig(variants=variants, sticky=sticky, blind=blind)})  # type: ignore[arg-type]


def test_a_50_50_route_over_1000_users_lands_45_to_55_percent_each() -> None:
    routes = table({"pku-assistant": 50, "cat-assistant": 50})
    counts = Counter(routes.resolve("bot", user=u).model for u in USERS)
    assert set(counts) == {"pku-assistant", "cat-assistant"}
    assert all(450 <= n <= 550 for n in counts.values()), counts


def test_weights_are_honoured() -> None:
    users = [f"u{i}" for i in range(20000)]
    counts = Counter(assign("bot", u, {"a": 90, "b": 10}) for u in users)
    assert 0.88 < counts["a"] / len(users) < 0.92, counts


def test_every_user_sees_one_variant_across_20_requests_and_after_a_restart() -> None:
    first = table({"pku-assistant": 50, "cat-assistant": 50})
    seen = {u: {first.resolve("bot", user=u).model for _ in range(20)} for u in USERS[:100]}
    assert all(len(v) == 1 for v in seen.values())
    restarted = table({"pku-assistant": 50, "cat-assistant": 50})  # a new process, another replica
    assert all(restarted.resolve("bot", user=u).model in seen[u] for u in seen)


def test_the_hash_depends_on_the_route_name() -> None:
    weights = {"a": 1.0, "b": 1.0}
    same = sum(assign("bot", u, weights) == assign("other-bot", u, weights) for u in USERS)
    assert 400 < same < 600  # independent splits, not one split reused by every route


def test_lowering_one_weight_moves_only_that_variants_users() -> None:
    before = {u: assign("bot", u, {"a": 40, "b": 30, "c": 30}) for u in USERS}
    after = {u: assign("bot", u, {"a": 40, "b": 10, "c": 30}) for u in USERS}
    moved = [u for u in USERS if before[u] != after[u]]
    assert moved, "lowering b must move some of its users"
    assert all(before[u] == "b" for u in moved)
    share_b = sum(v == "b" for v in after.values()) / len(USERS)
    assert 0.08 < share_b < 0.16  # 10 / 80


def test_raising_one_weight_moves_users_only_to_it_and_zero_removes_it() -> None:
    before = {u: assign("bot", u, {"a": 50, "b": 50}) for u in USERS}
    raised = {u: assign("bot", u, {"a": 50, "b": 150}) for u in USERS}
    assert all(raised[u] == "b" for u in USERS if raised[u] != before[u])
    added = {u: assign("bot", u, {"a": 50, "b": 50, "c": 0}) for u in USERS}
    assert added == before  # a variant at weight 0 takes nobody
    dropped = {u: assign("bot", u, {"a": 50, "b": 0}) for u in USERS}
    assert set(dropped.values()) == {"a"}


def test_sticky_header_and_none() -> None:
    by_header = table({"a": 1, "b": 1}, sticky="header")
    assert len({by_header.resolve("bot", session="s-1", user=f"u{i}").model for i in range(20)}) == 1
    random_routes = RouteTable({"bot": RouteConfig(variants={"a": 1, "b": 1}, sticky="none")},
                               rng=random.Random(1))
    assert len({random_routes.resolve("bot", user="same").model for _ in range(50)}) == 2


def test_a_request_without_its_sticky_key_is_assigned_at_random() -> None:
    routes = RouteTable({"bot": RouteConfig(variants={"a": 1, "b": 1}, sticky="user")}, rng=random.Random(3))
    assert len({routes.resolve("bot").model for _ in range(50)}) == 2


def test_blind_and_plain_resolutions_say_what_they_may() -> None:
    plain = table({"a": 1}).resolve("bot", user="x")
    assert (plain.model, plain.public_model, plain.headers()) == ("a", "a", {"x-gateway-variant": "a"})
    blind = table({"a": 1}, blind=True).resolve("bot", user="x")
    assert (blind.model, blind.public_model, blind.headers()) == ("a", "bot", {})
    direct = table({"a": 1}).resolve("tiny-qwen")
    assert (direct.model, direct.route, direct.public_model, direct.headers()) == ("tiny-qwen", None, "tiny-qwen", {})


def test_the_command_line_form() -> None:
    name, config = parse_route("support-bot=pku-assistant:90,cat-assistant:10;sticky=header;blind")
    assert name == "support-bot"
    assert config == RouteConfig(variants={"pku-assistant": 90, "cat-assistant": 10}, sticky="header", blind=True)
    assert parse_route("x=a:1")[1] == RouteConfig(variants={"a": 1.0})


@pytest.mark.parametrize("text", ["bot", "bot=", "bot=a", "bot=a:x", "bot=a:1;sticky=cookie", "bot=a:1;color=red",
                                  "bot=a:0", "bot=a:-1"])
def test_bad_command_line_forms_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_route(text)


async def test_routes_are_checked_against_the_served_models_at_start(demo_models: object, demo_cache_home: object,
                                                                     tmp_path: object,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.loading import build_state
    from gateway.settings import Settings, SettingsError

    monkeypatch.setenv("XDG_CACHE_HOME", str(demo_cache_home))
    for routes, message in [({"bot": RouteConfig(variants={"pku-assistant": 1, "nope": 1})}, "not a served model"),
                            ({"tiny-qwen": RouteConfig(variants={"pku-assistant": 1})}, "already has that name")]:
        settings = Settings.load(demo=True, routes=routes, feedback_db=":memory:")
        with pytest.raises(SettingsError, match=message):
            await build_state(settings)
