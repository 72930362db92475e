"""Per-document writer locks held in Milvus itself, so every retriever replica obeys the same lock.

Milvus has no transactions and no compare-and-set: an upsert is last-writer-wins, a query reads
what is there. Mutual exclusion from plain reads and writes is what Lamport's bakery algorithm
gives (it needs no atomic read-modify-write), so that is what this is, with a lease:

1. *doorway*: upsert one row per document (``choosing = true``), read every row of those
   documents, take ``number = 1 + max(number)``, upsert the rows again with it (``choosing = false``);
2. *wait*: until no other live row of those documents is choosing, and none holds a smaller
   ``(number, writer)``;
3. *critical section*: the caller's writes; *exit*: delete the rows.

Every row carries a lease (``expires_ms``) and its writer's host and pid: a row past its lease,
or of a dead pid on this host, is ignored and deleted, so a killed writer blocks others for at
most ``lease_s`` (at once when it died on this host). All reads here are ``Strong``. A writer
that stays in its critical section past its lease could overlap the next one; critical sections
are a few store calls (the embedding happens before the lock is taken), far below the lease.

Why hand-written: neither pymilvus nor Milvus ships a lock, and the usual tools (etcd leases,
Redis SET NX) would add a service a local install does not have; the store already is shared.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from pymilvus import DataType, MilvusClient

from cluster.errors import OverloadedError
from retrieval.filters import eq, in_list
from retrieval.registry import create_collection

__all__ = ["DocumentLocks"]

logger = logging.getLogger(__name__)

_FIELDS = ["key", "collection", "lock", "writer", "number", "choosing", "expires_ms", "host", "pid"]
_HOST = socket.gethostname()[:255]


def _busy(wait_s: float) -> OverloadedError:
    """Another writer held a document for longer than the wait allows: a 503 the client may retry."""
    return OverloadedError(f"documents busy: another writer held them for over {wait_s:.0f}s",
                           retry_after=1, status=503)


@dataclass(frozen=True)
class _Row:
    key: str
    collection: str
    lock: str
    writer: str
    number: int
    choosing: bool
    expires_ms: int
    host: str
    pid: int

    def dead(self, now_ms: int) -> bool:
        return self.expires_ms < now_ms or (self.host == _HOST and not _pid_alive(self.pid))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class DocumentLocks:
    """Bakery locks over a small Milvus collection ``<prefix>doclocks`` (one row per writer and document)."""

    def __init__(self, client: MilvusClient, collection: str, *, lease_s: float = 30.0, wait_s: float = 60.0):
        """Args:
        client: The store's Milvus client.
        collection: Name of the lock collection (created on first use).
        lease_s: How long a held row stays valid without its writer.
        wait_s: How long :meth:`hold` waits before raising a 503 OverloadedError.
        """
        self._client, self.collection = client, collection
        self._lease_ms, self._wait_s = int(lease_s * 1000), wait_s
        self._ready = False
        self._ready_lock = threading.Lock()

    def _ensure(self) -> None:
        with self._ready_lock:
            if self._ready:
                return
            if not self._client.has_collection(self.collection):
                schema = self._client.create_schema(auto_id=False, enable_dynamic_field=False)
                schema.add_field("key", DataType.VARCHAR, is_primary=True, max_length=1024)
                schema.add_field("collection", DataType.VARCHAR, max_length=256)
                schema.add_field("lock", DataType.VARCHAR, max_length=768)
                schema.add_field("writer", DataType.VARCHAR, max_length=64)
                schema.add_field("number", DataType.INT64)
                schema.add_field("choosing", DataType.BOOL)
                schema.add_field("expires_ms", DataType.INT64)
                schema.add_field("host", DataType.VARCHAR, max_length=256)
                schema.add_field("pid", DataType.INT64)
                schema.add_field("_unused", DataType.FLOAT_VECTOR, dim=2)  # Milvus needs one vector field
                index = self._client.prepare_index_params()
                index.add_index("_unused", index_type="AUTOINDEX", metric_type="L2")
                create_collection(self._client, self.collection, schema, index, "Strong")
            self._client.load_collection(self.collection)
            self._ready = True

    @contextmanager
    def hold(self, physical: str, doc_ids: Sequence[str]) -> Iterator[None]:
        """Hold the write locks of ``doc_ids`` in collection ``physical`` for the ``with`` body.

        Raises:
            OverloadedError (503): Another writer kept one of them past ``wait_s``.
        """
        locks = sorted({f"{physical}/{doc}" for doc in doc_ids})
        if not locks:
            yield
            return
        self._ensure()
        writer = uuid.uuid4().hex
        keys = [f"{lock}/{writer}" for lock in locks]
        try:
            number = self._doorway(physical, locks, writer)
            self._wait(locks, writer, number)
            yield
        finally:
            self._client.delete(self.collection, ids=keys)

    def sweep(self, physical: str) -> None:
        """Delete the rows dead writers left on collection ``physical`` (a re-run that finds its
        documents already written takes no lock, so nobody else would)."""
        self._ensure()
        rows = self._client.query(self.collection, filter=eq("collection", physical), output_fields=_FIELDS,
                                  consistency_level="Strong")
        now_ms = int(time.time() * 1000)
        dead = [r["key"] for r in rows if _Row(**{f: r[f] for f in _FIELDS}).dead(now_ms)]
        if dead:
            self._client.delete(self.collection, ids=dead)

    def _write(self, physical: str, locks: list[str], writer: str, number: int, choosing: bool) -> None:
        expires = int(time.time() * 1000) + self._lease_ms
        self._client.upsert(self.collection, [
            {"key": f"{lock}/{writer}", "collection": physical, "lock": lock, "writer": writer, "number": number, "choosing": choosing,
             "expires_ms": expires, "host": _HOST, "pid": os.getpid(), "_unused": [0.0, 0.0]}
            for lock in locks
        ])

    def _rows(self, locks: list[str]) -> list[_Row]:
        rows = self._client.query(self.collection, filter=in_list("lock", locks), output_fields=_FIELDS,
                                  consistency_level="Strong")
        return [_Row(**{f: r[f] for f in _FIELDS}) for r in rows]

    def _doorway(self, physical: str, locks: list[str], writer: str) -> int:
        self._write(physical, locks, writer, 0, True)
        number = 1 + max((r.number for r in self._rows(locks)), default=0)
        self._write(physical, locks, writer, number, False)
        return number

    def _wait(self, locks: list[str], writer: str, number: int) -> None:
        deadline, pause = time.monotonic() + self._wait_s, 0.005
        while True:
            now_ms = int(time.time() * 1000)
            others = [r for r in self._rows(locks) if r.writer != writer]
            dead = [r.key for r in others if r.dead(now_ms)]
            if dead:  # a killed writer's rows: free its documents for everyone
                logger.warning("doc locks: removing %d rows of dead writers", len(dead))
                self._client.delete(self.collection, ids=dead)
            live = [r for r in others if not r.dead(now_ms)]
            if not any(r.choosing or (r.number, r.writer) < (number, writer) for r in live):  # bakery order
                return
            if time.monotonic() > deadline:
                raise _busy(self._wait_s)
            time.sleep(pause)
            pause = min(pause * 2, 0.2)
