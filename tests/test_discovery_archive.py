"""TTT-Discover archive: PUCT scores by hand, selection, statistics, children, size cap, round trip; consolidation
of a damaged archive.json or result.json."""

import json
import math

import pytest

from llmkit.cli import main
from llmkit.discovery import Archive, State
from llmkit.discovery.archive import MIN_REWARD_RANGE
from llmkit.discovery.consolidate import consolidate
from llmkit.errors import LLMKitError


def ids(states: list[State]) -> list[int]:
    return [state.id for state in states]


def record_rollouts(archive: Archive, parent_id: int, children: list[tuple[str, float]]) -> list[State]:
    """The rollouts ``(text, reward)`` sampled from one parent, as one step's batch."""
    return archive.record_batch({parent_id: children})


def fields(state: State) -> tuple:
    return (state.id, state.text, state.reward, state.parent, state.depth, state.visits, state.step)


def test_puct_scores_match_hand_computation_with_rank_linear_prior():
    archive = Archive("s0", 1.0, c=1.0)
    record_rollouts(archive, 0, [("b", 3.0), ("c", 2.0), ("d", 0.5)])  # keeps b (id 1) and c (id 2)
    # ranks by reward: b 3 -> weight 3, c 2 -> weight 2, s0 1 -> weight 1; sum 6.
    assert archive.prior() == pytest.approx({1: 3 / 6, 2: 2 / 6, 0: 1 / 6})
    # R_max - R_min = 3 - 2 over the states found (s0's 1.0 left out), T = 3 so sqrt(1 + T) = 2;
    # n(s0) = 3, n(b) = n(c) = 0; Q(s0) = m(s0) = 3.
    expected = {
        0: 3.0 + 1.0 * 1 * (1 / 6) * 2 / (1 + 3),
        1: 3.0 + 1.0 * 1 * (3 / 6) * 2 / (1 + 0),
        2: 2.0 + 1.0 * 1 * (2 / 6) * 2 / (1 + 0),
    }
    assert archive.reward_range() == 1.0
    assert archive.puct_scores() == pytest.approx(expected)
    half = Archive.from_dict({**archive.to_dict(), "c": 0.5})
    assert half.puct_scores()[1] == pytest.approx(3.0 + 0.5 * 1 * (3 / 6) * 2)


def test_the_initial_states_reward_is_left_out_of_the_range():
    # A placeholder start far below what is found must not set R_min: the range is 0.2, not 100.2.
    archive = Archive("s0", -100.0)
    assert archive.reward_range() == MIN_REWARD_RANGE  # s0 alone
    record_rollouts(archive, 0, [("a", 0.5), ("b", 0.3)])
    assert archive.reward_range() == pytest.approx(0.2)
    assert archive.puct_scores()[1] == pytest.approx(0.5 + 0.2 * (3 / 6) * math.sqrt(3))
    record_rollouts(archive, 1, [("c", -200.0)])  # a state found below s0 counts like any other
    assert archive.reward_range() == pytest.approx(200.5)


def test_prior_ties_rank_lower_id_first():
    archive = Archive("s0", 1.0)
    record_rollouts(archive, 0, [("a", 1.0), ("b", 1.0)])
    assert archive.prior() == pytest.approx({0: 3 / 6, 1: 2 / 6, 2: 1 / 6})


def test_equal_rewards_leave_the_floor_as_the_range_so_less_visited_states_go_first():
    archive = Archive("s0", 1.0, c=5.0)
    assert archive.puct_scores() == {0: 1.0 + 5.0 * MIN_REWARD_RANGE}
    record_rollouts(archive, 0, [("a", 1.0), ("b", 1.0)])  # R_max == R_min, T = 2, n(s0) = 2
    bonus = 5.0 * MIN_REWARD_RANGE * math.sqrt(3)
    assert archive.puct_scores() == pytest.approx({0: 1.0 + bonus * (3 / 6) / 3, 1: 1.0 + bonus * (2 / 6),
                                                   2: 1.0 + bonus * (1 / 6)}, rel=1e-12, abs=0)
    assert ids(archive.select(1)) == [1]  # not the root again: it has had two rollouts


