"""Citations of docs/design.md in the code name sections that exist there."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
CITATION = re.compile(r"docs/design\.md#([a-z0-9-]+)")


def _anchor(heading: str) -> str:
  """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
  return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


def test_every_cited_section_exists():
  text = (ROOT / "docs" / "design.md").read_text()
  anchors = {_anchor(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}
  cited = {}
  for folder in ("robust_u1_jax", "configs", "tests"):
    for path in (ROOT / folder).rglob("*.py"):
      for anchor in CITATION.findall(path.read_text()):
        cited.setdefault(anchor, []).append(str(path.relative_to(ROOT)))
  missing = {a: files for a, files in cited.items() if a not in anchors}
  assert not missing, f"cited sections missing from docs/design.md: {missing}"
  assert len(cited) >= 5  # the citations were found at all
  assert _anchor("Model: BAGEL-7B-MoT") == "model-bagel-7b-mot"
