"""The test suite; tests/test_<module>.py mirrors app/<module>.py."""

import sys

import harness
import harness.ports

# Temporary: tests/test_admission_redis.py (request-path rewrite in progress, not edited here)
# still imports app.devtools.ports, now harness.ports. Remove once that import is updated.
sys.modules.setdefault("app.devtools", harness)
sys.modules.setdefault("app.devtools.ports", harness.ports)
