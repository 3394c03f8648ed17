"""Load through the tunnel: many concurrent requests with bodies from 0 to
8 MiB, every body sha256-checked, nothing lost.

The default run makes 1,000 requests at concurrency 100 (about 0.5 GB each
way); ``TUNNEL_LOAD_REQUESTS=10000`` gives the full 10,000-request run
(``bench/load.sh`` does that).
"""

from __future__ import annotations

import hashlib
import math
import os
import random

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor
from twisted.web.client import Agent, HTTPConnectionPool

from .tunnel_env import BLOCK, TunnelEnv, pattern_digest

MiB = 1024 * 1024
REQUESTS = int(os.environ.get("TUNNEL_LOAD_REQUESTS", "1000"))
CONCURRENCY = 100


def sizes(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    # log-uniform over 0..8 MiB: every order of magnitude equally often
    out = [int(math.exp(rng.uniform(0, math.log(8 * MiB + 1)))) - 1 for _ in range(n)]
    out[:2] = [0, 8 * MiB]
    return out


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_load_mixed_uploads_and_downloads_all_checked():
    env = await TunnelEnv().start()
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = CONCURRENCY
    http = treq.client.HTTPClient(Agent(reactor, pool=pool))
    plan = sizes(REQUESTS, 42)
    results: list[tuple[int, str, str] | None] = [None] * len(plan)
    semaphore = defer.DeferredSemaphore(CONCURRENCY)
    headers = {"Host": env.HOST}

    async def one(i: int, n: int) -> None:
        if i % 2:
            body = (BLOCK * (n // len(BLOCK) + 1))[:n] if n > len(BLOCK) else BLOCK[:n]
            response = await http.post(env.url + "/upload", data=body, headers=headers)
            text = (await response.content()).decode()
            results[i] = (response.code, text, f"{n} {hashlib.sha256(body).hexdigest()}")
        else:
            response = await http.get(env.url + f"/bytes?n={n}", headers=headers)
            sha = hashlib.sha256()
            await treq.collect(response, sha.update)
            results[i] = (response.code, sha.hexdigest(), pattern_digest(n))

    try:
        await defer.gatherResults(
            [
                semaphore.run(lambda i=i, n=n: defer.ensureDeferred(one(i, n)))
                for i, n in enumerate(plan)
            ],
            consumeErrors=True,
        )
        failures = [
            (i, plan[i], r)
            for i, r in enumerate(results)
            if r is None or r[0] != 200 or r[1] != r[2]
        ]
        assert failures == []
        connection = env.server.connection(env.IDENT)
        assert connection.pending == 0
    finally:
        await pool.closeCachedConnections()
        await env.stop()
