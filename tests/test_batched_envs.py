"""The batched memory tasks (gym.make_vec / run_contract.make_batched_env) against a SyncVectorEnv of the
single envs: identical observations, rewards, terminations, truncations and infos for the same seeds and
actions, across autoresets, unseeded and masked resets and seed lists."""

from __future__ import annotations

import itertools

import gymnasium as gym
import numpy as np
import pytest

import memory_envs
from run_contract import UserError, make_base_env, make_batched_env

SAME_STEP = gym.vector.AutoresetMode.SAME_STEP
N = 4

MEMORY_TASK = [dict(delay=d, difficulty=k, cue_time=c, **({} if m is None else {"max_episode_steps": m}))
               for d, k, c, m in itertools.product((1, 2, 3, 8), (0, 1), ("start", "random"), (None, 3, 8))]
# A time limit that may end the episode before its random cue.
MEMORY_TASK += [dict(delay=16, difficulty=k, cue_time="random", max_episode_steps=2) for k in (0, 1)]
PASSIVE_TMAZE = [dict(length=n, **extra) for n in (1, 3, 6)
                 for extra in ({}, {"penalty": -0.5}, {"max_episode_steps": 2})]
RECALL = [dict(block=b, length=n, **extra) for b in (1, 3) for n in (1, 2, 4)
          for extra in ({}, {"max_episode_steps": 1})]
CASES = ([("MemoryTask-v0", kw) for kw in MEMORY_TASK] + [("PassiveTMaze-v0", kw) for kw in PASSIVE_TMAZE]
         + [("RecallAcrossEpisodes-v0", kw) for kw in RECALL])


def sync_stack(env_id: str, kwargs: dict, n: int = N) -> gym.vector.VectorEnv:
    """What the scripts build: RecordEpisodeStatistics in every env, SAME_STEP autoreset."""
    make = lambda: gym.wrappers.RecordEpisodeStatistics(gym.make(env_id, **kwargs))  # noqa: E731
    return gym.vector.SyncVectorEnv([make] * n, autoreset_mode=SAME_STEP)


