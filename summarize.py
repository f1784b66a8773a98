"""Summarise benchmark runs: per-suite markdown tables, learning curves and SPS, offline.

usage: python3 summarize.py [DIR] [--out OUT] [--suite SUITE ...] [--window W]
                            [--resamples B] [--bootstrap-seed S]

Reads ``DIR/*/eval.json`` (default DIR: runs) and the TensorBoard events next to each, and
writes to OUT (default DIR/summary), for every suite:

- ``<suite>.md``: a results table with one row per (setting, agent): the mean over seeds and
  its 95% bootstrap confidence interval for the evaluation return, the evaluation success
  rate, the env steps to 90% training success, and training SPS; then an SPS table (agents x
  settings) and links to the curves. The same markdown is printed to stdout.
- ``<suite>__<setting>.png``: learning curves (training success and return against env
  steps), the mean over seeds with a shaded 95% bootstrap CI.
- ``<suite>__cost.png`` and a cost table, where a suite runs one task at several episode
  lengths (the speed suite): SPS and peak resident memory against episode length, log x.

Run directories named ``SUITE__SETTING__AGENT__SEED`` (as benchmark.sh names them) are
grouped by those fields; any other run directory goes to suite ``other``, with its setting
taken from env_id/env_kwargs and its agent from ``algo``.

Statistics (all deterministic):
- **Bootstrap CI** (percentile method): the n per-seed values are resampled with
  replacement B times (default 10,000) with ``numpy.random.default_rng(bootstrap_seed)``;
  the CI is the 2.5th and 97.5th percentile of the B resampled means. Every cell uses the
  same seed, so re-running gives identical tables. With one seed the CI is that value.
- **Steps to 90% success**: the ``charts/episodic_success`` events of a run, in the order
  they were logged, are smoothed by a trailing mean over the last W episodes (default 100);
  the value is the ``global_step`` of the first episode at which a *full* window of W
  episodes has mean >= 0.9. A seed that never gets there is censored at its final step:
  the cell then reads ``>= mean [CI] (k/n)`` with k of n seeds having reached 90%, which is
  a lower bound; ``not reached (0/n)`` when none did.
- **Curves**: the same trailing mean (over up to W episodes, fewer at the very start) of
  each seed, interpolated on a grid of 200 env-step points up to the run's last step; the
  shaded band is the per-point bootstrap CI over the seeds that have data at that point
  (B = 1,000 resamples there).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

THRESHOLD = 0.9
CURVE_POINTS = 200
CURVE_RESAMPLES = 1000
TAGS = {"success": "charts/episodic_success", "return": "charts/episodic_return"}


# ---------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------
def bootstrap_ci(values, resamples: int = 10_000, seed: int = 0, level: float = 0.95):
    """(mean, low, high): the mean of ``values`` and its percentile-bootstrap CI."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    low, high = np.percentile(means, [100 * alpha, 100 * (1 - alpha)])
    return float(x.mean()), float(low), float(high)


def trailing_mean(values, window: int) -> np.ndarray:
    """Mean of the last ``window`` values at every position (fewer at the start)."""
    x = np.asarray(values, dtype=float)
    c = np.concatenate([[0.0], np.cumsum(x)])
    idx = np.arange(1, x.size + 1)
    start = np.maximum(idx - window, 0)
    return (c[idx] - c[start]) / (idx - start)


def steps_to_threshold(steps, successes, window: int = 100, threshold: float = THRESHOLD):
    """Env step of the first episode at which the last ``window`` episodes (a full window)
    reach a mean success >= ``threshold``; None if that never happens."""
    s = np.asarray(successes, dtype=float)
    if s.size < window:
        return None
    full = trailing_mean(s, window)[window - 1:]
    hit = np.flatnonzero(full >= threshold - 1e-12)
    return None if hit.size == 0 else int(np.asarray(steps)[window - 1 + hit[0]])


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------
@dataclass
class Run:
    suite: str
    setting: str
    agent: str
    seed: int
    record: dict
    curves: dict = field(default_factory=dict)  # "success"/"return" -> (steps, values)


