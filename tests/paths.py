"""Where the shared fixtures live: ../shared beside the checkout (as in CI), never an absolute path."""
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = SHARED / "fixtures"
FIXTURE_46 = FIXTURES / "minicpm-v-4.6"
GOLDEN = FIXTURES / "golden"
