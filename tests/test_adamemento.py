"""adamemento_ppo.py: memory buffers, reflection, ensemble, intrinsic rewards, off-policy correction, smoke runs."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from gymnasium import spaces
from torch.distributions import Categorical, Normal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import adamemento_ppo as am  # noqa: E402
import memory_envs  # noqa: E402
import run_contract  # noqa: E402
import ppo_baseline  # noqa: E402

SCRIPT = os.path.join(ROOT, "adamemento_ppo.py")
torch.set_num_threads(1)  # the suite shares two cores with other jobs


# --------------------------------------------------------------------------- buffers
def _buffer(capacity):
    return am.TrajectoryBuffer(capacity, (2,), np.float32, (), np.int64)


def _traj(start, length):
    obs = np.stack([np.arange(start, start + length, dtype=np.float32)] * 2, 1)
    return obs, np.arange(start, start + length)


def test_buffer_capacity_keeps_most_recent_transitions():
    buf = _buffer(10)
    buf.add(*_traj(0, 4))
    assert len(buf) == 4 and buf.trajectories == 1
    buf.add(*_traj(100, 9))  # 13 transitions into 10 slots: the 3 oldest go
    assert len(buf) == 10 and buf.trajectories == 2
    assert sorted(buf.actions.tolist()) == [3] + list(range(100, 109))
    buf.add(*_traj(500, 25))  # longer than the buffer: its last 10 steps stay
    assert sorted(buf.actions.tolist()) == list(range(515, 525))
    assert np.array_equal(buf.obs[:, 0], buf.actions.astype(np.float32))  # obs and actions stay paired


def test_buffer_state_roundtrip():
    buf = _buffer(8)
    buf.add(*_traj(0, 5))
    other = _buffer(8)
    other.load_state_dict(buf.state_dict())
    assert len(other) == 5 and other.pos == buf.pos and np.array_equal(other.actions[:5], buf.actions[:5])


def test_success_rule_positive_routes_by_sign():
    rule = am.SuccessRule("positive", 0.8, 100)
    assert [rule(r) for r in (1.0, 0.0, -1.0, 0.5)] == [True, False, False, True]


def test_success_rule_quantile_strict_and_ties_not_stored():
    rule = am.SuccessRule("quantile", 0.5, 4)
    assert rule(0.0) is None  # no history yet
    assert rule(0.0) is None  # tie with the median of [0]
    assert rule(1.0) is True  # above the median of [0, 0]
    assert rule(-1.0) is False  # below the median of [0, 0, 1]
    rule(5.0)  # window of 4 now holds [0, 1, -1, 5]: median 0.5
    assert rule(0.4) is False and list(rule.history) == [1.0, -1.0, 5.0, 0.4]


def test_loop_erasure_keeps_last_visit_of_each_observation():
    a, b, c, goal = (np.array([v], np.float32) for v in (0, 1, 2, 3))
    # a -> b -> (wall bump) b -> a -> b -> c -> goal: the loop a,b,b,a is erased.
    assert am.erase_loops([a, b, b, a, b, c, goal]) == [3, 4, 5, 6]
    assert am.erase_loops([a, b, c]) == [0, 1, 2]


def test_balanced_sampling_draws_half_from_each_buffer():
    np.random.seed(0)
    succ, fail = _buffer(1000), _buffer(1000)
    succ.add(*_traj(0, 3))  # a rare success ...
    fail.add(*_traj(1000, 900))  # ... against many failures
    obs, actions, labels = am.sample_balanced(succ, fail, 64)
    assert labels.sum() == 32 and len(labels) == 64
    assert (actions[labels == 1] < 3).all() and (actions[labels == 0] >= 1000).all()


# --------------------------------------------------------------------------- reflection
@pytest.mark.parametrize("continuous", [False, True])
def test_reflection_confidence_in_unit_interval_and_learns_labels(continuous):
    torch.manual_seed(0)
    act_space = spaces.Box(-1, 1, (1,), np.float32) if continuous else spaces.Discrete(3)
    memory = am.MemoryReflection((4,), act_space)
    opt = torch.optim.Adam(memory.parameters(), lr=3e-3)
    x = torch.randn(512, 4)
    # Synthetic outcomes: an action succeeds iff it agrees with the sign of the first feature.
    if continuous:
        a = torch.rand(512, 1) * 2 - 1
        labels = ((a[:, 0] > 0) == (x[:, 0] > 0)).float()
    else:
        a = torch.randint(0, 3, (512,))
        labels = (a == (x[:, 0] > 0).long() * 2).float()
    loss0, _ = memory.reflection_loss(x, a, labels)
    for _ in range(300):
        loss, acc = memory.reflection_loss(x, a, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    conf = torch.sigmoid(memory.confidence_logit(x, a)).detach()
    assert loss.item() < 0.5 * loss0.item() and acc.item() > 0.9
    assert ((conf >= 0) & (conf <= 1)).all()
    _, proposal_conf = memory.propose(torch.randn(1000, 4) * 100)  # extreme inputs still in [0, 1]
    assert ((proposal_conf >= 0) & (proposal_conf <= 1)).all()


def test_prediction_network_imitates_successes():
    torch.manual_seed(0)
    memory = am.MemoryReflection((3,), spaces.Discrete(4))
    opt = torch.optim.Adam(memory.parameters(), lr=3e-3)
    x = torch.randn(256, 3)
    target = (x[:, 1] > 0).long() + 2
    for _ in range(200):
        loss = memory.prediction_loss(x, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    proposal, _ = memory.propose(x)
    assert (proposal == target).float().mean() > 0.95


# --------------------------------------------------------------------------- ensemble
def test_ensemble_takes_memory_action_exactly_when_confidence_above_kappa():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.7]] * 5))
    dist = Categorical(logits=logits)
    proposal = torch.tensor([0, 0, 1, 1, 2])
    policy_action = torch.tensor([2, 2, 2, 2, 1])
    confidence = torch.tensor([0.2, 0.8, 0.8001, 0.99, 1.0])
    action, logp_old, log_mu, chosen = am.ensemble_step(dist, proposal, confidence, 0.8, 0.0, policy_action,
                                                        torch.rand(5))
    assert chosen.tolist() == [False, False, True, True, True]
    assert action.tolist() == [2, 2, 1, 1, 2]
    assert torch.allclose(logp_old.exp(), torch.tensor([0.7, 0.7, 0.2, 0.2, 0.7]))
    # eps = 0: where the memory acts, mu is a point mass (log mu = 0); elsewhere mu = pi_old.
    assert torch.allclose(log_mu, torch.tensor([math.log(0.7)] * 2 + [0.0] * 3))


def test_ensemble_behaviour_probability_with_epsilon_by_hand():
    eps = 0.25
    dist = Categorical(probs=torch.tensor([[0.1, 0.2, 0.7]] * 3))
    proposal = torch.tensor([0, 0, 1])
    policy_action = torch.tensor([2, 2, 2])
    confidence = torch.tensor([0.9, 0.9, 0.1])
    uniform = torch.tensor([0.9, 0.1, 0.0])  # env 0: memory acts; env 1: the policy samples (u < eps)
    action, logp_old, log_mu, chosen = am.ensemble_step(dist, proposal, confidence, 0.5, eps, policy_action,
                                                        uniform)
    assert action.tolist() == [0, 2, 2] and chosen.tolist() == [True, False, False]
    # mu(a|s) = (1 - eps) 1[a = memory action] + eps pi_old(a|s) where confident, pi_old elsewhere.
    expected_mu = [0.75 * 1 + 0.25 * 0.1, 0.25 * 0.7, 0.7]
    assert torch.allclose(log_mu.exp(), torch.tensor(expected_mu))
    ratio = (logp_old - log_mu).exp()
    assert torch.allclose(ratio, torch.tensor([0.1 / 0.775, 4.0, 1.0]))
    assert (ratio <= 1 / eps + 1e-6).all()  # the mixture bounds every importance ratio by 1/eps


def test_ensemble_continuous_behaviour_density_by_hand():
    torch.manual_seed(0)
    eps = 0.2
    dist = Normal(torch.zeros(2, 1), torch.ones(2, 1))
    proposal = torch.tensor([[1.5], [1.5]])
    action, logp_old, log_mu, chosen = am.ensemble_step(dist, proposal, torch.tensor([0.95, 0.3]), 0.9, eps,
                                                        torch.tensor([[0.3], [0.3]]), torch.tensor([0.5, 0.5]))
    assert chosen.tolist() == [True, False]
    a = action[0, 0].item()
    phi = lambda v, m: math.exp(-0.5 * (v - m) ** 2) / math.sqrt(2 * math.pi)  # noqa: E731
    assert log_mu[0].exp().item() == pytest.approx(0.8 * phi(a, 1.5) + 0.2 * phi(a, 0.0), rel=1e-5)
    assert action[1, 0].item() == pytest.approx(0.3) and log_mu[1].item() == pytest.approx(logp_old[1].item())


# --------------------------------------------------------------------------- off-policy correction
def test_traced_gae_matches_hand_computation():
    g, lam = 0.9, 0.5
    rewards = torch.tensor([[1.0], [0.0], [2.0]])
    values = torch.tensor([[0.5], [1.0], [0.2]])
    dones = torch.tensor([[0.0], [0.0], [0.0]])
    traces = torch.tensor([[0.3], [0.4], [0.8]])
    last = torch.tensor([1.5])
    adv = am.compute_gae(rewards, values, dones, last, g, lam, traces)
    d2 = 2.0 + g * 1.5 - 0.2
    d1 = 0.0 + g * 0.2 - 1.0
    d0 = 1.0 + g * 1.0 - 0.5
    a2 = d2
    a1 = d1 + g * lam * 0.8 * a2  # the trace of the *next* action cuts the tail
    a0 = d0 + g * lam * 0.4 * a1
    assert torch.allclose(adv[:, 0], torch.tensor([a0, a1, a2]))


def test_traced_gae_respects_episode_ends():
    rewards = torch.tensor([[1.0], [1.0]])
    values = torch.tensor([[0.0], [0.0]])
    adv = am.compute_gae(rewards, values, torch.tensor([[1.0], [0.0]]), torch.tensor([10.0]), 0.9, 0.9,
                         torch.tensor([[0.5], [0.5]]))
    assert torch.allclose(adv[:, 0], torch.tensor([1.0, 1.0 + 0.9 * 10.0]))


def test_unit_traces_reduce_to_ppo_baseline_gae():
    torch.manual_seed(0)
    r, v, last = torch.randn(16, 3), torch.randn(16, 3), torch.randn(3)
    d = (torch.rand(16, 3) < 0.2).float()
    ours = am.compute_gae(r, v, d, last, 0.99, 0.95, torch.ones(16, 3))
    assert torch.allclose(ours, ppo_baseline.compute_gae(r, v, d, last, 0.99, 0.95), atol=1e-6)
    assert torch.allclose(am.compute_gae(r, v, d, last, 0.99, 0.95), ours)


# --------------------------------------------------------------------------- intrinsic reward
def _train_novelty(model, frequent, steps=150):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(steps):
        loss = model.loss(frequent)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.novelty(frequent)  # the frequent observations are also *seen* (counts, statistics)


@pytest.mark.parametrize("kind", ["coarse-fine", "coarse-fine-count", "coarse", "rnd"])
def test_intrinsic_reward_higher_for_unseen_observation(kind):
    torch.manual_seed(0)
    frequent = torch.zeros(64, 12)
    frequent[:, 0] = 1.0  # one observation seen over and over
    unseen = torch.zeros(1, 12)
    unseen[0, 7] = 1.0
    if kind == "rnd":
        model = am.RND((12,))
    else:
        model = am.CoarseFine((12,), 16, 1.0, 0.0 if kind == "coarse" else 1.0, 1e-3,
                              fine_bonus="count" if kind.endswith("count") else "surprisal",
                              center=not kind.endswith("count"))
    _train_novelty(model, frequent)
    r_frequent, _ = model.novelty(frequent[:1], update=False)
    r_unseen, _ = model.novelty(unseen, update=False)
    assert r_unseen.item() > r_frequent.item()


@pytest.mark.parametrize("bonus", ["surprisal", "count"])
def test_fine_novelty_is_rarity_of_active_units(bonus):
    model = am.CoarseFine((2,), 2, 0.0, 1.0, 0.0, fine_bonus=bonus)
    model.encoder = nn.ReLU()  # latent = input: unit 0 fires for x=[1,0], unit 1 for [0,1]
    model.decoder = nn.Identity()
    common, rare = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    for _ in range(50):
        model.novelty(common)
    model.novelty(rare)
    _, stats_common = model.novelty(common, update=False)
    _, stats_rare = model.novelty(rare, update=False)
    # Unit 0 fired in 50 of 51 observations, unit 1 in one.
    if bonus == "surprisal":  # -log((n + 1) / (N + 2))
        expected = (-math.log(51 / 53), -math.log(2 / 53))
    else:  # 1 / sqrt(n + 1)
        expected = (1 / math.sqrt(51), 1 / math.sqrt(2))
    assert stats_common["fine"] == pytest.approx(expected[0], rel=1e-5)
    assert stats_rare["fine"] == pytest.approx(expected[1], rel=1e-5)
    # Both reconstruct perfectly (coarse = 0): only the fine term tells them apart.
    assert stats_common["coarse"] == stats_rare["coarse"] == 0.0
    reward_common, _ = model.novelty(common, update=False)
    reward_rare, _ = model.novelty(rare, update=False)
    assert reward_rare.item() > reward_common.item()


def test_intrinsic_normaliser_uses_time_axis_and_never_resets():
    filt = am.RewardForwardFilter(2, 0.5)
    rewards = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 2.0]])
    filt(rewards)
    assert np.allclose(filt.returns, [1.75, 2.0])  # 1 -> 1.5 -> 1.75 along time; env 1: 0 -> 0 -> 2
    expected = np.array([1.0, 0.0, 1.5, 0.0, 1.75, 2.0])
    assert filt.rms.var.item() == pytest.approx(expected.var(), rel=1e-3)


def test_novelty_input_uses_last_atari_frame_and_clips():
    space = spaces.Box(0, 255, (4, 84, 84), np.uint8)
    inp = am.NoveltyInput(space, atari=True)
    assert inp.shape == (1, 84, 84)
    x = torch.zeros(2, 4, 84, 84, dtype=torch.uint8)
    x[:, 3] = 255
    assert torch.equal(inp.raw(x), torch.ones(2, 1, 84, 84))
    inp.rms.var.fill_(1e-6)
    assert inp(x).max().item() == 5.0
    hwc = am.NoveltyInput(spaces.Box(0, 255, (16, 16, 1), np.uint8), atari=False)
    assert hwc.shape == (1, 16, 16) and hwc.raw(torch.zeros(3, 16, 16, 1)).shape == (3, 1, 16, 16)


# --------------------------------------------------------------------------- end to end
# In-process runs (a fresh interpreter costs seconds on a loaded machine); the CLI itself is
# exercised by the subprocess tests at the end.
@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def go(**kwargs):
        am.main(am.Args(**dict(dict(run_name="smoke", eval_episodes=2, checkpoint_interval=0), **kwargs)))
        return tmp_path / "runs" / "smoke"

    return go


def _scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _saved_args(run_dir):
    """The arguments the run resolved (presets filled in), as its checkpoint saved them."""
    return torch.load(run_dir / "checkpoint.pt", weights_only=False)["args"]


def test_smoke_vector_task_memory_acts(run):
    # MemoryTask delay 2: random play wins and loses at once, so both buffers fill and the memory acts.
    run_dir = run(env_id="MemoryTask-v0", env_kwargs=("delay=2",), total_timesteps=1024, num_steps=32,
                  success_rule="positive", kappa=0.0, memory_updates=4)
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["algo"] == "adamemento_ppo" and result["success_rate"] is not None
    assert result["memory_action_fraction"] is not None
    tags = _scalars(run_dir)
    for key in ("charts/episodic_return", "charts/SPS", "losses/value_loss", "losses/int_value_loss",
                "intrinsic/reward_mean", "intrinsic/coarse", "intrinsic/fine", "memory/action_fraction",
                "memory/confidence_mean", "memory/refl_loss", "memory/importance_weight_mean"):
        assert key in tags, key
    assert max(tags["memory/action_fraction"]) > 0.5  # kappa = 0: the memory acts wherever it can
    assert min(tags["memory/importance_weight_mean"]) < 1.0
    assert (run_dir / "checkpoint.pt").exists()


def test_smoke_image_task(run):
    run_dir = run(env_id="DarkChamber-v0", env_kwargs=("size=4",), total_timesteps=128, num_envs=2, num_steps=32,
                  num_minibatches=2, update_epochs=2, success_rule="positive")
    assert "intrinsic/fine" in _scalars(run_dir)
    assert _saved_args(run_dir)["kappa"] == 0.5  # discrete actions: the balanced classifier's boundary


def test_smoke_ppo_rnd_baseline(run):
    run_dir = run(env_id="CliffWalkingFail-v0", intrinsic="rnd", reflection=False, total_timesteps=256,
                  num_steps=32)
    tags = _scalars(run_dir)
    assert "intrinsic/rnd_error" in tags and not any(t.startswith("memory/") for t in tags)


def test_smoke_atari(run):
    run_dir = run(env_id="ALE/Pong-v5", total_timesteps=64, num_envs=2, num_steps=32, num_minibatches=2,
                  update_epochs=1, buffer_size=100, eval_episodes=0)
    assert (run_dir / "eval.json").exists()
    assert _saved_args(run_dir)["kappa"] == 0.5


def test_montezuma_logs_rooms_entered(run):
    """ALE/MontezumaRevengeRooms-v5 reports the rooms an episode entered (RAM byte 3, logging only): the start
    room counts; the plain ALE/MontezumaRevenge-v5 is not wrapped behind the user's back. AdaMemento logs any
    numeric info key at episode end as charts/episodic_<key>."""
    env = run_contract.make_base_env("ALE/MontezumaRevengeRooms-v5", {})
    _, info = env.reset(seed=0)
    assert info["rooms_visited"] == 1
    for _ in range(50):
        _, _, term, trunc, info = env.step(env.action_space.sample())
        assert info["rooms_visited"] >= 1
    env.close()
    plain = run_contract.make_base_env("ALE/MontezumaRevenge-v5", {})
    assert "rooms_visited" not in plain.reset(seed=0)[1]
    plain.close()
    run_dir = run(env_id="ALE/MontezumaRevengeRooms-v5", env_kwargs=("max_episode_steps=40",), total_timesteps=64,
                  num_envs=2, num_steps=32, num_minibatches=2, update_epochs=1, buffer_size=100,
                  success_rule="positive", eval_episodes=0)
    assert _scalars(run_dir)["charts/episodic_rooms_visited"][0] >= 1


def test_smoke_continuous_memory(run):
    # Pendulum's 200-step episodes give returns to rank (quantile rule) within a tiny budget;
    # MuJoCo itself is exercised by test_smoke_mujoco.
    run_dir = run(env_id="Pendulum-v1", total_timesteps=1600, num_steps=200, num_minibatches=4, update_epochs=1,
                  success_quantile=0.5, kappa=0.0, memory_updates=2, eval_episodes=1)
    assert max(_scalars(run_dir)["memory/action_fraction"]) > 0.0


def test_smoke_mujoco(run):
    # 50-step episodes so that time-limit truncations (float64 final observations) occur.
    run_dir = run(env_id="HalfCheetah-v5", env_kwargs=("max_episode_steps=50",), total_timesteps=128, num_steps=64,
                  num_minibatches=2, update_epochs=1, eval_episodes=1)
    assert json.loads((run_dir / "eval.json").read_text())["mean_return"] is not None
    assert _saved_args(run_dir)["kappa"] == 0.8  # continuous actions keep a margin


def test_without_memory_and_intrinsic_reward_it_is_ppo_baseline(run, tmp_path):
    """`--intrinsic none --no-reflection` must be exactly ppo_baseline: same seed, same weights."""
    common = dict(env_id="FourRooms-v0", total_timesteps=512, num_steps=64, eval_episodes=0, checkpoint_interval=0)
    ours = torch.load(run(intrinsic="none", reflection=False, **common) / "checkpoint.pt", weights_only=False)
    ppo_baseline.main(ppo_baseline.Args(run_name="baseline", **common))
    theirs = torch.load(tmp_path / "runs" / "baseline" / "checkpoint.pt", weights_only=False)
    assert ours["agent"].keys() == theirs["agent"].keys()
    for key, value in theirs["agent"].items():
        assert torch.allclose(ours["agent"][key], value, atol=1e-6), key


@pytest.mark.parametrize("kwargs,needle", [
    (dict(kappa=1.5), "--kappa"),
    (dict(memory_epsilon=1.0), "--memory-epsilon"),
    (dict(intrinsic="rnd", fine=False), "--no-coarse/--no-fine"),
    (dict(coarse=False, fine=False), "--intrinsic none"),
    (dict(intrinsic="none", fine_bonus="count"), "--fine-bonus"),
    (dict(env_id="FourRooms-v0", env_kwargs=("max_steps=0",)), "max_steps"),
    (dict(env_id="NoSuchEnv-v0"), "NoSuchEnv-v0"),
])
def test_bad_input_raises_user_error(run, kwargs, needle):
    with pytest.raises(am.UserError) as exc:
        run(total_timesteps=64, **kwargs)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_cli_bad_input_one_line_and_nonzero_exit(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--kappa", "2", "--total-timesteps", "64"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --kappa must be in [0, 1], got 2.0"


def test_resume_continues(run, tmp_path):
    run_dir = run(env_id="FourRooms-v0", num_steps=32, total_timesteps=256, success_rule="positive")
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert ckpt["global_step"] == 256 and "buffer_success" in ckpt and "buffer_failure" in ckpt
    # Continue the same run with a larger budget by editing its saved arguments.
    ckpt["args"]["total_timesteps"] = 512
    torch.save(ckpt, run_dir / "checkpoint.pt")
    am.main(am.Args(resume="smoke"))
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["global_step"] == 512


# --------------------------------------------------------------------------- learning (slow)
@pytest.mark.slow
def test_learns_four_rooms(run):
    run_dir = run(env_id="FourRooms-v0", total_timesteps=80_000, success_rule="positive", eval_episodes=50,
                  checkpoint_interval=60.0)
    assert json.loads((run_dir / "eval.json").read_text())["success_rate"] >= 0.9
