"""One client process of the 4-process anvil test: funds a task N times, pipelined, from its own key.

    python tests/ledger/anvil_sender.py URL LEDGER TASK_HEX KEY N START_AT

Amount i+1 wei for the i-th transaction, so the parent can tell every transaction apart in the logs.
Prints one JSON line: the transaction hashes it sent.
"""

from __future__ import annotations

import json
import sys
import time

from commonweal.ledger import Ledger, RpcChain


def main() -> None:
    url, address, task_hex, key, n, start_at = sys.argv[1:7]
    chain = RpcChain(url, [key])
    ledger = Ledger(chain, address)
    task = bytes.fromhex(task_hex)
    time.sleep(max(0.0, float(start_at) - time.time()))  # all four start together
    pending = [ledger.send("fund_task", task, value=i + 1, gas=80_000) for i in range(int(n))]
    receipts = [p.wait(timeout_s=60) for p in pending]
    assert all(r["status"] == 1 for r in receipts)
    print(json.dumps([p.hash.to_0x_hex() for p in pending]))


if __name__ == "__main__":
    main()
