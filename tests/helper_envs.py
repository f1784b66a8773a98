"""Small environments the tests need, registered on import.

Scripts reach them through ``--env-id helper_envs:<Id>`` (the subprocess runner puts tests/ on
PYTHONPATH), which exercises the ``module:EnvId`` path of the CLI at the same time.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces


class NaNRewardEnv(gym.Env):
    """Well-behaved 8-step episodes until ``nan_after`` steps of this instance, then NaN rewards.

    Used to check the NaN guard: the first updates are finite (so a checkpoint exists), a later
    one is not.
    """

    def __init__(self, nan_after: int = 100):
        self.nan_after = nan_after
        self.observation_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.action_space = spaces.Discrete(2)
        self._steps = self._t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._t = 0
        return self.np_random.uniform(-1, 1, 2).astype(np.float32), {}

    def step(self, action):
        self._steps += 1
        self._t += 1
        reward = float("nan") if self._steps > self.nan_after else float(action)
        obs = self.np_random.uniform(-1, 1, 2).astype(np.float32)
        return obs, reward, self._t >= 8, False, {}


class TextObsEnv(gym.Env):
    """An observation space no script can take (Text)."""

    def __init__(self):
        self.observation_space = spaces.Text(max_length=8)
        self.action_space = spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return "hi", {}

    def step(self, action):
        return "hi", 0.0, True, False, {}


class MultiBinaryActionEnv(gym.Env):
    """An action space the scripts do not support (MultiBinary)."""

    def __init__(self):
        self.observation_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.action_space = spaces.MultiBinary(3)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(2, np.float32), {}

    def step(self, action):
        return np.zeros(2, np.float32), 0.0, True, False, {}


class BootstrapProbeEnv(gym.Env):
    """Deterministic episodes that alternately *terminate* after 3 steps and are *truncated*
    after 4; reward 1 every step; observation = one-hot of the step index (so the final
    observation of a truncated episode, t=4, never appears as an ordinary observation).
    """

    def __init__(self):
        self.observation_space = spaces.Box(0.0, 1.0, (6,), np.float32)
        self.action_space = spaces.Discrete(2)
        self._t = 0
        self._episode = -1

    def _obs(self):
        obs = np.zeros(6, np.float32)
        obs[self._t] = 1.0
        return obs

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._t = 0
        self._episode += 1
        return self._obs(), {}

    def step(self, action):
        self._t += 1
        truncating = self._episode % 2 == 1
        terminated = not truncating and self._t >= 3
        truncated = truncating and self._t >= 4
        return self._obs(), 1.0, terminated, truncated, {}


class ImageMemoryTask(gym.ObservationWrapper):
    """MemoryTask-v0 as a 6x6x1 uint8 image (its three values painted in the first row): the CNN path."""

    def __init__(self, delay: int = 5, difficulty: int = 1):
        import memory_envs

        super().__init__(memory_envs.MemoryTaskEnv(delay=delay, difficulty=difficulty))
        self.observation_space = spaces.Box(0, 255, (6, 6, 1), np.uint8)

    def observation(self, obs):
        img = np.zeros((6, 6, 1), np.uint8)
        img[0, :3, 0] = (obs * 255).astype(np.uint8)
        return img


def _register(env_id: str, entry_point: str) -> None:
    if env_id not in gym.registry:
        gym.register(id=env_id, entry_point=f"helper_envs:{entry_point}")


_register("NaNReward-v0", "NaNRewardEnv")
_register("TextObs-v0", "TextObsEnv")
_register("MultiBinaryAction-v0", "MultiBinaryActionEnv")
_register("BootstrapProbe-v0", "BootstrapProbeEnv")
_register("ImageMemoryTask-v0", "ImageMemoryTask")
