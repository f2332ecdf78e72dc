"""``python -m <package>.speech``: its config and the sections only it has (the Conformer, the audio, augmentation)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import OptimConfig, RunConfig, TrainConfig, require

# The ten commands of the builtin set (and the usual 10-word task of Speech Commands v2).
SPEECH_WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")


@dataclass
class SpeechDataConfig:
    """Spoken commands: the builtin espeak-ng set, or Google Speech Commands v2 at ``path``."""

    path: str | None = None  # a Speech Commands v2 directory (<word>/*.wav, *_list.txt); None = the builtin set
    words: list[str] = field(default_factory=lambda: list(SPEECH_WORDS))  # the labels, in this order
    sample_rate: int = 8000  # Hz; files at a higher rate are resampled, lower ones refused (the builtin set is 8 kHz)
    clip_seconds: float = 1.0  # every clip is padded (centred) to this length
    num_workers: int = 0  # DataLoader processes collating training batches; forced to 0 under a debugger

    def __post_init__(self) -> None:
        require(self.sample_rate >= 1000, "data.sample_rate", self.sample_rate, ">= 1000")
        require(self.clip_seconds > 0, "data.clip_seconds", self.clip_seconds, "> 0")
        require(len(self.words) >= 2, "data.words", self.words, "at least two words")

    @property
    def clip_samples(self) -> int:
        return round(self.sample_rate * self.clip_seconds)


@dataclass
class AudioFeatureConfig:
    """Log-mel front end (data/audio_features.py): STFT frames every ``hop_ms``, ``n_mels`` HTK mel bands."""

    n_mels: int = 40
    window_ms: float = 32.0  # STFT window; n_fft = the nearest power of two in samples
    hop_ms: float = 10.0
    f_min: float = 20.0
    f_max: float | None = None  # None = Nyquist (sample_rate / 2)

    def __post_init__(self) -> None:
        require(self.n_mels >= 4, "features.n_mels", self.n_mels, ">= 4")
        require(self.hop_ms > 0 and self.window_ms >= self.hop_ms, "features.hop_ms", self.hop_ms, "in (0, window]")


@dataclass
class ConformerConfig:
    """The Conformer classifier (model/conformer.py)."""

    dim: int = 144
    n_layers: int = 4
    n_heads: int = 4
    ff_mult: int = 4  # feed-forward inner width = ff_mult * dim
    conv_kernel: int = 15  # depthwise convolution over time, in subsampled frames (40 ms each)
    subsample_channels: int = 64  # channels of the two stride-2 Conv2d layers of the front end
    dropout: float = 0.1

    def __post_init__(self) -> None:
        require(self.dim >= 8 and self.dim % self.n_heads == 0, "model.dim", self.dim, "a multiple of n_heads, >= 8")
        require((self.dim // self.n_heads) % 2 == 0, "model.n_heads", self.n_heads, "giving an even head size")
        require(self.n_layers >= 1, "model.n_layers", self.n_layers, ">= 1")
        require(self.conv_kernel % 2 == 1, "model.conv_kernel", self.conv_kernel, "odd")
        require(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "in [0, 1)")


@dataclass
class SpeechAugmentConfig:
    """Training-time augmentation (data/audio_augment.py), each part its own switch; never on validation/test."""

    enabled: bool = True  # false = no augmentation at all (the on/off comparison)
    shift_ms: float = 100.0  # random time shift up to +-shift_ms (zero filled); 0 = off
    noise_prob: float = 0.8  # share of clips mixed with background noise; 0 = off
    snr_db: tuple[float, float] = (5.0, 25.0)  # signal-to-noise ratio drawn uniformly in this range
    speed: tuple[float, float] = (0.9, 1.1)  # resampling factor (tempo and pitch together); (1, 1) = off
    time_masks: int = 2  # SpecAugment: masks over time per clip; 0 = off
    time_mask_frames: int = 10  # longest time mask, in feature frames
    freq_masks: int = 2  # SpecAugment: masks over mel bands per clip; 0 = off
    freq_mask_bins: int = 6  # widest frequency mask, in mel bands

    def __post_init__(self) -> None:
        self.snr_db, self.speed = tuple(self.snr_db), tuple(self.speed)  # YAML gives lists
        require(0.0 <= self.noise_prob <= 1.0, "augment.noise_prob", self.noise_prob, "in [0, 1]")
        require(0 < self.speed[0] <= self.speed[1], "augment.speed", self.speed, "0 < low <= high")
        require(self.snr_db[0] <= self.snr_db[1], "augment.snr_db", self.snr_db, "low <= high")
        require(self.shift_ms >= 0, "augment.shift_ms", self.shift_ms, ">= 0")


@dataclass
class SpeechOptim(OptimConfig):
    """The Conformer from scratch: a higher peak rate and lighter weight decay than a language model's."""

    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 50
    weight_decay: float = 0.01


@dataclass
class SpeechTrain(TrainConfig):
    """Sized for Speech Commands v2 (~30k training clips); configs/speech.yaml shortens it for the builtin set."""

    max_steps: int = 3000
    batch_size: int = 32
    eval_every: int = 500
    eval_batches: int = 10
    keep_checkpoints: int = 2


@dataclass
class SpeechConfig(RunConfig):
    """``python -m <package>.speech``: train a Conformer to recognise spoken commands from log-mel features."""

    debug_section = "speech"
    name: str = "speech"
    data: SpeechDataConfig = field(default_factory=SpeechDataConfig)
    features: AudioFeatureConfig = field(default_factory=AudioFeatureConfig)
    model: ConformerConfig = field(default_factory=ConformerConfig)
    augment: SpeechAugmentConfig = field(default_factory=SpeechAugmentConfig)
    optim: SpeechOptim = field(default_factory=SpeechOptim)
    train: SpeechTrain = field(default_factory=SpeechTrain)
    # also score the test voices mixed with coloured noise at this SNR (dB), the same noise every run: what the noise
    # augmentation buys; None = off
    noisy_test_snr_db: float | None = 10.0
