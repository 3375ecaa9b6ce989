import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # shared test helpers (strategy_helpers.py)
