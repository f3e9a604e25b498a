"""The weight generator must reproduce the golden check values, or every other golden test is moot; as a
command, it writes them as stand-in weight files where the scripts look, never over real weights."""

from pathlib import Path

import numpy as np
import pytest
import torch

from tools.detweights import det_state_dict, det_value, load_golden, uniform

CHECK = load_golden("detweights_check")


@pytest.mark.parametrize("ex", CHECK["examples"], ids=lambda e: e["key"])
def test_examples(ex):
    np.testing.assert_array_equal(uniform(ex["key"], 5), ex["u_first5_float64"])
    v = det_value(ex["key"], ex["shape"], ex["gain"]).reshape(-1).numpy()
    np.testing.assert_array_equal(v[:5].astype(np.float64), ex["value_first5_float32"])
    assert v.astype(np.float64).sum() == pytest.approx(ex["value_sum_float64"], rel=1e-9, abs=1e-9)


SUMS = {
    "Wav2Lip": 25598.532482175095,
    "Wav2Lip_disc_qual": -10.803955621880812,
    "SyncNet_color": 15906.877065397644,
    "s3fd": 10311.275365269865,
    "syncnet_python_S": 9807.111881986291,
}


@pytest.mark.parametrize("arch", sorted(SUMS))  # the later networks are checked with their modules (test_models_*)
def test_whole_state_dict_sum(arch):
    total = sum(float(t.double().sum()) for t in det_state_dict(arch).values())
    assert total == pytest.approx(SUMS[arch], rel=1e-12)


# --- `python -m tools.detweights`: stand-in weight files ---------------------------------------------------


def test_stand_ins_go_where_the_scripts_look_by_default():
    from face_detection.detection.sfd.sfd_detector import default_weights_path
    from tools.detweights import REPO, build_parser

    args = build_parser().parse_args([])
    assert Path(args.out) == REPO / "checkpoints" and Path(args.detector_out) == default_weights_path()


def test_stand_ins_load_where_the_real_files_do_and_say_so(tmp_path, capsys):
    from common.weights import load_weights
    from models import Wav2Lip
    from tools.detweights import main

    main(["--out", str(tmp_path / "ckpt"), "--detector_out", str(tmp_path / "sfd" / "s3fd.pth")])
    said = capsys.readouterr().out
    assert "STAND-IN" in said and "noise patch" in said and "--box" in said
    load_weights(Wav2Lip(), tmp_path / "ckpt" / "wav2lip_gan.pth", "Wav2Lip")
    s3fd = torch.load(tmp_path / "sfd" / "s3fd.pth", weights_only=True)  # a raw state dict, as the released file
    assert list(s3fd) == list(det_state_dict("s3fd")) and torch.equal(
        s3fd["fc7.weight"], det_state_dict("s3fd")["fc7.weight"]
    )
    main(
        ["--out", str(tmp_path / "ckpt"), "--detector_out", str(tmp_path / "sfd" / "s3fd.pth")]
    )  # stand-ins: rewritten


def test_a_file_that_is_not_a_stand_in_is_never_overwritten(tmp_path):
    from common.errors import UserError
    from tools.detweights import main

    real = tmp_path / "wav2lip_gan.pth"
    torch.save({"state_dict": {"x": torch.ones(2)}}, real)
    before = real.read_bytes()
    with pytest.raises(UserError, match=r"wav2lip_gan.pth: a file is already there and it is not a stand-in"):
        main(["--out", str(tmp_path), "--detector_out", str(tmp_path / "s3fd.pth")])
    assert real.read_bytes() == before and not (tmp_path / "s3fd.pth").exists()  # all or nothing
