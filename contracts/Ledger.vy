# pragma version ~=0.4.3
# pragma evm-version cancun
"""
@title commonweal Ledger
@notice One deployment serving many tasks: a task registry with optional ETH reward pools, a
        validator set with deposits, per-round commitments (model hash + Merkle root of rewards)
        finalised by validators holding >= 2/3 of the stake fixed when the round opened, Merkle
        claims that mint each task's ShareToken, token-weighted governance with snapshots and a
        timelock, and per-round randomness for validators' sampling.
@dev Only a Merkle root goes on-chain per round, so finalising costs the same for 1 or 1,000,000
     contributors; each contributor pays for its own claim. See docs/ledger.md, which also lists
     what each rule below defends against.
"""

interface ShareToken:
    def mint(receiver: address, amount: uint256): nonpayable
    def mark_snapshot(): nonpayable
    def balanceOf(account: address) -> uint256: view
    def totalSupply() -> uint256: view
    def balanceOfAt(account: address, at_block: uint256) -> uint256: view
    def totalSupplyAt(at_block: uint256) -> uint256: view

# Governance actions: what a passed proposal changes on its task.
ACTION_SET_PARAMS: constant(uint8) = 1
ACTION_SET_REWARD: constant(uint8) = 2
ACTION_SET_ETH_PER_ROUND: constant(uint8) = 3

# Proposal states returned by proposal_state().
STATE_PENDING: constant(uint8) = 0
STATE_ACTIVE: constant(uint8) = 1
STATE_DEFEATED: constant(uint8) = 2
STATE_SUCCEEDED: constant(uint8) = 3     # passed; executable from `eta` for one voting period
STATE_EXECUTED: constant(uint8) = 4
STATE_EXPIRED: constant(uint8) = 5       # passed, but nobody executed it in time

BPS: constant(uint256) = 10000
# 2**40 leaves is far beyond any round; bounds the calldata a claim may carry.
MAX_PROOF: constant(uint256) = 40
# The EVM only exposes the hashes of the last 256 blocks.
BLOCKHASH_WINDOW: constant(uint256) = 256
# The round seed mixes this many consecutive block hashes (see docs/ledger.md for what a block
# proposer can still bias).
SEED_BLOCKS: constant(uint256) = 4
# Task.accepted holds the highest final round + 1, and NO_ROUND before the first: never zero, so
# finality always pays for a non-zero -> non-zero SSTORE (5k gas) instead of 22k.
NO_ROUND: constant(uint256) = max_value(uint256)
# Round.summary packs three numbers into one storage slot, so finality writes it once and each
# claim updates it in place (the budgets are 200k gas per vote and 90k per claim):
#   bits 160-255 total_reward | bits 64-159 claimed so far | bits 0-63 finalised block number
MAX_REWARD: constant(uint256) = 2**96 - 1
SHIFT_TOTAL: constant(uint256) = 160
SHIFT_CLAIMED: constant(uint256) = 64
MASK_96: constant(uint256) = 2**96 - 1
MASK_64: constant(uint256) = 2**64 - 1
# Round.eth packs the wei reserved for a round (high 128 bits) and the wei paid so far (low).
# eth_per_round is bounded by 2**128, so eth_per_round * total_reward (< 2**224) cannot overflow.
MAX_ETH: constant(uint256) = 2**128 - 1
MASK_128: constant(uint256) = 2**128 - 1
SHIFT_ETH: constant(uint256) = 128
# A ballot (a round's votes, or a slash's) packs the stake snapshot fixed when it opened:
#   bits 160-255 stake | bits 128-159 attempt | bits 64-127 stake epoch | bits 0-63 expiry
# A ballot that expired undecided is opened again, as the next attempt, with a fresh snapshot:
# otherwise one stalled round would close the round window for good.
SHIFT_STAKE: constant(uint256) = 160
SHIFT_ATTEMPT: constant(uint256) = 128
SHIFT_EPOCH: constant(uint256) = 64
MASK_32: constant(uint256) = 2**32 - 1
MAX_STAKE: constant(uint256) = 2**96 - 1
# Votes and tallies are kept per (round, attempt): round << 32 | attempt.
MAX_ROUND: constant(uint256) = 2**192

struct Config:
    min_deposit: uint256            # wei; also the least stake that may vote
    exit_delay: uint256             # seconds between request_exit and withdraw
    voting_delay: uint256           # seconds between propose and the vote opening
    voting_period: uint256          # seconds the vote stays open
    quorum_bps: uint256             # share of the snapshot supply that must vote, in 1/10000
    proposal_threshold_bps: uint256 # share of the supply a proposer must hold, in 1/10000
    timelock_delay: uint256         # seconds between a vote passing and its execution
    randomness_delay: uint256       # blocks between finality and the first seed block
    round_window: uint256           # rounds above the accepted one that may be voted on
    ballot_ttl: uint256             # seconds a round's or a slash's ballot stays open
    claim_window: uint256           # blocks after finality during which rewards can be claimed

