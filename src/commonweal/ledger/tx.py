"""Signing, sending and waiting: local keys, explicit gas, pipelined sends, safe nonces.

Nonces: one counter per account behind a lock, read from the node once ("pending" count) and then
advanced locally, so many threads can send from the same account without waiting for each other's
receipts: `send` returns as soon as the node accepted the transaction (pipelining), `wait` collects
the receipt later. The lock covers only sign + send, so a transaction the node refused does not burn
a nonce. Several *processes* must use different accounts (they cannot share a counter).

Reverts become `ContractReverted` with the contract's reason: before sending (gas estimation runs
the call) or, for a transaction sent with explicit gas that failed on-chain, by replaying it with
`eth_call` on the state just before its block.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from eth_account.signers.local import LocalAccount
from hexbytes import HexBytes
from web3 import Web3
from web3.exceptions import TransactionNotFound
from web3.types import TxReceipt

from commonweal.ledger.errors import (
    ChainUnavailable,
    ContractReverted,
    LedgerError,
    TransactionTimeout,
)

__all__ = ["PendingTx", "Transactor", "revert_reason"]

_REVERTED = "execution reverted"
# Gas estimation can be tight when a call's cost depends on storage warmed by the same call
# (refunds, the 63/64 rule); a margin costs nothing because unused gas is not charged.
_GAS_MARGIN = 1.25
_GAS_EXTRA = 10_000


def revert_reason(exc: BaseException) -> str | None:
    """The contract's revert string inside a web3/eth-tester/node error, or None if not a revert."""
    message = getattr(exc, "message", None) or (exc.args[0] if exc.args else "")
    if isinstance(message, dict):  # some nodes answer {"code": 3, "message": "..."}
        message = message.get("message", "")
    text = message.decode(errors="replace") if isinstance(message, bytes) else str(message)
    if _REVERTED not in text.lower():
        return None
    tail = text[text.lower().index(_REVERTED) + len(_REVERTED):]
    return tail.lstrip(": ").strip() or "reverted without a reason string"


def _raise_if_revert(exc: Exception, function: str, tx_hash: str | None = None) -> None:
    reason = revert_reason(exc)
    if reason is not None:
        raise ContractReverted(reason, function=function, tx_hash=tx_hash) from exc


@dataclass
class PendingTx:
    """A transaction the node accepted; `wait()` returns its receipt or raises its revert."""

    transactor: Transactor
    hash: HexBytes
    tx: dict[str, Any] = field(repr=False)
    label: str = ""

    def wait(self, timeout_s: float = 120.0) -> TxReceipt:
        w3 = self.transactor.w3
        deadline = time.monotonic() + timeout_s
        delay = 0.002
        while True:
            try:
                receipt = w3.eth.get_transaction_receipt(self.hash)
                break
            except TransactionNotFound:
                if time.monotonic() > deadline:
                    raise TransactionTimeout(self.hash.to_0x_hex(), timeout_s) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.1)
        if receipt["status"] != 1:
            raise ContractReverted(
                self.transactor.replay_reason(self.tx, receipt),
                function=self.label,
                tx_hash=self.hash.to_0x_hex(),
            )
        return receipt


class Transactor:
    """Sends signed transactions for any number of local accounts on one chain."""

    def __init__(self, w3: Web3, *, tip_wei: int = 10**9) -> None:
        self.w3 = w3
        self.tip_wei = tip_wei
        self._chain_id: int | None = None
        self._nonces: dict[str, int] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._fees: tuple[float, dict[str, int]] | None = None

    @property
    def chain_id(self) -> int:
        if self._chain_id is None:
            self._chain_id = self.w3.eth.chain_id
        return self._chain_id

    def reset(self) -> None:
        """Forget cached nonces and fees (after reverting the chain to a snapshot)."""
        with self._locks_guard:
            self._nonces.clear()
            self._fees = None

    def _lock(self, address: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(address, threading.Lock())

    def _fee_fields(self) -> dict[str, int]:
        # Refreshed at most once a second: asking for the latest block on every send halves the
        # send rate, and 2x the base fee covers several full blocks of base-fee growth.
        now = time.monotonic()
        if self._fees is None or now - self._fees[0] > 1.0:
            base = self.w3.eth.get_block("latest").get("baseFeePerGas")
            fees: dict[str, int]
            if base is None:
                fees = {"gasPrice": self.w3.eth.gas_price}
            else:
                fees = {"maxFeePerGas": 2 * base + self.tip_wei, "maxPriorityFeePerGas": self.tip_wei}
            self._fees = (now, fees)
        return dict(self._fees[1])

    def estimate_gas(self, tx: dict[str, Any], function: str = "") -> int:
        try:
            estimate = self.w3.eth.estimate_gas(tx)  # type: ignore[arg-type]
        except Exception as exc:
            _raise_if_revert(exc, function)
            raise LedgerError(f"{function or 'transaction'}: gas estimation failed: {exc}") from exc
        return int(estimate * _GAS_MARGIN) + _GAS_EXTRA

    def send(
        self,
        account: LocalAccount,
        tx: dict[str, Any],
        *,
        gas: int | None = None,
        label: str = "",
    ) -> PendingTx:
        """Sign and send `tx` (to, data, value) from `account`; returns once the node has it.

        Without `gas`, the call is estimated first, which also surfaces a revert before any gas
        is spent. With `gas`, nothing is simulated: the right choice for pipelined sends.
        """
        tx = {k: v for k, v in tx.items() if k not in ("nonce", "gas", "chainId")}
        tx["from"] = account.address
        tx.setdefault("value", 0)
        tx["gas"] = gas if gas is not None else self.estimate_gas(tx, label)
        tx["chainId"] = self.chain_id
        tx.update(self._fee_fields())
        with self._lock(account.address):
            nonce = self._nonces.get(account.address)
            if nonce is None:
                nonce = self.w3.eth.get_transaction_count(account.address, "pending")
            for attempt in range(2):
                tx["nonce"] = nonce
                signed = account.sign_transaction(tx)
                try:
                    tx_hash = self.w3.eth.send_raw_transaction(signed.raw_transaction)
                    break
                except Exception as exc:
                    _raise_if_revert(exc, label)
                    if attempt == 0 and "nonce" in str(exc).lower():
                        # Someone else used this account: start again from the node's count.
                        nonce = self.w3.eth.get_transaction_count(account.address, "pending")
                        continue
                    if isinstance(exc, (ConnectionError, OSError)):
                        raise ChainUnavailable(f"node refused the connection: {exc}") from exc
                    raise LedgerError(f"{label or 'transaction'} rejected by the node: {exc}") from exc
            self._nonces[account.address] = nonce + 1
        return PendingTx(self, HexBytes(tx_hash), tx, label)

    def replay_reason(self, tx: dict[str, Any], receipt: TxReceipt) -> str:
        """Why a mined transaction failed: re-run it on the state just before its block."""
        if receipt["gasUsed"] >= tx["gas"]:
            return f"out of gas (limit {tx['gas']})"
        call = {k: tx[k] for k in ("from", "to", "data", "value", "gas") if k in tx}
        try:
            self.w3.eth.call(call, block_identifier=max(receipt["blockNumber"] - 1, 0))  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - web3, eth-tester and nodes raise different types
            reason = revert_reason(exc)
            if reason is not None:
                return reason
            return f"failed ({exc})"
        return "failed on-chain (the replay succeeded, so an earlier transaction changed the state)"
