import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def extractor():
    """The real pipeline: the pinned English model + the phrase component (loaded once per session)."""
    from powerclip.phrases import PhraseExtractor

    return PhraseExtractor()
