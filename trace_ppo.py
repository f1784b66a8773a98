"""Strategic Memory agent: PPO with a slot memory whose retention is learned from what entries hold.

One file, CleanRL style, diffable against ppo_baseline.py. Design, ablations and measurements:
docs/trace_ppo.md.

Read, act, write
  Every step the agent READS its memory, acts, then WRITES one entry, the embedding
  e_t = Embed(obs_t, previous action, previous reward, tau_t) of the step (tau_t: the agent's own
  clock, steps since its episode began). The read is multi-head attention from a query made of e_t
  over the occupied slots, and actor and critic see [e_t, read_t]. There is no recurrent state:
  whatever the agent remembers, it remembers through its slots.
  There are M episodic slots, cleared when an episode starts, and optionally K persistent slots that
  survive resets. When the M slots are full, the new entry and the M stored ones compete and the one
  with the lowest retention score r(entry) is dropped (--retention fifo / random for the controls),
  so acting costs O(M) per step however long the episode is.

What retention is trained on, and why it works
  r sees an entry's content only (embedding, clock, previous action and reward, persistent tag),
  never its slot or write order. It is taught in hindsight by an ENTRY CRITIC that may look at
  every earlier step of the episode, kept or evicted: each env keeps its current episode's raw
  inputs (a few KB), re-encoded at every update. The critic c(step q, action a_q, entry j) predicts
  q's one-step TD target y_q = r_q + gamma V(s_q+1) from the ONE entry j and is fit on every pair.
  An entry that decides the outcome (the cue of a decision) predicts it with a small error, the
  others all with about the same larger one. Each step q then votes for the entries that predict
  it best: softmax(r) over q's entries is pulled by cross-entropy towards
      u_qj = softmax_j(-err_qj / (0.1 mean_j err_qj)),
  weighted by how much those entries beat the average one, G_q = mean_j err_qj - sum_j u_qj err_qj.
  A step that no entry explains better than another (value noise, or a task already solved)
  weighs nothing, so it can neither teach "keep the earliest entries" nor erode a kept cue. The
  scorer and the critic read detached embeddings and have their own optimizer: retention never
  shapes what the policy reads.

Training the read, exactly replayed
  The rollout records, at every step, which source each slot holds; the update re-encodes the
  sources with the current parameters and replays every read at once, so the first epoch
  reproduces the rollout's log-probabilities and values exactly and PPO's gradient reaches the
  attention and the encoder. Two dense auxiliary losses help the read find what is kept: an
  action-value head Q(e, read, a) -> y_q, and reconstructing a random slot's observation from the
  read and that slot's clock.

PPO for one decision in a thousand steps (vector preset): no per-minibatch advantage
normalisation, no entropy bonus, learning rate 1e-3, and a count-based exploration floor: in an
observation seen N times the behaviour policy acts uniformly with probability min(1, m / N)
(SimHash counts), so a rare input -- a T-maze junction -- is tried although the softmax has
already ruled its actions out; PPO trains the softmax on those samples.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Literal, NamedTuple, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
from gymnasium import spaces
from torch.distributions import Categorical, Normal
from torch.utils.tensorboard import SummaryWriter

import memory_envs  # noqa: F401  (registers the memory environments)
from memory_envs import (FlattenObservation, finished_episode, Progress, TrainingDiverged, UserError, check_spaces,
                         default_run_name, is_atari, make_base_env, parse_env_kwargs, resolve_resume,
                         run_cli, save_atomic, write_eval_json)


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    env_id: str = "MemoryTask-v0"
    """any registered gymnasium id, also `module:EnvId` and `ALE/...`"""
    env_kwargs: tuple[str, ...] = ()
    """keyword arguments for gym.make as key=value pairs, values parsed as Python literals"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda is used when available"""
    threads: int = 1
    """torch CPU threads (one per run is best when several runs share the cores)"""
    track: bool = False
    """if toggled, the run is tracked with Weights and Biases (needs `pip install wandb`)"""
    wandb_project_name: str = "memory-ppo"
    """the wandb project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of the wandb project"""
    capture_video: bool = False
    """if toggled, videos of the first training env are saved to runs/<run-name>/videos"""
    save_model: bool = False
    """if toggled, the final model (with its normalisation statistics) is saved as model.pt"""
    resume: Optional[str] = None
    """checkpoint file, run directory or run name to continue; its saved arguments are used"""
    run_name: Optional[str] = None
    """name of the run directory under runs/ (default: {env}__{exp_name}__{seed}__{time})"""
    eval_episodes: int = 100
    """episodes of greedy evaluation on fresh seeded envs after training (0 to skip)"""
    checkpoint_interval: float = 60.0
    """seconds between checkpoints (runs/<run-name>/checkpoint.pt); 0 = after every update"""

    # PPO. `None` means the domain default given in brackets: [vector / Atari / continuous actions].
    total_timesteps: int = 500_000
    """total timesteps of the experiment"""
    learning_rate: Optional[float] = None
    """the learning rate of the optimizers [1e-3 / 2.5e-4 / 3e-4]"""
    num_envs: Optional[int] = None
    """the number of parallel game environments [8 / 8 / 1]"""
    num_steps: Optional[int] = None
    """the number of steps to run in each environment per policy rollout [128 / 128 / 2048]"""
    anneal_lr: bool = True
    """toggle learning rate annealing for policy and value networks"""
    gamma: float = 0.99
    """the discount factor gamma"""
    gae_lambda: float = 0.95
    """the lambda for the general advantage estimation"""
    num_minibatches: Optional[int] = None
    """the number of mini-batches [4 / 4 / 32]"""
    update_epochs: Optional[int] = None
    """the K epochs to update the policy [4 / 4 / 10]"""
    norm_adv: Optional[bool] = None
    """per-minibatch advantage normalisation [off / on / on] (off: most minibatches of a sparse task hold no decision)"""
    clip_coef: Optional[float] = None
    """the surrogate clipping coefficient [0.2 / 0.1 / 0.2]"""
    clip_vloss: bool = True
    """toggles whether or not to use a clipped loss for the value function"""
    ent_coef: Optional[float] = None
    """coefficient of the entropy [0.0 / 0.01 / 0.0]"""
    vf_coef: float = 0.5
    """coefficient of the value function"""
    max_grad_norm: float = 0.5
    """the maximum norm for the gradient clipping"""
    target_kl: Optional[float] = None
    """the target KL divergence threshold"""
    normalize: Optional[bool] = None
    """observation normalisation (running mean and std, clipped to +-10) [on / off / on]"""
    normalize_reward: Optional[bool] = None
    """reward scaling by the running std of the discounted return [on / off / on]"""

    # Memory
    memory_slots: int = 16
    """M: episodic memory slots per environment (cleared at episode start)"""
    persistent_slots: int = 0
    """K: slots that survive episode resets, tagged with their episode's outcome (0 = off)"""
    retention: Literal["learned", "fifo", "random"] = "learned"
    """which entry to evict when the memory is full"""
    hidden_size: int = 64
    """width of entry embeddings, attention and heads"""
    num_heads: int = 4
    """attention heads of the memory read"""
    teacher_window: Optional[int] = None
    """how many of the current episode's latest steps the entry critic may look back at [4096 / 128 / 4096]"""
    action_value_coef: float = 0.5
    """coefficient of the auxiliary action-value head Q(e, read, a) -> TD target (0 = off)"""
    aux_recon_coef: Optional[float] = None
    """coefficient of reconstructing a random slot's observation from the read (0 = off) [1.0 / 0.0 / 0.0]"""
    explore_visits: Optional[float] = None
    """m of the exploration floor: act uniformly with probability min(1, m / visits of the observation)
    (0 = off; discrete actions) [20 / 0 / 0]"""
    heatmap_interval: int = 25
    """updates between attention heatmaps written to TensorBoard (0 = never)"""


PRESETS = {
    "vector": dict(learning_rate=1e-3, num_envs=8, num_steps=128, num_minibatches=4, update_epochs=4, clip_coef=0.2,
                   ent_coef=0.0, normalize=True, normalize_reward=True, norm_adv=False, aux_recon_coef=1.0, explore_visits=20.0,
                   teacher_window=4096),
    "atari": dict(learning_rate=2.5e-4, num_envs=8, num_steps=128, num_minibatches=4, update_epochs=4, clip_coef=0.1,
                  ent_coef=0.01, normalize=False, normalize_reward=False, norm_adv=True, aux_recon_coef=0.0, explore_visits=0.0,
                  teacher_window=128),
    "continuous": dict(learning_rate=3e-4, num_envs=1, num_steps=2048, num_minibatches=32, update_epochs=10,
                       clip_coef=0.2, ent_coef=0.0, normalize=True, normalize_reward=True, norm_adv=True, aux_recon_coef=0.0,
                       explore_visits=0.0, teacher_window=4096),
}
USEFULNESS_TEMPERATURE = 0.1  # relative to the mean error: the votes go to the few entries that explain a step
VOTER_FRACTION = 8  # the rollout's 1/8 steps with the largest |TD error| teach retention; the rest hardly vote