def test_q_switches_from_own_reward_to_best_direct_child_reward():
    archive = Archive("s0", 1.0)
    record_rollouts(archive, 0, [("bad", math.nan)])  # a failed rollout counts but gives no child reward
    root = archive.get(0)
    assert (root.visits, archive.total_rollouts, root.best_child_reward, root.q) == (1, 1, None, 1.0)
    assert archive.puct_scores() == pytest.approx({0: 1.0 + MIN_REWARD_RANGE * math.sqrt(2) / 2}, rel=1e-12, abs=0)

    record_rollouts(archive, 0, [("b", 0.5), ("c", 0.25)])
    assert root.best_child_reward == 0.5 and root.q == 0.5  # the max child reward, even when lower than R(s)
    # R_max - R_min = 0.25 (b and c), T = 3, P: s0 3/6, b 2/6, c 1/6; n(s0) = 3, n(b) = n(c) = 0.
    assert archive.puct_scores() == pytest.approx(
        {0: 0.5 + 0.25 * (3 / 6) * 2 / 4, 1: 0.5 + 0.25 * (2 / 6) * 2, 2: 0.25 + 0.25 * (1 / 6) * 2}
    )
    record_rollouts(archive, 1, [("c", 4.0)])
    assert archive.get(1).q == 4.0
    assert root.best_child_reward == 0.5  # m(s) is over direct children only, not grandchildren
    record_rollouts(archive, 0, [("d", 0.7), ("e", 0.2)])
    assert root.best_child_reward == 0.7


def test_visits_propagate_to_every_ancestor_and_t_counts_rollouts():
    archive = Archive("s0", 0.0)
    record_rollouts(archive, 0, [("a", 1.0)])
    record_rollouts(archive, 1, [("b", 2.0), ("x", math.inf), ("y", 0.1)])
    record_rollouts(archive, 2, [("c", 3.0), ("d", 2.5), ("e", 2.6), ("f", 2.7)])
    by_text = {state.text: state for state in archive.states.values()}
    assert sorted(by_text) == ["a", "b", "c", "f", "s0", "y"]
    visits = {text: state.visits for text, state in by_text.items()}
    assert visits == {"s0": 1 + 3 + 4, "a": 3 + 4, "b": 4, "y": 0, "c": 0, "f": 0}
    assert archive.total_rollouts == 8 and archive.step == 3
    assert [s.text for s in archive.lineage(by_text["c"].id)] == ["s0", "a", "b", "c"]
    assert (by_text["c"].depth, by_text["c"].step, by_text["c"].parent) == (3, 3, by_text["b"].id)


def test_select_orders_by_score_and_skips_lineages():
    archive = Archive("s0", 0.0, c=0.0)  # c = 0: scores are Q
    record_rollouts(archive, 0, [("a", 5.0), ("b", 4.0)])  # a = 1, b = 2
    record_rollouts(archive, 1, [("a1", 6.0), ("a2", 1.0)])  # a1 = 3, a2 = 4
    # Q: s0 5 (m), a 6 (m), b 4, a1 6, a2 1; the tie a / a1 goes to the higher reward, a1.
    assert archive.puct_scores() == {0: 5.0, 1: 6.0, 2: 4.0, 3: 6.0, 4: 1.0}
    assert ids(archive.select(1)) == [3]
    # a1 blocks its ancestors a and s0; b and a1's sibling a2 are not in its lineage.
    assert ids(archive.select(5)) == [3, 2, 4]
    with pytest.raises(LLMKitError, match="k >= 1"):
        archive.select(0)


def test_select_skips_descendants_and_returns_fewer_than_k():
    archive = Archive("s0", 0.0, c=0.0)
    record_rollouts(archive, 0, [("a", 2.0), ("b", 1.0), ("s0", 3.0)])  # the duplicate sets m(s0) = 3
    assert archive.puct_scores() == {0: 3.0, 1: 2.0, 2: 1.0}
    assert ids(archive.select(3)) == [0]


