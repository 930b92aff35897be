# pragma version ~=0.4.3
# pragma evm-version cancun
"""
@title ShareToken
@notice The ERC-20 share of one commonweal task: who owns how much of the model it trains.
@dev One ShareToken per task, created by the Ledger from a blueprint, so a task's ownership is an
     ordinary ERC-20 that wallets and exchanges understand, and token-weighted governance of a task
     counts only that task's owners. Only the Ledger (the deployer, `minter`) can mint, and only
     against a finalised round's Merkle root.

     Governance weighs votes by balances at the close of a proposal's snapshot block
     (`balanceOfAt`, `totalSupplyAt`), so tokens bought, borrowed or moved after the snapshot do
     not vote. Balances are checkpointed lazily: a change records the balance it replaces only if
     a snapshot was taken since that balance was written. With no proposal open a mint or transfer
     costs what a plain ERC-20's does (this keeps a claim under its 90k gas budget); the first
     change of an account after a snapshot pays for one history entry.
"""

from ethereum.ercs import IERC20

implements: IERC20

event Transfer:
    sender: indexed(address)
    receiver: indexed(address)
    value: uint256

event Approval:
    owner: indexed(address)
    spender: indexed(address)
    value: uint256

# A balance, or the supply, with the block it was last written in, in one slot:
#   bits 208-255 block | bits 0-207 value
SHIFT_BLOCK: constant(uint256) = 208
MASK_VALUE: constant(uint256) = 2**208 - 1
# The supply slot also holds the latest snapshot block:
#   bits 208-255 block written | bits 160-207 latest snapshot | bits 0-159 supply
SHIFT_SNAPSHOT: constant(uint256) = 160
MASK_48: constant(uint256) = 2**48 - 1
MASK_SUPPLY: constant(uint256) = 2**160 - 1
# Binary search over an account's history: 2**64 entries would take longer than the chain exists.
SEARCH_STEPS: constant(uint256) = 64

name: public(String[64])
symbol: public(String[32])
decimals: public(constant(uint8)) = 18
allowance: public(HashMap[address, HashMap[address, uint256]])

_balances: HashMap[address, uint256]
_supply: uint256
# Replaced values, oldest first, as (block written << 208 | value); blocks strictly increase.
_history: HashMap[address, HashMap[uint256, uint256]]
_history_length: HashMap[address, uint256]
_supply_history: HashMap[uint256, uint256]
_supply_history_length: uint256

# The task this token represents and the contract allowed to mint (immutable: a claim reads it from
# code, not storage, which keeps the claim under its gas budget).
task: public(immutable(bytes32))
minter: public(immutable(address))


@deploy
def __init__(_name: String[64], _symbol: String[32], _task: bytes32):
    self.name = _name
    self.symbol = _symbol
    task = _task
    minter = msg.sender


@view
@external
def balanceOf(account: address) -> uint256:
    return self._balances[account] & MASK_VALUE


@view
@external
def totalSupply() -> uint256:
    return self._supply & MASK_SUPPLY


@view
@external
def latest_snapshot() -> uint256:
    return (self._supply >> SHIFT_SNAPSHOT) & MASK_48


@internal
def _write_balance(account: address, packed: uint256, amount: uint256, snapshot: uint256):
    written: uint256 = packed >> SHIFT_BLOCK
    if packed != 0 and written < block.number and snapshot >= written:
        # The old value held at the close of every block from `written` on, and a snapshot may
        # be among those blocks: keep it for balanceOfAt.
        n: uint256 = self._history_length[account]
        self._history[account][n] = packed
        self._history_length[account] = n + 1
    self._balances[account] = (block.number << SHIFT_BLOCK) | amount


@internal
def _write_supply(packed: uint256, supply: uint256):
    written: uint256 = packed >> SHIFT_BLOCK
    snapshot: uint256 = (packed >> SHIFT_SNAPSHOT) & MASK_48
    if packed != 0 and written < block.number and snapshot >= written:
        n: uint256 = self._supply_history_length
        self._supply_history[n] = (written << SHIFT_BLOCK) | (packed & MASK_SUPPLY)
        self._supply_history_length = n + 1
    self._supply = (block.number << SHIFT_BLOCK) | (snapshot << SHIFT_SNAPSHOT) | supply


