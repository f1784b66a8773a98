"""PPO without memory: the feed-forward baseline (CleanRL style, one file).

The network is picked from the spaces:
  - vector observations -> separate 64-64 tanh MLPs for actor and critic (CleanRL ppo.py),
  - ``ALE/...`` ids -> standard Atari preprocessing (frame-skip 4, 84x84 grayscale, frame
    stack 4, sticky actions 0.25, no episodic life, reward clipping) and the Nature CNN,
  - other image observations -> a CNN sized to the image,
  - ``Box`` actions -> diagonal Gaussian policy with observation and reward normalisation
    (CleanRL ppo_continuous_action.py).

Correctness points that CleanRL gets wrong or leaves implicit:
  - Vector envs use gymnasium 1.x SAME_STEP autoreset: the observation returned with
    ``done`` already belongs to the next episode and the last one is in
    ``info["final_obs"]``, so no stored transition crosses an episode boundary.
  - A truncated episode (time limit) is bootstrapped with V(final_obs); a terminated one
    is not.
  - Observation/reward normalisation statistics live in the agent/checkpoint, so a saved
    model evaluates with the statistics it was trained with.
  - Losses are logged averaged over all minibatches of an update.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.optim as optim
from gymnasium import spaces
from torch.distributions import Normal

from memory_envs import FlattenObservation
from run_contract import (Progress, Run, RunArgs, check_flags, env_kind, finished_episode, make_base_env,
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
    """the number of mini-batches"""
    update_epochs: Optional[int] = None
    """the K epochs to update the policy"""
    norm_adv: bool = True
    """toggles advantages normalization"""
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


PRESETS = {
    "vector": dict(learning_rate=2.5e-4, num_envs=4, num_steps=128, num_minibatches=4,
                   update_epochs=4, clip_coef=0.2, ent_coef=0.01, normalize=False),
    "atari": dict(learning_rate=2.5e-4, num_envs=8, num_steps=128, num_minibatches=4,
                  update_epochs=4, clip_coef=0.1, ent_coef=0.01, normalize=False),
    "continuous": dict(learning_rate=3e-4, num_envs=1, num_steps=2048, num_minibatches=32,
                       update_epochs=10, clip_coef=0.2, ent_coef=0.0, normalize=True),
}


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


class Agent(nn.Module):
    def __init__(self, obs_space: spaces.Box, action_space: spaces.Space, normalize_obs: bool):
        super().__init__()
        self.continuous = isinstance(action_space, spaces.Box)
        self.image = is_image(obs_space)
        n_out = int(np.prod(action_space.shape)) if self.continuous else int(action_space.n)
        self.obs_rms = RunningMeanStd(obs_space.shape) if normalize_obs else None
        if self.image:
            self.encoder, n_feat, self.channels_last = image_encoder(obs_space.shape)
            self.actor = layer_init(nn.Linear(n_feat, n_out), std=0.01)
            self.critic = layer_init(nn.Linear(n_feat, 1), std=1.0)
        else:
            n_in = int(np.prod(obs_space.shape))
            self.encoder = nn.Identity()

            def mlp(out: int, std: float) -> nn.Sequential:
                return nn.Sequential(layer_init(nn.Linear(n_in, 64)), nn.Tanh(),
                                     layer_init(nn.Linear(64, 64)), nn.Tanh(),
                                     layer_init(nn.Linear(64, out), std=std))

            self.actor, self.critic = mlp(n_out, 0.01), mlp(1, 1.0)
        if self.continuous:
            self.actor_logstd = nn.Parameter(torch.zeros(1, n_out))

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
        return x.flatten(1)

    def get_value(self, x: torch.Tensor) -> torch.Tensor:
        return self.critic(self.features(x))

    def get_action_and_value(self, x, action=None, greedy: bool = False):
        h = self.features(x)
        out = self.actor(h)
        if self.continuous:
            dist = Normal(out, self.actor_logstd.expand_as(out).exp(), validate_args=False)
            if action is None:
                action = out if greedy else dist.sample()
            return action, dist.log_prob(action).sum(1), dist.entropy().sum(1), self.critic(h)
        # Categorical(logits=out) spelled out, op for op (so the same numbers): at this network size building
        # and checking a distribution object every step costs more than the network.
        logits, acting = out - out.logsumexp(1, keepdim=True), action is None
        if acting:
            action = out.argmax(1) if greedy else torch.multinomial(logits.softmax(1), 1, True).view(-1)
        logprob = logits.gather(1, action.long().unsqueeze(1)).squeeze(1)
        entropy = None if acting else -(logits.clamp(min=torch.finfo(logits.dtype).min) * logits.softmax(1)).sum(1)
        return action, logprob, entropy, self.critic(h)


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
    fixed quota of episodes so short episodes are not over-represented."""
    episodes = args.eval_episodes
    n_envs = max(1, min(episodes, 8))
    quota = [episodes // n_envs + (i < episodes % n_envs) for i in range(n_envs)]
    envs = make_vector_env(args, env_kwargs, kind, n_envs, video_dir)
    obs, _ = envs.reset(seed=[args.seed + 100_000 + i for i in range(n_envs)])
    returns, successes, done_count = [], [], [0] * n_envs
    while any(d < q for d, q in zip(done_count, quota)):
        x = agent.normalize_obs(torch.as_tensor(obs, device=device))
        action, _, _, _ = agent.get_action_and_value(x, greedy=True)
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
                success_rate=float(np.mean(successes)) if successes else None)


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------
def main(args: Args) -> None:
    run = Run(args, Args)
    args = run.args
    env_kwargs = parse_env_kwargs(args.env_kwargs)
    kind = env_kind(args.env_id, env_kwargs)
    for key, value in PRESETS[kind].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    batch_size = args.num_envs * args.num_steps
    check_flags(args, batch=batch_size)
    minibatch_size, num_iterations = batch_size // args.num_minibatches, run.iterations(batch_size)
    device = run.start()

    envs = make_vector_env(args, env_kwargs, kind, args.num_envs, "" if args.evaluate else os.path.join(run.dir, "videos"))
    agent = Agent(envs.single_observation_space, envs.single_action_space, args.normalize).to(device)
    # foreach: the same arithmetic as the default per-parameter loop (bit for bit on CPU) in fewer Python calls.
    optimizer = optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, foreach=True)
    reward_scaler = RewardScaler(args.num_envs, args.gamma) if args.normalize else None

    run.load_network(agent)
    if args.evaluate:
        return finish(run, agent, env_kwargs, kind, device, run.state.get("global_step", 0))
    run.resume(dict(optimizer=optimizer, reward_rms=reward_scaler.rms if reward_scaler else None))
    writer, global_step = run.writer, run.global_step

    raw_images = envs.single_observation_space.dtype == np.uint8 and not args.normalize
    obs_dtype = torch.uint8 if raw_images else torch.float32
    obs = torch.zeros((args.num_steps, args.num_envs) + envs.single_observation_space.shape,
                      dtype=obs_dtype, device=device)
    actions = torch.zeros((args.num_steps, args.num_envs) + envs.single_action_space.shape, device=device)
    logprobs, rewards, dones, values = (torch.zeros((args.num_steps, args.num_envs), device=device)
                                        for _ in range(4))

    # Resumed runs restart their envs with a different seed so they do not replay old episodes.
    next_obs, _ = envs.reset(seed=args.seed + run.start_iteration - 1)
    next_obs = torch.as_tensor(next_obs, device=device)
    progress = Progress(args.total_timesteps)
    params = list(agent.parameters())
    start_step, last_ckpt = global_step, time.time()
    for iteration in range(run.start_iteration, num_iterations + 1):
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = (1.0 - (iteration - 1.0) / num_iterations) * args.learning_rate

        for step in range(args.num_steps):
            global_step += args.num_envs
            next_obs = agent.normalize_obs(next_obs, update=True)
            obs[step] = next_obs
            with torch.no_grad():
                action, logprob, _, value = agent.get_action_and_value(next_obs)
            values[step], actions[step], logprobs[step] = value.flatten(), action, logprob
            next_obs_np, reward, term, trunc, info = envs.step(action.cpu().numpy())
            done = term | trunc
            if kind == "atari":
                reward = np.sign(reward)
            if reward_scaler is not None:
                reward = reward_scaler(reward, done)
            reward = torch.as_tensor(reward, dtype=torch.float32, device=device)
            # Truncation is not termination: bootstrap the cut-off return with V(final_obs).
            cut = np.flatnonzero(trunc & ~term)
            if len(cut):
                final = torch.as_tensor(np.stack(info["final_obs"][cut]), device=device)
                with torch.no_grad():
                    reward[cut] += args.gamma * agent.get_value(agent.normalize_obs(final)).flatten()
            rewards[step], dones[step] = reward, torch.as_tensor(done, device=device)
            next_obs = torch.as_tensor(next_obs_np, device=device)

            progress.log(writer, info, done, global_step)

        with torch.no_grad():
            last_value = agent.get_value(agent.normalize_obs(next_obs)).flatten()
        advantages = compute_gae(rewards, values, dones, last_value, args.gamma, args.gae_lambda)
        returns = advantages + values

        b_obs = obs.reshape((-1,) + envs.single_observation_space.shape)
        b_actions = actions.reshape((-1,) + envs.single_action_space.shape)
        b_logprobs, b_advantages = logprobs.reshape(-1), advantages.reshape(-1)
        b_returns, b_values = returns.reshape(-1), values.reshape(-1)
        if not agent.continuous:
            b_actions = b_actions.long()

        b_inds = np.arange(batch_size)
        stats = {k: [] for k in ("policy_loss", "value_loss", "entropy", "old_approx_kl", "approx_kl", "clipfrac")}
        for epoch in range(args.update_epochs):
            np.random.shuffle(b_inds)
            for start in range(0, batch_size, minibatch_size):
                # A tensor index: a numpy one would be converted again for every buffer it indexes.
                mb = torch.as_tensor(b_inds[start:start + minibatch_size], device=device)
                _, newlogprob, entropy, newvalue = agent.get_action_and_value(b_obs[mb], b_actions[mb])
                logratio = newlogprob - b_logprobs[mb]
                ratio = logratio.exp()
                with torch.no_grad():
                    old_approx_kl = (-logratio).mean()
                    approx_kl = ((ratio - 1) - logratio).mean()
                    clipfrac = ((ratio - 1.0).abs() > args.clip_coef).float().mean()
                mb_adv = b_advantages[mb]
                if args.norm_adv:
                    mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
                pg_loss = torch.max(-mb_adv * ratio,
                                    -mb_adv * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)).mean()
                newvalue = newvalue.view(-1)
                mb_values, mb_returns = b_values[mb], b_returns[mb]
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

        y_pred, y_true = b_values.cpu().numpy(), b_returns.cpu().numpy()
        var_y = np.var(y_true)
        explained_var = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y
        sps = (global_step - start_step) / (time.time() - run.start_time)
        writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
        for k, v in stats.items():
            writer.add_scalar(f"losses/{k}", float(np.mean(v)), global_step)
        writer.add_scalar("losses/explained_variance", explained_var, global_step)
        writer.add_scalar("charts/SPS", sps, global_step)
        progress.maybe_print(global_step, sps, force=iteration == num_iterations)
        if run.due(last_ckpt, iteration == num_iterations):
            run.save(iteration, global_step, agent=agent, optimizer=optimizer,
                     reward_rms=reward_scaler.rms if reward_scaler else None)
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
