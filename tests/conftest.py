"""Suite-wide settings: tiny models run fastest single-threaded (thread start-up dominates their ops)."""

import torch

torch.set_num_threads(1)