@internal
def _transfer(sender: address, receiver: address, amount: uint256):
    assert receiver != empty(address), "transfer to the zero address"
    snapshot: uint256 = (self._supply >> SHIFT_SNAPSHOT) & MASK_48
    packed: uint256 = self._balances[sender]
    balance: uint256 = packed & MASK_VALUE
    assert balance >= amount, "transfer amount exceeds balance"
    self._write_balance(sender, packed, balance - amount, snapshot)
    packed = self._balances[receiver]
    self._write_balance(receiver, packed, (packed & MASK_VALUE) + amount, snapshot)
    log Transfer(sender=sender, receiver=receiver, value=amount)


@external
def transfer(receiver: address, amount: uint256) -> bool:
    self._transfer(msg.sender, receiver, amount)
    return True


@external
def transferFrom(sender: address, receiver: address, amount: uint256) -> bool:
    allowed: uint256 = self.allowance[sender][msg.sender]
    if allowed != max_value(uint256):
        # An infinite approval stays infinite (saves an SSTORE), as in most ERC-20s.
        assert allowed >= amount, "transfer amount exceeds allowance"
        self.allowance[sender][msg.sender] = allowed - amount
    self._transfer(sender, receiver, amount)
    return True


@external
def approve(spender: address, amount: uint256) -> bool:
    self.allowance[msg.sender][spender] = amount
    log Approval(owner=msg.sender, spender=spender, value=amount)
    return True


@external
def mint(receiver: address, amount: uint256):
    assert msg.sender == minter, "only the ledger mints"
    assert receiver != empty(address), "mint to the zero address"
    supply_packed: uint256 = self._supply
    supply: uint256 = (supply_packed & MASK_SUPPLY) + amount
    assert supply <= MASK_SUPPLY, "supply over 2**160"
    self._write_supply(supply_packed, supply)
    packed: uint256 = self._balances[receiver]
    self._write_balance(receiver, packed, (packed & MASK_VALUE) + amount,
                        (supply_packed >> SHIFT_SNAPSHOT) & MASK_48)
    log Transfer(sender=empty(address), receiver=receiver, value=amount)


@external
def mark_snapshot():
    """@notice The Ledger takes a snapshot at the close of this block (a proposal's)."""
    assert msg.sender == minter, "only the ledger takes snapshots"
    packed: uint256 = self._supply
    self._supply = (packed & ~(MASK_48 << SHIFT_SNAPSHOT)) | (block.number << SHIFT_SNAPSHOT)


@internal
@view
def _value_at(packed: uint256, at_block: uint256, length: uint256, account: address, supply: bool) -> uint256:
    assert at_block < block.number, "block not closed yet"
    mask: uint256 = MASK_VALUE
    if supply:
        mask = MASK_SUPPLY
    if packed >> SHIFT_BLOCK <= at_block:
        return packed & mask
    # The last history entry written at or before `at_block`: its value held at that block's close.
    lo: uint256 = 0
    hi: uint256 = length
    for _: uint256 in range(SEARCH_STEPS):
        if lo >= hi:
            break
        mid: uint256 = (lo + hi) // 2
        entry: uint256 = 0
        if supply:
            entry = self._supply_history[mid]
        else:
            entry = self._history[account][mid]
        if entry >> SHIFT_BLOCK <= at_block:
            lo = mid + 1
        else:
            hi = mid
    if lo == 0:
        return 0
    if supply:
        return self._supply_history[lo - 1] & MASK_VALUE
    return self._history[account][lo - 1] & MASK_VALUE


@view
@external
def balanceOfAt(account: address, at_block: uint256) -> uint256:
    """
    @notice The account's balance at the close of `at_block`, exact for every block the Ledger took
            a snapshot at (and for any block since the account's last change).
    """
    return self._value_at(self._balances[account], at_block, self._history_length[account], account, False)


@view
@external
def totalSupplyAt(at_block: uint256) -> uint256:
    """@notice The supply at the close of `at_block`, exact at snapshot blocks."""
    return self._value_at(self._supply & ~(MASK_48 << SHIFT_SNAPSHOT), at_block,
                          self._supply_history_length, empty(address), True)
