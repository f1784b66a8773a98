"""Tests of trace_ppo.py: memory invariants, retention's candidates, exact rollout replay, what retention is
trained on, end-to-end runs and a fast learning check of retention."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gymnasium import spaces

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import memory_envs  # noqa: E402,F401
import run_contract  # noqa: E402
import trace_ppo  # noqa: E402
from trace_ppo import Agent, Args, Memory, Retention, Rollout, Votes  # noqa: E402


def small_args(**kw) -> Args:
    base = dict(num_envs=3, num_steps=16, num_minibatches=2, update_epochs=2, learning_rate=2.5e-4,
                clip_coef=0.2, ent_coef=0.001, normalize=False, norm_adv=False, memory_slots=4,
                hidden_size=16, num_heads=2, explore_visits=0.0)
    base.update(kw)
    return Args(**base)


def make_memory(args: Args, env_kwargs=None, env_id="MemoryTask-v0", seed=0):
    torch.manual_seed(seed)
    envs = trace_ppo.make_vector_env(Args(env_id=env_id), env_kwargs or {}, "vector", args.num_envs)
    agent = Agent(envs.single_observation_space, envs.single_action_space, args)
    mem = Memory(agent, args.num_envs, args, envs.single_observation_space, torch.device("cpu"),
                 torch.Generator().manual_seed(seed))
    return envs, agent, mem


def run_rollout(envs, mem: Memory, steps: int, seed: int = 0, obs=None, on_step=None):
    """The rollout loop of trace_ppo.main. Starts from reset unless ``obs`` is given. Returns the Rollout,
    the carry-in, the pool [carried entries, steps], what the policy output at each step, and the last obs."""
    agent, n, s = mem.agent, mem.n, mem.s
    ro = Rollout(steps, n, mem, envs.single_observation_space, envs.single_action_space, torch.device("cpu"))
    carry = mem.begin_rollout()
    out = {k: [] for k in ("w", "logits")}
    if obs is None:
        obs = torch.as_tensor(envs.reset(seed=seed)[0])
    for step in range(steps):
        ro.record_inputs(step, obs, mem)
        with torch.no_grad():
            (action, logprob, value), w, e = mem.act(obs)
            read, _ = agent.attend(e, mem.emb, mem.tags() if mem.k else None, mem.src >= 0, mem.score)
            out["logits"].append(agent.actor(torch.cat([e, read], -1)))
        ro.values[step], ro.actions[step], ro.logprobs[step], ro.attn[step] = value, action, logprob, w.mean(1)
        out["w"].append(w)
        nxt, reward, term, trunc, info = envs.step(action.numpy())
        ro.rewards[step] = torch.as_tensor(reward, dtype=torch.float32)
        ro.dones[step] = torch.as_tensor(term | trunc, dtype=torch.float32)
        mem.step(e, obs, s + step, action, reward)
        ro.ret[step] = torch.as_tensor(np.where(term | trunc, mem.ep_return, 0.0), dtype=torch.float32)
        done = np.flatnonzero(term | trunc)
        if on_step is not None:
            on_step(step, done)
        if len(done):
            mem.end_episodes(done)
        obs = torch.as_tensor(nxt)
    return ro, carry, ro.pool(carry), {k: torch.stack(v) for k, v in out.items()}, obs


def pool_episodes(ro: Rollout, carry: dict) -> torch.Tensor:
    """(N, P): the episode of each pool entry as retention_votes numbers them (carried entries: -10^9)."""
    n, s = carry["tau"].shape
    return torch.cat([torch.full((n, s), -10 ** 9), ro.episode_ids().T], 1)


def all_queries(t_len: int, n: int):
    return (x.reshape(-1) for x in torch.meshgrid(torch.arange(t_len), torch.arange(n), indexing="ij"))


# ---------------------------------------------------------------------------------------
# Memory invariants
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("retention", ["learned", "fifo", "random"])
def test_never_more_than_m_entries_and_cleared_at_episode_start(retention):
    args = small_args(retention=retention, memory_slots=3)
    envs, agent, mem = make_memory(args, {"delay": 7})
    checked = []

    def on_step(step, done):
        occ = mem.src >= 0
        # After t + 1 writes in an episode, min(t + 1, M) slots are used (nothing lost, nothing extra).
        assert torch.equal(occ.sum(1), torch.clamp(mem.clock, max=3))
        checked.append(len(done))

    _, _, _, _, obs = run_rollout(envs, mem, 30, on_step=on_step)
    ro, *_ = run_rollout(envs, mem, 20, obs=obs)
    starts = ro.tau == 0
    assert starts.sum() > 0 and (ro.src[starts] < 0).all()  # reads at episode starts see an empty memory
    assert sum(checked) > 0


def test_learned_evicts_lowest_score_including_new_entry():
    args = small_args(memory_slots=3, num_envs=2)
    envs, agent, mem = make_memory(args)
    scores = iter([torch.tensor([0.5, 2.0]), torch.tensor([-1.0, 1.0]), torch.tensor([3.0, 0.0]),
                   torch.tensor([0.0, -5.0])])
    agent.retention.score = lambda x: next(scores)
    e, obs = torch.zeros(2, args.hidden_size), torch.zeros(2, 3)
    with torch.no_grad():
        for j in range(3):
            assert mem.step(e, obs, 10 + j, torch.zeros(2, dtype=torch.long), np.zeros(2)).tolist() == [-1, -1]
        ages = mem.write(e, obs, 13)
    # env 0: scores [0.5, -1, 3] + new 0.0 -> the entry of clock 1 is dropped (age 2), the new one takes its slot.
    assert mem.src[0].tolist() == [10, 13, 12] and ages[0] == 2
    # env 1: scores [2, 1, 0] + new -5 -> the new entry is the lowest and is not kept (age 0).
    assert mem.src[1].tolist() == [10, 11, 12] and ages[1] == 0


@pytest.mark.parametrize("w", [0, 1, 3])
def test_learned_never_evicts_the_w_newest(w):
    # A scorer that ranks every new entry last: without a window each new entry is dropped at once (age 0); with
    # --recent-slots W the one dropped is the lowest-scored of those at least W steps old, and the W newest stay.
    args = small_args(memory_slots=4, num_envs=2, recent_slots=w)
    envs, agent, mem = make_memory(args)
    clock = iter(range(100))
    agent.retention.score = lambda x: torch.full((2,), -float(next(clock)))
    e, obs = torch.zeros(2, args.hidden_size), torch.zeros(2, 3)
    with torch.no_grad():
        ages = [mem.step(e, obs, j, torch.zeros(2, dtype=torch.long), np.zeros(2)) for j in range(12)]
    assert [a.tolist() for a in ages[4:]] == [[w, w]] * 8  # the newest of the old enough ones goes
    assert set(range(12 - w, 12)) <= set(mem.entry["tau"][0, :4].tolist())


def test_fifo_evicts_oldest():
    args = small_args(retention="fifo", memory_slots=4, num_envs=2)
    envs, agent, mem = make_memory(args, {"delay": 30})

    def on_step(step, done):
        for i in range(2):  # the memory holds exactly the last M steps of the episode
            taus = sorted(mem.entry["tau"][i, :4][mem.src[i, :4] >= 0].tolist())
            t = int(mem.clock[i]) - 1  # the clock has advanced
            assert taus == list(range(max(0, t - 3), t + 1))

    run_rollout(envs, mem, 25, on_step=on_step)


def test_attention_weights_sum_to_one_over_occupied_and_zero_on_empty():
    args = small_args(memory_slots=5)
    envs, agent, mem = make_memory(args, {"delay": 9, "difficulty": 1})
    ro, _, _, out, _ = run_rollout(envs, mem, 24)
    w, occ = out["w"], (ro.src >= 0).unsqueeze(2).expand_as(out["w"])  # T N H S
    assert torch.all(w[~occ] == 0.0)
    sums, has = w.sum(-1), occ.any(-1)
    assert torch.allclose(sums[has], torch.ones_like(sums[has]), atol=1e-6)
    assert torch.all(sums[~has] == 0.0) and (~has).any() and has.any()


def test_read_scale_does_not_grow_with_the_entries():
    """The read is layer-normalised: entries 1000x larger cannot give a read that saturates the heads."""
    args = small_args()
    torch.manual_seed(0)
    agent = Agent(spaces.Box(-1, 1, (3,), np.float32), spaces.Discrete(2), args)
    d = args.hidden_size
    e, slots = torch.randn(5, d), 1000.0 * torch.randn(5, 4, d)
    with torch.no_grad():
        read, _ = agent.attend(e, slots, None, torch.ones(5, 4, dtype=torch.bool), torch.zeros(5, 4))
        raw = agent.o_proj(agent.v_proj(slots).mean(1))  # what the projections alone would pass on
    assert read.norm(dim=-1).max() <= math.sqrt(d) + 1e-3 < raw.norm(dim=-1).min()


def test_persistent_slots_survive_reset_with_outcome_tag():
    args = small_args(memory_slots=3, persistent_slots=2, num_envs=2)
    envs, agent, mem = make_memory(args, {"block": 2, "length": 3}, env_id="RecallAcrossEpisodes-v0")
    ro, *_ = run_rollout(envs, mem, 12)
    # After the first episode, every episode starts with its 3 episodic slots empty but 2 persistent entries.
    later = (ro.tau == 0) & (torch.arange(12).unsqueeze(1) >= 3)
    assert later.any()
    assert (ro.src[later][:, :3] < 0).all() and (ro.src[later][:, 3:] >= 0).all()
    tags = ro.tag[later][:, 3:]  # [persistent, symlog(outcome), log1p(episodes ago)]
    assert torch.all(tags[..., 0] == 1.0) and torch.all(tags[..., 1].abs() == np.log(2.0))
    assert torch.all(tags[..., 2] > 0)


# ---------------------------------------------------------------------------------------
# Exact replay and gradients
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("persistent", [0, 2])
def test_update_reproduces_rollout_logits_values_and_weights(persistent):
    args = small_args(memory_slots=3, persistent_slots=persistent, num_envs=3)
    envs, agent, mem = make_memory(args, {"delay": 5, "difficulty": 1})
    T = 14
    # Two rollouts: the second starts with entries carried over from the first (mid-episode).
    *_, obs = run_rollout(envs, mem, T)
    with torch.no_grad():
        for p in agent.parameters():
            p.add_(0.05 * torch.randn_like(p))  # parameters change between rollouts, as after an update
    ro, carry, _, out, _ = run_rollout(envs, mem, T, obs=obs)
    assert (ro.tau == 0).any() and (ro.tau[0] > 0).any(), "episode boundaries inside and across rollouts"
    pool = {k: torch.cat([carry[k], v.transpose(0, 1)], 1) for k, v in ro.inputs.items()}
    t_idx, i_idx = all_queries(T, 3)
    e, read, w = trace_ppo.replay(agent, trace_ppo.pool_embed(agent, pool), ro, t_idx, i_idx)
    _, logp, _, value = agent.heads(e, read, ro.actions.reshape(-1).long())
    assert torch.allclose(agent.actor(torch.cat([e, read], -1)), out["logits"].reshape(-1, 2), atol=1e-5)
    assert torch.allclose(logp, ro.logprobs.reshape(-1), atol=1e-5)
    assert torch.allclose(value, ro.values.reshape(-1), atol=1e-5)
    assert torch.allclose(w, out["w"].reshape(T * 3, *out["w"].shape[2:]), atol=1e-5)
    # A shuffled subset of the queries (a minibatch) gets the same reads.
    sub = torch.randperm(len(t_idx), generator=torch.Generator().manual_seed(0))[: len(t_idx) // 3]
    _, read_sub, _ = trace_ppo.replay(agent, trace_ppo.pool_embed(agent, pool), ro, t_idx[sub], i_idx[sub])
    assert torch.allclose(read_sub, read[sub], atol=1e-5)


def test_score_prior_biases_the_read_and_replays_exactly():
    """The read adds each slot's retention score, times a learned gain per head, to its attention logit (the default;
    --no-score-prior: off). The update replays the scores acting saw (the scorer trains between rollout and update)."""
    args = small_args(memory_slots=3, persistent_slots=2, num_envs=3)
    envs, agent, mem = make_memory(args, {"delay": 5, "difficulty": 1})
    with torch.no_grad():
        agent.retention.scorer[2].weight.mul_(300.0)  # scores of a few units, so that the bias matters
    *_, obs = run_rollout(envs, mem, 14)
    ro, carry, pool, out, _ = run_rollout(envs, mem, 14, obs=obs)
    with torch.no_grad():
        agent.retention.scorer[2].weight.mul_(-1.0)  # as after train_retention: the recorded scores must be used
    t_idx, i_idx = all_queries(14, 3)
    e, read, w = trace_ppo.replay(agent, trace_ppo.pool_embed(agent, pool), ro, t_idx, i_idx)
    _, logp, _, value = agent.heads(e, read, ro.actions.reshape(-1).long())
    assert torch.allclose(w, out["w"].reshape(14 * 3, *out["w"].shape[2:]), atol=1e-5)
    assert torch.allclose(logp, ro.logprobs.reshape(-1), atol=1e-5) and ro.score.abs().max() > 1.0
    logp.sum().backward()
    assert agent.score_gain.grad.abs().sum() > 0 and all(p.grad is None for p in agent.retention.parameters())
    with torch.no_grad():
        agent.score_gain.zero_()
        w_plain = trace_ppo.replay(agent, trace_ppo.pool_embed(agent, pool), ro, t_idx, i_idx)[2]
    assert (w_plain - w).abs().max() > 0.1  # the prior moved the read
    plain = Agent(envs.single_observation_space, envs.single_action_space, small_args(score_prior=False))
    assert plain.score_gain is None


def test_crelu_obs_splits_the_signs_of_a_large_input_and_replays_exactly():
    """--crelu-obs: a vector enters the encoder as [relu(x), relu(-x)], so +10 and -10 (a rare cue, normalised) get
    embeddings that are not each other's negatives, as they nearly are without it; the update replays it exactly."""
    cos = {}
    for crelu in (False, True):
        torch.manual_seed(0)
        agent = Agent(spaces.Box(-10, 10, (2,), np.float32), spaces.Discrete(4),
                      small_args(crelu_obs=crelu, hidden_size=64, num_heads=4))
        e = agent.embed(torch.tensor([[0.0, 10.0], [0.0, -10.0]]), torch.zeros(2, 4), torch.zeros(2),
                        torch.zeros(2, dtype=torch.long))
        cos[crelu] = torch.nn.functional.cosine_similarity(e[0], e[1], dim=0).item()
    assert cos[False] < -0.5 and cos[True] > -0.3
    envs, agent, mem = make_memory(small_args(crelu_obs=True, memory_slots=3), {"delay": 5, "difficulty": 1})
    ro, carry, pool, out, _ = run_rollout(envs, mem, 12)
    e, read, w = trace_ppo.replay(agent, trace_ppo.pool_embed(agent, pool), ro, *all_queries(12, 3))
    assert torch.allclose(agent.heads(e, read, ro.actions.reshape(-1).long())[1], ro.logprobs.reshape(-1), atol=1e-5)


