"""The original's name for training with the visual-quality discriminator: `wav2lip_train.py --gan`.

python hq_wav2lip_train.py --data_root ... --checkpoint_dir ... --syncnet_checkpoint_path ...
"""

from __future__ import annotations

import wav2lip_train
from common.errors import run_cli


def main(argv: list[str] | None = None) -> None:
    wav2lip_train.main(argv, gan_default=True)


if __name__ == "__main__":
    run_cli(main)
