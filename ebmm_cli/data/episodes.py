"""Episodes: the batches of patterns that are written into one memory.

An episode holds N patterns; by default N distinct classes with one image each (the
report's 5-way 1-shot; the paper's 64 distinct Omniglot characters). Image episodes are
drawn by learn2learn's `Taskset` (the current name of `TaskDataset`) with `NWays`,
`KShots` and `LoadData`. learn2learn draws from Python's global `random` module, so each
`Episodes` keeps its own random state and swaps it in only while it samples: the stream
depends on the seed alone, not on whatever else uses `random`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

import torch

from ebmm_cli._learn2learn import import_learn2learn
from ebmm_cli.data.binary import BinaryStrings
from ebmm_cli.data.images import LabelledImages
from ebmm_cli.errors import EbmmError


class Episodes:
    """A seeded, endless stream of episodes of `n` patterns from one dataset.

    Args:
        dataset: labelled images, or `BinaryStrings`.
        n: patterns per episode; with `least`, the most.
        shots: images per class; the episode has n / shots distinct classes. None ignores
            classes and draws n distinct images uniformly (CIFAR-10 has too few classes
            for 64-way episodes).
        seed: the whole stream follows from it.
        least: the fewest patterns per episode: `draw_size` then draws N from
            [least, n] (multiples of `shots`), log-uniformly, from the stream's seed.

    Example:
        >>> episodes = Episodes(omniglot(root, "train", 28), n=5, seed=0)
        >>> images, labels = episodes.sample()  # (5, 1, 28, 28), (5,)
    """

    def __init__(
        self,
        dataset: LabelledImages | BinaryStrings,
        n: int,
        shots: int | None = 1,
        seed: int = 0,
        least: int | None = None,
    ) -> None:
        if min(n, least or n) < 1:
            raise EbmmError("--batch-size", f"must be at least 1, got {min(n, least or n)}")
        if least is not None and least > n:
            raise EbmmError("--batch-size", f"the range {least}-{n} is empty")
        self.dataset = dataset
        self.n = n
        self.least = least
        self.shots = shots
        self._random = random.Random(seed)
        self._generator = torch.Generator().manual_seed(seed)
        self._tasks: dict[int, object] = {}  # learn2learn task samplers, by episode size
        if isinstance(dataset, LabelledImages):
            for size in {n, least or n}:
                self._check(dataset, size, shots)
            if shots is not None:  # other sizes' samplers are made when first drawn
                self._tasks[n] = _task_dataset(dataset, n // shots, shots)

    def draw_size(self) -> int:
        """N for the next episodes: `n`, or with `least` one drawn log-uniformly from the
        multiples of `shots` in [least, n] (a fixed size draws nothing, so its stream is
        the same as before ranges existed)."""
        if self.least is None or self.least == self.n:
            return self.n
        step = self.shots or 1
        u = self._random.uniform(math.log(self.least), math.log(self.n + step))
        return min(self.n, max(self.least, int(math.exp(u)) // step * step))

    @staticmethod
    def _check(dataset: LabelledImages, n: int, shots: int | None) -> None:
        if shots is None:
            if n > len(dataset):
                raise EbmmError("--batch-size", f"{n} is more than the {len(dataset)} images")
            return
        if shots < 1 or n % shots:
            raise EbmmError("--shots", f"{shots} must be at least 1 and divide {n}")
        classes = dataset.labels_to_indices()
        usable = sum(len(items) >= shots for items in classes.values())
        if usable < len(classes):
            raise EbmmError("--shots", f"some classes have fewer than {shots} images")
        if n // shots > len(classes):
            raise EbmmError(
                "--batch-size",
                f"{n // shots} distinct classes per episode but the data has {len(classes)}",
            )

    def state(self) -> dict:
        """Everything needed to continue the stream exactly (for checkpoints)."""
        return {"random": self._random.getstate(), "generator": self._generator.get_state()}

    def load_state(self, state: dict) -> None:
        """Continue the stream from a `state()`."""
        self._random.setstate(state["random"])
        self._generator.set_state(state["generator"])

    def sample(self, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The next episode of `n` patterns (default: `self.n`): patterns (N, C, H, W)
        or (N, D), and labels (N,)."""
        n = self.n if n is None else n
        if isinstance(self.dataset, BinaryStrings):
            return self.dataset.sample(n, self._generator), torch.arange(n)
        saved = random.getstate()
        random.setstate(self._random.getstate())
        try:
            if self.shots is not None:
                if n not in self._tasks:
                    self._tasks[n] = _task_dataset(self.dataset, n // self.shots, self.shots)
                images, labels = self._tasks[n].sample()
            else:
                picks = random.sample(range(len(self.dataset)), n)
                images = torch.stack([self.dataset[i][0] for i in picks])
                labels = torch.tensor([self.dataset.labels[i] for i in picks])
        finally:
            self._random.setstate(random.getstate())
            random.setstate(saved)
        return images, labels

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.sample()


def _task_dataset(dataset: LabelledImages, ways: int, shots: int):  # -> l2l TaskDataset
    """learn2learn's N-way K-shot task sampler over `dataset`."""
    l2l = import_learn2learn()
    meta = l2l.data.MetaDataset(dataset, labels_to_indices=dataset.labels_to_indices())
    transforms = [
        l2l.data.transforms.NWays(meta, ways),
        l2l.data.transforms.KShots(meta, shots),
        l2l.data.transforms.LoadData(meta),
    ]
    return l2l.data.Taskset(meta, task_transforms=transforms, num_tasks=-1)