def test_policy_gradient_reaches_encoder_and_attention_but_not_retention():
    args = small_args(memory_slots=3, num_envs=2)
    envs, agent, mem = make_memory(args, {"delay": 6, "difficulty": 1})
    ro, carry, *_ = run_rollout(envs, mem, 12)
    pool = {k: torch.cat([carry[k], v.transpose(0, 1)], 1) for k, v in ro.inputs.items()}
    t_idx, i_idx = all_queries(12, 2)
    e, read, _ = trace_ppo.replay(agent, trace_ppo.pool_embed(agent, pool), ro, t_idx, i_idx)
    # Through the READ only (the step's own features detached): the gradient reaches the encoder through the
    # re-encoded memory entries.
    _, logp, _, _ = agent.heads(e.detach(), read, ro.actions.reshape(-1).long())
    logp.sum().backward()
    assert agent.embed_net[0].weight.grad.abs().sum() > 0
    assert agent.k_proj.weight.grad.abs().sum() > 0 and agent.q_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in agent.retention.parameters())
    assert {id(p) for p in agent.policy_parameters()}.isdisjoint(id(p) for p in agent.retention.parameters())


# ---------------------------------------------------------------------------------------
# What retention is trained on
# ---------------------------------------------------------------------------------------
def test_candidates_are_the_earlier_steps_of_the_episode_and_the_carried_entries_held():
    """For every step of the third rollout, the entries the critic judges are exactly the earlier steps of its
    episode within the rollout (raw inputs and clocks, kept or evicted) and the carried entries its slots still
    hold, although the episodes (delay 11) span rollouts of 4 steps and the 2 slots keep only a few steps."""
    args = small_args(memory_slots=2, num_envs=2)
    envs, agent, mem = make_memory(args, {"delay": 11, "difficulty": 1})
    obs = None
    for _ in range(3):
        ro, carry, pool, _, obs = run_rollout(envs, mem, 4, obs=obs)
    t_idx, i_idx = all_queries(4, 2)
    seen = trace_ppo.retention_votes(agent, pool, ro, t_idx * 2 + i_idx, torch.zeros(8)).seen
    for b in range(len(t_idx)):
        t, i = int(t_idx[b]), int(i_idx[b])
        first = t - min(t, int(ro.tau[t, i]))  # the episode's first step in this rollout
        held = [int(x) for x in ro.src[t, i] if 0 <= x < 2]
        assert sorted(torch.nonzero(seen[b]).squeeze(1).tolist()) == sorted(held + [2 + u for u in range(first, t)])
        for u in range(first, t):
            for k in ("obs", "pact", "prew", "tau"):
                assert torch.equal(pool[k][i, 2 + u], ro.inputs[k][u, i])


