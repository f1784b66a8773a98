"""Peers: stable-baselines3 PPO and sb3-contrib RecurrentPPO under our CLI, budgets and evaluation.

So that benchmark.sh can compare our agents with the libraries people already use, this
adapter trains ``stable_baselines3.PPO`` (``--algo ppo``) or ``sb3_contrib.RecurrentPPO``
(``--algo recurrent_ppo``) on any env our scripts accept and writes the same artefacts:
TensorBoard events with ``charts/episodic_return``, ``charts/episodic_length``,
``charts/episodic_success`` and ``charts/SPS``, and ``runs/<run-name>/eval.json`` with the
same fields (plus the library versions).

Needs the optional pins: ``pip install -r requirements-peers.txt`` (they leave torch==2.13.0
alone).

What is kept equal to our scripts:
  - rollout/update hyperparameters default to ppo_baseline.py's presets (vector: 4 envs x
    128 steps, 4 minibatches, 4 epochs, lr 2.5e-4 annealed linearly, clip 0.2, entropy 0.01;
    continuous actions: 1 env x 2048 steps, 32 minibatches, 10 epochs, lr 3e-4, no
    entropy bonus). The networks are the libraries' defaults (MlpPolicy 64-64;
    MlpLstmPolicy: LSTM 256 for actor and critic): the point is to compare with the
    libraries as people use them. Non-Box and 2-D observations are flattened with
    memory_envs.FlattenObservation (images too: MLP policies only, no Atari here), and
    continuous control runs without observation/reward normalisation.
  - evaluation: greedy actions on fresh envs seeded ``seed + 100000 + i``, a fixed quota of
    episodes per env, and for RecurrentPPO the LSTM state **carried through every episode**
    with ``episode_start`` set exactly on each env's first step (the original Strategic
    Memory benchmark dropped the state, which forces any recurrent agent to chance).
  - time limits are bootstrapped by the libraries themselves (``TimeLimit.truncated``).
Not supported: ``--resume`` (sb3 checkpoints are not ours), ``--track``, Atari ids.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import numpy as np
import torch
from gymnasium import spaces
from torch.utils.tensorboard import SummaryWriter

from memory_envs import FlattenObservation
from run_contract import (check_spaces, default_run_name, is_atari, make_base_env, parse_env_kwargs, Progress,
                          run_cli, UserError, write_eval_json)


@dataclass
class Args:
    algo: Literal["ppo", "recurrent_ppo"] = "recurrent_ppo"
    """which peer: stable-baselines3 PPO or sb3-contrib RecurrentPPO (LSTM)"""
    env_id: str = "MemoryTask-v0"
    """any registered gymnasium id, also `module:EnvId` (no Atari)"""
    env_kwargs: tuple[str, ...] = ()
    """keyword arguments for gym.make as key=value pairs, values parsed as Python literals"""
    seed: int = 1
    """seed of the experiment"""
    cuda: bool = True
    """if toggled, cuda is used when available"""
    threads: int = 1
    """torch CPU threads (one per run is best when several runs share the cores)"""
    run_name: Optional[str] = None
    """name of the run directory under runs/ (default: {env}__sb3_{algo}__{seed}__{time})"""
    eval_episodes: int = 100
    """episodes of greedy evaluation on fresh seeded envs after training (0 to skip)"""
    total_timesteps: int = 500_000
    """total timesteps of the experiment"""
    num_envs: Optional[int] = None
    """the number of parallel environments [vector 4 / continuous 1]"""
    num_steps: Optional[int] = None
    """steps per environment per rollout [128 / 2048]"""
    num_minibatches: Optional[int] = None
    """minibatches per epoch [4 / 32]"""
    update_epochs: Optional[int] = None
    """epochs per update [4 / 10]"""
    learning_rate: Optional[float] = None
    """initial learning rate, annealed linearly to 0 [2.5e-4 / 3e-4]"""
    ent_coef: Optional[float] = None
    """entropy coefficient [0.01 / 0.0]"""


PRESETS = {
    "vector": dict(num_envs=4, num_steps=128, num_minibatches=4, update_epochs=4, learning_rate=2.5e-4,
                   ent_coef=0.01),
    "continuous": dict(num_envs=1, num_steps=2048, num_minibatches=32, update_epochs=10, learning_rate=3e-4,
                       ent_coef=0.0),
}


def make_env(env_id: str, env_kwargs: dict):
    def thunk():
        from stable_baselines3.common.monitor import Monitor

        env = make_base_env(env_id, env_kwargs)
        if not isinstance(env.observation_space, spaces.Box) or len(env.observation_space.shape) != 1:
            env = FlattenObservation(env)
        # Monitor puts the episode's return/length into the last step's info.
        return Monitor(env)

    return thunk


def make_vec_env(args: Args, env_kwargs: dict, n: int):
    from stable_baselines3.common.vec_env import DummyVecEnv

    return DummyVecEnv([make_env(args.env_id, env_kwargs) for _ in range(n)])


def episode_callback(writer: SummaryWriter, progress: Progress, total: int):
    from stable_baselines3.common.callbacks import BaseCallback

    class EpisodeLogger(BaseCallback):
        """Logs every finished training episode under our TB keys, and SPS per rollout."""

        def _on_training_start(self) -> None:
            self.start = time.time()

        def _on_step(self) -> bool:
            for info, done in zip(self.locals["infos"], self.locals["dones"]):
                if done and "episode" in info:
                    step = self.num_timesteps
                    writer.add_scalar("charts/episodic_return", info["episode"]["r"], step)
                    writer.add_scalar("charts/episodic_length", info["episode"]["l"], step)
                    success = info.get("is_success")
                    if success is not None:
                        writer.add_scalar("charts/episodic_success", float(success), step)
                    progress.episode(info["episode"]["r"], success)
            return True

        def _on_rollout_end(self) -> None:
            sps = self.num_timesteps / max(time.time() - self.start, 1e-9)
            writer.add_scalar("charts/SPS", sps, self.num_timesteps)
            progress.maybe_print(self.num_timesteps, sps, force=self.num_timesteps >= total)

    return EpisodeLogger()


def evaluate(model, args: Args, env_kwargs: dict, episodes: int) -> dict:
    """Greedy evaluation; the recurrent state is carried through each episode and reset at its start."""
    n_envs = max(1, min(episodes, 8))
    quota = [episodes // n_envs + (i < episodes % n_envs) for i in range(n_envs)]
    envs = make_vec_env(args, env_kwargs, n_envs)
    envs.seed(args.seed + 100_000)  # env i is reset with seed + 100000 + i, as in our scripts
    obs = envs.reset()
    state, episode_start = None, np.ones(n_envs, dtype=bool)
    returns, successes, done_count = [], [], [0] * n_envs
    while any(d < q for d, q in zip(done_count, quota)):
        # PPO ignores state/episode_start; RecurrentPPO zeroes the LSTM state where episode_start.
        action, state = model.predict(obs, state=state, episode_start=episode_start, deterministic=True)
        obs, _, dones, infos = envs.step(action)
        episode_start = dones  # the obs returned with done=True already begins the next episode
        for i in np.flatnonzero(dones):
            if done_count[i] < quota[i]:
                returns.append(float(infos[i]["episode"]["r"]))
                if infos[i].get("is_success") is not None:
                    successes.append(float(infos[i]["is_success"]))
                done_count[i] += 1
    envs.close()
    return dict(mean_return=float(np.mean(returns)), std_return=float(np.std(returns)),
                success_rate=float(np.mean(successes)) if successes else None)


def main(args: Args) -> None:
    try:
        import sb3_contrib
        import stable_baselines3
    except ImportError:
        raise UserError("peers.py needs the peer libraries: pip install -r requirements-peers.txt") from None
    if is_atari(args.env_id):
        raise UserError(f"--env-id {args.env_id!r}: peers.py has no Atari preprocessing")
    env_kwargs = parse_env_kwargs(args.env_kwargs)
    probe = make_base_env(args.env_id, env_kwargs)
    check_spaces(probe, (spaces.Discrete, spaces.Box))
    kind = "continuous" if isinstance(probe.action_space, spaces.Box) else "vector"
    probe.close()
    for key, value in PRESETS[kind].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in ("total_timesteps", "num_envs", "num_steps", "num_minibatches", "update_epochs", "threads"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.eval_episodes < 0:
        raise UserError(f"--eval-episodes must be >= 0, got {args.eval_episodes}")
    batch = args.num_envs * args.num_steps
    if batch % args.num_minibatches:
        raise UserError(f"--num-minibatches {args.num_minibatches} must divide num_envs*num_steps={batch}")

    exp_name = f"sb3_{args.algo}"
    args.run_name = args.run_name or default_run_name(args.env_id, exp_name, args.seed)
    run_dir = os.path.join("runs", args.run_name)
    os.makedirs(run_dir, exist_ok=True)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() and args.cuda else "cpu"

    envs = make_vec_env(args, env_kwargs, args.num_envs)
    lr = args.learning_rate
    common = dict(learning_rate=lambda remaining: remaining * lr, n_steps=args.num_steps,
                  batch_size=batch // args.num_minibatches, n_epochs=args.update_epochs, gamma=0.99,
                  gae_lambda=0.95, clip_range=0.2, ent_coef=args.ent_coef, vf_coef=0.5, max_grad_norm=0.5,
                  seed=args.seed, device=device, verbose=0)
    if args.algo == "ppo":
        model = stable_baselines3.PPO("MlpPolicy", envs, **common)
    else:
        model = sb3_contrib.RecurrentPPO("MlpLstmPolicy", envs, **common)

    writer = SummaryWriter(run_dir)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" +
                    "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    # Whole rollouts only, rounded down as in ppo_baseline.py (max(1, total // batch) updates);
    # sb3 by itself would round up, giving the peers up to one extra rollout.
    steps = max(1, args.total_timesteps // batch) * batch
    start = time.time()
    model.learn(steps, callback=episode_callback(writer, Progress(steps), steps))
    wall_time = time.time() - start
    sps = model.num_timesteps / max(wall_time, 1e-9)
    envs.close()

    result = dict(mean_return=None, std_return=None, success_rate=None)
    if args.eval_episodes > 0:
        result = evaluate(model, args, env_kwargs, args.eval_episodes)
        for k, v in result.items():
            if v is not None:
                writer.add_scalar(f"eval/{k}", v, model.num_timesteps)
    path = write_eval_json(run_dir, dict(
        algo=exp_name, env_id=args.env_id, env_kwargs=env_kwargs, seed=args.seed,
        total_timesteps=args.total_timesteps, global_step=model.num_timesteps,
        eval_episodes=args.eval_episodes, **result, sps=sps, wall_time_s=wall_time, run_name=args.run_name,
        args=asdict(args), library=f"stable-baselines3 {stable_baselines3.__version__}, "
                                   f"sb3-contrib {sb3_contrib.__version__}"))
    print(f"eval: return {result['mean_return']} success {result['success_rate']} -> {path}", flush=True)
    writer.close()


if __name__ == "__main__":
    run_cli(main, Args)
