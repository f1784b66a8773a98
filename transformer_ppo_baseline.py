"""PPO with a windowed transformer: attention over the last W steps of the episode (one file).

The transformer baseline of docs/baselines.md, diffable against recurrent_ppo_baseline.py. Each step
writes an ENTRY, the embedding of the inputs trace_ppo's entries get: the observation (vector; Atari
preprocessing and the Nature CNN for ``ALE/...`` ids; a CNN sized to other images), the previous
action (one-hot, or the clipped vector for ``Box``), symlog of the previous reward and the agent's
clock tau (steps since its episode began, as log(1 + tau) and sinusoids). The step's entry runs
through pre-LayerNorm blocks that read the window by multi-head attention, then the actor and critic
heads. So the two agents differ only in what is kept: here the last W steps (``--window``, this step
included; W >= episode length is full context), there what learned retention chooses.

The window, exactly
  - Step t reads the steps t-a for 0 <= a <= min(tau_t, W-1): never the previous episode, never
    more than W steps back. The mask needs only the query's clock.
  - Every block's keys and values are projections of the ENTRIES (the current step's stream is what
    runs through the blocks), so a step's output depends on its window's entries only, and an entry's
    keys and values never change once written: acting caches them per env and block, O(W) per step.
    (Keys made from a lower block's outputs would reach L(W-1) steps back.)

Exact replay
  - The rollout stores each step's entry inputs; the W-1 steps before it are carried in, and their
    cached keys and values recomputed with the current parameters when a rollout begins. The update
    recomputes every read with gradients from [carry, rollout], minibatched by env (or ``--chunk-len``
    chunks, each with the W-1 steps before it); before its first gradient step it reproduces the
    rollout's log-probabilities and values (tests/test_transformer_ppo.py checks this to 1e-5).
  - Observation normalisation is applied when an observation is stored, as in the recurrent baseline.
  - Vector envs use gymnasium 1.x SAME_STEP autoreset; a truncated episode is bootstrapped with
    V(final_obs), read over the window the episode had reached; a terminated one is not.
  - Evaluation is greedy on fresh seeded envs and carries the window through each episode.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
from gymnasium import spaces
from torch.distributions import Normal

from memory_envs import FlattenObservation
from run_contract import (Progress, Run, RunArgs, UserError, check_flags, check_spaces, finished_episode, is_atari,
                          make_base_env, make_batched_env, parse_env_kwargs, run_cli)


@dataclass
class Args(RunArgs):
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""

    # PPO. `None` takes the domain's default (vector / Atari / continuous actions): --help shows them.
    total_timesteps: int = 500_000
    """total timesteps of the experiment"""
    learning_rate: Optional[float] = None
    """the learning rate of the optimizer"""
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
    """the number of mini-batches; must divide the number of sequences, num_envs * num_steps / chunk_len"""
    update_epochs: Optional[int] = None
    """the K epochs to update the policy"""
    norm_adv: Optional[bool] = None
    """toggles per-minibatch advantages normalization"""
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
    """observation and reward normalisation"""
    window: int = 16
    """W: attention span in steps of the current episode, this step included (W >= episode length: full context;
    0 = the env's episode length, where the env or its time limit states one)"""
    hidden_size: int = 64
    """width of the entries and the transformer blocks"""
    num_layers: int = 2
    """transformer blocks"""
    num_heads: int = 4
    """attention heads per block"""
    chunk_len: Optional[int] = None
    """update sequences: chunks of this many steps (must divide num_steps), each with the W-1 steps before it;
    0 = whole rollout"""
    crelu_obs: Optional[bool] = None
    """vector observations enter as [relu(x), relu(-x)], as in trace_ppo"""
    memory_preset: bool = False
    """vector envs: trace_ppo's choices for memory tasks (8 envs x 128 steps, normalisation, no entropy bonus,
    no per-minibatch advantage normalisation, its input split and exploration floor)"""
    explore_visits: Optional[float] = None
    """m of trace_ppo's exploration floor: act uniformly with chance min(1, m / visits of the observation) (0: off;
    discrete actions)"""


# The recurrent baseline's presets, so that the two differ only in their memory.
PRESETS = {
    "vector": dict(learning_rate=1e-3, num_envs=4, num_steps=128, num_minibatches=4,
                   update_epochs=4, clip_coef=0.2, ent_coef=0.01, normalize=False, chunk_len=0, norm_adv=True,
                   crelu_obs=False, explore_visits=0.0),
    "atari": dict(learning_rate=2.5e-4, num_envs=8, num_steps=128, num_minibatches=4,
                  update_epochs=4, clip_coef=0.1, ent_coef=0.01, normalize=False, chunk_len=0, norm_adv=True,
                  crelu_obs=False, explore_visits=0.0),
    # One env cannot be split into 32 minibatches by environment, so the continuous preset
    # cuts its 2048-step rollout into 32 chunks of 64 (the same minibatch size as ppo_baseline).
    "continuous": dict(learning_rate=3e-4, num_envs=1, num_steps=2048, num_minibatches=32,
                       update_epochs=10, clip_coef=0.2, ent_coef=0.0, normalize=True, chunk_len=64, norm_adv=True,
                       crelu_obs=False, explore_visits=0.0),
}
# --memory-preset: trace_ppo's vector preset where it applies (as recurrent_ppo_baseline's).
MEMORY_PRESET = dict(learning_rate=1e-3, num_envs=8, num_steps=128, num_minibatches=4, update_epochs=4, ent_coef=0.0,
                     normalize=True, norm_adv=False, crelu_obs=True, explore_visits=20.0)


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
        # Statistics are recorded before any reward clipping, so charts show the true score.
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
    if kind == "vector" and not (args.capture_video and video_dir):
        batched = make_batched_env(args.env_id, env_kwargs, num_envs)  # the memory tasks as numpy arrays, same results
        if batched is not None:
            return batched
    fns = [make_env(args.env_id, env_kwargs, kind, args.capture_video and i == 0 and bool(video_dir),
                    video_dir) for i in range(num_envs)]
    return gym.vector.SyncVectorEnv(fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


# ---------------------------------------------------------------------------------------
# Agent
# ---------------------------------------------------------------------------------------
def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    torch.nn.init.orthogonal_(layer.weight, std)
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
        convs = [layer_init(nn.Conv2d(c, 32, 3, padding=1)), nn.ReLU(),
                 layer_init(nn.Conv2d(32, 64, 3, stride=2 if min(h, w) >= 8 else 1, padding=1)), nn.ReLU()]
    conv = nn.Sequential(*convs, nn.Flatten())
    with torch.no_grad():
        n_flat = conv(torch.zeros(1, c, h, w)).shape[1]
    return nn.Sequential(conv, layer_init(nn.Linear(n_flat, 512)), nn.ReLU()), 512, channels_last


# The clock features of trace_ppo's entries: log(1 + tau) resolves the first steps finely and stays in
# range for any episode length; sinusoids of tau with fixed periods let the agent count steps.
TIME_FREQS = (0.5, 1.0, 2.0, 4.0)          # per unit of log(1 + tau)
TIME_PERIODS = (1.0, 10.0, 100.0, 1000.0)  # in steps
TIME_DIM = 1 + 2 * len(TIME_FREQS) + 2 * len(TIME_PERIODS)


def time_encoding(tau: torch.Tensor) -> torch.Tensor:
    t = tau.float().unsqueeze(-1)
    u, f, p = torch.log1p(t), t.new_tensor(TIME_FREQS), t.new_tensor(TIME_PERIODS)
    return torch.cat([u / 8.0, torch.sin(u * f), torch.cos(u * f),
                      torch.sin(2 * math.pi * t / p), torch.cos(2 * math.pi * t / p)], -1)


def symlog(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.log1p(x.abs())


class SignSplit(nn.Module):
    """x -> [relu(x), relu(-x)] (CReLU, trace_ppo's input): a rare cue of +-10 std is not encoded as its negative."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.relu(x), F.relu(-x)], -1)


class VisitCounter(nn.Module):
    """trace_ppo's exploration floor: SimHash pseudo-counts (Tang et al. 2017) of the raw observations, and the chance
    min(1, m / N) of acting uniformly on an observation seen N times, so a rare input (a T-maze junction) is tried
    although the softmax has ruled its actions out."""

    def __init__(self, obs_dim: int, seed: int, device, bits: int = 16, m: float = 0.0):
        super().__init__()
        self.m, self.powers = m, 2 ** torch.arange(bits, device=device)
        self.proj = torch.randn((bits, obs_dim), generator=torch.Generator().manual_seed(seed)).to(device)
        self.register_buffer("counts", torch.zeros(2 ** bits, device=device))

    def floor(self, obs: torch.Tensor) -> torch.Tensor:
        """Count one visit of each row of ``obs``; returns each row's floor, this visit included."""
        code = ((obs.float().flatten(1) @ self.proj.T >= 0).long() * self.powers).sum(1)
        self.counts.index_add_(0, code, torch.ones_like(code, dtype=self.counts.dtype))
        return (self.m / self.counts[code]).clamp(max=1.0)


def window_mask(tau: torch.Tensor, n_keys: int, window: int) -> torch.Tensor:
    """(B, Q, K) which keys each query sees. The Q queries are the last Q of the K keys, so query q is
    key q + K - Q; it sees the keys a steps back for 0 <= a <= min(tau, W - 1), tau (B, Q) its clock."""
    n_q = tau.shape[1]
    back = (torch.arange(n_q, device=tau.device) + n_keys - n_q)[:, None] - torch.arange(n_keys, device=tau.device)
    return (back >= 0) & (back <= tau.clamp(max=window - 1).unsqueeze(-1))


class Block(nn.Module):
    """A pre-LayerNorm transformer block whose attention reads the window's entries: the queries come from
    the current step's stream, the keys and values from the entries (``Agent.keys_values``, cached when acting)."""

    def __init__(self, d: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.ln_entry, self.ln_attn, self.ln_mlp = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.kv = layer_init(nn.Linear(d, 2 * d), std=1.0)
        self.q, self.out = layer_init(nn.Linear(d, d), std=1.0), layer_init(nn.Linear(d, d), std=1.0)
        self.mlp = nn.Sequential(layer_init(nn.Linear(d, 4 * d)), nn.GELU(), layer_init(nn.Linear(4 * d, d), std=1.0))

    def forward(self, x: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, Q, d) queries, kv (B, K, 2, d), mask (B, Q, K)."""
        heads = lambda t: t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # noqa: E731  (B, H, n, d/H)
        read = F.scaled_dot_product_attention(heads(self.q(self.ln_attn(x))), heads(kv[:, :, 0]), heads(kv[:, :, 1]),
                                              attn_mask=mask.unsqueeze(1))
        x = x + self.out(read.transpose(1, 2).flatten(2))
        return x + self.mlp(self.ln_mlp(x))


class Agent(nn.Module):
    """entry embedding -> transformer blocks reading the window -> actor/critic heads.

    An entry's inputs are a dict of ``obs``, ``pact`` (previous action input), ``prew`` (symlog previous reward)
    and ``tau`` (clock), with any leading dims. Acting reads one query per env over its cached window; the
    update (``replay``) reads every step of a sequence over [W-1 steps before it, the sequence]."""

    def __init__(self, obs_space: spaces.Box, action_space: spaces.Space, normalize_obs: bool,
                 hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, window: int = 16,
                 crelu_obs: bool = False):
        super().__init__()
        self.continuous = isinstance(action_space, spaces.Box)
        self.image = is_image(obs_space)
        self.window, self.n_act = window, int(np.prod(action_space.shape)) if self.continuous else int(action_space.n)
        self.obs_rms = RunningMeanStd(obs_space.shape) if normalize_obs else None
        if self.image:
            self.encoder, n_feat, self.channels_last = image_encoder(obs_space.shape)
        else:  # the raw observation enters the embedding, as in trace_ppo
            n_feat, self.channels_last = int(np.prod(obs_space.shape)) * (1 + crelu_obs), False
            self.encoder = nn.Sequential(nn.Flatten(), SignSplit()) if crelu_obs else nn.Flatten()
        n_in = n_feat + self.n_act + 1 + TIME_DIM  # observation, previous action and reward, clock
        self.embed_net = nn.Sequential(layer_init(nn.Linear(n_in, hidden_size)), nn.Tanh(),
                                       layer_init(nn.Linear(hidden_size, hidden_size)), nn.Tanh())
        self.blocks = nn.ModuleList(Block(hidden_size, num_heads) for _ in range(num_layers))
        self.ln_out = nn.LayerNorm(hidden_size)
        self.actor = layer_init(nn.Linear(hidden_size, self.n_act), std=0.01)
        self.critic = layer_init(nn.Linear(hidden_size, 1), std=1.0)
        if self.continuous:
            self.actor_logstd = nn.Parameter(torch.zeros(1, self.n_act))
            self.register_buffer("action_low", torch.as_tensor(action_space.low, dtype=torch.float32))
            self.register_buffer("action_high", torch.as_tensor(action_space.high, dtype=torch.float32))

    @torch.no_grad()
    def normalize_obs(self, x: torch.Tensor, update: bool = False) -> torch.Tensor:
        """What the network consumes. Applied once, when an observation is stored, so the update
        recomputes exactly the rollout's log-probabilities although the statistics keep moving."""
        if self.obs_rms is None:
            return x
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.double()
        if update:
            self.obs_rms.update(x)
        return ((x - self.obs_rms.mean) / torch.sqrt(self.obs_rms.var + 1e-8)).clamp(-10, 10).float()

    def action_input(self, action: torch.Tensor) -> torch.Tensor:
        """An action as the next entry sees it: one-hot, or the vector clipped to the action space."""
        if self.continuous:
            return torch.max(torch.min(action.float(), self.action_high), self.action_low)
        return F.one_hot(action.long(), self.n_act).float()

    def embed(self, obs, pact, prew, tau) -> torch.Tensor:
        """Entries (..., d) of the inputs of steps with any leading dims."""
        lead = tau.shape
        x = obs.reshape(-1, *obs.shape[len(lead):])
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        feats = self.encoder(x.permute(0, 3, 1, 2) if self.channels_last else x)
        feats = feats.view(*lead, feats.shape[-1])
        return self.embed_net(torch.cat([feats, pact, prew.unsqueeze(-1), time_encoding(tau)], -1))

    def keys_values(self, e: torch.Tensor) -> torch.Tensor:
        """(..., d) entries -> (..., L, 2, d) their keys and values in every block."""
        return torch.stack([block.kv(block.ln_entry(e)).unflatten(-1, (2, -1)) for block in self.blocks], -3)

    def read(self, e: torch.Tensor, kv: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """The stream of queries e (B, Q, d) with clocks tau (B, Q) through the blocks over the keys and values
        kv (B, K, L, 2, d) of K steps, the queries being the last Q of them. Returns (B, Q, d)."""
        mask, x = window_mask(tau, kv.shape[1], self.window), e
        for layer, block in enumerate(self.blocks):
            x = block(x, kv[:, :, layer], mask)
        return self.ln_out(x)

    def replay(self, inputs: dict) -> torch.Tensor:
        """The update's reads: ``inputs`` (B, W-1+S, ...) hold S steps preceded by the W-1 steps before them;
        returns the S steps' outputs (B, S, d) with gradients to every entry they read."""
        e = self.embed(**inputs)
        n_q = e.shape[1] - (self.window - 1)
        return self.read(e[:, -n_q:], self.keys_values(e), inputs["tau"][:, -n_q:])

    def heads(self, z: torch.Tensor, action: Optional[torch.Tensor] = None, greedy: bool = False,
              floor: Optional[torch.Tensor] = None):
        """(action, log-prob, entropy, value) of the outputs z (B, d); samples an action if none is given (entropy
        None), with a ``floor`` per row from (1 - floor) softmax + floor uniform. The log-prob is the softmax's, which
        PPO trains."""
        out, value, acting = self.actor(z), self.critic(z), action is None
        if self.continuous:
            dist = Normal(out, self.actor_logstd.expand_as(out).exp(), validate_args=False)
            action = (out if greedy else dist.sample()) if acting else action
            return action, dist.log_prob(action).sum(1), dist.entropy().sum(1), value
        # Categorical(logits=out) written out, op for op (the same numbers): its object costs as much as the heads
        logp = out - out.logsumexp(1, keepdim=True)
        if acting and (greedy or floor is None):
            action = out.argmax(1) if greedy else torch.multinomial(logp.softmax(1), 1, True).view(-1)
        elif acting:  # inverse-CDF sampling, as trace_ppo
            probs = (1.0 - floor).unsqueeze(-1) * logp.softmax(1) + floor.unsqueeze(-1) / out.shape[-1]
            action = (probs.cumsum(-1) < torch.rand_like(floor).unsqueeze(-1)).sum(-1).clamp(max=out.shape[-1] - 1)
        logprob = logp.gather(1, action.long().unsqueeze(1)).squeeze(1)  # before the entropy: Categorical's order
        entropy = None if acting else -(logp.clamp(min=torch.finfo(logp.dtype).min) * logp.softmax(1)).sum(1)
        return action, logprob, entropy, value


class Window:
    """What N envs carry from step to step: the entry inputs and each block's keys and values of their last
    W-1 steps (oldest first), and the inputs of the next entry (previous action and reward, clock). Keys and
    values are cached rather than the blocks' inputs: an entry's never change once written (module docstring)."""

    def __init__(self, agent: Agent, n: int, obs_space: spaces.Box, device):
        self.agent, w, d = agent, agent.window - 1, agent.ln_out.normalized_shape[0]
        # Images are kept as bytes unless normalised (the embedding scales bytes by 1/255).
        obs_dtype = torch.uint8 if obs_space.dtype == np.uint8 and agent.obs_rms is None else torch.float32

        def zeros(*shape, dtype=torch.float32):
            return torch.zeros((n, w, *shape), dtype=dtype, device=device)

        self.inputs = dict(obs=zeros(*obs_space.shape, dtype=obs_dtype), pact=zeros(agent.n_act), prew=zeros(),
                           tau=zeros(dtype=torch.long))
        self.kv = zeros(len(agent.blocks), 2, d)
        self.prev_act, self.prev_rew = torch.zeros((n, agent.n_act), device=device), torch.zeros(n, device=device)
        self.clock = torch.zeros(n, dtype=torch.long, device=device)

    def entry(self, obs: torch.Tensor) -> dict:
        """The inputs of the entry of (normalised) observations ``obs``, one per env."""
        return dict(obs=obs.to(self.inputs["obs"].dtype), pact=self.prev_act, prew=self.prev_rew, tau=self.clock)

    def read(self, entry: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Outputs (N, d) of the entry over the window ending with it, and the entry's keys and values."""
        e = self.agent.embed(**entry)
        kv = self.agent.keys_values(e)
        return self.agent.read(e[:, None], torch.cat([self.kv, kv[:, None]], 1), entry["tau"][:, None])[:, 0], kv

    def push(self, entry: dict, kv: torch.Tensor) -> None:
        """The window slides by one step (a shift costs O(W), as the read does)."""
        for k, v in entry.items():
            self.inputs[k] = torch.cat([self.inputs[k], v.unsqueeze(1).to(self.inputs[k].dtype)], 1)[:, 1:]
        self.kv = torch.cat([self.kv, kv.unsqueeze(1)], 1)[:, 1:]

    def act(self, obs: torch.Tensor, greedy: bool = False, floor: Optional[torch.Tensor] = None):
        """Read, act and remember the step for all envs: (action, log-prob, value, the entry's inputs)."""
        entry = self.entry(obs)
        z, kv = self.read(entry)
        action, logprob, _, value = self.agent.heads(z, greedy=greedy, floor=floor)
        self.push(entry, kv)
        return action, logprob, value.flatten(), entry

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        """V of (normalised) observations read over the window, which does not remember them."""
        return self.agent.critic(self.read(self.entry(obs))[0]).flatten()

    def advance(self, action: torch.Tensor, reward: np.ndarray) -> None:
        """Inputs of the next entry: the action taken, symlog of its raw reward, the clock. The caller may read
        a truncated episode's final observation now (``read``), then calls ``end_episodes``."""
        self.prev_act = self.agent.action_input(action)
        self.prev_rew = symlog(torch.as_tensor(reward, dtype=torch.float32, device=self.clock.device))
        self.clock = self.clock + 1

    def end_episodes(self, done: np.ndarray) -> None:
        """Envs whose episode ended start the next one: clock 0 (so nothing before is read), no previous step."""
        keep = ~torch.as_tensor(done, device=self.clock.device)
        self.prev_act, self.prev_rew = self.prev_act * keep[:, None], self.prev_rew * keep
        self.clock = self.clock * keep

    @torch.no_grad()
    def begin_rollout(self) -> dict:
        """Recompute the cached keys and values with the current parameters, as the update will; returns the
        entry inputs of the W-1 steps carried into the rollout (N, W-1, ...)."""
        self.kv = self.agent.keys_values(self.agent.embed(**self.inputs))
        return dict(self.inputs)


def to_sequences(x: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(T, N, ...) rollout -> (seq_len, T // seq_len * N, ...): chunk k of env n is sequence k*N + n."""
    chunks = x.shape[0] // seq_len
    return x.reshape(chunks, seq_len, *x.shape[1:]).transpose(0, 1).reshape(seq_len, chunks * x.shape[1],
                                                                            *x.shape[2:])


def sequence_inputs(stream: dict, seqs: np.ndarray, seq_len: int, window: int) -> dict:
    """Entry inputs (B, W-1+seq_len, ...) of the sequences ``seqs`` (layout of ``to_sequences``): each chunk
    with the W-1 steps before it, from the per-env stream [carry, rollout] (N, W-1+T, ...)."""
    n = stream["tau"].shape[0]
    seqs = torch.as_tensor(seqs, device=stream["tau"].device)
    pos = (seqs // n * seq_len)[:, None] + torch.arange(seq_len + window - 1, device=seqs.device)
    return {k: v[(seqs % n)[:, None], pos] for k, v in stream.items()}


# ---------------------------------------------------------------------------------------
# Returns
# ---------------------------------------------------------------------------------------
class RewardScaler:
    """Divide rewards by the running std of the discounted return (as gymnasium's NormalizeReward).

    Kept outside the env wrappers so its statistics go into the checkpoint with the model.
    """

    def __init__(self, num_envs: int, gamma: float):
        self.gamma = gamma
        self.returns = np.zeros(num_envs)
        self.rms = RunningMeanStd(())

    def __call__(self, rewards: np.ndarray, dones: np.ndarray) -> np.ndarray:
        self.returns = self.returns * self.gamma + rewards
        self.rms.update(torch.as_tensor(self.returns))
        self.returns[dones] = 0.0
        return np.clip(rewards / np.sqrt(self.rms.var.item() + 1e-8), -10, 10)


def ratio_max(floors: torch.Tensor, logprobs: torch.Tensor, clip: float, n_act: int) -> torch.Tensor:
    """trace_ppo's upper PPO ratio bound per step: 1 + clip, or (1 + clip) x acting probability / pi where that is
    larger (the exploration floor f acts with (1 - f) pi + f / A); 1 + clip everywhere without the floor."""
    acted = torch.where(floors > 0, (1 - floors) + floors * (-logprobs).exp() / n_act, torch.ones_like(floors))
    return (1 + clip) * acted.clamp(min=1.0)


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor,
                last_value: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Generalised advantage estimation over a (T, N) rollout.

    ``dones[t]`` marks that the episode ended with action t (terminated *or* truncated);
    truncated episodes already carry ``gamma * V(final_obs)`` inside ``rewards[t]``, so
    nothing is ever bootstrapped across an episode boundary. ``last_value`` is V of the
    observation that follows the rollout.
    """
    # In numpy: its per-operation cost is a fraction of torch's and its float arithmetic the same (bit for bit).
    rewards_np, values_np, dones_np = (t.cpu().numpy() for t in (rewards, values, dones))
    advantages = np.zeros_like(rewards_np)
    last_gae = np.zeros_like(values_np[0])
    next_value = last_value.cpu().numpy()
    for t in reversed(range(rewards_np.shape[0])):
        not_done = 1.0 - dones_np[t]
        delta = rewards_np[t] + gamma * next_value * not_done - values_np[t]
        last_gae = delta + gamma * lam * not_done * last_gae
        advantages[t] = last_gae
        next_value = values_np[t]
    return torch.from_numpy(advantages).to(rewards.device)


# ---------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(agent: Agent, args: Args, env_kwargs: dict, kind: str, device: torch.device, video_dir: str = "") -> dict:
    """Greedy evaluation of ``--eval-episodes`` on fresh envs seeded apart from training; every env runs a
    fixed quota of episodes so short episodes are not over-represented. The window is carried from step to
    step; an episode's clock starts at 0, so it never reads the episode before."""
    episodes = args.eval_episodes
    n_envs = max(1, min(episodes, 8))
    quota = [episodes // n_envs + (i < episodes % n_envs) for i in range(n_envs)]
    envs = make_vector_env(args, env_kwargs, kind, n_envs, video_dir)
    obs, _ = envs.reset(seed=[args.seed + 100_000 + i for i in range(n_envs)])
    window = Window(agent, n_envs, envs.single_observation_space, device)
    returns, successes, done_count = [], [], [0] * n_envs
    while any(d < q for d, q in zip(done_count, quota)):
        action, _, _, _ = window.act(agent.normalize_obs(torch.as_tensor(obs, device=device)), greedy=True)
        obs, reward, term, trunc, info = envs.step(action.cpu().numpy())
        window.advance(action, reward)
        window.end_episodes(term | trunc)
        for i in np.flatnonzero(term | trunc):
            if done_count[i] < quota[i]:
                ep_r, _, success = finished_episode(info, i)
                returns.append(ep_r)
                if success is not None:
                    successes.append(float(success))
                done_count[i] += 1
    envs.close()
    return dict(mean_return=float(np.mean(returns)), std_return=float(np.std(returns)),
                success_rate=float(np.mean(successes)) if successes else None)


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------
def main(args: Args) -> None:
    run = Run(args, Args)
    args = run.args
    env_kwargs = parse_env_kwargs(args.env_kwargs)
    probe = make_base_env(args.env_id, env_kwargs, **(dict(frameskip=1) if is_atari(args.env_id) else {}))
    check_spaces(probe, (spaces.Discrete, spaces.Box))
    kind = env_kind(args.env_id, probe)
    if args.window < 0:
        raise UserError(f"--window must be >= 1, or 0 for the whole episode, got {args.window}")
    if args.window == 0:  # full context
        bounds = [n for n in (getattr(probe.unwrapped, "episode_length", None), probe.spec and probe.spec.max_episode_steps) if n]
        if not bounds:
            raise UserError(f"--window 0 needs an episode length, and {args.env_id!r} states none: give --window W")
        args.window = min(bounds)
    probe.close()
    if args.memory_preset and kind != "vector":
        raise UserError(f"--memory-preset applies to vector observations with discrete actions, not {args.env_id!r}")
    for key, value in dict(PRESETS[kind], **(MEMORY_PRESET if args.memory_preset else {})).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.explore_visits > 0 and kind == "continuous":
        raise UserError(f"--explore-visits needs discrete actions; {args.env_id} has Box actions")
    check_flags(args, at_least_one=("window", "hidden_size", "num_layers", "num_heads"),
                non_negative=("explore_visits",))
    if args.hidden_size % args.num_heads:
        raise UserError(f"--hidden-size {args.hidden_size} must be divisible by --num-heads {args.num_heads}")
    if args.chunk_len < 0 or (args.chunk_len and args.num_steps % args.chunk_len):
        raise UserError(f"--chunk-len must be 0 or a divisor of --num-steps {args.num_steps}, got {args.chunk_len}")
    seq_len = args.chunk_len or args.num_steps
    num_seqs = args.num_steps // seq_len * args.num_envs
    if num_seqs % args.num_minibatches:
        raise UserError(f"--num-minibatches {args.num_minibatches} must divide the number of sequences "
                        f"num_envs*num_steps/chunk_len={num_seqs} (minibatches are split by env and chunk)")
    batch_size = args.num_envs * args.num_steps
    seqs_per_minibatch, num_iterations = num_seqs // args.num_minibatches, run.iterations(batch_size)
    device = run.start()

    envs = make_vector_env(args, env_kwargs, kind, args.num_envs, "" if args.evaluate else os.path.join(run.dir, "videos"))
    agent = Agent(envs.single_observation_space, envs.single_action_space, args.normalize, args.hidden_size,
                  args.num_layers, args.num_heads, args.window, args.crelu_obs).to(device)
    # foreach: the same arithmetic as the default per-parameter loop (bit for bit on CPU) in fewer Python calls.
    params = list(agent.parameters())
    optimizer = optim.Adam(params, lr=args.learning_rate, eps=1e-5, foreach=True)
    reward_scaler = RewardScaler(args.num_envs, args.gamma) if args.normalize else None
    n_obs = int(np.prod(envs.single_observation_space.shape))
    counter = VisitCounter(n_obs, args.seed, device, m=args.explore_visits) if args.explore_visits > 0 else None

    run.load_network(agent)
    if args.evaluate:
        return finish(run, agent, env_kwargs, kind, device, run.state.get("global_step", 0))
    run.resume(dict(optimizer=optimizer, reward_rms=reward_scaler.rms if reward_scaler else None,
                    visit_counts=counter), " (windows start empty)")
    writer, global_step = run.writer, run.global_step

    window = Window(agent, args.num_envs, envs.single_observation_space, device)
    # The rollout's entry inputs (what the update re-embeds) and what PPO needs.
    inputs = {k: torch.zeros((args.num_steps,) + v.shape[:1] + v.shape[2:], dtype=v.dtype, device=device)
              for k, v in window.inputs.items()}
    actions = torch.zeros((args.num_steps, args.num_envs) + envs.single_action_space.shape, device=device)
    logprobs, rewards, dones, values, floors = (torch.zeros((args.num_steps, args.num_envs), device=device)
                                                for _ in range(5))

    # Resumed runs restart their envs with a different seed so they do not replay old episodes;
    # every env then begins an episode at clock 0, so the empty window is exact.
    next_obs, _ = envs.reset(seed=args.seed + run.start_iteration - 1)
    next_obs = torch.as_tensor(next_obs, device=device)
    progress = Progress(args.total_timesteps)
    start_step, last_ckpt = global_step, time.time()
    for iteration in range(run.start_iteration, num_iterations + 1):
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = (1.0 - (iteration - 1.0) / num_iterations) * args.learning_rate

        carry = window.begin_rollout()
        for step in range(args.num_steps):
            global_step += args.num_envs
            with torch.no_grad():
                floor = None
                if counter is not None:  # trace_ppo's exploration floor, counted on the raw observation
                    floor = floors[step] = counter.floor(next_obs)
                action, logprob, value, entry = window.act(agent.normalize_obs(next_obs, update=True), floor=floor)
            for k, v in entry.items():
                inputs[k][step] = v
            values[step], actions[step], logprobs[step] = value, action, logprob
            next_obs_np, reward, term, trunc, info = envs.step(action.cpu().numpy())
            if not np.isfinite(reward).all():  # it would enter the next entries before any loss could catch it
                raise run.diverged("non-finite reward", global_step)
            done = term | trunc
            window.advance(action, reward)
            if kind == "atari":
                reward = np.sign(reward)
            if reward_scaler is not None:
                reward = reward_scaler(reward, done)
            reward = torch.as_tensor(reward, dtype=torch.float32, device=device)
            # Truncation is not termination: bootstrap the cut-off return with V(final_obs), read over the
            # window that episode had reached (its clock is reset only afterwards).
            cut = np.flatnonzero(trunc & ~term)
            if len(cut):
                final = next_obs_np.copy()
                final[cut] = np.stack(info["final_obs"][cut])
                with torch.no_grad():
                    final_value = window.value(agent.normalize_obs(torch.as_tensor(final, device=device)))
                reward[cut] += args.gamma * final_value[cut]
            window.end_episodes(done)
            rewards[step], dones[step] = reward, torch.as_tensor(done, dtype=torch.float32, device=device)
            next_obs = torch.as_tensor(next_obs_np, device=device)

            progress.log(writer, info, done, global_step)

        with torch.no_grad():
            last_value = window.value(agent.normalize_obs(next_obs))
        advantages = compute_gae(rewards, values, dones, last_value, args.gamma, args.gae_lambda)
        returns = advantages + values

        # Sequences of seq_len steps: (seq_len, num_seqs, ...); their entry inputs come from the stream.
        stream = {k: torch.cat([carry[k], inputs[k].transpose(0, 1)], 1) for k in carry}
        s_actions, s_logprobs, s_advantages, s_returns, s_values = (
            to_sequences(t, seq_len) for t in (actions, logprobs, advantages, returns, values))
        s_ratio_max = to_sequences(ratio_max(floors, logprobs, args.clip_coef, agent.n_act), seq_len)
        if not agent.continuous:
            s_actions = s_actions.long()

        seq_inds = np.arange(num_seqs)
        stats = {k: [] for k in ("policy_loss", "value_loss", "entropy", "old_approx_kl", "approx_kl", "clipfrac")}
        for epoch in range(args.update_epochs):
            np.random.shuffle(seq_inds)
            for start in range(0, num_seqs, seqs_per_minibatch):
                mb = seq_inds[start:start + seqs_per_minibatch]

                def take(t: torch.Tensor) -> torch.Tensor:  # minibatch sequences, flattened time-major
                    return t[:, mb].reshape(-1, *t.shape[2:])

                z = agent.replay(sequence_inputs(stream, mb, seq_len, args.window)).transpose(0, 1).flatten(0, 1)
                _, newlogprob, entropy, newvalue = agent.heads(z, take(s_actions))
                logratio = newlogprob - take(s_logprobs)
                newvalue = newvalue.view(-1)
                mb_values, mb_returns = take(s_values), take(s_returns)
                if epoch == 0 and start == 0:  # before any gradient step the update reproduces the rollout
                    replay_error = max(logratio.abs().max().item(), (newvalue - mb_values).abs().max().item())
                ratio = logratio.exp()
                with torch.no_grad():
                    old_approx_kl = (-logratio).mean()
                    approx_kl = ((ratio - 1) - logratio).mean()
                    clipfrac = ((ratio - 1.0).abs() > args.clip_coef).float().mean()
                mb_adv = take(s_advantages)
                if args.norm_adv:
                    mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
                clipped = torch.minimum(ratio.clamp(min=1 - args.clip_coef), take(s_ratio_max))
                pg_loss = torch.max(-mb_adv * ratio, -mb_adv * clipped).mean()
                if args.clip_vloss:
                    v_clipped = mb_values + torch.clamp(newvalue - mb_values, -args.clip_coef, args.clip_coef)
                    v_loss = 0.5 * torch.max((newvalue - mb_returns) ** 2, (v_clipped - mb_returns) ** 2).mean()
                else:
                    v_loss = 0.5 * ((newvalue - mb_returns) ** 2).mean()
                entropy_loss = entropy.mean()
                loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef
                if not torch.isfinite(loss):
                    raise run.diverged(f"non-finite loss ({loss.item()})", global_step)
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                for k, v in (("policy_loss", pg_loss), ("value_loss", v_loss), ("entropy", entropy_loss),
                             ("old_approx_kl", old_approx_kl), ("approx_kl", approx_kl), ("clipfrac", clipfrac)):
                    stats[k].append(v.item())
            if args.target_kl is not None and approx_kl > args.target_kl:
                break

        y_pred, y_true = values.cpu().numpy(), returns.cpu().numpy()
        var_y = np.var(y_true)
        explained_var = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y
        sps = (global_step - start_step) / (time.time() - run.start_time)
        writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
        for k, v in stats.items():
            writer.add_scalar(f"losses/{k}", float(np.mean(v)), global_step)
        writer.add_scalar("losses/explained_variance", explained_var, global_step)
        writer.add_scalar("debug/replay_max_error", replay_error, global_step)
        writer.add_scalar("charts/SPS", sps, global_step)
        if counter is not None:
            writer.add_scalar("intrinsic/explore_floor_mean", floors.mean().item(), global_step)
        progress.maybe_print(global_step, sps, force=iteration == num_iterations)
        if run.due(last_ckpt, iteration == num_iterations):
            run.save(iteration, global_step, agent=agent, optimizer=optimizer,
                     reward_rms=reward_scaler.rms if reward_scaler else None, visit_counts=counter)
            last_ckpt = time.time()
    envs.close()

    run.save_model(agent=agent.state_dict(), global_step=global_step)  # with --save-model
    finish(run, agent, env_kwargs, kind, device, global_step,
           dict(sps=(global_step - start_step) / max(time.time() - run.start_time, 1e-9), wall_time_s=run.wall_time()))


def finish(run: Run, agent: Agent, env_kwargs: dict, kind: str, device: torch.device, global_step: int,
           record: Optional[dict] = None) -> None:
    """Evaluate (the trained agent, or the one --evaluate loaded) and write eval.json."""
    record = dict(record or {}, global_step=global_step, mean_return=None, std_return=None, success_rate=None)
    if run.args.eval_episodes > 0:
        agent.eval()
        video = os.path.join(run.dir, "videos") if run.args.evaluate and run.args.capture_video else ""
        record.update(evaluate(agent, run.args, env_kwargs, kind, device, video))
    run.finish(record)


if __name__ == "__main__":
    run_cli(main, Args, PRESETS)
