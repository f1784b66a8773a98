"""The common CLI contract, end to end, for every algorithm script in SCRIPTS.

Adding a script to SCRIPTS is all it takes to hold it to the contract: tiny-budget runs on a vector
env, an ALE id and a MuJoCo env (eval.json + TensorBoard keys), --resume of a killed run, one-line
errors for bad input, and the NaN guard.
"""

from __future__ import annotations

import json
import math
import re
import runpy
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT, describe, popen_script_at, read_tb_scalars, run_script_at

SCRIPTS = ["ppo_baseline.py", "recurrent_ppo_baseline.py", "adamemento_ppo.py", "trace_ppo.py",
           "transformer_ppo_baseline.py"]
# Extra flags a script needs in every run here (e.g. to keep one of its own options tiny).
EXTRA_ARGS: dict[str, list[str]] = {}

EVAL_KEYS = {"algo", "env_id", "env_kwargs", "seed", "total_timesteps", "eval_episodes", "mean_return",
             "std_return", "success_rate", "sps", "wall_time_s", "peak_rss_mb"}
TB_KEYS = {"charts/episodic_return", "charts/SPS", "losses/value_loss", "losses/policy_loss",
           "losses/entropy", "losses/approx_kl", "losses/clipfrac", "losses/explained_variance",
           "charts/learning_rate"}

# Tiny budgets: two updates each; `max_episode_steps` (a gym.make argument, so a valid
# --env-kwargs entry) makes episodes end inside the budget, so episodic returns and evaluation
# exist. For ALE it counts raw frames (frame-skip 4 happens in the preprocessing wrapper).
TINY = {
    "vector": dict(env_id="MemoryTask-v0", env_kwargs={"delay": 4}, eval_episodes=8,
                   flags=["--num-envs", "2", "--num-steps", "32", "--total-timesteps", "128",
                          "--num-minibatches", "2", "--update-epochs", "2"]),
    "atari": dict(env_id="ALE/Pong-v5", env_kwargs={"max_episode_steps": 80}, eval_episodes=1,
                  flags=["--num-envs", "2", "--num-steps", "16", "--total-timesteps", "64",
                         "--num-minibatches", "2", "--update-epochs", "1"]),
    "mujoco": dict(env_id="HalfCheetah-v5", env_kwargs={"max_episode_steps": 50}, eval_episodes=1,
                   flags=["--num-envs", "2", "--num-steps", "64", "--total-timesteps", "256",
                          "--num-minibatches", "2", "--update-epochs", "2"]),
}


def run(cwd, script, *args, **kwargs):
    return run_script_at(cwd, script, *args, *EXTRA_ARGS.get(script, []), **kwargs)


def kwargs_flags(env_kwargs: dict) -> list[str]:
    return ["--env-kwargs", *(f"{k}={v!r}" for k, v in env_kwargs.items())] if env_kwargs else []


def flag_value(flags: list[str], name: str) -> int:
    return int(flags[flags.index(name) + 1])


# ---------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(TINY))
@pytest.mark.parametrize("script", SCRIPTS)
def test_end_to_end(tmp_path, script, kind):
    cfg = TINY[kind]
    total = flag_value(cfg["flags"], "--total-timesteps")
    proc = run(tmp_path, script, "--env-id", cfg["env_id"], *kwargs_flags(cfg["env_kwargs"]), "--seed", "3",
               "--eval-episodes", str(cfg["eval_episodes"]), "--run-name", "e2e", *cfg["flags"])
    assert proc.returncode == 0, describe(proc)
    run_dir = tmp_path / "runs" / "e2e"
    assert (run_dir / "checkpoint.pt").is_file()
    # the one-line progress report reaches the final step
    assert re.search(rf"\b{total}/{total}\b.*SPS", proc.stdout), proc.stdout

    record = json.loads((run_dir / "eval.json").read_text())
    assert EVAL_KEYS <= set(record), EVAL_KEYS - set(record)
    assert record["algo"] == Path(script).stem
    assert (record["env_id"], record["env_kwargs"], record["seed"]) == (cfg["env_id"], cfg["env_kwargs"], 3)
    assert (record["total_timesteps"], record["eval_episodes"]) == (total, cfg["eval_episodes"])
    assert math.isfinite(record["mean_return"]) and record["std_return"] >= 0
    assert record["sps"] > 0 and record["wall_time_s"] > 0 and record["peak_rss_mb"] > 10
    if kind == "vector":
        # every MemoryTask episode returns +1 or -1, so return and success rate determine each other
        p = record["success_rate"]
        assert 0 <= p <= 1 and p * cfg["eval_episodes"] == round(p * cfg["eval_episodes"])
        assert record["mean_return"] == pytest.approx(2 * p - 1)
        assert record["std_return"] == pytest.approx(2 * math.sqrt(p * (1 - p)))
    else:
        assert record["success_rate"] is None  # these envs report no is_success

    scalars = read_tb_scalars(run_dir)
    assert TB_KEYS <= set(scalars), TB_KEYS - set(scalars)
    for key in TB_KEYS - {"losses/explained_variance"}:
        assert all(math.isfinite(v) for _, v in scalars[key]), key
    assert max(s for s, _ in scalars["charts/SPS"]) == total
    assert len(scalars["losses/value_loss"]) == 2  # one point per update, averaged over minibatches
    assert all(0 < v for _, v in scalars["charts/learning_rate"])


