"""Loaded by worker children in tests (PYTHONPATH): registers the fake step in pipelines.STEPS."""

import pipelines
from tests import fake_steps

pipelines.STEPS["fake"] = fake_steps
