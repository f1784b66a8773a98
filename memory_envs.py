"""The environments of this project, registered with gymnasium on ``import memory_envs`` (both
``gym.make("MemoryTask-v0")`` after the import and ``gym.make("memory_envs:MemoryTask-v0")`` work).

Memory tasks:
  - ``MemoryTask-v0``: the delayed recall of the original Strategic Memory agent; the cue at the start
    or, with ``cue_time="random"``, at a random (marked) step of the episode's first half.
  - ``PassiveTMaze-v0``: the passive T-Maze of Ni et al. 2023, "When Do Transformers Shine in RL?".
  - ``RecallAcrossEpisodes-v0``: a bit shown once per block of episodes (memory across ``reset()``).
  - ``MultiCueTask-v0``: several bits shown at random steps of the first half, each asked for at the end.

Exploration grid worlds (AdaMemento's first experiments): ``CliffWalkingFail-v0``, ``DarkChamber-v0``, ``FourRooms-v0``.

Batched versions (numpy vector envs whose results equal a SyncVectorEnv of the single envs) of the three
memory tasks: ``gym.make_vec(id, num_envs)``; ``RecordFinalEpisodeStatistics`` adds their episode statistics.

Wrappers: ``FlattenObservation`` turns Box/Discrete/MultiDiscrete/MultiBinary/Tuple/Dict observations into a float32
vector for the MLP agents; ``MontezumaRooms`` reports the rooms entered in Montezuma's Revenge. The run infrastructure
the scripts share is in ``run_contract.py``.
"""

from __future__ import annotations

import time
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.utils import seeding
from gymnasium.vector.utils import batch_space


# ---------------------------------------------------------------------------------------
# Parameter validation and shared helpers
# ---------------------------------------------------------------------------------------
def _check_int(name: str, value: Any, minimum: int) -> int:
    # bool is a subclass of int; `delay=True` is a typo, not a delay of 1.
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_choice(name: str, value: Any, choices: tuple) -> Any:
    if isinstance(value, (bool, np.bool_, float, np.floating)) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _cells_to_rgb(cells: np.ndarray, scale: int = 16) -> np.ndarray:
    """Render a small 2-D array of intensities in [0, 1] as an RGB image (for --capture-video)."""
    img = (np.clip(cells, 0.0, 1.0) * 255).astype(np.uint8)
    img = np.kron(img, np.ones((scale, scale), dtype=np.uint8))
    return np.repeat(img[:, :, None], 3, axis=2)


