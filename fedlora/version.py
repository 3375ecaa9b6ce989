"""Which fedlora a process runs: the release and a fingerprint of its code.

A deployed node imports its own installed fedlora (Flower's FAB carries only the two apps), so the
server compares the node's ``library_version()`` with its own at the capability query. The release
number alone would pass two different checkouts of one release; the fingerprint (SHA-256 of every
``fedlora/**/*.py``, by relative path) does not: the same code gives the same string wherever it is
installed (wheel or editable).

``rng_fingerprint()``: some rules send a factor as its seed (``ClientPayload.a_seeds``) and the node
draws it; that is exact only if the node's torch draws the same numbers for a seed as the server's.
The server compares the two fingerprints at the capability query too."""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

from fedlora import __version__

PACKAGE = Path(__file__).resolve().parent


def code_fingerprint(package: Path = PACKAGE) -> str:
    """12 hex digits of the SHA-256 over every ``*.py`` under ``package`` (relative path + bytes)."""
    h = hashlib.sha256()
    for p in sorted(package.rglob("*.py")):
        h.update(p.relative_to(package).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:12]


@cache
def rng_fingerprint() -> str:
    """12 hex digits of the SHA-256 of a seeded ``kaiming_a`` draw (float64): equal wherever torch
    draws the same numbers for a seed."""
    import torch

    from fedlora.lora import kaiming_a

    draw = kaiming_a(4, 16, seed=20261206, dtype=torch.float64)
    return hashlib.sha256(draw.numpy().tobytes()).hexdigest()[:12]


@cache
def library_version() -> str:
    """``"<release>+<code fingerprint>"``, e.g. ``"0.1.0+3f2a9c0d1e4b"``."""
    return f"{__version__}+{code_fingerprint()}"