# ---------------------------------------------------------------------------------------
# Environments
# ---------------------------------------------------------------------------------------
def env_kind(env_id: str, probe: gym.Env) -> str:
    if is_atari(env_id):
        return "atari"
    return "continuous" if isinstance(probe.action_space, spaces.Box) else "vector"


def make_env(env_id: str, env_kwargs: dict, kind: str, capture_video: bool = False,
             video_dir: str = ""):
    def thunk():
        extra = dict(frameskip=1, repeat_action_probability=0.25) if kind == "atari" else {}
        env = make_base_env(env_id, env_kwargs, "rgb_array" if capture_video else None, **extra)
        if capture_video:
            env = gym.wrappers.RecordVideo(env, video_dir)
        env = gym.wrappers.RecordEpisodeStatistics(env)
        if kind == "atari":
            env = gym.wrappers.AtariPreprocessing(env, noop_max=30, frame_skip=4, screen_size=84,
                                                  terminal_on_life_loss=False, grayscale_obs=True)
            env = gym.wrappers.FrameStackObservation(env, 4)
        elif not isinstance(env.observation_space, spaces.Box) or len(env.observation_space.shape) == 2:
            env = FlattenObservation(env)
        if kind == "continuous":
            env = gym.wrappers.ClipAction(env)
        return env

    return thunk


