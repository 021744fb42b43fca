"""Ready-made tasks on scikit-learn's bundled datasets, used by the demo and the tests."""
