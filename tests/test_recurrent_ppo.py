"""recurrent_ppo_baseline.py: the update reproduces the rollout's LSTM exactly, evaluation carries
the LSTM state, and (slow) the agent solves a short delayed-recall task.

The central property of a recurrent PPO: the logits and values the update recomputes from the
stored observations, episode starts and stored LSTM states equal, for the same parameters, the
ones the rollout computed step by step -- across episode boundaries inside the rollout, for whole
rollouts and for truncated-BPTT chunks. Otherwise the PPO ratio is not pi_new / pi_old and the
clipping acts on noise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch.distributions import Categorical

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import recurrent_ppo_baseline as rp  # noqa: E402
from conftest import read_tb_scalars  # noqa: E402

# Different delays per env, so episodes end at different steps in each env; difficulty 1 makes
# every observation random, so a state that leaks or is lost changes the outputs.
DELAYS = (2, 3, 5)


def memory_envs(delays=DELAYS, difficulty=1):
    fns = [rp.make_env("MemoryTask-v0", dict(delay=d, difficulty=difficulty), "vector") for d in delays]
    return gym.vector.SyncVectorEnv(fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


def collect(agent, envs, steps, seq_len, warmup=4, seed=0):
    """A rollout driven exactly like main(): one LSTM step per env step, starts[t] = obs[t] begins
    an episode, the LSTM state snapshotted at every chunk start. ``warmup`` steps run first so the
    recorded rollout opens mid-episode with a non-zero state, as every rollout after the first does."""
    torch.manual_seed(seed)
    n = envs.num_envs
    obs_np, _ = envs.reset(seed=seed)
    next_obs, next_start, state = torch.as_tensor(obs_np), torch.ones(n), agent.initial_state(n)
    next_prev = torch.zeros(n, agent.n_prev)
    rec = {k: [] for k in ("obs", "prev", "starts", "logits", "values", "h", "c")}
    with torch.no_grad():
        for t in range(warmup + steps):
            k = t - warmup
            if k >= 0 and k % seq_len == 0:
                rec["h"].append(state[0].clone())
                rec["c"].append(state[1].clone())
            hidden, state = agent.get_states(next_obs, next_prev, state, next_start)
            logits = agent.actor(hidden)
            if k >= 0:
                rec["obs"].append(next_obs)
                rec["prev"].append(next_prev)
                rec["starts"].append(next_start)
                rec["logits"].append(logits)
                rec["values"].append(agent.critic(hidden).flatten())
            action = Categorical(logits=logits).sample()
            obs_np, reward, term, trunc, _ = envs.step(action.numpy())
            next_obs = torch.as_tensor(obs_np)
            next_start = torch.as_tensor(term | trunc, dtype=torch.float32)
            next_prev = agent.prev_inputs(action, reward) * (1 - next_start).unsqueeze(1)
    out = {k: torch.stack(v) for k, v in rec.items()}
    out["final_state"] = state
    return out


def sequence_pass(agent, rec, seq_len, mb, zero_starts=False, zero_state=False, zero_prev=False):
    """The update's recomputation for the sequences ``mb`` (layout of rp.to_sequences)."""
    s_obs, s_starts = rp.to_sequences(rec["obs"], seq_len), rp.to_sequences(rec["starts"], seq_len)
    s_prev = rp.to_sequences(rec["prev"], seq_len) * (not zero_prev)
    n_seqs = s_obs.shape[1]
    s_h, s_c = (rec[k].transpose(0, 1).reshape(1, n_seqs, -1) for k in ("h", "c"))
    if zero_starts:
        s_starts = torch.zeros_like(s_starts)
    if zero_state:
        s_h, s_c = torch.zeros_like(s_h), torch.zeros_like(s_c)
    with torch.no_grad():
        hidden, state = agent.get_states(s_obs[:, mb].reshape(-1, s_obs.shape[-1]),
                                         s_prev[:, mb].flatten(0, 1), (s_h[:, mb], s_c[:, mb]),
                                         s_starts[:, mb].reshape(-1))
        logits = agent.actor(hidden).view(seq_len, len(mb), -1)
        values = agent.critic(hidden).view(seq_len, len(mb))
    return logits, values, state


