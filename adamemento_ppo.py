"""AdaMemento on PPO (Yan, Gan et al., arXiv 2410.04498), CleanRL style, one file.

Design, the off-policy correction in full, and every measurement: docs/adamemento_ppo.md.

AdaMemento adds three things to PPO (this file follows ppo_baseline.py line for line wherever it can):

1. Memory reflection. Finished trajectories go into a success or a failure buffer (``--success-rule``).
   A prediction network learns the known-good local policy from the successes (state -> action); a
   reflection network learns from both buffers, sampled half and half, the probability that taking
   action a in state s belongs to a successful trajectory. At the prediction network's action it is
   the memory's confidence.
2. Coarse-fine distinction (``--intrinsic coarse-fine``). An autoencoder with a sparse non-negative
   code: coarse novelty = reconstruction error, fine novelty = rarity of the latent units an
   observation activates, which separates observations that reconstruct equally well. As in RND
   (Burda et al. 2018) the intrinsic reward is divided by the running std of a non-episodic
   discounted intrinsic return along the time axis, with its own value head. ``--intrinsic rnd``
   swaps in RND, ``none`` removes the stream.
3. Confidence ensemble. Where the reflection confidence exceeds ``--kappa`` the memory acts
   (exploitation), elsewhere the PPO policy samples (exploration). Balanced batches make the
   reflection output the posterior of success under equal priors, so 0.5 is its decision boundary
   (the discrete-action default); for continuous actions the memory's regressed action is held by no
   buffer and the default keeps a margin (0.8).

``--intrinsic rnd --no-reflection`` is the PPO+RND baseline; ``--intrinsic none --no-reflection`` is
exactly ppo_baseline.py (same seed, same weights: tested).

Off-policy correction (the paper's equations are not public; this is our choice). Memory actions are
not samples of pi_old, so each step records its behaviour distribution mu: pi_old where the policy
acts, (1 - eps) m + eps pi_old where the memory is confident (``--memory-epsilon``; m is a point mass
on the prediction network's action, or a Gaussian with the policy's std), so pi_old / mu <= 1/eps.
The update uses truncated importance sampling throughout: the decoupled PPO objective of Hilton et al.
2021, w * max(-A r, -A clip(r)) with r = pi_theta / pi_old and w = min(1, pi_old / mu); GAE with
Retrace-style traces c = min(1, pi_old / mu) on the later actions (Munos et al. 2016; V-trace); value
targets V(s) + w A. When the memory never acts, w = c = 1 and every formula is PPO's.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
from gymnasium import spaces
from torch.distributions import Categorical, Normal

from memory_envs import FlattenObservation
from run_contract import (Progress, Run, RunArgs, UserError, check_flags, check_spaces, episode_extras, finished_episode,
                          is_atari, make_base_env, make_batched_env, parse_env_kwargs, run_cli)


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
    """the discount factor gamma (extrinsic stream)"""
    gae_lambda: float = 0.95
    """the lambda for the general advantage estimation"""
    num_minibatches: Optional[int] = None
    """the number of mini-batches"""
    update_epochs: Optional[int] = None
    """the K epochs to update the policy"""
    norm_adv: bool = True
    """toggles advantages normalization"""
    clip_coef: Optional[float] = None
    """the surrogate clipping coefficient"""
    clip_vloss: bool = True
    """toggles whether or not to use a clipped loss for the (extrinsic) value function"""
    ent_coef: Optional[float] = None
    """coefficient of the entropy"""
    vf_coef: float = 0.5
    """coefficient of the value function"""
    max_grad_norm: float = 0.5
    """the maximum norm for the gradient clipping"""
    target_kl: Optional[float] = None
    """the target KL divergence threshold"""
    normalize: Optional[bool] = None
    """observation and reward normalisation for the policy"""

    # AdaMemento: memory reflection and confidence ensemble
    reflection: bool = True
    """memory reflection + confidence ensemble (`--no-reflection`: the PPO policy always acts)"""
    kappa: Optional[float] = None
    """confidence threshold: the memory acts where the reflection confidence exceeds it"""
    memory_epsilon: float = 0.1
    """where the memory is confident, the policy still samples with this probability (keeps
    the behaviour distribution covering the policy; importance ratios stay <= 1/eps)"""
    success_rule: Literal["quantile", "positive"] = "quantile"
    """a finished episode is a success if its extrinsic return is above the running quantile
    of recent returns (`quantile`; below = failure, ties are not stored) or > 0 (`positive`,
    for sparse tasks; <= 0 = failure)"""
    success_quantile: float = 0.8
    """the quantile of `--success-rule quantile`"""
    buffer_size: Optional[int] = None
    """capacity of each of the success and failure buffers, in transitions"""
    memory_updates: int = 16
    """gradient steps of the prediction and reflection networks per memory update"""
    memory_lr: float = 1e-3
    """learning rate of the prediction and reflection networks"""
    eval_memory: bool = True
    """evaluate the ensemble (memory where confident, else the greedy policy); off: policy only"""

    # AdaMemento: intrinsic motivation
    intrinsic: Literal["coarse-fine", "rnd", "none"] = "coarse-fine"
    """intrinsic reward: AdaMemento's coarse-fine distinction, RND, or none"""
    coarse: bool = True
    """coarse novelty (autoencoder reconstruction error); `--no-coarse` drops it"""
    fine: bool = True
    """fine novelty (rarity of the active latent units); `--no-fine` drops it"""
    fine_bonus: Literal["surprisal", "count"] = "surprisal"
    """fine novelty from the firing of the active latent units: mean surprisal -log f_j of their
    firing frequency (never fades: the policy keeps exploring and the memory exploits), or the
    count bonus 1/sqrt(n_j + 1) (fades with visitation, like RND's error)"""
    center_novelty: bool = True
    """standardise each novelty term by its running mean and std (a zero-mean exploration signal
    that does not vanish); `--no-center-novelty`: divide by the running std only, as RND"""
    coarse_coef: float = 1.0
    """weight of the (standardised) coarse novelty"""
    fine_coef: float = 1.0
    """weight of the (standardised) fine novelty"""
    ext_coef: float = 2.0
    """weight of the extrinsic advantage (RND: 2)"""
    int_coef: float = 1.0
    """weight of the intrinsic advantage (RND: 1)"""
    int_gamma: float = 0.99
    """discount of the non-episodic intrinsic return"""
    update_proportion: float = 0.25
    """fraction of each minibatch the novelty model (autoencoder or RND predictor) trains on"""

