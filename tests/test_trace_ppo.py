"""Tests of trace_ppo.py: memory invariants, exact rollout replay, gradients, end-to-end runs."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import memory_envs  # noqa: E402,F401
import trace_ppo  # noqa: E402
from trace_ppo import Actor, Agent, Args, Memory  # noqa: E402


class ImageMemoryTask(gym.ObservationWrapper):
    """MemoryTask-v0 rendered as a 6x6x1 uint8 image (bits painted in the first row)."""

    def __init__(self, delay: int = 6, difficulty: int = 1):
        super().__init__(memory_envs.MemoryTaskEnv(delay=delay, difficulty=difficulty))
        self.observation_space = spaces.Box(0, 255, (6, 6, 1), np.uint8)

    def observation(self, obs):
        img = np.zeros((6, 6, 1), np.uint8)
        img[0, :3, 0] = (obs * 255).astype(np.uint8)
        return img


if "TraceImageMemory-v0" not in gym.registry:
    gym.register("TraceImageMemory-v0", entry_point=ImageMemoryTask)


def small_args(**kw) -> Args:
    base = dict(num_envs=3, num_steps=16, num_minibatches=2, update_epochs=2, learning_rate=2.5e-4,
                clip_coef=0.2, ent_coef=0.001, normalize=False, norm_adv=False, memory_slots=4,
                hidden_size=16, num_heads=2, aux_recon_coef=0.0)
    base.update(kw)
    return Args(**base)


def make_actor(args: Args, env_id="MemoryTask-v0", env_kwargs=None, seed=0):
    torch.manual_seed(seed)
    envs = trace_ppo.make_vector_env(args, env_kwargs or {}, "vector", args.num_envs)
    agent = Agent(envs.single_observation_space, envs.single_action_space, args)
    actor = Actor(agent, args.num_envs, args, envs.single_observation_space, torch.device("cpu"),
                  torch.Generator().manual_seed(seed))
    actor.new_noise(list(range(args.num_envs)))
    actor.sigma = 1.0
    return envs, agent, actor


def run_rollout(envs, actor: Actor, steps: int, seed: int = 0, on_step=None, obs=None):
    """The rollout loop of trace_ppo.main (recording what the update needs). Starts from reset unless
    ``obs`` (the envs' current observation) is given. Returns the record, the pool and the last obs."""
    s = actor.mem.s
    carry = actor.refresh()
    rec = {k: [] for k in ("obs", "pact", "prew", "tau", "src", "tag", "logits", "value", "w", "action")}
    if obs is None:
        obs = torch.as_tensor(envs.reset(seed=seed)[0])
    for step in range(steps):
        rec["obs"].append(obs); rec["pact"].append(actor.pact); rec["prew"].append(actor.prew)
        rec["tau"].append(actor.tau.clone()); rec["src"].append(actor.mem.src.clone())
        rec["tag"].append(actor.mem.tags())
        with torch.no_grad():
            (action, _, _, value, _, logits), w, e, _ = actor.act(obs)
        rec["logits"].append(logits); rec["value"].append(value); rec["w"].append(w); rec["action"].append(action)
        nxt, reward, term, trunc, info = envs.step(action.numpy())
        with torch.no_grad():
            actor.write(e, obs, s + step)
        actor.advance(action, reward)
        done = np.flatnonzero(term | trunc)
        if on_step is not None:
            on_step(step, done)
        if len(done):
            actor.end_episodes(done)
        obs = torch.as_tensor(nxt)
    out = {k: torch.stack(v) for k, v in rec.items()}
    pool = {k: torch.cat([carry[k], out[k].transpose(0, 1)], 1) for k in ("obs", "pact", "prew", "tau")}
    return out, pool, obs


# ---------------------------------------------------------------------------------------
# Memory invariants
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("retention", ["learned", "fifo", "random"])
def test_never_more_than_m_entries_and_cleared_at_episode_start(retention):
    args = small_args(retention=retention, memory_slots=3)
    envs, agent, actor = make_actor(args, env_kwargs={"delay": 7})
    checked = []

    def on_step(step, done):
        occ = actor.mem.occupied
        assert occ[:, 3:].sum() == 0 and occ.sum(1).max() <= 3
        # After t + 1 writes in an episode, min(t + 1, M) slots are used (nothing lost, nothing extra).
        assert torch.equal(occ.sum(1), torch.clamp(actor.tau, max=3))
        if len(done):
            checked.append(step)

    run_rollout(envs, actor, 30, on_step=on_step)
    # Reads at episode starts see an empty memory.
    out, _, _ = run_rollout(envs, actor, 20)
    starts = out["tau"] == 0
    assert starts.sum() > 0
    assert (out["src"][starts] < 0).all()
    assert checked


def test_learned_evicts_lowest_score_including_new_entry():
    mem = Memory(n=2, m=3, k=0, d=4, obs_shape=(3,), obs_dtype=torch.float32, n_act=2, device="cpu")
    z = lambda *s: torch.zeros(*s)  # noqa: E731
    scores = [torch.tensor([0.5, 2.0]), torch.tensor([-1.0, 1.0]), torch.tensor([3.0, 0.0])]
    for j, sc in enumerate(scores):
        mem.write(z(2, 4), (z(2, 4), z(2, 4)), z(2, 3), z(2, 2), z(2), torch.tensor([j, j]), sc, sc, 10 + j, j,
                  "learned")
    assert mem.occupied.all()
    written, evicted = mem.write(z(2, 4), (z(2, 4), z(2, 4)), z(2, 3), z(2, 2), z(2), torch.tensor([3, 3]),
                                 torch.tensor([0.0, -5.0]), torch.tensor([0.0, -5.0]), 13, 3, "learned")
    # env 0: scores [0.5, -1, 3] + new 0.0 -> slot 1 (score -1) evicted, new entry written there.
    assert evicted[0] == 1 and written[0] == 1 and mem.src[0].tolist() == [10, 13, 12]
    # env 1: scores [2, 1, 0] + new -5 -> the new entry is the lowest and is not kept.
    assert evicted[1] == 3 and written[1] == -1 and mem.src[1].tolist() == [10, 11, 12]


def test_age_stats_of_evicted_and_kept_entries():
    """memory/mean_age_* sums equal a direct count: at every eviction, the age of the dropped entry
    (0 if it was the new one) and of every entry that stays, the new one excluded."""
    args = small_args(retention="learned", memory_slots=3, num_envs=2)
    envs, agent, actor = make_actor(args, env_kwargs={"delay": 9, "difficulty": 1})
    expected = torch.zeros(4)
    write = actor.mem.write

    def checked_write(e, kv, obs, pact, prew, tau, *rest):
        old_tau, occ = actor.mem.tau[:, :3].clone(), actor.mem.occupied[:, :3].clone()
        written, evicted = write(e, kv, obs, pact, prew, tau, *rest)
        for i in range(2):
            if evicted[i] < 0:
                continue
            ages = (tau[i] - old_tau[i]).float()
            kept = occ[i].clone()
            if evicted[i] < 3:
                kept[evicted[i]] = False
            expected.add_(torch.tensor([0.0 if evicted[i] == 3 else ages[evicted[i]].item(), 1.0,
                                        ages[kept].sum().item(), float(kept.sum())]))
        return written, evicted

    actor.mem.write = checked_write
    run_rollout(envs, actor, 30)
    assert expected[1] > 0 and expected[1] < 2 * 30  # evictions happened, not at every step
    assert torch.allclose(actor.age_stats, expected)


def test_learned_eviction_in_the_actor_drops_the_lowest_clean_score():
    args = small_args(retention="learned", memory_slots=3, num_envs=2)
    envs, agent, actor = make_actor(args, env_kwargs={"delay": 20, "difficulty": 1})
    with torch.no_grad():
        agent.ret_out.weight.normal_(0, 3.0)  # make scores spread
    obs, _ = envs.reset(seed=1)
    obs = torch.as_tensor(obs)
    for step in range(10):
        with torch.no_grad():
            (action, *_), w, e, _ = actor.act(obs)
            new_score, _ = agent.retention(e, actor.pact, actor.prew, actor.tau)
        before_src, before_score = actor.mem.src.clone(), actor.mem.score.clone()
        with torch.no_grad():
            actor.write(e, obs, 100 + step, deterministic=True)
        for i in range(2):
            if (before_src[i, :3] >= 0).all():
                cand = torch.cat([before_score[i, :3], new_score[i:i + 1]])
                kept = set(actor.mem.src[i, :3].tolist())
                dropped = (set(before_src[i, :3].tolist()) | {100 + step}) - kept
                lowest = int(cand.argmin())
                assert dropped == {before_src[i, lowest].item() if lowest < 3 else 100 + step}
        nxt, r, term, trunc, _ = envs.step(action.numpy())
        actor.advance(action, r)
        obs = torch.as_tensor(nxt)


def test_fifo_evicts_oldest():
    args = small_args(retention="fifo", memory_slots=4, num_envs=2)
    envs, agent, actor = make_actor(args, env_kwargs={"delay": 30})

    def on_step(step, done):
        # The memory holds exactly the last M steps of the episode.
        for i in range(2):
            taus = sorted(actor.mem.tau[i, :4][actor.mem.occupied[i, :4]].tolist())
            t = int(actor.tau[i]) - 1  # tau already advanced
            assert taus == list(range(max(0, t - 3), t + 1))

    run_rollout(envs, actor, 25, on_step=on_step)


def test_attention_weights_sum_to_one_over_occupied_and_zero_on_empty():
    args = small_args(memory_slots=5)
    envs, agent, actor = make_actor(args, env_kwargs={"delay": 9, "difficulty": 1})
    out, _, _ = run_rollout(envs, actor, 24)
    w, occ = out["w"], (out["src"] >= 0).unsqueeze(2).expand_as(out["w"])  # T N H S
    assert torch.all(w[~occ] == 0.0)
    sums = w.sum(-1)
    has = occ.any(-1)
    assert torch.allclose(sums[has], torch.ones_like(sums[has]), atol=1e-6)
    assert torch.all(sums[~has] == 0.0) and (~has).any() and has.any()


def test_read_scale_does_not_grow_with_the_values():
    """The read is layer-normalised: values 1000x larger give the same read (it cannot saturate the heads)."""
    args = small_args()
    torch.manual_seed(0)
    agent = Agent(spaces.Box(-1, 1, (3,), np.float32), spaces.Discrete(2), args)
    d = args.hidden_size
    e, k, v = torch.randn(5, d), torch.randn(5, 4, d), torch.randn(5, 4, d)
    occ = torch.ones(5, 4, dtype=torch.bool)
    with torch.no_grad():
        read, _ = agent.attend(e, k, v, occ)
        big, _ = agent.attend(e, k, 1000.0 * v, occ)
        raw = agent.o_proj((1000.0 * v).mean(1))  # what the projection alone would pass on
    assert torch.allclose(read, big, atol=1e-4)
    assert read.norm(dim=-1).max() <= math.sqrt(d) + 1e-3 < raw.norm(dim=-1).min()


def test_retention_votes_are_scaled_by_the_running_mean_of_abs_td_error():
    """A rollout without a decision (|TD error| ~ 0) must not get the weight of one with decisions."""
    agent = Agent(spaces.Box(-1, 1, (3,), np.float32), spaces.Discrete(2), small_args())
    first = agent.retention_vote_scale(torch.tensor([2.0, -4.0]))
    assert first.item() == pytest.approx(3.0)  # bias-corrected: the first update's own mean
    for _ in range(50):
        agent.retention_vote_scale(torch.tensor([3.0, -3.0]))
    quiet = torch.full((4,), 1e-3)
    scale = agent.retention_vote_scale(quiet)
    # 52 updates: the quiet one has weight 0.01 / (1 - 0.99**52) of the bias-corrected mean.
    assert scale.item() == pytest.approx(3.0 * (1 - 0.01 / (1 - 0.99 ** 52)) + 1e-3 * 0.01 / (1 - 0.99 ** 52),
                                         rel=1e-4)
    assert (quiet.abs() / scale).max() < 1e-3  # a per-rollout mean would have given these weight 1
    state = agent.state_dict()["abs_td_ema"]  # checkpointed with the agent
    assert state[1] > 0


def test_persistent_slots_survive_reset_with_outcome_tag():
    args = small_args(memory_slots=3, persistent_slots=2, num_envs=2)
    _, agent, actor = make_actor(args)
    envs = trace_ppo.make_vector_env(Args(env_id="RecallAcrossEpisodes-v0"), {"block": 2, "length": 3}, "vector", 2)
    seen = []

    def on_step(step, done):
        if len(done):
            seen.append((actor.mem.occupied[:, 3:].sum(1).clone(), actor.ep_return.copy()))

    out, _, _ = run_rollout(envs, actor, 12, on_step=on_step)
    starts = out["tau"] == 0
    # After the first episode, every episode starts with its 3 episodic slots empty but 2 persistent entries.
    later = starts & (torch.arange(12).unsqueeze(1) >= 3)
    assert later.any()
    assert (out["src"][later][:, :3] < 0).all() and (out["src"][later][:, 3:] >= 0).all()
    tags = out["tag"][later][:, 3:]  # [persistent, symlog(outcome), log1p(episodes ago)]
    assert torch.all(tags[..., 0] == 1.0) and torch.all(tags[..., 1].abs() == np.log(2.0))
    assert torch.all(tags[..., 2] > 0)


# ---------------------------------------------------------------------------------------
# Exact replay and gradients
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("persistent", [0, 2])
def test_update_reproduces_rollout_logits_and_values(persistent):
    args = small_args(memory_slots=3, persistent_slots=persistent, num_envs=3)
    envs, agent, actor = make_actor(args, env_kwargs={"delay": 5, "difficulty": 1})
    T = 14
    # Two rollouts: the second starts with entries carried over from the first (mid-episode).
    _, _, obs = run_rollout(envs, actor, T, seed=0)
    with torch.no_grad():
        for p in agent.parameters():
            p.add_(0.05 * torch.randn_like(p))  # parameters change between rollouts, as after an update
    out, pool, _ = run_rollout(envs, actor, T, obs=obs)
    S = actor.mem.s
    assert (out["tau"] == 0).any() and (out["tau"][0] > 0).any(), "episode boundaries inside and across rollouts"
    t_idx, i_idx = torch.meshgrid(torch.arange(T), torch.arange(3), indexing="ij")
    t_idx, i_idx = t_idx.reshape(-1), i_idx.reshape(-1)
    pool_e = trace_ppo.pool_embed(agent, pool)
    e, read, _, _, w = trace_ppo.replay(agent, pool_e, out["src"], out["tag"], t_idx, i_idx, S,
                                        args.memory_slots, weights=True)
    _, _, _, value, _, logits = agent.heads(e, read, out["action"].reshape(-1))
    assert torch.allclose(logits, out["logits"].reshape(-1, 2), atol=1e-5)
    assert torch.allclose(value, out["value"].reshape(-1), atol=1e-5)
    assert torch.allclose(w, out["w"].reshape(T * 3, *out["w"].shape[2:]), atol=1e-5)
    # The memory's cached key/value projections match its entries after writes, evictions and resets.
    occ = actor.mem.occupied
    with torch.no_grad():
        assert torch.allclose(actor.mem.key[occ], agent.k_proj(actor.mem.emb[occ]), atol=1e-6)
        assert torch.allclose(actor.mem.val[occ], agent.v_proj(actor.mem.emb[occ]), atol=1e-6)


@pytest.mark.parametrize("persistent", [0, 2])
def test_gradients_reach_encoder_attention_and_retention(persistent):
    args = small_args(memory_slots=3, num_envs=2, persistent_slots=persistent)
    envs, agent, actor = make_actor(args, env_kwargs={"delay": 6, "difficulty": 1})
    T = 12
    out, pool, _ = run_rollout(envs, actor, T)
    S = actor.mem.s
    t_idx, i_idx = torch.meshgrid(torch.arange(T), torch.arange(2), indexing="ij")
    t_idx, i_idx = t_idx.reshape(-1), i_idx.reshape(-1)
    pool_e = trace_ppo.pool_embed(agent, pool)
    e, read, _, _, _ = trace_ppo.replay(agent, pool_e, out["src"], out["tag"], t_idx, i_idx, S, args.memory_slots)
    _, logp, _, value, _, _ = agent.heads(e, read, out["action"].reshape(-1))
    # Gradient of the policy through the READ only (current features detached): must reach the
    # encoder via the re-encoded memory entries.
    _, logp_read, _, _, _, _ = agent.heads(e.detach(), read, out["action"].reshape(-1))
    agent.zero_grad()
    logp_read.sum().backward(retain_graph=True)
    assert agent.embed_net[0].weight.grad.abs().sum() > 0
    assert agent.k_proj.weight.grad.abs().sum() > 0 and agent.q_proj.weight.grad.abs().sum() > 0
    assert agent.ret_out.weight.grad is None or agent.ret_out.weight.grad.abs().sum() == 0
    ep_id = torch.cumsum((out["tau"] == 0).long(), 0)
    visible = trace_ppo.visible_entries(out["src"], ep_id, t_idx, i_idx, S)
    src = out["src"].reshape(T * 2, -1)
    tags = out["tag"].reshape(T * 2, *out["tag"].shape[2:])
    ret = torch.randn(T * 2)
    ec_loss, target = trace_ppo.entry_usefulness(agent, pool_e, e, out["action"].reshape(-1), ret, visible, src,
                                                 tags, i_idx, args.memory_slots, 0.1)
    # Only persistent slots are judged with their tag: episodic slots carry a zero tag, so treating
    # every slot as tagged (m=0) must give the same loss and targets.
    ec_every, target_every = trace_ppo.entry_usefulness(agent, pool_e, e, out["action"].reshape(-1), ret, visible,
                                                        src, tags, i_idx, 0, 0.1)
    assert torch.allclose(ec_loss, ec_every, atol=1e-6) and torch.allclose(target, target_every, atol=1e-6)
    assert torch.allclose(target.sum(-1)[visible.any(-1)], torch.ones(1)) and torch.all(target[~visible] == 0)
    agent.zero_grad()
    ec_loss.backward(retain_graph=True)
    assert agent.entry_out.weight.grad.abs().sum() > 0 and agent.entry_e.weight.grad.abs().sum() > 0
    # The entry critic judges entries, it never shapes what the policy reads.
    for net in (agent.embed_net[0], agent.tag_proj, agent.k_proj):
        assert net.weight.grad is None or net.weight.grad.abs().sum() == 0
    loss = trace_ppo.hindsight_retention_loss(agent, pool, pool_e, target, visible, src, tags, i_idx,
                                              torch.ones(len(t_idx)), args.memory_slots)
    every_slot = trace_ppo.hindsight_retention_loss(agent, pool, pool_e, target, visible, src, tags, i_idx,
                                                    torch.ones(len(t_idx)), 0)
    assert torch.allclose(loss, every_slot, atol=1e-6)
    agent.zero_grad()
    loss.backward()
    assert agent.ret_out.weight.grad.abs().sum() > 0 and agent.ret_hidden[0].weight.grad.abs().sum() > 0
    # The retention objective shapes only the scorer, never the encoder the policy reads.
    assert agent.embed_net[0].weight.grad is None or agent.embed_net[0].weight.grad.abs().sum() == 0


def test_hindsight_visibility_covers_evicted_steps_of_own_episode_only():
    src = torch.full((6, 1, 2), -1)
    src[3, 0] = torch.tensor([2 + 1, 2 + 2])  # at t=3 the memory holds steps 1 and 2 (pool offset 2)
    tau = torch.tensor([[0], [1], [2], [3], [0], [1]])
    ep_id = torch.cumsum((tau == 0).long(), 0)
    vis = trace_ppo.visible_entries(src, ep_id, torch.tensor([3, 5]), torch.tensor([0, 0]), 2)
    assert vis[0].tolist() == [False, False, True, True, True, False, False, False]
    assert vis[1].tolist() == [False, False, False, False, False, False, True, False]


def test_retention_target_goes_to_the_entry_that_predicts_the_return():
    """Decisions whose return is +1 when the action matches a bit stored in ONE entry (step 0) and
    -1 otherwise: once the entry critic is trained, that entry gets nearly all the retention votes,
    although it is one of 12 visible entries whose other bits are random."""
    torch.manual_seed(0)
    args = small_args(hidden_size=32, num_heads=2)
    agent = Agent(spaces.Box(0, 1, (3,), np.float32), spaces.Discrete(2), args)
    n, p, b = 4, 12, 64
    gen = torch.Generator().manual_seed(1)
    obs = torch.randint(0, 2, (n, p, 3), generator=gen).float()
    pool = dict(obs=obs, pact=torch.zeros(n, p, 2), prew=torch.zeros(n, p), tau=torch.arange(p).repeat(n, 1))
    i_idx = torch.arange(b) % n
    visible = torch.ones(b, p, dtype=torch.bool)
    src = torch.full((b, args.memory_slots), -1)
    tags = torch.zeros(b, args.memory_slots, trace_ppo.TAG_DIM)
    opt = torch.optim.Adam(agent.parameters(), lr=3e-3)
    for step in range(1500):
        with torch.no_grad():
            pool_e = trace_ppo.pool_embed(agent, pool)
        action = torch.randint(0, 2, (b,), generator=gen)
        ret = torch.where(action == obs[i_idx, 0, 0].long(), 1.0, -1.0)
        e = pool_e[i_idx, -1]
        loss, target = trace_ppo.entry_usefulness(agent, pool_e, e, action, ret, visible, src, tags, i_idx,
                                                  args.memory_slots, 0.1)
        if step == 0:
            assert target[:, 0].mean() < 0.3  # untrained: no entry stands out (uniform: 1/12)
        opt.zero_grad()
        loss.backward()
        opt.step()
        obs[:, 1:] = torch.randint(0, 2, (n, p - 1, 3), generator=gen).float()  # fresh distractors
        obs[:, 0, 0] = torch.randint(0, 2, (n,), generator=gen).float()          # fresh cue bits
        pool["obs"] = obs
    assert target[:, 0].mean() > 0.8


def test_time_encoding_distinguishes_long_episodes():
    enc = trace_ppo.time_encoding(torch.tensor([0, 1, 1000, 1001, 100000]))
    assert torch.isfinite(enc).all() and enc.abs().max() <= 2.0
    d = torch.cdist(enc, enc)
    assert d[0, 1] > 0.1 and d[2, 3] > 1e-3 and d[3, 4] > 0.1


# ---------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------
def run_main(tmp_path, monkeypatch, **kw):
    monkeypatch.chdir(tmp_path)
    args = Args(**dict(dict(total_timesteps=256, num_envs=2, num_steps=32, eval_episodes=4, hidden_size=16,
                            num_heads=2, memory_slots=4, run_name="t", checkpoint_interval=0.0), **kw))
    trace_ppo.main(args)
    run_dir = tmp_path / "runs" / "t"
    from conftest import read_tb_scalars
    return json.loads((run_dir / "eval.json").read_text()), read_tb_scalars(run_dir), run_dir


def test_main_vector_env_replays_exactly_and_logs(tmp_path, monkeypatch):
    result, tb, run_dir = run_main(tmp_path, monkeypatch, env_kwargs=("delay=7", "difficulty=1"),
                                   aux_recon_coef=0.1, heatmap_interval=1)
    assert result["success_rate"] is not None and result["algo"] == "trace_ppo"
    errs = [v for _, v in tb["debug/replay_max_error"]]
    assert len(errs) == 4 and max(errs) < 1e-5
    for key in ("charts/episodic_return", "charts/SPS", "losses/policy_loss", "losses/retention_loss",
                "losses/aux_recon_loss", "losses/hindsight_critic_loss", "losses/entry_critic_loss",
                "memory/retention_score_spread",
                "memory/mean_age_evicted",
                "memory/mean_age_kept", "memory/attention_entropy", "memory/cue_in_memory_at_decision"):
        assert key in tb, key
    assert (run_dir / "attention.png").stat().st_size > 0
    assert (run_dir / "checkpoint.pt").exists()


def test_cue_in_memory_logging_reads_the_recorded_slots(tmp_path, monkeypatch):
    """memory/cue_in_memory_at_decision is 1 when nothing is ever evicted (episodes of 7 steps, 8 slots,
    crossing rollout boundaries so some cues are carried-in entries) and 0 when FIFO must drop the cue."""
    _, tb, _ = run_main(tmp_path, monkeypatch, env_kwargs=("delay=7",), memory_slots=8)
    assert [v for _, v in tb["memory/cue_in_memory_at_decision"]] == [1.0] * 4
    assert "losses/aux_recon_loss" in tb  # the vector preset turns the self-supervised read on
    (tmp_path / "fifo").mkdir()
    _, tb, _ = run_main(tmp_path / "fifo", monkeypatch, env_kwargs=("delay=12",), memory_slots=4, retention="fifo")
    assert [v for _, v in tb["memory/cue_in_memory_at_decision"]] == [0.0] * 4


@pytest.mark.parametrize("delay,slots,retention,cue_in,cue_attn", [
    (2, 1, "fifo", 1.0, 1.0),   # the decision reads one slot, which holds the cue: all heads weigh it 1
    (8, 2, "fifo", 0.0, 0.0),   # FIFO with 2 slots has dropped the cue 6 steps before the decision
    (5, 8, "learned", 1.0, None),  # nothing evicted: the cue is there, its weight is a softmax share
])
def test_evaluation_measures_cue_kept_and_cue_read(delay, slots, retention, cue_in, cue_attn):
    args = small_args(memory_slots=slots, retention=retention)
    _, agent, _ = make_actor(args, env_kwargs=dict(delay=delay, difficulty=1))
    result, _ = trace_ppo.evaluate(agent, args, dict(delay=delay, difficulty=1), "vector", 6, torch.device("cpu"))
    assert result["cue_in_memory"] == cue_in
    if cue_attn is not None:
        assert result["cue_attention"] == pytest.approx(cue_attn, abs=1e-6)
    else:
        assert 0.0 < result["cue_attention"] < 1.0


def test_time_encoding_table_equals_the_formula():
    """The lookup table (grown on demand) gives the encoding's formula for any episode time."""
    def formula(tau):
        t = tau.float().unsqueeze(-1)
        u = torch.log1p(t)
        f, p = torch.tensor(trace_ppo.TIME_FREQS), torch.tensor(trace_ppo.TIME_PERIODS)
        return torch.cat([u / 8.0, torch.sin(u * f), torch.cos(u * f), torch.sin(2 * math.pi * t / p),
                          torch.cos(2 * math.pi * t / p)], -1)

    for hi in (10, 3000, 70000):  # the later calls outgrow the table
        tau = torch.randint(0, hi, (5, 7))
        assert torch.allclose(trace_ppo.time_encoding(tau), formula(tau), atol=1e-6)


def test_main_image_env(tmp_path, monkeypatch):
    result, tb, _ = run_main(tmp_path, monkeypatch, env_id="TraceImageMemory-v0", env_kwargs=("delay=5",),
                             aux_recon_coef=0.1)
    assert max(v for _, v in tb["debug/replay_max_error"]) < 1e-5
    assert result["success_rate"] is not None


def test_main_persistent_memory_and_rnd(tmp_path, monkeypatch):
    result, tb, _ = run_main(tmp_path, monkeypatch, env_id="RecallAcrossEpisodes-v0", persistent_slots=2,
                             rnd=True, env_kwargs=("block=3", "length=4"))
    assert max(v for _, v in tb["debug/replay_max_error"]) < 1e-5
    assert "losses/rnd_loss" in tb and "intrinsic/reward_mean" in tb
    assert result["success_rate"] is not None


def test_main_box_actions_fifo(tmp_path, monkeypatch):
    result, tb, _ = run_main(tmp_path, monkeypatch, env_id="Pendulum-v1", retention="fifo", num_steps=64,
                             num_minibatches=4, update_epochs=2, total_timesteps=128, eval_episodes=1)
    assert max(v for _, v in tb["debug/replay_max_error"]) < 1e-5
    assert "losses/aux_recon_loss" not in tb  # off in the continuous preset
    assert np.isfinite(result["mean_return"])


def test_visit_counter_counts_each_hash_bucket():
    counter = trace_ppo.VisitCounter(2, seed=0, device=torch.device("cpu"))
    corridor, junction = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0])
    # Rows of one batch are all counted; each row gets its bucket's count including itself.
    assert counter.visit(torch.stack([corridor, corridor, junction])).tolist() == [2.0, 2.0, 1.0]
    assert counter.visit(torch.stack([corridor, junction])).tolist() == [3.0, 2.0]
    assert counter.counts.sum().item() == 5.0


