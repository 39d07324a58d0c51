"""Seeds derived from the run's one ``seed`` and a role name.

Every random stream of a run (chain noise, data draws, a network's initial weights, the
evaluation) gets its own generator whose seed is a stable function of ``(seed, role)``, so
adding a draw in one place never shifts another stream. ``hash()`` is salted per process in
Python, hence SHA-256.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Iterator


def derive_seed(seed: int, *roles: object) -> int:
    """A 63-bit seed for ``roles`` (e.g. ``"data"``, a rank) derived from ``seed``."""
    text = ":".join(str(part) for part in (int(seed), *roles))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def chain_seed(seed: int, rank: int = 0) -> int:
    """The seed of a fine-tuning method's chain-noise generator on DDP rank ``rank``.

    Rank 0 (every single-process run) keeps the run's ``seed`` itself, so a one-device run's
    numbers are what they were; the other ranks derive theirs (``seed + rank`` would give rank
    1 of seed 0 the chains of rank 0 of seed 1, and a sweep's seeds would share chains)."""
    return int(seed) if rank == 0 else derive_seed(seed, "chains", rank)


# the random functions of torch that take a ``generator`` keyword but are called without one
# (a layer's ``reset_parameters`` passes ``generator=None`` to ``nn.init``, which is handled
# by the rule in ``_DrawFrom`` and needs no entry here)
def _random_functions() -> frozenset:
    import torch

    tensor_methods = ("uniform_", "normal_", "random_", "bernoulli_", "exponential_", "geometric_",
                      "log_normal_", "cauchy_", "bernoulli", "multinomial")
    functions = ("rand", "randn", "randint", "randperm", "normal", "bernoulli", "multinomial", "poisson",
                 "rand_like", "randn_like", "randint_like")
    return frozenset([getattr(torch.Tensor, name) for name in tensor_methods]
                     + [getattr(torch, name) for name in functions])


def _draw_from_mode(generator):
    """A ``TorchFunctionMode`` under which every CPU random draw of torch is taken from ``generator``."""
    from torch.overrides import TorchFunctionMode

    random_functions = _random_functions()

    class DrawFrom(TorchFunctionMode):
        # torch calls this for every torch function and tensor method run in the block (not for
        # the calls those make inside: a handled ``nn.init`` function is passed the generator
        # itself); a draw it does not route here reaches the global generator, which
        # ``no_global_draws`` detects on exit
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            routed = func in random_functions or "generator" in kwargs
            if routed and kwargs.get("generator") is None and _on_cpu(args, kwargs):
                kwargs = {**kwargs, "generator": generator}
            return func(*args, **kwargs)

    return DrawFrom()


def _on_cpu(args, kwargs) -> bool:
    """Whether a draw lands on the CPU (the block's generator is a CPU one)."""
    import torch

    tensor = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
    if tensor is not None:
        return tensor.device.type == "cpu"
    device = kwargs.get("device")
    return device is None or torch.device(device).type == "cpu"


@contextmanager
def seeded_draws(seed: int, *roles: object) -> Iterator["torch.Generator"]:
    """Build networks in a block whose every random draw comes from a generator seeded with
    ``derive_seed(seed, *roles)``.

    ``torch.nn`` layers initialise their weights from torch's global generator and take no
    generator argument. The composition root (``runner.py``) therefore builds each network in
    this block, which routes those draws to the block's own generator (a ``TorchFunctionMode``
    passes it to every random function called without one): the initial weights depend on the
    seed and role only, never on what ran before (a cache hit skips a whole fit and its draws).
    The global generator is neither seeded nor read (:func:`no_global_draws` checks it). The
    same seed gives the same stream as the global CPU generator seeded with it (both are
    Mersenne twisters), so the numbers made when this block seeded a fork of the global
    generator are unchanged. The routing costs ~30 % on a small network's training step, so fits and
    fine-tuning, whose draws all take their own generators, run under the check alone."""
    import torch  # here, not at the top: validation imports this module and must stay torch-free

    generator = torch.Generator().manual_seed(derive_seed(seed, *roles))
    with no_global_draws(*roles), _draw_from_mode(generator):
        yield generator


@contextmanager
def no_global_draws(*roles: object) -> Iterator[None]:
    """Run a block that must not draw from torch's global generators (CPU, and CUDA once used).

    A draw that reaches them — a random op that takes no generator, such as dropout with
    p > 0, or one left without its generator — is an error on exit: the run would depend on
    the process's history (what ran before in a sweep, the entry point's seeding)."""
    import torch

    def states() -> list:
        # CUDA's generators only once CUDA is in use (asking for them would initialise it)
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
        return [torch.random.get_rng_state(), *cuda]

    before = states()
    yield
    after = states()[:len(before)]  # CUDA first used inside the block: its new generators were not read before
    if all(torch.equal(a, b) for a, b in zip(after, before)):
        return
    where = ", ".join(str(part) for part in roles)
    raise RuntimeError(f"something in the {where!r} block drew from torch's global random generator (a random op "
                       "that takes no generator, e.g. dropout with p > 0): the run would depend on what the process "
                       "ran before; give that draw a generator")
