"""Every hyperparameter of the original Wav2Lip, with its original name and default.

`hparams` is the default set; scripts derive their own with `hparams.parse("name=value,...")` from
`--hparams`, and every checkpoint records the set it was trained with (`asdict`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError


@dataclass(frozen=True)
class HParams:
    # Audio (mel spectrogram; audio.py)
    num_mels: int = 80
    rescale: bool = True
    rescaling_max: float = 0.9
    use_lws: bool = False
    n_fft: int = 800
    hop_size: int = 200  # 12.5 ms at 16 kHz: 80 mel columns per second
    win_size: int = 800  # 50 ms at 16 kHz
    sample_rate: int = 16000
    frame_shift_ms: float | None = None
    signal_normalization: bool = True
    allow_clipping_in_normalization: bool = True
    symmetric_mels: bool = True
    max_abs_value: float = 4.0  # mels are scaled to [-4, 4]
    preemphasize: bool = True
    preemphasis: float = 0.97
    min_level_db: int = -100
    ref_level_db: int = 20
    fmin: int = 55
    fmax: int = 7600

    # Video and training
    img_size: int = 96
    fps: int = 25
    batch_size: int = 16
    initial_learning_rate: float = 1e-4
    nepochs: int = 200000000000000000
    num_workers: int = 16
    checkpoint_interval: int = 3000
    eval_interval: int = 3000
    save_optimizer_state: bool = True
    syncnet_wt: float = 0.0  # raised to 0.01 (0.03 with the GAN) once the expert's eval loss is < 0.75
    syncnet_batch_size: int = 64
    syncnet_lr: float = 1e-4
    syncnet_eval_interval: int = 10000
    syncnet_checkpoint_interval: int = 10000
    disc_wt: float = 0.07
    disc_initial_learning_rate: float = 1e-4

    def parse(self, overrides: str | None) -> HParams:
        """A copy with `name=value,name=value` applied; values are read with the type of the default."""
        if not overrides:
            return self
        changes = {}
        for item in filter(None, (s.strip() for s in overrides.split(","))):
            name, sep, value = item.partition("=")
            name = name.strip()
            if not sep:
                raise UserError(f"--hparams: '{item}' is not of the form name=value")
            if name not in self.__dataclass_fields__:
                raise UserError(f"--hparams: unknown hyperparameter '{name}' (known: {', '.join(self.names())})")
            changes[name] = _convert(name, value.strip(), getattr(self, name))
        return dataclasses.replace(self, **changes)

    def names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self)]

    def values(self) -> dict:
        """The plain dict stored in checkpoints (the original HParams had `.values()` too)."""
        return dataclasses.asdict(self)

    def hop_length(self) -> int:
        if self.hop_size is None:
            return int(self.frame_shift_ms / 1000 * self.sample_rate)
        return self.hop_size


def _convert(name: str, text: str, default: object) -> object:
    if text.lower() == "none":
        return None
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if isinstance(default, int):
            return int(float(text)) if float(text).is_integer() else int(text)
        return float(text)
    except ValueError:
        kind = type(default).__name__
        raise UserError(f"--hparams: '{name}={text}' is not a valid {kind}") from None


def from_argument(values: str | Sequence[str] | None) -> HParams:
    """The values of `--hparams`, applied in the order given, later ones winning: each `name=value,...`, or
    `@file` naming a file of such lines (# comments)."""
    items = [values] if isinstance(values, str) else list(values or [])
    return hparams.parse(",".join(filter(None, map(_expand, items))))


def _expand(text: str) -> str:
    if not text.startswith("@"):
        return text
    path = Path(text[1:])
    if not path.is_file():
        raise UserError(f"{path}: --hparams config file not found")
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return ",".join(line for line in lines if line)


def add_hparams_argument(parser) -> None:
    """The `--hparams` flag every script accepts; it may be given several times (a config file, then changes)."""
    parser.add_argument(
        "--hparams",
        action="append",
        help='overrides of hparams.py: "batch_size=8,fps=30", or @file with one name=value a line; repeatable',
    )


hparams = HParams()
