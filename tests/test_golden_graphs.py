"""Golden graphs (``graphs/*.txt``): each family's attention regions before and after the rewrite
must be exactly what is committed. A difference is either a regression or an improvement to
review: regenerate with ``python graphs/regenerate.py <family>`` and read the diff."""
import difflib
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("transformers")

GRAPHS = Path(__file__).resolve().parent.parent / "graphs"
_spec = importlib.util.spec_from_file_location("regenerate", GRAPHS / "regenerate.py")
regenerate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(regenerate)


@pytest.mark.slow  # a Dynamo trace of every family: `python -m pytest -m slow`
@pytest.mark.parametrize("name", sorted(regenerate.NAMES))
def test_golden_graph_is_current(name, fresh_dynamo):
    want = regenerate.path(name).read_text()
    got = regenerate.render(name)
    if got != want:
        diff = "".join(difflib.unified_diff(want.splitlines(True), got.splitlines(True),
                                            f"graphs/{name}.txt (committed)", "now"))
        pytest.fail(f"graphs/{name}.txt is stale; review and regenerate with "
                    f"`python graphs/regenerate.py {name}`:\n{diff}")