SUCCESS_WINDOW = 100  # the success quantile is taken over the last 100 episode returns
MEMORY_BATCH_SIZE = 256  # samples per memory gradient step (half from each buffer for the reflection network)
RHO_BAR = C_BAR = 1.0  # truncation of importance weights and traces at 1, as V-trace: exactly PPO when mu = pi_old
LATENT_DIM = 64  # size of the autoencoder's sparse code
SPARSITY_COEF = 1e-3  # L1 penalty that makes the code sparse, so active units carry an observation's identity


PRESETS = {
    "vector": dict(learning_rate=2.5e-4, num_envs=4, num_steps=128, num_minibatches=4,
                   update_epochs=4, clip_coef=0.2, ent_coef=0.01, normalize=False, buffer_size=20_000,
                   kappa=0.5),
    "atari": dict(learning_rate=2.5e-4, num_envs=8, num_steps=128, num_minibatches=4,
                  update_epochs=4, clip_coef=0.1, ent_coef=0.01, normalize=False, buffer_size=5_000,
                  kappa=0.5),
    "continuous": dict(learning_rate=3e-4, num_envs=1, num_steps=2048, num_minibatches=32,
                       update_epochs=10, clip_coef=0.2, ent_coef=0.0, normalize=True, buffer_size=20_000,
                       kappa=0.8),
}


# ---- Environments (as ppo_baseline.py)
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


# ---- Networks
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


def channels_last(shape: tuple[int, ...]) -> bool:
    return shape[-1] in (1, 3, 4) and shape[0] not in (1, 3, 4)


def image_encoder(shape: tuple[int, ...]) -> tuple[nn.Module, int, bool]:
    """Nature CNN for images of at least 36x36 pixels, a 3x3 conv stack for smaller ones.

    Returns the encoder, its output size and whether input is channels-last (HWC).
    """
    last = channels_last(shape)
    c, h, w = (shape[2], shape[0], shape[1]) if last else shape
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
    return nn.Sequential(conv, layer_init(nn.Linear(n_flat, 512)), nn.ReLU()), 512, last


class Permute(nn.Module):
    """HWC -> CHW for channels-last images; identity otherwise."""

    def __init__(self, last: bool):
        super().__init__()
        self.last = last

    def forward(self, x):
        return x.permute(0, 3, 1, 2) if self.last else x


def trunk(obs_shape: tuple[int, ...], hidden: int = 64) -> tuple[nn.Module, int]:
    """Feature extractor of the memory networks: the policy's CNN for images, else a tanh MLP.

    Takes preprocessed input (``Agent.preprocess``), images channels-first.
    """
    if len(obs_shape) == 3:
        enc, n, last = image_encoder(obs_shape)
        return (nn.Sequential(Permute(last), enc), n)
    n_in = int(np.prod(obs_shape))
    return nn.Sequential(nn.Flatten(), layer_init(nn.Linear(n_in, hidden)), nn.Tanh(),
                         layer_init(nn.Linear(hidden, hidden)), nn.Tanh()), hidden