def test_fifo_candidates_are_the_two_steps_held_and_the_rollouts_own():
    """FIFO with 2 slots, episodes of 30 steps, third rollout of 4 steps: a step's candidates are the two last
    steps (held in memory, carried or not) and the rollout's own earlier steps, each once."""
    args = small_args(memory_slots=2, num_envs=2, retention="fifo")
    envs, agent, mem = make_memory(args, {"delay": 30})
    obs = None
    for _ in range(3):
        ro, carry, pool, _, obs = run_rollout(envs, mem, 4, obs=obs)
    t_idx, i_idx = all_queries(4, 2)
    seen = trace_ppo.retention_votes(agent, pool, ro, t_idx * 2 + i_idx, torch.zeros(8)).seen
    for b in range(len(t_idx)):
        taus = pool["tau"][int(i_idx[b])][seen[b]].tolist()
        t = int(ro.tau[t_idx[b], i_idx[b]])
        assert len(taus) == len(set(taus))
        assert set(taus) == set(range(max(0, t - 2), t)) | set(range(8, t))


@pytest.mark.parametrize("persistent", [0, 2])
def test_the_entries_each_step_read_are_among_its_candidates(persistent):
    """Every held slot's entry is among the step's candidates -- the same clock, and for a persistent slot the
    episode its tag says -- with the tag it carried then: retention judges the entries the step could hold."""
    args = small_args(memory_slots=2, num_envs=2, persistent_slots=persistent)
    envs, agent, mem = make_memory(args, {"delay": 3, "difficulty": 1})
    obs = None
    for _ in range(3):
        ro, carry, pool, _, obs = run_rollout(envs, mem, 5, obs=obs)
    t_idx, i_idx = all_queries(5, 2)
    votes = trace_ppo.retention_votes(agent, pool, ro, t_idx * 2 + i_idx, torch.zeros(10))
    s, ep_ids, pool_ep = ro.src.shape[2], ro.episode_ids(), pool_episodes(ro, carry)
    checked = carried = 0
    for b in range(10):
        t, i = int(t_idx[b]), int(i_idx[b])
        for slot, src in enumerate(ro.src[t, i].tolist()):
            if src < 0:
                continue
            clock = int(carry["tau"][i, src]) if src < s else int(ro.tau[src - s, i])
            ago = round(math.expm1(ro.tag[t, i, slot, 2].item())) if slot >= 2 else 0
            found = [j for j in range(pool["tau"].shape[1]) if votes.seen[b, j] and int(pool["tau"][i, j]) == clock
                     and (int(pool_ep[i, j]) == int(ep_ids[t, i]) - ago or j == src < s)]
            assert len(found) == 1
            assert torch.allclose(votes.tag[b, found[0]], ro.tag[t, i, slot], atol=1e-6)  # the tag it carried then
            checked, carried = checked + 1, carried + (src < s)
    assert checked > 10 and carried > 0


