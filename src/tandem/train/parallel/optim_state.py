"""Optimizer state in the one-process format (what a checkpoint holds, whatever the strategy), whatever part of
the parameters this process's optimizer holds: gathered into it to save, cut back out of it to resume.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tandem.errors import UserError


def _local_names(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> list[list[str]]:
    """The full-model name of every parameter of each param group (state_dict() indexes them in this order)."""
    return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]


def state_by_name(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> tuple[list[list[str]], list[dict], dict]:
    """(names per group, group hyperparameters, {name: state}) of an optimizer."""
    sd = optimizer.state_dict()
    groups = _local_names(optimizer, names)
    flat = [n for g in groups for n in g]
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    return groups, hyper, {flat[i]: dict(st) for i, st in sd["state"].items()}


def full_format(groups: list[list[str]], hyper: list[dict], state: dict[str, dict], order: list[str]) -> dict:
    """{name: state} -> optimizer.state_dict() with the integer indices of `order` (make_optimizer's order)."""
    index = {name: i for i, name in enumerate(order)}
    param_groups = [{**h, "params": sorted(index[n] for n in names)} for h, names in zip(hyper, groups)]
    return {"state": {index[n]: st for n, st in sorted(state.items(), key=lambda kv: index[kv[0]])},
            "param_groups": param_groups}


def local_format(optimizer: torch.optim.Optimizer, names: dict[int, str], full: dict, order: list[str],
                  localize: Callable[[str, torch.Tensor], torch.Tensor]) -> dict:
    """The one-process optimizer.state_dict() -> a state_dict this process's optimizer loads (its own params)."""
    index = {name: i for i, name in enumerate(order)}
    groups = _local_names(optimizer, names)
    if len(full["param_groups"]) != len(groups):
        raise UserError(f"the checkpoint's optimizer has {len(full['param_groups'])} parameter groups, this run's "
                        f"{len(groups)}; resume with the optimizer the run was started with")
    state, param_groups, i = {}, [], 0
    for saved, names_g in zip(full["param_groups"], groups):
        ids = []
        for name in names_g:
            st = full["state"].get(index[name])
            if st is not None:
                state[i] = {k: localize(name, v) if isinstance(v, torch.Tensor) and v.ndim else v
                            for k, v in st.items()}
            ids.append(i)
            i += 1
        param_groups.append({**{k: v for k, v in saved.items() if k != "params"}, "params": ids})
    return {"state": state, "param_groups": param_groups}
