"""Memory benchmark environments and the small run infrastructure shared by the scripts.

This is the only project module the algorithm scripts import. It has two parts:

1. **Environments**, registered with gymnasium on ``import memory_envs`` (so both
   ``gym.make("MemoryTask-v0")`` after the import and ``gym.make("memory_envs:MemoryTask-v0")``
   work):

   - ``MemoryTask-v0`` -- the delayed-recall task of the original Strategic Memory agent.
   - ``PassiveTMaze-v0`` -- the passive T-Maze of Ni et al. 2023, "When Do Transformers
     Shine in RL?".
   - ``CliffWalkingFail-v0``, ``DarkChamber-v0``, ``FourRooms-v0`` -- the sparse-reward grid
     worlds of AdaMemento's first experiments (failures that end episodes, near-identical
     image states, exploration across rooms).

   and ``FlattenObservation``, which turns any ``Box``/``Discrete``/``MultiDiscrete``/
   ``MultiBinary``/``Tuple``/``Dict`` observation into a float32 vector for the MLP agents.

2. **Run infrastructure** that is not part of any algorithm: one-line CLI errors, parsing
   ``--env-kwargs``, resolving env ids (``ALE/...``, ``module:EnvId``), run directories,
   atomic checkpoints, ``eval.json`` and the progress line. Keeping it here means every
   script behaves the same for the user while each script still owns its network, memory
   and PPO loop.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import gymnasium as gym
import numpy as np
from gymnasium import spaces


# ---------------------------------------------------------------------------------------
# Parameter validation
# ---------------------------------------------------------------------------------------
def _check_int(name: str, value: Any, minimum: int) -> int:
    # bool is a subclass of int; `delay=True` is a typo, not a delay of 1.
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_choice(name: str, value: Any, choices: tuple) -> Any:
    if isinstance(value, (bool, np.bool_, float, np.floating)) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _judge_answer(action: Any, target: int, info: dict) -> float:
    """The recall tasks' final reward: +1 if the answer equals the target, -1 otherwise."""
    info["is_success"] = int(action) == target
    return 1.0 if info["is_success"] else -1.0


def _cells_to_rgb(cells: np.ndarray, scale: int = 16) -> np.ndarray:
    """Render a small 2-D array of intensities in [0, 1] as an RGB image (for --capture-video)."""
    img = (np.clip(cells, 0.0, 1.0) * 255).astype(np.uint8)
    img = np.kron(img, np.ones((scale, scale), dtype=np.uint8))
    return np.repeat(img[:, :, None], 3, axis=2)