def test_with_persistent_slots_earlier_episodes_are_candidates_tagged_as_they_would_be_held():
    """RecallAcrossEpisodes (blocks of 3 episodes of 2 steps): with persistent slots a step may judge every
    earlier step of the rollout, a block's cue two episodes back tagged [1, symlog(return of its episode),
    log(1 + 2)] -- whether or not a persistent slot kept it. Without persistent slots, only its own episode."""
    for persistent in (0, 2):
        args = small_args(memory_slots=2, num_envs=2, persistent_slots=persistent)
        envs, agent, mem = make_memory(args, {"block": 3, "length": 2}, env_id="RecallAcrossEpisodes-v0")
        obs = None
        for _ in range(3):
            ro, carry, pool, _, obs = run_rollout(envs, mem, 8, obs=obs)
        t_idx, i_idx = all_queries(8, 2)
        votes = trace_ppo.retention_votes(agent, pool, ro, t_idx * 2 + i_idx, torch.zeros(16))
        cue, pool_ep = pool["obs"][..., 1] == 1.0, pool_episodes(ro, carry)  # the block's first observation
        checked = 0
        for b in range(16):
            t, i = int(t_idx[b]), int(i_idx[b])
            ep_q = int(ro.episode_ids()[t, i])
            cands = [j for j in torch.nonzero(votes.seen[b] & cue[i]).squeeze(1).tolist() if j >= 2 + persistent]
            if persistent == 0:
                assert all(int(pool_ep[i, j]) == ep_q for j in cands)
                continue
            for j in cands:
                lag = ep_q - int(pool_ep[i, j])
                assert lag >= 0 and votes.tag[b, j, 2] == pytest.approx(np.log1p(lag))
                if lag:
                    assert votes.tag[b, j, 0] == 1 and abs(votes.tag[b, j, 1]) == pytest.approx(np.log(2.0))
            for u in range(t):  # every earlier step of the rollout, the block's cues included, is a candidate
                assert votes.seen[b, 4 + u]
                checked += int(cue[i, 4 + u])
        assert persistent == 0 or checked > 0


