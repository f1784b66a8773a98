"""The run contract every script shares, so that each script holds its algorithm and nothing else.

- ``RunArgs``: the flags of every script (its own dataclass adds PPO's and the algorithm's);
- ``run_cli``: tyro parsing, with user errors (a bad flag, env id, env kwarg or value) as one line on
  stderr and exit code 2, a diverged run as exit code 3;
- ``make_base_env``, ``check_spaces``, ``env_kind``: ``gym.make`` with its errors made user errors, the env's
  kind (which picks a script's preset);
- ``Run``: ``--resume``, the run directory, seeding, TensorBoard, checkpoints that carry every RNG state,
  eval.json;
- ``Progress``, ``finished_episode``, ``cue_step``: the progress line, the episode charts and the episode
  statistics of a vector env.

Importing it registers the environments of ``memory_envs``.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import re
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import gymnasium as gym
import numpy as np
from gymnasium import spaces

import memory_envs

class UserError(Exception):
    """A mistake in the user's input: reported as one line, exit code 2, no traceback."""

    exit_code = 2


class TrainingDiverged(UserError):
    """A non-finite loss: the run stops (exit code 3) and keeps its last good checkpoint."""

    exit_code = 3


PPO_FLAGS = ("total_timesteps", "learning_rate", "num_envs", "num_steps", "anneal_lr", "gamma", "gae_lambda",
             "num_minibatches", "update_epochs", "norm_adv", "clip_coef", "clip_vloss", "ent_coef", "vf_coef",
             "max_grad_norm", "target_kl", "normalize", "normalize_reward")


def print_help(args_cls: type, presets: Optional[dict]) -> None:
    """tyro's --help, grouped (the run, PPO, the script's own flags), with each domain's default where a flag's
    default is None (``presets``: {domain: {flag: value}})."""
    import tyro

    buf = io.StringIO()
    env = dict(os.environ)
    os.environ["COLUMNS"] = "1000"  # one line per flag description, to regroup them
    try:
        with contextlib.redirect_stdout(buf):
            tyro.cli(args_cls, args=["--help"])
    except SystemExit:
        pass
    finally:
        os.environ.clear()
        os.environ.update(env)
    flags, usage = {}, ""
    for line in buf.getvalue().splitlines():
        text = re.sub(r"^[\s│╭╰]+|[\s│╮╯─]+$", "", line)
        if line.startswith("usage:"):
            usage = line
        elif text.startswith("-") and not set(text) <= set("-─"):
            flags[text.split()[0].rstrip(",")] = [p for p in re.split(r"\s{2,}", text) if p]
        elif text and flags and not set(text) <= set("-─"):
            flags[list(flags)[-1]].append(" ".join(text.split()))
    script = args_cls.__dataclass_fields__["exp_name"].default
    groups = {"the run (every script)": [], "PPO": [], f"{script}": []}
    for flag, lines in flags.items():
        name = flag.lstrip("-").replace("-", "_")
        text = "  " + "\n      ".join(lines)
        if presets and "(default: None)" in text and any(name in p for p in presets.values()):
            text = text.replace("(default: None)", "(default: " + " | ".join(
                f"{kind} {p[name]}" for kind, p in presets.items() if name in p) + ")")
        group = "the run (every script)" if name in RunArgs.__dataclass_fields__ or name in ("h", "help") else \
            "PPO" if name in PPO_FLAGS else script
        groups[group].append(text)
    print(usage.replace(sys.argv[0], os.path.basename(sys.argv[0])))
    for title, entries in groups.items():
        print(f"\n{title}:\n" + "\n".join(entries))


def parse_cli(args_cls: type, argv: list[str] | None = None, presets: Optional[dict] = None):
    """``tyro.cli`` with tyro's multi-line error box condensed to one line on stderr, and a grouped --help."""
    import tyro

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print_help(args_cls, presets)
        raise SystemExit(0)
    buf = io.StringIO()
    try:
        with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(buf):
            return tyro.cli(args_cls, args=argv)
    except SystemExit as exc:
        if not exc.code:
            raise
        # tyro's box: a title, a rule, the message (wrapped over several lines), a rule, help.
        lines = [re.sub(r"^[\s│╭╰─]+|[\s│╮╯─]+$", "", line) for line in buf.getvalue().splitlines()]
        blocks, current = [], []
        for line in lines:
            if line and not set(line) <= set("-─"):
                current.append(line)
            elif current:
                blocks, current = blocks + [" ".join(current)], []
        blocks += [" ".join(current)] if current else []
        message = blocks[1] if len(blocks) > 1 else (blocks[0] if blocks else "invalid arguments")
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


