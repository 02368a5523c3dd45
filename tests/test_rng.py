import io
import random

import numpy as np
import torch

from capline.rng import collect_rng_states, restore_rng_states


def draws():
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_restored_generators_repeat_the_same_draws_and_load_weights_only():
    states = collect_rng_states()
    first = draws()
    buffer = io.BytesIO()
    torch.save(states, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)  # no pickled objects beyond tensors and primitives
    draws()
    restore_rng_states(loaded)
    assert draws() == first
