"""Multimodal encoders bound into one shared space (image, audio, 3D points, text); see docs/multimodal.md."""

from .audio import AudioEncoder, load_audio, log_mel, mel_filterbank, read_wav, resample
from .base import EncoderOutput, MultimodalConfig
from .binding import MODALITIES, BindingModel, info_nce
from .image import ImageEncoder, image_to_array, preprocess_images
from .pointfiles import load_points
from .points import PointsEncoder, farthest_point_sample, knn, prepare_clouds, validate_points
from .text import TextEncoder

__all__ = [
    "AudioEncoder", "BindingModel", "EncoderOutput", "ImageEncoder", "MODALITIES", "MultimodalConfig",
    "PointsEncoder", "TextEncoder", "farthest_point_sample", "image_to_array", "info_nce", "knn", "load_audio", "load_points",
    "log_mel", "mel_filterbank", "prepare_clouds", "preprocess_images", "read_wav", "resample",
    "validate_points",
]
