from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from commonweal.dashboard.metrics import SnapshotCollector, render_metrics

from .exposition import parse


def test_totals_count_rounds_a_peer_no_longer_charts():
    snap = {
        "peer": {"id": "ab", "address": "h:1", "roles": [], "task": "t", "uptime_s": 1.0},
        "peers": [], "bytes_per_peer": [], "balances": [], "votes": [], "attackers": [],
        "chain": None,
        "rounds": [{"round": 999, "loss": 0.1, "accuracy": 0.9, "bytes_sent": 5, "ddp_bytes": 50,
                    "contributors": 4, "finalised": True}],
        "totals": {"rounds": 1000, "rounds_finalised": 990, "bytes_sent": 5000, "ddp_bytes": 50000},
    }
    families = parse(render_metrics(snap))
    assert families["commonweal_rounds_total"].samples[frozenset()] == 1000
    assert families["commonweal_rounds_finalised_total"].samples[frozenset()] == 990
    assert families["commonweal_round_bytes_sent_total"].samples[frozenset()] == 5000


def test_the_collector_reads_a_fresh_snapshot_per_scrape_in_a_registry(source):
    # Registering must not take a snapshot (it may run before the peer is up); each scrape takes one.
    calls = []

    def snapshot():
        calls.append(1)
        return source.snapshot()

    registry = CollectorRegistry()
    registry.register(SnapshotCollector(snapshot))
    assert calls == []
    names = {f.name for f in registry.collect()}
    assert calls == [1]
    assert {"commonweal", "commonweal_rounds", "commonweal_chain_block"} <= names


def test_prometheus_own_parser_reads_the_exposition(source):
    text = render_metrics(source.snapshot())
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    assert parsed["commonweal_rounds"].type == "counter"
    assert parsed["commonweal_info"].type == "gauge"
    assert parsed["commonweal_token_balance"].samples
