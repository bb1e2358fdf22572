"""Consolidation: turn what TTT-Discover found into SDFT examples.

A discovery run (``TTTDiscoverModule``) leaves ``result.json`` (with the problem's prompt as a
fresh model sees it) and ``archive.json`` (every kept state and its reward) in its output
directory. :func:`consolidate` makes SDFT JSONL lines from them, one per good state:

    {"prompt": <the problem's prompt>, "demonstration": <the state's text>,
     "problem": <environment name>, "reward": <its reward>, "run": <the run directory>}

A state qualifies if its reward is finite, at least ``min_reward`` and above the initial
state's (a state no better than the starting point teaches nothing); the ``top`` best of each
run are kept. ``llmkit sdft fit`` then trains on the file like on any other: what one problem
taught at test time becomes a skill the next model keeps. A damaged file (a key missing, or of
the wrong type) is refused in one line that names the file, the state and the key.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from llmkit.errors import LLMKitError
from llmkit.io import json_kind, read_json, unique_paths

_RUN_HINT = ("pass the output directory of an `llmkit ttt fit` run (its model.out_dir, or the run's log directory; "
             "a run writes result.json after its first step)")
_DAMAGED = "the file is damaged (not as `llmkit ttt fit` writes it): rerun the discovery or restore it"
_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", list: "an array"}


def _fields(data: Any, where: str, **kinds: type) -> tuple[Any, ...]:
    """The values of ``data``'s keys named in ``kinds``, in order, each checked to be of its type
    there (a boolean is no number; ``float`` takes integers, and NaN, which no state qualifies with);
    else :class:`LLMKitError` naming ``where`` (the file, and the state in it) and the key."""
    if not isinstance(data, dict):
        raise LLMKitError(f"{where} is {json_kind(data)}, not an object; {_DAMAGED}")
    for key, kind in kinds.items():
        if key not in data:
            raise LLMKitError(f"{where}: no {key!r} key; {_DAMAGED}")
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind):
            raise LLMKitError(f"{where}: {key!r} is {json_kind(value)}, not {_KIND_NAMES[kind]}; {_DAMAGED}")
    return tuple(data[key] for key in kinds)


def consolidate(run_dirs: list[str | Path], min_reward: float = -math.inf, top: int = 1) -> list[dict[str, Any]]:
    """SDFT examples from discovery runs (see the module docstring), best first within each run; a
    run given twice counts once."""
    if top < 1:
        raise LLMKitError(f"top (--top) must be >= 1, got {top}")
    if math.isnan(min_reward):
        raise LLMKitError("min_reward (--min-reward) must be a number, got nan")
    if not run_dirs:
        raise LLMKitError("no discovery runs given: pass the output directories of `llmkit ttt fit` runs")
    run_dirs = unique_paths(run_dirs)
    examples = []
    for run in run_dirs:
        result_path, archive_path = run / "result.json", run / "archive.json"
        result, archive = read_json(result_path, _RUN_HINT), read_json(archive_path, _RUN_HINT)
        prompt, problem, initial = _fields(result, str(result_path), prompt=str, problem=str, initial_reward=float)
        (states,) = _fields(archive, str(archive_path), states=list)
        found = [_fields(state, f"{archive_path}, states[{i}]", reward=float, id=int, text=str)
                 for i, state in enumerate(states[1:], start=1)]
        good = [s for s in found if math.isfinite(s[0]) and s[0] >= min_reward and s[0] > initial]
        for reward, _, text in sorted(good, key=lambda s: (-s[0], s[1]))[:top]:
            examples.append({"prompt": prompt, "demonstration": text, "problem": problem, "reward": reward,
                             "run": str(run)})
    if not examples:
        raise LLMKitError(
            f"no state in {len(run_dirs)} run(s) beats its initial state with reward >= {min_reward}: "
            "lower min_reward or run the discovery longer"
        )
    return examples