def train_entry_critic(retention: Retention, steps: int, seed: int = 0):
    """Decisions rewarded +1 when the action equals the bit of ONE marked entry among 12 (else -1). Entries
    look like normalised MemoryTask observations [bit, distractor, marker]; returns their features and the
    last votes' weights G."""
    gen = torch.Generator().manual_seed(seed)
    n, p, b, d = 4, 12, 64, 16
    opt = torch.optim.Adam(retention.parameters(), lr=1e-3)
    for _ in range(steps):
        content = 2 * torch.randint(0, 2, (n, p, 3), generator=gen).float() - 1
        content[..., 2] = -0.25
        content[:, 0, 2] = 4.0  # the marker of the cue
        e = torch.tanh(torch.randn(n, p, d, generator=gen))
        x = Retention.features(e, content, torch.arange(p).repeat(n, 1), torch.zeros(n, p, 2), torch.zeros(n, p))
        env = torch.arange(b) % n
        action = torch.randint(0, 2, (b,), generator=gen)
        y = torch.where(action == (content[env, 0, 0] > 0).long(), 1.0, -1.0)
        votes = Votes(x, torch.ones(b, p, dtype=torch.bool), torch.zeros(b, p, 3), env,
                      torch.tanh(torch.randn(b, d, generator=gen)), torch.nn.functional.one_hot(action, 2).float(), y)
        critic_loss, ret_loss, gain = retention.loss(votes)
        opt.zero_grad()
        (critic_loss + ret_loss).backward()
        opt.step()
    return x, gain


def test_scorer_learns_to_rank_first_the_entry_that_explains_the_outcome():
    """Once the entry critic has learned which entry explains the decisions, the votes carry weight and the
    scorer ranks that entry first among its 12."""
    torch.manual_seed(0)
    retention = Retention(16, 3, 2)
    _, gain = train_entry_critic(retention, 1)
    assert gain.mean() < 0.05  # untrained: no entry stands out, the votes weigh nothing
    x, gain = train_entry_critic(retention, 400, seed=1)
    assert gain.mean() > 0.08
    with torch.no_grad():
        scores = retention.score(x)
    assert (scores[:, 0] > scores[:, 1:].max(1).values).all()


def test_steps_that_no_entry_explains_do_not_vote():
    """Value noise (small targets independent of every entry) weighs at most its own squared error, G < 0.01,
    against G of order 1 for a decision that an entry explains (previous test): it hardly pulls the scorer."""
    torch.manual_seed(0)
    retention = Retention(16, 3, 2)
    gen = torch.Generator().manual_seed(0)
    n, p, b = 4, 12, 64
    x = Retention.features(torch.randn(n, p, 16, generator=gen), torch.randn(n, p, 3, generator=gen),
                           torch.arange(p).repeat(n, 1), torch.zeros(n, p, 2), torch.zeros(n, p))
    votes = Votes(x, torch.ones(b, p, dtype=torch.bool), torch.zeros(b, p, 3),
                  torch.arange(b) % n, torch.randn(b, 16, generator=gen),
                  torch.nn.functional.one_hot(torch.randint(0, 2, (b,)), 2).float(), 0.05 * torch.randn(b, generator=gen))
    _, _, gain = retention.loss(votes)
    assert gain.max() < 0.01


def test_retention_loss_reaches_the_scorer_through_an_evicted_entry():
    """Real rollouts of MemoryTask (cue at step 0, delay 12) with FIFO and 2 slots: at every decision the cue
    was dropped from memory 10 steps earlier, yet it is among the critic's candidates, and training the retention
    module on those decisions (their real rewards) makes the scorer rank the cue entry first."""
    args = small_args(memory_slots=2, num_envs=8, retention="fifo")
    envs, agent, mem = make_memory(args, {"delay": 12, "difficulty": 1})
    obs, batches = None, []
    for r in range(6):
        ro, carry, pool, _, obs = run_rollout(envs, mem, 12, obs=obs)
        t_idx, i_idx = torch.nonzero(ro.dones > 0, as_tuple=True)
        if r == 0 or not len(t_idx):
            continue
        held = ro.src[t_idx, i_idx]
        held_tau = torch.where(held < 2, carry["tau"][i_idx[:, None], held.clamp(0, 1)],
                               ro.tau[(held - 2).clamp(min=0), i_idx[:, None]])
        assert (held >= 0).all() and (held_tau > 0).all()  # the decision's slots no longer hold step 0
        votes = trace_ppo.retention_votes(agent, pool, ro, t_idx * 8 + i_idx, ro.rewards[t_idx, i_idx])
        cue = votes.seen & (pool["tau"][votes.env] == 0)
        assert cue.sum(1).eq(1).all()  # ... but it is a candidate
        batches.append((votes, cue))
    opt = torch.optim.Adam(agent.retention.parameters(), lr=3e-3)
    for step in range(800):
        critic_loss, ret_loss, gain = agent.retention.loss(batches[step % len(batches)][0])
        opt.zero_grad()
        (critic_loss + ret_loss).backward()
        opt.step()
    for votes, cue in batches:
        with torch.no_grad():
            scores = agent.retention.score(votes.entries)[votes.env].masked_fill(~votes.seen, -1e9)
        assert (scores.argmax(1) == cue.float().argmax(1)).all()


