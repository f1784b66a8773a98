"""AdaMemento on PPO (Yan, Gan et al., arXiv 2410.04498), CleanRL style, one file.

Design, the off-policy correction in full, and every measurement: docs/adamemento_ppo.md.

AdaMemento adds three things to PPO (this file follows ppo_baseline.py line for line wherever it can):

1. Memory reflection. Finished trajectories go into a success or a failure buffer (``--success-rule``). A
   prediction network learns the known-good local policy from the successes (state -> action); a reflection
   network learns from both buffers, sampled half and half, the probability that taking action a in state s
   belongs to a successful trajectory: at the prediction's action, the memory's confidence.
2. Coarse-fine distinction (``--intrinsic coarse-fine``). An autoencoder with a sparse non-negative code: coarse
   novelty = reconstruction error, fine novelty = rarity of the latent units an observation activates. As in RND
   (Burda et al. 2018) the intrinsic reward is divided by the running std of a non-episodic intrinsic return, with
   its own value head. ``--intrinsic rnd`` swaps in RND.
3. Confidence ensemble. Where the reflection confidence exceeds ``--kappa`` the memory acts, elsewhere the PPO
   policy samples. Balanced batches make the confidence a posterior under equal priors, so 0.5 is its decision
   boundary (discrete actions); a continuous action is regressed, so it keeps a margin (0.8).

``--intrinsic rnd --no-reflection`` is PPO+RND; ``--intrinsic none --no-reflection`` is exactly ppo_baseline.py.

Off-policy correction (our choice: the paper's equations are not public). Each step records its behaviour
distribution mu: pi_old where the policy acts, (1 - eps) m + eps pi_old where the memory is confident
(``--memory-epsilon``), so pi_old / mu <= 1/eps. The update is decoupled PPO (Hilton et al. 2021),
w * max(-A r, -A clip(r)) with r = pi_theta / pi_old and w = min(1, pi_old / mu); GAE with Retrace traces
c = min(1, pi_old / mu) on the later actions (Munos et al. 2016); value targets V(s) + w A. When the memory
never acts, w = c = 1 and every formula is PPO's.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict, deque
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
    """where the memory is confident, the policy still samples with this probability (ratios stay <= 1/eps)"""
    success_rule: Literal["quantile", "positive"] = "quantile"
    """success: return above the quantile of recent returns (`quantile`; ties unstored) or > 0 (`positive`)"""
    success_quantile: float = 0.8
    """the quantile of `--success-rule quantile`"""
    buffer_size: Optional[int] = None
    """capacity of each of the success and failure buffers, in transitions"""
    memory_updates: int = 16
    """gradient steps of the prediction and reflection networks per memory update"""
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
    """fine novelty of the active units: surprisal -log f_j of their firing (never fades) or 1/sqrt(n_j + 1)"""
    center_novelty: bool = True
    """standardise each novelty term by its running mean and std (`--no-center-novelty`: std only, as RND)"""

SUCCESS_WINDOW = 100  # the success quantile is taken over the last 100 episode returns
MEMORY_BATCH_SIZE = 256  # samples per memory gradient step (half from each buffer for the reflection network)
RHO_BAR = C_BAR = 1.0  # truncation of importance weights and traces at 1, as V-trace: exactly PPO when mu = pi_old
LATENT_DIM = 64  # size of the autoencoder's sparse code
SPARSITY_COEF = 1e-3  # L1 penalty that makes the code sparse, so active units carry an observation's identity
MEMORY_LR = 1e-3  # learning rate of the prediction and reflection networks
EXT_COEF, INT_COEF = 2.0, 1.0  # RND's weights of the extrinsic and intrinsic advantages
INT_GAMMA = 0.99  # discount of the non-episodic intrinsic return
UPDATE_PROPORTION = 0.25  # as RND: the novelty model sees part of each minibatch, not outpacing the policy's visits


PRESETS = {
    "vector": dict(learning_rate=2.5e-4, num_envs=4, num_steps=128, num_minibatches=4, update_epochs=4,
                   clip_coef=0.2, ent_coef=0.01, normalize=False, buffer_size=20_000, kappa=0.5),
    "atari": dict(learning_rate=2.5e-4, num_envs=8, num_steps=128, num_minibatches=4, update_epochs=4,
                  clip_coef=0.1, ent_coef=0.01, normalize=False, buffer_size=5_000, kappa=0.5),
    "continuous": dict(learning_rate=3e-4, num_envs=1, num_steps=2048, num_minibatches=32, update_epochs=10,
                       clip_coef=0.2, ent_coef=0.0, normalize=True, buffer_size=20_000, kappa=0.8),
}


# ---- Environments (as ppo_baseline.py)
def make_env(env_id: str, env_kwargs: dict, kind: str, capture_video: bool = False, video_dir: str = ""):
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


def channels_last(shape: tuple[int, ...]) -> bool:
    return shape[-1] in (1, 3, 4) and shape[0] not in (1, 3, 4)


def image_encoder(shape: tuple[int, ...]) -> tuple[nn.Module, int, bool]:
    """Nature CNN for images of at least 36x36 pixels, a 3x3 conv stack for smaller ones; also says if HWC."""
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


class HWCtoCHW(nn.Module):
    def forward(self, x):
        return x.permute(0, 3, 1, 2)


def trunk(obs_shape: tuple[int, ...], hidden: int = 64) -> tuple[nn.Module, int]:
    """The memory networks' features of ``Agent.preprocess``-ed input: the policy's CNN, else a tanh MLP."""
    if len(obs_shape) == 3:
        enc, n, last = image_encoder(obs_shape)
        return nn.Sequential(HWCtoCHW() if last else nn.Identity(), enc), n
    n_in = int(np.prod(obs_shape))
    return nn.Sequential(nn.Flatten(), layer_init(nn.Linear(n_in, hidden)), nn.Tanh(),
                         layer_init(nn.Linear(hidden, hidden)), nn.Tanh()), hidden


class Agent(nn.Module):
    """ppo_baseline's agent with a second value head for the intrinsic return (RND's two heads)."""

    def __init__(self, obs_space: spaces.Box, action_space: spaces.Space, normalize_obs: bool, intrinsic_head: bool):
        super().__init__()
        self.continuous = isinstance(action_space, spaces.Box)
        self.image = len(obs_space.shape) == 3
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
            dist = Normal(out, self.actor_logstd.expand_as(out).exp(), validate_args=False)
            if action is None:
                action = out if greedy else dist.sample()
            return action, dist.log_prob(action).sum(1), dist.entropy().sum(1), self.critic(h), dist
        dist = Categorical(logits=out, validate_args=False)  # its argument checks cost as much as the network
        if action is None:
            action = out.argmax(1) if greedy else dist.sample()
        return action, dist.log_prob(action), dist.entropy(), self.critic(h), dist


# ---- Memory reflection: success/failure buffers, prediction and reflection networks, ensemble
class TrajectoryBuffer:
    """FIFO of the (observation, action) pairs of whole trajectories of one outcome; the oldest go first."""

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
    """n/2 pairs from each buffer and their labels (1 = success): the posterior under equal priors."""
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
        # A tie with the quantile of the previous returns (all-zero sparse returns) says nothing: not stored.
        q = float(np.quantile(history, self.quantile))
        return True if episode_return > q else (False if episode_return < q else None)

    def state_dict(self) -> dict:
        return dict(history=list(self.history))

    def load_state_dict(self, state: dict) -> None:
        self.history.extend(state["history"])


def erase_loops(obs: list[np.ndarray]) -> list[int]:
    """Indices of a trajectory with its loops erased: only the last visit of a repeated observation, whose
    action finally moved on (else the memory learns, and replays, pushing into a wall)."""
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

    def reflection_loss(self, x: torch.Tensor, action: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Binary cross-entropy of the confidence against the outcome label; also the accuracy."""
        logit = self.confidence_logit(x, action)
        accuracy = ((logit > 0).float() == labels).float().mean()
        return F.binary_cross_entropy_with_logits(logit, labels), accuracy


