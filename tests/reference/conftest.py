"""pytest setup for the Python references: one fresh random seed per run.

Set MQA_TEST_SEED=N to replay a run; the seed is shown in the session header and in
every assertion message that depends on it.
"""

import os
import secrets
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_env = os.environ.get("MQA_TEST_SEED", "").strip()
RUN_SEED = int(_env) if _env else secrets.randbelow(2**31 - 1)


def pytest_report_header(config):
    return f"mqa reference tests: seed={RUN_SEED} (replay with MQA_TEST_SEED={RUN_SEED})"


@pytest.fixture(scope="session")
def run_seed():
    print(f"mqa reference tests: seed={RUN_SEED}")
    return RUN_SEED
