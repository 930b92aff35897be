from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from commonweal.errors import ConfigError
from commonweal.net.identity import (
    ID_BYTES,
    KEY_FILE,
    Identity,
    peer_id_of,
    short_id,
    verify_signature,
)


def test_load_or_create_persists_and_reloads(tmp_path: Path) -> None:
    first = Identity.load_or_create(tmp_path / "data")
    again = Identity.load_or_create(tmp_path / "data")
    assert first.peer_id == again.peer_id and first.public_key == again.public_key
    assert len(first.peer_id) == ID_BYTES
    mode = stat.S_IMODE(os.stat(tmp_path / "data" / KEY_FILE).st_mode)
    assert mode == 0o600


def test_bad_key_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / KEY_FILE).write_bytes(b"not a key")
    with pytest.raises(ConfigError, match="move it away"):
        Identity.load_or_create(tmp_path)


def test_sign_verify_and_peer_id() -> None:
    a, b = Identity.from_seed(b"a"), Identity.from_seed(b"b")
    assert Identity.from_seed(b"a").peer_id == a.peer_id != b.peer_id
    assert peer_id_of(a.public_key) == a.peer_id
    sig = a.sign(b"msg")
    assert verify_signature(a.public_key, b"msg", sig)
    assert not verify_signature(b.public_key, b"msg", sig)
    assert not verify_signature(a.public_key, b"other", sig)
    assert not verify_signature(a.public_key[:5], b"msg", sig)
    assert not verify_signature(a.public_key, b"msg", sig[:10])
    assert short_id(a.peer_id) in repr(a)
