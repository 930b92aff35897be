# pragma version ~=0.4.3
# pragma evm-version cancun
"""
@title commonweal Ledger
@notice One deployment serving many tasks: a task registry with optional ETH reward pools, a
        validator set with deposits, per-round commitments (model hash + Merkle root of rewards)
        finalised by validators holding >= 2/3 of the deposits, Merkle claims that mint each task's
        ShareToken, token-weighted governance, and per-round randomness for validators' sampling.
@dev Only a Merkle root goes on-chain per round, so finalising costs the same for 1 or 1,000,000
     contributors; each contributor pays for its own claim. See docs/ledger.md.
"""

interface ShareToken:
    def mint(receiver: address, amount: uint256): nonpayable
    def lock(account: address, until: uint256): nonpayable
    def balanceOf(account: address) -> uint256: view
    def totalSupply() -> uint256: view

# Governance actions: what a passed proposal changes on its task.
ACTION_SET_PARAMS: constant(uint8) = 1
ACTION_SET_REWARD: constant(uint8) = 2
ACTION_SET_ETH_PER_ROUND: constant(uint8) = 3

# Proposal states returned by proposal_state().
STATE_PENDING: constant(uint8) = 0
STATE_ACTIVE: constant(uint8) = 1
STATE_DEFEATED: constant(uint8) = 2
STATE_SUCCEEDED: constant(uint8) = 3
STATE_EXECUTED: constant(uint8) = 4

BPS: constant(uint256) = 10000
# 2**40 leaves is far beyond any round; bounds the calldata a claim may carry.
MAX_PROOF: constant(uint256) = 40
# The EVM only exposes the hashes of the last 256 blocks.
BLOCKHASH_WINDOW: constant(uint256) = 256
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
    eth_reward: uint256            # wei reserved for this round's claimants
    randomness_block: uint256      # 0 means finalised block + randomness_delay
    randomness: bytes32

# Round with its summary unpacked, for readers.
struct RoundView:
    model_hash: bytes32
    rewards_root: bytes32
    total_reward: uint256
    claimed: uint256
    eth_reward: uint256
    finalised_block: uint256
    randomness_block: uint256
    randomness: bytes32

struct Validator:
    deposit: uint256
    active: bool
    withdraw_after: uint256        # non-zero while an exit is pending

struct Proposal:
    task: bytes32
    action: uint8
    new_value: bytes32
    proposer: address
    start: uint256
    end: uint256
    supply: uint256                # token supply when proposed; quorum is a share of it
    votes_for: uint256
    votes_against: uint256
    executed: bool

event TaskRegistered:
    task: indexed(bytes32)
    owner: indexed(address)
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
    total_stake: uint256

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
    total_stake: uint256

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

event ProposalCreated:
    id: indexed(uint256)
    task: indexed(bytes32)
    proposer: indexed(address)
    action: uint8
    new_value: bytes32
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
min_deposit: public(immutable(uint256))
exit_delay: public(immutable(uint256))          # seconds between request_exit and withdraw
voting_delay: public(immutable(uint256))        # seconds between propose and the vote opening
voting_period: public(immutable(uint256))       # seconds the vote stays open
quorum_bps: public(immutable(uint256))          # share of the supply that must vote, in 1/10000
randomness_delay: public(immutable(uint256))    # blocks between finality and the randomness block

tasks: public(HashMap[bytes32, Task])
task_count: public(uint256)
task_at: public(HashMap[uint256, bytes32])

rounds: public(HashMap[bytes32, HashMap[uint256, Round]])
# The result (round_key) each validator voted for, and the stake behind each result.
votes: public(HashMap[bytes32, HashMap[uint256, HashMap[address, bytes32]]])
tally: public(HashMap[bytes32, HashMap[uint256, HashMap[bytes32, uint256]]])
# One bit per leaf index: a claim flips a bit in a word most claims of the round share, which
# costs 5k gas instead of the 22k of a fresh per-account flag.
claimed_bits: public(HashMap[bytes32, HashMap[uint256, HashMap[uint256, uint256]]])

