"""benchmark.sh, summarize.py and peers.py: statistics by hand, run lists, Slurm script, errors, end to end."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT, script_env

import summarize

BENCH = REPO_ROOT / "benchmark.sh"


def bench(*args, cwd=None, script=BENCH, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *map(str, args)], cwd=cwd or REPO_ROOT, env=script_env(),
                          capture_output=True, text=True, timeout=timeout)


def parse_run_line(tokens: list[str]) -> dict:
    """Flags of one run command (tokens after the script) -> {flag: [values]}."""
    flags, key = defaultdict(list), None
    for tok in tokens:
        if tok.startswith("--"):
            key = tok
            flags[key]  # noqa: B018  (a flag without values is recorded too)
        else:
            assert key is not None, f"value {tok!r} before any flag"
            flags[key].append(tok)
    return flags


def dry_run(*args) -> list[dict]:
    """The `--dry-run` run list as dicts: status, name, script, flags."""
    proc = bench(*args, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    runs = []
    for line in proc.stdout.splitlines():
        if line.startswith("#"):
            continue
        status, name, python, script, *rest = shlex.split(line)
        runs.append(dict(status=status, name=name, script=script, flags=parse_run_line(rest)))
    return runs


# ---------------------------------------------------------------------------------------
# Statistics, checked by hand
# ---------------------------------------------------------------------------------------
def test_bootstrap_ci_equals_hand_computation_with_the_same_resampling():
    values = [0.2, 0.5, 0.9, 0.4, 0.75]
    resamples, seed = 2000, 7
    mean, low, high = summarize.bootstrap_ci(values, resamples=resamples, seed=seed)
    # By hand: the same generator draws the same index table; means and percentiles with loops.
    idx = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
    means = sorted(sum(values[i] for i in row) / len(row) for row in idx.tolist())

    def percentile(sorted_xs, q):  # numpy's default "linear" method
        pos = q / 100 * (len(sorted_xs) - 1)
        lo_i, hi_i = math.floor(pos), math.ceil(pos)
        return sorted_xs[lo_i] + (pos - lo_i) * (sorted_xs[hi_i] - sorted_xs[lo_i])

    assert mean == pytest.approx(sum(values) / len(values), abs=1e-12)
    assert low == pytest.approx(percentile(means, 2.5), abs=1e-12)
    assert high == pytest.approx(percentile(means, 97.5), abs=1e-12)
    assert low < mean < high
    assert summarize.bootstrap_ci(values, resamples=resamples, seed=seed) == (mean, low, high)  # deterministic


def test_bootstrap_ci_exact_small_case_and_degenerate_cases():
    # Seeds scoring 0, 0, 3: a resample is all zeros with prob (2/3)^3 = 0.30 > 0.025 and all threes
    # with prob 1/27 = 0.037 > 0.025, so the 95% percentile interval is exactly [0, 3] around mean 1.
    assert summarize.bootstrap_ci([0.0, 0.0, 3.0], resamples=10_000, seed=0) == (1.0, 0.0, 3.0)
    assert summarize.bootstrap_ci([0.25]) == (0.25, 0.25, 0.25)
    assert summarize.bootstrap_ci([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5)
    assert all(math.isnan(v) for v in summarize.bootstrap_ci([]))


def test_steps_to_90_percent_on_a_synthetic_curve():
    # 150 failed episodes then only successes, one episode every 10 env steps. The trailing window
    # of 100 episodes ending at episode i (0-based) holds i - 149 successes: 90 first at i = 239,
    # whose env step is 10 * 240.
    succ = [0.0] * 150 + [1.0] * 200
    steps = [10 * (i + 1) for i in range(len(succ))]
    assert summarize.steps_to_threshold(steps, succ, window=100) == 2400
    assert summarize.steps_to_threshold(steps, succ, window=10) == 10 * (150 + 9)
    assert summarize.steps_to_threshold(steps, succ, window=1) == 10 * 151
    # Never 90% (alternating), and too few episodes for a full window: not reached.
    assert summarize.steps_to_threshold(steps, [i % 2 for i in range(350)], window=100) is None
    assert summarize.steps_to_threshold(steps[:50], [1.0] * 50, window=100) is None
    np.testing.assert_allclose(summarize.trailing_mean([1, 0, 1, 1], 2), [1, 0.5, 0.5, 1])


# ---------------------------------------------------------------------------------------
# summarize.py on synthetic run folders
# ---------------------------------------------------------------------------------------
def fake_run(root: Path, name: str, *, algo: str, seed: int, ret: float, success: float | None, sps: float,
             switch_episode: int | None, episodes: int = 300, steps_per_episode: int = 16,
             env_kwargs=None) -> None:
    """A run folder as the scripts write it: eval.json and TB success/return curves that switch
    from failure to success at `switch_episode` (never if None)."""
    from torch.utils.tensorboard import SummaryWriter

    run_dir = root / name
    run_dir.mkdir(parents=True)
    writer = SummaryWriter(str(run_dir))
    for ep in range(episodes):
        ok = switch_episode is not None and ep >= switch_episode
        step = (ep + 1) * steps_per_episode
        writer.add_scalar("charts/episodic_success", float(ok), step)
        writer.add_scalar("charts/episodic_return", 1.0 if ok else -1.0, step)
    writer.add_scalar("charts/SPS", sps, episodes * steps_per_episode)
    writer.close()
    record = dict(algo=algo, env_id="MemoryTask-v0", env_kwargs=dict(delay=16, difficulty=1) if env_kwargs is None else env_kwargs,
                  seed=seed, total_timesteps=episodes * steps_per_episode,
                  global_step=episodes * steps_per_episode, eval_episodes=200, mean_return=ret,
                  std_return=0.0, success_rate=success, sps=sps, wall_time_s=1.0, run_name=name, args={})
    (run_dir / "eval.json").write_text(json.dumps(record))


def table_rows(markdown: str) -> dict[tuple[str, str], dict[str, str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == len(header) and cells[0] != "agent":
            row = dict(zip(header, cells))
            rows[row["setting"], row["agent"]] = row
        else:
            break  # the SPS table starts
    return rows


def test_summarize_tables_curves_and_sps_on_synthetic_runs(tmp_path, capsys):
    setting = "MemoryTask-v0-delay16-difficulty1"
    returns = {1: 1.0, 2: 0.6, 3: 0.8}
    switches = {1: 50, 2: 80, 3: 120}  # trace reaches 90% at episode switch + 89
    for seed in (1, 2, 3):
        fake_run(tmp_path, f"memory__{setting}__trace-learned__{seed}", algo="trace_ppo", seed=seed,
                 ret=returns[seed], success=(1 + returns[seed]) / 2, sps=1000.0 + 100 * seed,
                 switch_episode=switches[seed])
        fake_run(tmp_path, f"memory__{setting}__ppo__{seed}", algo="ppo_baseline", seed=seed, ret=0.0,
                 success=0.5, sps=3000.0, switch_episode=None)
        fake_run(tmp_path, f"memory__{setting}__lstm-ppo__{seed}", algo="recurrent_ppo_baseline", seed=seed,
                 ret=0.5, success=0.75, sps=2000.0, switch_episode=100 if seed < 3 else None)
    fake_run(tmp_path, "cp_1", algo="ppo_baseline", seed=4, ret=0.0, success=None, sps=1.0,
             switch_episode=None, env_kwargs={})  # not a benchmark name: suite "other"
    # Rows follow the suite table, as recorded in benchmark.sh's job script.
    (tmp_path / "memory.123.jobs.sh").write_text("".join(
        f"  {i}) run memory__{setting}__{a}__1 x.py ;;\n" for i, a in enumerate(["ppo", "lstm-ppo", "trace-learned"])))
    out = tmp_path / "summary"
    assert summarize.main([str(tmp_path), "--out", str(out), "--resamples", "3000"]) == 0
    md = (out / "memory.md").read_text()
    assert md in capsys.readouterr().out
    rows = table_rows(md)
    assert list(rows) == [(setting, a) for a in ("ppo", "lstm-ppo", "trace-learned")]

    trace = rows[setting, "trace-learned"]
    assert trace["seeds"] == "3" and trace["budget (steps)"] == "4.8k" and trace["eval episodes"] == "200"
    m, lo, hi = summarize.bootstrap_ci([1.0, 0.6, 0.8], resamples=3000, seed=0)
    assert trace["return"] == f"{m:.3f} [{lo:.3f}, {hi:.3f}]"
    assert trace["return"].startswith("0.800 [")
    # Steps to 90%: episode (switch + 89) ends at env step 16 * (switch + 90).
    expected_steps = [16 * (s + 90) for s in switches.values()]
    assert trace["steps to 90% success"] == summarize.cell(expected_steps, summarize.human, 3000, 0)
    assert trace["steps to 90% success"].startswith(summarize.human(np.mean(expected_steps)))
    assert rows[setting, "ppo"]["steps to 90% success"] == "not reached (0/3)"
    # Two of three LSTM seeds reach it; the third counts at its last step as a lower bound.
    lstm = rows[setting, "lstm-ppo"]["steps to 90% success"]
    assert lstm.startswith("≥ ") and lstm.endswith("(2/3)")
    assert lstm[2:].startswith(summarize.human(np.mean([16 * 190, 16 * 190, 4800])))

    sps_table = md[md.index("SPS (training"):]
    assert "| trace-learned | 1200 [" in sps_table and "| ppo | 3000 [3000, 3000] |" in sps_table
    png = out / f"memory__{setting}.png"
    assert png.exists() and png.stat().st_size > 10_000
    assert f"]({png.name})" in md
    assert "MemoryTask-v0 | ppo_baseline | 1 |" in (out / "other.md").read_text()
    # Same inputs, same tables (the bootstrap is seeded).
    assert summarize.main([str(tmp_path), "--out", str(tmp_path / "again"), "--resamples", "3000",
                           "--suite", "memory"]) == 0
    assert (tmp_path / "again" / "memory.md").read_text() == md


def test_summarize_draws_cost_against_episode_length(tmp_path):
    for delay, sps in ((16, 900.0), (256, 600.0)):
        for seed in (1, 2):
            name = f"speed__MemoryTask-v0-delay{delay}-difficulty1__trace-learned__{seed}"
            fake_run(tmp_path, name, algo="trace_ppo", seed=seed, ret=0.0, success=0.5, sps=sps + seed,
                     switch_episode=None, episodes=10, env_kwargs=dict(delay=delay, difficulty=1))
            record = json.loads((tmp_path / name / "eval.json").read_text())
            (tmp_path / name / "eval.json").write_text(json.dumps(dict(record, peak_rss_mb=100.0 * seed)))
    out = tmp_path / "summary"
    assert summarize.main([str(tmp_path), "--out", str(out), "--resamples", "100"]) == 0
    md = (out / "speed.md").read_text()
    assert "| agent | 16 | 256 |" in md  # MemoryTask's episodes last `delay` steps
    assert "| trace-learned | 902 [" in md and "] / 150 [" in md and "| 602 [" in md
    assert (out / "speed__cost.png").stat().st_size > 10_000


def test_summarize_rejects_an_empty_directory(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "summarize.py"), str(tmp_path)], capture_output=True,
                          text=True, env=script_env(), timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no */eval.json" in proc.stderr


# ---------------------------------------------------------------------------------------
# benchmark.sh: run lists, Slurm script, errors
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("suite", ["memory", "exploration", "speed", "mujoco", "atari", "smoke"])
def test_dry_run_gives_every_agent_of_a_setting_the_same_budget(suite, tmp_path):
    runs = dry_run(suite, "--out", tmp_path / "runs")
    assert runs and not (tmp_path / "runs").exists()  # a dry run writes nothing
    by_setting = defaultdict(list)
    for r in runs:
        label, setting, agent, seed = r["name"].split("__")
        f = r["flags"]
        assert label == suite and f["--run-name"] == [r["name"]] and f["--seed"] == [seed]
        assert f["--threads"] == ["1"] and r["script"].endswith(".py")
        by_setting[setting].append((agent, int(seed), f))
    for setting, entries in by_setting.items():
        budgets = {(tuple(f["--env-id"]), tuple(f.get("--env-kwargs", [])), tuple(f["--total-timesteps"]),
                    tuple(f["--eval-episodes"])) for _, _, f in entries}
        assert len(budgets) == 1, f"{suite}/{setting}: unequal budgets {budgets}"
        seeds = defaultdict(set)
        for agent, seed, _ in entries:
            seeds[agent].add(seed)
        default_seeds = 2 if suite == "smoke" else 3
        assert all(s == set(range(1, default_seeds + 1)) for s in seeds.values()), seeds
        if suite == "memory":
            assert {"ppo", "lstm-ppo", "trace-learned", "trace-fifo"} <= set(seeds)
            assert int(entries[0][2]["--eval-episodes"][0]) >= 200
    assert len({r["name"] for r in runs}) == len(runs)


def test_dry_run_options_seeds_only_scale_and_peers(tmp_path):
    full = dry_run("memory", "--out", tmp_path)
    two = dry_run("memory", "--seeds", "2", "--out", tmp_path)
    assert len(two) * 3 == len(full) * 2
    only = dry_run("memory", "--only", "delay(16|64)-difficulty1__ppo__", "--out", tmp_path)
    assert [r["name"] for r in only] == [r["name"] for r in full if re.search("delay(16|64)-difficulty1__ppo__", r["name"])]
    assert len(only) == 6
    half = dry_run("memory", "--scale", "0.5", "--only", "delay64", "--out", tmp_path)
    assert {r["name"].split("__")[0] for r in half} == {"memory-x0.5"}
    assert {r["flags"]["--total-timesteps"][0] for r in half} == {str(64_000)}
    peers = dry_run("memory", "--peers", "--out", tmp_path)
    assert {r["name"].split("__")[2] for r in peers} - {r["name"].split("__")[2] for r in full} == \
        {"sb3-ppo", "sb3-lstm-ppo"}


def test_dry_run_slurm_script_has_one_well_formed_array_task_per_run(tmp_path):
    out = tmp_path / "runs"
    runs = dry_run("memory", "--out", out)
    proc = bench("memory", "--dry-run", "--slurm", "--out", out)
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    assert not out.exists()
    n = len(runs)
    assert re.search(rf"^#SBATCH --array=0-{n - 1}$", script, re.M)
    tasks = re.findall(r"^  (\d+)\) run (.*) ;;$", script, re.M)
    assert [int(i) for i, _ in tasks] == list(range(n))
    for (i, command), run in zip(tasks, runs):
        name, script_path, *rest = shlex.split(command)
        assert name == run["name"] and script_path == run["script"]
        assert Path(script_path).parent == REPO_ROOT
        flags = parse_run_line(rest)
        assert flags == run["flags"]
        for flag in ("--env-id", "--seed", "--total-timesteps", "--eval-episodes", "--threads", "--run-name"):
            assert len(flags[flag]) == 1, (flag, command)
        assert int(flags["--total-timesteps"][0]) > 0 and int(flags["--eval-episodes"][0]) >= 200
    assert f"cd \"{out}/.root\"" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    # --workers throttles the array.
    throttled = bench("memory", "--dry-run", "--slurm", "--workers", "5", "--out", out).stdout
    assert re.search(rf"^#SBATCH --array=0-{n - 1}%5$", throttled, re.M)


@pytest.mark.parametrize("args", [
    ["nosuch"], ["memory", "--bogus"], [], ["memory", "--seeds", "0"], ["memory", "--seeds"],
    ["memory", "--workers", "two"], ["memory", "smoke"], ["memory", "--scale", "0"], ["memory", "--only", "("],
    ["atari", "--peers"], ["memory", "--only", "no-such-run"],
])
def test_bad_arguments_give_one_line_and_nonzero_exit(args, tmp_path):
    proc = bench(*args, "--out", tmp_path / "runs")
    assert proc.returncode == 2, proc
    assert proc.stdout == "" and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("benchmark.sh: error: ")
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------
# benchmark.sh end to end: smoke suite, missing scripts, resume
# ---------------------------------------------------------------------------------------
def test_smoke_end_to_end_skips_finished_runs_resumes_checkpoints_and_reports_missing_scripts(tmp_path):
    # A repository copy holding only ppo_baseline.py, so the LSTM run's script is missing there
    # whatever the state of the real repository.
    repo = tmp_path / "repo"
    repo.mkdir()
    for f in ("benchmark.sh", "summarize.py", "ppo_baseline.py", "memory_envs.py", "run_contract.py"):
        shutil.copy(REPO_ROOT / f, repo / f)
    out = tmp_path / "out"
    only = "__(ppo|lstm-ppo)__1$"
    first = bench("smoke", "--only", only, "--out", out, "--workers", "2", script=repo / "benchmark.sh",
                  timeout=240)
    name = "smoke__MemoryTask-v0-delay4-difficulty1__ppo__1"
    missing = "smoke__MemoryTask-v0-delay4-difficulty1__lstm-ppo__1"
    assert first.returncode == 1, first  # one run could not finish
    assert "recurrent_ppo_baseline.py does not exist" in first.stderr
    assert "1/2 runs finished (0 skipped" in first.stdout and f"not finished: {missing}" in first.stdout
    record = json.loads((out / name / "eval.json").read_text())
    assert record["total_timesteps"] == 2048 and record["eval_episodes"] == 20 and record["run_name"] == name
    assert (out / "summary" / "smoke.md").exists() and len(list(out.glob("smoke.*.jobs.sh"))) == 1
    mtime = (out / name / "eval.json").stat().st_mtime_ns

    second = bench("smoke", "--only", only, "--out", out, script=repo / "benchmark.sh", timeout=240)
    assert f"skip    {name} (eval.json exists)" in second.stdout
    assert "1/2 runs finished (1 skipped" in second.stdout
    assert (out / name / "eval.json").stat().st_mtime_ns == mtime

    # A run with a checkpoint but no eval.json (killed during evaluation) is continued, not restarted.
    (out / name / "eval.json").unlink()
    third = bench("smoke", "--only", r"__ppo__1$", "--out", out, script=repo / "benchmark.sh", timeout=240)
    assert third.returncode == 0, third
    assert f"resume  {name}" in third.stdout and (out / name / "eval.json").exists()
    assert "resuming" in (out / name / "stdout.log").read_text()


# ---------------------------------------------------------------------------------------
# peers.py (only where the optional requirements-peers.txt is installed)
# ---------------------------------------------------------------------------------------
def test_peers_evaluation_carries_state_and_flags_episode_starts():
    pytest.importorskip("sb3_contrib")
    import peers

    class FakeRecurrentModel:
        """Records what evaluate() passes; its 'state' counts the steps since the episode start."""

        def __init__(self):
            self.calls = []

        def predict(self, obs, state=None, episode_start=None, deterministic=False):
            assert deterministic
            self.calls.append((None if state is None else state.copy(), episode_start.copy()))
            prev = np.zeros(len(obs)) if state is None else state
            new_state = np.where(episode_start, 0, prev) + 1
            return np.zeros(len(obs), dtype=np.int64), new_state

    model = FakeRecurrentModel()
    args = peers.Args(env_id="MemoryTask-v0", env_kwargs=("delay=3",), seed=5)
    result = peers.evaluate(model, args, {"delay": 3}, episodes=4)
    assert len(model.calls) == 3 * 1  # 4 envs, one 3-step episode each
    starts = np.array([c[1] for c in model.calls])
    np.testing.assert_array_equal(starts[:, 0], [True, False, False])
    for t, (state, _) in enumerate(model.calls[1:], start=1):
        np.testing.assert_array_equal(state, np.full(4, t))  # the state returned last step came back
    assert result["success_rate"] is not None and -1 <= result["mean_return"] <= 1


def test_peers_run_writes_the_same_eval_json_and_tb_keys(tmp_path):
    pytest.importorskip("sb3_contrib")
    from conftest import read_tb_scalars, run_script_at

    proc = run_script_at(tmp_path, "peers.py", "--algo", "recurrent_ppo", "--env-id", "MemoryTask-v0",
                         "--env-kwargs", "delay=2", "--total-timesteps", "512", "--eval-episodes", "10",
                         "--run-name", "peer")
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "runs" / "peer" / "eval.json").read_text())
    for key in ("algo", "env_id", "env_kwargs", "seed", "total_timesteps", "global_step", "eval_episodes",
                "mean_return", "std_return", "success_rate", "sps", "wall_time_s", "run_name", "args"):
        assert key in record
    assert record["algo"] == "sb3_recurrent_ppo" and record["env_kwargs"] == {"delay": 2}
    assert record["global_step"] == 512 and record["eval_episodes"] == 10  # 1 rollout of 4 x 128
    tags = read_tb_scalars(tmp_path / "runs" / "peer")
    assert {"charts/episodic_return", "charts/episodic_success", "charts/SPS"} <= set(tags)
    bad = run_script_at(tmp_path, "peers.py", "--algo", "dqn")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


def test_slurm_submits_the_written_job_script_where_sbatch_exists(tmp_path):
    # A stand-in sbatch on PATH records what it was asked to submit.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "sbatch").write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/submitted"\necho "Submitted batch job 42"\n')
    (fake_bin / "sbatch").chmod(0o755)
    out = tmp_path / "runs"
    env = script_env({"PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"})
    proc = subprocess.run(["bash", str(BENCH), "speed", "--slurm", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "Submitted batch job 42" in proc.stdout, proc
    job = Path((fake_bin / "submitted").read_text().strip())
    assert job.parent == out and job.name.startswith("speed.") and job.name.endswith(".jobs.sh")
    text = job.read_text()
    # The same script as --dry-run prints (but for the commit line: others may commit meanwhile).
    def body(script):
        return [line for line in script.splitlines() if not line.startswith("# Repository")]

    assert body(text) == body(bench("speed", "--slurm", "--dry-run", "--out", out).stdout)
    assert "#SBATCH --exclusive" in text  # speed runs get a node to themselves
    # Without sbatch the script is written and the command to submit it is printed.
    env["PATH"] = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                  if not os.path.exists(os.path.join(p, "sbatch")))
    proc = subprocess.run(["bash", str(BENCH), "speed", "--slurm", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and f"sbatch {job}" in proc.stdout
