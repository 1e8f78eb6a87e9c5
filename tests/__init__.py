"""The test suite; tests/test_<module>.py mirrors app/<module>.py."""