class _CellRowEnv(gym.Env):
    """Base of the recall tasks: the observation is one row of 3 cells in [0, 1] (rendered as such), an episode is
    ``episode_length`` actions and only the last is rewarded, +1 if it equals ``_target``, -1 otherwise.
    Subclasses define ``_observe`` (the observation after a step) and ``_info``."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def _setup(self, episode_length: int, render_mode: Any) -> None:
        self.episode_length = episode_length
        self.render_mode = _check_choice("render_mode", render_mode, (None, "rgb_array"))
        self.observation_space = spaces.Box(0.0, 1.0, (3,), np.float32)
        self.action_space = spaces.Discrete(2)
        self._target = self._t = 0
        self._obs = np.zeros(3, np.float32)

    def step(self, action):
        if not self.action_space.contains(action):
            raise ValueError(f"action must be 0 or 1, got {action!r}")
        self._t += 1
        obs, info = self._observe(), self._info()
        terminated, reward = self._t >= self.episode_length, 0.0
        if terminated:
            info["is_success"] = int(action) == self._target
            reward = 1.0 if info["is_success"] else -1.0
        return obs, reward, terminated, False, info

    def render(self):
        return _cells_to_rgb(self._obs[None, :]) if self.render_mode == "rgb_array" else None


# ---------------------------------------------------------------------------------------
# MemoryTask-v0
# ---------------------------------------------------------------------------------------
class MemoryTaskEnv(_CellRowEnv):
    """Delayed recall: remember the bit shown once, report it at the end of the episode.

    Observation ``Box(0, 1, (3,), float32)``: ``[cue bit, distractor, 1]`` at the cue step, ``[d1, d2, 0]`` at every
    other step. ``difficulty=0``: distractors are 0. ``difficulty=1``: distractors are random bits, so the cue's first
    channel looks like any other observation's.

    ``cue_time="start"`` (default): the cue is the observation at reset (step 0) and its third channel is 0 like every
    other's, so only *when* it was seen identifies it. ``cue_time="random"``: the cue step is drawn uniformly from the
    first half of the episode (``0 .. delay//2 - 1``; 0 for ``delay < 4``) and marked by a 1 in the third channel, so
    only *what* it holds identifies it.

    Actions ``Discrete(2)``. An episode is exactly ``delay`` actions. Only the last action is rewarded: +1 if it equals
    the cue bit, -1 otherwise (a random guess scores 0). Every other reward is 0. The last step is a termination (not a
    truncation) and its info holds ``is_success``. Every info holds ``cue_step``, the step index of the cue, which
    agents may use for logging only.

    Unlike the original, the task is seeded through ``reset(seed=...)``.
    """

    def __init__(self, delay: int = 8, difficulty: int = 0, cue_time: str = "start", render_mode: str | None = None):
        self.delay = _check_int("delay", delay, 1)
        self.difficulty = _check_choice("difficulty", difficulty, (0, 1))
        self.cue_time = _check_choice("cue_time", cue_time, ("start", "random"))
        self._setup(self.delay, render_mode)  # episode_length: a transformer's full context
        self._cue_step = 0

    def _distractors(self, n: int) -> np.ndarray:
        if self.difficulty == 0:
            return np.zeros(n, np.float32)
        return self.np_random.integers(0, 2, size=n).astype(np.float32)

    def _observe(self) -> np.ndarray:
        if self._t == self._cue_step:
            self._obs = np.array([self._target, self._distractors(1)[0], float(self.cue_time == "random")], np.float32)
        else:
            d = self._distractors(2)
            self._obs = np.array([d[0], d[1], 0.0], np.float32)
        return self._obs.copy()

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._target = int(self.np_random.integers(0, 2))
        self._cue_step = int(self.np_random.integers(0, max(1, self.delay // 2))) if self.cue_time == "random" else 0
        self._t = 0
        return self._observe(), self._info()

    def _info(self) -> dict[str, Any]:
        return {"cue_step": self._cue_step}


# ---------------------------------------------------------------------------------------
# PassiveTMaze-v0
# ---------------------------------------------------------------------------------------
class PassiveTMazeEnv(gym.Env):
    """Passive T-Maze (Ni et al. 2023, "When Do Transformers Shine in RL?").

    A corridor of cells ``x = 0 .. length`` ends in a T-junction at ``x = length`` whose two arms are ``y = +1`` and
    ``y = -1``. The goal arm ``goal_y`` is drawn at reset. An episode lasts exactly ``length + 1`` steps: ``length``
    steps to walk the corridor and one to enter an arm, so there is no slack.

    Observation ``Box(-1, 1, (2,), float32)``, exactly as in the paper's code:
      - ``[0, goal_y]`` at the start cell ``x = 0`` on the first step only (the cue);
        ``[0, 0]`` if the agent is at ``x = 0`` later (it bumped into the wall),
      - ``[0, 0]`` anywhere inside the corridor ``0 < x < length`` (ambiguous positions),
      - ``[1, y]`` at the junction (``y = 0``) and in the arms (``y = +-1``).
    Actions ``Discrete(4)``: 0 = right (+x), 1 = up (+y), 2 = left (-x), 3 = down (-y); a
    move into a wall leaves the agent in place.

    Reward: on the last step, +1 if the agent stands in the goal arm, else 0. On every other step, ``penalty`` (default
    ``-1/length``) if the agent lags behind the always-forward schedule (``x < t`` after ``t`` steps). The optimum
    return is 1.0 (success 1.0); a memoryless agent can do no better than success 0.5. The last step is a termination
    and its info holds ``is_success``; every info holds ``cue_step`` = 0.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 8}
    _MOVES = ((1, 0), (0, 1), (-1, 0), (0, -1))

    def __init__(self, length: int = 10, penalty: float | None = None, render_mode: str | None = None):
        self.length = _check_int("length", length, 1)
        penalty = -1.0 / self.length if penalty is None else penalty
        if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not penalty <= 0:
            raise ValueError(f"penalty must be a number <= 0, got {penalty!r}")
        self.penalty = float(penalty)
        self.render_mode = _check_choice("render_mode", render_mode, (None, "rgb_array"))
        self.episode_length = self.length + 1
        self.observation_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.action_space = spaces.Discrete(4)
        self._x = self._y = self._goal_y = self._t = 0

    def _free(self, x: int, y: int) -> bool:
        return 0 <= x <= self.length if y == 0 else x == self.length and y in (-1, 1)

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
            info["is_success"] = self._y == self._goal_y
            reward = 1.0 if info["is_success"] else 0.0
        else:
            reward = self.penalty if self._x < self._t else 0.0
        return self._obs(), reward, terminated, False, info

    def render(self):
        return _tmaze_picture(self.length, self._goal_y, self._x, self._y) if self.render_mode == "rgb_array" else None


