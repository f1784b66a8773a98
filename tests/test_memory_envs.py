"""memory_envs: registration, env_checker, seeding, the exact reward rules, parameter validation,
observation flattening."""

from __future__ import annotations

import itertools
import subprocess
import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces
from gymnasium.utils.env_checker import check_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import memory_envs
from conftest import script_env
from memory_envs import FlattenObservation, MemoryTaskEnv, PassiveTMazeEnv

# Every env memory_envs registers, including ones added later by other modules' authors.
REGISTERED = sorted(spec.id for spec in gym.registry.values()
                    if isinstance(spec.entry_point, str) and spec.entry_point.startswith("memory_envs:"))
# Keyword arguments that keep an env small where its defaults are large (add ids as needed).
SMALL_KWARGS: dict[str, dict] = {}

HYP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make(env_id: str, **kwargs) -> gym.Env:
    return gym.make(env_id, **{**SMALL_KWARGS.get(env_id, {}), **kwargs})


def test_the_foundation_envs_are_registered():
    assert {"MemoryTask-v0", "PassiveTMaze-v0"} <= set(REGISTERED)


# ---------------------------------------------------------------------------------------
# Every registered env
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("env_id", REGISTERED)
@pytest.mark.parametrize("render_mode", [None, "rgb_array"])
def test_check_env(env_id, render_mode):
    env = make(env_id)
    if render_mode not in [None, *env.metadata.get("render_modes", [])]:
        pytest.skip(f"{env_id} has no {render_mode} rendering")
    env = make(env_id, render_mode=render_mode)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped)
    assert [str(w.message) for w in caught] == []


def plain(x):
    """An observation or action as nested lists/numbers, comparable with ==."""
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(plain(v) for v in x)
    return np.asarray(x).tolist()


def rollout(env: gym.Env, seed: int, n_steps: int = 60) -> list:
    """Observations, rewards and flags of ``n_steps`` steps (resetting without a seed in between);
    actions come from the action space seeded alike for every call, so only the env's seeding
    can make two rollouts differ."""
    env.action_space.seed(0)
    obs, _ = env.reset(seed=seed)
    traj = [plain(obs)]
    for _ in range(n_steps):
        obs, reward, term, trunc, info = env.step(env.action_space.sample())
        traj.append((plain(obs), float(reward), bool(term), bool(trunc), info.get("is_success")))
        if term or trunc:
            obs, _ = env.reset()
            traj.append(plain(obs))
    return traj


SEED_CASES = [(env_id, {}) for env_id in REGISTERED] + [("MemoryTask-v0", {"difficulty": 1}),
                                                          ("MemoryTask-v0", {"difficulty": 1, "cue_time": "random"})]


@pytest.mark.parametrize("env_id,kwargs", SEED_CASES, ids=[f"{e}-{k}" for e, k in SEED_CASES])
def test_same_seed_same_trajectory(env_id, kwargs):
    assert rollout(make(env_id, **kwargs), 7) == rollout(make(env_id, **kwargs), 7)


@pytest.mark.parametrize("env_id,kwargs", [("MemoryTask-v0", {}), ("MemoryTask-v0", {"difficulty": 1}),
                                           ("PassiveTMaze-v0", {"length": 3})])
def test_different_seeds_different_trajectories(env_id, kwargs):
    trajectories = {repr(rollout(make(env_id, **kwargs), seed)) for seed in range(10)}
    # The original MemoryTaskEnv ignored its seed; here each seed draws its own targets.
    assert len(trajectories) >= 5


def test_reset_without_seed_continues_the_rng():
    env = MemoryTaskEnv(delay=1, difficulty=1)
    env.reset(seed=0)
    firsts = [tuple(env.reset()[0]) for _ in range(30)]
    assert len(set(firsts)) > 1


