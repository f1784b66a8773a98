"""ppo_baseline internals: normalisation statistics (math and persistence), resume bookkeeping."""

from __future__ import annotations

import json
import os

import gymnasium as gym
import numpy as np
import pytest
import torch

import ppo_baseline
from conftest import describe, read_tb_scalars, run_script_at
from ppo_baseline import Agent, RewardScaler, RunningMeanStd

PRIOR_COUNT = 1e-4  # RunningMeanStd starts as a pseudo-sample of this weight with mean 0, var 1


def reference_moments(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (biased) variance of all data seen, plus the documented prior pseudo-sample."""
    n = data.shape[0]
    mean = data.sum(0) / (n + PRIOR_COUNT)
    second = (PRIOR_COUNT * 1.0 + (data ** 2).sum(0)) / (n + PRIOR_COUNT)
    return mean, second - mean ** 2


@pytest.mark.parametrize("shape", [(), (3,), (2, 2)])
@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_running_mean_std_matches_numpy(shape, offset):
    rng = np.random.default_rng(0)
    rms = RunningMeanStd(shape)
    seen = []
    for n in [1, 7, 64, 3, 200]:
        batch = rng.normal(offset, 2.0, size=(n, *shape)) * (1 + np.arange(int(np.prod(shape)))).reshape(shape)
        rms.update(torch.as_tensor(batch, dtype=torch.float32))
        seen.append(batch.astype(np.float32).astype(np.float64))
        mean, var = reference_moments(np.concatenate(seen))
        np.testing.assert_allclose(rms.mean.numpy(), mean, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(rms.var.numpy(), var, rtol=1e-7)
        assert rms.count.item() == pytest.approx(sum(len(s) for s in seen) + PRIOR_COUNT)


def test_running_mean_std_is_saved_state():
    rms = RunningMeanStd((2,))
    rms.update(torch.randn(10, 2))
    assert set(rms.state_dict()) == {"mean", "var", "count"}


def test_reward_scaler_matches_reference():
    rng = np.random.default_rng(1)
    n_envs, gamma = 3, 0.9
    scaler = RewardScaler(n_envs, gamma)
    ret, seen = np.zeros(n_envs), []
    for t in range(60):
        rewards = rng.normal(2.0, 3.0, n_envs)
        dones = rng.random(n_envs) < 0.15
        out = scaler(rewards, dones)
        # discounted return of the current episode, whose running variance scales the rewards
        ret = ret * gamma + rewards
        seen.append(ret.copy())
        _, var = reference_moments(np.concatenate(seen))
        np.testing.assert_allclose(out, np.clip(rewards / np.sqrt(var + 1e-8), -10, 10), rtol=1e-9)
        ret[dones] = 0.0


def test_reward_scaler_clips():
    scaler = RewardScaler(1, 0.99)
    for _ in range(400):  # so that one outlier cannot dominate the variance
        scaler(np.array([0.01]), np.array([True]))
    assert scaler(np.array([1e6]), np.array([False]))[0] == 10.0


# ---------------------------------------------------------------------------------------
# Saved normalisation statistics: a saved model evaluates exactly as the run evaluated it
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pendulum_run(tmp_path_factory):
    """A tiny continuous-action run (observation and reward normalisation on), in-process."""
    cwd, old = tmp_path_factory.mktemp("pendulum"), os.getcwd()
    os.chdir(cwd)
    try:
        ppo_baseline.main(ppo_baseline.Args(env_id="Pendulum-v1", num_steps=64, num_minibatches=4,
                                            update_epochs=2, total_timesteps=128, eval_episodes=2,
                                            save_model=True, run_name="pend", cuda=False))
    finally:
        os.chdir(old)
    return cwd / "runs" / "pend"


def load_agent(model_path) -> tuple[Agent, ppo_baseline.Args, gym.vector.VectorEnv]:
    saved = torch.load(model_path, map_location="cpu", weights_only=False)
    args = ppo_baseline.Args(**saved["args"])
    envs = ppo_baseline.make_vector_env(args, {}, "continuous", 1)
    agent = Agent(envs.single_observation_space, envs.single_action_space, normalize_obs=True)
    agent.load_state_dict(saved["agent"])  # strict: every buffer, obs_rms included, must be there
    return agent, args, envs


def test_model_contains_observation_statistics(pendulum_run):
    state = torch.load(pendulum_run / "model.pt", map_location="cpu", weights_only=False)["agent"]
    assert {"obs_rms.mean", "obs_rms.var", "obs_rms.count"} <= set(state)
    # every observation of the 128 training steps went into the statistics
    assert state["obs_rms.count"].item() == pytest.approx(128, abs=1e-3)
    assert state["obs_rms.mean"].abs().max() > 1e-3 and (state["obs_rms.var"] - 1).abs().max() > 1e-3


def test_checkpoint_contains_normalisation_statistics(pendulum_run):
    ckpt = torch.load(pendulum_run / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ckpt["agent"]["obs_rms.count"].item() == pytest.approx(128, abs=1e-3)
    assert ckpt["reward_rms"]["count"].item() == pytest.approx(128, abs=1e-3)


def test_saved_model_reproduces_greedy_actions_and_evaluation(pendulum_run):
    agent, args, envs = load_agent(pendulum_run / "model.pt")
    record = json.loads((pendulum_run / "eval.json").read_text())
    result = ppo_baseline.evaluate(agent, args, {}, "continuous", torch.device("cpu"))
    assert result["mean_return"] == pytest.approx(record["mean_return"], rel=1e-6, abs=1e-6)
    assert result["std_return"] == pytest.approx(record["std_return"], rel=1e-6, abs=1e-6)

    # The statistics matter: without them (fresh mean 0 / var 1) the greedy actions change.
    obs, _ = envs.reset(seed=0)
    batch = torch.as_tensor(np.stack([envs.single_observation_space.sample() for _ in range(32)] + [obs[0]]))
    with torch.no_grad():
        with_stats = agent.get_action_and_value(agent.normalize_obs(batch), greedy=True)[0]
        agent.obs_rms.load_state_dict(RunningMeanStd(agent.obs_rms.mean.shape).state_dict())
        without = agent.get_action_and_value(agent.normalize_obs(batch), greedy=True)[0]
    assert (with_stats - without).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------
# Resume: the TensorBoard log of a resumed run has every update exactly once
# ---------------------------------------------------------------------------------------
def test_resume_keeps_the_checkpointed_iterations_scalars(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ppo_baseline.main(ppo_baseline.Args(env_kwargs=("delay=2",), num_envs=1, num_steps=16, total_timesteps=64,
                                        checkpoint_interval=0, eval_episodes=0, run_name="r", cuda=False))
    run_dir = tmp_path / "runs" / "r"
    assert [s for s, _ in read_tb_scalars(run_dir)["losses/value_loss"]] == [16, 32, 48, 64]
    # Pretend the run was killed right after checkpointing iteration 2 (its events flushed).
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert (ckpt["iteration"], ckpt["global_step"]) == (4, 64)
    ckpt.update(iteration=2, global_step=32)
    torch.save(ckpt, run_dir / "checkpoint.pt")

    # Record the agent and optimizer the resumed run trains: at its first GAE call (after one
    # rollout, before any update) they must hold exactly the checkpoint's state.
    agents, optimizers, at_first_gae = [], [], {}

    class RecordingAgent(ppo_baseline.Agent):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            agents.append(self)

    class RecordingAdam(torch.optim.Adam):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            optimizers.append(self)

    original_gae = ppo_baseline.compute_gae

    def recording_gae(*a, **kw):
        if not at_first_gae:
            at_first_gae.update(agent={k: v.clone() for k, v in agents[-1].state_dict().items()},
                                adam_steps=[st["step"].item() for st in optimizers[-1].state.values()])
        return original_gae(*a, **kw)

    monkeypatch.setattr(ppo_baseline, "Agent", RecordingAgent)
    monkeypatch.setattr(ppo_baseline.optim, "Adam", RecordingAdam)
    monkeypatch.setattr(ppo_baseline, "compute_gae", recording_gae)
    ppo_baseline.main(ppo_baseline.Args(resume="r"))
    assert at_first_gae["agent"].keys() == ckpt["agent"].keys()
    for key, value in ckpt["agent"].items():
        assert torch.equal(at_first_gae["agent"][key], value), key
    saved_steps = [st["step"].item() for st in ckpt["optimizer"]["state"].values()]
    assert at_first_gae["adam_steps"] == saved_steps and min(saved_steps) > 0
    scalars = read_tb_scalars(run_dir)
    # steps after the checkpoint are replaced, the checkpointed iteration's own are kept
    assert [s for s, _ in scalars["losses/value_loss"]] == [16, 32, 48, 64]
    assert [s for s, _ in scalars["charts/SPS"]] == [16, 32, 48, 64]


# ---------------------------------------------------------------------------------------
# Learning check (slow: minutes; `python -m pytest -m slow`)
# ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cartpole_reaches_475_at_500k_steps(tmp_path):
    # CleanRL's ppo.py reports 490.0 +- 6.1 on CartPole-v1 at 500k steps.
    proc = run_script_at(tmp_path, "ppo_baseline.py", "--env-id", "CartPole-v1", "--seed", "1",
                         "--total-timesteps", "500000", "--eval-episodes", "20", "--checkpoint-interval", "600",
                         "--run-name", "cartpole", timeout=3600)
    assert proc.returncode == 0, describe(proc)
    record = json.loads((tmp_path / "runs" / "cartpole" / "eval.json").read_text())
    assert record["mean_return"] >= 475, record


def test_stored_observations_reproduce_the_rollouts_log_probabilities():
    """Observation statistics move during a rollout; the update must still see exactly the
    inputs the rollout acted on, or the first PPO ratio is not 1."""
    torch.manual_seed(0)
    agent = Agent(gym.spaces.Box(-np.inf, np.inf, (3,), np.float32), gym.spaces.Box(-1, 1, (2,), np.float32),
                  normalize_obs=True)
    stored = []
    for t in range(20):
        x = agent.normalize_obs(torch.randn(4, 3) * 3 + t, update=True)
        with torch.no_grad():
            action, logprob, _, value = agent.get_action_and_value(x)
        stored.append((x, action, logprob, value))
    for x, action, logprob, value in stored:
        with torch.no_grad():
            _, new_logprob, _, new_value = agent.get_action_and_value(x, action)
        torch.testing.assert_close(new_logprob, logprob, rtol=0, atol=1e-6)
        torch.testing.assert_close(new_value, value, rtol=0, atol=1e-6)