def make_vector_env(args: Args, env_kwargs: dict, kind: str, num_envs: int, video_dir: str = ""):
    fns = [make_env(args.env_id, env_kwargs, kind, args.capture_video and i == 0 and bool(video_dir),
                    video_dir) for i in range(num_envs)]
    return gym.vector.SyncVectorEnv(fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


# ---------------------------------------------------------------------------------------
# Agent
# ---------------------------------------------------------------------------------------
def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    torch.nn.init.orthogonal_(layer.weight, std)
    if layer.bias is not None:
        torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class RunningMeanStd(nn.Module):
    """Running mean/variance (parallel algorithm); buffers, so they are saved with the model."""

    def __init__(self, shape=()):
        super().__init__()
        self.register_buffer("mean", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("var", torch.ones(shape, dtype=torch.float64))
        self.register_buffer("count", torch.tensor(1e-4, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.double().reshape(-1, *self.mean.shape)
        batch_mean, batch_var, n = x.mean(0), x.var(0, unbiased=False), x.shape[0]
        delta, total = batch_mean - self.mean, self.count + n
        self.mean += delta * n / total
        m2 = self.var * self.count + batch_var * n + delta.pow(2) * self.count * n / total
        self.var.copy_(m2 / total)
        self.count.copy_(total)


def is_image(space: spaces.Space) -> bool:
    return isinstance(space, spaces.Box) and len(space.shape) == 3


def image_encoder(shape: tuple[int, ...]) -> tuple[nn.Module, int, bool]:
    """Nature CNN for images of at least 36x36 pixels, a 3x3 conv stack for smaller ones.

    Returns the encoder, its output size and whether input is channels-last (HWC).
    """
    channels_last = shape[-1] in (1, 3, 4) and shape[0] not in (1, 3, 4)
    c, h, w = (shape[2], shape[0], shape[1]) if channels_last else shape
    if min(h, w) >= 36:
        convs = [layer_init(nn.Conv2d(c, 32, 8, stride=4)), nn.ReLU(),
                 layer_init(nn.Conv2d(32, 64, 4, stride=2)), nn.ReLU(),
                 layer_init(nn.Conv2d(64, 64, 3, stride=1)), nn.ReLU()]
    else:
        convs = [layer_init(nn.Conv2d(c, 16, 3, padding=1)), nn.ReLU(),
                 layer_init(nn.Conv2d(16, 32, 3, stride=2 if min(h, w) >= 8 else 1, padding=1)), nn.ReLU()]
    conv = nn.Sequential(*convs, nn.Flatten())
    with torch.no_grad():
        n_flat = conv(torch.zeros(1, c, h, w)).shape[1]
    return nn.Sequential(conv, layer_init(nn.Linear(n_flat, 256)), nn.ReLU()), 256, channels_last


TIME_FREQS = (0.5, 1.0, 2.0, 4.0)      # per unit of log(1 + tau): scale-free, any episode length
TIME_PERIODS = (1.0, 10.0, 100.0, 1000.0)  # absolute phase, for counting steps
TIME_DIM = 1 + 2 * len(TIME_FREQS) + 2 * len(TIME_PERIODS)
_TIME_TABLES: dict[str, torch.Tensor] = {}


def time_encoding(tau: torch.Tensor) -> torch.Tensor:
    """Features of the agent's clock tau: log(1 + tau) and sinusoids of it (the first steps resolved
    finely, tau = 10^5 still in range) plus sinusoids of tau with periods up to 1000 steps. Looked up
    in a table grown by doubling: one gather instead of a dozen elementwise ops per step."""
    key = str(tau.device)
    table = _TIME_TABLES.get(key)
    need = int(tau.max()) + 1 if tau.numel() else 1
    if table is None or len(table) < need:
        size = max(need, 2 * (0 if table is None else len(table)), 1024)
        t = torch.arange(size, dtype=torch.float32, device=tau.device).unsqueeze(-1)
        u, f, p = torch.log1p(t), t.new_tensor(TIME_FREQS), t.new_tensor(TIME_PERIODS)
        table = torch.cat([u / 8.0, torch.sin(u * f), torch.cos(u * f),
                           torch.sin(2 * math.pi * t / p), torch.cos(2 * math.pi * t / p)], -1)
        _TIME_TABLES[key] = table
    return table[tau.long()]


def symlog(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.log1p(x.abs())


class VisitCounter:
    """Pseudo-counts of observations by SimHash (Tang et al. 2017): an observation is hashed to the signs of
    ``bits`` fixed random projections of its raw values and N counts the visits of its bucket."""

    def __init__(self, obs_dim: int, seed: int, device, bits: int = 16):
        self.proj = torch.randn((bits, obs_dim), generator=torch.Generator().manual_seed(seed)).to(device)
        self.powers = 2 ** torch.arange(bits, device=device)
        self.counts = torch.zeros(2 ** bits, device=device)

    def visit(self, obs: torch.Tensor) -> torch.Tensor:
        """Count one visit of each row of ``obs``; returns each row's count, this visit included."""
        code = ((obs.float().flatten(1) @ self.proj.T >= 0).long() * self.powers).sum(1)
        self.counts.index_add_(0, code, torch.ones_like(code, dtype=self.counts.dtype))
        return self.counts[code]


TAG_DIM = 3  # persistent slots: [1, symlog(return of the entry's episode), log(1 + episodes ago)]


class Votes(NamedTuple):
    """What retention is taught from: B voting steps and the entries each may look back at."""
    entries: torch.Tensor   # (N, P, F) features of every env's look-back pool
    clock: torch.Tensor     # (N, P) their clocks
    own: torch.Tensor       # (B, P) the entries of env[b] that are earlier steps of step b's episode
    env: torch.Tensor       # (B,) the step's env
    e_step: torch.Tensor    # (B, D) the step's embedding
    action: torch.Tensor    # (B, A) its action (one-hot for discrete actions)
    y: torch.Tensor         # (B,) its TD target
    extra: torch.Tensor     # (B, K, F) its persistent slots' entries, tagged
    extra_ok: torch.Tensor  # (B, K) which of them are occupied

    def of_envs(self, envs: torch.Tensor) -> "Votes":
        """The votes of the steps of ``envs`` only, with those envs' look-back pools."""
        pos = torch.full((len(self.entries),), -1, dtype=torch.long, device=envs.device)
        pos[envs] = torch.arange(len(envs), device=envs.device)
        b = torch.nonzero(pos[self.env] >= 0).squeeze(1)
        return Votes(self.entries[envs], self.clock[envs], self.own[b], pos[self.env[b]], self.e_step[b],
                     self.action[b], self.y[b], self.extra[b], self.extra_ok[b])


class Retention(nn.Module):
    """The retention scorer r(entry) and its teacher, the entry critic c(step, action, entry) (see the
    module docstring). Both read detached entry features and are trained by their own optimizer."""

    def __init__(self, d: int, n_content: int, n_act: int, hidden: int = 32):
        super().__init__()
        self.n_env_part = n_content + 1 + TIME_DIM + TAG_DIM
        n_in = self.n_env_part + n_act + d
        self.scorer = nn.Sequential(layer_init(nn.Linear(n_in, hidden)), nn.Tanh(),
                                    layer_init(nn.Linear(hidden, 1), std=0.01))
        # The critic's first layer is split into a step part and an entry part, so that a (step, entry) pair
        # costs one add. Its output is bilinear in the action, [1, a] . V h: per-action read-outs of the
        # same features, so "reward when the action matches the entry's bit" is linear in them.
        self.critic_step = layer_init(nn.Linear(d, hidden))
        # The critic judges an entry by what the environment showed at its step only, not by the agent's action
        # (nor the embedding, which contains it): otherwise the later steps into which an agent that has solved
        # the task copies the cue through its own actions would share the cue's votes and push it out.
        self.critic_entry = layer_init(nn.Linear(self.n_env_part, hidden, bias=False))
        # Small initial outputs: an untrained critic predicts the same for every entry, so no entry looks
        # better than another by chance and the first votes weigh nothing.
        self.critic_out = layer_init(nn.Linear(hidden, 1 + n_act), std=0.01)

    @staticmethod
    def features(e, content, tau, prev_act, prev_rew, tag=None) -> torch.Tensor:
        """An entry as retention sees it: first what the environment showed at its step (raw content, see
        ``Agent.content``, reward, clock, persistent tag), then the agent's part (previous action, embedding)."""
        tag = e.new_zeros(e.shape[:-1] + (TAG_DIM,)) if tag is None else tag
        return torch.cat([content, prev_rew.unsqueeze(-1), time_encoding(tau), tag, prev_act, e.detach()], -1)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return self.scorer(x).squeeze(-1)

    def loss(self, v: "Votes") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Entry-critic loss, retention loss and the weights G of the voting steps ``v`` (see ``Votes``): the
        target of a step is u_j = softmax_j(-err_j / (0.1 mean err)) over the critic's errors, its weight
        G = mean err - sum_j u_j err_j, how much better its best entries explain it than the average one."""
        k = self.n_env_part
        h = torch.cat([self.critic_entry(v.entries[..., :k]).index_select(0, v.env), self.critic_entry(v.extra[..., :k])], 1)
        r = torch.cat([self.score(v.entries).index_select(0, v.env), self.score(v.extra)], 1)
        seen = torch.cat([v.own, v.extra_ok], 1)
        out = self.critic_out(torch.tanh(self.critic_step(v.e_step).unsqueeze(1) + h))
        pred = (out * torch.cat([torch.ones_like(v.action[:, :1]), v.action], 1).unsqueeze(1)).sum(-1)
        err = (pred - v.y[:, None]) ** 2
        mean_err = (err * seen).sum(1) / seen.sum(1).clamp(min=1)
        critic_loss = mean_err.mean()
        with torch.no_grad():
            target = torch.softmax((-err / (USEFULNESS_TEMPERATURE * mean_err[:, None] + 1e-8)).masked_fill(~seen, -1e30), 1)
            gain = (mean_err - (target * err).sum(1)) * seen.any(1)
        ce = -(target * torch.log_softmax(r.masked_fill(~seen, -1e30), 1) * seen).sum(1)
        return critic_loss, (gain * ce).mean(), gain


class Agent(nn.Module):
    def __init__(self, obs_space: spaces.Box, action_space: spaces.Space, args: Args):
        super().__init__()
        d, self.num_heads = args.hidden_size, args.num_heads
        if d % self.num_heads:
            raise UserError(f"--hidden-size {d} must be divisible by --num-heads {self.num_heads}")
        self.continuous = isinstance(action_space, spaces.Box)
        self.image = is_image(obs_space)
        self.scale = 255.0 if obs_space.dtype == np.uint8 else 1.0
        self.n_act = int(np.prod(action_space.shape)) if self.continuous else int(action_space.n)
        self.obs_rms = RunningMeanStd(obs_space.shape) if args.normalize else None
        if self.image:
            self.cnn, n_feat, self.channels_last = image_encoder(obs_space.shape)
        else:
            self.cnn, n_feat = None, int(np.prod(obs_space.shape))
        # One network encodes both what is written and what queries.
        self.embed_net = nn.Sequential(layer_init(nn.Linear(n_feat + self.n_act + 1 + TIME_DIM, d)), nn.Tanh(),
                                       layer_init(nn.Linear(d, d)), nn.Tanh())
        self.tag_proj = layer_init(nn.Linear(TAG_DIM, d, bias=False), std=1.0)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (layer_init(nn.Linear(d, d), std=1.0) for _ in range(4))
        # LayerNorm on the read (as after a Transformer's attention block): its scale cannot grow and
        # saturate the heads' tanh, which would cut the gradient to the attention.
        self.read_norm = nn.LayerNorm(d)

        def head(n_in: int, out: int, std: float) -> nn.Sequential:
            return nn.Sequential(layer_init(nn.Linear(n_in, 64)), nn.Tanh(), layer_init(nn.Linear(64, out), std=std))

        self.actor, self.critic = head(2 * d, self.n_act, 0.01), head(2 * d, 1, 1.0)
        self.action_value = head(2 * d + self.n_act, 1, 1.0) if args.action_value_coef > 0 else None
        if self.continuous:
            self.actor_logstd = nn.Parameter(torch.zeros(1, self.n_act))
        n_content = (obs_space.shape[-1 if self.channels_last else 0] * 16) if self.image else n_feat
        self.recon = head(d + TIME_DIM, n_content, 1.0) if args.aux_recon_coef > 0 else None
        self.retention = Retention(d, n_content, self.n_act)

    def policy_parameters(self) -> list[nn.Parameter]:
        ret = {id(p) for p in self.retention.parameters()}
        return [p for p in self.parameters() if id(p) not in ret]

    def normalize_obs(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / self.scale
        if self.obs_rms is not None:
            x = ((x - self.obs_rms.mean) / torch.sqrt(self.obs_rms.var + 1e-8)).clamp(-10, 10).float()
        return x

    def content(self, obs: torch.Tensor) -> torch.Tensor:
        """An observation's raw content, as retention sees it and the auxiliary read reconstructs it: the
        normalised observation (images: 4x4 average-pooled)."""
        x = self.normalize_obs(obs)
        if self.image:
            return F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2) if self.channels_last else x, 4).flatten(1)
        return x.flatten(1)

    def embed(self, obs, prev_act, prev_rew, tau) -> torch.Tensor:
        """Entry embedding e = Embed(obs, previous action, previous reward, clock)."""
        x = self.normalize_obs(obs)
        if self.image:
            x = self.cnn(x.permute(0, 3, 1, 2) if self.channels_last else x)
        return self.embed_net(torch.cat([x.flatten(1), prev_act, prev_rew.unsqueeze(-1), time_encoding(tau)], -1))

    def heads_split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:-1], self.num_heads, -1)

    # An entry e in a slot with tag g has key k_proj(e + tag_proj(g)) = k_proj(e) + (W_k W_tag) g, so each
    # entry is projected once and only the tag part depends on its slot (likewise for the value).
    def tag_key(self, tags: torch.Tensor) -> torch.Tensor:
        return F.linear(tags, self.k_proj.weight @ self.tag_proj.weight)

    def tag_value(self, tags: torch.Tensor) -> torch.Tensor:
        return F.linear(tags, self.v_proj.weight @ self.tag_proj.weight)

    def attend(self, e: torch.Tensor, k: torch.Tensor, v: torch.Tensor, occupied: torch.Tensor):
        """The read while acting: multi-head scaled dot-product attention of queries e (B, D) over slots
        with keys k and values v (B, S, D); empty slots get weight 0, an empty memory reads 0.
        Returns the read (B, D) and the weights (B, H, S); ``replay`` reproduces both."""
        q = self.heads_split(self.q_proj(e) / math.sqrt(e.shape[-1] // self.num_heads))  # B H dh
        k, v = self.heads_split(k), self.heads_split(v)           # B S H dh
        logits = (q.unsqueeze(1) * k).sum(-1).transpose(1, 2)    # B H S (faster on CPU than B x H matmuls)
        # A large finite negative (not -inf) keeps all-empty rows finite in the backward pass.
        logits = logits.masked_fill(~occupied.unsqueeze(1), -1e30)
        w = torch.softmax(logits, -1) * occupied.any(-1).float()[:, None, None]
        read = (w.transpose(1, 2).unsqueeze(-1) * v).sum(1).flatten(1)
        return self.read_norm(self.o_proj(read)), w

    def heads(self, e, read, action=None, greedy: bool = False, floor: Optional[torch.Tensor] = None):
        """Policy and value on [e, read]. Given ``action`` (the update): its log-probability and the
        entropy. Without (acting): a sampled action (the mode if ``greedy``), entropy None. ``floor``
        (acting, one value per row): the action is drawn from (1 - floor) softmax + floor uniform, but
        the log-probability returned is the softmax's, the policy PPO trains."""
        z = torch.cat([e, read], -1)
        out, value = self.actor(z), self.critic(z).squeeze(-1)
        if self.continuous:
            dist = Normal(out, self.actor_logstd.expand_as(out).exp(), validate_args=False)
            if action is None:
                action = out if greedy else dist.sample()
                return action, dist.log_prob(action).sum(1), None, value
            return action, dist.log_prob(action).sum(1), dist.entropy().sum(1), value
        dist = Categorical(logits=out, validate_args=False)
        if action is None:
            if greedy:
                action = out.argmax(1)
            elif floor is None:
                action = dist.sample()
            else:
                probs = (1.0 - floor).unsqueeze(-1) * dist.probs + floor.unsqueeze(-1) / self.n_act
                action = torch.multinomial(probs, 1).squeeze(1)
            return action, dist.log_prob(action), None, value
        return action, dist.log_prob(action), dist.entropy(), value

    def action_input(self, action: torch.Tensor) -> torch.Tensor:
        """An action as an input: one-hot for discrete, the (clipped) vector for Box."""
        if self.continuous:
            return action.float().reshape(action.shape[0], -1)
        return F.one_hot(action.long(), self.n_act).float()


# ---------------------------------------------------------------------------------------
# Memory: slots, their sources, and the look-back of the current episodes
# ---------------------------------------------------------------------------------------
class Memory:
    """The memories of N envs: M episodic then K persistent slots per env, each holding one entry (its raw
    inputs, its cached encoding, its score) and ``src``, the index of its source in this rollout's pool
    [the S slot entries at the rollout's start, then the rollout's T steps] (-1 = empty); what the next
    entry needs (previous action and reward, clock); and the raw steps of the last rollouts, from which
    the entry critic looks back over each env's current episode."""

    def __init__(self, agent: Agent, n: int, args: Args, obs_space: spaces.Box, device, generator=None):
        self.agent, self.n, self.m, self.k = agent, n, args.memory_slots, args.persistent_slots
        self.s, self.policy, self.window, self.generator = self.m + self.k, args.retention, args.teacher_window, generator
        n_act, d, s = agent.n_act, args.hidden_size, self.s
        obs_dtype = torch.uint8 if obs_space.dtype == np.uint8 else torch.float32

        def zeros(*shape, dtype=torch.float32):
            return torch.zeros(shape, dtype=dtype, device=device)

        self.src = torch.full((n, s), -1, dtype=torch.long, device=device)
        self.obs, self.pact, self.prew = zeros(n, s, *obs_space.shape, dtype=obs_dtype), zeros(n, s, n_act), zeros(n, s)
        self.tau, self.order = zeros(n, s, dtype=torch.long), zeros(n, s, dtype=torch.long)
        self.emb, self.key, self.val, self.score = zeros(n, s, d), zeros(n, s, d), zeros(n, s, d), zeros(n, s)
        self.outcome, self.episodes_ago = zeros(n, s), zeros(n, s)      # tags of persistent entries
        self.prev_act, self.prev_rew, self.clock = zeros(n, n_act), zeros(n), zeros(n, dtype=torch.long)
        self.ep_return = np.zeros(n)
        self.writes = 0
        self.history: list[dict] = []  # raw steps of the last rollouts, dicts of (T, N, ...) tensors

    @property
    def occupied(self) -> torch.Tensor:
        return self.src >= 0

    def tags(self) -> torch.Tensor:
        persistent = torch.zeros_like(self.score)
        persistent[:, self.m:] = 1.0
        tag = torch.stack([persistent, symlog(self.outcome), torch.log1p(self.episodes_ago)], -1)
        return tag * self.occupied.unsqueeze(-1)

    def read(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.key, self.val
        if self.k:
            tags = self.tags()
            k, v = k + self.agent.tag_key(tags), v + self.agent.tag_value(tags)
        return self.agent.attend(e, k, v, self.occupied)

    def act(self, obs: torch.Tensor, greedy: bool = False, floor: Optional[torch.Tensor] = None):
        """Read and act for all envs. Returns (action, log-prob, value), the read's weights and this step's
        embedding, which ``write`` stores after the env step."""
        e = self.agent.embed(obs, self.prev_act, self.prev_rew, self.clock)
        read, w = self.read(e)
        action, logprob, _, value = self.agent.heads(e, read, greedy=greedy, floor=floor)
        return (action, logprob, value), w, e

    def write(self, e: torch.Tensor, obs: torch.Tensor, pool_index: int) -> torch.Tensor:
        """Store this step's entry in the episodic slots. When they are full, ``learned`` drops the lowest
        score among the M entries and the new one (which may be the one not kept), ``fifo`` the oldest,
        ``random`` a uniform one. Returns the age of the dropped entry per env (-1: nothing dropped)."""
        m = self.m
        score = self.agent.retention.score(Retention.features(e, self.agent.content(obs), self.clock, self.prev_act,
                                                              self.prev_rew))
        occupied = self.src[:, :m] >= 0
        full = occupied.all(1)
        if self.policy == "learned":
            victim = torch.cat([self.score[:, :m], score.unsqueeze(1)], 1).argmin(1)
        elif self.policy == "fifo":
            victim = self.order[:, :m].argmin(1)
        else:
            victim = torch.randint(0, m, (self.n,), generator=self.generator, device=e.device)
        target = torch.where(full, victim, (~occupied).float().argmax(1))
        victim_tau = torch.cat([self.tau[:, :m], self.clock.unsqueeze(1)], 1).gather(1, victim.unsqueeze(1)).squeeze(1)
        rows = torch.nonzero(target < m).squeeze(1)
        slot = target[rows]
        for field, value in ((self.emb, e), (self.key, self.agent.k_proj(e)), (self.val, self.agent.v_proj(e)),
                             (self.score, score), (self.tau, self.clock), (self.obs, obs), (self.pact, self.prev_act),
                             (self.prew, self.prev_rew)):
            field[rows, slot] = value[rows].to(field.dtype)  # MuJoCo observations are float64
        self.src[rows, slot] = pool_index
        self.order[rows, slot] = self.writes
        self.writes += 1
        return torch.where(full, self.clock - victim_tau, -1)

    def advance(self, action: torch.Tensor, reward: np.ndarray) -> None:
        """Inputs of the next entry: the action taken (clipped for Box), symlog of its reward, the clock."""
        self.prev_act = self.agent.action_input(action)
        self.prev_rew = symlog(torch.as_tensor(reward, dtype=torch.float32, device=self.prev_rew.device))
        self.clock = self.clock + 1
        self.ep_return += reward

    @torch.no_grad()
    def end_episodes(self, rows: np.ndarray) -> None:
        """The episodes of envs ``rows`` ended: their entries and the persistent ones compete for the K
        persistent slots (learned: highest score with their current tags; fifo: latest; random), which
        are tagged with the episode's return; then the episodic slots are cleared."""
        rows_t = torch.as_tensor(rows, dtype=torch.long, device=self.src.device)
        if self.k:
            content = self.agent.content(self.obs[rows_t].flatten(0, 1)).view(len(rows), self.s, -1)
            rank = self.agent.retention.score(Retention.features(
                self.emb[rows_t], content, self.tau[rows_t], self.pact[rows_t], self.prew[rows_t], self.tags()[rows_t]))
            for r, i in enumerate(rows.tolist()):
                occ = torch.nonzero(self.src[i] >= 0).squeeze(1)
                key = {"learned": rank[r, occ], "fifo": self.order[i, occ].float(),
                       "random": torch.rand(len(occ), generator=self.generator, device=occ.device)}[self.policy]
                keep = occ[key.argsort(descending=True, stable=True)][: self.k]
                dest = torch.arange(self.m, self.m + len(keep), device=keep.device)
                for field in (self.src, self.obs, self.pact, self.prew, self.tau, self.order, self.emb, self.key,
                              self.val, self.score, self.outcome, self.episodes_ago):
                    kept = field[i, keep].clone()
                    field[i, self.m:] = -1 if field is self.src else 0
                    field[i, dest] = kept
                self.outcome[i, dest[keep < self.m]] = float(self.ep_return[i])
                self.episodes_ago[i, self.m:] += 1.0
        self.src[rows_t, : self.m] = -1
        self.prev_act[rows_t], self.prev_rew[rows_t], self.clock[rows_t] = 0.0, 0.0, 0
        self.ep_return[rows] = 0.0

    @torch.no_grad()
    def begin_rollout(self) -> dict:
        """Re-encode the stored entries with the current parameters (so the rollout and the update agree);
        they become pool entries 0..S-1. Returns their raw inputs (the pool's carry-in part)."""
        n, s = self.n, self.s
        flat = lambda x: x.reshape(n * s, *x.shape[2:])  # noqa: E731
        e = self.agent.embed(flat(self.obs), flat(self.pact), flat(self.prew), flat(self.tau))
        tags = flat(self.tags())
        score = self.agent.retention.score(Retention.features(e, self.agent.content(flat(self.obs)), flat(self.tau),
                                                              flat(self.pact), flat(self.prew), tags))
        self.emb, self.score = e.view(n, s, -1), score.view(n, s)
        self.key, self.val = self.agent.k_proj(self.emb), self.agent.v_proj(self.emb)
        slots = torch.arange(s, device=self.src.device).expand(n, s)
        self.src = torch.where(self.occupied, slots, -1)
        return dict(obs=self.obs.clone(), pact=self.pact.clone(), prew=self.prew.clone(), tau=self.tau.clone())

    def look_back(self) -> tuple[Optional[dict], torch.Tensor, torch.Tensor]:
        """The current episodes' steps before this rollout, at most ``window`` of them, from the stored
        rollouts: raw inputs (N, L, ...) (None if L = 0), which are valid (N, L), and per env the clock
        where its look-back starts."""
        length = min(int(self.clock.max()), self.window, sum(len(h["tau"]) for h in self.history))
        n_back = self.clock.clamp(max=length)
        valid = torch.arange(length, device=self.clock.device) >= (length - n_back).unsqueeze(1)
        prefix = {k: torch.cat([h[k] for h in self.history])[-length:].transpose(0, 1) for k in self.history[0]} \
            if length else None
        return prefix, valid, self.clock - n_back

    def end_rollout(self, raw: dict, num_steps: int) -> None:
        """Keep this rollout's raw steps for the look-back of the next ones."""
        self.history = (self.history + [raw])[-(math.ceil(self.window / num_steps) + 1):]


# ---------------------------------------------------------------------------------------
# The rollout buffer, returns
# ---------------------------------------------------------------------------------------
class Rollout:
    """(T, N) tensors of one rollout: the inputs of every entry, what PPO needs, and at every step which
    source each slot held (``src``) with the slots' persistent tags (the update replays the reads)."""

    def __init__(self, t: int, n: int, s: int, obs_space: spaces.Box, act_space: spaces.Space, n_act: int, device):
        obs_dtype = torch.uint8 if obs_space.dtype == np.uint8 else torch.float32
        self.obs = torch.zeros((t, n) + obs_space.shape, dtype=obs_dtype, device=device)
        self.actions = torch.zeros((t, n) + act_space.shape, device=device)
        self.pact = torch.zeros((t, n, n_act), device=device)
        self.logprobs, self.rewards, self.dones, self.values, self.prew, self.floor = (
            torch.zeros((t, n), device=device) for _ in range(6))
        self.tau = torch.zeros((t, n), dtype=torch.long, device=device)
        self.src = torch.zeros((t, n, s), dtype=torch.long, device=device)
        self.tag = torch.zeros((t, n, s, TAG_DIM), device=device)
        self.attn = torch.zeros((t, n, s), device=device)  # diagnostics only

    def record_inputs(self, step: int, obs: torch.Tensor, mem: Memory) -> None:
        self.obs[step], self.pact[step], self.prew[step], self.tau[step] = obs, mem.prev_act, mem.prev_rew, mem.clock
        self.src[step] = mem.src
        if mem.k:
            self.tag[step] = mem.tags()

    def raw(self) -> dict:
        return dict(obs=self.obs, pact=self.pact, prew=self.prew, tau=self.tau)

    def episode_ids(self) -> torch.Tensor:
        """(T, N): which episode of its env each step belongs to (0 = the one running at the rollout's start)."""
        return torch.cumsum((self.tau == 0).long(), 0)


class RewardScaler:
    """Divide rewards by the running std of the discounted return (as gymnasium's NormalizeReward)."""

    def __init__(self, num_envs: int, gamma: float):
        self.gamma = gamma
        self.returns = np.zeros(num_envs)
        self.rms = RunningMeanStd(())

    def scale(self) -> float:
        return math.sqrt(self.rms.var.item() + 1e-8)

    def __call__(self, rewards: np.ndarray, dones: np.ndarray) -> np.ndarray:
        self.returns = self.returns * self.gamma + rewards
        self.rms.update(torch.as_tensor(self.returns))
        self.returns[dones] = 0.0
        return np.clip(rewards / self.scale(), -10, 10)


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor,
                last_value: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Generalised advantage estimation over a (T, N) rollout. ``dones[t]`` marks that the episode ended
    with action t (terminated *or* truncated); a truncated episode already carries gamma V(final) in
    ``rewards[t]``."""
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(last_value)
    next_value = last_value
    for t in reversed(range(rewards.shape[0])):
        not_done = 1.0 - dones[t]
        delta = rewards[t] + gamma * next_value * not_done - values[t]
        last_gae = delta + gamma * lam * not_done * last_gae
        advantages[t] = last_gae
        next_value = values[t]
    return advantages


def td_targets(rewards, values, dones, last_value, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The one-step TD target r_t + gamma V(s_t+1) of every action (cut at episode ends) and its TD error,
    flattened over (T, N): what the entry critic and the action-value head predict. One step, not the
    lambda-return: the reward is put on the action that earned it, later ones enter only through V."""
    td_error = compute_gae(rewards, values, dones, last_value, gamma, 0.0)
    return (td_error + values).reshape(-1), td_error.reshape(-1)


# ---------------------------------------------------------------------------------------
# Update: replaying the reads, teaching retention
# ---------------------------------------------------------------------------------------
def pool_embed(agent: Agent, pool: dict) -> torch.Tensor:
    """Embeddings (N, P, D) of every pool entry with the current parameters."""
    n, p = pool["prew"].shape
    flat = lambda x: x.reshape(n * p, *x.shape[2:])  # noqa: E731
    return agent.embed(flat(pool["obs"]), flat(pool["pact"]), flat(pool["prew"]), flat(pool["tau"])).view(n, p, -1)


def env_groups(i_idx: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
    """Rows of the queries of envs ``i_idx`` (B,) in a layout grouped by env and padded to the largest
    group c: query b goes to row i_idx[b] * c + (its rank among its env's queries)."""
    counts = torch.bincount(i_idx, minlength=n)
    c = int(counts.max())
    order = torch.argsort(i_idx, stable=True)
    rank = torch.empty_like(i_idx)
    rank[order] = torch.arange(len(i_idx), device=i_idx.device) - (torch.cumsum(counts, 0) - counts)[i_idx[order]]
    return i_idx * c + rank, c


def replay(agent: Agent, pool_e: torch.Tensor, ro: Rollout, t_idx: torch.Tensor, i_idx: torch.Tensor, m: int,
           weights: bool = False):
    """Reproduce the rollout's reads of the queries (t_idx, i_idx) from the recorded slot sources (``m``
    episodic slots, then the persistent ones) over the pool [S carried entries, T steps].

    Returns the queries' embeddings (B, D), their reads (B, D), their slot sources (B, S) and, if
    ``weights``, the read's weights per slot (B, H, S). The queries are grouped by env (``env_groups``),
    so each env's logits are ONE dense (queries x pool) product restricted by an additive mask to the
    entries each query's slots held (on CPU much cheaper than gathering every query's keys). Entries in
    persistent slots carry their slot's tag in key and value, so their logits are gathered per query."""
    src = ro.src[t_idx, i_idx]                                    # B S
    occupied = src >= 0
    k_pool, v_pool = agent.k_proj(pool_e), agent.v_proj(pool_e)
    n, p, d = pool_e.shape
    b, h, dh, n_pers, s_off = len(t_idx), agent.num_heads, d // agent.num_heads, src.shape[1] - m, src.shape[1]
    e = pool_e.reshape(n * p, d).index_select(0, i_idx * p + s_off + t_idx)
    q = agent.q_proj(e) / math.sqrt(dh)                           # scaled as in Agent.attend
    row, c = env_groups(i_idx, n)
    q_g = agent.heads_split(q.new_zeros(n * c, d).index_copy(0, row, q).view(n, c, d)).transpose(1, 2)
    logits = q_g @ agent.heads_split(k_pool).permute(0, 2, 3, 1)   # n H c P
    v = agent.heads_split(v_pool).transpose(1, 2)                  # n H P dh

    def ungroup(x):  # (n, H, c, ...) -> (B, H, ...)
        return x.transpose(1, 2).reshape(n * c, h, *x.shape[3:]).index_select(0, row)

    # The episodic slots' entries as a (B, P) mask (empty slots scatter into a spare last column), made
    # an additive bias in the grouped layout: 0 where held, -1e30 elsewhere.
    held = torch.zeros((b, p + 1), dtype=torch.bool, device=src.device).scatter_(
        1, torch.where(occupied[:, :m], src[:, :m], p), True)[:, :p]
    bias = q.new_full((n * c, p), -1e30).index_copy(0, row, q.new_zeros(b, p).masked_fill(~held, -1e30))
    mem_logits = logits + bias.view(n, 1, c, p)
    if n_pers:
        rows_p = (i_idx.unsqueeze(1) * p + src[:, m:].clamp(min=0)).reshape(-1)
        tag = ro.tag[t_idx, i_idx][:, m:]
        gather = lambda x: x.reshape(n * p, d).index_select(0, rows_p).view(b, n_pers, d)  # noqa: E731
        k_p = agent.heads_split(gather(k_pool) + agent.tag_key(tag))
        v_p = agent.heads_split(gather(v_pool) + agent.tag_value(tag))
        logits_p = (agent.heads_split(q).unsqueeze(1) * k_p).sum(-1).transpose(1, 2)            # B H K
        logits_p = logits_p.masked_fill(~occupied[:, m:].unsqueeze(1), -1e30)
        logits_p = logits.new_full((n * c, h, n_pers), -1e30).index_copy(0, row, logits_p)
        mem_logits = torch.cat([mem_logits, logits_p.view(n, c, h, n_pers).transpose(1, 2)], -1)
    w = torch.softmax(mem_logits, -1)
    read = ungroup(w[..., :p] @ v)                                 # B H dh
    if n_pers:
        read = read + (ungroup(w[..., p:]).unsqueeze(-1) * v_p.transpose(1, 2)).sum(-2)
    # With no occupied slot the read is 0 (the softmax of an all-masked row is uniform, not 0).
    read = agent.read_norm(agent.o_proj(read.flatten(1) * occupied.any(-1, keepdim=True).float()))
    w_slots = None
    if weights:
        w_rows = ungroup(w)                                        # B H (P + K)
        w_epi = w_rows[..., :p].gather(-1, src[:, :m].clamp(min=0).unsqueeze(1).expand(-1, h, -1))
        w_slots = torch.cat([w_epi, w_rows[..., p:]], -1) * occupied.unsqueeze(1).float()
    return e, read, src, w_slots


@torch.no_grad()
def retention_votes(agent: Agent, look: dict, ro: Rollout, voters: torch.Tensor, y: torch.Tensor, m: int) -> Votes:
    """What the entry critic and the scorer see for the voting steps (flat indices t * N + i, TD targets
    ``y``): ``look`` is the
    look-back pool [S carried entries, L earlier steps of the running episodes, T steps] of raw inputs
    with each entry's episode id (``ep``, -1 = never an own-episode entry) and ``start``, each env's
    first clock in it. A step may look back at every earlier step of its own episode in the pool, at
    the carried episodic entries older than the look-back, and at its persistent slots (tagged)."""
    n, p = look["tau"].shape
    t_idx, i_idx = voters // n, voters % n
    e = pool_embed(agent, look)
    content = agent.content(look["obs"].flatten(0, 1)).view(n, p, -1)
    x = Retention.features(e, content, look["tau"], look["pact"], look["prew"])
    s, t_len = ro.src.shape[2], ro.tau.shape[0]
    lb = p - s - t_len
    tau_q, ep_q = ro.tau[t_idx, i_idx], ro.episode_ids()[t_idx, i_idx]
    own = (look["ep"][i_idx] == ep_q[:, None]) & (look["tau"][i_idx] < tau_q[:, None])
    src = ro.src[t_idx, i_idx]
    old = (src[:, :m] >= 0) & (src[:, :m] < s)
    old &= look["tau"][i_idx].gather(1, src[:, :m].clamp(0, s - 1)) < look["start"][i_idx, None]
    own[:, :s] |= torch.zeros_like(own[:, :s + 1]).scatter_(1, torch.where(old, src[:, :m], s), True)[:, :s]
    pers = src[:, m:]
    idx = torch.where(pers < s, pers, pers + lb).clamp(min=0)
    pick = lambda v: v[i_idx.unsqueeze(1), idx]  # noqa: E731
    extra = Retention.features(pick(e), pick(content), pick(look["tau"]), pick(look["pact"]), pick(look["prew"]),
                               ro.tag[t_idx, i_idx][:, m:])
    return Votes(x, look["tau"], own, i_idx, e[i_idx, s + lb + t_idx], agent.action_input(ro.actions[t_idx, i_idx]),
                 y, extra, pers >= 0)


# ---------------------------------------------------------------------------------------
# Evaluation and diagnostics (off the algorithm's path)
# ---------------------------------------------------------------------------------------
def clip_action(action: torch.Tensor, space: spaces.Space) -> torch.Tensor:
    if isinstance(space, spaces.Box):
        return action.clamp(torch.as_tensor(space.low, device=action.device),
                            torch.as_tensor(space.high, device=action.device))
    return action


def cue_step(info: dict, i: int) -> Optional[int]:
    """The step of the cue of env i's finished episode, where the env reports it (logging only)."""
    fin = info["final_info"]
    return int(fin["cue_step"][i]) if "cue_step" in fin and fin.get("_cue_step", np.ones(i + 1, bool))[i] else None


@torch.no_grad()
def evaluate(agent: Agent, args: Args, env_kwargs: dict, kind: str, episodes: int, device) -> tuple[dict, Optional[np.ndarray]]:
    """Greedy evaluation with deterministic eviction on fresh envs seeded apart from training, the memory
    (episodic and persistent) carried exactly as in training. Also returns the attention matrix (decision
    step x source step) of env 0's first episode. Where the env reports ``cue_step``, it measures both
    halves of recall at each episode's last decision: ``cue_in_memory`` (the cue's entry is in a slot) and
    ``cue_attention`` (the weight of the head that reads it most): retention can keep what the read ignores."""
    n_envs = max(1, min(episodes, 8))
    quota = [episodes // n_envs + (i < episodes % n_envs) for i in range(n_envs)]
    envs = make_vector_env(args, env_kwargs, kind, n_envs)
    mem = Memory(agent, n_envs, args, envs.single_observation_space, device,
                 torch.Generator(device=device).manual_seed(args.seed + 100_000))
    obs, _ = envs.reset(seed=[args.seed + 100_000 + i for i in range(n_envs)])
    returns, successes, done_count, cue_in, cue_attn, rows, picture = [], [], [0] * n_envs, [], [], [], None
    m = mem.m
    while any(d < q for d, q in zip(done_count, quota)):
        obs_t = torch.as_tensor(obs, device=device)
        (action, _, _), w, e = mem.act(obs_t, greedy=True)
        held = mem.occupied[:, :m]
        read_tau = torch.where(held, mem.tau[:, :m], -1)  # clocks of the entries read now
        if picture is None:
            rows.append((read_tau[0][held[0]].cpu().numpy(), w[0].mean(0)[:m][held[0]].cpu().numpy()))
        obs, reward, term, trunc, info = envs.step(action.cpu().numpy())
        mem.write(e, obs_t, 0)
        mem.advance(clip_action(action, envs.single_action_space), reward)
        done = np.flatnonzero(term | trunc)
        if picture is None and 0 in done:
            picture = np.zeros((len(rows), len(rows)), np.float32)
            for t, (taus, weights) in enumerate(rows):
                np.add.at(picture[t], taus, weights)
        for i in done:
            if done_count[i] < quota[i]:
                ep_r, _, success = finished_episode(info, i)
                returns.append(ep_r)
                if success is not None:
                    successes.append(float(success))
                cue = cue_step(info, i)
                if cue is not None:
                    cue_in.append(float((read_tau[i] == cue).any()))
                    cue_attn.append(float((w[i, :, :m] * (read_tau[i] == cue)).sum(-1).max()))
                done_count[i] += 1
        if len(done):
            mem.end_episodes(done)
    envs.close()
    mean = lambda x: float(np.mean(x)) if x else None  # noqa: E731
    return dict(mean_return=float(np.mean(returns)), std_return=float(np.std(returns)), success_rate=mean(successes),
                cue_in_memory=mean(cue_in), cue_attention=mean(cue_attn)), picture


def save_attention_png(mat: np.ndarray, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import PowerNorm

    fig, ax = plt.subplots(figsize=(6, 5))
    # A power norm keeps small weights visible next to the single-entry reads of the first steps.
    im = ax.imshow(mat, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
                   norm=PowerNorm(0.4, vmin=0.0, vmax=max(float(mat.max()), 1e-8)))
    ax.set_xlabel("source step (episode time of the entry read)")
    ax.set_ylabel("decision step")
    ax.set_title("episodic attention weight (mean over heads)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class MemoryStats:
    """memory/* scalars of the training run: ages of dropped entries, whether the cue (where the env reports
    it) was in memory at each episode's last decision, attention entropy, occupancy, retention votes."""

    def __init__(self):
        self.sums = dict(age=0.0, dropped=0, cue_in=0, cue_n=0)

    def on_write(self, ages: torch.Tensor) -> None:
        dropped = ages >= 0
        self.sums["age"] += float(ages[dropped].sum())
        self.sums["dropped"] += int(dropped.sum())

    def on_episode_end(self, ro: Rollout, carry: dict, step: int, i: int, cue: Optional[int], m: int) -> None:
        if cue is None:
            return
        src = ro.src[step, i, :m]
        src = src[src >= 0]
        s = carry["tau"].shape[1]
        taus = torch.where(src < s, carry["tau"][i, src.clamp(max=s - 1)], ro.tau[(src - s).clamp(min=0), i])
        self.sums["cue_in"] += int((taus == cue).any())
        self.sums["cue_n"] += 1

    def log(self, writer: SummaryWriter, ro: Rollout, extra: dict, global_step: int) -> None:
        s = self.sums
        if s["dropped"]:
            writer.add_scalar("memory/mean_age_evicted", s["age"] / s["dropped"], global_step)
        if s["cue_n"]:
            writer.add_scalar("memory/cue_in_memory_at_decision", s["cue_in"] / s["cue_n"], global_step)
        held = (ro.src >= 0).any(-1)
        if held.any():
            entropy = -(ro.attn * torch.log(ro.attn.clamp(min=1e-12))).sum(-1)
            writer.add_scalar("memory/attention_entropy", entropy[held].mean().item(), global_step)
        writer.add_scalar("memory/occupancy", (ro.src >= 0).float().sum(-1).mean().item(), global_step)
        for k, v in extra.items():
            writer.add_scalar(f"memory/{k}", v, global_step)
        self.sums = dict(age=0.0, dropped=0, cue_in=0, cue_n=0)


def train_retention(agent: Agent, optimizer: optim.Optimizer, votes: Votes, args: Args, stats: dict) -> dict:
    """``update_epochs`` passes over the votes in minibatches of whole envs (a minibatch needs the look-back
    of its own envs only). Returns the votes' weights G for logging."""
    n, gains = len(votes.entries), []
    for _ in range(args.update_epochs):
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
            gains.append(gain)
    gains = torch.cat(gains) if gains else torch.zeros(1)
    return dict(vote_gain_mean=gains.mean().item(), vote_gain_max=gains.max().item())


def look_back_pool(carry: dict, back: tuple, ro: Rollout) -> dict:
    """The entry critic's pool [S carried entries, L earlier steps of the running episodes, T steps] (see
    ``retention_votes``), from the carry-in, ``Memory.look_back()`` at the rollout's start and the rollout."""
    prefix, valid, start = back
    parts = [carry] + ([prefix] if prefix is not None else []) + [{k: v.transpose(0, 1) for k, v in ro.raw().items()}]
    look = {k: torch.cat([part[k] for part in parts], 1) for k in carry}
    n, s = carry["tau"].shape
    look["ep"] = torch.cat([torch.full((n, s), -1, device=valid.device), torch.where(valid, 0, -1),
                            ro.episode_ids().T], 1)
    look["start"] = start
    return look


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------
def main(args: Args) -> None:
    resume_state = None
    if args.resume:
        ckpt_path, run_dir = resolve_resume(args.resume)
        resume_state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        args = Args(**dict(resume_state["args"], resume=args.resume))
    env_kwargs = parse_env_kwargs(args.env_kwargs)
    probe = make_base_env(args.env_id, env_kwargs, **(dict(frameskip=1) if is_atari(args.env_id) else {}))
    check_spaces(probe, (spaces.Discrete, spaces.Box))
    kind = env_kind(args.env_id, probe)
    probe.close()
    for key, value in PRESETS[kind].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.explore_visits > 0 and kind == "continuous":
        raise UserError(f"--explore-visits needs discrete actions; {args.env_id} has Box actions")
    for name in ("total_timesteps", "num_envs", "num_steps", "num_minibatches", "update_epochs", "memory_slots",
                 "hidden_size", "num_heads", "teacher_window"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("persistent_slots", "eval_episodes", "action_value_coef", "aux_recon_coef", "heatmap_interval",
                 "explore_visits"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    T, N, M = args.num_steps, args.num_envs, args.memory_slots
    S = M + args.persistent_slots
    batch_size = N * T
    if batch_size % args.num_minibatches:
        raise UserError(f"--num-minibatches {args.num_minibatches} must divide num_envs*num_steps={batch_size}")
    minibatch_size = batch_size // args.num_minibatches
    num_iterations = max(1, args.total_timesteps // batch_size)

    if resume_state is None:
        args.run_name = args.run_name or default_run_name(args.env_id, args.exp_name, args.seed)
        run_dir = os.path.join("runs", args.run_name)
        os.makedirs(run_dir, exist_ok=True)
    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    if args.track:
        try:
            import wandb
        except ImportError:
            raise UserError("--track needs wandb: pip install wandb") from None
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=args.run_name, monitor_gym=True, save_code=True,
                   resume="allow", id=args.run_name)
    if args.capture_video:
        try:
            import moviepy  # noqa: F401
        except ImportError:
            raise UserError("--capture-video needs moviepy: pip install moviepy") from None

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    envs = make_vector_env(args, env_kwargs, kind, N, os.path.join(run_dir, "videos"))
    obs_space, act_space = envs.single_observation_space, envs.single_action_space
    agent = Agent(obs_space, act_space, args).to(device)
    # fused: one kernel for all parameters (same update rule, ~2x faster step on CPU with many small tensors)
    optimizer = optim.Adam(agent.policy_parameters(), lr=args.learning_rate, eps=1e-5, fused=True)
    ret_optimizer = optim.Adam(agent.retention.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)
    counter = VisitCounter(int(np.prod(obs_space.shape)), args.seed, device) if args.explore_visits > 0 else None
    reward_scaler = RewardScaler(N, args.gamma) if args.normalize_reward else None

    start_iteration, global_step, elapsed_before = 1, 0, 0.0
    if resume_state is not None:
        try:
            agent.load_state_dict(resume_state["agent"])
        except RuntimeError as err:
            missing = str(err).strip().splitlines()[-1].strip()
            raise UserError(f"--resume {args.resume}: the checkpoint's network does not match this version "
                            f"of trace_ppo.py ({missing}); start a new run") from None
        optimizer.load_state_dict(resume_state["optimizer"])
        ret_optimizer.load_state_dict(resume_state["ret_optimizer"])
        if counter is not None:
            counter.counts.copy_(resume_state["visit_counts"])
        if reward_scaler is not None:
            reward_scaler.rms.load_state_dict(resume_state["reward_rms"])
        start_iteration = resume_state["iteration"] + 1
        global_step, elapsed_before = resume_state["global_step"], resume_state["wall_time_s"]
        random.setstate(resume_state["rng"]["python"])
        np.random.set_state(resume_state["rng"]["numpy"])
        torch.set_rng_state(resume_state["rng"]["torch"])
        print(f"resuming {run_dir} at step {global_step} (memory contents start empty)", flush=True)

    # A resumed run hides the killed run's events *after* the checkpoint.
    writer = SummaryWriter(run_dir, purge_step=global_step + 1 if resume_state else None)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))

    def checkpoint(iteration: int, wall: float) -> None:
        save_atomic(dict(agent=agent.state_dict(), optimizer=optimizer.state_dict(),
                         ret_optimizer=ret_optimizer.state_dict(), iteration=iteration, global_step=global_step,
                         wall_time_s=wall, args=asdict(args), visit_counts=counter.counts if counter else None,
                         reward_rms=reward_scaler.rms.state_dict() if reward_scaler else None,
                         rng=dict(python=random.getstate(), numpy=np.random.get_state(),
                                  torch=torch.get_rng_state())), ckpt_path)
        writer.flush()  # the TB log of a killed run then reaches at least its checkpoint

    ro = Rollout(T, N, S, obs_space, act_space, agent.n_act, device)
    mem = Memory(agent, N, args, obs_space, device)
    stats_mem = MemoryStats()
    next_obs = torch.as_tensor(envs.reset(seed=args.seed + start_iteration - 1)[0], device=device)
    progress = Progress(args.total_timesteps)
    start_time, start_step, last_ckpt = time.time(), global_step, time.time()
    for iteration in range(start_iteration, num_iterations + 1):
        if args.anneal_lr:
            for opt in (optimizer, ret_optimizer):
                opt.param_groups[0]["lr"] = (1.0 - (iteration - 1.0) / num_iterations) * args.learning_rate

        carry, back = mem.begin_rollout(), mem.look_back()
        for step in range(T):
            global_step += N
            ro.record_inputs(step, next_obs, mem)
            floor = None
            if counter is not None:  # an observation's first m visits act uniformly, later ones with chance m/N
                floor = ro.floor[step] = (args.explore_visits / counter.visit(next_obs)).clamp(max=1.0)
            with torch.no_grad():
                (action, logprob, value), w, e = mem.act(next_obs, floor=floor)
            ro.attn[step], ro.values[step], ro.actions[step], ro.logprobs[step] = w.mean(1), value, action, logprob
            next_obs_np, reward, term, trunc, info = envs.step(action.cpu().numpy())
            # A non-finite reward would enter the memory before any loss could catch it.
            if not np.isfinite(reward).all():
                raise TrainingDiverged(f"non-finite reward at step {global_step}; stopped, last good checkpoint kept "
                                       f"at {ckpt_path if os.path.exists(ckpt_path) else '(none yet)'}")
            done = term | trunc
            raw_reward = np.asarray(reward, dtype=np.float64)
            reward = np.sign(reward) if kind == "atari" else reward
            reward = reward_scaler(reward, done) if reward_scaler is not None else reward
            reward = torch.as_tensor(reward, dtype=torch.float32, device=device)
            with torch.no_grad():
                stats_mem.on_write(mem.write(e, ro.obs[step], S + step))
            mem.advance(clip_action(action, act_space), raw_reward)
            # Truncation is not termination: bootstrap with V(final obs), read from the memory that holds the
            # episode's last entry.
            cut = np.flatnonzero(trunc & ~term)
            if len(cut):
                final = next_obs_np.copy()
                final[cut] = np.stack(info["final_obs"][cut])
                with torch.no_grad():
                    (_, _, v_final), _, _ = mem.act(torch.as_tensor(final, device=device))
                reward[cut] += args.gamma * v_final[cut]
            ro.rewards[step], ro.dones[step] = reward, torch.as_tensor(done, dtype=torch.float32, device=device)
            done_rows = np.flatnonzero(done)
            for i in done_rows:
                ep_r, ep_l, success = finished_episode(info, i)
                writer.add_scalar("charts/episodic_return", ep_r, global_step)
                writer.add_scalar("charts/episodic_length", ep_l, global_step)
                if success is not None:
                    writer.add_scalar("charts/episodic_success", float(success), global_step)
                progress.episode(ep_r, success)
                stats_mem.on_episode_end(ro, carry, step, i, cue_step(info, i), M)
            if len(done_rows):
                mem.end_episodes(done_rows)
            next_obs = torch.as_tensor(next_obs_np, device=device)
        mem.end_rollout({k: v.clone() for k, v in ro.raw().items()}, T)

        with torch.no_grad():
            (_, _, last_value), _, _ = mem.act(next_obs)
        advantages = compute_gae(ro.rewards, ro.values, ro.dones, last_value, args.gamma, args.gae_lambda)
        b_returns, b_adv, b_values = (advantages + ro.values).reshape(-1), advantages.reshape(-1), ro.values.reshape(-1)
        b_y, b_td_error = td_targets(ro.rewards, ro.values, ro.dones, last_value, args.gamma)
        b_actions = ro.actions.reshape((-1,) + act_space.shape)
        b_actions = b_actions if agent.continuous else b_actions.long()
        b_logprobs = ro.logprobs.reshape(-1)
        pool = {k: torch.cat([carry[k], v.transpose(0, 1)], 1) for k, v in ro.raw().items()}
        b_inds = np.arange(batch_size)
        stats = {k: [] for k in ("policy_loss", "value_loss", "entropy", "old_approx_kl", "approx_kl", "clipfrac",
                                 "action_value_loss", "aux_recon_loss", "retention_loss", "entry_critic_loss")}
        for epoch in range(args.update_epochs):
            np.random.shuffle(b_inds)
            for start in range(0, batch_size, minibatch_size):
                mb = torch.as_tensor(b_inds[start:start + minibatch_size], device=device)
                t_idx, i_idx = mb // N, mb % N
                e, read, src, _ = replay(agent, pool_embed(agent, pool), ro, t_idx, i_idx, M)
                _, newlogprob, entropy, newvalue = agent.heads(e, read, b_actions[mb])
                logratio = newlogprob - b_logprobs[mb]
                if epoch == 0 and start == 0:  # before any gradient step the update reproduces the rollout exactly
                    replay_error = max(logratio.abs().max().item(), (newvalue - b_values[mb]).abs().max().item())
                ratio = logratio.exp()
                with torch.no_grad():
                    old_approx_kl = (-logratio).mean()
                    approx_kl = ((ratio - 1) - logratio).mean()
                    clipfrac = ((ratio - 1.0).abs() > args.clip_coef).float().mean()
                mb_adv = b_adv[mb]
                if args.norm_adv:
                    mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
                pg_loss = torch.max(-mb_adv * ratio, -mb_adv * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)).mean()
                if args.clip_vloss:
                    v_clipped = b_values[mb] + torch.clamp(newvalue - b_values[mb], -args.clip_coef, args.clip_coef)
                    v_loss = 0.5 * torch.max((newvalue - b_returns[mb]) ** 2, (v_clipped - b_returns[mb]) ** 2).mean()
                else:
                    v_loss = 0.5 * ((newvalue - b_returns[mb]) ** 2).mean()
                entropy_loss = entropy.mean()
                loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef
                if agent.action_value is not None:  # what the read must hold to predict the step's outcome
                    q = agent.action_value(torch.cat([e, read, agent.action_input(b_actions[mb])], -1)).squeeze(-1)
                    av_loss = 0.5 * ((q - b_y[mb]) ** 2).mean()
                    loss = loss + args.action_value_coef * av_loss
                    stats["action_value_loss"].append(av_loss.item())
                if agent.recon is not None:  # reconstruct a random slot's observation from the read and its clock
                    held = src >= 0
                    pick = torch.multinomial(held.float() + (~held.any(1)).float().unsqueeze(1), 1).squeeze(1)
                    j = src[torch.arange(len(mb)), pick].clamp(min=0)
                    pred = agent.recon(torch.cat([read, time_encoding(pool["tau"][i_idx, j])], -1))
                    has = held.any(1).float()
                    recon = (((pred - agent.content(pool["obs"][i_idx, j])) ** 2).mean(-1) * has).sum() / has.sum().clamp(min=1)
                    loss = loss + args.aux_recon_coef * recon
                    stats["aux_recon_loss"].append(recon.item())
                if not torch.isfinite(loss):
                    raise TrainingDiverged(f"non-finite loss ({loss.item()}) at step {global_step}; stopped, last good "
                                           f"checkpoint kept at {ckpt_path if os.path.exists(ckpt_path) else '(none yet)'}")
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(agent.policy_parameters(), args.max_grad_norm)
                optimizer.step()
                for k, v in (("policy_loss", pg_loss), ("value_loss", v_loss), ("entropy", entropy_loss),
                             ("old_approx_kl", old_approx_kl), ("approx_kl", approx_kl), ("clipfrac", clipfrac)):
                    stats[k].append(v.item())
            if args.target_kl is not None and approx_kl > args.target_kl:
                break
        vote_stats = {}
        if args.retention == "learned":
            # The steps the critic found most surprising vote; each is weighted by its gain G (module docstring).
            voters = b_td_error.abs().topk(max(1, batch_size // VOTER_FRACTION)).indices
            # The critic explains TD targets in the env's own reward units, which stay put while the reward scale moves.
            y = b_y[voters] * (reward_scaler.scale() if reward_scaler is not None else 1.0)
            votes = retention_votes(agent, look_back_pool(carry, back, ro), ro, voters, y, M)
            vote_stats = train_retention(agent, ret_optimizer, votes, args, stats)
            if not np.isfinite(stats["retention_loss"] + stats["entry_critic_loss"]).all():
                raise TrainingDiverged(f"non-finite retention loss at step {global_step}; stopped, last good "
                                       f"checkpoint kept at {ckpt_path if os.path.exists(ckpt_path) else '(none yet)'}")
        # Normalisation statistics change between rollouts, never inside one (exact replay).
        if agent.obs_rms is not None:
            agent.obs_rms.update(ro.obs.float())

        y_pred, y_true = b_values.cpu().numpy(), b_returns.cpu().numpy()
        var_y = np.var(y_true)
        explained_var = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y
        sps = (global_step - start_step) / (time.time() - start_time)
        writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
        for k, v in stats.items():
            if v:
                writer.add_scalar(f"losses/{k}", float(np.mean(v)), global_step)
        writer.add_scalar("losses/explained_variance", explained_var, global_step)
        writer.add_scalar("debug/replay_max_error", replay_error, global_step)
        writer.add_scalar("charts/SPS", sps, global_step)
        if counter is not None:
            writer.add_scalar("intrinsic/explore_floor_mean", ro.floor.mean().item(), global_step)
        stats_mem.log(writer, ro, vote_stats, global_step)
        if args.heatmap_interval and iteration % args.heatmap_interval == 0:
            heat = torch.zeros((T, S + T), device=device)
            heat.scatter_add_(1, ro.src[:, 0].clamp(min=0), ro.attn[:, 0] * (ro.src[:, 0] >= 0).float())
            writer.add_image("memory/attention_env0", (heat / heat.max().clamp(min=1e-8)).unsqueeze(0).cpu(), global_step)
        progress.maybe_print(global_step, sps, force=iteration == num_iterations)
        if time.time() - last_ckpt >= args.checkpoint_interval or iteration == num_iterations:
            checkpoint(iteration, elapsed_before + time.time() - start_time)
            last_ckpt = time.time()
    envs.close()

    wall_time = elapsed_before + time.time() - start_time
    sps = (global_step - start_step) / max(time.time() - start_time, 1e-9)
    if args.save_model:
        model_path = os.path.join(run_dir, "model.pt")
        torch.save(dict(agent=agent.state_dict(), args=asdict(args)), model_path)
        print(f"model saved to {model_path}")
    result = dict(mean_return=None, std_return=None, success_rate=None, cue_in_memory=None, cue_attention=None)
    if args.eval_episodes > 0:
        agent.eval()
        result, picture = evaluate(agent, args, env_kwargs, kind, args.eval_episodes, device)
        for k, v in result.items():
            if v is not None:
                writer.add_scalar(f"eval/{k}", v, global_step)
        if picture is not None:
            save_attention_png(picture, os.path.join(run_dir, "attention.png"))
    path = write_eval_json(run_dir, dict(
        algo=args.exp_name, env_id=args.env_id, env_kwargs=env_kwargs, seed=args.seed,
        total_timesteps=args.total_timesteps, global_step=global_step, eval_episodes=args.eval_episodes,
        **result, sps=sps, wall_time_s=wall_time, run_name=args.run_name, args=asdict(args)))
    print(f"eval: return {result['mean_return']} success {result['success_rate']} -> {path}", flush=True)
    writer.close()


if __name__ == "__main__":
    run_cli(main, Args)
