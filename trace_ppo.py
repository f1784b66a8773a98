"""Strategic Memory agent: PPO with a slot memory whose retention is learned from what entries hold.

One file, CleanRL style. Design, ablations and every measurement: docs/trace_ppo.md.

Read, act, write
  Each step the agent READS its memory, acts, then WRITES one entry: the embedding of the step's observation,
  previous action and reward and its own clock (steps since its episode began). The read is multi-head attention
  from the current step over the occupied slots; actor and critic see [step, read]. There is no recurrent state:
  what the agent remembers sits in its slots. M episodic slots are cleared when an episode starts (K persistent
  slots survive resets). When the M slots are full, the new entry and the stored ones compete and the lowest
  retention score r(entry) is dropped (--retention fifo / random: the controls), so acting costs O(M) per step.

What retention is taught, and why it works
  r sees an entry's content only, never its slot or write order. It is taught in hindsight: at each update an
  ENTRY CRITIC judges every entry a step q could have held, the earlier steps of its episode in the rollout (kept
  or evicted) and the entries memory carried in. c(step q, action, entry j) predicts q's one-step TD target
  y_q = r_q + gamma V(s_q+1) from the ONE entry j, judging j by what the env showed at its step (not by the
  agent's own action, or the later steps the agent copies a cue into would share its credit). The entry that
  decides an outcome predicts it with a small error, the others with about the same larger one. So q votes, by
  cross-entropy, for softmax(r) to follow      u_qj = softmax_j(-err_qj / (0.1 mean_j err_qj)),
  weighted by how much its best entries beat the average one, G_q = mean_j err_qj - sum_j u_qj err_qj. A step
  that no entry explains better than another (value noise, a task already solved) weighs nothing, so it cannot
  teach "keep the earliest entries" nor erode a kept cue. Critic and scorer read detached inputs and have their
  own optimizer: retention never shapes what the policy reads.

The read, exactly replayed
  The rollout records which source each slot holds at every step; the update re-encodes the sources and replays
  every read with acting's attention: PPO's gradient reaches attention and encoder, and its first epoch reproduces
  the rollout exactly. Reading is learned from PPO's loss, biased by the slots' retention scores (--no-score-prior).

PPO for one decision in a thousand steps (vector preset): observation and reward normalisation (the observation enters
as [relu(x), relu(-x)], so a rare cue of +-10 std is not encoded as its own negative), no entropy bonus, no
per-minibatch advantage normalisation, and a count-based exploration floor: an observation seen N times is acted on
uniformly with probability min(1, m / N), so a rare input (a T-maze junction) is tried although the softmax has
ruled its actions out. PPO's clip then holds against the policy that acted: a turn the floor drew and that paid may
rise in one update to the probability it was drawn with, not only by the factor 1.2 that leaves it near 0.
"""

from __future__ import annotations

import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from typing import Literal, NamedTuple, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
from gymnasium import spaces
from torch.distributions import Normal

from memory_envs import FlattenObservation
from run_contract import (Progress, Run, RunArgs, UserError, check_flags, clip_action, cue_step, env_kind,
                          finished_episode, make_base_env, make_batched_env, parse_env_kwargs, run_cli,
                          save_attention_png)


@dataclass
class Args(RunArgs):
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    env_kwargs: Optional[tuple[str, ...]] = None
    """keyword arguments for gym.make as key=value pairs [MemoryTask-v0: delay=64 difficulty=1 cue_time=random]"""
    total_timesteps: int = 128_000
    """total timesteps of the experiment"""

    # PPO. `None` takes the domain's default (vector / Atari / continuous actions): --help shows them.
    learning_rate: Optional[float] = None
    """the learning rate of the optimizers"""
    num_envs: Optional[int] = None
    """the number of parallel game environments"""
    num_steps: Optional[int] = None
    """the number of steps to run in each environment per policy rollout"""
    anneal_lr: bool = True
    """toggle learning rate annealing for policy and value networks"""
    gamma: float = 0.99
    """the discount factor gamma"""
    gae_lambda: float = 0.95
    """the lambda for the general advantage estimation"""
    num_minibatches: Optional[int] = None
    """the number of mini-batches"""
    update_epochs: Optional[int] = None
    """the K epochs to update the policy"""
    norm_adv: Optional[bool] = None
    """per-minibatch advantage normalisation (off: most minibatches of a sparse task hold no decision)"""
    clip_coef: Optional[float] = None
    """the surrogate clipping coefficient"""
    clip_vloss: bool = True
    """toggles whether or not to use a clipped loss for the value function"""
    ent_coef: Optional[float] = None
    """coefficient of the entropy"""
    vf_coef: float = 0.5
    """coefficient of the value function"""
    max_grad_norm: float = 0.5
    """the maximum norm for the gradient clipping"""
    target_kl: Optional[float] = None
    """the target KL divergence threshold"""
    normalize: Optional[bool] = None
    """observation normalisation (running mean and std, clipped to +-10)"""
    normalize_reward: Optional[bool] = None
    """reward scaling by the running std of the discounted return"""

    # Memory
    memory_slots: int = 16
    """M: episodic memory slots per environment (cleared at episode start)"""
    persistent_slots: int = 0
    """K: slots that survive episode resets, tagged with their episode's outcome (0 = off)"""
    retention: Literal["learned", "fifo", "random"] = "learned"
    """which entry to evict when the memory is full"""
    recent_slots: int = 0
    """W: learned retention never evicts the W newest entries (a recency window inside the M slots; 0 = off)"""
    score_prior: bool = True
    """the read adds each slot's retention score (what is kept may be worth reading), times a learned gain per head"""
    crelu_obs: bool = True
    """vector observations enter as [relu(x), relu(-x)]: the two signs of a rare large input get unrelated entries"""
    hidden_size: int = 64
    """width of entry embeddings, attention and heads"""
    num_heads: int = 4
    """attention heads of the memory read"""
    explore_visits: Optional[float] = None
    """m of the exploration floor: act uniformly with chance min(1, m / visits of the observation) (0: off; discrete)"""


PRESETS = {
    "vector": dict(learning_rate=1e-3, num_envs=8, num_steps=128, num_minibatches=4, update_epochs=4, clip_coef=0.2,
                   ent_coef=0.0, normalize=True, normalize_reward=True, norm_adv=False, explore_visits=20.0),
    "atari": dict(learning_rate=2.5e-4, num_envs=8, num_steps=128, num_minibatches=4, update_epochs=4, clip_coef=0.1,
                  ent_coef=0.01, normalize=False, normalize_reward=False, norm_adv=True, explore_visits=0.0),
    "continuous": dict(learning_rate=3e-4, num_envs=1, num_steps=2048, num_minibatches=32, update_epochs=10,
                       clip_coef=0.2, ent_coef=0.0, normalize=True, normalize_reward=True, norm_adv=True,
                       explore_visits=0.0),
}
USEFULNESS_TEMPERATURE = 0.1  # relative to the mean error: the votes go to the few entries that explain a step
VOTER_FRACTION = 8  # the rollout's 1/8 steps with the largest |TD error| teach retention; the rest hardly vote