def run_cli(main: Callable[[Any], Any], args_cls: type, presets: Optional[dict] = None) -> None:
    """Entry point of every script: parse the flags, run, turn user errors into one line."""
    args = parse_cli(args_cls, presets=presets)
    try:
        main(args)
    except Stopped as exc:
        print(str(exc), file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the run started: no checkpoint written now
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def parse_env_kwargs(items: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """``("delay=256", "difficulty=1", "name=foo")`` -> ``{"delay": 256, "difficulty": 1, "name": "foo"}``.

    Values are Python literals where they parse as one, strings otherwise.
    """
    kwargs: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise UserError(f"--env-kwargs expects key=value pairs, got {item!r}")
        try:
            kwargs[key.strip()] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = raw
    return kwargs


def is_atari(env_id: str) -> bool:
    return env_id.startswith("ALE/") or env_id.endswith("NoFrameskip-v4")


@contextlib.contextmanager
def env_errors(env_id: str, env_kwargs: dict[str, Any]):
    """Turn what making an env raises on bad user input (unknown id, missing module, bad kwargs) into UserError."""
    try:
        yield
    except ModuleNotFoundError as exc:
        raise UserError(f"--env-id {env_id!r}: cannot import module {exc.name or env_id.partition(':')[0]!r}") from None
    except gym.error.Error as exc:
        raise UserError(f"--env-id {env_id!r}: {exc}") from None
    except (ValueError, TypeError) as exc:
        raise UserError(f"--env-id {env_id!r} with --env-kwargs {env_kwargs}: {exc}") from None


def make_base_env(env_id: str, env_kwargs: dict[str, Any], render_mode: str | None = None,
                  **extra: Any) -> gym.Env:
    """``gym.make`` with user errors as UserError."""
    if is_atari(env_id):
        import ale_py

        gym.register_envs(ale_py)
    kwargs = dict(env_kwargs, **extra)
    if render_mode is not None:
        kwargs["render_mode"] = render_mode
    with env_errors(env_id, env_kwargs):
        return gym.make(env_id, **kwargs)


def make_batched_env(env_id: str, env_kwargs: dict[str, Any], num_envs: int) -> gym.vector.VectorEnv | None:
    """The numpy-batched version of a ``memory_envs`` env (its ``vector_entry_point``) with the episode
    statistics of ``SyncVectorEnv(RecordEpisodeStatistics(env))`` and SAME_STEP autoreset, or None where the
    env has none. User errors as in ``make_base_env``."""
    if is_atari(env_id):
        return None
    with env_errors(env_id, env_kwargs):
        spec = gym.envs.registration._find_spec(env_id)  # gym.make's lookup, `module:EnvId` included
        # Other vector entry points (gymnasium's CartPole) do not promise the single env's results.
        if not str(spec.vector_entry_point).startswith("memory_envs:"):
            return None
        return memory_envs.RecordFinalEpisodeStatistics(
            gym.make_vec(spec, num_envs, vectorization_mode="vector_entry_point", **env_kwargs))


def check_video(env_id: str, env_kwargs: dict[str, Any]) -> None:
    """Fail before the run starts, with one line, when --capture-video lacks an optional dependency
    (moviepy for the encoder, pygame for gymnasium's classic-control and toy-text renderers)."""
    try:
        import moviepy  # noqa: F401
    except ImportError:
        raise UserError("--capture-video needs moviepy: pip install moviepy") from None
    env = make_base_env(env_id, env_kwargs, render_mode="rgb_array")
    try:
        env.reset(seed=0)
        env.render()
    except gym.error.DependencyNotInstalled as exc:
        raise UserError(f"--capture-video on {env_id!r}: {exc}") from None
    finally:
        env.close()


def check_spaces(env: gym.Env, action_types: tuple[type, ...]) -> None:
    """Fail early, with one line, on spaces a script cannot handle."""
    if not isinstance(env.action_space, action_types):
        names = ", ".join(t.__name__ for t in action_types)
        raise UserError(f"unsupported action space {env.action_space}: this script supports {names}")
    space = env.observation_space
    if isinstance(space, spaces.Box):
        return
    if isinstance(space, spaces.Dict):  # its text entries are dropped (FlattenObservation)
        space = spaces.Dict({k: s for k, s in space.spaces.items() if not memory_envs._is_text(s)})
    try:
        memory_envs._supported(space)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def env_kind(env_id: str, env_kwargs: dict[str, Any],
             action_types: tuple[type, ...] = (spaces.Discrete, spaces.Box)) -> str:
    """The env's kind, which picks a script's preset: "atari", "continuous" (Box actions) or "vector". A probe env
    checks the spaces first (``check_spaces``)."""
    probe = make_base_env(env_id, env_kwargs, **(dict(frameskip=1) if is_atari(env_id) else {}))
    check_spaces(probe, action_types)
    continuous = isinstance(probe.action_space, spaces.Box)
    probe.close()
    return "atari" if is_atari(env_id) else "continuous" if continuous else "vector"


def default_run_name(env_id: str, exp_name: str, seed: int) -> str:
    env = re.sub(r"[^A-Za-z0-9_.-]+", "_", env_id)
    return f"{env}__{exp_name}__{seed}__{int(time.time())}"


def resolve_resume(resume: str) -> tuple[str, str]:
    """Map ``--resume`` (a checkpoint file, a run directory or a run name) to (checkpoint, run_dir)."""
    candidates = [resume, os.path.join("runs", resume)]
    for path in candidates:
        if os.path.isfile(path):
            return path, os.path.dirname(os.path.abspath(path))
        ckpt = os.path.join(path, "checkpoint.pt")
        if os.path.isfile(ckpt):
            return ckpt, path
    raise UserError(f"--resume {resume!r}: no checkpoint.pt found there or under runs/")


def save_atomic(obj: Any, path: str) -> None:
    """Write with a temporary file and rename, so a kill mid-write never loses the last checkpoint."""
    import torch

    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def finished_episode(info: dict, i: int) -> tuple[float, int, bool | None]:
    """(return, length, is_success or None) of env ``i``'s episode that ended in this vector step.

    Needs ``RecordEpisodeStatistics`` inside each env and SAME_STEP autoreset, which puts the
    last step's info under ``info["final_info"]``.
    """
    fin = info["final_info"]
    mask = fin.get("_is_success")
    success = bool(fin["is_success"][i]) if mask is not None and mask[i] else None
    return float(fin["episode"]["r"][i]), int(fin["episode"]["l"][i]), success


def cue_step(info: dict, i: int) -> int:
    """The step of the cue of env ``i``'s finished episode, where the env reports it (-1: it does not; for logging)."""
    fin = info["final_info"]
    return int(fin["cue_step"][i]) if "cue_step" in fin and fin.get("_cue_step", np.ones(i + 1, bool))[i] else -1


def clip_action(action: Any, space: spaces.Space) -> Any:
    """A torch action as the env applies it: clipped to a Box's bounds (as ``ClipAction``), others unchanged."""
    if isinstance(space, spaces.Box):
        import torch

        return action.clamp(*(torch.as_tensor(bound, device=action.device) for bound in (space.low, space.high)))
    return action


def episode_extras(info: dict, i: int) -> dict[str, float]:
    """The numeric scalars env ``i`` reported at the end of its episode besides the usual ones (a wrapper's
    statistics, e.g. the rooms of ``MontezumaRevengeRooms``), for logging as charts/episodic_<key>."""
    fin = info["final_info"]
    return {k: float(v[i]) for k, v in fin.items() if not k.startswith("_") and k not in ("episode", "is_success", "cue_step")
            and isinstance(v, np.ndarray) and v.dtype.kind in "biuf" and fin.get(f"_{k}", np.ones(i + 1, bool))[i]}


def write_eval_json(run_dir: str, record: dict[str, Any]) -> str:
    # Atomic, like checkpoints: benchmark.sh treats an existing eval.json as a finished run.
    path = os.path.join(run_dir, "eval.json")
    with open(f"{path}.tmp", "w") as f:
        json.dump(record, f, indent=2, default=float)
    os.replace(f"{path}.tmp", path)
    return path


def save_attention_png(mat: np.ndarray, steps: int, path: str) -> None:
    """A decision step x source step map of attention weights (trace_ppo's attention.png)."""
    from matplotlib.colors import PowerNorm
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no figure to close
    fig = Figure(figsize=(6, 5), layout="tight")
    ax = fig.subplots()
    # A power norm keeps small weights visible next to the single-entry reads of the first steps.
    im = ax.imshow(mat, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
                   extent=(0, steps, 0, steps), norm=PowerNorm(0.4, vmin=0.0, vmax=max(float(mat.max()), 1e-8)))
    ax.set(xlabel="source step (episode time of the entry read)", ylabel="decision step",
           title="episodic attention weight (mean over heads)")
    fig.colorbar(im, ax=ax)
    fig.savefig(path, dpi=100)


@dataclass
class RunArgs:
    """The flags every script shares (its own dataclass adds PPO's and the algorithm's)."""
    exp_name: str = "run"
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
    evaluate: Optional[str] = None
    """a model.pt, checkpoint.pt or run directory to evaluate (greedy, --eval-episodes) instead of training"""
    run_name: Optional[str] = None
    """name of the run directory under runs/ ({env}__{exp_name}__{seed}__{time} if not given)"""
    eval_episodes: int = 100
    """episodes of greedy evaluation on fresh seeded envs after training (0 to skip)"""
    checkpoint_interval: float = 60.0
    """seconds between checkpoints (runs/<run-name>/checkpoint.pt); 0 = after every update"""


# Flags a resumed or evaluated run may change; every other one is the run's own.
SESSION_FLAGS = ("resume", "evaluate", "eval_episodes", "threads", "checkpoint_interval", "cuda", "capture_video",
                 "track", "run_name")


class Stopped(UserError):
    """Ctrl-C or SIGTERM: the run saved a checkpoint and stops (exit code 128 + signal, as shells report it)."""


def check_flags(args: Any, at_least_one: tuple = (), positive: tuple = (), non_negative: tuple = (),
                unit: tuple = (), batch: Optional[int] = None) -> None:
    """One line naming the first flag out of range (PPO's own ranges are checked for every script), or
    ``--num-minibatches`` that does not divide the ``batch`` of a rollout."""
    at_least_one += ("total_timesteps", "num_envs", "num_steps", "num_minibatches", "update_epochs", "threads")
    positive += ("clip_coef", "max_grad_norm", "target_kl")
    non_negative += ("seed", "learning_rate", "eval_episodes", "checkpoint_interval", "ent_coef", "vf_coef")
    rules = [(at_least_one, lambda v: v >= 1, "be >= 1"), (positive, lambda v: v > 0, "be > 0"),
             (non_negative, lambda v: v >= 0, "be >= 0"), (unit, lambda v: 0 <= v <= 1, "be in [0, 1]"),
             (("gamma",), lambda v: 0 < v <= 1, "be in (0, 1]"), (("gae_lambda",), lambda v: 0 <= v <= 1, "be in [0, 1]")]
    for names, ok, what in rules:
        for name in names:
            value = getattr(args, name, None)
            if value is not None and not (isinstance(value, (int, float)) and np.isfinite(value) and ok(value)):
                raise UserError(f"--{name.replace('_', '-')} must {what}, got {value}")
    if batch is not None and batch % args.num_minibatches:
        raise UserError(f"--num-minibatches {args.num_minibatches} must divide num_envs*num_steps={batch}")


def load_saved(path: str, args_cls: type, flag: str) -> tuple[dict, str]:
    """Read a model.pt or checkpoint.pt (or the one in a run directory / run name) written by this script;
    anything else is a one-line user error. Returns (saved state, its run directory)."""
    import torch

    script = args_cls.__dataclass_fields__["exp_name"].default
    for cand in (path, os.path.join("runs", path)):
        for name in ((None,) if os.path.isfile(cand) else ("checkpoint.pt", "model.pt")):
            file = cand if name is None else os.path.join(cand, name)
            if not os.path.isfile(file):
                continue
            try:
                state = torch.load(file, map_location="cpu", weights_only=False)
            except Exception as exc:  # noqa: BLE001 -- any unreadable file is the user's to fix
                raise UserError(f"--{flag} {path!r}: not a checkpoint or model ({type(exc).__name__})") from None
            if not isinstance(state, dict) or "agent" not in state or "args" not in state:
                raise UserError(f"--{flag} {path!r}: not a checkpoint or model of this project")
            owner = state.get("script", state["args"].get("exp_name"))
            if owner != script:
                raise UserError(f"--{flag} {path!r}: written by {owner}.py, not by {script}.py")
            if flag == "resume" and "iteration" not in state:
                raise UserError(f"--resume {path!r}: a saved model, not a checkpoint (evaluate it with --evaluate)")
            return state, os.path.dirname(os.path.abspath(file))
    raise UserError(f"--{flag} {path!r}: no checkpoint.pt or model.pt found there or under runs/")


class Run:
    """What every script does around its algorithm: ``--resume`` and ``--evaluate`` (the run's saved
    arguments are used, but for SESSION_FLAGS), the run directory, wandb, seeding, TensorBoard, checkpoints
    that carry every RNG state, Ctrl-C/SIGTERM (checkpoint, then exit), the stop on a non-finite loss, and
    eval.json. ``state`` is the checkpoint or model being resumed or evaluated (or None)."""

    def __init__(self, args: Any, args_cls: type):
        self.state, self.dir, self.stop_signal, self.script = None, None, 0, args_cls.__dataclass_fields__["exp_name"].default
        flag = "evaluate" if args.evaluate else "resume" if args.resume else None
        if flag:
            self.state, self.dir = load_saved(getattr(args, flag), args_cls, flag)
            saved, defaults = self.state["args"], args_cls()
            ignored = [k for k in saved if k not in SESSION_FLAGS and hasattr(args, k) and
                       getattr(args, k) != getattr(defaults, k) and getattr(args, k) != saved[k]]
            if ignored:
                print(f"note: --{flag} uses the run's saved arguments; ignored: "
                      + ", ".join(f"--{k.replace('_', '-')}" for k in ignored), flush=True)
            fields = args_cls.__dataclass_fields__
            session = {k: getattr(args, k) for k in SESSION_FLAGS if k in fields and (k != "run_name" or flag == "evaluate")
                       and (k in ("resume", "evaluate") or getattr(args, k) != getattr(defaults, k))}
            args = args_cls(**{**{k: v for k, v in saved.items() if k in fields}, **session})
            if flag == "evaluate":  # an evaluation writes next to the run's own files, never over them
                self.dir = os.path.join("runs", session["run_name"]) if session.get("run_name") else \
                    os.path.join(self.dir, "evaluate")
        self.args = args

    def iterations(self, batch_size: int) -> int:
        """Updates of ``batch_size`` steps: the budget rounded to whole rollouts (with a notice when it moves)."""
        n = max(1, self.args.total_timesteps // batch_size)
        if n * batch_size != self.args.total_timesteps and self.state is None:
            print(f"note: --total-timesteps {self.args.total_timesteps} rounded to {n * batch_size} "
                  f"(whole rollouts of {batch_size} steps)", flush=True)
            self.args.total_timesteps = n * batch_size
        return n

    def start(self) -> Any:
        """Create the run directory (new runs), start wandb and TensorBoard, seed everything, and make Ctrl-C
        and SIGTERM stop at the end of the current update; returns the device."""
        import random
        import signal

        import torch
        from torch.utils.tensorboard import SummaryWriter

        args = self.args
        if args.capture_video:
            check_video(args.env_id, parse_env_kwargs(args.env_kwargs))
        if self.dir is None:
            args.run_name = args.run_name or default_run_name(args.env_id, args.exp_name, args.seed)
            self.dir = os.path.join("runs", args.run_name)
        os.makedirs(self.dir, exist_ok=True)
        self.ckpt_path = os.path.join(self.dir, "checkpoint.pt")
        if args.track:
            try:
                import wandb
            except ImportError:
                raise UserError("--track needs wandb: pip install wandb") from None
            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                       config=vars(args), name=args.run_name, monitor_gym=True, save_code=True, resume="allow",
                       id=args.run_name)
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        torch.backends.cudnn.deterministic = args.torch_deterministic
        torch.set_num_threads(args.threads)
        self.start_iteration, self.global_step, self.elapsed_before = 1, 0, 0.0
        if self.state is not None and not args.evaluate:
            self.start_iteration = self.state["iteration"] + 1
            self.global_step, self.elapsed_before = self.state["global_step"], self.state["wall_time_s"]
        # A resumed run hides the killed run's events *after* the checkpoint.
        self.writer = SummaryWriter(self.dir, purge_step=self.global_step + 1 if self.state else None)
        self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" +
                             "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
        self.start_time = time.time()

        def stop(signum, frame):  # the second signal stops at once
            if self.stop_signal:
                raise KeyboardInterrupt
            self.stop_signal = signum
            print(f"\n{signal.Signals(signum).name}: stopping after this update (again to stop now)", flush=True)

        if not args.evaluate:
            signal.signal(signal.SIGINT, stop)
            signal.signal(signal.SIGTERM, stop)
            print(f"run directory {self.dir} | watch it with: tensorboard --logdir {os.path.dirname(self.dir) or '.'}",
                  flush=True)
        return torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    def restore_rng(self) -> None:
        import random

        import torch

        rng = self.state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])

    def resume(self, parts: dict[str, Any], note: str = "") -> None:
        """On ``--resume``: load every part the checkpoint holds (``None``: off in this run) and every RNG state."""
        if self.state is None:
            return
        self.load(parts)
        self.restore_rng()
        print(f"resuming {self.dir} at step {self.global_step}{note}", flush=True)

    def wall_time(self) -> float:
        return self.elapsed_before + time.time() - self.start_time

    def due(self, last_checkpoint: float, last_iteration: bool) -> bool:
        """Time for a checkpoint: the interval passed, the last update, or a stop was asked for."""
        return time.time() - last_checkpoint >= self.args.checkpoint_interval or last_iteration or bool(self.stop_signal)

    def save(self, iteration: int, global_step: int, **parts: Any) -> None:
        """An atomic checkpoint of ``parts`` (state dicts, or objects that have one) with the run's arguments,
        position and every RNG state; then, if Ctrl-C or SIGTERM came, stop with one line (exit code 130 or 143)."""
        import random
        from dataclasses import asdict

        import torch

        parts = {key: part.state_dict() if hasattr(part, "state_dict") else part for key, part in parts.items()}
        save_atomic(dict(parts, script=self.script, iteration=iteration, global_step=global_step,
                         wall_time_s=self.wall_time(), args=asdict(self.args),
                         rng=dict(python=random.getstate(), numpy=np.random.get_state(),
                                  torch=torch.get_rng_state())), self.ckpt_path)
        self.writer.flush()  # the TB log of a killed run then reaches at least its checkpoint
        if self.stop_signal:
            stopped = Stopped(f"stopped at step {global_step}; checkpoint {self.ckpt_path}; continue with "
                              f"--resume {self.dir}")
            stopped.exit_code = 128 + self.stop_signal
            raise stopped

    def load_network(self, agent: Any) -> None:
        """Load the saved network into ``agent`` (resumed or evaluated runs; nothing otherwise)."""
        if self.state is not None:
            self.load(dict(agent=agent))

    def load(self, parts: dict[str, Any]) -> None:
        """Load each part (``None``: off in this run) from the checkpoint; one that does not fit it (another network,
        another version of the script) is a one-line error."""
        for key, part in parts.items():
            if part is None:
                continue
            try:
                part.load_state_dict(self.state[key])
            except (RuntimeError, KeyError, ValueError) as err:
                why = f"it holds no {key}" if isinstance(err, KeyError) else str(err).strip().splitlines()[-1].strip()
                flag = f"--evaluate {self.args.evaluate}" if self.args.evaluate else f"--resume {self.args.resume}"
                raise UserError(f"{flag}: its {key} does not match this version of {self.script}.py ({why})") from None

    def save_model(self, **parts: Any) -> None:
        """runs/<run>/model.pt with ``parts`` (with --save-model; otherwise nothing)."""
        if not self.args.save_model:
            return
        import torch
        from dataclasses import asdict

        path = os.path.join(self.dir, "model.pt")
        torch.save(dict(parts, script=self.script, args=asdict(self.args)), path)
        print(f"model saved to {path}", flush=True)

    def diverged(self, what: str, global_step: int) -> TrainingDiverged:
        kept = self.ckpt_path if os.path.exists(self.ckpt_path) else "(none yet)"
        return TrainingDiverged(f"{what} at step {global_step}; stopped, last good checkpoint kept at {kept}")

    def finish(self, record: dict[str, Any]) -> None:
        """Write eval.json (the script's ``record``: global_step, sps, wall_time_s and its evaluation, plus the run's
        identity), log the evaluation to TensorBoard, print the last line, close TensorBoard."""
        from dataclasses import asdict

        args = self.args
        for k, v in record.items():
            if k in ("mean_return", "std_return", "success_rate", "cue_in_memory", "cue_attention") and v is not None:
                self.writer.add_scalar(f"eval/{k}", v, record["global_step"])
        # Peak resident memory of this process (Linux reports KB), for the cost-against-episode-length curves.
        peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        path = write_eval_json(self.dir, dict(
            algo=args.exp_name, env_id=args.env_id, env_kwargs=parse_env_kwargs(args.env_kwargs), seed=args.seed,
            total_timesteps=args.total_timesteps, eval_episodes=args.eval_episodes, **record, peak_rss_mb=peak_rss_mb,
            run_name=args.run_name, args=asdict(args)))
        fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
        cue = (f" | cue kept at {record['cue_in_memory']:.0%} of decisions, attention on it {record['cue_attention']:.2f}"
               if record.get("cue_in_memory") is not None else "")  # the tasks that report their cue's step
        print(f"eval: return {fmt(record.get('mean_return'))} | success {fmt(record.get('success_rate'))}{cue} -> {path}",
              flush=True)
        self.writer.close()