def test_exploration_floor_samples_the_mixture_and_returns_the_softmax_log_prob():
    args = small_args()
    _, agent, _ = make_actor(args, env_kwargs={"delay": 5})
    n = 20000
    e, read = torch.randn(1, 16).expand(n, 16), torch.randn(1, 16).expand(n, 16)
    floor = torch.full((n,), 0.3)
    torch.manual_seed(0)
    with torch.no_grad():
        agent.actor[-1].bias.copy_(torch.tensor([8.0, -8.0]))  # a nearly deterministic policy
        action, logp, _, _, _, logits = agent.heads(e, read, floor=floor)
        greedy, *_ = agent.heads(e, read, greedy=True, floor=floor)
        _, logp_update, *_ = agent.heads(e, read, action)
    p = torch.softmax(logits[0], -1)
    mix = 0.7 * p + 0.3 / 2
    assert (action == 1).float().mean().item() == pytest.approx(mix[1].item(), abs=0.01)  # ~0.15, not ~1e-7
    # PPO trains the softmax: the rollout stores its log-probability, which the update reproduces.
    assert torch.allclose(logp, torch.log_softmax(logits, -1).gather(1, action[:, None]).squeeze(1), atol=1e-6)
    assert torch.equal(logp, logp_update)
    assert torch.equal(greedy, logits.argmax(1))  # the greedy action ignores the floor