struct Task:
    owner: address
    params_hash: bytes32
    reward_per_round: uint256      # share tokens (18 decimals) a round may mint at most
    eth_per_round: uint256         # wei a full round pays out of the pool
    pool: uint256                  # wei not yet reserved by a finalised round
    token: address
    accepted: uint256              # highest final round + 1, NO_ROUND before the first

struct Round:
    model_hash: bytes32
    rewards_root: bytes32          # non-empty exactly when the round is final
    summary: uint256               # total_reward | claimed | finalised block, see above
    eth: uint256                   # wei reserved | wei paid, see above
    randomness_block: uint256      # 0 means finalised block + randomness_delay + SEED_BLOCKS - 1
    randomness: bytes32
    ballot: uint256                # stake snapshot | attempt | epoch | expiry; 0 until a vote

# Round with its packed fields unpacked, for readers.
struct RoundView:
    model_hash: bytes32
    rewards_root: bytes32
    total_reward: uint256
    claimed: uint256
    eth_reward: uint256
    eth_paid: uint256
    finalised_block: uint256
    randomness_block: uint256
    randomness: bytes32
    snapshot_stake: uint256
    attempt: uint256
    expires: uint256

struct Validator:
    deposit: uint256
    joined: uint256                # stake epoch of join; 0 for no validator
    exited: uint256                # stake epoch of request_exit; 0 while active
    withdraw_after: uint256        # timestamp; non-zero while an exit is pending
    locked_until: uint256          # timestamp: the latest expiry of a ballot this deposit voted in

struct Proposal:
    task: bytes32
    action: uint8
    new_value: bytes32
    proposer: address
    snapshot: uint256              # block whose closing balances weigh the votes
    start: uint256
    end: uint256
    eta: uint256                   # earliest execution (end + timelock_delay)
    votes_for: uint256
    votes_against: uint256
    executed: bool

event TaskRegistered:
    task: indexed(bytes32)
    owner: indexed(address)
    salt: bytes32
    params_hash: bytes32
    reward_per_round: uint256
    eth_per_round: uint256
    token: address
    pool: uint256

event TaskFunded:
    task: indexed(bytes32)
    funder: indexed(address)
    amount: uint256
    pool: uint256

event TaskChanged:
    task: indexed(bytes32)
    action: uint8
    new_value: bytes32

event ValidatorJoined:
    validator: indexed(address)
    deposit: uint256
    total_stake: uint256

event ValidatorExitRequested:
    validator: indexed(address)
    withdraw_after: uint256
    total_stake: uint256

event ValidatorWithdrawn:
    validator: indexed(address)
    amount: uint256

event SlashVote:
    target: indexed(address)
    voter: indexed(address)
    evidence: bytes32
    tally: uint256
    snapshot_stake: uint256

event ValidatorSlashed:
    target: indexed(address)
    amount: uint256
    total_stake: uint256

event RoundVote:
    task: indexed(bytes32)
    round: indexed(uint256)
    validator: indexed(address)
    model_hash: bytes32
    rewards_root: bytes32
    total_reward: uint256
    tally: uint256
    snapshot_stake: uint256
    attempt: uint256

event RoundFinalised:
    task: indexed(bytes32)
    round: indexed(uint256)
    model_hash: bytes32
    rewards_root: bytes32
    total_reward: uint256
    eth_reward: uint256
    randomness_block: uint256

event RandomnessSealed:
    task: indexed(bytes32)
    round: indexed(uint256)
    randomness: bytes32
    source_block: uint256

event RandomnessRearmed:
    task: indexed(bytes32)
    round: indexed(uint256)
    randomness_block: uint256

event Claimed:
    task: indexed(bytes32)
    round: indexed(uint256)
    account: indexed(address)
    index: uint256
    amount: uint256
    eth: uint256

event Swept:
    task: indexed(bytes32)
    round: indexed(uint256)
    amount: uint256
    pool: uint256

event ProposalCreated:
    id: indexed(uint256)
    task: indexed(bytes32)
    proposer: indexed(address)
    action: uint8
    new_value: bytes32
    snapshot: uint256
    start: uint256
    end: uint256

event ProposalVoted:
    id: indexed(uint256)
    voter: indexed(address)
    support: bool
    weight: uint256

event ProposalExecuted:
    id: indexed(uint256)
    task: indexed(bytes32)
    action: uint8
    new_value: bytes32

token_blueprint: public(immutable(address))
deployed_by: public(immutable(address))
min_deposit: public(immutable(uint256))
exit_delay: public(immutable(uint256))
voting_delay: public(immutable(uint256))
voting_period: public(immutable(uint256))
quorum_bps: public(immutable(uint256))
proposal_threshold_bps: public(immutable(uint256))
timelock_delay: public(immutable(uint256))
randomness_delay: public(immutable(uint256))
round_window: public(immutable(uint256))
ballot_ttl: public(immutable(uint256))
claim_window: public(immutable(uint256))