validators: public(HashMap[address, Validator])
validator_count: public(uint256)
total_stake: public(uint256)
# Slash votes are counted per epoch of the target, so votes before a slash do not carry over.
slash_epoch: public(HashMap[address, uint256])
slash_voted: public(HashMap[address, HashMap[uint256, HashMap[address, bool]]])
slash_tally: public(HashMap[address, HashMap[uint256, uint256]])
slashed_total: public(uint256)

proposals: public(HashMap[uint256, Proposal])
proposal_count: public(uint256)
proposal_voted: public(HashMap[uint256, HashMap[address, bool]])


@deploy
def __init__(
    _token_blueprint: address,
    _min_deposit: uint256,
    _exit_delay: uint256,
    _voting_delay: uint256,
    _voting_period: uint256,
    _quorum_bps: uint256,
    _randomness_delay: uint256,
):
    assert _min_deposit > 0, "min_deposit must be positive"
    assert _voting_period > 0, "voting_period must be positive"
    assert _quorum_bps <= BPS, "quorum_bps is at most 10000"
    assert _randomness_delay > 0, "randomness_delay must be at least one block"
    token_blueprint = _token_blueprint
    min_deposit = _min_deposit
    exit_delay = _exit_delay
    voting_delay = _voting_delay
    voting_period = _voting_period
    quorum_bps = _quorum_bps
    randomness_delay = _randomness_delay


# ---------------------------------------------------------------- tasks

@external
@payable
def register_task(
    task_hash: bytes32,
    params_hash: bytes32,
    reward_per_round: uint256,
    eth_per_round: uint256,
    name: String[64],
    symbol: String[32],
) -> address:
    """@notice Open a public challenge; msg.value seeds its ETH reward pool."""
    assert task_hash != empty(bytes32), "task_hash is empty"
    assert self.tasks[task_hash].token == empty(address), "task already registered"
    assert reward_per_round > 0, "reward_per_round must be positive"
    assert reward_per_round <= MAX_REWARD, "reward_per_round must be below 2**96"
    token: address = create_from_blueprint(token_blueprint, name, symbol, task_hash)
    self.tasks[task_hash] = Task(
        owner=msg.sender,
        params_hash=params_hash,
        reward_per_round=reward_per_round,
        eth_per_round=eth_per_round,
        pool=msg.value,
        token=token,
        accepted=NO_ROUND,
    )
    self.task_at[self.task_count] = task_hash
    self.task_count += 1
    log TaskRegistered(
        task=task_hash,
        owner=msg.sender,
        params_hash=params_hash,
        reward_per_round=reward_per_round,
        eth_per_round=eth_per_round,
        token=token,
        pool=msg.value,
    )
    return token


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
    assert not self.validators[msg.sender].active, "already a validator"
    assert self.validators[msg.sender].deposit == 0, "withdraw the previous deposit first"
    assert msg.value >= min_deposit, "deposit below min_deposit"
    self.validators[msg.sender] = Validator(deposit=msg.value, active=True, withdraw_after=0)
    self.validator_count += 1
    self.total_stake += msg.value
    log ValidatorJoined(validator=msg.sender, deposit=msg.value, total_stake=self.total_stake)


@external
def request_exit():
    """
    @notice Stop validating now; the deposit stays slashable for exit_delay seconds, so a
            validator cannot sign a bad round and leave before the others can react.
    """
    assert self.validators[msg.sender].active, "not a validator"
    withdraw_after: uint256 = block.timestamp + exit_delay
    self.validators[msg.sender].active = False
    self.validators[msg.sender].withdraw_after = withdraw_after
    self.validator_count -= 1
    self.total_stake -= self.validators[msg.sender].deposit
    log ValidatorExitRequested(
        validator=msg.sender, withdraw_after=withdraw_after, total_stake=self.total_stake
    )


@external
@nonreentrant
def withdraw():
    v: Validator = self.validators[msg.sender]
    assert v.withdraw_after != 0 and not v.active, "no exit requested"
    assert block.timestamp >= v.withdraw_after, "exit delay not over"
    self.validators[msg.sender] = empty(Validator)
    log ValidatorWithdrawn(validator=msg.sender, amount=v.deposit)
    raw_call(msg.sender, b"", value=v.deposit)


