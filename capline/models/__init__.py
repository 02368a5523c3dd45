"""Plain `nn.Module`s: the timm encoder, the LSTM decoders and caption search."""

from capline.models.decoders import AttentionDecoder, CaptionDecoder, ShowTellDecoder
from capline.models.encoder import EncoderConfigError, TimmEncoder, check_model_name
from capline.models.search import Generation, beam_search, greedy_search
from capline.models.weights import WeightsError, convert_state_dict, convert_weights

__all__ = [
    "AttentionDecoder",
    "CaptionDecoder",
    "EncoderConfigError",
    "Generation",
    "ShowTellDecoder",
    "TimmEncoder",
    "WeightsError",
    "beam_search",
    "check_model_name",
    "convert_state_dict",
    "convert_weights",
    "greedy_search",
]