def test_td_target_is_the_reward_of_the_action_that_earned_it():
    """What the entry critic predicts: the one-step r_t + gamma V(s_t+1), cut at
    episode ends, so the steps before a rewarded decision do not carry its reward."""
    gamma = 0.9
    rewards = torch.tensor([[0.0], [0.0], [1.0], [0.0]])
    values = torch.tensor([[0.1], [0.2], [0.3], [0.4]])
    dones = torch.tensor([[0.0], [0.0], [1.0], [0.0]])
    last = torch.tensor([0.5])
    target = trace_ppo.td_targets(rewards, values, dones, last, gamma)
    expected = torch.tensor([[0.9 * 0.2], [0.9 * 0.3], [1.0], [0.9 * 0.5]])
    assert torch.allclose(target, expected)
    lam_return = trace_ppo.compute_gae(target - values, dones, gamma, 0.95) + values
    assert lam_return[0, 0] > 0.5  # the lambda-return of step 0 does carry the reward of step 2


def test_time_encoding_distinguishes_long_episodes_and_equals_its_formula():
    enc = trace_ppo.time_encoding(torch.tensor([0, 1, 1000, 1001, 100000]))
    assert torch.isfinite(enc).all() and enc.abs().max() <= 2.0
    d = torch.cdist(enc, enc)
    assert d[0, 1] > 0.1 and d[2, 3] > 1e-3 and d[3, 4] > 0.1

    def formula(tau):
        t = tau.float().unsqueeze(-1)
        u = torch.log1p(t)
        f, p = torch.tensor(trace_ppo.TIME_FREQS), torch.tensor(trace_ppo.TIME_PERIODS)
        return torch.cat([u / 8.0, torch.sin(u * f), torch.cos(u * f), torch.sin(2 * math.pi * t / p),
                          torch.cos(2 * math.pi * t / p)], -1)

    for hi in (10, 3000, 70000):  # the later calls outgrow the lookup table
        tau = torch.randint(0, hi, (5, 7))
        assert torch.allclose(trace_ppo.time_encoding(tau), formula(tau), atol=1e-6)


def test_visit_counter_counts_each_hash_bucket():
    counter = trace_ppo.VisitCounter(2, seed=0, device=torch.device("cpu"), m=1.5)
    corridor, junction = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0])
    assert counter.floor(torch.stack([corridor, corridor, junction])).tolist() == [0.75, 0.75, 1.0]  # m / 2, m / 1
    assert counter.floor(torch.stack([corridor, junction])).tolist() == [0.5, 0.75]  # m / 3, m / 2
    assert counter.counts.sum().item() == 5.0


def test_exploration_floor_samples_the_mixture_and_returns_the_softmax_log_prob():
    args = small_args()
    agent = Agent(spaces.Box(0, 1, (3,), np.float32), spaces.Discrete(2), args)
    n = 20000
    e, read = torch.randn(1, 16).expand(n, 16), torch.randn(1, 16).expand(n, 16)
    floor = torch.full((n,), 0.3)
    torch.manual_seed(0)
    with torch.no_grad():
        agent.actor[-1].bias.copy_(torch.tensor([8.0, -8.0]))  # a nearly deterministic policy
        action, logp, _, _ = agent.heads(e, read, floor=floor)
        greedy, *_ = agent.heads(e, read, greedy=True, floor=floor)
        _, logp_update, _, _ = agent.heads(e, read, action)
        logits = agent.actor(torch.cat([e, read], -1))
    mix = 0.7 * torch.softmax(logits[0], -1) + 0.3 / 2
    assert (action == 1).float().mean().item() == pytest.approx(mix[1].item(), abs=0.01)  # ~0.15, not ~1e-7
    # PPO trains the softmax: the rollout stores its log-probability, which the update reproduces.
    assert torch.allclose(logp, torch.log_softmax(logits, -1).gather(1, action[:, None]).squeeze(1), atol=1e-6)
    assert torch.equal(logp, logp_update) and torch.equal(greedy, logits.argmax(1))


def test_heads_compute_exactly_what_torch_categorical_computes():
    """The heads write Categorical's arithmetic out (speed): sampling without a floor, log-probability and entropy
    must be torch's to the bit, so seeded runs and the suite's numbers stay what they were."""
    class FixedLogits(torch.nn.Module):  # the same logits on every call: a GEMM's last bits may vary with alignment
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, z):
            return self.logits

    agent = Agent(spaces.Box(0, 1, (3,), np.float32), spaces.Discrete(3), small_args())
    e, read = torch.randn(64, 16), torch.randn(64, 16)
    with torch.no_grad():
        agent.actor[-1].weight.mul_(300.0)  # spread-out logits, some probabilities near 0
        agent.actor = FixedLogits(agent.actor(torch.cat([e, read], -1)))
        dist = torch.distributions.Categorical(logits=agent.actor.logits, validate_args=False)
        torch.manual_seed(1)
        action, logp, _, _ = agent.heads(e, read)
        torch.manual_seed(1)
        assert torch.equal(action, dist.sample())
        _, logp_update, entropy, _ = agent.heads(e, read, action.float())
    assert torch.equal(logp, dist.log_prob(action)) and torch.equal(logp_update, logp)
    assert torch.equal(entropy, dist.entropy())


def test_ppo_clip_holds_against_the_policy_that_acted():
    """Without the floor (or where it barely changed an action's probability) the upper ratio bound is PPO's 1 + clip;
    an action the floor made far likelier than the softmax would may rise to the probability it was acted with."""
    from types import SimpleNamespace

    pi = torch.tensor([[0.5, 1e-4], [0.9, 1e-4]])  # step x env: the softmax probability of the action taken
    floor = torch.tensor([[0.0, 0.0], [0.1, 0.1]])
    bound = Rollout.ratio_max(SimpleNamespace(floor=floor, logprobs=pi.log()), 0.2, 4)
    acted = (1 - floor) * pi + floor / 4
    assert bound[:3].tolist() == pytest.approx([1.2, 1.2, 1.2])
    assert bound[3].item() == pytest.approx(1.2 * acted[1, 1].item() / 1e-4, rel=1e-4)  # ~300: up to 0.025 at once


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


