"""Augmentation: exact symmetries (roll round trip, double flip), positivity, budgets kept, raw == normalized;
the fused one-pass kernel equals the reference transforms (separate passes) to round-off."""

from __future__ import annotations

import threading

import pytest
import torch

from sapwood.data import augment_cpu
from sapwood.data.augment import (
    ALL_PROPERTIES,
    Augment,
    ChannelRoles,
    HemisphereFlip,
    LongitudeRoll,
    Noise,
    PreparedPlanes,
    RollAndFlip,
    TimeCrop,
    augment_planes,
    hash_uniform,
    mix32,
    numpy_loop_augment,
    reference_augment,
    roll_and_flip,
    seed_key,
)
from sapwood.data.loader import CubeLoader
from sapwood.data.simulate import SPECIFIC_HEAT, Grid
from sapwood.data.store import CubeStore
from sapwood.errors import SapwoodError


@pytest.fixture(scope="module")
def store(make_cube_store):
    return make_cube_store(runs=2, grid=Grid(levels=3, nlat=8, nlon=16, times=7, spinup_days=1), seed=4)


@pytest.fixture
def batch(store):
    return next(iter(CubeLoader(store, batch_size=6, segments_per_batch=2, window=3, seed=0)))


def global_budgets(frames: torch.Tensor, store: CubeStore, params: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per (frame, sample) mass, water, enthalpy, kinetic energy and axial angular momentum in float64."""
    x = frames.double()
    lat = torch.tensor(store.coords["lat"], dtype=torch.float64).deg2rad()
    edges = torch.cat([torch.tensor([-torch.pi / 2]), (lat[1:] + lat[:-1]) / 2, torch.tensor([torch.pi / 2])])
    area = (edges[1:].sin() - edges[:-1].sin())[:, None].expand(len(lat), x.shape[-1])  # per unit a^2 dlon
    levels = len(store.coords["lev"])
    ps = x[:, :, store.channel_slice("ps")][:, :, 0]
    dp = ps[:, :, None] / levels
    coslat = lat.cos()[:, None]

    def field(name: str) -> torch.Tensor:
        return x[:, :, store.channel_slice(name)]

    def integral(values: torch.Tensor) -> torch.Tensor:
        return (values * dp * area).sum(dim=(-3, -2, -1))

    radius, omega = params[:, 0].double(), params[:, 2].double()
    u, v = field("u"), field("v")
    return {
        "mass": (ps * area).sum(dim=(-2, -1)), "water": integral(field("q")),
        "enthalpy": SPECIFIC_HEAT * integral(field("T")), "kinetic": integral(0.5 * (u**2 + v**2)),
        "angular_momentum": integral((u + (omega * radius)[None, :, None, None, None] * coslat) * coslat),
    }


def test_roll_round_trips_and_matches_torch_roll(batch, store):
    roles = ChannelRoles.from_store(store, normalized=False)
    shifts = torch.tensor([0, 1, 5, 15, 7, 3])
    none = torch.zeros(6, dtype=torch.bool)
    rolled = roll_and_flip(batch.frames, shifts, none, roles)
    for b in range(6):
        assert torch.equal(rolled[:, b], torch.roll(batch.frames[:, b], int(shifts[b]), dims=-1))
    back = roll_and_flip(rolled, (-shifts) % 16, none, roles)
    assert torch.equal(back, batch.frames)


def test_double_flip_is_identity_and_flip_negates_v(batch, store):
    roles = ChannelRoles.from_store(store, normalized=False)
    zero, every = torch.zeros(6, dtype=torch.long), torch.ones(6, dtype=torch.bool)
    once = roll_and_flip(batch.frames, zero, every, roles)
    v, u = store.channel_slice("v"), store.channel_slice("u")
    assert torch.equal(once[:, :, v], -batch.frames[:, :, v].flip(-2))
    assert torch.equal(once[:, :, u], batch.frames[:, :, u].flip(-2))
    assert torch.equal(roll_and_flip(once, zero, every, roles), batch.frames)


def test_budgets_and_diagnostic_relations_survive_roll_and_flip(batch, store):
    roles = ChannelRoles.from_store(store, normalized=False)
    augmented = Augment(roles, [RollAndFlip(flip_p=0.5)], seed=3)(batch.frames.clone())
    assert not torch.equal(augmented, batch.frames)
    before, after = (global_budgets(f, store, batch.params) for f in (batch.frames, augmented))
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=1e-12, atol=0)
    sigma = torch.tensor(store.coords["lev"], dtype=torch.float64)[:, None, None]

    def gas_residual(frames: torch.Tensor) -> torch.Tensor:
        x = frames.double()
        t, rho = x[:, :, store.channel_slice("T")], x[:, :, store.channel_slice("rho")]
        ps, q = x[:, :, store.channel_slice("ps")], x[:, :, store.channel_slice("q")]
        return (rho * 287.04 * t * (1 + 0.6078 * q) / (sigma * ps) - 1).abs().max()  # virtual temperature

    assert gas_residual(batch.frames) < 1e-6 and gas_residual(augmented) < 1e-6
    assert RollAndFlip.preserves == ALL_PROPERTIES


def test_noise_keeps_positive_variables_positive_even_when_large(batch, store):
    roles = ChannelRoles.from_store(store, normalized=False, noise={"q": 0.5, "ps": 0.5, "T": 0.5})
    out = Augment(roles, [Noise(frames_to_perturb=(0, 1, 2))], seed=0)(batch.frames.clone())
    for name in ("q", "ps", "T", "rho", "zg"):
        channels = store.channel_slice(name)
        assert (out[:, :, channels] > 0).all(), name
    with pytest.raises(SapwoodError, match="negative"):
        Augment(ChannelRoles.from_store(store, False, noise={"q": 0.7}), [Noise()])(batch.frames.clone())


def test_noise_has_the_declared_per_variable_scales(store):
    roles = ChannelRoles.from_variables([("T", 1), ("u", 1)], noise={"T": 0.01, "u": 2.0})
    frames = torch.ones(1, 64, 2, 32, 32)
    frames[:, :, 0] = 250.0
    out = Augment(roles, [Noise()], seed=1)(frames.clone())
    relative_t = out[0, :, 0] / 250.0 - 1
    added_u = out[0, :, 1] - 1.0
    assert abs(relative_t.std().item() - 0.01) < 0.0005 and abs(relative_t.mean().item()) < 0.0005
    assert abs(added_u.std().item() - 2.0) < 0.05
    assert Noise.preserves == frozenset({"positivity"})


def test_normalized_batches_augment_like_their_physical_values(store):
    raw = next(iter(CubeLoader(store, batch_size=6, segments_per_batch=2, seed=5)))
    normalized = next(iter(CubeLoader(store, batch_size=6, segments_per_batch=2, seed=5, normalize=True)))
    transforms = [RollAndFlip(flip_p=1.0), Noise()]
    out_raw = Augment(ChannelRoles.from_store(store, normalized=False), transforms, seed=2)(
        raw.frames.clone()
    )
    out_norm = Augment(ChannelRoles.from_store(store, normalized=True), transforms, seed=2)(
        normalized.frames.clone()
    )
    torch.testing.assert_close(store.denormalize(out_norm), out_raw, rtol=1e-5, atol=1e-4)


def test_augment_is_deterministic_per_seed_and_declares_what_it_keeps(batch, store):
    roles = ChannelRoles.from_store(store, normalized=False)
    a = Augment(roles, seed=9)(batch.frames.clone())
    b = Augment(roles, seed=9)(batch.frames.clone())
    c = Augment(roles, seed=10)(batch.frames.clone())
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert Augment(roles).preserves == frozenset({"positivity"})
    assert Augment(roles, [LongitudeRoll(), HemisphereFlip()]).preserves == ALL_PROPERTIES


def test_time_crop_takes_consecutive_frames_per_sample(batch, store):
    roles = ChannelRoles.from_store(store, normalized=False)
    cropped = Augment(roles, [TimeCrop(2)], seed=0)(batch.frames)
    assert cropped.shape == (2, *batch.frames.shape[1:])
    for b in range(cropped.shape[1]):
        starts = [k for k in range(2) if torch.equal(cropped[0, b], batch.frames[k, b])]
        assert starts and torch.equal(cropped[1, b], batch.frames[starts[0] + 1, b])
    with pytest.raises(SapwoodError, match="longer"):
        Augment(roles, [TimeCrop(4)])(batch.frames)


def test_numpy_baseline_does_the_same_kind_of_work(batch, store):
    variables = [(v["name"], v["levels"]) for v in store.variables]
    out = numpy_loop_augment(batch.frames.numpy(), variables, seed=0)
    assert out.shape == batch.frames.shape
    for name in ("q", "ps"):
        assert (out[:, :, store.channel_slice(name)] > 0).all()
    budgets_in = global_budgets(batch.frames, store, batch.params)["mass"][1]
    budgets_out = global_budgets(torch.from_numpy(out), store, batch.params)["mass"][1]  # frame 1: no noise
    torch.testing.assert_close(budgets_out, budgets_in, rtol=1e-12, atol=0)


def test_sapwood_physics_budgets_and_thermo_unchanged_by_roll_and_flip(batch, store):
    physics = pytest.importorskip("sapwood.physics")
    from sapwood.config import CubeModelConfig

    cube = CubeModelConfig(levels=3, lat=8, lon=16, planet_params=store.param_names)
    geometry = physics.Geometry.default(cube)
    roles = ChannelRoles.from_store(store, normalized=False)
    augmented = Augment(roles, [RollAndFlip(flip_p=0.5)], seed=1)(batch.frames.clone())
    for k in range(batch.frames.shape[0]):
        before = physics.budgets(batch.frames[k], geometry, batch.params)
        after = physics.budgets(augmented[k], geometry, batch.params)
        for name in ("mass", "water", "energy"):
            torch.testing.assert_close(after[name], before[name], rtol=1e-5, atol=0)
        # per-layer relative momentum changes sign under the flip only through v; u cos(phi) is
        # mirror-symmetric
        torch.testing.assert_close(after["momentum"], before["momentum"], rtol=1e-4, atol=1e-3)
        thermo_before = physics.thermo_residuals(batch.frames[k], geometry, batch.params)
        thermo_after = physics.thermo_residuals(augmented[k], geometry, batch.params)
        torch.testing.assert_close(thermo_after["thermo"], thermo_before["thermo"], rtol=1e-3, atol=1e-5)
        assert float(thermo_before["ideal_gas"].max()) < 1e-3  # truth: ideal gas to round-off (in %)


def draws(frames: torch.Tensor, roles: ChannelRoles, seed: int, noise: Noise | None = None):
    generator = torch.Generator().manual_seed(seed)
    shifts, flips = RollAndFlip().draw(frames, generator)
    return shifts, flips, (noise or Noise()).draw(frames, roles, generator)


@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("in_place", [False, True])
def test_fused_pass_equals_the_reference_transforms(store, normalized, in_place):
    loader = CubeLoader(store, batch_size=6, segments_per_batch=2, window=3, seed=1, normalize=normalized)
    frames = next(iter(loader)).frames.clone()
    roles = ChannelRoles.from_store(store, normalized=normalized, noise={"q": 0.3, "u": 2.0})
    shifts, flips, noise = draws(frames, roles, seed=5, noise=Noise(frames_to_perturb=(0, 2)))
    assert flips.any() and not flips.all() and shifts.unique().numel() > 1
    expected = reference_augment(frames, roles, shifts, flips, noise)
    source = frames.clone()
    fused = augment_planes(source, roles, shifts, flips, noise, in_place=in_place)
    assert (fused.data_ptr() == source.data_ptr()) == in_place
    torch.testing.assert_close(fused, expected, rtol=2e-6, atol=2e-6)
    assert not torch.equal(fused[1], frames[1]) and torch.equal(  # frame 1 only rolled and flipped
        fused[1], roll_and_flip(frames, shifts, flips, roles)[1]
    )
    without_noise = augment_planes(frames.clone(), roles, shifts, flips, None)
    assert torch.equal(without_noise, roll_and_flip(frames, shifts, flips, roles))  # a permutation: exact


def test_fused_pass_handles_odd_grids_and_every_shift():
    roles = ChannelRoles.from_variables([("T", 1), ("v", 2), ("ps", 0)])
    frames = torch.rand(2, 9, 4, 5, 7) + 0.5
    shifts = torch.arange(9) - 1  # -1 .. 7: negative and beyond the grid as torch.roll takes them
    flips = torch.tensor([True, False] * 4 + [True])
    fused = augment_planes(frames, roles, shifts, flips, None)
    for b in range(9):
        expected = torch.roll(frames[:, b], int(shifts[b]), dims=-1)
        if flips[b]:
            expected = expected.flip(-2)
            expected[:, 1:3] = -expected[:, 1:3]
        assert torch.equal(fused[:, b], expected)


@pytest.mark.parametrize("normalized", [False, True])
def test_prepared_planes_equal_the_fused_pass_with_the_same_draws(store, normalized):
    loader = CubeLoader(store, batch_size=6, segments_per_batch=2, window=3, seed=2, normalize=normalized)
    frames = next(iter(loader)).frames.clone()
    roles = ChannelRoles.from_store(store, normalized=normalized)
    noise = Noise(frames_to_perturb=(0, 2))
    shifts, flips, drawn = draws(frames, roles, seed=6, noise=noise)
    prepared = PreparedPlanes(roles, 3, *noise.coefficients(roles, 3))
    out = prepared(frames.clone(), shifts, flips, drawn.seed)
    assert torch.equal(out, augment_planes(frames.clone(), roles, shifts, flips, drawn))
    assert not torch.equal(out[0], roll_and_flip(frames, shifts, flips, roles)[0])  # frame 0 is perturbed
    plain = PreparedPlanes(roles, 3)(frames.clone(), shifts, flips)
    assert torch.equal(plain, roll_and_flip(frames, shifts, flips, roles))


def test_seed_key_is_mix32_of_the_seed():
    for seed in (0, 1, 12345, 2**31 - 2, 2**40 + 3):
        assert seed_key(seed) == int(mix32(torch.tensor([seed & 0xFFFFFFFF], dtype=torch.int64))[0])


def test_parallel_launches_from_two_threads_at_once_both_finish_and_agree():
    roles = ChannelRoles.from_variables([("T", 3), ("v", 3), ("ps", 0)])
    frames = torch.rand(2, 8, 7, 32, 64, generator=torch.Generator().manual_seed(3)) + 0.5
    shifts, flips, noise = draws(frames, roles, seed=8)
    expected = reference_augment(frames, roles, shifts, flips, noise)
    start, results = threading.Barrier(2), {}

    def work(name: int) -> None:
        start.wait()  # both threads launch together: one takes the pool, the other runs serially
        results[name] = [
            augment_planes(frames.clone(), roles, shifts, flips, noise, in_place=True, threads=2)
            for _ in range(10)
        ]

    workers = [threading.Thread(target=work, args=(name,)) for name in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert sorted(results) == [0, 1]
    # the serial build is its own compilation (numba's disk cache would otherwise share one build)
    assert augment_cpu.fused_planes.targetoptions["parallel"]
    assert "parallel" not in augment_cpu.fused_planes_serial.targetoptions
    builds = (augment_cpu.fused_planes, augment_cpu.fused_planes_serial)
    assert len({build.py_func.__qualname__ for build in builds}) == 2
    for outputs in results.values():
        for out in outputs:
            torch.testing.assert_close(out, expected, rtol=2e-6, atol=2e-6)


def test_the_noise_field_is_uniform_independent_and_thread_count_free(store):
    field = hash_uniform(7, (2, 16, 8, 32, 64), (0,))
    assert field.shape == (1, 16, 8, 32, 64)
    assert float(field.min()) > -0.5 and float(field.max()) < 0.5
    assert abs(float(field.mean())) < 0.002 and abs(float(field.std()) - 12**-0.5) < 0.002
    neighbours = torch.corrcoef(torch.stack([field[..., :-1].flatten(), field[..., 1:].flatten()]))[0, 1]
    planes = torch.corrcoef(torch.stack([field[0, :, 0].flatten(), field[0, :, 1].flatten()]))[0, 1]
    # independent values: sample correlations within 5 standard errors (1/sqrt(n)) of 0 (fixed seed: no
    # chance)
    assert (
        abs(float(neighbours)) < 5 / (16 * 8 * 32 * 63) ** 0.5
        and abs(float(planes)) < 5 / (16 * 32 * 64) ** 0.5
    )
    assert not torch.equal(hash_uniform(8, (2, 16, 8, 32, 64), (0,)), field)
    roles = ChannelRoles.from_store(store, normalized=False)
    frames = next(iter(CubeLoader(store, batch_size=6, segments_per_batch=2, seed=0))).frames
    shifts, flips, noise = draws(frames, roles, seed=2)
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(augment_planes(frames, roles, shifts, flips, noise))
            results[-1] = results[-1].clone()
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


def test_other_devices_and_dtypes_take_the_reference_path_with_the_same_draws(batch, store):
    roles = ChannelRoles.from_store(store, normalized=False)
    fused = Augment(roles, seed=4)(batch.frames.clone())
    on_reference = Augment(roles, seed=4)(batch.frames.double())
    torch.testing.assert_close(on_reference.float(), fused, rtol=2e-6, atol=2e-6)
    if torch.cuda.is_available():  # the GPU feed's device augmentation: the same numbers
        on_gpu = Augment(roles, seed=4)(batch.frames.cuda())
        torch.testing.assert_close(on_gpu.cpu(), fused, rtol=2e-6, atol=2e-6)


def test_augment_fuses_roll_flip_and_noise_with_the_draws_of_the_separate_transforms(batch, store):
    roles = ChannelRoles.from_store(store, normalized=False)
    frames = batch.frames.clone()
    fused = Augment(roles, [RollAndFlip(), Noise()], seed=11)(frames)
    generator = torch.Generator().manual_seed(11)
    step = RollAndFlip()(frames, roles, generator)
    step = Noise()(step, roles, generator)
    torch.testing.assert_close(fused, step, rtol=2e-6, atol=2e-6)
    assert torch.equal(frames, batch.frames)  # out of place by default
    in_place = Augment(roles, seed=11, in_place=True)(frames)
    assert in_place.data_ptr() == frames.data_ptr()
    torch.testing.assert_close(in_place, fused, rtol=0, atol=0)


def test_noise_leaves_budgets_unbiased_to_its_declared_spread(batch, store):
    """Independent per-cell noise moves a global integral by about ``s / sqrt(cells)``, not by ``s``."""
    scale = 0.05
    roles = ChannelRoles.from_store(store, normalized=False, noise={"ps": scale})
    frames = batch.frames.clone()
    out = Augment(roles, [Noise()], seed=0)(frames.clone())
    before = global_budgets(batch.frames, store, batch.params)["mass"][0]
    after = global_budgets(out, store, batch.params)["mass"][0]
    cells = batch.frames.shape[-1] * batch.frames.shape[-2]
    change = (after / before - 1).abs()
    assert float(change.max()) < 5 * scale / cells**0.5
    assert float(change.max()) > 0  # it did perturb ps
    ps = out[0, :, store.channel_slice("ps")]
    relative = ps / batch.frames[0, :, store.channel_slice("ps")] - 1
    assert float(relative.abs().max()) <= scale * 3**0.5 * (1 + 1e-5)
