"""The house rules of ARCHITECTURE.md, checked: which layer may import which, and that a new
sampler registered the documented way passes the shared sampler contract."""

import ast
import pathlib

import pytest
import torch

import test_sampler_contract as contract
from invdiff import samplers
from invdiff.priors import GaussianPrior
from invdiff.samplers import Sampler
from invdiff.samplers.steps import ddim_step, proximal_least_squares, randn_like

ROOT = pathlib.Path(__file__).resolve().parents[1] / "invdiff"

#: ARCHITECTURE.md's layers: what each top-level part of the package may import from invdiff
ALLOWED = {
    "files": set(), "specs": set(),                                    # core
    "operators": set(), "data": {"operators"}, "priors": {"files"},            # library
    "samplers": {"operators", "priors"},
    "io": {"files", "operators", "__init__"},
    "train": {"files", "data", "io", "priors", "__init__"},
    "bench": {"files", "specs", "data", "io", "operators", "priors", "samplers", "__init__"},
    "apps": {"files", "specs", "data", "io", "operators", "priors", "samplers", "bench", "train",
             "__init__"},                                                                # applications
    "cli": {"specs", "apps", "bench", "io", "operators", "priors", "samplers", "train"},  # the command line
}


def _imports(path: pathlib.Path) -> set[str]:
    """Top-level parts of invdiff that ``path`` imports (``"__init__"`` for ``invdiff`` itself)."""
    rel = path.relative_to(ROOT).with_suffix("").parts
    module = ["invdiff", *rel]
    package = module[:-1] if rel[-1] != "__init__" else module[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                targets = [base + node.module.split(".")] if node.module else [base + [a.name] for a in node.names]
            elif node.module and node.module.split(".")[0] == "invdiff":
                targets = [node.module.split(".")]
            else:
                continue
        elif isinstance(node, ast.Import):
            targets = [a.name.split(".") for a in node.names if a.name.split(".")[0] == "invdiff"]
        else:
            continue
        for t in targets:
            part = t[1] if len(t) > 1 else "__init__"
            out.add("__init__" if part == "__version__" else part)
    return out


def test_layers_import_only_downwards():
    assert "apps" in _imports(ROOT / "cli" / "workflows.py")  # the scan sees relative imports
    assert _imports(ROOT / "apps" / "demo.py") >= {"files", "operators", "priors", "samplers", "bench"}
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).parts
        part = rel[0].removesuffix(".py")
        if part in ("__init__", "__main__"):
            continue
        assert part in ALLOWED, f"{part}: a new top-level part; add it to ARCHITECTURE.md and ALLOWED"
        for target in _imports(path) - {part}:
            if target not in ALLOWED[part]:
                bad.append(f"{path.relative_to(ROOT.parent)} imports invdiff.{target}")
    assert not bad, "\n".join(bad)


class ToyProjection(Sampler):
    """A new sampler as ARCHITECTURE.md says to add one: DDIM steps whose denoised estimate is
    pulled towards the data by a few CG steps (a DDS without its tuning)."""

    name = "toy-projection"
    supports_nonlinear = False

    def __init__(self, prior, steps: int = 20, eta: float = 1.0, verbose: bool = False) -> None:
        super().__init__(prior, verbose=verbose)
        self.sigmas = samplers.make_sigmas(prior, steps, "karras", None)
        self.eta = eta

    def _run(self, y, physics, x_init, generator, callback):
        sigmas = self.sigmas.tolist()
        x = self.initial_noise((y.shape[0], *self.prior.image_shape), sigmas[0], x_init, generator, y)
        for i in self.progress(range(len(sigmas) - 1)):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            x0 = proximal_least_squares(physics, self.denoise(x, sigma), y, 1.0, 3)  # denoise, then the data
            noise = randn_like(x, generator) if sigma_next > 0 else None
            x = ddim_step(x, x0, sigma, sigma_next, self.eta, noise)
            self.step_done(i, sigma, x, x0, callback)
        return x


@pytest.fixture
def toy():
    samplers.register(ToyProjection)
    yield ToyProjection.name
    samplers.unregister(ToyProjection.name)


@pytest.fixture(scope="module")
def problem():
    base = GaussianPrior.stationary(contract.SHAPE, length_scale=2.0, variance=0.02, mean=0.5)
    latent = GaussianPrior.stationary(contract.LATENT_SHAPE, length_scale=1.0, variance=0.02, mean=0.0)
    return base, latent, base.sample(2, torch.Generator().manual_seed(0)).float().clamp(0, 1)


def test_a_registered_sampler_passes_the_shared_contract(toy, problem):
    base, latent, truth = problem
    assert toy in samplers.available() and samplers.get(toy) is ToyProjection
    with pytest.raises(ValueError, match="already registered"):
        samplers.register(type("Other", (ToyProjection,), {}))
    for task in contract.LINEAR_TASKS + ["phase-retrieval"]:
        contract.test_contract(toy, task, base, latent, truth)
    contract.test_divergence_guard(toy, base, latent, truth)
    contract.test_inside_deepinv_test(toy, base, latent, truth)
    contract.test_global_rng_untouched_and_sample_batches(toy, base, latent, truth)
    contract.test_prior_kind_is_checked_at_construction(toy, base, latent)
    contract.test_operator_with_per_image_parameters_serves_every_sample_and_particle(toy, base, latent, truth)
    # its options are validated by the ranges the base class declares (steps, eta)
    assert ToyProjection.Params(steps=5).eta == 1.0
    with pytest.raises(samplers.OptionError, match=r"^toy-projection: eta=2 is out of range"):
        samplers.make(toy, base, eta=2)