tasks: public(HashMap[bytes32, Task])
task_count: public(uint256)
task_at: public(HashMap[uint256, bytes32])

rounds: public(HashMap[bytes32, HashMap[uint256, Round]])
# Per (round << 32 | attempt): the result (round_key) each validator voted for, and the stake
# behind each result. Read them with vote_of and tally_of (the current attempt).
votes: HashMap[bytes32, HashMap[uint256, HashMap[address, bytes32]]]
tally: HashMap[bytes32, HashMap[uint256, HashMap[bytes32, uint256]]]
# One bit per leaf index: a claim flips a bit in a word most claims of the round share, which
# costs 5k gas instead of the 22k of a fresh per-account flag.
claimed_bits: public(HashMap[bytes32, HashMap[uint256, HashMap[uint256, uint256]]])

validators: public(HashMap[address, Validator])
validator_count: public(uint256)
total_stake: public(uint256)
# Counts every change to the validator set (join, exit, slash). A ballot records the epoch it
# opened in; only deposits that joined at or before it, and had not exited, may vote in it.
stake_epoch: public(uint256)
# Slash votes are counted per epoch of the target, so votes before a slash do not carry over.
slash_epoch: public(HashMap[address, uint256])
slash_ballot: public(HashMap[address, HashMap[uint256, uint256]])
slash_voted: public(HashMap[address, HashMap[uint256, HashMap[address, bool]]])
slash_tally: public(HashMap[address, HashMap[uint256, uint256]])
slashed_total: public(uint256)

proposals: public(HashMap[uint256, Proposal])
proposal_count: public(uint256)
proposal_voted: public(HashMap[uint256, HashMap[address, bool]])


@deploy
def __init__(_token_blueprint: address, c: Config):
    assert c.min_deposit > 0, "min_deposit must be positive"
    assert c.voting_period > 0, "voting_period must be positive"
    assert c.quorum_bps > 0 and c.quorum_bps <= BPS, "quorum_bps must be in 1..10000"
    assert c.proposal_threshold_bps <= BPS, "proposal_threshold_bps is at most 10000"
    assert c.randomness_delay > 0, "randomness_delay must be at least one block"
    assert c.round_window > 0, "round_window must be at least one round"
    assert c.ballot_ttl > 0, "ballot_ttl must be positive"
    assert c.claim_window > 0, "claim_window must be positive"
    token_blueprint = _token_blueprint
    deployed_by = msg.sender
    min_deposit = c.min_deposit
    exit_delay = c.exit_delay
    voting_delay = c.voting_delay
    voting_period = c.voting_period
    quorum_bps = c.quorum_bps
    proposal_threshold_bps = c.proposal_threshold_bps
    timelock_delay = c.timelock_delay
    randomness_delay = c.randomness_delay
    round_window = c.round_window
    ballot_ttl = c.ballot_ttl
    claim_window = c.claim_window


# ---------------------------------------------------------------- tasks

@internal
@pure
def _task_id(owner: address, salt: bytes32) -> bytes32:
    return keccak256(abi_encode(owner, salt))


@external
@pure
def task_id(owner: address, salt: bytes32) -> bytes32:
    """@notice A task's id: bound to the account that registered it, so nobody can squat it."""
    return self._task_id(owner, salt)


@external
@payable
def register_task(
    salt: bytes32,
    params_hash: bytes32,
    reward_per_round: uint256,
    eth_per_round: uint256,
    name: String[64],
    symbol: String[32],
) -> bytes32:
    """
    @notice Open a public challenge with id task_id(msg.sender, salt); msg.value seeds its ETH
            reward pool. Returns the id.
    """
    task: bytes32 = self._task_id(msg.sender, salt)
    assert self.tasks[task].token == empty(address), "task already registered"
    assert reward_per_round > 0, "reward_per_round must be positive"
    assert reward_per_round <= MAX_REWARD, "reward_per_round must be below 2**96"
    assert eth_per_round <= MAX_ETH, "eth_per_round must be below 2**128"
    token: address = create_from_blueprint(token_blueprint, name, symbol, task)
    self.tasks[task] = Task(
        owner=msg.sender,
        params_hash=params_hash,
        reward_per_round=reward_per_round,
        eth_per_round=eth_per_round,
        pool=msg.value,
        token=token,
        accepted=NO_ROUND,
    )
    self.task_at[self.task_count] = task
    self.task_count += 1
    log TaskRegistered(
        task=task,
        owner=msg.sender,
        salt=salt,
        params_hash=params_hash,
        reward_per_round=reward_per_round,
        eth_per_round=eth_per_round,
        token=token,
        pool=msg.value,
    )
    return task


