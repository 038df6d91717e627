"""`sapwood bench predict`: p50 / p99 latency of one batch-of-one surrogate prediction.

Ours: :class:`sapwood.model.cube.CubePredictor` (preallocated buffers, inference mode; on a GPU a
captured CUDA graph, optionally ``torch.compile``) followed by the exact mass fixer. Baseline: the plain
eager path a server would write first: a fresh tensor from the request's numpy array, ``model(...)``
under ``no_grad``, then the same mass fixer. Both produce the same numbers (checked before timing).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from sapwood.bench.harness import Result, print_results, synchronize, write_suite
from sapwood.config import Config, load_config
from sapwood.model import build_model, load
from sapwood.model.cube import CubePredictor


def _latencies(fn, repeats: int, device: torch.device) -> np.ndarray:
    for _ in range(max(5, repeats // 10)):
        fn()
    synchronize(device)
    samples = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples[i] = time.perf_counter() - start
    return samples * 1e3


def _simulated_state(cube) -> tuple[np.ndarray, np.ndarray]:
    """One simulated Earth-like state ``[1, C, lat, lon]`` on the model's grid and its planet parameters."""
    from sapwood.data.simulate import PLANET_VARIABLES, Grid, PlanetParams, run_states

    planet = PlanetParams()
    fields, _ = next(iter(run_states(planet, Grid(levels=cube.levels, nlat=cube.lat, nlon=cube.lon, times=2,
                                                             spinup_days=1))))
    frame = np.concatenate(
        [fields[v][None] if v in cube.surface_variables else fields[v] for v in cube.variables]
    )
    values = {name: getattr(planet, field) for name, (field, _, _) in PLANET_VARIABLES.items()}
    params = [values[name] for name in cube.planet_params] or [1.0]
    return frame.astype(np.float32)[None], np.asarray([params], dtype=np.float32)


def run_predict_bench(out_dir: Path, source: str = "cube-small", repeats: int = 300, device: str = "auto",
                      compile: bool = False) -> list[Result]:
    """Time both paths on a checkpoint folder or a cube preset (randomly initialized)."""
    from sapwood.physics import Geometry, mass_fix

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    if Path(source).is_dir():
        model = load(source, device=dev)
        config: Config = load_config(Path(source) / "config.yaml")
    else:
        config = load_config(source)
        torch.manual_seed(0)
        model = build_model(config, dev).eval()
    cube = config.cube
    if cube is None:
        from sapwood.errors import SapwoodError

        raise SapwoodError(f"{source}: not a datacube surrogate (no 'cube:' section)")
    geometry = Geometry.default(cube, device=dev)
    state_np, params_np = _simulated_state(cube)

    def baseline() -> torch.Tensor:
        with torch.no_grad():
            state = torch.from_numpy(state_np).to(dev)
            params = torch.from_numpy(params_np).to(dev) if cube.planet_params else None
            return mass_fix(model(state, params), state, geometry).cpu()

    predictor = CubePredictor(model, compile=compile)
    state_t, params_t = torch.from_numpy(state_np), torch.from_numpy(params_np)

    def ours() -> torch.Tensor:
        pred = predictor(state_t, params_t)
        return mass_fix(pred, predictor.state, geometry).cpu()

    torch.testing.assert_close(ours(), baseline(), rtol=1e-4, atol=1e-3)
    ours_ms = _latencies(ours, repeats, dev)
    base_ms = _latencies(baseline, repeats, dev)
    params = {"source": source, "device": str(dev), "repeats": repeats, "channels": cube.channels,
              "grid": f"{cube.lat}x{cube.lon}", "hidden": config.model.hidden, "layers": config.model.layers,
              "cuda_graph": predictor.graph is not None, "compile": compile}
    results = [
        Result("p50 latency, batch of one", float(np.percentile(ours_ms, 50)), "ms",
               float(np.percentile(base_ms, 50)), params=params, baseline="eager, fresh tensors"),
        Result("p99 latency, batch of one", float(np.percentile(ours_ms, 99)), "ms",
               float(np.percentile(base_ms, 99)), params=params, baseline="eager, fresh tensors"),
    ]
    write_suite("predict", results, out_dir)
    print_results(results)
    return results
