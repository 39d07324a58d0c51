"""ELEGANT's score network for one-hot sequences (Uehara et al. 2024, App. F.1.2, Table 4).

A sequence of ``L`` tokens over an alphabet of size ``V`` is relaxed to a point of
``R^{L x V}`` (its one-hot matrix at ``s = 0``; Gaussian-noised by the forward process for
``s > 0``). The network maps ``(x [B, L, V], s [B])`` to the score ``[B, L, V]``:

    time feature  : s -> sinusoidal features -> MLP -> [B, d_model]      (Table 4, layer 1)
    positions     : learned embedding          [L, d_model]              (Table 4, layer 1)
    input         : Linear(V, d_model) per position
    h             = input(x) + positions + time feature (broadcast over positions)
    encoder       : nn.TransformerEncoder(batch_first) on h               (Table 4, layer 2)
    head          : Linear(d_model, V) per position                      (Table 4, layer 3)

What the paper's text gives and what it does not
------------------------------------------------
The plain-text extraction of Table 4 keeps the layer list (``Get time feature``, ``Get
positional encoder``, ``Transformer encoder``, ``Linear``) but loses every dimension and
hyper-parameter. Not readable, hence our choices (all constructor arguments):

* ``d_model = 128``, ``nhead = 4``, ``num_layers = 3``, ``dim_feedforward = 4 * d_model``:
  a small encoder (L = 8 tokens for TFBind8); ELEGANT says only "transformer-based".
* how the time feature and the positional encoding enter: we *add* both to the projected
  input (the usual DDPM / DiT conditioning); the table's "Denote ..." of the positional row
  is lost, so concatenation is equally compatible with the text.
* the time feature: deterministic transformer-style sinusoids of ``time_scale * s``
  (``time_scale = 1000`` maps VP's ``s in [0, 1]`` to the DDPM step range) followed by a
  two-layer SiLU MLP; the paper says only "time feature".
* ``dropout = 0`` (the brief's default; the only value accepted), pre-LayerNorm encoder layers (``norm_first``) with a
  final LayerNorm, GELU activations.

The output is the score itself (``process.prediction_type: score``, converted by
:mod:`diffusion_rl.core.processes`), not an epsilon prediction.
"""

from __future__ import annotations


import torch
from torch import Tensor, nn

from ..nets import SinusoidalTimeFeatures
from .base import Backbone

__all__ = ["SinusoidalTimeFeatures", "SequenceTransformerBackbone"]


class SequenceTransformerBackbone(Backbone):
    """Transformer score network over relaxed one-hot sequences ``x [B, L, V]``.

    Args:
        length: ``L``, the sequence length (8 for TFBind8).
        vocab_size: ``V``, the alphabet size (4 for DNA).
        d_model: width of the token embeddings and of the encoder.
        nhead: attention heads (must divide ``d_model``).
        num_layers: encoder layers.
        dim_feedforward: hidden width of each layer's MLP (default ``4 * d_model``).
        dropout: dropout inside the encoder; must be 0 (sampling and reward backprop stay
            deterministic, and torch's dropout would draw from the global generator).
        time_dim: number of sinusoidal time features before the time MLP.
        time_scale: the sinusoids see ``time_scale * s``.

    ``forward(x, s, cond=None) -> [B, L, V]``; ``cond`` is ignored (unconditional model).
    ``decode(x)`` returns the argmax tokens ``LongTensor [B, L]``.
    """

    def __init__(self, length: int, vocab_size: int, d_model: int = 128, nhead: int = 4,
                 num_layers: int = 3, dim_feedforward: int | None = None, dropout: float = 0.0,
                 time_dim: int = 128, time_scale: float = 1000.0):
        super().__init__()
        if length <= 0 or vocab_size <= 1:
            raise ValueError(f"backbone needs length > 0 and vocab_size > 1 (got {length}, {vocab_size})")
        if d_model % nhead:
            raise ValueError(f"backbone.nhead={nhead} must divide backbone.d_model={d_model}")
        if dropout != 0.0:
            # torch's dropout takes no generator: its masks would come from the global one, and a
            # run would depend on what its process ran before (seeding.no_global_draws)
            raise ValueError(f"backbone.dropout must be 0 (got {dropout}): dropout masks draw from torch's global "
                             "generator, which would make runs irreproducible")
        self.length, self.vocab_size = int(length), int(vocab_size)
        self.event_shape = (self.length, self.vocab_size)
        self.time_features = SinusoidalTimeFeatures(time_dim, time_scale)
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, d_model), nn.SiLU(), nn.Linear(d_model, d_model))
        self.position = nn.Parameter(0.02 * torch.randn(self.length, d_model))
        self.input_proj = nn.Linear(self.vocab_size, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, nhead, dim_feedforward=dim_feedforward or 4 * d_model, dropout=dropout,
            activation="gelu", batch_first=True, norm_first=True)
        # nested tensors only apply to padded batches (none here) and are unsupported with norm_first
        self.encoder = nn.TransformerEncoder(layer, num_layers, norm=nn.LayerNorm(d_model),
                                             enable_nested_tensor=False)
        self.head = nn.Linear(d_model, self.vocab_size)

    def forward(self, x: Tensor, s: Tensor, cond=None) -> Tensor:
        if x.shape[-2:] != self.event_shape:
            raise ValueError(f"expected x [B, {self.length}, {self.vocab_size}], got {tuple(x.shape)}")
        s = torch.as_tensor(s, device=x.device).reshape(-1).expand(x.shape[0])
        temb = self.time_mlp(self.time_features(s).to(x.dtype))           # [B, d]
        h = self.input_proj(x) + self.position + temb[:, None, :]          # [B, L, d]
        return self.head(self.encoder(h))                                  # [B, L, V]

    def decode(self, x: Tensor) -> Tensor:
        """Relaxed state ``[B, L, V]`` -> argmax tokens ``LongTensor [B, L]``."""
        return x.argmax(dim=-1)
