"""transformer_ppo_baseline.py: the update replays the rollout exactly, the window never reaches beyond W steps
or into the previous episode, the cached keys and values equal a recomputation from scratch, truncations are
bootstrapped from the episode's own window, and a fast learning check on MemoryTask-v0.

The central property, as for the recurrent baseline: the log-probabilities and values the update recomputes
from the stored entry inputs (and the W-1 steps carried in from the previous rollout) equal, for the same
parameters, the ones the rollout computed step by step with its cache -- across episode boundaries inside the
rollout and across the rollout boundary, for whole rollouts and for chunks.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import memory_envs  # noqa: E402,F401  (registers the memory tasks)
import transformer_ppo_baseline as tp  # noqa: E402
from conftest import read_tb_scalars  # noqa: E402

# Different delays per env, so episodes end at different steps in each env; difficulty 1 makes every
# observation random, so an entry read that should not be (or one missed) changes the outputs.
DELAYS = (2, 3, 5)


def memory_envs_of(delays=DELAYS, env_id="MemoryTask-v0"):
    fns = [tp.make_env(env_id, dict(delay=d, difficulty=1), "vector") for d in delays]
    return gym.vector.SyncVectorEnv(fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


def small_agent(envs, window=4, seed=3, **kw):
    torch.manual_seed(seed)
    agent = tp.Agent(envs.single_observation_space, envs.single_action_space, normalize_obs=False,
                     hidden_size=16, num_layers=2, num_heads=2, window=window)
    tp.layer_init(agent.actor, std=1.0)  # O(1) logits, so that a wrong read shows in the log-probabilities
    return agent


def collect(agent, envs, window, steps, obs=None, seed=0):
    """A rollout driven exactly like main(): returns the carry-in, the stored entry inputs (T, N, ...), the
    rollout's logits and values, the outputs z, and the last observation."""
    n = envs.num_envs
    if obs is None:
        obs = torch.as_tensor(envs.reset(seed=seed)[0])
    carry = window.begin_rollout()
    rec = {k: [] for k in ("logits", "values", "z", *carry)}
    with torch.no_grad():
        for _ in range(steps):
            entry = window.entry(obs)
            z, kv = window.read(entry)
            action, _, _, value = agent.heads(z)
            window.push(entry, kv)
            for k, v in entry.items():
                rec[k].append(v.clone())
            rec["logits"].append(agent.actor(z))
            rec["values"].append(value.flatten())
            rec["z"].append(z)
            obs_np, reward, term, trunc, _ = envs.step(action.numpy())
            window.advance(action, reward)
            window.end_episodes(term | trunc)
            obs = torch.as_tensor(obs_np)
    out = {k: torch.stack(v) for k, v in rec.items()}
    inputs = {k: out.pop(k) for k in carry}
    assert inputs["tau"].shape[1] == n
    return carry, inputs, out, obs


def replay_all(agent, carry, inputs, seq_len, seqs):
    """The update's recomputation (sequence layout of tp.to_sequences) -> logits and values (seq_len, B)."""
    stream = {k: torch.cat([carry[k], inputs[k].transpose(0, 1)], 1) for k in carry}
    with torch.no_grad():
        z = agent.replay(tp.sequence_inputs(stream, seqs, seq_len, agent.window)).transpose(0, 1)
    return agent.actor(z), agent.critic(z).squeeze(-1)


def perturb_(agent, scale=0.05):
    with torch.no_grad():
        for p in agent.parameters():
            p.add_(scale * torch.randn_like(p))  # as after an update


# ---------------------------------------------------------------------------------------
# Exact replay
# ---------------------------------------------------------------------------------------
# whole rollout (T=24) and chunks of 6; short episodes that end inside the rollout, episodes longer than the
# rollout (the window crosses the rollout boundary mid-episode), and images through the CNN.
@pytest.mark.parametrize("seq_len", [24, 6])
@pytest.mark.parametrize("delays,env_id", [(DELAYS, "MemoryTask-v0"), ((50, 50, 50), "MemoryTask-v0"),
                                           ((3, 4), "helper_envs:ImageMemoryTask-v0")])
