"""The model repository: REPO/<model>/<version>/ bundles, loaded, warmed up and swapped without downtime.

    repo = Repository(Path("models"), config)
    await repo.load_all()                    # at start: every model, the versions its policy names
    version = repo.acquire("animals")        # the latest loaded version (or acquire("animals", 2))
    try: ... await version.batcher.submit(x) ...
    finally: repo.release(version)
    await repo.load("animals")               # pick up new versions: verify, warm up, then switch
    await repo.load("animals", [1])          # roll back to version 1
    await repo.unload("animals")

A load verifies every file's hash and warms the model up in a worker thread while the current versions
keep serving; only then does the routing table switch, in one step on the event loop. A version that
leaves the table finishes the requests it holds before its model thread stops. A bundle that fails
(tampered, broken, wrong files) leaves the current versions serving and the load fails with the reason.
The layout is Triton's (REPO/<model>/config.pbtxt beside the version folders), so Triton or KServe can
serve the same folder. What explanations need (the fp32 model, the bundle's rules) is loaded once per version, on
its first explanation, from the files its manifest hashes, and goes with the version. Torch-free.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from tandem.bundle import MANIFEST, read_manifest
from tandem.errors import UserError
from tandem.serve.batching import After, Batcher
from tandem.serve.config import MODEL_NAME, BatchingConfig, ServeConfig, check_model_name
from tandem.serve.protocol import NotFound, ProtocolError, TensorSpec, Unavailable

def parse_version(text: str | int) -> int:
    try:
        version = int(text)
    except (TypeError, ValueError):
        raise ProtocolError(f"invalid version {text!r}: versions are positive whole numbers") from None
    if version < 1 or str(text).strip() != str(version):
        raise ProtocolError(f"invalid version {text!r}: versions are positive whole numbers")
    return version


@dataclass
class ModelVersion:
    """One loaded bundle: its predictor, its batcher, and the requests it is serving now."""

    name: str
    version: int
    path: Path
    manifest: dict
    manifest_digest: str
    predictor: object
    spec: TensorSpec
    batcher: Batcher
    in_flight: int = 0
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    close_timeout: float = 30.0  # on retire, how long batches still committing may take
    threads: int = 0  # ONNX Runtime threads for the fp32 model opened to explain (0: one per core)
    _explaining: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _fp32: object | None = field(default=None, repr=False)
    _rules: tuple | None = field(default=None, repr=False)

    @property
    def labels(self) -> list[str]:
        return self.predictor.labels

    def fp32_predictor(self) -> object:
        """The fp32 model, what explanations run on whatever precision serves (an int8 model's probabilities
        move in coarse steps, and occlusion measures small drops in them). Opened on first use, in the calling
        worker thread, from the very model.onnx this version's manifest hashes; then kept with the version."""
        if self.predictor.precision == "fp32":
            return self.predictor
        with self._explaining:
            if self._fp32 is None:
                self._fp32 = _open_fp32(self.name, self.version, self.path, self.manifest, self.threads)
            return self._fp32

    def rules(self) -> tuple[object | None, str | None]:
        """(the bundle's RuleSet, None), or (None, why there is none): loaded once, on first use, in the calling
        worker thread, every file checked against this version's manifest; then kept with the version."""
        with self._explaining:
            if self._rules is None:
                self._rules = _load_rules(self.name, self.version, self.path, self.manifest)
            return self._rules

    async def retire(self) -> None:
        """Out of the routing table already: wait for the requests it holds, then stop its thread."""
        if self.in_flight:
            await self.drained.wait()
        await self.batcher.close(self.close_timeout)
        self._fp32 = self._rules = None  # what explaining loaded goes with the version (no lock: not on the loop)


def _open_version(path: Path, threads: int, warm_sizes: tuple[int, ...],
                  precision: str = "auto") -> tuple[object, dict, str, TensorSpec]:
    """In a worker thread: verify the bundle, open its model (the precision the model's settings ask) in ONNX
    Runtime, run it once per batch size."""
    from tandem.runtime import Predictor

    predictor = Predictor.load(path, threads=threads or None, precision=precision)
    manifest = predictor.manifest
    try:
        spec = TensorSpec.from_manifest(manifest)
    except (KeyError, IndexError, TypeError, ValueError):
        raise UserError(f"{path}: manifest.json lacks its inputs/outputs; re-export the bundle") from None
    for n in warm_sizes:
        predictor.session.run(None, {spec.input_name: np.zeros((n, *spec.input_shape), np.float32)})
    digest = hashlib.sha256((path / MANIFEST).read_bytes()).hexdigest()
    return predictor, manifest, digest, spec


def _open_fp32(name: str, version: int, path: Path, manifest: dict, threads: int) -> object:
    """A version served in int8: its fp32 model, checked against the manifest the version was loaded with."""
    from tandem.runtime import Predictor

    try:
        predictor = Predictor.load(path, verify=False, threads=threads or None, precision="fp32")
    except UserError as err:
        raise Unavailable(f"model {name} version {version}: its fp32 model cannot be opened to explain ({err}); "
                          "reload the model") from None
    if predictor.manifest != manifest:  # the manifest holds model.onnx's hash: equal, it is this version's model
        raise Unavailable(f"model {name} version {version} changed on disk since it was loaded; reload it "
                          f"(POST /v2/repository/models/{name}/load) to explain with it")
    return predictor


