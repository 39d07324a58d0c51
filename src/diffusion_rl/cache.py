"""One load-or-fit cache for every stage whose artefact outlives a run (pretrained backbones,
fitted oracles).

Layout: ``<cache_dir>/<kind>/<key>/`` holds the artefact files the stage's ``fit`` wrote, the
``config.yaml`` that defines it (exactly the text that was hashed) and ``meta.json`` (code
version, creation time, wall seconds of the fit). ``key`` is a hash of that YAML (sorted keys,
interpolations resolved) salted with ``<kind>:<CODE_VERSION[kind]>``.

An entry exists if and only if its folder exists: ``fit`` writes into a fresh temporary folder
beside the entry (same file system), everything is fsynced, and the folder is renamed into
place in one ``os.replace``. A fit that raises or is killed therefore never leaves an entry
(a killed one may leave a hidden ``.<key>.*.tmp`` folder, which nothing reads), and two
processes fitting the same entry at once both end with a valid one: the first rename wins,
the second process discards its own copy and loads the winner's, so every run of a sweep
uses the same files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = ["CODE_VERSION", "cache_key", "cached", "cached_network", "config_text"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Salt of each kind's key. Bump a kind's number when its code changes what an entry holds
#: for the same config (the fitting loop, its data draws or initialisation, the file format),
#: so stale entries are no longer found; leave it alone for refactors that keep the output.
#: A manual number rather than the git commit or a hash of the source: those change on every
#: unrelated commit or comment and would refit everything for nothing.
CODE_VERSION: dict[str, int] = {
    # 1: first version under this helper (backbone.pt = the backbone's state_dict);
    # 2: initial weights and the fit from the pretraining seed (seeding.seeded_draws; its
    #    generator-routed successor draws the same numbers, so entries stay valid)
    "pretrain": 2,
    # 1: first version under this helper (oracle.pt state_dict + oracle.json R²);
    # 2: initial weights and the fit from the oracle's seed
    "oracle": 2,
}


def _plain(node: Any) -> Any:
    """Plain Python containers, interpolations resolved against each node's own config."""
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    if isinstance(node, Mapping):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_plain(v) for v in node]
    return node


def config_text(config: Mapping | DictConfig) -> str:
    """The defining config as sorted, resolved YAML: the text that is hashed and saved."""
    return OmegaConf.to_yaml(OmegaConf.create(_plain(config)), sort_keys=True)


def cache_key(kind: str, config: Mapping | DictConfig) -> str:
    """12 hex digits of ``sha256("<kind>:<CODE_VERSION[kind]>\\n" + config_text(config))``."""
    if kind not in CODE_VERSION:
        raise KeyError(f"cache kind {kind!r} has no CODE_VERSION entry in diffusion_rl/cache.py")
    salted = f"{kind}:{CODE_VERSION[kind]}\n{config_text(config)}"
    return hashlib.sha256(salted.encode()).hexdigest()[:12]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Files first, then their folders: the data is on disk before the rename publishes it."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            _fsync(Path(folder) / name)
        _fsync(Path(folder))


def cached(kind: str, config: Mapping | DictConfig, cache_dir: str | Path,
           fit: Callable[[Path], None], load: Callable[[Path], T]) -> T:
    """``load(entry)`` of the entry for ``(kind, config)``, fitting it first if it is missing.

    ``fit(folder)`` writes the artefact files into ``folder`` (a temporary folder that becomes
    the entry only once ``fit`` has returned); ``load(folder)`` reads them back. Both runs
    that fit and runs that find the entry go through ``load``, so they return the same thing.

    Example::

        def fit(folder):
            train(net)
            torch.save(net.state_dict(), folder / "net.pt")

        def load(folder):
            net.load_state_dict(torch.load(folder / "net.pt", weights_only=True))
            return net

        net = cached("oracle", {"net": repr(net), "epochs": 10}, cache_dir, fit, load)
    """
    key = cache_key(kind, config)
    parent = Path(cache_dir) / kind
    entry = parent / key
    if entry.is_dir():
        log.info("%s: cached %s", kind, entry)
        return load(entry)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=parent))
    try:
        start = time.time()
        fit(tmp)
        meta = {"kind": kind, "key": key, "code_version": CODE_VERSION[kind],
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "fit_seconds": round(time.time() - start, 3)}
        (tmp / "config.yaml").write_text(config_text(config))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        _fsync_tree(tmp)
        try:
            os.replace(tmp, entry)
        except OSError:
            if not entry.is_dir():
                raise
            log.info("%s: %s was written by another process meanwhile; using it", kind, entry)
        else:
            _fsync(parent)  # the rename itself is durable
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed fit, or the copy that lost the race
    return load(entry)


def cached_network(kind: str, config: Mapping | DictConfig, cache_dir: str | Path, net: Any,
                   train: Callable[[Path], dict], name: str) -> tuple[Path, dict]:
    """:func:`cached` for one fitted network (an oracle, a classifier): ``train(folder)`` fits
    ``net`` in place (its logs may go to ``folder``) and returns its summary (accuracy, R²,
    settings); the entry holds ``<name>.pt`` (the state dict) and ``<name>.json`` (the summary). Returns the entry and the summary, and
    ``net`` holds the entry's weights either way."""
    import torch  # here: validation imports this module and must stay torch-free

    def fit(folder: Path) -> None:
        summary = train(folder)
        (folder / f"{name}.json").write_text(json.dumps(summary, indent=2))
        torch.save(net.state_dict(), folder / f"{name}.pt")

    def load(folder: Path) -> tuple[Path, dict]:
        net.load_state_dict(torch.load(folder / f"{name}.pt", map_location="cpu", weights_only=True))
        return folder, json.loads((folder / f"{name}.json").read_text())

    return cached(kind, config, cache_dir, fit, load)
