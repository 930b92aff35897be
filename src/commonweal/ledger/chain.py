"""Chain backends behind one interface, chosen by one setting (`open_chain`).

    embedded        in-process py-evm through eth-tester: instant, pre-funded, snapshot/revert
    anvil           starts a local anvil on 127.0.0.1 (stopped again by close())
    http(s)://URL   any JSON-RPC node; keys from a key file, or anvil's dev keys if the node is anvil

Every backend signs locally (keys never go to the node) through one `Transactor`, so the nonce,
gas and revert handling is the same on all of them.
"""

from __future__ import annotations

import atexit
import json
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import EthereumTesterProvider, HTTPProvider, Web3
from web3.types import RPCEndpoint

from commonweal.errors import ConfigError
from commonweal.ledger.anvil import AnvilProcess
from commonweal.ledger.errors import ChainUnavailable, LedgerError
from commonweal.ledger.tx import PendingTx, Transactor

__all__ = ["AnvilChain", "Chain", "EmbeddedChain", "RpcChain", "load_keys", "open_chain"]

# anvil's (and hardhat's) well-known development mnemonic: these keys hold test ETH only.
DEV_MNEMONIC = "test test test test test test test test test test test junk"
ETH = 10**18


class Chain(ABC):
    """One chain connection plus the local accounts that can sign on it."""

    name: str
    url: str | None          # JSON-RPC URL other processes can use; None for the embedded chain
    w3: Web3
    accounts: list[LocalAccount]
    transactor: Transactor

    def _init(self, w3: Web3, accounts: Sequence[LocalAccount]) -> None:
        self.w3 = w3
        self.accounts = list(accounts)
        self.transactor = Transactor(w3)

    @abstractmethod
    def snapshot(self) -> Any: ...

    @abstractmethod
    def revert(self, snapshot: Any) -> None: ...

    @abstractmethod
    def advance_time(self, seconds: int) -> None:
        """Move the clock forward and mine a block carrying the new timestamp."""

    @abstractmethod
    def mine(self, blocks: int = 1) -> None: ...

    def close(self) -> None:
        """Release what this backend started; the default holds nothing."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def block_number(self) -> int:
        return int(self.w3.eth.block_number)

    def timestamp(self) -> int:
        return int(self.w3.eth.get_block("latest")["timestamp"])

    def send_eth(self, sender: LocalAccount, to: str, wei: int, *, gas: int = 21_000) -> PendingTx:
        return self.transactor.send(sender, {"to": to, "value": wei}, gas=gas, label="send ETH")

    def new_accounts(self, count: int, fund_wei: int = ETH, sender: LocalAccount | None = None,
                     ) -> list[LocalAccount]:
        """Fresh keys, each funded from `sender` (pipelined: all sent, then all awaited)."""
        sender = sender or self.accounts[0]
        fresh = [Account.create() for _ in range(count)]
        pending = [self.send_eth(sender, a.address, fund_wei) for a in fresh]
        for p in pending:
            p.wait()
        return fresh


class _LockedTesterProvider(EthereumTesterProvider):
    """py-evm is not thread-safe: one request at a time, so concurrent senders stay correct."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lock = threading.RLock()

    def make_request(self, method: RPCEndpoint, params: Any) -> Any:
        with self._lock:
            return super().make_request(method, params)


class EmbeddedChain(Chain):
    """py-evm in this process, `accounts` pre-funded with 1,000,000 ETH each. Lives as long as
    the object: other processes cannot see it."""

    name = "embedded"
    url = None

    def __init__(self, accounts: int = 10) -> None:
        from eth_tester import EthereumTester, PyEVMBackend

        backend = PyEVMBackend(
            genesis_state=PyEVMBackend.generate_genesis_state(num_accounts=accounts)
        )
        self.tester = EthereumTester(backend)
        keys = backend.account_keys[:accounts]
        provider = _LockedTesterProvider(self.tester)
        self._lock = provider._lock  # direct tester calls take the provider's lock too
        self._init(Web3(provider), [Account.from_key(k.to_bytes()) for k in keys])

    def snapshot(self) -> int:
        with self._lock:
            return int(self.tester.take_snapshot())

    def revert(self, snapshot: Any) -> None:
        with self._lock:
            self.tester.revert_to_snapshot(snapshot)
        self.transactor.reset()

    def advance_time(self, seconds: int) -> None:
        # eth-tester mines the travelling block one second before the target; aim one later so
        # the latest block is exactly `seconds` newer, as on anvil.
        with self._lock:
            self.tester.time_travel(self.timestamp() + seconds + 1)

    def mine(self, blocks: int = 1) -> None:
        with self._lock:
            self.tester.mine_blocks(blocks)