def test_update_reproduces_rollout(seq_len, delays, env_id):
    envs = memory_envs_of(delays, env_id)
    agent = small_agent(envs, window=4)
    window = tp.Window(agent, envs.num_envs, envs.single_observation_space, "cpu")
    steps = 24
    # Two rollouts: the second carries in the first's last W-1 steps; the parameters change in between.
    *_, obs = collect(agent, envs, window, 7)  # 7 steps: every env is mid-episode when the second begins
    perturb_(agent)
    carry, inputs, want, _ = collect(agent, envs, window, steps, obs=obs)
    envs.close()
    tau = inputs["tau"]
    assert (tau[0] > 0).all(), "the rollout opens mid-episode, so the carried steps are read"
    assert (tau[1:] == 0).sum() >= 4 if delays != (50, 50, 50) else (tau > 0).all()

    want_logits, want_values = tp.to_sequences(want["logits"], seq_len), tp.to_sequences(want["values"], seq_len)
    n_seqs = want_values.shape[1]
    order = np.random.default_rng(0).permutation(n_seqs)
    for mb in np.array_split(order, 2 if n_seqs > 3 else 1):  # minibatches of shuffled sequences
        logits, values = replay_all(agent, carry, inputs, seq_len, mb)
        torch.testing.assert_close(logits, want_logits[:, mb], atol=1e-5, rtol=0)
        torch.testing.assert_close(values, want_values[:, mb], atol=1e-5, rtol=0)

    # The test can fail: without the carried steps, or without the clocks that cut episodes, it breaks.
    everything = np.arange(n_seqs)
    blank = {k: torch.zeros_like(v) for k, v in carry.items()}
    no_clock = dict(inputs, tau=torch.full_like(tau, 100))
    for broken_carry, broken_inputs in ((blank, inputs), (carry, no_clock))[: 1 if delays == (50, 50, 50) else 2]:
        logits, values = replay_all(agent, broken_carry, broken_inputs, seq_len, everything)
        assert (logits - want_logits).abs().max() > 1e-3 or (values - want_values).abs().max() > 1e-3


def test_main_ratio_is_one_without_learning(tmp_path, monkeypatch):
    """End to end through main(): with learning rate 0 every minibatch of every epoch recomputes the rollout's
    log-probabilities (approx_kl 0) over 3 rollouts that start mid-episode, in chunks of 4 steps."""

    class SharpAgent(tp.Agent):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            tp.layer_init(self.actor, std=1.0)

    monkeypatch.setattr(tp, "Agent", SharpAgent)
    monkeypatch.chdir(tmp_path)
    tp.main(tp.Args(env_kwargs=("delay=7", "difficulty=1"), total_timesteps=3 * 3 * 16, num_envs=3, num_steps=16,
                    num_minibatches=3, update_epochs=2, learning_rate=0.0, hidden_size=16, window=5, chunk_len=4,
                    eval_episodes=4, run_name="r", cuda=False))
    scalars = read_tb_scalars(tmp_path / "runs" / "r")
    kls = [v for _, v in scalars["losses/approx_kl"]]
    assert len(kls) == 3 and max(abs(v) for v in kls) < 1e-7, kls
    assert max(v for _, v in scalars["debug/replay_max_error"]) < 1e-5
    record = json.loads((tmp_path / "runs" / "r" / "eval.json").read_text())
    assert record["algo"] == "transformer_ppo_baseline" and record["success_rate"] is not None


# ---------------------------------------------------------------------------------------
# The window
# ---------------------------------------------------------------------------------------
def test_window_mask_equals_its_definition():
    w, tau = 3, torch.tensor([[0, 1, 2, 3, 4, 0, 1]])
    mask = tp.window_mask(tau, 9, w)[0]  # 7 queries, the last 7 of 9 keys
    for q in range(7):
        for k in range(9):
            back = q + 2 - k
            assert mask[q, k] == (0 <= back <= min(int(tau[0, q]), w - 1)), (q, k)


