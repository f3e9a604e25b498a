"""The weight generator must reproduce the golden check values, or every other golden test is moot."""

import numpy as np
import pytest

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