def test_make_with_module_prefix_in_a_fresh_interpreter(tmp_path):
    code = ("import gymnasium as gym\n"
            "e = gym.make('memory_envs:MemoryTask-v0', delay=3)\n"
            "o, _ = e.reset(seed=0)\n"
            "t = gym.make('memory_envs:PassiveTMaze-v0', length=4)\n"
            "print(e.spec.id, e.unwrapped.delay, o.shape, t.unwrapped.length)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=script_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["MemoryTask-v0", "3", "(3,)", "4"]


def test_defaults():
    env = gym.make("MemoryTask-v0").unwrapped
    assert (env.delay, env.difficulty) == (8, 0)
    assert env.observation_space == spaces.Box(0, 1, (3,), np.float32)
    assert env.action_space == spaces.Discrete(2)
    tmaze = gym.make("PassiveTMaze-v0").unwrapped
    assert tmaze.length == 10 and tmaze.penalty == pytest.approx(-0.1)
    assert tmaze.observation_space == spaces.Box(-1, 1, (2,), np.float32)
    assert tmaze.action_space == spaces.Discrete(4)


# ---------------------------------------------------------------------------------------
# MemoryTask-v0
# ---------------------------------------------------------------------------------------
def play_memory_task(env: MemoryTaskEnv, seed: int, actions) -> tuple[int, list[float]]:
    """Play one episode and check every step against the documented rule; returns the target
    and all distractor values seen."""
    delay, difficulty = env.delay, env.difficulty
    assert len(actions) == delay
    obs, info = env.reset(seed=seed)
    assert obs.dtype == np.float32 and obs.shape == (3,)
    target = obs[0]
    assert target in (0.0, 1.0) and obs[2] == 0.0
    distractors = [float(obs[1])]
    for t, action in enumerate(actions, start=1):
        obs, reward, term, trunc, info = env.step(action)
        assert obs.dtype == np.float32 and obs[2] == 0.0 and set(obs[:2]) <= {0.0, 1.0}
        distractors += [float(obs[0]), float(obs[1])]
        assert trunc is False
        if t < delay:
            assert (reward, term) == (0.0, False), f"step {t} of {delay}"
            assert "is_success" not in info
        else:
            success = action == int(target)
            assert term is True
            assert reward == (1.0 if success else -1.0)
            assert info["is_success"] == success
    if difficulty == 0:
        assert set(distractors) == {0.0}
    return int(target), distractors


@pytest.mark.parametrize("difficulty", [0, 1])
@pytest.mark.parametrize("delay", [1, 2, 3, 4])
def test_memory_task_exhaustive(delay, difficulty):
    env = MemoryTaskEnv(delay=delay, difficulty=difficulty)
    targets, distractors = set(), []
    for actions in itertools.product([0, 1], repeat=delay):
        for seed in range(4):
            target, seen = play_memory_task(env, seed, actions)
            targets.add(target)
            distractors += seen
    assert targets == {0, 1}
    if difficulty == 1:
        assert set(distractors) == {0.0, 1.0}
        assert 0.3 < np.mean(distractors) < 0.7


@HYP
@given(difficulty=st.sampled_from([0, 1]), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_memory_task_property(difficulty, seed, data):
    delay = data.draw(st.integers(5, 300), label="delay")
    actions = data.draw(st.lists(st.integers(0, 1), min_size=delay, max_size=delay), label="actions")
    play_memory_task(MemoryTaskEnv(delay=delay, difficulty=difficulty), seed, actions)


def test_memory_task_optimal_and_chance():
    env = MemoryTaskEnv(delay=6, difficulty=1)
    returns_opt, returns_const = [], []
    for seed in range(200):
        obs, _ = env.reset(seed=seed)
        target = int(obs[0])
        for _ in range(5):
            env.step(0)
        returns_opt.append(env.step(target)[1])
        env.reset(seed=seed)
        for _ in range(5):
            env.step(0)
        returns_const.append(env.step(1)[1])
    assert np.mean(returns_opt) == 1.0
    assert abs(np.mean(returns_const)) < 0.2  # a fixed answer is right half of the time


def play_random_cue(env: MemoryTaskEnv, seed: int, actions) -> tuple[int, int]:
    """One episode of ``cue_time="random"`` checked against its rule; returns (cue step, target)."""
    obs, info = env.reset(seed=seed)
    cue_step, seen = info["cue_step"], [obs]
    assert 0 <= cue_step < max(1, env.delay // 2)
    for t, action in enumerate(actions, start=1):
        obs, reward, term, trunc, info = env.step(action)
        assert info["cue_step"] == cue_step and trunc is False
        seen.append(obs)
        assert term == (t == env.delay) and (reward == 0.0) == (t < env.delay)
    marks = [t for t, o in enumerate(seen) if o[2] != 0.0]
    assert marks == [cue_step] and seen[cue_step][2] == 1.0          # marked once, at the reported step
    target = int(seen[cue_step][0])
    assert reward == (1.0 if actions[-1] == target else -1.0) and info["is_success"] == (actions[-1] == target)
    if env.difficulty == 0:                                            # nothing else is non-zero
        assert all(not o.any() for t, o in enumerate(seen) if t != cue_step)
    return cue_step, target


@HYP
@given(difficulty=st.sampled_from([0, 1]), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_random_cue_property(difficulty, seed, data):
    delay = data.draw(st.integers(1, 300), label="delay")
    actions = data.draw(st.lists(st.integers(0, 1), min_size=delay, max_size=delay), label="actions")
    play_random_cue(MemoryTaskEnv(delay=delay, difficulty=difficulty, cue_time="random"), seed, actions)


def test_random_cue_covers_the_first_half_uniformly_and_is_seeded():
    env = MemoryTaskEnv(delay=16, difficulty=1, cue_time="random")
    steps = [play_random_cue(env, seed, [0] * 16)[0] for seed in range(800)]
    counts = np.bincount(steps, minlength=8)
    assert len(counts) == 8 and counts.min() > 60                     # every step of 0..7, ~100 each
    targets = [play_random_cue(env, seed, [0] * 16)[1] for seed in range(200)]
    assert 0.35 < np.mean(targets) < 0.65
    again = [play_random_cue(env, seed, [0] * 16)[0] for seed in range(800)]
    assert again == steps


def test_random_cue_passes_check_env():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(gym.make("MemoryTask-v0", delay=9, difficulty=1, cue_time="random").unwrapped)
    assert [str(w.message) for w in caught] == []


def test_start_cue_is_unchanged_by_the_cue_time_option():
    a, b = MemoryTaskEnv(delay=7, difficulty=1), MemoryTaskEnv(delay=7, difficulty=1, cue_time="start")
    assert rollout(a, 3, 40) == rollout(b, 3, 40)
    assert b.reset(seed=0)[1] == {"cue_step": 0}


def test_memory_task_rejects_invalid_actions():
    env = MemoryTaskEnv(delay=3)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="action"):
        env.step(2)


# ---------------------------------------------------------------------------------------
# PassiveTMaze-v0: an independent reference of the docstring's rules
# ---------------------------------------------------------------------------------------
class RefTMaze:
    """Written from the docstring only. Corridor x = 0..L, junction at x = L, arms y = +-1 there;
    episode = L + 1 steps; actions 0 right, 1 up, 2 left, 3 down; walls leave the agent in place."""

    def __init__(self, length: int, goal: int, penalty: float | None = None):
        self.L, self.goal = length, goal
        self.penalty = -1.0 / length if penalty is None else penalty
        self.x = self.y = self.t = 0

    def obs(self) -> list[float]:
        if self.x == self.L:
            return [1.0, float(self.y)]
        if self.x == 0 and self.t == 0:
            return [0.0, float(self.goal)]
        return [0.0, 0.0]

    def step(self, action: int):
        self.t += 1
        if action == 0 and self.y == 0 and self.x < self.L:
            self.x += 1
        elif action == 2 and self.y == 0 and self.x > 0:
            self.x -= 1
        elif action == 1 and self.x == self.L and self.y < 1:
            self.y += 1
        elif action == 3 and self.x == self.L and self.y > -1:
            self.y -= 1
        if self.t == self.L + 1:
            success = self.y == self.goal
            return self.obs(), (1.0 if success else 0.0), True, success
        return self.obs(), (self.penalty if self.x < self.t else 0.0), False, None


def tmaze_seeds(length: int) -> dict[int, int]:
    """A seed for each goal side (read from the cue)."""
    env, found = PassiveTMazeEnv(length=length), {}
    for seed in range(100):
        found.setdefault(int(env.reset(seed=seed)[0][1]), seed)
    assert set(found) == {-1, 1}
    return found


def check_tmaze_episode(env: PassiveTMazeEnv, seed: int, actions, penalty=None) -> tuple[float, bool]:
    obs, info = env.reset(seed=seed)
    goal = int(obs[1])
    assert goal in (-1, 1) and obs[0] == 0.0 and info["cue_step"] == 0
    ref = RefTMaze(env.length, goal, penalty)
    total = 0.0
    for t, action in enumerate(actions, start=1):
        obs, reward, term, trunc, info = env.step(action)
        r_obs, r_reward, r_term, r_success = ref.step(action)
        assert obs.dtype == np.float32
        assert obs.tolist() == r_obs, f"t={t} actions={actions}"
        assert reward == pytest.approx(r_reward), f"t={t} actions={actions}"
        assert (term, trunc) == (r_term, False), f"t={t} actions={actions}"
        assert info.get("is_success") == r_success
        total += reward
    assert term, "an episode is exactly length + 1 steps"
    return total, bool(info["is_success"])


@pytest.mark.parametrize("length", [1, 2, 3])
def test_tmaze_exhaustive(length):
    env = PassiveTMazeEnv(length=length)
    seeds = tmaze_seeds(length)
    outcomes = set()
    for goal, seed in seeds.items():
        for actions in itertools.product(range(4), repeat=length + 1):
            outcomes.add(check_tmaze_episode(env, seed, actions)[1])
    assert outcomes == {True, False}


@HYP
@given(seed=st.integers(0, 2**31 - 1), penalty=st.sampled_from([None, 0.0, -0.5]), data=st.data())
def test_tmaze_property(seed, penalty, data):
    length = data.draw(st.integers(4, 60), label="length")
    # Mostly "right" so that episodes reach the junction and the arms, not only the wall.
    actions = data.draw(st.lists(st.sampled_from([0, 0, 0, 0, 0, 1, 2, 3]), min_size=length + 1,
                                 max_size=length + 1), label="actions")
    kwargs = {} if penalty is None else {"penalty": penalty}
    check_tmaze_episode(PassiveTMazeEnv(length=length, **kwargs), seed, actions, penalty)


@pytest.mark.parametrize("length", [1, 5, 10, 50])
def test_tmaze_optimal_policy(length):
    env = PassiveTMazeEnv(length=length)
    for seed in tmaze_seeds(length).values():
        obs, _ = env.reset(seed=seed)
        arm = 1 if obs[1] > 0 else 3
        total = 0.0
        for action in [0] * length + [arm]:
            obs, reward, term, trunc, info = env.step(action)
            total += reward
        assert term and info["is_success"] is True
        assert total == pytest.approx(1.0)


def test_tmaze_lagging_is_penalised():
    env = PassiveTMazeEnv(length=4)
    env.reset(seed=0)
    rewards = [env.step(2)[1] for _ in range(4)]  # bump into the start wall: lag 1, 2, 3, 4
    assert rewards == pytest.approx([-0.25] * 4)


# The observations a memoryless policy can see in the T-Maze.
TMAZE_OBS = [(0.0, 1.0), (0.0, -1.0), (0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (1.0, -1.0)]


def tmaze_success_probability(length: int, policy: dict) -> float:
    """Exact success rate of a stochastic memoryless policy obs -> action probabilities, by
    enumerating every action sequence on the real env (goal sides equally likely)."""
    env, total = PassiveTMazeEnv(length=length), 0.0
    for seed in tmaze_seeds(length).values():
        for actions in itertools.product(range(4), repeat=length + 1):
            obs, _ = env.reset(seed=seed)
            prob = 1.0
            for action in actions:
                prob *= policy[tuple(obs.tolist())][action]
                if prob == 0.0:
                    break
                obs, _, _, _, info = env.step(action)
            if prob > 0.0 and info["is_success"]:
                total += 0.5 * prob
    return total


@pytest.mark.parametrize("length", [1, 2])
def test_tmaze_memoryless_deterministic_policies_reach_exactly_half(length):
    best = 0.0
    env = PassiveTMazeEnv(length=length)
    seeds = tmaze_seeds(length)
    for choice in itertools.product(range(4), repeat=len(TMAZE_OBS)):
        table = dict(zip(TMAZE_OBS, choice))
        wins = 0
        for seed in seeds.values():
            obs, _ = env.reset(seed=seed)
            for _ in range(length + 1):
                obs, _, term, _, info = env.step(table[tuple(obs.tolist())])
            wins += info["is_success"]
        best = max(best, wins / 2)
    assert best == 0.5


@HYP
@given(weights=st.lists(st.lists(st.floats(0.0, 1.0), min_size=4, max_size=4), min_size=6, max_size=6),
       length=st.integers(1, 3))
def test_tmaze_memoryless_stochastic_policies_cannot_beat_half(weights, length):
    policy = {}
    for obs, w in zip(TMAZE_OBS, weights):
        w = np.asarray(w) + 1e-3
        policy[obs] = (w / w.sum()).tolist()
    assert tmaze_success_probability(length, policy) <= 0.5 + 1e-9


def test_tmaze_rejects_invalid_actions():
    env = PassiveTMazeEnv(length=2)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="action"):
        env.step(4)


@pytest.mark.parametrize("seed", range(12))
def test_multi_cue_task_invariants(seed):
    """Each cue at its own step of the first half, marked and numbered; the last `cues` steps ask for them in
    order; only the queries are rewarded (+1 for the queried bit, else -1); success = every query right. An
    agent that reads the cues answers all (even seeds) or all but the last (odd seeds)."""
    env = gym.make("MultiCueTask-v0", delay=20, cues=3).unwrapped
    obs, info = env.reset(seed=seed)
    bits, cue_steps, rewards = {}, [], []
    for t in range(20):
        assert obs.shape == (9,) and obs[2] == obs[3:6].sum() <= 1 and obs[6:].sum() == (t >= 17)
        if obs[2]:
            j = int(obs[3:6].argmax())
            assert t < 10 and j not in bits
            bits[j] = int(obs[0])
            cue_steps.append(t)
        action = 0
        if t >= 17:
            j = int(obs[6:].argmax())
            assert j == t - 17 and obs[:2].sum() == 0
            action = bits[j] if (seed % 2 == 0 or j < 2) else 1 - bits[j]
        obs, reward, term, trunc, info = env.step(action)
        rewards.append(reward)
        assert info["cue_step"] == min(cue_steps, default=info["cue_step"]) and not trunc and term == (t == 19)
    assert len(bits) == 3 and info["cue_step"] == cue_steps[0]
    assert rewards[:17] == [0.0] * 17 and rewards[17:] == ([1.0] * 3 if seed % 2 == 0 else [1.0, 1.0, -1.0])
    assert info["is_success"] == (seed % 2 == 0)


# ---------------------------------------------------------------------------------------
# Parameter validation
# ---------------------------------------------------------------------------------------
INVALID = [
    ("MemoryTask-v0", "delay", 0), ("MemoryTask-v0", "delay", -1), ("MemoryTask-v0", "delay", 1.5),
    ("MemoryTask-v0", "delay", 2.0), ("MemoryTask-v0", "delay", True), ("MemoryTask-v0", "delay", "3"),
    ("MemoryTask-v0", "delay", None), ("MemoryTask-v0", "difficulty", 2), ("MemoryTask-v0", "difficulty", -1),
    ("MemoryTask-v0", "difficulty", True), ("MemoryTask-v0", "difficulty", "1"),
    ("MemoryTask-v0", "difficulty", 1.0), ("MemoryTask-v0", "difficulty", np.float64(0.0)),
    ("MemoryTask-v0", "cue_time", "end"), ("MemoryTask-v0", "cue_time", 0), ("MemoryTask-v0", "cue_time", None),
    ("PassiveTMaze-v0", "length", 0), ("PassiveTMaze-v0", "length", -3), ("PassiveTMaze-v0", "length", 2.5),
    ("PassiveTMaze-v0", "length", False), ("PassiveTMaze-v0", "length", "5"),
    ("PassiveTMaze-v0", "penalty", 0.5), ("PassiveTMaze-v0", "penalty", True),
    ("PassiveTMaze-v0", "penalty", "x"), ("PassiveTMaze-v0", "penalty", float("nan")),
    ("MultiCueTask-v0", "cues", 0), ("MultiCueTask-v0", "cues", 1.0), ("MultiCueTask-v0", "delay", 5),
    ("MultiCueTask-v0", "delay", True),
]


@pytest.mark.parametrize("env_id,param,value", INVALID, ids=[f"{e}-{p}={v!r}" for e, p, v in INVALID])
def test_invalid_parameters_raise_value_error_naming_them(env_id, param, value):
    with pytest.raises(ValueError) as exc:
        gym.make(env_id, **{param: value})
    message = str(exc.value)
    assert param in message and repr(value) in message, message


@pytest.mark.parametrize("cls", [MemoryTaskEnv, PassiveTMazeEnv])
def test_invalid_render_mode(cls):
    # (gym.make wraps unsupported "human" rendering itself, so the constructor is called directly)
    with pytest.raises(ValueError, match="render_mode.*'human'"):
        cls(render_mode="human")


def test_numpy_integers_are_valid_parameters():
    assert MemoryTaskEnv(delay=np.int64(3), difficulty=np.int64(1)).delay == 3
    assert PassiveTMazeEnv(length=np.int32(4)).length == 4


# ---------------------------------------------------------------------------------------
# FlattenObservation
# ---------------------------------------------------------------------------------------
class ConstantObsEnv(gym.Env):
    def __init__(self, space: spaces.Space, value):
        self.observation_space, self.value = space, value
        self.action_space = spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.value, {}

    def step(self, action):
        return self.value, 0.0, True, False, {}


BOX = spaces.Box(-2.0, 2.0, (2, 2), np.float64)
FLAT_CASES = [
    ("Discrete", spaces.Discrete(4), 2, [0, 0, 1, 0]),
    ("Discrete-start", spaces.Discrete(3, start=-1), 0, [0, 1, 0]),
    ("MultiDiscrete", spaces.MultiDiscrete([2, 3]), np.array([1, 2]), [0, 1, 0, 0, 1]),
    ("MultiBinary", spaces.MultiBinary(4), np.array([1, 0, 0, 1], np.int8), [1, 0, 0, 1]),
    ("MultiBinary-2d", spaces.MultiBinary([2, 2]), np.array([[1, 0], [0, 1]], np.int8), [1, 0, 0, 1]),
    ("Box-2d", BOX, np.array([[1.0, -2.0], [0.5, 2.0]]), [1.0, -2.0, 0.5, 2.0]),
    ("Box-uint8", spaces.Box(0, 255, (3,), np.uint8), np.array([0, 7, 255], np.uint8), [0, 7, 255]),
    ("Tuple", spaces.Tuple((spaces.Discrete(2), spaces.Box(-1, 1, (2,), np.float32))),
     (1, np.array([0.5, -0.5], np.float32)), [0, 1, 0.5, -0.5]),
    ("Dict", spaces.Dict({"pos": spaces.Box(-1, 1, (2,), np.float32), "cue": spaces.Discrete(3)}),
     {"pos": np.array([0.25, -1.0], np.float32), "cue": 2}, None),
    ("Dict-nested", spaces.Dict({"a": spaces.Tuple((spaces.Discrete(2), spaces.MultiBinary(2))),
                                 "b": spaces.MultiDiscrete([3])}),
     {"a": (0, np.array([0, 1], np.int8)), "b": np.array([1])}, None),
]
# Expected layout of the Dict cases: sub-spaces concatenated in the space's key order.
DICT_PARTS = {
    "Dict": {"pos": [0.25, -1.0], "cue": [0, 0, 1]},
    "Dict-nested": {"a": [1, 0, 0, 1], "b": [0, 1, 0]},
}


@pytest.mark.parametrize("name,space,value,expected", FLAT_CASES, ids=[c[0] for c in FLAT_CASES])
def test_flatten_observation_layout(name, space, value, expected):
    if expected is None:
        expected = [v for key in space.spaces for v in DICT_PARTS[name][key]]
    env = FlattenObservation(ConstantObsEnv(space, value))
    obs, _ = env.reset(seed=0)
    assert isinstance(env.observation_space, spaces.Box)
    assert env.observation_space.dtype == np.float32
    assert obs.dtype == np.float32 and obs.shape == env.observation_space.shape == (len(expected),)
    np.testing.assert_array_equal(obs, np.asarray(expected, np.float32))
    assert env.observation_space.contains(obs)
    # Random samples of the space stay inside the flattened bounds.
    space.seed(0)
    for _ in range(20):
        flat = env.observation(space.sample())
        assert flat.dtype == np.float32 and env.observation_space.contains(flat)


UNSUPPORTED = [
    ("Text", spaces.Text(5), "observation"),
    ("Graph", spaces.Graph(node_space=spaces.Box(-1, 1, (2,)), edge_space=None), "observation"),
    ("Sequence", spaces.Sequence(spaces.Discrete(2)), "observation"),
    ("Graph", spaces.Dict({"ok": spaces.Discrete(2), "bad": spaces.Graph(node_space=spaces.Discrete(2), edge_space=None)}),
     "'bad'"),
    ("Sequence", spaces.Tuple((spaces.Discrete(2), spaces.Sequence(spaces.Box(0, 1, (1,))))), "[1]"),
]


def test_flatten_observation_drops_the_text_of_a_dict_with_a_notice(capsys):
    space = spaces.Dict({"image": spaces.Box(0, 255, (2, 2, 1), np.uint8), "direction": spaces.Discrete(3),
                         "mission": spaces.Text(10)})
    value = {"image": np.arange(4, dtype=np.uint8).reshape(2, 2, 1), "direction": 2, "mission": "go to door"}
    env = FlattenObservation(ConstantObsEnv(space, value))
    assert "'mission'" in capsys.readouterr().out
    assert env.observation_space.shape == (4 + 3,)
    # gymnasium flattens a Dict in sorted key order: the direction one-hot, then the image
    np.testing.assert_array_equal(env.observation(value), [0, 0, 1, 0, 1, 2, 3])


@pytest.mark.parametrize("kind,space,where", UNSUPPORTED, ids=[f"{k}-{w}" for k, _, w in UNSUPPORTED])
def test_flatten_observation_rejects_unsupported_spaces(kind, space, where):
    with pytest.raises(ValueError) as exc:
        FlattenObservation(ConstantObsEnv(space, space.sample()))
    message = str(exc.value)
    assert kind in message and where in message, message

