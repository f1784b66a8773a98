"""Strategic Memory agent: PPO with an episodic slot memory, learned retention and attention reads.

One file, CleanRL style, diffable against ppo_baseline.py (same CLI contract, presets, make_env,
checkpoint/resume, NaN guard, evaluation, eval.json, TB keys).

Memory (per environment)
  - Every step writes one entry, the embedding e_t = Embed(obs_t, a_{t-1}, r_{t-1}, tau_t) of the
    current observation, the previous action and reward and the agent's own episode time tau_t
    (steps since its episode began, encoded with log-scaled and absolute sinusoids so that it stays
    informative for episodes of any length). Nothing else is taken from the environment.
  - The policy first READS, then WRITES: the read at step t is multi-head scaled dot-product
    attention (Vaswani et al. 2017) from a query built from e_t over the occupied slots (empty
    slots are masked, their weight is exactly 0); the actor and critic read [e_t, read_t]. The
    query has no recurrent state, so only the memory can carry information across steps.
  - At most M = --memory-slots episodic entries. When the memory is full the entry to drop is chosen
    by --retention: `learned` (lowest learned retention score among the M entries AND the new one),
    `fifo` (oldest) or `random`. Episodic slots are cleared at every episode start.
  - --persistent-slots K > 0 adds K slots that survive episode resets: when an episode ends, its
    entries and the current persistent entries compete for the K slots (same retention policy);
    persistent entries are tagged with their episode's outcome (symlog of the return the agent
    received) and how many episodes ago they were written, and are read together with the episode's
    own slots.

Learned retention: objective and why it works
  The retention network r(entry) -> score sees only the entry's content (its embedding, episode
  time, previous action and reward) and, for persistent entries, their slot's tag. It is trained to
  predict which entries are USEFUL, judged in hindsight by an ENTRY CRITIC: for each action q of
  the rollout and each entry j it could look back at (every earlier step of its episode inside the
  rollout window, kept or evicted, plus whatever its memory held), c(input_q, action_q, entry_j)
  predicts q's one-step TD target y_q = r_q + gamma V(s_q+1) from that ONE entry, trained by
  squared error on every pair. An entry that carries what decides the reward (the cue) predicts it
  with a small error; entries that explain nothing all have about the same, larger error. The
  usefulness target of q is
      u_qj = softmax_j( -err_qj / (temperature * mean_j err_qj) )     (--usefulness-temperature)
  and softmax(r) over q's visible entries is trained by cross-entropy towards it, each action
  weighted by its |TD error| delta_q = y_q - V(s_q) (the actions whose outcome the critic did not
  expect vote, the steps where nothing happened do not):
      L_ret = mean_q |delta_q| / avg|delta| * CE(stopgrad(u_q), softmax(r(visible entries of q))) + mean_qj err_qj
  where avg|delta| is a running mean over updates (an exponential moving average, bias-corrected).
  Why the one-step target and not the lambda-return (and |delta|, not |advantage|): before the
  policy uses the cue, the lambda-return of the ~50 steps before a decision carries the reward of
  an action not yet taken, which no entry can predict, and their |advantage| (gamma lambda)^k
  sums to ~17 times the decision's own vote (1 / (1 - 0.99 * 0.95), computed for a policy at
  chance, not measured); their unexplainable errors dominated the entry critic's loss (measured at delay 1024 with the lambda-return: the loss stayed at ~0.057 on the
  failing seeds, the share of those pre-decision steps). The one-step target puts the reward on
  the action that earned it, and everything later enters only through V.
  So r becomes a query-independent log-prior of "how much does this entry tell about the outcome of
  the decisions that matter"; evicting the lowest r keeps what future decisions need. The entry
  critic and the scorer read detached embeddings: the retention objective never shapes what the
  policy reads. Each entry is judged on its own, never through the attention, because judging by
  the attention it receives (this script's earlier objective) reinforces itself: the entries that
  stay are the only old ones the queries can attend to, so they get the attention and the votes
  whether or not they hold anything (measured at delay 1024: the scorer learned to keep entries
  24-35 steps after the cue and dropped the cue on 4 of 5 seeds). The entry critic's verdict does
  not depend on what was kept: a cue that survives in a few episodes shows at once that it
  predicts the reward. Because the target covers evicted entries too, an entry the scorer
  currently drops still gets credit whenever it is visible.
  Measured (README, 2,000 episodes per delay, 16 slots, defaults): delays 16 and 64 solved on 3 of
  3 seeds, delay 256 on 4 of 5 (seed 3: 0.985), delay 1024 on 7 of 9 (the lambda-return target
  with |advantage| votes: 1-2 of 5; the attention target: 1 of 5). Known weaknesses: once a task
  is solved every entry predicts the TD target about equally well, u_q becomes nearly uniform, and
  the cross-entropy lowers the kept cue's score towards those of the entries visible with it
  (measured on PassiveTMaze length 1500, seed 1: the -1 cue ended 0.002-0.004 below the last
  corridor steps and was evicted before the junction). That same pull clears the noise votes while
  the cue is still being found: gating votes by how much the best entry beats the average one, and
  a loss without the pull, were tried and not kept (results log, "Why retention forgets a solved
  cue"). And a cue that is kept but never read can still be dropped (delay 1024 seed 4: kept at
  99% of the decisions for a tenth of training, then at 29-57%).

  The bootstrapping problem (an entry that never survives is never read, so the query never learns to
  look for it) is attacked from two sides.

  1. A HINDSIGHT CRITIC (--hindsight-critic-coef): an auxiliary head predicts the one-step TD
     target of (current input, action) from the read the query would get over ALL entries it could
     look back at (the same visible set as above). Only the reward the agent received is used -- no answer,
     no env-side cue flag. Its gradient trains the shared query/key/value networks to find the
     entries that decide the reward whether or not retention kept them, so the policy's read
     looks for the cue before the policy has ever relied on it. (Measured with the earlier
     attention-based retention target, which it also fed, on delay 64, seed 3: without it the cue
     was kept at the decision in 0% of episodes and success stayed at chance; with it 100% and 1.0.)
     Limitation, shared by the entry critic: the visible set is the rollout window (--num-steps)
     plus the memory, so for delays longer than the window both see the cue only in episodes where
     it was kept -- which is what the exploration below provides.

  2. PARAMETER-SPACE EXPLORATION of retention (Plappert et al. 2018; NoisyNets, Fortunato et al.
     2018): during training each episode draws a fresh random perturbation of the scorer's output
     weights, score_explore = r(e) + sigma * spread(r) * <eps_episode, hidden(e)>, held fixed for
     the whole episode. Per-step stochastic eviction (softmax over -scores) does not work at
     delay >> M: an entry must win ~delay/M independent draws in a row, so survival decays
     exponentially. A per-episode perturbation gives each episode one CONSISTENT retention
     strategy; random directions are symmetric (as likely to favour recent as old entries, or any
     content feature), so this is exploration, not an age rule, and entries that are extreme in
     some feature -- like the first step of an episode -- survive whole episodes in some of them.
     The noise is scaled by the spread of the clean scores (adaptive parameter noise) so a scorer
     that grows confident early cannot drown it; sigma = 10 (default) was needed at delay 256
     (measured, seed 1: sigma 3 kept the cue in 0% of episodes after ~600 and stayed at chance,
     sigma 10 solved it). sigma is annealed linearly to 0 over the first half of training
     (--retention-noise, --retention-noise-anneal 0.5): the noise also evicts entries the scorer
     has already learned to keep, so the policy sees the cue in every episode only once the noise
     is gone, and it needs the rest of the budget to learn to use it (measured at delay 256,
     seeds 1-3: annealing over 75% of training solved 1 of 3 seeds, over 50% solved 3 of 3, at
     episodes 1123, 1763, 805). Evaluation uses the clean scores and deterministic eviction.

End to end, exactly reproduced
  The rollout stores the raw inputs of every step and, for every step, which source occupies each
  slot (slot -> pool index; the pool of an env is [entries carried in from the previous rollout,
  this rollout's steps]). The update re-encodes the whole pool with the current parameters and
  replays every query of a minibatch at once (no Python loop over time): one (queries x pool)
  attention product per env, masked to the pool entries each query's slots held, so the PPO loss
  backpropagates through attention into the encoder and the first epoch reproduces the rollout's
  logits and values exactly (tests/test_trace_ppo.py). Carried-in entries are re-encoded with the
  current parameters at the start of each rollout so the rollout and the update agree.

PPO when one action in a thousand matters (defaults of this script, see PRESETS)
  - No per-minibatch advantage normalisation: with one rewarded decision per episode most minibatches
    hold no decision step, and normalising would blow their value-noise advantages up to unit scale.
    Rewards of memory tasks are already O(1) and Adam is invariant to the gradient scale.
  - Entropy bonus 1e-3: the entropy term is averaged over every step while the policy gradient of
    the single decision is divided by the episode length; a CleanRL-size bonus (0.01) outweighs the
    decision's signal ~10:1 at delay 1024.
  - Learning rate 1e-3 (not CleanRL's 2.5e-4): the budget is counted in episodes, and with one
    decision per episode 2.5e-4 barely moves the policy (measured: delay 16, 2,000 episodes,
    approx_kl ~1e-4, success stayed at chance; 1e-3 solved it). Linear annealing to 0 keeps the end
    of training stable.
  - Observation normalisation statistics are frozen during a rollout (updated after the update), so
    the rollout's log-probabilities are exactly reproduced by the first update epoch.
  - Self-supervised read on vector tasks (--aux-recon-coef 1.0): from the read and an entry's
    episode time, a small head reconstructs that entry's observation (a random occupied slot per
    query). It is dense (every step, not one decision per episode) and never sees the task's
    answer; it trains the read to carry what the slots hold, by their time, before the policy's
    rare decision gradient can. Measured with the same math at 449160a (README): RecallAcrossEpisodes
    with persistent slots 3 of 3 seeds instead of 1 of 3, delay 256 seed 3 0.985 instead of 0.42;
    with the one-step retention target, delay 1024 seed 2 kept the cue in memory either way but
    read it only with this loss (0.425 without, 1.0 with). Off for images and continuous control,
    where it was not measured.

Exploration floor (--explore-visits m, off by default)
  Passive T-Maze (Ni et al. 2023) needs a policy that is deterministic over a 1500-step corridor (one
  step that is not forward is penalised for the rest of the episode) and that still tries both
  turns at the junction, an input it meets only once it walks the corridor on time. By then the
  softmax has extrapolated "forward" to the junction (p = 0.9997 at length 1500 with --normalize True,
  seed 1, measured at be7b8f7: results log, "PassiveTMaze with observation and reward normalisation"), and a
  softmax policy gradient cannot revive an action it has ruled out: every term of it is
  proportional to that action's probability (Mei et al. 2020, "Escaping the gravitational pull of
  softmax"). The entropy bonus has the same factor, and a bonus large enough to matter keeps the
  corridor from being learned at all (measured at length 1500 with --normalize True: entropy 1.37
  after 950k steps with the default 1e-3, corridor walked after ~550k steps with 0).
  So the behaviour policy mixes in a uniform action with probability min(1, m / N(obs)), N being
  the observation's visit count (SimHash pseudo-counts, Tang et al. 2017): an observation's first m
  visits act uniformly, as in R-max (Brafman and Tennenholtz 2002) a state is explored until it has
  been visited m times, and a familiar one (a corridor seen millions of times) hardly at all.
  PPO trains the softmax on these samples with the softmax's own probabilities in the ratio,
  deliberately without the importance weight pi/mu: weighting a floor sample by pi/mu is again the
  softmax's probability of it, and measured with the mixture as the trained policy (length 1500,
  seed 1) the junction was turned on floor samples alone (training success 0.0-0.14 from 0.7M to
  2.2M steps) and never learned. The price is a biased gradient where the floor is large (floor
  samples count as if the softmax had chosen them); it fades as m / N does, and the ratio clip
  still bounds each update.
  m should be small: every observation seen once per episode is novel for m episodes, and on
  T-Maze that includes the cue step, where a random first action puts the whole episode behind.
  Measured (README, length 1500, 3M steps, with --normalize True --ent-coef 0): m = 20 solved 2 of
  5 seeds (eval 0.48 / 1.0 / 1.0 / 0.435 / 0.55; seeds 4 and 5 kept the cue and attended to it,
  but their junction softmax had settled on one wrong move with p >= 0.9994 that the floor did
  not undo), m = 100 1 of 3 (0.48 / 1.0 / 0.0, seed 3 never walked the corridor).
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Literal, Optional

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

    # Algorithm specific arguments. `None` means the domain default given in brackets:
    # [vector / Atari / continuous actions].
    total_timesteps: int = 500_000
    """total timesteps of the experiment"""
    learning_rate: Optional[float] = None
    """the learning rate of the optimizer [1e-3 / 2.5e-4 / 3e-4]"""
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
    """per-minibatch advantage normalisation [off / on / on] (off for sparse single-decision tasks)"""
    clip_coef: Optional[float] = None
    """the surrogate clipping coefficient [0.2 / 0.1 / 0.2]"""
    clip_vloss: bool = True
    """toggles whether or not to use a clipped loss for the value function"""
    ent_coef: Optional[float] = None
    """coefficient of the entropy [0.001 / 0.01 / 0.0]"""
    vf_coef: float = 0.5
    """coefficient of the value function"""
    max_grad_norm: float = 0.5
    """the maximum norm for the gradient clipping"""
    target_kl: Optional[float] = None
    """the target KL divergence threshold"""
    normalize: Optional[bool] = None
    """observation and reward normalisation [off / off / on]"""

    # Memory
    memory_slots: int = 16
    """M: episodic memory slots per environment (cleared at episode start)"""
    persistent_slots: int = 0
    """K: slots that survive episode resets, tagged with their episode's outcome (0 = off)"""
    retention: Literal["learned", "fifo", "random"] = "learned"
    """which entry to evict when the memory is full"""
    retention_coef: float = 0.1
    """coefficient of the hindsight-usefulness loss that trains the retention scorer and its entry critic"""
    usefulness_temperature: float = 0.1
    """temperature of the retention target relative to the entry critic's mean error (smaller = the votes
    go to the few entries that predict a decision's return best)"""
    retention_noise: float = 10.0
    """scale of the per-episode parameter noise on the retention scorer, relative to the spread of its scores"""
    retention_noise_anneal: float = 0.5
    """fraction of training over which the retention noise is annealed linearly to 0"""
    hidden_size: int = 64
    """width of entry embeddings, attention and heads"""
    num_heads: int = 4
    """attention heads of the memory read"""
    hindsight_critic_coef: float = 0.5
    """coefficient of the action-conditioned hindsight critic that teaches the attention to find
    reward-relevant entries among everything the episode saw, kept or evicted (0 = off)"""
    aux_recon_coef: Optional[float] = None
    """coefficient of the self-supervised loss reconstructing a stored observation from the read, 0 = off [1.0 / 0.0 / 0.0]"""
    heatmap_interval: int = 25
    """updates between attention heatmaps written to TensorBoard (0 = never)"""

    # Random Network Distillation (Burda et al. 2018)
    rnd: bool = False
    """if toggled, add RND intrinsic rewards (separate intrinsic value head, non-episodic)"""
    rnd_int_coef: float = 1.0
    """weight of the intrinsic advantage"""
    rnd_ext_coef: float = 2.0
    """weight of the extrinsic advantage"""
    rnd_gamma: float = 0.99
    """discount of the (non-episodic) intrinsic return"""
    rnd_update_proportion: float = 0.25
    """fraction of each minibatch the RND predictor is trained on"""

    # Count-based exploration floor (see "Exploration floor" in the module docstring)
    explore_visits: float = 0.0
    """m: in an observation seen N times (SimHash count), act uniformly at random with probability min(1, m/N),
    so novel observations are explored even where the policy has become deterministic (0 = off; discrete actions)"""


