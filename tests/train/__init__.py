"""A package, so that its test modules may share a basename with another folder's: pytest imports test files
by basename otherwise, and tests/train/test_autoencoder.py (train/autoencoder.py) would clash with
tests/models/test_autoencoder.py, tests/train/test_labels.py with tests/data/test_labels.py."""
