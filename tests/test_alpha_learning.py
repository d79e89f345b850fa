"""Alpha learns: on a toy task where one operation is clearly right, the search's own sampling
(Algorithm 1), mixed edge and alpha optimiser raise that operation's probability well above
uniform within the demo's budget of 40 alpha steps; and the search-time normalisation of
the pooling operations leaves checkpoints and built networks as they were."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from scnas.build import BuildConfig, build_network
from scnas.build.ops import ActConvNorm, make_op
from scnas.genotype import PAPER_OPS, random_genotype
from scnas.search import SearchConfig, SuperNet
from scnas.search.sampling import choices_from, draw
from scnas.search.supernet import NORMALISED_IN_SEARCH, EdgeChoice, MixedEdge

OPS = list(PAPER_OPS)
UNIFORM = 1 / len(OPS)
DEMO_ALPHA_LR = 0.1   # what scnas/apps/demo.py passes to SearchConfig (alpha_lr) for its 40 alpha steps


@pytest.fixture(autouse=True)
def one_thread():
    # The toy's tensors are tiny: one thread runs it in ~4 s, two on a busy 2-core machine in ~35 s.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_pooling_outputs_are_normalised_in_the_search_only():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 8, 8, 8)
    for stride in (1, 2):
        edge = MixedEdge(OPS, 4, stride, negative_slope=0.01)
        plain = MixedEdge(OPS, 4, stride, negative_slope=0.01, normalise_pooling=False)
        for name in NORMALISED_IN_SEARCH:
            index = OPS.index(name)
            weights = torch.zeros(len(OPS))
            weights[index] = 1.0
            out = edge(x, _choice(weights, index))
            torch.testing.assert_close(out.mean((2, 3, 4)), torch.zeros(1, 4), atol=1e-5, rtol=0)
            torch.testing.assert_close(out.var((2, 3, 4), unbiased=False), torch.ones(1, 4), atol=1e-3, rtol=0)
            torch.testing.assert_close(plain(x, _choice(weights, index)), make_op(name, 4, 4, stride=stride)(x))
    # nothing to save: a checkpoint of either supernet has the same entries
    config = BuildConfig(stem_channels=4, in_channels=1, num_classes=2)
    with torch.device("meta"):
        keys = [list(SuperNet(config, 2, OPS, normalise_pooling=flag).state_dict()) for flag in (True, False)]
    assert keys[0] == keys[1]
    # networks built from a genotype run the plain operations
    network = build_network(random_genotype(seed=0, nodes=4, ops=OPS), BuildConfig(stem_channels=4, in_channels=1,
                                                                                 num_classes=2))
    assert not any(isinstance(m, nn.InstanceNorm3d) and not m.affine for m in network.modules())


def _choice(weights: torch.Tensor, *active: int) -> EdgeChoice:
    return EdgeChoice(weights, tuple(active))


def _bilevel(edge: MixedEdge, teacher: nn.Module, config: SearchConfig, alpha: torch.Tensor | None,
             steps: int, generator: torch.Generator, theta_opt: torch.optim.Optimizer) -> torch.Tensor:
    """``steps`` steps of the search loop on one mixed edge: a Theta step, then (unless ``alpha``
    is None: Theta warm-up at uniform alpha) an alpha step on a fresh batch, with the
    operations drawn by Algorithm 1 at the epoch's temperature."""
    train_alpha = alpha is not None
    alpha = alpha if train_alpha else torch.zeros(1, len(OPS))
    alpha_opt = torch.optim.Adam([alpha], lr=config.alpha_lr, betas=config.alpha_betas) if train_alpha else None

    def loss(drawn, tau: float, with_alpha: bool) -> torch.Tensor:
        x = torch.randn(2, 4, 16, 16, 16, generator=generator)
        choice = choices_from({"edge": alpha if with_alpha else alpha.detach()}, {"edge": drawn}, tau)["edge"][0]
        return F.mse_loss(edge(x, choice), teacher(x))

    for step in range(steps):
        tau = config.tau(step // config.steps_per_epoch) if train_alpha else config.tau_max
        host = alpha.detach().clone()
        theta_draw, alpha_draw = draw(host, "pair", tau, generator=generator), draw(host, "pair", tau,
                                                                                    generator=generator)
        theta_opt.zero_grad(set_to_none=True)
        theta_loss = loss(theta_draw, tau, False)
        if theta_loss.requires_grad:           # the pair may hold no operation with weights
            theta_loss.backward()
            theta_opt.step()
        if train_alpha:
            (grad,) = torch.autograd.grad(loss(alpha_draw, tau, True), [alpha])
            alpha.grad = grad
            alpha_opt.step()
    return torch.softmax(alpha.detach()[0], -1)


def test_alpha_picks_the_only_operation_that_can_solve_a_toy_task():
    # The target is a fixed random LeakyReLU-Conv3x3x3-InstanceNorm of white noise, with its
    # centre tap removed and an output scale of 2: conv_3x3x3 can learn it exactly; identity,
    # pooling and the separable dilated convolutions (whose taps other than the centre lie 2-4
    # voxels apart) cannot correlate with it, and zero leaves all of its variance of 4. One
    # mixed edge with the paper's eight operations, the search's sampling, temperature schedule
    # and alpha optimiser, and the demo's budget: 4 epochs x 10 steps, tau 5 -> 0.5.
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    teacher = ActConvNorm(4, 4, 3, stride=1, negative_slope=0.01).requires_grad_(False)
    teacher[1].weight[:, :, 1, 1, 1] = 0.0
    teacher[2].weight.fill_(2.0)
    edge = MixedEdge(OPS, 4, 1, negative_slope=0.01)
    demo = SearchConfig(data=".", epochs=4, steps_per_epoch=10, tau_max=5.0, tau_min=0.5, alpha_lr=DEMO_ALPHA_LR)
    # Theta is warmed up first (alpha fixed at uniform): alpha can only prefer the convolution
    # once it has learnt something; an untrained one is no better than the others. The toy
    # trains Theta with a usual Adam: the paper's printed betas (0.1, 0.001) make its steps
    # sign-like, and the 432-weight student then needs far more steps to match the teacher.
    theta_opt = torch.optim.Adam(edge.parameters(), lr=0.01, betas=(0.9, 0.999))
    _bilevel(edge, teacher, demo, None, 50, generator, theta_opt)
    warm = copy.deepcopy((edge, theta_opt.state_dict(), generator.get_state()))

    alpha = nn.Parameter(1e-3 * torch.randn(1, len(OPS), generator=torch.Generator().manual_seed(0)))
    p = _bilevel(edge, teacher, demo, alpha, 40, generator, theta_opt)
    conv = OPS.index("conv_3x3x3")
    assert int(p.argmax()) == conv, p
    assert p[conv] > 2 * UNIFORM, p
    for name in ("identity", "max_pool_3x3x3", "avg_pool_3x3x3"):
        assert p[OPS.index(name)] < UNIFORM, (name, p)

    # With the paper's alpha learning rate (0.003, made for 200 x 250 steps) the same 40 steps
    # cannot get there: Adam moves each logit by about lr per step at most.
    edge, theta_state, rng_state = warm
    theta_opt = torch.optim.Adam(edge.parameters(), lr=0.01, betas=(0.9, 0.999))
    theta_opt.load_state_dict(theta_state)
    generator.set_state(rng_state)
    paper = demo.model_copy(update={"alpha_lr": SearchConfig.model_fields["alpha_lr"].default})
    alpha = nn.Parameter(1e-3 * torch.randn(1, len(OPS), generator=torch.Generator().manual_seed(0)))
    p = _bilevel(edge, teacher, paper, alpha, 40, generator, theta_opt)
    assert float(p.max()) < 1.5 * UNIFORM, p