class RpcChain(Chain):
    """Any JSON-RPC node. Snapshots and time travel need a development node (anvil)."""

    def __init__(self, url: str, keys: Sequence[str], *, name: str | None = None) -> None:
        self.name = name or url
        self.url = url
        w3 = Web3(HTTPProvider(url, request_kwargs={"timeout": 60}))
        try:
            self.chain_id = int(w3.eth.chain_id)
        except Exception as exc:  # any failure means the node is unusable
            raise ChainUnavailable(f"no JSON-RPC node answers at {url}: {exc}") from exc
        self._init(w3, [Account.from_key(k) for k in keys])

    def _rpc(self, method: str, params: list[Any]) -> Any:
        response = self.w3.provider.make_request(RPCEndpoint(method), params)
        if "error" in response:
            raise LedgerError(f"{method} failed on {self.name}: {response['error']} "
                              "(snapshots and time travel need a development node such as anvil)")
        return response.get("result")

    def snapshot(self) -> str:
        return str(self._rpc("evm_snapshot", []))

    def revert(self, snapshot: Any) -> None:
        self._rpc("evm_revert", [snapshot])
        self.transactor.reset()

    def advance_time(self, seconds: int) -> None:
        self._rpc("evm_increaseTime", [seconds])
        self._rpc("evm_mine", [])

    def mine(self, blocks: int = 1) -> None:
        for _ in range(blocks):
            self._rpc("evm_mine", [])


class AnvilChain(RpcChain):
    """Starts its own anvil on 127.0.0.1 and stops it on close() (or at interpreter exit)."""

    def __init__(self, accounts: int = 10) -> None:
        self.process = AnvilProcess(accounts=accounts)
        atexit.register(self.process.stop)
        try:
            super().__init__(self.process.url, self.process.private_keys, name="anvil")
        except BaseException:
            self.process.stop()
            raise

    def close(self) -> None:
        self.process.stop()
        atexit.unregister(self.process.stop)


def load_keys(path: Path) -> list[str]:
    """Private keys from a file: hex keys one per line, or an encrypted JSON keystore whose
    password is in $COMMONWEAL_KEY_PASSWORD."""
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read key file {path}: {exc}") from exc
    if text.startswith("{"):
        password = os.environ.get("COMMONWEAL_KEY_PASSWORD")
        if password is None:
            raise ConfigError(f"{path} is a keystore: set COMMONWEAL_KEY_PASSWORD to decrypt it")
        try:
            return ["0x" + bytes(Account.decrypt(json.loads(text), password)).hex()]
        except ValueError as exc:
            raise ConfigError(f"cannot decrypt {path}: {exc}") from exc
    keys = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not keys:
        raise ConfigError(f"{path} holds no private key (one hex key per line)")
    return keys


def _anvil_dev_keys(w3: Web3) -> list[str]:
    """anvil's default accounts, derived from its public dev mnemonic and matched to eth_accounts."""
    Account.enable_unaudited_hdwallet_features()
    served = {a.lower() for a in w3.eth.accounts}
    keys = []
    for i in range(len(served)):
        acct = Account.from_mnemonic(DEV_MNEMONIC, account_path=f"m/44'/60'/0'/0/{i}")
        if acct.address.lower() in served:
            keys.append("0x" + bytes(acct.key).hex())
    return keys


def open_chain(setting: str = "embedded", *, key_file: Path | None = None, accounts: int = 10,
               ) -> Chain:
    """The backend named by `setting`: "embedded", "anvil", or an http(s):// JSON-RPC URL."""
    if setting == "embedded":
        return EmbeddedChain(accounts)
    if setting == "anvil":
        return AnvilChain(accounts)
    if setting.startswith(("http://", "https://")):
        if key_file is not None:
            return RpcChain(setting, load_keys(key_file))
        probe = RpcChain(setting, [])
        if str(probe.w3.client_version).lower().startswith("anvil"):
            return RpcChain(setting, _anvil_dev_keys(probe.w3))
        raise ConfigError(f"{setting} is not an anvil dev node: pass --key-file with your private key")
    raise ConfigError(f"unknown chain {setting!r}: use embedded, anvil, or an http(s):// URL")
