"""``llmkit {pretrain,sdft,sft,ttt} {fit,validate}``: LightningCLI over each LightningModule.

YAML configs, ``--print_config``, dotted overrides and ``--ckpt_path`` work as Lightning users
expect, with these additions:

- **Links, not reach-throughs.** Where a data module needs a value the model owns, it is linked
  explicitly (``LightningCLI.link_arguments``), applied once the model is built: the pretraining
  shards are checked against ``model.vocab_size`` and windowed within ``model.max_seq_len``.
- **A predictable ``--ckpt_path``.** LightningCLI restores the module's hyperparameters from the
  checkpoint and silently drops what the user set. Here every checkpoint is integrity-checked
  first (a missing, truncated or damaged file is one line), then, key by key: what the user did
  not set comes from the checkpoint, the data module's settings included; what they set applies
  (evaluation, sampling, optimisation, how to run); and what they set that contradicts a
  hyperparameter the weights depend on (the command's ``fixed_by_checkpoint``: the architecture,
  LoRA's shape, the discovery problem) is an error naming both values. Fine-tuning runs rebuild
  the model from the checkpoint itself, so ``model.init_ckpt`` is not needed to validate or
  resume them. A ``validate`` or a resumed ``fit`` logs into the checkpoint's run.
  docs/checkpoints.md.
- **Config errors in one line**, naming the key or the YAML file and what is wrong
  (:func:`readable_parse_error`, :func:`check_config_files`); Lightning's own refusals of a
  trainer setting too. Only ``fit`` and ``validate`` are offered.
- **Safe writes, a short console.** The Trainer gets
  :class:`~llmkit.callbacks.checkpoint.AtomicCheckpointIO`,
  :class:`~llmkit.callbacks.console.RunSummary` and
  :class:`~llmkit.callbacks.run_dir.DiscardUnstartedRun`; Lightning's tips and known-harmless
  warnings are filtered (:func:`~llmkit.callbacks.console.quiet_known_noise`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import inspect
import itertools
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import Namespace
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Checkpoint as LightningCheckpoint
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from llmkit.callbacks.checkpoint import AtomicCheckpointIO, Checkpoint
from llmkit.callbacks.console import RunSummary, quiet_known_noise, use_step_progress_bar
from llmkit.callbacks.run_dir import DiscardUnstartedRun
from llmkit.cli.commands import LIGHTNING_COMMANDS, LightningCommand
from llmkit.errors import LLMKitError
from llmkit.io import check_yaml_keys, yaml_error_summary
from llmkit.model.checkpoint import LOGGED_STEP_KEY, WRITER_KEY, is_sharded_checkpoint, load_checkpoint_file

VALIDATE_CONFIG = "validate_config.yaml"
"""What ``validate`` saves its config as, beside (never over) the ``config.yaml`` of the run it validates."""


def _import(target: str | None) -> type | None:
    if target is None:
        return None
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; tuples become lists (as YAML and checkpoints store them)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = list(value) if isinstance(value, tuple) else value
    return flat


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`flatten`."""
    nested: dict[str, Any] = {}
    for name, value in flat.items():
        *parents, key = name.split(".")
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
        node[key] = value
    return nested


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def resolve_checkpoint_hparams(
    command: LightningCommand, hparams: dict[str, Any], given: dict[str, Any], ckpt_path: str
) -> dict[str, Any]:
    """The module arguments for a run from ``ckpt_path``: its ``hparams``, overridden by what the
    user ``given`` (config files and flags, nothing defaulted), refusing an override of a
    hyperparameter the checkpoint's weights depend on (see the module docstring). A null given for
    one of those keeps the checkpoint's value: a run's saved config.yaml writes null where the
    model config derives the value (``n_kv_heads``, ``head_dim``), which the checkpoint holds."""
    resolved, asked = flatten(hparams), flatten(given)
    for name, value in asked.items():
        fixed = _within(name, command.fixed_by_checkpoint) and not _within(name, command.free)
        if fixed and value is None and resolved.get(name) is not None:
            continue  # null: left to the config to derive (n_kv_heads, head_dim), as a run's config.yaml says it
        if name in resolved and resolved[name] != value and fixed:
            raise LLMKitError(
                f"model.{name}: the checkpoint {ckpt_path} was trained with {resolved[name]!r} but the config asks "
                f"for {value!r}; drop that setting or pass --model.{name} {resolved[name]!r} (the checkpoint decides "
                f"it), or pass a matching checkpoint"
            )
        resolved[name] = value
    if command.rebuild_from_checkpoint:
        resolved["init_ckpt"] = str(ckpt_path)
    return unflatten(resolved)


