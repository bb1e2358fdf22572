"""Discovery environments (TTT-Discover §1, Phase 10, C5, G1-G4, H3): verifiers on known inputs,
strict parsing against adversarial strings, the reward sandbox and loading by import path."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import pytest

from llmkit.discovery import DiscoveryEnv, load_env, safe_reward, safe_transition
from llmkit.discovery.env import EnvWorker, parse_int_line
from llmkit.discovery.envs import AutocorrelationEnv, ErdosMinOverlapEnv, StringTargetEnv
from llmkit.errors import LLMKitError

# ----------------------------------------------------------------------------- misbehaving envs
# Module level so that the spawned worker can import them by path.


class _Env:
    name = "test"

    def initial_state(self) -> str:
        return "x"

    def context_from_archive(self, state: str, archive_texts: list[str]) -> str:
        return state

    def transition(self, state: str, action: str) -> str:
        return action

    def reward(self, state: str) -> float:
        return float(len(state))


class ThrowingEnv(_Env):
    def reward(self, state: str) -> float:
        raise RuntimeError("verifier exploded")

    def transition(self, state: str, action: str) -> str:
        raise ValueError("bad action")


class NaNEnv(_Env):
    def reward(self, state: str) -> float:
        return float("nan") if state == "nan" else float("inf") if state == "inf" else "0.7"  # type: ignore[return-value]

    def transition(self, state: str, action: str) -> str:
        return 42  # type: ignore[return-value]


class SleepingEnv(_Env):
    def reward(self, state: str) -> float:
        if state == "hang":
            time.sleep(60)
        return 1.0

    def transition(self, state: str, action: str) -> str:
        if action == "hang":
            while True:
                pass
        return action


class DyingEnv(_Env):
    def reward(self, state: str) -> float:
        os._exit(3)


class HostileEnv(_Env):
    """A verifier that does what a sandbox must contain; ``state`` says what."""

    def reward(self, state: str) -> float:
        if state == "print":
            print("x" * 1_000_000)
            os.write(2, b"y" * 1_000_000)
            return 1.0
        if state == "write":
            with open("left.txt", "w") as f:
                f.write("here")
            return float(os.path.abspath("left.txt").startswith(os.path.abspath(os.sep + "tmp")) or 1)
        if state == "memory":
            return float(len(bytearray(512 << 20)))
        if state == "big file":
            with open("big.bin", "wb") as f:
                f.write(bytes(2 << 20))
            return 1.0
        if state.startswith("fork "):  # a child that outlives the call, then a hang
            import subprocess
            child = subprocess.Popen(["sleep", "60"])
            with open(state.split()[1], "w") as f:
                f.write(str(child.pid))
            time.sleep(60)
        if state == "bool":
            return True
        return float(os.getcwd() != os.environ.get("LLMKIT_TEST_CWD"))


class NoRewardEnv:
    name = "broken"

    def initial_state(self) -> str:
        return ""


def not_a_class() -> None:
    return None


@pytest.fixture(scope="module")
def worker():
    w = EnvWorker()
    yield w
    w.close()


# ----------------------------------------------------------------------------- AC1


def test_ac1_constant_sequence_scores_exactly_two():
    for n, q in [(1, 1), (8, 100), (33, 7), (500, 1000)]:
        env = AutocorrelationEnv(n=n, q=q)
        state = env.initial_state()
        assert env.bound(state) == 2.0
        assert env.reward(state) == 0.5
    assert AutocorrelationEnv(n=4, q=9).bound("9 9 9 9") == 2.0


def test_ac1_hand_computed_sequences():
    # a = (1, 2): a*a = (1, 4, 4), max 4, sum 3 -> bound 2*2*4/9 = 16/9
    env = AutocorrelationEnv(n=2, q=9)
    assert env.bound("1 2") == pytest.approx(16 / 9, rel=1e-15)
    assert env.reward("1 2") == pytest.approx(9 / 16, rel=1e-15)
    # a = (1, 0, 1): a*a = (1, 0, 2, 0, 1), max 2, sum 2 -> bound 2*3*2/4 = 3
    assert AutocorrelationEnv(n=3, q=1).bound("1 0 1") == 3.0
    # a = (3, 1, 0, 2): a*a = (9, 6, 1, 12, 4, 0, 4), max 12, sum 6 -> bound 2*4*12/36 = 8/3
    env = AutocorrelationEnv(n=4, q=3)
    assert env.bound("3 1 0 2") == pytest.approx(8 / 3, rel=1e-15)
    a = np.array([3, 1, 0, 2])
    assert env.bound("3 1 0 2") == pytest.approx(2 * 4 * np.convolve(a, a).max() / a.sum() ** 2)


def test_ac1_can_beat_the_constant():
    # (6, 8, 6, 4, 0, 8): sum 32, max(a*a) 144 -> bound 12 * 144 / 1024 = 27/16 < 2
    env = AutocorrelationEnv(n=6, q=10)
    assert env.bound("6 8 6 4 0 8") == 27 / 16
    assert env.reward("6 8 6 4 0 8") > 0.5 > env.reward("0 0 10 10 0 0") == 1 / 6


def test_ac1_transition_canonicalises_and_tolerates_only_the_documented():
    env = AutocorrelationEnv(n=3, q=100)
    assert env.transition("", "  1   2\t3 \r\nsome explanation\n") == "1 2 3"
    assert env.transition("", "\n\n7 8 9\n") == "7 8 9"
    assert env.transition("", "007 8 9") == "7 8 9"
    for action in ["1, 2, 3", "[1 2 3]", "answer: 1 2 3", "1 2 3 4"]:
        with pytest.raises(ValueError):
            env.transition("", action)
    with pytest.raises(ValueError, match="single line"):
        env.reward("1 2 3\n4 5 6")


BAD_AC1 = {
    "garbage": "hello world",
    "negative": "1 -2 3 4",
    "float": "1 2.5 3 4",
    "exponent": "1 2 1e2 4",
    "plus sign": "1 +2 3 4",
    "comma separated": "1,2,3,4",
    "huge number": "1 2 3 " + "9" * 5000,
    "just above q": "1 2 3 101",
    "empty": "",
    "blank": "   \t ",
    "all zeros": "0 0 0 0",
    "too few": "1 2 3",
    "too many": "1 2 3 4 5",
    "arabic-indic digit": "1 2 3 \u0663",
    "full-width digit": "1 2 3 \uff13",
    "superscript digit": "1 2 3 \u00b2",
    "non-breaking space": "1 2 3\u00a04",
    "zero-width space": "1 2 3 4\u200b",
    "emoji": "1 2 3 \U0001f600",
    "nul byte": "1 2 3 4\x00",
    "very long line": " ".join(["1"] * 100_000),
    "very long spaces": "1 2 3" + " " * 10**6 + "4",
    "trailing words": "1 2 3 4 done",
    "two lines": "1 2\n3 4",
    "nan": "nan nan nan nan",
}


@pytest.mark.parametrize("name", sorted(BAD_AC1))
def test_malformed_states_get_a_parse_error_in_both_number_envs(name):
    text = BAD_AC1[name]
    for env in (AutocorrelationEnv(n=4, q=100), ErdosMinOverlapEnv(n=4, q=100)):
        with pytest.raises(ValueError) as info:
            env.reward(text)
        assert str(info.value)
        if name != "two lines":  # the action parser reads only the first line
            with pytest.raises(ValueError):
                env.transition(env.initial_state(), text)


def test_parse_error_messages_say_what_is_wrong():
    def message(text: str) -> str:
        with pytest.raises(ValueError) as info:
            parse_int_line(text, 4, 100, 100)
        return str(info.value)

    assert "value 2" in message("1 -2 3 4") and "whole number" in message("1 -2 3 4")
    assert "larger than the maximum 100" in message("1 2 3 101")
    assert "exactly 4" in message("1 2 3")
    assert "all values are zero" in message("0 0 0 0")
    assert "more than the 100 allowed" in message("1 " * 60)
    assert "empty" in message("")


def test_malformed_states_get_zero_reward_with_a_reason_through_safe_reward(worker):
    env = AutocorrelationEnv(n=4, q=100)
    for name in ["garbage", "negative", "float", "huge number", "empty", "arabic-indic digit", "very long line"]:
        reward, reason = safe_reward(env, BAD_AC1[name], timeout_s=5.0, worker=worker)
        assert reward == 0.0 and reason and "ValueError" in reason, (name, reason)
    assert safe_reward(env, "1 1 1 1", worker=worker) == (0.5, None)
    assert safe_transition(env, "1 1 1 1", "2 2 2 2\nthanks", worker=worker) == ("2 2 2 2", None)
    state, reason = safe_transition(env, "1 1 1 1", "2 2 x 2", worker=worker)
    assert state is None and "whole number" in reason


# ----------------------------------------------------------------------------- Erdős


def test_erdos_constant_half_has_c5_one_half_and_reward_two():
    for n, q in [(1, 2), (4, 100), (31, 7), (400, 1000)]:
        env = ErdosMinOverlapEnv(n=n, q=q)
        assert env.c5(env.initial_state()) == 0.5
        assert env.reward(env.initial_state()) == 2.0
    # Any positive constant rescales to h = 0.5.
    assert ErdosMinOverlapEnv(n=6, q=10).c5("10 10 10 10 10 10") == 0.5


def test_erdos_hand_computed_and_rescaled():
    # h = (1, 1, 0, 0): sum 2 = n/2; 1 - h = (0, 0, 1, 1); the best shift overlaps 2 -> C5 = 2 * 2/4 = 1
    env = ErdosMinOverlapEnv(n=4, q=1)
    assert env.c5("1 1 0 0") == 1.0
    # h = (0, 1, 1, 0): 1 - h = (1, 0, 0, 1); every shift overlaps at most 1 -> C5 = 1 * 2/4 = 0.5
    assert env.c5("0 1 1 0") == 0.5
    # (2, 2, 0, 0) with q = 4 is h = (0.5, 0.5, 0, 0), rescaled x2 to sum 2: C5 = 1 as above
    assert ErdosMinOverlapEnv(n=4, q=4).c5("2 2 0 0") == 1.0
    # (1, 3) with n = 2: h = (1, 3) * 2/8 = (0.25, 0.75), 1 - h = (0.75, 0.25); correlations
    # 0.25*0.25, 0.25*0.75 + 0.75*0.25, 0.75*0.75 -> max 0.5625 -> C5 = 0.5625 * 2/2
    env = ErdosMinOverlapEnv(n=2, q=3)
    assert np.allclose(env.heights("1 3"), [0.25, 0.75])
    assert env.c5("1 3") == pytest.approx(0.5625, rel=1e-15)
    assert env.reward("1 3") == pytest.approx(1 / 0.5625, rel=1e-15)
    h = env.heights("1 3")
    assert env.c5("1 3") == pytest.approx(np.correlate(h, 1 - h, mode="full").max() * 2 / 2)


def test_erdos_rejects_a_rescaling_that_leaves_the_unit_interval():
    env = ErdosMinOverlapEnv(n=4, q=1)
    with pytest.raises(ValueError, match="pushes h above 1"):
        env.c5("1 0 0 0")  # sum 1 must become 2: h_0 = 2
    assert env.c5("1 1 0 0") == 1.0  # exactly at the boundary (2 * sum == n * max) is allowed
    assert ErdosMinOverlapEnv(n=3, q=2).heights("2 1 0").max() <= 1.0


# ----------------------------------------------------------------------------- string target


def test_string_target_is_one_for_the_target_and_decreases_with_edits():
    for metric in ("match", "edit"):
        env = StringTargetEnv(target="HELLO", metric=metric)
        assert env.reward("HELLO") == 1.0
        assert env.reward("  HELLO \n") == 1.0
        one_edit = [env.reward(s) for s in ("HELLX", "HELL", "HELLO!", "JELLO")]
        assert all(r < 1.0 for r in one_edit), (metric, one_edit)
        assert env.reward("HXLLX") < env.reward("HELLX") < 1.0
        assert env.reward("XXXXX") == 0.0
        assert 0.0 <= env.reward(env.initial_state()) < 1.0
    assert StringTargetEnv(target="HELLO").reward("HELXO") == 0.8
    assert StringTargetEnv(target="HELLO", metric="edit").reward("XHELLO") == pytest.approx(5 / 6)


def test_string_target_parsing_is_strict():
    env = StringTargetEnv(target="HELLO", max_chars=16)
    assert env.transition("?????", "\n  HELLO  \nmore text") == "HELLO"
    for bad in ["", "   ", "H" * 17, "HEL\x00LO", "HEL\u200dLO", "HEL\tLO"]:
        with pytest.raises(ValueError):
            env.reward(bad)
        with pytest.raises(ValueError):
            env.transition("?????", bad)
    with pytest.raises(ValueError, match="single line"):
        env.reward("HELLO\nHELLO")
    with pytest.raises(LLMKitError):
        StringTargetEnv(target="")
    with pytest.raises(LLMKitError):
        StringTargetEnv(target="HELLO", metric="cosine")


# ----------------------------------------------------------------------------- context and protocol


@pytest.mark.parametrize("env", [StringTargetEnv(), AutocorrelationEnv(n=8, q=10), ErdosMinOverlapEnv(n=8, q=10)],
                         ids=lambda e: e.name)
def test_envs_satisfy_the_protocol_and_state_problem_format_and_score(env):
    assert isinstance(env, DiscoveryEnv)
    state = env.initial_state()
    assert math.isfinite(env.reward(state)) and env.reward(state) >= 0
    assert env.transition(state, state) == state
    better = {"string_target": "HELLX", "autocorrelation_ac1": "10 6 5 5 5 5 6 10",
              "erdos_min_overlap": "2 5 8 10 10 8 5 2"}[env.name]
    context = env.context_from_archive(state, [state, "garbage\x00", better, better, ""])
    assert "ONLY" in context and state in context and better in context
    assert context.count(better) == 1 and "garbage" not in context
    assert f"{env.reward(state):.3f}" in context or f"{1 / env.reward(state):.6f}" in context
    assert "invalid" in env.context_from_archive("", [])


# ----------------------------------------------------------------------------- sandbox


def test_safe_reward_turns_exceptions_and_non_finite_results_into_zero(worker):
    reward, reason = safe_reward(ThrowingEnv(), "x", worker=worker)
    assert reward == 0.0 and "RuntimeError" in reason and "verifier exploded" in reason
    for state in ("nan", "inf"):
        reward, reason = safe_reward(NaNEnv(), state, worker=worker)
        assert reward == 0.0 and "not finite" in reason
    reward, reason = safe_reward(NaNEnv(), "str", worker=worker)
    assert reward == 0.0 and "not a real number" in reason
    state, reason = safe_transition(ThrowingEnv(), "x", "y", worker=worker)
    assert state is None and reason == "transition failed: ValueError: bad action"
    state, reason = safe_transition(NaNEnv(), "x", "y", worker=worker)
    assert state is None and "not a string" in reason
    assert safe_reward(_Env(), "abc", worker=worker) == (3.0, None)


@pytest.mark.slow
def test_safe_reward_kills_a_hanging_reward_and_the_next_call_works(worker):
    assert safe_reward(SleepingEnv(), "ok", worker=worker) == (1.0, None)  # worker up, module imported
    pid = worker.pid
    start = time.monotonic()
    reward, reason = safe_reward(SleepingEnv(), "hang", timeout_s=0.5, worker=worker)
    elapsed = time.monotonic() - start
    assert reward == 0.0 and "timed out after 0.5 s" in reason
    assert elapsed < 10, elapsed  # cut at the timeout, not after the 60 s sleep (slack for a loaded CI machine)
    assert worker.pid is None  # killed
    assert safe_reward(SleepingEnv(), "ok", worker=worker) == (1.0, None)
    assert worker.pid not in (None, pid)
    start = time.monotonic()
    state, reason = safe_transition(SleepingEnv(), "x", "hang", timeout_s=0.5, worker=worker)  # busy loop
    assert state is None and "timed out" in reason and time.monotonic() - start < 10
    assert safe_transition(SleepingEnv(), "x", "fine", worker=worker) == ("fine", None)


def test_the_worker_is_confined_in_memory_files_output_and_directory(tmp_path, capfd, monkeypatch):
    """A verifier allocated 3 GB, wrote into the trainer's directory and put 5 MB on its console."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLMKIT_TEST_CWD", str(tmp_path))  # read by the worker, which inherits it
    worker = EnvWorker(memory_mb=256, file_mb=1)
    try:
        assert safe_reward(HostileEnv(), "cwd", worker=worker) == (1.0, None)  # not the trainer's directory
        workdir = worker._workdir
        assert safe_reward(HostileEnv(), "print", worker=worker) == (1.0, None)
        said = "".join(capfd.readouterr())
        assert "x" * 1000 not in said and "y" * 1000 not in said
        assert safe_reward(HostileEnv(), "write", worker=worker) == (1.0, None)
        assert not (tmp_path / "left.txt").exists() and (Path(workdir) / "left.txt").exists()
        reward, reason = safe_reward(HostileEnv(), "memory", worker=worker)
        assert reward == 0.0 and reason == "reward failed: MemoryError"
        reward, reason = safe_reward(HostileEnv(), "big file", worker=worker)
        assert reward == 0.0 and "File too large" in reason
        reward, reason = safe_reward(HostileEnv(), "bool", worker=worker)
        assert reward == 0.0 and "returned bool, not a real number" in reason
        assert safe_reward(_Env(), "ab", worker=worker) == (2.0, None)  # the same worker still serves
    finally:
        worker.close()
    assert not Path(workdir).exists()  # removed with the worker