# whole rollout (T=24) and truncated-BPTT chunks of 6; episodes that end inside the sequences
# (packed-segment path) and episodes longer than the rollout (plain nn.LSTM path); both cells, with and without
# the previous action and reward as inputs
@pytest.mark.parametrize("cell,prev_action_reward", [("lstm", False), ("gru", False), ("lstm", True), ("gru", True)])
@pytest.mark.parametrize("seq_len", [24, 6])
@pytest.mark.parametrize("delays", [DELAYS, (50, 50, 50)])
def test_update_reproduces_rollout(seq_len, delays, cell, prev_action_reward):
    torch.manual_seed(3)
    envs = memory_envs(delays)
    agent = rp.Agent(envs.single_observation_space, envs.single_action_space, normalize_obs=False, hidden_size=16,
                     cell=cell, prev_action_reward=prev_action_reward)
    steps = 24
    rec = collect(agent, envs, steps, seq_len)
    envs.close()
    starts = rec["starts"]
    # The rollout must exercise what is tested: episode starts inside the sequences (or none at
    # all) and sequences that open mid-episode (so their stored state matters).
    assert (starts[1:].sum() >= 10 if delays == DELAYS else starts.sum() == 0) and (starts[0] == 0).any()
    assert rec["h"].abs().max() > 0.01

    want_logits = rp.to_sequences(rec["logits"], seq_len)
    want_values = rp.to_sequences(rec["values"], seq_len)
    n_seqs = want_values.shape[1]
    rng = np.random.default_rng(0)
    order = rng.permutation(n_seqs)
    for mb in np.array_split(order, 2 if n_seqs > 3 else 1):  # minibatches of shuffled sequences
        logits, values, _ = sequence_pass(agent, rec, seq_len, mb)
        torch.testing.assert_close(logits, want_logits[:, mb], atol=1e-5, rtol=0)
        torch.testing.assert_close(values, want_values[:, mb], atol=1e-5, rtol=0)

    everything = np.arange(n_seqs)
    # The test can fail: ignoring the episode starts, or the stored initial states, breaks it.
    for broken in [*(dict(zero_starts=True), dict(zero_state=True))[delays != DELAYS:],
                   *[dict(zero_prev=True)] * prev_action_reward]:
        logits, values, _ = sequence_pass(agent, rec, seq_len, everything, **broken)
        assert (logits - want_logits).abs().max() > 1e-3 or (values - want_values).abs().max() > 1e-3, broken

    if seq_len == steps:  # the sequence pass also ends in the rollout's final state
        _, _, state = sequence_pass(agent, rec, seq_len, everything)
        torch.testing.assert_close(state[0], rec["final_state"][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(state[1], rec["final_state"][1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("bptt_len", [0, 4])
def test_main_ratio_is_one_without_learning(tmp_path, monkeypatch, bptt_len):
    """End to end through main(): with learning rate 0 the parameters never change, so every
    minibatch of every epoch must recompute the rollout's log-probabilities exactly
    (approx_kl = 0, clipfrac = 0) -- over 3 iterations whose rollouts start mid-episode."""

    class SharpAgent(rp.Agent):
        # The default actor init (std 0.01) gives near-uniform policies whose log-probabilities
        # barely react to a wrong LSTM state; O(1) logits make a mismatch show in approx_kl.
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            rp.layer_init(self.actor, std=1.0)

    monkeypatch.setattr(rp, "Agent", SharpAgent)
    monkeypatch.chdir(tmp_path)
    args = rp.Args(env_kwargs=("delay=3", "difficulty=1"), total_timesteps=3 * 3 * 16, num_envs=3, num_steps=16,
                   num_minibatches=3, update_epochs=2, learning_rate=0.0, hidden_size=16, bptt_len=bptt_len,
                   eval_episodes=4, run_name="r", cuda=False)
    rp.main(args)
    scalars = read_tb_scalars(tmp_path / "runs" / "r")
    kls = [v for _, v in scalars["losses/approx_kl"]]
    assert len(kls) == 3 and max(abs(v) for v in kls) < 1e-7, kls  # float32 rounding: ~1e-9
    assert all(v == 0 for _, v in scalars["losses/clipfrac"])
    record = json.loads((tmp_path / "runs" / "r" / "eval.json").read_text())
    assert record["algo"] == "recurrent_ppo_baseline" and record["eval_episodes"] == 4
    assert record["success_rate"] is not None


def recall_agent():
    """A hand-set LSTM that latches the cue of MemoryTask (difficulty 0) and answers it.

    encoder unit 0 = tanh(3 * obs[0]); input, forget and output gates saturated open; the cell
    candidate of LSTM unit 0 is tanh(5 * encoder unit 0), so the cell holds ~1 after a cue of 1
    and 0 after a cue of 0 (later observations are all zero and add nothing); action 1 iff h > 0.38.
    Without its carried state it sees zeros at the decision step and always answers 0.
    """
    space = gym.spaces.Box(0.0, 1.0, (3,), np.float32)
    agent = rp.Agent(space, gym.spaces.Discrete(2), normalize_obs=False, hidden_size=4)
    with torch.no_grad():
        for p in agent.parameters():
            p.zero_()
        agent.encoder[1].weight[0, 0] = 3.0
        hid = agent.rnn.hidden_size
        agent.rnn.bias_ih_l0[0:hid] = 10.0            # input gate
        agent.rnn.bias_ih_l0[hid:2 * hid] = 10.0      # forget gate
        agent.rnn.weight_ih_l0[2 * hid, 0] = 5.0      # cell candidate of unit 0
        agent.rnn.bias_ih_l0[3 * hid:] = 10.0         # output gate
        agent.actor.weight[1, 0] = 10.0
        agent.actor.bias[1] = -3.8
    return agent


def test_evaluation_carries_state_and_resets_it(monkeypatch):
    args = rp.Args(env_id="MemoryTask-v0", seed=5, eval_episodes=40)
    kwargs = dict(delay=4, difficulty=0)
    agent = recall_agent()
    result = rp.evaluate(agent, args, kwargs, "vector", torch.device("cpu"))
    assert result["success_rate"] == 1.0 and result["mean_return"] == 1.0

    # The same agent evaluated with its state reset at every step, or never reset between
    # episodes, fails -- so the assertion above holds only if evaluate() threads the state
    # through each episode and resets it exactly at episode starts.
    original = agent.get_action_and_value
    for name, fake_starts in (("stateless", torch.ones_like), ("never reset", torch.zeros_like)):
        def patched(x, prev, lstm_state, starts, fake=fake_starts, **kw):
            return original(x, prev, lstm_state, fake(starts), **kw)

        monkeypatch.setattr(agent, "get_action_and_value", patched)
        broken = rp.evaluate(agent, args, kwargs, "vector", torch.device("cpu"))
        assert broken["success_rate"] < 0.9, (name, broken)


@pytest.mark.slow
def test_solves_memory_task_delay4(tmp_path, monkeypatch):
    """Budget measured at 30k steps (~10-60 s on a shared 2-core machine): seeds 1, 2, 3 reached
    eval success 1.00, 1.00, 1.00 (a memoryless policy cannot exceed chance, 0.5, here)."""
    monkeypatch.chdir(tmp_path)
    rp.main(rp.Args(env_kwargs=("delay=4", "difficulty=1"), total_timesteps=30_000, seed=1, eval_episodes=200,
                    run_name="learn", cuda=False))
    record = json.loads((tmp_path / "runs" / "learn" / "eval.json").read_text())
    assert record["success_rate"] >= 0.95, record


def test_truncation_bootstraps_from_the_pre_reset_state(tmp_path, monkeypatch):
    """A time-limit truncation is bootstrapped with V(final_obs) computed from the LSTM state the
    truncated episode had reached -- not a reset (zero) state, not a stale one."""
    calls = {"state": None, "bootstraps": 0, "nonzero": 0, "values": 0}
    original_act, original_value = rp.Agent.get_action_and_value, rp.Agent.get_value

    def act(self, x, prev, lstm_state, starts, *a, **kw):
        out = original_act(self, x, prev, lstm_state, starts, *a, **kw)
        if len(x) == lstm_state[0].shape[1]:  # a rollout step, not an update pass
            calls["state"] = out[-1]
        return out

    def value(self, x, prev, lstm_state, starts):
        calls["values"] += 1
        if not starts.any():  # bootstrap (or a rollout that ended mid-episode)
            calls["nonzero"] += int(lstm_state[0].abs().max() > 1e-3)
            torch.testing.assert_close(lstm_state[0], calls["state"][0], atol=0, rtol=0)
            torch.testing.assert_close(lstm_state[1], calls["state"][1], atol=0, rtol=0)
            calls["bootstraps"] += 1
        return original_value(self, x, prev, lstm_state, starts)

    monkeypatch.setattr(rp.Agent, "get_action_and_value", act)
    monkeypatch.setattr(rp.Agent, "get_value", value)
    monkeypatch.chdir(tmp_path)
    # delay 8 but a 3-step time limit: every episode is truncated, none terminates.
    rp.main(rp.Args(env_kwargs=("delay=8", "difficulty=1", "max_episode_steps=3"), total_timesteps=2 * 2 * 16, num_envs=2,
                    num_steps=16, num_minibatches=2, update_epochs=1, hidden_size=8, eval_episodes=0,
                    run_name="trunc", cuda=False))
    # 16 steps per rollout -> 5 truncations per rollout, 2 rollouts; plus 2 end-of-rollout values.
    assert calls["bootstraps"] >= 10 and calls["nonzero"] >= 10 and calls["values"] == 12, calls


def test_memory_preset_takes_trace_ppos_choices_and_only_for_vector_envs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = rp.Args(env_kwargs=("delay=2",), total_timesteps=1024, memory_preset=True, cell="gru", eval_episodes=0,
                   run_name="mem", cuda=False)
    rp.main(args)
    ckpt = torch.load(tmp_path / "runs" / "mem" / "checkpoint.pt", weights_only=False)
    saved = ckpt["args"]
    for key, value in rp.MEMORY_PRESET.items():
        assert saved[key] == value, key
    assert ckpt["agent"]["encoder.2.weight"].shape[1] == 2 * 3  # the input split reached the agent (3 obs channels)
    assert saved["cell"] == "gru" and saved["clip_coef"] == rp.PRESETS["vector"]["clip_coef"]
    with pytest.raises(rp.UserError, match="--memory-preset"):
        rp.main(rp.Args(env_id="Pendulum-v1", memory_preset=True, total_timesteps=64, run_name="bad", cuda=False))


def test_memory_preset_exploration_floor_replays_exactly_logs_and_resumes(tmp_path, monkeypatch):
    """--memory-preset turns on trace_ppo's exploration floor (m = 20): the update still replays the rollout's
    softmax log-probabilities, the floor falls as observations become familiar, the checkpoint's counter holds
    every step's visit and --resume continues it."""
    monkeypatch.chdir(tmp_path)
    rp.main(rp.Args(env_id="PassiveTMaze-v0", env_kwargs=("length=5",), memory_preset=True, total_timesteps=4 * 2 * 32,
                    num_envs=2, num_steps=32, num_minibatches=2, update_epochs=2, hidden_size=16, eval_episodes=2,
                    run_name="floor", cuda=False))
    run_dir = tmp_path / "runs" / "floor"
    scalars = read_tb_scalars(run_dir)
    assert max(v for _, v in scalars["debug/replay_max_error"]) < 1e-5
    floor_mean = [v for _, v in scalars["intrinsic/explore_floor_mean"]]
    assert len(floor_mean) == 4 and floor_mean[0] > floor_mean[-1] > 0, floor_mean
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert ckpt["args"]["explore_visits"] == 20.0 and ckpt["visit_counts"]["counts"].sum().item() == 256

    ckpt["iteration"], ckpt["global_step"] = 2, 128  # as if killed after the second update
    ckpt["visit_counts"]["counts"] *= 0.5  # the 128 visits counted by then
    torch.save(ckpt, run_dir / "checkpoint.pt")
    rp.main(rp.Args(resume="floor"))
    after = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    # Two more updates add 128 visits to the restored 128 (a fresh counter would hold only 128).
    assert after["iteration"] == 4 and after["visit_counts"]["counts"].sum().item() == 256


def test_exploration_floor_of_one_acts_uniformly_with_the_softmax_log_prob():
    agent = rp.Agent(gym.spaces.Box(0.0, 1.0, (3,), np.float32), gym.spaces.Discrete(4), normalize_obs=False,
                     hidden_size=8)
    with torch.no_grad():
        agent.actor.bias.copy_(torch.tensor([8.0, -8.0, -8.0, -8.0]))  # the softmax all but always picks 0
    n = 4000
    x, prev, state, starts = torch.rand(1, 3).expand(n, 3), torch.zeros(n, 0), agent.initial_state(n), torch.ones(n)
    torch.manual_seed(0)
    with torch.no_grad():
        action, logprob, *_ = agent.get_action_and_value(x, prev, state, starts, floor=torch.ones(n))
        greedy, *_ = agent.get_action_and_value(x, prev, state, starts, greedy=True, floor=torch.ones(n))
        no_floor, *_ = agent.get_action_and_value(x, prev, state, starts)
        log_softmax = torch.log_softmax(agent.actor(agent.get_states(x, prev, state, starts)[0]), 1)
    share = torch.bincount(action, minlength=4) / n
    assert ((share > 0.2) & (share < 0.3)).all(), share
    torch.testing.assert_close(logprob, log_softmax.gather(1, action.unsqueeze(1)).squeeze(1), atol=1e-5, rtol=0)
    assert (greedy == 0).all() and (no_floor == 0).float().mean() > 0.99  # greedy ignores the floor


def test_exploration_floor_needs_discrete_actions_and_a_non_negative_m(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for args, message in ((dict(env_id="Pendulum-v1", explore_visits=10.0), "--explore-visits needs discrete actions; "
                                                                           "Pendulum-v1 has Box actions"),
                          (dict(explore_visits=-1.0), "--explore-visits must be >= 0")):
        with pytest.raises(rp.UserError, match=message) as err:
            rp.main(rp.Args(total_timesteps=64, run_name="bad", cuda=False, **args))
        assert "\n" not in str(err.value)
    assert not (tmp_path / "runs").exists()


def test_ratio_bound_is_trace_ppos_and_clips_the_policy_loss(tmp_path, monkeypatch):
    """The upper ratio bound: 1 + clip without the floor or where it barely changed the action's probability;
    (1 + clip) x acting probability / pi for an improbable action the floor drew. main() feeds it the floor and
    clips the policy loss with it: the bound replaced by 1 - clip gives another policy loss."""
    pi, floor = torch.tensor([[0.5, 1e-4], [0.9, 1e-4]]), torch.tensor([[0.0, 0.0], [0.1, 0.1]])
    bound = rp.ratio_max(floor, pi.log(), 0.2, 4)
    assert bound.flatten()[:3].tolist() == pytest.approx([1.2, 1.2, 1.2])
    assert bound[1, 1].item() == pytest.approx(1.2 * (0.9 * 1e-4 + 0.025) / 1e-4, rel=1e-4)
    monkeypatch.chdir(tmp_path)
    seen, real = [], rp.ratio_max

    def spy(floors, logprobs, clip, n_act):
        seen.append(float(floors.max()))
        return real(floors, logprobs, clip, n_act)

    def run(name):
        rp.main(rp.Args(env_id="PassiveTMaze-v0", env_kwargs=("length=5",), memory_preset=True,
                        total_timesteps=4 * 2 * 32, num_envs=2, num_steps=32, num_minibatches=2, update_epochs=2,
                        hidden_size=16, eval_episodes=0, run_name=name, cuda=False))
        return [v for _, v in read_tb_scalars(tmp_path / "runs" / name)["losses/policy_loss"]]

    monkeypatch.setattr(rp, "ratio_max", spy)
    losses = run("a")
    assert len(seen) == 4 and min(seen) > 0
    monkeypatch.setattr(rp, "ratio_max", lambda floors, logprobs, clip, n_act: torch.full_like(floors, 1 - clip))
    assert run("b") != losses


def test_crelu_obs_splits_the_signs_so_a_cue_and_its_negative_are_not_opposite_features():
    """--crelu-obs (in --memory-preset, as in trace_ppo): the encoder sees [relu(x), relu(-x)]; without it a tanh
    layer with zero bias maps -x to exactly minus the features of x. (The preset's replay: the tests above.)"""
    cos = {}
    for crelu in (False, True):
        torch.manual_seed(0)
        agent = rp.Agent(gym.spaces.Box(-10, 10, (2,), np.float32), gym.spaces.Discrete(4), False, 16, crelu_obs=crelu)
        f = agent.features(torch.tensor([[10.0, 0.0], [-10.0, 0.0]]))
        cos[crelu] = torch.nn.functional.cosine_similarity(f[0], f[1], dim=0).item()
    assert cos[False] < -0.99 and cos[True] > -0.5, cos
    assert rp.MEMORY_PRESET["crelu_obs"] and not rp.PRESETS["vector"]["crelu_obs"]