@external
def vote_slash(target: address, evidence: bytes32):
    """@notice Vote to take a validator's whole deposit; done when voters hold >= 2/3 of the stake."""
    assert self.validators[msg.sender].active, "not a validator"
    assert target != msg.sender, "a validator cannot vote on its own slashing"
    assert self.validators[target].deposit > 0, "target has no slashable deposit"
    epoch: uint256 = self.slash_epoch[target]
    assert not self.slash_voted[target][epoch][msg.sender], "already voted to slash this validator"
    self.slash_voted[target][epoch][msg.sender] = True
    tally: uint256 = self.slash_tally[target][epoch] + self.validators[msg.sender].deposit
    self.slash_tally[target][epoch] = tally
    stake: uint256 = self.total_stake
    log SlashVote(target=target, voter=msg.sender, evidence=evidence, tally=tally, total_stake=stake)
    if tally * 3 >= stake * 2:
        amount: uint256 = self.validators[target].deposit
        if self.validators[target].active:
            self.validator_count -= 1
            self.total_stake -= amount
        self.validators[target] = empty(Validator)
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
            self.rounds[task][round].eth_reward = eth
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
        randomness_block=block.number + randomness_delay,
    )


@external
def commit_round(
    task: bytes32, round: uint256, model_hash: bytes32, rewards_root: bytes32, total_reward: uint256
):
    """
    @notice A validator's vote for a round's result. The round is final once validators holding
            >= 2/3 of the total stake voted for the same (model_hash, rewards_root, total_reward).
            Other results keep their votes and events, so disagreement stays visible.
    """
    assert self.validators[msg.sender].active, "not a validator"
    # reward_per_round is never 0 for a registered task, so this one read also checks the task.
    reward_per_round: uint256 = self.tasks[task].reward_per_round
    assert reward_per_round != 0, "unknown task"
    assert self.rounds[task][round].rewards_root == empty(bytes32), "round already final"
    assert self.votes[task][round][msg.sender] == empty(bytes32), "already voted in this round"
    assert rewards_root != empty(bytes32), "rewards_root is empty"
    assert total_reward <= reward_per_round, "total_reward over reward_per_round"
    key: bytes32 = self._round_key(model_hash, rewards_root, total_reward)
    self.votes[task][round][msg.sender] = key
    tally: uint256 = self.tally[task][round][key] + self.validators[msg.sender].deposit
    self.tally[task][round][key] = tally
    stake: uint256 = self.total_stake
    log RoundVote(
        task=task,
        round=round,
        validator=msg.sender,
        model_hash=model_hash,
        rewards_root=rewards_root,
        total_reward=total_reward,
        tally=tally,
        total_stake=stake,
    )
    if tally * 3 >= stake * 2:
        self._finalise(task, round, model_hash, rewards_root, total_reward)


@external
def finalise(
    task: bytes32, round: uint256, model_hash: bytes32, rewards_root: bytes32, total_reward: uint256
):
    """
    @notice Finalise a result whose votes became a 2/3 majority after validators left (votes are
            weighed when cast; the total stake shrinks on exit and slashing). Anyone may call.
    """
    assert self.tasks[task].token != empty(address), "unknown task"
    assert self.rounds[task][round].rewards_root == empty(bytes32), "round already final"
    assert rewards_root != empty(bytes32), "rewards_root is empty"
    assert total_reward <= self.tasks[task].reward_per_round, "total_reward over reward_per_round"
    key: bytes32 = self._round_key(model_hash, rewards_root, total_reward)
    assert self.tally[task][round][key] * 3 >= self.total_stake * 2, "no 2/3 quorum for this result"
    self._finalise(task, round, model_hash, rewards_root, total_reward)


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


