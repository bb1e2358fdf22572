"""What each callback needs from the LightningModule it is attached to, declared as protocols.

A callback names the protocol it relies on and calls :func:`require` in its ``setup``, so a
callback attached to a module that lacks a piece fails before training with one line naming
the callback, the module class and the missing attribute, not with an AttributeError in the
middle of a step. The llmkit modules satisfy them structurally (no inheritance needed); what a
module builds in ``configure_model`` (after ``setup``) it names in ``built_in_configure_model``:

================  =====================================  =====================================
protocol          attributes                             satisfied by
================  =====================================  =====================================
HasBackbone       ``model``: Transformer                 every llmkit module
HasTeacher        ``model``, ``teacher``: nn.Module      SDFTModule
HasEvaluation     ``evaluation``: EvalConfig             SFTModule, SDFTModule
HasTokenizer      ``tokenizer``: TokenizerLike           SFTModule, SDFTModule, TTTDiscoverModule
================  =====================================  =====================================
"""

from __future__ import annotations

import types
import typing
from typing import Any, Protocol, TypeVar

import lightning as L
from torch import nn

from llmkit.data.tokenizer import TokenizerLike
from llmkit.errors import LLMKitError
from llmkit.eval.report import EvalConfig
from llmkit.model.transformer import Transformer

T = TypeVar("T")


class HasBackbone(Protocol):
    """The module trains (or evaluates) ``model``, an llmkit Transformer."""

    model: Transformer


class HasTeacher(Protocol):
    """The module has a student ``model`` and a ``teacher`` with the same parameter names."""

    model: nn.Module
    teacher: nn.Module


class HasEvaluation(Protocol):
    """The module carries evaluation settings (held-out shards, probes)."""

    evaluation: EvalConfig


class HasTokenizer(Protocol):
    """The module carries the tokenizer its backbone was trained with."""

    tokenizer: TokenizerLike


def _runtime_type(hint: Any) -> type | tuple[type, ...]:
    return typing.get_args(hint) if isinstance(hint, types.UnionType) else hint


def _missing(pl_module: L.LightningModule, protocol: type) -> list[str]:
    """Each attribute of ``protocol`` that ``pl_module`` lacks or holds with another type, described.

    An attribute the module has not built yet but lists in ``built_in_configure_model`` (PretrainModule's
    ``model``) counts as present: the Trainer calls ``configure_model`` after every callback's
    ``setup`` and before any other hook that could use it."""
    problems = []
    pending = getattr(pl_module, "built_in_configure_model", ())
    for name, hint in typing.get_type_hints(protocol).items():
        value = getattr(pl_module, name, None)
        if value is None and name in pending:
            continue
        if not isinstance(value, _runtime_type(hint)):
            kind = hint.__name__ if isinstance(hint, type) else str(hint)
            found = "none" if value is None else type(value).__name__
            problems.append(f"`{name}` ({kind}; it has {found})")
    return problems


def batch_kind(batch: Any) -> str:
    """What a batch is, for an error saying a callback got the wrong kind: "list of Tensor"."""
    return type(batch).__name__ + (f" of {type(batch[0]).__name__}" if isinstance(batch, list) and batch else "")


def satisfies(pl_module: L.LightningModule, protocol: type[T]) -> bool:
    """Whether ``pl_module`` has every attribute of ``protocol`` with the declared type."""
    return not _missing(pl_module, protocol)


def require(callback: L.Callback, pl_module: L.LightningModule, protocol: type[T], why: str = "") -> T:
    """``pl_module``, checked to have every attribute of ``protocol`` with the declared type;
    else :class:`LLMKitError` naming the callback, the module class and what is missing
    (``why`` adds what the callback needs it for)."""
    problems = _missing(pl_module, protocol)
    if problems:
        reason = f" {why}" if why else ""
        raise LLMKitError(
            f"{type(callback).__name__} needs the LightningModule to have {' and '.join(problems)}{reason}; "
            f"{type(pl_module).__name__} does not ({protocol.__name__}: {protocol.__doc__.strip()})"
        )
    return pl_module  # type: ignore[return-value]