def logger_version(run_name: str) -> int | str:
    """TensorBoardLogger's ``version`` for the run directory ``run_name``: N for ``version_N``
    (Lightning's progress bar shows a version given as a string by its last 4 characters: "on_0"),
    else the name."""
    number = re.fullmatch(r"version_(\d+)", run_name)
    return int(number[1]) if number else run_name


def readable_parse_error(message: str, known: Sequence[str] = ()) -> str:
    """jsonargparse's ``message`` for a key typed ``SomeConfig | None`` (or a list of callbacks) lists
    what every member of the Union said (including that the value is not None) in about ten lines;
    the one line a user needs: the key and what is wrong with it (an unknown option with the nearest
    known one, a value of the wrong type, a path that is not there, a class_path naming no class).
    Under a key whose value is a class the user chose by ``class_path`` (a callback), the class is
    named too: ``trainer.callbacks: MHCMonitor: unknown option ...``. An option the command does not
    have, on the command line or in a config file, gets the nearest of the ``known`` ones."""
    key = re.match(r'Parser key "([^"]+)":', message)
    if key is None:
        unknown = re.search(r"does not accept option '([\w.]+)'$|^unrecognized arguments: --([\w.]+)", message.strip())
        if unknown is None:
            return message.strip()
        flag = "--" if unknown.group(2) else ""  # on the command line, a flag; in a config file, a key
        return message.strip() + _nearest_option(unknown.group(1) or unknown.group(2), known, flag)
    if absent := re.search(r"Problem with given class_path '([^']+)':\s+(?:No module named '([^']+)'|"
                           r"module '([^']+)' has no attribute '([^']+)')", message):
        return f"{key.group(1)}: " + _absent_class(*absent.groups())
    if short := re.search(r"- Expected a dot import path string: (\S+)", message):
        return f"{key.group(1)}: no class {short.group(1)}" + _nearest_subclass(short.group(1), message)
    missing = re.search(r"Expected a path but (.+?) either not accessible or invalid", message)
    if missing:
        return (f"{key.group(1)}: no file {missing.group(1)} (a relative path in a config file is relative to "
                f"that file's directory)")
    if "Union subtypes" not in message:
        return f"{key.group(1)}: {' '.join(message[key.end():].split())}"
    problem = re.search(r"^( *)- Problem with given class_path '([^']+)':\n((?:\1  .*(?:\n|$))*)", message, re.M)
    if problem is None:  # an Optional option of a plain type: --data.seq_len abc
        return f"{key.group(1)}: {_union_reason(message)}"
    name, reason = key.group(1), problem.group(3)
    module, _, cls_name = problem.group(2).rpartition(".")
    cls = getattr(importlib.import_module(module), cls_name)  # jsonargparse imported it
    if not dataclasses.is_dataclass(cls):
        name = f"{name}: {cls_name}"
    if inner := re.match(r'\s*Parser key "([^"]+)":(.*)', reason, re.S):
        name, reason = f"{name}.{inner.group(1)}", inner.group(2)
    if "Union subtypes" in reason:
        return f"{name}: {_union_reason(reason)}"
    reason = " ".join(reason.split())
    if unknown := re.fullmatch(r"Option '([^']+)' is not accepted", reason):
        reason = f"unknown option {unknown.group(1)!r}{_nearest(unknown.group(1), cls)}"
    return f"{name}: {reason}"


