"""The discovery-environment interface of TTT-Discover, and a sandbox to call it safely.

TTT-Discover (arXiv 2601.16175): a discovery problem is a state ``s`` (a candidate
solution, as text), an action ``a`` (the model's output), a transition ``s' = T(s, a)`` that
parses the action into a new state, and a continuous, verifiable reward ``R(s')``.
:class:`DiscoveryEnv` is that interface as a :class:`typing.Protocol`, with two choices of ours:
``transition`` also gets the parent state (an environment may read the action as an edit of it),
and ``context_from_archive`` gets the archive's state texts rather than the archive object, so
an environment does not depend on how the archive is built.

Rewards get exploited: a model that finds a parser bug or a way to make the verifier hang will.
So the training loop never calls ``env.reward`` or ``env.transition`` itself but
:func:`safe_reward` / :func:`safe_transition`, which run the method in a worker process and turn
*anything* that goes wrong into a zero reward (or no state) with a reason:

- an exception (a parse error is a ``ValueError`` with a message saying what is malformed),
- a result that is not a finite real number (NaN, inf, a string) or, for a transition, not a
  string,
- running past ``timeout_s``: the worker is killed (SIGKILL) and a fresh one starts on the next
  call,
- the worker dying (a segfault, ``os._exit``): likewise restarted on the next call.

Worker: one persistent process (:class:`EnvWorker`, started with the ``"spawn"`` method so it
shares no threads, locks or CUDA state with the trainer) serves all calls in turn, so a call
costs a pickle of the environment and two pipe round trips (well under a millisecond for the
environments in :mod:`llmkit.discovery.envs`), not a process start. Starting it (once, and
again after each kill) takes about a second on a loaded CPU (a Python interpreter and the
environment's imports) and does not count against ``timeout_s``; nor does importing the
environment's module in the worker on first use (bounded separately by ``load_timeout_s``).

The worker is confined (on POSIX systems): it leads a session of its own, so a kill
(``killpg``) takes whatever processes it started too; its memory is capped
(``RLIMIT_DATA``, ``memory_mb``) and so is any file it writes (``RLIMIT_FSIZE``, ``file_mb``;
a larger write fails with an error instead of killing it); it runs in a temporary directory
of its own, removed when it stops, so relative paths land there; its stdout and stderr go to
``/dev/null``, so a printing verifier cannot flood the trainer's console. This is a process
boundary with limits, not a security boundary: code that means harm can still open absolute
paths or the network. Run verifiers of untrusted code in a container.

The environment must be picklable and its class importable by path, and the caller's main
script must be import-safe (``if __name__ == "__main__":``), the usual rule for spawned
processes. Calls from several threads are serialised.

:func:`load_env` builds an environment from a YAML-style ``class_path`` ("package.module.Class")
and ``init_args``. Model output is only ever parsed, never passed to ``eval`` or ``exec``.

The helpers :func:`first_line`, :func:`single_line` and :func:`parse_int_line` implement the
strict one-line formats the bundled environments share (lock the format, reject
anything else with a clear reason).
"""

from __future__ import annotations

import atexit
import importlib
import inspect
import math
import multiprocessing
import numbers
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

from llmkit.errors import LLMKitError
from llmkit.io import at_quit_now

ASCII_WHITESPACE = " \t\r\n"
"""The only characters stripped around an answer line (Unicode spaces are not whitespace here)."""

REASON_CHARS = 500
"""Error messages from the worker are cut to this many characters."""

MEMORY_MB = 4096
"""The worker's default memory cap (``RLIMIT_DATA``: its heap and private mappings), in MiB."""

FILE_MB = 64
"""The default cap on any file the worker writes (``RLIMIT_FSIZE``), in MiB."""

ENV_METHODS = ("initial_state", "context_from_archive", "transition", "reward")
"""The methods a :class:`DiscoveryEnv` must have (besides the ``name`` attribute)."""


