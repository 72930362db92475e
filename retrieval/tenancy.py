"""Who may see and write which collection — pure rules shared by every ChunkStore.

* A tenant reads its own collection of a name, else a public one of that name.
* A tenant writes only its own collections; public ones of other tenants are read-only (403).
* Another tenant's private collection is indistinguishable from a missing one (NotFoundError).
* A public name is reserved: nobody else can create (or publish) a collection with it.
* Public collections are an admin's: creating or publishing one, changing its documents or
  unpublishing it needs an admin key (:func:`check_manage`, applied by the HTTP-facing
  ``Retriever``; the store and ``ragtune ingest`` are the operator's and trust their caller).
"""

from __future__ import annotations

from collections.abc import Iterable

from cluster.errors import InvalidRequestError, NotFoundError, PermissionDeniedError
from retrieval.types import CollectionInfo

__all__ = ["check_manage", "check_model", "own_collection", "pick_collection"]


def _read_only(name: str) -> PermissionDeniedError:
    return PermissionDeniedError(
        f"collection {name!r} is a public collection of another tenant and is read-only", param="collection"
    )


def check_manage(own: CollectionInfo | None, *, public: bool | None, admin: bool) -> None:
    """Raise unless a caller may write its own collection ``own`` (None: about to be created).

    Args:
        own: The caller's own collection of that name, or None if it has none yet.
        public: The public flag the write asks for (None keeps the current one).
        admin: Whether the caller holds an admin key.

    Raises:
        PermissionDeniedError: A non-admin creates or publishes a public collection, or writes to
            (or unpublishes) one.
    """
    if admin:
        return
    if public:
        raise PermissionDeniedError("creating or publishing a public collection needs an admin key", param="public")
    if own is not None and own.public:
        raise PermissionDeniedError(
            f"collection {own.name!r} is public: only an admin may change its documents or its public flag",
            param="collection",
        )


def pick_collection(rows: Iterable[CollectionInfo], name: str, tenant: str, *, write: bool = False) -> CollectionInfo:
    """The collection ``name`` that ``tenant`` gets among registry ``rows`` of that name.

    Raises:
        NotFoundError: None visible (missing, or another tenant's private collection).
        PermissionDeniedError: ``write`` to another tenant's public collection.
    """
    rows = [r for r in rows if r.name == name and (r.owner == tenant or r.public)]
    own = next((r for r in rows if r.owner == tenant), None)
    if own is not None:
        return own
    if not rows:
        raise NotFoundError(f"collection {name!r} not found", param="collection")
    if write:
        raise _read_only(name)
    return rows[0]


def own_collection(
    rows: Iterable[CollectionInfo], name: str, tenant: str, *, public: bool | None
) -> CollectionInfo | None:
    """``tenant``'s own collection ``name`` among all registry ``rows`` of that name, or None.

    Raises:
        PermissionDeniedError: Another tenant has a public collection of this name, and ``tenant``
            would create a shadowing one or publish its own under the same name.
    """
    rows = [r for r in rows if r.name == name]
    own = next((r for r in rows if r.owner == tenant), None)
    if any(r.public and r.owner != tenant for r in rows) and (own is None or public):
        raise _read_only(name)
    return own


def check_model(info: CollectionInfo, model: str, dim: int) -> None:
    """Raise InvalidRequestError unless ``info`` was built with this embedding model and dimension."""
    if (info.model, info.dim) != (model, dim):
        raise InvalidRequestError(
            f"collection {info.name!r} was built with embedding model {info.model!r} (dim {info.dim}); this "
            f"server embeds with {model!r} (dim {dim}): re-create the collection or configure the same model",
            param="collection",
        )