def _union_reason(message: str) -> str:
    """What jsonargparse's message about an Optional option of a plain type says, in a few words: the
    types it takes and the value given ("expected int (or null), got abc")."""
    classes = re.findall(r"- Expected a <class '([^']+)'>", message)
    expected = [t for t in classes if t != "NoneType"]
    expected += [", ".join(re.findall(r"'([^']*)'", choices))  # a Literal's values
                 for choices in re.findall(r"- Expected a typing\.Literal\[(.*)\]", message)]
    given = re.search(r"Given value: (.*)", message)
    if not expected or given is None:  # another kind of Union: its text, on one line
        return " ".join(message.split())
    return f"expected {' or '.join(expected)}{' (or null)' if 'NoneType' in classes else ''}, got {given.group(1)}"


def _absent_class(class_path: str, missing_module: str | None, module: str | None, attribute: str | None) -> str:
    """Why ``class_path`` names no class: its module is missing, or the module lacks the name (and
    which of the module's classes is closest); or, when the failure is inside a module it imports,
    that importing it failed."""
    if missing_module is not None:
        if not f"{class_path}.".startswith(f"{missing_module}."):
            return f"importing {class_path} failed: no module named {missing_module!r}"
        return f"no class {class_path}: there is no module {missing_module!r}"
    if not f"{class_path}.".startswith(f"{module}.{attribute}."):
        return f"importing {class_path} failed: module {module!r} has no attribute {attribute!r}"
    imported = importlib.import_module(module)
    classes = [n for n in dir(imported) if not n.startswith("_") and inspect.isclass(getattr(imported, n))]
    close = difflib.get_close_matches(attribute, classes, n=1)
    return f"no class {class_path}: " + (f"did you mean {module}.{close[0]}?" if close else
                                         f"module {module} has no {attribute!r}")


def _nearest_subclass(name: str, message: str) -> str:
    """": did you mean llmkit.callbacks.MHCMonitor?" for the imported subclass of the key's class
    (the first class in the message's Subtypes) whose name is closest to ``name``, else how to
    name a class."""
    base = re.search(r"Subtypes: \[.*?<class '([\w.]+)'>", message)
    module, _, cls_name = base.group(1).rpartition(".") if base else ("", "", "")
    found, seen = [], [getattr(importlib.import_module(module), cls_name)] if module else []
    while seen:
        for sub in seen.pop().__subclasses__():
            found.append(sub)
            seen.append(sub)
    by_name = {c.__name__: c for c in reversed(found)}
    close = difflib.get_close_matches(name, list(by_name), n=1)
    return f": did you mean {_import_path(by_name[close[0]])}?" if close else \
        ": give its import path (package.module.Class)"


def _import_path(cls: type) -> str:
    """The shortest import path of ``cls`` among its loaded packages: ``llmkit.callbacks.MHCMonitor``,
    not the defining module's ``llmkit.callbacks.mhc_monitor.MHCMonitor``."""
    parts = cls.__module__.split(".")
    for i in range(1, len(parts) + 1):
        package = sys.modules.get(".".join(parts[:i]))
        if package is not None and getattr(package, cls.__name__, None) is cls:
            return f"{package.__name__}.{cls.__name__}"
    return f"{cls.__module__}.{cls.__name__}"


