"""Samples/s of the expert's and the generator's datasets: cached mel next to the original's way.

    python -m bench.dataloader                          # a synthetic LRS2-like set it makes itself
    python -m bench.dataloader --data_root lrs2_preprocessed/ --filelists_dir filelists/

The original decoded `audio.wav` and recomputed the whole clip's mel spectrogram for every sample; datasets.py
reads `mel.npy`, built once. Both ways run here on the same windows, in one process (no DataLoader
workers, so the figures are per CPU core), and the ratio is printed. Target: ≥ 5×.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run by path (python bench/dataloader.py): the repository root is not on the path
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import random
import tempfile
import time

from tools.make_synthetic_lrs2 import make_dataset  # noqa: E402
from training import datasets  # noqa: E402


def samples_per_s(dataset, indices: list[int]) -> float:
    start = time.perf_counter()
    for i in indices:
        dataset[i]
    return len(indices) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_root", default=None, help="a preprocessed dataset (default: a synthetic one)")
    parser.add_argument("--filelists_dir", default="filelists")
    parser.add_argument("--split", default="train")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=6.0, help="clip length of the synthetic set (LRS2: ~6 s)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        root, lists = args.data_root, args.filelists_dir
        if root is None:
            root, lists = Path(tmp), Path(tmp) / "filelists"
            make_dataset(root, speakers=3, videos_per_speaker=4, seconds=args.seconds, filelists_dir=lists)
        for name, cls in (("expert", datasets.SyncDataset), ("generator", datasets.Wav2LipDataset)):
            cached = cls(root, args.split, lists)
            recompute = cls(root, args.split, lists, cache_mel=False)
            indices = random.Random(0).sample(range(len(cached)), min(args.samples, len(cached)))
            for i in indices[:20]:
                cached[i]  # build the caches and warm the file cache: steady state is what training sees
            fast, slow = samples_per_s(cached, indices), samples_per_s(recompute, indices)
            print(f"{name:9s}  cached mel {fast:8.1f} samples/s   recomputed per sample (original) {slow:7.1f} "
                  f"samples/s   ratio {fast / slow:5.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
