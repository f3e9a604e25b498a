"""Every original hyperparameter keeps its name and default; --hparams overrides are typed and checked."""

import subprocess
import sys

import pytest

from common.errors import UserError
from hparams import HParams, from_argument, hparams

ORIGINAL = dict(
    num_mels=80, rescale=True, rescaling_max=0.9, use_lws=False, n_fft=800, hop_size=200, win_size=800,
    sample_rate=16000, frame_shift_ms=None, signal_normalization=True, allow_clipping_in_normalization=True,
    symmetric_mels=True, max_abs_value=4.0, preemphasize=True, preemphasis=0.97, min_level_db=-100,
    ref_level_db=20, fmin=55, fmax=7600, img_size=96, fps=25, batch_size=16, initial_learning_rate=1e-4,
    nepochs=200000000000000000, num_workers=16, checkpoint_interval=3000, eval_interval=3000,
    save_optimizer_state=True, syncnet_wt=0.0, syncnet_batch_size=64, syncnet_lr=1e-4,
    syncnet_eval_interval=10000, syncnet_checkpoint_interval=10000, disc_wt=0.07, disc_initial_learning_rate=1e-4,
)  # fmt: skip


def test_original_names_and_defaults():
    assert hparams.values() == ORIGINAL


def test_overrides_are_typed():
    hp = hparams.parse("batch_size=8, syncnet_wt=0.03,preemphasize=false,frame_shift_ms=12.5")
    assert (hp.batch_size, hp.syncnet_wt, hp.preemphasize, hp.frame_shift_ms) == (8, 0.03, False, 12.5)
    assert isinstance(hp.batch_size, int) and hparams.batch_size == 16  # the default set is untouched
    assert hparams.parse("") is hparams


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("batchsize=8", "unknown hyperparameter 'batchsize'"),
        ("batch_size", "name=value"),
        ("fps=fast", "not a valid int"),
    ],
)
def test_bad_overrides(text, match):
    with pytest.raises(UserError, match=match):
        hparams.parse(text)


def test_frozen():
    with pytest.raises(AttributeError):
        hparams.batch_size = 3  # type: ignore[misc]
    assert HParams().hop_length() == 200


def test_config_file_and_every_script_takes_hparams(tmp_path, repo):
    cfg = tmp_path / "tiny.txt"
    cfg.write_text("# a comment\nbatch_size=2\nfps=30  # trailing comment\n")
    hp = from_argument(f"@{cfg}")
    assert (hp.batch_size, hp.fps) == (2, 30)
    with pytest.raises(UserError, match="config file not found"):
        from_argument(f"@{tmp_path / 'nope.txt'}")
    for script in ("inference.py", "preprocess.py", "color_syncnet_train.py", "wav2lip_train.py"):
        out = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=repo)
        assert "--hparams" in out.stdout, script
    # an unknown name is one clean line, whatever else is wrong with the command
    out = subprocess.run(
        [sys.executable, "inference.py", "--checkpoint_path", "x.pth", "--face", "f.mp4", "--audio", "a.wav",
         "--hparams", "fpss=30"], capture_output=True, text=True, cwd=repo,
    )  # fmt: skip
    assert out.returncode == 2 and "unknown hyperparameter 'fpss'" in out.stderr and "Traceback" not in out.stderr


def test_hparams_flag_repeats_in_order(tmp_path):
    import inference

    cfg = tmp_path / "tiny.txt"
    cfg.write_text("batch_size=2\nfps=30\n")
    argv = ["--checkpoint_path", "c", "--face", "f", "--audio", "a", "--hparams", f"@{cfg}", "--hparams", "fps=20"]
    hp = from_argument(inference.build_parser().parse_args(argv).hparams)
    assert (hp.batch_size, hp.fps) == (2, 20)  # the file's batch size kept, its fps overridden by the later flag
    assert from_argument(None) == from_argument([]) == from_argument("")