def _nearest(option: str, cls: type) -> str:
    """" (did you mean 'n_layers'?)" for the closest field of the dataclass ``cls`` (or argument of
    the class's ``__init__``), else the known ones."""
    if dataclasses.is_dataclass(cls):
        names = [f.name for f in dataclasses.fields(cls)]
    else:
        names = [p.name for p in list(inspect.signature(cls.__init__).parameters.values())[1:]
                 if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    close = difflib.get_close_matches(option, names, n=1)
    return f" (did you mean {close[0]!r}?)" if close else (f"; known: {', '.join(names)}" if names else "")


def _nearest_option(option: str, known: Sequence[str], flag: str) -> str:
    """" (did you mean 'trainer.max_steps'?)" for the closest of the ``known`` options in the section
    of ``option`` (its first component), written after ``flag`` ("--" or ""), or ""."""
    section = option.split(".")[0] if "." in option else ""  # "" : the options without a section (seed_everything)
    names = [k for k in known if (k.split(".")[0] if "." in k else "") == section and not k.endswith((".help", "+"))]
    close = difflib.get_close_matches(option, names, n=1)
    return f" (did you mean '{flag}{close[0]}'?)" if close else ""


def _option_names(parser: argparse.ArgumentParser) -> list[str]:
    """The dotted names of every ``--`` option of ``parser`` and of its subcommands' parsers."""
    names = []
    for action in parser._actions:
        names += [s.removeprefix("--") for s in action.option_strings if s.startswith("--")]
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                names += _option_names(subparser)
    return list(dict.fromkeys(names))


def check_config_files(args: list[str]) -> None:
    """Raise :class:`LLMKitError` naming a config file that is not valid YAML, and where
    (jsonargparse names only "<unicode string>", whichever of several files it was), that is not a
    mapping (jsonargparse: "Unexpected config:" and the text), or that gives a key twice in one
    mapping (:func:`~llmkit.io.check_yaml_keys`), or, a ``--config`` one, whose ``trainer``, ``model``
    or ``data`` section is empty (``model:`` with its settings commented out; jsonargparse failed on
    the None with a traceback). The files: every ``--config`` one, a ``.yaml``/``.yml`` file given
    to any other option (``--model.config FILE.yaml``), and, for its syntax only, one a config file
    names (``model.config: ../model/tiny.yaml``, relative to that file; jsonargparse called a broken
    one "not accessible"; it may hold any YAML, a list of callbacks say)."""
    configs = [value for flag, value in itertools.pairwise(args) if flag == "--config"]
    configs += [arg.removeprefix("--config=") for arg in args if arg.startswith("--config=")]
    values = [arg.partition("=")[2] if arg.startswith("--") else arg for arg in args]
    given = configs + [value for value in values if Path(value).suffix in (".yaml", ".yml") and value not in configs]
    named: set[str] = set()  # by a config file: its syntax alone is checked
    for value in given:
        if not Path(value).is_file():  # a YAML string given inline, or a missing file: jsonargparse says
            continue
        try:
            loaded = yaml.safe_load(Path(value).read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise LLMKitError(f"{value}: not valid YAML {yaml_error_summary(e)}") from None
        if value in named:
            continue
        if not isinstance(loaded, dict):
            what = "empty" if loaded is None else f"a YAML {type(loaded).__name__}"
            raise LLMKitError(f"{value} is {what}, not a mapping of settings: write one 'key: value' per line "
                              "(configs/ holds examples)")
        empty = [key for key in ("trainer", "model", "data") if key in loaded and loaded[key] is None]
        if value in configs and empty:
            raise LLMKitError(f"{value}: the section '{empty[0]}' is empty; give its settings under it, or remove "
                              "the key")
        check_yaml_keys(value)
        for path in _yaml_files_named(loaded, Path(value).parent) if value in configs else ():
            if path not in given:
                given.append(path)
                named.add(path)


def _yaml_files_named(node: Any, directory: Path) -> Iterator[str]:
    """The ``.yaml``/``.yml`` paths among the values of a loaded config ``node``, relative ones taken
    from ``directory`` (the config file's, as jsonargparse takes them)."""
    if isinstance(node, dict | list):
        for child in node.values() if isinstance(node, dict) else node:
            yield from _yaml_files_named(child, directory)
    elif isinstance(node, str) and Path(node).suffix in (".yaml", ".yml"):
        yield str(directory / node)


class LLMKitArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, whose errors are the message alone (:func:`readable_parse_error`):
    jsonargparse prints the usage of every option first (dozens of lines before the one that
    names the bad key). Options are not abbreviated: argparse took ``--model.config.moe.n_expert``
    for ``n_experts``, silently."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> None:
        if not self.exit_on_error:
            super().error(message, ex)
        prog = self.prog.replace(" [options]", "")
        readable = readable_parse_error(message, _option_names(self))
        sys.stderr.write(f"{prog}: error: {readable}\n({prog} --help lists the options)\n")
        self.exit(2)


class LLMKitCLI(LightningCLI):
    """LightningCLI with the command's links, the ``--ckpt_path`` policy and atomic checkpoint
    writes (see the module docstring)."""

    def __init__(self, command: LightningCommand, **kwargs: Any) -> None:
        self.command = command
        self.ckpt_step: int | None = None  # the step the logs number ``--ckpt_path``'s checkpoint with
        self.ckpt_run: Path | None = None  # its run, SAVE_DIR/NAME/version_N, when it lies in version_N/checkpoints
        super().__init__(_import(command.module), _import(command.datamodule), **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for source, target in self.command.links:
            parser.link_arguments(source, target, apply_on="instantiate")
        parser.add_argument(
            "--float32_matmul_precision", choices=["highest", "high", "medium"], default=None,
            help="torch.set_float32_matmul_precision for the run (what Lightning advises on GPUs with tensor "
                 "cores): 'high' or 'medium' let fp32 matmuls use TF32, under bf16-mixed the mHC projection's "
                 "backward dots among them (docs/performance.md); default: leave torch's ('highest')")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        try:
            check_config_files(list(args))
        except LLMKitError as e:
            parser.error(str(e))  # as every other config error: the message alone, exit 2
        super().parse_arguments(parser, args)
        self.given = parser.parse_args(args, defaults=False)  # what the user set: config files and flags

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path:
            return
        ckpt = load_checkpoint_file(ckpt_path, weights=False)  # the hyperparameters; Lightning loads the weights
        if "pytorch-lightning_version" not in ckpt:  # in every file Lightning writes, a sharded folder's meta.pt too
            raise LLMKitError(
                f"{ckpt_path} is not a Lightning training checkpoint (it has no pytorch-lightning_version): "
                f"--ckpt_path takes a .ckpt written by `llmkit NAME fit`; to start from other weights, use "
                f"model.init_ckpt"
            )
        if subcommand == "fit" and "optimizer_states" not in ckpt and not is_sharded_checkpoint(ckpt_path):
            raise LLMKitError(  # a merged LoRA's, or Lightning's save_weights_only: Lightning failed with a KeyError
                f"{ckpt_path} holds weights only (no optimizer state), so a fit cannot resume from it: start a new "
                f"run from its weights with --model.init_ckpt {ckpt_path}"
            )
        self.ckpt_step = ckpt.get(LOGGED_STEP_KEY, ckpt.get("global_step"))  # TTT best_of_n: discovery steps
        self.ckpt_run = Path(ckpt_path).resolve().parent.parent
        expected = self.command.module.split(":")[1]
        if ckpt.get(WRITER_KEY, expected) != expected:
            writer = next((n for n, c in LIGHTNING_COMMANDS.items() if c.module.endswith(f":{ckpt[WRITER_KEY]}")), "?")
            offered = LIGHTNING_COMMANDS[writer].subcommands if writer in LIGHTNING_COMMANDS else (subcommand,)
            raise LLMKitError(
                f"{ckpt_path} was written by {ckpt[WRITER_KEY]}, not {expected}: use it with `llmkit {writer} "
                f"{subcommand if subcommand in offered else offered[0]}` (or as model.init_ckpt to fine-tune from it)"
            )
        run_config = self.ckpt_run / "config.yaml"  # LightningCLI's copy, in a run
        if subcommand == "fit" and not self.given[subcommand].get("config") and run_config.is_file():
            rank_zero_warn(f"resuming without --config: the trainer runs with Lightning's defaults (seed, callbacks, "
                           f"gradient clipping, validation), not the run's; add --config {run_config} to continue "
                           f"it as it ran")
        max_steps = self.config[subcommand].trainer.get("max_steps")
        if subcommand == "fit" and max_steps is not None and self.ckpt_step is not None and \
                0 <= max_steps <= self.ckpt_step:
            pending = [state.get("validation_pending") for state in (ckpt.get("callbacks") or {}).values()
                       if isinstance(state, dict)]
            then = (f"; it runs the validation of step {self.ckpt_step} that an interrupt cut short, and stops"
                    if self.ckpt_step in pending else "")
            rank_zero_warn(f"{ckpt_path} is at step {self.ckpt_step} and trainer.max_steps is {max_steps}: "
                           f"this fit has nothing to train{then}; raise trainer.max_steps to continue the run")
        restored = {}
        hparams = dict(ckpt.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if hparams:
            given = self.given[subcommand].get("model") or Namespace()
            restored["model"] = resolve_checkpoint_hparams(self.command, hparams, given.as_dict(), ckpt_path)
        if data := self._checkpoint_data_args(ckpt.get("datamodule_hyper_parameters") or {}, subcommand):
            restored["data"] = data
        if restored:
            self.config = self.parser.parse_object({subcommand: restored}, self.config)

    def _checkpoint_data_args(self, hparams: dict[str, Any], subcommand: str) -> dict[str, Any]:
        """The data module's arguments the run of the checkpoint used and the user did not set now
        (windows, batch size, seed, files): a ``validate`` then scores the windows the run scored, and
        a resumed ``fit`` continues on its data. The linked ones come from the model."""
        known = self.config[subcommand].get("data")
        if known is None:
            return {}
        linked = {target.removeprefix("data.") for _, target in self.command.links}
        given = flatten((self.given[subcommand].get("data") or Namespace()).as_dict())
        return unflatten({name: value for name, value in flatten(hparams).items()
                          if name.split(".")[0] in known and name.split(".")[0] not in linked
                          and not _within(name, tuple(given))})

    def before_instantiate_classes(self) -> None:
        """Applies ``float32_matmul_precision``. ``validate`` and a resumed ``fit`` of a checkpoint
        inside a TensorBoard run (``SAVE_DIR/NAME/version_N/checkpoints/X.ckpt``) log into that
        run, not into a new version: with the config's TensorBoardLogger when it logs to
        ``SAVE_DIR/NAME``, and with Lightning's default logger (none configured, no
        ``trainer.default_root_dir``). A validation's metrics land at the checkpoint's step (the
        modules log it as ``step``). A resume that trains hides what the run logged after the
        checkpoint's step S (TensorBoard's ``purge_step``: those steps are trained again; a
        validation of the checkpoint, logged at S, stays) and saves its config as
        ``resume_step_S_config.yaml`` (S: the checkpoint's step) beside the run's ``config.yaml``."""
        subcommand = self.config.get("subcommand")
        if (precision := self.config[subcommand].get("float32_matmul_precision")) is not None:
            torch.set_float32_matmul_precision(precision)
        run = self.ckpt_run
        if run is None:  # no --ckpt_path
            return
        logger = self._log_into_run(subcommand, run)
        if logger is not None and subcommand == "fit" and self.ckpt_step is not None:
            max_steps = self.config[subcommand].trainer.get("max_steps")
            if max_steps is None or max_steps < 0 or max_steps > self.ckpt_step:  # it trains: steps past S again
                logger.init_args.purge_step = self.ckpt_step + 1
            self.save_config_kwargs = {**self.save_config_kwargs,
                                       "config_filename": f"resume_step_{self.ckpt_step}_config.yaml"}
            checkpoints = re.escape(str(Path(run.parent.name, run.name, "checkpoints")))  # the run it continues
            warnings.filterwarnings("ignore", message=f"Checkpoint directory .*{checkpoints} exists and is not empty")

    def _log_into_run(self, subcommand: str, run: Path) -> Namespace | None:
        """Point the run's logger at the TensorBoard run ``run`` (see :meth:`before_instantiate_classes`)
        and return its config, or None where it logs elsewhere."""
        trainer = self.config[subcommand].trainer
        logger = trainer.get("logger")
        in_a_run = any(run.glob("events.out.tfevents.*"))
        if logger in (None, True) and trainer.get("default_root_dir") is None and in_a_run:
            default = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {
                "save_dir": str(run.parent.parent), "name": run.parent.name, "version": logger_version(run.name),
                "default_hp_metric": False}}
            self.config = self.parser.parse_object({subcommand: {"trainer": {"logger": default}}}, self.config)
            return self.config[subcommand].trainer.logger
        if not isinstance(logger, Namespace) or not str(logger.get("class_path", "")).endswith("TensorBoardLogger"):
            return None
        args = logger.init_args
        logged_runs = (Path(args.save_dir) / args.get("name", "lightning_logs")).resolve()
        if args.get("version") not in (None, run.name, logger_version(run.name)) or run.parent != logged_runs:
            return None
        args.version = logger_version(run.name)
        return logger

    def after_fit(self) -> None:
        """Run the validation that an interrupt cut short after the run's last step, which a resume
        with no step left to train skips (:meth:`Checkpoint.run_pending_validation`)."""
        for callback in self.trainer.callbacks:
            if isinstance(callback, Checkpoint) and callback.run_pending_validation(self.trainer, self.model,
                                                                                   self.datamodule):
                return

    def subcommands(self) -> dict[str, set[str]]:
        """The command's (fit and validate; ttt: fit): the modules define no test or predict step."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in self.command.subcommands}

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        plugins = self._get(self.config_init, "trainer", default={}).get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        trainer_config = self._get(self.config_init, "trainer", default={})
        callbacks = trainer_config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        own_summary = any(isinstance(c, ModelSummary) for c in callbacks)
        if trainer_config.get("enable_checkpointing") is not False and not trainer_config.get("barebones") and \
                not any(isinstance(c, LightningCheckpoint) for c in callbacks):
            # in place of Lightning's default ModelCheckpoint (a resume without --config has no other):
            # the same files, plus last.ckpt at the final step and on Ctrl-C or SIGTERM
            kwargs["callbacks"] = [*callbacks, Checkpoint()]
        trainer = super().instantiate_trainer(**kwargs)  # (Lightning adds its callbacks to that list)
        if not own_summary:
            # Lightning's own table: a row per metric and a FLOPs column of zeros (llmkit gives it no
            # example input); RunSummary's "model:" line says what it would
            trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, ModelSummary)]
        trainer.callbacks += [RunSummary(), DiscardUnstartedRun(trainer.log_dir if trainer.loggers else None)]
        use_step_progress_bar(trainer)
        return trainer


def _trainer_hint(message: str) -> str:
    """What to do about Lightning's refusal of a trainer setting, ``message``."""
    if "manual optimization" in message:
        return ("this module optimises by hand: set model.gradient_clip_val (and, for sft and sdft, "
                "model.accumulate_grad_batches) instead")
    if "gpu backend" in message or "accelerator is not available" in message:
        return ("this machine lacks that accelerator; the *_gpu and *_fsdp configs ask for a CUDA GPU: on a CPU "
                "take a *_cpu config, or run a *_gpu config with --trainer.accelerator cpu")
    return "check the trainer settings: accelerator, devices, strategy, precision"


def run(name: str, args: list[str]) -> None:
    """``llmkit NAME ...``: LightningCLI over the command's module and data module."""
    quiet_known_noise()
    with warnings.catch_warnings():  # args= is intended: `llmkit` owns sys.argv
        warnings.filterwarnings("ignore", message=".*args parameter is intended")
        try:
            LLMKitCLI(
                LIGHTNING_COMMANDS[name],
                args=args,
                save_config_kwargs={"overwrite": True, "config_filename": VALIDATE_CONFIG if "validate" in args[:1]
                                    else "config.yaml"},
                parser_kwargs={"prog": f"llmkit {name}"},
                parser_class=LLMKitArgumentParser,
                auto_configure_optimizers=False,
                seed_everything_default=0,  # Lightning's default, True, also seeds 0, warning "No seed found"
            )
        except MisconfigurationException as e:  # Lightning's word on a trainer setting, e.g. an absent accelerator
            raise LLMKitError(f"trainer: {' '.join(str(e).split())} ({_trainer_hint(str(e))})") from e
        except ValueError as e:
            if "barebones" in str(e):  # Lightning refuses what barebones mode turns off with a ValueError
                raise LLMKitError(f"trainer: {' '.join(str(e).split())} (set that trainer option to null or false, "
                                  f"or leave barebones off)") from e
            cause = e  # jsonargparse wraps what a config class refused (ModelConfig's checks)
            while cause is not None and not isinstance(cause, LLMKitError):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            raise cause from None
