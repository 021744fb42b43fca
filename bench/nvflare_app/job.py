"""NVFlare side of bench.large_model: NumpyFedAvgRecipe in SimEnv (runs in .venv-nvflare).

The initial model is one float32 array saved as .npy by bench.large_model (--initial); each of
--clients simulated clients returns it + 1e-4 (client.py) for --rounds rounds. `--no-streaming`
sets np_download_chunk_size = 0 on the server and the clients: NVFlare's numpy decomposer then
puts arrays into the message itself instead of its default chunked download streaming.

    .venv-nvflare/bin/python bench/nvflare_app/job.py --initial /tmp/nv/initial.npy \
        --clients 3 --rounds 3 --workdir /tmp/nv
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nvflare.app_common.np.recipes.fedavg import NumpyFedAvgRecipe
from nvflare.recipe import SimEnv

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--initial", type=Path, required=True, help="the round-0 model (.npy)")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--no-streaming", action="store_true")
    args = parser.parse_args()
    # A checkpoint file, not `model=`: the recipe would write an array into the job's JSON
    # config as a list of 100 M numbers.
    recipe = NumpyFedAvgRecipe(
        name="large-model",
        initial_ckpt=str(args.initial.resolve()),
        min_clients=args.clients,
        num_rounds=args.rounds,
        train_script=str(HERE / "client.py"),
    )
    if args.no_streaming:
        recipe.add_server_config({"np_download_chunk_size": 0})
        recipe.add_client_config({"np_download_chunk_size": 0})
    env = SimEnv(num_clients=args.clients, workspace_root=str(args.workdir / "sim"))
    run = recipe.execute(env)
    run.get_result()
    if env.last_run_failed:
        raise SystemExit("NVFlare simulator run failed")


if __name__ == "__main__":
    main()