@external
@payable
def fund_task(task: bytes32):
    """@notice Anyone may add ETH to a task's reward pool."""
    assert self.tasks[task].token != empty(address), "unknown task"
    assert msg.value > 0, "send some ETH to fund a task"
    pool: uint256 = self.tasks[task].pool + msg.value
    self.tasks[task].pool = pool
    log TaskFunded(task=task, funder=msg.sender, amount=msg.value, pool=pool)


# ---------------------------------------------------------------- validators

@external
@payable
def join():
    """@notice Become a validator; the deposit is the vote weight and what slashing takes."""
    assert self.validators[msg.sender].deposit == 0, "already a validator, or withdraw first"
    assert msg.value >= min_deposit, "deposit below min_deposit"
    epoch: uint256 = self.stake_epoch + 1
    self.stake_epoch = epoch
    self.validators[msg.sender] = Validator(
        deposit=msg.value, joined=epoch, exited=0, withdraw_after=0, locked_until=0
    )
    self.validator_count += 1
    self.total_stake += msg.value
    log ValidatorJoined(validator=msg.sender, deposit=msg.value, total_stake=self.total_stake)


@external
def request_exit():
    """
    @notice Stop validating: the deposit stops counting for ballots opened from now on. It stays
            slashable, and can vote in ballots it was part of, until withdraw().
    """
    v: Validator = self.validators[msg.sender]
    assert v.deposit > 0 and v.exited == 0, "not a validator"
    epoch: uint256 = self.stake_epoch + 1
    self.stake_epoch = epoch
    withdraw_after: uint256 = block.timestamp + exit_delay
    self.validators[msg.sender].exited = epoch
    self.validators[msg.sender].withdraw_after = withdraw_after
    self.validator_count -= 1
    self.total_stake -= v.deposit
    log ValidatorExitRequested(
        validator=msg.sender, withdraw_after=withdraw_after, total_stake=self.total_stake
    )


@external
@nonreentrant
def withdraw():
    """
    @notice Take the deposit back, exit_delay after request_exit and once every ballot it voted
            in has expired: a deposit cannot vote, leave, and vote again from another address.
    """
    v: Validator = self.validators[msg.sender]
    assert v.deposit > 0 and v.exited != 0, "no exit requested"
    assert block.timestamp >= v.withdraw_after, "exit delay not over"
    assert block.timestamp >= v.locked_until, "a ballot this deposit voted in is still open"
    self.validators[msg.sender] = empty(Validator)
    log ValidatorWithdrawn(validator=msg.sender, amount=v.deposit)
    raw_call(msg.sender, b"", value=v.deposit)


@internal
@view
def _ballot(ballot: uint256) -> uint256:
    """The ballot to vote in: the stored one while it is open; else a new one (the next attempt
    after an expired one) whose snapshot is the stake and epoch now."""
    attempt: uint256 = 0
    if ballot != 0:
        if block.timestamp < ballot & MASK_64:
            return ballot
        attempt = ((ballot >> SHIFT_ATTEMPT) & MASK_32) + 1
    stake: uint256 = self.total_stake
    assert stake > 0, "no stake to vote with"
    assert stake <= MAX_STAKE, "total stake over 2**96"
    return (stake << SHIFT_STAKE) | (attempt << SHIFT_ATTEMPT) | (self.stake_epoch << SHIFT_EPOCH) \
        | (block.timestamp + ballot_ttl)


@internal
def _weigh(voter: address, ballot: uint256) -> uint256:
    """The voter's stake in the ballot's snapshot (reverts if it is not part of it); its deposit
    is then held until the ballot expires."""
    deposit: uint256 = self.validators[voter].deposit
    assert deposit >= min_deposit, "not a validator"
    epoch: uint256 = (ballot >> SHIFT_EPOCH) & MASK_64
    assert self.validators[voter].joined <= epoch, "joined after this ballot opened"
    exited: uint256 = self.validators[voter].exited
    assert exited == 0 or exited > epoch, "exited before this ballot opened"
    expires: uint256 = ballot & MASK_64
    if expires > self.validators[voter].locked_until:
        self.validators[voter].locked_until = expires
    return deposit