def ensemble_step(dist, proposal: torch.Tensor, confidence: torch.Tensor, kappa: float, eps: float,
                  policy_action: torch.Tensor, uniform: torch.Tensor):
    """Where ``confidence > kappa`` the memory acts if ``uniform >= eps``, else the policy's sample does.
    Returns the action, log pi_old(action), log mu(action) (the behaviour mixture) and the memory's mask."""
    gate = confidence > kappa
    use_memory = gate & (uniform >= eps)
    if isinstance(dist, Normal):
        # Gaussian around the prediction with the policy's std: a point mass would make pi/mu zero everywhere.
        memory_dist = Normal(proposal, dist.stddev)
        action = torch.where(use_memory.unsqueeze(1), memory_dist.sample(), policy_action)
        logp_old, log_m = dist.log_prob(action).sum(1), memory_dist.log_prob(action).sum(1)
    else:
        action = torch.where(use_memory, proposal, policy_action)
        logp_old = dist.log_prob(action)
        log_m = torch.where(action == proposal, 0.0, -torch.inf)
    mix = torch.logaddexp(log_m + np.log1p(-eps), logp_old + (np.log(eps) if eps > 0 else -np.inf))
    log_mu = torch.where(gate, mix, logp_old)
    return action, logp_old, log_mu, use_memory