def test_main_exploration_floor_replays_exactly_and_logs(tmp_path, monkeypatch):
    result, tb, run_dir = run_main(tmp_path, monkeypatch, env_id="PassiveTMaze-v0", env_kwargs=("length=5",),
                                   explore_visits=20.0)
    assert max(v for _, v in tb["debug/replay_max_error"]) < 1e-5
    floor_mean = [v for _, v in tb["intrinsic/explore_floor_mean"]]
    assert floor_mean[0] > floor_mean[-1] > 0  # observations become familiar
    assert [v for _, v in tb["intrinsic/explore_floor_max"]][0] == 1.0  # first visits act uniformly
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["visit_counts"].sum() == 256
    assert result["success_rate"] is not None


def test_bad_flags_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(memory_envs.UserError, match="memory-slots"):
        trace_ppo.main(Args(memory_slots=0, run_name="bad"))
    with pytest.raises(memory_envs.UserError, match="delay"):
        trace_ppo.main(Args(env_kwargs=("delay=0",), run_name="bad"))
    with pytest.raises(memory_envs.UserError, match="usefulness-temperature"):
        trace_ppo.main(Args(usefulness_temperature=0.0, run_name="bad"))
    with pytest.raises(memory_envs.UserError, match="explore-visits needs discrete actions"):
        trace_ppo.main(Args(env_id="Pendulum-v1", explore_visits=10.0, run_name="bad"))
    with pytest.raises(memory_envs.UserError, match="explore-visits must be >= 0"):
        trace_ppo.main(Args(explore_visits=-1.0, run_name="bad"))


