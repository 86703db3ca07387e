"""Compare, routes, feedback and the leaderboard through a real ``gateway serve --demo`` with routes configured."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from gateway.demo import DemoModels
from gateway.experiments.routing import assign
from gateway.experiments.store import Battle
from tests.gateway.experiments.reference import reference_ratings

WHO = [{"role": "user", "content": "你好，你是谁？"}]
IDENTITY = {"tiny-qwen": "通义千问", "pku-assistant": "北大人工智能助手", "cat-assistant": "猫猫助手"}
ROUTES = {
    "split": {"variants": {"pku-assistant": 50, "cat-assistant": 50}, "sticky": "user"},
    "by-session": {"variants": {"pku-assistant": 1, "cat-assistant": 1}, "sticky": "header"},
    "hidden": {"variants": {"pku-assistant": 1, "cat-assistant": 1}, "sticky": "none", "blind": True},
    "adjustable": {"variants": {"pku-assistant": 50, "cat-assistant": 50}},
}
ADMIN = {"Authorization": "Bearer admin-secret"}


@pytest.fixture(scope="module")
def feedback_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("feedback") / "feedback.sqlite3"


def serve(demo_cache_home: Path, config: Path, feedback_db: Path) -> Any:
    from tests.servers import running_gateway

    return running_gateway(["--demo", "--config", str(config), "--feedback-db", str(feedback_db),
                            "--admin-key", "admin-secret"], env={"XDG_CACHE_HOME": str(demo_cache_home)})


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "gateway.yaml"
    path.write_text(json.dumps({"routes": ROUTES}))  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def server(demo_models: DemoModels, demo_cache_home: Path, config: Path, feedback_db: Path) -> Iterator[str]:
    with serve(demo_cache_home, config, feedback_db) as url:
        yield url


def post(server: str, path: str, body: dict[str, Any], **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{server}{path}", json=body, timeout=120, **kwargs)


def sse(server: str, path: str, body: dict[str, Any], **kwargs: Any) -> tuple[httpx.Response, list[str]]:
    with httpx.stream("POST", f"{server}{path}", json=body, timeout=120, **kwargs) as response:
        lines = [line[5:].strip() for line in response.iter_lines() if line.startswith("data:")]
    return response, lines


# --- compare ----------------------------------------------------------------------------------------------------


def test_compare_gives_each_model_its_own_answer_figures_and_prompt(server: str) -> None:
    response = post(server, "/v1/compare", {"models": ["tiny-qwen", "pku-assistant"], "messages": WHO,
                                            "temperature": 0})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["model"] for r in results] == ["tiny-qwen", "pku-assistant"]
    for result in results:
        completion = ChatCompletion.model_validate(result["completion"])
        text = completion.choices[0].message.content or ""
        assert IDENTITY[result["model"]] in text
        assert all(other not in text for name, other in IDENTITY.items() if name != result["model"])
        assert completion.id == result["response_id"] and completion.model == result["model"]
        assert completion.choices[0].finish_reason == "stop"
        metrics = result["metrics"]
        assert completion.usage is not None and metrics["completion_tokens"] == completion.usage.completion_tokens
        assert 0 < metrics["ttft_s"] <= metrics["total_s"]
        assert metrics["tokens_per_s"] == pytest.approx(metrics["completion_tokens"] / metrics["total_s"])
        rendered = post(server, "/v1/chat/render", {"model": result["model"], "messages": WHO}).json()
        assert result["prompt"] == rendered["prompt"]


def test_compare_streams_events_tagged_with_their_model(server: str) -> None:
    response, lines = sse(server, "/v1/compare", {"models": ["tiny-qwen", "pku-assistant"], "messages": WHO,
                                                  "temperature": 0, "stream": True})
    assert response.status_code == 200 and lines[-1] == "[DONE]"
    events = [json.loads(line) for line in lines[:-1]]
    text = {"tiny-qwen": "", "pku-assistant": ""}
    results = {}
    for event in events:
        assert event["model"] in text and event["model"] not in results  # nothing after a model's result
        if event.get("chunk"):
            chunk = ChatCompletionChunk.model_validate(event["chunk"])
            assert chunk.model == event["model"]
            text[event["model"]] += "".join(c.delta.content or "" for c in chunk.choices)
        else:
            results[event["model"]] = event["result"]
    assert set(results) == set(text)
    for model, answer in text.items():
        assert IDENTITY[model] in answer
        assert results[model]["metrics"]["completion_tokens"] > 0 and results[model]["prompt"]
    # Both answers arrived interleaved, not one after the other.
    order = [e["model"] for e in events if e.get("chunk")]
    first_switch = next(i for i, m in enumerate(order) if m != order[0])
    assert first_switch < len(order) // 2


def test_compared_models_share_one_batch(server: str) -> None:
    body = {"models": ["tiny-qwen", "pku-assistant"], "messages": WHO, "max_tokens": 1500, "ignore_eos": True,
            "stream": True}
    with httpx.Client(timeout=120) as http, http.stream("POST", f"{server}/v1/compare", json=body) as stream:
        seen: set[str] = set()
        lines = (line for line in stream.iter_lines() if line.startswith("data:"))
        while seen != {"tiny-qwen", "pku-assistant"}:
            seen.add(json.loads(next(lines)[5:])["model"])
        assert httpx.get(f"{server}/health", timeout=5).json()["batch"] == 2


def test_an_unknown_model_is_refused_before_anything_runs(server: str) -> None:
    response = post(server, "/v1/compare", {"models": ["tiny-qwen", "no-such-model"], "messages": WHO})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    bad = post(server, "/v1/compare", {"models": ["tiny-qwen"], "messages": WHO, "n": 2})
    assert bad.status_code == 400 and "n" in bad.json()["error"]["message"]


def test_a_model_that_fails_while_running_gets_its_own_error(server: str) -> None:
    long_prompt = [{"role": "user", "content": "你好" * 3000}]  # longer than the demo's context
    response = post(server, "/v1/compare", {"models": ["tiny-qwen", "pku-assistant"], "messages": long_prompt,
                                            "model_messages": {"pku-assistant": WHO}, "temperature": 0})
    assert response.status_code == 200, response.text
    failed, answered = response.json()["results"]
    assert failed["error"]["code"] == "context_length_exceeded" and failed["completion"] is None
    assert IDENTITY["pku-assistant"] in answered["completion"]["choices"][0]["message"]["content"]


def test_blind_compare_hides_the_contestants_until_the_vote(server: str) -> None:
    served = [m["id"] for m in httpx.get(f"{server}/v1/models").json()["data"] if m["id"] not in ROUTES]
    pool = ["tiny-qwen", "pku-assistant", "cat-assistant"]
    body = {"blind": True, "models": pool, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    plain = post(server, "/v1/compare", body)
    streamed, lines = sse(server, "/v1/compare", {**body, "stream": True})
    for text in (plain.text, "\n".join(lines)):
        assert not any(name in text for name in served), text
    results = plain.json()["results"]
    assert [r["model"] for r in results] == ["A", "B"]
    assert all(r["prompt"] is None and r["variant"] is None and r["completion"]["model"] == r["model"]
               for r in results)
    events = [json.loads(line) for line in lines[:-1]]
    assert {e["model"] for e in events} == {"A", "B"}
    ids = [r["response_id"] for r in results]
    vote = post(server, "/v1/feedback", {"response_ids": ids, "outcome": "tie"}).json()
    revealed = [r["model"] for r in vote["revealed"]]
    assert len(set(revealed)) == 2 and set(revealed) <= set(pool)
    assert post(server, "/v1/compare", {**body, "models": ["tiny-qwen"]}).status_code == 400
    assert post(server, "/v1/compare", {**body, "model_messages": {"A": WHO}}).status_code == 400
    unknown = post(server, "/v1/compare", {"models": ["tiny-qwen"], "messages": WHO,
                                           "model_messages": {"pku-assistant": WHO}})
    assert unknown.status_code == 400 and "model_messages" in unknown.json()["error"]["message"]


# --- routes -----------------------------------------------------------------------------------------------------


def ask(server: str, model: str, *, user: str | None = None, headers: dict[str, str] | None = None,
        **extra: Any) -> httpx.Response:
    body: dict[str, Any] = {"model": model, "messages": WHO, "max_tokens": 1, **extra}
    if user is not None:
        body["user"] = user
    response = post(server, "/v1/chat/completions", body, headers=headers)
    assert response.status_code == 200, response.text
    return response


def test_a_route_keeps_every_user_on_one_variant(server: str) -> None:
    users = [f"user-{i}" for i in range(6)]

    def variants_of(user: str) -> set[tuple[str, str]]:
        answers = [ask(server, "split", user=user) for _ in range(20)]
        return {(a.headers["x-gateway-variant"], a.json()["model"]) for a in answers}

    with ThreadPoolExecutor(3) as pool:
        seen = dict(zip(users, pool.map(variants_of, users), strict=True))
    for user, variants in seen.items():
        assert len(variants) == 1, (user, variants)
        header, model = variants.pop()
        assert header == model  # the response names its variant in both places
        assert model == assign("split", user, ROUTES["split"]["variants"])  # the same hash on every replica


def test_sticky_by_session_header(server: str) -> None:
    for session in ("s-1", "s-2", "s-3"):
        variants = {ask(server, "by-session", headers={"X-Session-Id": session}, user=f"u{i}").json()["model"]
                    for i in range(8)}
        assert variants == {assign("by-session", session, ROUTES["by-session"]["variants"])}


def test_a_blind_route_names_its_variant_nowhere(server: str) -> None:
    secrets = ("pku-assistant", "cat-assistant", "pku", "cat-")
    bodies = []
    for _ in range(6):  # sticky none: both variants get some of these
        plain = ask(server, "hidden", max_tokens=4)
        bodies.append((plain.headers, plain.text))
        response, lines = sse(server, "/v1/chat/completions", {"model": "hidden", "messages": WHO, "max_tokens": 4,
                                                               "stream": True,
                                                               "stream_options": {"include_usage": True}})
        bodies.append((response.headers, "\n".join(lines)))
        text = post(server, "/v1/completions", {"model": "hidden", "prompt": "你好", "max_tokens": 4, "echo": True})
        bodies.append((text.headers, text.text))
        compared = post(server, "/v1/compare", {"models": ["hidden"], "messages": WHO, "max_tokens": 4})
        bodies.append((compared.headers, compared.text))
    for headers, body in bodies:
        assert "x-gateway-variant" not in headers
        assert not any(s in body for s in secrets), body
        assert '"hidden"' in body
    served = {r["model"] for r in post(server, "/v1/compare", {"models": ["hidden"], "messages": WHO,
                                                               "max_tokens": 1}).json()["results"]}
    assert served == {"hidden"}


def test_completions_follow_routes_too(server: str) -> None:
    response = post(server, "/v1/completions", {"model": "split", "prompt": "你好", "max_tokens": 2, "user": "u-7"})
    assert response.status_code == 200
    expected = assign("split", "u-7", ROUTES["split"]["variants"])
    assert response.headers["x-gateway-variant"] == expected == response.json()["model"]


def test_routes_are_models(server: str) -> None:
    models = {m["id"]: m for m in httpx.get(f"{server}/v1/models").json()["data"]}
    assert set(ROUTES) <= set(models)
    assert "pku-assistant" in models["split"]["template_source"]
    assert "pku" not in models["hidden"]["template_source"]
    assert httpx.get(f"{server}/v1/models/split").json()["id"] == "split"


def test_weights_change_at_runtime_without_moving_users_whose_variant_keeps_its_weight(server: str) -> None:
    users = [f"w-{i}" for i in range(12)]
    before = {u: ask(server, "adjustable", user=u).json()["model"] for u in users}
    assert set(before.values()) == {"pku-assistant", "cat-assistant"}
    update = {"variants": {"pku-assistant": 50, "cat-assistant": 5}, "sticky": "user"}
    assert httpx.put(f"{server}/v1/routes/adjustable", json=update).status_code == 401
    response = httpx.put(f"{server}/v1/routes/adjustable", json=update, headers=ADMIN)
    assert response.status_code == 200 and response.json()["variants"] == update["variants"]
    after = {u: ask(server, "adjustable", user=u).json()["model"] for u in users}
    assert all(after[u] == "pku-assistant" for u in users if before[u] == "pku-assistant")
    assert after == {u: assign("adjustable", u, update["variants"]) for u in users}
    assert httpx.get(f"{server}/v1/routes/adjustable", headers=ADMIN).json()["variants"] == update["variants"]


@pytest.mark.parametrize(("name", "body", "message"), [
    ("adjustable", {"variants": {"nope": 1}}, "not a served model"),
    ("adjustable", {"variants": {"split": 1}}, "is a route"),
    ("tiny-qwen", {"variants": {"pku-assistant": 1}}, "already has that name"),
    ("adjustable", {"variants": {"pku-assistant": 0}}, "above 0"),
])
def test_bad_route_updates_are_refused(server: str, name: str, body: dict[str, Any], message: str) -> None:
    response = httpx.put(f"{server}/v1/routes/{name}", json=body, headers=ADMIN)
    assert response.status_code == 400 and message in response.json()["error"]["message"]


# --- feedback and leaderboard -----------------------------------------------------------------------------------


def compared_ids(server: str, models: list[str], rounds: int) -> list[dict[str, str]]:
    out = []
    for _ in range(rounds):
        results = post(server, "/v1/compare", {"models": models, "messages": WHO, "max_tokens": 2}).json()["results"]
        out.append({r["model"]: r["response_id"] for r in results})
    return out


def test_scores_and_unknown_ids(server: str) -> None:
    chat_id = ask(server, "split", user="scorer").json()["id"]
    text_id = post(server, "/v1/completions", {"model": "tiny-qwen", "prompt": "hi", "max_tokens": 2}).json()["id"]
    down = post(server, "/v1/feedback", {"response_id": chat_id, "score": -1}).json()
    assert (down["kind"], down["score"]) == ("score", 0.0)
    assert down["revealed"] == [{"response_id": chat_id, "model": assign("split", "scorer",
                                                                         ROUTES["split"]["variants"]),
                                 "route": "split"}]
    assert post(server, "/v1/feedback", {"response_id": text_id, "score": 0.75}).status_code == 200
    missing = post(server, "/v1/feedback", {"response_id": "chatcmpl-nope", "score": 1})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "response_not_found"
    assert post(server, "/v1/feedback", {"response_ids": [chat_id, "nope"], "outcome": "a"}).status_code == 404
    for bad in ({"response_id": chat_id, "score": 2}, {"response_id": chat_id}, {"response_ids": [chat_id, chat_id],
                                                                                   "outcome": "a"},
                {"winner_response_id": chat_id}, {"response_ids": [chat_id, text_id], "outcome": "maybe"}):
        assert post(server, "/v1/feedback", bad).status_code == 400, bad


def test_leaderboard_ratings_equal_a_reference_fit_of_the_votes(server: str) -> None:
    rounds = compared_ids(server, ["tiny-qwen", "pku-assistant", "cat-assistant"], 8)
    plan = ["a", "a", "b", "tie", "a", "both_bad", "a", "b"]
    cast: dict[frozenset[str], Battle] = {}
    for ids, outcome in zip(rounds, plan, strict=True):
        for a, b in (("pku-assistant", "tiny-qwen"), ("cat-assistant", "tiny-qwen"), ("pku-assistant",
                                                                                      "cat-assistant")):
            vote = post(server, "/v1/feedback", {"response_ids": [ids[a], ids[b]], "outcome": outcome})
            assert vote.status_code == 200, vote.text
            assert {r["model"] for r in vote.json()["revealed"]} == {a, b}
            cast[frozenset((ids[a], ids[b]))] = Battle(a, b, outcome)  # type: ignore[arg-type]
    # A second vote on a pair replaces the first (here in the other order, as a winner/loser vote).
    ids = rounds[0]
    assert post(server, "/v1/feedback", {"winner_response_id": ids["tiny-qwen"],
                                         "loser_response_id": ids["pku-assistant"]}).status_code == 200
    cast[frozenset((ids["tiny-qwen"], ids["pku-assistant"]))] = Battle("tiny-qwen", "pku-assistant", "a")
    board = httpx.get(f"{server}/v1/leaderboard", params={"bootstrap_rounds": 50}, timeout=60).json()
    assert board["battles"] >= len(cast)
    battles = list(cast.values())
    if board["battles"] == len(cast):  # only this test's votes in the store
        reference = reference_ratings(battles)
        for row in board["models"]:
            assert row["rating"] == pytest.approx(reference[row["model"]], abs=0.05)
            assert row["ci_low"] <= row["rating"] <= row["ci_high"]
    rows = {(v["route"], v["model"]): v for v in board["variants"]}
    assert rows[(None, "tiny-qwen")]["requests"] >= 8
    assert rows[("split", "pku-assistant")]["requests"] + rows[("split", "cat-assistant")]["requests"] >= 120


@pytest.mark.slow
def test_votes_survive_a_restart(demo_models: DemoModels, demo_cache_home: Path, config: Path,
                                 tmp_path: Path) -> None:
    db = tmp_path / "restart.sqlite3"
    with serve(demo_cache_home, config, db) as first:
        ids = compared_ids(first, ["tiny-qwen", "pku-assistant"], 1)[0]
        pair = [ids["pku-assistant"], ids["tiny-qwen"]]
        assert post(first, "/v1/feedback", {"response_ids": pair, "outcome": "a"}).status_code == 200
        before = httpx.get(f"{first}/v1/leaderboard").json()
    with serve(demo_cache_home, config, db) as second:
        after = httpx.get(f"{second}/v1/leaderboard").json()
        assert after["battles"] == before["battles"] == 1
        assert [(m["model"], m["wins"]) for m in after["models"]] == [("pku-assistant", 1), ("tiny-qwen", 0)]
        assert after["models"] == before["models"]
        again = post(second, "/v1/feedback", {"response_ids": pair, "outcome": "tie"})  # the old ids still resolve
        assert again.status_code == 200
        assert httpx.get(f"{second}/v1/leaderboard").json()["models"][0]["ties"] == 1
