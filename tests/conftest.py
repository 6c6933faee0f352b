"""Suite-wide settings. The tests run tiny models: one intra-op thread avoids the pool's
synchronisation cost, which on two cores outweighs the parallelism and explodes under contention."""

import torch

torch.set_num_threads(1)