def assert_same(a, b, path: str = "") -> None:
    """Exact equality of nested results: keys, dtypes, shapes and values (episode wall time "t": dtype and shape)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and (a.dtype, a.shape) == (b.dtype, b.shape), \
            f"{path}: {a.dtype}{a.shape} != {getattr(b, 'dtype', type(b))}{getattr(b, 'shape', '')}"
        if a.dtype == object:
            for i, (x, y) in enumerate(zip(a, b)):
                assert (x is None) == (y is None), f"{path}[{i}]"
                if x is not None:
                    assert_same(x, y, f"{path}[{i}]")
        elif not path.endswith("/episode/t"):
            np.testing.assert_array_equal(a, b, err_msg=path)
    elif isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def run_both(ref, batched, actions: np.random.Generator, steps: int) -> int:
    """Step both with the same random actions, comparing every result; returns the episodes ended."""
    ended = 0
    for _ in range(steps):
        a = actions.integers(0, ref.single_action_space.n, size=ref.num_envs)
        out_ref, out = ref.step(a), batched.step(a)
        for name, x, y in zip(("obs", "reward", "terminated", "truncated", "info"), out_ref, out):
            assert_same(x, y, name)
        ended += int(np.sum(out_ref[2] | out_ref[3]))
    return ended


@pytest.mark.parametrize("env_id,kwargs", CASES, ids=[f"{i}-{kw}" for i, kw in CASES])
def test_same_results_as_sync_vector_env(env_id, kwargs):
    ref, batched = sync_stack(env_id, kwargs), make_batched_env(env_id, kwargs, N)
    actions, episode = np.random.default_rng(0), ref.envs[0].unwrapped
    steps = 2 * getattr(episode, "delay", getattr(episode, "length", 1)) + 5
    assert_same(ref.reset(seed=7), batched.reset(seed=7), "reset(seed=7)")
    ended = run_both(ref, batched, actions, steps)
    # Unseeded reset mid-episode: each env's generator goes on from where its episode left it.
    assert_same(ref.reset(), batched.reset(), "reset()")
    ended += run_both(ref, batched, actions, steps // 2 + 1)
    # Masked reset: the envs' episodes are out of step from here on.
    mask = np.array([True, False, True, False])
    assert_same(ref.reset(options={"reset_mask": mask.copy()}), batched.reset(options={"reset_mask": mask.copy()}),
                "reset(reset_mask)")
    ended += run_both(ref, batched, actions, steps)
    assert_same(ref.reset(seed=[3, None, 5, None]), batched.reset(seed=[3, None, 5, None]), "reset(seed=list)")
    ended += run_both(ref, batched, actions, steps)
    assert ended >= 3 * N


@pytest.mark.parametrize("env_id,kwargs", [("MemoryTask-v0", dict(delay=6, difficulty=1, cue_time="random")),
                                           ("PassiveTMaze-v0", dict(length=3)),
                                           ("RecallAcrossEpisodes-v0", dict(block=2, length=2))])
def test_render_and_spaces_match(env_id, kwargs):
    kwargs = dict(kwargs, render_mode="rgb_array")
    ref = sync_stack(env_id, kwargs, 3)
    batched = gym.make_vec(env_id, num_envs=3, vectorization_mode="vector_entry_point", **kwargs)
    for name in ("observation_space", "action_space", "single_observation_space", "single_action_space"):
        assert getattr(ref, name) == getattr(batched, name), name
    ref.reset(seed=1)
    batched.reset(seed=1)
    for a in np.random.default_rng(1).integers(0, ref.single_action_space.n, size=(10, 3)):
        ref.step(a)
        batched.step(a)
        for x, y in zip(ref.render(), batched.render()):
            np.testing.assert_array_equal(x, y)


def test_make_vec_picks_the_batched_env_and_a_fresh_start_is_random():
    envs = gym.make_vec("MemoryTask-v0", num_envs=3, delay=4)
    assert isinstance(envs, memory_envs.BatchedMemoryTask) and envs.metadata["autoreset_mode"] == SAME_STEP
    with pytest.raises(gym.error.ResetNeeded):
        envs.step(np.zeros(3, np.int64))
    obs, _ = envs.reset()  # generators from fresh entropy, as unseeded single envs
    assert obs in envs.observation_space


def test_returned_data_is_not_reused():
    envs = gym.make_vec("MemoryTask-v0", num_envs=2, vectorization_mode="vector_entry_point", delay=2, difficulty=1)
    obs, _ = envs.reset(seed=0)
    kept = obs.copy()
    for _ in range(3):
        new, reward, terminated, truncated, info = envs.step(np.ones(2, np.int64))
        assert new in envs.observation_space and reward.dtype == np.float64 and terminated.dtype == np.bool_
        np.testing.assert_array_equal(obs, kept)
        obs, kept = new, new.copy()
    with pytest.raises(ValueError, match="actions must be"):
        envs.step(np.array([0, 2]))


@pytest.mark.parametrize("mode", [gym.vector.AutoresetMode.NEXT_STEP, gym.vector.AutoresetMode.DISABLED, "NextStep"])
def test_other_autoreset_modes_are_refused(mode):
    with pytest.raises(ValueError, match="NEXT_STEP|DISABLED"):
        gym.make_vec("PassiveTMaze-v0", num_envs=2, vectorization_mode="vector_entry_point", autoreset_mode=mode)


@pytest.mark.parametrize("env_id,kwargs", [("MemoryTask-v0", dict(delay=0)), ("MemoryTask-v0", dict(difficulty=2)),
                                           ("MemoryTask-v0", dict(cue_time="end")), ("MemoryTask-v0", dict(delay=True)),
                                           ("MemoryTask-v0", dict(render_mode="ansi")),
                                           ("MemoryTask-v0", dict(max_episode_steps=0)),
                                           ("PassiveTMaze-v0", dict(penalty=0.5)), ("PassiveTMaze-v0", dict(length=0)),
                                           ("RecallAcrossEpisodes-v0", dict(block=0)),
                                           ("RecallAcrossEpisodes-v0", dict(colour=1))])
@pytest.mark.filterwarnings("ignore:.*render_mode")
def test_invalid_kwargs_raise_the_single_envs_error(env_id, kwargs):
    with pytest.raises((ValueError, TypeError)) as single:
        gym.make(env_id, **kwargs)
    with pytest.raises(single.type) as batched:
        gym.make_vec(env_id, num_envs=2, vectorization_mode="vector_entry_point", **kwargs)
    with pytest.raises(UserError) as base:
        make_base_env(env_id, kwargs)
    with pytest.raises(UserError) as contract:
        make_batched_env(env_id, kwargs, 2)
    # gym.make adds the env id and kwargs to a TypeError (an unknown kwarg); the message itself is the same.
    if single.type is TypeError:
        assert str(single.value).startswith(str(batched.value))
        assert str(base.value).startswith(str(contract.value))
    else:
        assert str(batched.value) == str(single.value)
        assert str(contract.value) == str(base.value)


def test_make_batched_env_only_for_memory_envs_batched_versions():
    import helper_envs  # noqa: F401  -- registers the helper ids

    for env_id in ("FourRooms-v0", "CartPole-v1", "helper_envs:NaNReward-v0", "ALE/Pong-v5"):
        assert make_batched_env(env_id, {}, 2) is None, env_id
    assert isinstance(make_batched_env("memory_envs:MemoryTask-v0", {}, 2).unwrapped, memory_envs.BatchedMemoryTask)
    for env_id in ("NoSuchEnv-v0", "no_such_module:Env-v0"):
        with pytest.raises(UserError) as base:
            make_base_env(env_id, {})
        with pytest.raises(UserError) as contract:
            make_batched_env(env_id, {}, 2)
        assert str(contract.value) == str(base.value)


def test_bits_drawn_at_once_equal_bits_drawn_one_step_at_a_time():
    """The numpy fact BatchedMemoryTask rests on: integers(0, 2) uses one generator word per bit."""
    for seed in range(50):
        one, block = np.random.default_rng(seed), np.random.default_rng(seed)
        sizes = np.random.default_rng(seed + 1000).integers(1, 3, size=20)
        steps = np.concatenate([one.integers(0, 2, size=k) for k in sizes])
        np.testing.assert_array_equal(steps, block.integers(0, 2, size=sizes.sum()))
        assert one.bit_generator.state == block.bit_generator.state