@pytest.mark.parametrize("score_prior", [False, True])
def test_main_vector_env_replays_exactly_and_logs(tmp_path, monkeypatch, score_prior):
    result, tb, run_dir = run_main(tmp_path, monkeypatch, env_kwargs=("delay=7", "difficulty=1", "cue_time='random'"),
                                   score_prior=score_prior)
    assert result["success_rate"] is not None and result["algo"] == "trace_ppo"
    errs = [v for _, v in tb["debug/replay_max_error"]]
    assert len(errs) == 4 and max(errs) < 1e-5
    for key in ("charts/episodic_return", "charts/SPS", "losses/policy_loss", "losses/retention_loss",
                "losses/entry_critic_loss",
                "memory/mean_age_evicted", "memory/attention_entropy", "memory/cue_in_memory_at_decision",
                "memory/vote_gain_mean", "intrinsic/explore_floor_mean"):
        assert key in tb, key
    assert (run_dir / "attention.png").stat().st_size > 0 and (run_dir / "checkpoint.pt").exists()


def test_cue_in_memory_logging_reads_the_recorded_slots(tmp_path, monkeypatch):
    """memory/cue_in_memory_at_decision is 1 when nothing is ever evicted (episodes of 7 steps, 8 slots,
    crossing rollout boundaries so some cues are carried-in entries) and 0 when FIFO must drop the cue."""
    _, tb, _ = run_main(tmp_path, monkeypatch, env_kwargs=("delay=7",), memory_slots=8)
    assert [v for _, v in tb["memory/cue_in_memory_at_decision"]] == [1.0] * 4
    (tmp_path / "fifo").mkdir()
    _, tb, _ = run_main(tmp_path / "fifo", monkeypatch, env_kwargs=("delay=12",), memory_slots=4, retention="fifo")
    assert [v for _, v in tb["memory/cue_in_memory_at_decision"]] == [0.0] * 4


@pytest.mark.parametrize("delay,slots,retention,cue_in,cue_attn", [
    (2, 1, "fifo", 1.0, 1.0),   # the decision reads one slot, which holds the cue: all heads weigh it 1
    (8, 2, "fifo", 0.0, 0.0),   # FIFO with 2 slots has dropped the cue 6 steps before the decision
    (5, 8, "learned", 1.0, None),  # nothing evicted: the cue is there, its weight is a softmax share
])
def test_evaluation_measures_cue_kept_and_cue_read(delay, slots, retention, cue_in, cue_attn):
    args = small_args(memory_slots=slots, retention=retention, eval_episodes=6)
    _, agent, _ = make_memory(args, dict(delay=delay, difficulty=1))
    result, _ = trace_ppo.evaluate(agent, args, dict(delay=delay, difficulty=1), "vector")
    assert result["cue_in_memory"] == cue_in
    if cue_attn is not None:
        assert result["cue_attention"] == pytest.approx(cue_attn, abs=1e-6)
    else:
        assert 0.0 < result["cue_attention"] < 1.0


def test_attention_map_is_binned_for_long_episodes():
    """The evaluation's attention map of a 600-step episode is 512 x 512 bins that keep every weight (each
    decision's weights sum to 1 over the slots, the first step reads nothing): drawing it costs no more memory
    at any episode length."""
    args = small_args(eval_episodes=1)
    _, agent, _ = make_memory(args, dict(delay=600))
    _, (picture, steps) = trace_ppo.evaluate(agent, args, dict(delay=600), "vector")
    assert picture.shape == (512, 512) and steps == 600
    assert picture.sum() == pytest.approx(599, rel=1e-4)


def test_main_image_env(tmp_path, monkeypatch):
    result, tb, _ = run_main(tmp_path, monkeypatch, env_id="helper_envs:ImageMemoryTask-v0", env_kwargs=("delay=5",))
    assert max(v for _, v in tb["debug/replay_max_error"]) < 1e-5
    assert result["success_rate"] is not None


def test_main_persistent_memory(tmp_path, monkeypatch):
    result, tb, _ = run_main(tmp_path, monkeypatch, env_id="RecallAcrossEpisodes-v0", persistent_slots=2,
                             env_kwargs=("block=3", "length=4"))
    assert max(v for _, v in tb["debug/replay_max_error"]) < 1e-5
    assert "losses/retention_loss" in tb and result["success_rate"] is not None


def test_main_box_actions_fifo(tmp_path, monkeypatch):
    result, tb, _ = run_main(tmp_path, monkeypatch, env_id="Pendulum-v1", retention="fifo", num_steps=64,
                             num_minibatches=4, update_epochs=2, total_timesteps=128, eval_episodes=1)
    assert max(v for _, v in tb["debug/replay_max_error"]) < 1e-5
    assert "losses/retention_loss" not in tb  # off with fifo
    assert np.isfinite(result["mean_return"])


def test_main_exploration_floor_replays_exactly_and_logs(tmp_path, monkeypatch):
    result, tb, run_dir = run_main(tmp_path, monkeypatch, env_id="PassiveTMaze-v0", env_kwargs=("length=5",))
    assert max(v for _, v in tb["debug/replay_max_error"]) < 1e-5
    floor_mean = [v for _, v in tb["intrinsic/explore_floor_mean"]]
    assert floor_mean[0] > floor_mean[-1] > 0  # observations become familiar
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["visit_counts"]["counts"].sum() == 256
    assert result["success_rate"] is not None