class Memento:
    """Memory reflection at run time: the networks and their optimizer, the success rule, the success and
    failure buffers, and each env's trajectory so far."""

    def __init__(self, args: Args, obs_space: spaces.Box, act_space: spaces.Space, device: torch.device):
        self.args, self.device = args, device
        self.rule = SuccessRule(args.success_rule, args.success_quantile, SUCCESS_WINDOW)
        self.net = MemoryReflection(obs_space.shape, act_space).to(device)
        self.optimizer = optim.Adam(self.net.parameters(), lr=MEMORY_LR, eps=1e-5, foreach=True)
        act_dtype = np.float32 if self.net.continuous else np.int64
        self.buffers = {k: TrajectoryBuffer(args.buffer_size, obs_space.shape, obs_space.dtype, act_space.shape,
                                            act_dtype) for k in ("success", "failure")}
        self.pending: list[list] = [[] for _ in range(args.num_envs)]

    def state(self) -> dict:
        return dict(memory_optimizer=self.optimizer, success_rule=self.rule,
                    **{f"buffer_{k}": b for k, b in self.buffers.items()})

    def record(self, obs: np.ndarray, actions: np.ndarray) -> None:
        for i, pair in enumerate(zip(obs, actions)):
            self.pending[i].append(pair)

    def end_episode(self, i: int, episode_return: float) -> None:
        """The whole trajectory, loops erased, goes to the buffer of its outcome."""
        outcome, pending = self.rule(episode_return), self.pending[i]
        if outcome is not None:
            obs, actions = zip(*[pending[j] for j in erase_loops([o for o, _ in pending])][-self.args.buffer_size:])
            self.buffers["success" if outcome else "failure"].add(np.stack(obs), np.stack(actions))
        self.pending[i] = []

    def train(self, agent: Agent) -> Optional[dict]:
        """Prediction net on successes, reflection net on balanced batches once a failure is stored (the memory
        acts only after that). Returns the averaged losses, None if one is non-finite."""
        success, failure, stats = self.buffers["success"], self.buffers["failure"], defaultdict(list)
        if not len(success):
            return {}

        def prep(o: np.ndarray) -> torch.Tensor:
            return agent.preprocess(torch.as_tensor(o, device=self.device)).detach()

        for _ in range(self.args.memory_updates):
            obs, act = success.sample(MEMORY_BATCH_SIZE)
            losses = dict(pred_loss=self.net.prediction_loss(prep(obs), torch.as_tensor(act, device=self.device)))
            loss = losses["pred_loss"]
            if len(failure):
                obs, act, labels = sample_balanced(success, failure, MEMORY_BATCH_SIZE)
                losses["refl_loss"], losses["refl_accuracy"] = self.net.reflection_loss(
                    prep(obs), torch.as_tensor(act, device=self.device), torch.as_tensor(labels, device=self.device))
                loss = loss + losses["refl_loss"]
            if not torch.isfinite(loss):
                return None
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            for k, v in losses.items():
                stats[k].append(v.item())
        if len(failure):
            self.net.updates += 1
        return {k: float(np.mean(v)) for k, v in stats.items()}