PRESETS = {
    "vector": dict(learning_rate=1e-3, num_envs=8, num_steps=128, num_minibatches=4, update_epochs=4,
                   clip_coef=0.2, ent_coef=0.001, normalize=False, norm_adv=False, aux_recon_coef=1.0),
    "atari": dict(learning_rate=2.5e-4, num_envs=8, num_steps=128, num_minibatches=4, update_epochs=4,
                  clip_coef=0.1, ent_coef=0.01, normalize=False, norm_adv=True, aux_recon_coef=0.0),
    "continuous": dict(learning_rate=3e-4, num_envs=1, num_steps=2048, num_minibatches=32,
                       update_epochs=10, clip_coef=0.2, ent_coef=0.0, normalize=True, norm_adv=True,
                       aux_recon_coef=0.0),
}


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


def time_encoding(tau: torch.Tensor) -> torch.Tensor:
    """Encoding of the agent's own episode time tau (steps since its episode began).

    log(1 + tau) with sinusoids of it (transformer-style positional features on a log axis, so
    the first steps are resolved finely and tau = 10^5 is still in range), plus sinusoids of tau
    itself with periods up to 1000 steps. Looked up in a table of all tau seen so far (grown by
    doubling), one gather instead of a dozen elementwise ops per call.
    """
    key = str(tau.device)
    table = _TIME_TABLES.get(key)
    need = int(tau.max()) + 1 if tau.numel() else 1
    if table is None or len(table) < need:
        size = max(need, 2 * (0 if table is None else len(table)), 1024)
        t = torch.arange(size, dtype=torch.float32, device=tau.device).unsqueeze(-1)
        u = torch.log1p(t)
        f = u.new_tensor(TIME_FREQS)
        p = u.new_tensor(TIME_PERIODS)
        table = torch.cat([u / 8.0, torch.sin(u * f), torch.cos(u * f),
                           torch.sin(2 * math.pi * t / p), torch.cos(2 * math.pi * t / p)], -1)
        _TIME_TABLES[key] = table
    return table[tau.long()]


_TIME_TABLES: dict[str, torch.Tensor] = {}


