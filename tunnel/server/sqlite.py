"""The registry kept in a SQLite file (``--db PATH``): the only module with SQL.

``SQLiteStore`` is a ``store.RegistryStore`` over the stdlib ``sqlite3``
through ``twisted.enterprise.adbapi``: one connection in one worker thread,
so statements run in the order they were asked for and the reactor never
waits on the disk.  Open a store with ``SQLiteStore.open(path)``, which
creates the file (mode 0600: it holds tunnel keys and password hashes),
brings its schema up to date and fires with the store ready to use; an
unusable file fails that Deferred with a ``StoreError`` naming the path
(``open_now`` does the same at a program's start, raising the error at once).

The schema is versioned with ``PRAGMA user_version``: ``MIGRATIONS[n]``
takes a database from version n to n + 1, and all pending migrations run in
one transaction at open.  A database written by a newer version, or by
another application, is refused and left untouched.

Settings, and why (``_configure`` on the connection; WAL is set on the file
once ``_migrate`` accepted it, so a refused file is left byte for byte as it
was):

- ``journal_mode = WAL``: a reader (an operator's ``sqlite3`` shell, a
  backup) does not block the server's writes, nor the reverse.
- ``synchronous = FULL``: a change is on disk, surviving a power cut, when
  its Deferred fires, which is what ``RegistryStore`` promises; changes are
  rare (an operator's command), so the fsync per commit costs nothing that
  matters.  ``NORMAL`` would lose the last commits on power loss.
- ``foreign_keys = ON``: off by default in SQLite; on, so a later migration
  that adds references gets them enforced.
- ``busy_timeout = 5000`` (ms): another process holding the file's lock
  briefly (a backup) delays a write instead of failing it.
- ``secure_delete = ON``: a deleted host's key and password hash are
  overwritten, not left in free pages of the file.
"""

from __future__ import annotations

import enum
import json
import os
import sqlite3
from collections.abc import Callable, Mapping
from typing import Any

from twisted.enterprise.adbapi import ConnectionPool, Transaction
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorCore
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..koding.identifiers import TunnelKey
from .store import HostEntry, PortEntry, Snapshot, StoreClosed, StoreError

#: ``PRAGMA application_id`` of a tunnel registry ("tunl"): a SQLite file
#: carrying another id belongs to another application and is refused
APPLICATION_ID = int.from_bytes(b"tunl", "big")

#: milliseconds a statement waits for another process's lock
BUSY_TIMEOUT_MS = 5000

#: the schema, as steps: ``MIGRATIONS[n]`` takes version n to n + 1
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: hosts and TCP ports, each naming its tunnel by key (a SHA-256)
    (
        f"PRAGMA application_id = {APPLICATION_ID}",
        """CREATE TABLE hosts (
            host TEXT PRIMARY KEY NOT NULL,
            key BLOB NOT NULL CHECK (typeof(key) = 'blob' AND length(key) = 32),
            rules TEXT NOT NULL DEFAULT '{}'
        )""",
        """CREATE TABLE tcp_ports (
            port INTEGER PRIMARY KEY CHECK (port BETWEEN 1 AND 65535),
            key BLOB NOT NULL CHECK (typeof(key) = 'blob' AND length(key) = 32)
        )""",
    ),
)

#: the version this code writes
SCHEMA_VERSION = len(MIGRATIONS)


class _State(enum.Enum):
    OPEN = "open"
    #: close() was called; waiting for the operations already asked for
    CLOSING = "closing"
    CLOSED = "closed"