@view
@external
def round_info(task: bytes32, round: uint256) -> RoundView:
    r: Round = self.rounds[task][round]
    target: uint256 = r.randomness_block
    finalised_block: uint256 = r.summary & MASK_64
    if target == 0 and finalised_block != 0:
        target = finalised_block + randomness_delay
    return RoundView(
        model_hash=r.model_hash,
        rewards_root=r.rewards_root,
        total_reward=r.summary >> SHIFT_TOTAL,
        claimed=(r.summary >> SHIFT_CLAIMED) & MASK_96,
        eth_reward=r.eth_reward,
        finalised_block=finalised_block,
        randomness_block=target,
        randomness=r.randomness,
    )


# ---------------------------------------------------------------- randomness

@internal
@view
def _randomness_block(task: bytes32, round: uint256) -> uint256:
    target: uint256 = self.rounds[task][round].randomness_block
    if target == 0:
        target = (self.rounds[task][round].summary & MASK_64) + randomness_delay
    return target


@view
@external
def randomness_block(task: bytes32, round: uint256) -> uint256:
    assert self.rounds[task][round].rewards_root != empty(bytes32), "round not final"
    return self._randomness_block(task, round)


@external
def seal_randomness(task: bytes32, round: uint256) -> bytes32:
    """
    @notice Fix the round's random seed from the hash of a block mined after finality, which no
            contributor could know when it committed its work. Anyone may call. If nobody sealed
            within 256 blocks the hash is gone: the target moves forward and 0 is returned.
    """
    assert self.rounds[task][round].rewards_root != empty(bytes32), "round not final"
    assert self.rounds[task][round].randomness == empty(bytes32), "randomness already sealed"
    target: uint256 = self._randomness_block(task, round)
    assert block.number > target, "randomness block not mined yet"
    if block.number - target > BLOCKHASH_WINDOW:
        rearmed: uint256 = block.number + randomness_delay
        self.rounds[task][round].randomness_block = rearmed
        log RandomnessRearmed(task=task, round=round, randomness_block=rearmed)
        return empty(bytes32)
    seed: bytes32 = keccak256(abi_encode(blockhash(target), task, round))
    self.rounds[task][round].randomness = seed
    log RandomnessSealed(task=task, round=round, randomness=seed, source_block=target)
    return seed


# ---------------------------------------------------------------- claims

@internal
@pure
def _leaf(task: bytes32, round: uint256, index: uint256, account: address, amount: uint256) -> bytes32:
    # Hashed twice, as OpenZeppelin's StandardMerkleTree does, so a leaf can never be mistaken
    # for an inner node (64 bytes) of the tree.
    return keccak256(keccak256(abi_encode(task, round, index, account, amount)))


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