def _tmaze_picture(length: int, goal_y: int, x: int, y: int) -> np.ndarray:
    grid = np.zeros((3, length + 1), np.float32)
    grid[1, :] = 0.3
    grid[[0, 2], length] = 0.3
    grid[1 - goal_y, length] = 0.6
    grid[1 - y, x] = 1.0
    return _cells_to_rgb(grid, scale=max(2, 64 // max(1, length // 8)))


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
    raise ValueError(f"unsupported observation space {space} at {path}: supported are Box, Discrete, "
                     "MultiDiscrete, MultiBinary and Tuple/Dict of those")


def _is_text(space: spaces.Space) -> bool:
    """A text observation (``Text``, or a space of strings such as MiniGrid's mission)."""
    return isinstance(space, spaces.Text) or (not isinstance(space, _FLAT_LEAVES + (spaces.Tuple, spaces.Dict))
                                               and isinstance(space.sample(), str))


_NOTICED: set = set()  # the dropped text observations already reported


class FlattenObservation(gym.ObservationWrapper):
    """Flatten any supported observation into one float32 vector.

    ``Discrete`` becomes a one-hot vector, ``MultiDiscrete`` a concatenation of one-hots, ``MultiBinary`` and ``Box``
    are flattened, ``Tuple``/``Dict`` are concatenated in order. The text entries of a ``Dict`` (e.g. MiniGrid's
    ``mission``) are dropped, with a one-line notice: the agents take numbers. Other unsupported spaces (``Text`` alone,
    ``Graph``, ``Sequence``, ...) raise ``ValueError`` naming the space and where it sits.
    """

    def __init__(self, env: gym.Env):
        super().__init__(env)
        space, self.dropped = env.observation_space, []
        if isinstance(space, spaces.Dict):
            self.dropped = [k for k, sub in space.spaces.items() if _is_text(sub)]
            space = spaces.Dict({k: sub for k, sub in space.spaces.items() if k not in self.dropped})
            if self.dropped and tuple(self.dropped) not in _NOTICED:  # once per process, not once per env
                _NOTICED.add(tuple(self.dropped))
                print(f"note: the text observation {', '.join(map(repr, self.dropped))} is dropped "
                      "(the agents take numbers only)", flush=True)
        _supported(space)
        self.kept = space
        flat = spaces.flatten_space(space)
        self.observation_space = spaces.Box(flat.low.astype(np.float32), flat.high.astype(np.float32), dtype=np.float32)

    def observation(self, observation):
        if self.dropped:
            observation = {k: v for k, v in observation.items() if k not in self.dropped}
        return np.asarray(spaces.flatten(self.kept, observation), dtype=np.float32)


# ---------------------------------------------------------------------------------------
# Grid worlds for AdaMemento's first experiments: CliffWalkingFail-v0, DarkChamber-v0, FourRooms-v0
# ---------------------------------------------------------------------------------------
class _GridWorld(gym.Env):
    """Shared mechanics of the three grid worlds (subclasses define the layout; the observation is a one-hot of the
    agent's cell unless a subclass overrides ``_obs``).

    Actions ``Discrete(4)``: 0 = up (row - 1), 1 = right (col + 1), 2 = down (row + 1), 3 = left (col - 1), as
    gymnasium's CliffWalking. A move into a wall or off the grid leaves the agent in place. The time limit is a
    *truncation* (``truncated=True``), so learners bootstrap the cut-off return. The last step's info holds
    ``is_success`` (True only when the goal was reached).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 8}
    _MOVES = ((-1, 0), (0, 1), (1, 0), (0, -1))

    def _setup(self, walls: np.ndarray, start: tuple[int, int], goal: tuple[int, int],
               max_steps: Any, render_mode: Any) -> None:
        self.max_steps = _check_int("max_steps", max_steps, 1)
        self.render_mode = _check_choice("render_mode", render_mode, (None, "rgb_array"))
        self.walls, self.start, self.goal = walls, start, goal
        self.observation_space = spaces.Box(0.0, 1.0, (walls.size,), np.float32)  # DarkChamber's is an image
        self.action_space = spaces.Discrete(4)
        self._pos, self._t = start, 0

    def _obs(self) -> np.ndarray:
        """One-hot of the agent's cell, index ``row * cols + col``."""
        obs = np.zeros(self.walls.size, np.float32)
        obs[self._pos[0] * self.walls.shape[1] + self._pos[1]] = 1.0
        return obs

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
        success = self._pos == self.goal
        reward = 1.0 if success else -1.0 if self._hazard(self._pos) else 0.0
        terminated = reward != 0.0
        truncated = not terminated and self._t >= self.max_steps
        info = {"is_success": success} if terminated or truncated else {}
        return self._obs(), reward, terminated, truncated, info

    def _picture(self) -> np.ndarray:
        grid = np.where(self.walls, 0.0, 0.3)
        grid[self.goal] = 0.6
        grid[self._pos] = 1.0
        return grid

    def render(self):
        return _cells_to_rgb(self._picture()) if self.render_mode == "rgb_array" else None


class CliffWalkingFailEnv(_GridWorld):
    """Cliff Walking where falling off is a failure that ends the episode.

    Gymnasium's ``CliffWalking-v1`` sends the agent back to the start when it steps on the cliff; here the episode
    *terminates* with reward -1 and ``is_success=False``, so failed trajectories exist to learn from (AdaMemento's
    memory reflection).

    Grid ``rows x cols`` (default 4 x 12). Start at the bottom-left cell ``(rows-1, 0)``, goal at the bottom-right cell
    ``(rows-1, cols-1)``, the cliff is every cell in between on the bottom row.

    Observation ``Box(0, 1, (rows*cols,), float32)``: one-hot of the agent's cell, index ``row * cols + col``. Actions
    ``Discrete(4)`` (0 up, 1 right, 2 down, 3 left; moves off the grid leave the agent in place).

    Reward: +1 and termination on reaching the goal (``is_success=True``); -1 and termination on stepping onto the cliff
    (``is_success=False``); 0 otherwise. After ``max_steps`` (default 100) actions the episode is truncated
    (``is_success=False``).
    """

    def __init__(self, rows: int = 4, cols: int = 12, max_steps: int = 100, render_mode: str | None = None):
        self.rows = _check_int("rows", rows, 2)
        self.cols = _check_int("cols", cols, 3)
        self._setup(np.zeros((self.rows, self.cols), bool), (self.rows - 1, 0), (self.rows - 1, self.cols - 1),
                    max_steps, render_mode)

    def _hazard(self, pos: tuple[int, int]) -> bool:
        return pos[0] == self.rows - 1 and 0 < pos[1] < self.cols - 1

    def _picture(self) -> np.ndarray:
        grid = super()._picture()
        grid[self.rows - 1, 1:self.cols - 1] = 0.0
        return grid


class DarkChamberEnv(_GridWorld):
    """A dark ``size x size`` room seen as an image in which the cells barely differ.

    The goal is the centre cell ``(size//2, size//2)``, which looks like every other cell. The agent starts on a
    uniformly drawn cell of the room's outer ring (drawn with the env's seeded RNG), so the way to the goal depends on
    where the agent is: a policy that cannot tell the faint observations apart cannot reach it reliably. (A goal in a
    corner could be reached by a blind policy that just mixes "right" and "down": the walls funnel it there.)

    Observation ``Box(0, 255, (size*cell_pixels, size*cell_pixels, 1), uint8)``: every pixel is ``background`` (default
    24) except the ``cell_pixels x cell_pixels`` block of the agent's cell, which is ``background + contrast`` (default
    24 + 6 = 30, i.e. 2.4% of the intensity range). Observations therefore differ only by a faint intensity change at
    one cell -- the setting for AdaMemento's fine-grained (latent) state distinction.

    Actions ``Discrete(4)`` (0 up, 1 right, 2 down, 3 left; moves into the outer wall leave the agent in place). Reward
    +1 and termination on reaching the goal (``is_success=True``), 0 otherwise; after ``max_steps`` (default
    ``2 * size``, at least ``size`` more than the longest shortest path) actions the episode is truncated
    (``is_success=False``). A uniformly random policy succeeds in about 9% of episodes at the default size 8.
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

    The classic 13 x 13 layout (outer walls included; 104 free cells in four rooms joined by four one-cell doorways).
    The agent starts in the top-left corner cell ``(1, 1)``; the goal is the far bottom-right corner cell ``(11, 11)``
    (shortest path: 20 steps).

    Observation ``Box(0, 1, (169,), float32)``: one-hot of the agent's cell, index ``row * 13 + col``. Actions
    ``Discrete(4)`` (0 up, 1 right, 2 down, 3 left; deterministic, moves into walls leave the agent in place).

    Reward +1 and termination on reaching the goal (``is_success=True``), 0 otherwise; after ``max_steps`` (default 100)
    actions the episode is truncated (``is_success=False``).
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


# ---------------------------------------------------------------------------------------
# RecallAcrossEpisodes-v0
# ---------------------------------------------------------------------------------------
class RecallAcrossEpisodesEnv(_CellRowEnv):
    """Recall across episode resets: a target bit fixed for a block of episodes, shown only once.

    Episodes come in blocks of ``block`` consecutive episodes that share one random target bit. The bit is shown only at
    the first step of the block's first episode; every episode of the block is rewarded for reporting it. Only an agent
    whose memory survives ``reset()`` can answer in the later episodes of a block.

    Observation ``Box(0, 1, (3,), float32)``: ``[target, 1, 0]`` at the first step of the block's first episode,
    ``[0, 0, 0]`` everywhere else. Actions ``Discrete(2)``; an episode is exactly ``length`` actions and only the last
    is rewarded, +1 if it equals the target bit, -1 otherwise. The last step is a termination and its info holds
    ``is_success``; every info holds ``block_episode`` (index of the episode within its block) and, in the block's first
    episode only, ``cue_step`` = 0 (for logging only).

    An agent without cross-episode memory can answer only the first episode of each block, so its best success rate is
    ``(1 + (block - 1) / 2) / block`` (0.625 for ``block=4``), i.e. chance on the episodes that do not show the cue.
    ``reset(seed=...)`` reseeds and starts a new block; ``reset()`` without a seed moves on to the next episode.
    """

    def __init__(self, block: int = 4, length: int = 4, render_mode: str | None = None):
        self.block = _check_int("block", block, 1)
        self.length = _check_int("length", length, 1)
        self._setup(self.length, render_mode)
        self._episode = -1  # index of the current episode since the last seeded reset

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

    def _observe(self) -> np.ndarray:
        self._obs = np.zeros(3, np.float32)
        return self._obs.copy()


# ---------------------------------------------------------------------------------------
# Montezuma's Revenge: rooms entered, for logging
# ---------------------------------------------------------------------------------------
class MontezumaRooms(gym.Wrapper):
    """Montezuma's Revenge reporting ``info["rooms_visited"]``, how many rooms the episode has entered so far (the
    room number is RAM byte 3, as in the RND and Go-Explore papers' room counts). For logging only: the agent's
    inputs do not change. Registered as ``ALE/MontezumaRevengeRooms-v5``."""

    def _room_bit(self) -> int:
        return 1 << int(self.unwrapped.ale.getRAM()[3])

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.mask = self._room_bit()
        return obs, dict(info, rooms_visited=1)

    def step(self, action):
        obs, reward, term, trunc, info = self.env.step(action)
        self.mask |= self._room_bit()
        return obs, reward, term, trunc, dict(info, rooms_visited=self.mask.bit_count())


def make_montezuma_rooms(**kwargs) -> gym.Env:
    import ale_py

    gym.register_envs(ale_py)
    return MontezumaRooms(gym.make("ALE/MontezumaRevenge-v5", **kwargs))


# ---------------------------------------------------------------------------------------
# Batched memory tasks: numpy vector envs with the single envs' results (gym.make_vec)
# ---------------------------------------------------------------------------------------
SAME_STEP = gym.vector.AutoresetMode.SAME_STEP


class _BatchedEnv(gym.vector.VectorEnv):
    """``num_envs`` copies of a single env stepped as numpy arrays (``gym.make_vec(id, num_envs)``).

    Its results equal ``SyncVectorEnv([lambda: gym.make(id, **kwargs)] * num_envs, autoreset_mode=SAME_STEP)``
    for the same seeds: env ``i`` draws from its own generator, seeded as ``gym.Env.reset`` seeds it, in the
    single env's order; ``max_episode_steps`` truncates as ``TimeLimit`` does; infos have SyncVectorEnv's
    layout (a ``_key`` mask per key; ``final_obs`` and ``final_info`` where an episode ended). Only SAME_STEP
    autoreset is supported.

    A subclass keeps each env's state in arrays (made in ``_setup``) and defines ``_start`` (draw the new
    episodes of the envs ``idx``), ``_advance`` (one step of every env: rewards, terminations), ``_info`` (each
    info key's values and mask), and where needed ``_rewind`` and ``_frame`` (env ``i``'s picture).
    """

    single_cls: type[gym.Env]

    def __init__(self, num_envs: int = 1, max_episode_steps: int | None = None, autoreset_mode: Any = SAME_STEP,
                 **kwargs):
        self.template = self.single_cls(**kwargs)  # the single env's validation, parameters and spaces
        if max_episode_steps is not None:
            gym.wrappers.TimeLimit(self.template, max_episode_steps)  # TimeLimit's own checks
        mode = gym.vector.AutoresetMode(autoreset_mode)
        if mode != SAME_STEP:
            raise ValueError(f"{type(self).__name__} supports only autoreset_mode=SAME_STEP, got {mode}")
        self.num_envs = _check_int("num_envs", num_envs, 1)
        self.max_episode_steps = max_episode_steps
        self.render_mode = self.template.render_mode
        self.metadata = dict(self.template.metadata, autoreset_mode=mode)
        self.single_observation_space = self.template.observation_space
        self.single_action_space = self.template.action_space
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._gens: list[np.random.Generator | None] = [None] * self.num_envs
        self._t = np.zeros(self.num_envs, np.int64)
        self._obs = np.zeros((self.num_envs, *self.single_observation_space.shape), np.float32)
        self._success = np.zeros(self.num_envs, bool)
        self._ready = False  # every env has been reset
        self._setup()

    def reset(self, *, seed: int | list[int | None] | None = None, options: dict | None = None):
        if seed is None:
            seed = [None] * self.num_envs
        elif isinstance(seed, int):
            seed = [seed + i for i in range(self.num_envs)]
        if len(seed) != self.num_envs:
            raise ValueError(f"If seeds are passed as a list the length must match num_envs={self.num_envs} "
                             f"but got length={len(seed)}.")
        rows = self._reset_mask(options)
        idx = np.flatnonzero(rows)
        for i in idx:
            if seed[i] is not None or self._gens[i] is None:
                self._gens[i] = seeding.np_random(seed[i])[0]
            else:  # an unseeded reset mid-episode: the single env's generator is where the episode left it
                self._rewind(i)
        self._t[idx] = 0
        self._start(idx, np.array([seed[i] is not None for i in idx], bool))
        self._ready = all(g is not None for g in self._gens)
        return self._obs.copy(), self._vector_info(self._info(np.zeros(self.num_envs, bool)), rows)

    def _reset_mask(self, options: dict | None) -> np.ndarray:
        mask = (options or {}).get("reset_mask")
        if mask is None:
            return np.ones(self.num_envs, bool)
        if not (isinstance(mask, np.ndarray) and mask.shape == (self.num_envs,) and mask.dtype == np.bool_
                and mask.any()):
            raise ValueError(f"options['reset_mask'] must be a bool array of shape ({self.num_envs},) with a True, "
                             f"got {mask!r}")
        return mask.copy()

    def step(self, actions):
        if not self._ready:
            raise gym.error.ResetNeeded("Cannot call env.step() before calling env.reset()")
        actions, n = np.asarray(actions), self.single_action_space.n
        valid = actions.shape == (self.num_envs,) and actions.dtype.kind in "iu"
        if not (valid and 0 <= actions.min() <= actions.max() < n):
            raise ValueError(f"actions must be {self.num_envs} integers in 0..{n - 1}, got {actions!r}")
        self._t += 1
        rewards, terminated = self._advance(actions)
        limit = self.max_episode_steps
        truncated = np.zeros(self.num_envs, bool) if limit is None else self._t >= limit
        done = terminated | truncated
        ended = self._info(terminated)
        if not done.any():
            return self._obs.copy(), rewards, terminated, truncated, self._vector_info(ended, ~done)
        idx = np.flatnonzero(done)
        final_obs = np.full(self.num_envs, None, dtype=object)
        for i in idx:
            final_obs[i] = self._obs[i].copy()
        final_info = self._vector_info(ended, done)
        self._t[idx] = 0
        self._start(idx, np.zeros(len(idx), bool))
        started = self._info(np.zeros(self.num_envs, bool))
        # The envs that reset report their reset's info, the others their step's, as in SyncVectorEnv.
        info = self._vector_info({k: (np.where(done, started[k][0], v), np.where(done, started[k][1], m))
                                  for k, (v, m) in ended.items()}, np.ones(self.num_envs, bool))
        info.update(final_obs=final_obs, _final_obs=done.copy(), final_info=final_info, _final_info=done.copy())
        return self._obs.copy(), rewards, terminated, truncated, info

    @staticmethod
    def _vector_info(parts: dict[str, tuple[np.ndarray, np.ndarray]], rows: np.ndarray) -> dict:
        """SyncVectorEnv's layout of the envs ``rows``: a key's values (0 where absent) and its ``_key`` mask."""
        info = {}
        for key, (values, mask) in parts.items():
            mask = mask & rows
            if mask.any():
                info[key], info[f"_{key}"] = np.where(mask, values, np.zeros_like(values)), mask
        return info

    def render(self):
        return tuple(self._frame(i) for i in range(self.num_envs)) if self.render_mode == "rgb_array" else None

    def _frame(self, i: int) -> np.ndarray:
        return _cells_to_rgb(self._obs[i][None, :])

    def _setup(self) -> None:
        pass

    def _rewind(self, i: int) -> None:
        pass


class BatchedMemoryTask(_BatchedEnv):
    """``MemoryTask-v0`` batched. At reset each env draws its target and cue step and then, with
    ``difficulty=1``, the distractor bits of the whole episode in one call: ``integers(0, 2)`` uses one
    32-bit word of the generator per bit however the draws are grouped, so one call leaves the generator
    where the single env's step-by-step draws leave it (tests/test_batched_envs.py checks it)."""

    single_cls = MemoryTaskEnv

    def _setup(self):
        env = self.template
        self._last = min(env.delay, self.max_episode_steps or env.delay)  # the step of an episode's last observation
        self._cells = np.zeros((self.num_envs, self._last + 1, 2), np.float32)  # channels 0, 1 of every step
        self._target = np.zeros(self.num_envs, np.int64)
        self._cue = np.zeros(self.num_envs, np.int64)
        self._flag = float(env.cue_time == "random")
        self._drawn_from: list[dict | None] = [None] * self.num_envs  # generator states before the bits

    def _start(self, idx, seeded):
        env, cells = self.template, self._cells.reshape(self.num_envs, -1)
        for i in idx:
            gen = self._gens[i]
            self._target[i] = target = int(gen.integers(0, 2))
            self._cue[i] = cue = int(gen.integers(0, max(1, env.delay // 2))) if env.cue_time == "random" else 0
            shown = cue <= self._last  # a max_episode_steps shorter than the delay may end the episode earlier
            if env.difficulty == 1:
                self._drawn_from[i] = gen.bit_generator.state
                bits = gen.integers(0, 2, size=cells.shape[1] - shown).astype(np.float32)
                cells[i] = np.insert(bits, 2 * cue, target) if shown else bits
            else:
                cells[i] = 0.0
                if shown:
                    cells[i, 2 * cue] = target
        self._observe()

    def _rewind(self, i):
        if self.template.difficulty == 1:  # back to the bits the episode has shown so far
            t, cue = self._t[i], self._cue[i]
            self._gens[i].bit_generator.state = self._drawn_from[i]
            self._gens[i].integers(0, 2, size=2 * (t + 1) - (cue <= t))

    def _observe(self):
        self._obs[:, :2] = self._cells[np.arange(self.num_envs), self._t]
        self._obs[:, 2] = self._flag * (self._t == self._cue)

    def _advance(self, actions):
        self._observe()
        terminated = self._t >= self.template.delay
        self._success = actions == self._target
        return np.where(terminated, np.where(self._success, 1.0, -1.0), 0.0), terminated

    def _info(self, terminated):
        return {"cue_step": (self._cue.copy(), np.ones(self.num_envs, bool)),
                "is_success": (self._success.copy(), terminated)}


class BatchedPassiveTMaze(_BatchedEnv):
    """``PassiveTMaze-v0`` batched; each env's one draw, the goal arm, is made at its reset."""

    single_cls = PassiveTMazeEnv
    _DX = np.array([dx for dx, _ in PassiveTMazeEnv._MOVES])
    _DY = np.array([dy for _, dy in PassiveTMazeEnv._MOVES])

    def _setup(self):
        self._x = np.zeros(self.num_envs, np.int64)
        self._y = np.zeros(self.num_envs, np.int64)
        self._goal = np.zeros(self.num_envs, np.int64)

    def _start(self, idx, seeded):
        for i in idx:
            self._goal[i] = int(self._gens[i].choice([-1, 1]))
        self._x[idx] = self._y[idx] = 0
        self._observe()

    def _observe(self):
        self._obs[:, 0] = self._x == self.template.length
        # y is 0 outside the arms; the first observation (t = 0, at x = 0) shows the goal arm instead
        self._obs[:, 1] = np.where(self._t == 0, self._goal, self._y)

    def _advance(self, actions):
        length = self.template.length
        x, y = self._x + self._DX[actions], self._y + self._DY[actions]
        free = np.where(y == 0, (x >= 0) & (x <= length), (x == length) & (np.abs(y) == 1))
        self._x, self._y = np.where(free, x, self._x), np.where(free, y, self._y)
        terminated = self._t >= self.template.episode_length
        self._success = self._y == self._goal
        lagging = np.where(self._x < self._t, self.template.penalty, 0.0)
        self._observe()
        return np.where(terminated, self._success * 1.0, lagging), terminated

    def _info(self, terminated):
        return {"cue_step": (np.zeros(self.num_envs, np.int64), np.ones(self.num_envs, bool)),
                "is_success": (self._success.copy(), terminated)}

    def _frame(self, i):
        return _tmaze_picture(self.template.length, self._goal[i], self._x[i], self._y[i])


class BatchedRecallAcrossEpisodes(_BatchedEnv):
    """``RecallAcrossEpisodes-v0`` batched; each env draws its target at the reset that starts a block."""

    single_cls = RecallAcrossEpisodesEnv

    def _setup(self):
        self._target = np.zeros(self.num_envs, np.int64)
        self._episode = np.full(self.num_envs, -1, np.int64)  # as the single env: since the last seeded reset

    def _start(self, idx, seeded):
        self._episode[idx] = np.where(seeded, 0, self._episode[idx] + 1)
        first = idx[self._episode[idx] % self.template.block == 0]
        for i in first:
            self._target[i] = int(self._gens[i].integers(0, 2))
        self._obs[idx] = 0.0
        self._obs[first, 0] = self._target[first]
        self._obs[first, 1] = 1.0

    def _advance(self, actions):
        self._obs[:] = 0.0
        terminated = self._t >= self.template.length
        self._success = actions == self._target
        return np.where(terminated, np.where(self._success, 1.0, -1.0), 0.0), terminated

    def _info(self, terminated):
        k = self._episode % self.template.block
        return {"block_episode": (k, np.ones(self.num_envs, bool)),
                "cue_step": (np.zeros(self.num_envs, np.int64), k == 0),
                "is_success": (self._success.copy(), terminated)}


class RecordFinalEpisodeStatistics(gym.vector.VectorWrapper):
    """``info["final_info"]["episode"]`` = ``{"r", "l", "t"}`` (return, length, seconds) of the envs whose
    episode ended, with masks, as ``SyncVectorEnv(RecordEpisodeStatistics(env))`` lays it out with SAME_STEP
    autoreset (gymnasium's vector ``RecordEpisodeStatistics`` puts it in ``info["episode"]`` instead)."""

    def __init__(self, env: gym.vector.VectorEnv):
        super().__init__(env)
        self._return = np.zeros(self.num_envs)
        self._length = np.zeros(self.num_envs, np.int64)
        self._started = np.zeros(self.num_envs)

    def reset(self, *, seed=None, options=None):
        rows = (options or {}).get("reset_mask", slice(None))  # read first: a vector env may pop it
        obs, info = self.env.reset(seed=seed, options=options)
        self._return[rows], self._length[rows], self._started[rows] = 0.0, 0, time.perf_counter()
        return obs, info

    def step(self, actions):
        obs, rewards, terminated, truncated, info = self.env.step(actions)
        self._return += rewards
        self._length += 1
        done = terminated | truncated
        if done.any():
            now = time.perf_counter()
            episode = {}
            for key, values in (("r", self._return), ("l", self._length), ("t", np.round(now - self._started, 6))):
                episode[key], episode[f"_{key}"] = np.where(done, values, np.zeros_like(values)), done.copy()
            info["final_info"]["episode"], info["final_info"]["_episode"] = episode, done.copy()
            self._return[done], self._length[done], self._started[done] = 0.0, 0, now
        return obs, rewards, terminated, truncated, info


# ---------------------------------------------------------------------------------------
# MultiCueTask-v0
# ---------------------------------------------------------------------------------------
class MultiCueTaskEnv(gym.Env):
    """Several things to keep: ``cues`` bits at distinct random steps of the first half of a ``delay``-step
    episode, each asked for once at the end. Observation ``Box(0, 1, (3 + 2 * cues,))``: two random distractor
    bits, then [1, one-hot j] at cue j's step (its bit in channel 0), and at the j-th of the last ``cues`` steps
    only one-hot j in the query channels. A query rewards +1 for the queried bit, else -1 (chance of answering
    all: ``2 ** -cues``); the last step terminates with ``is_success``. ``cue_step``: the first cue's step."""

    def __init__(self, delay: int = 64, cues: int = 2, render_mode: str | None = None):
        self.delay, self.cues = _check_int("delay", delay, 4), _check_int("cues", cues, 1)
        if self.delay < 2 * self.cues + 2:
            raise ValueError(f"delay must be at least 2 * cues + 2 = {2 * self.cues + 2}, got {delay!r}")
        self.render_mode = _check_choice("render_mode", render_mode, (None,))
        self.episode_length, self.action_space = self.delay, spaces.Discrete(2)
        self.observation_space = spaces.Box(0.0, 1.0, (3 + 2 * self.cues,), np.float32)
        self._t = self._right = 0
        self._bits, self._cue_at = np.zeros(self.cues, np.int64), {}

    def _observe(self) -> np.ndarray:
        obs, query = np.zeros(3 + 2 * self.cues, np.float32), self._t - (self.delay - self.cues)
        obs[:2] = self.np_random.integers(0, 2, 2)
        if self._t in self._cue_at:
            j = self._cue_at[self._t]
            obs[0], obs[2], obs[3 + j] = self._bits[j], 1.0, 1.0
        if query >= 0:
            obs[:2], obs[3 + self.cues + query] = 0.0, 1.0
        return obs

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._t = self._right = 0
        self._bits = self.np_random.integers(0, 2, self.cues)
        self._cue_at = {int(t): j for j, t in enumerate(self.np_random.choice(self.delay // 2, self.cues, False))}
        return self._observe(), {"cue_step": min(self._cue_at)}

    def step(self, action):
        query, reward, info = self._t - (self.delay - self.cues), 0.0, {"cue_step": min(self._cue_at)}
        if query >= 0:
            right = int(action) == int(self._bits[query])
            reward, self._right = (1.0 if right else -1.0), self._right + right
        self._t += 1
        if self._t < self.delay:
            return self._observe(), reward, False, False, info
        info["is_success"] = self._right == self.cues
        return np.zeros(3 + 2 * self.cues, np.float32), reward, True, False, info


# ---------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------
def _register(env_id: str, entry_point: str, **kwargs) -> None:
    if env_id not in gym.registry:
        gym.register(id=env_id, entry_point=entry_point, **kwargs)


_register("MemoryTask-v0", "memory_envs:MemoryTaskEnv", kwargs={"delay": 8, "difficulty": 0},
          vector_entry_point="memory_envs:BatchedMemoryTask")
_register("PassiveTMaze-v0", "memory_envs:PassiveTMazeEnv", kwargs={"length": 10},
          vector_entry_point="memory_envs:BatchedPassiveTMaze")
_register("CliffWalkingFail-v0", "memory_envs:CliffWalkingFailEnv")
_register("DarkChamber-v0", "memory_envs:DarkChamberEnv")
_register("FourRooms-v0", "memory_envs:FourRoomsEnv")
_register("RecallAcrossEpisodes-v0", "memory_envs:RecallAcrossEpisodesEnv", kwargs={"block": 4, "length": 4},
          vector_entry_point="memory_envs:BatchedRecallAcrossEpisodes")
_register("MultiCueTask-v0", "memory_envs:MultiCueTaskEnv", kwargs={"delay": 64, "cues": 2})
_register("ALE/MontezumaRevengeRooms-v5", "memory_envs:make_montezuma_rooms")
