from ibq.runs.record import MetricsLog, RunRecord, signature, write_json

__all__ = ["MetricsLog", "RunRecord", "signature", "write_json"]
