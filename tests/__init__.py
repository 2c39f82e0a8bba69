"""edgecow's test suite; what the tests share is in tests/support, the fixtures in conftest.py."""