# Public memory suites from requirements-extras.txt, reached as `module:EnvId`; skipped when absent.
OPTIONAL_ENVS = {"minigrid": "MiniGrid-MemoryS7-v0", "popgym": "popgym-RepeatFirstEasy-v0"}


@pytest.mark.parametrize("module", list(OPTIONAL_ENVS))
@pytest.mark.parametrize("script", SCRIPTS)
def test_runs_on_the_optional_public_suites(tmp_path, script, module):
    pytest.importorskip(module)
    cfg = TINY["vector"]
    proc = run(tmp_path, script, "--env-id", f"{module}:{OPTIONAL_ENVS[module]}", "--env-kwargs",
               "max_episode_steps=20", "--eval-episodes", "2", "--run-name", "opt", *cfg["flags"])
    assert proc.returncode == 0, describe(proc)
    record = json.loads((tmp_path / "runs" / "opt" / "eval.json").read_text())
    assert record["env_id"] == f"{module}:{OPTIONAL_ENVS[module]}" and math.isfinite(record["mean_return"])
    if module == "minigrid":  # the mission string is dropped with a notice, never silently
        assert proc.stdout.count("'mission' is dropped") == 1  # once, not once per env


@pytest.mark.parametrize("script", SCRIPTS)
def test_update_reproduces_the_rollout_while_statistics_move(tmp_path, script):
    """With a zero learning rate the update must recompute exactly the rollout's log-probabilities
    (every ratio 1), also with observation normalisation on, whose statistics move as data arrives."""
    proc = run(tmp_path, script, "--env-id", "Pendulum-v1", "--normalize", "True", "--learning-rate", "0",
               "--eval-episodes", "0", "--run-name", "lr0", "--num-envs", "2", "--num-steps", "64",
               "--total-timesteps", "384", "--num-minibatches", "2", "--update-epochs", "2")
    assert proc.returncode == 0, describe(proc)
    scalars = read_tb_scalars(tmp_path / "runs" / "lr0")
    assert len(scalars["losses/approx_kl"]) == 3
    for key in ("losses/old_approx_kl", "losses/approx_kl", "losses/clipfrac"):
        assert all(abs(v) < 1e-6 for _, v in scalars[key]), (key, scalars[key])


# ---------------------------------------------------------------------------------------
# Resume a killed run
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_continues_a_killed_run(tmp_path, script):
    total, num_steps = 1024, 16
    args = ["--env-kwargs", "delay=4", "--num-envs", "1", "--num-steps", str(num_steps), "--total-timesteps",
            str(total), "--num-minibatches", "1", "--update-epochs", "2", "--checkpoint-interval", "0",
            "--eval-episodes", "4", "--run-name", "killed", *EXTRA_ARGS.get(script, [])]
    run_dir = tmp_path / "runs" / "killed"
    proc = popen_script_at(tmp_path, script, *args)
    try:
        deadline = time.time() + 240
        while not (run_dir / "checkpoint.pt").exists():
            assert proc.poll() is None, (tmp_path / f"{Path(script).stem}.stderr").read_text()
            assert time.time() < deadline, "no checkpoint.pt after 240 s"
            time.sleep(0.01)
        assert proc.poll() is None, "the run finished before it could be killed; raise `total`"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    killed_at = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)["global_step"]
    assert 0 < killed_at < total
    assert not (run_dir / "eval.json").exists()

    resumed = run(tmp_path, script, "--resume", str(run_dir))
    assert resumed.returncode == 0, describe(resumed)
    assert "resum" in resumed.stdout.lower()
    ckpt = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == total
    record = json.loads((run_dir / "eval.json").read_text())
    assert record["total_timesteps"] == total and record["eval_episodes"] == 4
    assert record.get("global_step", total) == total
    assert math.isfinite(record["mean_return"])
    scalars = read_tb_scalars(run_dir)
    steps = [s for s, _ in scalars["losses/value_loss"]]
    assert len(steps) == len(set(steps)), "an update logged twice"
    # every update after the checkpoint is in the log, up to the total
    assert set(range(killed_at + num_steps, total + 1, num_steps)) <= set(steps)
    assert max(s for s, _ in scalars["charts/SPS"]) == total