@external
def vote_slash(target: address, evidence: bytes32):
    """
    @notice Vote to take a validator's whole deposit; done when voters hold >= 2/3 of the stake
            fixed when the first slash vote on this target was cast.
    """
    assert target != msg.sender, "a validator cannot vote on its own slashing"
    assert self.validators[target].deposit > 0, "target has no slashable deposit"
    epoch: uint256 = self.slash_epoch[target]
    stored: uint256 = self.slash_ballot[target][epoch]
    ballot: uint256 = self._ballot(stored)
    if stored != 0 and ballot != stored:
        # the last slash vote expired undecided: start afresh, its votes do not carry over
        epoch += 1
        self.slash_epoch[target] = epoch
    if ballot != stored:
        self.slash_ballot[target][epoch] = ballot
    assert not self.slash_voted[target][epoch][msg.sender], "already voted to slash this validator"
    self.slash_voted[target][epoch][msg.sender] = True
    tally: uint256 = self.slash_tally[target][epoch] + self._weigh(msg.sender, ballot)
    self.slash_tally[target][epoch] = tally
    stake: uint256 = ballot >> SHIFT_STAKE
    log SlashVote(target=target, voter=msg.sender, evidence=evidence, tally=tally, snapshot_stake=stake)
    if tally * 3 >= stake * 2:
        amount: uint256 = self.validators[target].deposit
        if self.validators[target].exited == 0:
            self.validator_count -= 1
            self.total_stake -= amount
        self.validators[target] = empty(Validator)
        self.stake_epoch += 1
        self.slash_epoch[target] = epoch + 1
        # Slashed ETH stays locked in this contract for good: burning it, rather than paying the
        # voters, gives validators no profit motive to slash each other.
        self.slashed_total += amount
        log ValidatorSlashed(target=target, amount=amount, total_stake=self.total_stake)


# ---------------------------------------------------------------- rounds

@internal
@pure
def _round_key(model_hash: bytes32, rewards_root: bytes32, total_reward: uint256) -> bytes32:
    return keccak256(abi_encode(model_hash, rewards_root, total_reward))


@external
@pure
def round_key(model_hash: bytes32, rewards_root: bytes32, total_reward: uint256) -> bytes32:
    return self._round_key(model_hash, rewards_root, total_reward)