# ---- Intrinsic motivation: coarse-fine distinction (AdaMemento) or RND
class NoveltyInput(nn.Module):
    """As RND: the last frame of Atari stacks, channels first, normalised by running statistics, clipped to +-5."""

    def __init__(self, obs_space: spaces.Box, atari: bool):
        super().__init__()
        shape = tuple(obs_space.shape)
        self.scale = 255.0 if obs_space.dtype == np.uint8 else 1.0
        self.image, self.atari = len(shape) == 3, atari
        self.last = self.image and not atari and channels_last(shape)
        self.shape = tuple(self.raw(torch.zeros((1,) + shape)).shape[1:])
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
    """AdaMemento's coarse-fine distinction: an autoencoder with a ReLU code made sparse by an L1 penalty.

    coarse(x) = reconstruction error; fine(x) = mean over the units x activates of their rarity, the surprisal
    -log f_j (f_j = (n_j + 1) / (N + 2), the smoothed firing frequency) or the count bonus 1 / sqrt(n_j + 1):
    near-identical images reconstruct equally well, but a state whose units rarely fire is still novel. Centring
    removes the surprisal's large constant part, which would otherwise swamp the intrinsic return's std."""

    def __init__(self, shape: tuple, latent_dim: int, coarse_coef: float, fine_coef: float,
                 sparsity_coef: float, fine_bonus: str = "surprisal", center: bool = True):
        super().__init__()
        self.coarse_coef, self.fine_coef, self.sparsity_coef = coarse_coef, fine_coef, sparsity_coef
        self.fine_bonus, self.center = fine_bonus, center
        self.encoder = nn.Sequential(novelty_encoder(shape, latent_dim), nn.ReLU())
        # An MLP decoder fits any input size (a transposed-conv stack would be fitted to each image size).
        n_in = int(np.prod(shape))
        self.decoder = nn.Sequential(layer_init(nn.Linear(latent_dim, 256)), nn.ReLU(),
                                     layer_init(nn.Linear(256, n_in), std=1.0))
        self.register_buffer("unit_counts", torch.zeros(latent_dim, dtype=torch.float64))
        self.register_buffer("seen", torch.tensor(0.0, dtype=torch.float64))
        self.coarse_rms, self.fine_rms = RunningMeanStd(()), RunningMeanStd(())

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x)
        return F.mse_loss(self.decoder(z).view_as(x), x) + self.sparsity_coef * z.abs().sum(1).mean()

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
    """Random network distillation (Burda et al. 2018): a predictor's error against a fixed random network."""

    def __init__(self, shape: tuple):
        super().__init__()
        self.target, self.predictor = novelty_encoder(shape, 128), novelty_encoder(shape, 128)
        self.target.requires_grad_(False)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.predictor(x), self.target(x))

    @torch.no_grad()
    def novelty(self, x: torch.Tensor, update: bool = True) -> tuple[torch.Tensor, dict]:
        err = (self.predictor(x) - self.target(x)).pow(2).mean(1)
        return err, dict(rnd_error=err.mean().item())


# ---- Returns
class RewardForwardFilter:
    """Running std of the discounted return, which rewards are divided by: the extrinsic one (``--normalize``,
    as gymnasium's NormalizeReward) ends with the episode, the intrinsic one never does (as RND)."""

    def __init__(self, num_envs: int, gamma: float):
        self.gamma = gamma
        self.returns = np.zeros(num_envs)
        self.rms = RunningMeanStd(())

    def step(self, rewards: np.ndarray, dones: Optional[np.ndarray] = None) -> float:
        """One step's (N,) rewards into the return; the std to divide by."""
        self.returns = self.returns * self.gamma + rewards
        self.rms.update(torch.as_tensor(self.returns))
        if dones is not None:
            self.returns[dones] = 0.0
        return np.sqrt(self.rms.var.item() + 1e-8)

    def __call__(self, rewards: np.ndarray) -> np.ndarray:
        """(T, N) intrinsic rewards of a rollout, filtered along the time axis (not the env axis) -> normalised."""
        for r in rewards:
            std = self.step(r)
        return rewards / std

    def state_dict(self) -> dict:
        return dict(rms=self.rms.state_dict(), returns=self.returns)

    def load_state_dict(self, state: dict) -> None:
        self.rms.load_state_dict(state["rms"])
        self.returns = state["returns"]


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, last_value: torch.Tensor,
                gamma: float, lam: float, traces: Optional[torch.Tensor] = None) -> torch.Tensor:
    """GAE over a (T, N) rollout with Retrace traces: A_t = delta_t + gamma lam (1 - d_t) c_{t+1} A_{t+1}.
    ``traces=None`` (c = 1) is ppo_baseline's GAE; truncated episodes carry gamma V(final_obs) in their reward."""
    # In numpy: its per-operation cost is a fraction of torch's and its float arithmetic the same (bit for bit).
    rewards, values, dones, traces = (None if x is None else x.cpu().numpy() for x in (rewards, values, dones, traces))
    advantages, last_gae, next_value = np.zeros_like(rewards), np.zeros_like(values[0]), last_value.cpu().numpy()
    for t in reversed(range(rewards.shape[0])):
        not_done = 1.0 - dones[t]
        delta = rewards[t] + gamma * next_value * not_done - values[t]
        trace = 1.0 if traces is None or t + 1 == rewards.shape[0] else traces[t + 1]
        last_gae = delta + gamma * lam * not_done * trace * last_gae
        advantages[t] = last_gae
        next_value = values[t]
    return torch.from_numpy(advantages).to(last_value.device)