def _load_rules(name: str, version: int, path: Path, manifest: dict) -> tuple[object | None, str | None]:
    from tandem.explain.rules import RULES_FILE, RuleSet

    try:
        rules = RuleSet.load(path, manifest)
    except UserError as err:
        return None, f"model {name} version {version}: its {RULES_FILE} cannot be used ({str(err).splitlines()[0]})"
    if rules is None:
        return None, (f"model {name} version {version} has no rules (its bundle lists no {RULES_FILE}); extract them "
                      f"with `tandem rules {path}` on the server's machine, then reload the model "
                      f"(POST /v2/repository/models/{name}/load, with the admin token where one is set)")
    return rules, None


class Repository:
    def __init__(self, root: Path, config: ServeConfig,
                 on_batch: Callable[[str, int, int, float], None] | None = None,
                 log: Callable[[str], None] = print,
                 after: Callable[[str, int, list[str]], After] | None = None) -> None:
        self.root = Path(root)
        self.config = config
        self._models: dict[str, dict[int, ModelVersion]] = {}
        self._errors: dict[str, str] = {}  # models with no version loaded: why
        self._failed: dict[str, dict[int, str]] = {}  # versions whose last load failed: why
        self._locks: dict[str, asyncio.Lock] = {}
        self._on_batch = on_batch
        self._after = after  # (name, version, labels) -> what runs after each batch of that version
        self._log = log
        self.started = False

    # -- what is on disk --------------------------------------------------------------------------------------
    def names_on_disk(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and MODEL_NAME.match(p.name)
                      and any(self._version_dirs(p.name)))

    def _version_dirs(self, name: str) -> list[int]:
        folder = self.root / name
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0
                      and p.name == str(int(p.name)))

    def wanted_versions(self, name: str, versions: list[int] | None = None) -> list[int]:
        on_disk = self._version_dirs(name)
        if not on_disk:
            raise NotFound(f"model {name!r} is not in the repository {self.root} (no {self.root / name}/<version>/ "
                           "bundle folders)")
        policy = versions if versions is not None else self.config.model(name).versions
        if policy == "latest":
            return on_disk[-1:]
        if policy == "all":
            return on_disk
        missing = sorted(set(policy) - set(on_disk))
        if missing:
            raise NotFound(f"model {name!r} has no version {', '.join(map(str, missing))} in the repository "
                           f"(versions on disk: {', '.join(map(str, on_disk))})")
        return sorted(set(policy))

    # -- loading ----------------------------------------------------------------------------------------------
    async def load_all(self) -> None:
        """At start: every model on disk. A version that fails is skipped for the next one that loads (with
        policy latest, the newest good version serves), so one bad export does not take a model down."""
        on_disk = self.names_on_disk()
        for name in sorted(set(self.config.models) - set(on_disk)):
            self._log(f"warning: the serve config sets up model {name!r}, which is not in {self.root}")
        for name in on_disk:
            try:
                await self.load(name, fallback=True)
            except UserError as err:
                self._log(f"error: model {name} not loaded: {err}")
        self.started = True

    async def load(self, name: str, versions: list[int] | None = None, fallback: bool = False) -> list[int]:
        """Load (or reload) a model's versions: all verified and warm before the switch. Returns the versions.

        fallback=False (a load asked for while serving): any failure refuses the whole load and the current
        versions go on serving. fallback=True (at start): failed versions are skipped, see load_all."""
        check_model_name(name)
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            try:
                return await self._load(name, versions, fallback)
            except UserError as err:
                if name not in self._models:
                    self._errors[name] = str(err)
                raise

    async def _open(self, name: str, version: int, current: dict[int, ModelVersion],
                    batching: BatchingConfig) -> ModelVersion:
        path = self.root / name / str(version)
        old = current.get(version)
        if old is not None and old.manifest_digest == _digest(path):
            return old  # unchanged: keep serving it as it is
        sizes = (1, batching.max_batch_size) if batching.enabled and batching.max_batch_size > 1 else (1,)
        try:
            predictor, manifest, digest, spec = await asyncio.to_thread(_open_version, path, self.config.threads, sizes,
                                                                     self.config.model(name).precision)
        except UserError as err:
            message = f"model {name} version {version} refused: {err}"
            self._failed.setdefault(name, {})[version] = message
            raise UserError(message) from None
        self._failed.get(name, {}).pop(version, None)
        return self._version(name, version, path, predictor, manifest, digest, spec, batching)

    async def _load(self, name: str, versions: list[int] | None, fallback: bool) -> list[int]:
        wanted = self.wanted_versions(name, versions)
        policy = versions if versions is not None else self.config.model(name).versions
        if fallback and policy == "latest":
            wanted = self.wanted_versions(name, "all")[::-1]  # newest first: the first that loads serves
        current = self._models.get(name, {})
        batching = self.config.batching_for(name)
        new: dict[int, ModelVersion] = {}
        skipped: list[str] = []
        try:
            for version in wanted:
                try:
                    new[version] = await self._open(name, version, current, batching)
                except UserError as err:
                    if not fallback:
                        raise
                    skipped.append(str(err))
                    continue
                if fallback and policy == "latest":
                    break
            if not new:
                raise UserError("; ".join(skipped) or f"model {name}: no version to load")
        except BaseException:
            for version, loaded in new.items():
                if current.get(version) is not loaded:
                    await loaded.batcher.close()
            raise
        for message in skipped:
            self._log(f"error: {message}; serving the others")
        self._models[name] = new  # the switch: one assignment on the event loop
        self._errors.pop(name, None)
        retired = [v for k, v in current.items() if new.get(k) is not v]
        for old in retired:
            await old.retire()
        policy = getattr(next(iter(new.values())).predictor, "threads", None)
        threads = f" on {policy.describe()}" if policy is not None else ""
        self._log(f"model {name}: serving version(s) {', '.join(map(str, sorted(new)))}{threads}")
        return sorted(new)

    def _version(self, name, version, path, predictor, manifest, digest, spec, batching) -> ModelVersion:
        def on_batch(size: int, seconds: float) -> None:
            if self._on_batch is not None:
                self._on_batch(name, version, size, seconds)

        def run(x: np.ndarray) -> np.ndarray:
            return predictor.session.run(None, {spec.input_name: x})[0]

        after = self._after(name, version, predictor.labels) if self._after is not None else None
        batcher = Batcher(run, batching, f"{name}/{version}", on_batch, after)
        return ModelVersion(name, version, path, manifest, digest, predictor, spec, batcher,
                            close_timeout=self.config.limits.request_timeout_s, threads=self.config.threads)

    async def unload(self, name: str) -> None:
        check_model_name(name)
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            current = self._models.pop(name, None)
            self._errors.pop(name, None)
            if current is None:
                raise NotFound(f"model {name!r} is not loaded")
            for version in current.values():
                await version.retire()
            self._log(f"model {name}: unloaded")

    async def close(self) -> None:
        for name in list(self._models):
            for version in self._models.pop(name).values():
                await version.retire()

    # -- serving ----------------------------------------------------------------------------------------------
    def versions(self, name: str) -> dict[int, ModelVersion]:
        check_model_name(name)
        loaded = self._models.get(name)
        if not loaded:
            if name in self._errors:
                raise Unavailable(f"model {name!r} is not available: {self._errors[name]}")
            raise NotFound(f"unknown model {name!r}; loaded models: {', '.join(sorted(self._models)) or 'none'}")
        return loaded

    def get(self, name: str, version: int | None = None) -> ModelVersion:
        loaded = self.versions(name)
        if version is None:
            return loaded[max(loaded)]
        if version not in loaded:
            raise NotFound(f"model {name!r} has no version {version} loaded (loaded: "
                           f"{', '.join(map(str, sorted(loaded)))})")
        return loaded[version]

    def acquire(self, name: str, version: int | None = None) -> ModelVersion:
        """The version to run, held until release(): an unload waits for it. No await in between: atomic."""
        found = self.get(name, version)
        found.in_flight += 1
        found.drained.clear()
        return found

    @staticmethod
    def hold(version: ModelVersion) -> None:
        """One more hold on a version already acquired (work that may outlive its request); release() each."""
        version.in_flight += 1
        version.drained.clear()

    @staticmethod
    def release(version: ModelVersion) -> None:
        version.in_flight -= 1
        if version.in_flight == 0:
            version.drained.set()

    def labels(self, name: str, version: int) -> list[str]:
        """A version's labels, loaded or not (feedback may come after an unload or a swap)."""
        loaded = self._models.get(name, {}).get(version)
        if loaded is not None:
            return loaded.labels
        try:
            return [str(label) for label in read_manifest(self.root / name / str(version), verify=False)["labels"]]
        except (UserError, KeyError, TypeError):
            raise Unavailable(f"model {name} version {version} is gone from the repository; its labels are "
                              "unknown") from None

    def loaded(self) -> dict[str, dict[int, ModelVersion]]:
        return dict(self._models)

    @property
    def ready(self) -> bool:
        return self.started and bool(self._models)

    def index(self) -> list[dict]:
        rows = []
        for name in sorted(set(self.names_on_disk()) | set(self._models)):
            loaded = self._models.get(name, {})
            for version in sorted(set(self._version_dirs(name)) | set(loaded)):
                row = {"name": name, "version": str(version), "state": "READY" if version in loaded else "UNAVAILABLE"}
                if version not in loaded:
                    row["reason"] = self._failed.get(name, {}).get(version, "not loaded (version policy, or unloaded)")
                rows.append(row)
        return rows


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256((path / MANIFEST).read_bytes()).hexdigest()
    except OSError:
        return None
