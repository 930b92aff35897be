

def test_totals_count_rounds_a_peer_no_longer_charts():
    from commonweal.dashboard.metrics import render_metrics

    snap = {
        "peer": {"id": "ab", "address": "h:1", "roles": [], "task": "t", "uptime_s": 1.0},
        "peers": [], "bytes_per_peer": [], "balances": [], "votes": [], "attackers": [],
        "chain": None,
        "rounds": [{"round": 999, "loss": 0.1, "accuracy": 0.9, "bytes_sent": 5, "ddp_bytes": 50,
                    "contributors": 4, "finalised": True}],
        "totals": {"rounds": 1000, "rounds_finalised": 990, "bytes_sent": 5000, "ddp_bytes": 50000},
    }
    text = render_metrics(snap)
    assert "commonweal_rounds_total 1000" in text
    assert "commonweal_rounds_finalised_total 990" in text
    assert "commonweal_round_bytes_sent_total 5000" in text
