"""Archive of promising states with PUCT selection: TTT-Discover's reuse strategy.

TTT-Discover's reuse strategy (arXiv 2601.16175, Appendix A.2): instead of always
starting from the initial state ``s0``, every step picks start states from an archive of
earlier solutions by a PUCT score, samples rollouts from them, and adds the best new
solutions (top 2 per parent) back to the archive.

Score of a state ``s`` (the official code's form, test-time-training/discover)::

    score(s) = Q(s) + c * (R_max - R_min) * P(s) * sqrt(1 + T) / (1 + n(s))

- ``R(s)`` is the state's reward; ``R_max``/``R_min`` are the highest/lowest over the states
  found so far, the initial state left out once there are any, and their difference is at
  least ``MIN_REWARD_RANGE`` (1e-6): so the exploration term is in reward units. Both as the
  official code does: the initial state is a placeholder (an empty or random solution) whose
  poor reward would otherwise set ``R_min`` for good, making the exploration term as large as
  the whole climb from it; and with every reward equal the floor leaves a tiny bonus that
  still sends the next pick to the higher-ranked, less-visited state.
- ``m(s)`` is the best reward among the direct children of ``s`` recorded so far (every
  finite rollout reward from ``s`` counts, also those not kept in the archive); it is not
  propagated to grandparents. ``Q(s) = m(s)`` once ``s`` has a recorded child, else ``R(s)``
  (the paper takes the max, not the mean: what counts is the best outcome from a state).
- ``n(s)`` is the number of rollouts started from ``s`` or from any of its descendants:
  each rollout adds 1 to its parent and to every ancestor. ``T`` is the total number of
  rollouts so far. Failed rollouts (non-finite reward) count too: they spent a visit.
- ``P(s)`` is linear in the reward rank over the archive of ``N`` states: the best gets
  weight ``N``, the worst 1, normalised to sum 1 (equal rewards: the lower id ranks higher).

Another form of the bonus, ``sqrt(1 + T / (1 + n(s)))``, was considered. We follow the official
code (and AlphaZero's PUCT): there the bonus of a state shrinks like ``1 / (1 + n(s))`` as it is
expanded, so a state that has had its chances gives way to others; in that form the
bonus never falls below ``c * (R_max - R_min) * P(s)`` however often ``s`` was expanded, so the
top-ranked state keeps most of its bonus for good.

Size cap: after each batch, while the archive holds more than ``max_size`` states, the
lowest-reward *leaf* (a state with no child in the archive) is removed (equal rewards: the
newest goes first), except the initial state and the best state and its ancestors. Removing a
leaf can make its parent a leaf. So the initial state, the best state and every ancestor of a
remaining state stay, and lineages stay whole (:meth:`Archive.lineage` always reaches the
root). The cap can only be exceeded while the best state's lineage alone is longer than
``max_size`` (then every other state is gone): we keep the best solution rather than the cap.

Everything is plain Python; :meth:`Archive.to_dict` is JSON-able data for checkpoints and
``result.json``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from llmkit.errors import LLMKitError

MIN_REWARD_RANGE = 1e-6
"""The smallest ``R_max - R_min`` the PUCT score uses (the official code's floor)."""


@dataclasses.dataclass
class State:
    """One archived solution.

    Attributes:
        id: unique, increasing in creation order; the initial state is 0. Ids are never reused.
        text: the solution text (the state's payload, what a prompt shows the model).
        reward: ``R(s)``, finite.
        parent: id of the state it was sampled from; ``None`` for the initial state.
        depth: number of ancestors (0 for the initial state).
        visits: ``n(s)``, rollouts started from this state or any of its descendants.
        best_child_reward: ``m(s)``, best reward among its direct children so far, or ``None``.
        step: the archive's batch counter when the state was added (0 for the initial state).
    """

    id: int
    text: str
    reward: float
    parent: int | None
    depth: int
    visits: int = 0
    best_child_reward: float | None = None
    step: int = 0

    @property
    def q(self) -> float:
        """``Q(s)``: the best child reward once expanded, else the state's own reward."""
        return self.reward if self.best_child_reward is None else self.best_child_reward


class Archive:
    """States found so far, PUCT selection of start states and their statistics (see module docstring).

    Args:
        initial_text: text of the initial state ``s0`` (id 0, never removed).
        initial_reward: its reward ``R(s0)``.
        max_size: most states kept (about 1000 in the paper's code).
        c: exploration coefficient of the PUCT score.
        children_per_parent: new states kept per parent and batch (2 in the paper).
    """

    def __init__(
        self,
        initial_text: str,
        initial_reward: float,
        max_size: int = 1000,
        c: float = 1.0,
        children_per_parent: int = 2,
    ) -> None:
        if max_size < 1:
            raise LLMKitError(f"archive max_size must be >= 1, got {max_size}")
        if children_per_parent < 1:
            raise LLMKitError(f"archive children_per_parent must be >= 1, got {children_per_parent}")
        if not (math.isfinite(c) and c >= 0):
            raise LLMKitError(f"PUCT exploration coefficient c must be finite and >= 0, got {c}")
        if not math.isfinite(initial_reward):
            raise LLMKitError(f"the initial state's reward must be finite, got {initial_reward}")
        self.max_size = max_size
        self.c = c
        self.children_per_parent = children_per_parent
        self.states: dict[int, State] = {0: State(0, initial_text, float(initial_reward), None, 0)}
        self.total_rollouts = 0
        self.step = 0
        self.next_id = 1

    def __len__(self) -> int:
        return len(self.states)

    def get(self, state_id: int) -> State:
        """The state with id ``state_id``; :class:`LLMKitError` if the archive does not hold it."""
        if state_id not in self.states:
            raise LLMKitError(
                f"state id {state_id} is not in the archive (it holds {len(self.states)} states; "
                "a state removed by the size cap cannot be used as a parent)"
            )
        return self.states[state_id]

    def lineage(self, state_id: int) -> list[State]:
        """The path from the initial state down to ``state_id``, both included."""
        path = [self.get(state_id)]
        while path[-1].parent is not None:
            path.append(self.states[path[-1].parent])
        return path[::-1]

    def best(self) -> State:
        """The state with the highest reward (equal rewards: the earliest id)."""
        return max(self.states.values(), key=lambda s: (s.reward, -s.id))

    def prior(self) -> dict[int, float]:
        """``P(s)``: rank-linear over rewards, best ``N``, worst 1, normalised to sum 1."""
        ranked = sorted(self.states.values(), key=lambda s: (-s.reward, s.id))
        size = len(ranked)
        total = size * (size + 1) / 2
        return {state.id: (size - rank) / total for rank, state in enumerate(ranked)}

    def reward_range(self) -> float:
        """``R_max - R_min`` of the PUCT score: over the states other than the initial one (over
        the initial state alone while it is the only one), at least :data:`MIN_REWARD_RANGE`."""
        rewards = [s.reward for s in self.states.values() if s.id != 0] or [self.states[0].reward]
        return max(max(rewards) - min(rewards), MIN_REWARD_RANGE)

    def puct_scores(self) -> dict[int, float]:
        """``Q(s) + c (R_max - R_min) P(s) sqrt(1 + T) / (1 + n(s))`` for every state, by id."""
        scale = self.c * self.reward_range() * math.sqrt(1 + self.total_rollouts)
        prior = self.prior()
        return {sid: s.q + scale * prior[sid] / (1 + s.visits) for sid, s in self.states.items()}

    def select(self, k: int) -> list[State]:
        """Up to ``k`` start states, highest PUCT score first (equal scores: the higher reward, then
        the lower id).

        A state that is an ancestor or a descendant of one already picked in this call is
        skipped, so the picks are in different lineages; fewer than ``k`` come back when the
        archive runs out of unrelated states.
        """
        if k < 1:
            raise LLMKitError(f"select needs k >= 1 start states, got {k}")
        scores = self.puct_scores()
        children: dict[int, list[int]] = {}
        for state in self.states.values():
            if state.parent is not None:
                children.setdefault(state.parent, []).append(state.id)
        picked: list[State] = []
        blocked: set[int] = set()
        for sid in sorted(scores, key=lambda i: (-scores[i], -self.states[i].reward, i)):
            if sid in blocked:
                continue
            picked.append(self.states[sid])
            if len(picked) == k:
                break
            blocked.update(s.id for s in self.lineage(sid))
            stack = [sid]
            while stack:
                descendants = children.get(stack.pop(), [])
                blocked.update(descendants)
                stack.extend(descendants)
        return picked

    def record_batch(self, rollouts: Mapping[int, Sequence[tuple[str, float]]]) -> list[State]:
        """Record one step's rollouts, ``{parent_id: [(text, reward), ...]}``, and return the new states.

        For each parent: ``n`` of the parent and of every ancestor grows by the number of
        rollouts, ``T`` likewise, and ``m(parent)`` becomes the best finite reward seen among
        its children. Then the rollouts with a finite reward whose text is neither in the
        archive nor already taken in this batch are ranked by reward, and the best
        ``children_per_parent`` become new states. Finally the size cap is enforced.

        Record all parents picked by one :meth:`select` in one call: the size cap runs once,
        after all of them, so no picked parent is removed before its rollouts are in.
        """
        parents = [self.get(parent_id) for parent_id in rollouts]
        self.step += 1
        texts = {s.text for s in self.states.values()}
        added: list[State] = []
        for parent in parents:
            batch = [(str(text), float(reward)) for text, reward in rollouts[parent.id]]
            for ancestor in self.lineage(parent.id):
                ancestor.visits += len(batch)
            self.total_rollouts += len(batch)
            finite = sorted(((text, reward) for text, reward in batch if math.isfinite(reward)), key=lambda tr: -tr[1])
            if finite and (parent.best_child_reward is None or finite[0][1] > parent.best_child_reward):
                parent.best_child_reward = finite[0][1]
            kept = 0
            for text, reward in finite:
                if kept == self.children_per_parent:
                    break
                if text in texts:
                    continue
                texts.add(text)
                state = State(self.next_id, text, reward, parent.id, parent.depth + 1, step=self.step)
                self.states[state.id] = state
                self.next_id += 1
                added.append(state)
                kept += 1
        self._enforce_size()
        return [state for state in added if state.id in self.states]

    def _enforce_size(self) -> None:
        """Remove the lowest-reward leaves outside the best state's lineage until ``max_size`` states remain."""
        protected = {state.id for state in self.lineage(self.best().id)}
        child_count: dict[int, int] = {}
        for state in self.states.values():
            if state.parent is not None:
                child_count[state.parent] = child_count.get(state.parent, 0) + 1
        while len(self.states) > self.max_size:
            leaves = [s for s in self.states.values() if s.id not in protected and not child_count.get(s.id)]
            if not leaves:
                return
            worst = min(leaves, key=lambda s: (s.reward, -s.id))
            del self.states[worst.id]
            child_count[worst.parent] -= 1

    def to_dict(self) -> dict[str, Any]:
        """Settings, counters and every state as plain data (``json.dumps`` takes it as is)."""
        return {
            "max_size": self.max_size,
            "c": self.c,
            "children_per_parent": self.children_per_parent,
            "total_rollouts": self.total_rollouts,
            "step": self.step,
            "next_id": self.next_id,
            "states": [dataclasses.asdict(state) for state in self.states.values()],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Archive:
        """The archive that :meth:`to_dict` described."""
        try:
            states = [State(**state) for state in data["states"]]
            archive = cls(
                states[0].text,
                states[0].reward,
                max_size=data["max_size"],
                c=data["c"],
                children_per_parent=data["children_per_parent"],
            )
            archive.total_rollouts = data["total_rollouts"]
            archive.step = data["step"]
            archive.next_id = data["next_id"]
        except (KeyError, TypeError, IndexError) as err:
            raise LLMKitError(f"not an archive written by Archive.to_dict: {err!r}") from err
        if states[0].id != 0 or states[0].parent is not None:
            raise LLMKitError("not an archive written by Archive.to_dict: its first state is not the initial state")
        archive.states = {state.id: state for state in states}
        return archive
