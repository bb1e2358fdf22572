"""Plain data in and out: file patterns, UTF-8 lines, JSON and JSONL, dataclasses from dicts.

Every reader raises :class:`LLMKitError` naming the file (and line) and what to do; every writer
goes through a temp file in the same directory and a rename, so a crash never leaves a
half-written file. ``what`` arguments name the setting a value came from (a YAML key such as
``data.train_files``, or a command-line flag such as ``--input``), so an error points at the
place the user can fix.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import shutil
import signal
import threading
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from llmkit.errors import LLMKitError

_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
               float: "a number", type(None): "null"}


def expand_inputs(patterns: Sequence[str | Path], what: str, hint: str = "check the path or pattern") -> list[Path]:
    """The files named by ``patterns``, each a path or a glob pattern (``**`` recurses).

    Each pattern's matches are sorted; patterns keep their order and a file named twice is
    kept once (:func:`unique_paths`). A pattern that matches no file (or names a directory)
    raises :class:`LLMKitError` naming ``what`` (the setting the patterns came from) and ``hint``.
    """
    files: list[Path] = []
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not matches and os.path.isdir(pattern):
            raise LLMKitError(f"{what}: {pattern!r} is a directory: name its files (paths, or a glob pattern inside "
                              f"it); {hint}")
        if not matches:
            raise LLMKitError(f"{what}: {pattern!r} matches no file; {hint}")
        files += matches
    return unique_paths(files)


def unique_paths(paths: Sequence[str | Path]) -> list[Path]:
    """``paths`` in their order, each file or directory once however it is spelled (``run``,
    ``./run``, ``x/../run``, a symlink to it), as it was first spelled."""
    unique: dict[Path, Path] = {}
    for path in map(Path, paths):
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def iter_text_lines(path: str | Path, max_bytes: int | None = None) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, line)`` for a UTF-8 text file, 1-based, line endings kept.

    Reads one line at a time, so the file is never held in memory; with ``max_bytes`` (at least
    4, one UTF-8 character), not even a line: a longer one comes in parts of at most that many
    bytes, cut between characters, with the same line number (only its last part ends with the
    line ending). A line that is not valid UTF-8 raises :class:`LLMKitError` naming the file and
    the line. A byte order mark opening the file (editors on Windows write one) is no text of it.
    """
    path = Path(path)
    number, offset, carry = 1, 0, b""  # offset: bytes of the current line already yielded
    with path.open("rb") as f:
        while raw := carry + f.readline(-1 if max_bytes is None else max_bytes - len(carry)):
            carry = b""
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                if not (e.reason == "unexpected end of data" and max_bytes is not None and len(raw) == max_bytes):
                    raise LLMKitError(
                        f"{path}:{number}: not valid UTF-8 ({e.reason} at byte {offset + e.start} of the "
                        "line); re-encode the file as UTF-8 or leave it out of the inputs"
                    ) from e
                raw, carry = raw[: e.start], raw[e.start :]  # a character cut by the limit: the next part's
                text = raw.decode("utf-8")
            yield number, text.removeprefix("\ufeff") if number == 1 and offset == 0 else text
            if raw.endswith(b"\n"):
                number, offset = number + 1, 0
            else:
                offset += len(raw)


def json_kind(value: Any) -> str:
    """How a JSON value's type reads in a message: "an object", "a string", ..."""
    return _JSON_TYPES.get(type(value), type(value).__name__)


class _RepeatedKey(Exception):
    pass


def _object_without_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    record: dict[str, Any] = {}
    for key, value in pairs:
        if key in record:
            raise _RepeatedKey(key)
        record[key] = value
    return record


def yaml_error_summary(error: Exception) -> str:
    """Where and what a PyYAML parse error is, in one line ("at line 3, column 4: expected ',' or
    ']', but got ':'"): its own message spans several, with the text around the mark."""
    mark = getattr(error, "problem_mark", None)
    where = f"at line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + (getattr(error, "problem", None) or str(error).splitlines()[0])


def check_yaml_keys(path: str | Path) -> None:
    """Raise :class:`LLMKitError` naming the file and line if a mapping of the YAML file ``path``
    gives a key twice: YAML loaders keep the last one silently (``max_steps: 400`` then
    ``max_steps: 30`` ran 30 steps), as JSON's do. A file YAML cannot parse is left to its reader."""
    import yaml

    class UniqueKeys(yaml.SafeLoader):
        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
            lines: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if key in lines:
                    raise LLMKitError(f"{path}:{line}: key {key!r} is given twice in one mapping (first on line "
                                      f"{lines[key]}), and YAML keeps the last silently: remove one of them")
                lines[key] = line
            return super().construct_mapping(node, deep=deep)

    try:
        yaml.load(Path(path).read_text(encoding="utf-8"), Loader=UniqueKeys)
    except (yaml.YAMLError, TypeError, UnicodeDecodeError):
        return


