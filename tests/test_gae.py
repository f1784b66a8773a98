"""GAE: ppo_baseline.compute_gae against slow, obviously-correct references, and the rollout's
truncation bootstrap (terminations are not bootstrapped, truncations are)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import helper_envs  # noqa: F401  (registers BootstrapProbe-v0)
import ppo_baseline
from ppo_baseline import compute_gae

CONTINUE, TERMINATED, TRUNCATED = 0, 1, 2


def segments(ends: np.ndarray):
    """(start, end) index pairs of the episode pieces of one env's column, end inclusive."""
    start = 0
    for t, e in enumerate(ends):
        if e != CONTINUE or t == len(ends) - 1:
            yield start, t
            start = t + 1


def bootstrap(ends, final_values, last_value, e):
    """Value after a segment's last step: 0 after a termination, V(final_obs) after a truncation,
    V(next obs) when the rollout stops mid-episode."""
    return {TERMINATED: 0.0, TRUNCATED: final_values[e], CONTINUE: last_value}[ends[e]]


def reference_td_sum(raw_rewards, values, ends, final_values, last_values, gamma, lam):
    """A_t = sum_{k=t}^{end} (gamma*lam)^(k-t) * delta_k within the episode piece (Schulman et al. 2016, eq. 16)."""
    T, N = raw_rewards.shape
    adv = np.zeros((T, N))
    for i in range(N):
        for s, e in segments(ends[:, i]):
            boot = bootstrap(ends[:, i], final_values[:, i], last_values[i], e)
            next_v = [values[k + 1, i] if k < e else boot for k in range(s, e + 1)]
            deltas = [raw_rewards[k, i] + gamma * next_v[k - s] - values[k, i] for k in range(s, e + 1)]
            for t in range(s, e + 1):
                adv[t, i] = sum((gamma * lam) ** (k - t) * deltas[k - s] for k in range(t, e + 1))
    return adv


def reference_lambda_return(raw_rewards, values, ends, final_values, last_values, gamma, lam):
    """A_t = G^lambda_t - V_t with G^lambda the lambda-weighted mix of n-step returns, the last one
    (to the end of the piece) taking the remaining weight lambda^(n_max - 1)."""
    T, N = raw_rewards.shape
    adv = np.zeros((T, N))
    for i in range(N):
        for s, e in segments(ends[:, i]):
            boot = bootstrap(ends[:, i], final_values[:, i], last_values[i], e)
            for t in range(s, e + 1):
                n_max = e - t + 1

                def n_step(n):
                    ret = sum(gamma ** k * raw_rewards[t + k, i] for k in range(n))
                    return ret + gamma ** n * (values[t + n, i] if n < n_max else boot)

                g = sum((1 - lam) * lam ** (n - 1) * n_step(n) for n in range(1, n_max))
                g += lam ** (n_max - 1) * n_step(n_max)
                adv[t, i] = g - values[t, i]
    return adv


def random_rollout(rng, T, N, p_end=0.2):
    raw = rng.normal(size=(T, N))
    values = rng.normal(size=(T, N))
    ends = np.where(rng.random((T, N)) < p_end, rng.choice([TERMINATED, TRUNCATED], size=(T, N)), CONTINUE)
    final_values = rng.normal(size=(T, N)) * 3
    last_values = rng.normal(size=N)
    return raw, values, ends, final_values, last_values


def run_compute_gae(raw, values, ends, final_values, last_values, gamma, lam, dtype=torch.float64):
    """The script's contract: a truncated step's reward already holds gamma * V(final_obs), and
    ``dones`` marks both kinds of episode end."""
    rewards = raw + np.where(ends == TRUNCATED, gamma * final_values, 0.0)
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=dtype)  # noqa: E731
    return compute_gae(t(rewards), t(values), t(ends != CONTINUE), t(last_values), gamma, lam).double().numpy()


@pytest.mark.parametrize("seed", range(5))
def test_gae_matches_references_on_rollouts_with_episode_ends(seed):
    rng = np.random.default_rng(seed)
    rollout = random_rollout(rng, T=40, N=4)
    ends = rollout[2]
    # several episode ends of both kinds inside the rollout
    assert (ends == TERMINATED).sum() >= 3 and (ends == TRUNCATED).sum() >= 3
    ref = reference_td_sum(*rollout, 0.99, 0.95)
    np.testing.assert_allclose(reference_lambda_return(*rollout, 0.99, 0.95), ref, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(run_compute_gae(*rollout, 0.99, 0.95), ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(run_compute_gae(*rollout, 0.99, 0.95, torch.float32), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seed", range(3))
def test_trace_ppo_gae_from_td_errors_matches_references(seed):
    """trace_ppo computes GAE as the discounted sum of its one-step TD errors (td_targets - values)."""
    import trace_ppo

    raw, values, ends, final_values, last_values = random_rollout(np.random.default_rng(seed), T=40, N=4)
    rewards = raw + np.where(ends == TRUNCATED, 0.99 * final_values, 0.0)
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float64)  # noqa: E731
    y = trace_ppo.td_targets(t(rewards), t(values), t(ends != CONTINUE), t(last_values), 0.99)
    adv = trace_ppo.compute_gae(y - t(values), t(ends != CONTINUE), 0.99, 0.95)
    ref = reference_td_sum(raw, values, ends, final_values, last_values, 0.99, 0.95)
    np.testing.assert_allclose(adv.numpy(), ref, rtol=1e-10, atol=1e-10)


@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 30), N=st.integers(1, 4), gamma=st.floats(0.0, 1.0), lam=st.floats(0.0, 1.0),
       p_end=st.sampled_from([0.0, 0.1, 0.5, 1.0]), seed=st.integers(0, 2**32 - 1))