@pytest.mark.slow
def test_a_killed_worker_takes_the_processes_it_started_along(tmp_path):
    """A hanging verifier's child (pid 6422) ran on after the kill, adopted by init."""
    worker = EnvWorker()
    try:
        reward, reason = safe_reward(HostileEnv(), f"fork {tmp_path / 'child'}", timeout_s=3.0, worker=worker)
        assert reward == 0.0 and "timed out" in reason
    finally:
        worker.close()
    child = int((tmp_path / "child").read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and Path(f"/proc/{child}").exists() and \
            Path(f"/proc/{child}/stat").read_text().split()[2] != "Z":
        time.sleep(0.1)
    assert not Path(f"/proc/{child}").exists() or Path(f"/proc/{child}/stat").read_text().split()[2] == "Z"


def test_safe_reward_survives_a_dying_worker(worker):
    reward, reason = safe_reward(DyingEnv(), "x", worker=worker)
    assert reward == 0.0 and "died" in reason and "exit code 3" in reason
    assert safe_reward(_Env(), "ab", worker=worker) == (2.0, None)


def test_safe_reward_default_worker_and_bad_arguments():
    assert safe_reward(AutocorrelationEnv(n=2, q=9), "1 2") == (pytest.approx(9 / 16), None)
    assert safe_reward(_Env(), 5)[0] == 0.0  # type: ignore[arg-type]
    reward, reason = safe_reward(lambda: None, "x")  # type: ignore[arg-type]
    assert reward == 0.0 and "pickle" in reason
    with pytest.raises(LLMKitError, match="timeout_s"):
        safe_reward(_Env(), "x", timeout_s=0)


# ----------------------------------------------------------------------------- load_env


def test_load_env_by_import_path():
    env = load_env("llmkit.discovery.envs.autocorrelation.AutocorrelationEnv", {"n": 8, "q": 50})
    assert isinstance(env, AutocorrelationEnv) and env.n == 8 and env.q == 50
    assert isinstance(load_env("llmkit.discovery.envs.StringTargetEnv", {"target": "ABC"}), StringTargetEnv)
    assert isinstance(load_env("llmkit.discovery.envs.erdos.ErdosMinOverlapEnv", None), ErdosMinOverlapEnv)


@pytest.mark.parametrize("class_path, init_args, match", [
    ("NoDots", {}, "not of the form"),
    ("llmkit..Env", {}, "not of the form"),
    ("llmkit.discovery.envs.nope.NopeEnv", {}, "cannot import module"),
    ("no_such_package_xyz.Env", {}, "cannot import module"),
    ("llmkit.discovery.envs.autocorrelation.NopeEnv", {}, "has no class"),
    ("tests.test_discovery_envs.not_a_class", {}, "not a class"),
    ("tests.test_discovery_envs.NoRewardEnv", {}, "does not satisfy the DiscoveryEnv protocol: missing"),
    ("collections.OrderedDict", {}, "missing name"),
    ("llmkit.discovery.envs.AutocorrelationEnv", {"bogus": 1}, "could not build"),
    ("llmkit.discovery.envs.AutocorrelationEnv", {"n": 0}, "n must be an integer"),
    ("llmkit.discovery.envs.AutocorrelationEnv", [1, 2], "must be a mapping"),
])
def test_load_env_failures_are_clear(class_path, init_args, match):
    with pytest.raises(LLMKitError, match=match):
        load_env(class_path, init_args)


def test_a_script_that_runs_the_worker_without_a_main_guard_is_told_to_add_one(tmp_path):
    """The spawned worker imports the main script again; at import time that script starts a worker
    of its own, which Python refuses: both processes' errors name the cure."""
    import subprocess
    import sys

    script = tmp_path / "no_guard.py"
    script.write_text("from llmkit.discovery.env import EnvWorker\n"
                      "from llmkit.discovery.envs.string_target import StringTargetEnv\n"
                      "ok, value = EnvWorker(start_timeout_s=30).call(StringTargetEnv('ab'), 'reward', ('ab',), 10.0)\n"
                      "if not ok:\n    raise SystemExit(value)\n")  # as TTTDiscoverModule raises
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    said = result.stdout + result.stderr
    assert result.returncode == 1 and "the worker process died while starting" in said
    assert said.count('run the Trainer under `if __name__ == "__main__":`') == 2  # the worker's and the script's


def test_the_environments_import_without_torch():
    """The worker imports them with each environment it unpickles, and again after every kill:
    through the package's objective, torch made that 1.0 s of its 1.04 s."""
    import subprocess
    import sys

    code = "import sys, llmkit.discovery.envs; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.stdout.strip() == "False"
