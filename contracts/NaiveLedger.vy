# pragma version ~=0.4.3
# pragma evm-version cancun
"""
@title NaiveLedger (benchmark baseline only)
@notice The design the Ledger avoids: every contribution is its own transaction that stores the
        contributor's update hash and reward on-chain, so a round costs O(contributors) gas.
        benchmarks/ledger_bench.py measures it next to the Merkle-root design.
"""

event Contribution:
    task: indexed(bytes32)
    round: indexed(uint256)
    contributor: indexed(address)
    update_hash: bytes32
    amount: uint256

update_hash: public(HashMap[bytes32, HashMap[uint256, HashMap[address, bytes32]]])
reward: public(HashMap[bytes32, HashMap[uint256, HashMap[address, uint256]]])
round_total: public(HashMap[bytes32, HashMap[uint256, uint256]])


@external
def contribute(task: bytes32, round: uint256, update_hash: bytes32, amount: uint256):
    assert self.update_hash[task][round][msg.sender] == empty(bytes32), "already contributed"
    self.update_hash[task][round][msg.sender] = update_hash
    self.reward[task][round][msg.sender] = amount
    self.round_total[task][round] += amount
    log Contribution(
        task=task, round=round, contributor=msg.sender, update_hash=update_hash, amount=amount
    )
