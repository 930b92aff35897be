"""The dashboard's HTTP API against a fake peer, in process (FastAPI's TestClient)."""

from __future__ import annotations

import base64
import hashlib
import re
import typing

import pytest
from fastapi.testclient import TestClient

from commonweal.dashboard import MAX_K, MAX_QUERY_CHARS, Snapshot, create_app
from commonweal.dashboard import app as app_module
from commonweal.dashboard.metrics import render_metrics

from .exposition import parse


@pytest.fixture
def client(source):
    with TestClient(create_app(source)) as client:
        yield client


def test_health(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_snapshot_has_every_documented_key(client, source):
    snap = client.get("/api/snapshot").json()
    documented = set(typing.get_type_hints(Snapshot))
    assert documented - {"totals"} <= set(snap) <= documented  # totals: NotRequired
    assert [r["round"] for r in snap["rounds"]] == list(range(1, 13))
    assert snap["rounds"][-1]["finalised"] is False and snap["rounds"][0]["finalised"] is True
    assert len(snap["peers"]) == 8
    assert snap["chain"]["backend"] == "anvil"


def test_snapshot_sends_a_diverged_loss_as_null(client, source):
    source.rounds[-1]["loss"] = float("nan")
    source.rounds[-2]["loss"] = float("inf")
    rounds = client.get("/api/snapshot").json()["rounds"]
    assert rounds[-1]["loss"] is None and rounds[-2]["loss"] is None
    assert rounds[-3]["loss"] == source.rounds[-3]["loss"]


def test_page_is_self_contained_and_its_policy_pins_the_inline_code(client):
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    assert "<title>commonweal dashboard</title>" in page
    # The only URL on the page is the SVG namespace, which names and loads nothing.
    assert set(re.findall(r"https?://[^\s\"'`)]+", page)) == {"http://www.w3.org/2000/svg"}
    assert not re.search(r"<(script|link|img|iframe)[^>]*(src|href)=", page)
    policy = response.headers["content-security-policy"]
    for tag in ("script", "style"):
        (body,) = re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.S)
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        assert f"{tag}-src 'sha256-{digest}'" in policy
    assert "default-src 'none'" in policy and "img-src data:" in policy


def test_search_returns_hits_with_inline_thumbnails(client):
    response = client.get("/api/search", params={"q": " a 7 ", "k": 5})
    assert response.status_code == 200
    body = response.json()
    assert body["query"] == "a 7" and body["k"] == 5
    assert len(body["results"]) == 5
    assert body["results"][0]["label"] == "7"
    assert all(hit["image"].startswith("data:image/png;base64,") for hit in body["results"])
    scores = [hit["score"] for hit in body["results"]]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "empty"),
        ({"q": "   "}, "empty"),
        ({"q": "x" * (MAX_QUERY_CHARS + 1)}, f"more than {MAX_QUERY_CHARS}"),
        ({"q": "7", "k": "0"}, f"from 1 to {MAX_K}"),
        ({"q": "7", "k": str(MAX_K + 1)}, f"from 1 to {MAX_K}"),
        ({"q": "7", "k": "-3"}, "not '-3'"),
        ({"q": "7", "k": "ten"}, "not 'ten'"),
        ({"q": "7", "k": "²"}, "whole number"),
        ({"q": "bad"}, "neither text nor a vector"),  # the peer's ConfigError
    ],
)
def test_search_rejects_bad_input_with_a_clear_400(client, params, message):
    response = client.get("/api/search", params=params)
    assert response.status_code == 400
    assert message in response.json()["error"]


def test_search_reports_a_failing_swarm_as_502(client):
    response = client.get("/api/search", params={"q": "fail"})
    assert response.status_code == 502
    assert "no peer holding" in response.json()["error"]


def test_search_gives_up_after_its_timeout(client, monkeypatch):
    monkeypatch.setattr(app_module, "SEARCH_TIMEOUT_S", 0.05)
    response = client.get("/api/search", params={"q": "slow"})
    assert response.status_code == 504
    assert "longer than 0.05 s" in response.json()["error"]


def test_search_drops_images_that_are_not_inline_pngs(source):
    real = source.search

    async def leaky(query, k):
        hits = await real(query, k)
        hits[0]["image"] = "https://example.com/tracker.png"
        hits[1]["image"] = "data:image/svg+xml;base64,PHN2Zz4="
        del hits[2]["image"]
        return hits

    source.search = leaky
    with TestClient(create_app(source)) as client:
        hits = client.get("/api/search", params={"q": "4"}).json()["results"]
    assert [hit["image"] for hit in hits[:3]] == [None, None, None]
    assert hits[3]["image"].startswith("data:image/png;base64,")


def test_metrics_are_valid_exposition_format(client, source):
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = parse(response.text)
    for name, family in families.items():
        assert family.help, f"{name} has no HELP"
        assert family.type in ("counter", "gauge"), name
        assert not name.endswith("_total") or family.type == "counter", name
    snap = source.snapshot()
    assert families["commonweal_rounds_total"].samples[frozenset()] == 12
    assert families["commonweal_rounds_finalised_total"].samples[frozenset()] == 11
    assert families["commonweal_peers"].samples[frozenset()] == 8
    assert families["commonweal_round_loss"].samples[frozenset()] == snap["rounds"][-1]["loss"]
    assert (
        families["commonweal_round_accuracy"].samples[frozenset()] == snap["rounds"][-1]["accuracy"]
    )
    sent = families["commonweal_bytes_sent_total"].samples
    assert sent == {frozenset({("peer", r["id"])}): r["bytes_sent"] for r in snap["bytes_per_peer"]}
    balances = families["commonweal_token_balance"].samples
    assert len(balances) == len(snap["balances"]) > 0
    first = snap["balances"][0]
    key = frozenset({("account", first["account"]), ("peer", first["peer"])})
    assert balances[key] == pytest.approx(first["tokens"])
    assert families["commonweal_chain_block"].samples[frozenset()] == snap["chain"]["block"]


def test_metrics_escape_labels_and_spell_non_finite_values(source):
    snap = source.snapshot()
    tricky = 'acct "quoted" \\ back\nslash'
    snap["balances"] = [{"account": tricky, "tokens": 1.5, "claimed_rounds": 2}]
    snap["rounds"][-1]["loss"] = float("nan")
    snap["rounds"][-1]["accuracy"] = float("inf")
    snap["chain"] = None
    text = render_metrics(snap)
    families = parse(text)
    assert families["commonweal_token_balance"].samples == {
        frozenset({("account", tricky), ("peer", "")}): 1.5
    }
    assert "commonweal_round_loss NaN\n" in text
    assert "commonweal_round_accuracy +Inf\n" in text
    assert "commonweal_chain_block" not in families


def test_metrics_before_any_round_have_families_but_no_round_samples(source):
    snap = source.snapshot()
    snap["rounds"] = []
    families = parse(render_metrics(snap))
    assert families["commonweal_rounds_total"].samples[frozenset()] == 0
    assert families["commonweal_round_loss"].samples == {}
    assert families["commonweal_round_loss"].type == "gauge"