# ---- Environments
def make_env(env_id: str, env_kwargs: dict, kind: str, capture_video: bool = False, video_dir: str = ""):
    def thunk():
        extra = dict(frameskip=1, repeat_action_probability=0.25) if kind == "atari" else {}
        env = make_base_env(env_id, env_kwargs, "rgb_array" if capture_video else None, **extra)
        env = gym.wrappers.RecordEpisodeStatistics(gym.wrappers.RecordVideo(env, video_dir) if capture_video else env)
        if kind == "atari":
            env = gym.wrappers.AtariPreprocessing(env, noop_max=30, frame_skip=4, screen_size=84,
                                                  terminal_on_life_loss=False, grayscale_obs=True)
            env = gym.wrappers.FrameStackObservation(env, 4)
        elif not isinstance(env.observation_space, spaces.Box) or len(env.observation_space.shape) == 2:
            env = FlattenObservation(env)
        return gym.wrappers.ClipAction(env) if kind == "continuous" else env

    return thunk


def make_vector_env(args: Args, env_kwargs: dict, kind: str, num_envs: int, video_dir: str = ""):
    video = args.capture_video and bool(video_dir)
    batched = make_batched_env(args.env_id, env_kwargs, num_envs) if kind == "vector" and not video else None
    if batched is not None:  # the memory tasks as numpy arrays, same results
        return batched
    fns = [make_env(args.env_id, env_kwargs, kind, video and i == 0, video_dir) for i in range(num_envs)]
    return gym.vector.SyncVectorEnv(fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


# ---- Agent
def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    torch.nn.init.orthogonal_(layer.weight, std)
    if layer.bias is not None:
        torch.nn.init.constant_(layer.bias, bias_const)
    return layer


def merge_moments(mean, var, count, batch_mean, batch_var, n):
    """Mean, variance and count of the union of two samples (the parallel algorithm); numpy or torch."""
    delta, total = batch_mean - mean, count + n
    return mean + delta * n / total, (var * count + batch_var * n + delta ** 2 * count * n / total) / total, total


class RunningMeanStd(nn.Module):
    """Running mean/variance; buffers, so they are saved with the model."""

    def __init__(self, shape=()):
        super().__init__()
        self.register_buffer("mean", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("var", torch.ones(shape, dtype=torch.float64))
        self.register_buffer("count", torch.tensor(1e-4, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.double().reshape(-1, *self.mean.shape)
        moments = merge_moments(self.mean, self.var, self.count, x.mean(0), x.var(0, unbiased=False), len(x))
        self.mean, self.var, self.count = moments  # buffers still


def image_encoder(shape: tuple[int, ...]) -> tuple[nn.Module, int, bool]:
    """Nature CNN for images of at least 36x36 pixels, else a 3x3 conv stack; returns it, its width and whether HWC."""
    channels_last = shape[-1] in (1, 3, 4) and shape[0] not in (1, 3, 4)
    c, h, w = (shape[2], shape[0], shape[1]) if channels_last else shape
    if min(h, w) >= 36:
        convs = [layer_init(nn.Conv2d(c, 32, 8, stride=4)), nn.ReLU(), layer_init(nn.Conv2d(32, 64, 4, stride=2)),
                 nn.ReLU(), layer_init(nn.Conv2d(64, 64, 3, stride=1)), nn.ReLU()]
    else:
        convs = [layer_init(nn.Conv2d(c, 16, 3, padding=1)), nn.ReLU(),
                 layer_init(nn.Conv2d(16, 32, 3, stride=2 if min(h, w) >= 8 else 1, padding=1)), nn.ReLU()]
    conv = nn.Sequential(*convs, nn.Flatten())
    n_flat = conv(torch.zeros(1, c, h, w)).shape[1]
    return nn.Sequential(conv, layer_init(nn.Linear(n_flat, 256)), nn.ReLU()), 256, channels_last


TIME_FREQS = (0.5, 1.0, 2.0, 4.0)      # per unit of log(1 + tau): scale-free, any episode length
TIME_PERIODS = (1.0, 10.0, 100.0, 1000.0)  # absolute phase, for counting steps
TIME_DIM = 1 + 2 * len(TIME_FREQS) + 2 * len(TIME_PERIODS)
_TIME_TABLES: dict[torch.device, torch.Tensor] = {}


def time_encoding(tau: torch.Tensor) -> torch.Tensor:
    """Features of the clock tau: log(1 + tau) and its sinusoids (fine early, still in range at 10^5) plus sinusoids
    of tau (periods up to 1000). A table grown by doubling: one gather instead of a dozen elementwise ops."""
    table = _TIME_TABLES.get(tau.device, ())
    need = int(tau.max()) + 1 if tau.numel() else 1
    if len(table) < need:
        size = max(need, 2 * len(table), 1024)
        t = torch.arange(size, dtype=torch.float32, device=tau.device).unsqueeze(-1)
        u, f, p = torch.log1p(t), t.new_tensor(TIME_FREQS), t.new_tensor(TIME_PERIODS)
        table = torch.cat([u / 8.0, torch.sin(u * f), torch.cos(u * f),
                           torch.sin(2 * math.pi * t / p), torch.cos(2 * math.pi * t / p)], -1)
        _TIME_TABLES[tau.device] = table
    return table[tau.long()]


def symlog(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.log1p(x.abs())


class VisitCounter(nn.Module):
    """SimHash pseudo-counts (Tang et al. 2017): the visits of each bucket of ``bits`` signs of random projections."""

    def __init__(self, obs_dim: int, seed: int, device, bits: int = 16, m: float = 0.0):
        super().__init__()
        self.m, self.powers = m, 2 ** torch.arange(bits, device=device)  # m: of the exploration floor
        self.proj = torch.randn((bits, obs_dim), generator=torch.Generator().manual_seed(seed)).to(device)
        self.register_buffer("counts", torch.zeros(2 ** bits, device=device))

    def floor(self, obs: torch.Tensor) -> torch.Tensor:
        """Count one visit of each row of ``obs``; returns each row's floor min(1, m / N), this visit included."""
        code = ((obs.float().flatten(1) @ self.proj.T >= 0).long() * self.powers).sum(1)
        self.counts.index_add_(0, code, torch.ones_like(code, dtype=self.counts.dtype))
        return (self.m / self.counts[code]).clamp(max=1.0)


TAG_DIM = 3  # persistent slots: [1, symlog(return of the entry's episode), log(1 + episodes ago)]


class Votes(NamedTuple):
    """What retention is taught from: B voting steps, and the pool entries each could have held."""
    entries: torch.Tensor   # (N, P, F) features of every env's pool entries (untagged)
    seen: torch.Tensor      # (B, P) the entries of env[b] that step b could have held (its candidates)
    tag: torch.Tensor       # (B, P, 3) the persistent tag each candidate would carry at step b (0: its episode)
    env: torch.Tensor       # (B,) the step's env
    e_step: torch.Tensor    # (B, D) the step's embedding
    action: torch.Tensor    # (B, A) its action (one-hot for discrete actions)
    y: torch.Tensor         # (B,) its TD target

    def of_envs(self, envs: torch.Tensor) -> "Votes":
        pos = torch.full((len(self.entries),), -1, dtype=torch.long, device=envs.device)
        pos[envs] = torch.arange(len(envs), device=envs.device)
        b = torch.nonzero(pos[self.env] >= 0).squeeze(1)
        return Votes(self.entries[envs], self.seen[b], self.tag[b], pos[self.env[b]], self.e_step[b], self.action[b],
                     self.y[b])


class Retention(nn.Module):
    """The retention scorer r(entry) and its teacher, the entry critic c(step, action, entry): module docstring."""

    def __init__(self, d: int, n_content: int, n_act: int, hidden: int = 32):
        super().__init__()
        self.n_env_part = n_content + 1 + TIME_DIM + TAG_DIM
        self.scorer = nn.Sequential(layer_init(nn.Linear(self.n_env_part + n_act + d, hidden)), nn.Tanh(),
                                    layer_init(nn.Linear(hidden, 1), std=0.01))
        # First layer split into a step part and an entry part: a (step, entry) pair costs one add. The output is
        # bilinear in the action, [1, a] . V h, so "reward when the action matches the entry's bit" is linear.
        self.critic_step = layer_init(nn.Linear(d, hidden))
        # Only what the env showed at the entry's step: steps the agent copied a cue into must not share its votes.
        self.critic_entry = layer_init(nn.Linear(self.n_env_part, hidden, bias=False))
        # Small initial outputs: an untrained critic favours no entry, so the first votes weigh nothing.
        self.critic_out = layer_init(nn.Linear(hidden, 1 + n_act), std=0.01)

    @staticmethod
    def features(e, content, tau, prev_act, prev_rew, tag=None) -> torch.Tensor:
        """An entry as retention sees it: what the env showed (content, reward, clock, tag), then the agent's part."""
        tag = e.new_zeros(e.shape[:-1] + (TAG_DIM,)) if tag is None else tag
        return torch.cat([content, prev_rew.unsqueeze(-1), time_encoding(tau), tag, prev_act, e.detach()], -1)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return self.scorer(x).squeeze(-1)

    def loss(self, v: Votes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Entry-critic loss, retention loss and the weights G of the voting steps ``v`` (module docstring). A
        candidate's persistent tag enters both first layers as a per-(step, entry) term."""
        k, tags = self.n_env_part, slice(self.n_env_part - TAG_DIM, self.n_env_part)
        h = self.critic_entry(v.entries[..., :k]).index_select(0, v.env) + v.tag @ self.critic_entry.weight[:, tags].T
        pre = self.scorer[0](v.entries).index_select(0, v.env) + v.tag @ self.scorer[0].weight[:, tags].T
        r = self.scorer[2](torch.tanh(pre)).squeeze(-1)
        out = self.critic_out(torch.tanh(self.critic_step(v.e_step).unsqueeze(1) + h))
        pred = (out * torch.cat([torch.ones_like(v.action[:, :1]), v.action], 1).unsqueeze(1)).sum(-1)
        err, seen = (pred - v.y[:, None]) ** 2, v.seen
        mean_err = (err * seen).sum(1) / seen.sum(1).clamp(min=1)
        with torch.no_grad():
            u = torch.softmax((-err / (USEFULNESS_TEMPERATURE * mean_err[:, None] + 1e-8)).masked_fill(~seen, -1e30), 1)
            gain = (mean_err - (u * err).sum(1)) * seen.any(1)
        ce = -(u * torch.log_softmax(r.masked_fill(~seen, -1e30), 1) * seen).sum(1)
        return mean_err.mean(), (gain * ce).mean(), gain


class Agent(nn.Module):
    def __init__(self, obs_space: spaces.Box, action_space: spaces.Space, args: Args):
        super().__init__()
        d, self.num_heads = args.hidden_size, args.num_heads
        if d % self.num_heads:
            raise UserError(f"--hidden-size {d} must be divisible by --num-heads {self.num_heads}")
        self.continuous, self.image = isinstance(action_space, spaces.Box), len(obs_space.shape) == 3
        self.scale = 255.0 if obs_space.dtype == np.uint8 else 1.0
        self.n_act = n_act = int(np.prod(action_space.shape)) if self.continuous else int(action_space.n)
        self.obs_rms, self._norm_count = RunningMeanStd(obs_space.shape) if args.normalize else None, None
        self.cnn, n_feat, self.channels_last = (image_encoder(obs_space.shape) if self.image else
                                                (None, int(np.prod(obs_space.shape)), False))
        # One network encodes both what is written and what queries.
        self.crelu = args.crelu_obs and not self.image
        self.embed_net = nn.Sequential(layer_init(nn.Linear(n_feat * (1 + self.crelu) + n_act + 1 + TIME_DIM, d)),
                                       nn.Tanh(), layer_init(nn.Linear(d, d)), nn.Tanh())
        self.tag_proj = layer_init(nn.Linear(TAG_DIM, d, bias=False), std=1.0)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (layer_init(nn.Linear(d, d), std=1.0) for _ in range(4))
        # LayerNorm on the read (as after attention in a Transformer): a growing read would saturate the heads' tanh
        self.read_norm = nn.LayerNorm(d)
        self.score_gain = nn.Parameter(torch.ones(self.num_heads)) if args.score_prior else None
        self.actor = nn.Sequential(layer_init(nn.Linear(2 * d, 64)), nn.Tanh(), layer_init(nn.Linear(64, n_act), 0.01))
        self.critic = nn.Sequential(layer_init(nn.Linear(2 * d, 64)), nn.Tanh(), layer_init(nn.Linear(64, 1), 1.0))
        if self.continuous:
            self.actor_logstd = nn.Parameter(torch.zeros(1, n_act))
        n_content = (obs_space.shape[-1 if self.channels_last else 0] * 16) if self.image else n_feat
        self.retention = Retention(d, n_content, n_act)

    def policy_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith("retention.")]

    def normalize_obs(self, x: torch.Tensor) -> torch.Tensor:
        if self.obs_rms is None:
            return x.float() / self.scale
        if self._norm_count != self.obs_rms.count.item():  # statistics move between rollouts only: cache them
            rms, self._norm_count = self.obs_rms, self.obs_rms.count.item()
            self._norm = (rms.mean.float() * self.scale, (rms.var + 1e-8).rsqrt().float() / self.scale)
        return ((x.float() - self._norm[0]) * self._norm[1]).clamp(-10, 10)

    def embed(self, obs, prev_act, prev_rew, tau) -> torch.Tensor:
        """Entry embedding e = Embed(obs, previous action, previous reward, clock)."""
        x = self.normalize_obs(obs)
        if self.image:
            x = self.cnn(x.permute(0, 3, 1, 2) if self.channels_last else x)
        elif self.crelu:  # else the encoder maps a cue of +-10 std (normalised) to two opposite embeddings
            x = torch.cat([F.relu(x), F.relu(-x)], -1)
        return self.embed_net(torch.cat([x.flatten(1), prev_act, prev_rew.unsqueeze(-1), time_encoding(tau)], -1))

    def retention_features(self, e: torch.Tensor, raw: dict, tag: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``Retention.features`` of entries; their content is the normalised observation (images: 4x4 avg-pooled)."""
        x = self.normalize_obs(raw["obs"].flatten(0, raw["tau"].dim() - 1))
        if self.image:
            x = F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2) if self.channels_last else x, 4)
        content = x.flatten(1).view(*raw["tau"].shape, -1)
        return Retention.features(e, content, raw["tau"], raw["pact"], raw["prew"], tag)

    def attend(self, e: torch.Tensor, slots: torch.Tensor, tags: Optional[torch.Tensor], held, score: torch.Tensor):
        """The read, for acting and replay alike: multi-head attention of e (B, D) over ``slots`` (B, S, D), tagged
        ones shifted by their tag, empty ones weighing 0 (--score-prior: plus ``score``). Returns (B, D), (B, H, S)."""
        if tags is not None:
            slots = slots + self.tag_proj(tags)
        split = lambda x: x.view(*x.shape[:-1], self.num_heads, -1)  # noqa: E731
        q = split(self.q_proj(e) / math.sqrt(e.shape[-1] // self.num_heads))        # B H dh
        k, v = split(self.k_proj(slots)), split(self.v_proj(slots))                 # B S H dh
        logits = (q.unsqueeze(1) * k).sum(-1).transpose(1, 2)                      # B H S
        logits = logits if self.score_gain is None else logits + self.score_gain[:, None] * score.unsqueeze(1)
        # A large finite negative (not -inf) keeps all-empty rows finite in the backward pass.
        w = torch.softmax(logits.masked_fill(~held.unsqueeze(1), -1e30), -1) * held.any(-1).float()[:, None, None]
        read = (w.transpose(1, 2).unsqueeze(-1) * v).sum(1).flatten(1)
        return self.read_norm(self.o_proj(read)), w

    def heads(self, e, read, action=None, greedy: bool = False, floor: Optional[torch.Tensor] = None):
        """Action, log-probability, entropy and value on [e, read]. Acting (no ``action``): sample (the mode if
        ``greedy``; with a ``floor`` per row, from (1 - floor) softmax + floor uniform), entropy None. The
        log-probability is always the softmax's: the policy PPO trains."""
        z = torch.cat([e, read], -1)
        out, value, acting = self.actor(z), self.critic(z).squeeze(-1), action is None
        if self.continuous:
            dist = Normal(out, self.actor_logstd.expand_as(out).exp(), validate_args=False)
            action = (out if greedy else dist.sample()) if acting else action
            return action, dist.log_prob(action).sum(1), None if acting else dist.entropy().sum(1), value
        # Categorical's arithmetic written out: its object costs as much as the heads, on every step
        logp = out - out.logsumexp(1, keepdim=True)
        if acting and (greedy or floor is None):
            action = out.argmax(1) if greedy else torch.multinomial(logp.softmax(1), 1, True).view(-1)
        elif acting:  # inverse-CDF sampling: torch.multinomial costs much more per call on CPU
            probs = (1.0 - floor).unsqueeze(-1) * logp.softmax(1) + floor.unsqueeze(-1) / self.n_act
            action = (probs.cumsum(-1) < torch.rand_like(floor).unsqueeze(-1)).sum(-1).clamp(max=self.n_act - 1)
        entropy = None if acting else -(logp.clamp(min=torch.finfo(logp.dtype).min) * logp.softmax(1)).sum(1)
        return action, logp.gather(1, action.long().unsqueeze(1)).squeeze(1), entropy, value

    def action_input(self, action: torch.Tensor) -> torch.Tensor:
        """An action as an input: one-hot for discrete, the (clipped) vector for Box."""
        return action.float().flatten(1) if self.continuous else F.one_hot(action.long(), self.n_act).float()


# ---- Memory: slots and their sources
class Memory:
    """M episodic then K persistent slots per env. A slot holds an entry (raw inputs, embedding, score) and ``src``,
    its source's index in the rollout's pool [S entries held at its start, T steps] (-1: empty), from which the
    update replays every read and retention finds the entries a step held. Also the next entry's inputs."""

    def __init__(self, agent: Agent, n: int, args: Args, obs_space: spaces.Box, device, generator=None):
        self.agent, self.n, self.generator, self.policy, self.w = agent, n, generator, args.retention, args.recent_slots
        self.m, self.k, self.s = args.memory_slots, args.persistent_slots, args.memory_slots + args.persistent_slots
        s, zeros, long = self.s, partial(torch.zeros, device=device), torch.long
        obs_dtype = torch.uint8 if obs_space.dtype == np.uint8 else torch.float32
        self.src = torch.full((n, s), -1, dtype=long, device=device)
        self.entry = dict(obs=zeros((n, s) + obs_space.shape, dtype=obs_dtype), pact=zeros((n, s, agent.n_act)),
                          prew=zeros((n, s)), tau=zeros((n, s), dtype=long))
        self.emb, self.score, self.order = zeros((n, s, args.hidden_size)), zeros((n, s)), zeros((n, s), dtype=long)
        self.outcome, self.episodes_ago = zeros((n, s)), zeros((n, s))  # of persistent entries
        self.prev_act, self.prev_rew, self.clock = zeros((n, agent.n_act)), zeros(n), zeros(n, dtype=long)
        self.ep_return, self.writes = np.zeros(n), 0  # writes: the order FIFO evicts by

    def tags(self) -> torch.Tensor:
        """[persistent, symlog(return of its episode), log(1 + episodes ago)] per slot; 0 for episodic slots."""
        persistent = (torch.arange(self.s, device=self.score.device) >= self.m).float().expand_as(self.score)
        tag = torch.stack([persistent, symlog(self.outcome), torch.log1p(self.episodes_ago)], -1)
        return tag * (self.src >= 0).unsqueeze(-1)

    def act(self, obs: torch.Tensor, greedy: bool = False, floor: Optional[torch.Tensor] = None):
        """Read and act: (action, log-prob, value), the read's weights and the embedding ``write`` stores."""
        e = self.agent.embed(obs, self.prev_act, self.prev_rew, self.clock)
        read, w = self.agent.attend(e, self.emb, self.tags() if self.k else None, self.src >= 0, self.score)
        action, logprob, _, value = self.agent.heads(e, read, greedy=greedy, floor=floor)
        return (action, logprob, value), w, e

    def write(self, e: torch.Tensor, obs: torch.Tensor, pool_index: int) -> torch.Tensor:
        """Store the step's entry; when full, drop the lowest score of the M and the new one, W newest excepted
        (``learned``), the oldest (``fifo``) or a uniform one (``random``). Returns the dropped one's age (-1: none)."""
        m, new = self.m, dict(obs=obs, pact=self.prev_act, prew=self.prev_rew, tau=self.clock)
        score = self.agent.retention.score(self.agent.retention_features(e, new))
        held = self.src[:, :m] >= 0
        ages = self.clock[:, None] - torch.cat([self.entry["tau"][:, :m], self.clock[:, None]], 1)  # the M, the new one
        # the W newest (the new one included) are no candidates: each stays W steps whatever its score
        victim = (torch.cat([self.score[:, :m], score.unsqueeze(1)], 1).masked_fill(ages < self.w, math.inf).argmin(1)
                  if self.policy == "learned" else
                  self.order[:, :m].argmin(1) if self.policy == "fifo" else
                  torch.randint(0, m, (self.n,), generator=self.generator, device=e.device))
        slot = torch.where(held.all(1), victim, (~held).float().argmax(1))
        rows = torch.nonzero(slot < m).squeeze(1)
        slot = slot[rows]
        for k, v in new.items():
            self.entry[k][rows, slot] = v[rows].to(self.entry[k].dtype)  # MuJoCo observations are float64
        self.emb[rows, slot], self.score[rows, slot] = e[rows], score[rows]
        self.src[rows, slot], self.order[rows, slot] = pool_index, self.writes
        self.writes += 1
        return torch.where(held.all(1), ages.gather(1, victim[:, None])[:, 0], -1)

    @torch.inference_mode()
    def step(self, e: torch.Tensor, obs: torch.Tensor, pool_index: int, action: torch.Tensor, reward) -> torch.Tensor:
        """Write the entry, take in the next inputs (action clipped for Box, symlog reward, clock); returns the ages."""
        ages = self.write(e, obs, pool_index)
        self.prev_act = self.agent.action_input(action)
        self.prev_rew = symlog(torch.as_tensor(reward, dtype=torch.float32, device=self.prev_rew.device))
        self.clock, self.ep_return = self.clock + 1, self.ep_return + reward
        return ages

    @torch.inference_mode()
    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.act(obs)[0][2]

    @torch.inference_mode()
    def end_episodes(self, rows: np.ndarray) -> None:
        """Envs ``rows`` ended an episode: all held entries compete for the K persistent slots (by score, write order
        or at random), tagged with the episode's return; then the episodic slots are cleared."""
        for i in rows.tolist() if self.k else []:
            held = torch.nonzero(self.src[i] >= 0).squeeze(1)
            key = {"learned": lambda: self.agent.retention.score(self.agent.retention_features(
                       self.emb[i, held], {k: v[i, held] for k, v in self.entry.items()}, self.tags()[i, held])),
                   "fifo": lambda: self.order[i, held].float(),
                   "random": lambda: torch.rand(len(held), generator=self.generator, device=held.device)}[self.policy]()
            keep = held[key.argsort(descending=True, stable=True)][: self.k]
            dest = torch.arange(self.m, self.m + len(keep), device=keep.device)
            for field in (self.src, self.emb, self.score, self.order, self.outcome, self.episodes_ago,
                          *self.entry.values()):
                kept = field[i, keep].clone()
                field[i, self.m:] = -1 if field is self.src else 0
                field[i, dest] = kept
            self.outcome[i, dest[keep < self.m]] = float(self.ep_return[i])
            self.episodes_ago[i, self.m:] += 1.0
        rows_t = torch.as_tensor(rows, dtype=torch.long, device=self.src.device)
        self.src[rows_t, : self.m] = -1
        self.prev_act[rows_t], self.prev_rew[rows_t], self.clock[rows_t], self.ep_return[rows] = 0.0, 0.0, 0, 0.0

    @torch.inference_mode()
    def begin_rollout(self) -> dict:
        """Re-encode the held entries (pool entries 0..S-1) as the update will; returns their inputs (the carry-in)."""
        self.emb = pool_embed(self.agent, self.entry)
        self.score = self.agent.retention.score(self.agent.retention_features(self.emb, self.entry, self.tags()))
        self.src = torch.where(self.src >= 0, torch.arange(self.s, device=self.src.device).expand(self.n, -1), -1)
        return {k: v.clone() for k, v in self.entry.items()}


# ---- The rollout buffer, returns
class Rollout:
    """(T, N) tensors of a rollout: the entries' inputs, what PPO needs, each step's slot sources, tags and scores."""

    def __init__(self, t: int, n: int, mem: Memory, obs_space: spaces.Box, act_space: spaces.Space, device):
        s, self.tagged, zeros = mem.s, mem.k > 0, partial(torch.zeros, device=device)
        self.obs = zeros((t, n) + obs_space.shape, dtype=mem.entry["obs"].dtype)
        self.actions, self.pact = zeros((t, n) + act_space.shape), zeros((t, n, mem.agent.n_act))
        self.logprobs, self.rewards, self.dones, self.values, self.prew, self.floor, self.ret = (
            zeros((t, n)) for _ in range(7))  # ret: an episode's return, at its last step
        self.tau, self.src = zeros((t, n), dtype=torch.long), zeros((t, n, s), dtype=torch.long)
        self.tag, self.score = zeros((t, n, s, TAG_DIM)), zeros((t, n, s))
        self.inputs = dict(obs=self.obs, pact=self.pact, prew=self.prew, tau=self.tau)  # each step's entry, as written
        # diagnostics only: mean attention, age of the entry dropped (-1: none), the cue's step at episode ends (-1)
        self.attn, self.age, self.cue = zeros((t, n, s)), *(torch.full((t, n), -1, device=device) for _ in range(2))

    def record_inputs(self, step: int, obs: torch.Tensor, mem: Memory) -> None:
        self.obs[step], self.pact[step], self.prew[step], self.tau[step] = obs, mem.prev_act, mem.prev_rew, mem.clock
        self.src[step], self.score[step] = mem.src, mem.score
        if mem.k:
            self.tag[step] = mem.tags()

    @torch.inference_mode()
    def act(self, step: int, obs: torch.Tensor, mem: Memory, counter: Optional[VisitCounter]):
        """Record the step's inputs, read and act; returns the action and the embedding ``Memory.step`` stores."""
        self.record_inputs(step, obs, mem)
        floor = None
        if counter is not None:  # the exploration floor: an observation's first m visits act uniformly, later m / N
            floor = self.floor[step] = counter.floor(obs)
        (action, logprob, value), w, e = mem.act(obs, floor=floor)
        self.attn[step], self.values[step], self.actions[step], self.logprobs[step] = w.mean(1), value, action, logprob
        return action, e

    def record_outcome(self, step: int, reward: torch.Tensor, done: np.ndarray, mem: Memory, info: dict) -> None:
        self.rewards[step], self.dones[step] = reward, torch.as_tensor(done, dtype=torch.float32, device=reward.device)
        self.ret[step] = torch.as_tensor(np.where(done, mem.ep_return, 0.0), dtype=torch.float32, device=reward.device)
        self.cue[step] = torch.tensor([cue_step(info, i) if d else -1 for i, d in enumerate(done)])

    def ratio_max(self, clip: float, n_act: int) -> torch.Tensor:
        """PPO's upper ratio bound per step: 1 + clip, or (1 + clip) x acting / policy probability if larger."""
        f, logp = self.floor.reshape(-1), self.logprobs.reshape(-1)
        acted = torch.where(f > 0, (1 - f) + f * (-logp).exp() / n_act, torch.ones_like(f))  # behaviour / policy
        return (1 + clip) * acted.clamp(min=1.0)

    def pool(self, carry: dict) -> dict:
        """The rollout's pool per env, [S carried entries, T steps]: a slot's source indexes it."""
        return {k: torch.cat([carry[k], v.transpose(0, 1)], 1) for k, v in self.inputs.items()}

    def episode_ids(self) -> torch.Tensor:
        """(T, N): which episode of its env each step belongs to (0 = the one running at the rollout's start)."""
        return torch.cumsum((self.tau == 0).long(), 0)

    def episode_returns(self) -> torch.Tensor:
        """(N, T): the return of each step's episode, recorded where it ended (0 if it runs on after the rollout)."""
        pos = torch.arange(len(self.tau), device=self.tau.device).expand_as(self.tau.T)
        end_at = torch.where(self.dones.T > 0, pos, len(self.tau)).flip(1).cummin(1).values.flip(1)
        return torch.cat([self.ret.T, self.ret.new_zeros(len(pos), 1)], 1).gather(1, end_at)


class RewardScaler:
    """Divide rewards by the running std of the discounted return (as NormalizeReward), in numpy: it runs every step."""

    def __init__(self, num_envs: int, gamma: float):
        self.gamma, self.returns, self.mean, self.var, self.count = gamma, np.zeros(num_envs), 0.0, 1.0, 1e-4

    def scale(self) -> float:
        return math.sqrt(self.var + 1e-8)

    def __call__(self, rewards: np.ndarray, dones: np.ndarray) -> np.ndarray:
        r = self.returns = self.returns * self.gamma + rewards
        self.mean, self.var, self.count = merge_moments(self.mean, self.var, self.count, r.mean(), r.var(), len(r))
        self.returns[dones] = 0.0
        return np.clip(rewards / self.scale(), -10, 10)

    def state_dict(self) -> dict:
        return dict(mean=self.mean, var=self.var, count=self.count)

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


def td_targets(rewards, values, dones, last_value, gamma: float) -> torch.Tensor:
    """One-step TD targets r_t + gamma V(s_t+1) over (T, N), cut where an episode ended with action t (truncated:
    ``rewards[t]`` holds gamma V(final)). What retention explains: a reward stays on the action that earned it."""
    return rewards + gamma * torch.cat([values[1:], last_value.unsqueeze(0)]) * (1.0 - dones)


def compute_gae(td_errors, dones, gamma: float, lam: float) -> torch.Tensor:
    """GAE over (T, N): the (gamma lambda)-discounted sum of the TD errors to the episode's end."""
    advantages, last_gae = torch.zeros_like(td_errors), torch.zeros_like(td_errors[0])
    for t in reversed(range(td_errors.shape[0])):
        advantages[t] = last_gae = td_errors[t] + gamma * lam * (1.0 - dones[t]) * last_gae
    return advantages


# ---- Update: replaying the reads, teaching retention
def pool_embed(agent: Agent, pool: dict) -> torch.Tensor:
    """Embeddings (N, P, D) of every pool entry with the current parameters."""
    return agent.embed(*(pool[k].flatten(0, 1) for k in ("obs", "pact", "prew", "tau"))).view(*pool["tau"].shape, -1)


def replay(agent: Agent, pool_e: torch.Tensor, ro: Rollout, t_idx: torch.Tensor, i_idx: torch.Tensor):
    """Replay the reads of steps (t_idx, i_idx) from their recorded sources with acting's ``attend``: e, read, w."""
    src, p, flat = ro.src[t_idx, i_idx], pool_e.shape[1], pool_e.flatten(0, 1)
    e = flat.index_select(0, i_idx * p + src.shape[1] + t_idx)
    slots = flat.index_select(0, (i_idx.unsqueeze(1) * p + src.clamp(min=0)).reshape(-1)).view(*src.shape, -1)
    return e, *agent.attend(e, slots, ro.tag[t_idx, i_idx] if ro.tagged else None, src >= 0, ro.score[t_idx, i_idx])


@torch.no_grad()
def retention_votes(agent: Agent, pool: dict, ro: Rollout, voters: torch.Tensor, y: torch.Tensor) -> Votes:
    """What critic and scorer see for the voting steps (flat t * N + i, TD targets ``y``) over the rollout's pool
    [S carried entries, T steps]. A step's candidates are the entries it could have held: the earlier steps of its
    episode in the rollout, kept or evicted, the carried entries its slots still hold (with the tags they carry) and,
    with persistent slots, the rollout's earlier episodes, tagged as they would be."""
    n, p = pool["tau"].shape
    t_idx, i_idx = voters // n, voters % n
    s, e, ep_ids = p - ro.tau.shape[0], pool_embed(agent, pool), ro.episode_ids()
    tau_q, ep_q = ro.tau[t_idx, i_idx], ep_ids[t_idx, i_idx]
    ep = torch.cat([torch.full((n, s), -10 ** 9, device=ep_ids.device), ep_ids.T], 1)[i_idx]  # B P (carried: none)
    own = (ep == ep_q[:, None]) & (pool["tau"][i_idx] < tau_q[:, None])
    before = (ep < ep_q[:, None]) & (ep >= 0) & ro.tagged
    lag = (ep_q[:, None] - ep).clamp(min=0).float()
    ret = torch.cat([torch.zeros((n, s), device=ep.device), ro.episode_returns()], 1)[i_idx]
    tag = torch.stack([before.float(), symlog(ret), torch.log1p(lag)], -1) * before.unsqueeze(-1)
    src = ro.src[t_idx, i_idx]
    held = torch.where((src >= 0) & (src < s), src, s)  # the carried entry each slot holds (s: none)
    own[:, :s] |= torch.zeros_like(own[:, :s + 1]).scatter_(1, held, True)[:, :s]
    if ro.tagged:
        tag[:, :s] = tag.new_zeros(len(held), s + 1, TAG_DIM).scatter_(
            1, held.unsqueeze(-1).expand(-1, -1, TAG_DIM), ro.tag[t_idx, i_idx])[:, :s]
    return Votes(agent.retention_features(e, pool), own | before, tag, i_idx, e[i_idx, s + t_idx],
                 agent.action_input(ro.actions[t_idx, i_idx]), y)


def train_retention(agent: Agent, optimizer: optim.Optimizer, votes: Votes, args: Args, stats: dict) -> torch.Tensor:
    """``update_epochs`` passes in minibatches of whole envs (each needs only its pool); returns the last pass's G."""
    n, gains = len(votes.entries), []
    for epoch in range(args.update_epochs):
        for envs in torch.randperm(n, device=votes.env.device).chunk(min(n, args.num_minibatches)):
            chunk = votes.of_envs(envs)
            if not len(chunk.y):
                continue
            critic_loss, ret_loss, gain = agent.retention.loss(chunk)
            optimizer.zero_grad()
            (critic_loss + ret_loss).backward()
            nn.utils.clip_grad_norm_(agent.retention.parameters(), args.max_grad_norm)
            optimizer.step()
            stats["retention_loss"].append(ret_loss.item())
            stats["entry_critic_loss"].append(critic_loss.item())
            if epoch == args.update_epochs - 1:
                gains.append(gain)
    return torch.cat(gains)


# ---- Evaluation and diagnostics (off the algorithm's path)
@torch.no_grad()
def evaluate(agent: Agent, args: Args, env_kwargs: dict, kind: str, video_dir: str = "") -> tuple[dict, tuple]:
    """Greedy evaluation of ``--eval-episodes`` on fresh envs (memory carried as in training), env 0's first attention
    map and, at each episode's end, is the cue held (``cue_in_memory``) and read by its top head (``cue_attention``)."""
    device, n_envs = next(agent.parameters()).device, max(1, min(args.eval_episodes, 8))
    left = np.array([args.eval_episodes // n_envs + (i < args.eval_episodes % n_envs) for i in range(n_envs)])
    envs = make_vector_env(args, env_kwargs, kind, n_envs, video_dir)
    mem = Memory(agent, n_envs, args, envs.single_observation_space, device,
                 torch.Generator(device=device).manual_seed(args.seed + 100_000))
    obs, _ = envs.reset(seed=[args.seed + 100_000 + i for i in range(n_envs)])
    log, reads, first_done, m = defaultdict(list), [], False, mem.m
    while left.any():
        obs_t = torch.as_tensor(obs, device=device)
        (action, _, _), w, e = mem.act(obs_t, greedy=True)
        held = mem.src[:, :m] >= 0
        read_tau = torch.where(held, mem.entry["tau"][:, :m], -1)  # clocks of the entries read now
        if not first_done:
            reads.append((read_tau[0][held[0]].cpu().numpy(), w[0].mean(0)[:m][held[0]].cpu().numpy()))
        obs, reward, term, trunc, info = envs.step(action.cpu().numpy())
        mem.step(e, obs_t, 0, clip_action(action, envs.single_action_space), reward)
        done = np.flatnonzero(term | trunc)
        first_done = first_done or 0 in done
        for i in done[left[done] > 0]:
            ep_r, _, success = finished_episode(info, i)
            log["mean_return"].append(ep_r)
            log["success_rate"] += [] if success is None else [float(success)]
            cue, left[i] = cue_step(info, i), left[i] - 1
            if cue >= 0:
                log["cue_in_memory"].append(float((read_tau[i] == cue).any()))
                log["cue_attention"].append(float((w[i, :, :m] * (read_tau[i] == cue)).sum(-1).max()))
        mem.end_episodes(done)
    envs.close()
    mean = lambda x: float(np.mean(x)) if x else None  # noqa: E731
    summary = {key: mean(log[key]) for key in ("mean_return", "success_rate", "cue_in_memory", "cue_attention")}
    return dict(summary, std_return=float(np.std(log["mean_return"]))), attention_map(reads)


def attention_map(reads: list) -> tuple[np.ndarray, int]:
    """Decision step x source step of one episode's reads (clocks read, weights) in at most 512 x 512 bins: drawing
    must not cost more memory than the agent. Returns the map and the episode's length."""
    steps, bins = len(reads), min(len(reads), 512)
    mat = np.zeros((bins, bins), np.float32)
    for t, (taus, weights) in enumerate(reads):
        np.add.at(mat[t * bins // steps], taus * bins // steps, weights)
    return mat, steps


def memory_scalars(ro: Rollout, pool: dict, m: int) -> dict:
    """memory/*: ages of dropped entries, the cue (if reported) held at episode ends, attention entropy, occupancy."""
    out, dropped, (t, i) = {}, ro.age >= 0, torch.nonzero(ro.cue >= 0, as_tuple=True)
    if dropped.any():
        out["mean_age_evicted"] = float(ro.age[dropped].sum()) / int(dropped.sum())
    if len(t):
        src = ro.src[t, i, :m]
        held_cue = (pool["tau"][i[:, None], src.clamp(min=0)] == ro.cue[t, i, None]) & (src >= 0)
        out["cue_in_memory_at_decision"] = int(held_cue.any(1).sum()) / len(t)
    held = (ro.src >= 0).any(-1)
    if held.any():
        out["attention_entropy"] = (-(ro.attn * torch.log(ro.attn.clamp(min=1e-12))).sum(-1))[held].mean().item()
    out["occupancy"] = (ro.src >= 0).float().sum(-1).mean().item()
    return out


# ---- Training
def configure(args: Args) -> tuple[Run, Args, dict, str]:
    """The run, its arguments, the env's keyword arguments and its kind; the ``None`` flags get the kind's preset."""
    run = Run(args, Args)
    args = run.args  # a resumed or evaluated run's own (saved) arguments
    if args.env_kwargs is None:  # the main job: a randomly timed cue, 64 steps against 16 slots
        args.env_kwargs = ("delay=64", "difficulty=1", "cue_time=random") if args.env_id == "MemoryTask-v0" else ()
    env_kwargs = parse_env_kwargs(args.env_kwargs)
    kind = env_kind(args.env_id, env_kwargs)
    vars(args).update({key: value for key, value in PRESETS[kind].items() if getattr(args, key) is None})
    if args.explore_visits > 0 and kind == "continuous":
        raise UserError(f"--explore-visits needs discrete actions; {args.env_id} has Box actions")
    if args.recent_slots > args.memory_slots:
        raise UserError(f"--recent-slots {args.recent_slots} must be <= --memory-slots {args.memory_slots}")
    check_flags(args, at_least_one=("memory_slots", "hidden_size", "num_heads"), batch=args.num_envs * args.num_steps,
                non_negative=("persistent_slots", "explore_visits", "recent_slots"))
    return run, args, env_kwargs, kind


def main(args: Args) -> None:
    run, args, env_kwargs, kind = configure(args)
    T, N, batch_size = args.num_steps, args.num_envs, args.num_steps * args.num_envs
    minibatch_size, num_iterations = batch_size // args.num_minibatches, run.iterations(batch_size)
    device = run.start()

    envs = make_vector_env(args, env_kwargs, kind, N, "" if args.evaluate else os.path.join(run.dir, "videos"))
    obs_space, act_space = envs.single_observation_space, envs.single_action_space
    agent = Agent(obs_space, act_space, args).to(device)
    policy_params = agent.policy_parameters()
    # fused: one kernel for all parameters (same update rule, faster on CPU with many small tensors)
    optimizer = optim.Adam(policy_params, lr=args.learning_rate, eps=1e-5, fused=True)
    ret_optimizer = optim.Adam(agent.retention.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)
    counter = (VisitCounter(int(np.prod(obs_space.shape)), args.seed, device, m=args.explore_visits)
               if args.explore_visits > 0 else None)
    reward_scaler = RewardScaler(N, args.gamma) if args.normalize_reward else None
    # what a checkpoint holds besides the agent (None: off in this run)
    parts = dict(optimizer=optimizer, ret_optimizer=ret_optimizer, visit_counts=counter, reward_rms=reward_scaler)
    run.load_network(agent)
    if args.evaluate:
        return finish(run, agent, env_kwargs, kind, dict(global_step=run.state.get("global_step", 0)))
    run.resume(parts, " (memory contents start empty)")
    writer, global_step = run.writer, run.global_step

    mem = Memory(agent, N, args, obs_space, device)
    ro = Rollout(T, N, mem, obs_space, act_space, device)
    next_obs = torch.as_tensor(envs.reset(seed=args.seed + run.start_iteration - 1)[0], device=device)
    progress, start_step, last_ckpt = Progress(args.total_timesteps), global_step, time.time()
    for iteration in range(run.start_iteration, num_iterations + 1):
        if args.anneal_lr:
            for opt in (optimizer, ret_optimizer):
                opt.param_groups[0]["lr"] = (1.0 - (iteration - 1.0) / num_iterations) * args.learning_rate

        carry = mem.begin_rollout()
        for step in range(T):
            global_step += N
            action, e = ro.act(step, next_obs, mem, counter)
            next_obs_np, reward, term, trunc, info = envs.step(action.cpu().numpy())
            if not np.isfinite(reward).all():  # it would enter the memory before any loss could catch it
                raise run.diverged("non-finite reward", global_step)
            done = term | trunc
            ro.age[step] = mem.step(e, ro.obs[step], mem.s + step, clip_action(action, act_space), reward)
            reward = np.sign(reward) if kind == "atari" else reward
            reward = reward_scaler(reward, done) if reward_scaler is not None else reward
            reward = torch.as_tensor(reward, dtype=torch.float32, device=device)
            # Truncation is not termination: bootstrap with V(final obs), read from the memory holding the last entry.
            cut = np.flatnonzero(trunc & ~term)
            if len(cut):
                final = next_obs_np.copy()
                final[cut] = np.stack(info["final_obs"][cut])
                reward[cut] += args.gamma * mem.value(torch.as_tensor(final, device=device))[cut]
            ro.record_outcome(step, reward, done, mem, info)
            progress.log(writer, info, done, global_step)
            if done.any():
                mem.end_episodes(np.flatnonzero(done))
            next_obs = torch.as_tensor(next_obs_np, device=device)

        last_value = mem.value(next_obs)
        y = td_targets(ro.rewards, ro.values, ro.dones, last_value, args.gamma)
        advantages = compute_gae(y - ro.values, ro.dones, args.gamma, args.gae_lambda)
        b_returns, b_adv, b_values = (advantages + ro.values).reshape(-1), advantages.reshape(-1), ro.values.reshape(-1)
        b_y, b_td_error = y.reshape(-1), (y - ro.values).reshape(-1)
        b_actions, b_logprobs = ro.actions.flatten(0, 1), ro.logprobs.reshape(-1)  # (the heads take float actions)
        b_ratio_max = ro.ratio_max(args.clip_coef, agent.n_act)
        pool = ro.pool(carry)
        stats, vote_stats = defaultdict(list), {}  # losses/*, memory/vote_*
        if args.retention == "learned":
            # The steps the critic found most surprising vote; each is weighted by its gain G (module docstring).
            voters = b_td_error.abs().topk(max(1, batch_size // VOTER_FRACTION)).indices
            # The critic explains TD targets in the env's own reward units, which stay put while the reward scale moves.
            y = b_y[voters] * (reward_scaler.scale() if reward_scaler is not None else 1.0)
            gain = train_retention(agent, ret_optimizer, retention_votes(agent, pool, ro, voters, y), args, stats)
            vote_stats = dict(vote_gain_mean=gain.mean().item(), vote_gain_max=gain.max().item())
            if not np.isfinite(stats["retention_loss"] + stats["entry_critic_loss"]).all():
                raise run.diverged("non-finite retention loss", global_step)
        b_inds = np.arange(batch_size)
        for epoch in range(args.update_epochs):
            np.random.shuffle(b_inds)
            for start in range(0, batch_size, minibatch_size):
                mb = torch.as_tensor(b_inds[start:start + minibatch_size], device=device)
                e, read, _ = replay(agent, pool_embed(agent, pool), ro, mb // N, mb % N)
                _, newlogprob, entropy, newvalue = agent.heads(e, read, b_actions[mb])
                logratio = newlogprob - b_logprobs[mb]
                if epoch == 0 and start == 0:  # before any gradient step the update reproduces the rollout exactly
                    replay_error = max(logratio.abs().max().item(), (newvalue - b_values[mb]).abs().max().item())
                ratio = logratio.exp()
                with torch.no_grad():
                    old_approx_kl, approx_kl = (-logratio).mean(), ((ratio - 1) - logratio).mean()
                    clipfrac = ((ratio - 1.0).abs() > args.clip_coef).float().mean()
                mb_adv = b_adv[mb]
                if args.norm_adv:
                    mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
                clipped = torch.minimum(ratio.clamp(min=1 - args.clip_coef), b_ratio_max[mb])
                pg_loss = torch.max(-mb_adv * ratio, -mb_adv * clipped).mean()
                v_loss = (newvalue - b_returns[mb]) ** 2
                if args.clip_vloss:
                    v_clipped = b_values[mb] + torch.clamp(newvalue - b_values[mb], -args.clip_coef, args.clip_coef)
                    v_loss = torch.max(v_loss, (v_clipped - b_returns[mb]) ** 2)
                v_loss, entropy_loss = 0.5 * v_loss.mean(), entropy.mean()
                loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef
                if not torch.isfinite(loss):
                    raise run.diverged(f"non-finite loss ({loss.item()})", global_step)
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(policy_params, args.max_grad_norm)
                optimizer.step()
                for k, v in (("policy_loss", pg_loss), ("value_loss", v_loss), ("entropy", entropy_loss),
                             ("old_approx_kl", old_approx_kl), ("approx_kl", approx_kl), ("clipfrac", clipfrac)):
                    stats[k].append(v.item())
            if args.target_kl is not None and approx_kl > args.target_kl:
                break
        if agent.obs_rms is not None:  # statistics change between rollouts, never inside one (exact replay)
            agent.obs_rms.update(ro.obs.float())

        y_pred, y_true = b_values.cpu().numpy(), b_returns.cpu().numpy()
        explained_var = np.nan if np.var(y_true) == 0 else 1 - np.var(y_true - y_pred) / np.var(y_true)
        sps = (global_step - start_step) / (time.time() - run.start_time)
        scalars = {"charts/learning_rate": optimizer.param_groups[0]["lr"], "charts/SPS": sps,
                   "losses/explained_variance": explained_var, "debug/replay_max_error": replay_error,
                   **{f"losses/{k}": float(np.mean(v)) for k, v in stats.items() if v},
                   **{f"memory/{k}": v for k, v in dict(memory_scalars(ro, pool, mem.m), **vote_stats).items()},
                   **({"intrinsic/explore_floor_mean": ro.floor.mean().item()} if counter is not None else {})}
        for key, value in scalars.items():
            writer.add_scalar(key, value, global_step)
        progress.maybe_print(global_step, sps, force=iteration == num_iterations)
        if run.due(last_ckpt, iteration == num_iterations):
            run.save(iteration, global_step, agent=agent, **parts)
            last_ckpt = time.time()
    envs.close()

    run.save_model(agent=agent.state_dict(), global_step=global_step)  # with --save-model
    finish(run, agent, env_kwargs, kind, dict(global_step=global_step, wall_time_s=run.wall_time(),
                                              sps=(global_step - start_step) / max(time.time() - run.start_time, 1e-9)))


def finish(run: Run, agent: Agent, env_kwargs: dict, kind: str, record: dict) -> None:
    """Evaluate (the trained agent, or the one --evaluate loaded), draw attention.png, write eval.json."""
    record = dict(record, mean_return=None, std_return=None, success_rate=None, cue_in_memory=None, cue_attention=None)
    if run.args.eval_episodes > 0:
        agent.eval()
        video = os.path.join(run.dir, "videos") if run.args.evaluate and run.args.capture_video else ""
        result, picture = evaluate(agent, run.args, env_kwargs, kind, video)
        record.update(result)
        save_attention_png(*picture, os.path.join(run.dir, "attention.png"))
    run.finish(record)


if __name__ == "__main__":
    run_cli(main, Args, PRESETS)