# ---------------------------------------------------------------------------------------
# Bad input: exactly one line on stderr naming the bad value, non-zero exit, no traceback
# ---------------------------------------------------------------------------------------
# (case, flags, words the error line must contain, run as a real subprocess?) The subprocess cases
# cover each error path (flag parsing, env construction, spaces) in a real interpreter; the rest
# run the script in-process with runpy (same code, as __main__) to save interpreter start-ups.
BAD_INPUT = [
    ("seed-not-int", ["--seed", "x"], ["--seed", "x"], True),
    ("unknown-flag", ["--bogus"], ["--bogus"], False),
    ("unknown-env", ["--env-id", "NoSuchEnv-v0"], ["NoSuchEnv-v0"], False),
    ("missing-module", ["--env-id", "no_such_module:Foo-v0"], ["no_such_module"], False),
    ("delay-0", ["--env-kwargs", "delay=0"], ["delay", "0"], True),
    ("not-key-value", ["--env-kwargs", "notkv"], ["notkv"], False),
    ("unknown-kwarg", ["--env-kwargs", "bogus_kw=1"], ["bogus_kw"], False),
    ("text-observation", ["--env-id", "helper_envs:TextObs-v0"], ["Text"], True),
    ("multibinary-action", ["--env-id", "helper_envs:MultiBinaryAction-v0"], ["MultiBinary"], False),
    ("zero-envs", ["--num-envs", "0"], ["--num-envs", "0"], False),
    ("minibatches-not-dividing", ["--num-envs", "2", "--num-steps", "16", "--num-minibatches", "3"],
     ["--num-minibatches 3", "divide"], False),
    # tyro wraps this message over several lines of its box; all of it must reach the one line
    ("bad-choice", ["--normalize", "maybe"], ["maybe", "--normalize", "True", "False"], False),
    ("resume-nothing", ["--resume", "no_such_run"], ["no_such_run"], False),
]


