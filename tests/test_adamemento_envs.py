"""The toy tasks of AdaMemento's first experiments: CliffWalkingFail-v0, DarkChamber-v0, FourRooms-v0."""

import re
import warnings
from collections import deque

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import memory_envs  # noqa: F401  (registers the ids)

IDS = ["CliffWalkingFail-v0", "DarkChamber-v0", "FourRooms-v0"]
UP, RIGHT, DOWN, LEFT = 0, 1, 2, 3


@pytest.mark.parametrize("env_id", IDS)
def test_check_env_clean(env_id):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(gym.make(env_id).unwrapped)
    assert [str(w.message) for w in caught] == []


@pytest.mark.parametrize("env_id", IDS)
def test_registered_with_module_prefix(env_id):
    env = gym.make(f"memory_envs:{env_id}")
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)


def _rollout(env, seed, n=60):
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    out = [obs.copy()]
    for _ in range(n):
        obs, r, term, trunc, info = env.step(int(rng.integers(4)))
        out.append((obs.copy(), r, term, trunc, info.get("is_success")))
        if term or trunc:
            obs, _ = env.reset()
            out.append(obs.copy())
    return out


@pytest.mark.parametrize("env_id", IDS)
def test_same_seed_same_trajectory(env_id):
    a, b = _rollout(gym.make(env_id), 3), _rollout(gym.make(env_id), 3)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, tuple):
            assert np.array_equal(x[0], y[0]) and x[1:] == y[1:]
        else:
            assert np.array_equal(x, y)


@pytest.mark.parametrize("env_id", IDS)
def test_is_success_only_in_final_info_and_time_limit_is_truncation(env_id):
    env = gym.make(env_id, max_steps=5)
    env.reset(seed=0)
    for t in range(5):
        _, reward, term, trunc, info = env.step(UP)  # pushes into the top wall: never reaches the goal
        if t < 4:
            assert not term and not trunc and "is_success" not in info
    assert trunc and not term and info["is_success"] is False and reward == 0.0


def test_cliff_fall_is_terminal_failure():
    env = gym.make("CliffWalkingFail-v0")
    obs, _ = env.reset(seed=0)
    assert obs.argmax() == 3 * 12 + 0 and obs.sum() == 1.0
    obs, reward, term, trunc, info = env.step(RIGHT)
    assert (reward, term, trunc, info["is_success"]) == (-1.0, True, False, False)


@pytest.mark.parametrize("rows,cols", [(4, 12), (2, 3), (5, 7)])
def test_cliff_safe_path_succeeds(rows, cols):
    env = gym.make("CliffWalkingFail-v0", rows=rows, cols=cols)
    env.reset(seed=0)
    path = [UP] + [RIGHT] * (cols - 1) + [DOWN]
    total = 0.0
    for i, a in enumerate(path):
        obs, reward, term, trunc, info = env.step(a)
        total += reward
        assert term == (i == len(path) - 1)
    assert info["is_success"] is True and total == 1.0
    assert obs.argmax() == (rows - 1) * cols + cols - 1


def test_dark_chamber_observations_are_faint():
    env = gym.make("DarkChamber-v0", size=5, cell_pixels=3, background=10, contrast=2)
    obs0, _ = env.reset(seed=0)
    assert obs0.shape == (15, 15, 1) and obs0.dtype == np.uint8
    assert set(np.unique(obs0)) == {10, 12}
    r, c = env.unwrapped._pos
    assert (obs0 == 12).sum() == 9 and (obs0[3 * r:3 * r + 3, 3 * c:3 * c + 3] == 12).all()
    obs1, *_ = env.step(RIGHT if c < 4 else LEFT)
    diff = obs1.astype(int) - obs0.astype(int)
    # Two neighbouring cells differ by `contrast` on exactly two blocks of pixels.
    assert np.abs(diff).max() == 2 and (diff != 0).sum() == 18


