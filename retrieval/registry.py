"""The registry collection: which tenant owns which knowledge base, and whether it is public.

One row per knowledge base (key ``owner/name``): logical name, owner, public flag, physical
Milvus collection, embedding model and dimension. Why a collection rather than collection
properties: names are per-tenant namespaces, so resolving (name, tenant) must find "the
tenant's own, else a public one" — one filtered query here, a scan of every collection's
properties otherwise — and listing a tenant's collections is one query too. Milvus requires a
vector field in every collection, so rows carry a 2-d dummy vector.

Lookups are cached per process for ``milvus.registry_cache_s`` seconds (a retrieve would
otherwise pay one extra round trip); writes through this process invalidate the cache at once,
other processes see a change within that time.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from pymilvus import DataType, MilvusClient
from pymilvus.exceptions import MilvusException

from retrieval.config import MilvusConfig
from retrieval.filters import eq
from retrieval.types import CollectionInfo

__all__ = ["CollectionRegistry", "create_collection"]

_FIELDS = ["name", "owner", "public", "physical", "model", "dim"]


def create_collection(client: MilvusClient, name: str, schema: Any, index: Any, consistency_level: str) -> None:
    """Create a collection with its indexes, tolerating another process creating it first."""
    try:
        client.create_collection(name, schema=schema, index_params=index, consistency_level=consistency_level)
    except MilvusException:
        if not client.has_collection(name):
            raise


class CollectionRegistry:
    """Reads and writes registry rows; ``visible`` is cached."""

    def __init__(self, client: MilvusClient, config: MilvusConfig):
        self._client, self._config = client, config
        self.collection = f"{config.collection_prefix}collections"
        self._ready = False
        self._cache: dict[tuple[str, str], tuple[float, list[CollectionInfo]]] = {}
        self._lock = threading.Lock()

    def _ensure(self) -> None:
        if self._ready:
            return
        if not self._client.has_collection(self.collection):
            schema = self._client.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("key", DataType.VARCHAR, is_primary=True, max_length=512)
            schema.add_field("name", DataType.VARCHAR, max_length=256)
            schema.add_field("owner", DataType.VARCHAR, max_length=256)
            schema.add_field("public", DataType.BOOL)
            schema.add_field("physical", DataType.VARCHAR, max_length=256)
            schema.add_field("model", DataType.VARCHAR, max_length=1024)
            schema.add_field("dim", DataType.INT64)
            schema.add_field("created_at", DataType.INT64)
            schema.add_field("_unused", DataType.FLOAT_VECTOR, dim=2)  # Milvus needs one vector field
            index = self._client.prepare_index_params()
            index.add_index("_unused", index_type="AUTOINDEX", metric_type="L2")
            create_collection(self._client, self.collection, schema, index, self._config.consistency_level)
        self._client.load_collection(self.collection)  # released after a restart until loaded
        self._ready = True

    def rows(self, expr: str) -> list[CollectionInfo]:
        """Registry rows matching a (trusted) Milvus expression, uncached."""
        self._ensure()
        rows = self._client.query(
            self.collection, filter=expr, output_fields=_FIELDS, consistency_level=self._config.consistency_level
        )
        return [
            CollectionInfo(r["name"], r["owner"], bool(r["public"]), r["physical"], r["model"], int(r["dim"]))
            for r in rows
        ]

    def visible(self, name: str, tenant: str) -> list[CollectionInfo]:
        """Rows of ``name`` that ``tenant`` may see: its own and public ones (cached)."""
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get((name, tenant))
        if hit and hit[0] > now:
            return hit[1]
        rows = self.rows(f"{eq('name', name)} and ({eq('owner', tenant)} or public == true)")
        if self._config.registry_cache_s > 0:
            with self._lock:
                self._cache[(name, tenant)] = (now + self._config.registry_cache_s, rows)
        return rows

    def put(self, info: CollectionInfo) -> None:
        """Insert or replace the row of ``info`` (flushed, cache invalidated)."""
        self._ensure()
        row = {
            "key": f"{info.owner}/{info.name}", "name": info.name, "owner": info.owner, "public": info.public,
            "physical": info.physical, "model": info.model, "dim": info.dim,
            "created_at": int(time.time()), "_unused": [0.0, 0.0],
        }
        self._client.upsert(self.collection, [row])
        self._client.flush(self.collection)
        self.invalidate(info.name)

    def remove(self, info: CollectionInfo) -> None:
        """Delete the row of ``info`` (flushed, cache invalidated)."""
        self._ensure()
        self._client.delete(self.collection, filter=eq("key", f"{info.owner}/{info.name}"))
        self._client.flush(self.collection)
        self.invalidate(info.name)

    def invalidate(self, name: str) -> None:
        """Forget cached lookups of ``name``."""
        with self._lock:
            for key in [k for k in self._cache if k[0] == name]:
                del self._cache[key]