def test_outputs_depend_on_the_last_w_steps_of_the_episode_only():
    """Perturbing one step's inputs changes the outputs of the W steps from it on within its episode, and
    nothing else: not the steps W or more later, not the next episode."""
    w = 4
    agent = small_agent(memory_envs_of((5,)), window=w)
    # One env: 3 padding steps, an episode of 8 steps (clocks 0..7), then a new episode (clocks 0..4).
    tau = torch.tensor([[0] * (w - 1) + list(range(8)) + list(range(5))])
    torch.manual_seed(0)
    inputs = dict(obs=torch.rand(1, tau.shape[1], 3), pact=torch.rand(1, tau.shape[1], 2),
                  prew=torch.randn(1, tau.shape[1]), tau=tau)
    with torch.no_grad():
        base = agent.replay(inputs)[0]
        for at in (w - 1 + 2, w - 1 + 7):  # clock 2, and the episode's last step
            for key in ("obs", "pact", "prew"):
                changed = {k: v.clone() for k, v in inputs.items()}
                changed[key][0, at] += 1.0
                diff = (agent.replay(changed)[0] - base).abs().amax(-1)
                moved = (diff > 1e-6).nonzero().flatten().tolist()
                step = at - (w - 1)
                assert moved == list(range(step, min(step + w, 8))), (key, at, moved)


