"""The models the benchmarks take: a name in configs/model/ (``120m``) or a path to a model YAML."""

from __future__ import annotations

import argparse
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"

MODEL_HELP = "a name in configs/model/ (tiny, 120m, 350m, ...) or a model YAML path"
"""The ``--model``/``--models`` help of every benchmark."""


def model_yaml(name: str) -> Path:
    """The YAML behind a benchmark's ``--model`` NAME: a ``.yaml``/``.yml`` path as given, else
    ``configs/model/NAME.yaml``. A name that is neither raises ``argparse.ArgumentTypeError``
    listing the names."""
    if name.endswith((".yaml", ".yml")):
        return Path(name)
    path = CONFIGS / f"{name}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.yaml")))
        raise argparse.ArgumentTypeError(f"{name!r}: no such model; give a name in configs/model/ ({names}) "
                                         "or a YAML path")
    return path


def model_name(name: str) -> str:
    """``name`` checked as :func:`model_yaml` checks it, and kept as given for tables and JSON: the
    argparse ``type=`` of ``--model`` (argparse prints the error's message)."""
    model_yaml(name)
    return name
