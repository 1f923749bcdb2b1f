from ibq.generation.sampling import filter_logits, sample

__all__ = ["filter_logits", "sample"]