class _CellRowEnv(gym.Env):
    """Base of the recall tasks whose observation is one row of 3 cells in [0, 1]: renders it."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}
    _obs: np.ndarray

    def render(self):
        if self.render_mode == "rgb_array":
            return _cells_to_rgb(self._obs[None, :])
        return None


# ---------------------------------------------------------------------------------------
# MemoryTask-v0
# ---------------------------------------------------------------------------------------
class MemoryTaskEnv(_CellRowEnv):
    """Delayed recall: remember the bit shown once, report it at the end of the episode.

    Observation ``Box(0, 1, (3,), float32)``: ``[cue bit, distractor, 1]`` at the cue step,
    ``[d1, d2, 0]`` at every other step. ``difficulty=0``: distractors are 0. ``difficulty=1``:
    distractors are random bits, so the cue's first channel looks like any other observation's.

    ``cue_time="start"`` (default): the cue is the observation at reset (step 0) and its third
    channel is 0 like every other's, so only *when* it was seen identifies it. ``cue_time="random"``:
    the cue step is drawn uniformly from the first half of the episode (``0 .. delay//2 - 1``; 0 for
    ``delay < 4``) and marked by a 1 in the third channel, so only *what* it holds identifies it.

    Actions ``Discrete(2)``. An episode is exactly ``delay`` actions. Only the last action is
    rewarded: +1 if it equals the cue bit, -1 otherwise (a random guess scores 0). Every other
    reward is 0. The last step is a termination (not a truncation) and its info holds
    ``is_success``. Every info holds ``cue_step``, the step index of the cue, which agents may use
    for logging only.

    Unlike the original, the task is seeded through ``reset(seed=...)``.
    """

    def __init__(self, delay: int = 8, difficulty: int = 0, cue_time: str = "start",
                 render_mode: str | None = None):
        self.delay = _check_int("delay", delay, 1)
        self.difficulty = _check_choice("difficulty", difficulty, (0, 1))
        self.cue_time = _check_choice("cue_time", cue_time, ("start", "random"))
        self.render_mode = _check_choice("render_mode", render_mode, (None, "rgb_array"))
        self.observation_space = spaces.Box(0.0, 1.0, (3,), np.float32)
        self.action_space = spaces.Discrete(2)
        self._target = 0
        self._t = 0
        self._cue_step = 0
        self._obs = np.zeros(3, np.float32)

    def _distractors(self, n: int) -> np.ndarray:
        if self.difficulty == 0:
            return np.zeros(n, np.float32)
        return self.np_random.integers(0, 2, size=n).astype(np.float32)

    def _observe(self) -> np.ndarray:
        if self._t == self._cue_step:
            self._obs = np.array([self._target, self._distractors(1)[0], float(self.cue_time == "random")],
                                 np.float32)
        else:
            d = self._distractors(2)
            self._obs = np.array([d[0], d[1], 0.0], np.float32)
        return self._obs.copy()

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._target = int(self.np_random.integers(0, 2))
        self._cue_step = int(self.np_random.integers(0, max(1, self.delay // 2))) if self.cue_time == "random" else 0
        self._t = 0
        return self._observe(), {"cue_step": self._cue_step}

    def step(self, action):
        if not self.action_space.contains(action):
            raise ValueError(f"action must be 0 or 1, got {action!r}")
        self._t += 1
        obs = self._observe()
        info: dict[str, Any] = {"cue_step": self._cue_step}
        reward, terminated = 0.0, False
        if self._t >= self.delay:
            reward, terminated = _judge_answer(action, self._target, info), True
        return obs, reward, terminated, False, info


# ---------------------------------------------------------------------------------------
# PassiveTMaze-v0
# ---------------------------------------------------------------------------------------
class PassiveTMazeEnv(gym.Env):
    """Passive T-Maze (Ni et al. 2023, "When Do Transformers Shine in RL?").

    A corridor of cells ``x = 0 .. length`` ends in a T-junction at ``x = length`` whose two
    arms are ``y = +1`` and ``y = -1``. The goal arm ``goal_y`` is drawn at reset. An episode
    lasts exactly ``length + 1`` steps: ``length`` steps to walk the corridor and one to enter
    an arm, so there is no slack.

    Observation ``Box(-1, 1, (2,), float32)``, exactly as in the paper's code:
      - ``[0, goal_y]`` at the start cell ``x = 0`` on the first step only (the cue);
        ``[0, 0]`` if the agent is at ``x = 0`` later (it bumped into the wall),
      - ``[0, 0]`` anywhere inside the corridor ``0 < x < length`` (ambiguous positions),
      - ``[1, y]`` at the junction (``y = 0``) and in the arms (``y = +-1``).
    Actions ``Discrete(4)``: 0 = right (+x), 1 = up (+y), 2 = left (-x), 3 = down (-y); a
    move into a wall leaves the agent in place.

    Reward: on the last step, +1 if the agent stands in the goal arm, else 0. On every other
    step, ``penalty`` (default ``-1/length``) if the agent lags behind the always-forward
    schedule (``x < t`` after ``t`` steps). The optimum return is 1.0 (success 1.0); a
    memoryless agent can do no better than success 0.5. The last step is a termination and
    its info holds ``is_success``; every info holds ``cue_step`` = 0.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 8}
    _MOVES = ((1, 0), (0, 1), (-1, 0), (0, -1))

    def __init__(self, length: int = 10, penalty: float | None = None,
                 render_mode: str | None = None):
        self.length = _check_int("length", length, 1)
        if penalty is None:
            penalty = -1.0 / self.length
        if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not penalty <= 0:
            raise ValueError(f"penalty must be a number <= 0, got {penalty!r}")
        self.penalty = float(penalty)
        self.render_mode = _check_choice("render_mode", render_mode, (None, "rgb_array"))
        self.episode_length = self.length + 1
        self.observation_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.action_space = spaces.Discrete(4)
        self._x = self._y = self._goal_y = self._t = 0

    def _free(self, x: int, y: int) -> bool:
        if y == 0:
            return 0 <= x <= self.length
        return x == self.length and y in (-1, 1)

    def _obs(self) -> np.ndarray:
        if self._x == 0:
            return np.array([0.0, self._goal_y if self._t == 0 else 0.0], np.float32)
        if self._x < self.length:
            return np.zeros(2, np.float32)
        return np.array([1.0, self._y], np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._goal_y = int(self.np_random.choice([-1, 1]))
        self._x, self._y, self._t = 0, 0, 0
        return self._obs(), {"cue_step": 0}

    def step(self, action):
        if not self.action_space.contains(action):
            raise ValueError(f"action must be in 0..3, got {action!r}")
        self._t += 1
        dx, dy = self._MOVES[int(action)]
        if self._free(self._x + dx, self._y + dy):
            self._x, self._y = self._x + dx, self._y + dy
        info: dict[str, Any] = {"cue_step": 0}
        terminated = self._t >= self.episode_length
        if terminated:
            success = self._y == self._goal_y
            reward = 1.0 if success else 0.0
            info["is_success"] = success
        else:
            reward = self.penalty if self._x < self._t else 0.0
        return self._obs(), reward, terminated, False, info

    def render(self):
        if self.render_mode != "rgb_array":
            return None
        grid = np.zeros((3, self.length + 1), np.float32)
        grid[1, :] = 0.3
        grid[[0, 2], self.length] = 0.3
        grid[1 - self._goal_y, self.length] = 0.6
        grid[1 - self._y, self._x] = 1.0
        return _cells_to_rgb(grid, scale=max(2, 64 // max(1, self.length // 8)))


# ---------------------------------------------------------------------------------------
# Observation flattening
# ---------------------------------------------------------------------------------------
_FLAT_LEAVES = (spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)


def _supported(space: spaces.Space, path: str = "observation") -> None:
    """Raise ValueError naming the first sub-space the MLP agents cannot take."""
    if isinstance(space, _FLAT_LEAVES):
        return
    if isinstance(space, spaces.Tuple):
        for i, sub in enumerate(space.spaces):
            _supported(sub, f"{path}[{i}]")
        return
    if isinstance(space, spaces.Dict):
        for key, sub in space.spaces.items():
            _supported(sub, f"{path}[{key!r}]")
        return
    raise ValueError(
        f"unsupported observation space {space} at {path}: supported are Box, Discrete, "
        "MultiDiscrete, MultiBinary and Tuple/Dict of those")


class FlattenObservation(gym.ObservationWrapper):
    """Flatten any supported observation into one float32 vector.

    ``Discrete`` becomes a one-hot vector, ``MultiDiscrete`` a concatenation of one-hots,
    ``MultiBinary`` and ``Box`` are flattened, ``Tuple``/``Dict`` are concatenated in order.
    Unsupported spaces (``Text``, ``Graph``, ``Sequence``, ...) raise ``ValueError`` naming
    the space and where it sits.
    """

    def __init__(self, env: gym.Env):
        super().__init__(env)
        _supported(env.observation_space)
        flat = spaces.flatten_space(env.observation_space)
        self.observation_space = spaces.Box(flat.low.astype(np.float32),
                                            flat.high.astype(np.float32), dtype=np.float32)

    def observation(self, observation):
        flat = spaces.flatten(self.env.observation_space, observation)
        return np.asarray(flat, dtype=np.float32)


# ---------------------------------------------------------------------------------------
# Grid worlds for AdaMemento's first experiments: CliffWalkingFail-v0, DarkChamber-v0, FourRooms-v0
# ---------------------------------------------------------------------------------------
class _GridWorld(gym.Env):
    """Shared mechanics of the three grid worlds (subclasses define layout and observation).

    Actions ``Discrete(4)``: 0 = up (row - 1), 1 = right (col + 1), 2 = down (row + 1),
    3 = left (col - 1), as gymnasium's CliffWalking. A move into a wall or off the grid leaves
    the agent in place. The time limit is a *truncation* (``truncated=True``), so learners
    bootstrap the cut-off return. The last step's info holds ``is_success`` (True only when
    the goal was reached).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 8}
    _MOVES = ((-1, 0), (0, 1), (1, 0), (0, -1))

    def _setup(self, walls: np.ndarray, start: tuple[int, int], goal: tuple[int, int],
               max_steps: Any, render_mode: Any) -> None:
        self.max_steps = _check_int("max_steps", max_steps, 1)
        self.render_mode = _check_choice("render_mode", render_mode, (None, "rgb_array"))
        self.walls, self.start, self.goal = walls, start, goal
        self.action_space = spaces.Discrete(4)
        self._pos, self._t = start, 0

    def _obs(self) -> np.ndarray:
        raise NotImplementedError

    def _hazard(self, pos: tuple[int, int]) -> bool:
        return False

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._pos, self._t = self._start_cell(), 0
        return self._obs(), {}

    def _start_cell(self) -> tuple[int, int]:
        return self.start

    def step(self, action):
        if not self.action_space.contains(action):
            raise ValueError(f"action must be in 0..3, got {action!r}")
        self._t += 1
        dr, dc = self._MOVES[int(action)]
        r, c = self._pos[0] + dr, self._pos[1] + dc
        if 0 <= r < self.walls.shape[0] and 0 <= c < self.walls.shape[1] and not self.walls[r, c]:
            self._pos = (r, c)
        info: dict[str, Any] = {}
        reward, terminated = 0.0, False
        if self._pos == self.goal:
            reward, terminated = 1.0, True
        elif self._hazard(self._pos):
            reward, terminated = -1.0, True
        truncated = not terminated and self._t >= self.max_steps
        if terminated or truncated:
            info["is_success"] = self._pos == self.goal
        return self._obs(), reward, terminated, truncated, info

    def _picture(self) -> np.ndarray:
        grid = np.where(self.walls, 0.0, 0.3)
        grid[self.goal] = 0.6
        grid[self._pos] = 1.0
        return grid

    def render(self):
        if self.render_mode == "rgb_array":
            return _cells_to_rgb(self._picture())
        return None


class CliffWalkingFailEnv(_GridWorld):
    """Cliff Walking where falling off is a failure that ends the episode.

    Gymnasium's ``CliffWalking-v1`` sends the agent back to the start when it steps on the
    cliff; here the episode *terminates* with reward -1 and ``is_success=False``, so failed
    trajectories exist to learn from (AdaMemento's memory reflection).

    Grid ``rows x cols`` (default 4 x 12). Start at the bottom-left cell ``(rows-1, 0)``, goal
    at the bottom-right cell ``(rows-1, cols-1)``, the cliff is every cell in between on the
    bottom row.

    Observation ``Box(0, 1, (rows*cols,), float32)``: one-hot of the agent's cell, index
    ``row * cols + col``. Actions ``Discrete(4)`` (0 up, 1 right, 2 down, 3 left; moves off
    the grid leave the agent in place).

    Reward: +1 and termination on reaching the goal (``is_success=True``); -1 and
    termination on stepping onto the cliff (``is_success=False``); 0 otherwise. After
    ``max_steps`` (default 100) actions the episode is truncated (``is_success=False``).
    """

    def __init__(self, rows: int = 4, cols: int = 12, max_steps: int = 100,
                 render_mode: str | None = None):
        self.rows = _check_int("rows", rows, 2)
        self.cols = _check_int("cols", cols, 3)
        self._setup(np.zeros((self.rows, self.cols), bool), (self.rows - 1, 0),
                    (self.rows - 1, self.cols - 1), max_steps, render_mode)
        self.observation_space = spaces.Box(0.0, 1.0, (self.rows * self.cols,), np.float32)

    def _hazard(self, pos: tuple[int, int]) -> bool:
        return pos[0] == self.rows - 1 and 0 < pos[1] < self.cols - 1

    def _obs(self) -> np.ndarray:
        obs = np.zeros(self.rows * self.cols, np.float32)
        obs[self._pos[0] * self.cols + self._pos[1]] = 1.0
        return obs

    def _picture(self) -> np.ndarray:
        grid = super()._picture()
        grid[self.rows - 1, 1:self.cols - 1] = 0.0
        return grid


class DarkChamberEnv(_GridWorld):
    """A dark ``size x size`` room seen as an image in which the cells barely differ.

    The goal is the centre cell ``(size//2, size//2)``, which looks like every other cell. The
    agent starts on a uniformly drawn cell of the room's outer ring (drawn with the env's
    seeded RNG), so the way to the goal depends on where the agent is: a policy that cannot
    tell the faint observations apart cannot reach it reliably. (A goal in a corner could be
    reached by a blind policy that just mixes "right" and "down": the walls funnel it there.)

    Observation ``Box(0, 255, (size*cell_pixels, size*cell_pixels, 1), uint8)``: every pixel
    is ``background`` (default 24) except the ``cell_pixels x cell_pixels`` block of the
    agent's cell, which is ``background + contrast`` (default 24 + 6 = 30, i.e. 2.4% of the
    intensity range). Observations therefore differ only by a faint intensity change at one
    cell -- the setting for AdaMemento's fine-grained (latent) state distinction.

    Actions ``Discrete(4)`` (0 up, 1 right, 2 down, 3 left; moves into the outer wall leave
    the agent in place). Reward +1 and termination on reaching the goal
    (``is_success=True``), 0 otherwise; after ``max_steps`` (default ``2 * size``, at least
    ``size`` more than the longest shortest path) actions the episode is truncated
    (``is_success=False``). A uniformly random policy succeeds in about 9% of episodes at the
    default size 8.
    """

    def __init__(self, size: int = 8, cell_pixels: int = 2, background: int = 24, contrast: int = 6,
                 max_steps: int | None = None, render_mode: str | None = None):
        self.size = _check_int("size", size, 3)
        self.cell_pixels = _check_int("cell_pixels", cell_pixels, 1)
        self.background = _check_int("background", background, 0)
        self.contrast = _check_int("contrast", contrast, 1)
        if self.background + self.contrast > 255:
            raise ValueError(f"background + contrast must be <= 255, got {self.background + self.contrast!r}")
        self._setup(np.zeros((self.size, self.size), bool), (0, 0), (self.size // 2, self.size // 2),
                    2 * self.size if max_steps is None else max_steps, render_mode)
        side = self.size * self.cell_pixels
        self.observation_space = spaces.Box(0, 255, (side, side, 1), np.uint8)
        n = self.size - 1
        self._ring = [(r, c) for r in range(self.size) for c in range(self.size) if r in (0, n) or c in (0, n)]

    def _start_cell(self) -> tuple[int, int]:
        return self._ring[int(self.np_random.integers(len(self._ring)))]

    def _obs(self) -> np.ndarray:
        p = self.cell_pixels
        img = np.full(self.observation_space.shape, self.background, np.uint8)
        r, c = self._pos
        img[r * p:(r + 1) * p, c * p:(c + 1) * p] = self.background + self.contrast
        return img


class FourRoomsEnv(_GridWorld):
    """Sutton, Precup & Singh's (1999) four-rooms grid world with a sparse goal.

    The classic 13 x 13 layout (outer walls included; 104 free cells in four rooms joined by
    four one-cell doorways). The agent starts in the top-left corner cell ``(1, 1)``; the goal
    is the far bottom-right corner cell ``(11, 11)`` (shortest path: 20 steps).

    Observation ``Box(0, 1, (169,), float32)``: one-hot of the agent's cell, index
    ``row * 13 + col``. Actions ``Discrete(4)`` (0 up, 1 right, 2 down, 3 left;
    deterministic, moves into walls leave the agent in place).

    Reward +1 and termination on reaching the goal (``is_success=True``), 0 otherwise; after
    ``max_steps`` (default 100) actions the episode is truncated (``is_success=False``).
    """

    LAYOUT = ("wwwwwwwwwwwww",
              "w     w     w",
              "w     w     w",
              "w           w",
              "w     w     w",
              "w     w     w",
              "ww wwww     w",
              "w     www www",
              "w     w     w",
              "w     w     w",
              "w           w",
              "w     w     w",
              "wwwwwwwwwwwww")

    def __init__(self, max_steps: int = 100, render_mode: str | None = None):
        walls = np.array([[ch == "w" for ch in row] for row in self.LAYOUT])
        self._setup(walls, (1, 1), (11, 11), max_steps, render_mode)
        self.observation_space = spaces.Box(0.0, 1.0, (walls.size,), np.float32)

    def _obs(self) -> np.ndarray:
        obs = np.zeros(self.walls.size, np.float32)
        obs[self._pos[0] * self.walls.shape[1] + self._pos[1]] = 1.0
        return obs


# ---------------------------------------------------------------------------------------
# RecallAcrossEpisodes-v0
# ---------------------------------------------------------------------------------------
class RecallAcrossEpisodesEnv(_CellRowEnv):
    """Recall across episode resets: a target bit fixed for a block of episodes, shown only once.

    Episodes come in blocks of ``block`` consecutive episodes that share one random target bit. The
    bit is shown only at the first step of the block's first episode; every episode of the block is
    rewarded for reporting it. Only an agent whose memory survives ``reset()`` can answer in the
    later episodes of a block.

    Observation ``Box(0, 1, (3,), float32)``: ``[target, 1, 0]`` at the first step of the block's
    first episode, ``[0, 0, 0]`` everywhere else. Actions ``Discrete(2)``; an episode is exactly
    ``length`` actions and only the last is rewarded, +1 if it equals the target bit, -1 otherwise.
    The last step is a termination and its info holds ``is_success``; every info holds
    ``block_episode`` (index of the episode within its block) and, in the block's first episode
    only, ``cue_step`` = 0 (for logging only).

    An agent without cross-episode memory can answer only the first episode of each block, so its
    best success rate is ``(1 + (block - 1) / 2) / block`` (0.625 for ``block=4``), i.e. chance on
    the episodes that do not show the cue. ``reset(seed=...)`` reseeds and starts a new block;
    ``reset()`` without a seed moves on to the next episode.
    """

    def __init__(self, block: int = 4, length: int = 4, render_mode: str | None = None):
        self.block = _check_int("block", block, 1)
        self.length = _check_int("length", length, 1)
        self.render_mode = _check_choice("render_mode", render_mode, (None, "rgb_array"))
        self.observation_space = spaces.Box(0.0, 1.0, (3,), np.float32)
        self.action_space = spaces.Discrete(2)
        self._target = 0
        self._episode = -1  # index of the current episode since the last seeded reset
        self._t = 0
        self._obs = np.zeros(3, np.float32)

    def _info(self) -> dict[str, Any]:
        k = self._episode % self.block
        return {"block_episode": k, "cue_step": 0} if k == 0 else {"block_episode": k}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._episode = 0 if seed is not None else self._episode + 1
        if self._episode % self.block == 0:
            self._target = int(self.np_random.integers(0, 2))
            self._obs = np.array([self._target, 1.0, 0.0], np.float32)
        else:
            self._obs = np.zeros(3, np.float32)
        self._t = 0
        return self._obs.copy(), self._info()

    def step(self, action):
        if not self.action_space.contains(action):
            raise ValueError(f"action must be 0 or 1, got {action!r}")
        self._t += 1
        self._obs = np.zeros(3, np.float32)
        info = self._info()
        reward, terminated = 0.0, False
        if self._t >= self.length:
            reward, terminated = _judge_answer(action, self._target, info), True
        return self._obs.copy(), reward, terminated, False, info


# ---------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------
def _register(env_id: str, entry_point: str, **kwargs) -> None:
    if env_id not in gym.registry:
        gym.register(id=env_id, entry_point=entry_point, **kwargs)


_register("MemoryTask-v0", "memory_envs:MemoryTaskEnv", kwargs={"delay": 8, "difficulty": 0})
_register("PassiveTMaze-v0", "memory_envs:PassiveTMazeEnv", kwargs={"length": 10})
_register("CliffWalkingFail-v0", "memory_envs:CliffWalkingFailEnv")
_register("DarkChamber-v0", "memory_envs:DarkChamberEnv")
_register("FourRooms-v0", "memory_envs:FourRoomsEnv")
_register("RecallAcrossEpisodes-v0", "memory_envs:RecallAcrossEpisodesEnv", kwargs={"block": 4, "length": 4})


# =======================================================================================
# Run infrastructure shared by the scripts (no algorithm in here)
# =======================================================================================
class UserError(Exception):
    """A mistake in the user's input: reported as one line, exit code 2, no traceback."""

    exit_code = 2


class TrainingDiverged(UserError):
    """A non-finite loss: the run stops (exit code 3) and keeps its last good checkpoint."""

    exit_code = 3


def parse_cli(args_cls: type, argv: list[str] | None = None):
    """``tyro.cli`` with tyro's multi-line error box condensed to one line on stderr."""
    import tyro

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        return tyro.cli(args_cls, args=argv)
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


def run_cli(main: Callable[[Any], Any], args_cls: type) -> None:
    """Entry point of every script: parse the flags, run, turn user errors into one line."""
    args = parse_cli(args_cls)
    try:
        main(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None


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


class MontezumaRooms(gym.Wrapper):
    """Montezuma's Revenge: ``info["rooms_mask"]``, a bitmask of the rooms entered so far in the
    episode (the room number is RAM byte 3, as in the RND and Go-Explore papers' room counts).
    For logging only; no agent input is changed."""

    def _room_bit(self) -> int:
        return 1 << int(self.unwrapped.ale.getRAM()[3])

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.mask = self._room_bit()
        return obs, dict(info, rooms_mask=self.mask)

    def step(self, action):
        obs, reward, term, trunc, info = self.env.step(action)
        self.mask |= self._room_bit()
        return obs, reward, term, trunc, dict(info, rooms_mask=self.mask)


def make_base_env(env_id: str, env_kwargs: dict[str, Any], render_mode: str | None = None,
                  **extra: Any) -> gym.Env:
    """``gym.make`` with user errors (unknown id, missing module, bad kwargs) as UserError.
    Montezuma's Revenge also reports the rooms it entered (``MontezumaRooms``)."""
    if is_atari(env_id):
        import ale_py

        gym.register_envs(ale_py)
    kwargs = dict(env_kwargs, **extra)
    if render_mode is not None:
        kwargs["render_mode"] = render_mode
    try:
        env = gym.make(env_id, **kwargs)
        return MontezumaRooms(env) if "MontezumaRevenge" in env_id else env
    except ModuleNotFoundError as exc:
        raise UserError(f"--env-id {env_id!r}: cannot import module {exc.name or env_id.partition(':')[0]!r}") from None
    except gym.error.Error as exc:
        raise UserError(f"--env-id {env_id!r}: {exc}") from None
    except (ValueError, TypeError) as exc:
        raise UserError(f"--env-id {env_id!r} with --env-kwargs {env_kwargs}: {exc}") from None


def check_spaces(env: gym.Env, action_types: tuple[type, ...]) -> None:
    """Fail early, with one line, on spaces a script cannot handle."""
    if not isinstance(env.action_space, action_types):
        names = ", ".join(t.__name__ for t in action_types)
        raise UserError(f"unsupported action space {env.action_space}: this script supports {names}")
    if isinstance(env.observation_space, spaces.Box):
        return
    try:
        _supported(env.observation_space)
    except ValueError as exc:
        raise UserError(str(exc)) from None


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


def write_eval_json(run_dir: str, record: dict[str, Any]) -> str:
    # Atomic, like checkpoints: benchmark.sh treats an existing eval.json as a finished run.
    path = os.path.join(run_dir, "eval.json")
    with open(f"{path}.tmp", "w") as f:
        json.dump(record, f, indent=2, default=float)
    os.replace(f"{path}.tmp", path)
    return path


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
    run_name: Optional[str] = None
    """name of the run directory under runs/ (default: {env}__{exp_name}__{seed}__{time})"""
    eval_episodes: int = 100
    """episodes of greedy evaluation on fresh seeded envs after training (0 to skip)"""
    checkpoint_interval: float = 60.0
    """seconds between checkpoints (runs/<run-name>/checkpoint.pt); 0 = after every update"""


class Run:
    """What every script does around its algorithm: ``--resume`` (its saved arguments are used), the run
    directory, wandb, seeding, the TensorBoard writer, checkpoints that carry every RNG state, the one-line
    stop on a non-finite loss, and eval.json. ``state`` is the checkpoint being resumed (or None)."""

    def __init__(self, args: Any, args_cls: type):
        import torch

        self.state, self.dir = None, None
        if args.resume:
            path, self.dir = resolve_resume(args.resume)
            self.state = torch.load(path, map_location="cpu", weights_only=False)
            args = args_cls(**dict(self.state["args"], resume=args.resume))
        self.args = args

    def start(self) -> Any:
        """Create the run directory (new runs), start wandb and TensorBoard, seed everything; returns the device."""
        import random

        import torch
        from torch.utils.tensorboard import SummaryWriter

        args = self.args
        if self.state is None:
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
        self.start_iteration, self.global_step, self.elapsed_before = 1, 0, 0.0
        if self.state is not None:
            self.start_iteration = self.state["iteration"] + 1
            self.global_step, self.elapsed_before = self.state["global_step"], self.state["wall_time_s"]
        # A resumed run hides the killed run's events *after* the checkpoint.
        self.writer = SummaryWriter(self.dir, purge_step=self.global_step + 1 if self.state else None)
        self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" +
                             "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
        self.start_time = time.time()
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

    def wall_time(self) -> float:
        return self.elapsed_before + time.time() - self.start_time

    def save(self, iteration: int, global_step: int, **parts: Any) -> None:
        """An atomic checkpoint of ``parts`` with the run's arguments, position and every RNG state."""
        import random
        from dataclasses import asdict

        import torch

        save_atomic(dict(parts, iteration=iteration, global_step=global_step, wall_time_s=self.wall_time(),
                         args=asdict(self.args), rng=dict(python=random.getstate(), numpy=np.random.get_state(),
                                                          torch=torch.get_rng_state())), self.ckpt_path)
        self.writer.flush()  # the TB log of a killed run then reaches at least its checkpoint

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
        path = write_eval_json(self.dir, dict(
            algo=args.exp_name, env_id=args.env_id, env_kwargs=parse_env_kwargs(args.env_kwargs), seed=args.seed,
            total_timesteps=args.total_timesteps, eval_episodes=args.eval_episodes, **record, run_name=args.run_name,
            args=asdict(args)))
        fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
        print(f"eval: return {fmt(record.get('mean_return'))} | success {fmt(record.get('success_rate'))} -> {path}",
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

    def maybe_print(self, step: int, sps: float, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        ret = f"{np.mean(self.returns):.3f}" if self.returns else "n/a"
        succ = f" | success {np.mean(self.successes):.2f}" if self.successes else ""
        eta = (self.total - step) / max(sps, 1e-9)
        print(f"step {step}/{self.total} | SPS {sps:.0f} | return {ret}{succ} | "
              f"ETA {int(eta // 60)}m{int(eta % 60):02d}s", flush=True)