@runtime_checkable
class DiscoveryEnv(Protocol):
    """A discovery problem of TTT-Discover: states are solution texts.

    ``reward`` must be deterministic and cheap (milliseconds), higher is better, and may raise
    ``ValueError`` for an invalid state; :func:`safe_reward` turns that into 0.
    """

    name: str

    def initial_state(self) -> str:
        """A valid, simple solution to start the archive from."""
        ...

    def context_from_archive(self, state: str, archive_texts: list[str]) -> str:
        """The prompt the model sees: the problem, the answer format, the chosen start ``state``
        with its score and optionally a few other archive entries from ``archive_texts``."""
        ...

    def transition(self, state: str, action: str) -> str:
        """The new state parsed from the model's output ``action`` (``ValueError`` if malformed)."""
        ...

    def reward(self, state: str) -> float:
        """The verifier: a finite score of ``state``, higher is better (``ValueError`` if invalid)."""
        ...


# ----------------------------------------------------------------------------- worker process


def _describe(error: BaseException) -> str:
    try:
        message = str(error)
        text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    except Exception:  # a hostile __str__
        text = type(error).__name__
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 3] + "..."


def _checked_reward(value: Any) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"reward returned {type(value).__name__}, not a real number")
    return float(value)


def _checked_state(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"it returned {type(value).__name__}, not a string")
    return str(value)


_RESULT_CHECKS: dict[str, Callable[[Any], Any]] = {"reward": _checked_reward, "transition": _checked_state,
                                                   "initial_state": _checked_state}


def _confine(workdir: str, memory_mb: int, file_mb: int) -> None:
    """The worker's confinement (module docstring), where the system has it."""
    if hasattr(os, "setsid"):
        os.setsid()  # its own session: EnvWorker's killpg reaches what it starts
    try:
        import resource
    except ImportError:  # not a POSIX system
        resource = None
    if resource is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write raises OSError (EFBIG) instead
        for limit, value in ((resource.RLIMIT_DATA, memory_mb << 20), (resource.RLIMIT_FSIZE, file_mb << 20),
                             (resource.RLIMIT_CORE, 0)):
            hard = resource.getrlimit(limit)[1]
            resource.setrlimit(limit, (value if hard == resource.RLIM_INFINITY else min(value, hard), hard))
    os.chdir(workdir)
    quiet = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        os.dup2(quiet, fd)
    sys.stdout = sys.stderr = open(os.devnull, "w")


