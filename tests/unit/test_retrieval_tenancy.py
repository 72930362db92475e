"""Collection visibility rules (shared by MilvusStore and InMemoryStore)."""

from __future__ import annotations

import pytest

from cluster.errors import InvalidRequestError, NotFoundError, PermissionDeniedError
from retrieval.milvus import physical_name
from retrieval.tenancy import check_manage, check_model, own_collection, pick_collection
from retrieval.types import CollectionInfo, check_collection_name, check_tenant


def info(name, owner, public=False):
    return CollectionInfo(name, owner, public, f"p_{owner}_{name}", "m", 8)


ROWS = [info("docs", "alice"), info("docs", "bob"), info("faq", "carol", public=True), info("notes", "bob")]


def test_own_collection_wins():
    assert pick_collection(ROWS, "docs", "alice").owner == "alice"
    assert pick_collection(ROWS, "docs", "bob").owner == "bob"


def test_public_readable_not_writable():
    assert pick_collection(ROWS, "faq", "alice").owner == "carol"
    with pytest.raises(PermissionDeniedError, match="read-only") as exc:
        pick_collection(ROWS, "faq", "alice", write=True)
    assert exc.value.status == 403  # visible, so not a 404; refused
    assert pick_collection(ROWS, "faq", "carol", write=True).owner == "carol"


def test_other_tenants_private_collection_is_not_found():
    with pytest.raises(NotFoundError) as exc:
        pick_collection(ROWS, "notes", "alice")
    assert exc.value.status == 404 and "not found" in exc.value.message
    with pytest.raises(NotFoundError):
        pick_collection(ROWS, "missing", "alice")


def test_public_names_are_reserved():
    with pytest.raises(InvalidRequestError, match="read-only"):
        own_collection(ROWS, "faq", "alice", public=None)  # would shadow carol's public faq
    assert own_collection(ROWS, "notes", "alice", public=True) is None  # bob's is private: allowed
    with pytest.raises(InvalidRequestError):
        own_collection([*ROWS, info("faq", "dave")], "faq", "dave", public=True)  # cannot publish over it
    assert own_collection(ROWS, "faq", "carol", public=False).owner == "carol"


@pytest.mark.parametrize(("own", "public", "admin", "refused"), [
    (None, None, False, None),  # a new private collection
    (None, False, False, None),
    (info("docs", "alice"), None, False, None),  # writing one's own private collection
    (None, True, False, "creating or publishing"),  # a new public collection
    (info("docs", "alice"), True, False, "creating or publishing"),  # publishing one's own
    (info("faq", "carol", public=True), None, False, "only an admin"),  # writing one's own public one
    (info("faq", "carol", public=True), False, False, "only an admin"),  # unpublishing it
    (None, True, True, None),  # admins do all of it
    (info("faq", "carol", public=True), False, True, None),
])
def test_public_collections_are_managed_by_admins(own, public, admin, refused):
    if refused is None:
        check_manage(own, public=public, admin=admin)
        return
    with pytest.raises(PermissionDeniedError, match=refused) as exc:
        check_manage(own, public=public, admin=admin)
    assert exc.value.status == 403 and exc.value.type == "permission_error"


def test_model_mismatch():
    check_model(info("docs", "alice"), "m", 8)
    with pytest.raises(InvalidRequestError, match="dim 8"):
        check_model(info("docs", "alice"), "m2", 16)


def test_physical_names_are_valid_and_distinct():
    names = {physical_name("ragtune_", owner, name) for owner in ("a", "b") for name in ("x-y", "x_y", "x.y")}
    assert len(names) == 6
    assert all(n.replace("_", "").isalnum() and n.startswith("ragtune_x_y_") for n in names)


@pytest.mark.parametrize("name", ["", "-x", "a b", "a/b", 'a"b', "x" * 129])
def test_bad_collection_names(name):
    with pytest.raises(InvalidRequestError):
        check_collection_name(name)


@pytest.mark.parametrize("tenant", ["", 'a"b', "a b", "x" * 129, None])
def test_bad_tenants(tenant):
    with pytest.raises(InvalidRequestError):
        check_tenant(tenant)