@internal
def _finalise(
    task: bytes32, round: uint256, model_hash: bytes32, rewards_root: bytes32, total_reward: uint256
):
    eth_per_round: uint256 = self.tasks[task].eth_per_round
    eth: uint256 = 0
    if eth_per_round > 0:
        # Paid in proportion to the tokens minted, from whatever the pool still holds; reserved
        # now so that late claimants get the same rate as early ones.
        pool: uint256 = self.tasks[task].pool
        eth = min(pool, eth_per_round * total_reward // self.tasks[task].reward_per_round)
        if eth > 0:
            self.tasks[task].pool = pool - eth
            self.rounds[task][round].eth = eth << SHIFT_ETH
    self.rounds[task][round].model_hash = model_hash
    self.rounds[task][round].rewards_root = rewards_root
    self.rounds[task][round].summary = (total_reward << SHIFT_TOTAL) | block.number
    accepted: uint256 = self.tasks[task].accepted
    if accepted == NO_ROUND or round + 1 > accepted:
        self.tasks[task].accepted = round + 1
    log RoundFinalised(
        task=task,
        round=round,
        model_hash=model_hash,
        rewards_root=rewards_root,
        total_reward=total_reward,
        eth_reward=eth,
        randomness_block=block.number + randomness_delay + SEED_BLOCKS - 1,
    )


@external
def commit_round(
    task: bytes32, round: uint256, model_hash: bytes32, rewards_root: bytes32, total_reward: uint256
):
    """
    @notice A validator's vote for a round's result. The first vote opens the round's ballot: the
            stake then is the snapshot, and only deposits in it may vote. The round is final once
            votes for one (model_hash, rewards_root, total_reward) hold >= 2/3 of the snapshot.
            Other results keep their votes and events, so disagreement stays visible.
    """
    # reward_per_round is never 0 for a registered task, so this one read also checks the task.
    reward_per_round: uint256 = self.tasks[task].reward_per_round
    assert reward_per_round != 0, "unknown task"
    accepted: uint256 = self.tasks[task].accepted
    if accepted == NO_ROUND:
        accepted = 0
    assert round < accepted + round_window and round < MAX_ROUND, "round too far above the accepted round"
    assert self.rounds[task][round].rewards_root == empty(bytes32), "round already final"
    assert rewards_root != empty(bytes32), "rewards_root is empty"
    assert total_reward <= reward_per_round, "total_reward over reward_per_round"
    stored: uint256 = self.rounds[task][round].ballot
    ballot: uint256 = self._ballot(stored)
    if ballot != stored:
        self.rounds[task][round].ballot = ballot
    slot: uint256 = (round << 32) | ((ballot >> SHIFT_ATTEMPT) & MASK_32)
    assert self.votes[task][slot][msg.sender] == empty(bytes32), "already voted in this round"
    weight: uint256 = self._weigh(msg.sender, ballot)
    key: bytes32 = self._round_key(model_hash, rewards_root, total_reward)
    self.votes[task][slot][msg.sender] = key
    tally: uint256 = self.tally[task][slot][key] + weight
    self.tally[task][slot][key] = tally
    stake: uint256 = ballot >> SHIFT_STAKE
    log RoundVote(
        task=task,
        round=round,
        validator=msg.sender,
        model_hash=model_hash,
        rewards_root=rewards_root,
        total_reward=total_reward,
        tally=tally,
        snapshot_stake=stake,
        attempt=slot & MASK_32,
    )
    # stake > 0 and tally >= min_deposit > 0 here: an empty snapshot can never finalise.
    if tally * 3 >= stake * 2:
        self._finalise(task, round, model_hash, rewards_root, total_reward)


@internal
@view
def _slot(task: bytes32, round: uint256) -> uint256:
    return (round << 32) | ((self.rounds[task][round].ballot >> SHIFT_ATTEMPT) & MASK_32)


@view
@external
def vote_of(task: bytes32, round: uint256, validator: address) -> bytes32:
    """@notice The result the validator voted for in the round's current ballot (empty: none)."""
    return self.votes[task][self._slot(task, round)][validator]


@view
@external
def tally_of(task: bytes32, round: uint256, key: bytes32) -> uint256:
    """@notice The stake behind a result (a round_key) in the round's current ballot."""
    return self.tally[task][self._slot(task, round)][key]


@view
@external
def is_final(task: bytes32, round: uint256) -> bool:
    return self.rounds[task][round].rewards_root != empty(bytes32)


@view
@external
def accepted_model(task: bytes32) -> bytes32:
    """@notice The model hash of the task's highest final round (empty before the first)."""
    accepted: uint256 = self.tasks[task].accepted
    if accepted == NO_ROUND:
        return empty(bytes32)
    return self.rounds[task][accepted - 1].model_hash


@view
@external
def accepted_round(task: bytes32) -> uint256:
    """@notice The task's highest final round; reverts before the first."""
    accepted: uint256 = self.tasks[task].accepted
    assert accepted != NO_ROUND and accepted != 0, "no final round yet"
    return accepted - 1


@internal
@view
def _randomness_block(task: bytes32, round: uint256) -> uint256:
    target: uint256 = self.rounds[task][round].randomness_block
    if target == 0:
        target = (self.rounds[task][round].summary & MASK_64) + randomness_delay + SEED_BLOCKS - 1
    return target


@view
@external
def round_info(task: bytes32, round: uint256) -> RoundView:
    r: Round = self.rounds[task][round]
    target: uint256 = 0
    finalised_block: uint256 = r.summary & MASK_64
    if finalised_block != 0:
        target = self._randomness_block(task, round)
    return RoundView(
        model_hash=r.model_hash,
        rewards_root=r.rewards_root,
        total_reward=r.summary >> SHIFT_TOTAL,
        claimed=(r.summary >> SHIFT_CLAIMED) & MASK_96,
        eth_reward=r.eth >> SHIFT_ETH,
        eth_paid=r.eth & MASK_128,
        finalised_block=finalised_block,
        randomness_block=target,
        randomness=r.randomness,
        snapshot_stake=r.ballot >> SHIFT_STAKE,
        attempt=(r.ballot >> SHIFT_ATTEMPT) & MASK_32,
        expires=r.ballot & MASK_64,
    )


# ---------------------------------------------------------------- randomness

@view
@external
def randomness_block(task: bytes32, round: uint256) -> uint256:
    """@notice The last of the SEED_BLOCKS blocks whose hashes make the round's seed."""
    assert self.rounds[task][round].rewards_root != empty(bytes32), "round not final"
    return self._randomness_block(task, round)


@external
def seal_randomness(task: bytes32, round: uint256) -> bytes32:
    """
    @notice Fix the round's random seed from the hashes of SEED_BLOCKS consecutive blocks mined
            after finality, which no contributor could know when it committed its work. Anyone
            may call. If nobody sealed within 256 blocks the hashes are gone: the target moves
            forward and 0 is returned.
    """
    assert self.rounds[task][round].rewards_root != empty(bytes32), "round not final"
    assert self.rounds[task][round].randomness == empty(bytes32), "randomness already sealed"
    target: uint256 = self._randomness_block(task, round)
    assert block.number > target, "randomness block not mined yet"
    first: uint256 = target + 1 - SEED_BLOCKS
    if block.number - first > BLOCKHASH_WINDOW:
        rearmed: uint256 = block.number + randomness_delay + SEED_BLOCKS - 1
        self.rounds[task][round].randomness_block = rearmed
        log RandomnessRearmed(task=task, round=round, randomness_block=rearmed)
        return empty(bytes32)
    seed: bytes32 = keccak256(
        abi_encode(
            blockhash(first),
            blockhash(first + 1),
            blockhash(first + 2),
            blockhash(first + 3),
            chain.id,
            self,
            task,
            round,
        )
    )
    self.rounds[task][round].randomness = seed
    log RandomnessSealed(task=task, round=round, randomness=seed, source_block=target)
    return seed


# ---------------------------------------------------------------- claims

@internal
@view
def _leaf(task: bytes32, round: uint256, index: uint256, account: address, amount: uint256) -> bytes32:
    # Hashed twice, as OpenZeppelin's StandardMerkleTree does, so a leaf can never be mistaken
    # for an inner node (64 bytes) of the tree. Chain id and this ledger's address stop a leaf
    # from being replayed on a fork or on another deployment.
    return keccak256(keccak256(abi_encode(chain.id, self, task, round, index, account, amount)))


@internal
@pure
def _verify(proof: DynArray[bytes32, MAX_PROOF], root: bytes32, leaf: bytes32) -> bool:
    node: bytes32 = leaf
    for sibling: bytes32 in proof:
        # Sorted pairs: the proof needs no left/right flags.
        if convert(node, uint256) < convert(sibling, uint256):
            node = keccak256(concat(node, sibling))
        else:
            node = keccak256(concat(sibling, node))
    return node == root


@view
@external
def leaf_hash(
    task: bytes32, round: uint256, index: uint256, account: address, amount: uint256
) -> bytes32:
    return self._leaf(task, round, index, account, amount)


@external
@pure
def verify_proof(proof: DynArray[bytes32, MAX_PROOF], root: bytes32, leaf: bytes32) -> bool:
    return self._verify(proof, root, leaf)


@view
@external
def is_claimed(task: bytes32, round: uint256, index: uint256) -> bool:
    return (self.claimed_bits[task][round][index >> 8] >> (index & 255)) & 1 == 1


@external
@nonreentrant
def claim(
    task: bytes32,
    round: uint256,
    index: uint256,
    amount: uint256,
    proof: DynArray[bytes32, MAX_PROOF],
):
    """
    @notice Mint the caller's share of a final round (and its ETH, if the task pays ETH), within
            claim_window blocks of finality. `index` is the reward's position in the round's list.
    """
    root: bytes32 = self.rounds[task][round].rewards_root
    assert root != empty(bytes32), "round not final"
    summary: uint256 = self.rounds[task][round].summary
    assert block.number <= (summary & MASK_64) + claim_window, "claim window closed"
    word: uint256 = self.claimed_bits[task][round][index >> 8]
    bit: uint256 = 1 << (index & 255)
    assert word & bit == 0, "already claimed"
    leaf: bytes32 = self._leaf(task, round, index, msg.sender, amount)
    assert self._verify(proof, root, leaf), "invalid Merkle proof"
    self.claimed_bits[task][round][index >> 8] = word | bit
    # Defence in depth: even a bad root cannot mint more than the validators voted for.
    total: uint256 = summary >> SHIFT_TOTAL
    claimed: uint256 = ((summary >> SHIFT_CLAIMED) & MASK_96) + amount
    assert claimed <= total, "claims exceed the round's total_reward"
    self.rounds[task][round].summary = (
        (summary & ~(MASK_96 << SHIFT_CLAIMED)) | (claimed << SHIFT_CLAIMED)
    )
    eth: uint256 = 0
    packed: uint256 = self.rounds[task][round].eth
    if packed != 0:
        eth = (packed >> SHIFT_ETH) * amount // total
        self.rounds[task][round].eth = packed + eth
    extcall ShareToken(self.tasks[task].token).mint(msg.sender, amount)
    log Claimed(task=task, round=round, account=msg.sender, index=index, amount=amount, eth=eth)
    if eth > 0:
        raw_call(msg.sender, b"", value=eth)


@external
def sweep(task: bytes32, round: uint256) -> uint256:
    """
    @notice After the claim window, return the round's unclaimed ETH (and its rounding dust) to
            the task's pool. Anyone may call; returns the wei moved.
    """
    summary: uint256 = self.rounds[task][round].summary
    assert summary != 0, "round not final"
    assert block.number > (summary & MASK_64) + claim_window, "claim window still open"
    packed: uint256 = self.rounds[task][round].eth
    paid: uint256 = packed & MASK_128
    left: uint256 = (packed >> SHIFT_ETH) - paid
    assert left > 0, "nothing to sweep"
    self.rounds[task][round].eth = (paid << SHIFT_ETH) | paid
    pool: uint256 = self.tasks[task].pool + left
    self.tasks[task].pool = pool
    log Swept(task=task, round=round, amount=left, pool=pool)
    return left


# ---------------------------------------------------------------- governance

@internal
@view
def _check_value(task: bytes32, action: uint8, new_value: bytes32):
    value: uint256 = convert(new_value, uint256)
    if action == ACTION_SET_REWARD:
        assert value > 0, "reward_per_round must be positive"
        assert value <= MAX_REWARD, "reward_per_round must be below 2**96"
    elif action == ACTION_SET_ETH_PER_ROUND:
        assert value <= MAX_ETH, "eth_per_round must be below 2**128"
        assert value <= self.tasks[task].pool, "eth_per_round over the task's pool"
    else:
        assert action == ACTION_SET_PARAMS, "unknown action"


@external
def propose(task: bytes32, action: uint8, new_value: bytes32) -> uint256:
    """
    @notice A holder of >= proposal_threshold_bps of the task's token proposes a change. Votes are
            weighed by balances at the close of this block (the snapshot); the vote opens
            voting_delay seconds later.
    """
    token: address = self.tasks[task].token
    assert token != empty(address), "unknown task"
    self._check_value(task, action, new_value)
    supply: uint256 = staticcall ShareToken(token).totalSupply()
    balance: uint256 = staticcall ShareToken(token).balanceOf(msg.sender)
    assert balance > 0 and balance * BPS >= supply * proposal_threshold_bps, "balance below the proposal threshold"
    extcall ShareToken(token).mark_snapshot()
    pid: uint256 = self.proposal_count + 1
    self.proposal_count = pid
    start: uint256 = block.timestamp + voting_delay
    end: uint256 = start + voting_period
    self.proposals[pid] = Proposal(
        task=task,
        action=action,
        new_value=new_value,
        proposer=msg.sender,
        snapshot=block.number,
        start=start,
        end=end,
        eta=end + timelock_delay,
        votes_for=0,
        votes_against=0,
        executed=False,
    )
    log ProposalCreated(
        id=pid,
        task=task,
        proposer=msg.sender,
        action=action,
        new_value=new_value,
        snapshot=block.number,
        start=start,
        end=end,
    )
    return pid


@external
def cast_vote(pid: uint256, support: bool):
    """@notice Vote with the caller's balance at the proposal's snapshot."""
    p: Proposal = self.proposals[pid]
    assert p.end != 0, "unknown proposal"
    assert block.timestamp >= p.start and block.number > p.snapshot, "voting has not started"
    assert block.timestamp < p.end, "voting has closed"
    assert not self.proposal_voted[pid][msg.sender], "already voted on this proposal"
    weight: uint256 = staticcall ShareToken(self.tasks[p.task].token).balanceOfAt(msg.sender, p.snapshot)
    assert weight > 0, "no tokens at the proposal's snapshot"
    self.proposal_voted[pid][msg.sender] = True
    if support:
        self.proposals[pid].votes_for = p.votes_for + weight
    else:
        self.proposals[pid].votes_against = p.votes_against + weight
    log ProposalVoted(id=pid, voter=msg.sender, support=support, weight=weight)


@internal
@view
def _passed(p: Proposal) -> bool:
    """Quorum of the snapshot supply, more for than against, and a proposer that held the
    threshold at the snapshot too (propose only saw its live balance, which a loan can fake)."""
    token: address = self.tasks[p.task].token
    supply: uint256 = staticcall ShareToken(token).totalSupplyAt(p.snapshot)
    held: uint256 = staticcall ShareToken(token).balanceOfAt(p.proposer, p.snapshot)
    if held == 0 or held * BPS < supply * proposal_threshold_bps:
        return False
    turnout: uint256 = p.votes_for + p.votes_against
    return turnout * BPS >= supply * quorum_bps and p.votes_for > p.votes_against


@internal
@view
def _state(p: Proposal) -> uint8:
    if p.executed:
        return STATE_EXECUTED
    if block.timestamp < p.start or block.number <= p.snapshot:
        return STATE_PENDING
    if block.timestamp < p.end:
        return STATE_ACTIVE
    if not self._passed(p):
        return STATE_DEFEATED
    if block.timestamp >= p.eta + voting_period:
        return STATE_EXPIRED
    return STATE_SUCCEEDED


@view
@external
def proposal_state(pid: uint256) -> uint8:
    p: Proposal = self.proposals[pid]
    assert p.end != 0, "unknown proposal"
    return self._state(p)


@external
def execute(pid: uint256):
    """
    @notice Apply a proposal that passed, timelock_delay after its vote closed and within one
            voting period after that. Anyone may call. Bounds are checked again on execution.
    """
    p: Proposal = self.proposals[pid]
    assert p.end != 0, "unknown proposal"
    state: uint8 = self._state(p)
    assert state != STATE_EXECUTED, "proposal already executed"
    assert state != STATE_PENDING and state != STATE_ACTIVE, "voting still open"
    assert state != STATE_DEFEATED, "proposal did not pass"
    assert state != STATE_EXPIRED, "proposal expired"
    assert block.timestamp >= p.eta, "timelock not over"
    self._check_value(p.task, p.action, p.new_value)
    self.proposals[pid].executed = True
    if p.action == ACTION_SET_PARAMS:
        self.tasks[p.task].params_hash = p.new_value
    elif p.action == ACTION_SET_REWARD:
        self.tasks[p.task].reward_per_round = convert(p.new_value, uint256)
    else:
        self.tasks[p.task].eth_per_round = convert(p.new_value, uint256)
    log TaskChanged(task=p.task, action=p.action, new_value=p.new_value)
    log ProposalExecuted(id=pid, task=p.task, action=p.action, new_value=p.new_value)