def symlog(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.log1p(x.abs())


TAG_DIM = 3  # [persistent, symlog(outcome of its episode), log(1 + episodes ago)]
RET_HIDDEN = 32


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
        # Entry/current-input embedding: the same network encodes what is written and what queries.
        self.embed_net = nn.Sequential(layer_init(nn.Linear(n_feat + self.n_act + 1 + TIME_DIM, d)), nn.Tanh(),
                                       layer_init(nn.Linear(d, d)), nn.Tanh())
        self.tag_proj = layer_init(nn.Linear(TAG_DIM, d, bias=False), std=1.0)
        self.q_proj, self.k_proj, self.v_proj = (layer_init(nn.Linear(d, d), std=1.0) for _ in range(3))
        self.o_proj = layer_init(nn.Linear(d, d), std=1.0)
        # LayerNorm on the read (as after a Transformer's attention block): its scale cannot grow. Without
        # it, at delay 1024 one direction of W_o W_v grew to a singular value of ~12 (~2 at delay 64), the
        # read's norm reached ~50 and saturated the heads' tanh, so even a read of the cue with weight 1.0
        # moved the logits by 0.00 and no gradient could reach the attention any more.
        self.read_norm = nn.LayerNorm(d)

        def head(out: int, std: float) -> nn.Sequential:
            return nn.Sequential(layer_init(nn.Linear(2 * d, 64)), nn.Tanh(), layer_init(nn.Linear(64, out), std=std))

        self.actor, self.critic = head(self.n_act, 0.01), head(1, 1.0)
        self.critic_int = head(1, 1.0) if args.rnd else None
        self.hindsight_critic = (nn.Sequential(layer_init(nn.Linear(2 * d + self.n_act, 64)), nn.Tanh(),
                                               layer_init(nn.Linear(64, 1), std=1.0))
                                 if args.hindsight_critic_coef > 0 else None)
        if self.continuous:
            self.actor_logstd = nn.Parameter(torch.zeros(1, self.n_act))
        # Retention scorer: content of an entry -> score (higher = keep). The embedding is detached so
        # the retention objective shapes only this network, never what the policy reads.
        n_ret_in = d + TIME_DIM + self.n_act + 1 + TAG_DIM
        self.ret_hidden = nn.Sequential(layer_init(nn.Linear(n_ret_in, RET_HIDDEN)), nn.Tanh())
        self.ret_out = layer_init(nn.Linear(RET_HIDDEN, 1), std=0.01)
        # Entry critic (the retention objective's judge of usefulness, see L_ret): predicts a decision's
        # return from its input, its action and ONE entry. The first layer is split into a query part
        # and an entry part, so each (decision, entry) pair costs one add; inputs are detached.
        self.entry_q = layer_init(nn.Linear(d + self.n_act, RET_HIDDEN))
        self.entry_e = layer_init(nn.Linear(d, RET_HIDDEN, bias=False))
        self.entry_out = layer_init(nn.Linear(RET_HIDDEN, 1), std=1.0)
        # Running mean of |TD error| over updates as [EMA, bias-correction weight]: the scale of the
        # retention votes (see L_ret above), a buffer so that it is checkpointed with the agent.
        self.register_buffer("abs_td_ema", torch.zeros(2))
        self.recon_dim = self._recon_target_dim(obs_space)
        self.recon = (nn.Sequential(layer_init(nn.Linear(d + TIME_DIM, 64)), nn.Tanh(),
                                    layer_init(nn.Linear(64, self.recon_dim), std=1.0))
                      if args.aux_recon_coef > 0 else None)

    # --- inputs ---------------------------------------------------------------------------
    def _recon_target_dim(self, obs_space) -> int:
        if self.image:
            return int(obs_space.shape[-1 if self.channels_last else 0]) * 16
        return int(np.prod(obs_space.shape))

    def recon_target(self, obs: torch.Tensor) -> torch.Tensor:
        """What the auxiliary loss reconstructs: the observation (images: 4x4 average-pooled)."""
        x = self.normalize_obs(obs)
        if self.image:
            x = x.permute(0, 3, 1, 2) if self.channels_last else x
            return F.adaptive_avg_pool2d(x, 4).flatten(1)
        return x.flatten(1)

    def normalize_obs(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / self.scale
        if self.obs_rms is not None:
            x = ((x - self.obs_rms.mean) / torch.sqrt(self.obs_rms.var + 1e-8)).clamp(-10, 10).float()
        return x

    def embed(self, obs, prev_act, prev_rew, tau) -> torch.Tensor:
        """Entry embedding e = Embed(obs, previous action, previous reward, episode time)."""
        x = self.normalize_obs(obs)
        if self.image:
            x = self.cnn(x.permute(0, 3, 1, 2) if self.channels_last else x)
        x = torch.cat([x.flatten(1), prev_act, prev_rew.unsqueeze(-1), time_encoding(tau)], -1)
        return self.embed_net(x)

    # --- memory read ------------------------------------------------------------------------
    def heads_split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:-1], self.num_heads, -1)

    # Keys and values of an entry e in a slot with tag g: k_proj(e + tag_proj(g)), computed as
    # k_proj(e) + (W_k W_tag) g (tag_proj has no bias), so each entry is projected once (at write
    # time in the rollout, once per pool entry in the update) and only the tag part depends on the slot.
    def tag_key(self, tags: torch.Tensor) -> torch.Tensor:
        return F.linear(tags, self.k_proj.weight @ self.tag_proj.weight)

    def tag_value(self, tags: torch.Tensor) -> torch.Tensor:
        return F.linear(tags, self.v_proj.weight @ self.tag_proj.weight)

    def attend(self, e: torch.Tensor, k: torch.Tensor, v: torch.Tensor, occupied: torch.Tensor):
        """Multi-head scaled dot-product attention of queries e (B, D) over slots with keys k and
        values v (B, S, D) (see ``tag_key``): the read while acting, which ``replay`` reproduces.

        Empty slots get weight exactly 0; with no occupied slot the weighted sum is 0 (the read is then
        ``read_out`` of 0). Returns the read (B, D) and the weights (B, H, S).
        """
        q = self.heads_split(self.q_proj(e) / math.sqrt(e.shape[-1] // self.num_heads))  # B H dh
        k, v = self.heads_split(k), self.heads_split(v)           # B S H dh
        # One query per row: broadcast multiply-and-sum, much faster on CPU than B x H tiny matmuls.
        logits = (q.unsqueeze(1) * k).sum(-1).transpose(1, 2)    # B H S
        # A large finite negative (not -inf) keeps all-empty rows finite in the backward pass.
        logits = logits.masked_fill(~occupied.unsqueeze(1), -1e30)
        w = torch.softmax(logits, -1) * occupied.any(-1).float()[:, None, None]
        read = (w.transpose(1, 2).unsqueeze(-1) * v).sum(1).flatten(1)  # B H dh -> B D
        return self.read_out(read), w

    def read_out(self, read: torch.Tensor) -> torch.Tensor:
        """Output projection of the concatenated heads, then the read's LayerNorm."""
        return self.read_norm(self.o_proj(read))

    # --- retention ----------------------------------------------------------------------------
    def retention(self, e, prev_act, prev_rew, tau, tag=None):
        """Retention score of entries (and the scorer's hidden features, used by the exploration noise).

        ``tag`` is the persistent tag of the slot an entry sits in (zeros for episodic entries), so
        the scorer can learn, e.g., that stale persistent entries are no longer read."""
        if tag is None:
            tag = e.new_zeros(e.shape[:-1] + (TAG_DIM,))
        h = self.ret_hidden(torch.cat([e.detach(), time_encoding(tau), prev_act, prev_rew.unsqueeze(-1), tag], -1))
        return self.ret_out(h).squeeze(-1), h

    @torch.no_grad()
    def retention_vote_scale(self, td_error: torch.Tensor) -> torch.Tensor:
        """Fold this update's mean |TD error| into the running mean (EMA 0.99, bias-corrected) and
        return it: the scale that retention votes |delta_q| are divided by (see L_ret)."""
        self.abs_td_ema.mul_(0.99).add_(0.01 * torch.stack([td_error.abs().mean(), torch.ones_like(td_error[0])]))
        return (self.abs_td_ema[0] / self.abs_td_ema[1]).clamp(min=1e-8)

    # --- policy -------------------------------------------------------------------------------
    def heads(self, e, read, action=None, greedy: bool = False, floor: Optional[torch.Tensor] = None):
        """Policy and value heads on [e, read]. Given ``action`` (the update): its log-probability and
        the entropy. Without (acting): a sampled action (the mode if ``greedy``), no entropy.

        ``floor`` (acting, discrete actions, one value per row): the action is sampled from the mixture
        (1 - floor) softmax(logits) + floor / |A| (the exploration floor), but the log-probability returned
        is the softmax's own, the policy PPO trains (see "Exploration floor" in the module docstring)."""
        z = torch.cat([e, read], -1)
        out = self.actor(z)
        value = self.critic(z).squeeze(-1)
        value_int = self.critic_int(z).squeeze(-1) if self.critic_int is not None else None
        if self.continuous:
            dist = Normal(out, self.actor_logstd.expand_as(out).exp(), validate_args=False)
            if action is None:
                action = out if greedy else dist.sample()
                return action, dist.log_prob(action).sum(1), None, value, value_int, out
            return action, dist.log_prob(action).sum(1), dist.entropy().sum(1), value, value_int, out
        dist = Categorical(logits=out, validate_args=False)
        if action is None:
            if greedy:
                action = out.argmax(1)
            elif floor is None:
                action = dist.sample()
            else:
                probs = (1.0 - floor).unsqueeze(-1) * dist.probs + floor.unsqueeze(-1) / self.n_act
                action = Categorical(probs=probs, validate_args=False).sample()
            return action, dist.log_prob(action), None, value, value_int, out
        return action, dist.log_prob(action), dist.entropy(), value, value_int, out

    def action_input(self, action: torch.Tensor) -> torch.Tensor:
        """The previous action as an input: one-hot for discrete, the (clipped) vector for Box."""
        if self.continuous:
            return action.float().reshape(action.shape[0], -1)
        return F.one_hot(action.long(), self.n_act).float()


# ---------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------
class Memory:
    """Slot memory of N environments: M episodic slots then K persistent slots (S = M + K).

    Each slot keeps the embedding used for reading and its untagged key and value projections
    (computed with the current rollout's parameters, once per entry), its raw inputs (to re-encode
    it later), its retention score, its write step, its episode time, its persistent tag and
    ``src``: the index of its source in this rollout's pool (-1 = empty), which the rollout records
    at every step for the update.
    """

    def __init__(self, n: int, m: int, k: int, d: int, obs_shape, obs_dtype, n_act: int, device):
        self.n, self.m, self.k, self.s = n, m, k, m + k
        s = self.s
        self.src = torch.full((n, s), -1, dtype=torch.long, device=device)
        self.emb = torch.zeros((n, s, d), device=device)
        self.key = torch.zeros((n, s, d), device=device)
        self.val = torch.zeros((n, s, d), device=device)
        self.score = torch.zeros((n, s), device=device)
        self.xscore = torch.zeros((n, s), device=device)
        self.wstep = torch.zeros((n, s), dtype=torch.long, device=device)
        self.tau = torch.zeros((n, s), dtype=torch.long, device=device)
        self.outcome = torch.zeros((n, s), device=device)
        self.epis_ago = torch.zeros((n, s), device=device)
        self.obs = torch.zeros((n, s) + tuple(obs_shape), dtype=obs_dtype, device=device)
        self.pact = torch.zeros((n, s, n_act), device=device)
        self.prew = torch.zeros((n, s), device=device)
        self._fields = ("src", "emb", "key", "val", "score", "xscore", "wstep", "tau", "outcome", "epis_ago",
                        "obs", "pact", "prew")

    @property
    def occupied(self) -> torch.Tensor:
        return self.src >= 0

    def tags(self) -> torch.Tensor:
        if self.k == 0:  # episodic slots carry a zero tag
            return self.score.new_zeros(self.score.shape + (TAG_DIM,))
        persistent = torch.zeros_like(self.score)
        persistent[:, self.m:] = 1.0
        occ = self.occupied.float()
        return torch.stack([persistent, symlog(self.outcome), torch.log1p(self.epis_ago)], -1) * occ.unsqueeze(-1)

    def write(self, e, kv, obs, pact, prew, tau, score, xscore, pool_index, wstep, policy: str,
              generator: Optional[torch.Generator] = None):
        """Write one entry per env (embedding ``e``, untagged key and value ``kv``) into the episodic
        slots; evict by ``policy`` when full.

        learned: the lowest ``xscore`` among the M entries and the new one is dropped (so the new
        entry itself may be the one not kept); fifo: the oldest entry; random: a uniform one.
        Returns (slot written or -1 per env, evicted slot or -1 per env).
        """
        m, n = self.m, self.n
        occ = self.occupied[:, :m]
        full = occ.all(1)
        first_free = (~occ).float().argmax(1)
        if policy == "learned":
            cand = torch.cat([self.xscore[:, :m], xscore.unsqueeze(1)], 1)
            victim = cand.argmin(1)
        elif policy == "fifo":
            victim = self.wstep[:, :m].argmin(1)
        else:
            victim = torch.randint(0, m, (n,), generator=generator, device=e.device)
        target = torch.where(full, victim, first_free)
        evicted = torch.where(full, victim, torch.full_like(victim, -1))  # == m: new entry dropped
        rows = torch.nonzero(target < m).squeeze(1)
        slot = target[rows]
        self.src[rows, slot] = pool_index
        self.emb[rows, slot] = e[rows]
        self.key[rows, slot] = kv[0][rows]
        self.val[rows, slot] = kv[1][rows]
        self.score[rows, slot] = score[rows]
        self.xscore[rows, slot] = xscore[rows]
        self.wstep[rows, slot] = wstep
        self.tau[rows, slot] = tau[rows]
        if self.k > 0:  # outcome tags exist only with persistent slots (otherwise always 0)
            self.outcome[rows, slot] = 0.0
            self.epis_ago[rows, slot] = 0.0
        self.obs[rows, slot] = obs[rows].to(self.obs.dtype)  # MuJoCo gives float64
        self.pact[rows, slot] = pact[rows]
        self.prew[rows, slot] = prew[rows]
        written = torch.where(target < m, target, torch.full_like(target, -1))
        return written, evicted

    def end_episode(self, i: int, outcome: float, policy: str, generator: Optional[torch.Generator] = None,
                    rank: Optional[torch.Tensor] = None) -> None:
        """Env ``i``'s episode ended: the episode's entries and the persistent ones compete for the K
        persistent slots (learned: highest ``rank``, the retention scores of the entries with their
        current tags; fifo: most recent; random), then the episodic slots are cleared."""
        if self.k > 0:
            occ = torch.nonzero(self.src[i] >= 0).squeeze(1)
            if policy == "learned":
                order = occ[rank[occ].argsort(descending=True, stable=True)]
            elif policy == "fifo":
                order = occ[self.wstep[i, occ].argsort(descending=True)]
            else:
                order = occ[torch.randperm(len(occ), generator=generator, device=occ.device)]
            keep = order[: self.k]
            from_episode = keep < self.m
            dest = torch.arange(self.m, self.m + len(keep), device=keep.device)
            for name in self._fields:
                field = getattr(self, name)
                vals = field[i, keep].clone()
                field[i, self.m:] = -1 if name == "src" else 0
                field[i, dest] = vals
            self.outcome[i, dest[from_episode]] = outcome
            self.epis_ago[i, self.m:] += 1.0
        self.src[i, : self.m] = -1


# ---------------------------------------------------------------------------------------
# Exploration: visit counts for the exploration floor, RND
# ---------------------------------------------------------------------------------------
class VisitCounter:
    """Pseudo-counts of observations by SimHash (Tang et al. 2017, "#Exploration"): an observation is
    hashed to the signs of ``bits`` fixed random projections of its raw values, and N counts the visits
    of its hash bucket (similar observations share a bucket, so continuous observations are counted too)."""

    def __init__(self, obs_dim: int, seed: int, device, bits: int = 16):
        gen = torch.Generator().manual_seed(seed)
        self.proj = torch.randn((bits, obs_dim), generator=gen).to(device)
        self.powers = 2 ** torch.arange(bits, device=device)
        self.counts = torch.zeros(2 ** bits, device=device)

    def visit(self, obs: torch.Tensor) -> torch.Tensor:
        """Count one visit of each row of ``obs`` and return each row's count, this visit included."""
        code = ((obs.float().flatten(1) @ self.proj.T >= 0).long() * self.powers).sum(1)
        self.counts.index_add_(0, code, torch.ones_like(code, dtype=self.counts.dtype))
        return self.counts[code]


# RND (Burda et al. 2018, "Exploration by Random Network Distillation")
class RND(nn.Module):
    """Fixed random target net and trained predictor on normalised, clipped observations."""

    def __init__(self, obs_space: spaces.Box):
        super().__init__()
        self.obs_rms = RunningMeanStd(obs_space.shape)
        self.image = is_image(obs_space)

        def net(extra: bool) -> nn.Module:
            if self.image:
                enc, n_feat, self.channels_last = image_encoder(obs_space.shape)
            else:
                n_in = int(np.prod(obs_space.shape))
                enc, n_feat = nn.Sequential(layer_init(nn.Linear(n_in, 64)), nn.LeakyReLU()), 64
            tail = [layer_init(nn.Linear(n_feat, 64)), nn.ReLU(), layer_init(nn.Linear(64, 64))] if extra \
                else [layer_init(nn.Linear(n_feat, 64))]
            return nn.Sequential(enc, *tail)

        self.target, self.predictor = net(False), net(True)
        for p in self.target.parameters():
            p.requires_grad_(False)

    def error(self, obs: torch.Tensor) -> torch.Tensor:
        x = ((obs.double() - self.obs_rms.mean) / torch.sqrt(self.obs_rms.var + 1e-8)).clamp(-5, 5).float()
        if self.image:
            x = x.permute(0, 3, 1, 2) if self.channels_last else x
        else:
            x = x.flatten(1)
        return (self.predictor(x) - self.target(x)).pow(2).mean(-1)


# ---------------------------------------------------------------------------------------
# Returns
# ---------------------------------------------------------------------------------------
class RewardScaler:
    """Divide rewards by the running std of the discounted return (as gymnasium's NormalizeReward)."""

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
                last_value: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Generalised advantage estimation over a (T, N) rollout.

    ``dones[t]`` marks that the episode ended with action t (terminated *or* truncated);
    truncated episodes already carry ``gamma * V(final)`` inside ``rewards[t]``. RND's intrinsic
    return passes ``dones = 0`` (non-episodic).
    """
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


def hindsight_targets(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor,
                      last_value: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What the hindsight judges (entry critic, hindsight critic) explain and how retention votes are
    weighted: the one-step TD target r_t + gamma V(s_t+1) of each action (cut at episode ends) and its
    TD error, flattened over (T, N). Extrinsic rewards only: retention keeps what explains the task's
    reward, also under --rnd. See "Learned retention" above for why not the lambda-return."""
    td_error = compute_gae(rewards, values, dones, last_value, gamma, 0.0)
    return (td_error + values).reshape(-1), td_error.reshape(-1)


# ---------------------------------------------------------------------------------------
# Acting: one step of N envs (read, act) and the write that follows it
# ---------------------------------------------------------------------------------------
class Actor:
    """Per-env acting state around the Memory: previous action/reward, episode time, noise."""

    def __init__(self, agent: Agent, n: int, args: Args, obs_space, device, generator=None):
        self.agent, self.n, self.args, self.device = agent, n, args, device
        obs_dtype = torch.uint8 if obs_space.dtype == np.uint8 else torch.float32
        self.mem = Memory(n, args.memory_slots, args.persistent_slots, args.hidden_size, obs_space.shape,
                          obs_dtype, agent.n_act, device)
        self.pact = torch.zeros((n, agent.n_act), device=device)
        self.prew = torch.zeros(n, device=device)
        self.tau = torch.zeros(n, dtype=torch.long, device=device)
        self.ep_return = np.zeros(n)
        self.noise = torch.zeros((n, RET_HIDDEN), device=device)
        self.sigma = 0.0
        # Adaptive parameter noise (Plappert et al. 2018): the noise is scaled by the spread of the
        # clean scores written in the previous rollout, so however confident the scorer becomes,
        # exploration keeps comparable weight until sigma is annealed away.
        self.score_scale = 1.0
        self._clean_scores: list[torch.Tensor] = []
        self.generator = generator
        self.wstep = 0
        # Sums [evicted age, evicted count, kept age, kept count] for memory/mean_age_*, kept as a tensor
        # so that acting never waits for a .item() sync.
        self.age_stats = torch.zeros(4, device=device)

    def new_noise(self, rows) -> None:
        self.noise[rows] = torch.randn((len(rows), RET_HIDDEN), generator=self.generator,
                                       device=self.device) / math.sqrt(RET_HIDDEN)

    def explore_scores(self, score, hidden, noise):
        return score + self.sigma * self.score_scale * (hidden * noise).sum(-1)

    @torch.no_grad()
    def refresh(self, pool_offset: int = 0):
        """Re-encode the stored entries with the current parameters (start of a rollout); their pool
        indices become their slot numbers (the 'carry-in' part of the next pool)."""
        if self._clean_scores:
            scores = torch.cat(self._clean_scores)
            if len(scores) > 1:
                self.score_scale = scores.std(correction=0).item() + 1e-6
        self._clean_scores = []
        mem, s = self.mem, self.mem.s
        occ = mem.occupied
        flat = lambda x: x.reshape(self.n * s, *x.shape[2:])  # noqa: E731
        e = self.agent.embed(flat(mem.obs), flat(mem.pact), flat(mem.prew), flat(mem.tau))
        score, hidden = self.agent.retention(e, flat(mem.pact), flat(mem.prew), flat(mem.tau), flat(mem.tags()))
        xs = self.explore_scores(score, hidden, self.noise.repeat_interleave(s, 0))
        mem.emb = e.view(self.n, s, -1).clone()
        mem.key, mem.val = (x.clone() for x in pool_kv(self.agent, mem.emb))
        mem.score, mem.xscore = score.view(self.n, s).clone(), xs.view(self.n, s).clone()
        slots = torch.arange(s, device=self.device).expand(self.n, s) + pool_offset
        mem.src = torch.where(occ, slots, torch.full_like(mem.src, -1))
        return dict(obs=mem.obs.clone(), pact=mem.pact.clone(), prew=mem.prew.clone(), tau=mem.tau.clone())

    def act(self, obs: torch.Tensor, greedy: bool = False, floor: Optional[torch.Tensor] = None):
        """Read memory and act for all envs (``floor``: see ``Agent.heads``). Returns the policy outputs,
        the read's weights and the embedding of this step (written by ``write`` after the env step)."""
        e = self.agent.embed(obs, self.pact, self.prew, self.tau)
        mem = self.mem
        k, v = mem.key, mem.val
        if mem.k > 0:
            tags = mem.tags()
            k, v = k + self.agent.tag_key(tags), v + self.agent.tag_value(tags)
        read, w = self.agent.attend(e, k, v, mem.occupied)
        out = self.agent.heads(e, read, greedy=greedy, floor=floor)
        return out, w, e, read

    def write(self, e, obs, pool_index: int, deterministic: bool = False) -> None:
        agent, mem = self.agent, self.mem
        score, hidden = agent.retention(e, self.pact, self.prew, self.tau)
        xs = score if deterministic else self.explore_scores(score, hidden, self.noise)
        if not deterministic:
            self._clean_scores.append(score)
        # Interpretability: age (in episode steps) of evicted vs kept entries. An eviction only happens
        # in a full memory, so the M episodic slots' total age before the write minus after it is the
        # evicted entry's age (the new entry has age 0; it is 0 too if the new entry was the one dropped).
        age_sum = lambda: (self.tau.unsqueeze(1) - mem.tau[:, : mem.m]).sum(1).float()  # noqa: E731
        before = age_sum()
        _, evicted = mem.write(e, pool_kv(agent, e), obs, self.pact, self.prew, self.tau, score, xs, pool_index,
                               self.wstep, self.args.retention, self.generator)
        self.wstep += 1
        ev = (evicted >= 0).float()
        after = age_sum()
        kept_n = mem.m - 1 + (evicted == mem.m).float()
        self.age_stats += torch.stack([((before - after) * ev).sum(), ev.sum(), (after * ev).sum(),
                                       (kept_n * ev).sum()])

    def advance(self, action: torch.Tensor, reward_raw: np.ndarray) -> None:
        """Inputs of the next step: previous action (clipped to the action space for Box), reward, time."""
        self.pact = self.agent.action_input(action)
        self.prew = symlog(torch.as_tensor(reward_raw, dtype=torch.float32, device=self.device))
        self.tau = self.tau + 1
        self.ep_return += reward_raw

    @torch.no_grad()
    def end_episodes(self, rows, deterministic: bool = False) -> None:
        rows = torch.as_tensor(np.asarray(rows), dtype=torch.long, device=self.device)
        mem, rank = self.mem, None
        if mem.k > 0 and self.args.retention == "learned":
            s = mem.s
            pick = lambda x: x[rows].reshape(len(rows) * s, *x.shape[2:])  # noqa: E731
            score, hidden = self.agent.retention(pick(mem.emb), pick(mem.pact), pick(mem.prew), pick(mem.tau),
                                                 pick(mem.tags()))
            if not deterministic:
                score = self.explore_scores(score, hidden, self.noise[rows].repeat_interleave(s, 0))
            rank = score.view(len(rows), s)
        for r, i in enumerate(rows.tolist()):
            mem.end_episode(i, float(self.ep_return[i]), self.args.retention, self.generator,
                            None if rank is None else rank[r])
        self.pact[rows] = 0.0
        self.prew[rows] = 0.0
        self.tau[rows] = 0
        self.ep_return[rows.cpu().numpy()] = 0.0
        if not deterministic:
            self.new_noise(rows)


# ---------------------------------------------------------------------------------------
# Update-time recomputation (batched over all T x N queries)
# ---------------------------------------------------------------------------------------
def pool_embed(agent: Agent, pool: dict) -> torch.Tensor:
    """Embeddings (N, P, D) of every pool entry with the current parameters."""
    n, p = pool["prew"].shape
    flat = lambda x: x.reshape(n * p, *x.shape[2:])  # noqa: E731
    return agent.embed(flat(pool["obs"]), flat(pool["pact"]), flat(pool["prew"]), flat(pool["tau"])).view(n, p, -1)


def pool_kv(agent: Agent, pool_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Untagged keys and values (N, P, D) of every pool entry, computed once per minibatch."""
    return agent.k_proj(pool_e), agent.v_proj(pool_e)


def env_groups(i_idx: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
    """Rows of the queries of envs ``i_idx`` (B,) in a layout grouped by env and padded to the largest
    group c: query b goes to row i_idx[b] * c + (its rank among its env's queries)."""
    counts = torch.bincount(i_idx, minlength=n)
    c = int(counts.max())
    order = torch.argsort(i_idx, stable=True)
    rank = torch.empty_like(i_idx)
    rank[order] = torch.arange(len(i_idx), device=i_idx.device) - (torch.cumsum(counts, 0) - counts)[i_idx[order]]
    return i_idx * c + rank, c


def replay(agent: Agent, pool_e: torch.Tensor, slot_src, slot_tag, t_idx, i_idx, s_off: int, m: int,
           kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None, visible: Optional[torch.Tensor] = None,
           weights: bool = False):
    """Reproduce the rollout's read for the queries (t_idx, i_idx) from the recorded slot sources
    (``m`` episodic slots, then the persistent ones) and, given ``visible`` (B, P), the hindsight
    read: the read each query would get if every entry visible to it were in memory (untagged).
    ``kv``: ``pool_kv(agent, pool_e)`` if already computed.

    Returns the queries' embeddings e (B, D), their read (B, D), src (B, S), the hindsight read (or
    None) and, if ``weights``, the read's weights per slot (B, H, S) as in the rollout (else None).

    The queries are grouped by env (``env_groups``), so that each env's logits are ONE dense
    (queries x pool) product shared by both reads; a read is that product restricted by an additive
    mask to the pool entries it may see. On CPU this is much cheaper than gathering every query's
    slot keys. Entries in persistent slots carry their slot's tag in their key and value (see
    ``tag_key``), so their logits are gathered per query and join the read's softmax."""
    src = slot_src[t_idx, i_idx]                                  # B S
    occupied = src >= 0
    k_pool, v_pool = pool_kv(agent, pool_e) if kv is None else kv
    n, p, d = pool_e.shape
    b, h, dh, n_pers = len(t_idx), agent.num_heads, d // agent.num_heads, src.shape[1] - m
    e = pool_e.reshape(n * p, d).index_select(0, i_idx * p + s_off + t_idx)
    q = agent.q_proj(e) / math.sqrt(dh)                           # scaled as in Agent.attend
    row, c = env_groups(i_idx, n)
    q_g = agent.heads_split(q.new_zeros(n * c, d).index_copy(0, row, q).view(n, c, d)).transpose(1, 2)
    logits = q_g @ agent.heads_split(k_pool).permute(0, 2, 3, 1)   # n H c P
    v = agent.heads_split(v_pool).transpose(1, 2)                  # n H P dh

    def grouped_bias(mask):  # (B, P) -> additive mask (n, 1, c, P): 0 where seen, -1e30 elsewhere
        bias = q.new_full((n * c, p), -1e30).index_copy(0, row, q.new_zeros(b, p).masked_fill(~mask, -1e30))
        return bias.view(n, 1, c, p)

    def ungroup(x):  # (n, H, c, ...) -> (B, H, ...)
        return x.transpose(1, 2).reshape(n * c, h, *x.shape[3:]).index_select(0, row)

    # The episodic slots' entries as a (B, P) mask; empty slots scatter into a spare last column.
    in_mem = torch.zeros((b, p + 1), dtype=torch.bool, device=src.device).scatter_(
        1, torch.where(occupied[:, :m], src[:, :m], p), True)[:, :p]
    mem_logits = logits + grouped_bias(in_mem)
    if n_pers:
        rows_p = (i_idx.unsqueeze(1) * p + src[:, m:].clamp(min=0)).reshape(-1)
        tag = slot_tag[t_idx, i_idx][:, m:]
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
        w_p = ungroup(w[..., p:])                                  # B H K
        read = read + (w_p.unsqueeze(-1) * v_p.transpose(1, 2)).sum(-2)
    # With no occupied slot the read is 0 (the softmax of an all-masked row is uniform, not 0).
    read = agent.read_out(read.flatten(1) * occupied.any(-1, keepdim=True).float())
    w_slots = None
    if weights:
        w_rows = ungroup(w)                                        # B H (P + K)
        w_epi = w_rows[..., :p].gather(-1, src[:, :m].clamp(min=0).unsqueeze(1).expand(-1, h, -1))
        w_slots = torch.cat([w_epi, w_rows[..., p:]], -1) * occupied.unsqueeze(1).float()
    read_h = None
    if visible is not None:
        w_h = torch.softmax(logits + grouped_bias(visible), -1)
        read_h = agent.read_out(ungroup(w_h @ v).flatten(1) * visible.any(-1, keepdim=True).float())
    return e, read, src, read_h, w_slots


def entry_usefulness(agent: Agent, pool_e: torch.Tensor, e: torch.Tensor, action: torch.Tensor,
                     ret: torch.Tensor, visible: torch.Tensor, src: torch.Tensor, tag: torch.Tensor,
                     i_idx: torch.Tensor, m: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The entry critic's loss and the retention target of decisions (B queries).

    For every decision (input ``e``, ``action``, return ``ret``) and every entry it may look back at
    (``visible``: B, P), the entry critic predicts the return from that ONE entry; its squared error
    is trained down for every pair. The target is softmax over the visible entries of
    -err / (temperature * mean err): the entries that predict the return best get the votes, entries
    that explain nothing (all with about the same error) share them evenly. Entries in persistent
    slots (index >= m) are judged with their slot's tag, as they are read."""
    p = pool_e.shape[1]
    h_e = agent.entry_e(pool_e.detach()).index_select(0, i_idx)                       # B P H
    psrc = src[:, m:]
    if psrc.shape[1]:
        slot_h = (h_e.gather(1, psrc.clamp(min=0).unsqueeze(-1).expand(-1, -1, h_e.shape[-1]))
                  + agent.entry_e(F.linear(tag[:, m:], agent.tag_proj.weight.detach())))
        # Empty slots scatter into a spare last column, so they never overwrite a real entry.
        idx = torch.where(psrc >= 0, psrc, p).unsqueeze(-1).expand_as(slot_h)
        h_e = torch.cat([h_e, h_e.new_zeros(len(src), 1, h_e.shape[-1])], 1).scatter(1, idx, slot_h)[:, :p]
    h_q = agent.entry_q(torch.cat([e.detach(), agent.action_input(action)], -1))     # B H
    mu = agent.entry_out(torch.tanh(h_q.unsqueeze(1) + h_e)).squeeze(-1)              # B P
    err = (mu - ret.unsqueeze(1)) ** 2
    vis = visible.float()
    has = visible.any(1).float()
    mean_err = (err * vis).sum(1) / vis.sum(1).clamp(min=1.0)
    loss = (mean_err * has).sum() / has.sum().clamp(min=1.0)
    with torch.no_grad():
        logits = -err / (temperature * mean_err.unsqueeze(1) + 1e-8)
        target = torch.softmax(logits.masked_fill(~visible, -1e30), -1) * has.unsqueeze(1)
    return loss, target


def hindsight_retention_loss(agent: Agent, pool: dict, pool_e: torch.Tensor, target: torch.Tensor,
                             visible: torch.Tensor, src: torch.Tensor, tag: torch.Tensor, i_idx: torch.Tensor,
                             weight: torch.Tensor, m: int) -> torch.Tensor:
    """Cross-entropy from the usefulness target of each query (B, P; see ``entry_usefulness``) to
    softmax of the retention scores of the entries visible to it (entries in persistent slots,
    index >= m, scored with their slot's tag; episodic slots carry a zero tag), weighted per query."""
    n, p = pool["prew"].shape
    flat = lambda x: x.reshape(n * p, *x.shape[2:])  # noqa: E731
    score, _ = agent.retention(flat(pool_e), flat(pool["pact"]), flat(pool["prew"]), flat(pool["tau"]))
    score = score.view(n, p).index_select(0, i_idx)               # B P
    psrc = src[:, m:]
    if psrc.shape[1]:
        j = psrc.clamp(min=0)
        ii = i_idx.unsqueeze(1).expand_as(j)
        slot_e = flat(pool_e).index_select(0, (ii * p + j).reshape(-1)).view(*j.shape, -1)
        slot_score, _ = agent.retention(slot_e, pool["pact"][ii, j], pool["prew"][ii, j], pool["tau"][ii, j],
                                        tag[:, m:])
        # Empty slots scatter into a spare last column, so they never overwrite a real entry.
        score = torch.cat([score, score.new_zeros(len(src), 1)], 1).scatter(1, torch.where(psrc >= 0, psrc, p),
                                                                             slot_score)[:, :p]
    has = visible.any(1)
    logp = torch.log_softmax(score.masked_fill(~visible, -1e30), -1)
    ce = -(target * logp * visible.float()).sum(-1)
    return (weight * ce * has.float()).sum() / has.float().sum().clamp(min=1.0)


def visible_entries(slot_src, ep_id, t_idx, i_idx, s_off: int) -> torch.Tensor:
    """(B, P) mask of pool entries a query may look back at in hindsight: what its memory held, and
    every earlier step of its own episode in this rollout (whether kept or evicted)."""
    t_len = ep_id.shape[0]
    p = s_off + t_len
    src = slot_src[t_idx, i_idx]
    marks = torch.zeros((len(t_idx), p), dtype=torch.long, device=src.device)
    vis = marks.scatter_add_(1, src.clamp(min=0), (src >= 0).long()) > 0
    steps = torch.arange(t_len, device=src.device)
    same = (ep_id[:, i_idx].T == ep_id[t_idx, i_idx].unsqueeze(1)) & (steps.unsqueeze(0) < t_idx.unsqueeze(1))
    vis[:, s_off:] |= same
    return vis


# ---------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------
def attention_picture(rows: list[tuple[np.ndarray, np.ndarray]], length: int) -> np.ndarray:
    """(decision step x source step) matrix of attention weights for one episode."""
    mat = np.zeros((len(rows), max(length, 1)), np.float32)
    for t, (taus, w) in enumerate(rows):
        np.add.at(mat[t], taus, w)
    return mat


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


@torch.no_grad()
def evaluate(agent: Agent, args: Args, env_kwargs: dict, kind: str, episodes: int,
             device: torch.device) -> tuple[dict, Optional[np.ndarray]]:
    """Greedy evaluation with deterministic eviction on fresh envs seeded apart from training; memory
    (episodic and persistent) is carried exactly as in training. Also returns the attention matrix of
    the first episode of env 0.

    For envs whose info reports ``cue_step`` (logging only, never an input), it also measures the two
    halves of recall at each episode's last decision: ``cue_in_memory``, the share of episodes whose
    cue entry was in an episodic slot, and ``cue_attention``, the attention weight on it (the head
    that reads it most, mean over episodes) -- retention can keep the cue while the read ignores it."""
    n_envs = max(1, min(episodes, 8))
    quota = [episodes // n_envs + (i < episodes % n_envs) for i in range(n_envs)]
    envs = make_vector_env(args, env_kwargs, kind, n_envs)
    gen = torch.Generator(device=device).manual_seed(args.seed + 100_000)
    actor = Actor(agent, n_envs, args, envs.single_observation_space, device, gen)
    obs, _ = envs.reset(seed=[args.seed + 100_000 + i for i in range(n_envs)])
    returns, successes, done_count = [], [], [0] * n_envs
    cue_in, cue_attn = [], []
    rows, picture = [], None
    m = actor.mem.m
    while any(d < q for d, q in zip(done_count, quota)):
        obs_t = torch.as_tensor(obs, device=device)
        (action, *_), w, e, _ = actor.act(obs_t, greedy=True)
        epi = actor.mem.occupied[:, :m]
        read_tau = torch.where(epi, actor.mem.tau[:, :m], -1)  # episode times of the entries read now
        if picture is None:
            rows.append((read_tau[0][epi[0]].cpu().numpy(), w[0].mean(0)[:m][epi[0]].cpu().numpy()))
        obs, reward, term, trunc, info = envs.step(action.cpu().numpy())
        actor.write(e, obs_t, 0, deterministic=True)
        actor.advance(clip_action(action, envs.single_action_space), reward)
        done = np.flatnonzero(term | trunc)
        if len(done):
            if picture is None and 0 in done:
                picture = attention_picture(rows, len(rows))
            actor.end_episodes(done, deterministic=True)
        for i in done:
            if done_count[i] < quota[i]:
                ep_r, _, success = finished_episode(info, i)
                returns.append(ep_r)
                if success is not None:
                    successes.append(float(success))
                fin = info["final_info"]
                if "cue_step" in fin and fin.get("_cue_step", np.ones(n_envs, bool))[i]:
                    is_cue = read_tau[i] == int(fin["cue_step"][i])
                    cue_in.append(float(is_cue.any()))
                    cue_attn.append(float((w[i, :, :m] * is_cue).sum(-1).max()))
                done_count[i] += 1
    envs.close()
    mean = lambda x: float(np.mean(x)) if x else None  # noqa: E731
    return dict(mean_return=float(np.mean(returns)), std_return=float(np.std(returns)),
                success_rate=mean(successes), cue_in_memory=mean(cue_in), cue_attention=mean(cue_attn)), picture


def clip_action(action: torch.Tensor, space: spaces.Space) -> torch.Tensor:
    if isinstance(space, spaces.Box):
        return action.clamp(torch.as_tensor(space.low, device=action.device),
                            torch.as_tensor(space.high, device=action.device))
    return action


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
    if args.explore_visits > 0 and not isinstance(probe.action_space, spaces.Discrete):
        raise UserError(f"--explore-visits needs discrete actions; {args.env_id} has {probe.action_space}")
    probe.close()
    for key, value in PRESETS[kind].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in ("total_timesteps", "num_envs", "num_steps", "num_minibatches", "update_epochs",
                 "memory_slots", "hidden_size", "num_heads"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("persistent_slots", "eval_episodes", "retention_coef", "retention_noise", "aux_recon_coef",
                 "hindsight_critic_coef", "heatmap_interval", "explore_visits"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not args.usefulness_temperature > 0:
        raise UserError(f"--usefulness-temperature must be > 0, got {args.usefulness_temperature}")
    if not 0.0 < args.rnd_update_proportion <= 1.0:
        raise UserError(f"--rnd-update-proportion must be in (0, 1], got {args.rnd_update_proportion}")
    batch_size = args.num_envs * args.num_steps
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

    envs = make_vector_env(args, env_kwargs, kind, args.num_envs, os.path.join(run_dir, "videos"))
    obs_space, act_space = envs.single_observation_space, envs.single_action_space
    agent = Agent(obs_space, act_space, args).to(device)
    rnd = RND(obs_space).to(device) if args.rnd else None
    counter = VisitCounter(int(np.prod(obs_space.shape)), args.seed, device) if args.explore_visits > 0 else None
    params = list(agent.parameters()) + (list(rnd.predictor.parameters()) if rnd else [])
    # fused: one kernel for all parameters (same update rule, ~2x faster step on CPU with many small tensors)
    optimizer = optim.Adam(params, lr=args.learning_rate, eps=1e-5, fused=True)
    reward_scaler = RewardScaler(args.num_envs, args.gamma) if args.normalize else None

    start_iteration, global_step, elapsed_before = 1, 0, 0.0
    if resume_state is not None:
        try:
            agent.load_state_dict(resume_state["agent"])
        except RuntimeError as err:  # e.g. a checkpoint written before the read's LayerNorm existed
            missing = str(err).strip().splitlines()[-1].strip()
            raise UserError(f"--resume {args.resume}: the checkpoint's network does not match this version "
                            f"of trace_ppo.py ({missing}); start a new run") from None
        optimizer.load_state_dict(resume_state["optimizer"])
        if rnd is not None:
            rnd.load_state_dict(resume_state["rnd"])
        if counter is not None and resume_state.get("visit_counts") is not None:
            counter.counts.copy_(resume_state["visit_counts"])
        if reward_scaler is not None:
            reward_scaler.rms.load_state_dict(resume_state["reward_rms"])
        start_iteration = resume_state["iteration"] + 1
        global_step, elapsed_before = resume_state["global_step"], resume_state["wall_time_s"]
        random.setstate(resume_state["rng"]["python"])
        np.random.set_state(resume_state["rng"]["numpy"])
        torch.set_rng_state(resume_state["rng"]["torch"])
        print(f"resuming {run_dir} at step {global_step} (memory contents start empty)", flush=True)

    # A resumed run hides the killed run's events *after* the checkpoint; the checkpointed
    # update's own scalars (logged at global_step) stay.
    writer = SummaryWriter(run_dir, purge_step=global_step + 1 if resume_state else None)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" +
                    "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))

    T, N, S = args.num_steps, args.num_envs, args.memory_slots + args.persistent_slots
    obs_dtype = torch.uint8 if obs_space.dtype == np.uint8 else torch.float32
    obs = torch.zeros((T, N) + obs_space.shape, dtype=obs_dtype, device=device)
    actions = torch.zeros((T, N) + act_space.shape, device=device)
    pacts = torch.zeros((T, N, agent.n_act), device=device)
    logprobs, rewards, dones, values, prews = (torch.zeros((T, N), device=device) for _ in range(5))
    taus = torch.zeros((T, N), dtype=torch.long, device=device)
    slot_src = torch.zeros((T, N, S), dtype=torch.long, device=device)
    slot_tag = torch.zeros((T, N, S, TAG_DIM), device=device)
    attn = torch.zeros((T, N, S), device=device)
    floors = torch.zeros((T, N), device=device)
    if rnd is not None:
        rewards_int, values_int = torch.zeros((T, N), device=device), torch.zeros((T, N), device=device)
        next_obs_buf = torch.zeros((T, N) + obs_space.shape, dtype=obs_dtype, device=device)
        int_ret_rms, int_ret = RunningMeanStd(()), torch.zeros(N, device=device)

    def checkpoint(iteration: int, wall: float) -> None:
        save_atomic(dict(agent=agent.state_dict(), optimizer=optimizer.state_dict(), iteration=iteration,
                         global_step=global_step, wall_time_s=wall, args=asdict(args),
                         rnd=rnd.state_dict() if rnd else None,
                         visit_counts=counter.counts if counter else None,
                         reward_rms=reward_scaler.rms.state_dict() if reward_scaler else None,
                         rng=dict(python=random.getstate(), numpy=np.random.get_state(),
                                  torch=torch.get_rng_state())), ckpt_path)
        writer.flush()  # the TB log of a killed run then reaches at least its checkpoint

    next_obs, _ = envs.reset(seed=args.seed + start_iteration - 1)
    if rnd is not None and resume_state is None:
        # RND: observation normalisation initialised from random-policy steps (Burda et al.).
        init_obs = []
        for _ in range(args.num_steps):
            o, *_ = envs.step(np.stack([act_space.sample() for _ in range(N)]))
            init_obs.append(o)
        rnd.obs_rms.update(torch.as_tensor(np.stack(init_obs), device=device))
        next_obs, _ = envs.reset(seed=args.seed + start_iteration - 1)
    next_obs = torch.as_tensor(next_obs, device=device)
    actor = Actor(agent, N, args, obs_space, device)
    actor.new_noise(list(range(N)))
    progress = Progress(args.total_timesteps)
    mstats = dict(cue_in=0, cue_n=0)
    start_time, start_step, last_ckpt = time.time(), global_step, time.time()
    for iteration in range(start_iteration, num_iterations + 1):
        frac = (iteration - 1.0) / num_iterations
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = (1.0 - frac) * args.learning_rate
        anneal = args.retention_noise_anneal
        actor.sigma = args.retention_noise * max(0.0, 1.0 - frac / anneal) if anneal > 0 else 0.0

        carry = actor.refresh()
        for step in range(T):
            global_step += N
            obs[step], pacts[step], prews[step], taus[step] = next_obs, actor.pact, actor.prew, actor.tau
            slot_src[step] = actor.mem.src
            if actor.mem.k > 0:  # episodic slots carry a zero tag (the buffer's initial value)
                slot_tag[step] = actor.mem.tags()
            floor = None
            if counter is not None:
                # Exploration floor: an observation's first m visits act uniformly, later ones with chance m/N.
                floor = floors[step] = (args.explore_visits / counter.visit(next_obs)).clamp(max=1.0)
            with torch.no_grad():
                (action, logprob, _, value, value_int, _), w, e, _ = actor.act(next_obs, floor=floor)
            attn[step] = w.mean(1)
            values[step], actions[step], logprobs[step] = value, action, logprob
            if rnd is not None:
                values_int[step] = value_int
            next_obs_np, reward, term, trunc, info = envs.step(action.cpu().numpy())
            # A non-finite reward would enter the memory (as "previous reward") before any loss
            # is computed, so it is caught here, with the same message and checkpoint guarantee.
            if not np.isfinite(reward).all():
                raise TrainingDiverged(
                    f"non-finite reward at step {global_step}; stopped, last good checkpoint kept at "
                    f"{ckpt_path if os.path.exists(ckpt_path) else '(none yet)'}")
            done = term | trunc
            raw_reward = np.asarray(reward, dtype=np.float64)
            if kind == "atari":
                reward = np.sign(reward)
            if reward_scaler is not None:
                reward = reward_scaler(reward, done)
            reward = torch.as_tensor(reward, dtype=torch.float32, device=device)
            with torch.no_grad():
                actor.write(e, obs[step], S + step)
            actor.advance(clip_action(action, act_space), raw_reward)
            done_rows = np.flatnonzero(done)
            if len(done_rows):
                real_next = next_obs_np.copy()
                real_next[done_rows] = np.stack(info["final_obs"][done_rows])
            else:
                real_next = next_obs_np
            # Truncation is not termination: bootstrap with V(final obs) read from the memory that
            # includes the episode's last entry.
            cut = np.flatnonzero(trunc & ~term)
            if len(cut):
                with torch.no_grad():
                    final = torch.as_tensor(real_next, device=device)
                    (*_, v_final, _, _), _, _, _ = actor.act(final)
                reward[cut] += args.gamma * v_final[cut]
            if rnd is not None:
                nxt = torch.as_tensor(real_next, device=device)
                next_obs_buf[step] = nxt
                with torch.no_grad():
                    rewards_int[step] = rnd.error(nxt)
                # Intrinsic return accumulated along the time axis, never cut at episode ends.
                int_ret = int_ret * args.rnd_gamma + rewards_int[step]
                int_ret_rms.update(int_ret)
            rewards[step], dones[step] = reward, torch.as_tensor(done, dtype=torch.float32, device=device)
            for i in done_rows:
                ep_r, ep_l, success = finished_episode(info, i)
                writer.add_scalar("charts/episodic_return", ep_r, global_step)
                writer.add_scalar("charts/episodic_length", ep_l, global_step)
                if success is not None:
                    writer.add_scalar("charts/episodic_success", float(success), global_step)
                progress.episode(ep_r, success)
                fin = info["final_info"]
                if "cue_step" in fin and fin.get("_cue_step", np.ones(N, bool))[i]:
                    # Logging only: was the cue (by the env's own index) in memory at the decision?
                    # The episode times of the entries read at this step, from the recorded slot sources.
                    src = slot_src[step, i, : args.memory_slots]
                    src = src[src >= 0]
                    tau_read = torch.where(src < S, carry["tau"][i, src.clamp(max=S - 1)],
                                           taus[(src - S).clamp(min=0), i])
                    mstats["cue_in"] += int((tau_read == int(fin["cue_step"][i])).any())
                    mstats["cue_n"] += 1
            if len(done_rows):
                actor.end_episodes(done_rows)
            next_obs = torch.as_tensor(next_obs_np, device=device)

        with torch.no_grad():
            (*_, last_value, last_value_int, _), _, _, _ = actor.act(next_obs)
        advantages = compute_gae(rewards, values, dones, last_value, args.gamma, args.gae_lambda)
        returns = advantages + values
        b_td_target, b_td_error = hindsight_targets(rewards, values, dones, last_value, args.gamma)
        if rnd is not None:
            r_int = rewards_int / torch.sqrt(int_ret_rms.var.float() + 1e-8)
            adv_int = compute_gae(r_int, values_int, torch.zeros_like(dones), last_value_int,
                                  args.rnd_gamma, args.gae_lambda)
            returns_int = adv_int + values_int
            b_adv = (args.rnd_ext_coef * advantages + args.rnd_int_coef * adv_int).reshape(-1)
            b_returns_int, b_values_int = returns_int.reshape(-1), values_int.reshape(-1)
            b_next_obs = next_obs_buf.reshape((-1,) + obs_space.shape)
        else:
            b_adv = advantages.reshape(-1)

        pool = dict(obs=torch.cat([carry["obs"], obs.transpose(0, 1)], 1),
                    pact=torch.cat([carry["pact"], pacts.transpose(0, 1)], 1),
                    prew=torch.cat([carry["prew"], prews.transpose(0, 1)], 1),
                    tau=torch.cat([carry["tau"], taus.transpose(0, 1)], 1))
        ep_id = torch.cumsum((taus == 0).long(), 0)
        b_actions = actions.reshape((-1,) + act_space.shape)
        if not agent.continuous:
            b_actions = b_actions.long()
        b_logprobs, b_returns, b_values = logprobs.reshape(-1), returns.reshape(-1), values.reshape(-1)

        use_ret = args.retention == "learned" and args.retention_coef > 0
        if use_ret or args.hindsight_critic_coef > 0:
            all_t, all_i = (x.reshape(-1) for x in torch.meshgrid(torch.arange(T, device=device),
                                                                  torch.arange(N, device=device), indexing="ij"))
            visible = visible_entries(slot_src, ep_id, all_t, all_i, S).view(T, N, -1)
        b_inds = np.arange(batch_size)
        stats = {k: [] for k in ("policy_loss", "value_loss", "entropy", "old_approx_kl", "approx_kl",
                                 "clipfrac", "retention_loss", "entry_critic_loss")}
        if args.aux_recon_coef > 0:
            stats["aux_recon_loss"] = []
        if args.hindsight_critic_coef > 0:
            stats["hindsight_critic_loss"] = []
        if use_ret:
            vote_scale = agent.retention_vote_scale(b_td_error)
        if rnd is not None:
            stats["rnd_loss"] = []
        for epoch in range(args.update_epochs):
            np.random.shuffle(b_inds)
            for start in range(0, batch_size, minibatch_size):
                mb = torch.as_tensor(b_inds[start:start + minibatch_size], device=device)
                t_idx, i_idx = mb // N, mb % N
                pool_e = pool_embed(agent, pool)
                kv = pool_kv(agent, pool_e)
                vis_h = visible[t_idx, i_idx] if args.hindsight_critic_coef > 0 else None
                e, read, src, read_h, _ = replay(agent, pool_e, slot_src, slot_tag, t_idx, i_idx, S,
                                                 args.memory_slots, kv, vis_h)
                _, newlogprob, entropy, newvalue, newvalue_int, _ = agent.heads(e, read, b_actions[mb])
                logratio = newlogprob - b_logprobs[mb]
                if epoch == 0 and start == 0:
                    # Before any gradient step the update must reproduce the rollout exactly.
                    replay_error = max(logratio.abs().max().item(), (newvalue - b_values[mb]).abs().max().item())
                ratio = logratio.exp()
                with torch.no_grad():
                    old_approx_kl = (-logratio).mean()
                    approx_kl = ((ratio - 1) - logratio).mean()
                    clipfrac = ((ratio - 1.0).abs() > args.clip_coef).float().mean()
                mb_adv = b_adv[mb]
                if args.norm_adv:
                    mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
                pg_loss = torch.max(-mb_adv * ratio,
                                    -mb_adv * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)).mean()
                if args.clip_vloss:
                    v_clipped = b_values[mb] + torch.clamp(newvalue - b_values[mb], -args.clip_coef, args.clip_coef)
                    v_loss = 0.5 * torch.max((newvalue - b_returns[mb]) ** 2, (v_clipped - b_returns[mb]) ** 2).mean()
                else:
                    v_loss = 0.5 * ((newvalue - b_returns[mb]) ** 2).mean()
                if rnd is not None:
                    v_loss = v_loss + 0.5 * ((newvalue_int - b_returns_int[mb]) ** 2).mean()
                entropy_loss = entropy.mean()
                loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef
                # Hindsight usefulness: the actions whose outcome surprised the critic (large |TD error|)
                # vote for the entries that explain it among everything their episode saw. |TD error|
                # is scaled by its running mean over updates, not by this minibatch's: with one
                # decision per episode most rollouts hold none, and a per-minibatch scale would give
                # their value-noise queries the full weight of a decision.
                if use_ret:
                    # Only the eighth of the minibatch with the largest |TD error| is judged: the other
                    # queries' votes weigh little, and the (decision x entry) pairs are what costs.
                    mb_td = b_td_error[mb]
                    sub = mb_td.abs().topk(max(1, len(mb) // 8)).indices
                    ts, is_ = t_idx[sub], i_idx[sub]
                    ec_loss, target = entry_usefulness(agent, pool_e, e[sub], b_actions[mb][sub], b_td_target[mb][sub],
                                                       visible[ts, is_], src[sub], slot_tag[ts, is_], is_,
                                                       args.memory_slots, args.usefulness_temperature)
                    ret_loss = hindsight_retention_loss(agent, pool, pool_e, target, visible[ts, is_], src[sub],
                                                        slot_tag[ts, is_], is_, mb_td[sub].abs() / vote_scale,
                                                        args.memory_slots)
                    loss = loss + args.retention_coef * (ret_loss + ec_loss)
                    stats["retention_loss"].append(ret_loss.item())
                    stats["entry_critic_loss"].append(ec_loss.item())
                if args.hindsight_critic_coef > 0:
                    # Hindsight critic: predict the one-step TD target of (state, action) from the read
                    # over everything the episode saw. Its gradient trains the shared query/key/value
                    # networks to find the entries that decide the reward even when retention did
                    # not keep them -- this is what lets retention bootstrap (the hindsight targets
                    # above come from the same query/key networks).
                    q_h = agent.hindsight_critic(torch.cat([e, read_h, agent.action_input(b_actions[mb])], -1))
                    hc_loss = 0.5 * ((q_h.squeeze(-1) - b_td_target[mb]) ** 2).mean()
                    loss = loss + args.hindsight_critic_coef * hc_loss
                    stats["hindsight_critic_loss"].append(hc_loss.item())
                if args.aux_recon_coef > 0:
                    # Reconstruct a random stored observation from the read and that entry's time.
                    occupied = src >= 0
                    has = occupied.any(1)
                    pick = torch.multinomial(occupied.float() + (~has).float().unsqueeze(1), 1).squeeze(1)
                    j = src[torch.arange(len(mb)), pick].clamp(min=0)
                    target = agent.recon_target(pool["obs"][i_idx, j])
                    pred = agent.recon(torch.cat([read, time_encoding(pool["tau"][i_idx, j])], -1))
                    recon = (((pred - target) ** 2).mean(-1) * has.float()).sum() / has.float().sum().clamp(min=1)
                    loss = loss + args.aux_recon_coef * recon
                    stats["aux_recon_loss"].append(recon.item())
                if rnd is not None:
                    sub = mb[torch.rand(len(mb), device=device) < args.rnd_update_proportion]
                    rnd_loss = rnd.error(b_next_obs[sub]).mean() if len(sub) else torch.zeros((), device=device)
                    loss = loss + rnd_loss
                    stats["rnd_loss"].append(rnd_loss.item())
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"non-finite loss ({loss.item()}) at step {global_step}; stopped, last good "
                        f"checkpoint kept at {ckpt_path if os.path.exists(ckpt_path) else '(none yet)'}")
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                for k, v in (("policy_loss", pg_loss), ("value_loss", v_loss), ("entropy", entropy_loss),
                             ("old_approx_kl", old_approx_kl), ("approx_kl", approx_kl), ("clipfrac", clipfrac)):
                    stats[k].append(v.item())
            if args.target_kl is not None and approx_kl > args.target_kl:
                break
        # Normalisation statistics change between rollouts, never inside one (exact replay).
        if agent.obs_rms is not None:
            agent.obs_rms.update(obs.float())
        if rnd is not None:
            rnd.obs_rms.update(next_obs_buf.float())

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
        log_memory(writer, actor, attn, slot_src, mstats, global_step)
        if rnd is not None:
            writer.add_scalar("intrinsic/reward_mean", rewards_int.mean().item(), global_step)
            writer.add_scalar("intrinsic/return_std", float(int_ret_rms.var.sqrt()), global_step)
        if counter is not None:
            writer.add_scalar("intrinsic/explore_floor_mean", floors.mean().item(), global_step)
            writer.add_scalar("intrinsic/explore_floor_max", floors.max().item(), global_step)
        if args.heatmap_interval and iteration % args.heatmap_interval == 0:
            heat = torch.zeros((T, S + T), device=device)
            heat.scatter_add_(1, slot_src[:, 0].clamp(min=0), attn[:, 0] * (slot_src[:, 0] >= 0).float())
            writer.add_image("memory/attention_env0", (heat / heat.max().clamp(min=1e-8)).unsqueeze(0).cpu(),
                             global_step)
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


def log_memory(writer, actor: Actor, attn, slot_src, mstats: dict, global_step: int) -> None:
    """memory/* scalars: retention score spread, ages of evicted vs kept, attention entropy, cue kept."""
    # std of the clean retention scores written in the previous rollout = scale of this rollout's noise
    writer.add_scalar("memory/retention_score_spread", actor.score_scale, global_step)
    writer.add_scalar("memory/retention_noise_sigma", actor.sigma, global_step)
    ev_age, ev_n, kept_age, kept_n = actor.age_stats.tolist()
    if ev_n:
        writer.add_scalar("memory/mean_age_evicted", ev_age / ev_n, global_step)
    if kept_n:
        writer.add_scalar("memory/mean_age_kept", kept_age / kept_n, global_step)
    actor.age_stats.zero_()
    has = (slot_src >= 0).any(-1)
    if has.any():
        ent = -(attn * torch.log(attn.clamp(min=1e-12))).sum(-1)
        writer.add_scalar("memory/attention_entropy", ent[has].mean().item(), global_step)
    writer.add_scalar("memory/occupancy", (slot_src >= 0).float().sum(-1).mean().item(), global_step)
    if mstats["cue_n"]:
        writer.add_scalar("memory/cue_in_memory_at_decision", mstats["cue_in"] / mstats["cue_n"], global_step)
        mstats["cue_in"], mstats["cue_n"] = 0, 0


if __name__ == "__main__":
    run_cli(main, Args)