def test_top_children_kept_and_deduplicated():
    archive = Archive("s0", 0.0)
    batch = [("s0", 9.0), ("p", 5.0), ("p", 5.5), ("q", 4.0), ("r", 3.0), ("z", math.inf), ("w", math.nan)]
    new = record_rollouts(archive, 0, batch)
    assert [(s.text, s.reward, s.parent) for s in new] == [("p", 5.5, 0), ("q", 4.0, 0)]
    assert len(archive) == 3
    assert archive.get(0).best_child_reward == 9.0  # the duplicate still was a rollout reward from s0
    assert archive.get(0).visits == len(batch)
    assert archive.best().text == "p"

    three = Archive("s0", 0.0, children_per_parent=3)
    assert [s.text for s in record_rollouts(three, 0, [("a", 1.0), ("b", 3.0), ("c", 2.0), ("d", 0.0)])] == [
        "b",
        "c",
        "a",
    ]
    # Within one batch the same text from another parent is a duplicate too.
    both = three.record_batch({1: [("w", 1.0)], 2: [("w", 2.0), ("v", 0.5)]})
    assert [(s.text, s.parent) for s in both] == [("w", 1), ("v", 2)]


def test_size_cap_keeps_best_root_and_ancestors():
    archive = Archive("s0", 0.0, max_size=4)
    record_rollouts(archive, 0, [("a", 1.0), ("b", 2.0)])  # ids by reward: b = 1, a = 2
    record_rollouts(archive, 2, [("a1", 10.0), ("a2", 0.5)])  # a1 = 3, a2 = 4: a2 is the worst leaf
    assert sorted(s.text for s in archive.states.values()) == ["a", "a1", "b", "s0"]
    record_rollouts(archive, 3, [("a11", 20.0)])
    # a (reward 1) < b (reward 2) but a is an ancestor of a kept state; b is the worst leaf.
    assert sorted(s.text for s in archive.states.values()) == ["a", "a1", "a11", "s0"]
    assert archive.get(0).reward == 0.0
    # The best state's lineage alone is longer than the cap: the best is kept, the cap waits.
    new = record_rollouts(archive, 5, [("x", 30.0)])
    assert [s.text for s in new] == ["x"] and len(archive) == 5
    record_rollouts(archive, 0, [("y", 50.0)])  # y is now best: x goes, then a11 becomes the worst leaf
    assert sorted(s.text for s in archive.states.values()) == ["a", "a1", "s0", "y"]
    assert archive.best().text == "y"
    for state in archive.states.values():
        assert archive.lineage(state.id)[0].id == 0


def test_unknown_parent_and_bad_settings_raise():
    archive = Archive("s0", 0.0)
    with pytest.raises(LLMKitError, match="state id 7"):
        archive.record_batch({0: [("a", 1.0)], 7: [("b", 1.0)]})
    assert archive.total_rollouts == 0 and len(archive) == 1  # nothing recorded
    with pytest.raises(LLMKitError, match="max_size"):
        Archive("s0", 0.0, max_size=0)
    with pytest.raises(LLMKitError, match="finite"):
        Archive("s0", math.nan)
    with pytest.raises(LLMKitError, match="Archive.to_dict"):
        Archive.from_dict({"states": []})


def test_round_trip_through_json():
    archive = Archive("s0", 0.0, max_size=6, c=0.7, children_per_parent=2)
    record_rollouts(archive, 0, [("a", 1.0), ("b", 2.0), ("c", 0.5)])
    record_rollouts(archive, 2, [("b1", 3.0), ("b2", math.nan)])
    data = json.loads(json.dumps(archive.to_dict(), allow_nan=False))
    restored = Archive.from_dict(data)
    assert restored.to_dict() == archive.to_dict()
    assert restored.puct_scores() == archive.puct_scores()
    assert ids(restored.select(3)) == ids(archive.select(3))
    batch = [("n1", 4.0), ("n2", 0.1)]
    assert [fields(s) for s in record_rollouts(restored, 1, batch)] == [
        fields(s) for s in record_rollouts(archive, 1, batch)
    ]
    assert restored.to_dict() == archive.to_dict()


