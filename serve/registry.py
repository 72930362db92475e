"""The adapter registry: PEFT LoRA folders addressed by ``name`` or ``name@version``.

Store layout (a local folder; other URI schemes are an extension point, see ``open_registry``)::

    <store>/<name>/adapter.json        owner tenant, promoted version, promotion history, lora ids
    <store>/<name>/v<N>/               the PEFT folder (adapter_config.json + weights)
    <store>/<name>/v<N>/ragtune-manifest.json   who/what/when: base model, metrics, dataset hash

Clients only ever send names; the registry maps a name to a folder it owns. Every version gets
a process-independent integer id (vLLM's ``lora_int_id``) so all replicas agree on it.

**Ownership.** An adapter is a tenant's (``owner``) or shared (``owner: null``). A tenant sees its
own and shared ones; only the owner or an admin may promote, roll back or load a tenant's adapter,
and shared adapters are managed by admins only: another tenant's adapter is a 404 (its name does
not leak), a shared one a 403 (:meth:`AdapterRegistry.managed`).

**Crash safety.** A registration commits at one atomic step, the index write; every file is
written as temp → fsync → ``os.replace`` → fsync of the folder (``_atomic_write``). The steps:
copy into ``<store>/.tmp-*`` (fsync'd), allocate a lora id, rename the copy to ``<name>/v<N>``,
write the index. A crash before the index write leaves at most a temp folder, a version folder
the index does not list, or a skipped lora id; recovery (run at open and before every
registration, under the store lock; ``ragtune adapters recover`` on demand) removes the first
two and keeps the id counter above every id in use, so the name stays usable and nothing
half-registered is ever resolved.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cluster.errors import ConfigError, InvalidRequestError, NotFoundError, PermissionDeniedError

__all__ = ["AdapterRef", "AdapterRegistry", "open_registry", "parse_model_name"]

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}\Z")
_INDEX = "adapter.json"
_IDS = ".lora_ids"
_TMP = ".tmp-"  # prefix of every temp file and folder (removed by recovery)
_VERSION_DIR = re.compile(r"^v([1-9][0-9]*)\Z")
MANIFEST = "ragtune-manifest.json"
# Module names vLLM cannot load as LoRA targets on a plain decoder (it would need embedding LoRA).
_EMBEDDING_MODULES = {"embed_tokens", "lm_head", "wte", "embed_in", "embed_out"}


@dataclass(frozen=True)
class AdapterRef:
    """One resolved adapter version: what the engine needs to load it."""

    name: str
    version: int
    path: str
    lora_id: int
    owner: str | None

    @property
    def key(self) -> str:
        """``name@version``: the multiplexing / cache key."""
        return f"{self.name}@{self.version}"


def parse_model_name(model: str) -> tuple[str, int | None]:
    """Split ``name@version`` (``name@3`` or ``name@v3``) into ``(name, version or None)``."""
    name, sep, version = model.partition("@")
    if not sep:
        return name, None
    digits = version[1:] if version.startswith("v") else version
    if not digits.isdigit():
        raise InvalidRequestError(
            f"model {model!r}: the version after '@' must be a number such as {name}@1", param="model"
        )
    return name, int(digits)


class AdapterRegistry:
    """Adapters of one base model in a local store folder. Safe for several processes and crashes."""

    def __init__(self, root: str | Path, *, base_model: str, base_model_path: str | None = None,
                 max_lora_rank: int = 16):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.base_model = base_model
        self.base_model_path = base_model_path
        self.max_lora_rank = max_lora_rank
        self.repaired: list[str] = []  # what opening repaired (``ragtune adapters recover`` prints it)
        with self._locked(wait=False) as held:
            if held:  # busy: a live process is mid-write (a dead one's lock is gone); it recovers itself
                self.repaired = self._recover()

    # ---- reading -------------------------------------------------------------------------
    def resolve(self, model: str, tenant: str | None = None) -> AdapterRef:
        """Resolve ``name`` (promoted version) or ``name@version`` for ``tenant``.

        ``tenant=None`` is the operator (open local mode or an admin key) and sees everything;
        a tenant sees its own adapters and shared ones. Anything else is "not found", so names
        of other tenants do not leak.
        """
        name, version = parse_model_name(model)
        index = self._read_index(name) if _NAME.match(name) else None
        if index is None or not _visible(index, tenant):
            raise _not_found(model)
        if version is None:
            version = index["promoted"]
        entry = index["versions"].get(str(version))
        if version is None or entry is None:
            raise _not_found(model)
        return AdapterRef(name, version, str(self._dir(name, version)), entry["lora_id"], index["owner"])

    def managed(self, model: str, tenant: str | None = None) -> AdapterRef:
        """:meth:`resolve` for a management act (promote, roll back, load into replicas).

        ``tenant=None`` (an admin) may manage every adapter; a tenant only its own.

        Raises:
            NotFoundError: Unknown, or another tenant's adapter (the name does not leak).
            PermissionDeniedError: A shared adapter and ``tenant`` is not an admin.
        """
        ref = self.resolve(model, tenant)
        if tenant is not None and ref.owner != tenant:  # visible but not its own: shared
            raise PermissionDeniedError(
                f"adapter {ref.name!r} is shared: only an admin may promote, roll back or load it",
                param="model", code="adapter_shared")
        return ref

    def list(self, tenant: str | None = None) -> list[dict]:
        """Every adapter ``tenant`` may see, with versions and the promoted one."""
        out = []
        for path in sorted(self.root.glob(f"*/{_INDEX}")):
            index = json.loads(path.read_text())
            if _visible(index, tenant):
                out.append({k: index[k] for k in ("name", "owner", "promoted", "versions", "history")})
        return out

    def manifest(self, ref: AdapterRef) -> dict:
        """The manifest written with a version (empty if the version has none)."""
        path = Path(ref.path) / MANIFEST
        return json.loads(path.read_text()) if path.exists() else {}

    # ---- writing -------------------------------------------------------------------------
    def register(self, src: str | Path, name: str, *, owner: str | None = None, promote: bool | None = None,
                 manifest: dict | None = None) -> AdapterRef:
        """Validate the PEFT folder ``src`` and copy it in as the next version of ``name``.

        The first version of a name is promoted automatically (``promote=None``); pass
        ``promote=True/False`` to decide explicitly. The version exists once the index lists it;
        a crash before that leaves nothing that resolves (see the module docstring).
        """
        if not _NAME.match(name) or name == self.base_model:
            raise InvalidRequestError(
                f"adapter name {name!r} must match {_NAME.pattern} and differ from the base model name",
                param="name",
            )
        config = self.validate(src)
        with self._locked():
            self._recover()
            index = self._read_index(name) or {
                "name": name, "owner": owner, "promoted": None, "versions": {}, "history": []
            }
            if index["owner"] != owner:
                raise InvalidRequestError(f"adapter {name!r} belongs to another owner", param="name")
            version = 1 + max((int(v) for v in index["versions"]), default=0)
            info = {"name": name, "version": version, "base_model": self.base_model, "rank": config["r"],
                    "created_at": time.time(), **(manifest or {})}
            try:
                staged = self._stage(src, info)
                lora_id = self._next_lora_id()
                self._commit_folder(staged, self._dir(name, version))
                index["versions"][str(version)] = {"lora_id": lora_id, "created_at": info["created_at"]}
                if promote or (promote is None and index["promoted"] is None):
                    _promote(index, version)
                self._write_index(name, index)  # the commit point
            except Exception:  # a failed step (disk full, …): undo it now, not at the next open
                self._recover()
                raise
        logger.info("adapter %s@%d registered (lora_id=%d, owner=%s)", name, version, lora_id, owner or "shared")
        return self.resolve(f"{name}@{version}")

    def promote(self, name: str, version: int, tenant: str | None = None) -> AdapterRef:
        """Make ``name@version`` what the bare ``name`` resolves to (owner or admin, see :meth:`managed`)."""
        self.managed(f"{name}@{version}", tenant)
        with self._locked():
            index = self._read_index(name)
            _promote(index, version)
            self._write_index(name, index)
        return self.resolve(name, tenant)

    def rollback(self, name: str, tenant: str | None = None) -> AdapterRef:
        """Return ``name`` to the version promoted before the current one (owner or admin)."""
        self.managed(name, tenant)
        with self._locked():
            index = self._read_index(name)
            if len(index["history"]) < 2:
                raise InvalidRequestError(f"adapter {name!r} has no earlier promoted version", param="name")
            index["history"].pop()
            index["promoted"] = index["history"][-1]
            self._write_index(name, index)
        return self.resolve(name, tenant)

    # ---- recovery ------------------------------------------------------------------------
    def recover(self) -> list[str]:
        """Undo half-finished registrations now (waits for the store lock); returns what was repaired."""
        with self._locked():
            return self._recover()

    def _recover(self) -> list[str]:
        """Undo half-finished registrations; returns what was removed (store-relative paths).

        Called with the store lock held (``__init__``, :meth:`register`). Removes temp files
        and folders, version folders the index does not list (a crash between the rename and the
        index write: the registration never committed, so its version number is reused), and
        name folders left with nothing; raises the lora id counter above every id in use.
        """
        removed: list[str] = []
        highest = 0
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(_TMP):
                removed.append(_remove(entry, self.root))
            elif entry.is_dir() and _NAME.match(entry.name):
                removed += self._recover_name(entry)
                index = self._read_index(entry.name)
                if index is not None:
                    highest = max([highest, *(v["lora_id"] for v in index["versions"].values())])
        if highest > self._read_lora_id():
            self._write_lora_id(highest)
            removed.append(f"{_IDS} raised to {highest}")
        if removed:
            logger.warning("adapter store %s: recovered from an interrupted write: %s", self.root, removed)
        return removed

    def _recover_name(self, folder: Path) -> list[str]:
        index = self._read_index(folder.name)
        listed = set(index["versions"]) if index else set()
        removed = []
        for entry in sorted(folder.iterdir()):
            match = _VERSION_DIR.match(entry.name)
            if entry.name.startswith(_TMP) or (match and match.group(1) not in listed):
                removed.append(_remove(entry, self.root))
        if index is None and not any(folder.iterdir()):
            folder.rmdir()
            _fsync_dir(self.root)
            removed.append(folder.name)
        return removed

    # ---- storage -------------------------------------------------------------------------
    def _dir(self, name: str, version: int) -> Path:
        return self.root / name / f"v{version}"

    def _read_index(self, name: str) -> dict | None:
        path = self.root / name / _INDEX
        return json.loads(path.read_text()) if path.exists() else None

    def _write_index(self, name: str, index: dict) -> None:
        _atomic_write(self.root / name / _INDEX, json.dumps(index, indent=2))

    def _stage(self, src: str | Path, info: dict) -> Path:
        """Copy ``src`` and its manifest into a temp folder of the store, durably (fsync'd)."""
        tmp = Path(tempfile.mkdtemp(prefix=_TMP, dir=self.root))
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        (tmp / MANIFEST).write_text(json.dumps(info, indent=2, default=str))
        _fsync_tree(tmp)
        return tmp

    def _commit_folder(self, staged: Path, dest: Path) -> None:
        """Rename the staged copy to its version folder (atomic) and make the rename durable."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        _fsync_dir(self.root)  # a new name folder's entry in the store
        os.rename(staged, dest)
        _fsync_dir(dest.parent)
        _fsync_dir(self.root)

    def _read_lora_id(self) -> int:
        counter = self.root / _IDS
        return int(counter.read_text()) if counter.exists() else 0

    def _write_lora_id(self, value: int) -> None:
        _atomic_write(self.root / _IDS, str(value))

    def _next_lora_id(self) -> int:
        value = self._read_lora_id() + 1
        self._write_lora_id(value)
        return value

    @contextmanager
    def _locked(self, wait: bool = True) -> Iterator[bool]:
        """The store's write lock (flock: released by the kernel if the holder dies)."""
        with open(self.root / ".lock", "w") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # ---- validation ----------------------------------------------------------------------
    def validate(self, src: str | Path) -> dict:
        """Check a PEFT folder is a LoRA vLLM can serve on this base model; return its config."""
        src = Path(src)
        cfg_path = src / "adapter_config.json"
        if not cfg_path.is_file():
            raise InvalidRequestError(f"{src}: not a PEFT adapter folder (no adapter_config.json)")
        config = json.loads(cfg_path.read_text())
        if config.get("peft_type") != "LORA":
            raise InvalidRequestError(f"{src}: peft_type is {config.get('peft_type')!r}, only LORA is served")
        if not 0 < int(config.get("r", 0)) <= self.max_lora_rank:
            raise InvalidRequestError(
                f"{src}: LoRA rank r={config.get('r')} exceeds the server's max_lora_rank={self.max_lora_rank}"
            )
        if config.get("modules_to_save"):
            raise InvalidRequestError(f"{src}: modules_to_save={config['modules_to_save']} cannot be served by vLLM")
        targets = config.get("target_modules") or []
        targets = [targets] if isinstance(targets, str) else targets
        if _EMBEDDING_MODULES & set(targets):
            raise InvalidRequestError(f"{src}: LoRA on embeddings/lm_head ({sorted(_EMBEDDING_MODULES & set(targets))}) is not served")
        self._check_base(src, config)
        return config

    def _check_base(self, src: Path, config: dict) -> None:
        base = str(config.get("base_model_name_or_path") or "")
        accepted = {self.base_model, Path(self.base_model).name}
        if self.base_model_path:
            accepted |= {self.base_model_path, Path(self.base_model_path).name}
        if base and base not in accepted and Path(base).name not in accepted:
            raise InvalidRequestError(
                f"{src}: adapter was trained on base model {base!r}, this server serves {self.base_model!r}"
            )
        if self.base_model_path and Path(self.base_model_path, "config.json").is_file():
            _check_shapes(src, json.loads(Path(self.base_model_path, "config.json").read_text()))


def _visible(index: dict, tenant: str | None) -> bool:
    return tenant is None or index["owner"] in (None, tenant)


def _not_found(model: str) -> NotFoundError:
    return NotFoundError(f"The model `{model}` does not exist.", param="model", code="model_not_found")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every folder bottom-up (their entries)."""
    for folder, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            with open(os.path.join(folder, name), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(folder))


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers and crashes see the old or the new file, whole.

    Hand-written (a few lines) rather than a dependency: temp file in the same folder, fsync,
    ``os.replace``, fsync of the folder so the rename itself survives a power cut.
    """
    fd, tmp = tempfile.mkstemp(prefix=_TMP, dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _remove(path: Path, root: Path) -> str:
    """Delete a leftover file or folder; rmtree is re-run by the next recovery if it is cut short."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
    _fsync_dir(path.parent)
    return str(path.relative_to(root))


def _promote(index: dict, version: int) -> None:
    index["promoted"] = version
    if not index["history"] or index["history"][-1] != version:
        index["history"].append(version)


def _check_shapes(src: Path, base_config: dict) -> None:
    """Every LoRA matrix must fit a projection of the base model (catches a wrong base early)."""
    from safetensors import safe_open

    weights = src / "adapter_model.safetensors"
    if not weights.is_file():
        raise InvalidRequestError(f"{src}: adapter_model.safetensors is missing")
    hidden = base_config["hidden_size"]
    heads = base_config["num_attention_heads"]
    head_dim = base_config.get("head_dim") or hidden // heads
    kv = base_config.get("num_key_value_heads", heads) * head_dim
    dims = {hidden, base_config.get("intermediate_size", hidden), heads * head_dim, kv}
    with safe_open(str(weights), framework="pt") as fh:
        for key in fh.keys():  # noqa: SIM118 (safe_open is not iterable)
            shape = fh.get_slice(key).get_shape()
            if "embedding" in key:
                raise InvalidRequestError(f"{src}: {key}: embedding LoRA weights are not served")
            outer = shape[1] if "lora_A" in key else shape[0]
            if outer not in dims:
                raise InvalidRequestError(
                    f"{src}: {key} has shape {shape}, which fits no projection of the base model"
                )


def open_registry(uri: str, **kwargs) -> AdapterRegistry:
    """Open the adapter store at ``uri``: a local path or ``file://`` URI.

    Object stores (``s3://``, ``gs://``) are the extension point: mount them (s3fs, gcsfuse, a
    shared volume in Kubernetes) and pass the mount path until a native store lands.
    """
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return AdapterRegistry(uri, **kwargs)
    if scheme == "file":
        return AdapterRegistry(rest, **kwargs)
    raise ConfigError(
        f"adapters.store_uri: scheme {scheme!r} is not supported yet; mount the bucket and give its path",
        param="adapters.store_uri",
    )