class Progress:
    """Prints one progress line every ``interval`` seconds: step, SPS, recent return/success, ETA."""

    def __init__(self, total_steps: int, interval: float = 10.0, window: int = 100):
        self.total, self.interval, self.window = total_steps, interval, window
        self.returns: list[float] = []
        self.successes: list[float] = []
        self._last = time.time()

    def episode(self, ret: float, success: bool | None) -> None:
        self.returns = (self.returns + [float(ret)])[-self.window:]
        if success is not None:
            self.successes = (self.successes + [float(success)])[-self.window:]

    def log(self, writer: Any, info: dict, done: np.ndarray, step: int) -> None:
        """Log every episode that ended in this vector step (charts/episodic_*) and count it for the progress line."""
        for i in np.flatnonzero(done):
            ep_r, ep_l, success = finished_episode(info, i)
            writer.add_scalar("charts/episodic_return", ep_r, step)
            writer.add_scalar("charts/episodic_length", ep_l, step)
            if success is not None:
                writer.add_scalar("charts/episodic_success", float(success), step)
            for key, value in episode_extras(info, i).items():  # e.g. the rooms of MontezumaRevengeRooms
                writer.add_scalar(f"charts/episodic_{key}", value, step)
            self.episode(ep_r, success)

    def maybe_print(self, step: int, sps: float, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        ret = f"{np.mean(self.returns):.3f}" if self.returns else "n/a"
        succ = f" | success {np.mean(self.successes):.2f}" if self.successes else ""
        eta = max(0, self.total - step) / max(sps, 1e-9)
        print(f"step {step}/{self.total} | SPS {sps:.0f} | return {ret}{succ} | "
              f"ETA {int(eta // 60)}m{int(eta % 60):02d}s", flush=True)
