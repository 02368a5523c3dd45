"""Plain `nn.Module`s: the timm encoder, the LSTM decoders and caption search."""

from capline.models.decoders import AttentionDecoder, CaptionDecoder, ShowTellDecoder
from capline.models.encoder import EncoderConfigError, TimmEncoder, check_model_name
from capline.models.search import Generation, beam_search, greedy_search

__all__ = [
    "AttentionDecoder",
    "CaptionDecoder",
    "EncoderConfigError",
    "Generation",
    "ShowTellDecoder",
    "TimmEncoder",
    "beam_search",
    "check_model_name",
    "greedy_search",
]
