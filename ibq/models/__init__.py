from ibq.models.discriminator import PatchDiscriminator
from ibq.models.tokenizer import Decoder, Encoder, Tokenizer

__all__ = ["Decoder", "Encoder", "PatchDiscriminator", "Tokenizer"]
