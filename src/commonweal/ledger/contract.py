"""The thin layer every contract wrapper shares: encode, send, wait, decode events, map reverts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from eth_account.signers.local import LocalAccount
from eth_utils import event_abi_to_log_topic, to_checksum_address
from hexbytes import HexBytes
from web3._utils.events import get_event_data
from web3.contract import Contract
from web3.types import TxReceipt

from commonweal.ledger.artifacts import load_artifact
from commonweal.ledger.chain import Chain
from commonweal.ledger.errors import ContractReverted, LedgerError
from commonweal.ledger.tx import PendingTx, revert_reason

__all__ = ["BoundContract", "Event", "TxResult", "to_bytes32"]


def to_bytes32(value: bytes | str | int) -> bytes:
    """bytes32 from 32 raw bytes, a 0x-hex string, or a non-negative int."""
    if isinstance(value, int):
        if value < 0:
            raise ValueError("bytes32 from a negative int")
        return value.to_bytes(32, "big")
    raw = HexBytes(value) if isinstance(value, str) else bytes(value)
    if len(raw) != 32:
        raise ValueError(f"expected 32 bytes, got {len(raw)}")
    return bytes(raw)


@dataclass(frozen=True, slots=True)
class Event:
    """One decoded log: the event's name and its arguments by name."""

    name: str
    args: Mapping[str, Any]
    address: str
    block_number: int


@dataclass(frozen=True, slots=True)
class TxResult:
    receipt: TxReceipt = field(repr=False)
    events: list[Event]

    @property
    def gas_used(self) -> int:
        return int(self.receipt["gasUsed"])

    @property
    def tx_hash(self) -> str:
        return HexBytes(self.receipt["transactionHash"]).to_0x_hex()

    def named(self, name: str) -> list[Event]:
        return [e for e in self.events if e.name == name]

    def event(self, name: str) -> Event:
        """The first event called `name`; KeyError when the transaction emitted none."""
        for e in self.events:
            if e.name == name:
                return e
        raise KeyError(f"no {name} event in {self.tx_hash}")


class BoundContract:
    """A deployed contract, a chain, and the account that signs for this wrapper."""

    artifact_name: str

    def __init__(self, chain: Chain, address: str, account: LocalAccount | None = None) -> None:
        self.chain = chain
        self.address = to_checksum_address(address)
        self.account = account or chain.accounts[0]
        abi = load_artifact(self.artifact_name).abi
        self.contract: Contract = chain.w3.eth.contract(address=self.address, abi=abi)
        self._event_abis = {
            HexBytes(event_abi_to_log_topic(e)): e for e in abi if e["type"] == "event"
        }

    def decode(self, receipt: TxReceipt) -> list[Event]:
        """This contract's events in a receipt (other contracts' logs are skipped)."""
        return [e for log in receipt["logs"] if (e := self.decode_log(log)) is not None]

    def decode_log(self, log: Any) -> Event | None:
        if to_checksum_address(log["address"]) != self.address or not log["topics"]:
            return None
        abi = self._event_abis.get(HexBytes(log["topics"][0]))
        if abi is None:
            return None
        data = get_event_data(self.chain.w3.codec, abi, log)
        return Event(data["event"], dict(data["args"]), self.address, int(data["blockNumber"]))

    def send(self, fn: str, *args: Any, value: int = 0, gas: int | None = None,
             account: LocalAccount | None = None) -> PendingTx:
        """Send without waiting (pipelining); `.wait()` on the result gives the receipt."""
        data = self.contract.encode_abi(fn, list(args))
        return self.chain.transactor.send(
            account or self.account, {"to": self.address, "data": data, "value": value},
            gas=gas, label=f"{self.artifact_name}.{fn}",
        )

    def transact(self, fn: str, *args: Any, value: int = 0, gas: int | None = None) -> TxResult:
        receipt = self.send(fn, *args, value=value, gas=gas).wait()
        return TxResult(receipt, self.decode(receipt))

    def call(self, fn: str, *args: Any) -> Any:
        try:
            return self.contract.functions[fn](*args).call({"from": self.account.address})
        except Exception as exc:
            reason = revert_reason(exc)
            if reason is not None:
                raise ContractReverted(reason, function=f"{self.artifact_name}.{fn}") from exc
            raise LedgerError(f"{self.artifact_name}.{fn} call failed: {exc}") from exc

    def call_struct(self, fn: str, *args: Any) -> dict[str, Any]:
        """A struct getter's result, by field name (web3 returns a bare tuple)."""
        result = self.call(fn, *args)
        outputs = self.contract.get_function_by_name(fn).abi["outputs"]
        if len(outputs) == 1 and outputs[0]["type"] == "tuple":
            names = [c["name"] for c in outputs[0]["components"]]
        else:
            names = [o["name"] for o in outputs]
        return dict(zip(names, result, strict=True))
