"""Run folders: where a run writes, and what a resumed run may change.

    tandem train                          # a new folder runs/<date>-<time>; runs/latest links to it
    tandem train out_dir=exp/a            # exactly there; refused if exp/a holds another run ...
    tandem train out_dir=exp/a overwrite=true    # ... unless you ask to clear it
    tandem train --resume runs/latest progress=false   # only the keys in SAFE_ON_RESUME may change

A run folder never mixes two runs: a second run into the same folder used to prune its own
checkpoints, keep the first run's, and ship the first run's model.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from pathlib import Path

from tandem.config import TrainConfig, config_from_dict, load_config, with_overrides
from tandem.errors import UserError

RUNS_ROOT = Path("runs")
LATEST = "latest"
# What a resumed run may change without changing its data, its split, its model or its schedule.
SAFE_ON_RESUME = ("progress", "checkpoint_every", "keep_checkpoints", "device", "compile", "data.workers", "data.stream",
                  "parallel.timeout", "threads.count", "threads.wait")
# Everything a run writes in its folder (and the bundle folder its last log line suggests).
RUN_FILES = {"config.yaml", "checkpoints", "metrics.jsonl", "results.json", "curves.png", "confusion.png", "bundle"}


def is_run_folder(path: Path) -> bool:
    """A folder tandem may clear: it has a run's config.yaml and nothing but what a run writes
    (temporary files start with '.'). A folder with anything else in it is the user's."""
    names = {p.name for p in path.iterdir() if not p.name.startswith(".")}
    return "config.yaml" in names and names <= RUN_FILES


def foreign_files(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if not p.name.startswith(".") and p.name not in RUN_FILES)


def link_latest(run_dir: Path) -> None:
    """Point <runs>/latest at a run that has started in a folder called runs/ (a relative link, replaced
    atomically), so that runs/latest always names the newest run there."""
    if run_dir.parent.name != RUNS_ROOT.name or run_dir.name == LATEST:
        return
    link = run_dir.parent / LATEST
    tmp = run_dir.parent / f".{LATEST}.tmp-{os.getpid()}"
    try:
        if tmp.is_symlink():
            tmp.unlink()
        tmp.symlink_to(run_dir.name, target_is_directory=True)
        os.replace(tmp, link)
    except OSError:  # a file system without links: the dated folder is still there
        tmp.unlink(missing_ok=True)


def new_run_dir(cfg: TrainConfig) -> tuple[TrainConfig, bool]:
    """Decide the folder of a new run and make it; returns the config with out_dir (and data paths)
    resolved, and whether the folder was made here (a run that fails to start removes it again).

    Empty out_dir: a fresh dated folder under runs/. A named folder must be empty or absent; one that
    holds another run is cleared only with overwrite=true; any other non-empty folder is refused."""
    cfg = _absolute_paths(cfg)
    if not cfg.out_dir:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir, n = RUNS_ROOT / stamp, 1
        while True:  # mkdir without exist_ok reserves the name, even against a run started the same second
            try:
                run_dir.mkdir(parents=True)
                break
            except FileExistsError:
                n += 1
                run_dir = RUNS_ROOT / f"{stamp}-{n}"
        return cfg.model_copy(update={"out_dir": str(run_dir)}), True
    run_dir = Path(cfg.out_dir)
    if run_dir.is_symlink():
        run_dir = run_dir.resolve()  # runs/latest names the run it points at
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"out_dir {cfg.out_dir} is a file; give a folder")
    existed = run_dir.is_dir()
    if existed and any(run_dir.iterdir()):
        if not is_run_folder(run_dir):
            extra = foreign_files(run_dir)
            raise UserError(f"out_dir {cfg.out_dir} is not empty and is not a tandem run "
                            f"({', '.join(extra[:3]) or 'no config.yaml'}{' ...' if len(extra) > 3 else ''}); "
                            "tandem never clears such a folder: choose another out_dir")
        if not cfg.overwrite:
            raise UserError(f"out_dir {cfg.out_dir} holds another run; resume it with `tandem train --resume "
                            f"{cfg.out_dir}`, pass overwrite=true to clear it, or leave out_dir unset for a new folder")
        shutil.rmtree(run_dir)
        existed = False
    run_dir.mkdir(parents=True, exist_ok=True)
    return cfg.model_copy(update={"out_dir": str(run_dir)}), not existed


def _absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """data.source and init_from as absolute paths, so resume and export work from any folder."""
    data = cfg.data
    if data.source != "animals" and Path(data.source).expanduser().exists():
        data = data.model_copy(update={"source": str(Path(data.source).expanduser().resolve())})
    init = str(Path(cfg.init_from).expanduser().resolve()) if cfg.init_from else ""
    return cfg.model_copy(update={"data": data, "init_from": init})


JOB_FILE = ".torchelastic-job"  # in a run folder: the torchrun job that started the run (hidden: not a run file)


def mark_job(run_dir: Path) -> None:
    """Under torchrun, note which job started this run, so that a restart of that job (--max-restarts) continues
    it, and a restart never continues some other run the folder held."""
    job = os.environ.get("TORCHELASTIC_RUN_ID")
    if job:
        (Path(run_dir) / JOB_FILE).write_text(job)


def started_by_this_job(run_dir: str | Path) -> bool:
    job = os.environ.get("TORCHELASTIC_RUN_ID")
    try:
        return bool(job) and (Path(run_dir) / JOB_FILE).read_text() == job and (Path(run_dir) / "config.yaml").is_file()
    except OSError:
        return False


def remove_if_empty(run_dir: Path) -> None:
    """A run that failed before writing anything leaves no empty folder behind."""
    try:
        run_dir.rmdir()
    except OSError:
        pass


def _newest_state(run_dir: Path) -> dict | None:
    """state.json of the newest checkpoint that has one (just the JSON: the tensors are verified on resume)."""
    from tandem.train.checkpoint import list_checkpoints

    for folder in reversed(list_checkpoints(run_dir)):
        try:
            return json.loads((folder / "state.json").read_text())
        except (OSError, ValueError):
            continue
    return None


def _changes(before: dict, after: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    out = []
    for key in after:
        a, b = before.get(key), after[key]
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changes(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append((f"{prefix}{key}", a, b))
    return out


def resume_config(run: str | Path, overrides: list[str]) -> TrainConfig:
    """The config of the run to resume, with the overrides that are safe to change; refuses the rest.

    The checkpoint's config is the truth (config.yaml may have been edited since); before the first
    checkpoint, config.yaml is."""
    run_dir = Path(run)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"--resume {run}: no config.yaml there; give the out_dir of an earlier `tandem train`")
    run_dir = run_dir.resolve()
    state = _newest_state(run_dir)
    saved = config_from_dict(state["config"]) if state else load_config(run_dir / "config.yaml")
    wanted = with_overrides(saved, overrides)
    refused = [(k, a, b) for k, a, b in _changes(saved.model_dump(), wanted.model_dump()) if k not in SAFE_ON_RESUME]
    if refused:
        listed = ", ".join(f"{k} ({a!r} -> {b!r})" for k, a, b in refused)
        raise UserError(f"--resume cannot change {listed}: its data, split, model, optimizer, schedule, augmentation "
                        f"or length would change mid-run; start a new run instead. A resume may change only {', '.join(SAFE_ON_RESUME)}")
    return wanted.model_copy(update={"out_dir": str(run_dir)})
