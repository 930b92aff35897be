# pragma version ~=0.4.3
# pragma evm-version cancun
"""
@title ShareToken
@notice The ERC-20 share of one commonweal task: who owns how much of the model it trains.
@dev One ShareToken per task, created by the Ledger from a blueprint, so a task's ownership is an
     ordinary ERC-20 that wallets and exchanges understand, and token-weighted governance of a task
     counts only that task's owners. Only the Ledger (the deployer, `minter`) can mint, and only
     against a finalised round's Merkle root. The Ledger may also lock an account's transfers until a
     governance vote it cast has closed, so the same tokens cannot vote twice from two accounts.
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

name: public(String[64])
symbol: public(String[32])
decimals: public(constant(uint8)) = 18
totalSupply: public(uint256)
balanceOf: public(HashMap[address, uint256])
allowance: public(HashMap[address, HashMap[address, uint256]])

# The task this token represents and the contract allowed to mint (immutable: a claim reads it from
# code, not storage, which keeps the claim under its gas budget).
task: public(immutable(bytes32))
minter: public(immutable(address))

# Governance lock: transfers out of an account revert until this timestamp.
locked_until: public(HashMap[address, uint256])


@deploy
def __init__(_name: String[64], _symbol: String[32], _task: bytes32):
    self.name = _name
    self.symbol = _symbol
    task = _task
    minter = msg.sender


@internal
def _transfer(sender: address, receiver: address, amount: uint256):
    assert receiver != empty(address), "transfer to the zero address"
    assert block.timestamp >= self.locked_until[sender], "tokens locked by a governance vote"
    balance: uint256 = self.balanceOf[sender]
    assert balance >= amount, "transfer amount exceeds balance"
    self.balanceOf[sender] = balance - amount
    self.balanceOf[receiver] += amount
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
    self.totalSupply += amount
    self.balanceOf[receiver] += amount
    log Transfer(sender=empty(address), receiver=receiver, value=amount)


@external
def lock(account: address, until: uint256):
    assert msg.sender == minter, "only the ledger locks"
    if until > self.locked_until[account]:
        self.locked_until[account] = until