# ---- Training
def check_args(args: Args, batch_size: int) -> None:
    check_flags(args, at_least_one=("buffer_size", "memory_updates"), unit=("kappa", "success_quantile"),
                batch=batch_size)
    if not 0.0 <= args.memory_epsilon < 1.0:
        raise UserError(f"--memory-epsilon must be in [0, 1), got {args.memory_epsilon}")
    if args.intrinsic != "coarse-fine" and not (args.coarse and args.fine and args.center_novelty
                                                and args.fine_bonus == "surprisal"):
        raise UserError("--no-coarse/--no-fine/--fine-bonus/--no-center-novelty only apply to --intrinsic "
                        f"coarse-fine, got --intrinsic {args.intrinsic}")
    if args.intrinsic == "coarse-fine" and not (args.coarse or args.fine):
        raise UserError("--no-coarse together with --no-fine leaves no intrinsic reward: use --intrinsic none")


def main(args: Args) -> None:
    run = Run(args, Args)
    args = run.args
    env_kwargs = parse_env_kwargs(args.env_kwargs)
    kind = env_kind(args.env_id, env_kwargs)
    for key, value in PRESETS[kind].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    batch_size = args.num_envs * args.num_steps
    check_args(args, batch_size)
    minibatch_size, num_iterations = batch_size // args.num_minibatches, run.iterations(batch_size)
    device = run.start()

    envs = make_vector_env(args, env_kwargs, kind, args.num_envs,
                           "" if args.evaluate else os.path.join(run.dir, "videos"))
    obs_space, act_space = envs.single_observation_space, envs.single_action_space
    use_int = args.intrinsic != "none"
    agent = Agent(obs_space, act_space, args.normalize, use_int).to(device)
    # foreach: the same arithmetic as the default per-parameter loop (bit for bit on CPU) in fewer Python calls.
    params = list(agent.parameters())
    optimizer = optim.Adam(params, lr=args.learning_rate, eps=1e-5, foreach=True)
    reward_filter = RewardForwardFilter(args.num_envs, args.gamma) if args.normalize else None
    novelty_in = novelty = novelty_optimizer = int_filter = None
    if use_int:
        novelty_in = NoveltyInput(obs_space, kind == "atari").to(device)
        if args.intrinsic == "rnd":
            novelty = RND(novelty_in.shape).to(device)
        else:
            novelty = CoarseFine(novelty_in.shape, LATENT_DIM, float(args.coarse), float(args.fine), SPARSITY_COEF,
                                 args.fine_bonus, args.center_novelty).to(device)
        novelty_optimizer = optim.Adam([p for p in novelty.parameters() if p.requires_grad],
                                       lr=args.learning_rate, eps=1e-5, foreach=True)
        int_filter = RewardForwardFilter(args.num_envs, INT_GAMMA)
    memento = Memento(args, obs_space, act_space, device) if args.reflection else None
    memory = memento.net if memento else None

    # Everything a checkpoint holds (not the episodes in progress), for saving and restoring; a model holds the nets.
    nets = {k: v for k, v in dict(agent=agent, memory=memory).items() if v is not None}
    stateful = dict(nets, optimizer=optimizer, reward_rms=reward_filter.rms if reward_filter else None,
                    novelty_in=novelty_in, novelty=novelty, novelty_optimizer=novelty_optimizer, int_filter=int_filter,
                    **(memento.state() if memento else {}))
    stateful = {k: v for k, v in stateful.items() if v is not None}
    if args.evaluate:
        run.load(nets)
        return finish(run, nets, env_kwargs, kind, device, dict(global_step=run.state.get("global_step", 0)))
    run.resume(stateful)

    obs_dtype = torch.uint8 if obs_space.dtype == np.uint8 else torch.float32
    obs = torch.zeros((args.num_steps, args.num_envs) + obs_space.shape, dtype=obs_dtype, device=device)
    # The state each action led to (final_obs at episode ends): what the novelty reward scores.
    next_obs_buf = torch.zeros_like(obs) if use_int else None
    actions = torch.zeros((args.num_steps, args.num_envs) + act_space.shape, device=device)
    values = torch.zeros((args.num_steps, args.num_envs, 2 if use_int else 1), device=device)
    logprobs, behaviour_logprobs, rewards, dones = torch.zeros((4, args.num_steps, args.num_envs), device=device)

    # Resumed runs restart their envs with a different seed so they do not replay old episodes.
    next_obs = torch.as_tensor(envs.reset(seed=args.seed + run.start_iteration - 1)[0], device=device)
    writer, global_step, progress = run.writer, run.global_step, Progress(args.total_timesteps)
    start_step, last_ckpt = global_step, time.time()
    for iteration in range(run.start_iteration, num_iterations + 1):
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = (1.0 - (iteration - 1.0) / num_iterations) * args.learning_rate
        memory_ready = memory is not None and int(memory.updates) > 0  # trained on both outcomes
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
            values[step], actions[step], logprobs[step], behaviour_logprobs[step] = value, action, logprob, log_mu
            action_np = action.cpu().numpy()
            next_obs_np, reward, term, trunc, info = envs.step(action_np)
            done = term | trunc
            if kind == "atari":
                reward = np.sign(reward)
            if reward_filter is not None:
                reward = np.clip(reward / reward_filter.step(reward, done), -10, 10)
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
            if memento is not None:
                memento.record(obs[step].cpu().numpy(), action_np)
            progress.log(writer, info, done, global_step)
            for i in np.flatnonzero(done) if memento is not None else []:
                memento.end_episode(i, finished_episode(info, i)[0])

        with torch.no_grad():
            last_value = agent.get_value(next_obs)
        # Behaviour correction: truncated importance ratios pi_old/mu (all ones without memory).
        is_ratio = (logprobs - behaviour_logprobs).exp()
        weights, traces = is_ratio.clamp(max=RHO_BAR), is_ratio.clamp(max=C_BAR)
        advantages = compute_gae(rewards, values[..., 0], dones, last_value[:, 0], args.gamma, args.gae_lambda, traces)
        b_returns = (values[..., 0] + weights * advantages).reshape(-1)
        if use_int:
            b_next = next_obs_buf.reshape((-1,) + obs_space.shape)
            novelty_in.rms.update(novelty_in.raw(b_next))
            with torch.no_grad():
                int_raw, int_stats = novelty.novelty(novelty_in(b_next))
            int_rewards = torch.as_tensor(int_filter(int_raw.view(args.num_steps, args.num_envs).cpu().numpy()),
                                          dtype=torch.float32, device=device)
            # Non-episodic intrinsic return (dones = 0): negative, centred rewards give no incentive to end episodes.
            int_advantages = compute_gae(int_rewards, values[..., 1], torch.zeros_like(dones), last_value[:, 1],
                                         INT_GAMMA, args.gae_lambda, traces)
            b_int_returns = (values[..., 1] + weights * int_advantages).reshape(-1)
            advantages = EXT_COEF * advantages + INT_COEF * int_advantages

        b_obs, b_actions = obs.reshape((-1,) + obs_space.shape), actions.reshape((-1,) + act_space.shape)
        b_actions = b_actions if agent.continuous else b_actions.long()
        b_logprobs, b_advantages, b_weights = logprobs.reshape(-1), advantages.reshape(-1), weights.reshape(-1)
        b_values = values.reshape(-1, values.shape[-1])
        b_inds = np.arange(batch_size)
        stats = defaultdict(list)
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
                losses = dict(policy_loss=pg_loss, value_loss=v_loss, entropy=entropy_loss,
                              old_approx_kl=old_approx_kl, approx_kl=approx_kl, clipfrac=clipfrac)
                nov_loss = None
                if use_int:
                    losses["int_value_loss"] = 0.5 * ((newvalue[:, 1] - b_int_returns[mb]) ** 2).mean()
                    loss = loss + losses["int_value_loss"] * args.vf_coef
                    keep = torch.rand(len(mb), device=device) < UPDATE_PROPORTION
                    nov_loss = novelty.loss(novelty_in(b_next[mb][keep])) if keep.any() else None
                if not torch.isfinite(loss) or (nov_loss is not None and not torch.isfinite(nov_loss)):
                    raise run.diverged(f"non-finite loss ({loss.item()})", global_step)
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                if nov_loss is not None:
                    novelty_optimizer.zero_grad()
                    nov_loss.backward()
                    novelty_optimizer.step()
                    losses["novelty_loss"] = nov_loss
                for k, v in losses.items():
                    stats[k].append(v.item())
            if args.target_kl is not None and approx_kl > args.target_kl:
                break

        memory_stats = memento.train(agent) if memento is not None else {}
        if memory_stats is None:
            raise run.diverged("non-finite memory loss", global_step)
        # Statistics change between rollouts only, so the update recomputes the rollout's log-probabilities exactly.
        if agent.obs_rms is not None:
            agent.obs_rms.update(b_obs.float())

        y_pred, y_true = b_values[:, 0].cpu().numpy(), b_returns.cpu().numpy()
        var_y = np.var(y_true)
        sps = (global_step - start_step) / (time.time() - run.start_time)
        scalars = {"charts/learning_rate": optimizer.param_groups[0]["lr"], "charts/SPS": sps,
                   "losses/explained_variance": np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y,
                   **{f"losses/{k}": float(np.mean(v)) for k, v in stats.items()}}
        if use_int:
            scalars.update({"intrinsic/reward_mean": int_rewards.mean().item(),
                            "intrinsic/reward_max": int_rewards.max().item(),
                            **{f"intrinsic/{k}": v for k, v in int_stats.items()}})
        if memento is not None:
            scalars.update({"memory/action_fraction": memory_chosen / batch_size,
                            **{f"memory/{k}_buffer": len(buffer) for k, buffer in memento.buffers.items()},
                            "memory/importance_weight_mean": weights.mean().item(),
                            **{f"memory/{k}": v for k, v in memory_stats.items()}})
            if confidences:
                conf = torch.cat(confidences)
                scalars["memory/confidence_mean"] = conf.mean().item()
                scalars["memory/gate_fraction"] = (conf > args.kappa).float().mean().item()
                writer.add_histogram("memory/confidence", conf.cpu().numpy(), global_step)
        for k, v in scalars.items():
            writer.add_scalar(k, v, global_step)
        progress.maybe_print(global_step, sps, force=iteration == num_iterations)
        if run.due(last_ckpt, iteration == num_iterations):
            run.save(iteration, global_step, **stateful)
            last_ckpt = time.time()
    envs.close()

    run.save_model(**{k: net.state_dict() for k, net in nets.items()}, global_step=global_step)  # with --save-model
    finish(run, nets, env_kwargs, kind, device,
           dict(global_step=global_step, sps=(global_step - start_step) / max(time.time() - run.start_time, 1e-9),
                wall_time_s=run.wall_time()))