def setting_of(record: dict) -> str:
    name = str(record.get("env_id", "?")).replace("/", "_")
    for key, value in sorted((record.get("env_kwargs") or {}).items()):
        name += f"-{key}{value}"
    return re.sub(r"[^A-Za-z0-9.-]", "_", name)


def load_scalars(run_dir: str) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # size_guidance 0 keeps every event: the default samples 10,000 per tag, which would
    # silently thin out long success curves.
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    available = set(acc.Tags().get("scalars", []))
    out = {}
    for key, tag in TAGS.items():
        if tag in available:
            events = acc.Scalars(tag)
            out[key] = (np.array([e.step for e in events]), np.array([e.value for e in events]))
    return out


def load_runs(directory: str) -> list[Run]:
    runs = []
    for path in sorted(glob.glob(os.path.join(directory, "*", "eval.json"))):
        run_dir = os.path.dirname(path)
        try:
            with open(path) as f:
                record = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:  # e.g. a run killed while writing it
            print(f"summarize.py: warning: skipping unreadable {path}: {exc}", file=sys.stderr)
            continue
        parts = os.path.basename(run_dir).split("__")
        if len(parts) == 4 and parts[3].isdigit():
            suite, setting, agent, seed = parts[0], parts[1], parts[2], int(parts[3])
        else:
            suite, setting = "other", setting_of(record)
            agent, seed = str(record.get("algo", "?")), int(record.get("seed", 0))
        runs.append(Run(suite, setting, agent, seed, record, load_scalars(run_dir)))
    return runs