# ---------------------------------------------------------------------------------------
# Learning (slow)
# ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_learns_memory_task_delay_64(tmp_path, monkeypatch):
    result, _, _ = run_main(tmp_path, monkeypatch, env_kwargs=("delay=64", "difficulty=1"),
                            total_timesteps=2000 * 64, num_envs=8, num_steps=128, hidden_size=64, num_heads=4,
                            memory_slots=16, eval_episodes=100)
    assert result["success_rate"] >= 0.99


def test_env_groups_gives_each_query_its_own_row_inside_its_env_block():
    i_idx = torch.tensor([2, 0, 2, 2, 1, 0, 2])
    row, c = trace_ppo.env_groups(i_idx, 4)
    assert c == 4  # env 2 has the most queries
    assert len(set(row.tolist())) == len(i_idx)  # distinct rows
    assert torch.equal(row // c, i_idx)  # inside its env's block of c rows
    # Within an env the queries keep their order and fill the block from its start.
    assert row[i_idx == 2].tolist() == [8, 9, 10, 11] and row[i_idx == 0].tolist() == [0, 1]


def test_hindsight_read_equals_real_read_when_it_sees_the_memory():
    """The hindsight critic's read over a visible set equal to the memory contents is the policy's read
    (no persistent tags involved); over the larger set it includes evicted entries of the episode."""
    args = small_args(memory_slots=3, num_envs=2, hindsight_critic_coef=0.5)
    envs, agent, actor = make_actor(args, env_kwargs={"delay": 8, "difficulty": 1})
    T = 12
    out, pool, _ = run_rollout(envs, actor, T)
    S = actor.mem.s
    t_idx, i_idx = (x.reshape(-1) for x in torch.meshgrid(torch.arange(T), torch.arange(2), indexing="ij"))
    pool_e = trace_ppo.pool_embed(agent, pool)
    in_memory = torch.zeros((len(t_idx), S + T), dtype=torch.long).scatter_add_(
        1, out["src"].reshape(T * 2, -1).clamp(min=0), (out["src"].reshape(T * 2, -1) >= 0).long()) > 0
    kv = trace_ppo.pool_kv(agent, pool_e)
    e, read, _, read_h, _ = trace_ppo.replay(agent, pool_e, out["src"], out["tag"], t_idx, i_idx, S,
                                             args.memory_slots, kv, in_memory)
    assert torch.allclose(read_h, read, atol=1e-5)
    # A shuffled subset of the queries (as a minibatch) gets the same reads.
    sub = torch.randperm(len(t_idx), generator=torch.Generator().manual_seed(0))[: len(t_idx) // 3]
    _, read_sub, _, read_h_sub, _ = trace_ppo.replay(agent, pool_e, out["src"], out["tag"], t_idx[sub], i_idx[sub], S,
                                                     args.memory_slots, kv, in_memory[sub])
    assert torch.allclose(read_sub, read[sub], atol=1e-5) and torch.allclose(read_h_sub, read[sub], atol=1e-5)
    ep_id = torch.cumsum((out["tau"] == 0).long(), 0)
    visible = trace_ppo.visible_entries(out["src"], ep_id, t_idx, i_idx, S)
    assert (visible.sum(1) > in_memory.sum(1)).any()  # evicted steps are visible in hindsight
    *_, read_all, _ = trace_ppo.replay(agent, pool_e, out["src"], out["tag"], t_idx, i_idx, S, args.memory_slots, kv,
                                       visible)
    q = agent.hindsight_critic(torch.cat([e, read_all, agent.action_input(out["action"].reshape(-1))], -1))
    agent.zero_grad()
    q.sum().backward()
    assert agent.q_proj.weight.grad.abs().sum() > 0 and agent.k_proj.weight.grad.abs().sum() > 0


def test_resume_continues_from_checkpoint(tmp_path, monkeypatch):
    result, _, run_dir = run_main(tmp_path, monkeypatch, env_kwargs=("delay=5",), eval_episodes=2)
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert ckpt["iteration"] == 4 and ckpt["global_step"] == 256
    ckpt["iteration"], ckpt["global_step"] = 2, 128  # as if killed after the second update
    torch.save(ckpt, run_dir / "checkpoint.pt")
    trace_ppo.main(Args(resume="t"))
    resumed = json.loads((run_dir / "eval.json").read_text())
    assert resumed["global_step"] == 256
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["iteration"] == 4


def test_resume_restores_the_visit_counts_of_the_exploration_floor(tmp_path, monkeypatch):
    run_main(tmp_path, monkeypatch, env_id="PassiveTMaze-v0", env_kwargs=("length=5",), explore_visits=20.0,
             eval_episodes=2)
    path = tmp_path / "runs" / "t" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=False)
    ckpt["iteration"], ckpt["global_step"] = 2, 128  # as if killed after the second update
    ckpt["visit_counts"] = ckpt["visit_counts"] * 0.5  # 128 counted visits instead of 256
    torch.save(ckpt, path)
    trace_ppo.main(Args(resume="t"))
    # Two more updates add 128 visits to the restored 128 (a fresh counter would hold only 128).
    assert torch.load(path, weights_only=False)["visit_counts"].sum().item() == 256


def test_resume_of_a_checkpoint_from_another_network_is_a_one_line_error(tmp_path, monkeypatch):
    _, _, run_dir = run_main(tmp_path, monkeypatch, env_kwargs=("delay=5",), eval_episodes=2)
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    del ckpt["agent"]["read_norm.weight"]  # as written by a version without the read's LayerNorm
    torch.save(ckpt, run_dir / "checkpoint.pt")
    (run_dir / "eval.json").unlink()
    with pytest.raises(memory_envs.UserError, match="read_norm.weight") as err:
        trace_ppo.main(Args(resume="t"))
    assert "\n" not in str(err.value)


def test_resume_of_a_finished_run_only_evaluates(tmp_path, monkeypatch):
    result, _, run_dir = run_main(tmp_path, monkeypatch, env_kwargs=("delay=5",), eval_episodes=4)
    weights = torch.load(run_dir / "checkpoint.pt", weights_only=False)["agent"]
    (run_dir / "eval.json").unlink()
    trace_ppo.main(Args(resume="t"))
    again = json.loads((run_dir / "eval.json").read_text())
    assert again["global_step"] == 256
    for key in ("mean_return", "success_rate", "cue_in_memory", "cue_attention"):
        assert again[key] == result[key], key  # greedy evaluation of the same weights
    after = torch.load(run_dir / "checkpoint.pt", weights_only=False)["agent"]
    assert all(torch.equal(weights[k], after[k]) for k in weights)  # no training step was taken


def test_tagged_keys_and_values_equal_projecting_the_tagged_entry():
    """k_proj(e + tag_proj(tag)) is computed as k_proj(e) + W_k W_tag tag (same for values)."""
    args = small_args()
    agent = Agent(spaces.Box(0, 1, (3,), np.float32), spaces.Discrete(2), args)
    mem, tags = torch.randn(4, 5, args.hidden_size), torch.randn(4, 5, trace_ppo.TAG_DIM)
    k, v = agent.k_proj(mem) + agent.tag_key(tags), agent.v_proj(mem) + agent.tag_value(tags)
    tagged = mem + agent.tag_proj(tags)
    assert torch.allclose(k, agent.k_proj(tagged), atol=1e-5) and torch.allclose(v, agent.v_proj(tagged), atol=1e-5)
    assert not torch.allclose(k, agent.k_proj(mem), atol=1e-3)  # the tag does change the key


def test_hindsight_td_target_is_the_reward_of_the_action_that_earned_it():
    """The retention judges' target is the one-step r_t + gamma V(s_t+1),
    cut at episode ends: the steps before a rewarded decision do not carry its reward."""
    gamma = 0.9
    rewards = torch.tensor([[0.0], [0.0], [1.0], [0.0]])
    values = torch.tensor([[0.1], [0.2], [0.3], [0.4]])
    dones = torch.tensor([[0.0], [0.0], [1.0], [0.0]])
    last = torch.tensor([0.5])
    target, error = trace_ppo.hindsight_targets(rewards, values, dones, last, gamma)
    expected = torch.tensor([0.9 * 0.2, 0.9 * 0.3, 1.0, 0.9 * 0.5])
    assert torch.allclose(target, expected)
    assert torch.allclose(error, expected - values.reshape(-1))
    lam_return = trace_ppo.compute_gae(rewards, values, dones, last, gamma, 0.95) + values
    assert lam_return[0, 0] > 0.5  # the lambda-return of step 0 does carry the reward of step 2
