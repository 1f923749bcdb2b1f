from ibq.generation.sampling import filter_logits, hold_linear_weights_in, sample

__all__ = ["filter_logits", "hold_linear_weights_in", "sample"]