def test_dark_chamber_starts_on_ring_and_goal_is_centre():
    env = gym.make("DarkChamber-v0", size=5)
    starts = set()
    for seed in range(200):
        env.reset(seed=seed)
        starts.add(env.unwrapped._pos)
    ring = {(r, c) for r in range(5) for c in range(5) if r in (0, 4) or c in (0, 4)}
    assert starts == ring  # every ring cell is drawn, nothing else
    env.reset(seed=3)
    r, c = env.unwrapped._pos
    path = [DOWN if r < 2 else UP] * abs(r - 2) + [RIGHT if c < 2 else LEFT] * abs(c - 2)
    for i, a in enumerate(path):
        _, reward, term, trunc, info = env.step(a)
        assert term == (i == len(path) - 1) and reward == float(term)
    assert info["is_success"] is True and env.unwrapped._pos == (2, 2)
    assert env.unwrapped.max_steps == 10


def test_dark_chamber_needs_state_information():
    # The best *blind* policy (the same action distribution in every cell) is far from reliable.
    env = gym.make("DarkChamber-v0")
    rng = np.random.default_rng(0)
    best = 0.0
    for probs in ([0.25] * 4, [0, 0.5, 0.5, 0], [0.1, 0.4, 0.4, 0.1]):
        wins = 0
        for ep in range(200):
            env.reset(seed=ep)
            while True:
                _, _, term, trunc, info = env.step(int(rng.choice(4, p=probs)))
                if term or trunc:
                    wins += info["is_success"]
                    break
        best = max(best, wins / 200)
    assert best < 0.6


def _shortest_path(walls, start, goal):
    dist, queue = {start: 0}, deque([start])
    while queue:
        r, c = queue.popleft()
        for dr, dc in ((-1, 0), (0, 1), (1, 0), (0, -1)):
            n = (r + dr, c + dc)
            if not walls[n] and n not in dist:
                dist[n] = dist[(r, c)] + 1
                queue.append(n)
    return dist[goal]


def test_four_rooms_layout_and_goal():
    env = gym.make("FourRooms-v0").unwrapped
    assert (~env.walls).sum() == 104 and env.walls[0].all() and env.walls[:, 0].all()
    assert _shortest_path(env.walls, env.start, env.goal) == 20
    env.reset(seed=0)
    path = [DOWN, DOWN] + [RIGHT] * 8 + [DOWN] * 8 + [RIGHT] * 2  # via the top-right room's doorways
    for i, a in enumerate(path):
        obs, reward, term, trunc, info = env.step(a)
        assert term == (i == len(path) - 1), i
    assert reward == 1.0 and info["is_success"] is True and obs.argmax() == 11 * 13 + 11


def test_four_rooms_walls_block():
    env = gym.make("FourRooms-v0")
    obs, _ = env.reset(seed=0)
    for a in (UP, LEFT):
        nxt, *_ = env.step(a)
        assert np.array_equal(nxt, obs)


@pytest.mark.parametrize("env_id,kwargs,name", [
    ("CliffWalkingFail-v0", dict(rows=1), "rows"),
    ("CliffWalkingFail-v0", dict(cols=2), "cols"),
    ("CliffWalkingFail-v0", dict(max_steps=0), "max_steps"),
    ("CliffWalkingFail-v0", dict(rows=4.5), "rows"),
    ("DarkChamber-v0", dict(size=2), "size"),
    ("DarkChamber-v0", dict(contrast=0), "contrast"),
    ("DarkChamber-v0", dict(background=250, contrast=10), "background + contrast"),
    ("DarkChamber-v0", dict(cell_pixels=True), "cell_pixels"),
    ("FourRooms-v0", dict(max_steps=-3), "max_steps"),
    ("FourRooms-v0", dict(max_steps="10"), "max_steps"),
])
def test_invalid_parameters_raise_value_error(env_id, kwargs, name):
    with pytest.raises(ValueError, match=re.escape(name)) as exc:
        gym.make(env_id, **kwargs)
    bad = kwargs[name] if name in kwargs else sum(kwargs.values())
    assert repr(bad) in str(exc.value)


@pytest.mark.parametrize("env_id", IDS)
def test_render_rgb_array(env_id):
    env = gym.make(env_id, render_mode="rgb_array")
    env.reset(seed=0)
    frame = env.render()
    assert frame.ndim == 3 and frame.shape[2] == 3 and frame.dtype == np.uint8