class Agent(nn.Module):
    """ppo_baseline's agent with a second value head for the intrinsic return (RND's two heads)."""

    def __init__(self, obs_space: spaces.Box, action_space: spaces.Space, normalize_obs: bool,
                 intrinsic_head: bool):
        super().__init__()
        self.continuous = isinstance(action_space, spaces.Box)
        self.image = is_image(obs_space)
        self.scale = 255.0 if obs_space.dtype == np.uint8 else 1.0
        n_out = int(np.prod(action_space.shape)) if self.continuous else int(action_space.n)
        n_values = 2 if intrinsic_head else 1  # column 0: extrinsic value, column 1: intrinsic value
        self.obs_rms = RunningMeanStd(obs_space.shape) if normalize_obs else None
        if self.image:
            self.encoder, n_feat, self.channels_last = image_encoder(obs_space.shape)
            self.actor = layer_init(nn.Linear(n_feat, n_out), std=0.01)
            self.critic = layer_init(nn.Linear(n_feat, n_values), std=1.0)
        else:
            n_in = int(np.prod(obs_space.shape))
            self.encoder = nn.Identity()

            def mlp(out: int, std: float) -> nn.Sequential:
                return nn.Sequential(layer_init(nn.Linear(n_in, 64)), nn.Tanh(),
                                     layer_init(nn.Linear(64, 64)), nn.Tanh(),
                                     layer_init(nn.Linear(64, out), std=std))

            self.actor, self.critic = mlp(n_out, 0.01), mlp(n_values, 1.0)
        if self.continuous:
            self.actor_logstd = nn.Parameter(torch.zeros(1, n_out))

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Scaled and (optionally) normalised observations; also the memory networks' input."""
        x = x.float() / self.scale
        if self.obs_rms is not None:
            x = ((x - self.obs_rms.mean) / torch.sqrt(self.obs_rms.var + 1e-8)).clamp(-10, 10).float()
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(x)
        if self.image:
            return self.encoder(x.permute(0, 3, 1, 2) if self.channels_last else x)
        return x.flatten(1)

    def get_value(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, 1 or 2) values: extrinsic, then intrinsic."""
        return self.critic(self.features(x))

    def get_action_and_value(self, x, action=None, greedy: bool = False):
        """action, log pi(action), entropy, values (batch, 1 or 2), distribution."""
        h = self.features(x)
        out = self.actor(h)
        if self.continuous:
            dist = Normal(out, self.actor_logstd.expand_as(out).exp())
            if action is None:
                action = out if greedy else dist.sample()
            return action, dist.log_prob(action).sum(1), dist.entropy().sum(1), self.critic(h), dist
        dist = Categorical(logits=out)
        if action is None:
            action = out.argmax(1) if greedy else dist.sample()
        return action, dist.log_prob(action), dist.entropy(), self.critic(h), dist


def log_prob(dist, action: torch.Tensor) -> torch.Tensor:
    return dist.log_prob(action).sum(1) if isinstance(dist, Normal) else dist.log_prob(action)


# ---- Memory reflection: success/failure buffers, prediction and reflection networks, ensemble
class TrajectoryBuffer:
    """Bounded FIFO of the (observation, action) pairs of whole trajectories of one outcome.

    When full, the oldest transitions are overwritten; a trajectory longer than the buffer
    keeps its last ``capacity`` steps.
    """

    def __init__(self, capacity: int, obs_shape: tuple, obs_dtype, action_shape: tuple, action_dtype):
        self.capacity = capacity
        self.obs = np.zeros((capacity,) + tuple(obs_shape), obs_dtype)
        self.actions = np.zeros((capacity,) + tuple(action_shape), action_dtype)
        self.pos = self.size = self.trajectories = 0

    def __len__(self) -> int:
        return self.size

    def add(self, obs: np.ndarray, actions: np.ndarray) -> None:
        obs, actions = obs[-self.capacity:], actions[-self.capacity:]
        idx = (self.pos + np.arange(len(obs))) % self.capacity
        self.obs[idx], self.actions[idx] = obs, actions
        self.pos = int((self.pos + len(obs)) % self.capacity)
        self.size = min(self.capacity, self.size + len(obs))
        self.trajectories += 1

    def sample(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        idx = np.random.randint(0, self.size, n)
        return self.obs[idx], self.actions[idx]

    def state_dict(self) -> dict:
        return dict(obs=self.obs[:self.size].copy(), actions=self.actions[:self.size].copy(),
                    pos=self.pos, trajectories=self.trajectories)

    def load_state_dict(self, state: dict) -> None:
        self.size = len(state["obs"])
        self.obs[:self.size], self.actions[:self.size] = state["obs"], state["actions"]
        self.pos, self.trajectories = state["pos"], state["trajectories"]


def sample_balanced(success: TrajectoryBuffer, failure: TrajectoryBuffer, n: int):
    """n/2 pairs from each buffer (with replacement) and their labels (1 = success).

    Balancing keeps the reflection network calibrated to "which outcome does this action
    lead to" rather than to how often each outcome happened to be recorded.
    """
    n_succ = n // 2
    obs_s, act_s = success.sample(n_succ)
    obs_f, act_f = failure.sample(n - n_succ)
    labels = np.concatenate([np.ones(n_succ, np.float32), np.zeros(n - n_succ, np.float32)])
    return np.concatenate([obs_s, obs_f]), np.concatenate([act_s, act_f]), labels


class SuccessRule:
    """Routes a finished episode to the success buffer (True), failure buffer (False) or neither (None)."""

    def __init__(self, rule: str, quantile: float, window: int):
        self.rule, self.quantile = rule, quantile
        self.history: deque = deque(maxlen=window)

    def __call__(self, episode_return: float) -> Optional[bool]:
        if self.rule == "positive":
            return episode_return > 0
        history = list(self.history)
        self.history.append(episode_return)
        if not history:
            return None
        # Strictly above / below the quantile of the *previous* returns; a tie says nothing
        # about which actions were better (e.g. all-zero returns of a sparse task), so it is
        # not stored rather than labelled arbitrarily.
        q = float(np.quantile(history, self.quantile))
        return True if episode_return > q else (False if episode_return < q else None)

    def state_dict(self) -> dict:
        return dict(history=list(self.history))

    def load_state_dict(self, state: dict) -> None:
        self.history.extend(state["history"])


def erase_loops(obs: list[np.ndarray]) -> list[int]:
    """Indices of a trajectory with its loops erased: for every observation that occurs more
    than once, only its *last* occurrence is kept (the action that finally moved on).

    Without it, a success that spent ten steps pushing into a wall stores that useless action
    ten times and the prediction network learns to repeat it -- and, once the memory acts,
    feeds its own mistake back into the buffer. Observations that never repeat (pixels,
    continuous states) are all kept.
    """
    seen, keep = set(), []
    for i in range(len(obs) - 1, -1, -1):
        key = obs[i].tobytes()
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return keep[::-1]


class MemoryReflection(nn.Module):
    """Prediction network (success buffer -> local policy) and reflection network (confidence)."""

    def __init__(self, obs_shape: tuple, action_space: spaces.Space):
        super().__init__()
        self.continuous = isinstance(action_space, spaces.Box)
        n_act = int(np.prod(action_space.shape)) if self.continuous else int(action_space.n)
        self.pred_trunk, n = trunk(obs_shape)
        self.pred_head = layer_init(nn.Linear(n, n_act), std=0.01)
        self.refl_trunk, n = trunk(obs_shape)
        if self.continuous:
            self.refl_head = nn.Sequential(layer_init(nn.Linear(n + n_act, 64)), nn.Tanh(),
                                           layer_init(nn.Linear(64, 1), std=1.0))
        else:
            # One success logit per action: all actions' confidences in one pass.
            self.refl_head = layer_init(nn.Linear(n, n_act), std=1.0)
        self.register_buffer("updates", torch.tensor(0))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Action logits (discrete) or the predicted action (continuous)."""
        return self.pred_head(self.pred_trunk(x))

    def confidence_logit(self, x: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        h = self.refl_trunk(x)
        if self.continuous:
            return self.refl_head(torch.cat([h, action.float()], 1)).squeeze(1)
        return self.refl_head(h).gather(1, action.long().view(-1, 1)).squeeze(1)

    @torch.no_grad()
    def propose(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The memory's action (argmax / predicted mean) and its confidence in [0, 1]."""
        out = self.predict(x)
        action = out if self.continuous else out.argmax(1)
        return action, torch.sigmoid(self.confidence_logit(x, action))

    def prediction_loss(self, x: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Imitate the successful actions: cross-entropy (discrete) or squared error (continuous)."""
        out = self.predict(x)
        return F.mse_loss(out, action.float()) if self.continuous else F.cross_entropy(out, action.long())

    def reflection_loss(self, x: torch.Tensor, action: torch.Tensor,
                        labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Binary cross-entropy of the confidence against the outcome label; also the accuracy."""
        logit = self.confidence_logit(x, action)
        accuracy = ((logit > 0).float() == labels).float().mean()
        return F.binary_cross_entropy_with_logits(logit, labels), accuracy


def ensemble_step(dist, proposal: torch.Tensor, confidence: torch.Tensor, kappa: float, eps: float,
                  policy_action: torch.Tensor, uniform: torch.Tensor):
    """AdaMemento's confidence ensemble with the behaviour distribution actually used.

    Where ``confidence > kappa`` the memory acts with probability 1 - eps (``uniform`` are
    U(0,1) draws), otherwise the policy's sample ``policy_action`` is taken. Returns the action,
    log pi_old(action), log mu(action) (mu = the behaviour mixture described in the module
    docstring) and the mask of memory-chosen actions.
    """
    gate = confidence > kappa
    use_memory = gate & (uniform >= eps)
    if isinstance(dist, Normal):
        # The memory's continuous action is Gaussian around its prediction with the policy's
        # std, so mu has a density (a point mass would make pi/mu zero everywhere).
        memory_dist = Normal(proposal, dist.stddev)
        memory_action = memory_dist.sample()
        action = torch.where(use_memory.unsqueeze(1), memory_action, policy_action)
        logp_old = dist.log_prob(action).sum(1)
        log_m = memory_dist.log_prob(action).sum(1)
    else:
        action = torch.where(use_memory, proposal, policy_action)
        logp_old = dist.log_prob(action)
        log_m = torch.where(action == proposal, 0.0, -torch.inf)
    mix = torch.logaddexp(log_m + np.log1p(-eps), logp_old + (np.log(eps) if eps > 0 else -np.inf))
    log_mu = torch.where(gate, mix, logp_old)
    return action, logp_old, log_mu, use_memory


# ---- Intrinsic motivation: coarse-fine distinction (AdaMemento) or RND
class NoveltyInput(nn.Module):
    """Observation preprocessing of the novelty models, as RND: the last frame only for Atari
    stacks, channels first, normalised per element by running statistics and clipped to +-5."""

    def __init__(self, obs_space: spaces.Box, atari: bool):
        super().__init__()
        shape = tuple(obs_space.shape)
        self.scale = 255.0 if obs_space.dtype == np.uint8 else 1.0
        self.image, self.atari = len(shape) == 3, atari
        self.last = self.image and not atari and channels_last(shape)
        if atari:
            self.shape = (1,) + shape[1:]
        elif self.last:
            self.shape = (shape[2], shape[0], shape[1])
        else:
            self.shape = shape if self.image else (int(np.prod(shape)),)
        self.rms = RunningMeanStd(self.shape)

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / self.scale
        if self.atari:
            return x[:, -1:]
        if self.last:
            return x.permute(0, 3, 1, 2)
        return x if self.image else x.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((self.raw(x) - self.rms.mean) / torch.sqrt(self.rms.var + 1e-8)).clamp(-5, 5).float()


def novelty_encoder(shape: tuple, n_out: int) -> nn.Module:
    """Conv stack (images, channels first) or MLP (vectors) to ``n_out`` features."""
    if len(shape) == 3:
        enc, n, _ = image_encoder(shape)
        return nn.Sequential(enc, layer_init(nn.Linear(n, n_out)))
    return nn.Sequential(layer_init(nn.Linear(shape[0], 256)), nn.ReLU(),
                         layer_init(nn.Linear(256, 256)), nn.ReLU(), layer_init(nn.Linear(256, n_out)))


class CoarseFine(nn.Module):
    """AdaMemento's coarse-fine distinction module.

    Autoencoder with a ReLU (non-negative) latent code made sparse by an L1 penalty. For an
    observation x with code z and reconstruction x':
      coarse(x) = mean squared reconstruction error (low for frequently seen observations);
      fine(x)   = how rarely the units this observation activates (z_j > 0) have fired, as the
                  mean over its active units of either the surprisal -log f_j, f_j = (n_j + 1) /
                  (N + 2) the smoothed fraction of observations in which unit j was active
                  (``--fine-bonus surprisal``), or the count bonus 1 / sqrt(n_j + 1) (``count``,
                  Tang et al. 2017 count hashed codes the same way).
    Near-identical images reconstruct almost equally well, but once the sparse code assigns
    them different units, a state whose units rarely fire is still recognised as novel.

    Each term is standardised by its running mean and std (``--center-novelty``) or divided by
    its running std only, so ``--coarse-coef``/``--fine-coef`` are relative weights. Centring
    matters for the surprisal: it has a large constant part (every code has active units)
    which would otherwise dominate the std of the intrinsic return and shrink the differences
    between states -- the part that drives exploration -- to nothing. Surprisal + centring
    gives an exploration drive that never fades (AdaMemento leaves exploitation to the
    memory); count + std-only fades as states become familiar, as RND's bonus does. The
    intrinsic stream is non-episodic, so negative rewards give no incentive to end episodes.
    """

    def __init__(self, shape: tuple, latent_dim: int, coarse_coef: float, fine_coef: float,
                 sparsity_coef: float, fine_bonus: str = "surprisal", center: bool = True):
        super().__init__()
        self.coarse_coef, self.fine_coef, self.sparsity_coef = coarse_coef, fine_coef, sparsity_coef
        self.fine_bonus, self.center = fine_bonus, center
        self.encoder = nn.Sequential(novelty_encoder(shape, latent_dim), nn.ReLU())
        # An MLP decoder reconstructs any input size exactly (a transposed-conv stack would
        # have to be fitted to each image size).
        n_in = int(np.prod(shape))
        self.decoder = nn.Sequential(layer_init(nn.Linear(latent_dim, 256)), nn.ReLU(),
                                     layer_init(nn.Linear(256, n_in), std=1.0))
        self.register_buffer("unit_counts", torch.zeros(latent_dim, dtype=torch.float64))
        self.register_buffer("seen", torch.tensor(0.0, dtype=torch.float64))
        self.coarse_rms, self.fine_rms = RunningMeanStd(()), RunningMeanStd(())

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x)
        recon = self.decoder(z).view_as(x)
        return F.mse_loss(recon, x) + self.sparsity_coef * z.abs().sum(1).mean()

    @torch.no_grad()
    def novelty(self, x: torch.Tensor, update: bool = True) -> tuple[torch.Tensor, dict]:
        z = self.encoder(x)
        coarse = (self.decoder(z).view_as(x) - x).pow(2).flatten(1).mean(1)
        active = (z > 0).double()
        if self.fine_bonus == "surprisal":
            unit_bonus = -((self.unit_counts + 1.0) / (self.seen + 2.0)).log()
        else:
            unit_bonus = (self.unit_counts + 1.0).rsqrt()
        fine = ((active * unit_bonus).sum(1) / active.sum(1).clamp(min=1.0)).float()
        if update:
            self.unit_counts += active.sum(0)
            self.seen += x.shape[0]
            self.coarse_rms.update(coarse)
            self.fine_rms.update(fine)
        reward = torch.zeros_like(coarse)
        for coef, term, rms in ((self.coarse_coef, coarse, self.coarse_rms), (self.fine_coef, fine, self.fine_rms)):
            if coef:
                centred = term - rms.mean if self.center else term
                reward += coef * (centred / torch.sqrt(rms.var + 1e-8)).float()
        return reward, dict(coarse=coarse.mean().item(), fine=fine.mean().item(),
                            active_units=active.sum(1).mean().item())


class RND(nn.Module):
    """Random network distillation (Burda et al. 2018): novelty = squared error of a trained
    predictor against a fixed random target network."""

    def __init__(self, shape: tuple):
        super().__init__()
        self.target = novelty_encoder(shape, 128)
        self.predictor = novelty_encoder(shape, 128)
        for p in self.target.parameters():
            p.requires_grad_(False)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.predictor(x), self.target(x))

    @torch.no_grad()
    def novelty(self, x: torch.Tensor, update: bool = True) -> tuple[torch.Tensor, dict]:
        err = (self.predictor(x) - self.target(x)).pow(2).mean(1)
        return err, dict(rnd_error=err.mean().item())


class RewardForwardFilter:
    """Discounted intrinsic return along the time axis, never reset at episode ends (RND's
    non-episodic intrinsic return); its running std normalises the intrinsic reward."""

    def __init__(self, num_envs: int, gamma: float):
        self.gamma = gamma
        self.returns = np.zeros(num_envs)
        self.rms = RunningMeanStd(())

    def __call__(self, rewards: np.ndarray) -> np.ndarray:
        """``rewards``: (T, N) raw intrinsic rewards of one rollout -> normalised rewards."""
        for t in range(rewards.shape[0]):  # time axis (CleanRL's RND iterates envs: bug #360)
            self.returns = self.returns * self.gamma + rewards[t]
            self.rms.update(torch.as_tensor(self.returns))
        return rewards / np.sqrt(self.rms.var.item() + 1e-8)

    def state_dict(self) -> dict:
        return dict(rms=self.rms.state_dict(), returns=self.returns)

    def load_state_dict(self, state: dict) -> None:
        self.rms.load_state_dict(state["rms"])
        self.returns = state["returns"]


# ---- Returns
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


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor,
                last_value: torch.Tensor, gamma: float, lam: float,
                traces: Optional[torch.Tensor] = None) -> torch.Tensor:
    """GAE over a (T, N) rollout, with Retrace-style truncated importance traces.

    ``A_t = delta_t + gamma * lam * (1 - d_t) * c_{t+1} * A_{t+1}``, ``c = traces`` (=
    min(c_bar, pi_old/mu)); ``traces=None`` (all ones) is ppo_baseline's GAE. ``dones[t]``
    marks that the episode ended with action t; truncated episodes already carry
    ``gamma * V(final_obs)`` in ``rewards[t]``. ``last_value`` is V of the observation that
    follows the rollout.
    """
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(last_value)
    next_value = last_value
    for t in reversed(range(rewards.shape[0])):
        not_done = 1.0 - dones[t]
        delta = rewards[t] + gamma * next_value * not_done - values[t]
        trace = 1.0 if traces is None or t + 1 == rewards.shape[0] else traces[t + 1]
        last_gae = delta + gamma * lam * not_done * trace * last_gae
        advantages[t] = last_gae
        next_value = values[t]
    return advantages


