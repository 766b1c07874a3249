"""Data: the batch type (``batch``), prepared Parquet datasets (``dataset``), batch order
(``sampler``) and `steermoe prep` (``prep``)."""
