import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # shared test helpers (strategy_helpers.py)


# ---- tiny causal LMs (tests/lm_helpers.py): one per test module, built in code ---------------------

@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A random 2-layer Llama checkpoint with its tiny tokenizer."""
    import lm_helpers

    return lm_helpers.llama(tmp_path_factory.mktemp("llama") / "m")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    """120 prompt/completion rows (lm_helpers.rows) as JSONL."""
    import lm_helpers

    return lm_helpers.write_jsonl(tmp_path_factory.mktemp("d") / "rows.jsonl", lm_helpers.rows())
