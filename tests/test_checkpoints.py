"""Every container the original wrote or read must load, and every wrong file must say what is wrong."""

import numpy as np
import pytest
import torch

import models
from common import weights as checkpoints
from common.errors import UserError
from hparams import hparams
from tools.detweights import det_state_dict


def original_container(state_dict, prefix=""):
    return {
        "state_dict": {prefix + k: v for k, v in state_dict.items()},
        "optimizer": None,
        "global_step": 7,
        "global_epoch": 1,
    }


def same_weights(model, state_dict):
    return all(torch.equal(model.state_dict()[k], v) for k, v in state_dict.items())


@pytest.mark.parametrize("prefix", ["", "module."])
def test_training_container_with_or_without_module_prefix(tmp_path, wav2lip_weights, prefix):
    path = tmp_path / "wav2lip.pth"
    torch.save(original_container(wav2lip_weights, prefix), path)
    model = checkpoints.load_model(models.Wav2Lip(), path, "Wav2Lip")
    assert same_weights(model, wav2lip_weights) and not model.training


def test_legacy_serialization_of_torch_1x(tmp_path, wav2lip_weights):
    """The released files predate torch 1.6's zip format."""
    path = tmp_path / "legacy.pth"
    torch.save(original_container(wav2lip_weights, "module."), path, _use_new_zipfile_serialization=False)
    assert same_weights(checkpoints.load_model(models.Wav2Lip(), path, "Wav2Lip"), wav2lip_weights)


def test_skeleton_takes_the_checkpoint_tensors_in_the_model_dtype(tmp_path, wav2lip_weights):
    """Built on the meta device, the model ends with real float32 tensors, even from a float16 file."""
    path = tmp_path / "half.pth"
    half = {k: v.half() if v.is_floating_point() else v for k, v in wav2lip_weights.items()}
    torch.save(original_container(half), path)
    model = checkpoints.load_model(checkpoints.skeleton(models.Wav2Lip), path, "Wav2Lip")
    tensors = model.state_dict()
    assert not any(t.is_meta for t in tensors.values())
    assert all(tensors[k].dtype == v.dtype for k, v in wav2lip_weights.items())
    assert all(torch.equal(tensors[k], v.to(tensors[k].dtype)) for k, v in half.items())


def test_raw_state_dict(tmp_path):
    sd = det_state_dict("SyncNet_color")
    torch.save(sd, tmp_path / "raw.pth")
    assert same_weights(checkpoints.load_model(models.SyncNet_color(), tmp_path / "raw.pth", "SyncNet_color"), sd)


def test_wrong_model_names_both(tmp_path):
    torch.save(original_container(det_state_dict("SyncNet_color")), tmp_path / "expert.pth")
    with pytest.raises(
        UserError, match=r"expert\.pth: this is a SyncNet_color checkpoint; --checkpoint_path expects Wav2Lip"
    ):
        checkpoints.load_model(models.Wav2Lip(), tmp_path / "expert.pth", "Wav2Lip")
    torch.save({"foo": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="not a checkpoint of any model"):
        checkpoints.load_model(models.Wav2Lip(), tmp_path / "other.pth", "Wav2Lip")


def test_truncated_file(tmp_path, wav2lip_weights):
    path = tmp_path / "wav2lip.pth"
    torch.save(original_container(wav2lip_weights), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"wav2lip\.pth: cannot be read.*truncated"):
        checkpoints.load_model(models.Wav2Lip(), path, "Wav2Lip")


def test_missing_file_says_where_it_goes(tmp_path):
    with pytest.raises(UserError) as e:
        checkpoints.load_model(models.Wav2Lip(), tmp_path / "wav2lip_gan.pth", "Wav2Lip")
    msg = str(e.value)
    assert "wav2lip_gan.pth: file not found" in msg and "checkpoints/" in msg and "README.md" in msg


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "x.pth").write_text("hello")
    with pytest.raises(UserError, match=r"x\.pth"):
        checkpoints.load_model(models.Wav2Lip(), tmp_path / "x.pth", "Wav2Lip")


def test_ours_load_in_the_original_way(tmp_path):
    """What the original inference.py does: torch.load, strip 'module.', strict load_state_dict."""
    model = models.SyncNet_color()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    path = tmp_path / "ckpt" / "checkpoint_step000000003.pth"
    checkpoints.save_checkpoint(path, model, opt, 3, 1, hparams=hparams.values(), syncnet_wt=0.01)
    ckpt = torch.load(path, weights_only=True)
    assert {"state_dict", "optimizer", "global_step", "global_epoch"} <= set(ckpt)
    assert ckpt["global_step"] == 3 and ckpt["hparams"]["syncnet_batch_size"] == 64
    fresh = models.SyncNet_color()
    fresh.load_state_dict({k.replace("module.", ""): v for k, v in ckpt["state_dict"].items()})
    torch.optim.Adam(fresh.parameters()).load_state_dict(ckpt["optimizer"])
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_atomic_save_leaves_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "c.pth"
    checkpoints.atomic_save({"a": torch.ones(1)}, path)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.atomic_save({"a": torch.zeros(1)}, path)
    assert torch.equal(torch.load(path)["a"], torch.ones(1))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"]


def test_identify_every_architecture():
    for arch in ("Wav2Lip", "SyncNet_color", "Wav2Lip_disc_qual", "s3fd", "syncnet_python_S"):
        assert checkpoints.identify(det_state_dict(arch)) == arch


def test_hostile_pickle_is_never_unpickled(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    path.write_bytes(b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01cos\nsystem\nq\x02s.")
    with pytest.raises(UserError, match=r"evil\.pth: refused for safety: the file holds more than weights"):
        checkpoints.load_model(models.Wav2Lip(), path, "Wav2Lip")
    assert "warning" not in capsys.readouterr().err


def test_python_objects_besides_weights_are_refused_not_unpickled(tmp_path, capsys):
    """Issue 14: no fallback to full unpickling, even for numpy arrays (a crafted file looks the same)."""
    torch.save({"state_dict": det_state_dict("SyncNet_color"), "extra": np.zeros(3)}, tmp_path / "np.pth")
    with pytest.raises(UserError, match=r"np\.pth: refused for safety.*numpy"):
        checkpoints.load_model(models.SyncNet_color(), tmp_path / "np.pth", "SyncNet_color")


def test_mismatch_names_the_keys(tmp_path, wav2lip_weights):
    sd = dict(wav2lip_weights)
    del sd["output_block.1.bias"]
    sd["output_block.1.weight"] = torch.zeros(4, 32, 1, 1)
    torch.save(original_container(sd), tmp_path / "bad.pth")
    with pytest.raises(
        UserError, match=r"missing output_block\.1\.bias; wrong shape output_block\.1\.weight \[4, 32, 1, 1\]"
    ):
        checkpoints.load_model(models.Wav2Lip(), tmp_path / "bad.pth", "Wav2Lip")
