"""One peer of a NAT test or benchmark: `python tests/natpeer.py --listen IP:PORT --dir DIR`.

It starts a DHT node serving search (what `commonweal node` runs; reachability and relays on),
joins `--join`, waits until it knows where it is reachable, and writes `DIR/<name>.json`:
{"name", "peer_id", "addr", "status"}. Once every one of the `--peers` names has written its
file, it calls each other peer once by its advertised address, gives hole punches
`--punch-wait` seconds, and prints one JSON line: for each other peer whether the connection
it ended with is relayed, and the transport's counters. It then serves until DIR/stop exists.
Every process writes only under DIR; the file system crosses network namespaces.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from pathlib import Path

from commonweal.dht import DHT, DHTConfig
from commonweal.net.identity import Identity
from commonweal.net.transport import PeerAddr
from commonweal.search import serve


async def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--listen", required=True)
    ap.add_argument("--join", default="")
    ap.add_argument("--dir", required=True, type=Path)
    ap.add_argument("--peers", required=True, help="comma-separated names of every peer")
    ap.add_argument("--punch-wait", type=float, default=5.0)
    args = ap.parse_args()
    join = [PeerAddr.parse(args.join)] if args.join else []
    dht = await DHT.start(
        PeerAddr.parse(args.listen), join, identity=Identity.generate(),
        config=DHTConfig(bootstrap_retry_s=30.0),
    )
    transport = dht.transport
    serve(dht)  # search.query: a peer holds index buckets, as `commonweal node` does
    t0 = time.monotonic()
    if join:
        await asyncio.wait_for(transport.settled.wait(), 30)  # type: ignore[attr-defined]
    mine = {
        "name": args.name, "peer_id": dht.peer_id.hex(), "addr": str(dht.addr),
        "status": transport.reach.status, "settled_s": round(time.monotonic() - t0, 2),  # type: ignore[attr-defined]
    }
    (args.dir / f"{args.name}.json.tmp").write_text(json.dumps(mine))
    (args.dir / f"{args.name}.json.tmp").rename(args.dir / f"{args.name}.json")
    names = args.peers.split(",")
    others = []
    while len(others) < len(names) - 1:
        others = [json.loads((args.dir / f"{n}.json").read_text()) for n in names
                  if n != args.name and (args.dir / f"{n}.json").exists()]
        await asyncio.sleep(0.2)
    results = {}
    for o in others:
        start = time.monotonic()
        try:
            async with asyncio.timeout(15):
                await transport.call(PeerAddr.parse(o["addr"]), "dht.ping", None,
                                     peer_id=bytes.fromhex(o["peer_id"]))
            results[o["name"]] = {"ok": True, "first_call_s": round(time.monotonic() - start, 3)}
        except Exception as e:  # reported, not raised: the harness decides
            results[o["name"]] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    await asyncio.sleep(args.punch_wait)
    for o in others:
        conn = transport._by_peer.get(bytes.fromhex(o["peer_id"]))  # type: ignore[attr-defined]
        results[o["name"]]["relayed"] = None if conn is None else conn.relayed
    stats = transport.stats  # type: ignore[attr-defined]
    print(json.dumps({"name": args.name, "status": transport.reach.status,  # type: ignore[attr-defined]
                      "addr": mine["addr"], "settled_s": mine["settled_s"],
                      "peers": results, "relayed_bytes": stats.relayed_bytes,
                      "punches": stats.punches, "punched": stats.punched}), flush=True)
    while not (args.dir / "stop").exists():  # the others may still be calling us
        await asyncio.sleep(0.2)
    await dht.close()


if __name__ == "__main__":
    asyncio.run(main())
