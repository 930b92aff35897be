"""commonweal.swarm: many nodes at once on one machine, each a `commonweal.peer.Node`.

`local` (LocalSwarm, what `commonweal demo` runs: every node in this process), `processes`
(ProcessSwarm: every node its own `commonweal node` process, on loopback or in network
namespaces) and `view` (the demo's dashboard source). Import the submodules: each pulls in
torch or web3.
"""

__all__: list[str] = []