def test_gae_property(T, N, gamma, lam, p_end, seed):
    rollout = random_rollout(np.random.default_rng(seed), T, N, p_end)
    ref = reference_td_sum(*rollout, gamma, lam)
    np.testing.assert_allclose(run_compute_gae(*rollout, gamma, lam), ref, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(reference_lambda_return(*rollout, gamma, lam), ref, rtol=1e-9, atol=1e-9)


def test_termination_does_not_bootstrap_and_truncation_does():
    gamma, lam = 0.9, 0.8
    # env 0 terminates at t=0, env 1 is truncated at t=0 with V(final_obs) = 5, env 2 runs on.
    raw = np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    values = np.array([[0.5, 0.5, 0.5], [7.0, 7.0, 7.0]])  # V of the *next* episode's first obs at t=1
    ends = np.array([[TERMINATED, TRUNCATED, CONTINUE], [CONTINUE, CONTINUE, CONTINUE]])
    final_values = np.array([[0.0, 5.0, 0.0], [0.0, 0.0, 0.0]])
    last_values = np.array([2.0, 2.0, 2.0])
    adv = run_compute_gae(raw, values, ends, final_values, last_values, gamma, lam)
    assert adv[0, 0] == pytest.approx(1.0 - 0.5)  # no gamma * V(next) after a termination
    assert adv[0, 1] == pytest.approx(1.0 + gamma * 5.0 - 0.5)  # V(final_obs), not V(next episode)
    delta1 = 0.0 + gamma * 2.0 - 7.0
    assert adv[0, 2] == pytest.approx(1.0 + gamma * 7.0 - 0.5 + gamma * lam * delta1)
    assert adv[1].tolist() == pytest.approx([delta1] * 3)


def test_rollout_bootstraps_truncations_only(tmp_path, monkeypatch):
    """Run ppo_baseline's real rollout on BootstrapProbe-v0 (reward 1 per step; episodes alternately
    terminate after 3 steps and are truncated after 4) and inspect what reaches compute_gae."""
    monkeypatch.chdir(tmp_path)
    agents, seen = [], {}

    class RecordingAgent(ppo_baseline.Agent):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            agents.append(self)

    def recording_gae(rewards, values, dones, last_value, gamma, lam):
        final_obs = torch.zeros(1, 6)
        final_obs[0, 4] = 1.0  # the observation after the 4th (truncated) step
        with torch.no_grad():
            seen.update(rewards=rewards.clone(), dones=dones.clone(),
                        v_final=agents[-1].get_value(final_obs).item(), gamma=gamma)
        return compute_gae(rewards, values, dones, last_value, gamma, lam)

    monkeypatch.setattr(ppo_baseline, "Agent", RecordingAgent)
    monkeypatch.setattr(ppo_baseline, "compute_gae", recording_gae)
    args = ppo_baseline.Args(env_id="helper_envs:BootstrapProbe-v0", num_envs=2, num_steps=20,
                             total_timesteps=40, eval_episodes=0, run_name="probe", cuda=False)
    ppo_baseline.main(args)

    rewards, dones, gamma = seen["rewards"].numpy(), seen["dones"].numpy(), seen["gamma"]
    bootstrapped = 1.0 + gamma * seen["v_final"]
    assert abs(bootstrapped - 1.0) > 1e-4, "V(final_obs) happens to be ~0; the test could not tell"
    n_term = n_trunc = 0
    for i in range(rewards.shape[1]):
        starts = 0
        for t in range(rewards.shape[0]):
            if not dones[t, i]:
                assert rewards[t, i] == 1.0
                continue
            length = t - starts + 1
            assert length in (3, 4)
            if length == 3:  # terminated: the reward alone
                assert rewards[t, i] == 1.0
                n_term += 1
            else:  # truncated: reward + gamma * V(final_obs)
                assert rewards[t, i] == pytest.approx(bootstrapped, abs=1e-6)
                n_trunc += 1
            starts = t + 1
    assert n_term >= 4 and n_trunc >= 4
