"""Root conftest: puts the checkout on sys.path and checks reactor hygiene.

pytest-twisted does not notice tests that leave DelayedCalls, listening
ports or connections behind; every test here is checked for that.
"""

import pytest
import pytest_twisted
from twisted.internet import reactor, task

_SETTLE_TURNS = 200


def _reactor_state():
    calls = {c for c in reactor.getDelayedCalls() if c.active()}
    selectables = {
        s
        for s in set(reactor.getReaders()) | set(reactor.getWriters())
        if not type(s).__name__.endswith("Waker")  # the reactor's own
    }
    return calls, selectables


def _turn():
    return task.deferLater(reactor, 0, lambda: None)


@pytest.fixture(autouse=True)
def clean_reactor():
    """Fail a test that leaves DelayedCalls, ports or connections behind."""
    pytest_twisted.blockon(_turn())  # the reactor is running from here on
    before_calls, before_sel = _reactor_state()
    yield
    for _ in range(_SETTLE_TURNS):
        calls, sel = _reactor_state()
        if calls <= before_calls and sel <= before_sel:
            return
        pytest_twisted.blockon(_turn())
    calls, sel = _reactor_state()
    leaked_calls = calls - before_calls
    leaked_sel = sel - before_sel
    for c in leaked_calls:
        c.cancel()
    for s in leaked_sel:
        reactor.removeReader(s)
        reactor.removeWriter(s)
    assert not leaked_calls and not leaked_sel, (
        f"test left reactor state behind: delayed calls {leaked_calls!r},"
        f" selectables {leaked_sel!r}"
    )