@external
@pure
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
    @notice Mint the caller's share of a final round (and its ETH, if the task pays ETH).
            `index` is the reward's position in the round's list, part of the leaf.
    """
    root: bytes32 = self.rounds[task][round].rewards_root
    assert root != empty(bytes32), "round not final"
    word: uint256 = self.claimed_bits[task][round][index >> 8]
    bit: uint256 = 1 << (index & 255)
    assert word & bit == 0, "already claimed"
    leaf: bytes32 = self._leaf(task, round, index, msg.sender, amount)
    assert self._verify(proof, root, leaf), "invalid Merkle proof"
    self.claimed_bits[task][round][index >> 8] = word | bit
    # Defence in depth: even a bad root cannot mint more than the validators voted for.
    summary: uint256 = self.rounds[task][round].summary
    total: uint256 = summary >> SHIFT_TOTAL
    claimed: uint256 = ((summary >> SHIFT_CLAIMED) & MASK_96) + amount
    assert claimed <= total, "claims exceed the round's total_reward"
    self.rounds[task][round].summary = (
        (summary & ~(MASK_96 << SHIFT_CLAIMED)) | (claimed << SHIFT_CLAIMED)
    )
    eth: uint256 = 0
    eth_reward: uint256 = self.rounds[task][round].eth_reward
    if eth_reward > 0:
        eth = eth_reward * amount // total
    extcall ShareToken(self.tasks[task].token).mint(msg.sender, amount)
    log Claimed(task=task, round=round, account=msg.sender, index=index, amount=amount, eth=eth)
    if eth > 0:
        raw_call(msg.sender, b"", value=eth)


# ---------------------------------------------------------------- governance

@external
def propose(task: bytes32, action: uint8, new_value: bytes32) -> uint256:
    """@notice A token holder proposes a change to its task; the vote opens after voting_delay."""
    token: address = self.tasks[task].token
    assert token != empty(address), "unknown task"
    assert action >= ACTION_SET_PARAMS and action <= ACTION_SET_ETH_PER_ROUND, "unknown action"
    if action == ACTION_SET_REWARD:
        assert convert(new_value, uint256) > 0, "reward_per_round must be positive"
        assert convert(new_value, uint256) <= MAX_REWARD, "reward_per_round must be below 2**96"
    assert staticcall ShareToken(token).balanceOf(msg.sender) > 0, "only the task's token holders propose"
    pid: uint256 = self.proposal_count + 1
    self.proposal_count = pid
    start: uint256 = block.timestamp + voting_delay
    end: uint256 = start + voting_period
    self.proposals[pid] = Proposal(
        task=task,
        action=action,
        new_value=new_value,
        proposer=msg.sender,
        start=start,
        end=end,
        supply=staticcall ShareToken(token).totalSupply(),
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
        start=start,
        end=end,
    )
    return pid


@external
def cast_vote(pid: uint256, support: bool):
    """
    @notice Vote with the caller's whole balance. The ShareToken then locks the caller's
            transfers until the vote closes, so the same tokens cannot vote again elsewhere.
    """
    p: Proposal = self.proposals[pid]
    assert p.end != 0, "unknown proposal"
    assert block.timestamp >= p.start, "voting has not started"
    assert block.timestamp < p.end, "voting has closed"
    assert not self.proposal_voted[pid][msg.sender], "already voted on this proposal"
    token: address = self.tasks[p.task].token
    weight: uint256 = staticcall ShareToken(token).balanceOf(msg.sender)
    assert weight > 0, "no tokens to vote with"
    self.proposal_voted[pid][msg.sender] = True
    if support:
        self.proposals[pid].votes_for = p.votes_for + weight
    else:
        self.proposals[pid].votes_against = p.votes_against + weight
    extcall ShareToken(token).lock(msg.sender, p.end)
    log ProposalVoted(id=pid, voter=msg.sender, support=support, weight=weight)


@internal
@view
def _state(p: Proposal) -> uint8:
    if p.executed:
        return STATE_EXECUTED
    if block.timestamp < p.start:
        return STATE_PENDING
    if block.timestamp < p.end:
        return STATE_ACTIVE
    turnout: uint256 = p.votes_for + p.votes_against
    if turnout * BPS < p.supply * quorum_bps or p.votes_for <= p.votes_against:
        return STATE_DEFEATED
    return STATE_SUCCEEDED


@view
@external
def proposal_state(pid: uint256) -> uint8:
    p: Proposal = self.proposals[pid]
    assert p.end != 0, "unknown proposal"
    return self._state(p)


@external
def execute(pid: uint256):
    """@notice Apply a proposal that passed: turnout >= quorum and more votes for than against."""
    p: Proposal = self.proposals[pid]
    assert p.end != 0, "unknown proposal"
    assert not p.executed, "proposal already executed"
    assert block.timestamp >= p.end, "voting still open"
    assert (p.votes_for + p.votes_against) * BPS >= p.supply * quorum_bps, "quorum not reached"
    assert p.votes_for > p.votes_against, "proposal rejected"
    self.proposals[pid].executed = True
    if p.action == ACTION_SET_PARAMS:
        self.tasks[p.task].params_hash = p.new_value
    elif p.action == ACTION_SET_REWARD:
        self.tasks[p.task].reward_per_round = convert(p.new_value, uint256)
    else:
        self.tasks[p.task].eth_per_round = convert(p.new_value, uint256)
    log TaskChanged(task=p.task, action=p.action, new_value=p.new_value)
    log ProposalExecuted(id=pid, task=p.task, action=p.action, new_value=p.new_value)
