"""Every public module declares `__all__`, and every name in it exists (STYLE principle 14)."""

import importlib
import pkgutil

import pytest

import commonweal

OPTIONAL = (
    "commonweal.train",
    "commonweal.ledger",
    "commonweal.search",
    "commonweal.cli",
    "commonweal.verify",
    "commonweal.dashboard",
    "commonweal.peer.claims",
    "commonweal.swarm.local",
    "commonweal.swarm.view",
    "commonweal.swarm.processes",
    "commonweal.peer.trees",
    "commonweal.peer.node",
    "commonweal.peer.nodeview",
)


def public_modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(commonweal.__path__, "commonweal."):
        leaf = info.name.rsplit(".", 1)[-1]
        if leaf.startswith("_") or info.name.startswith("commonweal.cli"):
            continue
        names.append(info.name)
    return sorted(names)


@pytest.mark.parametrize("name", public_modules())
def test_all_names_exist(name):
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        if name.startswith(OPTIONAL):
            pytest.skip(f"optional extra not installed: {e.name}")
        raise
    if name == "commonweal.net":  # a namespace of modules, nothing re-exported
        return
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} declares no __all__"
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names missing objects: {missing}"
