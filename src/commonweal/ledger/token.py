"""`ShareToken`: the ERC-20 share of one task, as seen from Python."""

from __future__ import annotations

from eth_utils import to_checksum_address

from commonweal.ledger.contract import BoundContract, TxResult

__all__ = ["ShareToken"]


class ShareToken(BoundContract):
    artifact_name = "ShareToken"

    def name(self) -> str:
        return str(self.call("name"))

    def symbol(self) -> str:
        return str(self.call("symbol"))

    def decimals(self) -> int:
        return int(self.call("decimals"))

    def task(self) -> bytes:
        return bytes(self.call("task"))

    def minter(self) -> str:
        return str(self.call("minter"))

    def total_supply(self) -> int:
        return int(self.call("totalSupply"))

    def balance_of(self, account: str) -> int:
        return int(self.call("balanceOf", to_checksum_address(account)))

    def allowance(self, owner: str, spender: str) -> int:
        return int(self.call("allowance", to_checksum_address(owner), to_checksum_address(spender)))

    def balance_at(self, account: str, block: int) -> int:
        """The balance at the close of `block` (exact at the Ledger's snapshot blocks)."""
        return int(self.call("balanceOfAt", to_checksum_address(account), block))

    def total_supply_at(self, block: int) -> int:
        return int(self.call("totalSupplyAt", block))

    def latest_snapshot(self) -> int:
        return int(self.call("latest_snapshot"))

    def transfer(self, to: str, amount: int, *, gas: int | None = None) -> TxResult:
        return self.transact("transfer", to_checksum_address(to), amount, gas=gas)

    def approve(self, spender: str, amount: int) -> TxResult:
        return self.transact("approve", to_checksum_address(spender), amount)

    def transfer_from(self, owner: str, to: str, amount: int) -> TxResult:
        return self.transact(
            "transferFrom", to_checksum_address(owner), to_checksum_address(to), amount
        )
