"""Who may change what other tenants are served, over HTTP (the ingress on a fake replica).

Adapters: the owner or an admin manages a tenant's adapter; shared adapters are admin-only (403);
another tenant's adapter is a 404 exactly like a missing one. Collections: creating, publishing or
changing a public collection needs an admin key. Cache: every generation runs with its tenant's
``cache_salt``, whatever the client sends.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.unit.test_ingress import DOCS, _app, _chat, _completion, _error, _h, _retriever


@pytest.fixture
def app(tmp_path, tiny_model, adapter_dirs):
    retriever = _retriever()
    app = _app(tmp_path, tiny_model, adapter_dirs, retriever=retriever)
    app.retriever = retriever
    # alpha: shared (v1 promoted, v2 not); acme-bot: acme's (v1 promoted, v2 not).
    app.registry.register(adapter_dirs["gamma"], "alpha")
    app.registry.register(adapter_dirs["gamma"], "acme-bot", owner="acme")
    return app


def _acts(client, name, key):
    """The three management acts on ``name`` as ``key``: promote v2, roll back, load."""
    return [client.post(f"/v1/adapters/{name}/promote", json={"version": 2}, headers=_h(key)),
            client.post(f"/v1/adapters/{name}/rollback", headers=_h(key)),
            client.post(f"/v1/adapters/{name}/load", headers=_h(key))]


def _promoted(app, name):
    return app.registry.resolve(name).version


# ---- adapters ----------------------------------------------------------------------------------
def test_the_owner_manages_its_adapter(app):
    promote, rollback, load = _acts(app.client, "acme-bot", "acme-key")
    assert promote.json() == {"name": "acme-bot", "promoted": 2}
    assert rollback.json() == {"name": "acme-bot", "promoted": 1}
    assert load.json() == {"loaded": "acme-bot@1"} and app.replica.loaded[-1] == "acme-bot@1"
    r = app.client.post("/v1/adapters/acme-bot@2/load", headers=_h("acme-key"))  # a pinned version
    assert r.json() == {"loaded": "acme-bot@2"}


def test_another_tenants_adapter_is_a_404_like_a_missing_one(app):
    app.registry.register(app.registry.resolve("acme-bot@1").path, "ghost", owner="acme")
    for foreign, missing in zip(_acts(app.client, "acme-bot", "globex-key"), _acts(app.client, "nope", "globex-key"),
                                strict=True):
        err = _error(foreign, 404, "not_found_error", "model")
        # Same answer as for a name that does not exist: nothing tells globex that acme-bot is taken.
        assert err == {**_error(missing, 404), "message": err["message"]}
        assert err["message"].replace("acme-bot", "nope") == missing.json()["error"]["message"]
    assert _promoted(app, "acme-bot") == 1 and app.replica.loaded == []


def test_shared_adapters_are_managed_by_admins_only(app):
    for r in _acts(app.client, "alpha", "acme-key"):
        err = _error(r, 403, "permission_error", "model")
        assert err["code"] == "adapter_shared" and "only an admin" in err["message"]
    assert _promoted(app, "alpha") == 1 and app.replica.loaded == []
    # Using a shared adapter is not managing it.
    assert app.client.post("/v1/chat/completions", json=_chat("alpha"), headers=_h("acme-key")).status_code == 200
    promote, rollback, load = _acts(app.client, "alpha", "admin-key")
    assert promote.json()["promoted"] == 2 and rollback.json()["promoted"] == 1 and load.status_code == 200


def test_admins_manage_every_tenants_adapter(app):
    promote, rollback, load = _acts(app.client, "acme-bot", "admin-key")
    assert [promote.status_code, rollback.status_code, load.status_code] == [200, 200, 200]


def test_open_mode_is_the_operator(tmp_path, tiny_model, adapter_dirs):
    app = _app(tmp_path, tiny_model, adapter_dirs, keys=False)
    app.registry.register(adapter_dirs["gamma"], "acme-bot", owner="acme")
    r = app.client.post("/v1/adapters/acme-bot/promote", json={"version": 2})
    assert r.json() == {"name": "acme-bot", "promoted": 2}


# ---- collections -------------------------------------------------------------------------------
def _put(client, collection, key, **body):
    docs = [{"id": "d1", "text": "Rotate the keys every ninety days.", "source": "sec.md"}]
    return client.put(f"/v1/collections/{collection}/documents", json={"documents": docs, **body}, headers=_h(key))


def _retrieve(client, collection, key):
    return client.post("/v1/retrieve", json={"collection": collection, "query": "keys"}, headers=_h(key))


def test_creating_or_publishing_a_public_collection_is_admin_only(app):
    err = _error(_put(app.client, "acme-public", "acme-key", public=True), 403, "permission_error", "public")
    assert "admin" in err["message"]
    _error(_retrieve(app.client, "acme-public", "acme-key"), 404)  # nothing was created
    assert _put(app.client, "mine", "acme-key").status_code == 200  # private: fine
    _error(_put(app.client, "mine", "acme-key", public=True), 403, "permission_error")
    _error(_retrieve(app.client, "mine", "globex-key"), 404)  # still private
    assert _put(app.client, "handbook", "admin-key", public=True).status_code == 200
    assert _retrieve(app.client, "handbook", "globex-key").json()["data"][0]["document"] == "d1"


def test_public_collections_are_changed_by_admins_only(app):
    # "docs" is public, owned by the admin's tenant: other tenants read it, never write it.
    for key in ("acme-key", "globex-key"):
        assert _retrieve(app.client, "docs", key).status_code == 200
        _error(_put(app.client, "docs", key), 403, "permission_error", "collection")
        _error(app.client.delete("/v1/collections/docs/documents/tea", headers=_h(key)), 403, "permission_error")
        _error(app.client.put("/v1/collections/docs/documents/tea", json={"text": "x"}, headers=_h(key)), 403)
    assert app.client.delete("/v1/collections/docs/documents/tea", headers=_h("admin-key")).json() == {"deleted": 1}


def test_a_tenants_own_public_collection_needs_an_admin_to_change(app):
    # A public collection owned by acme (published by an operator): acme reads it but cannot change it.
    asyncio.run(app.retriever.upsert_documents("legacy", "acme", DOCS, public=True, admin=True))
    client = app.client
    for response in (_put(client, "legacy", "acme-key"), _put(client, "legacy", "acme-key", public=False),
                     client.delete("/v1/collections/legacy/documents/codename", headers=_h("acme-key")),
                     client.request("DELETE", "/v1/collections/legacy/documents", json={}, headers=_h("acme-key"))):
        err = _error(response, 403, "permission_error")
        assert "only an admin" in err["message"]
    assert len(_retrieve(client, "legacy", "globex-key").json()["data"]) == 3  # untouched, still public


# ---- cache isolation ---------------------------------------------------------------------------
def _salt(app, key, **extra):
    for path, body in (("/v1/chat/completions", _chat(**extra)), ("/v1/completions", _completion(**extra))):
        r = app.client.post(path, json=body, headers=_h(key))
        assert r.status_code == 200, r.text
    chat, completion = (req.cache_salt for req in app.replica.requests[-2:])
    assert chat == completion
    return chat


def test_every_request_runs_with_its_tenants_cache_salt(app):
    acme, globex = _salt(app, "acme-key"), _salt(app, "globex-key")
    assert acme and globex and acme != globex and acme == _salt(app, "acme-key")  # stable per tenant
    assert "acme" not in acme and len(acme) == 64  # an HMAC, not the tenant name
    # A client salt partitions its own tenant's cache further …
    mine = _salt(app, "acme-key", cache_salt="user-1")
    assert mine not in (acme, globex) and mine != _salt(app, "acme-key", cache_salt="user-2")
    # … but no client value yields another tenant's salt: not its salt itself, not the same client salt.
    assert _salt(app, "acme-key", cache_salt=globex) != globex
    assert _salt(app, "globex-key", cache_salt="user-1") != mine


def test_the_salt_is_not_derivable_from_the_tenant_name(tmp_path, tiny_model, adapter_dirs, app):
    import hashlib
    import hmac

    salt = _salt(app, "acme-key")
    for guess_key in (b"", b"acme", b"ragtune"):
        assert hmac.new(guess_key, b"acme", hashlib.sha256).hexdigest() != salt
    assert hashlib.sha256(b"acme").hexdigest() != salt
    # Replicas with the same keys agree (a tenant's cache is shared across ingress replicas) …
    other = _app(tmp_path / "other", tiny_model, adapter_dirs)
    assert _salt(other, "acme-key") == salt
