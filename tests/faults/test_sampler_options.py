"""Every option of every sampler has a declared range, and a value outside it is a one-line
error before any work: from the API (``samplers.make``, ``S.Params``), from ``--sampler
NAME:key=value`` on the command line (exit 1, nothing written), and from the bench. Plus a
property-based layer over the ``KEY=VALUE`` grammar: any text is a one-line error or a
valid sampler, never a traceback."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from invdiff import samplers
from invdiff.cli import main
from invdiff.priors import GaussianPrior
from invdiff.samplers.params import (ClipRange, Choice, Flag, Instance, Integer, OptionError, Real, Sigmas)
from invdiff.samplers.volume import VOLUME_SAMPLERS
from invdiff.specs import parse_spec

ALL = {**{n: samplers.get(n) for n in samplers.available()}, **VOLUME_SAMPLERS}


def invalid_values(constraint) -> list:
    """Values each constraint must refuse (the wrong type and out of range)."""
    if isinstance(constraint, Integer):
        bad = [1.5, True, "3"]
        if constraint.low is not None:
            bad.append(constraint.low - 1)
        return bad + ([None] if not constraint.none else [])
    if isinstance(constraint, Real):
        bad = [math.nan, "x", True]
        if not constraint.infinite:
            bad.append(math.inf)
        if constraint.low is not None:
            bad.append(constraint.low - 1.0)
            if constraint.closed in ("right", "neither"):
                bad.append(constraint.low)
        if constraint.high is not None:
            bad.append(constraint.high + 1.0)
        return bad
    if isinstance(constraint, Choice):
        return ["nosuch", 1]
    if isinstance(constraint, Flag):
        return ["yes", 1, None]
    if isinstance(constraint, ClipRange):
        return [(1.0, 0.0), (0.0,), (0.0, math.inf), "0,1"]
    if isinstance(constraint, Sigmas):
        return [[1.0], torch.ones(2, 2), [1.0, math.nan]]
    if isinstance(constraint, Instance):
        return ["a prior name", 3]
    raise AssertionError(f"no invalid values for {constraint!r}")


CASES = [(name, option, value) for name, cls in ALL.items() for option in cls.Params.names()
         for value in invalid_values(cls.Params.constraints[option])]


@pytest.mark.parametrize("name", sorted(ALL))
def test_every_option_has_a_range(name):
    params = ALL[name].Params
    assert set(params.names()) <= set(params.constraints), set(params.names()) - set(params.constraints)
    if name != "tpdm":  # tpdm's second prior has no default
        params()  # the defaults are valid


def test_the_case_table_covers_every_option():
    assert len({(n, o) for n, o, _ in CASES}) == sum(len(c.Params.names()) for c in ALL.values())
    assert len(CASES) > 500


@pytest.mark.parametrize("name, option, value", CASES, ids=lambda v: repr(v)[:20])
def test_out_of_range_option_is_one_line(name, option, value):
    with pytest.raises(OptionError) as err:
        ALL[name].Params.check({option: value})
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"{name}: {option}=") and " must be " in text


def test_the_constructor_validates_before_any_work():
    prior = GaussianPrior.stationary((1, 8, 8))
    with pytest.raises(OptionError, match=r"^reddiff: steps=-1 is out of range: steps must be a whole number >= 1$"):
        samplers.make("reddiff", prior, steps=-1)
    with pytest.raises(OptionError, match=r"^dps: zeta=-1 is out of range"):
        samplers.make("dps", prior, zeta=-1)
    with pytest.raises(OptionError, match=r"^dps: unknown option 'nosuch'; its options are steps, zeta"):
        samplers.make("dps", prior, nosuch=1)
    with pytest.raises(OptionError, match=r"^mcg: unknown option"):  # forwarded **kwargs are checked too
        samplers.make("mcg", prior, nosuch=1)
    with pytest.raises(TypeError):  # still a TypeError for code that expects one for an unknown keyword
        samplers.make("dds", prior, nosuch=1)
    s = samplers.make("mcg", prior, steps=3, eta=0.5, verbose=False)
    assert s.params.eta == 0.5 and s.params.steps == 3 and s.hyperparameters()["relax"] is True


def test_params_round_trip_and_rebuild():
    prior = GaussianPrior.stationary((1, 8, 8))
    p = samplers.DDS.Params(steps=7, clip=None, sigmas=torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64))
    again = samplers.DDS.Params.from_dict(p.to_dict())
    assert again == p and again.replace(steps=8) != p
    s = samplers.DDS.from_params(prior, p)
    assert s.params == p and s.sigmas.tolist() == [1.0, 0.5, 0.0]
    with pytest.raises(OptionError, match="steps=0"):
        p.replace(steps=0)


PRIOR_ARGS = ["--prior", "ct-phantom-64", "--task", "ct-sparse-30"]


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    import numpy as np
    from PIL import Image

    path = tmp_path_factory.mktemp("in") / "slice.png"
    Image.fromarray((np.linspace(0, 255, 64 * 64).reshape(64, 64)).astype(np.uint8)).save(path)
    return path


@pytest.mark.parametrize("spec, expected", [
    ("dps:zeta=-1", "dps: zeta=-1 is out of range: zeta must be a number >= 0"),
    ("dps:nosuch=1", "dps: unknown option 'nosuch'"),
    ("reddiff:steps=-1", "reddiff: steps=-1 is out of range"),
    ("smc:twist='x'", "smc: twist='x' is out of range: twist must be one of 'pigdm', 'tds'"),
    ("enkg:ensemble_size=1", "enkg: ensemble_size=1 is out of range"),
    ("dds:eta=1.5", "dds: eta=1.5 is out of range: eta must be a number in [0, 1]"),
    ("diffpir:zeta=nan", "diffpir: zeta=nan is out of range"),
    ("resample:clip=[1, 0]", "resample: clip=[1, 0] is out of range"),
    ("daps:steps=2.5", "daps: steps=2.5 is of the wrong type"),
    ("nosuch", "unknown sampler 'nosuch'"),
])
def test_cli_refuses_bad_options_in_one_line_before_any_work(tmp_path, capsys, png, spec, expected):
    before = png.read_bytes()
    out = tmp_path / "out"
    assert main(["reconstruct", "--input", str(png), *PRIOR_ARGS, "--sampler", spec, "--out", str(out), "-q"]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("invdiff: error: ") and expected in lines[0], captured.err
    assert "simulated" not in captured.out  # refused before the simulation, not after
    assert not out.exists() and list(tmp_path.iterdir()) == [] and png.read_bytes() == before


@pytest.mark.parametrize("args, expected", [
    (["--prior", "ct-phantom-latent-64", "--task", "ct-sparse-30", "--sampler", "dds"],
     "DDS samples in pixel space and cannot use a LatentDiffusionPrior"),
    (["--prior", "ct-phantom-64", "--task", "phase-retrieval", "--sampler", "dds"],
     "dds: needs a linear operator"),
])
def test_cli_refuses_a_sampler_that_does_not_fit(tmp_path, capsys, png, args, expected):
    out = tmp_path / "out"
    assert main(["reconstruct", "--input", str(png), *args, "--out", str(out), "-q"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0]
    assert not out.exists()


def test_bench_refuses_bad_options_before_any_work(tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", "--priors", "ct-phantom-64", "--tasks", "ct-sparse-30", "--samplers", "dds:eta=2",
                 "--images", "1", "--out", str(out), "-q"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "dds: eta=2 is out of range" in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("argv", [
    ["reconstruct", "--nosuch"], ["bench", "--images", "many"], ["nosuch"], [], ["simulate", "--seed", "x"],
])
def test_usage_errors_are_one_line_and_exit_1(capsys, argv):
    assert main(argv) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and ": error: " in lines[0] and lines[0].endswith("--help)")


NAMES = st.sampled_from(sorted(ALL) + ["nosuch", "DPS", ""])
KEYS = st.one_of(st.sampled_from(sorted({o for c in ALL.values() for o in c.Params.names()})),
                 st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8))
VALUES = st.one_of(
    st.integers(-5, 300).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["true", "false", "'karras'", "'x'", "[0, 1]", "[1, 0]", "{a = 1}", "", "nan", "-inf", "[]"]),
    st.text(max_size=6),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=NAMES, options=st.lists(st.tuples(KEYS, VALUES), max_size=3))
def test_any_sampler_spec_is_a_one_line_error_or_a_valid_sampler(name, options):
    """``--sampler TEXT``: the grammar and the option check give a valid sampler or a one-line
    ``ValueError``; never another exception (a traceback at the command line)."""
    text = name + "".join(f":{k}={v}" for k, v in options)
    try:
        key, overrides = parse_spec(text)
        cls = ALL.get(key.lower()) if key else None
        if cls is None:
            raise ValueError(f"unknown sampler {key!r}")
        cls.Params.check(overrides)
    except ValueError as err:
        assert "\n" not in str(err)
        return
    if key.lower() != "tpdm":  # tpdm also needs its second prior, an object
        prior = GaussianPrior.stationary((1, 8, 8))
        sampler = (VOLUME_SAMPLERS[key.lower()] if key.lower() in VOLUME_SAMPLERS else samplers.get(key))
        try:
            built = sampler(prior, **overrides)
        except ValueError as err:  # a check between options (sigma_min < sigma_max, tv needs rho) or the schedule's
            assert "\n" not in str(err)
            return
        assert overrides.get("sigmas") is not None or built.params.as_kwargs().items() >= overrides.items()
