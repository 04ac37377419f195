"""A package, so that its test modules may share a basename with another folder's: tests/cli/test_generate.py
(cli/generate.py) would clash with tests/test_generate.py (generate.py) otherwise."""
