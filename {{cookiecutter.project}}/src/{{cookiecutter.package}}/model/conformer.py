"""A Conformer classifier for short audio (Gulati et al. 2020, "Conformer: Convolution-augmented Transformer").

    waveform [B, N] --LogMel--> [B, T, M] --normalise, SpecAugment mask--> --ConvSubsampling (x4 in time)-->
    [B, T/4, C] --ConformerBlock x n_layers--> mean over time --> Linear --> logits [B, K]

One block (pre-norm residuals; the two feed-forward modules take half steps, "macaron" style)::

    x = x + 1/2 FeedForward(x)
    x = x + MultiHeadSelfAttention(x)      rotary positions (model/attention.py), every frame sees every frame
    x = x + ConvModule(x)                  pointwise conv -> GLU -> depthwise conv -> BatchNorm -> Swish -> pointwise
    x = LayerNorm(x + 1/2 FeedForward(x))

``forward(input_values=... | input_features=..., labels=None)`` returns :class:`ClassifierOutput` like a Hugging Face
audio classifier (``input_values`` raw audio, ``input_features`` precomputed log-mel), so train_step's
``model(**batch).loss`` and ``evaluate_classifier`` work unchanged.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..config.speech import AudioFeatureConfig, ConformerConfig
from ..data.audio_features import LogMel, hop_for, n_fft_for
from .attention import Attention, RotaryEmbedding
from .transformer import ClassifierOutput


class FeedForward(nn.Module):
    """LayerNorm -> Linear (dim -> ff_mult * dim) -> Swish -> Dropout -> Linear -> Dropout."""

    def __init__(self, dim: int, mult: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, mult * dim)
        self.down = nn.Linear(mult * dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.down(self.dropout(F.silu(self.up(self.norm(x))))))


class SelfAttention(nn.Module):
    """LayerNorm -> bidirectional multi-head attention with rotary positions -> Dropout."""

    def __init__(self, dim: int, n_heads: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, n_heads, dropout=dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        return self.dropout(self.attn(self.norm(x), rope=rope, causal=False))


class ConvModule(nn.Module):
    """LayerNorm -> pointwise conv (dim -> 2 dim) -> GLU -> depthwise conv over time -> BatchNorm -> Swish ->
    pointwise conv -> Dropout. The depthwise convolution sees ``kernel`` neighbouring frames: local patterns (a
    formant transition, a plosive burst) that attention, which sees everything at once, finds harder to pin down."""

    def __init__(self, dim: int, kernel: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.pointwise_in = nn.Conv1d(dim, 2 * dim, 1)
        self.depthwise = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.batch_norm = nn.BatchNorm1d(dim)
        self.pointwise_out = nn.Conv1d(dim, dim, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:  # [B, T, C] -> [B, T, C]
        y = self.norm(x).transpose(1, 2)  # Conv1d wants channels first: [B, C, T]
        y = F.glu(self.pointwise_in(y), dim=1)  # half the channels gate the other half
        y = F.silu(self.batch_norm(self.depthwise(y)))
        return self.dropout(self.pointwise_out(y).transpose(1, 2))


class ConformerBlock(nn.Module):
    def __init__(self, cfg: ConformerConfig):
        super().__init__()
        self.ff1 = FeedForward(cfg.dim, cfg.ff_mult, cfg.dropout)
        self.attn = SelfAttention(cfg.dim, cfg.n_heads, cfg.dropout)
        self.conv = ConvModule(cfg.dim, cfg.conv_kernel, cfg.dropout)
        self.ff2 = FeedForward(cfg.dim, cfg.ff_mult, cfg.dropout)
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        x = x + 0.5 * self.ff1(x)
        x = x + self.attn(x, rope)
        x = x + self.conv(x)
        return self.norm(x + 0.5 * self.ff2(x))


class ConvSubsampling(nn.Module):
    """Two 3x3 stride-2 Conv2d + ReLU over (time, mel), then a Linear to ``dim``: [B, T, M] -> [B, ~T/4, dim].
    Four times fewer frames (40 ms each at a 10 ms hop) make attention 16 times cheaper."""

    def __init__(self, n_mels: int, channels: int, dim: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, channels, 3, stride=2), nn.ReLU(), nn.Conv2d(channels, channels, 3, stride=2), nn.ReLU()
        )
        self.out = nn.Linear(channels * self.out_size(n_mels), dim)

    @staticmethod
    def out_size_once(n: int) -> int:
        return (n - 3) // 2 + 1  # a valid 3-wide convolution with stride 2

    @classmethod
    def out_size(cls, n: int) -> int:
        return cls.out_size_once(cls.out_size_once(n))

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x.unsqueeze(1))  # [B, C, T', M']
        return self.out(y.permute(0, 2, 1, 3).flatten(2))  # [B, T', C * M'] -> [B, T', dim]


class ConformerClassifier(nn.Module):
    def __init__(self, cfg: ConformerConfig, features: AudioFeatureConfig, sample_rate: int, num_labels: int):
        super().__init__()
        self.config, self.num_labels = cfg, num_labels
        self.log_mel = LogMel(
            sample_rate,
            n_fft_for(sample_rate, features.window_ms),
            hop_for(sample_rate, features.hop_ms),
            features.n_mels,
            features.f_min,
            features.f_max,
        )
        self.subsample = ConvSubsampling(features.n_mels, cfg.subsample_channels, cfg.dim)
        self.rotary = RotaryEmbedding(cfg.dim // cfg.n_heads, max_seq_len=256)
        self.blocks = nn.ModuleList(ConformerBlock(cfg) for _ in range(cfg.n_layers))
        self.head = nn.Linear(cfg.dim, num_labels)

    @staticmethod
    def normalise(feats: Tensor) -> Tensor:
        """Per clip: zero mean and unit variance over all frames and bands (loudness and recording level out)."""
        mean = feats.mean(dim=(1, 2), keepdim=True)
        std = feats.std(dim=(1, 2), keepdim=True).clamp(min=1e-5)
        return (feats - mean) / std

    def forward(
        self,
        input_values: Tensor | None = None,
        input_features: Tensor | None = None,
        labels: Tensor | None = None,
        feature_mask: Tensor | None = None,
    ) -> ClassifierOutput:
        """input_values [B, N] waveform or input_features [B, T, n_mels] log-mel; feature_mask [B, T, n_mels] bool
        (SpecAugment, training only: masked cells become 0, the clip's mean after normalising); labels [B]."""
        if (input_values is None) == (input_features is None):
            raise ValueError("pass exactly one of input_values (waveform) and input_features (log-mel)")
        feats = self.normalise(self.log_mel(input_values) if input_features is None else input_features)
        if feature_mask is not None:
            feats = feats.masked_fill(feature_mask, 0.0)
        h = self.subsample(feats)  # [B, T', C]
        rope = self.rotary.span(0, h.shape[1])
        for block in self.blocks:
            h = block(h, rope)
        logits = self.head(h.mean(dim=1))  # [B, K]
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return ClassifierOutput(logits=logits, loss=loss)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_example(self, n_samples: int) -> float:
        """Training FLOPs per clip for MFU: 6 per multiply-accumulate (2 forward, 4 backward), the STFT left out."""
        t1, m1 = (ConvSubsampling.out_size_once(n) for n in (self.log_mel.frames(n_samples), self.log_mel.n_mels))
        t2, m2 = ConvSubsampling.out_size_once(t1), ConvSubsampling.out_size_once(m1)
        conv1, conv2 = self.subsample.conv[0].weight.numel(), self.subsample.conv[2].weight.numel()
        dense = sum(p.numel() for p in self.blocks.parameters()) + self.subsample.out.weight.numel()
        attention = 2 * t2 * t2 * self.config.dim * self.config.n_layers  # scores and weighted sum
        return 6.0 * (conv1 * t1 * m1 + conv2 * t2 * m2 + dense * t2 + attention + self.head.weight.numel())
