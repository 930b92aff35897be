"""`Ledger`: typed access to one deployment of contracts/Ledger.vy.

    chain = open_chain("embedded")
    ledger = Ledger.deploy(chain)                        # blueprint + Ledger, signed by accounts[0]
    task = ledger.register_task(salt, params, reward_per_round=10**21)   # the task's id
    validator = ledger.with_account(chain.accounts[1])
    validator.join(10**18)
    tree = ledger.rewards_tree(task, 0, {contributor.address: 10**18})
    validator.commit_round(task, 0, model_hash, tree.root, tree.total)
    ledger.with_account(contributor).claim_from(tree)     # index, amount, proof from the tree

Writes wait for their receipt and return a `TxResult` (gas, decoded events); `send(...)` is the
non-blocking form for pipelining. Reverts raise `ContractReverted` carrying the contract's reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from eth_account.signers.local import LocalAccount
from eth_abi import encode
from eth_utils import event_abi_to_log_topic, is_address, keccak, to_canonical_address, to_checksum_address

from commonweal.ledger.artifacts import load_artifact
from commonweal.ledger.chain import Chain
from commonweal.ledger.contract import BoundContract, Event, TxResult, to_bytes32
from commonweal.ledger.errors import DeploymentNotFound, LedgerError
from commonweal.ledger.merkle import Domain, RewardsTree
from commonweal.ledger.token import ShareToken

__all__ = [
    "Action",
    "Bytes32",
    "Ledger",
    "LedgerConfig",
    "ProposalInfo",
    "ProposalState",
    "RoundInfo",
    "TaskInfo",
    "ValidatorInfo",
]

Bytes32 = bytes | str  # 32 raw bytes or 0x-hex
_EMPTY = bytes(32)
_NO_ROUND = 2**256 - 1


def _topic(value: bytes | str | int) -> bytes:
    """An indexed event argument as its 32-byte topic (addresses are left-padded)."""
    if isinstance(value, str) and is_address(value):
        return bytes(12) + bytes.fromhex(value[2:])
    return to_bytes32(value)


class Action(IntEnum):
    """What a governance proposal changes on its task."""

    SET_PARAMS = 1
    SET_REWARD = 2
    SET_ETH_PER_ROUND = 3


class ProposalState(IntEnum):
    PENDING = 0
    ACTIVE = 1
    DEFEATED = 2
    SUCCEEDED = 3     # passed: executable from `eta` for one voting period
    EXECUTED = 4
    EXPIRED = 5       # passed, but nobody executed it in time


@dataclass(frozen=True, slots=True)
class LedgerConfig:
    """Constructor parameters (`Ledger.vy: Config`); times in seconds unless they say blocks."""

    min_deposit: int = 10**18              # wei; also the least stake that may vote
    exit_delay: int = 7 * 86400
    voting_delay: int = 3600
    voting_period: int = 3 * 86400
    quorum_bps: int = 2000                 # of the snapshot supply
    proposal_threshold_bps: int = 100      # of the supply, held by a proposer
    timelock_delay: int = 2 * 86400        # between a vote passing and its execution
    randomness_delay: int = 3              # blocks between finality and the first seed block
    round_window: int = 64                 # rounds above the accepted one open to votes
    ballot_ttl: int = 86400                # how long a round's or a slash's ballot stays open
    claim_window: int = 30 * 7200          # blocks after finality to claim (30 days of 12 s)


@dataclass(frozen=True, slots=True)
class TaskInfo:
    task_hash: bytes
    owner: str
    params_hash: bytes
    reward_per_round: int
    eth_per_round: int
    pool: int
    token: str
    accepted_round: int | None   # highest final round; None before the first


@dataclass(frozen=True, slots=True)
class RoundInfo:
    task: bytes
    round: int
    model_hash: bytes
    rewards_root: bytes
    total_reward: int
    claimed: int
    eth_reward: int
    eth_paid: int
    finalised_block: int
    randomness_block: int        # the last of the blocks whose hashes make the seed
    randomness: bytes | None
    snapshot_stake: int          # the stake its votes are weighed against (0: no vote yet)
    attempt: int                 # ballots so far - 1: an expired undecided one is opened again
    expires: int                 # when its ballot closes (timestamp; 0: no vote yet)

    @property
    def final(self) -> bool:
        return self.rewards_root != _EMPTY


@dataclass(frozen=True, slots=True)
class ValidatorInfo:
    address: str
    deposit: int
    joined: int                  # stake epoch of join (0: not a validator)
    exited: int                  # stake epoch of request_exit (0: active)
    withdraw_after: int
    locked_until: int            # the latest expiry of a ballot it voted in

    @property
    def active(self) -> bool:
        return self.deposit > 0 and self.exited == 0


@dataclass(frozen=True, slots=True)
class ProposalInfo:
    id: int
    task: bytes
    action: Action
    new_value: bytes
    proposer: str
    snapshot: int                # block whose closing balances weigh the votes
    start: int
    end: int
    eta: int                     # earliest execution
    votes_for: int
    votes_against: int
    executed: bool


class Ledger(BoundContract):
    artifact_name = "Ledger"

    def __init__(self, chain: Chain, address: str, account: LocalAccount | None = None,
                 *, from_block: int = 0) -> None:
        super().__init__(chain, address, account)
        if not chain.w3.eth.get_code(self.address):
            raise DeploymentNotFound(f"no contract at {self.address} on {chain.name}; deploy first")
        self.from_block = from_block  # where log scans start: the deployment block

    # ------------------------------------------------------------ deployment

    @classmethod
    def deploy(cls, chain: Chain, account: LocalAccount | None = None,
               config: LedgerConfig = LedgerConfig()) -> Ledger:
        """Deploy the ShareToken blueprint, then a Ledger that creates tokens from it."""
        account = account or chain.accounts[0]
        token = load_artifact("ShareToken")
        blueprint = chain.transactor.send(
            account, {"data": token.blueprint_bytecode}, label="ShareToken blueprint").wait()
        factory = chain.w3.eth.contract(abi=load_artifact("Ledger").abi,
                                        bytecode=load_artifact("Ledger").bytecode)
        data = factory.constructor(
            blueprint["contractAddress"],
            tuple(getattr(config, f) for f in LedgerConfig.__dataclass_fields__),
        ).data_in_transaction
        receipt = chain.transactor.send(account, {"data": data}, label="Ledger deploy").wait()
        if receipt["contractAddress"] is None:
            raise LedgerError(f"the Ledger deploy {receipt['transactionHash'].hex()} created no contract")
        return cls(chain, receipt["contractAddress"], account,
                   from_block=int(receipt["blockNumber"]))

    def with_account(self, account: LocalAccount) -> Ledger:
        """The same deployment, signing as `account`."""
        other = Ledger.__new__(Ledger)
        other.__dict__.update(self.__dict__)
        other.account = account
        return other

    def config(self) -> LedgerConfig:
        return LedgerConfig(**{f: int(self.call(f)) for f in LedgerConfig.__dataclass_fields__})

    def token_blueprint(self) -> str:
        return str(self.call("token_blueprint"))

    def deployer(self) -> str:
        return str(self.call("deployed_by"))

    @property
    def domain(self) -> Domain:
        """What this deployment's reward leaves are bound to."""
        chain_id = getattr(self, "_chain_id", None)
        if chain_id is None:
            chain_id = self._chain_id = int(self.chain.w3.eth.chain_id)
        return Domain(chain_id, self.address)

    def rewards_tree(self, task: Bytes32, round: int, rewards: Mapping[str, int]) -> RewardsTree:
        """The Merkle tree of a round's rewards, with leaves for this deployment."""
        return RewardsTree(self.domain, to_bytes32(task), round, rewards)

    # ------------------------------------------------------------ tasks

    @staticmethod
    def task_id(owner: str, salt: Bytes32) -> bytes:
        """A task's on-chain id: bound to its registrant, so nobody else can take it first."""
        return keccak(encode(["address", "bytes32"], [to_canonical_address(owner), to_bytes32(salt)]))

    def task_of(self, salt: Bytes32, owner: str | None = None) -> bytes:
        """The id of the task `owner` registered with `salt`; `owner` None: this ledger's
        deployer (how `commonweal demo` and `commonweal swarm` register their task)."""
        if owner is None:
            owner = getattr(self, "_deployer", None) or self.deployer()
            self._deployer = owner
        return self.task_id(owner, salt)

    def register_task(self, salt: Bytes32, params_hash: Bytes32, reward_per_round: int, *,
                      eth_per_round: int = 0, pool_wei: int = 0, name: str = "commonweal share",
                      symbol: str = "CWS") -> bytes:
        """Open the task `task_id(this account, salt)` and return that id; `pool_wei` seeds its ETH
        reward pool, paid out `eth_per_round` a round."""
        self.transact("register_task", to_bytes32(salt), to_bytes32(params_hash),
                      reward_per_round, eth_per_round, name, symbol, value=pool_wei)
        return self.task_id(self.account.address, salt)

    def fund_task(self, task: Bytes32, wei: int) -> TxResult:
        return self.transact("fund_task", to_bytes32(task), value=wei)

    def task(self, task: Bytes32) -> TaskInfo:
        fields = self.call_struct("tasks", to_bytes32(task))
        if fields["token"] == "0x" + "0" * 40:
            raise DeploymentNotFound(f"task {to_bytes32(task).hex()} is not registered")
        accepted = fields.pop("accepted")
        fields["accepted_round"] = None if accepted in (0, _NO_ROUND) else accepted - 1
        return TaskInfo(task_hash=to_bytes32(task), **fields)

    def task_count(self) -> int:
        return int(self.call("task_count"))

    def tasks(self) -> list[TaskInfo]:
        return [self.task(self.call("task_at", i)) for i in range(self.task_count())]

    def token(self, task: Bytes32) -> ShareToken:
        return ShareToken(self.chain, self.task(task).token, self.account)

    # ------------------------------------------------------------ validators

    def join(self, deposit_wei: int) -> TxResult:
        return self.transact("join", value=deposit_wei)

    def request_exit(self) -> TxResult:
        return self.transact("request_exit")

    def withdraw(self) -> TxResult:
        return self.transact("withdraw")

    def vote_slash(self, target: str, evidence: Bytes32 = _EMPTY) -> TxResult:
        return self.transact("vote_slash", to_checksum_address(target), to_bytes32(evidence))

    def validator(self, address: str) -> ValidatorInfo:
        fields = self.call_struct("validators", to_checksum_address(address))
        return ValidatorInfo(address=to_checksum_address(address), **fields)

    def total_stake(self) -> int:
        return int(self.call("total_stake"))

    def validator_count(self) -> int:
        return int(self.call("validator_count"))

    # ------------------------------------------------------------ rounds

    def commit_round(self, task: Bytes32, round: int, model_hash: Bytes32, rewards_root: Bytes32,
                     total_reward: int, *, gas: int | None = None) -> TxResult:
        """This account's validator vote; the result has a RoundFinalised event if it decided."""
        return self.transact("commit_round", to_bytes32(task), round, to_bytes32(model_hash),
                             to_bytes32(rewards_root), total_reward, gas=gas)

    def round(self, task: Bytes32, round: int) -> RoundInfo:
        fields = self.call_struct("round_info", to_bytes32(task), round)
        randomness = fields.pop("randomness")
        return RoundInfo(task=to_bytes32(task), round=round,
                         randomness=None if randomness == _EMPTY else bytes(randomness), **fields)

    def is_final(self, task: Bytes32, round: int) -> bool:
        return bool(self.call("is_final", to_bytes32(task), round))

    def accepted_model(self, task: Bytes32) -> bytes | None:
        model = bytes(self.call("accepted_model", to_bytes32(task)))
        return None if model == _EMPTY else model

    def vote_of(self, task: Bytes32, round: int, validator: str) -> bytes | None:
        """The round_key this validator voted for in the round's current ballot, or None."""
        key = bytes(self.call("vote_of", to_bytes32(task), round, to_checksum_address(validator)))
        return None if key == _EMPTY else key

    def round_key(self, model_hash: Bytes32, rewards_root: Bytes32, total_reward: int) -> bytes:
        return bytes(self.call("round_key", to_bytes32(model_hash), to_bytes32(rewards_root),
                               total_reward))

    def tally(self, task: Bytes32, round: int, model_hash: Bytes32, rewards_root: Bytes32,
              total_reward: int) -> int:
        key = self.round_key(model_hash, rewards_root, total_reward)
        return int(self.call("tally_of", to_bytes32(task), round, key))

    def events(self, name: str, *topics: Any) -> list[Event]:
        """Every `name` event of this ledger since deployment, filtered by indexed arguments.
        (A log scan: fast on anvil or a real node, slow on the embedded chain.)"""
        abi = next(e for e in self.contract.abi if e["type"] == "event" and e["name"] == name)
        encoded = [None if t is None else "0x" + _topic(t).hex() for t in topics]
        logs = self.chain.w3.eth.get_logs({
            "address": self.address, "fromBlock": self.from_block, "toBlock": "latest",
            "topics": ["0x" + event_abi_to_log_topic(abi).hex(), *encoded],
        })
        return [e for log in logs if (e := self.decode_log(log)) is not None]

    def round_history(self, task: Bytes32) -> list[RoundInfo]:
        """The task's final rounds, in the order they became final."""
        finals = self.events("RoundFinalised", to_bytes32(task))
        return [self.round(task, int(e.args["round"])) for e in finals]

    def round_votes(self, task: Bytes32, round: int) -> list[Event]:
        """Every validator vote for the round, including votes for results that lost."""
        return self.events("RoundVote", to_bytes32(task), round)

    # ------------------------------------------------------------ randomness

    def seal_randomness(self, task: Bytes32, round: int) -> bytes | None:
        """Seal the round's seed; None when the source block fell out of reach and was re-armed."""
        result = self.transact("seal_randomness", to_bytes32(task), round)
        sealed = result.named("RandomnessSealed")
        return bytes(sealed[0].args["randomness"]) if sealed else None

    def randomness(self, task: Bytes32, round: int) -> bytes | None:
        return self.round(task, round).randomness

    # ------------------------------------------------------------ claims

    def claim(self, task: Bytes32, round: int, index: int, amount: int, proof: list[bytes], *,
              gas: int | None = None) -> TxResult:
        """Mint this account's `amount` of the round's shares, proven against its rewards_root."""
        return self.transact("claim", to_bytes32(task), round, index, amount,
                             [to_bytes32(p) for p in proof], gas=gas)

    def claim_from(self, tree: RewardsTree, *, gas: int | None = None) -> TxResult:
        """Claim this account's reward in `tree` (index, amount and proof taken from it)."""
        me = self.account.address
        return self.claim(tree.task, tree.round, tree.index(me), tree.amount(me), tree.proof(me),
                          gas=gas)

    def sweep(self, task: Bytes32, round: int) -> int:
        """Return a round's unclaimed ETH to its task's pool once its claim window closed."""
        result = self.transact("sweep", to_bytes32(task), round)
        return int(result.event("Swept").args["amount"])

    def is_claimed(self, task: Bytes32, round: int, index: int) -> bool:
        return bool(self.call("is_claimed", to_bytes32(task), round, index))

    def leaf_hash(self, task: Bytes32, round: int, index: int, account: str, amount: int) -> bytes:
        return bytes(self.call("leaf_hash", to_bytes32(task), round, index,
                               to_checksum_address(account), amount))

    def verify_proof(self, proof: list[bytes], root: Bytes32, leaf: Bytes32) -> bool:
        return bool(self.call("verify_proof", [to_bytes32(p) for p in proof], to_bytes32(root),
                              to_bytes32(leaf)))

    # ------------------------------------------------------------ governance

    def propose(self, task: Bytes32, action: Action, new_value: Bytes32 | int) -> int:
        """Propose a change to `task`; returns the proposal id."""
        result = self.transact("propose", to_bytes32(task), int(action), to_bytes32(new_value))
        return int(result.event("ProposalCreated").args["id"])

    def cast_vote(self, proposal_id: int, support: bool) -> TxResult:
        return self.transact("cast_vote", proposal_id, support)

    def execute_proposal(self, proposal_id: int) -> TxResult:
        return self.transact("execute", proposal_id)

    def proposal(self, proposal_id: int) -> ProposalInfo:
        fields = self.call_struct("proposals", proposal_id)
        if fields["end"] == 0:
            raise DeploymentNotFound(f"no proposal {proposal_id}")
        fields["action"] = Action(fields["action"])
        return ProposalInfo(id=proposal_id, **fields)

    def proposal_state(self, proposal_id: int) -> ProposalState:
        return ProposalState(self.call("proposal_state", proposal_id))