@torch.no_grad()
def finish(run: Run, nets: dict, env_kwargs: dict, kind: str, device: torch.device, record: dict) -> None:
    """Greedy ``--eval-episodes`` of the trained (or loaded) nets, then eval.json: a fixed quota per env (short
    episodes are not over-represented); with a trained memory the ensemble acts (the memory where confident)."""
    args, agent, memory = run.args, nets["agent"], nets.get("memory")
    memory = memory if args.eval_memory and memory is not None and int(memory.updates) > 0 else None
    record = dict(record, mean_return=None, std_return=None, success_rate=None, memory_action_fraction=None)
    if args.eval_episodes > 0:
        agent.eval()
        video = os.path.join(run.dir, "videos") if args.evaluate and args.capture_video else ""
        n_envs = max(1, min(args.eval_episodes, 8))
        quota = [args.eval_episodes // n_envs + (i < args.eval_episodes % n_envs) for i in range(n_envs)]
        envs = make_vector_env(args, env_kwargs, kind, n_envs, video)
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
        record.update(mean_return=float(np.mean(returns)), std_return=float(np.std(returns)),
                      success_rate=float(np.mean(successes)) if successes else None,
                      memory_action_fraction=memory_steps / steps if memory is not None else None)
    run.finish(record)


if __name__ == "__main__":
    run_cli(main, Args, PRESETS)
