"""CKKS aggregation core (fedcore/he.py): exact-enough sums, and no decryption without the key."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tenseal")

from examples.digits import task
from fedcore.he import SLOTS, HEAggregator, HEClient, HEError, generate_keys
from fedserver.coordinator.central_eval import initial_model

pytestmark = pytest.mark.timeout(120)
# Stated CKKS precision bound for N=8192, scale 2^40: absolute error of a decrypted sum of
# example-weighted updates with |values| <= 1e3 (measured max ~2e-8; see the docstring).
ABS_BOUND = 1e-5


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return generate_keys(tmp_path_factory.mktemp("he"))


def _updates(n: int, size: int) -> tuple[list[np.ndarray], list[int]]:
    rng = np.random.default_rng(0)
    return [rng.normal(0, 0.05, size).astype(np.float32) for _ in range(n)], [120, 480, 37][:n]


def test_decrypted_aggregate_equals_fedavg_within_ckks_precision(keys: tuple[Path, Path]) -> None:
    secret, public = keys
    size = sum(t.numel for t in initial_model(task, 0).manifest.floats().tensors)  # 4810
    deltas, weights = _updates(3, size)
    clients = [HEClient(secret) for _ in deltas]
    coordinator = HEAggregator(public, size)
    started = time.perf_counter()
    blobs = [c.encrypt(d, w) for c, d, w in zip(clients, deltas, weights, strict=True)]
    encrypt_s = (time.perf_counter() - started) / len(blobs)
    started = time.perf_counter()
    for b in blobs:
        coordinator.add(b)
    aggregate = coordinator.aggregate()
    add_s = time.perf_counter() - started
    mean = clients[0].decrypt(aggregate, size) / np.float32(sum(weights))
    plain = sum(np.float64(w) * d for d, w in zip(deltas, weights, strict=True)) / sum(weights)
    error = float(np.abs(mean - plain).max())
    wire = sum(len(b) for b in blobs[0])
    print(
        f"\nHE digits ({size} floats, {len(blobs[0])} ciphertexts): {wire} bytes per update vs "
        f"{4 * size} fp32 = {wire / (4 * size):.1f}x; encrypt {encrypt_s * 1e3:.0f} ms/client, "
        f"add {add_s * 1e3:.0f} ms for 3; max |error| of the mean {error:.2e}"
    )
    assert len(blobs[0]) == -(-size // SLOTS)
    assert error <= ABS_BOUND / sum(weights) * 10
    weighted_sum = clients[0].decrypt(aggregate, size)
    reference = sum(np.float64(w) * d for d, w in zip(deltas, weights, strict=True))
    assert float(np.abs(weighted_sum - reference).max()) <= ABS_BOUND


def test_coordinator_context_cannot_decrypt(keys: tuple[Path, Path]) -> None:
    secret, public = keys
    coordinator = HEAggregator(public, 10)
    assert not coordinator.ctx.is_private()
    one = HEClient(secret).encrypt(np.arange(10, dtype=np.float32))
    coordinator.add(one)
    import tenseal as ts

    single = ts.ckks_vector_from(coordinator.ctx, one[0])
    with pytest.raises(ValueError, match="secret_key"):
        single.decrypt()
    with pytest.raises(HEError, match="holds no secret key"):
        HEClient(public)
    with pytest.raises(HEError, match="contains the secret key"):
        HEAggregator(secret, 10)


def test_bad_ciphertexts_are_refused_without_folding(keys: tuple[Path, Path]) -> None:
    secret, public = keys
    coordinator = HEAggregator(public, SLOTS + 1)
    good = HEClient(secret).encrypt(np.ones(SLOTS + 1, dtype=np.float32))
    with pytest.raises(HEError, match="expected 2"):
        coordinator.add(good[:1])
    with pytest.raises(HEError, match="not a CKKS ciphertext"):
        coordinator.add([good[0], b"garbage"])
    assert coordinator.count == 0
    coordinator.add(good)
    out = HEClient(secret).decrypt(coordinator.aggregate(), SLOTS + 1)
    np.testing.assert_allclose(out, 1.0, atol=ABS_BOUND)


def test_he_keygen_command(tmp_path: Path) -> None:
    from fedserver.cli import main

    assert main(["he-keygen", str(tmp_path / "keys")]) == 0
    secret, public = tmp_path / "keys" / "he-secret.ctx", tmp_path / "keys" / "he-public.ctx"
    assert HEClient(secret).ctx.is_private()
    assert not HEAggregator(public, 1).ctx.is_private()
    assert (secret.stat().st_mode & 0o777) == 0o600


@pytest.mark.usefixtures("open_umask")
def test_he_keygen_refuses_to_overwrite_and_force_always_writes_0600(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedserver.cli import main

    out = tmp_path / "keys"
    assert main(["he-keygen", str(out)]) == 0
    secret, public = out / "he-secret.ctx", out / "he-public.ctx"
    before = secret.read_bytes(), public.read_bytes()
    assert main(["he-keygen", str(out)]) == 2
    assert "already exist" in capsys.readouterr().err
    assert (secret.read_bytes(), public.read_bytes()) == before
    secret.chmod(0o644)  # the bug: a re-run kept this mode for the new secret
    public.unlink()  # one file left is still refused: the pair belongs together
    assert main(["he-keygen", str(out)]) == 2
    assert main(["he-keygen", str(out), "--force"]) == 0
    assert secret.read_bytes() != before[0]
    assert {p.stat().st_mode & 0o777 for p in (secret, public)} == {0o600}
