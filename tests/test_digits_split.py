"""examples/digits.py reads scikit-learn's digits file and a committed split instead of importing
scikit-learn in every process: both must stay exactly what scikit-learn itself gives."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from examples import digits


@pytest.mark.timeout(120)
def test_digits_file_reads_as_sklearn_loads_it() -> None:
    pixels, labels = digits.load_digits_file()
    bunch = load_digits()
    assert np.array_equal(pixels, bunch.data)
    assert np.array_equal(labels, bunch.target)


@pytest.mark.timeout(120)
def test_committed_split_is_sklearns_stratified_split() -> None:
    _, labels = digits.load_digits_file()
    pool, test = train_test_split(
        np.arange(len(labels)),
        test_size=digits.SERVER_TEST_FRACTION,
        stratify=labels,
        random_state=digits.SPLIT_SEED,
    )
    split = json.loads(digits.SPLIT_FILE.read_text())
    assert split["pool"] == pool.tolist()
    assert split["test"] == test.tolist()
    _, y_pool, x_test, y_test = digits._arrays()
    assert (len(y_pool), len(y_test)) == (1437, 360)
    assert np.array_equal(x_test, (load_digits().data[test] / 16.0).astype(np.float32))