# ---------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------
def natural_key(text: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def human(x: float) -> str:
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def cell(values, fmt, resamples: int, seed: int) -> str:
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return "n/a"
    m, lo, hi = bootstrap_ci(values, resamples, seed)
    if len(values) == 1:
        return fmt(m)  # one seed: no interval to show
    return f"{fmt(m)} [{fmt(lo)}, {fmt(hi)}]"


def steps_cell(runs: list[Run], window: int, resamples: int, seed: int) -> str:
    reached, censored = [], []
    for r in runs:
        if "success" not in r.curves:
            continue
        steps, succ = r.curves["success"]
        s = steps_to_threshold(steps, succ, window)
        if s is None:
            censored.append(float(r.record.get("global_step") or r.record.get("total_timesteps") or 0))
        else:
            reached.append(float(s))
    n = len(reached) + len(censored)
    if n == 0:
        return "n/a"
    if not reached:
        return f"not reached (0/{n})"
    text = cell(reached + censored, human, resamples, seed)
    return text if not censored else f"≥ {text} ({len(reached)}/{n})"


# ---------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------
def plot_setting(path: str, title: str, agents: dict[str, list[Run]], window: int, seed: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("success", "return") if any(k in r.curves for rs in agents.values() for r in rs)]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for agent, runs in agents.items():
            runs = [r for r in runs if key in r.curves and len(r.curves[key][0])]
            if not runs:
                continue
            end = max(float(r.record.get("global_step") or r.curves[key][0][-1]) for r in runs)
            grid = np.linspace(0.0, end, CURVE_POINTS)
            curves = np.full((len(runs), CURVE_POINTS), np.nan)
            for i, r in enumerate(runs):
                steps, values = r.curves[key]
                smooth = trailing_mean(values, window)
                last = float(r.record.get("global_step") or steps[-1])
                y = np.interp(grid, steps, smooth, left=np.nan, right=smooth[-1])
                curves[i] = np.where(grid <= last, y, np.nan)
            mean, low, high = curve_band(curves, seed)
            line, = ax.plot(grid, mean, label=f"{agent} (n={len(runs)})")
            ax.fill_between(grid, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_xlabel("env steps")
        ax.set_ylabel(f"training {key} (trailing mean of {window} episodes)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def episode_length(record: dict) -> int | None:
    """Steps per episode of the memory tasks (MemoryTask: its delay; PassiveTMaze: its length + 1)."""
    kwargs, env_id = record.get("env_kwargs") or {}, record.get("env_id")
    if env_id == "MemoryTask-v0" and isinstance(kwargs.get("delay"), int):
        return kwargs["delay"]
    if env_id == "PassiveTMaze-v0" and isinstance(kwargs.get("length"), int):
        return kwargs["length"] + 1
    return None


def cost_section(suite: str, runs: list[Run], out_dir: str, agents: list[str], resamples: int,
                 seed: int) -> list[str]:
    """SPS and peak resident memory against episode length, for a suite that varies only that."""
    by = defaultdict(list)
    for r in runs:
        by[r.agent, episode_length(r.record)].append(r)
    lengths = sorted({n for _, n in by if n is not None})
    if len(lengths) < 2 or len({r.record.get("env_id") for r in runs}) != 1:
        return []
    lines = ["", f"### {suite}: cost against episode length (SPS / peak resident MB, mean [95% CI])", "",
             "| agent | " + " | ".join(str(n) for n in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
    for agent in agents:
        row = []
        for n in lengths:
            rs = by.get((agent, n), [])
            row.append(cell([r.record.get("sps") for r in rs], lambda v: f"{v:.0f}", resamples, seed) + " / " +
                       cell([r.record.get("peak_rss_mb") for r in rs], lambda v: f"{v:.0f}", resamples, seed)
                       if rs else "")
        lines.append(f"| {agent} | " + " | ".join(row) + " |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, key, label in zip(axes, ("sps", "peak_rss_mb"), ("training SPS", "peak resident memory (MB)")):
        for agent in agents:
            xs = [n for n in lengths if any(r.record.get(key) is not None for r in by.get((agent, n), []))]
            ys = [np.mean([r.record[key] for r in by[agent, n] if r.record.get(key) is not None]) for n in xs]
            if xs:
                ax.plot(xs, ys, marker="o", label=agent)
        ax.set_xscale("log")
        ax.set_xlabel("episode length (steps)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{suite}: cost against episode length")
    fig.tight_layout()
    png = f"{suite}__cost.png"
    fig.savefig(os.path.join(out_dir, png), dpi=100)
    plt.close(fig)
    return lines + ["", f"![{suite} cost]({png})"]


def curve_band(curves: np.ndarray, seed: int):
    """Per grid point: mean over the seeds with data there and its bootstrap CI."""
    n_points = curves.shape[1]
    mean, low, high = (np.full(n_points, np.nan) for _ in range(3))
    for j in range(n_points):
        vals = curves[~np.isnan(curves[:, j]), j]
        if vals.size:
            mean[j], low[j], high[j] = bootstrap_ci(vals, CURVE_RESAMPLES, seed)
    return mean, low, high


def table_order(directory: str, suite: str) -> dict[str, int]:
    """Position of each setting and agent in benchmark.sh's tables, read from the suite's job
    scripts (DIR/<suite>.<id>.jobs.sh, the longest run list first), so rows follow the suite."""
    order: dict[str, int] = {}
    scripts = []
    for path in glob.glob(os.path.join(glob.escape(directory), f"{glob.escape(suite)}.*.jobs.sh")):
        with open(path) as f:
            scripts.append(re.findall(r"^\s+\d+\) run (\S+)", f.read(), re.M))
    for names in sorted(scripts, key=len, reverse=True):
        for name in names:
            parts = name.split("__")
            if len(parts) == 4:
                order.setdefault("setting:" + parts[1], len(order))
                order.setdefault("agent:" + parts[2], len(order))
    return order


def summarize_suite(suite: str, runs: list[Run], out_dir: str, window: int, resamples: int,
                    seed: int, order: dict[str, int] | None = None) -> str:
    order = order or {}
    groups: dict[str, dict[str, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        groups[r.setting][r.agent].append(r)

    def ordered(names, kind):  # suite-table order first, then natural order
        return sorted(names, key=lambda n: (order.get(f"{kind}:{n}", len(order)), natural_key(n)))

    settings = ordered(groups, "setting")
    lines = [f"## {suite}", "",
             f"Mean over seeds [95% bootstrap CI, {resamples} resamples]. Return and success rate: "
             f"final evaluation (eval.json). Steps to 90%: first env step at which the trailing "
             f"mean of {window} training episodes reaches 0.9 success (≥: some seeds never did, "
             f"counted at their last step; (k/n): seeds that reached it). SPS: training env steps "
             f"per second.", "",
             "| setting | agent | seeds | budget (steps) | eval episodes | return | success rate "
             "| steps to 90% success | SPS |",
             "|---|---|---|---|---|---|---|---|---|"]
    for setting in settings:
        for agent in ordered(groups[setting], "agent"):
            rs = sorted(groups[setting][agent], key=lambda r: r.seed)
            budget = sorted({int(r.record.get("total_timesteps") or 0) for r in rs})
            episodes = sorted({int(r.record.get("eval_episodes") or 0) for r in rs})
            lines.append("| " + " | ".join([
                setting, agent, str(len(rs)), "/".join(human(b) for b in budget),
                "/".join(str(e) for e in episodes),
                cell([r.record.get("mean_return") for r in rs], lambda v: f"{v:.3f}", resamples, seed),
                cell([r.record.get("success_rate") for r in rs], lambda v: f"{v:.3f}", resamples, seed),
                steps_cell(rs, window, resamples, seed),
                cell([r.record.get("sps") for r in rs], lambda v: f"{v:.0f}", resamples, seed),
            ]) + " |")

    agents = ordered({r.agent for r in runs}, "agent")
    lines += ["", f"### {suite}: SPS (training env steps per second, mean [95% CI])", "",
              "| agent | " + " | ".join(settings) + " |", "|---" * (len(settings) + 1) + "|"]
    for agent in agents:
        row = [cell([r.record.get("sps") for r in groups[s][agent]], lambda v: f"{v:.0f}", resamples, seed)
               if agent in groups[s] else "" for s in settings]
        lines.append(f"| {agent} | " + " | ".join(row) + " |")

    lines += cost_section(suite, runs, out_dir, agents, resamples, seed)
    lines += ["", f"### {suite}: learning curves", ""]
    for setting in settings:
        png = f"{suite}__{setting}.png"
        agents_here = {a: groups[setting][a] for a in ordered(groups[setting], "agent")}
        plot_setting(os.path.join(out_dir, png), f"{suite}: {setting}", agents_here, window, seed)
        if os.path.exists(os.path.join(out_dir, png)):
            lines.append(f"![{suite} {setting}]({png})")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, f"{suite}.md"), "w") as f:
        f.write(text)
    return text


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        print(f"summarize.py: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv=None) -> int:
    p = OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir", nargs="?", default="runs", help="directory of run folders (default: runs)")
    p.add_argument("--out", help="output directory (default: DIR/summary)")
    p.add_argument("--suite", action="append", help="only these suites (repeatable)")
    p.add_argument("--window", type=int, default=100, help="episodes in the smoothing window (default 100)")
    p.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples (default 10000)")
    p.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    args = p.parse_args(argv)
    if args.window < 1 or args.resamples < 1:
        p.error("--window and --resamples must be >= 1")
    runs = load_runs(args.dir)
    if args.suite:
        runs = [r for r in runs if r.suite in args.suite]
    if not runs:
        p.error(f"no */eval.json under {args.dir!r}" + (f" for suite(s) {args.suite}" if args.suite else ""))
    out_dir = args.out or os.path.join(args.dir, "summary")
    os.makedirs(out_dir, exist_ok=True)
    by_suite = defaultdict(list)
    for r in runs:
        by_suite[r.suite].append(r)
    for suite in sorted(by_suite, key=natural_key):
        print(summarize_suite(suite, by_suite[suite], out_dir, args.window, args.resamples, args.bootstrap_seed,
                              table_order(args.dir, suite)))
        print(f"(written to {os.path.join(out_dir, suite + '.md')})\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