def _worker_main(conn: Any, workdir: str, memory_mb: int, file_mb: int) -> None:
    """The worker's loop: receive (pickled env, method, args), reply "loaded" once the env is
    unpickled, then ("ok", value) or ("error", reason). ``None`` or a closed pipe ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's business
    _confine(workdir, memory_mb, file_mb)
    conn.send(("ready", None))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        payload, method, args = message
        try:
            env = pickle.loads(payload)
        except BaseException as error:
            conn.send(("error", f"could not load the environment in the worker: {_describe(error)}"))
            continue
        conn.send(("loaded", None))
        try:
            reply = ("ok", _RESULT_CHECKS[method](getattr(env, method)(*args)))
        except BaseException as error:
            reply = ("error", f"{method} failed: {_describe(error)}")
        conn.send(reply)


SPAWN_HINT = ("the worker process imports the main script again: in a script of your own, run the Trainer "
              "under `if __name__ == \"__main__\":`")
"""Why a spawned worker that dies while starting most often does: a script that runs training at
import time, so the worker, importing it, starts a worker of its own (Python refuses)."""


class EnvWorker:
    """A persistent worker process that runs environment methods with a time limit.

    :meth:`call` never raises for anything the environment does; it returns ``(True, value)``
    or ``(False, reason)``. The process starts on first use and after a kill; :meth:`close`
    stops it (also done at interpreter exit). It runs confined to
    ``memory_mb`` of memory and files of ``file_mb`` (module docstring).
    """

    def __init__(self, start_method: str = "spawn", start_timeout_s: float = 60.0, load_timeout_s: float = 30.0,
                 memory_mb: int = MEMORY_MB, file_mb: int = FILE_MB):
        self._ctx = multiprocessing.get_context(start_method)
        self.start_timeout_s = start_timeout_s
        self.load_timeout_s = load_timeout_s
        self.memory_mb, self.file_mb = memory_mb, file_mb
        self._lock = threading.Lock()
        self._process: Any = None
        self._conn: Any = None
        self._workdir: str | None = None
        atexit.register(self.close)  # its processes and directory go with the interpreter, whoever forgets it
        at_quit_now(self._stop)  # and with a second Ctrl-C (its own session: the terminal's Ctrl-C misses it)

    def __getstate__(self) -> dict[str, Any]:
        """Its settings: a copy (a module that ``ddp_spawn`` sends to a process) starts a worker of its own."""
        return {"start_method": self._ctx.get_start_method(), "start_timeout_s": self.start_timeout_s,
                "load_timeout_s": self.load_timeout_s, "memory_mb": self.memory_mb, "file_mb": self.file_mb}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    @property
    def pid(self) -> int | None:
        """The worker's process id, or None when none is running."""
        return self._process.pid if self._process is not None and self._process.is_alive() else None

    def _stop(self) -> None:
        process, conn, workdir = self._process, self._conn, self._workdir
        self._process = self._conn = self._workdir = None
        if process is not None and process.pid is not None and hasattr(os, "killpg"):
            try:  # the worker's session: what it started, and the worker unless it never got to setsid
                os.killpg(process.pid, signal.SIGKILL)
            except OSError:
                pass
        if process is not None and process.is_alive():
            process.kill()
        if process is not None:
            process.join(5.0)
        if conn is not None:
            conn.close()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)

    def _start(self) -> str | None:
        """Start the worker and wait for its greeting; a reason on failure, else None."""
        parent, child = self._ctx.Pipe()
        self._workdir = tempfile.mkdtemp(prefix="llmkit-env-")
        process = self._ctx.Process(target=_worker_main, args=(child, self._workdir, self.memory_mb, self.file_mb),
                                    daemon=True, name="llmkit-env-worker")
        try:
            process.start()
        except Exception as error:
            parent.close()
            child.close()
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
            hint = f"; {SPAWN_HINT}" if "bootstrapping phase" in str(error) else ""
            return f"could not start the environment worker process: {_describe(error)}{hint}"
        child.close()
        self._process, self._conn = process, parent
        status, value = self._receive(self.start_timeout_s, "starting")
        if status == "ready":
            return None
        died = value.startswith("the worker process died")
        return f"{value}; {SPAWN_HINT}" if died and self._ctx.get_start_method() == "spawn" else value

    def _receive(self, timeout_s: float, doing: str) -> tuple[str, Any]:
        """The worker's next reply, or ("error", reason) after killing it on a timeout or death."""
        try:
            if not self._conn.poll(timeout_s):
                self._stop()
                return "error", f"timed out after {timeout_s:g} s while {doing} (worker killed)"
            return self._conn.recv()
        except Exception as error:  # EOF: the worker died
            code = self._process.exitcode if self._process is not None else None
            if code is None and self._process is not None:
                self._process.join(1.0)
                code = self._process.exitcode
            self._stop()
            return "error", f"the worker process died while {doing} (exit code {code}; {_describe(error)})"

    def call(self, env: Any, method: str, args: tuple, timeout_s: float) -> tuple[bool, Any]:
        """Run ``env.<method>(*args)`` in the worker; at most ``timeout_s`` seconds of it."""
        if method not in _RESULT_CHECKS:
            raise LLMKitError(f"EnvWorker runs only {sorted(_RESULT_CHECKS)}, not {method!r}")
        try:
            payload = pickle.dumps(env, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as error:
            return False, f"the environment cannot be pickled for the worker process: {_describe(error)}"
        with self._lock:
            for attempt in range(2):  # a worker that died between calls shows up as a broken pipe
                if self._process is None or not self._process.is_alive():
                    self._stop()
                    reason = self._start()
                    if reason is not None:
                        return False, reason
                try:
                    self._conn.send((payload, method, args))
                    break
                except Exception as error:
                    self._stop()
                    if attempt:
                        return False, f"could not send the call to the worker process: {_describe(error)}"
            status, value = self._receive(max(self.load_timeout_s, timeout_s), "loading the environment")
            if status != "loaded":
                return False, value
            status, value = self._receive(timeout_s, f"running {method}")
            return status == "ok", value

    def close(self) -> None:
        """Ask the worker to exit (killing it if it does not within a second)."""
        with self._lock:
            if self._conn is not None and self._process is not None and self._process.is_alive():
                try:
                    self._conn.send(None)
                    self._process.join(1.0)
                except Exception:
                    pass
            self._stop()


_default_worker: EnvWorker | None = None
_default_lock = threading.Lock()


def default_worker() -> EnvWorker:
    """The process-wide :class:`EnvWorker` that :func:`safe_reward` and :func:`safe_transition` use."""
    global _default_worker
    with _default_lock:
        if _default_worker is None:
            _default_worker = EnvWorker()
        return _default_worker


def _check_timeout(timeout_s: float) -> None:
    if not (isinstance(timeout_s, numbers.Real) and math.isfinite(timeout_s) and timeout_s > 0):
        raise LLMKitError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")


def safe_reward(
    env: DiscoveryEnv, state: str, timeout_s: float = 5.0, worker: EnvWorker | None = None
) -> tuple[float, str | None]:
    """``(env.reward(state), None)``, or ``(0.0, reason)`` if it raised, returned something that
    is not a finite real number, or ran past ``timeout_s`` (then the worker is killed).

    Runs in ``worker`` (default: :func:`default_worker`); never raises for anything the
    environment does: any exception scores 0.
    """
    _check_timeout(timeout_s)
    if not isinstance(state, str):
        return 0.0, f"the state must be a string, got {type(state).__name__}"
    ok, value = (worker or default_worker()).call(env, "reward", (state,), timeout_s)
    if not ok:
        return 0.0, value
    if not math.isfinite(value):
        return 0.0, f"reward is not finite ({value!r})"
    return value, None


def safe_transition(
    env: DiscoveryEnv, state: str, action: str, timeout_s: float = 5.0, worker: EnvWorker | None = None
) -> tuple[str | None, str | None]:
    """``(env.transition(state, action), None)``, or ``(None, reason)`` with the same guarantees
    as :func:`safe_reward` (a malformed action is a ``ValueError`` in the environment)."""
    _check_timeout(timeout_s)
    if not isinstance(state, str) or not isinstance(action, str):
        return None, f"state and action must be strings, got {type(state).__name__} and {type(action).__name__}"
    ok, value = (worker or default_worker()).call(env, "transition", (state, action), timeout_s)
    return (value, None) if ok else (None, value)


# ----------------------------------------------------------------------------- loading by path


def load_env(class_path: str, init_args: Mapping[str, Any] | None = None) -> DiscoveryEnv:
    """Import ``class_path`` ("package.module.ClassName") and build it with ``init_args``.

    This is how a YAML config names an environment (``class_path`` / ``init_args``, as in
    LightningCLI). Raises :class:`LLMKitError` for a malformed path, a module that cannot be
    imported, a missing class, arguments the class rejects, or an object that does not satisfy
    :class:`DiscoveryEnv` (a ``name`` string and the four methods).
    """
    parts = class_path.split(".") if isinstance(class_path, str) else []
    if len(parts) < 2 or not all(part.isidentifier() for part in parts):
        raise LLMKitError(f"environment class path {class_path!r} is not of the form 'package.module.ClassName'")
    module_name, class_name = ".".join(parts[:-1]), parts[-1]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise LLMKitError(
            f"cannot import module {module_name!r} for environment {class_path!r} ({error}): "
            "check the spelling, and that its package is installed or its directory is on PYTHONPATH "
            "(e.g. PYTHONPATH=. for a module in the working directory)"
        ) from error
    except Exception as error:
        raise LLMKitError(f"importing module {module_name!r} for environment {class_path!r} failed: "
                          f"{_describe(error)}") from error
    cls = getattr(module, class_name, None)
    if cls is None:
        raise LLMKitError(f"module {module_name!r} has no class {class_name!r} (environment {class_path!r})")
    if not inspect.isclass(cls):
        raise LLMKitError(f"{class_path!r} is a {type(cls).__name__}, not a class")
    if init_args is None:
        init_args = {}
    if not isinstance(init_args, Mapping) or not all(isinstance(key, str) for key in init_args):
        raise LLMKitError(f"init_args for {class_path!r} must be a mapping of argument names to values, "
                          f"got {init_args!r}")
    try:
        env = cls(**init_args)
    except Exception as error:  # an env's own LLMKitError says what is wrong with an argument, not which
        raise LLMKitError(f"could not build environment {class_path!r} with init_args {dict(init_args)!r}: "
                          f"{error if isinstance(error, LLMKitError) else _describe(error)}") from error
    missing = [m for m in ENV_METHODS if not callable(getattr(env, m, None))]
    if not isinstance(getattr(env, "name", None), str):
        missing.insert(0, "name (a string)")
    if missing or not isinstance(env, DiscoveryEnv):
        raise LLMKitError(f"{class_path!r} does not satisfy the DiscoveryEnv protocol: missing {', '.join(missing)}")
    return env


# ----------------------------------------------------------------------------- strict formats


def clip_text(text: str, limit: int = 80) -> str:
    """``repr`` of ``text`` cut to about ``limit`` characters, for error messages and prompts."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def first_line(action: str) -> str:
    """The first non-blank line of a model's output, without surrounding ASCII whitespace;
    the rest of the output is ignored (a model keeps generating after its answer)."""
    return action.lstrip(ASCII_WHITESPACE).partition("\n")[0].rstrip(ASCII_WHITESPACE)


def single_line(state: str) -> str:
    """``state`` without surrounding ASCII whitespace; ``ValueError`` if it spans several lines."""
    line = state.strip(ASCII_WHITESPACE)
    if "\n" in line or "\r" in line:
        raise ValueError(f"the solution must be a single line, got {line.count(chr(10)) + 1} lines")
    return line


def parse_int_line(line: str, n: int, q: int, max_chars: int) -> list[int]:
    """Exactly ``n`` ASCII decimal integers in ``0..q`` separated by spaces or tabs, else ``ValueError``.

    Rejected, each with its own message: more than ``max_chars`` characters (checked first, so
    a huge line costs nothing), an empty line, a token that is not plain ASCII digits (signs,
    decimal points, exponents, commas, brackets, Unicode digits such as "٣" or "３"), a value
    above ``q``, a wrong count, all zeros (no solution has an empty support).
    """
    if len(line) > max_chars:
        raise ValueError(f"the line has {len(line)} characters, more than the {max_chars} allowed")
    if not line:
        raise ValueError(f"empty: expected {n} integers in 0..{q} separated by spaces")
    tokens = line.replace("\t", " ").split(" ")
    tokens = [t for t in tokens if t]
    digits = len(str(q))
    values = []
    for i, token in enumerate(tokens):
        if not (token.isascii() and token.isdigit()):
            raise ValueError(f"value {i + 1} ({clip_text(token, 20)}) is not a whole number in 0..{q}")
        if len(token) > digits or int(token) > q:
            raise ValueError(f"value {i + 1} ({clip_text(token, 20)}) is larger than the maximum {q}")
        values.append(int(token))
    if len(values) != n:
        raise ValueError(f"expected exactly {n} integers, got {len(values)}")
    if not any(values):
        raise ValueError("all values are zero")
    return values


def archive_examples(
    state: str, archive_texts: list[str], describe: Callable[[str], str], max_examples: int
) -> list[str]:
    """Up to ``max_examples`` lines ``"(<describe(text)>) <text>"`` for distinct archive entries
    other than ``state``, in the given order; entries for which ``describe`` raises
    ``ValueError`` (invalid ones) are skipped."""
    lines: list[str] = []
    seen = {state.strip(ASCII_WHITESPACE)}
    for text in archive_texts:
        if len(lines) >= max_examples:
            break
        key = text.strip(ASCII_WHITESPACE) if isinstance(text, str) else None
        if key is None or key in seen:
            continue
        seen.add(key)
        try:
            lines.append(f"({describe(text)}) {key}")
        except ValueError:
            continue
    return lines