def test_cached_reads_equal_a_recomputation_from_scratch():
    """Each step's output, acting with the cache (across episode ends and a rollout boundary with new
    parameters), equals the model run from scratch on that step's window alone: its last min(tau+1, W) steps."""
    envs = memory_envs_of(DELAYS)
    agent = small_agent(envs, window=3)
    window = tp.Window(agent, envs.num_envs, envs.single_observation_space, "cpu")
    *_, obs = collect(agent, envs, window, 7)
    perturb_(agent)
    _, inputs, rec, _ = collect(agent, envs, window, 12, obs=obs)
    envs.close()
    for t in range(12):
        for i in range(envs.num_envs):
            own = int(inputs["tau"][t, i].clamp(max=agent.window - 1)) + 1
            alone = {k: v[t - own + 1:t + 1, i].unsqueeze(0) for k, v in inputs.items()}
            if t - own + 1 < 0:  # the window reaches into the carried steps: skip (covered by the replay test)
                continue
            with torch.no_grad():
                e = agent.embed(**alone)
                z = agent.read(e[:, -1:], agent.keys_values(e), alone["tau"][:, -1:])[0, 0]
            torch.testing.assert_close(z, rec["z"][t, i], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------
# Truncation, learning, the docstring
# ---------------------------------------------------------------------------------------
def test_truncation_bootstraps_from_the_episodes_own_window(tmp_path, monkeypatch):
    """Every episode is truncated after 3 actions: its final observation is read with clock 3 (the episode's
    window, before the reset), and the next step starts at clock 0."""
    reads = []
    original = tp.Window.read

    def read(self, entry):
        reads.append(entry["tau"].clone())
        return original(self, entry)

    monkeypatch.setattr(tp.Window, "read", read)
    monkeypatch.chdir(tmp_path)
    tp.main(tp.Args(env_kwargs=("delay=8", "difficulty=1", "max_episode_steps=3"), total_timesteps=2 * 2 * 12,
                    num_envs=2, num_steps=12, num_minibatches=2, update_epochs=1, hidden_size=16, eval_episodes=0,
                    run_name="trunc", cuda=False))
    taus = torch.stack(reads)
    # per rollout: 12 acting reads (clocks 0, 1, 2, ...), 4 bootstrap reads (clock 3), 1 last-value read
    assert len(reads) == 2 * (12 + 4 + 1)
    boot = taus[(taus == 3).any(1)]
    assert len(boot) == 8 and (boot == 3).all()
    acting = taus[~(taus == 3).any(1)]
    assert set(acting.flatten().tolist()) == {0, 1, 2}


@pytest.mark.parametrize("window", [16, 1])
def test_solves_memory_task_delay4_with_full_context(tmp_path, monkeypatch, window):
    """MemoryTask-v0 delay 4 (the cue at the first step, random distractors) in 16k steps, about 10 s: with
    W = 16 >= 4 the decision step reads the cue (seeds 1, 2, 3 all reached success 1.0); with W = 1 the agent
    sees only the present step, so it stays at chance (0.5) -- the check can fail."""
    monkeypatch.chdir(tmp_path)
    start = time.time()
    tp.main(tp.Args(env_kwargs=("delay=4", "difficulty=1"), total_timesteps=16_384, seed=1, eval_episodes=100,
                    window=window, run_name="learn", cuda=False))
    success = json.loads((tmp_path / "runs" / "learn" / "eval.json").read_text())["success_rate"]
    assert success >= 0.9 if window == 16 else success <= 0.7, (success, time.time() - start)


def test_window_zero_is_the_episode_length_and_refused_where_none_is_stated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tp.main(tp.Args(env_kwargs=("delay=6",), window=0, total_timesteps=512, eval_episodes=0, run_name="w0", cuda=False))
    saved = torch.load(tmp_path / "runs" / "w0" / "checkpoint.pt", weights_only=False)["args"]
    assert saved["window"] == 6  # MemoryTask's episodes last `delay` steps
    with pytest.raises(tp.UserError, match="--window 0"):
        tp.main(tp.Args(env_id="FourRooms-v0", window=0, total_timesteps=512, run_name="w1", cuda=False))


def test_memory_preset_takes_trace_ppos_choices(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tp.main(tp.Args(env_kwargs=("delay=2",), memory_preset=True, total_timesteps=1024, eval_episodes=0, run_name="m",
                    cuda=False))
    ckpt = torch.load(tmp_path / "runs" / "m" / "checkpoint.pt", weights_only=False)
    assert all(ckpt["args"][k] == v for k, v in tp.MEMORY_PRESET.items())
    # the input split reached the agent: 2 x 3 observation channels, 2 actions, reward, clock
    assert ckpt["agent"]["embed_net.0.weight"].shape[1] == 2 * 3 + 2 + 1 + tp.TIME_DIM


def test_exploration_floor_samples_the_mixture_and_returns_the_softmax_log_prob():
    agent = tp.Agent(spaces.Box(-1.0, 1.0, (2,), np.float32), spaces.Discrete(4), False, 16, 1, 2, 4)
    z = torch.randn(4000, 16, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    action, logprob, _, _ = agent.heads(z, floor=torch.ones(4000))  # floor 1: uniform, whatever the softmax
    share = torch.bincount(action, minlength=4).float() / 4000
    assert ((share > 0.2) & (share < 0.3)).all(), share
    assert torch.allclose(logprob, torch.log_softmax(agent.actor(z), -1).gather(1, action[:, None])[:, 0])


def test_memory_preset_exploration_floor_decays_replays_exactly_and_is_checkpointed(tmp_path, monkeypatch):
    """PassiveTMaze's junction is tried because of the floor; acting through it keeps the replay exact."""
    monkeypatch.chdir(tmp_path)
    tp.main(tp.Args(env_id="PassiveTMaze-v0", env_kwargs=("length=6",), memory_preset=True, total_timesteps=4096,
                    window=0, eval_episodes=0, run_name="f", cuda=False))
    scalars = read_tb_scalars(tmp_path / "runs" / "f")
    floor = [v for _, v in scalars["intrinsic/explore_floor_mean"]]
    assert floor[0] > floor[-1] > 0  # observations become familiar
    assert max(v for _, v in scalars["debug/replay_max_error"]) < 1e-5
    ckpt = torch.load(tmp_path / "runs" / "f" / "checkpoint.pt", weights_only=False)
    assert ckpt["visit_counts"]["counts"].sum() == 4096  # every step counted
    with pytest.raises(tp.UserError, match="--explore-visits needs discrete actions"):
        tp.main(tp.Args(env_id="Pendulum-v1", explore_visits=20.0, total_timesteps=512, run_name="p", cuda=False))


def test_ratio_bound_is_trace_ppos_and_clips_the_policy_loss(tmp_path, monkeypatch):
    """The upper ratio bound: 1 + clip without the floor or where it barely changed the action's probability;
    (1 + clip) x acting probability / pi for an improbable action the floor drew. main() feeds it the floor and
    clips the policy loss with it: the bound replaced by 1 - clip gives another policy loss."""
    pi, floor = torch.tensor([[0.5, 1e-4], [0.9, 1e-4]]), torch.tensor([[0.0, 0.0], [0.1, 0.1]])
    bound = tp.ratio_max(floor, pi.log(), 0.2, 4)
    assert bound.flatten()[:3].tolist() == pytest.approx([1.2, 1.2, 1.2])
    assert bound[1, 1].item() == pytest.approx(1.2 * (0.9 * 1e-4 + 0.025) / 1e-4, rel=1e-4)
    monkeypatch.chdir(tmp_path)
    seen, real = [], tp.ratio_max

    def spy(floors, logprobs, clip, n_act):
        seen.append(float(floors.max()))
        return real(floors, logprobs, clip, n_act)

    def run(name):
        tp.main(tp.Args(env_id="PassiveTMaze-v0", env_kwargs=("length=5",), memory_preset=True,
                        total_timesteps=4 * 2 * 32, num_envs=2, num_steps=32, num_minibatches=2, update_epochs=2,
                        window=0, eval_episodes=0, run_name=name, cuda=False))
        return [v for _, v in read_tb_scalars(tmp_path / "runs" / name)["losses/policy_loss"]]

    monkeypatch.setattr(tp, "ratio_max", spy)
    losses = run("a")
    assert len(seen) == 4 and min(seen) > 0
    monkeypatch.setattr(tp, "ratio_max", lambda floors, logprobs, clip, n_act: torch.full_like(floors, 1 - clip))
    assert run("b") != losses


def test_crelu_obs_splits_the_signs_so_a_cue_and_its_negative_are_not_opposite_entries():
    """--crelu-obs (in --memory-preset, as in trace_ppo): the entry sees [relu(x), relu(-x)], so +10 and -10 (a rare
    cue, normalised) are not embedded as near-negatives (mean cosine over 5 fresh agents). The preset's replay: the
    exploration-floor test above."""
    cos = {False: [], True: []}
    for crelu in (False, True):
        for seed in range(5):
            torch.manual_seed(seed)
            agent = tp.Agent(spaces.Box(-10, 10, (2,), np.float32), spaces.Discrete(4), False, 16, 1, 2, 4,
                             crelu_obs=crelu)
            e = agent.embed(torch.tensor([[10.0, 0.0], [-10.0, 0.0]]), torch.zeros(2, 4), torch.zeros(2),
                            torch.zeros(2, dtype=torch.long))
            cos[crelu].append(torch.nn.functional.cosine_similarity(e[0], e[1], dim=0).item())
    assert np.mean(cos[False]) < -0.5 and np.mean(cos[True]) > -0.2, cos
    assert tp.MEMORY_PRESET["crelu_obs"] and not tp.PRESETS["vector"]["crelu_obs"]


def test_heads_compute_categoricals_values_and_gradients_to_the_bit():
    """The heads write Categorical's arithmetic out (speed). Samples, log-probabilities, entropies and the gradients
    of a loss on them must be torch's to the bit (the log-probability is taken before the entropy, as Categorical
    does: three uses of the logits summed in another order change the gradient's last bits)."""
    torch.manual_seed(0)
    agent = tp.Agent(spaces.Box(0, 1, (3,), np.float32), spaces.Discrete(3), False)
    with torch.no_grad():
        agent.actor.weight.mul_(300.0)  # spread-out logits, some probabilities near 0
    z = torch.randn(256, 64)
    dist = torch.distributions.Categorical(logits=agent.actor(z))
    torch.manual_seed(1)
    action, logp, entropy, _ = agent.heads(z)
    torch.manual_seed(1)
    assert torch.equal(action, dist.sample()) and entropy is None
    grads = []
    for categorical in (False, True):
        agent.zero_grad()
        if categorical:
            d = torch.distributions.Categorical(logits=agent.actor(z))
            new_logp, entropy, value = d.log_prob(action), d.entropy(), agent.critic(z)
        else:
            _, new_logp, entropy, value = agent.heads(z, action)
            assert torch.equal(new_logp, logp)
        (0.3 * new_logp.exp().mean() - 0.01 * entropy.mean() + value.square().mean()).backward()
        grads.append([p.grad.clone() for p in (agent.actor.weight, agent.actor.bias)])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
