"""A package, so that its test modules may share a basename with another folder's: pytest imports test files
by basename otherwise, and tests/data/test_labels.py (data/labels.py) would clash with tests/train/test_labels.py."""