def iter_jsonl_objects(path: str | Path, what: str, line_format: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``("file:line", object)`` for each non-blank line of the JSONL file ``path``.

    ``what`` names the file's contents and ``line_format`` shows a valid line, for the
    messages: a missing file, a line that is not UTF-8 or not JSON, a JSON value that is not an
    object, or an object that gives a key twice (JSON keeps the last, silently) raises
    :class:`LLMKitError` naming the file (and line).
    """
    path = Path(path)
    if not path.is_file():
        raise LLMKitError(f"{what} file {path} does not exist: check the path")
    for number, line in iter_text_lines(path):
        if not line.strip():
            continue
        source = f"{path}:{number}"
        try:
            record = json.loads(line, object_pairs_hook=_object_without_repeated_keys)
        except json.JSONDecodeError as e:
            end = e.pos >= len(line.rstrip("\r\n"))  # e.msg: "Invalid control character at", "Expecting value"
            where = f"{e.msg.removesuffix(' at')} " + ("at the end of the line" if end else f"at column {e.pos + 1}")
            raise LLMKitError(f"{source}: not valid JSON ({where}); each line must be {line_format}") from None
        except _RepeatedKey as e:
            raise LLMKitError(f"{source}: the key {e.args[0]!r} is given twice; keep one") from None
        if not isinstance(record, dict):
            raise LLMKitError(
                f"{source}: got {json_kind(record)} where a JSON object is needed; each line must be {line_format}"
            )
        yield source, record


def text_field(record: dict[str, Any], key: str, source: str, line_format: str) -> str:
    """``record[key]``, checked to be a non-blank string (else :class:`LLMKitError` at ``source``)."""
    if key not in record:
        raise LLMKitError(f"{source}: no {key!r} field; each line must be {line_format}")
    value = record[key]
    if not isinstance(value, str):
        raise LLMKitError(f"{source}: {key!r} is {json_kind(value)}; it must be a string (each line is {line_format})")
    if not value.strip():
        raise LLMKitError(f"{source}: {key!r} is empty; give it some text or remove the line")
    return value


def non_finite_tensor(tensors: dict[str, Any]) -> str | None:
    """The name of the first floating-point tensor of ``tensors`` that holds a NaN or an infinity
    (a damaged file, or weights saved from a run that diverged), else None. A float8 tensor, which
    torch cannot test, is tested in half precision; a meta tensor holds no values."""
    for name, t in tensors.items():
        if t.is_floating_point() and not t.is_meta and not (t.half() if t.element_size() == 1 else t).isfinite().all():
            return name
    return None


def read_json(path: str | Path, hint: str) -> dict[str, Any]:
    """The JSON object in ``path``; a missing, malformed or non-object file raises
    :class:`LLMKitError` naming it, followed by ``hint`` (what the file should be)."""
    path = Path(path)
    if not path.is_file():
        raise LLMKitError(f"{path} does not exist: {hint}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LLMKitError(f"{path} is not valid JSON ({e}): {hint}") from None
    if not isinstance(value, dict):
        raise LLMKitError(f"{path} holds {json_kind(value)}, not a JSON object: {hint}")
    return value


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of the bytes of the file ``path`` (a tokenizer's identity in shard metadata and
    checkpoints)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def temp_path(path: Path) -> Path:
    """Where ``path`` is written before its rename: ``.NAME.PID.tmp`` in the same directory (a
    rename within one filesystem is atomic), named after the writing process."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def remove_stale_temps(path: Path) -> None:
    """Delete the temp files (or directories) of ``path`` whose writer no longer runs (a process
    killed with -9 cannot clean up after itself)."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2 : -len(".tmp")]
        if pid.isdigit() and not _running(int(pid)):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


def temp_directory(path: Path) -> Path:
    """An empty temp directory beside ``path`` (:func:`temp_path`) to write its content into, the
    temp directories of killed writers removed first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = temp_path(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_umask() -> int:
    mask = os.umask(0)  # reading it means setting it: set back at once, at import, before threads start
    os.umask(mask)
    return mask


UMASK = _read_umask()
"""The process's umask when llmkit loaded: the permissions :func:`atomic_file` gives its files."""


class _Hold:
    """What :func:`hold_interrupts` holds: how many holds are open, the handlers they stood in for, and
    the signals caught meanwhile."""

    depth = 0
    previous: dict[int, Any] = {}
    caught: list[int] = []


def hold_interrupts() -> bool:
    """Hold SIGINT and SIGTERM until every hold is released (:func:`release_interrupts`), then raise
    them again for the handlers they had (Python's KeyboardInterrupt; Lightning's SIGTERM flag, or
    llmkit's in a data command), for work an interrupt must not cut in half: ``torch.save`` turns a
    KeyboardInterrupt in the middle of a write into a RuntimeError, which is no interrupt (a checkpoint
    lands once it is whole), a worker pool left half-started prints tracebacks, and a training step
    whose backward ran cannot be taken back (:class:`~llmkit.callbacks.Checkpoint`). Holds nest, and
    may be released in any order: a step's hold spans hooks that hold and release their own. Python
    handles signals in the main thread only, so elsewhere nothing is held; whether this holds (release
    only then)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    if _Hold.depth == 0:
        _Hold.previous = {sig: signal.signal(sig, _catch) for sig in (signal.SIGINT, signal.SIGTERM)}
    _Hold.depth += 1
    return True


_QUIT_NOW_CLEANUPS: list[Callable[[], None]] = []


def at_quit_now(cleanup: Callable[[], None]) -> None:
    """Run ``cleanup`` (quick work: kill a child process outside the terminal's process group, remove
    its directory) when a second Ctrl-C quits at once (:func:`_catch`), which skips ``atexit``."""
    _QUIT_NOW_CLEANUPS.append(cleanup)


def _catch(sig: int, frame: Any) -> None:
    """The held signals' handler: record ``sig``, and say the first time that it was heard (a step
    that ends a block of the regression gate, or an epoch's validation, would look hung), unless the
    process ignores it (SIGINT in a background job). A second SIGINT quits at once, with status 130,
    as soon as Python runs this handler (between bytecodes, or when a blocking system call such as a
    write to a slow network disk is interrupted; not inside a long C call), after the
    :func:`at_quit_now` cleanups: the interrupt's save does not happen, what was being written stays a
    temp file, which the next write removes, and the last checkpoint written is whole. Written to
    the file descriptor: a print could re-enter the stderr buffer a progress bar is writing; nothing
    raised (a closed stderr, the pipe to a ``tee`` that Ctrl-C stopped too) may cut the held work."""
    if _Hold.previous.get(sig) is signal.SIG_IGN:  # .get: it may come while the hold starts
        _Hold.caught.append(sig)
        return
    name = signal.Signals(sig).name
    if sig == signal.SIGINT and sig in _Hold.caught:
        with suppress(OSError):
            os.write(2, b"\nllmkit: SIGINT again: quitting now, without the save an interrupt makes: what no "
                        b"checkpoint holds yet is lost (the last one written is whole)\n")
        for cleanup in _QUIT_NOW_CLEANUPS:
            with suppress(Exception):
                cleanup()
        os._exit(128 + sig)
    if sig not in _Hold.caught:
        again = " (Ctrl-C again quits at once, without saving)" if sig == signal.SIGINT else ""
        with suppress(OSError):
            os.write(2, f"\nllmkit: {name} received: stopping once the work in progress (a training step, a file "
                        f"being written) is complete{again}\n".encode())
    _Hold.caught.append(sig)


def interrupt_pending(sig: int) -> bool:
    """Whether ``sig`` was caught while held and waits for the last release."""
    return sig in _Hold.caught


def release_interrupts(deliver: bool = True) -> None:
    """Release a hold of :func:`hold_interrupts`; the last one puts the handlers back and raises the
    signals caught, unless not ``deliver`` (an exception already stops the work: they are dropped)."""
    if _Hold.depth == 0:
        raise RuntimeError("release_interrupts without a hold")
    _Hold.depth -= 1
    if _Hold.depth:
        return
    held = set(_Hold.previous)
    signal.pthread_sigmask(signal.SIG_BLOCK, held)  # one arriving meanwhile waits for its own handler
    try:
        for sig, handler in _Hold.previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        caught, _Hold.caught, _Hold.previous = _Hold.caught, [], {}
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)
    for sig in dict.fromkeys(caught) if deliver else ():  # the first to raise wins
        signal.raise_signal(sig)


@contextmanager
def interrupts_held() -> Iterator[None]:
    """SIGINT and SIGTERM held while the block runs (:func:`hold_interrupts`)."""
    held = hold_interrupts()
    try:
        yield
    finally:
        if held:
            release_interrupts()


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield the temp path (:func:`temp_path`) to write the file ``path`` to; on success it is
    renamed to ``path``, on an error removed, so ``path`` is never half-written (a killed writer's
    is removed by the next write). A directory at ``path`` raises :class:`LLMKitError` before
    anything is written. The file gets the permissions a plain ``open`` would give it (0666 less
    the umask), whatever the writer gave the temp file (safetensors' ``save_file`` gives 0600)."""
    path = Path(path)
    if path.is_dir():
        raise LLMKitError(f"cannot write {path}: it is a directory; give the path of a file instead")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = temp_path(path)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def refuse_overwrite(out: str | Path, what: str, inputs: dict[str, str | Path | None], instead: str) -> None:
    """Raise :class:`LLMKitError` before anything is written if ``out`` (named ``what``) is the same
    file or directory as one of ``inputs`` (``{name: path}``, None skipped), which a command reads,
    or an existing file inside one that is a directory (a model directory's weights, say): writing it
    would replace the command's own input. The message names both, then says ``instead``."""
    out = Path(out)
    for name, path in inputs.items():
        if path is None or not out.exists() or not Path(path).exists():
            continue
        if out.samefile(path):
            raise LLMKitError(f"{what} {out} is the {name} it reads: {instead}")
        if Path(path).is_dir() and Path(path).resolve() in out.resolve().parents:
            raise LLMKitError(f"{what} {out} is a file in the {name} {path} it reads: {instead}")


def refuse_existing(out: str | Path, what: str, instead: str) -> None:
    """Raise :class:`LLMKitError` if a file ``out`` (named ``what``) exists: a command that writes a
    checkpoint never replaces one, which may be a trained run's ``last.ckpt`` (a directory there is
    :func:`atomic_file`'s error)."""
    if Path(out).is_file():
        raise LLMKitError(f"{what} {out} already exists: {instead}, or remove it first")


def write_json_atomic(path: str | Path, payload: dict) -> None:
    """Write ``payload`` as indented JSON to ``path`` through :func:`atomic_file`."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def write_jsonl_atomic(path: str | Path, records: list[dict]) -> None:
    """Write ``records`` as JSON lines to ``path`` through :func:`atomic_file`."""
    with atomic_file(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def dataclass_from_dict(cls: type, values: dict[str, Any], what: str) -> Any:
    """``cls(**values)``, refusing unknown keys with a message that names ``what`` and lists the known
    keys, and a value of another type than its field's (a number written as text in a JSON or YAML
    file) with one naming the key; which values of the right type are allowed, ``cls`` says."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise LLMKitError(f"unknown {what} keys {unknown}; known keys: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if not _has_type(value, hints[key]):
            union = typing.get_origin(hints[key]) in (typing.Union, types.UnionType)
            expected = " or ".join(_type_name(t) for t in (typing.get_args(hints[key]) if union else (hints[key],)))
            text = " (YAML reads 1e-5 as text: write 1.0e-5)" if "float" in expected and isinstance(value, str) \
                and "e" in value.lower() and _is_number(value) else ""
            raise LLMKitError(f"{what} key {key}: expected {expected}, got {value!r}{text}")
    return cls(**values)


def _has_type(value: Any, hint: Any) -> bool:
    """Whether ``value`` (read from JSON or YAML) is of the field type ``hint``: an int for int (not a
    bool), an int or float for float, a dict for a dataclass; a Literal's allowed values are left to
    the dataclass, whose message lists them."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_has_type(value, h) for h in typing.get_args(hint))
    if hint is Any or typing.get_origin(hint) is typing.Literal:
        return True
    if hint is type(None):
        return value is None
    if hint in (int, float):
        return isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
    if typing.get_origin(hint) is list:
        return isinstance(value, (list, tuple)) and all(_has_type(v, typing.get_args(hint)[0]) for v in value)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, (dict, hint))
    return not isinstance(hint, type) or isinstance(value, hint)


def _type_name(hint: Any) -> str:
    """``int``, ``null``, ``a mapping`` (a dataclass), ``a list of str``."""
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    return "null" if hint is type(None) else "a mapping" if dataclasses.is_dataclass(hint) else \
        getattr(hint, "__name__", str(hint))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def as_dataclass(cls: type, value: Any) -> Any:
    """``value`` as a ``cls``: a ``cls`` instance as is, its dict (as checkpoint hyperparameters
    store it) converted, None the defaults."""
    if value is None:
        return cls()
    if isinstance(value, dict):
        return dataclass_from_dict(cls, value, cls.__name__)
    return value


@contextmanager
def new_directory_atomic(path: str | Path, what: str) -> Iterator[Path]:
    """Yield a temp directory beside ``path`` to fill; on success it is renamed to ``path``, on
    an error removed, so ``path`` never holds a half-written result. ``path`` must not exist yet
    (or be empty): an existing one raises :class:`LLMKitError` naming it (``what`` says what it
    would have held). A killed writer's temp directory is removed by the next write."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise LLMKitError(f"{path} already exists: choose a new directory for the {what} or remove that one")
    tmp = temp_directory(path)
    try:
        yield tmp
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