# ---- Evaluation
@torch.no_grad()
def evaluate(agent: Agent, memory: Optional[MemoryReflection], args: Args, env_kwargs: dict, kind: str,
             device: torch.device, video_dir: str = "") -> dict:
    """Greedy evaluation of ``--eval-episodes`` on fresh envs seeded apart from training; every env runs a
    fixed quota of episodes so short episodes are not over-represented. With a trained memory (and
    ``--eval-memory``) the ensemble acts: the memory's action where its confidence > kappa."""
    episodes = args.eval_episodes
    n_envs = max(1, min(episodes, 8))
    quota = [episodes // n_envs + (i < episodes % n_envs) for i in range(n_envs)]
    envs = make_vector_env(args, env_kwargs, kind, n_envs, video_dir)
    obs, _ = envs.reset(seed=[args.seed + 100_000 + i for i in range(n_envs)])
    returns, successes, done_count, memory_steps, steps = [], [], [0] * n_envs, 0, 0
    while any(d < q for d, q in zip(done_count, quota)):
        x = torch.as_tensor(obs, device=device)
        action, _, _, _, _ = agent.get_action_and_value(x, greedy=True)
        if memory is not None:
            proposal, confidence = memory.propose(agent.preprocess(x))
            gate = confidence > args.kappa
            action = torch.where(gate.view(-1, *([1] * (action.dim() - 1))), proposal, action)
            memory_steps += int(gate.sum())
        steps += n_envs
        obs, _, term, trunc, info = envs.step(action.cpu().numpy())
        for i in np.flatnonzero(term | trunc):
            if done_count[i] < quota[i]:
                ep_r, _, success = finished_episode(info, i)
                returns.append(ep_r)
                if success is not None:
                    successes.append(float(success))
                done_count[i] += 1
    envs.close()
    return dict(mean_return=float(np.mean(returns)), std_return=float(np.std(returns)),
                success_rate=float(np.mean(successes)) if successes else None,
                memory_action_fraction=memory_steps / steps if memory is not None else None)


# ---- Training
def check_args(args: Args) -> None:
    check_flags(args, at_least_one=("buffer_size", "memory_updates"),
                non_negative=("memory_lr", "coarse_coef", "fine_coef", "ext_coef", "int_coef"),
                unit=("kappa", "success_quantile", "update_proportion", "int_gamma"))
    if not 0.0 <= args.memory_epsilon < 1.0:
        raise UserError(f"--memory-epsilon must be in [0, 1), got {args.memory_epsilon}")
    if args.int_gamma == 0:
        raise UserError(f"--int-gamma must be > 0, got {args.int_gamma}")
    if args.intrinsic != "coarse-fine" and not (args.coarse and args.fine):
        raise UserError(f"--no-coarse/--no-fine only apply to --intrinsic coarse-fine, got --intrinsic {args.intrinsic}")
    if args.intrinsic != "coarse-fine" and (args.fine_bonus != "surprisal" or not args.center_novelty):
        raise UserError(f"--fine-bonus/--no-center-novelty only apply to --intrinsic coarse-fine, "
                        f"got --intrinsic {args.intrinsic}")
    if args.intrinsic == "coarse-fine" and not (args.coarse or args.fine):
        raise UserError("--no-coarse together with --no-fine leaves no intrinsic reward: use --intrinsic none")


def main(args: Args) -> None:
    run = Run(args, Args)
    args = run.args
    env_kwargs = parse_env_kwargs(args.env_kwargs)
    probe = make_base_env(args.env_id, env_kwargs, **(dict(frameskip=1) if is_atari(args.env_id) else {}))
    check_spaces(probe, (spaces.Discrete, spaces.Box))
    kind = env_kind(args.env_id, probe)
    probe.close()
    for key, value in PRESETS[kind].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    check_args(args)
    batch_size = args.num_envs * args.num_steps
    if batch_size % args.num_minibatches:
        raise UserError(f"--num-minibatches {args.num_minibatches} must divide num_envs*num_steps={batch_size}")
    minibatch_size, num_iterations = batch_size // args.num_minibatches, run.iterations(batch_size)
    device = run.start()

    envs = make_vector_env(args, env_kwargs, kind, args.num_envs, "" if args.evaluate else os.path.join(run.dir, "videos"))
    obs_space, act_space = envs.single_observation_space, envs.single_action_space
    use_int = args.intrinsic != "none"
    agent = Agent(obs_space, act_space, args.normalize, use_int).to(device)
    optimizer = optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    reward_scaler = RewardScaler(args.num_envs, args.gamma) if args.normalize else None

    novelty_in = novelty = novelty_optimizer = int_filter = None
    if use_int:
        novelty_in = NoveltyInput(obs_space, kind == "atari").to(device)
        if args.intrinsic == "rnd":
            novelty = RND(novelty_in.shape).to(device)
        else:
            novelty = CoarseFine(novelty_in.shape, LATENT_DIM, args.coarse_coef if args.coarse else 0.0,
                                 args.fine_coef if args.fine else 0.0, SPARSITY_COEF, args.fine_bonus,
                                 args.center_novelty).to(device)
        novelty_optimizer = optim.Adam([p for p in novelty.parameters() if p.requires_grad],
                                       lr=args.learning_rate, eps=1e-5)
        int_filter = RewardForwardFilter(args.num_envs, args.int_gamma)

    memory = memory_optimizer = None
    success_rule = SuccessRule(args.success_rule, args.success_quantile, SUCCESS_WINDOW)
    if args.reflection:
        memory = MemoryReflection(obs_space.shape, act_space).to(device)
        memory_optimizer = optim.Adam(memory.parameters(), lr=args.memory_lr, eps=1e-5)
        act_dtype = np.float32 if agent.continuous else np.int64
        buffers = {k: TrajectoryBuffer(args.buffer_size, obs_space.shape, obs_space.dtype, act_space.shape,
                                       act_dtype) for k in ("success", "failure")}
        pending: list[list] = [[] for _ in range(args.num_envs)]

    state = run.state
    if state is not None:
        agent.load_state_dict(state["agent"])
        if memory is not None and state.get("memory") is not None:
            memory.load_state_dict(state["memory"])
    if args.evaluate:
        return finish(run, (agent, memory), env_kwargs, kind, device, dict(global_step=state.get("global_step", 0)))
    # Everything a checkpoint holds, for saving and restoring alike (episodes in progress are not saved: a
    # resumed run restarts its envs).
    stateful = dict(optimizer=optimizer, reward_rms=reward_scaler.rms if reward_scaler else None, novelty_in=novelty_in,
                    novelty=novelty, novelty_optimizer=novelty_optimizer, int_filter=int_filter,
                    memory_optimizer=memory_optimizer, success_rule=success_rule,
                    **({f"buffer_{k}": b for k, b in buffers.items()} if memory is not None else {}))
    if state is not None:
        for key, obj in stateful.items():
            if obj is not None:
                obj.load_state_dict(state[key])
        run.restore_rng()
        print(f"resuming {run.dir} at step {run.global_step}", flush=True)
    writer, global_step = run.writer, run.global_step

    obs_dtype = torch.uint8 if obs_space.dtype == np.uint8 else torch.float32
    obs = torch.zeros((args.num_steps, args.num_envs) + obs_space.shape, dtype=obs_dtype, device=device)
    # The state each action led to (final_obs at episode ends): what the novelty reward scores.
    next_obs_buf = torch.zeros_like(obs) if use_int else None
    actions = torch.zeros((args.num_steps, args.num_envs) + act_space.shape, device=device)
    n_values = 2 if use_int else 1
    values = torch.zeros((args.num_steps, args.num_envs, n_values), device=device)
    logprobs, behaviour_logprobs, rewards, dones = (torch.zeros((args.num_steps, args.num_envs), device=device)
                                                    for _ in range(4))

    # Resumed runs restart their envs with a different seed so they do not replay old episodes.
    next_obs, _ = envs.reset(seed=args.seed + run.start_iteration - 1)
    next_obs = torch.as_tensor(next_obs, device=device)
    progress = Progress(args.total_timesteps)
    start_step, last_ckpt = global_step, time.time()
    for iteration in range(run.start_iteration, num_iterations + 1):
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = (1.0 - (iteration - 1.0) / num_iterations) * args.learning_rate
        memory_ready = (memory is not None and int(memory.updates) > 0
                        and len(buffers["success"]) > 0 and len(buffers["failure"]) > 0)
        confidences, memory_chosen = [], 0

        for step in range(args.num_steps):
            global_step += args.num_envs
            obs[step] = next_obs
            with torch.no_grad():
                action, logprob, _, value, dist = agent.get_action_and_value(next_obs)
                log_mu = logprob
                if memory_ready:
                    proposal, confidence = memory.propose(agent.preprocess(next_obs))
                    uniform = torch.rand(args.num_envs, device=device)
                    action, logprob, log_mu, chosen = ensemble_step(dist, proposal, confidence, args.kappa,
                                                                    args.memory_epsilon, action, uniform)
                    confidences.append(confidence)
                    memory_chosen += int(chosen.sum())
            values[step], actions[step], logprobs[step] = value, action, logprob
            behaviour_logprobs[step] = log_mu
            action_np = action.cpu().numpy()
            next_obs_np, reward, term, trunc, info = envs.step(action_np)
            done = term | trunc
            if kind == "atari":
                reward = np.sign(reward)
            if reward_scaler is not None:
                reward = reward_scaler(reward, done)
            reward = torch.as_tensor(reward, dtype=torch.float32, device=device)
            # Truncation is not termination: bootstrap the cut-off return with V_ext(final_obs).
            cut = np.flatnonzero(trunc & ~term)
            if len(cut):
                final = torch.as_tensor(np.stack(info["final_obs"][cut]), device=device)
                with torch.no_grad():
                    reward[cut] += args.gamma * agent.get_value(final)[:, 0]
            rewards[step], dones[step] = reward, torch.as_tensor(done, dtype=torch.float32, device=device)
            next_obs = torch.as_tensor(next_obs_np, device=device)
            if next_obs_buf is not None:
                next_obs_buf[step] = next_obs
                ended = np.flatnonzero(done)
                if len(ended):
                    next_obs_buf[step, ended] = torch.as_tensor(np.stack(info["final_obs"][ended]), device=device,
                                                                dtype=next_obs_buf.dtype)
            if memory is not None:
                obs_np = obs[step].cpu().numpy()
                for i in range(args.num_envs):
                    pending[i].append((obs_np[i], action_np[i]))

            for i in np.flatnonzero(done):
                ep_r, ep_l, success = finished_episode(info, i)
                writer.add_scalar("charts/episodic_return", ep_r, global_step)
                writer.add_scalar("charts/episodic_length", ep_l, global_step)
                if success is not None:
                    writer.add_scalar("charts/episodic_success", float(success), global_step)
                for key, value in episode_extras(info, i).items():  # e.g. the rooms of MontezumaRevengeRooms
                    writer.add_scalar(f"charts/episodic_{key}", value, global_step)
                progress.episode(ep_r, success)
                if memory is not None:
                    # Memory reflection: the whole trajectory goes to the buffer of its outcome.
                    outcome = success_rule(ep_r)
                    if outcome is not None:
                        # loops erased: only the last visit of a repeated observation is stored
                        traj = [pending[i][j] for j in erase_loops([o for o, _ in pending[i]])][-args.buffer_size:]
                        buffers["success" if outcome else "failure"].add(
                            np.stack([o for o, _ in traj]), np.stack([a for _, a in traj]))
                    pending[i] = []

        with torch.no_grad():
            last_value = agent.get_value(next_obs)
        # Behaviour correction: truncated importance ratios pi_old/mu (all ones without memory).
        is_ratio = (logprobs - behaviour_logprobs).exp()
        weights, traces = is_ratio.clamp(max=RHO_BAR), is_ratio.clamp(max=C_BAR)
        advantages = compute_gae(rewards, values[..., 0], dones, last_value[:, 0], args.gamma, args.gae_lambda,
                                 traces)
        returns = values[..., 0] + weights * advantages
        int_stats = {}
        if use_int:
            flat_next = next_obs_buf.reshape((-1,) + obs_space.shape)
            novelty_in.rms.update(novelty_in.raw(flat_next))
            with torch.no_grad():
                int_raw, int_stats = novelty.novelty(novelty_in(flat_next))
            int_rewards = torch.as_tensor(int_filter(int_raw.view(args.num_steps, args.num_envs).cpu().numpy()),
                                          dtype=torch.float32, device=device)
            # Non-episodic intrinsic return: episode ends do not cut it (dones = 0).
            int_advantages = compute_gae(int_rewards, values[..., 1], torch.zeros_like(dones), last_value[:, 1],
                                         args.int_gamma, args.gae_lambda, traces)
            int_returns = values[..., 1] + weights * int_advantages
            b_next = flat_next
            b_int_returns = int_returns.reshape(-1)
            combined = args.ext_coef * advantages + args.int_coef * int_advantages
        else:
            combined = advantages

        b_obs = obs.reshape((-1,) + obs_space.shape)
        b_actions = actions.reshape((-1,) + act_space.shape)
        b_logprobs, b_advantages = logprobs.reshape(-1), combined.reshape(-1)
        b_returns, b_values = returns.reshape(-1), values.reshape(-1, n_values)
        b_weights = weights.reshape(-1)
        if not agent.continuous:
            b_actions = b_actions.long()

        b_inds = np.arange(batch_size)
        stats = {k: [] for k in ("policy_loss", "value_loss", "entropy", "old_approx_kl", "approx_kl", "clipfrac")}
        if use_int:
            stats.update(int_value_loss=[], novelty_loss=[])
        for epoch in range(args.update_epochs):
            np.random.shuffle(b_inds)
            for start in range(0, batch_size, minibatch_size):
                mb = b_inds[start:start + minibatch_size]
                _, newlogprob, entropy, newvalue, _ = agent.get_action_and_value(b_obs[mb], b_actions[mb])
                logratio = newlogprob - b_logprobs[mb]
                ratio = logratio.exp()
                with torch.no_grad():
                    old_approx_kl = (-logratio).mean()
                    approx_kl = ((ratio - 1) - logratio).mean()
                    clipfrac = ((ratio - 1.0).abs() > args.clip_coef).float().mean()
                mb_adv = b_advantages[mb]
                if args.norm_adv:
                    mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
                # Decoupled PPO (Hilton et al. 2021): clip against pi_old, weight by pi_old/mu.
                pg_loss = (b_weights[mb] * torch.max(
                    -mb_adv * ratio, -mb_adv * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef))).mean()
                new_ext = newvalue[:, 0]
                if args.clip_vloss:
                    old = b_values[mb, 0]
                    v_clipped = old + torch.clamp(new_ext - old, -args.clip_coef, args.clip_coef)
                    v_loss = 0.5 * torch.max((new_ext - b_returns[mb]) ** 2, (v_clipped - b_returns[mb]) ** 2).mean()
                else:
                    v_loss = 0.5 * ((new_ext - b_returns[mb]) ** 2).mean()
                entropy_loss = entropy.mean()
                loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef
                if use_int:
                    int_v_loss = 0.5 * ((newvalue[:, 1] - b_int_returns[mb]) ** 2).mean()
                    loss = loss + int_v_loss * args.vf_coef
                    # As RND: the novelty model trains on a random fraction of each minibatch, so
                    # it does not learn the states faster than the policy can visit them.
                    keep = torch.rand(len(mb), device=device) < args.update_proportion
                    nov_loss = novelty.loss(novelty_in(b_next[mb][keep])) if keep.any() else None
                if not torch.isfinite(loss) or (use_int and nov_loss is not None and not torch.isfinite(nov_loss)):
                    raise run.diverged(f"non-finite loss ({loss.item()})", global_step)
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                optimizer.step()
                if use_int and nov_loss is not None:
                    novelty_optimizer.zero_grad()
                    nov_loss.backward()
                    novelty_optimizer.step()
                    stats["novelty_loss"].append(nov_loss.item())
                if use_int:
                    stats["int_value_loss"].append(int_v_loss.item())
                for k, v in (("policy_loss", pg_loss), ("value_loss", v_loss), ("entropy", entropy_loss),
                             ("old_approx_kl", old_approx_kl), ("approx_kl", approx_kl), ("clipfrac", clipfrac)):
                    stats[k].append(v.item())
            if args.target_kl is not None and approx_kl > args.target_kl:
                break

        memory_stats = {}
        if memory is not None and len(buffers["success"]):
            memory_stats = train_memory(memory, memory_optimizer, buffers, agent, args, device)
            if memory_stats is None:
                raise run.diverged("non-finite memory loss", global_step)

        # Normalisation statistics change between rollouts, never inside one, so the update
        # recomputes exactly the log-probabilities the rollout acted with (the first ratio is 1).
        if agent.obs_rms is not None:
            agent.obs_rms.update(obs.reshape((-1,) + envs.single_observation_space.shape).float())

        y_pred, y_true = b_values[:, 0].cpu().numpy(), b_returns.cpu().numpy()
        var_y = np.var(y_true)
        explained_var = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y
        sps = (global_step - start_step) / (time.time() - run.start_time)
        writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
        for k, v in stats.items():
            if v:
                writer.add_scalar(f"losses/{k}", float(np.mean(v)), global_step)
        writer.add_scalar("losses/explained_variance", explained_var, global_step)
        writer.add_scalar("charts/SPS", sps, global_step)
        if use_int:
            writer.add_scalar("intrinsic/reward_mean", int_rewards.mean().item(), global_step)
            writer.add_scalar("intrinsic/reward_max", int_rewards.max().item(), global_step)
            for k, v in int_stats.items():
                writer.add_scalar(f"intrinsic/{k}", v, global_step)
        if memory is not None:
            writer.add_scalar("memory/action_fraction", memory_chosen / batch_size, global_step)
            writer.add_scalar("memory/success_buffer", len(buffers["success"]), global_step)
            writer.add_scalar("memory/failure_buffer", len(buffers["failure"]), global_step)
            writer.add_scalar("memory/importance_weight_mean", weights.mean().item(), global_step)
            if confidences:
                conf = torch.cat(confidences)
                writer.add_scalar("memory/confidence_mean", conf.mean().item(), global_step)
                writer.add_scalar("memory/gate_fraction", (conf > args.kappa).float().mean().item(), global_step)
                writer.add_histogram("memory/confidence", conf.cpu().numpy(), global_step)
            for k, v in memory_stats.items():
                writer.add_scalar(f"memory/{k}", v, global_step)
        progress.maybe_print(global_step, sps, force=iteration == num_iterations)
        if run.due(last_ckpt, iteration == num_iterations):
            run.save(iteration, global_step, agent=agent.state_dict(), memory=memory.state_dict() if memory else None,
                     **{k: obj.state_dict() for k, obj in stateful.items() if obj is not None})
            last_ckpt = time.time()
    envs.close()

    if args.save_model:
        run.save_model(agent=agent.state_dict(), memory=memory.state_dict() if memory else None, global_step=global_step)
    finish(run, (agent, memory), env_kwargs, kind, device,
           dict(global_step=global_step, sps=(global_step - start_step) / max(time.time() - run.start_time, 1e-9),
                wall_time_s=run.wall_time()))


