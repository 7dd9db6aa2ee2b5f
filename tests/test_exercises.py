"""vqlab.exercises.check (the notebooks' fill-in checks) and vqlab.claims (the quoted figures)."""
import pytest
import torch

from vqlab.claims import MARKER, MIME, claims, normalize
from vqlab.exercises import check


def _stub():
    raise NotImplementedError


def test_untouched_stub_is_not_done_not_a_failure(capsys):
    check("Fill-in 1", _stub, torch.zeros(3))
    check("Fill-in 1", lambda: None, torch.zeros(3))
    assert capsys.readouterr().out.count("not done yet") == 2


def test_right_answer_passes_and_wrong_answer_says_what_differs(capsys):
    check("Fill-in 2", lambda: torch.ones(2, 3), torch.ones(2, 3) + 1e-7)
    assert "correct" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="shape"):
        check("Fill-in 2", lambda: torch.ones(3), torch.ones(2, 3))
    with pytest.raises(AssertionError, match=r"largest difference 0.5 at index \(1, 2\).*hint text"):
        bad = torch.ones(2, 3)
        bad[1, 2] = 1.5
        check("Fill-in 2", lambda: bad, torch.ones(2, 3), hint="hint text")
    check("tuple", lambda: (torch.ones(2), 3.0), (torch.ones(2), 3.0))
    assert capsys.readouterr().out.endswith("tuple: correct.\n")
    with pytest.raises(AssertionError, match="tuple"):
        check("tuple", lambda: torch.ones(2), (torch.ones(2), 3.0))


def test_claims_display_and_marker_syntax():
    bundle = claims(ratio="7.6", delta="-0.60")._repr_mimebundle_()
    assert bundle[MIME] == {"ratio": "7.6", "delta": "-0.60"} and "7.6" in bundle["text/html"]
    with pytest.raises(ValueError, match="claim names"):
        claims(**{"bad key": "1"})
    text = ("**7.6<!--{{ratio}}-->×** smaller, −0.60<!--{{02:delta}}--> points; `features.3`<!--{{worst}}-->; "
            "MSE 1.892e-03<!--{{mse}}-->")
    found = [(m["value"], m["nb"], m["key"]) for m in MARKER.finditer(text)]
    assert found == [("7.6", None, "ratio"), ("−0.60", "02", "delta"), ("features.3", None, "worst"),
                     ("1.892e-03", None, "mse")]
    assert normalize("−0.60") == normalize("-0.60")