def test_main_clips_against_the_bound_the_rollout_gives(tmp_path, monkeypatch):
    """main() computes the upper ratio bound from the rollout's floor, and the bound is what clips the policy loss:
    the same seeded run with the bound replaced by 1 - clip logs another policy loss."""
    seen = []

    def spy(self, clip, n_act):
        seen.append(float(self.floor.max()))
        return real(self, clip, n_act)

    real = Rollout.ratio_max
    monkeypatch.setattr(Rollout, "ratio_max", spy)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    _, tb, _ = run_main(tmp_path / "a", monkeypatch, env_id="PassiveTMaze-v0", env_kwargs=("length=5",))
    assert len(seen) == 4 and min(seen) > 0  # every update, with the floor's values
    monkeypatch.setattr(Rollout, "ratio_max", lambda self, clip, n_act: torch.full_like(self.floor.reshape(-1),
                                                                                          1 - clip))
    _, tb_low, _ = run_main(tmp_path / "b", monkeypatch, env_id="PassiveTMaze-v0", env_kwargs=("length=5",))
    assert [v for _, v in tb["losses/policy_loss"]] != [v for _, v in tb_low["losses/policy_loss"]]


def test_the_main_job_defaults_to_a_random_cue_longer_than_the_memory(tmp_path, monkeypatch):
    """``python trace_ppo.py`` runs MemoryTask delay 64 with a randomly timed cue (16 slots); another env id
    gets no env kwargs unless given."""
    monkeypatch.chdir(tmp_path)
    seen = []
    monkeypatch.setattr(trace_ppo, "env_kind", lambda env_id, kw: seen.append((env_id, kw)) or
                        run_contract.env_kind(env_id, kw))
    with pytest.raises(run_contract.UserError):  # stop right after the env was made
        trace_ppo.main(Args(memory_slots=0))
    with pytest.raises(run_contract.UserError):
        trace_ppo.main(Args(env_id="PassiveTMaze-v0", memory_slots=0))
    assert seen == [("MemoryTask-v0", {"delay": 64, "difficulty": 1, "cue_time": "random"}), ("PassiveTMaze-v0", {})]
    assert Args().total_timesteps == 128_000 and Args().memory_slots == 16


def test_bad_flags_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(run_contract.UserError, match="memory-slots"):
        trace_ppo.main(Args(memory_slots=0, run_name="bad"))
    with pytest.raises(run_contract.UserError, match="delay"):
        trace_ppo.main(Args(env_kwargs=("delay=0",), run_name="bad"))
    with pytest.raises(run_contract.UserError, match="explore-visits needs discrete actions"):
        trace_ppo.main(Args(env_id="Pendulum-v1", explore_visits=10.0, run_name="bad"))
    with pytest.raises(run_contract.UserError, match="explore-visits must be >= 0"):
        trace_ppo.main(Args(explore_visits=-1.0, run_name="bad"))
    with pytest.raises(run_contract.UserError, match="recent-slots 17 must be <= --memory-slots 16"):
        trace_ppo.main(Args(recent_slots=17, run_name="bad"))
    assert not (tmp_path / "runs").exists()


def test_resume_continues_from_checkpoint(tmp_path, monkeypatch, capsys):
    _, _, run_dir = run_main(tmp_path, monkeypatch, env_kwargs=("delay=5",), eval_episodes=2)
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert ckpt["iteration"] == 4 and ckpt["global_step"] == 256
    ckpt["iteration"], ckpt["global_step"] = 2, 128  # as if killed after the second update
    ckpt["visit_counts"]["counts"] *= 0.5  # the 128 visits counted by then
    torch.save(ckpt, run_dir / "checkpoint.pt")
    capsys.readouterr()
    trace_ppo.main(Args(resume="t"))
    assert "ignored" not in capsys.readouterr().out  # no flag was given, so none is reported as ignored
    assert json.loads((run_dir / "eval.json").read_text())["global_step"] == 256
    after = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    # Two more updates add 128 visits to the restored 128 (a fresh counter would hold only 128).
    assert after["iteration"] == 4 and after["visit_counts"]["counts"].sum().item() == 256


def test_resume_of_a_checkpoint_from_another_network_is_a_one_line_error(tmp_path, monkeypatch):
    _, _, run_dir = run_main(tmp_path, monkeypatch, env_kwargs=("delay=5",), eval_episodes=2)
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    del ckpt["agent"]["read_norm.weight"]
    torch.save(ckpt, run_dir / "checkpoint.pt")
    (run_dir / "eval.json").unlink()
    with pytest.raises(run_contract.UserError, match="read_norm.weight") as err:
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


# ---------------------------------------------------------------------------------------
# Learning
# ---------------------------------------------------------------------------------------
def test_learned_retention_keeps_a_randomly_timed_cue_that_fifo_drops(tmp_path, monkeypatch):
    """Fast check that retention learns from content: MemoryTask with the cue at a random step of the first
    half (marked), 16 steps against 2 slots. FIFO holds the last two steps and never the cue; learned
    retention must keep it at nearly every evaluation decision within 1,000 episodes."""
    common = dict(env_kwargs=("delay=16", "difficulty=1", "cue_time='random'"), memory_slots=2, total_timesteps=32768,
                  num_envs=8, num_steps=128, hidden_size=32, eval_episodes=100)
    result, _, _ = run_main(tmp_path, monkeypatch, **common)
    assert result["cue_in_memory"] >= 0.9
    (tmp_path / "fifo").mkdir()
    fifo, _, _ = run_main(tmp_path / "fifo", monkeypatch, retention="fifo", **dict(common, total_timesteps=1024))
    assert fifo["cue_in_memory"] == 0.0


@pytest.mark.slow
def test_learns_memory_task_random_cue_delay_64(tmp_path, monkeypatch):
    result, _, _ = run_main(tmp_path, monkeypatch, env_kwargs=("delay=64", "difficulty=1", "cue_time='random'"),
                            total_timesteps=2000 * 64, num_envs=8, num_steps=128, hidden_size=64, num_heads=4,
                            memory_slots=16, eval_episodes=100)
    assert result["success_rate"] >= 0.99 and result["cue_in_memory"] >= 0.99
