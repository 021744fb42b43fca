"""NVFlare client script for bench.large_model (runs in .venv-nvflare, not in fedgrpc's .venv).

Receives the one float32 array and returns it + 1e-4, training nothing, as fedgrpc's clients
in bench.large_model do.
"""

from __future__ import annotations

import numpy as np
import nvflare.client as flare
from nvflare.app_common.np.constants import NPConstants

DELTA = np.float32(1e-4)


def main() -> None:
    flare.init()
    while flare.is_running():
        model = flare.receive()
        weights = model.params[NPConstants.NUMPY_KEY]
        out = flare.FLModel(
            params={NPConstants.NUMPY_KEY: np.add(weights, DELTA, dtype=np.float32)},
            params_type=flare.ParamsType.FULL,
            metrics={},
            current_round=model.current_round,
        )
        del weights, model  # the received model is not kept while the result goes out
        flare.send(out)


if __name__ == "__main__":
    main()
