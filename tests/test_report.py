"""The report's verdicts on fixed numbers: each claim's 'holds' and its margin in standard errors
(a verdict the report prints must follow the claim's words, not only its direction), and the
per-question-kind table's cells."""

import pytest

from robust_u1_jax.eval import report


def _pipeline(corrupted, recovered, gain_se=None, level="25%"):
  """A pipeline condition's row as `Evaluator.evaluate` writes it: (ssim, psnr) pairs."""
  row = {"family": "robust_r1_pipeline", "level": level, "accuracy": {},
         "corrupted": {"ssim": corrupted[0], "psnr": corrupted[1]},
         "recovered": {"ssim": recovered[0], "psnr": recovered[1]}}
  if gain_se is not None:
    row["gain_se"] = {"ssim": gain_se[0], "psnr": gain_se[1]}
  return row


@pytest.mark.parametrize("corrupted, recovered, holds", [
    ((0.30, 14.0), (0.40, 16.0), True),   # both rise
    ((0.30, 14.0), (0.40, 13.0), False),  # SSIM rises, PSNR falls: the claim says "both"
    ((0.30, 14.0), (0.20, 15.0), False),  # PSNR rises, SSIM falls
    ((0.30, 14.0), (0.20, 13.0), False),  # both fall
])
def test_the_recovery_claim_holds_only_where_ssim_and_psnr_both_rise(corrupted, recovered, holds):
  [row] = report.claims({"conditions": [_pipeline(corrupted, recovered)]})
  assert "SSIM and PSNR both" in row["claim"] and row["holds"] is holds


def test_the_recovery_claims_margin_is_its_nearer_metrics():
  # SSIM +0.10 / 0.05 = 2.0 clear, PSNR -1.00 / 0.25 = -4.0 (short): the claim stands or falls on
  # both, so its margin is the worse of the two, with its sign.
  [row] = report.claims({"conditions": [_pipeline((0.30, 14.0), (0.40, 13.0), (0.05, 0.25))]})
  assert not row["holds"] and row["margin_se"] == pytest.approx(-4.0)
  assert report.margin_words(row) == " (4.0 standard errors short)"


# Clean accuracy with recovery on against off: "within 2 points" either way (design: recovery
# always on must not cost the clean image its answers, nor change them; a rise beyond 2 points is
# as far from "keeps" as a fall), margin = (2 points - |on - off|) / se.
@pytest.mark.parametrize("on, se, holds, margin", [
    (0.49, 0.005, True, 2.0),   # 1 point lower: 1 point inside, 2 standard errors
    (0.51, 0.005, True, 2.0),   # 1 point higher: the same
    (0.47, 0.010, False, -1.0),  # 3 points lower: 1 point outside
    (0.53, 0.010, False, -1.0),  # 3 points higher: outside too
    (0.45, 0.010, False, -3.0),  # 5 points lower
    (0.50, 0.004, True, 5.0),   # unchanged: the full 2 points clear
])
def test_the_clean_accuracy_claim_reads_the_size_of_the_change(on, se, holds, margin):
  [row] = report.claims({"conditions": [], "clean": {"accuracy": 0.5},
                         "clean_with_recovery": {"accuracy": on, "minus_off_se": se}})
  assert "within 2 points" in row["claim"]
  assert row["holds"] is holds and row["margin_se"] == pytest.approx(margin)
  words = f" ({abs(margin):.1f} standard errors {'clear' if holds else 'short'})"
  assert report.margin_words(row) == words
  assert report._verdict(row) == ("yes" if holds else "**no**") + words


def test_the_per_kind_table_averages_each_mode_over_the_conditions():
  answers = [{"kind": "colour", "answer": "A", "correct": True, "options": 2},
             {"kind": "shape", "answer": "", "correct": False, "options": 4}]
  by_kind = lambda colour, shape: {"corrupted": {"colour": colour, "shape": shape}}
  result = {"num_samples": 2,
            "clean": {"by_kind": {"colour": 1.0, "shape": 0.0}, "answers": answers},
            "conditions": [{"by_kind": by_kind(0.25, 0.0)}, {"by_kind": by_kind(0.75, 0.5)}]}
  lines = report.by_kind_table(result, ["corrupted"])
  # The mean over the two conditions (the heading says so), not the best or the last of them.
  assert "| colour | 1 | 50.0 | 100.0 | 50.0 |" in lines
  assert "| shape | 1 | 25.0 | 0.0 | 25.0 |" in lines
  # The reply that named no option is counted apart (conditions without counts add none).
  assert lines[-1] == "Replies naming no option (scored wrong): 1 of 2 on clean images."
  result["conditions"][0]["no_option"] = {"corrupted": [2, 2], "recovered": [1, 2]}
  assert report.by_kind_table(result, ["corrupted"])[-1] == (
      "Replies naming no option (scored wrong): 1 of 2 on clean images, 2 of 2 under the "
      "conditions (every mode).")
