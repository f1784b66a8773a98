"""PPO with an LSTM or GRU core: the recurrent baseline (CleanRL ppo_atari_lstm style, one file).

The encoder is picked from the spaces and always feeds one recurrent cell (``--cell lstm|gru``)
whose output drives the actor and critic heads; ``--prev-action-reward`` also feeds it the
previous action and symlog reward, the inputs trace_ppo's entries get (docs/baselines.md):
  - vector observations -> a 64-unit tanh layer -> LSTM,
  - ``ALE/...`` ids -> standard Atari preprocessing (frame-skip 4, 84x84 grayscale, frame
    stack 4, sticky actions 0.25, no episodic life, reward clipping) and the Nature CNN -> LSTM,
  - other image observations -> a CNN sized to the image -> LSTM,
  - ``Box`` actions -> diagonal Gaussian policy with observation and reward normalisation.

Recurrent bookkeeping (the parts that are easy to get subtly wrong):
  - ``starts[t]`` = "obs[t] begins a new episode". The state (h, c; a GRU carries c unused) is multiplied by
    ``(1 - starts[t])`` before obs[t] is processed, in the rollout, in the update and in
    evaluation alike, so no memory leaks across episodes.
  - The LSTM state is snapshotted at the start of every rollout (and, with ``--bptt-len``,
    at the start of every chunk); the update re-runs whole per-env sequences (or chunks) from
    those snapshots, with minibatches split by environment/chunk, never by time step.
  - The update runs the LSTM over episode segments packed into one ``nn.LSTM`` call instead
    of a Python loop over time; the rollout's step-by-step outputs are reproduced to float
    precision (tests/test_recurrent_ppo.py checks this to 1e-5).
  - Vector envs use gymnasium 1.x SAME_STEP autoreset; a truncated episode is bootstrapped
    with V(final_obs), computed with one extra LSTM step from that env's state *before* it
    is reset; a terminated one is not bootstrapped.
  - Observation normalisation is applied when an observation is stored, so the update sees
    exactly what the rollout saw; the statistics live in the agent/checkpoint.
  - Evaluation is greedy on fresh seeded envs and carries the LSTM state through each
    episode (resetting it at episode starts). Evaluating an LSTM without its state, as the
    original Strategic Memory benchmark did, forces it to chance on recall tasks.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Literal, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
from gymnasium import spaces
from torch.distributions import Normal
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from memory_envs import FlattenObservation
from run_contract import (Progress, Run, RunArgs, UserError, check_flags, env_kind, finished_episode, make_base_env,
                          make_batched_env, parse_env_kwargs, run_cli)


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
    """the number of mini-batches; must divide the number of sequences, num_envs * num_steps / bptt_len
   """
    update_epochs: Optional[int] = None
    """the K epochs to update the policy"""
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
    norm_adv: Optional[bool] = None
    """toggles per-minibatch advantages normalization"""
    cell: Literal["lstm", "gru"] = "lstm"
    """the recurrent cell"""
    hidden_size: int = 128
    """hidden size of the recurrent cell"""
    prev_action_reward: Optional[bool] = None
    """feed the cell the previous action and symlog of the previous reward besides the observation"""
    crelu_obs: Optional[bool] = None
    """vector observations enter as [relu(x), relu(-x)], as in trace_ppo"""
    memory_preset: bool = False
    """vector envs: trace_ppo's choices for memory tasks (8 envs x 128 steps, normalisation, no entropy bonus,
    no per-minibatch advantage normalisation, previous action and reward as inputs, its input split and its
    exploration floor m = 20)"""
    explore_visits: Optional[float] = None
    """m of trace_ppo's exploration floor: act uniformly with chance min(1, m / visits of the observation)
    (0: off; discrete)"""
    bptt_len: Optional[int] = None
    """truncated BPTT: sequence length in steps (must divide num_steps); 0 = whole rollout"""


# Vector preset: learning rate 1e-3 instead of CleanRL's 2.5e-4. On MemoryTask-v0 delay=16
# difficulty=1 the LSTM left chance after ~20k steps at 1e-3 but only after ~120k at 2.5e-4
# (one seed each); CartPole-v1 at 100k steps was within noise of 2.5e-4.
PRESETS = {
    "vector": dict(learning_rate=1e-3, num_envs=4, num_steps=128, num_minibatches=4,
                   update_epochs=4, clip_coef=0.2, ent_coef=0.01, normalize=False, bptt_len=0, norm_adv=True,
                   prev_action_reward=False, crelu_obs=False, explore_visits=0.0),
    "atari": dict(learning_rate=2.5e-4, num_envs=8, num_steps=128, num_minibatches=4,
                  update_epochs=4, clip_coef=0.1, ent_coef=0.01, normalize=False, bptt_len=0, norm_adv=True,
                  prev_action_reward=False, crelu_obs=False, explore_visits=0.0),
    # One env cannot be split into 32 minibatches by environment, so the continuous preset
    # cuts its 2048-step rollout into 32 chunks of 64 (the same minibatch size as ppo_baseline).
    "continuous": dict(learning_rate=3e-4, num_envs=1, num_steps=2048, num_minibatches=32,
                       update_epochs=10, clip_coef=0.2, ent_coef=0.0, normalize=True, bptt_len=64, norm_adv=True,
                       prev_action_reward=False, crelu_obs=False, explore_visits=0.0),
}
# --memory-preset: trace_ppo's vector preset where it applies, so the two differ only in their memory.
# Its exploration floor: without it the policy learns "always right" in PassiveTMaze's corridor and never tries
# up/down at the junction, so it scores 0 there for a reason that has nothing to do with memory.
MEMORY_PRESET = dict(learning_rate=1e-3, num_envs=8, num_steps=128, num_minibatches=4, update_epochs=4, ent_coef=0.0,
                     normalize=True, norm_adv=False, prev_action_reward=True, crelu_obs=True, explore_visits=20.0)


# ---------------------------------------------------------------------------------------
# Environments
# ---------------------------------------------------------------------------------------
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


LSTMState = tuple[torch.Tensor, torch.Tensor]


def symlog(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.log1p(x.abs())


class SignSplit(nn.Module):
    """x -> [relu(x), relu(-x)] (CReLU, trace_ppo's input): a rare cue of +-10 std is not encoded as its negative."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.relu(x), F.relu(-x)], -1)


class VisitCounter(nn.Module):
    """SimHash pseudo-counts (Tang et al. 2017): the visits of each bucket of ``bits`` signs of random projections.
    trace_ppo's, for its exploration floor: an observation seen N times is acted on uniformly with chance
    min(1, m / N), so a rare input (a T-maze junction) is tried although the softmax has ruled its actions out."""

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


class Agent(nn.Module):
    """encoder (+ previous action and reward) -> LSTM or GRU -> actor/critic heads.

    Sequences are passed time-major and flattened, as in CleanRL: ``x`` holds T*B
    observations (step t of sequence b at index t*B + b), ``prev`` the matching previous
    action/reward inputs (or None), ``lstm_state`` is the (h, c) pair of shape (1, B, H)
    *before* x[0], and ``starts`` (T*B,) is 1 where an observation begins a new episode.
    """

    def __init__(self, obs_space: spaces.Box, action_space: spaces.Space, normalize_obs: bool,
                 hidden_size: int = 128, cell: str = "lstm", prev_action_reward: bool = False, crelu_obs: bool = False):
        super().__init__()
        self.continuous = isinstance(action_space, spaces.Box)
        self.image = is_image(obs_space)
        n_out = int(np.prod(action_space.shape)) if self.continuous else int(action_space.n)
        self.n_prev = n_out + 1 if prev_action_reward else 0
        self.obs_rms = RunningMeanStd(obs_space.shape) if normalize_obs else None
        if self.image:
            self.encoder, n_feat, self.channels_last = image_encoder(obs_space.shape)
        else:
            n_feat, self.channels_last, n_obs = 64, False, int(np.prod(obs_space.shape))
            split = [SignSplit()] if crelu_obs else []
            self.encoder = nn.Sequential(nn.Flatten(), *split, layer_init(nn.Linear(n_obs * (1 + crelu_obs), n_feat)),
                                         nn.Tanh())
        self.cell = cell
        self.rnn = (nn.LSTM if cell == "lstm" else nn.GRU)(n_feat + self.n_prev, hidden_size)
        for name, param in self.rnn.named_parameters():
            if "bias" in name:
                nn.init.constant_(param, 0)
            else:
                nn.init.orthogonal_(param, 1.0)
        # Keep-gate bias 1 (Gers et al. 2000; Jozefowicz et al. 2015): at init the cell keeps sigmoid(1) = 0.73
        # of its state per step instead of 0.5, so a cue survives long enough for its gradient to be learned
        # (CleanRL's zero bias left MemoryTask delay=16 at chance). The second gate block is the LSTM's forget
        # gate f and the GRU's update gate z (h' = z h + (1 - z) n).
        with torch.no_grad():
            self.rnn.bias_ih_l0[hidden_size:2 * hidden_size] = 1.0
        self.actor = layer_init(nn.Linear(hidden_size, n_out), std=0.01)
        self.critic = layer_init(nn.Linear(hidden_size, 1), std=1.0)
        if self.continuous:
            self.actor_logstd = nn.Parameter(torch.zeros(1, n_out))
            self.register_buffer("action_low", torch.as_tensor(action_space.low, dtype=torch.float32))
            self.register_buffer("action_high", torch.as_tensor(action_space.high, dtype=torch.float32))

    def initial_state(self, batch: int, device: torch.device | str = "cpu") -> LSTMState:
        shape = (self.rnn.num_layers, batch, self.rnn.hidden_size)
        return torch.zeros(shape, device=device), torch.zeros(shape, device=device)

    def prev_inputs(self, action: torch.Tensor, reward: np.ndarray) -> torch.Tensor:
        """What the next step is fed besides its observation: the action (one-hot, or the vector clipped to the
        action space) and symlog of its raw reward; (B, 0) without --prev-action-reward."""
        if not self.n_prev:
            return action.new_zeros(len(action), 0, dtype=torch.float32)
        if self.continuous:
            act = torch.max(torch.min(action.float(), self.action_high), self.action_low)
        else:
            act = F.one_hot(action.long(), self.n_prev - 1).float()
        rew = symlog(torch.as_tensor(reward, dtype=torch.float32, device=action.device)).view(-1, 1)
        return torch.cat([act, rew], 1)

    def core(self, x: torch.Tensor, state: LSTMState):
        """One call of the cell; a GRU has no c, which is passed through untouched."""
        if self.cell == "gru":
            out, h = self.rnn(x, state[0])
            return out, (h, state[1])
        return self.rnn(x, state)

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

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if self.image:
            return self.encoder(x.permute(0, 3, 1, 2) if self.channels_last else x)
        return self.encoder(x)

    def get_states(self, x: torch.Tensor, prev: torch.Tensor, lstm_state: LSTMState, starts: torch.Tensor):
        """Cell outputs (T*B, H) for a time-major batch and the state after its last step."""
        feats = torch.cat([self.features(x), prev], 1)
        batch = lstm_state[0].shape[1]
        steps = feats.shape[0] // batch
        feats, starts = feats.view(steps, batch, -1), starts.view(steps, batch)
        if steps == 1 or not starts[1:].any():  # no episode begins after the first step (always so in the rollout)
            keep = (1.0 - starts[0]).view(1, batch, 1)
            out, state = self.core(feats, (keep * lstm_state[0], keep * lstm_state[1]))
            return out.view(steps * batch, -1), state
        # A reset inside a sequence just means a new sequence begins there, so cut every env's
        # sequence at its episode starts into segments and run all segments as one packed batch.
        # A segment that opens the sequence continues from the stored state unless it begins an
        # episode (state * (1 - start)); every other segment starts at 0.
        begins = starts.t().bool()                                    # (B, T), env-major
        cut = begins.clone()
        cut[:, 0] = True
        cut = cut.reshape(-1)
        seg = torch.cumsum(cut.long(), 0) - 1                         # segment of every step
        t = torch.arange(steps, device=feats.device).repeat(batch)
        seg_t0 = t[cut]                                               # first step of each segment
        pos = t - seg_t0[seg]                                         # position inside its segment
        lengths = torch.bincount(seg)
        env = torch.arange(batch, device=feats.device).repeat_interleave(steps)[cut]
        keep = ((seg_t0 == 0) & ~begins[env, 0]).to(feats.dtype).view(1, -1, 1)
        h0, c0 = lstm_state[0][:, env] * keep, lstm_state[1][:, env] * keep
        padded = feats.new_zeros(int(lengths.max()), len(lengths), feats.shape[-1])
        padded[pos, seg] = feats.transpose(0, 1).reshape(batch * steps, -1)
        packed = pack_padded_sequence(padded, lengths.cpu(), enforce_sorted=False)
        out, (hn, cn) = self.core(packed, (h0, c0))
        out, _ = pad_packed_sequence(out)
        hidden = out[pos, seg].view(batch, steps, -1).transpose(0, 1).reshape(steps * batch, -1)
        last = seg.view(batch, steps)[:, -1]
        return hidden, (hn[:, last], cn[:, last])

    def get_value(self, x: torch.Tensor, prev: torch.Tensor, lstm_state: LSTMState, starts: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.get_states(x, prev, lstm_state, starts)
        return self.critic(hidden)

    def get_action_and_value(self, x, prev, lstm_state, starts, action=None, greedy: bool = False,
                             floor: Optional[torch.Tensor] = None):
        """With a ``floor`` per row (discrete actions) the action is sampled from (1 - floor) softmax + floor uniform;
        the log-probability is always the softmax's: the policy PPO trains."""
        hidden, lstm_state = self.get_states(x, prev, lstm_state, starts)
        out = self.actor(hidden)
        if self.continuous:
            dist = Normal(out, self.actor_logstd.expand_as(out).exp(), validate_args=False)
            if action is None:
                action = out if greedy else dist.sample()
            return action, dist.log_prob(action).sum(1), dist.entropy().sum(1), self.critic(hidden), lstm_state
        # Categorical(logits=out) spelled out, op for op (so the same numbers): at this network size building
        # and checking a distribution object every step costs more than the network.
        logits, acting = out - out.logsumexp(1, keepdim=True), action is None
        if acting and floor is not None and not greedy:  # inverse-CDF sampling, as trace_ppo
            probs = (1.0 - floor).unsqueeze(1) * logits.softmax(1) + floor.unsqueeze(1) / out.shape[1]
            action = (probs.cumsum(1) < torch.rand_like(floor).unsqueeze(1)).sum(1).clamp(max=out.shape[1] - 1)
        elif acting:
            action = out.argmax(1) if greedy else torch.multinomial(logits.softmax(1), 1, True).view(-1)
        logprob = logits.gather(1, action.long().unsqueeze(1)).squeeze(1)
        entropy = None if acting else -(logits.clamp(min=torch.finfo(logits.dtype).min) * logits.softmax(1)).sum(1)
        return action, logprob, entropy, self.critic(hidden), lstm_state


def to_sequences(x: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(T, N, ...) rollout -> (seq_len, T // seq_len * N, ...): chunk k of env n is sequence k*N + n."""
    chunks = x.shape[0] // seq_len
    return x.reshape(chunks, seq_len, *x.shape[1:]).transpose(0, 1).reshape(seq_len, chunks * x.shape[1],
                                                                            *x.shape[2:])


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
    # A Python loop over T steps of N numbers: numpy's per-operation cost is a fraction of torch's, and its
    # float arithmetic is the same, so the advantages are bit for bit those of the torch loop.
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
    fixed quota of episodes so short episodes are not over-represented. The LSTM state is carried from step to
    step and reset only where an episode starts."""
    episodes = args.eval_episodes
    n_envs = max(1, min(episodes, 8))
    quota = [episodes // n_envs + (i < episodes % n_envs) for i in range(n_envs)]
    envs = make_vector_env(args, env_kwargs, kind, n_envs, video_dir)
    obs, _ = envs.reset(seed=[args.seed + 100_000 + i for i in range(n_envs)])
    lstm_state, starts = agent.initial_state(n_envs, device), torch.ones(n_envs, device=device)
    prev = torch.zeros(n_envs, agent.n_prev, device=device)
    returns, successes, done_count = [], [], [0] * n_envs
    while any(d < q for d, q in zip(done_count, quota)):
        x = agent.normalize_obs(torch.as_tensor(obs, device=device))
        action, _, _, _, lstm_state = agent.get_action_and_value(x, prev, lstm_state, starts, greedy=True)
        obs, reward, term, trunc, info = envs.step(action.cpu().numpy())
        starts = torch.as_tensor(term | trunc, dtype=torch.float32, device=device)
        prev = agent.prev_inputs(action, reward) * (1.0 - starts).unsqueeze(1)
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
    if run.state is not None and "explore_visits" not in run.state["args"]:
        args.explore_visits = 0.0  # saved before the exploration floor existed: continued without it
    env_kwargs = parse_env_kwargs(args.env_kwargs)
    kind = env_kind(args.env_id, env_kwargs)
    if args.memory_preset and kind != "vector":
        raise UserError(f"--memory-preset applies to vector observations with discrete actions, not {args.env_id!r}")
    for key, value in dict(PRESETS[kind], **(MEMORY_PRESET if args.memory_preset else {})).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.explore_visits > 0 and kind == "continuous":
        raise UserError(f"--explore-visits needs discrete actions; {args.env_id} has Box actions")
    check_flags(args, at_least_one=("hidden_size",), non_negative=("explore_visits",))
    if args.bptt_len < 0 or (args.bptt_len and args.num_steps % args.bptt_len):
        raise UserError(f"--bptt-len must be 0 or a divisor of --num-steps {args.num_steps}, got {args.bptt_len}")
    seq_len = args.bptt_len or args.num_steps
    num_chunks = args.num_steps // seq_len
    num_seqs = num_chunks * args.num_envs
    if num_seqs % args.num_minibatches:
        raise UserError(f"--num-minibatches {args.num_minibatches} must divide the number of sequences "
                        f"num_envs*num_steps/bptt_len={num_seqs} (minibatches are split by env and chunk)")
    batch_size = args.num_envs * args.num_steps
    seqs_per_minibatch, num_iterations = num_seqs // args.num_minibatches, run.iterations(batch_size)
    device = run.start()


    envs = make_vector_env(args, env_kwargs, kind, args.num_envs, "" if args.evaluate else os.path.join(run.dir, "videos"))
    agent = Agent(envs.single_observation_space, envs.single_action_space, args.normalize, args.hidden_size,
                  args.cell, args.prev_action_reward, args.crelu_obs).to(device)
    # foreach: the same arithmetic as the default per-parameter loop (bit for bit on CPU) in fewer Python calls.
    optimizer = optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, foreach=True)
    reward_scaler = RewardScaler(args.num_envs, args.gamma) if args.normalize else None
    n_obs = int(np.prod(envs.single_observation_space.shape))
    counter = VisitCounter(n_obs, args.seed, device, m=args.explore_visits) if args.explore_visits > 0 else None

    run.load_network(agent)
    if args.evaluate:
        return finish(run, agent, env_kwargs, kind, device, run.state.get("global_step", 0))
    run.resume(dict(optimizer=optimizer, reward_rms=reward_scaler.rms if reward_scaler else None,
                    visit_counts=counter))
    writer, global_step = run.writer, run.global_step

    raw_images = envs.single_observation_space.dtype == np.uint8 and not args.normalize
    obs_dtype = torch.uint8 if raw_images else torch.float32
    obs = torch.zeros((args.num_steps, args.num_envs) + envs.single_observation_space.shape,
                      dtype=obs_dtype, device=device)
    actions = torch.zeros((args.num_steps, args.num_envs) + envs.single_action_space.shape, device=device)
    prevs = torch.zeros((args.num_steps, args.num_envs, agent.n_prev), device=device)
    logprobs, rewards, dones, starts, values, floors = (torch.zeros((args.num_steps, args.num_envs), device=device)
                                                        for _ in range(6))
    # LSTM state at the start of every chunk (the whole rollout is one chunk without --bptt-len).
    chunk_h, chunk_c = (torch.zeros((num_chunks, agent.rnn.num_layers, args.num_envs, args.hidden_size),
                                    device=device) for _ in range(2))

    # Resumed runs restart their envs with a different seed so they do not replay old episodes;
    # every env then begins an episode, so a zero LSTM state is exact.
    next_obs, _ = envs.reset(seed=args.seed + run.start_iteration - 1)
    next_obs = torch.as_tensor(next_obs, device=device)
    next_start = torch.ones(args.num_envs, device=device)
    next_prev = torch.zeros(args.num_envs, agent.n_prev, device=device)
    lstm_state = agent.initial_state(args.num_envs, device)
    progress = Progress(args.total_timesteps)
    params = list(agent.parameters())
    start_step, last_ckpt = global_step, time.time()
    for iteration in range(run.start_iteration, num_iterations + 1):
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = (1.0 - (iteration - 1.0) / num_iterations) * args.learning_rate

        for step in range(args.num_steps):
            if step % seq_len == 0:
                chunk_h[step // seq_len], chunk_c[step // seq_len] = lstm_state
            global_step += args.num_envs
            floor = None
            if counter is not None:  # the exploration floor, from the raw observation: min(1, m / its visits)
                floor = floors[step] = counter.floor(next_obs)
            next_obs = agent.normalize_obs(next_obs, update=True)
            obs[step], starts[step], prevs[step] = next_obs, next_start, next_prev
            with torch.no_grad():
                action, logprob, _, value, lstm_state = agent.get_action_and_value(next_obs, next_prev, lstm_state,
                                                                                   next_start, floor=floor)
            values[step], actions[step], logprobs[step] = value.flatten(), action, logprob
            next_obs_np, reward, term, trunc, info = envs.step(action.cpu().numpy())
            done = term | trunc
            taken = agent.prev_inputs(action, reward)
            if kind == "atari":
                reward = np.sign(reward)
            if reward_scaler is not None:
                reward = reward_scaler(reward, done)
            reward = torch.as_tensor(reward, dtype=torch.float32, device=device)
            # Truncation is not termination: bootstrap the cut-off return with V(final_obs), one
            # more LSTM step from the state that episode had reached (it is reset only afterwards).
            cut = np.flatnonzero(trunc & ~term)
            if len(cut):
                final = torch.as_tensor(np.stack(info["final_obs"][cut]), device=device)
                with torch.no_grad():
                    final_value = agent.get_value(agent.normalize_obs(final), taken[cut], (lstm_state[0][:, cut],
                                                  lstm_state[1][:, cut]), torch.zeros(len(cut), device=device))
                reward[cut] += args.gamma * final_value.flatten()
            next_start = torch.as_tensor(done, dtype=torch.float32, device=device)
            next_prev = taken * (1.0 - next_start).unsqueeze(1)
            rewards[step], dones[step] = reward, next_start
            next_obs = torch.as_tensor(next_obs_np, device=device)

            progress.log(writer, info, done, global_step)

        with torch.no_grad():
            last_value = agent.get_value(agent.normalize_obs(next_obs), next_prev, lstm_state, next_start).flatten()
        advantages = compute_gae(rewards, values, dones, last_value, args.gamma, args.gae_lambda)
        returns = advantages + values

        # Sequences of seq_len steps: (seq_len, num_seqs, ...), each with its stored initial state.
        s_obs, s_actions, s_starts, s_prevs = (to_sequences(t, seq_len) for t in (obs, actions, starts, prevs))
        s_logprobs, s_advantages, s_returns, s_values = (to_sequences(t, seq_len)
                                                         for t in (logprobs, advantages, returns, values))
        s_ratio_max = to_sequences(ratio_max(floors, logprobs, args.clip_coef, agent.actor.out_features), seq_len)
        s_h, s_c = (s.transpose(0, 1).reshape(agent.rnn.num_layers, num_seqs, -1) for s in (chunk_h, chunk_c))
        if not agent.continuous:
            s_actions = s_actions.long()

        seq_inds = np.arange(num_seqs)
        stats = {k: [] for k in ("policy_loss", "value_loss", "entropy", "old_approx_kl", "approx_kl", "clipfrac")}
        for epoch in range(args.update_epochs):
            np.random.shuffle(seq_inds)
            for start in range(0, num_seqs, seqs_per_minibatch):
                # A tensor index: a numpy one would be converted again for every buffer it indexes.
                mb = torch.as_tensor(seq_inds[start:start + seqs_per_minibatch], device=device)

                def take(t: torch.Tensor) -> torch.Tensor:  # minibatch sequences, flattened time-major
                    return t[:, mb].flatten(0, 1)

                _, newlogprob, entropy, newvalue, _ = agent.get_action_and_value(
                    take(s_obs), take(s_prevs), (s_h[:, mb], s_c[:, mb]), take(s_starts), take(s_actions))
                logratio = newlogprob - take(s_logprobs)
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
                newvalue = newvalue.view(-1)
                mb_values, mb_returns = take(s_values), take(s_returns)
                if epoch == 0 and start == 0:  # before any gradient step the update reproduces the rollout
                    replay_error = max(logratio.abs().max().item(), (newvalue - mb_values).abs().max().item())
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
        if counter is not None:
            writer.add_scalar("intrinsic/explore_floor_mean", floors.mean().item(), global_step)
        writer.add_scalar("charts/SPS", sps, global_step)
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
