"""Downloads of the global model share its framed chunks (fedserver/transport/downloads.py):
each chunk is copied into a message once for all the clients pulling it together, within a
window of chunks, never a second model."""

from __future__ import annotations

import gc
import weakref
from types import SimpleNamespace

import numpy as np

from fedcore.tensors import iter_chunks
from fedcore.wire import data_message
from fedserver.transport.downloads import FramedWindow, framed

CHUNK = 1024
COUNTED = SimpleNamespace(sent=lambda n: None)  # the Metrics hook framed() reports to


def _expected(buffer: np.ndarray) -> list[bytes]:
    return [data_message(chunk) for chunk in iter_chunks(buffer, CHUNK)]


def test_downloads_in_step_send_the_same_framed_messages() -> None:
    model = np.arange(10 * CHUNK + 7, dtype=np.uint32).view(np.uint8)
    window = FramedWindow(size=4)
    first, second = framed(model, CHUNK, COUNTED, window), framed(model, CHUNK, COUNTED, window)
    pairs = list(zip(first, second, strict=True))
    assert all(a is b for a, b in pairs)  # framed once, sent twice
    assert [a for a, _ in pairs] == _expected(model)
    # A download that fell behind the window frames its own: the same bytes.
    late = list(framed(model, CHUNK, COUNTED, window))
    assert late == _expected(model)
    assert not any(a is b for (a, _), b in zip(pairs, late, strict=True))


def test_a_new_model_replaces_the_window_which_keeps_no_model_alive() -> None:
    window = FramedWindow(size=4)
    old = np.zeros(3 * CHUNK, dtype=np.uint8)
    assert list(framed(old, CHUNK, COUNTED, window)) == _expected(old)
    new = np.ones(3 * CHUNK, dtype=np.uint8)
    assert list(framed(new, CHUNK, COUNTED, window)) == _expected(new)
    gone = weakref.ref(new)
    del new
    gc.collect()
    assert gone() is None
