"""The README's quick start: ``python -m tunnel.demo`` runs a working tunnel."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue

ROOT = Path(__file__).resolve().parents[1]


@pytest_twisted.ensureDeferred
async def test_demo_serves_a_page_through_the_tunnel():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out, err, code = await getProcessOutputAndValue(
        sys.executable,
        ["-m", "tunnel.demo", "--port", "0", "--check"],
        env=env,
        path=str(ROOT),
        reactor=reactor,
    )
    assert code == 0, err.decode()
    text = out.decode()
    assert "tunnel up: http://app.localhost:" in text
    assert "200 <!doctype html>" in text and "Hello through the tunnel" in text