class SQLiteStore:
    """A ``RegistryStore`` in a SQLite file; make one with ``open()``.

    Every method returns a Deferred that fires once the change is committed
    (or fails, changing nothing).  ``load()`` lists hosts by name and ports by
    number; a row that cannot be read back (edited by hand: a key that is not
    32 bytes, rules that are not a JSON object, a port out of range) is left
    out of the snapshot with a warning naming it, so one bad row leaves that
    host unserved rather than the server unable to start, and a host whose
    rules cannot be read is never served without them.  The row stays in the
    file until a ``put_*`` replaces it or a ``delete_*`` removes it.
    """

    log = Logger()

    def __init__(self, path: str, pool: ConnectionPool) -> None:
        """Wrap ``pool``, already open on ``path`` at ``SCHEMA_VERSION``
        (what ``open()`` does; use that)."""
        self.path = path
        self._pool = pool
        self._state = _State.OPEN
        #: operations asked for and not yet answered
        self._pending = 0
        self._close_waiters: list[Deferred[None]] = []
        #: the connection ``open_now`` made, used until the reactor runs
        self._inline: sqlite3.Connection | None = None

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Deferred[SQLiteStore]:
        """Open (creating it if absent) the registry at ``path``; fires with
        the store once its schema is current, or fails with ``StoreError``."""
        return Deferred.fromCoroutine(cls._open(os.path.abspath(os.fspath(path))))

    @classmethod
    def open_now(
        cls,
        path: str | os.PathLike[str],
        *,
        owner: tuple[int, int] | None = None,
        reactor: IReactorCore | None = None,
    ) -> SQLiteStore:
        """``open()`` for a program's start, before its reactor runs.

        The file is created, checked and migrated now, in this thread
        (raising ``StoreError``), and the store's operations keep running
        here, on that connection, until the reactor runs; only then does the
        worker thread take over.  So a server loads and seeds its routes,
        and binds its ports, before twistd sheds privileges or its reactor
        starts: whatever fails stops it with the error and a non-zero exit
        (twistd cannot fail its start once the reactor runs).

        :param owner: (uid, gid) the file should belong to (twistd's
            ``--uid``/``--gid``: the server opens it again as that user).
        """
        path = os.path.abspath(os.fspath(path))  # twistd may change directory later
        if not _create_private(path):
            _warn_if_shared(cls.log, path)
        try:
            connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise _store_error(path, e) from e
        try:
            _configure(connection)
            _interact(connection, _migrate, path)
            _use_wal(connection.cursor())
            if owner is not None:
                for name in (path, path + "-wal", path + "-shm"):
                    if os.path.exists(name):
                        os.chown(name, *owner)
        except sqlite3.Error as e:
            connection.close()
            raise _store_error(path, e) from e
        except OSError as e:
            connection.close()
            raise StoreError(f"cannot give the registry {path} to its user: {e.strerror}") from e
        store = cls(path, _pool(path))
        store._inline = connection
        if reactor is None:
            from twisted.internet import reactor
        reactor.callWhenRunning(store._end_inline)
        return store

    def _end_inline(self) -> None:
        """The reactor runs: from now on the worker thread does the work."""
        connection, self._inline = self._inline, None
        if connection is not None:
            connection.close()

    @classmethod
    async def _open(cls, path: str) -> SQLiteStore:
        if not _create_private(path):
            _warn_if_shared(cls.log, path)
        pool = _pool(path)
        try:
            await pool.runInteraction(_migrate, path)
            await pool.runInteraction(_use_wal)
        except BaseException as e:
            pool.close()
            if isinstance(e, sqlite3.Error):
                raise _store_error(path, e) from e
            raise
        return cls(path, pool)

    def __repr__(self) -> str:
        return f"<SQLiteStore {self.path} {self._state.value}>"

    # RegistryStore

    def load(self) -> Deferred[Snapshot]:
        return self._run("load", _read_all).addCallback(self._snapshot)

    def put_host(self, entry: HostEntry) -> Deferred[bool]:
        try:
            rules = _rules_json(entry.rules)
        except (TypeError, ValueError) as e:
            return fail(StoreError(f"the rules of host {entry.host!r} are not JSON: {e}"))
        return self._run("put_host", _put_host, entry.host, entry.key.digest, rules)

    def delete_host(self, host: str) -> Deferred[bool]:
        return self._run("delete_host", _delete, "DELETE FROM hosts WHERE host = ?", host)

    def put_port(self, entry: PortEntry) -> Deferred[bool]:
        return self._run("put_port", _put_port, entry.port, entry.key.digest)

    def delete_port(self, port: int) -> Deferred[bool]:
        return self._run("delete_port", _delete, "DELETE FROM tcp_ports WHERE port = ?", port)

    def close(self) -> Deferred[None]:
        """Wait for the operations already asked for, then close the file;
        later calls of any other method fail with ``StoreClosed``."""
        if self._state is _State.CLOSED:
            return succeed(None)
        done: Deferred[None] = Deferred()
        self._close_waiters.append(done)
        if self._state is _State.OPEN:
            self._state = _State.CLOSING
            if not self._pending:
                self._drained()
        return done

    # the worker thread's answers

    def _run(self, what: str, interaction: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """Run ``interaction`` in the worker thread; the answer fires the
        returned Deferred before the operation stops counting as pending."""
        if self._state is not _State.OPEN:
            return fail(StoreClosed(f"{what}: the registry {self.path} is closed"))
        if self._inline is not None:
            try:
                return succeed(_interact(self._inline, interaction, *args))
            except sqlite3.Error:
                return fail(self._explain(Failure(), what))
        answer: Deferred[Any] = Deferred()
        self._pending += 1
        d = self._pool.runInteraction(interaction, *args)
        d.addErrback(self._explain, what)
        d.addBoth(self._answer, answer)
        return answer

    def _explain(self, failure: Failure, what: str) -> Failure:
        if failure.check(sqlite3.Error):
            error = StoreError(f"{what} failed on the registry {self.path}: {failure.value}")
            error.__cause__ = failure.value
            return Failure(error)
        return failure

    def _answer(self, result: Any, answer: Deferred[Any]) -> None:
        if not answer.called:  # not cancelled by the caller
            answer.callback(result)
        self._pending -= 1
        if self._state is _State.CLOSING and not self._pending:
            self._drained()

    def _drained(self) -> None:
        """Closing, nothing pending: fold the WAL into the file in the worker
        thread, so that closing the connection has no disk work left for the
        reactor's thread."""
        d = self._pool.runInteraction(_checkpoint)
        d.addErrback(self._checkpoint_failed)
        d.addCallback(lambda _: self._finish_close())

    def _checkpoint_failed(self, failure: Failure) -> None:
        # closing the connection checkpoints as well: worth a line, not an error
        self.log.warn(
            "registry {path}: checkpoint before closing failed: {error}",
            path=self.path,
            error=str(failure.value),
        )

    def _finish_close(self) -> None:
        self._end_inline()
        self._pool.close()  # joins the idle worker thread, closes the connection
        self._state = _State.CLOSED
        waiters, self._close_waiters = self._close_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _snapshot(self, rows: tuple[list[tuple], list[tuple]]) -> Snapshot:
        host_rows, port_rows = rows
        hosts = []
        for host, key, rules in host_rows:
            try:
                hosts.append(_host_entry(host, key, rules))
            except ValueError as e:
                self.log.warn(
                    "registry {path}: skipping host {host!r}: {reason}",
                    path=self.path,
                    host=host,
                    reason=str(e),
                )
        ports = []
        for port, key in port_rows:
            try:
                ports.append(_port_entry(port, key))
            except ValueError as e:
                self.log.warn(
                    "registry {path}: skipping TCP port {port!r}: {reason}",
                    path=self.path,
                    port=port,
                    reason=str(e),
                )
        return Snapshot(tuple(hosts), tuple(ports))


# In the reactor's thread: the file, and rows read back.


def _create_private(path: str) -> bool:
    """Create ``path`` empty with mode 0600 whatever the umask; False if it
    already exists (its mode is then the operator's)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return False
    except OSError as e:
        raise StoreError(f"cannot create the registry {path}: {e.strerror}") from e
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    return True


def _warn_if_shared(log: Logger, path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # sqlite3 says what is wrong with it
    if mode & 0o077:
        log.warn(
            "registry {path} is open to other users (mode {mode:04o}); it holds tunnel"
            " keys and password hashes: chmod 600 it",
            path=path,
            mode=mode & 0o7777,
        )


def _rules_json(rules: Mapping[str, Any]) -> str:
    if not isinstance(rules, Mapping):
        raise TypeError(f"a mapping is needed, not {type(rules).__name__}")
    return json.dumps(
        dict(rules), sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=False
    )


def _tunnel_key(key: object) -> TunnelKey:
    if not isinstance(key, bytes) or len(key) != 32:
        raise ValueError("its key is not a 32-byte digest")
    return TunnelKey(key)


def _host_entry(host: object, key: object, rules: object) -> HostEntry:
    if not isinstance(host, str):
        raise ValueError("its name is not text")
    tunnel = _tunnel_key(key)
    if not isinstance(rules, str):
        raise ValueError("its rules are not text")
    try:
        parsed = json.loads(rules)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"its rules are not JSON ({e})") from e
    if not isinstance(parsed, dict):
        raise ValueError("its rules are not a JSON object")
    return HostEntry(host, tunnel, parsed)


def _port_entry(port: object, key: object) -> PortEntry:
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError("it is not a port number")
    return PortEntry(port, _tunnel_key(key))


# In the worker thread: the connection and the statements.


def _pool(path: str) -> ConnectionPool:
    """The store's one connection, in one worker thread."""
    return ConnectionPool(
        "sqlite3",
        path,
        # adbapi closes the connection from the reactor's thread
        check_same_thread=False,
        # transactions are begun explicitly (BEGIN IMMEDIATE) where a
        # change takes more than one statement; adbapi commits them
        isolation_level=None,
        cp_min=1,
        cp_max=1,
        cp_openfun=_configure,
    )


def _interact(connection: sqlite3.Connection, interaction: Callable[..., Any], *args: Any) -> Any:
    """What adbapi's ``runInteraction`` does, on a connection of our own:
    the interaction, then commit, or roll back if it raised."""
    try:
        result = interaction(connection.cursor(), *args)
        connection.commit()
    except BaseException:
        connection.rollback()
        raise
    return result


def _store_error(path: str, e: sqlite3.Error) -> StoreError:
    if isinstance(e, sqlite3.DatabaseError) and "not a database" in str(e):
        return StoreError(f"{path} is not a SQLite database ({e})")
    return StoreError(f"cannot open the registry {path}: {e}")


def _configure(conn: sqlite3.Connection) -> None:
    """adbapi's ``cp_openfun``: the connection's settings (see the module
    docstring); none of them reads or writes the file."""
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA secure_delete = ON")


def _migrate(txn: Transaction, path: str) -> None:
    """Bring the schema to ``SCHEMA_VERSION`` in one transaction, or refuse."""
    txn.execute("BEGIN IMMEDIATE")
    txn.execute("PRAGMA user_version")
    (version,) = txn.fetchone()
    txn.execute("PRAGMA application_id")
    (application,) = txn.fetchone()
    if application not in (0, APPLICATION_ID):
        raise StoreError(
            f"{path} is another application's SQLite database"
            f" (application_id {application:#x}), not a tunnel registry"
        )
    if not 0 <= version <= SCHEMA_VERSION:
        raise StoreError(
            f"{path} has registry schema version {version}; this tunnel knows versions"
            f" up to {SCHEMA_VERSION} and never downgrades one: run the tunnel that"
            " wrote it, or restore a backup"
        )
    if version == 0:
        txn.execute("SELECT count(*) FROM sqlite_master")
        (tables,) = txn.fetchone()
        if tables:
            raise StoreError(
                f"{path} is a SQLite database with tables but no registry schema"
                " version; refusing to add the registry to it"
            )
    for statements in MIGRATIONS[version:]:
        for statement in statements:
            txn.execute(statement)
    if version != SCHEMA_VERSION:
        txn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _use_wal(txn: Transaction) -> None:
    """Switch the file to write-ahead logging (kept in the file; not possible
    inside a transaction, so after ``_migrate`` rather than in ``_configure``:
    a file that ``_migrate`` refuses is left as it was)."""
    txn.execute("PRAGMA journal_mode = WAL")


def _checkpoint(txn: Transaction) -> None:
    txn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def _read_all(txn: Transaction) -> tuple[list[tuple], list[tuple]]:
    txn.execute("BEGIN")  # one snapshot of both tables
    txn.execute("SELECT host, key, rules FROM hosts ORDER BY host")
    hosts = txn.fetchall()
    txn.execute("SELECT port, key FROM tcp_ports ORDER BY port")
    return hosts, txn.fetchall()


def _put_host(txn: Transaction, host: str, key: bytes, rules: str) -> bool:
    txn.execute("BEGIN IMMEDIATE")  # the write lock first: nobody else can insert it between
    txn.execute("SELECT 1 FROM hosts WHERE host = ?", (host,))
    created = txn.fetchone() is None
    txn.execute(
        "INSERT INTO hosts (host, key, rules) VALUES (?, ?, ?)"
        " ON CONFLICT (host) DO UPDATE SET key = excluded.key, rules = excluded.rules",
        (host, key, rules),
    )
    return created


def _put_port(txn: Transaction, port: int, key: bytes) -> bool:
    txn.execute("BEGIN IMMEDIATE")
    txn.execute("SELECT 1 FROM tcp_ports WHERE port = ?", (port,))
    created = txn.fetchone() is None
    txn.execute(
        "INSERT INTO tcp_ports (port, key) VALUES (?, ?)"
        " ON CONFLICT (port) DO UPDATE SET key = excluded.key",
        (port, key),
    )
    return created


def _delete(txn: Transaction, statement: str, value: object) -> bool:
    txn.execute(statement, (value,))  # one statement: its own transaction
    return txn.rowcount > 0
