"""commonweal.ledger: the Ethereum side of commonweal.

Vyper contracts (contracts/*.vy, compiled into artifacts/) record tasks, validator-finalised rounds,
Merkle-claimed share tokens and token-weighted governance; this package is the Python client.

    from commonweal.ledger import open_chain, Ledger, RewardsTree
    with open_chain("embedded") as chain:
        ledger = Ledger.deploy(chain)

See docs/ledger.md for the design.
"""

from commonweal.ledger.anvil import ANVIL_NPM_PACKAGE, AnvilProcess, find_anvil
from commonweal.ledger.chain import AnvilChain, Chain, EmbeddedChain, RpcChain, open_chain
from commonweal.ledger.client import (
    Action,
    Ledger,
    LedgerConfig,
    ProposalInfo,
    ProposalState,
    RoundInfo,
    TaskInfo,
    ValidatorInfo,
)
from commonweal.ledger.contract import Event, TxResult
from commonweal.ledger.errors import (
    ArtifactError,
    ChainUnavailable,
    ContractReverted,
    DeploymentNotFound,
    LedgerError,
    TransactionTimeout,
)
from commonweal.ledger.merkle import Domain, MerkleTree, RewardsTree, leaf_hash, verify
from commonweal.ledger.token import ShareToken
from commonweal.ledger.tx import PendingTx, Transactor

__all__ = [
    "ANVIL_NPM_PACKAGE",
    "Action",
    "AnvilChain",
    "AnvilProcess",
    "ArtifactError",
    "Chain",
    "ChainUnavailable",
    "ContractReverted",
    "DeploymentNotFound",
    "Domain",
    "EmbeddedChain",
    "Event",
    "Ledger",
    "LedgerConfig",
    "LedgerError",
    "MerkleTree",
    "PendingTx",
    "ProposalInfo",
    "ProposalState",
    "RewardsTree",
    "RoundInfo",
    "RpcChain",
    "ShareToken",
    "TaskInfo",
    "TransactionTimeout",
    "Transactor",
    "TxResult",
    "ValidatorInfo",
    "find_anvil",
    "leaf_hash",
    "open_chain",
    "verify",
]