def run_in_process(script: str, argv: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """``python script argv...`` executed in this interpreter; returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [str(REPO_ROOT / script), *argv])
    code = 0
    try:
        runpy.run_path(str(REPO_ROOT / script), run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case,flags,named,in_subprocess", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_input_is_one_line(tmp_path, monkeypatch, capsys, script, case, flags, named, in_subprocess):
    argv = [*flags, "--total-timesteps", "64", "--eval-episodes", "0", *EXTRA_ARGS.get(script, [])]
    if in_subprocess:
        proc = run_script_at(tmp_path, script, *argv, timeout=120)
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    else:
        monkeypatch.chdir(tmp_path)
        code, out, err = run_in_process(script, argv, monkeypatch, capsys)
    report = f"rc={code}\n--- stdout ---\n{out[-2000:]}\n--- stderr ---\n{err[-2000:]}"
    assert code != 0, report
    lines = err.strip().splitlines()
    assert len(lines) == 1, report
    assert "Traceback" not in err + out
    for word in named:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("script", SCRIPTS)
def test_capture_video_without_its_renderer_is_one_line(tmp_path, monkeypatch, capsys, script):
    monkeypatch.setitem(sys.modules, "pygame", None)  # `import pygame` now fails, as on a bare install
    monkeypatch.chdir(tmp_path)
    code, out, err = run_in_process(script, ["--env-id", "CartPole-v1", "--capture-video", "--total-timesteps", "64",
                                             *EXTRA_ARGS.get(script, [])], monkeypatch, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "pygame" in err, (code, out, err)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_groups_the_flags_and_shows_each_domains_default(monkeypatch, capsys, script):
    code, out, err = run_in_process(script, ["--help"], monkeypatch, capsys)
    assert code == 0 and not err
    run_part, rest = out.split("\nPPO:\n")
    ppo_part, own_part = rest.split(f"\n{script[:-3]}:\n")
    assert "--env-id" in run_part and "--resume" in run_part and "--evaluate" in run_part
    assert "--gamma" in ppo_part and "--memory-slots" not in ppo_part
    for flag in ("--learning-rate", "--num-envs", "--ent-coef"):
        block = ppo_part.split(flag, 1)[1].split("\n  --", 1)[0]
        assert "(default: vector " in block and "atari" in block and "continuous" in block, block
    assert "(default: None)" not in ppo_part.split("--target-kl")[0]
    assert own_part.strip() or script == "ppo_baseline.py"


def numeric_flags(script: str) -> list[str]:
    """Every int or float flag of a script's Args."""
    import dataclasses
    import importlib
    import typing

    module = importlib.import_module(script[:-3])
    hints = typing.get_type_hints(module.Args)
    return [f.name for f in dataclasses.fields(module.Args)
            if re.search(r"\b(int|float)\b", str(hints[f.name])) and "bool" not in str(hints[f.name])]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_numeric_flag_rejects_an_invalid_value_in_one_line(tmp_path, monkeypatch, capsys, script):
    """-1 is out of range for every numeric flag (and nan for every float one); the discount and lambda also
    above 1: one line naming the flag, exit code 2, no run directory."""
    monkeypatch.chdir(tmp_path)
    cases = [(name, "-1") for name in numeric_flags(script)] + [("gamma", "2"), ("gae_lambda", "1.5"),
                                                                 ("learning_rate", "nan")]
    assert len(cases) > 18
    for name, value in cases:
        flag = "--" + name.replace("_", "-")
        budget = [] if name == "total_timesteps" else ["--total-timesteps", "64"]
        code, out, err = run_in_process(script, [flag, value, *budget], monkeypatch, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and flag in lines[0] and "Traceback" not in err + out, (flag, err, out)
        assert not (tmp_path / "runs").exists(), flag


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_and_evaluate_refuse_what_they_cannot_use(tmp_path, monkeypatch, capsys, script):
    monkeypatch.chdir(tmp_path)
    other = "ppo_baseline.py" if script != "ppo_baseline.py" else "trace_ppo.py"
    common = [*TINY["vector"]["flags"], *kwargs_flags({"delay": 4}), "--eval-episodes", "0", "--save-model"]
    for name, program in (("mine", script), ("theirs", other)):
        assert run_in_process(program, [*common, "--run-name", name], monkeypatch, capsys)[0] == 0
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    for argv, words in ((["--resume", "runs/mine/model.pt"], ["saved model", "--evaluate"]),
                        (["--resume", "theirs"], ["theirs", other]), (["--evaluate", "theirs"], [other]),
                        (["--resume", "junk.pt"], ["junk.pt"]), (["--evaluate", "nowhere"], ["nowhere"])):
        code, out, err = run_in_process(script, argv, monkeypatch, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "Traceback" not in err + out, (argv, err)
        assert all(w in lines[0] for w in words), (argv, lines[0])


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_of_another_network_is_one_line(tmp_path, monkeypatch, capsys, script):
    """A checkpoint whose network differs from this version's (one weight missing), or that lacks a part a resumed
    run needs (its optimizer), is refused in one line."""
    import torch

    monkeypatch.chdir(tmp_path)
    flags = [*TINY["vector"]["flags"], *kwargs_flags({"delay": 4}), "--eval-episodes", "0", "--run-name", "old"]
    assert run_in_process(script, flags, monkeypatch, capsys)[0] == 0
    path = tmp_path / "runs" / "old" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=False)
    no_optimizer = {k: v for k, v in ckpt.items() if k != "optimizer"}
    other_net = dict(ckpt, agent=dict(list(ckpt["agent"].items())[1:]))
    for flag, part, saved in (("--resume", "optimizer", no_optimizer), ("--resume", "agent", other_net),
                              ("--evaluate", "agent", other_net)):
        torch.save(saved, path)
        code, out, err = run_in_process(script, [flag, "runs/old"], monkeypatch, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "Traceback" not in err + out, (flag, part, err)
        assert f"its {part} does not match" in lines[0] and flag in lines[0], lines[0]


@pytest.mark.parametrize("script", SCRIPTS)
def test_evaluate_reproduces_the_runs_own_evaluation(tmp_path, monkeypatch, capsys, script):
    """--evaluate on the saved model, the checkpoint and the run directory writes <run>/evaluate/eval.json with
    the run's own evaluation, without training; --eval-episodes is honoured."""
    monkeypatch.chdir(tmp_path)
    argv = [*TINY["vector"]["flags"], *kwargs_flags({"delay": 4, "difficulty": 1}), "--eval-episodes", "6",
            "--save-model", "--run-name", "r"]
    assert run_in_process(script, argv, monkeypatch, capsys)[0] == 0
    trained = json.loads((tmp_path / "runs/r/eval.json").read_text())
    weights = torch.load(tmp_path / "runs/r/checkpoint.pt", weights_only=False)["agent"]
    for target in ("runs/r/model.pt", "runs/r/checkpoint.pt", "r"):
        code, out, err = run_in_process(script, ["--evaluate", target], monkeypatch, capsys)
        assert code == 0, err
        again = json.loads((tmp_path / "runs/r/evaluate/eval.json").read_text())
        for key in ("mean_return", "std_return", "success_rate", "eval_episodes", "global_step"):
            assert again[key] == trained[key], (target, key)
    assert json.loads((tmp_path / "runs/r/eval.json").read_text()) == trained  # the run's own files stay
    after = torch.load(tmp_path / "runs/r/checkpoint.pt", weights_only=False)["agent"]
    assert all(torch.equal(weights[k], after[k]) for k in weights)
    code, _, err = run_in_process(script, ["--evaluate", "r", "--eval-episodes", "3"], monkeypatch, capsys)
    assert code == 0 and json.loads((tmp_path / "runs/r/evaluate/eval.json").read_text())["eval_episodes"] == 3, err
    if script == "trace_ppo.py":
        assert (tmp_path / "runs/r/evaluate/attention.png").exists()


def test_budget_is_rounded_to_whole_rollouts_with_a_notice(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_in_process("ppo_baseline.py", ["--num-envs", "2", "--num-steps", "32", "--total-timesteps", "100",
                                                      "--eval-episodes", "0", "--run-name", "b"], monkeypatch, capsys)
    assert code == 0 and "rounded to 64" in out and "ETA -" not in out
    assert json.loads((tmp_path / "runs/b/eval.json").read_text())["global_step"] == 64


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("script", SCRIPTS)
def test_a_signal_checkpoints_then_resume_finishes(tmp_path, script, sig):
    """Ctrl-C (SIGINT) or a scheduler's SIGTERM: the update in progress ends, a checkpoint is written, one line
    says how to continue, exit code 130 / 143; --resume then finishes with every update logged once."""
    flags = ["--num-envs", "2", "--num-steps", "32", "--num-minibatches", "2", "--update-epochs", "1",
             "--total-timesteps", "12800", "--checkpoint-interval", "3600", "--eval-episodes", "2",
             *kwargs_flags({"delay": 4}), "--run-name", "s", *EXTRA_ARGS.get(script, [])]
    proc = popen_script_at(tmp_path, script, *flags)
    out_file = tmp_path / f"{Path(script).stem}.stdout"
    deadline = time.time() + 120
    while "run directory" not in out_file.read_text() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)  # printed once the handlers are installed
    time.sleep(1.0)  # into the training loop (200 updates of 64 steps: seconds, on any machine here)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    err = (tmp_path / f"{Path(script).stem}.stderr").read_text()
    assert proc.returncode == 128 + sig, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--resume" in lines[0] and "Traceback" not in err, err
    ckpt = torch.load(tmp_path / "runs/s/checkpoint.pt", map_location="cpu", weights_only=False)
    assert 0 < ckpt["global_step"] < 12800 and not (tmp_path / "runs/s/eval.json").exists()
    resumed = run(tmp_path, script, "--resume", "s")
    assert resumed.returncode == 0, describe(resumed)
    steps = [s for s, _ in read_tb_scalars(tmp_path / "runs/s")["losses/value_loss"]]
    assert sorted(steps) == list(range(64, 12801, 64))  # no update lost, none logged twice


# ---------------------------------------------------------------------------------------
# NaN guard
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", SCRIPTS)
def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, script):
    # NaNReward-v0 turns its rewards into NaN after 64 steps, i.e. during the 5th rollout of 16.
    proc = run(tmp_path, script, "--env-id", "helper_envs:NaNReward-v0", "--env-kwargs", "nan_after=64",
               "--num-envs", "1", "--num-steps", "16", "--num-minibatches", "1", "--update-epochs", "2",
               "--total-timesteps", "512", "--checkpoint-interval", "0", "--eval-episodes", "2",
               "--run-name", "nan")
    assert proc.returncode not in (0, None), describe(proc)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, describe(proc)
    assert re.search(r"non-finite|nan", lines[0], re.IGNORECASE) and "checkpoint" in lines[0], lines[0]
    run_dir = tmp_path / "runs" / "nan"
    ckpt = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 64  # the last update with finite rewards
    for name, tensor in ckpt["agent"].items():
        if torch.is_tensor(tensor) and tensor.is_floating_point():
            assert torch.isfinite(tensor).all(), name
    assert not (run_dir / "eval.json").exists()