DAMAGED = "the file is damaged (not as `llmkit ttt fit` writes it): rerun the discovery or restore it"


def damaged_run(run, result=None, state=None, states=None):
    """A run directory as `llmkit ttt fit` leaves it (archive.json from Archive.to_dict, result.json's keys that
    consolidation reads), with ``result`` and ``state`` (of the state at index 1) merged in, or ``states`` instead."""
    archive = Archive("x = 0", 0.0)
    record_rollouts(archive, 0, [("x = 1", 1.0), ("x = 2", math.nan)])  # a failed rollout: not archived
    data = archive.to_dict()
    data["states"][1].update(state or {})
    run.mkdir()
    (run / "archive.json").write_text(json.dumps({**data, "states": data["states"] if states is None else states}))
    (run / "result.json").write_text(json.dumps({"problem": "toy", "prompt": "find x", "initial_reward": 0.0,
                                                 **(result or {})}))
    return run


@pytest.mark.parametrize(("result", "state", "states", "message"), [
    (None, {"text": None}, None, "{run}/archive.json, states[1]: 'text' is null, not a string"),
    (None, {"reward": True}, None, "{run}/archive.json, states[1]: 'reward' is a boolean, not a number"),
    (None, {"reward": "0.5"}, None, "{run}/archive.json, states[1]: 'reward' is a string, not a number"),
    (None, {"id": 1.0}, None, "{run}/archive.json, states[1]: 'id' is a number, not an integer"),
    (None, None, [{"id": 0}, "x = 1"], "{run}/archive.json, states[1] is a string, not an object"),
    (None, None, {"0": {}}, "{run}/archive.json: 'states' is an object, not an array"),
    ({"prompt": ["find x"]}, None, None, "{run}/result.json: 'prompt' is an array, not a string"),
    ({"initial_reward": None}, None, None, "{run}/result.json: 'initial_reward' is null, not a number"),
])
def test_consolidate_refuses_a_damaged_run_in_one_line_and_writes_nothing(result, state, states, message, tmp_path,
                                                                         capsys):
    """A state whose text was null became a line with "demonstration": null (sdft fit failed on the file), a
    boolean reward was written as "reward": true, and a reward "0.5" stopped consolidate with a TypeError
    traceback: each key is checked, and the message names the file, the state and the key."""
    run, out = damaged_run(tmp_path / "run", result, state, states), tmp_path / "found.jsonl"
    assert main(["consolidate", "--run", str(run), "--out", str(out)]) == 1
    assert capsys.readouterr().err == f"llmkit: error: {message.format(run=run)}; {DAMAGED}\n"
    assert not out.exists()
    out.write_text("earlier examples\n")  # an earlier --out file stays as it was, and no temp file is left
    assert main(["consolidate", "--run", str(run), "--out", str(out)]) == 1
    assert out.read_text() == "earlier examples\n" and sorted(p.name for p in tmp_path.iterdir()) == [out.name, "run"]


def test_consolidate_names_a_missing_key_and_its_file(tmp_path):
    run = damaged_run(tmp_path / "run", states=[{"id": 0}, {"id": 1, "text": "x = 1"}])
    with pytest.raises(LLMKitError) as err:
        consolidate([run])
    assert str(err.value) == f"{run / 'archive.json'}, states[1]: no 'reward' key; {DAMAGED}"


def test_consolidate_skips_a_non_finite_reward_and_takes_an_integer_one(tmp_path):
    """NaN and infinite rewards (written as NaN / Infinity) qualify no state, as before; an integer reward counts."""
    states = [{"id": 0, "reward": 0, "text": "x = 0"}, {"id": 1, "reward": math.nan, "text": "x = 1"},
              {"id": 2, "reward": math.inf, "text": "x = 2"}, {"id": 3, "reward": 2, "text": "x = 3"}]
    run = damaged_run(tmp_path / "run", states=states)
    assert [(e["demonstration"], e["reward"]) for e in consolidate([run], top=3)] == [("x = 3", 2)]