def finish(run: Run, nets: tuple, env_kwargs: dict, kind: str, device: torch.device, record: dict) -> None:
    """Evaluate (the trained agent and memory, or the ones --evaluate loaded) and write eval.json."""
    (agent, memory), args = nets, run.args
    record = dict(record, mean_return=None, std_return=None, success_rate=None, memory_action_fraction=None)
    if args.eval_episodes > 0:
        agent.eval()
        eval_memory = memory if (args.eval_memory and memory is not None and int(memory.updates) > 0) else None
        video = os.path.join(run.dir, "videos") if args.evaluate and args.capture_video else ""
        record.update(evaluate(agent, eval_memory, args, env_kwargs, kind, device, video))
    run.finish(record)


def train_memory(memory: MemoryReflection, optimizer: optim.Optimizer, buffers: dict, agent: Agent,
                 args: Args, device: torch.device) -> Optional[dict]:
    """Memory reflection update: prediction net on successes, reflection net on balanced batches.

    The reflection network needs both outcomes; until a failure is stored only the prediction
    network trains (and the memory does not act). Returns averaged losses, None if non-finite.
    """
    stats = {"pred_loss": [], "refl_loss": [], "refl_accuracy": []}
    both = len(buffers["failure"]) > 0

    def prep(o: np.ndarray) -> torch.Tensor:
        return agent.preprocess(torch.as_tensor(o, device=device)).detach()

    for _ in range(args.memory_updates):
        obs_s, act_s = buffers["success"].sample(MEMORY_BATCH_SIZE)
        pred_loss = memory.prediction_loss(prep(obs_s), torch.as_tensor(act_s, device=device))
        loss = pred_loss
        if both:
            obs_b, act_b, labels = sample_balanced(buffers["success"], buffers["failure"], MEMORY_BATCH_SIZE)
            refl_loss, accuracy = memory.reflection_loss(prep(obs_b), torch.as_tensor(act_b, device=device),
                                                         torch.as_tensor(labels, device=device))
            loss = pred_loss + refl_loss
        if not torch.isfinite(loss):
            return None
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        stats["pred_loss"].append(pred_loss.item())
        if both:
            stats["refl_loss"].append(refl_loss.item())
            stats["refl_accuracy"].append(accuracy.item())
    if both:
        memory.updates += 1
    return {k: float(np.mean(v)) for k, v in stats.items() if v}


if __name__ == "__main__":
    run_cli(main, Args, PRESETS)
